"""Hypothesis strategies for the config fuzzer (docs/reliability.md#config-fuzzing).

Everything is built from the real pipeline classes, found the way ``run.py --list-modules`` finds
them (:func:`modules.pipeline_control.cli.list_modules`), and from their ``__init__`` annotations
(:func:`modules.pipeline_control.parameters.class_parameters`): a value strategy per annotation
(``int``/``float`` within a ``Range``, ``bool``, ``Literal`` choices, strings, lists, tuples,
dicts, ``None``), and for each parameter the values it must refuse (a type outside the annotation,
a number outside the ``Range``, a string outside the ``Literal``).

The oracle of what a value of an annotation may be is written here independently of
:mod:`modules.pipeline_control.parameters` (``accepted_types``), so that the loader's own checker is
not used to decide what it should accept.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import typing
from functools import cache
from typing import Any

from hypothesis import strategies as st

from modules.pipeline_control.cli import list_modules
from modules.pipeline_control.parameters import ParamInfo, Range, class_parameters
from modules.pipeline_control.resolve import resolve_callee

FILE_KIND = {"stage": "main", "per_observation": "level2", "streaming": "level2", "map_job": "map"}
INT64 = 2**63


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class ModuleInfo:
    """One discovered pipeline class: its listed path, kind, class and parameters."""

    path: str
    kind: str
    cls: type
    params: dict[str, ParamInfo]
    var_kw: bool

    def __repr__(self) -> str:
        return f"ModuleInfo({self.path})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis's failure report
        printer.text(repr(self))

    @property
    def file_kind(self) -> str:
        return FILE_KIND[self.kind]


@cache
def discovered_modules() -> tuple[ModuleInfo, ...]:
    """Every class ``run.py --list-modules`` lists, with its parameters."""
    listings, errors = list_modules(("modules.",))
    assert not errors, errors
    out = []
    for item in listings:
        cls = resolve_callee(item.path)
        params, var_kw = class_parameters(cls)
        out.append(ModuleInfo(item.path, item.kind, cls, params, var_kw))
    return tuple(out)


@cache
def modules_of(file_kind: str) -> list[ModuleInfo]:
    return [m for m in discovered_modules() if m.file_kind == file_kind]


@cache
def generatable(module: ModuleInfo) -> list[str]:
    """The optional parameters of ``module`` values can be generated for."""
    return [n for n, p in module.params.items() if not p.required and valid_values(p.annotation) is not None]


# ------------------------------------------------------------------------------------------------
# Annotations
# ------------------------------------------------------------------------------------------------


def _split(annotation: Any) -> tuple[Any, Range | None]:
    """``Annotated[T, Range]`` → ``(T, Range)``; anything else → ``(annotation, None)``."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        ranges = [m for m in meta if isinstance(m, Range)]
        return base, (ranges[0] if ranges else None)
    return annotation, None


def _alternatives(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return list(typing.get_args(annotation))
    return [annotation]


def checkable(annotation: Any) -> bool:
    """False for a missing annotation, ``Any`` or a class the loader cannot check."""
    return accepted_types(annotation) is not None


def accepted_types(annotation: Any) -> set[type] | None:
    """The Python types a value of ``annotation`` may have at its top level (None: anything)."""
    out: set[type] = set()
    for alt in _alternatives(annotation):
        base, _ = _split(alt)
        origin = typing.get_origin(base)
        if base is inspect.Parameter.empty or base is Any:
            return None
        if base is None or base is type(None):
            out.add(type(None))
        elif origin is typing.Literal:
            out.update(type(a) for a in typing.get_args(base))
        elif (
            origin in (list, tuple)
            or base in (list, tuple)
            or origin is not None
            and "Sequence" in str(origin)
        ):
            out.update({list, tuple})
        elif origin is dict or base is dict or origin is not None and "Mapping" in str(origin):
            out.add(dict)
        elif base is float:
            out.update({int, float})
        elif base in (int, str, bool):
            out.add(base)
        else:
            return None
    return out


def _int_bounds(r: Range | None) -> tuple[int, int]:
    lo, hi = -1000, 1000
    if r is not None:
        if r.ge is not None:
            lo = math.ceil(r.ge)
        if r.gt is not None:
            lo = math.floor(r.gt) + 1
        if r.le is not None:
            hi = math.floor(r.le)
        if r.lt is not None:
            hi = math.ceil(r.lt) - 1
        if r.ge is not None or r.gt is not None:
            hi = min(hi, lo + 1000) if r.le is None and r.lt is None else hi
    return lo, hi


def _float_strategy(r: Range | None) -> st.SearchStrategy[float]:
    kw: dict[str, Any] = {"allow_nan": False, "allow_infinity": False, "min_value": -1e3, "max_value": 1e3}
    if r is not None:
        if r.ge is not None:
            kw["min_value"] = float(r.ge)
        if r.gt is not None:
            kw["min_value"], kw["exclude_min"] = float(r.gt), True
        if r.le is not None:
            kw["max_value"] = float(r.le)
        if r.lt is not None:
            kw["max_value"], kw["exclude_max"] = float(r.lt), True
        if r.le is None and r.lt is None:
            kw["max_value"] = kw["min_value"] + 1e3
    return st.floats(**kw)


TEXT = st.text(st.characters(codec="utf-8", categories=("L", "N")) | st.sampled_from("_-./ "), max_size=8)


_VALID_CACHE: dict[tuple[Any, int], st.SearchStrategy[Any] | None] = {}


def valid_values(annotation: Any, *, depth: int = 0) -> st.SearchStrategy[Any] | None:
    """Values that fit ``annotation`` (None if the annotation cannot be generated from)."""
    try:
        return _VALID_CACHE[annotation, depth]
    except KeyError:
        strategy = _VALID_CACHE[annotation, depth] = _valid_values(annotation, depth)
        return strategy
    except TypeError:  # an unhashable annotation
        return _valid_values(annotation, depth)


def _valid_values(annotation: Any, depth: int) -> st.SearchStrategy[Any] | None:
    strategies = []
    for alt in _alternatives(annotation):
        base, r = _split(alt)
        origin = typing.get_origin(base)
        args = typing.get_args(base)
        if base is None or base is type(None):
            strategies.append(st.none())
        elif origin is typing.Literal:
            strategies.append(st.sampled_from(args))
        elif base is bool:
            strategies.append(st.booleans())
        elif base is int:
            strategies.append(st.integers(*_int_bounds(r)))
        elif base is float:
            strategies.append(
                _float_strategy(r) | st.integers(*_int_bounds(r)).filter(functools.partial(_in, r))
            )
        elif base is str:
            strategies.append(TEXT)
        elif depth < 2 and (
            origin in (list, tuple) and (len(args) != 2 or args[1] is Ellipsis) or base is list
        ):
            item = valid_values(args[0], depth=depth + 1) if args else st.integers(0, 9)
            if item is not None:
                strategies.append(st.lists(item, max_size=3))
        elif depth < 2 and origin is tuple:
            items = [valid_values(a, depth=depth + 1) for a in args]
            if all(i is not None for i in items):
                strategies.append(st.tuples(*items).map(list))
        elif depth < 2 and (origin is dict or base is dict):
            key = valid_values(args[0], depth=depth + 1) if args else TEXT
            value = valid_values(args[1], depth=depth + 1) if args else st.integers(0, 9)
            if key is not None and value is not None:
                strategies.append(st.dictionaries(key, value, max_size=2))
    return st.one_of(strategies) if strategies else None


def _in(r: Range | None, v: float) -> bool:
    return r is None or r.problem(v) is None


def out_of_range_values(annotation: Any) -> list[Any]:
    """Numbers just outside a ``Range`` of ``annotation`` (and NaN/inf where a bound excludes them),
    strings outside a ``Literal`` and strings with a NUL: values the loader must refuse."""
    out: list[Any] = []
    alts = _alternatives(annotation)
    has_str = any(_split(a)[0] is str for a in alts)
    if has_str:
        out.append("nul\x00byte")
    for alt in alts:
        base, r = _split(alt)
        if typing.get_origin(base) is typing.Literal and not has_str:
            choices = typing.get_args(base)
            out += [f"{choices[0]}x", str(choices[0]).upper() + "_", ""]
        if r is None or base not in (int, float):
            continue
        step = 1 if base is int else 0.5
        if r.ge is not None:
            out.append(type(base())(r.ge - step) if base is int else r.ge - step)
        if r.gt is not None:
            out.append(int(r.gt) if base is int and float(r.gt).is_integer() else r.gt)
        if r.le is not None:
            out.append(int(r.le) + 1 if base is int else r.le + step)
        if r.lt is not None:
            out.append(int(math.ceil(r.lt)) if base is int else r.lt)
        if base is float:
            out += [math.nan, math.inf if r.le is not None or r.lt is not None else -math.inf]
    return out


WRONG_TYPE_POOL: list[Any] = ["text", 7, 2.5, True, [1, 2], {"a": 1}, None]


def wrong_type_values(annotation: Any) -> list[Any]:
    """Values whose top-level type ``annotation`` does not accept."""
    types = accepted_types(annotation)
    if types is None:
        return []
    out = []
    for v in WRONG_TYPE_POOL:
        t = type(v)
        if t in types or (t is int and float in types and bool not in (t,)):
            continue
        if t is bool and (bool in types):
            continue
        if t in (list, dict) and t in types:
            continue
        out.append(v)
    return out
