"""Config parsing, allow-list, precedence and validation (docs/configuration.md#configuration-files), through
the real CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modules.pipeline_control.config import (
    ErrorCollector,
    load_config,
    load_run_config,
    parse_call,
    resolve_callee,
)
from utils.errors import ConfigError, ConfigErrors

REPO = Path(__file__).resolve().parents[1]

USER_PACKAGE = '''
from modules.pipeline_control.Pipeline import BaseCOMAPModule, PipelineStage, StageResult

RECORD = []


class Probe(BaseCOMAPModule):
    """A per-observation module used by the config tests."""

    def __init__(self, alpha: int = 1, beta: str = "default", gamma: float = 0.5, flag: bool = False,
                 items: list | None = None, maybe: int | None = None):
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.flag, self.items, self.maybe = flag, items, maybe

    def run(self, file_info):
        RECORD.append(file_info)


class Stage(PipelineStage):
    """A top-level stage that writes its resolved parameters to a file."""

    def __init__(self, out: str = "stage_out.txt", alpha: int = 1, beta: str = "default"):
        self.out, self.alpha, self.beta = out, alpha, beta

    def run(self):
        with open(self.out, "w") as fh:
            fh.write(f"{self.alpha} {self.beta}")
        return StageResult(stage="Stage", done=1)


class NeedsRemote(PipelineStage):
    """A stage with a required parameter."""

    def __init__(self, remote: str):
        self.remote = remote

    def run(self):
        return StageResult(stage="NeedsRemote")
'''


@pytest.fixture()
def userpkg(tmp_path, monkeypatch):
    pkg = tmp_path / "pkgroot" / "mylab_cfgtest"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "probe.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("mylab_cfgtest")]:
        del sys.modules[name]


def run_cli(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO) + (f":{extra_path}" if extra_path else ""), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------------------------------
# Call strings
# --------------------------------------------------------------------------------------------------

HOSTILE = [
    "__import__('os').system('touch pwned')",
    "modules.X.Y(a=__import__('os').system('touch pwned'))",
    "modules.X.Y(a=open('pwned', 'w'))",
    "modules.X.Y(a=os.path)",
    "modules.X.Y(a=lambda: 1)",
    "modules.X.Y(a=f'{1}')",
    "modules.X.Y('positional')",
    "modules.X.Y(*args)",
    "modules.X.Y(**kw)",
    "modules.X.Y(a=[x for x in range(3)])",
    "modules.X.Y(a={1, 2})",
    "modules.X.Y(a=b'bytes')",
    "modules.X.Y(a=1j)",
    "modules.X.Y(a=1 + 2)",
    "modules.X.Y(a=1, a=2)",
    "modules.X.Y",
    "(lambda: 1)()",
    "modules.X.Y(a=(yield))",
    "modules.X.Y(",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_call_strings_are_rejected(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        parse_call(text, file="cfg.toml", index=3)
    err = info.value
    assert err.file == "cfg.toml" and err.where == "pipeline[3]" and err.text == text
    assert "\n" not in err.line()
    assert not (tmp_path / "pwned").exists()


def test_literal_values_parse():
    call = parse_call(
        "modules.X.Y(a=1, b=-2.5, c='s', d=True, e=None, f=[1, 'x'], g=(1, 2), h={'k': [1]})",
        file="f",
        index=0,
    )
    assert call.path == "modules.X.Y"
    assert call.kwargs == {
        "a": 1,
        "b": -2.5,
        "c": "s",
        "d": True,
        "e": None,
        "f": [1, "x"],
        "g": (1, 2),
        "h": {"k": [1]},
    }


def test_paths_outside_modules_are_not_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        pipeline = ["os.system(command='touch pwned')", "subprocess.Popen(args='x')"]
    """,
    )
    res = run_cli([str(cfg)], tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ConfigError")]
    assert len(lines) == 2
    assert all("module path not allowed" in ln for ln in lines)
    assert not (tmp_path / "pwned").exists()


def test_hostile_string_in_config_exits_2_and_runs_nothing(tmp_path):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        pipeline = ["__import__('os').system('touch pwned')"]
    """,
    )
    res = run_cli([str(cfg)], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().startswith("ConfigError: ")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "db.sqlite").exists()
    assert not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------------------------------
# Resolution and precedence
# --------------------------------------------------------------------------------------------------


def test_resolve_both_forms():
    a = resolve_callee("modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File")
    b = resolve_callee("modules.ProcessLevel2.CreateLevel2File.CreateLevel2File")
    assert a is b and a.__name__ == "CreateLevel2File"


def test_unknown_module_message():
    with pytest.raises(ConfigError, match="unknown module"):
        resolve_callee("modules.ProcessLevel2.NoSuchModule.NoSuchModule")


def test_precedence_defaults_section_call(tmp_path, userpkg):
    cfg = write(
        tmp_path / "l2.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = [
          "mylab_cfgtest.probe.Probe(alpha=3)",
          "mylab_cfgtest.probe.Probe()",
        ]
        [mylab_cfgtest.probe.Probe]
        alpha = 2
        beta = "from-section"
    """,
    )
    errors = ErrorCollector()
    loaded = load_config(cfg, "level2", errors)
    assert not errors, [e.line() for e in errors.errors]
    first, second = loaded.entries
    assert first.params["alpha"] == 3 and first.params["beta"] == "from-section"
    assert second.params["alpha"] == 2 and second.params["gamma"] == 0.5
    assert first.params["maybe"] is None


def test_section_under_two_keys_is_an_error(tmp_path, userpkg):
    (userpkg / "Twin").mkdir()
    (userpkg / "Twin" / "__init__.py").write_text("")
    (userpkg / "Twin" / "Twin.py").write_text(
        "from modules.pipeline_control.Pipeline import BaseCOMAPModule\n"
        "class Twin(BaseCOMAPModule):\n    def __init__(self, a: int = 1):\n        self.a = a\n"
        "    def run(self, f):\n        pass\n"
    )
    cfg = write(
        tmp_path / "l2.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.Twin.Twin()"]
        [mylab_cfgtest.Twin.Twin]
        a = 2
        [mylab_cfgtest.Twin.Twin.Twin]
        a = 3
    """,
    )
    errors = ErrorCollector()
    load_config(cfg, "level2", errors)
    assert any("more than one section" in e.message for e in errors.errors)


def test_unknown_keyword_lists_known_ones(tmp_path, userpkg):
    cfg = write(
        tmp_path / "l2.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Probe(alhpa=3)"]
    """,
    )
    errors = ErrorCollector()
    load_config(cfg, "level2", errors)
    (err,) = errors.errors
    assert "unknown keyword 'alhpa'" in err.message
    assert "alpha, beta, gamma, flag, items, maybe" in err.message


@pytest.mark.parametrize(
    "kind, call",
    [
        (
            "level2",
            "modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2.NoiseStatsLevel2(bright_mask_map='a.fits')",
        ),
        (
            "map",
            "modules.MapMaking.MapMakingModules.CreateMap.CreateMap(band=0, channel=0, bright_cut_k=0.1)",
        ),
    ],
)
def test_moved_bright_mask_options_name_the_source_mask(tmp_path, kind, call):
    """The former per-module bright-source options give one ConfigError saying where the mask is now."""
    cfg = write(
        tmp_path / "cfg.toml",
        f"""
        [Master]
        sql_database = "x.db"
        pipeline = ["{call}"]
    """,
    )
    errors = ErrorCollector()
    load_config(cfg, kind, errors)
    (err,) = errors.errors
    assert "is no longer a parameter" in err.message
    assert "CreateLevel2File" in err.message and "docs/level2.md#source-mask" in err.message


@pytest.mark.parametrize(
    "call, fragment",
    [
        ("alpha='three'", "keyword 'alpha' of Probe must be int"),
        ("alpha=True", "keyword 'alpha' of Probe must be int"),
        ("gamma='x'", "keyword 'gamma' of Probe must be float"),
        ("flag=1", "keyword 'flag' of Probe must be bool"),
        ("items='a,b'", "keyword 'items' of Probe must be"),
        ("maybe=1.5", "keyword 'maybe' of Probe must be"),
    ],
)
def test_annotation_mismatch(call, fragment, tmp_path, userpkg):
    cfg = write(
        tmp_path / "l2.toml",
        f"""
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Probe({call})"]
    """,
    )
    errors = ErrorCollector()
    load_config(cfg, "level2", errors)
    assert len(errors.errors) == 1 and fragment in errors.errors[0].message


def test_int_accepted_for_float(tmp_path, userpkg):
    cfg = write(
        tmp_path / "l2.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Probe(gamma=2, maybe=None)"]
    """,
    )
    errors = ErrorCollector()
    loaded = load_config(cfg, "level2", errors)
    assert not errors and loaded.entries[0].params["gamma"] == 2


def test_missing_required_keyword(tmp_path, userpkg):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.NeedsRemote()"]
    """,
    )
    with pytest.raises(ConfigErrors) as info:
        load_run_config(cfg)
    assert "missing required keyword 'remote'" in info.value.errors[0].message


def test_wrong_kind_in_list(tmp_path, userpkg):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Stage()", "mylab_cfgtest.probe.Probe()"]
    """,
    )
    with pytest.raises(ConfigErrors) as info:
        load_run_config(cfg)
    assert any("Probe is a per-observation module" in e.message for e in info.value.errors)


def test_all_errors_reported_together(tmp_path, userpkg):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        module_paths = ["mylab_cfgtest."]
        colour = "blue"
        pipeline = [
          "mylab_cfgtest.probe.Stage(alpha='x')",
          "mylab_cfgtest.probe.Stage(nope=1)",
          "modules.DoesNot.Exist()",
          "os.getcwd()",
        ]
    """,
    )
    res = run_cli([str(cfg)], tmp_path, extra_path=userpkg.parent)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 5, res.stderr
    assert all(ln.startswith(f"ConfigError: {cfg}: ") for ln in lines)
    assert not (tmp_path / "db.sqlite").exists()


# --------------------------------------------------------------------------------------------------
# Files and the CLI
# --------------------------------------------------------------------------------------------------


def test_toml_syntax_error_has_line_number(tmp_path):
    cfg = write(
        tmp_path / "bad.toml",
        """
        [Master]
        sql_database = "x.db"
        pipeline = [ "modules.X.Y()"
        oops = = 1
    """,
    )
    res = run_cli([str(cfg)], tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"ConfigError: {cfg}: line 5, column")
    assert "TOML syntax error" in line


def test_missing_config_file(tmp_path):
    res = run_cli(["nope.toml"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == "ConfigError: nope.toml: file: config file not found"


def test_missing_sub_config_names_the_stage(tmp_path):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        pipeline = ["modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='missing_l2.toml')"]
    """,
    )
    res = run_cli([str(cfg)], tmp_path)
    assert res.returncode == 2
    assert "missing_l2.toml" in res.stderr and "Level2Pipeline" in res.stderr


def test_unknown_module_exit_2(tmp_path):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        pipeline = ["modules.ProcessLevel2.NotAModule.NotAModule.NotAModule()"]
    """,
    )
    res = run_cli([str(cfg)], tmp_path)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert "unknown module" in line and "pipeline[0]" in line


def test_unknown_master_key_and_bad_placeholder(tmp_path):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        log_file = "logs/{when}.log"
        nprocess = 2
        pipeline = []
    """,
    )
    with pytest.raises(ConfigErrors) as info:
        load_run_config(cfg)
    messages = " | ".join(e.message for e in info.value.errors)
    assert "unknown key 'nprocess' for a main config" in messages
    assert "unknown log_file placeholder '{when}'" in messages


def test_stage_runs_with_call_kwargs_and_writes_resolved_dump(tmp_path, userpkg):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Stage(out='result.txt', alpha=7)"]
        [mylab_cfgtest.probe.Stage]
        alpha = 5
        beta = "sec"
    """,
    )
    # a user stage does not register observations: creating the database is asked for
    res = run_cli([str(cfg), "--create-db"], tmp_path, extra_path=userpkg.parent)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "result.txt").read_text() == "7 sec"
    dumps = list((tmp_path / "logs").glob("*_main.resolved.toml"))
    logs = list((tmp_path / "logs").glob("*_main.log"))
    assert len(dumps) == 1 and len(logs) == 1
    import tomllib

    dumped = tomllib.loads(dumps[0].read_text())
    entry = dumped["main"]["pipeline"][0]
    assert entry["class"] == "mylab_cfgtest.probe.Stage" and entry["params"]["alpha"] == 7


def test_dry_run_writes_nothing_but_the_log(tmp_path, userpkg):
    cfg = write(
        tmp_path / "main.toml",
        """
        [Master]
        sql_database = "db.sqlite"
        module_paths = ["mylab_cfgtest."]
        pipeline = ["mylab_cfgtest.probe.Stage(out='result.txt')"]
    """,
    )
    res = run_cli([str(cfg), "--dry-run", "--create-db"], tmp_path, extra_path=userpkg.parent)
    assert res.returncode == 0, res.stderr
    assert "database will be created at" in res.stdout
    assert not (tmp_path / "result.txt").exists()
    assert not (tmp_path / "db.sqlite").exists()
    assert sorted(p.suffix for p in (tmp_path / "logs").iterdir()) == [".log"]


def test_version_and_list_modules(tmp_path):
    res = run_cli(["--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.strip()
    res = run_cli(["--list-modules"], tmp_path)
    assert res.returncode == 0
    assert "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline" in res.stdout
    assert "config_file = 'parameter_files/level2_processing.toml'" in res.stdout


def test_usage_errors_exit_2(tmp_path):
    assert run_cli([], tmp_path).returncode == 2
    assert run_cli(["x.toml", "--obsid", "12-3"], tmp_path).returncode == 2
    assert run_cli(["x.toml", "--bogus"], tmp_path).returncode == 2
