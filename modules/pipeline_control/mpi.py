"""Running under MPI: one coordinator, every rank a worker (docs/operations.md#running-under-mpi).

``mpiexec -n N python run.py CONFIG`` (or ``--mpi``) starts N copies of the runner. Rank 0 runs the
pipeline exactly as a serial run does: it validates the configs, owns the log file and is the only
process that writes to the database. Ranks 1…N−1 enter :func:`serve`, a loop that waits for rank 0's
commands:

* ``start`` / ``task`` / ``end`` — a **dynamic queue** of independent items (level-2 observations, the
  file reads of a map job). :class:`MPIExecutor` is rank 0's side; it has the interface of the local
  executors (:mod:`modules.pipeline_control.executors`), so a stage has one code path. Rank 0 works
  too: its own share runs in one local worker process (the coordinator stays responsive and a crash
  in an observation cannot take the coordinator down), so N ranks give N workers.
* ``call`` — a **collective** step in which every rank takes part (a distributed map: each rank reads
  its share of the observations and the destriper combines them with ``Allreduce``).
* ``stop`` — the run is over; the rank returns.

Every rank's log records are forwarded to rank 0, which writes them to the run's log. Each rank runs
one OpenMP/BLAS thread unless ``OMP_NUM_THREADS`` says otherwise, so N ranks on N cores do not
oversubscribe them.

Waiting is done by polling with a short sleep rather than in blocking MPI calls: MPICH's blocking
receive spins, and an idle rank would take a core from the ranks that work.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from modules.pipeline_control.executors import LocalPoolExecutor, PoolInitError, TaskOutcome, _map_unordered
from modules.pipeline_control.signals import collective_step, rank_signals

log = logging.getLogger("comap.mpi")

TAG_COMMAND, TAG_RESULT, TAG_LOG, TAG_STOPPED = 101, 102, 103, 104
POLL_S = 0.002
"""Sleep between two polls of a waiting rank, s (docs/operations.md#running-under-mpi)."""
STOP_GRACE_S = 10.0
"""How long rank 0 waits for every rank to confirm ``stop`` before it ends them with
``MPI_Abort``, s (docs/reliability.md#signals)."""
RELAY_S = 0.5
"""Pause before ``MPI_Abort``, s: the launcher kills its proxies on an abort, and rank 0's last
console lines must reach mpiexec's output first."""

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def launcher_size() -> int:
    """Number of ranks announced by the launcher's environment (1 when not under ``mpiexec``)."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        try:
            value = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if value >= 1:
            return value
    return 1


def threads_per_rank() -> int:
    """OpenMP/BLAS threads of one rank: ``OMP_NUM_THREADS`` when the user set it, else 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return 1


@dataclass
class MPIWorld:
    """The communicator of an MPI run and this process's place in it.

    Attributes
    ----------
    comm : mpi4py.MPI.Comm
        ``COMM_WORLD``.
    rank, size : int
    n_threads : int
        OpenMP/BLAS threads per rank.
    log_handlers : list of logging.Handler
        Rank 0: where forwarded records go (the run's console and file handlers).
    """

    comm: Any
    rank: int
    size: int
    n_threads: int = 1
    log_handlers: list[logging.Handler] = field(default_factory=list)
    _stopped: bool | None = field(default=None, init=False, repr=False)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    # --- rank 0 ---------------------------------------------------------------------------------
    def broadcast_command(self, *message: Any) -> None:
        for rank in range(1, self.size):
            self.comm.send(message, dest=rank, tag=TAG_COMMAND)

    def drain_logs(self) -> None:
        """Write the log records other ranks have sent so far (rank 0)."""
        status = self._status()
        while self.comm.Iprobe(source=self._any_source(), tag=TAG_LOG, status=status):
            record = self.comm.recv(source=status.Get_source(), tag=TAG_LOG)
            for handler in self.log_handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def executor(self, *, log_queue: Any = None, log_level: int = logging.INFO) -> MPIExecutor:
        """A dynamic queue over the ranks (:class:`MPIExecutor`)."""
        return MPIExecutor(self, log_queue=log_queue, log_level=log_level)

    def collective(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(world, *args)`` on every rank (rank 0 included) and return rank 0's value.

        ``fn`` must take part in the same collectives on every rank and agree on failures (a rank that
        raised while the others wait in a collective would hang the run)."""
        self.broadcast_command("call", fn, args)
        try:
            return fn(self, *args)
        finally:
            self.drain_logs()

    def stop(self, grace_s: float = STOP_GRACE_S) -> bool:
        """Tell every other rank that the run is over and wait for each to confirm (rank 0).

        Idle ranks and ranks parked by a stop signal confirm at once and then finalise MPI, so the run
        ends in order: the launcher relays everything rank 0 printed, and its exit status is rank 0's.

        Returns
        -------
        bool
            True when every rank confirmed within ``grace_s`` seconds (a rank still inside an
            observation does not); idempotent.
        """
        if self._stopped is not None:
            return self._stopped
        self.broadcast_command("stop")
        waiting = set(range(1, self.size))
        deadline = time.monotonic() + grace_s
        while waiting and time.monotonic() < deadline:
            got = self.poll(TAG_STOPPED)
            if got is None:
                self.drain_logs()
                time.sleep(POLL_S)
            else:
                waiting.discard(got[0])
        self.drain_logs()
        if waiting:
            log.error("MPI rank(s) %s did not stop within %.0f s", sorted(waiting), grace_s)
        self._stopped = not waiting
        return self._stopped

    def end(self, status: int) -> None:
        """End the other ranks at the end of the run (rank 0): in order when they all confirm
        :meth:`stop`, else with :meth:`abort`."""
        if not self.stop():
            self.abort(status)

    def abort(self, status: int) -> None:  # pragma: no cover - ends the process
        """End every rank at once (rank 0, when a rank does not answer)."""
        self.drain_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(RELAY_S)
        self.comm.Abort(status)

    # --- polling helpers --------------------------------------------------------------------------
    def _status(self):
        from mpi4py import MPI

        return MPI.Status()

    @staticmethod
    def _any_source() -> int:
        from mpi4py import MPI

        return MPI.ANY_SOURCE

    def receive(self, source: int, tag: int) -> tuple[int, Any]:
        """Wait (polling) for a message with ``tag`` from ``source`` (or any); return (source, message)."""
        status = self._status()
        while not self.comm.Iprobe(source=source, tag=tag, status=status):
            if self.is_coordinator:
                self.drain_logs()
            time.sleep(POLL_S)
        src = status.Get_source()
        return src, self.comm.recv(source=src, tag=tag)

    def poll(self, tag: int) -> tuple[int, Any] | None:
        """A waiting message with ``tag`` from any rank, or None."""
        status = self._status()
        if not self.comm.Iprobe(source=self._any_source(), tag=tag, status=status):
            return None
        src = status.Get_source()
        return src, self.comm.recv(source=src, tag=tag)


def start_mpi() -> MPIWorld:
    """Initialise MPI (``from mpi4py import MPI``), limit every rank's threads and return the world.

    Raises
    ------
    ImportError, RuntimeError
        ``mpi4py`` or an MPI library is missing.
    """
    n_threads = threads_per_rank()
    for var in _THREAD_VARIABLES:
        os.environ[var] = str(n_threads)
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n_threads)
    comm = MPI.COMM_WORLD
    return MPIWorld(comm, int(comm.Get_rank()), int(comm.Get_size()), n_threads)


# ------------------------------------------------------------------------------------------------
# Ranks 1…N−1
# ------------------------------------------------------------------------------------------------


class _ForwardHandler(logging.Handler):
    """Sends every record of this rank to rank 0 (formatted, so that it pickles)."""

    def __init__(self, world: MPIWorld) -> None:
        super().__init__()
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.msg = f"[rank {self.world.rank}] {record.getMessage()}"
            record.args = None
            record.exc_info = None
            self.world.comm.send(record, dest=0, tag=TAG_LOG)
        except Exception:  # pragma: no cover - logging must never break the work
            self.handleError(record)


def _forward_logs(world: MPIWorld, level: int) -> None:
    from modules.pipeline_control.logging_setup import ObsidFilter

    root = logging.getLogger("comap")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    root.propagate = False
    handler = _ForwardHandler(world)
    handler.addFilter(ObsidFilter())
    root.addHandler(handler)


def _error_payload(exc: BaseException) -> tuple[str, str, str]:
    return type(exc).__name__, str(exc), traceback.format_exc()


def _leave_when_stopped(world: MPIWorld) -> None:
    """A rank parked by a stop signal: once rank 0's ``stop`` arrived, confirm it, finalise MPI and
    exit 0 (the run's status is rank 0's); return otherwise. Other commands are dropped: rank 0 sends
    nothing but ``end`` and ``stop`` to an interrupted run."""
    status = world._status()
    while world.comm.Iprobe(source=0, tag=TAG_COMMAND, status=status):
        if world.comm.recv(source=0, tag=TAG_COMMAND)[0] == "stop":
            world.comm.send(world.rank, dest=0, tag=TAG_STOPPED)
            from mpi4py import MPI

            MPI.Finalize()
            sys.stdout.flush()
            sys.stderr.flush()
            # The interrupted observation's frames are abandoned (its staging file is gone), so no
            # unwinding; but libc's exit, not os._exit: without MPICH's exit handlers the launcher
            # loses rank 0's later output and exit status (measured with mpich 4).
            ctypes.CDLL(None).exit(0)


def serve(world: MPIWorld, log_level: int = logging.INFO) -> int:
    """The loop of ranks 1…N−1: run rank 0's commands until ``stop``; returns the exit status (0).

    Rank 0 handles the signals the launcher forwards to every rank (docs/reliability.md#signals): it
    returns the claimed jobs to pending and ends every rank. Here SIGUSR1 is ignored, and a stop
    signal only removes this rank's staging files and waits for rank 0's ``stop``."""
    rank_signals(lambda: _leave_when_stopped(world))
    _forward_logs(world, log_level)
    fn: Callable[[Any], Any] | None = None
    while True:
        _src, message = world.receive(0, TAG_COMMAND)
        kind, payload = message[0], message[1:]
        if kind == "start":
            fn, initializer, initargs = payload
            try:
                if initializer is not None:
                    initializer(*initargs)
            except Exception as exc:
                world.comm.send(("__init_error__", False, _error_payload(exc)), dest=0, tag=TAG_RESULT)
                fn = None
            else:
                world.comm.send(("__ready__", True, world.rank), dest=0, tag=TAG_RESULT)
        elif kind == "task":
            key, item = payload
            try:
                assert fn is not None, "task before start"
                reply = (key, True, fn(item))
            except Exception as exc:
                reply = (key, False, _error_payload(exc))
            world.comm.send(reply, dest=0, tag=TAG_RESULT)
        elif kind == "end":
            fn = None
        elif kind == "call":
            func, args = payload
            try:
                with collective_step():  # docs/reliability.md#signals
                    func(world, *args)
            except Exception as exc:
                # straight to stderr too: rank 0 may be waiting in a collective and not reading logs
                print(
                    f"rank {world.rank}: collective step {getattr(func, '__name__', func)} failed: "
                    f"{type(exc).__name__}: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
                logging.getLogger("comap.mpi").exception("collective step failed on rank %d", world.rank)
        elif kind == "stop":
            world.comm.send(world.rank, dest=0, tag=TAG_STOPPED)
            return 0
        else:  # pragma: no cover - protocol error
            raise RuntimeError(f"unknown MPI command {kind!r}")


# ------------------------------------------------------------------------------------------------
# Rank 0: the dynamic queue
# ------------------------------------------------------------------------------------------------


class MPIExecutor:
    """A dynamic queue over the ranks (rank 0's local worker process included).

    Same interface as :class:`~modules.pipeline_control.executors.LocalPoolExecutor`: ``start``,
    ``free_slots``, ``submit``, ``wait``, ``shutdown``, ``map_unordered``. An item that raises on a
    rank comes back as a failed :class:`TaskOutcome`; the rank goes on with the next one.
    """

    def __init__(self, world: MPIWorld, *, log_queue: Any = None, log_level: int = logging.INFO) -> None:
        self.world = world
        self.n_workers = world.size
        self.local = LocalPoolExecutor(1, log_queue=log_queue, log_level=log_level, n_threads=world.n_threads)
        self._busy: dict[int, tuple[Any, Any]] = {}
        self._done: list[TaskOutcome] = []
        self._started = False

    def start(
        self, fn: Callable[[Any], Any], *, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
    ) -> None:
        self.world.broadcast_command("start", fn, initializer, initargs)
        self._started = True
        self.local.start(fn, initializer=initializer, initargs=initargs)
        errors = []
        for _ in range(1, self.world.size):
            _src, (key, ok, payload) = self.world.receive(self.world._any_source(), TAG_RESULT)
            if key == "__init_error__":
                errors.append(f"{payload[0]}: {payload[1]}")
        if errors:
            self.shutdown()
            raise PoolInitError(f"worker initialisation failed on a rank: {errors[0]}")

    def free_slots(self) -> int:
        return (self.world.size - 1 - len(self._busy)) + self.local.free_slots()

    def in_flight(self) -> int:
        return len(self._busy) + self.local.in_flight() + len(self._done)

    def submit(self, key: Any, item: Any) -> None:
        for rank in range(1, self.world.size):
            if rank not in self._busy:
                self._busy[rank] = (key, item)
                self.world.comm.send(("task", key, item), dest=rank, tag=TAG_COMMAND)
                return
        self.local.submit(key, item)

    def wait(self) -> TaskOutcome:
        """Block until an item finishes on any rank and return its outcome."""
        while not self._done:
            if not self._busy and not self.local.in_flight():
                raise RuntimeError("wait() called with nothing in flight")
            self.world.drain_logs()
            got = self.world.poll(TAG_RESULT)
            if got is not None:
                rank, (key, ok, payload) = got
                _key, item = self._busy.pop(rank)
                if ok:
                    self._done.append(TaskOutcome(key, item, result=payload))
                else:
                    etype, msg, tb = payload
                    self._done.append(TaskOutcome(key, item, error=msg, error_type=etype, traceback=tb))
                continue
            if self.local.in_flight():
                outcome = self.local.wait(timeout=POLL_S)
                if outcome is not None:
                    self._done.append(outcome)
            else:
                time.sleep(POLL_S)
        return self._done.pop(0)

    def shutdown(self, *, terminate: bool = False) -> None:
        """End the queue on every rank; waits for items still running on other ranks unless
        ``terminate`` (the run is being interrupted and will be aborted)."""
        if not terminate:
            while self._busy:
                rank, (key, _ok, _payload) = self.world.receive(self.world._any_source(), TAG_RESULT)
                self._busy.pop(rank, None)
        if self._started:
            self.world.broadcast_command("end")
            self._started = False
        self.local.shutdown(terminate=terminate)
        self.world.drain_logs()

    def map_unordered(
        self, fn, items: Iterable[Any], *, initializer=None, initargs=()
    ) -> Iterator[TaskOutcome]:
        return _map_unordered(self, fn, items, initializer, initargs)


__all__ = ["MPIExecutor", "MPIWorld", "launcher_size", "serve", "start_mpi", "threads_per_rank"]
