"""Registering level-1 files in ``comap_data`` (shared by DataAcquisition and DataAssess).

* :func:`observation_row` — the ``comap_data`` fields of an observation from its ``/comap``
  attributes (docs/database.md#comap_data, source group by docs/database.md#source-group-classification);
* :func:`read_level1_row` — open (and optionally validate) a level-1 file and build its row;
* :data:`DEMO_HINT` — the one-line hint shown when the simulated demo archive is missing;
* :func:`expect_directory` / :func:`directory_expected` — directories that an earlier stage of
  the same pipeline will create (DataAcquisition's ``local_dir``), so that DataAssess does not
  reject them at config load on the first run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from modules.SQLModule.source_groups import classify
from utils.constants import GROUND_FEED, obsid_from_level1_name
from utils.errors import BadCOMAPFile
from utils.level1 import Level1File

__all__ = [
    "DEMO_HINT",
    "LEVEL1_JOB",
    "directory_expected",
    "expect_directory",
    "observation_row",
    "read_level1_row",
]

LEVEL1_JOB: str = "level1"
"""Job stage of a level-1 file that cannot be registered (docs/acquisition.md#unusable-level-1-files)."""

DEMO_HINT: str = "run make demo or python -m utils.simulator archive --preset demo --out demo/remote"
"""What to do when the simulated demo archive (``demo/remote/``) does not exist (docs/install.md#the-demo)."""

# /comap attributes copied to comap_data when present (docs/database.md#comap_data).
_COPIED_ATTRS = (
    "telescope",
    "instrument",
    "platform",
    "pixels",
    "version",
    "bof",
    "bw",
    "tsamp",
    "coeff_iq",
    "features",
    "fft_shift",
    "iqcalid",
    "level",
    "nbit",
    "nchan",
    "nint",
)


def observation_row(
    attrs: dict[str, Any], *, level1_path: str | None, size_bytes: int | None, n_feeds: int | None
) -> dict[str, Any]:
    """The ``comap_data`` fields of an observation from its ``/comap`` attributes.

    Parameters
    ----------
    attrs : dict
        ``/comap`` attributes (at least ``obsid``).
    level1_path : str or None
        Level-1 file; stored absolute.
    size_bytes : int or None
        Level-1 file size, bytes.
    n_feeds : int or None
        Science feeds in the file (``GROUND_FEED`` excluded).

    Returns
    -------
    dict
        ``obsid``, ``source`` and ``source_group`` (docs/database.md#source-group-classification),
        ``utc_start``, ``comment``, the copied attributes, and the path, size and feed count when given.
    """
    source, group = classify(str(attrs.get("source", "")), str(attrs.get("comment", "")))
    row: dict[str, Any] = {
        "obsid": int(attrs["obsid"]),
        "source": source,
        "source_group": group,
        "utc_start": str(attrs.get("utc_start", "")) or None,
        "comment": str(attrs.get("comment", "")),
    }
    if level1_path is not None:
        row["level1_path"] = os.path.abspath(level1_path)
    if size_bytes is not None:
        row["level1_size_bytes"] = int(size_bytes)
    if n_feeds is not None:
        row["n_feeds"] = int(n_feeds)
    for key in _COPIED_ATTRS:
        if key in attrs and attrs[key] is not None:
            value = attrs[key]
            row[key] = value.item() if hasattr(value, "item") else value
    return row


def read_level1_row(path: str | os.PathLike, *, validate: bool = False) -> dict[str, Any]:
    """Open a level-1 file and return its ``comap_data`` row.

    Parameters
    ----------
    path : path
        Level-1 file named ``comap-<obsid>-<date>-<time>.hd5``.
    validate : bool
        Run ``Level1File.validate(probe_tod=True)`` (docs/formats/level1.md#validity-checks) first.

    Raises
    ------
    BadCOMAPFile
        The file cannot be opened or validated, has no ``/comap.obsid``, or its obsid differs from
        the one in its name (one-line message).
    """
    p = Path(path)
    named = obsid_from_level1_name(p.name)
    if p.is_file() and p.stat().st_size == 0:
        raise BadCOMAPFile(f"{p}: empty file (0 bytes)")
    try:
        with Level1File(p) as l1:
            if validate:
                l1.validate(probe_tod=True)
            attrs = l1.attrs()
            if "obsid" not in attrs:
                raise BadCOMAPFile("missing attribute /comap.obsid")
            if named is not None and int(attrs["obsid"]) != named:
                raise BadCOMAPFile(
                    f"obsid mismatch: file name says {named}, /comap.obsid says {attrs['obsid']}"
                )
            n_feeds = int(sum(1 for f in l1.feeds() if int(f) != GROUND_FEED))
    except BadCOMAPFile as exc:
        if "file signature not found" in exc.message:  # HDF5's words for "not HDF5 at all"
            raise BadCOMAPFile(f"{exc.message} (not an HDF5 file)", obsid=exc.obsid) from None
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise BadCOMAPFile(f"cannot read level-1 file {p}: {' '.join(str(exc).split())}") from None
    return observation_row(attrs, level1_path=str(p.resolve()), size_bytes=p.stat().st_size, n_feeds=n_feeds)


# ------------------------------------------------------------------------------------------------
# Directories created by an earlier stage of the same pipeline
# ------------------------------------------------------------------------------------------------

_expected_lock = threading.Lock()
_expected: set[str] = set()


def expect_directory(path: str | os.PathLike) -> None:
    """Record that an earlier stage (DataAcquisition) will create ``path`` when it runs."""
    with _expected_lock:
        _expected.add(os.path.abspath(os.fspath(path)))


def directory_expected(path: str | os.PathLike) -> bool:
    """True if ``path`` (or a parent of it) was announced with :func:`expect_directory`."""
    p = os.path.abspath(os.fspath(path))
    with _expected_lock:
        return any(p == e or p.startswith(e.rstrip(os.sep) + os.sep) for e in _expected)
