"""A module's parameters at the prompt: ``run.py --describe`` and ``run.py --defaults-toml``
(docs/configuration.md#describing-a-module).

The descriptions come from the numpydoc ``Parameters`` sections of the class and ``__init__``
docstrings along the MRO, so that a parameter group shared by several modules (the dataclasses of
:mod:`modules.MapMaking.job_parameters`, ``RemoteSelectionParameters``) describes each of its
parameters once and a module redescribes only those whose meaning differs in it. Names, types and
defaults come from the ``__init__`` signature (:func:`.parameters.class_parameters`), the only place
defaults live. The generated module reference of the documentation (``docs/_ext/comap_tables.py``)
reads the descriptions with the same parser.
"""

from __future__ import annotations

import inspect
import re
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import tomli_w

from modules.pipeline_control.parameters import annotation_text, class_parameters

__all__ = [
    "ParameterDescription",
    "defaults_toml",
    "describe_class",
    "describe_text",
    "descriptions_for",
    "parameter_descriptions",
    "toml_value",
    "units_of",
]

_SECTION_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def _parameter_entries(doc: str | None) -> list[tuple[list[str], str]]:
    """``(names, description)`` of each entry of the numpydoc ``Parameters`` section of ``doc``."""
    if not doc:
        return []
    lines = inspect.cleandoc(doc).splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].strip() == "Parameters" and _SECTION_UNDERLINE.match(lines[i + 1]):
            i += 2
            break
        i += 1
    else:
        return []
    entries: list[tuple[list[str], list[str]]] = []
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and line.strip() and _SECTION_UNDERLINE.match(lines[i + 1]):
            break  # the next section
        if line.strip() and not line.startswith((" ", "\t")):
            head = line.split(" : ", 1)[0].strip().rstrip(":")
            entries.append(([n.strip().lstrip("*") for n in head.split(",") if n.strip()], []))
        elif line.strip() and entries:
            entries[-1][1].append(line.strip())
        i += 1
    return [(names, " ".join(text).strip()) for names, text in entries]


def parameter_descriptions(doc: str | None) -> dict[str, str]:
    """Descriptions from the ``Parameters`` section of a numpydoc docstring, keyed by name.

    A combined entry (``plot_vane, plot_tsys : bool``) gives each name the same description.
    Continuation lines are joined with single spaces.
    """
    out: dict[str, str] = {}
    for names, text in _parameter_entries(doc):
        for n in names:
            out[n] = text
    return out


def descriptions_for(cls: type) -> dict[str, str]:
    """Parameter descriptions from the class and ``__init__`` docstrings along the MRO (nearest wins).

    A parameter group shared by several modules (a base class such as
    :class:`~modules.MapMaking.job_parameters.SelectionParameters`) describes its parameters once; a
    module redescribes only those whose meaning differs in it.
    """
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        for doc in (klass.__dict__.get("__doc__"), getattr(klass.__dict__.get("__init__"), "__doc__", None)):
            for names, text in _parameter_entries(doc):
                for name in names:
                    if text:
                        out.setdefault(name, text)
    return out


# ------------------------------------------------------------------------------------------------
# Units
# ------------------------------------------------------------------------------------------------

_UNIT_WORDS = (
    r"K|mK|uK|µK|K km/s|K/K|Jy|mJy|Jy/beam|MJy/sr|Hz|kHz|MHz|GHz|s|ms|sec|seconds?|minutes?|min|hours?|h|"
    r"days?|d|deg|degrees?|arcmin|arcsec|rad|radians?|km/s|m/s|m|mm|cm|bytes?|kB|MB|GB|TB|KiB|MiB|GiB|TiB|"
    r"%|percent|dB|samples?|channels?|pixels?|scans?|observations?|obsids?|MJD|UTC|K\^-1|1/K|K⁻¹|K⁻²|"
    r"K s\^1/2|"
    r"sigma|σ"
)
_UNIT = rf"(?:{_UNIT_WORDS})(?:\s*(?:[/*^·]|per)\s*(?:{_UNIT_WORDS}|\d+))*"
# "(K)", "[GHz]" (not the plural "band(s)"), "in Hz", "..., s." at the end of a clause
_BRACKETED = re.compile(rf"(?:^|(?<=\s))[\[(]\s*({_UNIT})\s*[\])]")
_IN_UNIT = re.compile(rf"\bin\s+(?:units\s+of\s+)?({_UNIT})(?=[\s,.;)]|$)")
_TRAILING = re.compile(rf",\s*({_UNIT})\s*(?=[.;(]|$)")
_NAME_SUFFIX = {
    "k": "K",
    "mk": "mK",
    "hz": "Hz",
    "ghz": "GHz",
    "kms": "km/s",
    "mhz": "MHz",
    "s": "s",
    "sec": "s",
    "seconds": "s",
    "minutes": "min",
    "hours": "h",
    "days": "days",
    "deg": "deg",
    "degrees": "deg",
    "arcmin": "arcmin",
    "arcsec": "arcsec",
    "rad": "rad",
    "jy": "Jy",
    "mb": "MB",
    "gb": "GB",
    "bytes": "bytes",
    "percent": "%",
    "sigma": "σ",
}
# Words after "in" that are not units even though they look like one ("in s" is rare; "in d" never).
_NOT_UNITS_AFTER_IN = {"d", "h", "m", "s", "min", "sigma", "σ", "samples", "sample"}


def units_of(name: str, description: str, annotation: Any = None) -> str:
    """The units of a parameter, read from its description (``(K)``, ``[GHz]``, ``in Hz``,
    ``..., s.``) or from its name (``source_mask_radius_arcmin``); ``""`` if neither states them or
    the parameter is a flag or a name (``bool``, ``str``, ``Literal``)."""
    if annotation is not None and not _may_have_units(annotation):
        return ""
    for pattern in (_BRACKETED, _TRAILING):
        m = pattern.search(description)
        if m:
            return m.group(1)
    for m in _IN_UNIT.finditer(description):
        if m.group(1) not in _NOT_UNITS_AFTER_IN:
            return m.group(1)
    suffix = name.rsplit("_", 1)[-1].lower() if "_" in name else ""
    return _NAME_SUFFIX.get(suffix, "")


def _may_have_units(annotation: Any) -> bool:
    """False for annotations built only of ``bool``, ``str``, ``None`` and ``Literal`` (no units)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _may_have_units(args[0])
    if origin is typing.Literal:
        return False
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return any(_may_have_units(a) for a in args)
    return annotation not in (bool, str, type(None), None)


# ------------------------------------------------------------------------------------------------
# --describe
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterDescription:
    """One keyword of a module's ``__init__`` as the prompt shows it."""

    name: str
    type: str
    default: Any
    required: bool
    units: str
    description: str


def describe_class(cls: type) -> list[ParameterDescription]:
    """Every ``__init__`` keyword of ``cls`` with its type, default, units and description."""
    params, _ = class_parameters(cls)
    texts = descriptions_for(cls)
    out = []
    for name, info in params.items():
        description = texts.get(name, "")
        out.append(
            ParameterDescription(
                name=name,
                type=annotation_text(info.annotation),
                default=info.default,
                required=info.required,
                units=units_of(name, description, info.annotation),
                description=description,
            )
        )
    return out


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def describe_text(cls: type, kind_text: str, width: int = 100) -> str:
    """The ``--describe`` listing of ``cls``: path, kind, summary, then one block per parameter."""
    path = f"{cls.__module__}.{cls.__qualname__}"
    lines = [path, f"  {kind_text}"]
    summary = _summary(cls)
    if summary:
        lines += textwrap.wrap(summary, width, initial_indent="  ", subsequent_indent="  ")
    params = describe_class(cls)
    lines.append("")
    lines.append(f"Parameters ({len(params)}; TOML section [{path}] or keywords of the call string):")
    for p in params:
        default = "required" if p.required else repr(p.default)
        lines.append(f"  {p.name} : {p.type}")
        lines.append(f"      default: {default}")
        lines.append(f"      units:   {p.units or '-'}")
        text = p.description or "(no description)"
        lines += textwrap.wrap(text, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# --defaults-toml
# ------------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str | None:
    """``value`` as a TOML inline value (written by ``tomli_w``), or None if TOML cannot hold it
    (``None`` anywhere in it, or an object that is not a TOML type)."""
    if isinstance(value, Mapping):
        parts = []
        for k, v in value.items():
            text = toml_value(v)
            if text is None:
                return None
            parts.append(f"{toml_value(str(k))} = {text}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, list | tuple):
        items = [toml_value(v) for v in value]
        return None if any(i is None for i in items) else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    try:
        return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")
    except TypeError:
        return None


def _comment(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="# ", subsequent_indent="# ") or ["#"]


def defaults_toml(cls: type, width: int = 100) -> str:
    """A TOML section ``[<module path>]`` with every parameter set to its default, each preceded by
    ``# description (units)``. A required parameter, and one whose default TOML cannot hold
    (``None``), is written commented out with a note."""
    path = f"{cls.__module__}.{cls.__qualname__}"
    lines = _comment(f"{cls.__name__}: {_summary(cls)}", width) + [f"[{path}]"]
    for p in describe_class(cls):
        text = p.description or "(no description)"
        if p.units and p.units not in text:
            text += f" ({p.units})"
        lines += _comment(f"{text} [{p.type}]", width)
        if p.required:
            lines.append(f"# {p.name} =   # required: no default, set it here or in the call string")
            continue
        value = toml_value(p.default)
        if value is None:
            lines.append(
                f"# {p.name} =   # default {p.default!r}: TOML has no null; leave it out to keep the default"
            )
        else:
            lines.append(f"{p.name} = {value}")
    return "\n".join(lines) + "\n"
