"""Executors: dynamic queue, exact attribution of a worker that dies, initialisation once
(docs/operations.md#parallel-and-distributed-execution)."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from modules.pipeline_control.executors import (
    LocalPoolExecutor,
    PoolInitError,
    SerialExecutor,
    death_message,
    mpi_requested,
)

_INIT_COUNT = {"n": 0}


def _init(tag):
    _INIT_COUNT["n"] += 1
    os.environ["COMAP_TEST_INIT_TAG"] = f"{tag}-{os.getpid()}"


def _work(item):
    kind, value = item
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise ValueError(f"bad item {value}")
    if kind == "sleep":
        time.sleep(value)
    return (value * 2, os.environ.get("COMAP_TEST_INIT_TAG"), _INIT_COUNT["n"])


def _bad_init():
    raise RuntimeError("cannot load the bright-source map")


def _drain(ex, items):
    return {o.key: o for o in ex.map_unordered(_work, items, initializer=_init, initargs=("t",))}


def test_serial_executor_runs_in_process():
    out = _drain(SerialExecutor(), [("ok", 1), ("raise", 2), ("ok", 3)])
    assert out[0].ok and out[0].result[0] == 2
    assert not out[1].ok and out[1].error == "bad item 2" and out[1].error_type == "ValueError"
    assert out[2].result[0] == 6


def test_pool_results_and_errors():
    ex = LocalPoolExecutor(2)
    items = [("ok", i) for i in range(6)] + [("raise", 99)]
    out = _drain(ex, items)
    assert sorted(k for k, o in out.items() if o.ok) == list(range(6))
    assert [o.result[0] for k, o in sorted(out.items()) if o.ok] == [0, 2, 4, 6, 8, 10]
    assert out[6].error == "bad item 99" and "ValueError" in out[6].traceback
    # every worker initialised exactly once
    assert {o.result[2] for o in out.values() if o.ok} == {1}
    assert len({o.result[1] for o in out.values() if o.ok}) <= 2


def test_worker_death_is_attributed_to_its_item_and_the_pool_recovers():
    ex = LocalPoolExecutor(2)
    items = [("sleep", 0.2), ("kill", 0), ("ok", 5), ("sleep", 0.1), ("ok", 7)]
    out = _drain(ex, items)
    assert out[1].died == death_message(-signal.SIGKILL)
    assert "signal 9" in out[1].died
    for k in (0, 2, 3, 4):
        assert out[k].ok, out[k]


def test_dynamic_queue_keeps_at_most_n_in_flight():
    ex = LocalPoolExecutor(2)
    ex.start(_work, initializer=_init, initargs=("q",))
    try:
        ex.submit("a", ("sleep", 0.3))
        ex.submit("b", ("ok", 1))
        assert ex.free_slots() == 0
        with pytest.raises(RuntimeError):
            ex.submit("c", ("ok", 2))
        first = ex.wait()
        assert first.key == "b"
        assert ex.free_slots() == 1
        ex.submit("c", ("ok", 2))
        keys = {ex.wait().key, ex.wait().key}
        assert keys == {"a", "c"}
    finally:
        ex.shutdown()


def test_initialiser_failure_is_reported():
    ex = LocalPoolExecutor(2)
    with pytest.raises(PoolInitError, match="cannot load the bright-source map"):
        list(ex.map_unordered(_work, [("ok", 1)], initializer=_bad_init))


def test_mpi_detection(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert not mpi_requested()
    assert mpi_requested(True)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert mpi_requested()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert not mpi_requested()
    monkeypatch.setenv("PMIX_RANK", "0")
    assert mpi_requested()


def test_a_worker_traceback_reaches_the_log_file_but_not_the_console():
    """A record logged with exc_info in a worker crosses the queue with its traceback in ``exc_text``:
    the file handler writes it, the console handler prints one line without it
    (docs/operations.md#logging)."""
    import io
    import pickle
    import queue

    from modules.pipeline_control.logging_setup import _ConsoleFormatter, _ObsidQueueHandler, _UTCFormatter

    q: queue.Queue = queue.Queue()
    handler = _ObsidQueueHandler(q)
    logger = logging.getLogger("comap.test_worker_traceback")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError("injected failure")
        except RuntimeError:
            logger.error("Fragile: %s", "RuntimeError: injected failure", exc_info=True)
    finally:
        logger.removeHandler(handler)
    record = pickle.loads(pickle.dumps(q.get_nowait()))  # what crosses the process boundary
    console = _ConsoleFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert console == "ERROR comap.test_worker_traceback: Fragile: RuntimeError: injected failure"
    in_file = _UTCFormatter("%(message)s").format(record)
    assert in_file.startswith("Fragile: RuntimeError: injected failure\nTraceback (most recent call last):")
    assert io.StringIO(in_file).read().count("RuntimeError: injected failure") == 2
