"""Benchmark harness of comap-reduce (docs/operations.md#performance-targets): shared types and measurement
helpers.

``python -m benchmarks.run`` imports every ``benchmarks/bench_*.py`` module. A module declares

* ``ID``: the benchmark number of docs/operations.md#performance-targets, e.g. ``"B1"``;
* ``TITLE``: one line;
* ``run(args) -> list[Result]``: builds its inputs under ``args.workdir`` (a temporary directory
  the runner deletes unless ``--keep``), measures our code and its baseline **in the same run**,
  and returns one :class:`Result` per row of the table. ``args.repeat`` is the number of timed
  repetitions (the figure reported is their median).

Helpers: :func:`time_interleaved` (ours and baseline alternate, so slow drifts of a shared
machine hit both), :func:`peak_rss_during` (peak resident memory of a call, sampled with psutil)
and :func:`machine_info`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Result", "machine_info", "peak_rss_during", "speedup", "time_interleaved"]


@dataclass
class Result:
    """One row of the benchmark table.

    Attributes
    ----------
    benchmark : str
        Benchmark id, e.g. ``"B1"``.
    metric : str
        What is measured, e.g. ``"running_median (8, 1e6), W=3000, 2 threads"``.
    ours, baseline : float or None
        Measured values in ``units`` (medians over the repeats for timings).
    units : str
        Units of ``ours`` and ``baseline``, e.g. ``"s"``, ``"ns/sample"``, ``"MB"``.
    ratio : float or None
        The figure the target is about, defined by the benchmark (for timings: the speed-up
        baseline / ours); ``ratio_label`` says which.
    target : str
        Human-readable target, e.g. ``">= 1.5x faster, identical"``; ``"-"`` when informative.
    passed : bool or None
        Whether the target is met; None when there is no target.
    notes : str
        Anything else worth keeping (identity check, peak memory, thread count ...).
    """

    benchmark: str
    metric: str
    ours: float | None
    baseline: float | None
    units: str = "s"
    ratio: float | None = None
    ratio_label: str = "baseline/ours"
    target: str = "-"
    passed: bool | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def speedup(ours: float | None, baseline: float | None) -> float | None:
    """``baseline / ours`` (how many times faster we are), None if undefined."""
    if ours is None or baseline is None or ours <= 0:
        return None
    return baseline / ours


def time_interleaved(
    funcs: dict[str, Callable[[], object]], repeat: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock times of several callables, run alternately.

    Parameters
    ----------
    funcs : dict of name -> zero-argument callable
    repeat : int
        Timed runs of each callable. Round r runs them in order, round r+1 in reverse order, so
        neither always runs first.
    warmup : int
        Untimed runs of each callable first (page faults, caches, lazy imports).

    Returns
    -------
    dict of name -> list of float
        Seconds per run; take :func:`statistics.median`.
    """
    names = list(funcs)
    for _ in range(warmup):
        for name in names:
            funcs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            funcs[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_during(func: Callable[[], object], interval_s: float = 0.002) -> tuple[object, float]:
    """Run ``func`` and return (its result, peak RSS increase in bytes while it ran).

    RSS is sampled with psutil every ``interval_s`` from a helper thread (the kernels release the
    GIL, so the sampler keeps running). The increase is relative to the RSS just before the call.
    """
    import psutil

    proc = psutil.Process()
    start = proc.memory_info().rss
    peak = start
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = func()
    finally:
        stop.set()
        thread.join()
    peak = max(peak, proc.memory_info().rss)
    return result, float(peak - start)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM, load, library versions, date and code revision."""
    import numpy
    import psutil
    import scipy

    try:
        from utils.kernels import median_filter as _mk

        openmp = bool(_mk.have_openmp())
        omp_threads = int(_mk.max_threads())
    except ImportError:  # kernels not built
        openmp, omp_threads = False, 0
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "cores_available": affinity,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "kernels_openmp": openmp,
        "openmp_max_threads": omp_threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "git_revision": _git_revision(),
        "ru_maxrss_mb_at_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
