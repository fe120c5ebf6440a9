"""Whether a file or directory can be created where the configuration puts it
(docs/configuration.md#validation).

Checked at configuration time, before any work, so that an output directory, log file or database
placed under a regular file or a read-only directory is a configuration error (exit status 2)
rather than a failure of every observation.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["unwritable_reason"]


def unwritable_reason(path: str | os.PathLike, *, directory: bool) -> str | None:
    """Why ``path`` cannot be created or written, or None if it can.

    Nothing is created: the nearest existing ancestor must be a writable directory.

    Parameters
    ----------
    path : path
        The directory (``directory=True``) or file to be written; relative to the working directory.
    directory : bool
        ``path`` is a directory (an existing one must be a writable directory) rather than a file
        (an existing one must be a writable regular file).

    Returns
    -------
    str or None
        A one-line reason, e.g. ``"level2/x is not a directory"``, or None.
    """
    p = Path(path)
    if p.exists():
        if directory and not p.is_dir():
            return f"{p} exists and is not a directory"
        if not directory and p.is_dir():
            return f"{p} is a directory"
        if not os.access(p, os.W_OK | (os.X_OK if directory else 0)):
            return f"{p} is not writable"
        return None
    parent = p.absolute().parent
    while not parent.exists():
        if parent.is_symlink():
            return f"{parent} is a broken symbolic link"
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None
