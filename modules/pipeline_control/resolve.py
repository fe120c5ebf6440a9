"""From a dotted path to a pipeline class: the allow-list, the import and the kind of module.

The callee must lie under an allow-listed prefix (``modules.`` or ``Master.module_paths``) before
anything is imported (docs/configuration.md#call-strings).
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterable
from typing import Any

from modules.pipeline_control.base import BaseCOMAPModule, MapJob, PipelineStage, StreamingStage
from utils.errors import ConfigError

__all__ = [
    "DEFAULT_MODULE_PREFIX",
    "KIND_TEXT",
    "abstract_module",
    "check_allowed",
    "module_kind",
    "resolve_callee",
]

DEFAULT_MODULE_PREFIX = "modules."

KIND_TEXT = {
    "stage": "a top-level stage (PipelineStage)",
    "per_observation": "a per-observation module (BaseCOMAPModule)",
    "streaming": "a streaming stage (StreamingStage)",
    "map_job": "a map job (CreateMap)",
}


def check_allowed(path: str, module_paths: Iterable[str]) -> bool:
    """True if the dotted ``path`` starts with ``modules.`` or an allow-listed prefix."""
    prefixes = [DEFAULT_MODULE_PREFIX, *module_paths]
    for prefix in prefixes:
        p = prefix if prefix.endswith(".") else prefix + "."
        if path.startswith(p) and len(path) > len(p):
            return True
    return False


def resolve_callee(
    path: str, *, file: str | None = None, where: str | None = None, text: str | None = None
) -> type:
    """Import the longest importable module prefix of ``path``, then ``getattr`` the rest.

    A module that contains a class of its own name resolves to that class, so both
    ``pkg.Name.Name`` and ``pkg.Name.Name.Name`` work (docs/configuration.md#call-strings rule 5).
    """
    parts = path.split(".")
    if any(part.startswith("_") for part in parts):
        # __base__, __class__, _private: never a listed module (docs/reliability.md#config-fuzzing)
        raise ConfigError("a module path may not use names starting with '_'", file, where, text)
    obj: Any = None
    for i in range(len(parts), 0, -1):
        modname = ".".join(parts[:i])
        try:
            obj = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing and (modname == missing or modname.startswith(missing + ".")):
                continue
            raise ConfigError(f"importing {modname} failed: {exc}", file, where, text) from None
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"importing {modname} failed: {type(exc).__name__}: {exc}", file, where, text
            ) from None
        for attr in parts[i:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ConfigError(
                    f"unknown module: {modname} has no attribute '{attr}'", file, where, text
                ) from None
        break
    else:
        raise ConfigError(f"unknown module: cannot import any part of {path}", file, where, text)
    if isinstance(obj, types.ModuleType):
        leaf = obj.__name__.rsplit(".", 1)[-1]
        candidate = getattr(obj, leaf, None)
        if isinstance(candidate, type):
            obj = candidate
        else:
            raise ConfigError(f"unknown module: module {obj.__name__} has no class {leaf}", file, where, text)
    if not isinstance(obj, type):
        raise ConfigError(f"{path} is not a class", file, where, text)
    return obj


_BASE_CLASSES = (BaseCOMAPModule, StreamingStage, PipelineStage, MapJob)


def abstract_module(cls: type) -> bool:
    """True for a base class a pipeline module derives from (``BaseCOMAPModule``, ``MapProduct``, ...),
    which ``run.py --list-modules`` does not list and a config may not name
    (docs/reliability.md#config-fuzzing)."""
    return cls in _BASE_CLASSES or bool(vars(cls).get("__abstract_module__", False))


def module_kind(cls: type) -> str | None:
    """Classify a class as ``stage``, ``streaming``, ``per_observation`` or ``map_job``
    (docs/developer.md#kinds-of-modules)."""
    if issubclass(cls, PipelineStage):
        return "stage"
    if issubclass(cls, StreamingStage):
        return "streaming"
    if issubclass(cls, MapJob):
        return "map_job"
    if issubclass(cls, BaseCOMAPModule):
        return "per_observation"
    if callable(getattr(cls, "run", None)) and callable(getattr(cls, "already_processed", None)):
        return "per_observation"
    return None
