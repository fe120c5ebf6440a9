"""Signals a scheduler, a terminal or an operator sends to a run (docs/reliability.md#signals).

The coordinator (the serial process, or rank 0 of an MPI run) treats SIGINT, SIGTERM and SIGHUP
alike: the handler raises :class:`Interrupted`, a ``KeyboardInterrupt`` that carries the signal
number, so the paths that already handle Ctrl-C (stop dispatching, terminate the workers, remove
their staging files, return the run's jobs to ``pending``) handle all three, and the exit status is
``128 + signum`` (130, 143, 129). Only the first such signal interrupts; later ones are ignored while
the run cleans up (SIGKILL still ends it, and its workers with it).

SIGUSR1 asks for a **drain** (Slurm's ``--signal`` warning before the time limit): the stages finish
the items in hand, start no new ones, leave the rest ``pending``, and the run stops after that stage
with exit status :data:`EXIT_DRAINED`.

A pool worker ignores SIGINT, SIGHUP and SIGUSR1 (its coordinator's to handle); on SIGTERM (what the
coordinator sends it to stop, and what Slurm or systemd send to the whole process group) it removes
the staging files it owns and leaves at once with ``os._exit`` (nothing can swallow it). It also dies
with its coordinator, even a SIGKILLed one (``PR_SET_PDEATHSIG`` on Linux). An MPI rank other than 0
ignores SIGUSR1 and on a stop signal removes its staging files and waits for rank 0 to end it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that interrupt a run (exit status ``128 + signum``)."""

DRAIN_SIGNAL = signal.SIGUSR1
"""The signal that asks a run to finish what it holds and stop."""

EXIT_DRAINED = 75
"""Exit status of a drained run: ``EX_TEMPFAIL`` of sysexits.h, "incomplete, submit again"."""

PARK_S = 60.0
"""How long an MPI rank other than 0 waits, after a stop signal, for rank 0 to end the run, s."""

_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """A stop signal received by the coordinator.

    Attributes
    ----------
    signum : int
        The signal number (``signal.SIGINT``, ``SIGTERM`` or ``SIGHUP``).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class _State:
    stop_signum: int | None = None
    drain: bool = False
    drained: bool = False
    left_pending: int = 0
    in_collective: bool = False
    while_parked: Callable[[], None] | None = None


_STATE = _State()
_OWNED: set[str] = set()


# ------------------------------------------------------------------------------------------------
# Coordinator
# ------------------------------------------------------------------------------------------------


def _on_stop(signum: int, frame) -> None:
    if _STATE.stop_signum is not None:
        return  # the run is already cleaning up after the first one
    _STATE.stop_signum = signum
    raise Interrupted(signum)


def stop_signal_received(signum: int) -> Interrupted:
    """The :class:`Interrupted` to raise when a stop signal is noticed indirectly (a worker ended by
    it); recorded as if the coordinator had received it."""
    if _STATE.stop_signum is None:
        _STATE.stop_signum = int(signum)
    return Interrupted(signum)


def _on_drain(signum: int, frame) -> None:
    _STATE.drain = True


@contextlib.contextmanager
def coordinator_signals() -> Iterator[None]:
    """Install the coordinator's handlers for the duration of a run; the previous handlers are
    restored afterwards. Does nothing outside the main thread (Python allows handlers only there)."""
    reset()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, DRAIN_SIGNAL)}
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop)
    signal.signal(DRAIN_SIGNAL, _on_drain)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def reset() -> None:
    """Forget the signals of an earlier run in this process."""
    _STATE.stop_signum, _STATE.drain, _STATE.drained, _STATE.left_pending = None, False, False, 0


def interrupt_status(exc: BaseException | None = None) -> int:
    """``128 + signum`` of the stop signal that interrupted the run (130 for a plain Ctrl-C)."""
    signum = getattr(exc, "signum", None) or _STATE.stop_signum or signal.SIGINT
    return 128 + int(signum)


def drain_requested() -> bool:
    """True once SIGUSR1 was received: start no new item."""
    return _STATE.drain


def left_pending(n: int) -> None:
    """A stage stopped by the drain left ``n`` items pending (for :func:`stop_after_stage`)."""
    _STATE.left_pending += int(n)


def stop_after_stage(last: bool) -> bool:
    """Whether the runner stops after the stage that just ended: a drain was requested and either
    later stages remain or the stage left items pending. Marks the run drained."""
    if _STATE.drain and (not last or _STATE.left_pending):
        _STATE.drained = True
    return _STATE.drained


def drained() -> bool:
    """True when a drain stopped the run before everything was done (exit :data:`EXIT_DRAINED`)."""
    return _STATE.drained


# ------------------------------------------------------------------------------------------------
# Files a worker owns (its staging files), removed when it is stopped
# ------------------------------------------------------------------------------------------------


def own(path: str | Path) -> None:
    """Remember that this process is writing ``path`` (removed by :func:`remove_owned`)."""
    _OWNED.add(str(path))


def disown(path: str | Path) -> None:
    """``path`` was published or removed: no longer this process's."""
    _OWNED.discard(str(path))


def remove_owned() -> None:
    """Delete every file this process still owns (best effort; called on a stop signal)."""
    for p in list(_OWNED):
        with contextlib.suppress(OSError):
            os.unlink(p)
        _OWNED.discard(p)


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), and
    leave at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(128 + signal.SIGKILL)


_CHILD_BLOCKED = {signal.SIGINT, signal.SIGHUP, DRAIN_SIGNAL}


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """Block SIGINT, SIGHUP and SIGUSR1 while child processes are started: a child inherits the
    mask, so one that receives them (Slurm signals every process of the job step) before it has
    installed its own handlers does not die of them; :func:`pool_worker_signals` unblocks them."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_term(signum: int, frame) -> None:
    remove_owned()
    os._exit(128 + signum)


def pool_worker_signals(parent_pid: int | None) -> None:
    """Signals of a local pool worker: SIGINT, SIGHUP and SIGUSR1 are the coordinator's business and
    ignored; SIGTERM removes the worker's staging files and exits with 143; the worker dies with its
    coordinator."""
    for s in _CHILD_BLOCKED:
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_term)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _CHILD_BLOCKED)  # see spawning()
    die_with_parent(parent_pid)


def _rank_stop(signum: int, frame) -> None:
    if _STATE.stop_signum is not None:  # a second signal, e.g. the launcher ending the rank
        os._exit(128 + signum)
    _STATE.stop_signum = signum
    if not _STATE.in_collective:
        _park(signum)


@contextlib.contextmanager
def collective_step() -> Iterator[None]:
    """Around a collective step on a rank other than 0: rank 0 waits in the same collective and can
    act on a signal only once it is over, so a stop signal parks this rank after the step."""
    _STATE.in_collective = True
    try:
        yield
    finally:
        _STATE.in_collective = False
        if _STATE.stop_signum is not None:
            _park(_STATE.stop_signum)


def _park(signum: int) -> None:
    remove_owned()
    deadline = time.monotonic() + PARK_S
    while time.monotonic() < deadline:  # rank 0 got the signal too and will end every rank
        if _STATE.while_parked is not None:
            _STATE.while_parked()  # returns only while rank 0 has not ended the run
        time.sleep(0.05)
    os._exit(128 + signum)


def rank_signals(while_parked: Callable[[], None] | None = None) -> None:
    """Signals of MPI ranks 1…N−1: SIGUSR1 is ignored (rank 0 drains); a stop signal removes the
    rank's staging files and parks it until rank 0 ends the run (for at most :data:`PARK_S`), so
    that the rank's death cannot make the launcher end rank 0 before it returned the jobs.

    Parameters
    ----------
    while_parked : callable, optional
        Called about every 50 ms while the rank is parked; it ends the process when rank 0 has ended
        the run (and returns otherwise).
    """
    _STATE.while_parked = while_parked
    signal.signal(DRAIN_SIGNAL, signal.SIG_IGN)
    for s in STOP_SIGNALS:
        signal.signal(s, _rank_stop)


__all__ = [
    "DRAIN_SIGNAL",
    "EXIT_DRAINED",
    "STOP_SIGNALS",
    "Interrupted",
    "collective_step",
    "coordinator_signals",
    "die_with_parent",
    "disown",
    "drain_requested",
    "drained",
    "interrupt_status",
    "left_pending",
    "own",
    "pool_worker_signals",
    "rank_signals",
    "remove_owned",
    "reset",
    "spawning",
    "stop_after_stage",
    "stop_signal_received",
]
