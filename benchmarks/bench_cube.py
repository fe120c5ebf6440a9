"""B9 — RRL cube accumulation: the Cython ``bin_cube`` kernel against NumPy
(docs/mapmaking.md#velocity-regridding-and-accumulation).

Input: one segment as the cube reader sees it at full resolution: n = 30 000 samples (600 s at
50 Hz) of a 45-channel window (``rrl-fullres``: ±420 km/s at 18.75 km/s), 2 % NaN samples, channel
weights with three zero-weight channels, a fractional grid offset (every input channel splits
between two output channels), 45 output channels and 400 hit pixels visited in raster order.

Baseline: the same sums in NumPy: the deposits as a dense (n_win, n_v) matrix ``A = F ∘ w``, the
per-sample sums ``Y₀ A``, ``M A`` and ``M A²`` (``Y₀`` the data with NaN → 0, ``M`` the finite
mask) by BLAS, then ``np.add.at`` into the per-pixel accumulators. Outputs agree to 1e-12 relative.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import Result, median, peak_rss_during, speedup, time_interleaved

ID = "B9"
TITLE = "RRL cube accumulation bin_cube (30 000 samples x 45 channels -> 45 velocity channels)"

N_SAMPLES = 30_000
N_WIN = 45
N_V = 45
N_PIX = 400


def make_segment(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 0.24, (N_SAMPLES, N_WIN)).astype(np.float32)
    y[rng.random(N_SAMPLES) < 0.02, :] = np.nan
    w = np.full(N_WIN, 1.0 / 0.24**2)
    w[[3, 17, 30]] = 0.0
    u = np.arange(N_WIN) + 0.37  # fractional offset: two deposits per channel
    j_lo = np.floor(u).astype(np.int32)
    f_lo = 1.0 - (u - j_lo)
    pixels = ((np.arange(N_SAMPLES) // 75) % N_PIX).astype(np.int32)
    return {"y": y, "w": w, "j_lo": j_lo, "f_lo": f_lo, "pixels": pixels}


def ours(seg: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    from utils.kernels.cube_ops import bin_cube

    acc = [np.zeros((N_PIX, N_V)) for _ in range(3)]
    touched = np.zeros(N_SAMPLES, dtype=np.uint8)
    bin_cube(seg["y"], seg["pixels"], seg["w"], seg["j_lo"], seg["f_lo"], *acc, touched)
    return (*acc, touched)


def numpy_reference(seg: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    n_win = seg["w"].size
    f = np.zeros((n_win, N_V))
    k = np.arange(n_win)
    for j, frac in ((seg["j_lo"], seg["f_lo"]), (seg["j_lo"] + 1, 1.0 - seg["f_lo"])):
        ok = (j >= 0) & (j < N_V) & (frac > 0)
        f[k[ok], j[ok]] = frac[ok]
    a = f * seg["w"][:, None]
    finite = np.isfinite(seg["y"])
    y0 = np.where(finite, seg["y"], 0.0)
    m = finite.astype(np.float64)
    s, wt, q = y0 @ a, m @ a, m @ (f * a)
    acc = [np.zeros((N_PIX, N_V)) for _ in range(3)]
    for out, val in zip(acc, (s, wt, q)):
        np.add.at(out, seg["pixels"], val)
    touched = (wt > 0).any(axis=1).astype(np.uint8)
    return (*acc, touched)


def run(args: argparse.Namespace) -> list[Result]:
    seg = make_segment()
    a, b = ours(seg), numpy_reference(seg)
    same = all(np.allclose(x, y, rtol=1e-12, atol=1e-9) for x, y in zip(a[:3], b[:3])) and np.array_equal(
        a[3], b[3]
    )
    t = time_interleaved({"ours": lambda: ours(seg), "numpy": lambda: numpy_reference(seg)}, args.repeat)
    o, base = median(t["ours"]), median(t["numpy"])
    _, rss_ours = peak_rss_during(lambda: ours(seg))
    _, rss_base = peak_rss_during(lambda: numpy_reference(seg))
    n = N_SAMPLES * N_WIN
    return [
        Result(
            ID,
            f"bin_cube, {N_SAMPLES} samples x {N_WIN} channels -> {N_V} x {N_PIX} pixels",
            o,
            base,
            ratio=speedup(o, base),
            notes=(
                f"same sums as NumPy: {'yes' if same else 'NO'}; {1e9 * o / n:.2f} vs {1e9 * base / n:.2f} "
                f"ns per sample-channel; peak RSS +{rss_ours / 2**20:.0f} MB (ours, accumulators only) "
                f"vs +{rss_base / 2**20:.0f} MB (NumPy temporaries)"
            ),
            passed=None if same else False,
            extra={"times_ours_s": t["ours"], "times_baseline_s": t["numpy"]},
        )
    ]
