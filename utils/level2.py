"""Level-2 layout: path building, feed ↔ index helpers and format constants (03 §3).

Every per-feed level-2 array uses the level-2 feed axis ``spectrometer/feeds`` (science feeds in
level-1 order, without the ground feed). :func:`feed_index` and :func:`feed_number` are the only
converters between a feed number and a position on that axis.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np

from utils.constants import LEVEL2_FORMAT_VERSION, SUPPORTED_LEVEL2_FORMAT_VERSIONS, UTC_START_FORMAT

FORMAT_VERSION = LEVEL2_FORMAT_VERSION
SUPPORTED_FORMAT_VERSIONS = SUPPORTED_LEVEL2_FORMAT_VERSIONS

# Sample-flag bits of level2/sample_flags (03 §3).
FLAG_OUTSIDE_SCAN = 1
FLAG_VANE = 2
FLAG_LEVEL1_NAN = 4
FLAG_POINTING = 8

DEFAULT_SAVE_DIR_STRUCTURE = "{date:%Y-%m}/{source}/level2/"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def sanitise(text: str) -> str:
    """Replace every character outside ``[A-Za-z0-9._+-]`` by ``_`` (for path components)."""
    return _SAFE.sub("_", str(text)) or "_"


def level2_name(level1_name: str) -> str:
    """``Level2_<level-1 base name>``."""
    return f"Level2_{Path(level1_name).name}"


def expand_save_dir(
    template: str, *, utc_start: str, source: str, source_group: str | None, obsid: int
) -> str:
    """Expand ``{date:<strftime>}``, ``{source}``, ``{source_group}`` and ``{obsid}`` in ``template``.

    Raises
    ------
    ValueError
        For an unknown placeholder or an unparseable ``utc_start``.
    """
    date = _dt.datetime.strptime(utc_start, UTC_START_FORMAT) if utc_start else None

    def repl(m: re.Match) -> str:
        name, fmt = m.group(1), m.group(2)
        if name == "date":
            if date is None:
                raise ValueError("{date} needs the observation's utc_start")
            return date.strftime(fmt or "%Y-%m-%d")
        if name == "source":
            return sanitise(source or "Unknown")
        if name == "source_group":
            return sanitise(source_group or "Unknown")
        if name == "obsid":
            return format(int(obsid), fmt or "07d")
        raise ValueError(f"unknown placeholder {{{name}}} (known: date, source, source_group, obsid)")

    return _PLACEHOLDER.sub(repl, template)


def validate_save_dir(template: str) -> str | None:
    """None if ``template`` only uses known placeholders, else a message."""
    try:
        expand_save_dir(template, utc_start="2026-01-01-00:00:00", source="S", source_group="G", obsid=1)
    except (ValueError, KeyError) as exc:
        return str(exc)
    return None


def level2_path(
    output_dir: str | Path,
    save_dir_structure: str,
    *,
    level1_path: str,
    utc_start: str,
    source: str,
    source_group: str | None,
    obsid: int,
) -> Path:
    """Absolute final level-2 path of an observation."""
    sub = expand_save_dir(
        save_dir_structure, utc_start=utc_start, source=source, source_group=source_group, obsid=obsid
    )
    return (Path(output_dir) / sub / level2_name(level1_path)).resolve()


def replace_dataset(
    group: Any, name: str, shape: tuple[int, ...], dtype: Any, *, fillvalue: Any = None, chunks: Any = True
) -> Any:
    """(Re)create ``group[name]`` at full size; unwritten regions read as ``fillvalue`` (NaN for
    float "no value" arrays) without using storage."""
    if name in group:
        del group[name]
    kwargs: dict[str, Any] = {"track_times": False}
    if fillvalue is not None:
        kwargs["fillvalue"] = fillvalue
    if chunks is not None and all(int(s) > 0 for s in shape):
        kwargs["chunks"] = chunks
    return group.create_dataset(name, shape=shape, dtype=dtype, **kwargs)


def feeds(l2: Any) -> np.ndarray:
    """Science feed numbers on the level-2 feed axis of an open level-2 file."""
    return np.asarray(l2["spectrometer/feeds"][...], dtype=int)


def feed_index(l2: Any, feed: int) -> int:
    """Position of feed number ``feed`` on the level-2 feed axis.

    Raises
    ------
    KeyError
        If the feed is not in the file.
    """
    f = feeds(l2)
    hits = np.flatnonzero(f == int(feed))
    if hits.size == 0:
        raise KeyError(f"feed {feed} is not in this level-2 file (feeds {f.tolist()})")
    return int(hits[0])


def feed_number(l2: Any, ifeed: int) -> int:
    """Feed number at position ``ifeed`` of the level-2 feed axis."""
    return int(feeds(l2)[int(ifeed)])


def format_version(l2: Any) -> int | None:
    """The root ``level2_format_version`` attribute of an open level-2 file, or None."""
    v = l2.attrs.get("level2_format_version")
    return None if v is None else int(v)
