"""Executors: run independent items (observations, files) serially or on a local process pool.

Both executors share one interface, so a stage has a single code path (docs/operations.md#executors)::

    ex = make_executor(nprocess, log_queue=..., log_level=...)
    ex.start(fn, initializer=init, initargs=(...))
    while work_left:
        while ex.free_slots() and ready_items:
            ex.submit(key, item)
        outcome = ex.wait()          # TaskOutcome(key, result | error | died)
    ex.shutdown()

``LocalPoolExecutor`` keeps a **dynamic queue**: at most ``nprocess`` items are in flight and the
caller submits the next as each completes. It manages its own ``spawn`` worker processes (rather
than ``concurrent.futures.ProcessPoolExecutor``) so that when a worker dies — killed by a signal or
the OOM killer — the coordinator knows exactly which item it was running and with which signal,
marks only that item failed, and starts a replacement worker. Workers are initialised once.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from modules.pipeline_control.signals import pool_worker_signals, spawning, stop_signal_received

log = logging.getLogger("comap.executors")


@dataclass
class TaskOutcome:
    """What happened to one submitted item."""

    key: Any
    item: Any
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    died: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.died is None


def death_message(exitcode: int | None) -> str:
    """The one-line reason for a worker that died (docs/operations.md#error-model)."""
    if exitcode is not None and exitcode < 0:
        return f"worker process died (signal {-exitcode}); possible out-of-memory"
    return f"worker process died (exit code {exitcode}); possible out-of-memory"


class SerialExecutor:
    """Runs items in this process, one at a time (``nprocess == 1``)."""

    n_workers = 1

    def __init__(self) -> None:
        self._fn: Callable[[Any], Any] | None = None
        self._queue: list[tuple[Any, Any]] = []

    def start(
        self, fn: Callable[[Any], Any], *, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
    ) -> None:
        self._fn = fn
        if initializer is not None:
            initializer(*initargs)

    def free_slots(self) -> int:
        return 0 if self._queue else 1

    def in_flight(self) -> int:
        return len(self._queue)

    def submit(self, key: Any, item: Any) -> None:
        self._queue.append((key, item))

    def wait(self) -> TaskOutcome:
        key, item = self._queue.pop(0)
        assert self._fn is not None
        try:
            return TaskOutcome(key, item, result=self._fn(item))
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            return TaskOutcome(
                key, item, error=str(exc), error_type=type(exc).__name__, traceback=traceback.format_exc()
            )

    def shutdown(self, *, terminate: bool = False) -> None:
        self._queue.clear()

    def map_unordered(
        self, fn, items: Iterable[Any], *, initializer=None, initargs=()
    ) -> Iterator[TaskOutcome]:
        return _map_unordered(self, fn, items, initializer, initargs)


# ------------------------------------------------------------------------------------------------
# Local process pool
# ------------------------------------------------------------------------------------------------


def _worker_main(conn, fn, initializer, initargs, log_queue, log_level, n_threads) -> None:
    """Entry point of a pool worker process (spawned). Signals: docs/reliability.md#signals."""
    parent = multiprocessing.parent_process()
    pool_worker_signals(parent.pid if parent is not None else None)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n_threads)
    from modules.pipeline_control.logging_setup import setup_worker_logging

    setup_worker_logging(log_queue, log_level)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=n_threads)
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:
        try:
            conn.send(("__init_error__", False, (type(exc).__name__, str(exc), traceback.format_exc())))
        finally:
            os._exit(1)
    conn.send(("__ready__", True, os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        key, item = msg
        try:
            result = fn(item)
        except BaseException as exc:
            reply = (key, False, (type(exc).__name__, str(exc), traceback.format_exc()))
        else:
            reply = (key, True, result)
        try:
            conn.send(reply)
        except OSError:  # the coordinator is gone (BrokenPipeError): nobody to report to
            os._exit(1)
    conn.close()


class _Worker:
    def __init__(self, process, conn) -> None:
        self.process = process
        self.conn = conn
        self.task: tuple[Any, Any] | None = None
        self.ready = False


class PoolInitError(RuntimeError):
    """A worker failed to initialise (e.g. a module could not be instantiated)."""


class LocalPoolExecutor:
    """A dynamic-queue pool of ``nprocess`` spawned worker processes."""

    def __init__(
        self,
        nprocess: int,
        *,
        log_queue: Any = None,
        log_level: int = logging.INFO,
        n_threads: int | None = None,
    ) -> None:
        self.n_workers = max(1, int(nprocess))
        self.log_queue = log_queue
        self.log_level = log_level
        cores = os.cpu_count() or 1
        self.n_threads = n_threads or max(1, cores // self.n_workers)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._fn = None
        self._initializer = None
        self._initargs: tuple = ()
        self._done: list[TaskOutcome] = []

    # --- lifecycle ------------------------------------------------------------------------------
    def start(
        self, fn: Callable[[Any], Any], *, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
    ) -> None:
        self._fn, self._initializer, self._initargs = fn, initializer, initargs
        for _ in range(self.n_workers):
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(
                child,
                self._fn,
                self._initializer,
                self._initargs,
                self.log_queue,
                self.log_level,
                self.n_threads,
            ),
            daemon=True,
        )
        with spawning():  # docs/reliability.md#signals
            proc.start()
        child.close()
        return _Worker(proc, parent)

    def shutdown(self, *, terminate: bool = False) -> None:
        """Stop the workers: politely, or with SIGTERM (their staging files are removed)."""
        for w in self._workers:
            if terminate and w.process.is_alive():
                w.process.terminate()
            else:
                try:
                    w.conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
        for w in self._workers:
            w.process.join(timeout=30)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=5)
            w.conn.close()
        self._workers.clear()

    # --- scheduling -----------------------------------------------------------------------------
    def free_slots(self) -> int:
        return sum(1 for w in self._workers if w.task is None)

    def in_flight(self) -> int:
        return sum(1 for w in self._workers if w.task is not None) + len(self._done)

    def submit(self, key: Any, item: Any) -> None:
        for w in self._workers:
            if w.task is None:
                w.task = (key, item)
                w.conn.send((key, item))
                return
        raise RuntimeError("no free worker; call wait() first")

    def wait(self, timeout: float | None = None) -> TaskOutcome | None:
        """Block until an item finishes (or its worker dies) and return its outcome; with ``timeout``
        (s), None when nothing finished in that time."""
        while not self._done:
            if not any(w.task is not None for w in self._workers):
                raise RuntimeError("wait() called with nothing in flight")
            waitables: dict[Any, _Worker] = {}
            for w in self._workers:
                waitables[w.conn] = w
                waitables[w.process.sentinel] = w
            ready = multiprocessing.connection.wait(list(waitables), timeout=timeout)
            if not ready and timeout is not None:
                return None
            handled: set[int] = set()
            for obj in ready:
                w = waitables[obj]
                if id(w) in handled:
                    continue
                if obj is w.conn or w.conn.poll():
                    try:
                        key, ok, payload = w.conn.recv()
                    except (EOFError, OSError):
                        key, ok, payload = None, None, None
                    if key is not None:
                        handled.add(id(w))
                        self._handle_message(w, key, ok, payload)
                        continue
                if not w.process.is_alive():
                    handled.add(id(w))
                    self._handle_death(w)
        return self._done.pop(0)

    def _handle_message(self, w: _Worker, key: Any, ok: bool, payload: Any) -> None:
        if key == "__ready__":
            w.ready = True
            return
        if key == "__init_error__":
            etype, msg, tb = payload
            log.debug("worker initialisation traceback:\n%s", tb)
            self.shutdown(terminate=True)
            raise PoolInitError(f"worker initialisation failed: {etype}: {msg}")
        task = w.task
        w.task = None
        item = task[1] if task else None
        if ok:
            self._done.append(TaskOutcome(key, item, result=payload))
        else:
            etype, msg, tb = payload
            self._done.append(TaskOutcome(key, item, error=msg, error_type=etype, traceback=tb))

    def _handle_death(self, w: _Worker) -> None:
        w.process.join(timeout=5)
        code = w.process.exitcode
        try:
            w.conn.close()
        except OSError:
            pass
        self._workers.remove(w)
        if code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            # stopped by SIGTERM that this coordinator did not send (Slurm or systemd signal the whole
            # process group): the run is being stopped, not the item failing (docs/reliability.md#signals)
            raise stop_signal_received(signal.SIGTERM)
        if w.task is not None:
            key, item = w.task
            log.debug("worker pid %s died with exit code %s while running %r", w.process.pid, code, key)
            self._done.append(TaskOutcome(key, item, died=death_message(code)))
        elif not w.ready:
            self.shutdown(terminate=True)
            raise PoolInitError(f"a worker process died during start-up ({death_message(code)})")
        self._workers.append(self._spawn())

    def map_unordered(
        self, fn, items: Iterable[Any], *, initializer=None, initargs=()
    ) -> Iterator[TaskOutcome]:
        return _map_unordered(self, fn, items, initializer, initargs)


def _map_unordered(ex, fn, items, initializer, initargs) -> Iterator[TaskOutcome]:
    """Convenience loop: submit items as slots free up and yield outcomes as they arrive."""
    ex.start(fn, initializer=initializer, initargs=initargs)
    it = iter(enumerate(items))
    exhausted = False
    try:
        while True:
            while not exhausted and ex.free_slots():
                try:
                    key, item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                ex.submit(key, item)
            if ex.in_flight() == 0:
                break
            yield ex.wait()
    finally:
        ex.shutdown(terminate=sys.exc_info()[0] is not None)


def make_executor(nprocess: int, *, log_queue: Any = None, log_level: int = logging.INFO, world: Any = None):
    """``MPIExecutor`` over the ranks of an MPI run of more than one rank (``world``; ``nprocess`` is then
    ignored: N ranks give N workers), else ``SerialExecutor`` for ``nprocess == 1`` and a
    ``LocalPoolExecutor`` for more."""
    if world is not None and world.size > 1:
        return world.executor(log_queue=log_queue, log_level=log_level)
    if int(nprocess) <= 1:
        return SerialExecutor()
    return LocalPoolExecutor(nprocess, log_queue=log_queue, log_level=log_level)


def mpi_requested(flag: bool = False) -> bool:
    """True when MPI mode is detected from the launcher environment or forced with ``--mpi``
    (docs/operations.md#running-under-mpi)."""
    if flag:
        return True
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return "PMIX_RANK" in os.environ
