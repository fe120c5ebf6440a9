"""Regression tests of the defects the config fuzzer found (tests/reliability/test_config_fuzz.py,
docs/reliability.md#config-fuzzing), one focused test each."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from modules.pipeline_control.config import ErrorCollector, load_config, load_run_config, parse_call
from utils.errors import ConfigError, ConfigErrors

G = "modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin.GainFilterAndBin"


def _load_text(tmp_path: Path, text: str, kind: str = "level2") -> list[ConfigError]:
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    errors = ErrorCollector()
    load_config(path, kind, errors)
    return errors.errors


@pytest.mark.parametrize(
    "template", ["logs/{timestamp", "logs/}.log", "logs/{timestamp:%Y}.log", "/", ".", "logs/a\\u0000b"]
)
def test_log_file_template_the_runner_cannot_expand_is_a_config_error(tmp_path, template):
    """Found by the fuzzer: these templates passed the check and raised in the runner (a traceback)."""
    errors = _load_text(tmp_path, f'[Master]\npipeline = []\nlog_file = "{template}"\n', "main")
    assert [e.where for e in errors] == ["[Master] log_file"], errors


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x85", "\r"])
def test_error_lines_stay_one_line_with_any_line_separator(sep):
    """Found by the fuzzer: only \\n and \\r were collapsed; str.splitlines splits on more."""
    with pytest.raises(ConfigError) as info:
        parse_call(f"{G}(n_freq_bin='a{sep}b', x=os)", file="-", index=0)
    assert len(info.value.line().splitlines()) == 1


@pytest.mark.parametrize(
    "text", [f"{G}(n_freq_bin={'-' * 3000}1)", f"{G}(n_freq_bin='\udcff')", f"{G}(n_freq_bin='\x00')"]
)
def test_call_strings_python_cannot_parse_are_config_errors(text):
    """Found by the fuzzer: RecursionError and UnicodeEncodeError escaped ``parse_call``."""
    with pytest.raises(ConfigError, match="malformed call string"):
        parse_call(text, file="-", index=0)


@pytest.mark.parametrize("value", ["0x" + "f" * 40, "-0x" + "f" * 4000, str(2**63)])
def test_integers_beyond_64_bits_are_config_errors(tmp_path, value):
    """Found by the fuzzer: a huge integer was accepted, and one past 4300 digits made the error
    message itself raise (``repr``); TOML integers are 64-bit."""
    with pytest.raises(ConfigError, match="64 bits"):
        parse_call(f"{G}(n_freq_bin={value})", file="-", index=0)
    errors = _load_text(tmp_path, f"[Master]\npipeline = []\nmax_obsid = {value.replace('-0x', '0x')}\n")
    assert errors and all("64-bit" in e.message for e in errors), errors
    errors = _load_text(tmp_path, f"[Master]\npipeline = []\nmin_obsid = {'9' * 5000}\n")
    assert len(errors) == 1 and "TOML" in errors[0].line(), errors


@pytest.mark.parametrize(
    "path",
    [
        "modules.pipeline_control.base.BaseCOMAPModule",
        "modules.pipeline_control.base.StreamingStage",
        "modules.pipeline_control.base.PipelineStage",
        "modules.MapMaking.product.MapProduct",
        f"{G}.__base__",
        "modules.MapMaking.MapMakingModules.CreateMapDayNight.CreateMapDayNight.CreateMapDayNight.__base__",
        "modules.ProcessLevel2.GainFilterAndBin._private.X",
    ],
)
def test_base_classes_are_not_pipeline_modules(tmp_path, path):
    """Found by the fuzzer: a base class (also reached as ``X.__base__``) was a valid entry, and
    so was a listed class reached through a special attribute (``CreateMapDayNight.__base__`` is
    CreateMap)."""
    for kind in ("main", "level2", "map"):
        errors = _load_text(tmp_path, f'[Master]\npipeline = ["{path}()"]\n', kind)
        assert any(
            "base class" in e.message or "list takes" in e.message or "'_'" in e.message for e in errors
        ), errors
    errors = _load_text(tmp_path, f'[Master]\npipeline = ["{path}()"]\n', "level2")
    if path.endswith("BaseCOMAPModule"):  # of the kind a level-2 list takes, refused as a base
        assert any("base class" in e.message for e in errors), errors


def test_range_refuses_infinity(tmp_path):
    """Found by the fuzzer: ``inf`` (``1e999`` in a call string, ``inf`` in TOML) passed a one-sided
    ``Range`` such as ``float (> 0)``."""
    from modules.pipeline_control.parameters import Range

    assert Range(gt=0).problem(math.inf) == "must be finite"
    assert Range(le=0).problem(-math.inf) == "must be finite"
    assert Range(gt=0).problem(1e300) is None
    listing = "modules.DataAcquisition.DataCheckRemote.DataCheckRemote.DataCheckRemote"
    errors = _load_text(
        tmp_path,
        f"[Master]\npipeline = [\"{listing}(remote='h:/x', local_dir='l', listing_timeout_s=1e999)\"]\n",
        "main",
    )
    assert any("must be finite" in e.message for e in errors), errors


@pytest.mark.parametrize(
    "text", ["Master = 1\n", 'Master = "x"\n', "[Master]\npipeline = 5\n", "n = 9" + "9" * 5000]
)
def test_run_config_with_odd_master_is_a_config_error(tmp_path, text):
    """Found by the fuzzer: ``load_run_config`` (run.py) raised AttributeError/TypeError/ValueError
    while guessing the kind of file."""
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigErrors):
        load_run_config(path)


def test_sections_of_two_classes_of_one_module(tmp_path):
    """Found by the fuzzer: with sections for both MapMaking and LineMapMaking (two classes of
    ``modules.MapMaking.MapMaking``), LineMapMaking's table was read as a second section of MapMaking."""
    errors = _load_text(
        tmp_path,
        """
        [Master]
        pipeline = ["modules.MapMaking.MapMaking.MapMaking()", "modules.MapMaking.MapMaking.LineMapMaking()"]
        [modules.MapMaking.MapMaking.MapMaking]
        config_file = "a.toml"
        [modules.MapMaking.MapMaking.LineMapMaking]
        config_file = "b.toml"
        """,
        "main",
    )
    assert errors == []


def test_a_file_name_with_a_line_break_stays_on_one_line(tmp_path):
    """Found by the fuzzer: a ``config_file`` naming a missing file with U+2028 in its name printed
    two lines; the file part is shown escaped."""
    error = ConfigError("config file not found", str(tmp_path / "sub\u2028x"), "file")
    assert len(error.line().splitlines()) == 1 and "sub\\u2028x" in error.line()


def test_a_string_with_a_nul_is_refused(tmp_path):
    """Found by the fuzzer once strings with a NUL were among the refused values: such a path
    (``output_dir = "a\\u0000b"``) passed the check, though every file operation on it raises
    ValueError."""
    errors = _load_text(
        tmp_path,
        """
        [Master]
        pipeline = ["modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File()"]
        [modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File]
        output_dir = "level2\\u0000x"
        """,
    )
    assert any("NUL" in e.message for e in errors), errors
