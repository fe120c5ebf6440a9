"""Fused per-block operations of the streaming level-2 stages (docs/level2.md).

These wrap the Cython kernels ``utils.kernels.block_stats`` and ``utils.kernels.binning``. They take
the raw float32 block ``(n_bands, n_channels, n)`` of one feed and scan and a per-channel scale
(the inverse vane gain) instead of a calibrated copy, so calibration costs nothing extra and no
block-sized temporary is made. Rows run in parallel (OpenMP, no GIL); ``n_threads=None`` uses the
current OpenMP limit (``OMP_NUM_THREADS`` / ``threadpoolctl``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.kernels import binning as _binning
from utils.kernels import block_stats as _stats
from utils.kernels import median_filter as _median_kernel

_ESTIMATORS = {"std": 0, "clipped_std": 1}


def _threads(n_threads: int | None) -> int:
    return max(1, int(_median_kernel.max_threads())) if n_threads is None else max(1, int(n_threads))


def inverse_gain(gain: ArrayLike) -> NDArray[np.float64]:
    """``1/gain`` (K per count), NaN where the gain is not finite or ≤ 0
    (docs/level2.md#calibration-per-scan)."""
    g = np.asarray(gain, dtype=np.float64)
    good = np.isfinite(g) & (g > 0)
    return np.where(good, 1.0 / np.where(good, g, 1.0), np.nan)


def _rows(x: ArrayLike) -> tuple[NDArray, tuple[int, ...]]:
    a = np.asarray(x)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    lead = a.shape[:-1]
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1])), lead


def decimated_length(n: int, stride: int) -> int:
    """Number of samples in ``x[..., ::stride]`` for ``n`` samples."""
    return -(-int(n) // max(1, int(stride)))


def pair_difference_rms_and_nans(
    x: ArrayLike,
    *,
    estimator: str = "clipped_std",
    clip_sigma: float = 5.0,
    min_pairs: int = 10,
    n_threads: int | None = None,
    stride: int = 0,
    decimated_out: NDArray | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """White-noise rms per sample (pair differences along the last axis) and NaN count per row.

    Same estimators and definitions as :func:`utils.noise.pair_difference_rms` ('std',
    'clipped_std'; 'mad' is delegated to it), computed in one pass per row.

    Parameters
    ----------
    x : array_like, shape (..., n)
        Samples (counts or K); NaN marks missing values.
    estimator, clip_sigma, min_pairs
        As :func:`utils.noise.pair_difference_rms`.
    stride : int
        With ``decimated_out``, also copy ``x[..., ::stride]`` into it in the same read of each
        row (the decimated medians of the streaming pass use that copy, docs/level2.md#streaming).
    decimated_out : ndarray, shape (..., decimated_length(n, stride)), dtype of x, C-contiguous

    Returns
    -------
    rms : ndarray, shape (...), float64
        NaN where fewer than ``min_pairs`` finite pairs.
    n_nan : ndarray, shape (...), int64
    """
    rows, lead = _rows(x)
    dec = _decimated_rows(rows, stride, decimated_out)
    if estimator == "mad":
        from utils.noise import pair_difference_rms

        rms = pair_difference_rms(rows, estimator="mad", clip_sigma=clip_sigma, min_pairs=min_pairs)
        if dec.shape[1]:
            dec[...] = rows[:, ::stride]
        return rms.reshape(lead), np.isnan(rows).sum(axis=-1).astype(np.int64).reshape(lead)
    if estimator not in _ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected 'std', 'clipped_std' or 'mad'")
    out = np.empty(rows.shape[0], dtype=np.float64)
    nan = np.zeros(rows.shape[0], dtype=np.int64)
    _stats.pair_diff_rms(
        rows,
        _ESTIMATORS[estimator],
        float(clip_sigma),
        int(min_pairs),
        out,
        nan,
        _threads(n_threads),
        int(stride) if dec.shape[1] else 0,
        dec,
    )
    if rows.shape[1] < 2:
        nan[:] = np.isnan(rows).sum(axis=-1)
    return out.reshape(lead), nan.reshape(lead)


def _decimated_rows(rows: NDArray, stride: int, out: NDArray | None) -> NDArray:
    """``out`` as a (rows, n_dec) view to fill, or an empty (rows, 0) array when there is none."""
    if out is None or int(stride) <= 0:
        return np.empty((rows.shape[0], 0), dtype=rows.dtype)
    n_dec = decimated_length(rows.shape[1], stride)
    if out.dtype != rows.dtype or not out.flags.c_contiguous or out.size != rows.shape[0] * n_dec:
        raise ValueError(
            f"decimated_out must be C-contiguous {rows.dtype} with {rows.shape[0]} × {n_dec} values, "
            f"got {out.dtype} shape {out.shape}"
        )
    return out.reshape(rows.shape[0], n_dec)


def masked_nanmeans(
    raw: ArrayLike, first: ArrayLike, second: ArrayLike, min_count: int = 1, *, n_threads: int | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Means over two selections of samples of the last axis, ignoring NaN and ±inf, summed in
    float64 (docs/level2.md#systemtemperature): the hot and cold vane states in one pass.

    One pass of the Cython kernel over ``raw`` (rows in parallel) instead of a copy of the selected
    samples, a finiteness mask and a zero-filled copy.

    Parameters
    ----------
    raw : array_like, shape (..., n)
        Spectrometer counts (float32).
    first, second : array_like of bool, shape (n,)
        Samples to average.
    min_count : int
        Entries with fewer finite selected samples get NaN.

    Returns
    -------
    mean_first, mean_second : ndarray of float64, shape raw.shape[:-1]
    """
    rows, lead = _rows(raw)
    weights = []
    for mask in (first, second):
        w = np.ascontiguousarray(np.asarray(mask, dtype=bool).reshape(-1), dtype=np.float64)
        if w.shape[0] != rows.shape[1]:
            raise ValueError(f"mask has {w.shape[0]} samples, raw has {rows.shape[1]}")
        weights.append(w)
    sums = np.zeros((rows.shape[0], 4))
    _stats.masked_sums(rows, weights[0], weights[1], sums, _threads(n_threads))
    means = []
    for total, count in ((sums[:, 0], sums[:, 1]), (sums[:, 2], sums[:, 3])):
        out = np.full(rows.shape[0], np.nan)
        np.divide(total, count, out=out, where=count >= max(int(min_count), 1))
        means.append(out.reshape(lead))
    return means[0], means[1]


def masked_nanmean(
    raw: ArrayLike, mask: ArrayLike, min_count: int = 1, *, n_threads: int | None = None
) -> NDArray[np.float64]:
    """Mean over the selected samples of the last axis, ignoring NaN and ±inf (one selection of
    :func:`masked_nanmeans`); ``mask`` has shape (n,), the result ``raw.shape[:-1]``."""
    mask = np.asarray(mask, dtype=bool)
    return masked_nanmeans(raw, mask, mask, min_count, n_threads=n_threads)[0]


@dataclass
class AirmassFit:
    """Per-channel fit ``y = offset + tau * x`` (arrays of the channel shape)."""

    offset: NDArray[np.float64]
    tau: NDArray[np.float64]
    ok: NDArray[np.bool_]
    n: NDArray[np.float64]


def airmass_fit(
    raw: ArrayLike, scale: ArrayLike, airmass: ArrayLike, *, n_threads: int | None = None
) -> AirmassFit:
    """Closed-form least squares of ``y = raw·scale`` against ``airmass`` per channel
    (docs/level2.md#atmosphereinobservation).

    Parameters
    ----------
    raw : array_like, shape (..., n)
        Raw counts (float32).
    scale : array_like, shape (...)
        Per-channel factor, e.g. 1/gain (K/count); non-finite → that channel is not fitted.
    airmass : array_like, shape (n,)
        ``1/sin(el)`` per sample.

    Returns
    -------
    AirmassFit
        ``ok`` is False where the denominator ``n Σxx − (Σx)²`` is 0 or fewer than 2 samples.
    """
    rows, lead = _rows(raw)
    sc = np.ascontiguousarray(np.broadcast_to(np.asarray(scale, dtype=np.float64), lead).reshape(-1))
    x = np.ascontiguousarray(airmass, dtype=np.float64)
    sums = np.zeros((rows.shape[0], 5))
    _stats.airmass_sums(rows, sc, x, sums, _threads(n_threads))
    n, sx, sy, sxx, sxy = sums.T
    den = n * sxx - sx * sx
    ok = (n >= 2) & (den > 0) & np.isfinite(den)
    with np.errstate(invalid="ignore", divide="ignore"):
        # relative test: a constant airmass makes den a rounding residue of n Σxx ≈ (Σx)²
        ok &= den > 1e-12 * np.maximum(n * sxx, 1e-300)
        tau = np.where(ok, (n * sxy - sx * sy) / np.where(ok, den, 1.0), np.nan)
        offset = np.where(ok, (sy - tau * sx) / np.where(n > 0, n, 1.0), np.nan)
    return AirmassFit(offset.reshape(lead), tau.reshape(lead), ok.reshape(lead), n.reshape(lead))


def decimated_nanmedian(
    raw: ArrayLike,
    scale: ArrayLike,
    stride: int,
    *,
    offset: ArrayLike | None = None,
    tau: ArrayLike | None = None,
    airmass: ArrayLike | None = None,
    n_threads: int | None = None,
) -> NDArray[np.float64]:
    """Median over every ``stride``-th sample of ``raw·scale − offset − tau·airmass``, per channel.

    NaN samples are ignored (the mean of the two middle values for an even count, as
    ``numpy.nanmedian``); NaN where a channel has none. One selection per row in the Cython kernel,
    rows in parallel, without a copy of the block.

    Parameters
    ----------
    raw : array_like, shape (..., n)
    scale, offset, tau : array_like, shape (...)
        Per-channel factor and terms (offset and tau default to 0).
    stride : int
    airmass : array_like, shape (n,), optional

    Returns
    -------
    ndarray, shape (...), float64
    """
    rows, lead = _rows(raw)
    n = rows.shape[1]

    def vec(v):
        if v is None:
            return np.zeros(rows.shape[0])
        return np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.float64), lead).reshape(-1))

    x = np.zeros(n) if airmass is None or tau is None else np.ascontiguousarray(airmass, dtype=np.float64)
    out = np.empty(rows.shape[0])
    _stats.decimated_median(
        rows,
        vec(scale),
        vec(offset),
        vec(tau if airmass is not None else None),
        x,
        max(1, int(stride)),
        out,
        _threads(n_threads),
    )
    return out.reshape(lead)


@dataclass
class BinnedSums:
    """Channel sums of one block from :func:`filter_and_bin`.

    ``r_sum (n,)`` gain-filter sum Σ wr·d; ``num, den, wm (n_groups, n)`` Σ wb·d, Σ wb, Σ wb·m over
    finite samples of each group; ``nan_count (n,)`` NaN raw values per sample; ``r_nan (n,)`` NaN
    raw values per sample among the gain-filter channels (``wr != 0``): where it is non-zero,
    ``r_sum`` lacks those channels' terms.
    """

    r_sum: NDArray[np.float64]
    num: NDArray[np.float64]
    den: NDArray[np.float64]
    wm: NDArray[np.float64]
    nan_count: NDArray[np.int32]
    r_nan: NDArray[np.int32]
    w_total: NDArray[np.float64] | None = None

    def _has_weight(self) -> NDArray[np.bool_]:
        # den is a total minus the NaN samples' weights: "no weight" may leave a rounding residue
        tol = 0.0 if self.w_total is None else 1e-9 * self.w_total[:, None]
        return self.den > tol

    def binned(self) -> NDArray[np.float64]:
        """``num/den`` (NaN where ``den == 0``), shape (n_groups, n)."""
        ok = self._has_weight()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, self.num / np.where(ok, self.den, 1.0), np.nan)

    def binned_residual(self, gain: NDArray) -> NDArray[np.float64]:
        """Binned ``d − m·ĝ``: ``(num − ĝ·wm)/den``, shape (n_groups, n)."""
        ok = self._has_weight()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, (self.num - gain[None, :] * self.wm) / np.where(ok, self.den, 1.0), np.nan)


def filter_and_bin(
    raw: NDArray,
    inv_gain: ArrayLike,
    offset: ArrayLike,
    tau: ArrayLike,
    airmass: ArrayLike,
    level: ArrayLike,
    wr: ArrayLike,
    wb: ArrayLike,
    m: ArrayLike,
    group: ArrayLike,
    n_groups: int,
    *,
    nan_count: ArrayLike | None = None,
    n_threads: int | None = None,
) -> BinnedSums:
    """One pass over a raw block: ``d = raw·inv_gain − offset − tau·airmass − level`` summed three ways.

    Parameters
    ----------
    raw : ndarray, shape (B, C, n), float32
    inv_gain, offset, tau, level, wr, wb, m : array_like, shape (B, C)
        Per-channel calibration (1/gain), atmosphere terms (tau = 0 where not fitted), median level
        (all vane K), gain-filter weights ``wr`` (K⁻¹), binning weights ``wb`` (K⁻²; 0 = masked) and
        normalisation ``m`` (K).
    airmass : array_like, shape (n,)
    group : array_like of int, shape (B, C)
        Output group of each channel (e.g. ``band * K + bin``), −1 for none.
    n_groups : int
    nan_count : array_like of int, shape (B, C), optional
        NaN samples of each channel in ``raw`` (NoiseStatsLevel1's ``nan_count``): a channel with
        none is not searched for NaN (the sums are the same either way).

    Returns
    -------
    BinnedSums
    """
    rows, lead = _rows(raw)
    n = rows.shape[1]

    def vec(v, dtype=np.float64):
        return np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=dtype), lead).reshape(-1))

    grp = vec(group, np.int32)
    if grp.size and (grp.max() >= n_groups or grp.min() < -1):
        raise ValueError("group indices must lie in [-1, n_groups)")
    wbv, mv = vec(wb), vec(m)
    used = (grp >= 0) & (wbv > 0)
    # den and wm start from the group totals; the kernel subtracts the NaN samples
    w_total = np.bincount(grp[used], weights=wbv[used], minlength=n_groups).astype(np.float64)
    wm_total = np.bincount(grp[used], weights=(wbv * mv)[used], minlength=n_groups).astype(np.float64)
    out = BinnedSums(
        np.zeros(n),
        np.zeros((n_groups, n)),
        np.repeat(w_total[:, None], n, axis=1),
        np.repeat(wm_total[:, None], n, axis=1),
        np.zeros(n, dtype=np.int32),
        np.zeros(n, dtype=np.int32),
        w_total,
    )
    x = np.ascontiguousarray(airmass, dtype=np.float64)
    _binning.filter_bin(
        rows,
        vec(inv_gain),
        vec(offset),
        vec(tau),
        x,
        vec(level),
        vec(wr),
        wbv,
        mv,
        grp,
        out.r_sum,
        out.num,
        out.den,
        out.wm,
        out.nan_count,
        out.r_nan,
        _threads(n_threads),
        None if nan_count is None else vec(nan_count, np.int64),
    )
    return out
