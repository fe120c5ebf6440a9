"""B4 — destriper cost per iteration (docs/operations.md#performance-targets).

Input (synthetic, made here): a fixed 200 × 200-pixel map (40 000 pixels, the compressed hit set)
scanned by cross-linked raster sweeps, alternately along x and y, in segments of 10 000 samples
(200 s at 50 Hz); sky = broad Gaussians + compact sources sampled at pixel centres; noise =
white (σ = 1 mK) + 1/f (f_knee = 1 Hz, α = −1.5) made by shaping white noise in Fourier space;
1 % of the samples flagged (w = 0). n = 1, 2, 4, 8 × 10⁶ samples; L = 100.

Rows
----
* ``destripe`` wall time / n_iter at each n (default thread count), with ``tol = 1e-6``; the
  median over ``--repeat`` runs. The log-log slope of the per-iteration time against n is the B4
  target, [0.9, 1.1].
* The same operator ``A a = Fᵀ W Z F a`` (pass 1: bin ``w a_j(t)`` into a map, pass 2: read it back
  per offset) written in pure NumPy with ``np.bincount`` and a stored per-sample offset index —
  the baseline — against one application of ours, timed interleaved at every n: the ratio is
  reported (issue C).
* Per-iteration cost with one thread at the largest n (does the OpenMP ``prange`` help?).
* Memory: peak RSS increase during ``destripe`` divided by n (the inputs, 16 bytes per sample,
  exist before the call and are not counted), and the same for the NumPy operator.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks import Result, median, peak_rss_during, time_interleaved
from modules.MapMaking.destriper import _offset_starts, _Operator, _SerialComm, destripe
from utils.kernels import destriper_ops

ID = "B4"
TITLE = "destriper cost per iteration at n = 1, 2, 4, 8 x 10^6 samples (fixed 200x200 map, L = 100)"

SIZES = (1_000_000, 2_000_000, 4_000_000, 8_000_000)
NX = NY = 200
FS_HZ = 50.0
SIGMA_K = 1e-3
SEGMENT = 10_000
OFFSET_LENGTH = 100
TOL = 1e-6
SLOPE_RANGE = (0.9, 1.1)


def one_over_f(n: int, fknee: float, alpha: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """1/f part of the noise, PSD σ² (f/f_knee)^α, by shaping white noise in Fourier space."""
    f = np.fft.rfftfreq(n, 1.0 / FS_HZ)
    shape = np.zeros_like(f)
    shape[1:] = (f[1:] / fknee) ** alpha
    return sigma * np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * np.sqrt(shape), n)


def truth_map(nx: int = NX, ny: int = NY, seed: int = 11) -> np.ndarray:
    """Broad Gaussians + compact sources (K), flattened (ny·nx,)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:ny, 0:nx]
    truth = np.zeros((ny, nx))
    for _ in range(6):
        cx, cy, s, a = (
            rng.uniform(0, nx),
            rng.uniform(0, ny),
            rng.uniform(nx / 10, nx / 4),
            rng.uniform(2e-3, 6e-3),
        )
        truth += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    for _ in range(12):
        cx, cy, a = rng.uniform(3, nx - 3), rng.uniform(3, ny - 3), rng.uniform(5e-3, 3e-2)
        truth += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.5**2))
    return truth.ravel()


def simulate(n: int, nx: int = NX, ny: int = NY, seed: int = 4, segment: int = SEGMENT) -> dict:
    """Cross-linked raster TOD of ``n`` samples on an ``nx × ny`` map.

    Returns a dict with ``tod``, ``weights`` (float32), ``pixels`` (int32), ``segment_starts``,
    ``truth``, ``n_pixels`` and the pointing ``x``/``y`` in pixel units (float32).
    """
    rng = np.random.default_rng(seed)
    truth = truth_map(nx, ny)
    n_seg = -(-n // segment)
    starts = np.arange(n_seg, dtype=np.int64) * segment
    x = np.empty(n, np.float32)
    y = np.empty(n, np.float32)
    for k, s in enumerate(starts):
        ln = min(segment, n - s)
        t = np.arange(ln)
        tri = np.abs(((t / (1.2 * nx) + rng.uniform(0, 2)) % 2) - 1) * (nx - 1)  # 1.2 samples/pixel
        slow = (t / ln) * (ny - 1) + rng.uniform(-0.5, 0.5)
        x[s : s + ln], y[s : s + ln] = (tri, slow) if k % 2 == 0 else (slow, tri)
    x += rng.normal(0, 0.4, n).astype(np.float32)
    y += rng.normal(0, 0.4, n).astype(np.float32)
    ix = np.clip(np.floor(x + 0.5), 0, nx - 1).astype(np.int32)
    iy = np.clip(np.floor(y + 0.5), 0, ny - 1).astype(np.int32)
    pixels = iy * nx + ix
    del ix, iy
    tod = truth[pixels]
    tod += SIGMA_K * rng.standard_normal(n)
    tod += one_over_f(n, 1.0, -1.5, SIGMA_K, rng)
    weights = np.full(n, 1.0 / SIGMA_K**2, np.float32)
    weights[rng.random(n) < 0.01] = 0
    return {
        "tod": tod.astype(np.float32),
        "weights": weights,
        "pixels": pixels.astype(np.int32),
        "segment_starts": starts,
        "truth": truth,
        "n_pixels": nx * ny,
        "x": x,
        "y": y,
    }


class NumpyOperator:
    """The destriper operator ``A a = Fᵀ W Z F a`` in pure NumPy (``np.bincount``), the B4 baseline.

    Uses a stored int64 per-sample offset index (8 bytes per sample) and per-sample float64
    temporaries, as a straightforward NumPy implementation does.
    """

    def __init__(self, pixels: np.ndarray, weights: np.ndarray, offset_starts: np.ndarray, n_pixels: int):
        self.n_off = offset_starts.size - 1
        self.j = np.repeat(np.arange(self.n_off), np.diff(offset_starts))
        self.pixels = np.where(pixels >= 0, pixels, 0)
        self.w = np.where(pixels >= 0, weights, 0).astype(np.float64)
        self.n_pixels = n_pixels
        hit = np.bincount(self.pixels, self.w, minlength=n_pixels)
        self.inv_m = np.divide(1.0, hit, out=np.zeros(n_pixels), where=hit > 0)
        self.wsum_off = np.bincount(self.j, self.w, minlength=self.n_off)

    def __call__(self, a: np.ndarray) -> np.ndarray:
        s = np.bincount(self.pixels, self.w * a[self.j], minlength=self.n_pixels) * self.inv_m
        return self.wsum_off * a - np.bincount(self.j, self.w * s[self.pixels], minlength=self.n_off)


def _time_operators(
    sim: dict, ostarts: np.ndarray, a: np.ndarray, threads: int, repeat: int
) -> tuple[float, float, float, float]:
    """Median time of one ``A a`` (ours, NumPy), their max relative difference, and the NumPy
    operator's peak traced allocation (setup + one application) in bytes."""
    ours_op = _Operator(
        sim["pixels"], sim["weights"], ostarts, sim["n_pixels"], 0.5, 0.0, _SerialComm(), threads
    )
    out = np.empty_like(a)

    def numpy_setup_and_apply():
        np_op = NumpyOperator(sim["pixels"], sim["weights"], ostarts, sim["n_pixels"])
        return np_op, np_op(a)

    traced_np = _traced_peak(numpy_setup_and_apply)
    np_op, y_np = numpy_setup_and_apply()
    ours_op(a, out)
    agree = float(np.max(np.abs(out - y_np)) / np.max(np.abs(y_np)))
    times = time_interleaved({"ours": lambda: ours_op(a, out), "numpy": lambda: np_op(a)}, repeat=repeat)
    return median(times["ours"]), median(times["numpy"]), agree, traced_np


def _traced_peak(func) -> float:
    """Peak of the memory allocated (tracemalloc, which sees NumPy's buffers) while ``func`` runs,
    in bytes above the level at the call."""
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = func()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return float(peak - base)


def _slope(ns: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def _call(sim: dict, **kw):
    return destripe(
        sim["tod"], sim["pixels"], sim["weights"], OFFSET_LENGTH, sim["n_pixels"], tol=TOL,
        segment_starts=sim["segment_starts"], **kw,
    )  # fmt: skip


def run(args: argparse.Namespace) -> list[Result]:
    repeat = max(1, int(args.repeat))
    threads = int(destriper_ops.max_threads())
    results: list[Result] = []
    sims = {}
    first = {}
    rss = {}
    for n in SIZES:
        sim = simulate(n)
        del sim["x"], sim["y"]
        sims[n] = sim
        first[n], rss[n] = peak_rss_during(lambda sim=sim: _call(sim))  # also the warm-up
    # All sizes timed in alternating order, round after round, so that the load of other users
    # of the shared machine hits every size alike (the slope is a ratio between sizes).
    walls: dict[int, list[float]] = {n: [] for n in SIZES}
    walls1: dict[int, list[float]] = {n: [] for n in SIZES}
    for r in range(repeat):
        for n in SIZES if r % 2 == 0 else tuple(reversed(SIZES)):
            for nt, store in ((threads, walls), (1, walls1)):
                with threadpool_limits(nt, user_api="openmp"):
                    t0 = time.perf_counter()
                    res = _call(sims[n])
                    store[n].append(time.perf_counter() - t0)
                assert res.n_iter == first[n].n_iter
    per_iter = [median(walls[n]) / first[n].n_iter for n in SIZES]
    per_iter1 = [median(walls1[n]) / first[n].n_iter for n in SIZES]
    traced = {n: _traced_peak(lambda sim=sims[n]: _call(sim)) for n in SIZES}

    op_ours: list[float] = []
    op_numpy: list[float] = []
    extra_rows: dict[int, dict] = {}
    for k, n in enumerate(SIZES):
        sim, res = sims[n], first[n]
        ostarts = _offset_starts(sim["segment_starts"], n, OFFSET_LENGTH)
        a = np.random.default_rng(0).normal(size=ostarts.size - 1)
        op_t, op_n, agree, rss_np = _time_operators(sim, ostarts, a, threads, repeat)
        op_ours.append(op_t)
        op_numpy.append(op_n)
        extra_rows[n] = {
            "n_iter": res.n_iter,
            "status": res.status,
            "destripe_wall_s": walls[n],
            "rss_increase_bytes": rss[n],
            "numpy_operator_traced_bytes": rss_np,
            "operator_max_rel_diff": agree,
            "min_hits": int(res.hits.min()),
        }
        results.append(
            Result(
                ID,
                f"destripe per iteration, n = {n / 1e6:.0f}e6, {threads} thread(s)",
                per_iter[k] * 1e3,
                op_n * 1e3,
                units="ms",
                ratio=op_n / op_t,
                ratio_label="numpy A.a / ours A.a",
                notes=(
                    f"n_iter {res.n_iter} ({res.status}); wall {median(walls[n]):.3f} s; one A.a: ours "
                    f"{op_t * 1e3:.2f} ms vs numpy {op_n * 1e3:.1f} ms "
                    f"(max rel diff {agree:.1e})"
                ),
                extra=extra_rows[n],
            )
        )
    last_sim = sims[SIZES[-1]]
    for n in SIZES[:-1]:
        del sims[n]

    slope = _slope(list(SIZES), per_iter)
    slope1 = _slope(list(SIZES), per_iter1)
    lo, hi = SLOPE_RANGE
    results.append(
        Result(
            ID,
            f"log-log slope of per-iteration time vs n (1-8e6), {threads} thread(s)",
            slope,
            None,
            units="",
            target=f"in [{lo}, {hi}]",
            passed=bool(lo <= slope <= hi),
            notes="per-iteration ms: " + ", ".join(f"{t * 1e3:.2f}" for t in per_iter),
            extra={"per_iteration_s": per_iter, "sizes": list(SIZES)},
        )
    )
    results.append(
        Result(
            ID,
            "log-log slope of per-iteration time vs n (1-8e6), 1 thread",
            slope1,
            None,
            units="",
            target=f"in [{lo}, {hi}]",
            passed=bool(lo <= slope1 <= hi),
            notes="per-iteration ms: " + ", ".join(f"{t * 1e3:.2f}" for t in per_iter1),
            extra={"per_iteration_s": per_iter1, "sizes": list(SIZES)},
        )
    )
    op_slope = _slope(list(SIZES), op_ours)
    results.append(
        Result(
            ID,
            "one A.a application, ours vs pure NumPy (median ratio over n)",
            float(np.median(op_ours)) * 1e3,
            float(np.median(op_numpy)) * 1e3,
            units="ms",
            ratio=float(np.median(np.array(op_numpy) / np.array(op_ours))),
            notes=f"ratios per n: {', '.join(f'{b / o:.1f}' for o, b in zip(op_ours, op_numpy))}; "
            f"slope of ours {op_slope:.3f}",
            extra={"ours_s": op_ours, "numpy_s": op_numpy},
        )
    )

    # threads: one vs default at the largest n
    if threads > 1 and last_sim is not None:
        sim = last_sim

        def call(sim=sim):
            return _call(sim)

        def one_thread():
            with threadpool_limits(1, user_api="openmp"):
                return call()

        t = time_interleaved({"1": one_thread, "n": call}, repeat=repeat)
        n_iter = call().n_iter
        t1, tn = median(t["1"]) / n_iter, median(t["n"]) / n_iter
        results.append(
            Result(
                ID,
                f"destripe per iteration, n = {SIZES[-1] / 1e6:.0f}e6: {threads} threads vs 1",
                tn * 1e3,
                t1 * 1e3,
                units="ms",
                ratio=t1 / tn,
                ratio_label="1 thread / n threads",
                notes="baseline column = 1 thread",
            )
        )

    mem = [traced[n] / n for n in SIZES]
    np_mem = [extra_rows[n]["numpy_operator_traced_bytes"] / n for n in SIZES]
    results.append(
        Result(
            ID,
            "destripe working memory per sample (peak traced allocations / n; inputs not counted)",
            max(mem),
            max(np_mem),
            units="B/sample",
            ratio=None,
            notes="per n: "
            + ", ".join(f"{m:.2f}" for m in mem)
            + "; baseline column = NumPy operator (setup + one A.a); peak RSS increase of the first call: "
            + ", ".join(f"{rss[n] / n:.2f}" for n in SIZES),
            extra={"traced_peak_bytes": traced, "rss_increase_bytes": rss},
        )
    )
    return results
