"""Processes of this host: whether the owner recorded for a job or a partial file still lives
(docs/operations.md#job-states)."""

from __future__ import annotations

import os


def pid_alive(pid: int | None) -> bool:
    """True if a process ``pid`` exists on this host.

    Unknown counts as alive (``None``, a non-positive pid, or an ``os.kill`` error other than "no
    such process"), so that nothing of a live owner is ever taken over or removed.
    """
    if pid is None or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: the process exists under another user
        return True
    return True
