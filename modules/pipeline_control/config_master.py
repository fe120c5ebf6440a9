"""The ``[Master]`` table of each kind of config file (docs/configuration.md#master-keys) and reading TOML
with positions."""

from __future__ import annotations

import logging
import re
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
    return isinstance(v, int) and not isinstance(v, bool)


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
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
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
        for name in re.findall(r"\{([^}]*)\}", master["log_file"]):
            if name not in _LOG_PLACEHOLDERS:
                errors.add(
                    f"unknown log_file placeholder '{{{name}}}'; known: "
                    "{timestamp}, {config}, {run_id}",
                    path,
                    "[Master] log_file",
                    master["log_file"],
                )
    return master
