"""B1 — running median, NaN-aware running median and running mean (docs/operations.md#performance-targets,
docs/operations.md#measurement-details).

Inputs: float64 Gaussian samples of shape (8, 10^6) (seed 1) and a copy with 2 % NaN, written to
the run's temporary directory and read back.

Rows
----
* ``running_median(x, 3000)`` with 2 threads against ``scipy.ndimage.median_filter(row,
  size=3000, mode='nearest')`` row by row (SciPy's fast 1-D path). Target: >= 1.5x faster and
  bit-identical outputs (checked here, on every element).
* The same with 1 thread, and in float32; a single row at W = 3000 and at W = 50 (the
  NoiseStatsLevel2 default), 1 thread: informative, they document where SciPy would win.
* ``running_median_nan(x_nan, 3000)`` on the whole array (2 threads) against
  ``scipy.ndimage.generic_filter(row, numpy.nanmedian, size=3000, mode='nearest')`` on a
  10^4-sample subset; per-sample times are compared. Target >= 100x. The mode is 'nearest'
  (instead of the default 'reflect') so that the subset's outputs can be checked for identity;
  the cost per sample does not depend on the mode.
* ``running_mean(x, 3000)`` against ``scipy.ndimage.uniform_filter1d(row, 3000,
  mode='nearest')``: informative, with the largest difference relative to the data scale.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage

from benchmarks import Result, median, peak_rss_during, speedup, time_interleaved
from utils.filters import running_mean, running_median, running_median_nan

ID = "B1"
TITLE = "running median / NaN-aware median / running mean, (8, 10^6) float64, W = 3000"

SHAPE = (8, 1_000_000)
WINDOW = 3000
NAN_FRACTION = 0.02
SUBSET = 10_000
SMALL_WINDOW = 50
SEED = 1
TARGET_SPEEDUP = 1.5
TARGET_NAN_SPEEDUP = 100.0


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    uint = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(np.ascontiguousarray(a).view(uint), np.ascontiguousarray(b).view(uint)))


def _scipy_median_rows(x: np.ndarray, window: int) -> np.ndarray:
    return np.stack([ndimage.median_filter(row, size=window, mode="nearest") for row in x])


def _scipy_mean_rows(x: np.ndarray, window: int) -> np.ndarray:
    return np.stack([ndimage.uniform_filter1d(row, window, mode="nearest") for row in x])


def _make_inputs(workdir) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(SHAPE)
    x_nan = x.copy()
    x_nan[rng.random(SHAPE) < NAN_FRACTION] = np.nan
    np.save(workdir / "b1_gauss.npy", x)
    np.save(workdir / "b1_gauss_nan.npy", x_nan)
    del x, x_nan
    return np.load(workdir / "b1_gauss.npy"), np.load(workdir / "b1_gauss_nan.npy")


def _median_rows(args: argparse.Namespace, x: np.ndarray) -> list[Result]:
    results: list[Result] = []
    n_samples = x.size
    x32 = x.astype(np.float32)
    row = x[0]

    # Outputs once (this is also the warm-up), identity checked on every element.
    ours2 = running_median(x, WINDOW, n_threads=2)
    ours1 = running_median(x, WINDOW, n_threads=1)
    base = _scipy_median_rows(x, WINDOW)
    same2, same1 = _bits_equal(ours2, base), _bits_equal(ours1, base)
    same32 = _bits_equal(running_median(x32, WINDOW, n_threads=2), _scipy_median_rows(x32, WINDOW))
    same_row_small = _bits_equal(
        running_median(row, SMALL_WINDOW, n_threads=1), _scipy_median_rows(row[None], SMALL_WINDOW)[0]
    )
    del ours1, base

    _, rss_ours = peak_rss_during(lambda: running_median(x, WINDOW, n_threads=2))
    _, rss_base = peak_rss_during(lambda: _scipy_median_rows(x, WINDOW))

    t = time_interleaved(
        {
            "ours2": lambda: running_median(x, WINDOW, n_threads=2),
            "ours1": lambda: running_median(x, WINDOW, n_threads=1),
            "scipy": lambda: _scipy_median_rows(x, WINDOW),
        },
        args.repeat,
        warmup=0,
    )
    t32 = time_interleaved(
        {
            "ours2": lambda: running_median(x32, WINDOW, n_threads=2),
            "scipy": lambda: _scipy_median_rows(x32, WINDOW),
        },
        args.repeat,
        warmup=1,
    )
    t_row = time_interleaved(
        {
            "ours": lambda: running_median(row, WINDOW, n_threads=1),
            "scipy": lambda: ndimage.median_filter(row, size=WINDOW, mode="nearest"),
            "ours_small": lambda: running_median(row, SMALL_WINDOW, n_threads=1),
            "scipy_small": lambda: ndimage.median_filter(row, size=SMALL_WINDOW, mode="nearest"),
        },
        args.repeat,
        warmup=1,
    )
    o2, o1, b = median(t["ours2"]), median(t["ours1"]), median(t["scipy"])
    r2 = speedup(o2, b)
    results.append(
        Result(
            ID,
            f"running_median {SHAPE} W={WINDOW}, 2 threads",
            o2,
            b,
            ratio=r2,
            target=f">= {TARGET_SPEEDUP}x, identical",
            passed=bool(r2 is not None and r2 >= TARGET_SPEEDUP and same2),
            notes=(
                f"outputs bit-identical to SciPy: {'yes' if same2 else 'NO'}; "
                f"{1e9 * o2 / n_samples:.1f} vs {1e9 * b / n_samples:.1f} ns/sample; peak RSS "
                f"+{rss_ours / 2**20:.0f} MB (ours) vs +{rss_base / 2**20:.0f} MB (SciPy), output "
                f"{ours2.nbytes / 2**20:.0f} MB"
            ),
            extra={"times_ours_s": t["ours2"], "times_baseline_s": t["scipy"]},
        )
    )
    results.append(
        Result(
            ID,
            f"running_median {SHAPE} W={WINDOW}, 1 thread",
            o1,
            b,
            ratio=speedup(o1, b),
            notes=f"identical: {'yes' if same1 else 'NO'}",
            passed=None if same1 else False,
            extra={"times_ours_s": t["ours1"], "times_baseline_s": t["scipy"]},
        )
    )
    o32, b32 = median(t32["ours2"]), median(t32["scipy"])
    results.append(
        Result(
            ID,
            f"running_median float32 {SHAPE} W={WINDOW}, 2 threads",
            o32,
            b32,
            ratio=speedup(o32, b32),
            notes=f"identical: {'yes' if same32 else 'NO'}",
            passed=None if same32 else False,
        )
    )
    orow, brow = median(t_row["ours"]), median(t_row["scipy"])
    results.append(
        Result(
            ID, f"running_median 1 row of 1e6, W={WINDOW}, 1 thread", orow, brow, ratio=speedup(orow, brow)
        )
    )
    osm, bsm = median(t_row["ours_small"]), median(t_row["scipy_small"])
    results.append(
        Result(
            ID,
            f"running_median 1 row of 1e6, W={SMALL_WINDOW}, 1 thread",
            osm,
            bsm,
            ratio=speedup(osm, bsm),
            notes=f"identical: {'yes' if same_row_small else 'NO'}; small windows are SciPy's best case",
            passed=None if same_row_small else False,
        )
    )
    return results


def _nan_rows(args: argparse.Namespace, x_nan: np.ndarray) -> list[Result]:
    subset = np.ascontiguousarray(x_nan[0, :SUBSET])

    def baseline() -> np.ndarray:
        return ndimage.generic_filter(subset, np.nanmedian, size=WINDOW, mode="nearest")

    same = _bits_equal(running_median_nan(subset, WINDOW, n_threads=1), baseline())
    running_median_nan(x_nan, WINDOW, n_threads=2)  # warm-up
    t = time_interleaved(
        {
            "ours2": lambda: running_median_nan(x_nan, WINDOW, n_threads=2),
            "ours1": lambda: running_median_nan(x_nan, WINDOW, n_threads=1),
            "generic_filter": baseline,
        },
        min(args.repeat, 3),
        warmup=0,
    )
    per_ours2 = 1e9 * median(t["ours2"]) / x_nan.size
    per_ours1 = 1e9 * median(t["ours1"]) / x_nan.size
    per_base = 1e9 * median(t["generic_filter"]) / SUBSET
    ratio = speedup(per_ours2, per_base)
    return [
        Result(
            ID,
            f"running_median_nan {SHAPE}, {NAN_FRACTION:.0%} NaN, 2 threads",
            per_ours2,
            per_base,
            units="ns/sample",
            ratio=ratio,
            target=f">= {TARGET_NAN_SPEEDUP:.0f}x per sample",
            passed=bool(ratio is not None and ratio >= TARGET_NAN_SPEEDUP and same),
            notes=(
                f"baseline generic_filter(nanmedian, size={WINDOW}) on {SUBSET} samples; outputs "
                f"on that subset bit-identical: {'yes' if same else 'NO'}; ours on all "
                f"{x_nan.size:.0e} samples ({median(t['ours2']):.3f} s)"
            ),
        ),
        Result(
            ID,
            f"running_median_nan {SHAPE}, {NAN_FRACTION:.0%} NaN, 1 thread",
            per_ours1,
            per_base,
            units="ns/sample",
            ratio=speedup(per_ours1, per_base),
        ),
    ]


def _mean_rows(args: argparse.Namespace, x: np.ndarray) -> list[Result]:
    ours = running_mean(x, WINDOW, n_threads=2)
    base = _scipy_mean_rows(x, WINDOW)
    max_rel = float(np.max(np.abs(ours - base)) / np.max(np.abs(x)))
    del ours, base
    t = time_interleaved(
        {
            "ours2": lambda: running_mean(x, WINDOW, n_threads=2),
            "ours1": lambda: running_mean(x, WINDOW, n_threads=1),
            "scipy": lambda: _scipy_mean_rows(x, WINDOW),
        },
        args.repeat,
        warmup=0,
    )
    o2, o1, b = median(t["ours2"]), median(t["ours1"]), median(t["scipy"])
    ok = max_rel <= 1e-6
    return [
        Result(
            ID,
            f"running_mean {SHAPE} W={WINDOW}, 2 threads",
            o2,
            b,
            ratio=speedup(o2, b),
            passed=None if ok else False,
            notes=f"baseline uniform_filter1d row by row; max |ours - SciPy| / max|x| = {max_rel:.1e}",
        ),
        Result(ID, f"running_mean {SHAPE} W={WINDOW}, 1 thread", o1, b, ratio=speedup(o1, b)),
    ]


def run(args: argparse.Namespace) -> list[Result]:
    """Measure B1; see the module docstring."""
    x, x_nan = _make_inputs(args.workdir)
    return [*_median_rows(args, x), *_nan_rows(args, x_nan), *_mean_rows(args, x)]
