"""Test-only fault hook: ``kill -9`` a whole run at the N-th occurrence of a named event
(docs/developer.md#fault-injection-hook, docs/reliability.md#killed-at-any-point).

The hook is inactive unless ``COMAP_FAULT_KILL_AT`` or ``COMAP_FAULT_COUNTER`` is set in the
environment; :func:`checkpoint` then costs one dictionary lookup. When active:

* ``COMAP_FAULT_COUNTER`` names a file shared by every process of the run (pool workers, MPI ranks).
  Each :func:`checkpoint` appends its event name to it under an ``fcntl`` lock, so the count of an
  event is the same whichever process reaches it, and the file is the ordered record of the run's
  events. Default: ``.comap_fault_events`` in the working directory.
* ``COMAP_FAULT_KILL_AT="<event>:<N>"`` kills the run at the N-th ``<event>``: every process of the
  tree rooted at ``COMAP_FAULT_KILL_ROOT`` (a pid, e.g. ``mpiexec``'s, whose ranks each run in a
  session of their own) is stopped and then sent ``SIGKILL``, and so is this process's group. Without
  ``COMAP_FAULT_KILL_ROOT`` only this process's group is killed (``os.killpg``).

Events (where they are emitted): ``acquisition.arrived`` (a downloaded file verified, before its
registration), ``level2.staged`` (a module's output written into the staging file),
``level2.publish`` / ``level2.published`` (before and after the ``os.replace`` of a level-2 file),
``db.commit`` / ``db.committed`` (before and after a database commit), ``calibration.write`` /
``calibration.written``, ``fits.write`` / ``fits.written`` (maps) and ``cube.write`` /
``cube.written`` (before and after the ``os.replace`` of the file).
"""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path

ENV_KILL_AT = "COMAP_FAULT_KILL_AT"
ENV_COUNTER = "COMAP_FAULT_COUNTER"
ENV_KILL_ROOT = "COMAP_FAULT_KILL_ROOT"
DEFAULT_COUNTER = ".comap_fault_events"

EVENTS = (
    "acquisition.arrived",
    "level2.staged",
    "level2.publish",
    "level2.published",
    "db.commit",
    "db.committed",
    "calibration.write",
    "calibration.written",
    "fits.write",
    "fits.written",
    "cube.write",
    "cube.written",
)


def active() -> bool:
    """True when the environment switches the hook on."""
    return ENV_KILL_AT in os.environ or ENV_COUNTER in os.environ


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV_KILL_AT, "").strip()
    if not spec:
        return None
    event, _, n = spec.rpartition(":")
    if event not in EVENTS or not n.isdigit() or int(n) < 1:
        raise ValueError(f"{ENV_KILL_AT}={spec!r}: expected <event>:<N> with an event of {', '.join(EVENTS)}")
    return event, int(n)


def _record(event: str) -> int:
    """Append ``event`` to the shared counter file; return how many times it has now occurred."""
    path = Path(os.environ.get(ENV_COUNTER) or DEFAULT_COUNTER)
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        count = 1 + sum(1 for line in fh if line.split(" ", 1)[0] == event)
        fh.write(f"{event} {os.getpid()}\n")
        fh.flush()
        os.fsync(fh.fileno())
        return count  # the lock goes with the file; the caller may be about to die


def kill_run() -> None:
    """SIGKILL every process of the run (see the module docstring); does not return."""
    import psutil

    me = os.getpid()
    root = os.environ.get(ENV_KILL_ROOT, "").strip()
    victims: dict[int, psutil.Process] = {}
    if root.isdigit():
        # Stop the tree first, so that nothing forks or notices a death while it is being collected.
        for _ in range(5):
            try:
                tree = [psutil.Process(int(root))]
                tree += tree[0].children(recursive=True)
            except psutil.NoSuchProcess:
                break
            new = [p for p in tree if p.pid not in victims and p.pid != me]
            if not new:
                break
            for p in new:
                victims[p.pid] = p
                try:
                    p.send_signal(signal.SIGSTOP)
                except psutil.Error:
                    pass
        # Our own ancestors last: their death can take this process with it (PR_SET_PDEATHSIG), and a
        # victim that was stopped but never killed would stay stopped for ever.
        try:
            ancestors = {p.pid for p in psutil.Process(me).parents()}
        except psutil.Error:
            ancestors = set()
        for p in sorted(victims.values(), key=lambda p: p.pid in ancestors):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
    os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(me, signal.SIGKILL)  # pragma: no cover - a process outside its own group's reach


def checkpoint(event: str) -> None:
    """Count ``event`` and kill the run if it is the configured N-th one; a no-op when inactive."""
    if ENV_KILL_AT not in os.environ and ENV_COUNTER not in os.environ:
        return
    target = _target()
    count = _record(event)
    if target is not None and target == (event, count):
        kill_run()


def watch_commits() -> None:
    """Emit ``db.commit``/``db.committed`` around every ORM session commit, when the hook is active."""
    if not active():
        return
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    if not event.contains(Session, "before_commit", _before_commit):
        event.listen(Session, "before_commit", _before_commit)
        event.listen(Session, "after_commit", _after_commit)


def _before_commit(_session) -> None:
    checkpoint("db.commit")


def _after_commit(_session) -> None:
    checkpoint("db.committed")
