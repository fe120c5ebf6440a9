"""The command line beyond running a config (docs/configuration.md#command-line): the installed console
commands of pyproject.toml, ``--chdir``, ``--describe`` and ``--defaults-toml``
(docs/configuration.md#describing-a-module)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from modules.pipeline_control import cli
from modules.pipeline_control.callstrings import parse_call
from modules.pipeline_control.config_entries import resolve_entry
from modules.pipeline_control.config_master import LIST_KINDS
from modules.pipeline_control.config_model import ErrorCollector
from modules.pipeline_control.module_docs import (
    defaults_toml,
    describe_class,
    describe_text,
    descriptions_for,
    units_of,
)
from modules.pipeline_control.parameters import class_parameters
from modules.pipeline_control.resolve import resolve_callee
from modules.scripts._commands import command_name

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "modules" / "scripts").glob("*.py") if not p.stem.startswith("_"))
# The list a config of each kind takes (docs/developer.md#kinds-of-modules).
FILE_KIND = {"stage": "main", "per_observation": "level2", "streaming": "level2", "map_job": "map"}


def project_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def listed_classes():
    listings, errors = cli.list_modules(["modules."])
    assert errors == [] and listings
    return [(item, resolve_callee(item.path)) for item in listings]


# ------------------------------------------------------------------------------------------------
# Installed commands
# ------------------------------------------------------------------------------------------------


def test_project_scripts_are_run_py_and_one_per_query_script():
    expected = {"comap-reduce": "modules.pipeline_control.cli:main"}
    expected.update({command_name(s): f"modules.scripts.{s}:main" for s in SCRIPTS})
    assert len(SCRIPTS) >= 9
    assert project_scripts() == expected


@pytest.mark.parametrize("command", sorted(project_scripts()))
def test_every_command_target_answers_help_under_its_installed_name(command, monkeypatch, capsys):
    """What the console-script wrapper does: import ``module:function``, call it with the command as
    ``argv[0]``; ``--help`` exits 0 and the usage line names the installed command."""
    module, function = project_scripts()[command].split(":")
    monkeypatch.setattr(sys, "argv", [f"/usr/local/bin/{command}", "--help"])
    target = getattr(importlib.import_module(module), function)
    assert callable(target)
    with pytest.raises(SystemExit) as stop:
        sys.exit(target())  # as the wrapper does; argparse exits inside, or run_main returns its status
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {command} ")


def test_run_py_and_python_m_keep_their_names():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert res.returncode == 0 and res.stdout.startswith("usage: run.py "), res.stderr
    for flag in ("--chdir", "--describe", "--defaults-toml"):
        assert flag in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "modules.scripts.query_target", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m modules.scripts.query_target ")


# ------------------------------------------------------------------------------------------------
# --chdir
# ------------------------------------------------------------------------------------------------


def _write_config(root: Path) -> None:
    (root / "level1").mkdir(parents=True)
    assess = "modules.DataAcquisition.DataAssess.DataAssess.DataAssess"
    (root / "main.toml").write_text(
        "[Master]\n"
        'sql_database = "db.sqlite"\n'
        f"pipeline = [\"{assess}(level1_data_paths=['level1'], level2_data_paths=['level2'])\"]\n"
    )


def test_chdir_makes_the_config_and_its_relative_paths_resolve_from_dir(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _write_config(project)
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, str(REPO / "run.py")]
    # without --chdir the config path is relative to the working directory: not found
    res = subprocess.run(
        [*run, "main.toml", "--dry-run"], capture_output=True, text=True, env=env, cwd=elsewhere
    )
    assert res.returncode == 2 and "config file not found" in res.stderr
    res = subprocess.run(
        [*run, "--chdir", str(project), "main.toml", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
    )
    assert res.returncode == 0, res.stderr
    assert f"database will be created at {project / 'db.sqlite'}" in res.stdout + res.stderr
    assert "0 level-1 file(s) under ['level1']" in res.stdout
    assert list((project / "logs").glob("*_main.log")), "the log goes to DIR/logs"
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    # the short form, and a directory that does not exist: one line, status 2
    res = subprocess.run(
        [*run, "-C", str(tmp_path / "missing"), "main.toml"], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"run.py: error: --chdir {tmp_path / 'missing'}: No such file or directory"
    ]


def console_wrapper(bin_dir: Path, command: str) -> Path:
    """The launcher pip writes for a ``[project.scripts]`` entry (its template, this interpreter)."""
    module, function = project_scripts()[command].split(":")
    path = bin_dir / command
    path.write_text(
        f"#!{sys.executable}\n"
        "import re\nimport sys\n"
        f"from {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    path.chmod(0o755)
    return path


def test_installed_comap_reduce_runs_a_project_from_anywhere(tmp_path):
    project, bin_dir = tmp_path / "project", tmp_path / "bin"
    _write_config(project)
    bin_dir.mkdir()
    command = console_wrapper(bin_dir, "comap-reduce")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as an installed package: importable from anywhere
    res = subprocess.run(
        [str(command), "-C", "project", "main.toml", "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert "DataAssess: 0 level-1 file(s) under ['level1']" in res.stdout
    res = subprocess.run([str(command), "main.toml", "--obsid", "x"], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert res.stderr.splitlines() == ["comap-reduce: error: --obsid: 'x' is not an obsid"]


def test_installed_launchers_of_this_environment_answer(tmp_path):
    """The launchers ``pip install`` wrote next to the interpreter (``make env`` in CI): each runs from
    another directory. An environment installed before the commands existed has none of them; a
    partial set, or a launcher that does not run, fails."""
    bin_dir = Path(sys.executable).parent
    present = {c: bin_dir / c for c in project_scripts() if (bin_dir / c).exists()}
    if not present:
        pytest.skip(f"the package was installed into {bin_dir} before its commands existed: pip install -e .")
    assert sorted(present) == sorted(project_scripts())
    for command, path in present.items():
        res = subprocess.run([str(path), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert res.returncode == 0, (command, res.stderr)
        assert res.stdout.startswith(f"usage: {command} "), res.stdout[:200]
    res = subprocess.run(
        [str(present["comap-reduce"]), "--version"], capture_output=True, text=True, cwd=tmp_path
    )
    assert res.returncode == 0 and res.stdout.strip(), res.stderr


# ------------------------------------------------------------------------------------------------
# --describe
# ------------------------------------------------------------------------------------------------


def test_describe_covers_every_parameter_of_every_module(listed_classes):
    undocumented = []
    for item, cls in listed_classes:
        params, _ = class_parameters(cls)
        described = describe_class(cls)
        assert [p.name for p in described] == list(params)
        undocumented += [f"{item.path}: {p.name}" for p in described if not p.description.strip()]
        text = describe_text(cls, item.kind)
        for p in described:
            assert f"  {p.name} : {p.type}\n" in text
            default = "required" if p.required else repr(p.default)
            assert f"default: {default}\n" in text
    assert undocumented == []


def test_describe_prints_type_default_units_and_description(capsys):
    assert cli.main(["--describe", "CalibratorFitting"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("modules.ProcessLevel2.CalibratorFitting.CalibratorFitting.CalibratorFitting\n")
    block = out.split("  fit_radius_deg : ", 1)[1].split("\n  ", 4)
    assert block[0].startswith("float")
    assert block[1].startswith("    default: ") and block[2] == "    units:   deg"
    assert "Samples within this distance of the source are fitted" in block[3]


# Unit suffixes of parameter names and the units they stand for (docs/configuration.md#describing-a-module).
UNIT_SUFFIXES = {
    "s": "s",
    "hz": "Hz",
    "ghz": "GHz",
    "deg": "deg",
    "arcmin": "arcmin",
    "arcsec": "arcsec",
    "k": "K",
    "kms": "km/s",
    "gb": "GB",
    "kbps": "KiB/s",
    "sigma": "σ",
}
# "Selection, as CreateMap.": a description that sends the reader to another module's.
POINTER = re.compile(r"(?:^|[,;(]\s*)as (?:in )?[A-Z][a-z]+[A-Z]\w*")


def test_every_parameter_of_every_module_has_its_own_description(listed_classes):
    """No grouped stand-in (``Destriper settings (samples, —, —, —, iterations)`` for five
    parameters), no pointer to another module, and units that agree with a unit suffix of the name."""
    problems = []
    for item, cls in listed_classes:
        described = describe_class(cls)
        by_text: dict[str, list[str]] = {}
        for p in described:
            by_text.setdefault(p.description, []).append(p.name)
            if POINTER.search(p.description):
                problems.append(f"{item.path}: {p.name}: a pointer, not a description: {p.description!r}")
            suffix = p.name.rsplit("_", 1)[-1] if "_" in p.name else ""
            expected = UNIT_SUFFIXES.get(suffix)
            if expected is not None and p.units != expected:
                problems.append(f"{item.path}: {p.name}: units {p.units!r}, the name says {expected!r}")
        for text, names in by_text.items():
            # a genuine pair or range may share one sentence when the sentence names each parameter
            if len(names) > 1 and not all(name in text for name in names):
                problems.append(f"{item.path}: {', '.join(names)} share one description: {text!r}")
    assert problems == []


def test_a_shared_parameter_group_is_described_once():
    """The map products take their shared parameters from the groups of job_parameters, which
    describe them; a product redescribes only what differs (CreateMap's red-noise cuts)."""
    from modules.MapMaking.job_parameters import DestriperParameters, SelectionParameters
    from modules.MapMaking.MapMakingModules.CreateHitMap.CreateHitMap import CreateHitMap
    from modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap import CreateLineMap
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap

    group = descriptions_for(SelectionParameters) | descriptions_for(DestriperParameters)
    for cls in (CreateMap, CreateHitMap, CreateLineMap):
        texts = descriptions_for(cls)
        for name in ("source", "obsid_list_file", "min_obsid", "feeds", "use_quality_flags", "offset_length"):
            if name in class_parameters(cls)[0]:
                assert texts[name] == group[name], (cls.__name__, name)
    assert descriptions_for(CreateMap)["sigma_red_cutoff_k"] != group["sigma_red_cutoff_k"]
    assert "sky-free residual" in descriptions_for(CreateMap)["sigma_red_cutoff_k"]
    assert descriptions_for(CreateHitMap)["sigma_red_cutoff_k"] == group["sigma_red_cutoff_k"]


@pytest.mark.parametrize(
    ("name", "description", "annotation", "units"),
    [
        ("bright_cut_k", "Cut of ``bright_mask_map``, K.", float, "K"),
        ("line_frequency", "Rest frequency (GHz); a list stacks several lines.", float, "GHz"),
        ("f", "Reference frequency in Hz of the amplitude.", float, "Hz"),
        ("w", "Window [samples] of the filter.", int, "samples"),
        ("radius_arcmin", "Radius of the disc.", float, "arcmin"),
        ("timeout", "Timeout, s; 0 = none.", float, "s"),
        ("velocity_center_kms", "LSRK radio velocity of the cube centre.", float, "km/s"),
        ("lambda_ridge", "Ridge regularisation λ (K⁻²) added to the diagonal.", float, "K⁻²"),
        ("band", "Band(s) 0–3 and binned channel(s).", int, ""),  # a plural is not a unit
        ("plot", "Write the rms spectra (K) per feed.", bool, ""),  # a flag has no units
        ("n", "Number of bins.", int, ""),
    ],
)
def test_units_from_description_or_name(name, description, annotation, units):
    assert units_of(name, description, annotation) == units


def test_describe_names_unknown_and_ambiguous_modules_in_one_line(tmp_path, monkeypatch, capsys):
    assert cli.main(["--describe", "CreateMapp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown module 'CreateMapp'" in err[0] and "CreateMap" in err[0]
    assert cli.main(["--defaults-toml", "modules.MapMaking.Nowhere.CreateMap"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "run.py: error: unknown module 'modules.MapMaking.Nowhere.CreateMap'; did you mean: "
        "modules.MapMaking.MapMakingModules.CreateMap.CreateMap.CreateMap"
    ]
    # two plug-in modules with the same class name
    pkg = tmp_path / "twinpkg_cli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = (
        "from modules.pipeline_control.Pipeline import BaseCOMAPModule\n\n\n"
        "class Twin(BaseCOMAPModule):\n"
        '    """A test module.\n\n    Parameters\n    ----------\n'
        '    gain : float\n        Gain (K).\n    """\n\n'
        "    def __init__(self, gain: float = 1.0):\n        self.gain = gain\n"
    )
    (pkg / "one.py").write_text(body)
    (pkg / "two.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(cli._UsageError) as exc:
        cli.find_module("Twin", ["modules.", "twinpkg_cli."])
    assert str(exc.value) == (
        "module name 'Twin' is ambiguous; candidates: twinpkg_cli.one.Twin, twinpkg_cli.two.Twin"
    )
    assert (
        cli.find_module("twinpkg_cli.two.Twin", ["modules.", "twinpkg_cli."]).__module__ == "twinpkg_cli.two"
    )


# ------------------------------------------------------------------------------------------------
# --defaults-toml
# ------------------------------------------------------------------------------------------------


# Values for the required keywords in the round trip (every required one today is a string).
REQUIRED_EXAMPLES = {
    "remote": "comap@archive.example:/level1",
    "local_dir": "level1",
    "observer_flags_csv_file": "flags.csv",  # written by the test
}


def _required_value(name, annotation):
    if annotation is str:
        return REQUIRED_EXAMPLES.get(name, f"{name}.csv")
    pytest.fail(f"no example value for the required parameter {name} annotated {annotation!r}")


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def test_defaults_toml_parses_and_validates_for_every_module(listed_classes, tmp_path, monkeypatch):
    """The printed section, pasted into a config of the module's kind, validates and resolves every
    parameter to its default."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flags.csv").write_text("ObsID start,ObsID end,Pixels,Sidebands,Comment\n")
    for item, cls in listed_classes:
        text = defaults_toml(cls)
        raw = tomllib.loads(text)
        params, _ = class_parameters(cls)
        required = {n: _required_value(n, p.annotation) for n, p in params.items() if p.required}
        call_text = f"{item.path}({', '.join(f'{k}={v!r}' for k, v in required.items())})"
        call = parse_call(call_text, file="pasted.toml", index=0)
        errors = ErrorCollector()
        kind = FILE_KIND[item.kind]
        used: set[str] = set()
        spec = resolve_entry(raw, call, LIST_KINDS[kind], kind, [], errors, used)
        assert errors.errors == [], (item.path, [str(e) for e in errors.errors])
        assert spec is not None and used == {item.path}
        assert errors.warnings == []
        for name, info in params.items():
            expected = required[name] if info.required else info.default
            assert _plain(spec.params[name]) == _plain(expected), (item.path, name)
        # every settable default is written out, each after its comment
        lines = text.splitlines()
        for name, info in params.items():
            if not info.required and info.default is not None:
                row = next(i for i, ln in enumerate(lines) if ln.startswith(f"{name} = "))
                assert lines[row - 1].startswith("# "), (item.path, name)


def test_defaults_toml_comments_required_and_none_parameters(capsys):
    assert cli.main(["--defaults-toml", "DataAcquisition"]) == 0
    out = capsys.readouterr().out
    assert "[modules.DataAcquisition.DataAcquisition.DataAcquisition.DataAcquisition]\n" in out
    assert "\n# remote =   # required: no default" in out
    assert "\n# remote_index =   # default None: TOML has no null" in out
    assert "\nretry_delay_s = 10.0\n" in out
    assert "retry delay, s" in out.lower()
