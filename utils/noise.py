"""Noise estimators: pair-difference rms, log-binned periodograms and 1/f fits
(docs/level2.md#noisestatslevel1, docs/level2.md#noisestatslevel2).

Public API
----------
``pair_differences(x)``, ``count_valid_pairs(x)``, ``pair_difference_rms(x, estimator=...)``
    White-noise rms per sample from differences of consecutive sample pairs
    ``δ_j = x[2j+1] − x[2j]`` (NoiseStatsLevel1, PostBinCleaning, CalibratorFitting).
``difference_rms(x, order=6)``, ``clipped_std_rows(d)``
    Sky-robust white-noise rms from finite differences of order 6 (NoiseStatsLevel2), and the
    sigma clipping iterated to convergence that both estimators use.
``nanmedian_rows(x)``, ``interpolate_bad(x, good)``
    Vectorised helpers along the last axis (no Python loop over rows).
``log_binned_periodogram(y, sample_rate_hz, n_bins)``
    ``P_k = |rfft(y − median y)_k|² / N`` for k = 1 … ⌊N/2⌋, averaged in log-spaced frequency bins.
``fit_one_over_f(f_hz, p_mean, counts, ...) -> OneOverFFit``
    Fit of ``σ_red² |f/f_ref|^α + σ_white²`` to a log-binned periodogram, unbiased in ln P.
``segment_noise_stats(x, sample_rate_hz, ...) -> SegmentNoiseStats``
    The per-segment algorithm of NoiseStatsLevel2 (docs/level2.md#noisestatslevel2 steps 1–8) for many
    segments of equal length at once.

Conventions
-----------
Every function works along the last axis (or ``axis``) and is vectorised over all leading axes:
there are no Python loops over channels or samples (the 1/f fit, a non-linear least-squares
problem, is the only per-segment loop). Accumulations are float64. NaN marks a missing sample on
input and "no value" on output; no function here emits a RuntimeWarning for empty or all-NaN rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares
from scipy.special import digamma

from utils.filters import running_median_nan
from utils.kernels import block_stats as _block_stats
from utils.kernels import median_filter as _median_kernel

__all__ = [
    "ESTIMATORS",
    "MAD_TO_SIGMA",
    "OneOverFFit",
    "SegmentNoiseStats",
    "clipped_std_rows",
    "count_valid_pairs",
    "difference_rms",
    "fill_bad_samples",
    "fit_one_over_f",
    "interpolate_bad",
    "log_binned_periodogram",
    "log_mean_bias",
    "nanmedian_rows",
    "one_over_f_model",
    "pair_difference_rms",
    "pair_differences",
    "segment_noise_stats",
]

ESTIMATORS: tuple[str, ...] = ("std", "clipped_std", "mad")
MAD_TO_SIGMA: float = 1.4826
"""Median absolute deviation → standard deviation of a Gaussian (1/Φ⁻¹(3/4))."""

LN_SIGMA_BOUNDS: tuple[float, float] = (-30.0, 10.0)
"""Bounds of ln σ_white and ln σ_red in the 1/f fit (docs/level2.md#noisestatslevel2 step 7)."""

_CHUNK_ELEMENTS = 1 << 22
"""Rows are processed in chunks of about this many float64 elements (32 MB) to bound memory."""


# ==================================================================================================
# Helpers
# ==================================================================================================
def _rows(x: ArrayLike, axis: int) -> tuple[NDArray, tuple[int, ...]]:
    """``x`` with ``axis`` moved last and the leading axes flattened: ``(R, n)`` and the lead shape."""
    a = np.asarray(x)
    if a.ndim == 0:
        raise ValueError("expected an array with at least one dimension")
    a = np.moveaxis(a, axis, -1)
    lead = a.shape[:-1]
    return a.reshape(math.prod(lead), a.shape[-1]), lead


def _row_chunks(n_rows: int, row_length: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(1, row_length))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)] or [slice(0, 0)]


def pair_differences(x: ArrayLike, *, axis: int = -1) -> NDArray[np.float64]:
    """Differences of consecutive sample pairs, ``δ_j = x[2j+1] − x[2j]`` for j < ⌊n/2⌋.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples (any units); NaN marks missing samples.
    axis : int
        Time axis.

    Returns
    -------
    ndarray, shape (..., n // 2) float64
        Pair differences along the last axis (``axis`` is moved last), NaN where either sample of
        the pair is not finite.
    """
    a = np.moveaxis(np.asarray(x), axis, -1)
    m = a.shape[-1] // 2
    d = a[..., 1 : 2 * m : 2].astype(np.float64) - a[..., 0 : 2 * m : 2]
    d[~np.isfinite(d)] = np.nan
    return d


def count_valid_pairs(x: ArrayLike, *, axis: int = -1) -> NDArray[np.int64]:
    """Number of pairs ``(x[2j], x[2j+1])`` with both samples finite.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
    axis : int
        Time axis.

    Returns
    -------
    ndarray of int64, shape of x without ``axis``
    """
    a = np.moveaxis(np.asarray(x), axis, -1)
    m = a.shape[-1] // 2
    ok = np.isfinite(a[..., 0 : 2 * m : 2]) & np.isfinite(a[..., 1 : 2 * m : 2])
    return ok.sum(axis=-1, dtype=np.int64)


def _masked_mean_std(d: NDArray, keep: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """Mean, sample standard deviation (ddof = 1) and count of ``d`` over ``keep``, per row."""
    n = keep.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(keep, d, 0.0).sum(axis=-1) / n
        dev = np.where(keep, d - mean[:, None], 0.0)
        std = np.sqrt((dev * dev).sum(axis=-1) / (n - 1))
    std = np.where(n >= 2, std, np.nan)
    return mean, std, n


CLIP_MAX_ITERATIONS: int = 50
"""Sigma clipping stops after this many passes if the kept set still changes."""

DIFFERENCE_ORDER: int = 6
"""Order k of the finite differences of :func:`difference_rms` (docs/level2.md#sky-free-white-noise)."""


def clipped_std_rows(d: NDArray, *, clip_sigma: float = 5.0) -> NDArray[np.float64]:
    """Sigma-clipped standard deviation of each row of ``d``, iterated to convergence.

    The first clip is centred on the row's median with the MAD scale (``1.4826·MAD``), so a
    bright transient cannot inflate the first threshold and hold the clip open; then the mean and
    standard deviation (``ddof = 1``) of the kept values set the next clip, until the kept set no
    longer changes (at most :data:`CLIP_MAX_ITERATIONS` passes). ``≤`` keeps constant rows at 0.

    Parameters
    ----------
    d : ndarray, shape (R, m)
        Values per row; NaN = missing.
    clip_sigma : float
        Threshold in units of the current standard deviation.

    Returns
    -------
    ndarray, shape (R,) float64
        NaN for rows with fewer than two finite values.
    """
    d = np.asarray(d, dtype=np.float64)
    valid = np.isfinite(d)
    centre = nanmedian_rows(d)
    scale = MAD_TO_SIGMA * nanmedian_rows(np.abs(d - centre[:, None]))
    # A row whose MAD is 0 (over half its values equal) starts from its plain standard deviation.
    _m, plain, _n = _masked_mean_std(d, valid)
    scale = np.where(scale > 0, scale, plain)
    keep = valid
    std = plain
    for _ in range(CLIP_MAX_ITERATIONS):
        with np.errstate(invalid="ignore"):
            new_keep = valid & (np.abs(d - centre[:, None]) <= clip_sigma * scale[:, None])
        centre, std, _k = _masked_mean_std(d, new_keep)
        scale = std
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return std


def difference_rms(
    x: ArrayLike,
    *,
    axis: int = -1,
    order: int = DIFFERENCE_ORDER,
    clip_sigma: float = 5.0,
    min_values: int = 20,
) -> NDArray[np.float64]:
    """White-noise rms per sample from overlapping finite differences of order ``order``, robust to
    sky signal (docs/level2.md#sky-free-white-noise).

    ``Δᵏx_t = Σ_j (−1)^(k−j) C(k, j) x_{t+j}`` has variance ``C(2k, k)·σ²`` for white noise σ,
    while a signal that is smooth on the scale of a few samples (the sky seen through the beam)
    is suppressed by ``(2 sin(πf/f_s))^k`` in amplitude. Pair differences (k = 1) let the sky's
    gradient through: in scans across a bright Galactic field they overestimate σ by 2–3×; k = 6
    leaves the estimate within its statistical scatter of the truth. The differences are
    overlapping (all ``n − k`` of them), so no sample is wasted; their correlation does not bias
    the variance. Outliers are removed by :func:`clipped_std_rows`.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples (any units); NaN marks missing samples (a difference touching one is dropped).
    axis : int
        Time axis.
    order : int
        k >= 1; k = 1 uses every consecutive difference (not only disjoint pairs).
    clip_sigma : float
        Clipping threshold in units of the current std.
    min_values : int
        Rows with fewer finite differences give NaN.

    Returns
    -------
    ndarray, shape of x without ``axis``, float64
        rms per sample, in the units of x.
    """
    if int(order) < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if not clip_sigma > 0:
        raise ValueError(f"clip_sigma must be > 0, got {clip_sigma}")
    k = int(order)
    rows, lead = _rows(x, axis)
    out = np.full(rows.shape[0], np.nan)
    if rows.shape[1] <= k:
        return out.reshape(lead)
    norm = math.sqrt(math.comb(2 * k, k))
    for sl in _row_chunks(rows.shape[0], rows.shape[1]):
        d = np.diff(rows[sl].astype(np.float64), n=k, axis=-1) / norm
        d[~np.isfinite(d)] = np.nan
        n = np.isfinite(d).sum(axis=-1)
        s = clipped_std_rows(d, clip_sigma=clip_sigma)
        out[sl] = np.where(n >= max(int(min_values), 2), s, np.nan)
    return out.reshape(lead)


def nanmedian_rows(x: ArrayLike, *, axis: int = -1) -> NDArray:
    """Median of the finite values along ``axis``; NaN (without a warning) where there are none.

    Same values as ``numpy.nanmedian`` (mean of the two middle values for an even count; only the
    sign of a zero median may differ when +0.0 and -0.0 tie at the middle rank). float64 rows go
    through a windowed selection per row in :mod:`utils.kernels.block_stats`, rows in parallel;
    float32 rows are sorted (vectorised over rows, not numpy's per-row loop).

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
    axis : int

    Returns
    -------
    ndarray, shape of x without ``axis``, float64 (float32 input keeps float32)
    """
    rows, lead = _rows(x, axis)
    dtype = np.float32 if rows.dtype == np.float32 else np.float64
    if dtype == np.float64:
        # 5-10x faster than sorting the rows; float32 keeps the sort, whose mean of the two middle
        # values is rounded in float32
        out = np.empty(rows.shape[0])
        _block_stats.nanmedian_rows(
            np.ascontiguousarray(rows, dtype=np.float64), out, max(1, int(_median_kernel.max_threads()))
        )
        return out.reshape(lead)
    out = np.full(rows.shape[0], np.nan, dtype=dtype)
    n = rows.shape[1]
    for sl in _row_chunks(rows.shape[0], n):
        r = rows[sl].astype(dtype, copy=True)
        finite = np.isfinite(r)
        cnt = finite.sum(axis=-1)
        r[~finite] = np.inf
        r.sort(axis=-1)
        has = cnt > 0
        lo = np.clip((cnt - 1) // 2, 0, max(n - 1, 0))
        hi = np.clip(cnt // 2, 0, max(n - 1, 0))
        if n:
            a = np.take_along_axis(r, lo[:, None], axis=-1)[:, 0]
            b = np.take_along_axis(r, hi[:, None], axis=-1)[:, 0]
            med = np.where(lo == hi, a, (a + b) / dtype(2))
            out[sl] = np.where(has, med, np.nan)
    return out.reshape(lead)


def interpolate_bad(x: ArrayLike, good: ArrayLike, *, axis: int = -1) -> NDArray:
    """Replace samples where ``good`` is False by linear interpolation between good neighbours.

    Before the first (after the last) good sample of a row the first (last) good value is used;
    rows with no good sample become NaN. Vectorised over rows (no Python loop).

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples, any units.
    good : array_like of bool, broadcastable to x
        Samples to keep; they should be finite.
    axis : int
        Time axis.

    Returns
    -------
    ndarray, shape and dtype of x (integers give float64)
    """
    a = np.asarray(x)
    dtype = a.dtype if a.dtype.kind == "f" else np.dtype(np.float64)
    g = np.broadcast_to(np.asarray(good, dtype=bool), a.shape)
    rows, lead = _rows(a.astype(dtype, copy=False), axis)
    grows, _ = _rows(g, axis)
    n = rows.shape[1]
    out = np.empty(rows.shape, dtype=dtype)
    idx = np.arange(n)
    for sl in _row_chunks(rows.shape[0], n):
        r = rows[sl]
        gr = grows[sl] & np.isfinite(r)
        prev = np.maximum.accumulate(np.where(gr, idx, -1), axis=-1)
        nxt = np.minimum.accumulate(np.where(gr, idx, n)[:, ::-1], axis=-1)[:, ::-1]
        has_prev = prev >= 0
        has_next = nxt < n
        xp = np.take_along_axis(r, np.clip(prev, 0, n - 1), axis=-1).astype(np.float64)
        xn = np.take_along_axis(r, np.clip(nxt, 0, n - 1), axis=-1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            w = (idx - prev) / (nxt - prev)
            lin = xp + w * (xn - xp)
        filled = np.where(has_prev & has_next, lin, np.where(has_prev, xp, np.where(has_next, xn, np.nan)))
        out[sl] = np.where(gr, r, filled)
    return np.moveaxis(out.reshape(*lead, n), -1, axis)


# ==================================================================================================
# Pair-difference white-noise estimators (docs/level2.md#noisestatslevel1 step 2)
# ==================================================================================================
def pair_difference_rms(
    x: ArrayLike,
    *,
    axis: int = -1,
    estimator: str = "clipped_std",
    clip_sigma: float = 5.0,
    min_pairs: int = 10,
) -> NDArray[np.float64]:
    """White-noise rms per sample from pair differences ``δ_j = x[2j+1] − x[2j]``
    (docs/level2.md#noisestatslevel1).

    Only pairs with both samples finite are used. Differencing adjacent samples removes any
    signal that is smooth on the scale of one sample, and ``var(δ) = 2σ²`` for white noise σ.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples in any units (raw counts, K); NaN marks missing samples. Any float dtype; the
        differences and sums are float64.
    axis : int
        Time axis (default: last). All other axes are independent rows, e.g. ``(B, C, n) →
        (B, C)``.
    estimator : {'std', 'clipped_std', 'mad'}
        - ``'std'``: ``std(δ)/√2``;
        - ``'clipped_std'``: sigma clipping iterated to convergence (:func:`clipped_std_rows`),
          started from the median and the MAD so that a bright transient (a calibrator crossing)
          cannot hold the first clip open; ``s/√2`` is reported. The truncation bias for Gaussian
          noise at 5σ is below 1e-4 and ignored;
        - ``'mad'``: ``1.4826 · median|δ − median δ| / √2``.

        Standard deviations use ``ddof = 1`` (the mean of δ is estimated). ``≤`` instead of ``<``
        in the clip keeps noiseless (constant) rows at rms 0 rather than NaN.
    clip_sigma : float
        Clipping threshold of ``'clipped_std'`` in units of the current std.
    min_pairs : int
        Rows with fewer valid pairs give NaN.

    Returns
    -------
    ndarray, shape of x without ``axis``, float64
        rms per sample, in the units of x.

    Raises
    ------
    ValueError
        Unknown estimator or non-positive ``clip_sigma``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    if not clip_sigma > 0:
        raise ValueError(f"clip_sigma must be > 0, got {clip_sigma}")
    rows, lead = _rows(x, axis)
    m = rows.shape[1] // 2
    out = np.full(rows.shape[0], np.nan)
    for sl in _row_chunks(rows.shape[0], m):
        d = pair_differences(rows[sl])
        valid = np.isfinite(d)
        if estimator == "mad":
            med = nanmedian_rows(d)
            mad = nanmedian_rows(np.abs(d - med[:, None]))
            s = MAD_TO_SIGMA * mad
            n = valid.sum(axis=-1)
        else:
            if estimator == "clipped_std":
                s = clipped_std_rows(d, clip_sigma=clip_sigma)
                n = valid.sum(axis=-1)
            else:
                _mean, s, n = _masked_mean_std(d, valid)
        out[sl] = np.where(n >= max(int(min_pairs), 1), s / math.sqrt(2.0), np.nan)
    return out.reshape(lead)


# ==================================================================================================
# Periodogram and 1/f fit (docs/level2.md#noisestatslevel2 steps 5–8)
# ==================================================================================================
def log_binned_periodogram(
    y: ArrayLike, sample_rate_hz: float, n_bins: int, *, detrend: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Periodogram ``P_k = |rfft(y − median y)_k|²/N`` averaged in log-spaced frequency bins.

    ``P_k`` is taken for k = 1 … ⌊N/2⌋ at ``f_k = k f_s/N``; white noise of variance σ² gives
    ``E[P_k] = σ²``, and a process of one-sided PSD S(f) gives ``E[P_k] = f_s S(f_k)/2``. The
    ``n_bins + 1`` edges are spaced logarithmically from f_1 to f_{N/2} (the last edge is
    inclusive); empty bins are dropped.

    Parameters
    ----------
    y : array_like, shape (..., N)
        Finite samples (one segment per row; all rows share N). NaN is not allowed: interpolate
        gaps first (:func:`interpolate_bad`).
    sample_rate_hz : float
        Sampling rate f_s, Hz.
    n_bins : int
        Number of log-spaced bins (≥ 1).
    detrend : bool
        Subtract the least-squares straight line instead of the median (default False, as
        docs/level2.md#noisestatslevel2). A segment cut from a longer red-noise stream is not periodic: its
        end-to-end step leaks power ∝ f⁻² into the lowest bins. For α = −2 and 120 s segments that biases
        σ_red high by ~25 % (α = −1.5: ~5 %); removing the line cuts this to a few per cent at the cost of a
        small bias of the other sign for shallow spectra.

    Returns
    -------
    f_mean_hz : ndarray, shape (n_b,)
        Mean frequency of the periodogram points in each non-empty bin, Hz.
    p_mean : ndarray, shape (..., n_b)
        Mean power ``P̄_b`` per bin, in (units of y)².
    counts : ndarray of int64, shape (n_b,)
        Number of periodogram points ``n_b`` per bin.

    Raises
    ------
    ValueError
        Non-finite samples, ``n_bins < 1`` or a non-positive sample rate.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not sample_rate_hz > 0:
        raise ValueError(f"sample_rate_hz must be > 0, got {sample_rate_hz}")
    a = np.asarray(y, dtype=np.float64)
    if a.ndim == 0:
        raise ValueError("y must have at least one dimension")
    if not np.all(np.isfinite(a)):
        raise ValueError("log_binned_periodogram: y has non-finite samples; interpolate them first")
    n = a.shape[-1]
    k_max = n // 2
    if k_max < 1:
        return np.empty(0), np.empty((*a.shape[:-1], 0)), np.empty(0, dtype=np.int64)
    if detrend and n >= 2:
        t = np.arange(n, dtype=np.float64) - 0.5 * (n - 1)
        slope = (a @ t) / (t @ t)
        a = a - a.mean(axis=-1, keepdims=True) - slope[..., None] * t
    else:
        a = a - np.median(a, axis=-1, keepdims=True)
    spec = np.fft.rfft(a, axis=-1)[..., 1 : k_max + 1]
    power = (spec.real**2 + spec.imag**2) / n
    freq = np.arange(1, k_max + 1) * (float(sample_rate_hz) / n)
    if k_max == 1:
        idx = np.zeros(1, dtype=np.int64)
    else:
        edges = np.geomspace(freq[0], freq[-1], int(n_bins) + 1)
        idx = np.clip(np.searchsorted(edges, freq, side="right") - 1, 0, int(n_bins) - 1)
    counts_all = np.bincount(idx, minlength=int(n_bins))
    nonempty = np.flatnonzero(counts_all)
    starts = np.searchsorted(idx, nonempty, side="left")
    counts = counts_all[nonempty].astype(np.int64)
    f_mean = np.add.reduceat(freq, starts) / counts
    p_mean = np.add.reduceat(power, starts, axis=-1) / counts
    return f_mean, p_mean, counts


def log_mean_bias(counts: ArrayLike) -> NDArray[np.float64]:
    """``E[ln(mean of n unit exponential variates)] = ψ(n) − ln n`` (≤ 0; −0.5772 for n = 1)."""
    n = np.asarray(counts, dtype=np.float64)
    return digamma(n) - np.log(n)


def one_over_f_model(
    f_hz: ArrayLike, sigma_white: float, sigma_red: float, alpha: float, f_ref_hz: float = 0.1
) -> NDArray[np.float64]:
    """``M(f) = σ_red² |f/f_ref|^α + σ_white²`` in periodogram units ((units of data)²)."""
    f = np.abs(np.asarray(f_hz, dtype=np.float64))
    return sigma_red**2 * (f / f_ref_hz) ** alpha + sigma_white**2


@dataclass(frozen=True)
class OneOverFFit:
    """Result of :func:`fit_one_over_f`.

    Attributes
    ----------
    sigma_white : float
        White-noise rms per sample (units of the data); NaN if the fit failed.
    sigma_red : float
        Red-noise amplitude at ``f_ref``: ``σ_red²`` is the red part of the periodogram at f_ref.
    alpha : float
        Spectral index of the red part.
    fknee_hz : float
        ``f_ref (σ_white/σ_red)^(2/α)`` when α < 0 and the fit succeeded, else NaN.
    ok : bool
        The fit converged with finite parameters.
    message : str
        Why the fit failed, or the optimiser's message.
    n_bins : int
        Number of frequency bins used.
    """

    sigma_white: float
    sigma_red: float
    alpha: float
    fknee_hz: float
    ok: bool
    message: str = ""
    n_bins: int = 0

    @classmethod
    def failed(cls, message: str, n_bins: int = 0) -> OneOverFFit:
        return cls(math.nan, math.nan, math.nan, math.nan, False, message, n_bins)


def fit_one_over_f(
    f_hz: ArrayLike,
    p_mean: ArrayLike,
    counts: ArrayLike,
    *,
    f_ref_hz: float = 0.1,
    sigma_white0: float | None = None,
    alpha_bounds: Sequence[float] = (-4.0, 4.0),
    alpha_init: float = -1.5,
    bias_correction: bool = True,
) -> OneOverFFit:
    """Fit ``M(f) = σ_red² |f/f_ref|^α + σ_white²`` to a log-binned periodogram
    (docs/level2.md#noisestatslevel2 step 7).

    ``scipy.optimize.least_squares`` (trf, analytic Jacobian) on ``θ = (ln σ_white, ln σ_red, α)``
    with ``ln σ ∈ [−30, 10]`` and ``α ∈ alpha_bounds`` minimises

    ``res_b = sqrt(n_b) · [ln P̄_b − (ψ(n_b) − ln n_b) − ln M(f̄_b)]``.

    **Why the digamma term.** Each periodogram point of a Gaussian process is an exponential
    variate of mean M(f) (χ²₂/2). The log of the mean of n_b of them has expectation
    ``ln M + ψ(n_b) − ln n_b`` exactly, and variance ψ′(n_b) ≈ 1/n_b (hence the weight √n_b).
    Subtracting the known offset makes every residual zero-mean, so the fit is unbiased in ln M.
    The red amplitude is set by the lowest bins, which hold one or two points
    (``ψ(1) − ln 1 = −0.577``): without the term ln σ_red² would come out low by up to 0.577, i.e.
    σ_red low by a factor e^−0.29 ≈ 0.75. With it, ln σ_red has no bias. White-noise bins hold many
    points, where the term → −1/(2 n_b) is negligible.

    Parameters
    ----------
    f_hz, p_mean, counts : array_like, shape (n_b,)
        Output of :func:`log_binned_periodogram` for one segment: mean frequency (Hz), mean
        power ((units)²) and number of points per bin. Bins with non-finite or non-positive
        power are ignored.
    f_ref_hz : float
        Reference frequency of the red amplitude, Hz.
    sigma_white0 : float, optional
        Start value of σ_white (e.g. the pair-difference rms); default: the square root of the
        median P̄ of the highest-frequency quarter of the bins.
    alpha_bounds : (float, float)
        Bounds of α.
    alpha_init : float
        Start value of α (clipped into the bounds).
    bias_correction : bool
        Subtract ``ψ(n_b) − ln n_b`` (default True; False reproduces the legacy, biased fit and is
        only meant for tests).

    Notes
    -----
    **Degenerate (white) spectra.** When the fitted red term varies by less than a factor e over
    the fitted band (``|α| · ln(f_max/f_min) < 1``) it cannot be told apart from white noise, and
    the split of the flat level between σ_white and σ_red is arbitrary (on pure white noise the
    unconstrained fit sometimes drives σ_white to its lower bound). The fit is then repeated with
    α fixed at ``alpha_init``: σ_white is the white level and σ_red the amplitude of 1/f noise of
    that index the data allow; ``message`` says so.

    Returns
    -------
    OneOverFFit
        ``sigma_white``/``sigma_red`` in the units of the data, ``alpha``, ``fknee_hz``, ``ok``.
        All values are NaN when ``ok`` is False.
    """
    f = np.asarray(f_hz, dtype=np.float64).ravel()
    p = np.asarray(p_mean, dtype=np.float64).ravel()
    c = np.asarray(counts, dtype=np.float64).ravel()
    if not (f.shape == p.shape == c.shape):
        raise ValueError(
            f"f_hz, p_mean and counts must have the same length, got {f.shape}, {p.shape}, {c.shape}"
        )
    lo_a, hi_a = float(alpha_bounds[0]), float(alpha_bounds[1])
    if not lo_a < hi_a:
        raise ValueError(f"alpha_bounds must be increasing, got {alpha_bounds}")
    if not f_ref_hz > 0:
        raise ValueError(f"f_ref_hz must be > 0, got {f_ref_hz}")
    use = np.isfinite(f) & (f > 0) & np.isfinite(p) & (p > 0) & (c > 0)
    f, p, c = f[use], p[use], c[use]
    nb = int(f.size)
    if nb < 4:
        return OneOverFFit.failed(f"only {nb} usable frequency bins (need >= 4)", nb)

    ln_x = np.log(f / f_ref_hz)
    target = np.log(p) - (log_mean_bias(c) if bias_correction else 0.0)
    w = np.sqrt(c)

    # Start values (docs/level2.md#noisestatslevel2 step 7).
    lo_s, hi_s = LN_SIGMA_BOUNDS
    if sigma_white0 is not None and np.isfinite(sigma_white0) and sigma_white0 > 0:
        sw0 = float(sigma_white0)
    else:
        top = f >= np.quantile(f, 0.75)
        sw0 = float(np.sqrt(np.median(p[top])))
    sr0 = float(np.sqrt(p[np.argmin(np.abs(ln_x))]))
    eps = 1e-6
    x0 = np.array(
        [
            np.clip(np.log(sw0), lo_s + eps, hi_s - eps),
            np.clip(np.log(sr0), lo_s + eps, hi_s - eps),
            np.clip(float(alpha_init), lo_a + eps, hi_a - eps),
        ]
    )

    def parts(theta: NDArray, alpha: float | None) -> tuple[NDArray, NDArray, NDArray]:
        lw, lr = theta[0], theta[1]
        a = theta[2] if alpha is None else alpha
        red = 2.0 * lr + a * ln_x
        white = 2.0 * lw
        ln_m = np.logaddexp(red, white)
        return ln_m, np.exp(red - ln_m), np.exp(white - ln_m)

    def solve(start: NDArray, alpha: float | None) -> Any:
        def residuals(theta: NDArray) -> NDArray:
            return w * (target - parts(theta, alpha)[0])

        def jacobian(theta: NDArray) -> NDArray:
            _, fr, fw = parts(theta, alpha)
            jac = np.empty((nb, start.size))
            jac[:, 0] = -w * 2.0 * fw
            jac[:, 1] = -w * 2.0 * fr
            if alpha is None:
                jac[:, 2] = -w * fr * ln_x
            return jac

        lower = [lo_s, lo_s, lo_a][: start.size]
        upper = [hi_s, hi_s, hi_a][: start.size]
        return least_squares(
            residuals, start, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac"
        )

    try:
        res = solve(x0, None)
    except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - defensive
        return OneOverFFit.failed(f"least_squares failed: {exc}", nb)
    span = float(ln_x.max() - ln_x.min())
    degenerate = bool(np.all(np.isfinite(res.x)) and abs(float(res.x[2])) * span < 1.0)
    if not (degenerate or (res.success and np.all(np.isfinite(res.x)))):
        return OneOverFFit.failed(f"fit did not converge: {res.message}", nb)
    lw, lr, a = (float(v) for v in res.x)
    message = str(res.message)
    if degenerate:
        # The red term varies by less than a factor e over the fitted band, so it is
        # indistinguishable from white noise and the split between the two is arbitrary (on pure
        # white noise the fit can drive sigma_white to its lower bound). Refit with alpha fixed at
        # alpha_init: sigma_white is then the white level and sigma_red what 1/f noise of that
        # index the data allow. (Along that flat valley the free fit may also run out of
        # evaluations; the refit decides.)
        a = float(x0[2])
        try:
            res2 = solve(x0[:2].copy(), a)
        except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - defensive
            return OneOverFFit.failed(f"least_squares failed: {exc}", nb)
        if not (res2.success and np.all(np.isfinite(res2.x))):
            return OneOverFFit.failed(f"fit did not converge: {res2.message}", nb)
        lw, lr = (float(v) for v in res2.x)
        message = f"alpha unconstrained (spectrum white over the band); fixed at {a:g}"
    sigma_white, sigma_red = math.exp(lw), math.exp(lr)
    fknee = math.nan
    if a < 0:
        ln_fknee = math.log(f_ref_hz) + (2.0 / a) * (lw - lr)
        if ln_fknee < 700.0:
            fknee = math.exp(ln_fknee)
    if a <= lo_a + 1e-6 or a >= hi_a - 1e-6:
        message = f"alpha at its bound ({a:g}); {message}"
    return OneOverFFit(sigma_white, sigma_red, a, fknee, True, message, nb)


# ==================================================================================================
# NoiseStatsLevel2 per-segment algorithm (docs/level2.md#noisestatslevel2 steps 1–8)
# ==================================================================================================
@dataclass
class SegmentNoiseStats:
    """Noise statistics of R segments (rows), as written by NoiseStatsLevel2.

    Attributes
    ----------
    auto_rms : ndarray (R,)
        Sky-robust white-noise rms per sample (:func:`difference_rms`, units of the data); NaN
        with fewer than 20 differences.
    sigma_white, sigma_red, alpha, fknee_hz : ndarray (R,)
        1/f fit (NaN where not fitted).
    good_fraction : ndarray (R,)
        Fraction of the segment's samples that are finite and not outliers (NaN for n = 0).
    fit_ok : ndarray of bool (R,)
    n_bright : ndarray of int64 (R,)
        Samples replaced because the bright-source map is above the cut.
    reason : list of str
        Why each segment was not fitted ('' when fitted).
    spectra : dict
        Row → ``(f_mean_hz, p_mean, counts)`` of the fitted periodogram, for rows in
        ``keep_spectra`` only (plots).
    """

    auto_rms: NDArray[np.float64]
    sigma_white: NDArray[np.float64]
    sigma_red: NDArray[np.float64]
    alpha: NDArray[np.float64]
    fknee_hz: NDArray[np.float64]
    good_fraction: NDArray[np.float64]
    fit_ok: NDArray[np.bool_]
    n_bright: NDArray[np.int64]
    reason: list[str]
    spectra: dict[int, tuple[NDArray, NDArray, NDArray]] = field(default_factory=dict)


def fill_bad_samples(
    x: NDArray[np.float64],
    good: NDArray[np.bool_],
    sigma: NDArray[np.float64],
    rngs: Sequence[np.random.Generator],
    window: int,
) -> NDArray[np.float64]:
    """Replace the samples where ``good`` is False by a local level plus white noise.

    The level is the NaN-aware running median (``window`` samples) of the good samples,
    linearly interpolated across runs longer than the window; Gaussian noise of σ = ``sigma[row]``
    from ``rngs[row]`` is added. Interpolating between levels rather than between two single
    noisy samples, and adding noise, keeps the periodogram of the filled row unbiased: plain
    linear interpolation would remove the white power of the replaced samples (a 3σ cut on
    Gaussian noise alone replaces 0.27 % of the samples, which carry 2.9 % of the variance) and
    smear the two end samples' noise over the run as a red excess.

    Parameters
    ----------
    x : ndarray, shape (R, n)
        Samples, K.
    good : ndarray of bool, shape (R, n)
        Samples kept as they are (finite).
    sigma : ndarray, shape (R,)
        White-noise rms per sample of each row, K (rows with a NaN σ get no noise).
    rngs : sequence of numpy.random.Generator, length R
        One generator per row; ``(~good[r]).sum()`` normal variates are drawn from ``rngs[r]``.
    window : int
        Running-median window, samples.

    Returns
    -------
    ndarray, shape (R, n) float64
        Rows with no good sample are all NaN.
    """
    out = np.array(x, dtype=np.float64, copy=True)
    bad_rows = np.flatnonzero((~good).any(axis=-1))
    if bad_rows.size == 0:
        return out
    g = good[bad_rows]
    level = running_median_nan(np.where(g, out[bad_rows], np.nan), int(window))
    level = interpolate_bad(level, g & np.isfinite(level))
    for j, r in enumerate(bad_rows):
        sel = ~g[j]
        noise = rngs[r].standard_normal(int(sel.sum()))
        scale = float(sigma[r]) if np.isfinite(sigma[r]) else 0.0
        out[r, sel] = level[j, sel] + scale * noise
    return out


def segment_noise_stats(
    x: ArrayLike,
    sample_rate_hz: float,
    *,
    f_ref_hz: float = 0.1,
    n_psd_bins: int = 100,
    medfilt_length: int = 50,
    outlier_sigma: float = 3.0,
    min_good_fraction: float = 0.95,
    min_samples: int = 512,
    alpha_bounds: Sequence[float] = (-4.0, 4.0),
    alpha_init: float = -1.5,
    bright: ArrayLike | None = None,
    seeds: Sequence[Any] | None = None,
    detrend: bool = False,
    keep_spectra: Sequence[int] = (),
) -> SegmentNoiseStats:
    """Noise statistics of segments of equal length (docs/level2.md#noisestatslevel2 steps 1–8), one segment
    per row.

    1. ``n_f`` = finite samples; rows with ``n_f < min_samples`` are not fitted.
    2. ``auto_rms`` = sky-robust white-noise rms (:func:`difference_rms`, differences of order
       :data:`DIFFERENCE_ORDER`), over the differences that touch no bright sample.
    3. Bright samples (``bright`` True and finite) are replaced by the local level of the
       non-bright samples plus Gaussian noise of σ = auto_rms (:func:`fill_bad_samples`).
    4. Residuals from ``running_median_nan(x, medfilt_length)``; samples with
       ``|resid| ≥ outlier_sigma · auto_rms`` are outliers. ``good_fraction`` = (finite and not
       outlier) / n. Below ``min_good_fraction`` the row is not fitted; otherwise the bad samples
       (NaN or outlier) are replaced in the same way, interpolation plus noise, so the white
       level of the periodogram is not biased low.
    5.–6. :func:`log_binned_periodogram` of all fitted rows at once.
    7.–8. :func:`fit_one_over_f` per row, started at σ_white = auto_rms.

    The noise of steps 3 and 4 comes from one ``numpy.random.default_rng(seeds[row])`` per row
    (bright samples first), so results are reproducible per segment.

    Parameters
    ----------
    x : array_like, shape (R, n)
        Segments (e.g. all bands × bins of one feed and scan), K; NaN = missing.
    sample_rate_hz : float
        Hz.
    f_ref_hz, n_psd_bins, medfilt_length, outlier_sigma, min_good_fraction, min_samples,
    alpha_bounds, alpha_init
        As the NoiseStatsLevel2 parameters of docs/level2.md#noisestatslevel2.
    bright : array_like of bool, shape (n,) or (R, n), optional
        Samples where the bright-source map is at or above the cut.
    seeds : sequence of length R, optional
        Seed per row (anything ``numpy.random.default_rng`` accepts, e.g. ``(obsid, feed, band,
        bin, scan)``); default ``(0, row)``.
    detrend : bool
        Remove a least-squares line instead of the median before the periodogram (see
        :func:`log_binned_periodogram`); False follows docs/level2.md#noisestatslevel2.
    keep_spectra : sequence of int
        Rows whose binned periodogram is returned in ``spectra`` (for plots).

    Returns
    -------
    SegmentNoiseStats
    """
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"x must have shape (R, n), got {a.shape}")
    n_rows, n = a.shape
    if seeds is not None and len(seeds) != n_rows:
        raise ValueError(f"seeds must give one seed per row ({n_rows}), got {len(seeds)}")
    options = dict(
        f_ref_hz=f_ref_hz,
        n_psd_bins=n_psd_bins,
        medfilt_length=medfilt_length,
        outlier_sigma=outlier_sigma,
        min_good_fraction=min_good_fraction,
        min_samples=min_samples,
        alpha_bounds=alpha_bounds,
        alpha_init=alpha_init,
        detrend=detrend,
    )
    chunks = _row_chunks(n_rows, n)
    if len(chunks) > 1:  # bound memory: a few float64 copies of one chunk at a time
        bright_rows = None if bright is None else np.broadcast_to(np.asarray(bright, dtype=bool), a.shape)
        parts = []
        for sl in chunks:
            parts.append(
                segment_noise_stats(
                    a[sl],
                    sample_rate_hz,
                    bright=None if bright_rows is None else bright_rows[sl],
                    seeds=[seeds[r] if seeds is not None else (0, r) for r in range(sl.start, sl.stop)],
                    keep_spectra=[k - sl.start for k in keep_spectra if sl.start <= k < sl.stop],
                    **options,
                )
            )
        return SegmentNoiseStats(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in (
                    "auto_rms",
                    "sigma_white",
                    "sigma_red",
                    "alpha",
                    "fknee_hz",
                    "good_fraction",
                    "fit_ok",
                    "n_bright",
                )
            },
            reason=[r for p in parts for r in p.reason],
            spectra={k + sl.start: v for p, sl in zip(parts, chunks) for k, v in p.spectra.items()},
        )
    x64 = a.astype(np.float64)
    finite = np.isfinite(x64)
    n_f = finite.sum(axis=-1)
    br = None
    if bright is not None:
        br = np.broadcast_to(np.asarray(bright, dtype=bool), a.shape) & finite
    # Differences touching bright samples carry the source's gradient: leave them out of the noise.
    auto_rms = difference_rms(np.where(br, np.nan, x64) if br is not None and br.any() else x64)

    nan = np.full(n_rows, np.nan)
    stats = SegmentNoiseStats(
        auto_rms=auto_rms,
        sigma_white=nan.copy(),
        sigma_red=nan.copy(),
        alpha=nan.copy(),
        fknee_hz=nan.copy(),
        good_fraction=nan.copy(),
        fit_ok=np.zeros(n_rows, dtype=bool),
        n_bright=np.zeros(n_rows, dtype=np.int64),
        reason=[""] * n_rows,
    )
    if n_rows == 0 or n == 0:
        stats.reason = ["empty segment"] * n_rows
        return stats
    rngs = [np.random.default_rng(seeds[r] if seeds is not None else (0, r)) for r in range(n_rows)]

    # 3. bright samples
    if br is not None:
        stats.n_bright = br.sum(axis=-1).astype(np.int64)
        if stats.n_bright.any():
            x64 = fill_bad_samples(x64, finite & ~br, auto_rms, rngs, int(medfilt_length))
            x64[~finite] = np.nan
            finite = np.isfinite(x64)

    # 4. outliers against a short running median
    med = running_median_nan(x64, int(medfilt_length))
    with np.errstate(invalid="ignore"):
        outlier = np.abs(x64 - med) >= outlier_sigma * auto_rms[:, None]
    good = finite & ~outlier
    stats.good_fraction = good.sum(axis=-1) / float(n)

    fit_rows = []
    for r in range(n_rows):
        if n_f[r] < min_samples:
            stats.reason[r] = f"{int(n_f[r])} finite samples (need >= {min_samples})"
        elif not np.isfinite(auto_rms[r]):
            stats.reason[r] = "no white-noise estimate"
        elif stats.good_fraction[r] < min_good_fraction:
            stats.reason[r] = f"good fraction {stats.good_fraction[r]:.3f} < {min_good_fraction}"
        else:
            fit_rows.append(r)
    if not fit_rows:
        return stats

    keep = set(int(k) for k in keep_spectra)
    rows = np.asarray(fit_rows)
    for sl in _row_chunks(rows.size, n):
        sub = rows[sl]
        y = fill_bad_samples(x64[sub], good[sub], auto_rms[sub], [rngs[r] for r in sub], int(medfilt_length))
        f_mean, p_mean, counts = log_binned_periodogram(y, sample_rate_hz, n_psd_bins, detrend=detrend)
        for j, r in enumerate(sub):
            fit = fit_one_over_f(
                f_mean,
                p_mean[j],
                counts,
                f_ref_hz=f_ref_hz,
                sigma_white0=float(auto_rms[r]),
                alpha_bounds=alpha_bounds,
                alpha_init=alpha_init,
            )
            if r in keep:
                stats.spectra[int(r)] = (f_mean, p_mean[j].copy(), counts)
            if not fit.ok:
                stats.reason[r] = fit.message
                continue
            stats.fit_ok[r] = True
            stats.sigma_white[r] = fit.sigma_white
            stats.sigma_red[r] = fit.sigma_red
            stats.alpha[r] = fit.alpha
            stats.fknee_hz[r] = fit.fknee_hz
    return stats
