"""Argument values of the database facade: conversion to DB-API types, integer checks and the
wildcard conditions shared by the query and write methods (docs/database.md#api)."""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import and_, false, or_

from utils.constants import UTC_START_FORMAT

_CHUNK = 500  # obsids per IN (...) clause, well below SQLite's bound-parameter limit
_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)

T = TypeVar("T")


def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def mjd_from_utc_start(utc_start: str) -> float:
    """Convert a level-1 ``utc_start`` string (``%Y-%m-%d-%H:%M:%S``, UTC) to MJD.

    Parameters
    ----------
    utc_start : str
        Start time, e.g. ``"2026-03-01-04:15:00"``.

    Returns
    -------
    float
        Modified Julian Date (days).

    Raises
    ------
    ValueError
        If the string does not have the expected format.
    """
    dt = datetime.strptime(str(utc_start).strip(), UTC_START_FORMAT).replace(tzinfo=UTC)
    return (dt - _MJD_EPOCH).total_seconds() / 86400.0


def _first_line(text: object) -> str | None:
    """Return the first non-empty line of ``text`` (stripped), or None."""
    if text is None:
        return None
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _clean(value: Any) -> Any:
    """Convert a value to a plain Python type the DB-API accepts.

    numpy scalars become Python scalars, NaN becomes None ("no value",
    docs/formats/level2.md#level-2-file-layout), bytes are decoded, path-like objects become strings and
    arrays become (nested) lists.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return None if math.isnan(f) else f
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _int(value: Any, what: str) -> int:
    """Return ``value`` as an int; reject bools, non-integral floats and garbage with ValueError."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _int_list(values: Any, what: str) -> list[int]:
    """Return ``values`` (an int or an iterable of ints) as a list of ints, order preserved."""
    if values is None:
        return []
    if isinstance(values, numbers.Integral | str) and not isinstance(values, bool):
        return [_int(values, what)]
    return [_int(v, what) for v in values]


def _unique(values: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _str_list(values: str | Iterable[str]) -> list[str]:
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _chunks(seq: Sequence[T], n: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _escape_like(text: str) -> str:
    """Escape the LIKE wildcards ``%`` and ``_`` of ``text`` with escape character ``\\``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like_pattern(pattern: str) -> str:
    """Translate a ``*``/``?`` wildcard pattern into a LIKE pattern with escape character ``\\``."""
    return _escape_like(pattern).replace("*", "%").replace("?", "_")


def _pattern_condition(column: Any, patterns: str | Iterable[str]):
    """Case-insensitive wildcard match of ``column`` against one or several patterns (OR)."""
    items = _str_list(patterns)
    if not items:
        return false()
    return or_(*(column.ilike(_like_pattern(p), escape="\\") for p in items))


def _nonempty(column: Any, flag: bool):
    has = and_(column.is_not(None), column != "")
    return has if flag else ~has


def _element(obsid: Any, feed: Any, band: Any, channel: Any) -> tuple[int, int, int, int]:
    """Return a checked ``(obsid, feed, band, channel)`` key (feed >= 1, band and channel >= 0)."""
    key = (_int(obsid, "obsid"), _int(feed, "feed"), _int(band, "band"), _int(channel, "channel"))
    if key[1] < 1 or key[2] < 0 or key[3] < 0:
        raise ValueError(f"invalid element obsid={key[0]} feed={key[1]} band={key[2]} channel={key[3]}")
    return key
