"""Settings overridden without being errors (docs/configuration.md#warnings): a key set in both a module's
TOML section and its call string with different values, and a sub-config ``[Master]`` key the main config
overrides. One line each, once per key and run, through the log."""

from __future__ import annotations

import re
import textwrap

from modules.pipeline_control.config import load_config, load_run_config
from modules.pipeline_control.config_model import ErrorCollector

CREATE = "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File"
TSYS = "modules.ProcessLevel2.SystemTemperature.SystemTemperature.SystemTemperature"
CHECK = "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists"


def level2_config(sql_database: str | None, sections: str, calls: dict[str, str]) -> str:
    master = f"sql_database = {sql_database!r}\n" if sql_database is not None else ""
    entries = [
        f"{CHECK}()",
        f"{CREATE}({calls.get('create', '')})",
        f"{TSYS}({calls.get('tsys', '')})",
    ]
    return (
        "[Master]\n"
        + master
        + "pipeline = [\n"
        + "".join(f"  {e!r},\n" for e in entries)
        + "]\n"
        + textwrap.dedent(sections)
    )


def test_section_and_call_with_different_values_warn_once_call_wins(tmp_path):
    cfg = tmp_path / "l2.toml"
    cfg.write_text(
        level2_config(
            None,
            f"""
            [{CREATE}]
            output_dir = "elsewhere"
            [{TSYS}]
            t_cold_k = 3          # the same value as the call's 3.0: no warning
            plot_dir = "plots"    # only in the section: no warning
            """,
            {"create": "output_dir='level2'", "tsys": "t_cold_k=3.0"},
        )
    )
    errors = ErrorCollector()
    loaded = load_config(cfg, "level2", errors)
    assert errors.errors == []
    assert errors.warnings == [
        f"{cfg}: CreateLevel2File: key 'output_dir' set in [{CREATE}] ('elsewhere') and in the call "
        "string ('level2'); using the call string's value"
    ]
    by_name = {e.name: e.params for e in loaded.entries}
    assert by_name["CreateLevel2File"]["output_dir"] == "level2"
    assert by_name["SystemTemperature"]["plot_dir"] == "plots"
    # loading it again into the same collector adds nothing: once per key
    load_config(cfg, "level2", errors)
    assert len(errors.warnings) == 1


def test_equal_lists_and_tuples_do_not_warn(tmp_path):
    cfg = tmp_path / "l2.toml"
    cfg.write_text(
        level2_config(
            None,
            f"""
            [{CREATE}]
            level1_attributes = ["comap", "hk"]
            """,
            {"create": "output_dir='level2', level1_attributes=('comap', 'hk')"},
        )
    )
    errors = ErrorCollector()
    load_config(cfg, "level2", errors)
    assert errors.errors == [] and errors.warnings == []


def _main(tmp_path, sql_database: str | None) -> None:
    master = f"sql_database = {sql_database!r}\n" if sql_database is not None else ""
    (tmp_path / "main.toml").write_text(
        "[Master]\n"
        + master
        + "pipeline = ['modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file=\"l2.toml\")']\n"
    )


def test_sub_config_master_key_overridden_by_the_main_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _main(tmp_path, "db.sqlite")
    cases = {
        "other.sqlite": [
            "l2.toml: [Master] sql_database = 'other.sqlite' is overridden by the main config main.toml "
            "('db.sqlite'); using the main config's value"
        ],
        "./db.sqlite": [],  # the same file
        None: [],  # not set: taken from the main config
    }
    for sub_value, expected in cases.items():
        (tmp_path / "l2.toml").write_text(level2_config(sub_value, "", {"create": "output_dir='level2'"}))
        run = load_run_config("main.toml")
        assert run.warnings == expected, sub_value
    # the main config's default is what the run uses when it names no database
    _main(tmp_path, None)
    (tmp_path / "l2.toml").write_text(level2_config("db.sqlite", "", {"create": "output_dir='level2'"}))
    assert load_run_config("main.toml").warnings == [
        "l2.toml: [Master] sql_database = 'db.sqlite' is overridden by the main config main.toml "
        "('databases/COMAP_manchester.db'); using the main config's value"
    ]


def test_a_run_logs_each_warning_once_with_several_observations_and_workers(workspace_factory, small_archive):
    """Three observations on two worker processes: each warning is one console line and one log line."""
    ws = workspace_factory(small_archive.paths)
    ws.write_configs(nprocess=2)
    l2 = (ws.root / "l2.toml").read_text()
    l2 = l2.replace("sql_database = 'db.sqlite'", "sql_database = 'elsewhere.sqlite'")
    l2 += f"\n[{CREATE}]\noutput_dir = 'not_used'\n"
    (ws.root / "l2.toml").write_text(l2)
    res = ws.run()
    assert res.returncode == 0, res.stderr
    assert len(ws.level2_files()) == 3
    assert not (ws.root / "elsewhere.sqlite").exists() and not (ws.root / "not_used").exists()
    logs = list((ws.root / "logs").glob("*.log"))
    assert len(logs) == 1
    patterns = (
        r"key 'output_dir' set in \[.*CreateLevel2File\] \('not_used'\)",
        r"sql_database = 'elsewhere",
    )
    for pattern in patterns:
        console = [ln for ln in (res.stdout + res.stderr).splitlines() if re.search(pattern, ln)]
        logged = [ln for ln in logs[0].read_text().splitlines() if re.search(pattern, ln)]
        assert len(console) == 1 and console[0].startswith("WARNING [-] config: l2.toml: "), console
        assert len(logged) == 1 and " WARNING " in logged[0], logged
