"""TOML configs: loading, merging and validation of every file reachable from a main config.

A pipeline entry is a call string ``'dotted.path.ClassName(key=value, ...)'``
(docs/configuration.md#call-strings), parsed without evaluation (:mod:`.callstrings`); the callee must lie
under an allow-listed prefix (:mod:`.resolve`). Parameters are merged class defaults < TOML section < call
keywords (docs/configuration.md#defaults-and-precedence) and checked against the ``__init__`` annotations and
the class's own ``validate_config`` (:mod:`.config_entries`). A level-2 list is then checked as a chain: each
module reads only what the level-1 file or an earlier module provides (:mod:`.layout_check`). Every problem in
every reachable config file is collected and reported together as ``ConfigError: <file>: <where>: <message>:
<text>`` (docs/configuration.md#validation).
"""

from __future__ import annotations

import importlib
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modules.pipeline_control.callstrings import CallSpec, parse_call
from modules.pipeline_control.config_dump import dump_toml
from modules.pipeline_control.config_entries import all_sections, resolve_entry
from modules.pipeline_control.config_master import (
    LIST_KINDS,
    MASTER_DEFAULTS,
    MASTER_KEYS,
    read_toml,
    validate_master,
)
from modules.pipeline_control.config_model import ErrorCollector, LoadedConfig, ModuleSpec, RunConfig
from modules.pipeline_control.layout_check import check_layout_chain
from modules.pipeline_control.parameters import class_parameters
from modules.pipeline_control.resolve import KIND_TEXT, module_kind, resolve_callee
from utils.errors import ConfigError

__all__ = [
    "KIND_TEXT",
    "CallSpec",
    "ErrorCollector",
    "LoadedConfig",
    "ModuleSpec",
    "RunConfig",
    "class_parameters",
    "detect_file_kind",
    "dump_toml",
    "load_config",
    "load_run_config",
    "module_kind",
    "parse_call",
    "resolve_callee",
]

log = logging.getLogger("comap.config")


def load_config(
    path: str | Path,
    kind: str,
    errors: ErrorCollector,
    *,
    parent: LoadedConfig | None = None,
    master_overrides: Mapping[str, Any] | None = None,
) -> LoadedConfig | None:
    """Load and validate one config file of ``kind`` (``main``, ``level2`` or ``map``).

    Problems are added to ``errors``; the return value is None if the file could not be used at all.
    ``master_overrides`` (from the CLI) replace Master keys valid for this kind.
    """
    path = Path(path)
    raw = read_toml(path, errors)
    if raw is None:
        return None
    master = validate_master(raw, path, kind, errors, parent)
    if master is None:
        return None
    for key, value in (master_overrides or {}).items():
        if key in MASTER_KEYS[kind] and value is not None:
            master[key] = value
    module_paths = list(master.get("module_paths") or [])
    for prefix in module_paths:
        top = prefix.rstrip(".").split(".")[0]
        try:
            importlib.import_module(top)
        except Exception as exc:
            errors.add(
                f"module_paths prefix '{prefix}' is not importable: {exc}",
                path,
                "[Master] module_paths",
                prefix,
            )
    cfg = LoadedConfig(path=path, kind=kind, raw=raw, master=master, parent=parent)
    used: set[str] = set()
    for index, text in enumerate(master.get("pipeline") or []):
        try:
            call = parse_call(text, file=path, index=index)
        except ConfigError as exc:
            errors.extend([exc])
            continue
        spec = resolve_entry(raw, call, LIST_KINDS[kind], kind, module_paths, errors, used)
        if spec is not None:
            cfg.entries.append(spec)
    for section in all_sections(raw):
        if section not in used:
            log.info("%s: section [%s] matches no pipeline entry", path, section)
    if kind == "level2":
        errors.extend(check_layout_chain(cfg))
    return cfg


def detect_file_kind(raw: Mapping[str, Any] | None) -> str:
    """Guess whether a file given to ``run.py`` is a main config or a bare level-2 config.

    A main config whose pipeline holds only per-observation modules is run as
    ``Level2Pipeline(config_file=CONFIG)`` (docs/developer.md#kinds-of-modules rule 4).
    """
    master = raw.get("Master") if isinstance(raw, Mapping) else None
    pipeline = master.get("pipeline") if isinstance(master, Mapping) else None
    if not isinstance(pipeline, list):
        return "main"  # load_config reports what is wrong (docs/reliability.md#config-fuzzing)
    kinds = set()
    for i, text in enumerate(pipeline):
        try:
            call = parse_call(text, file="?", index=i)
            cls = resolve_callee(call.path)
        except ConfigError:
            return "main"
        kinds.add(module_kind(cls))
    if kinds and kinds <= {"per_observation", "streaming"}:
        return "level2"
    return "main"


LEVEL2_PIPELINE_PATH = "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline"


def load_run_config(
    config_path: str | Path, *, master_overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Load the main config and every config reachable from it, reporting all problems at once.

    Raises
    ------
    ConfigErrors
        If any file has any problem. Nothing has been run at that point.
    """
    errors = ErrorCollector()
    path = Path(config_path)
    raw_probe = None
    if path.is_file():
        try:
            raw_probe = tomllib.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):  # TOMLDecodeError, UnicodeDecodeError, a huge integer
            raw_probe = None
    implicit = detect_file_kind(raw_probe) == "level2"
    if implicit:
        # A bare level-2 config: run it as Level2Pipeline(config_file=CONFIG).
        main = LoadedConfig(path=path, kind="main", raw={}, master=dict(MASTER_DEFAULTS), parent=None)
        master_raw = (raw_probe or {}).get("Master") or {}
        for key in ("log_file", "sql_database", "module_paths"):
            if key in master_raw:
                main.master[key] = master_raw[key]
        for key, value in (master_overrides or {}).items():
            if key in MASTER_KEYS["main"] and value is not None:
                main.master[key] = value
        text = f"{LEVEL2_PIPELINE_PATH}(config_file={str(path)!r})"
        call = parse_call(text, file=path, index=0)
        spec = resolve_entry({}, call, LIST_KINDS["main"], "main", [], errors, set())
        if spec is not None:
            main.entries.append(spec)
    else:
        main = load_config(path, "main", errors, master_overrides=master_overrides)
    run = RunConfig(main=main, implicit_level2=implicit) if main is not None else None
    if run is not None:
        for spec in main.entries:
            sub_kind = getattr(spec.cls, "sub_config_kind", None)
            sub_path = spec.params.get("config_file")
            if not sub_kind or not sub_path:
                continue
            key = str(sub_path)
            if key in run.sub_configs:
                continue
            n_errors = len(errors.errors)
            sub = load_config(sub_path, sub_kind, errors, parent=main, master_overrides=master_overrides)
            if sub is None:
                # name the stage that pointed at the missing or broken file
                last = errors.errors[-1] if errors.errors else None
                if last is not None and last.file == str(Path(sub_path)) and last.where == "file":
                    last.where = f"file (config_file of {spec.name} in {main.path})"
                continue
            run.sub_configs[key] = sub
            _warn_overridden_master_keys(main, sub, errors)
            checker = getattr(spec.cls, "validate_sub_config", None)
            # a list with a rejected entry would give follow-on errors (e.g. "must contain ...")
            if callable(checker) and len(errors.errors) == n_errors:
                for problem in checker(sub) or []:
                    if isinstance(problem, ConfigError):
                        errors.extend([problem])
                    else:
                        errors.add(str(problem), sub.path, "pipeline")
    errors.raise_if_any()
    assert run is not None
    run.warnings = list(errors.warnings)
    return run


#: ``[Master]`` keys of a sub-config that a run takes from the main config (docs/configuration.md#warnings).
OVERRIDDEN_BY_MAIN = ("sql_database",)


def _same_setting(a: Any, b: Any) -> bool:
    """Equal values, or two spellings of the same relative or absolute file path."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and "://" not in a + b:
        return os.path.normpath(a) == os.path.normpath(b)
    return False


def _warn_overridden_master_keys(main: LoadedConfig, sub: LoadedConfig, errors: ErrorCollector) -> None:
    """A sub-config's own ``[Master]`` value that the run replaces by the main config's: one warning."""
    written = sub.raw.get("Master") or {}
    for key in OVERRIDDEN_BY_MAIN:
        if key in written and not _same_setting(written[key], main.master.get(key)):
            errors.warn(
                f"{sub.path}: [Master] {key} = {written[key]!r} is overridden by the main config "
                f"{main.path} ({main.master.get(key)!r}); using the main config's value"
            )
