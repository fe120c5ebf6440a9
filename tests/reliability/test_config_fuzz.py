"""Config fuzzing (docs/reliability.md#config-fuzzing): generated call strings and TOML documents,
built from the real modules' signatures, through the real loader.

Every generated document is either accepted as a valid plan, whose instantiated modules hold the
generated values, or refused with ConfigErrors whose every line is one ``ConfigError: ...`` line;
no other exception escapes, and nothing in a config is ever evaluated (an audit hook watches every
``compile``/``exec`` the loader makes, and injected payloads would leave a sentinel behind).
"""

from __future__ import annotations

import ast
import builtins
import collections
import dataclasses
import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fuzz_strategies import (
    ModuleInfo,
    checkable,
    discovered_modules,
    generatable,
    modules_of,
    out_of_range_values,
    valid_values,
    wrong_type_values,
)
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from modules.pipeline_control.config import (
    ErrorCollector,
    detect_file_kind,
    load_config,
    load_run_config,
    parse_call,
)
from modules.pipeline_control.config_entries import resolve_entry
from modules.pipeline_control.config_master import LIST_KINDS
from modules.pipeline_control.resolve import resolve_callee
from utils.errors import ConfigError, ConfigErrors

REPO = Path(__file__).resolve().parents[2]
SENTINEL = "comap_fuzz_sentinel"

# Examples per test; their sum is the number of generated cases (at least 10,000).
_SCALE = float(os.environ.get("COMAP_FUZZ_SCALE", 1))  # < 1 only while developing
N_DOCUMENTS = int(1500 * _SCALE)
N_CALL_STRINGS = int(7000 * _SCALE)
CALLS_PER_EXAMPLE = 4
N_TEXT_MUTATIONS = int(1200 * _SCALE)
N_RUN_CONFIGS = int(300 * _SCALE)
# A valid-intent document may still be refused by a cross-parameter rule (``parameter_rules``)
# or by the level-2 chain check; the share actually accepted must stay in this band.
VALID_SHARE = (0.30, 0.60)

FUZZ: dict[str, Any] = dict(deadline=None, derandomize=True, database=None, print_blob=True)
if os.environ.get("COMAP_FUZZ_NO_SHRINK"):
    FUZZ["phases"] = [Phase.explicit, Phase.generate]
SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# ------------------------------------------------------------------------------------------------
# The no-evaluation guard
# ------------------------------------------------------------------------------------------------


class NoEvalGuard:
    """Records every ``compile``/``exec`` audit event raised while active, except the ones of
    ``ast.parse`` (an AST only, never code) and of ``typing`` evaluating the string annotations of
    the modules' own source (``from __future__ import annotations``), whose text is not config
    text. ``eval(text)``, ``exec(text)`` and ``compile(text)`` of config text are all caught: each
    raises a ``compile`` event from its caller's frame, and running code raises ``exec``."""

    _ALLOWED_COMPILE = {ast.parse.__code__, typing.ForwardRef.__init__.__code__}
    _ALLOWED_EXEC = {typing.ForwardRef._evaluate.__code__}

    def __init__(self) -> None:
        self.active = False
        self.installed = False
        self.violations: list[str] = []

    def _hook(self, event_name: str, args: tuple) -> None:
        if not self.active or event_name not in ("compile", "exec"):
            return
        caller = sys._getframe(1).f_code
        source = args[0] if event_name == "compile" else None
        text = source.decode("utf-8", "replace") if isinstance(source, bytes) else str(source)
        allowed = self._ALLOWED_COMPILE if event_name == "compile" else self._ALLOWED_EXEC
        if caller in allowed and not (caller is not ast.parse.__code__ and SENTINEL in text):
            return
        if SENTINEL not in text and self._in_import():
            return  # a lazy import: a module's own code (and what it builds, e.g. namedtuples)
        self.violations.append(f"{event_name} from {caller.co_filename}:{caller.co_name}: {text[:120]!r}")

    @staticmethod
    def _in_import() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
                return True
            frame = frame.f_back
        return False

    def __enter__(self) -> NoEvalGuard:
        if not self.installed:  # an audit hook cannot be removed: add it only when first needed
            sys.addaudithook(self._hook)
            self.installed = True
        self.violations.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


GUARD = NoEvalGuard()


def _sentinel_fired(sentinel_file: Path) -> bool:
    return hasattr(builtins, SENTINEL) or sentinel_file.exists()


def injection_payloads(sentinel_file: Path) -> list[str]:
    """Keyword values that would set a builtin or create a file if anything evaluated them."""
    f = str(sentinel_file)
    return [
        f"__import__('builtins').setattr(__import__('builtins'), '{SENTINEL}', 1)",
        f"__import__('pathlib').Path({f!r}).touch()",
        f"open({f!r}, 'w')",
        f"[__import__('os').system('touch {f}')]",
        f"(lambda: __import__('pathlib').Path({f!r}).touch())()",
        f"f'{{__import__(\"pathlib\").Path({f!r}).touch()}}'",
        f"{{'k': __import__('pathlib').Path({f!r}).touch()}}",
        f"[*__import__('pathlib').Path({f!r}).touch()]",
        f"(x := __import__('pathlib').Path({f!r}).touch())",
        f"[i for i in [__import__('pathlib').Path({f!r}).touch()]]",
        f"globals().__setitem__('{SENTINEL}', 1)",
        f"__builtins__.__setattr__('{SENTINEL}', 1) if 1 else 0",
        f"().__class__.__base__.__subclasses__() and setattr(__import__('builtins'), '{SENTINEL}', 1)",
    ]


# ------------------------------------------------------------------------------------------------
# Outcome checks
# ------------------------------------------------------------------------------------------------


def check_errors(errors: list[ConfigError]) -> None:
    """Every error is a ConfigError with a one-line ``ConfigError: ...`` console line."""
    assert errors
    exc = ConfigErrors(errors)
    for e in exc.errors:
        assert type(e) is ConfigError, type(e)
        line = e.line()
        assert line.startswith("ConfigError: "), line
        assert len(line.splitlines()) == 1, repr(line)
        assert len(line.splitlines()) == len(str(e).splitlines()) == 1
    assert len(str(exc).splitlines()) == len(exc.errors)


def load_guarded(path: Path, kind: str, sentinel_file: Path):
    """``load_config`` under the guard: (config or None, errors)."""
    errors = ErrorCollector()
    with GUARD:
        try:
            cfg = load_config(path, kind, errors)
        except BaseException as exc:
            pytest.fail(f"load_config raised {type(exc).__name__}: {exc}")
    assert not GUARD.violations, GUARD.violations
    assert not _sentinel_fired(sentinel_file), "a config value was evaluated"
    return cfg, errors.errors


def _class_rule(error: ConfigError) -> bool:
    """True for a problem a class's ``validate_config`` reported (``where`` is ``pipeline[i] Class``)."""
    where = error.where or ""
    return where.startswith("pipeline[") and where.count(" ") == 1


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


# ------------------------------------------------------------------------------------------------
# Documents
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
    module: ModuleInfo
    call: dict[str, Any]  # keywords written in the call string
    text: str | None = None  # the call string, if not rendered from ``call``

    def render(self) -> str:
        if self.text is not None:
            return self.text
        return f"{self.module.path}({', '.join(f'{k}={v!r}' for k, v in self.call.items())})"


@dataclasses.dataclass
class Document:
    kind: str
    entries: list[Entry]
    sections: dict[str, dict[str, Any]]  # class path -> keys of its TOML section
    master: dict[str, Any]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # further top-level tables
    expect: str = "valid"  # valid | invalid | either
    label: str = "valid"

    def data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Master": {**self.master, "pipeline": [e.render() for e in self.entries]}}
        for path, keys in self.sections.items():
            node = out
            for part in path.split("."):
                node = node.setdefault(part, {})
            node.update(keys)
        for key, value in self.extra.items():
            out[key] = value
        return out

    def text(self) -> str:
        return tomli_w.dumps(self.data())

    def expected_params(self, entry: Entry) -> dict[str, Any]:
        return {**self.sections.get(entry.module.path, {}), **entry.call}


@functools.cache
def _level2_chain() -> list[ModuleInfo]:
    """The shipped level-2 list (a chain the layout check accepts), as discovered modules."""
    raw = tomllib.loads((REPO / "parameter_files/level2_processing.toml").read_text())
    by_cls = {m.cls: m for m in discovered_modules()}
    return [by_cls[resolve_callee(parse_call(t, file="-", index=0).path)] for t in raw["Master"]["pipeline"]]


def _toml_safe(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, list | tuple):
        return all(_toml_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _toml_safe(v) for k, v in value.items())
    return not (isinstance(value, float) and not math.isfinite(value))


REQUIRED_VALUES = {"remote": "archive.example.org:/comap/level1/", "local_dir": "level1"}


@st.composite
def entry_params(draw, module: ModuleInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    """Valid keywords for ``module``: (in the call string, in its TOML section)."""
    call: dict[str, Any] = {}
    section: dict[str, Any] = {}
    names = generatable(module)
    chosen = draw(st.lists(st.sampled_from(names), max_size=2, unique=True)) if names else []
    for name, p in module.params.items():
        if p.required:
            call[name] = REQUIRED_VALUES.get(name, f"{name}.csv")
            continue
        if name not in chosen:
            continue
        value = draw(valid_values(p.annotation))
        if _toml_safe(value) and draw(st.booleans()):
            section[name] = value
        else:
            call[name] = value
    return call, section


MASTER_EXTRA = {
    "main": {"log_file": st.just("logs/{timestamp}_{config}.log")},
    "level2": {"nprocess": st.integers(1, 8), "min_obsid": st.integers(0, 10**6), "force_run": st.booleans()},
    "map": {"nprocess": st.integers(1, 8), "obsid_list": st.lists(st.integers(1, 10**6), max_size=3)},
}


@st.composite
def valid_documents(draw, *, single: bool = False, kind: str | None = None) -> Document:
    """A config (of ``kind`` or a random kind) whose entries (one if ``single``) carry valid
    generated values."""
    kind = kind or draw(st.sampled_from(["main", "level2", "map"]))
    if single:
        modules = [draw(st.sampled_from(modules_of(kind)))]
    elif kind == "level2":
        chain = _level2_chain()
        modules = chain[: draw(st.integers(1, len(chain)))]
    else:
        modules = draw(st.lists(st.sampled_from(modules_of(kind)), min_size=1, max_size=3))
    entries, sections = [], {}
    for module in modules:
        call, section = draw(entry_params(module))
        if module.path in sections:  # one section per class: the later one goes into the call
            call.update(section)
        elif section:
            sections[module.path] = section
        entries.append(Entry(module, call))
    master: dict[str, Any] = {"sql_database": "fuzz.db"}
    for key, strat in MASTER_EXTRA[kind].items() if not single else ():
        if draw(st.booleans()):
            master[key] = draw(strat)
    return Document(kind, entries, sections, master)


def _bad_call_texts(path: str, x: str, sentinel_file: Path) -> list[str]:
    """Malformed call strings for a module at ``path`` with a parameter ``x``."""
    payloads = injection_payloads(sentinel_file)
    return [
        f"{path}(",
        f"{path}(x=1))",
        f"{path}(x=[1, 2)",
        f"{path}(1)",
        f"{path}('positional')",
        f"{path}(x=os.sep)",
        f"{path}(x=some_name)",
        f"{path}(x=1 + 1)",
        f"{path}(x=2**10)",
        f"{path}(x={{1, 2}})",
        f"{path}(x=b'bytes')",
        f"{path}(x=1j)",
        f"{path}(x=...)",
        f"{path}(x=-True)",
        f"{path}(x=not 1)",
        f"{path}(x=[1][0])",
        f"{path}(x=1 < 2)",
        f"{path}(*[1])",
        f"{path}(**{{'x': 1}})",
        f"{path}(x={{**{{'a': 1}}}})",
        f"{path}(x=[*[1]])",
        f"{path}(x=1, x=2)",
        f"{path}(x=0x{'f' * 4000})",
        f"{path}(x={'9' * 5000})",
        f"{path}(x={'-' * 3000}1)",
        f"{path}(x={'[' * 150}{']' * 150})",
        f"{path}(x={'(' * 300}1{')' * 300})",
        f"{path}(x='\u2028two\u2029lines\x0bthree\x0cfour\x1cfive\x85six')",
        f"{path}(x='nul\x00byte')",
        f"{path}()()",
        f"{path}().run()",
        f"{path}.__init__()",
        f"{path}.__class__()",
        f"{path}.__base__()",
        f"{path}.__mro__[1]()",
        f"{path}",
        f"{path}[0](x=1)",
        f"lambda: {path}()",
        f"{path}(x=1); __import__('os')",
        f"{path}(x=1)\n{path}(x=2)",
        f"{path}(x=yield 1)",
        f"await {path}()",
        f"{path}(ñ=1)",
        f"{path}(x='{'a' * 20000}')",
        "",
        "   ",
        "()",
        "modules()",
        "modules.()",
        "modules..X()",
        ".modules.X()",
        "os.system('true')",
        "builtins.eval('1')",
        "subprocess.Popen(args=['true'])",
        "modules.pipeline_control.cli.main()",
        "modules.pipeline_control.base.BaseCOMAPModule()",
        "modules.pipeline_control.base.PipelineStage()",
        "modules.pipeline_control.base.MapJob()",
        "modules.pipeline_control.base.StreamingStage()",
        "modules.pipeline_control.base.os.system(command='true')",
        "modules.pipeline_control.config.tomllib.TOMLDecodeError()",
        "modules.pipeline_control.NoSuchModule.NoSuchModule()",
        "modules.ProcessLevel2.NoSuch()",
        "modules.\u0440ipeline_control.cli.X()",
        *[f"{path}(x={p})" for p in payloads],
        *[f"{path}(**{p})" for p in payloads[:3]],
        *[p for p in payloads],
    ]


@st.composite
def invalid_documents(
    draw, sentinel_file: Path, *, single: bool = False, kind: str | None = None
) -> Document:
    """A valid document with one defect: the loader must refuse it. With ``single``, one entry and
    no defect of the ``[Master]`` table."""
    doc = draw(valid_documents(single=single, kind=kind))
    doc.expect = "invalid"
    i = draw(st.integers(0, len(doc.entries) - 1))
    entry = doc.entries[i]
    module = entry.module
    checkable_params = [n for n, p in module.params.items() if wrong_type_values(p.annotation)]
    ranged = [
        n for n, p in module.params.items() if checkable(p.annotation) and out_of_range_values(p.annotation)
    ]
    kinds = ["bad_call", "unknown_module"]
    if checkable_params:
        kinds += ["wrong_type", "wrong_type_section"]
    if ranged:
        kinds += ["out_of_range", "out_of_range_section"]
    kinds += ["unknown_keyword", "section_unknown_key", "wrong_kind"]
    if not single:
        kinds += ["master_type", "master_unknown", "no_master"]
    if any(p.required for p in module.params.values()):
        kinds.append("missing_required")
    label = kinds[draw(st.integers(0, 10**6)) % len(kinds)]  # uniform, not biased to the first
    doc.label = label
    if label in ("wrong_type", "wrong_type_section"):
        name = draw(st.sampled_from(checkable_params))
        value = draw(st.sampled_from(wrong_type_values(module.params[name].annotation)))
        _put(doc, entry, name, value, section=label.endswith("section"))
    elif label in ("out_of_range", "out_of_range_section"):
        name = draw(st.sampled_from(ranged))
        value = draw(st.sampled_from(out_of_range_values(module.params[name].annotation)))
        _put(doc, entry, name, value, section=label.endswith("section"))
    elif label == "unknown_keyword":
        assert not module.var_kw
        name = draw(st.sampled_from(["zz_not_a_parameter", "nfreq_bin", "N_FREQ_BIN", "self", "kwargs"]))
        entry.call[name] = draw(valid_values(int | str | None))
    elif label == "section_unknown_key":
        doc.sections.setdefault(module.path, {})["zz_not_a_parameter"] = 1
    elif label == "missing_required":
        entry.call = {k: v for k, v in entry.call.items() if not module.params[k].required}
        if module.path in doc.sections:
            doc.sections[module.path] = {
                k: v for k, v in doc.sections[module.path].items() if not module.params[k].required
            }
    elif label == "unknown_module":
        parts = module.path.split(".")
        j = draw(st.integers(1, len(parts) - 1))
        parts[j] = draw(st.sampled_from([parts[j] + "X", parts[j].lower(), "_" + parts[j], "__dict__"]))
        entry.text = ".".join(parts) + "()"
    elif label == "bad_call":
        x = draw(st.sampled_from(sorted(module.params) or ["x"]))
        entry.text = draw(st.sampled_from(_bad_call_texts(module.path, x, sentinel_file)))
    elif label == "wrong_kind":
        other = [m for m in discovered_modules() if m.file_kind != doc.kind]
        entry.text = f"{draw(st.sampled_from(other)).path}()"
    elif label == "master_type":
        key, value = draw(
            st.sampled_from(
                [
                    ("pipeline", "modules.X.Y()"),
                    ("pipeline", [1, 2]),
                    ("pipeline", {"a": "b"}),
                    ("sql_database", 3),
                    ("sql_database", ["a.db"]),
                    ("log_file", False),
                    ("log_file", "logs/{nope}.log"),
                    ("log_file", "logs/{timestamp"),
                    ("module_paths", "modules."),
                    *(
                        [
                            ("nprocess", 0),
                            ("nprocess", "2"),
                            ("nprocess", 2.0),
                            ("nprocess", True),
                            ("min_obsid", 1.5),
                            ("min_obsid", "0"),
                            ("max_obsid", 2**64),
                            ("min_obsid", -(2**70)),
                        ]
                        if doc.kind != "main"
                        else [("nprocess", 2), ("force_run", True)]
                    ),
                    *(
                        [("force_run", 1), ("source", 5), ("target_obsid", [1.5])]
                        if doc.kind == "level2"
                        else []
                    ),
                ]
            )
        )
        doc.master[key] = value
        if key == "pipeline":
            doc.extra["__pipeline__"] = value
    elif label == "master_unknown":
        doc.master[
            draw(st.sampled_from(["pipline", "Pipeline", "nprocesses", "database", "module_path"]))
        ] = 1
    elif label == "no_master":
        doc.extra["__no_master__"] = draw(st.sampled_from([None, 1, "Master", [1]]))
    return doc


def _put(doc: Document, entry: Entry, name: str, value: Any, *, section: bool) -> None:
    if section and _toml_safe(value):
        entry.call.pop(name, None)
        doc.sections.setdefault(entry.module.path, {})[name] = value
    else:
        entry.call[name] = value


def render(doc: Document) -> str:
    """The document as TOML text (with the special cases tomli_w cannot write)."""
    extra = dict(doc.extra)
    pipeline_override = extra.pop("__pipeline__", None)
    no_master = "__no_master__" in extra
    master_value = extra.pop("__no_master__", None)
    data = doc.data()
    for k in list(data):
        if k.startswith("__"):
            del data[k]
    if pipeline_override is not None:
        data["Master"]["pipeline"] = pipeline_override
    if no_master:
        if master_value is None:
            del data["Master"]
        else:
            data["Master"] = master_value
    return tomli_w.dumps(data)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("config_fuzz")


def _check_document(doc: Document, text: str, fuzz_dir: Path) -> str:
    """Load ``text`` as a ``doc.kind`` config and check the outcome; returns 'accepted' or 'refused'."""
    path = fuzz_dir / f"{doc.kind}.toml"
    path.write_text(text, encoding="utf-8")
    cfg, errors = load_guarded(path, doc.kind, fuzz_dir / "SENTINEL")
    try:  # run.py first guesses the kind of file from the raw table
        raw = tomllib.loads(text)
    except ValueError:
        raw = None
    assert detect_file_kind(raw) in ("main", "level2")
    if errors:
        check_errors(errors)
        if doc.expect == "valid":
            # only a cross-parameter rule of a class or the level-2 chain check may refuse it
            for e in errors:
                chain = (e.where or "").startswith("pipeline[") and "neither the level-1 file" in e.message
                assert _class_rule(e) or chain, e.line()
        return "refused"
    assert doc.expect != "invalid", f"accepted an invalid document ({doc.label}):\n{text}"
    assert cfg is not None
    if doc.expect == "valid":
        assert [s.cls for s in cfg.entries] == [e.module.cls for e in doc.entries]
        for spec, entry in zip(cfg.entries, doc.entries, strict=True):
            obj = spec.instantiate()
            for name, value in doc.expected_params(entry).items():
                assert _same(spec.params[name], value), (name, spec.params[name], value)
                held = getattr(obj, name)
                # a module may stand in its own default or an alias for an empty value
                # (``x or default``: DataAssess's paths, NoiseStatsLevel1's plot_dir, ...)
                # or take the value of an alias keyword (NoiseStatsLevel1: output_dir for plot_dir)
                alias = any(_same(held, v) for v in spec.params.values())
                assert _same(held, value) or not value or alias, (name, held, value)
    return "accepted"


def test_generated_documents_are_valid_plans_or_config_errors(fuzz_dir):
    """Valid documents and documents with one defect each: every one is accepted with the generated
    values or refused with ConfigErrors; the accepted share lies in ``VALID_SHARE``."""
    stats: collections.Counter[str] = collections.Counter()
    sentinel = fuzz_dir / "SENTINEL"

    @settings(max_examples=N_DOCUMENTS, suppress_health_check=SUPPRESS, **FUZZ)
    @given(data=st.data())
    def one_document(data):
        if data.draw(st.integers(0, 99)) < 55:
            doc = data.draw(valid_documents())
        else:
            doc = data.draw(invalid_documents(sentinel))
        outcome = _check_document(doc, render(doc), fuzz_dir)
        event(f"{doc.label}: {outcome}")
        stats["documents"] += 1
        stats[f"documents {outcome}"] += 1
        stats[f"{doc.label} {outcome}"] += 1

    one_document()
    print(dict(stats))
    assert stats["documents"] >= N_DOCUMENTS
    share = stats["documents accepted"] / stats["documents"]
    assert VALID_SHARE[0] <= share <= VALID_SHARE[1], (share, dict(stats))
    for label in ("wrong_type", "out_of_range", "unknown_module", "bad_call", "master_type"):
        assert stats[f"{label} refused"] > N_DOCUMENTS // 200, dict(stats)


# ------------------------------------------------------------------------------------------------
# Call strings, in memory
# ------------------------------------------------------------------------------------------------


def _check_in_memory(doc: Document, sentinel: Path) -> str:
    """The single entry of ``doc`` through ``parse_call`` and ``resolve_entry`` against the document
    as a dict (the loader's path without reading a file); returns 'accepted' or 'refused'."""
    raw = doc.data()
    entry = doc.entries[0]
    errors = ErrorCollector()
    spec = None
    with GUARD:
        try:
            call = parse_call(entry.render(), file="memory.toml", index=0)
        except ConfigError as exc:
            errors.extend([exc])
        except BaseException as exc:
            pytest.fail(f"parse_call raised {type(exc).__name__}: {exc}")
        else:
            try:
                spec = resolve_entry(raw, call, LIST_KINDS[doc.kind], doc.kind, [], errors, set())
            except BaseException as exc:
                pytest.fail(f"resolve_entry raised {type(exc).__name__}: {exc}")
    assert not GUARD.violations, GUARD.violations
    assert not _sentinel_fired(sentinel), "a config value was evaluated"
    if errors:
        assert spec is None
        check_errors(errors.errors)
        if doc.expect == "valid":
            for e in errors.errors:
                assert _class_rule(e), e.line()
        return "refused"
    assert doc.expect != "invalid", f"accepted an invalid call ({doc.label}): {entry.render()}"
    assert spec is not None and spec.cls is entry.module.cls
    obj = spec.instantiate()
    for name, value in doc.expected_params(entry).items():
        assert _same(spec.params[name], value), (name, spec.params[name], value)
        held = getattr(obj, name)
        assert _same(held, value) or not value or any(_same(held, v) for v in spec.params.values())
    return "accepted"


def test_generated_call_strings_are_valid_entries_or_config_errors(fuzz_dir):
    """One call string per example, valid or with one defect (wrong type, out of range, unknown
    keyword or module, malformed or injected syntax), checked in memory; the accepted share lies
    in ``VALID_SHARE``."""
    stats: collections.Counter[str] = collections.Counter()
    sentinel = fuzz_dir / "SENTINEL"

    @settings(max_examples=N_CALL_STRINGS // CALLS_PER_EXAMPLE, suppress_health_check=SUPPRESS, **FUZZ)
    @given(data=st.data())
    def some_calls(data):
        for _ in range(CALLS_PER_EXAMPLE):  # several per example: hypothesis's own cost is per example
            if data.draw(st.integers(0, 99)) < 40:  # hypothesis leans to small numbers: ~55 % valid
                doc = data.draw(valid_documents(single=True))
            else:
                doc = data.draw(invalid_documents(sentinel, single=True))
            outcome = _check_in_memory(doc, sentinel)
            event(f"{doc.label}: {outcome}")
            stats["calls"] += 1
            stats[f"calls {outcome}"] += 1
            stats[f"{doc.label} {outcome}"] += 1

    some_calls()
    print(dict(stats))
    assert stats["calls"] >= N_CALL_STRINGS - CALLS_PER_EXAMPLE
    share = stats["calls accepted"] / stats["calls"]
    assert VALID_SHARE[0] <= share <= VALID_SHARE[1], (share, dict(stats))
    for label in ("wrong_type", "out_of_range", "unknown_module", "bad_call", "unknown_keyword"):
        assert stats[f"{label} refused"] > N_CALL_STRINGS // 100, dict(stats)


# ------------------------------------------------------------------------------------------------
# TOML text mutations
# ------------------------------------------------------------------------------------------------


@st.composite
def mutated_texts(draw) -> tuple[Document, str, str]:
    """A valid one-entry document as TOML text with one textual mutation."""
    doc = draw(valid_documents(single=True))
    doc.expect = "either"
    text = render(doc)
    lines = text.splitlines(keepends=True)
    label = draw(
        st.sampled_from(
            [
                "delete_char",
                "insert_char",
                "duplicate_line",
                "swap_lines",
                "truncate",
                "duplicate_table",
                "huge_integer",
                "unknown_section",
                "replace_char",
            ]
        )
    )
    i = draw(st.integers(0, max(len(text) - 1, 0)))
    if label == "delete_char":
        text = text[:i] + text[i + 1 :]
    elif label in ("insert_char", "replace_char"):
        c = draw(st.sampled_from(list("[]{}=\"',.#\n\\ 0x_-+") + ["\u2028", "\x00", "é", "\t"]))
        text = text[:i] + c + text[i + (label == "replace_char") :]
    elif label == "duplicate_line":
        j = draw(st.integers(0, len(lines) - 1))
        lines.insert(j, lines[j])
        text = "".join(lines)
    elif label == "swap_lines":
        j = draw(st.integers(0, len(lines) - 1))
        k = draw(st.integers(0, len(lines) - 1))
        lines[j], lines[k] = lines[k], lines[j]
        text = "".join(lines)
    elif label == "truncate":
        text = text[:i]
    elif label == "huge_integer":  # beyond 64 bits, as hex (tomllib reads it) or 5000 digits
        doc.expect = "invalid"
        text += "\n[Extra]\nn = " + draw(st.sampled_from(["0x" + "f" * 40, "9" * 5000, "-" + "9" * 20]))
    elif label == "duplicate_table":
        text += "\n[Master]\nnprocess = 1\n"
    elif label == "unknown_section":  # a section no entry uses is only logged: still valid
        doc.expect = "valid"
        name = draw(st.sampled_from(["modules.NoSuch.Module", "modules.ProcessLevel2.X.X", "Other"]))
        text += f"\n[{name}]\nvalue = 1\n"
    return doc, text, label


def test_mutated_toml_texts_are_valid_plans_or_config_errors(fuzz_dir):
    """Syntax errors, duplicated keys and tables, truncation, stray characters (NUL, U+2028) in
    whole TOML documents: a valid plan or ConfigErrors, nothing else."""
    stats: collections.Counter[str] = collections.Counter()

    @settings(max_examples=N_TEXT_MUTATIONS, suppress_health_check=SUPPRESS, **FUZZ)
    @given(case=mutated_texts())
    def one_text(case):
        doc, text, label = case
        outcome = _check_document(doc, text, fuzz_dir)
        event(f"{label}: {outcome}")
        stats["texts"] += 1
        stats[f"{label} {outcome}"] += 1

    one_text()
    print(dict(stats))
    assert stats["texts"] >= N_TEXT_MUTATIONS
    assert stats["duplicate_table refused"] > 0 and stats["unknown_section accepted"] > 0, dict(stats)
    assert stats["huge_integer refused"] > 0 and stats["huge_integer accepted"] == 0, dict(stats)


# ------------------------------------------------------------------------------------------------
# Sub-configs reached from a main config
# ------------------------------------------------------------------------------------------------


SUB_STAGES = {"level2": "Level2Pipeline", "map": "MapMaking"}


@st.composite
def run_configs(draw, fuzz_dir: Path) -> tuple[str, str, str | None, str]:
    """(kind of sub-config, what ``config_file`` points at, the sub-config's text or None, the
    name of its file)."""
    sub_kind = draw(st.sampled_from(["level2", "map"]))
    names = ["sub", "sub config", "süb", "sub\u2028x", "sub\x00x", "../sub", "sub.toml/"]
    name = draw(st.sampled_from(names))
    target = draw(
        st.sampled_from(["valid", "invalid", "missing", "directory", "broken", "wrong_kind", "empty"])
    )
    sub_text = None
    if target == "valid":
        sub = draw(valid_documents(kind=sub_kind))
        sub_text = render(sub)
    elif target == "invalid":
        sub = draw(invalid_documents(fuzz_dir / "SENTINEL", kind=sub_kind))
        sub_text = render(sub)
    elif target == "broken":
        sub_text = "[Master\npipeline = ["
    elif target == "wrong_kind":
        sub = draw(valid_documents(kind="level2" if sub_kind == "map" else "map"))
        sub_text = render(sub)
    elif target == "empty":
        sub_text = ""
    return sub_kind, target, sub_text, name


def test_sub_config_references_are_checked(fuzz_dir):
    """A main config whose stage points ``config_file`` at a valid, invalid, missing, broken, empty
    or wrong-kind sub-config, or at a directory: ``load_run_config`` returns the whole plan or
    raises ConfigErrors naming the file."""
    stats: collections.Counter[str] = collections.Counter()
    sentinel = fuzz_dir / "SENTINEL"
    by_name = {m.path.rsplit(".", 1)[-1]: m for m in modules_of("main")}

    @settings(max_examples=N_RUN_CONFIGS, suppress_health_check=SUPPRESS, **FUZZ)
    @given(case=run_configs(fuzz_dir))
    def one_run_config(case):
        sub_kind, target, sub_text, name = case
        if target == "missing":  # odd names too: a NUL, a line separator, a trailing slash
            sub_path = fuzz_dir / "absent" / name
        else:
            sub_path = fuzz_dir / ("sub_dir" if target == "directory" else f"sub_{target}.toml")
        if target == "directory":
            sub_path.mkdir(exist_ok=True)
        elif sub_text is not None:
            sub_path.write_text(sub_text, encoding="utf-8")
        stage = by_name[SUB_STAGES[sub_kind]]
        main_path = fuzz_dir / "run_main.toml"
        main_path.write_text(
            tomli_w.dumps({"Master": {"pipeline": [f"{stage.path}(config_file={str(sub_path)!r})"]}}),
            encoding="utf-8",
        )
        with GUARD:
            try:
                run = load_run_config(main_path)
                outcome = "accepted"
            except ConfigErrors as exc:
                outcome, errors = "refused", exc.errors
            except BaseException as exc:
                pytest.fail(f"load_run_config raised {type(exc).__name__}: {exc}")
        assert not GUARD.violations, GUARD.violations
        assert not _sentinel_fired(sentinel)
        if outcome == "refused":
            check_errors(errors)
            if target == "valid":  # only a rule of a class or the level-2 chain check
                for e in errors:
                    rule = _class_rule(e) or e.where == "pipeline"  # validate_sub_config
                    assert rule or "neither the level-1" in e.message, e.line()
            if target in ("missing", "directory", "broken", "empty"):
                named = any(e.file == str(sub_path) for e in errors)
                nul = "\x00" in name and any("NUL character" in e.message for e in errors)
                assert named or nul, [e.line() for e in errors]
        else:
            assert target in ("valid", "wrong_kind"), target
            assert str(sub_path) in run.sub_configs
        stats[f"{target} {outcome}"] += 1
        stats["run configs"] += 1

    one_run_config()
    print(dict(stats))
    assert stats["run configs"] >= N_RUN_CONFIGS
    for target in ("missing", "directory", "broken", "invalid"):
        assert stats[f"{target} refused"] > 0 and stats[f"{target} accepted"] == 0, dict(stats)


# ------------------------------------------------------------------------------------------------
# Through run.py
# ------------------------------------------------------------------------------------------------

N_CLI_CONFIGS = 30
N_RUN_PY = 3

_CLI_LOOP = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback
    from modules.pipeline_control import cli
    results = []
    for path in sys.argv[1:]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main([path, "--dry-run", "--create-db"])
            except SystemExit as exc:
                status = exc.code
            except BaseException:
                status = "raised"
                traceback.print_exc()
        results.append({"path": path, "status": status, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))
    """
)


def _generated_run_files(directory: Path) -> list[Path]:
    """``N_CLI_CONFIGS`` generated configs (fixed seed): bare level-2 configs (run as
    Level2Pipeline), map configs named directly (a kind error), and main configs whose
    Level2Pipeline/MapMaking stage points at a generated sub-config, valid or not."""
    docs: list[tuple[str, str | None]] = []

    @settings(max_examples=N_CLI_CONFIGS, suppress_health_check=SUPPRESS, **FUZZ)
    @given(data=st.data())
    def collect(data):
        kind = data.draw(st.sampled_from(["level2", "level2", "map", "main"]))
        sub_kind = data.draw(st.sampled_from(["level2", "map"]))
        inner = kind if kind != "main" else sub_kind
        if data.draw(st.booleans()):
            doc = data.draw(valid_documents(kind=inner))
        else:
            doc = data.draw(invalid_documents(directory / "SENTINEL", kind=inner))
        docs.append((render(doc), None if kind != "main" else SUB_STAGES[sub_kind]))

    collect()
    by_name = {m.path.rsplit(".", 1)[-1]: m for m in modules_of("main")}
    paths = []
    for i, (text, stage) in enumerate(docs):
        path = directory / f"cli_{i:02d}.toml"
        path.write_text(text, encoding="utf-8")
        if stage is not None:
            sub, path = path, directory / f"cli_{i:02d}_main.toml"
            call = f"{by_name[stage].path}(config_file={str(sub)!r})"
            master = {"pipeline": [call], "sql_database": str(directory / "none.db")}
            path.write_text(tomli_w.dumps({"Master": master}), encoding="utf-8")
        paths.append(path)
    return paths


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd} did not finish in {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_generated_configs_through_run_py_print_no_traceback(tmp_path):
    """Thirty generated configs through the CLI entry point with ``--dry-run --create-db`` (in one
    process; the workspace has no database yet, and only ``--create-db`` lets a level-2 or map plan
    start from none), and a few of them through ``run.py`` itself: exit 0 or 2, never a traceback
    on the console."""
    paths = _generated_run_files(tmp_path)
    proc = _run([sys.executable, "-c", _CLI_LOOP, *map(str, paths)], tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = __import__("json").loads(proc.stdout.splitlines()[-1])
    assert len(results) == N_CLI_CONFIGS
    statuses = collections.Counter(r["status"] for r in results)
    for r in results:
        assert r["status"] in (0, 2), (r["path"], r["status"], r["err"][-2000:])
        assert "Traceback" not in r["out"] + r["err"], (r["path"], r["err"][-2000:])
        if r["status"] == 2:
            lines = [ln for ln in r["err"].splitlines() if ln.startswith("ConfigError: ")]
            assert lines, r["err"]
    assert statuses[0] >= 3 and statuses[2] >= 3, statuses  # both outcomes are exercised
    for path in paths[:: max(1, len(paths) // N_RUN_PY)][:N_RUN_PY]:
        proc = _run(
            [sys.executable, str(REPO / "run.py"), str(path), "--dry-run", "--create-db"],
            tmp_path,
            timeout=120,
        )
        assert proc.returncode in (0, 2), (path, proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# The oracle can fail (the defects the fuzzer found: test_config_fuzz_regressions.py)
# ------------------------------------------------------------------------------------------------


def test_the_guard_catches_evaluation(tmp_path, monkeypatch):
    """The no-evaluation guard records ``eval``/``exec``/``compile`` of text, and a parser that
    evaluated keyword values would be caught by it and by the sentinel."""
    for code in ("eval('1 + 1')", "exec('x = 1')", "compile('1', '<s>', 'eval')"):
        with GUARD:
            eval(code)
        assert GUARD.violations, code
    import modules.pipeline_control.callstrings as callstrings

    monkeypatch.setattr(callstrings.ast, "literal_eval", lambda node: eval(ast.unparse(node)))
    G = "modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin.GainFilterAndBin"
    with GUARD:
        parse_call(f"{G}(n_freq_bin=2)", file="-", index=0)
    assert GUARD.violations
