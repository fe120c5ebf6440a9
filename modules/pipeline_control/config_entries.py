"""One pipeline entry: the class behind a call string, its parameters merged from class defaults <
TOML section < call keywords (docs/configuration.md#defaults-and-precedence), and every check of them.

The types of every keyword are checked against the ``__init__`` annotations first (nested
``list[int]``, ``tuple[float, float]``, ``dict[str, float]``, ...), as
``keyword 'x' of Class must be <type>, got ...``. Then the values: the class's own
``validate_config`` (for pipeline modules: its ``parameter_rules`` and the annotations) and the
``Range`` bounds and ``Literal`` choices of the annotations, as ``x must be ...``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from modules.pipeline_control.callstrings import CallSpec
from modules.pipeline_control.config_master import FILE_KIND_TEXT
from modules.pipeline_control.config_model import ErrorCollector, ModuleSpec
from modules.pipeline_control.parameters import (
    check_type,
    check_value,
    class_parameters,
    parameter_problems,
)
from modules.pipeline_control.resolve import (
    KIND_TEXT,
    abstract_module,
    check_allowed,
    module_kind,
    resolve_callee,
)
from utils.errors import ConfigError

__all__ = ["all_sections", "resolve_entry"]

log = logging.getLogger("comap.config")


def resolve_entry(
    raw: Mapping[str, Any],
    call: CallSpec,
    kind_allowed: frozenset[str],
    file_kind: str,
    module_paths: list[str],
    errors: ErrorCollector,
    used_sections: set[str],
) -> ModuleSpec | None:
    if not check_allowed(call.path, module_paths):
        errors.add(
            "module path not allowed: it must start with 'modules.'"
            + (f" or one of {module_paths}" if module_paths else "")
            + " (add a prefix to [Master] module_paths)",
            call.file,
            call.where,
            call.text,
        )
        return None
    try:
        cls = resolve_callee(call.path, file=call.file, where=call.where, text=call.text)
    except ConfigError as exc:
        errors.extend([exc])
        return None
    if abstract_module(cls):
        errors.add(
            f"{cls.__name__} is a base class, not a pipeline module (run.py --list-modules lists them)",
            call.file,
            call.where,
            call.text,
        )
        return None
    kind = module_kind(cls)
    if kind is None or kind not in kind_allowed:
        allowed = " or ".join(KIND_TEXT[k] for k in sorted(kind_allowed))
        got = KIND_TEXT.get(kind, "not a pipeline module") if kind else "not a pipeline module"
        errors.add(
            f"{cls.__name__} is {got}; a {FILE_KIND_TEXT[file_kind]} list takes {allowed}",
            call.file,
            call.where,
            call.text,
        )
        return None

    # Sections: as written, canonical, and module form (docs/configuration.md#defaults-and-precedence).
    candidates = _section_candidates(call.path, cls)
    found = {k: p for k in candidates if (p := _section_params(raw, k, candidates, cls))}
    section_key = None
    section: dict[str, Any] = {}
    if len(found) > 1:
        errors.add(
            "parameters for this class are given under more than one section: "
            + ", ".join(f"[{k}]" for k in found),
            call.file,
            call.where,
            call.text,
        )
    elif found:
        section_key, section = next(iter(found.items()))
        _warn_overridden_section_keys(call, cls, section_key, section, errors)
    used_sections.update(found)

    params_info, var_kw = class_parameters(cls)
    resolved: dict[str, Any] = {n: p.default for n, p in params_info.items() if not p.required}
    ok = True
    for source_name, src in (("section", section), ("call", call.kwargs)):
        for key, value in src.items():
            if key not in params_info:
                moved = getattr(cls, "moved_parameters", {}).get(key)
                if moved:
                    errors.add(
                        f"'{key}' is no longer a parameter of {cls.__name__}: {moved}",
                        call.file,
                        call.where if source_name == "call" else f"[{section_key}]",
                        call.text if source_name == "call" else f"{key} = {value!r}",
                    )
                    ok = False
                    continue
                if var_kw:
                    log.warning(
                        "%s: %s: %s accepts **kwargs; passing unknown keyword '%s'",
                        call.file,
                        call.where,
                        cls.__name__,
                        key,
                    )
                else:
                    where = call.where if source_name == "call" else f"[{section_key}]"
                    errors.add(
                        f"unknown keyword '{key}' for {cls.__name__}; known keywords: "
                        f"{', '.join(params_info) or '(none)'}",
                        call.file,
                        where,
                        call.text if source_name == "call" else f"{key} = {value!r}",
                    )
                    ok = False
                    continue
            resolved[key] = value
    for name, info in params_info.items():
        if info.required and name not in resolved:
            errors.add(
                f"missing required keyword '{name}' for {cls.__name__}", call.file, call.where, call.text
            )
            ok = False
    for name, value in resolved.items():
        info = params_info.get(name)
        if info is not None and check_type(value, info.annotation) is not None:
            errors.add(
                f"keyword '{name}' of {cls.__name__} {check_value(value, info.annotation)}",
                call.file,
                call.where,
                call.text,
            )
            ok = False
    if not ok:
        return None
    problems = _value_problems(cls, resolved)
    for problem in problems:
        errors.add(problem, call.file, f"{call.where} {cls.__name__}", call.text)
    if problems:
        return None
    return ModuleSpec(call=call, cls=cls, kind=kind, params=resolved, section_key=section_key)


def _comparable(value: Any) -> Any:
    """``value`` with tuples as lists and booleans told apart from numbers, for equality."""
    if isinstance(value, list | tuple):
        return [_comparable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, bool):
        return ("bool", value)
    return value


def _warn_overridden_section_keys(
    call: CallSpec, cls: type, section_key: str, section: Mapping[str, Any], errors: ErrorCollector
) -> None:
    """A key given both in the TOML section and in the call string with different values: the call
    wins (docs/configuration.md#defaults-and-precedence), with one warning line."""
    for key, value in call.kwargs.items():
        if key in section and _comparable(section[key]) != _comparable(value):
            errors.warn(
                f"{call.file}: {cls.__name__}: key '{key}' set in [{section_key}] ({section[key]!r}) "
                f"and in the call string ({value!r}); using the call string's value"
            )


def _value_problems(cls: type, resolved: Mapping[str, Any]) -> list[str]:
    """``validate_config`` of the class, then the annotation bounds it did not already report."""
    problems: list[str] = []
    validator = getattr(cls, "validate_config", None)
    if callable(validator):
        try:
            problems = [str(p) for p in validator(dict(resolved)) or []]
        except Exception as exc:  # a validator bug must not hide the other errors
            problems = [f"validate_config raised {type(exc).__name__}: {exc}"]
    problems += [p for p in parameter_problems(cls, resolved) if p not in problems]
    return problems


def _navigate(raw: Mapping[str, Any], dotted: str) -> dict[str, Any] | None:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _section_candidates(path: str, cls: type) -> list[str]:
    canonical = f"{cls.__module__}.{cls.__qualname__}"
    keys = [path, canonical]
    if cls.__module__.rsplit(".", 1)[-1] == cls.__name__:
        keys.append(cls.__module__)
    out: list[str] = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def _section_params(raw: Mapping[str, Any], key: str, all_keys: list[str], cls: type) -> dict[str, Any]:
    node = _navigate(raw, key)
    if not node:
        return {}
    params = dict(node)
    if key == cls.__module__:
        # The module form: sub-tables named after other classes of the module are their sections
        # (``[modules.MapMaking.MapMaking.LineMapMaking]`` next to ``...MapMaking``;
        # docs/reliability.md#config-fuzzing).
        module = sys.modules.get(cls.__module__)
        for name in [n for n, v in params.items() if isinstance(v, dict)]:
            if name != cls.__name__ and isinstance(getattr(module, name, None), type):
                params.pop(name)
    # A longer candidate key nests inside this table; its sub-table is not a parameter here.
    for other in all_keys:
        if other != key and other.startswith(key + "."):
            nxt = other[len(key) + 1 :].split(".", 1)[0]
            if isinstance(params.get(nxt), dict):
                params.pop(nxt)
    return params


def all_sections(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of tables holding at least one non-table value (candidate class sections)."""
    out: list[str] = []
    for key, value in raw.items():
        if not isinstance(value, dict):
            continue
        dotted = f"{prefix}{key}"
        if dotted == "Master":
            continue
        if any(not isinstance(v, dict) for v in value.values()):
            out.append(dotted)
        out.extend(all_sections(value, dotted + "."))
    return out
