"""The ``[Master]`` table of each kind of config file (docs/configuration.md#master-keys) and reading TOML
with positions."""

from __future__ import annotations

import logging
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from modules.pipeline_control.config_model import ErrorCollector, LoadedConfig

__all__ = ["FILE_KIND_TEXT", "LIST_KINDS", "MASTER_DEFAULTS", "MASTER_KEYS", "read_toml", "validate_master"]

log = logging.getLogger("comap.config")


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_str_or_list(v: Any) -> bool:
    return _is_str(v) or _is_str_list(v)


def _is_int(v: Any) -> bool:
    """A 64-bit integer, as TOML and the database have them (docs/reliability.md#config-fuzzing)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_obsid_list(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(_is_int(x) for x in v))


_MAIN_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "log_file": (_is_str, "a string"),
    "sql_database": (_is_str, "a path or SQLAlchemy URL string"),
    "pipeline": (_is_str_list, "a list of call strings"),
    "module_paths": (_is_str_list, "a list of module-path prefixes"),
}
_LEVEL2_KEYS = {
    **_MAIN_KEYS,
    "source": (_is_str_or_list, "a string or list of strings"),
    "source_group": (_is_str_or_list, "a string or list of strings"),
    "target_obsid": (_is_obsid_list, "a list of obsids or a path to a text file"),
    "min_obsid": (_is_int, "an integer"),
    "max_obsid": (_is_int, "an integer"),
    "nprocess": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "force_run": (lambda v: isinstance(v, bool), "true or false"),
}
_MAP_KEYS = {
    **_MAIN_KEYS,
    "min_obsid": _LEVEL2_KEYS["min_obsid"],
    "max_obsid": _LEVEL2_KEYS["max_obsid"],
    "obsid_list": (_is_obsid_list, "a list of obsids or a path to a text file"),
    "nprocess": _LEVEL2_KEYS["nprocess"],
}
MASTER_KEYS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "main": _MAIN_KEYS,
    "level2": _LEVEL2_KEYS,
    "map": _MAP_KEYS,
}
MASTER_DEFAULTS: dict[str, Any] = {
    "log_file": "logs/{timestamp}_{config}.log",
    "sql_database": "databases/COMAP_manchester.db",
    "module_paths": [],
    "source": None,
    "source_group": None,
    "target_obsid": None,
    "min_obsid": 0,
    "max_obsid": None,
    "obsid_list": None,
    "nprocess": 1,
    "force_run": False,
}

# Kinds of classes a list may hold (docs/developer.md#kinds-of-modules).
LIST_KINDS: dict[str, frozenset[str]] = {
    "main": frozenset({"stage"}),
    "level2": frozenset({"per_observation", "streaming"}),
    "map": frozenset({"map_job"}),
}
FILE_KIND_TEXT = {"main": "main config", "level2": "level-2 config", "map": "map-making config"}

_LOG_PLACEHOLDERS = {"timestamp", "config", "run_id"}


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def read_toml(path: Path, errors: ErrorCollector) -> dict[str, Any] | None:
    """Read a TOML file; report a missing file or a syntax error (with line and column)."""
    if not path.exists():
        errors.add("config file not found", path, "file")
        return None
    if not path.is_file():
        errors.add("config path is not a file", path, "file")
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        errors.add(f"cannot read config file: {exc}", path, "file")
        return None
    try:
        raw = tomllib.loads(text)
    except ValueError as exc:
        if not isinstance(exc, tomllib.TOMLDecodeError):  # an integer of thousands of digits
            errors.add(f"TOML value error: {exc}", path, "TOML")
            return None
        msg = str(exc)
        m = _TOML_POS.search(msg)
        where, line_text = "TOML", None
        if m:
            line_no = int(m.group(1))
            where = f"line {line_no}, column {m.group(2)}"
            lines = text.splitlines()
            if 1 <= line_no <= len(lines):
                line_text = lines[line_no - 1].strip()
            msg = _TOML_POS.sub("", msg).strip()
        errors.add(f"TOML syntax error: {msg}", path, where, line_text)
        return None
    huge = _huge_integers(raw)
    for key in huge:
        errors.add("integer out of the 64-bit range of TOML", path, key)
    return None if huge else raw


def _huge_integers(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of integers outside the 64-bit range TOML allows (tomllib reads them anyway;
    docs/reliability.md#config-fuzzing)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    out = []
    for key, value in items:
        if not prefix:
            where = str(key)
        else:
            where = f"{prefix}.{key}" if isinstance(key, str) else f"{prefix}[{key}]"
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            out.append(where)
        else:
            out.extend(_huge_integers(value, where))
    return out


def validate_master(
    raw: Mapping[str, Any], path: Path, kind: str, errors: ErrorCollector, parent: LoadedConfig | None
) -> dict[str, Any] | None:
    master_raw = raw.get("Master")
    if not isinstance(master_raw, dict):
        errors.add("missing [Master] table", path, "[Master]")
        return None
    allowed = MASTER_KEYS[kind]
    master: dict[str, Any] = {}
    for key, value in master_raw.items():
        if key not in allowed:
            errors.add(
                f"unknown key '{key}' for a {FILE_KIND_TEXT[kind]}; known keys: {', '.join(sorted(allowed))}",
                path,
                "[Master]",
                f"{key} = {value!r}",
            )
            continue
        check, text = allowed[key]
        if not check(value):
            errors.add(f"'{key}' must be {text}", path, "[Master]", f"{key} = {value!r}")
            continue
        master[key] = value
    if "pipeline" not in master_raw:
        errors.add("[Master] has no 'pipeline' list", path, "[Master]")
    for key in allowed:
        if key in master:
            continue
        if parent is not None and key in ("sql_database", "module_paths"):
            master[key] = parent.master.get(key, MASTER_DEFAULTS[key])
        else:
            master[key] = MASTER_DEFAULTS.get(key)
    if parent is not None and "log_file" in master_raw:
        log.info("%s: [Master] log_file is ignored under a main config (one log per run)", path)
    if isinstance(master.get("log_file"), str):
        for problem in _log_file_problems(master["log_file"]):
            errors.add(problem, path, "[Master] log_file", master["log_file"])
    return master


def _log_file_problems(template: str) -> list[str]:
    """What the runner's expansion of a ``log_file`` template would trip on: unknown or malformed
    placeholders, a NUL byte, no file name (docs/reliability.md#config-fuzzing)."""
    if not template:  # the default is used
        return []
    if "\0" in template:
        return ["log_file must not contain a NUL character"]
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        return [f"malformed log_file template ({exc}); write a literal brace as {{{{ or }}}}"]
    unknown = [
        f"unknown log_file placeholder '{{{name}}}'; known: {{timestamp}}, {{config}}, {{run_id}}"
        for name in names
        if name not in _LOG_PLACEHOLDERS
    ]
    if unknown:
        return unknown
    try:
        expanded = template.format(timestamp="t", config="c", run_id="r")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        return [f"malformed log_file template ({type(exc).__name__}: {exc})"]
    if Path(expanded).name in ("", ".", ".."):
        return ["log_file must name a file, not a directory"]
    return []
