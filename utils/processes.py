"""Processes of this host: whether the owner recorded for a job or a partial file still lives
(docs/operations.md#job-states)."""

from __future__ import annotations

import os

import psutil


def pid_alive(pid: int | None) -> bool:
    """True if a process ``pid`` exists on this host and has not exited.

    A zombie (exited, not yet reaped: its parent was killed with it and the host's init does not reap
    at once) is dead: it holds nothing and will never release what it owned. Unknown counts as alive
    (``None``, a non-positive pid, or an ``os.kill`` error other than "no such process"), so that
    nothing of a live owner is ever taken over or removed.
    """
    if pid is None or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: the process exists under another user
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
