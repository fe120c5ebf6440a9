"""Declarative parameter constraints, checked by the config loader before any work.

A module's parameters are the keyword arguments of its ``__init__``; their defaults live only in
that signature. A constraint on a single parameter is part of its annotation::

    from typing import Annotated, Literal

    from modules.pipeline_control.parameters import Range

    def __init__(
        self,
        offset_length: Annotated[int, Range(ge=1)] = 100,
        estimator: Literal["median", "mean"] = "median",
        feeds: list[int] | None = None,
    ): ...

:func:`check_value` understands ``int``, ``float``, ``str``, ``bool``, ``None``, unions,
``Literal[...]``, ``list[T]``, ``tuple[T, ...]``, ``tuple[T1, T2]``, ``dict[K, V]``,
``Mapping``/``Sequence`` forms of these, and ``Annotated[T, Range(...)]``. A module's
``parameter_rules`` is then left with rules that tie several parameters together.
"""

from __future__ import annotations

import collections.abc as cabc
import functools
import inspect
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ParamInfo",
    "Range",
    "annotation_text",
    "check_type",
    "check_value",
    "class_parameters",
    "parameter_problems",
    "resolve_defaults",
]


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ``Annotated[float, Range(gt=0)]``; ``None`` passes unless excluded by type.

    Parameters
    ----------
    ge, gt, le, lt : float, optional
        Inclusive / exclusive lower and upper bounds.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def problem(self, value: Any) -> str | None:
        """None if ``value`` is within the bounds, else the reason."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and math.isnan(value):
            return "must not be NaN"
        if isinstance(value, float) and math.isinf(value):
            return "must be finite"
        for bound, ok, text in (
            (self.ge, lambda b: value >= b, ">="),
            (self.gt, lambda b: value > b, ">"),
            (self.le, lambda b: value <= b, "<="),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not ok(bound):
                return f"must be {text} {bound:g}"
        return None

    def __str__(self) -> str:
        parts = [
            f"{text} {b:g}"
            for b, text in ((self.ge, ">="), (self.gt, ">"), (self.le, "<="), (self.lt, "<"))
            if b is not None
        ]
        return " and ".join(parts)


_NUMBER = (int, float)


def _is_instance(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, _NUMBER) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (list, tuple):  # TOML has no tuples; call strings may give either
        return isinstance(value, list | tuple)
    return isinstance(value, tp)


def check_value(value: Any, annotation: Any) -> str | None:
    """None if ``value`` fits ``annotation``, else a short reason (``"must be …, got …"``).

    Unknown annotations (a class the loader cannot check, ``Any``, a missing annotation) pass.
    """
    if annotation is inspect.Parameter.empty or annotation is Any or annotation is None and value is None:
        return None
    if annotation is None or annotation is type(None):
        return None if value is None else f"must be None, got {value!r}"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *meta = args
        reason = check_value(value, base)
        if reason is not None:
            return reason
        for m in meta:
            if isinstance(m, Range):
                why = m.problem(value)
                if why is not None:
                    return f"{why}, got {value!r}"
        return None
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        reasons = [check_value(value, a) for a in args]
        if any(r is None for r in reasons):
            return None
        # A value of the right type that breaks a bound is reported by that bound.
        for a, r in zip(args, reasons, strict=True):
            if _base_matches(value, a):
                return r
        return f"must be {annotation_text(annotation)}, got {type(value).__name__} {value!r}"
    if origin is typing.Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return None
        return f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
    if origin in (list, cabc.Sequence, cabc.MutableSequence):
        if not isinstance(value, list | tuple):
            return f"must be {annotation_text(annotation)}, got {type(value).__name__} {value!r}"
        return _check_items(value, args[0] if args else Any, annotation)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return f"must be {annotation_text(annotation)}, got {type(value).__name__} {value!r}"
        if len(args) == 2 and args[1] is Ellipsis:
            return _check_items(value, args[0], annotation)
        if args and len(args) != len(value):
            return f"must be {annotation_text(annotation)} ({len(args)} items), got {value!r}"
        for item, a in zip(value, args, strict=False):
            reason = check_value(item, a)
            if reason is not None:
                return f"item {item!r}: {reason}"
        return None
    if origin in (dict, cabc.Mapping, cabc.MutableMapping):
        if not isinstance(value, dict):
            return f"must be {annotation_text(annotation)}, got {type(value).__name__} {value!r}"
        if len(args) == 2:
            for k, v in value.items():
                reason = check_value(k, args[0]) or check_value(v, args[1])
                if reason is not None:
                    return f"entry {k!r}: {reason}"
        return None
    if isinstance(annotation, type):
        if annotation in (int, float, str, bool, list, tuple, dict) and not _is_instance(value, annotation):
            return f"must be {annotation_text(annotation)}, got {type(value).__name__} {value!r}"
        if (
            annotation is str and "\0" in value
        ):  # no path or name holds one (docs/reliability.md#config-fuzzing)
            return f"must not contain a NUL character, got {value!r}"
        return None
    return None


def _base_matches(value: Any, annotation: Any) -> bool:
    """True if ``value`` has the base type of ``annotation`` (ignoring Range metadata)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return check_value(value, typing.get_args(annotation)[0]) is None
    return False


def _check_items(items: Any, item_type: Any, annotation: Any) -> str | None:
    for item in items:
        reason = check_value(item, item_type)
        if reason is not None:
            return f"item {item!r}: {reason}"
    return None


def annotation_text(annotation: Any) -> str:
    """Readable form of an annotation for messages and generated documentation."""
    if annotation is inspect.Parameter.empty:
        return "any"
    if annotation is type(None) or annotation is None:
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        base, *meta = args
        ranges = [str(m) for m in meta if isinstance(m, Range)]
        return annotation_text(base) + (f" ({'; '.join(ranges)})" if ranges else "")
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return " or ".join(annotation_text(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        inner = ", ".join("..." if a is Ellipsis else annotation_text(a) for a in args)
        return f"{name}[{inner}]" if inner else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _without_constraints(annotation: Any) -> Any:
    """``annotation`` with ``Range`` metadata dropped and each ``Literal`` replaced by its types."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _without_constraints(args[0])
    if origin is typing.Literal:
        types = tuple(dict.fromkeys(type(a) for a in args))
        return typing.Union[types] if len(types) > 1 else types[0]  # noqa: UP007
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return typing.Union[tuple(_without_constraints(a) for a in args)]  # noqa: UP007
    if origin is not None and args:
        inner = tuple(a if a is Ellipsis else _without_constraints(a) for a in args)
        try:
            return origin[inner]
        except TypeError:
            return annotation
    return annotation


def check_type(value: Any, annotation: Any) -> str | None:
    """Like :func:`check_value`, but only the types: bounds and ``Literal`` choices are not checked."""
    return check_value(value, _without_constraints(annotation))


# ------------------------------------------------------------------------------------------------
# A class's parameters
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """One keyword of a module's ``__init__``: its default (None if required) and annotation."""

    name: str
    default: Any
    required: bool
    annotation: Any


def class_parameters(cls: type) -> tuple[dict[str, ParamInfo], bool]:
    """Parameters of ``cls.__init__`` (without ``self``) and whether it accepts ``**kwargs``.

    Read once per class: resolving the string annotations is most of a config check's time
    (docs/reliability.md#config-fuzzing).
    """
    params, var_kw = _class_parameters(cls)
    return dict(params), var_kw


@functools.cache
def _class_parameters(cls: type) -> tuple[dict[str, ParamInfo], bool]:
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}, True
    try:
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception:
        hints = {}
    params: dict[str, ParamInfo] = {}
    var_kw = False
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0 and name == "self":
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var_kw = True
            continue
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        required = p.default is inspect.Parameter.empty
        params[name] = ParamInfo(
            name, None if required else p.default, required, hints.get(name, p.annotation)
        )
    return params, var_kw


def resolve_defaults(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` completed with the ``__init__`` defaults (the only place defaults live).

    The defaults of every ``__init__`` in the class hierarchy are used, the nearest class
    winning, so that a subclass with a narrower signature still has its parent's parameters.
    """
    resolved: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and klass is not object:
            info, _ = class_parameters(klass)
            resolved.update({name: p.default for name, p in info.items() if not p.required})
    resolved.update(params)
    return resolved


def parameter_problems(cls: type, params: Mapping[str, Any]) -> list[str]:
    """``'<name> <reason>'`` for every parameter whose value does not fit its annotation."""
    info, _ = class_parameters(cls)
    problems = []
    for name, value in params.items():
        if name in info:
            reason = check_value(value, info[name].annotation)
            if reason is not None:
                problems.append(f"{name} {reason}")
    return problems
