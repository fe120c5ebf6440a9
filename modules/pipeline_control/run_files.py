"""Per-run file names that two runs started in the same second do not share
(docs/reliability.md#concurrent-runs, docs/configuration.md#master-keys).

The log file and the resolved-configuration dump are named after the run's start time, to the
second. :func:`claim` creates such a file exclusively (``O_CREAT | O_EXCL``); when another run
already has the name, the run's own suffix (the last part of its run id) is added to the stem, so the
documented name is kept in the normal case and each run still writes its own file.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_suffix(run_id: str) -> str:
    """The unique part of a run id (``<timestamp>-<hex>`` → ``<hex>``)."""
    return run_id.rsplit("-", 1)[-1]


def _create(path: Path) -> bool:
    """Create ``path`` empty if it does not exist; False if it exists (or cannot be made: the caller's
    own open reports that error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return True  # not ours to report here: setup_logging / dump_toml fail with the cause
    return True


def claim(path: str | Path, run_id: str, *, suffix: str | None = None) -> Path:
    """Create ``path`` for this run alone and return it; if it exists already, ``<stem>_<run suffix>``
    with the same ``suffix`` (default: the last extension, e.g. ``.log``; ``.resolved.toml`` for dumps).

    Parameters
    ----------
    path : str or pathlib.Path
        The documented name, e.g. ``logs/2026-03-01_12-00-00_main_run.log``.
    run_id : str
        The run's id, ``<timestamp>-<hex>``.
    suffix : str or None
        The ending kept after the added run suffix.

    Returns
    -------
    pathlib.Path
        ``path``, or the name with the run suffix (both created empty).
    """
    path = Path(path)
    if _create(path):
        return path
    ending = suffix if suffix is not None and path.name.endswith(suffix) else path.suffix
    stem = path.name[: len(path.name) - len(ending)] if ending else path.name
    other = path.with_name(f"{stem}_{run_suffix(run_id)}{ending}")
    _create(other)
    return other
