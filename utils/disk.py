"""Full disks: recognising "no space left on device", and checking free space before a download
(docs/reliability.md#transient-io-errors-and-full-disks).

A write that runs out of space fails the one product it was writing (a level-2 file, a map) with
one reason, ``no space left on device writing <file>``, and leaves nothing under a final name;
acquisition checks the free space before it fetches anything.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE_ERRNOS: frozenset[int] = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``errno`` values meaning the file system (or the user's quota) is full."""

_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "errno = 28,", "errno = 122,")


def is_no_space(exc: BaseException | None) -> bool:
    """True if ``exc``, or an exception it was raised from or while handling, is a full disk.

    h5py raises ``OSError`` with the errno it finds in HDF5's message ("file write failed: …,
    errno = 28, error message = 'No space left on device'"); the same write can also surface
    later as another error of the close that follows it, so the whole chain is looked at.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        text = str(exc).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def no_space_reason(path: str | os.PathLike) -> str:
    """The one-line failure reason of a write that ran out of space."""
    return f"no space left on device writing {os.fspath(path)}"


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units, e.g. ``"1.5 GB"``."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000.0
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000.0:.1f} TB"


def free_space_shortfall(dest: str | os.PathLike, need_bytes: int, margin_bytes: int) -> str | None:
    """None if the file system of ``dest`` has ``need_bytes + margin_bytes`` free, else one line
    saying what is needed, what is free and where.

    Parameters
    ----------
    dest : path
        Destination directory; its nearest existing ancestor is measured when it does not exist yet.
    need_bytes : int
        Bytes about to be written, B.
    margin_bytes : int
        Bytes that must stay free after the write, B.
    """
    where = Path(dest)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    total = int(need_bytes) + int(margin_bytes)
    if free >= total:
        return None
    return (
        f"not enough free space in {os.fspath(dest)}: {format_bytes(total)} needed "
        f"({format_bytes(need_bytes)} to fetch + {format_bytes(margin_bytes)} margin), "
        f"{format_bytes(free)} free"
    )
