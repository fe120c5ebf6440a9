"""The content of the generated documentation tables, without Sphinx.

:mod:`comap_docs` turns these rows into docutils tables; ``tests/test_docs.py`` calls the same
functions to check that every module parameter and every registered layout entry is documented.
Only the project and the standard library are imported here, so the tests run without the docs
extra installed.

The module list is discovered, not hard-coded: every class defined under ``modules`` that derives
from one of the framework bases of ``modules.pipeline_control.Pipeline`` is documented.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# numpydoc "Parameters" sections: read by the same parser as ``run.py --describe``
# (docs/configuration.md#describing-a-module), so the reference and the prompt agree.
from modules.pipeline_control.module_docs import descriptions_for as _descriptions_for
from modules.pipeline_control.module_docs import parameter_descriptions as parameter_descriptions

#: Framework base classes, by name, in ``modules.pipeline_control.Pipeline``.
BASE_CLASS_NAMES = ("BaseCOMAPModule", "StreamingStage", "PipelineStage", "MapJob")

#: Section titles of the generated module reference, in order of appearance.
KIND_TITLES = {
    "stage": "Top-level stages",
    "per_observation": "Per-observation modules",
    "streaming": "Streaming stages",
    "map_job": "Map jobs",
}


@dataclass
class ParameterDoc:
    """One keyword of a module's ``__init__``."""

    name: str
    type: str
    default: str
    description: str


@dataclass
class ModuleDoc:
    """One pipeline class: its call path, kind, summary, parameters and declared datasets."""

    path: str
    kind: str
    summary: str
    parameters: list[ParameterDoc] = field(default_factory=list)
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------------
# Module discovery
# ------------------------------------------------------------------------------------------------


def _base_classes() -> tuple[type, ...]:
    pipeline = importlib.import_module("modules.pipeline_control.Pipeline")
    return tuple(getattr(pipeline, n) for n in BASE_CLASS_NAMES if hasattr(pipeline, n))


def _kind(cls: type, bases: tuple[type, ...]) -> str | None:
    try:
        from modules.pipeline_control.config import module_kind
    except ImportError:
        module_kind = None
    if module_kind is not None:
        return module_kind(cls)
    by_name = dict(zip(BASE_CLASS_NAMES, bases, strict=False))
    for name, kind in (
        ("PipelineStage", "stage"),
        ("StreamingStage", "streaming"),
        ("MapJob", "map_job"),
        ("BaseCOMAPModule", "per_observation"),
    ):
        if name in by_name and issubclass(cls, by_name[name]):
            return kind
    return None


def _module_names(package: str, errors: list[str]) -> Iterator[str]:
    pkg = importlib.import_module(package)
    yield package
    for info in pkgutil.walk_packages(
        pkg.__path__, prefix=package + ".", onerror=lambda name: errors.append(f"{name}: cannot import")
    ):
        yield info.name


def _signature_parameters(cls: type) -> list[tuple[str, Any, bool, Any]]:
    """(name, default, required, annotation) of ``cls.__init__`` without ``self`` and ``**kwargs``."""
    try:
        from modules.pipeline_control.config import class_parameters
    except ImportError:
        class_parameters = None
    if class_parameters is not None:
        params, _ = class_parameters(cls)
        return [(p.name, p.default, p.required, p.annotation) for p in params.values()]
    sig = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:
        hints = {}
    out = []
    for i, (name, p) in enumerate(sig.parameters.items()):
        if (i == 0 and name == "self") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        required = p.default is inspect.Parameter.empty
        out.append((name, None if required else p.default, required, hints.get(name, p.annotation)))
    return out


def _annotation_text(annotation: Any) -> str:
    try:
        from modules.pipeline_control.parameters import annotation_text
    except ImportError:
        return "" if annotation is inspect.Parameter.empty else str(annotation).replace("typing.", "")
    return annotation_text(annotation)


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = doc.strip().split("\n\n", 1)[0]
    return " ".join(first.split())


def _declared(cls: type, name: str) -> tuple[str, ...]:
    value = getattr(cls, name, ())
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list | frozenset | set):
        return ()
    return tuple(str(v) for v in value)


def document_class(cls: type) -> ModuleDoc | None:
    """The :class:`ModuleDoc` of one pipeline class, or None if it is not a module."""
    bases = _base_classes()
    if cls in bases:
        return None
    kind = _kind(cls, bases)
    if kind is None:
        return None
    descriptions = _descriptions_for(cls)
    parameters = [
        ParameterDoc(
            name=name,
            type=_annotation_text(annotation),
            default="required" if required else repr(default),
            description=descriptions.get(name, ""),
        )
        for name, default, required, annotation in _signature_parameters(cls)
    ]
    return ModuleDoc(
        path=f"{cls.__module__}.{cls.__qualname__}",
        kind=kind,
        summary=_summary(cls),
        parameters=parameters,
        reads=_declared(cls, "reads"),
        writes=_declared(cls, "writes"),
    )


def discover_modules(package: str = "modules") -> tuple[list[ModuleDoc], list[str]]:
    """Every pipeline class defined under ``package``, sorted by kind then call path.

    Returns
    -------
    docs : list of ModuleDoc
    errors : list of str
        Import errors met while walking the package (one line each).
    """
    bases = _base_classes()
    errors: list[str] = []
    found: dict[str, ModuleDoc] = {}
    for modname in _module_names(package, errors):
        try:
            mod = importlib.import_module(modname)
        except Exception as exc:
            errors.append(f"{modname}: {type(exc).__name__}: {exc}")
            continue
        for name, obj in vars(mod).items():
            if not isinstance(obj, type) or obj.__module__ != modname or name.startswith("_"):
                continue
            if getattr(obj, "__abstract_module__", False) or not issubclass(obj, bases):
                continue
            doc = document_class(obj)
            if doc is not None:
                found[doc.path] = doc
    order = list(KIND_TITLES)
    docs = sorted(found.values(), key=lambda d: (order.index(d.kind) if d.kind in order else 99, d.path))
    return docs, errors


# ------------------------------------------------------------------------------------------------
# Layout registries
# ------------------------------------------------------------------------------------------------

#: Where each file kind's registry lives: (module, attribute).
LAYOUT_REGISTRIES = {
    "level1": ("utils.level1_layout", "LEVEL1"),
    "level2": ("utils.level2", "LEVEL2"),
}

LAYOUT_COLUMNS = ("Path", "Kind", "Axes", "Dtype", "Unit", "Description")


def load_layout(file: str) -> Any | None:
    """The registry of ``file`` (``'level1'`` or ``'level2'``), or None if it does not exist yet."""
    modname, attr = LAYOUT_REGISTRIES[file]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            return None
        raise
    return getattr(mod, attr, None)


def layout_rows(layout: Any) -> list[tuple[str, ...]]:
    """One row per registered entry: path, kind, axes, dtype, unit, description (+ optional)."""
    rows = []
    for entry in layout:
        axes = "(" + ", ".join(entry.axes) + ")" if entry.axes else ""
        description = entry.description + (" (optional)" if getattr(entry, "optional", False) else "")
        rows.append((str(entry), entry.kind, axes, entry.dtype or "", entry.unit, description))
    return rows


def axis_rows() -> list[tuple[str, str]]:
    """(letter, meaning) of every axis letter used by the layout registries."""
    from utils.layout import AXIS_NAMES

    return list(AXIS_NAMES.items())
