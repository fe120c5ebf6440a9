"""Map noise: sky-free segment noise, the segment cuts on it and the noise-only Monte Carlo behind the RMS HDU
of a continuum map (docs/mapmaking.md#map-noise).

Steps (all on the arrays the destriper was given):

1. :func:`residual_segment_noise` — after a first destriping, the residual ``r = d − P m₋ⱼ`` of every segment
   j against the destriped map of the other segments (sky removed; the segment's white noise, 1/f noise and
   offsets left) gives a white-noise rms
   (clipped pair differences), a log-binned periodogram and a 1/f fit per segment, with the same estimators
   as NoiseStatsLevel2 (docs/level2.md#noisestatslevel2) but without the sky.
2. :func:`segment_verdicts` — the ``sigma_red_cutoff_k`` and ``fknee_max_hz`` cuts on those statistics.
3. :func:`monte_carlo_rms` — Gaussian noise with each segment's measured spectrum, destriped with the same
   pixels, weights and offsets as the data and binned; the per-pixel variance over the realisations, as a
   smoothed ratio to the white-noise variance ``1/Σw``, scales the white RMS.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from modules.MapMaking.destriper import destripe
from utils.noise import segment_noise_stats

log = logging.getLogger("comap.MapNoise")

__all__ = [
    "MC_SEED",
    "MC_TOL",
    "MapNoise",
    "SMOOTH_SIGMA_PIX",
    "SegmentNoise",
    "monte_carlo_rms",
    "noise_realisation",
    "residual_segment_noise",
    "segment_verdicts",
]

MC_SEED = 20261206
"""Base seed of the noise-only Monte Carlo; realisation k of map (band, channel) draws from
``default_rng((MC_SEED, band, channel, k))``, so a map is reproducible (docs/mapmaking.md#map-noise)."""
SMOOTH_SIGMA_PIX = 2.0
"""Gaussian σ (pixels) over which the Monte Carlo variance ratio is averaged (docs/mapmaking.md#map-noise)."""
MC_TOL = 1e-4
"""Destriper tolerance of the Monte Carlo solves (the map's own ``tol`` if that is looser): at 1e-4 the median
RMS/RMS_WHITE ratio moved by 1e-4 against 1e-6 and the Monte Carlo took 27 % less time (measured,
docs/mapmaking.md#map-noise)."""
MIN_GOOD_FRACTION = 0.25
"""A segment's residual spectrum is measured when at least this fraction of its samples is usable: the
``scan_direction`` split keeps under half of every segment (one sweep direction), and a segment without
a spectrum would enter the Monte Carlo as white noise."""
MIN_FIT_SAMPLES = 512
"""Segments shorter than this get a white-noise rms but no 1/f fit (their cuts pass)."""


@dataclass
class SegmentNoise:
    """Sky-free noise statistics of the segments of one map (docs/mapmaking.md#map-noise).

    Attributes
    ----------
    sigma_white : ndarray, shape (n_seg,)
        Clipped pair-difference rms per sample of the residual, K (calibrated); NaN without enough samples.
    sigma_red, alpha, fknee_hz : ndarray, shape (n_seg,)
        1/f fit ``σ_red² |f/f_ref|^α + σ_white²`` of the residual's periodogram (K, —, Hz); NaN where not
        fitted.
    spectra : list of (f_hz, p_mean) or None, length n_seg
        The binned periodogram of each fitted segment (Hz, K²), the noise model of the Monte Carlo.
    sample_rate_hz : float
    """

    sigma_white: NDArray[np.float64]
    sigma_red: NDArray[np.float64]
    alpha: NDArray[np.float64]
    fknee_hz: NDArray[np.float64]
    spectra: list[tuple[NDArray[np.float64], NDArray[np.float64]] | None]
    sample_rate_hz: float


def _segment_bounds(segment_starts: NDArray[np.integer], n: int) -> list[tuple[int, int]]:
    """(start, stop) of every segment; none when there is no sample (a rank without data in a distributed
    map holds one empty segment for the destriper's sake)."""
    if int(n) == 0:
        return []
    edges = [int(s) for s in segment_starts] + [int(n)]
    return [(edges[k], edges[k + 1]) for k in range(len(edges) - 1)]


def residual_segment_noise(
    tod: NDArray[np.float32],
    pixels: NDArray[np.integer],
    weights: NDArray[np.float32],
    map_weights: NDArray[np.float32],
    segment_starts: NDArray[np.integer],
    result: Any,
    offset_length: int,
    sample_rate_hz: float,
    *,
    f_ref_hz: float = 0.1,
    n_psd_bins: int = 100,
    segment_ids: NDArray[np.integer] | None = None,
) -> SegmentNoise:
    """Noise statistics of every segment from its residual against the map of the OTHER segments
    (docs/mapmaking.md#map-noise).

    For segment j, ``m₋ⱼ = (Σ_{t∉j} w_t (d_t − (Fa)_t)) / Σ_{t∉j} w_t`` per pixel (map weights, the offsets
    ``a`` of the destriping ``result``) and ``r = d − P m₋ⱼ``: the sky is removed, the segment's own noise
    (white, 1/f and offsets) is left whole — a map that included the segment would have absorbed part of it
    where few segments cross — and the other segments add their map noise, ~σ²/h for h hits.

    Parameters
    ----------
    tod, weights, map_weights : ndarray of float32, shape (n,)
        The destriper's inputs (K, K⁻², K⁻²).
    pixels : ndarray of int, shape (n,)
        Compressed pixel index, −1 off the map.
    segment_starts : ndarray of int, shape (n_seg,)
    result : DestriperResult
        The destriping of these arrays (its map, weights and offsets).
    offset_length : int
        Samples per offset of that destriping.
    sample_rate_hz : float
    f_ref_hz, n_psd_bins : float, int
        As NoiseStatsLevel2 (docs/level2.md#noisestatslevel2).
    segment_ids : ndarray of int, optional
        Index of each segment in the whole map (default 0 … n_seg − 1): seeds the gap filling, so that a
        segment's statistics do not depend on which rank holds it.

    Notes
    -----
    Samples with zero map weight or off the map are gaps (filled by the estimator with a local level plus
    white noise), and so are samples in pixels no other segment sees, unless they are most of the segment:
    then the residual is the destriped one, ``d − Fa − P m``. Samples whose
    solver weight is below their map weight are the level-2 bright-source samples
    (docs/level2.md#source-mask), left out of the pair differences and filled like gaps, since a source's
    structure inside a pixel survives the subtraction.
    """
    n_seg = len(_segment_bounds(segment_starts, tod.size))
    ids = np.arange(n_seg) if segment_ids is None else np.asarray(segment_ids)
    nan = np.full(n_seg, np.nan)
    out = SegmentNoise(nan.copy(), nan.copy(), nan.copy(), nan.copy(), [None] * n_seg, float(sample_rate_hz))
    total_w = np.asarray(result.weights, dtype=np.float64)
    total_s = np.where(total_w > 0, np.nan_to_num(result.map) * total_w, 0.0)
    offsets = np.asarray(result.offsets, dtype=np.float64)
    first_offset = 0
    for k, (a, b) in enumerate(_segment_bounds(segment_starts, tod.size)):
        n_off = -(-(b - a) // int(offset_length))
        fa = np.repeat(offsets[first_offset : first_offset + n_off], int(offset_length))[: b - a]
        first_offset += n_off
        pix = pixels[a:b]
        wm = map_weights[a:b].astype(np.float64)
        d = tod[a:b].astype(np.float64)
        on = (pix >= 0) & (wm > 0)
        model = np.full(b - a, np.nan)
        if on.any():
            u, inv = np.unique(pix[on], return_inverse=True)
            own_w = np.bincount(inv, weights=wm[on])
            own_s = np.bincount(inv, weights=wm[on] * (d[on] - fa[on]))
            rest_w = total_w[u] - own_w
            other = rest_w > 1e-6 * total_w[u]
            m_other = np.where(other, (total_s[u] - own_s) / np.where(other, rest_w, 1.0), np.nan)
            model[on] = m_other[inv]
            if np.isfinite(model[on]).sum() < 0.5 * on.sum():
                # most of the segment is seen by no other segment (a lone raster): there the map and the
                # offsets are degenerate, so take the destriped residual d − Fa − P m (a lower bound)
                model[on] = np.asarray(result.map, dtype=np.float64)[pix[on]] + fa[on]
        good = on & np.isfinite(model)
        if good.sum() < 20:
            continue
        r = np.where(good, d - model, np.nan)
        bright = good & (weights[a:b] < map_weights[a:b])
        stats = segment_noise_stats(
            r[None, :],
            sample_rate_hz,
            f_ref_hz=f_ref_hz,
            n_psd_bins=n_psd_bins,
            min_good_fraction=MIN_GOOD_FRACTION,
            min_samples=MIN_FIT_SAMPLES,
            bright=bright[None, :],
            seeds=[(MC_SEED, int(ids[k]))],
            keep_spectra=[0],
        )
        out.sigma_white[k] = stats.auto_rms[0]
        if stats.fit_ok[0]:
            out.sigma_red[k] = stats.sigma_red[0]
            out.alpha[k] = stats.alpha[0]
            out.fknee_hz[k] = stats.fknee_hz[0]
        if 0 in stats.spectra:
            f_mean, p_mean, _counts = stats.spectra[0]
            out.spectra[k] = (np.asarray(f_mean), np.asarray(p_mean))
    return out


def segment_verdicts(
    noise: SegmentNoise,
    factors: NDArray[np.float64],
    sigma_red_cutoff_k: float,
    fknee_max_hz: float | None,
) -> list[str | None]:
    """Why each segment is dropped (None: kept) by the red-noise cuts on the sky-free statistics.

    ``sigma_red`` is compared in level-2 units (the calibrated value times the segment's calibration
    factor), as the level-2 statistics were, so ``sigma_red_cutoff_k`` keeps its meaning; NaN passes
    (docs/mapmaking.md#map-noise).
    """
    reasons: list[str | None] = []
    for k in range(noise.sigma_red.size):
        red = float(noise.sigma_red[k]) * float(factors[k])
        knee = float(noise.fknee_hz[k])
        if math.isfinite(red) and red > sigma_red_cutoff_k:
            reasons.append("sigma_red above cutoff")
        elif fknee_max_hz is not None and math.isfinite(knee) and knee > fknee_max_hz:
            reasons.append("fknee above limit")
        else:
            reasons.append(None)
    return reasons


def _amplitudes(n: int, sigma_white: float, spectrum, sample_rate_hz: float) -> NDArray[np.float64]:
    """``sqrt(N P(f_k)/2)`` for k = 0 … N//2 (0 at k = 0): the Fourier amplitudes of one segment's noise.

    ``P`` is the binned periodogram interpolated in log f – log P to the FFT frequencies (flat beyond its
    ends), topped up with white noise so that its high-frequency level is ``sigma_white²`` (the residual's
    periodogram loses the small part of the noise that went into the map); without a spectrum, white.
    """
    nk = n // 2 + 1
    power = np.full(nk, sigma_white**2 if math.isfinite(sigma_white) else 0.0)
    if spectrum is not None and math.isfinite(sigma_white):
        f_mean, p_mean = spectrum
        ok = np.isfinite(p_mean) & (p_mean > 0) & (f_mean > 0)
        if ok.sum() >= 2:
            fk = np.arange(nk) * sample_rate_hz / n
            fk[0] = fk[1] if nk > 1 else 1.0
            logp = np.interp(np.log(fk), np.log(f_mean[ok]), np.log(p_mean[ok]))
            high = p_mean[ok][-max(1, ok.sum() // 4) :]
            top_up = max(sigma_white**2 - float(np.median(high)), 0.0)
            power = np.exp(logp) + top_up
    amp = np.sqrt(n * power / 2.0)
    amp[0] = 0.0
    if n % 2 == 0 and nk > 1:
        amp[-1] = np.sqrt(n * power[-1])  # the Nyquist term is real
    return amp


def noise_realisation(
    seed: tuple,
    segment_ids: NDArray[np.integer],
    bounds: list[tuple[int, int]],
    amplitudes: list[NDArray[np.float64]],
    n: int,
) -> NDArray[np.float32]:
    """One Gaussian noise TOD (K), each segment with its spectrum's Fourier amplitudes (zero mean).

    Segment ``k`` is drawn from ``default_rng((*seed, segment_ids[k]))``: its own stream, so that a
    segment's noise is the same whichever rank of an MPI run holds it."""
    out = np.empty(n, dtype=np.float32)
    for (a, b), amp, sid in zip(bounds, amplitudes, segment_ids):
        m = b - a
        rng = np.random.default_rng((*seed, int(sid)))
        spec = amp * (rng.standard_normal(amp.size) + 1j * rng.standard_normal(amp.size))
        if m % 2 == 0 and amp.size > 1:
            spec[-1] = amp[-1] * rng.standard_normal()
        out[a:b] = np.fft.irfft(spec, n=m)
    return out


CALIBRATION_REALISATIONS = 2
"""Noise realisations whose residual spectra measure the estimator's response
(docs/mapmaking.md#map-noise)."""
CALIBRATION_ITERATIONS = 2
"""Fixed-point iterations of the noise spectrum against the estimator's response."""
CALIBRATION_KEY = 1_000_000
"""Realisation keys of the calibration draws (the map's realisations are 0 … n − 1)."""
RESPONSE_BINS = 20
"""Log-spaced frequency bins in which a segment's response is smoothed."""


def _fft_freqs(n: int, sample_rate_hz: float) -> NDArray[np.float64]:
    """Frequencies k·f_s/n of the rfft of n samples (k = 0 … n//2), Hz."""
    return np.arange(n // 2 + 1) * float(sample_rate_hz) / max(int(n), 1)


def spectral_response(
    measured: list[SegmentNoise],
    target: list[NDArray[np.float64]],
    bounds: list[tuple[int, int]],
    sample_rate_hz: float,
) -> list[NDArray[np.float64] | None] | None:
    """The residual estimator's response of every segment: the power it measures on noise realisations
    drawn with the current spectra over the data's power ``target``, per FFT frequency, averaged over the
    realisations and smoothed as the median in :data:`RESPONSE_BINS` log-frequency bins
    (docs/mapmaking.md#map-noise).

    Per segment rather than pooled: how much of the other segments' map noise a segment's residual
    holds depends on how many segments cross it (a pooled response left maps of few segments per
    pixel 6–8 % high in RMS).

    Parameters
    ----------
    measured : list of SegmentNoise
        :func:`residual_segment_noise` of noise-only realisations drawn with the current spectra.
    target : list of ndarray
        Fourier amplitudes of the data's residual spectra (:func:`_amplitudes`).
    bounds : list of (start, stop)
        Sample ranges of the segments.
    sample_rate_hz : float

    Returns
    -------
    list or None
        Per segment, the response at its FFT frequencies (None for a segment without a measured
        spectrum); None when no segment has one.
    """
    per_seg: dict[int, list] = {}
    for sim in measured:
        for j, (a, b) in enumerate(bounds):
            if sim.spectra[j] is None or not math.isfinite(float(sim.sigma_white[j])):
                continue
            p_target = target[j] ** 2
            p_out = _amplitudes(b - a, float(sim.sigma_white[j]), sim.spectra[j], sample_rate_hz) ** 2
            with np.errstate(divide="ignore", invalid="ignore"):
                per_seg.setdefault(j, []).append(np.where(p_target > 0, p_out / p_target, np.nan))
    if not per_seg:
        return None
    out = []
    for j, (a, b) in enumerate(bounds):
        if j not in per_seg:
            out.append(None)
            continue
        stack = np.stack(per_seg[j])
        finite = np.isfinite(stack)
        n_ok = finite.sum(axis=0)
        r = np.where(n_ok > 0, np.where(finite, stack, 0.0).sum(axis=0) / np.maximum(n_ok, 1), np.nan)
        f = _fft_freqs(b - a, sample_rate_hz)
        ok = np.isfinite(r) & (f > 0)
        if ok.sum() < 2:
            out.append(None)
            continue
        edges = np.geomspace(f[ok].min(), f[ok].max() * (1 + 1e-9), RESPONSE_BINS + 1)
        which = np.clip(np.searchsorted(edges, f[ok], side="right") - 1, 0, RESPONSE_BINS - 1)
        cen, val = [], []
        for k in range(RESPONSE_BINS):
            sel = which == k
            if sel.any():
                cen.append(float(np.sqrt(edges[k] * edges[k + 1])))
                val.append(float(np.median(r[ok][sel])))
        out.append(
            np.exp(np.interp(np.log(np.maximum(f, cen[0])), np.log(cen), np.log(np.clip(val, 0.2, 5.0))))
        )
    return out


@dataclass
class MapNoise:
    """The noise of one map (docs/mapmaking.md#map-noise).

    Attributes
    ----------
    rms, rms_white : ndarray, shape (n_pixels,)
        Total and white-only rms per pixel, K (NaN where unseen).
    ratio_median : float
        Median of ``rms/rms_white`` over the seen pixels.
    n_realisations : int
    seed : tuple
    wall_time_s : float
    """

    rms: NDArray[np.float64]
    rms_white: NDArray[np.float64]
    ratio_median: float
    n_realisations: int
    seed: tuple = field(default_factory=tuple)
    wall_time_s: float = 0.0


def _smooth_on_grid(
    ratio: NDArray[np.float64],
    hit: NDArray[np.integer],
    shape: tuple[int, int],
    sigma_pix: float,
    n_realisations: int,
) -> NDArray[np.float64]:
    """Edge-preserving (bilateral) average of the variance ratios ``ratio`` (one per hit pixel) over the hit
    pixels of the grid (docs/mapmaking.md#map-noise).

    Neighbour j of pixel i gets the weight ``exp(−d²/2σ_pix²) · exp(−(ln r_i − ln r_j)²/2s²)`` with
    ``s = 2 sqrt(2/n)``, twice the scatter of ln r of one pixel with n realisations: ratios that differ by
    their noise are averaged, ratios that differ by far more (the edge of a region seen from one scan
    direction) are not. The average is taken of the ratios themselves, which are unbiased.
    """
    ny, nx = shape
    grid = np.full(ny * nx, np.nan)
    grid[hit] = ratio
    grid = grid.reshape(shape)
    seen = np.isfinite(grid) & (grid > 0)
    logr = np.where(seen, np.log(np.where(seen, grid, 1.0)), 0.0)
    s2 = 2.0 * (2.0 * math.sqrt(2.0 / max(int(n_realisations), 1))) ** 2
    radius = int(math.ceil(3 * sigma_pix))
    num = np.zeros(shape)
    den = np.zeros(shape)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            w_space = math.exp(-(dx * dx + dy * dy) / (2 * sigma_pix**2))
            if w_space < 1e-3:
                continue
            ys = slice(max(dy, 0), ny + min(dy, 0))  # neighbour rows
            yt = slice(max(-dy, 0), ny + min(-dy, 0))  # target rows
            xs = slice(max(dx, 0), nx + min(dx, 0))
            xt = slice(max(-dx, 0), nx + min(-dx, 0))
            ok = seen[ys, xs] & seen[yt, xt]
            w = np.where(ok, w_space * np.exp(-((logr[ys, xs] - logr[yt, xt]) ** 2) / s2), 0.0)
            num[yt, xt] += w * np.where(ok, grid[ys, xs], 0.0)
            den[yt, xt] += w
    out = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)
    return out.ravel()[hit]


def monte_carlo_rms(
    noise: SegmentNoise,
    *,
    pixels: NDArray[np.integer],
    weights: NDArray[np.float32],
    map_weights: NDArray[np.float32],
    segment_starts: NDArray[np.integer],
    white_rms: NDArray[np.float64],
    hit: NDArray[np.integer],
    shape: tuple[int, int],
    n_realisations: int,
    seed: tuple,
    destriper: dict[str, Any],
    ranks: Any = None,
    segment_ids: NDArray[np.integer] | None = None,
) -> MapNoise:
    """Map rms from noise-only realisations through the same destriper (docs/mapmaking.md#map-noise).

    Parameters
    ----------
    noise : SegmentNoise
        Per-segment white rms (K) and spectra of the data that were destriped.
    pixels, weights, map_weights, segment_starts
        The destriper's inputs of the map (its TOD is replaced by noise).
    white_rms : ndarray, shape (n_hit,)
        ``1/sqrt(Σ w_map)`` per compressed pixel, K.
    hit : ndarray of int, shape (n_hit,)
        Full-grid index of every compressed pixel; ``shape`` the grid's (ny, nx).
    n_realisations : int
        Number of noise TODs; 0 returns the white rms.
    seed : tuple
        Seed of segment j in realisation k: ``default_rng((*seed, k, segment_ids[j]))``.
    destriper : dict
        Settings of the map's :func:`destripe` (offset_length, tol, max_iter, lambda_ridge, good_fraction);
        the tolerance is loosened to ``MC_TOL``.
    ranks : Ranks, optional
        The ranks of a distributed map (:class:`~modules.MapMaking.distributed.Ranks`): the inputs are this
        rank's segments, the maps are the whole map's (docs/mapmaking.md#distributed-map-making).
    segment_ids : ndarray of int, optional
        Index of each segment in the whole map (default 0 … n_segments − 1).

    Returns
    -------
    MapNoise
        ``rms² = rms_white² · S[var_mc / rms_white²]`` with S the Gaussian average over
        ``SMOOTH_SIGMA_PIX`` pixels, where ``var_mc`` is the mean square of the destriped noise maps.
    """
    t0 = time.perf_counter()
    n = int(pixels.size)
    n_hit = int(white_rms.size)
    seen = np.isfinite(white_rms)
    if n_realisations <= 0 or n_hit == 0:
        return MapNoise(white_rms.copy(), white_rms.copy(), 1.0, 0, tuple(seed), time.perf_counter() - t0)
    bounds = _segment_bounds(segment_starts, n)
    ids = np.arange(len(bounds)) if segment_ids is None else np.asarray(segment_ids)
    comm = getattr(ranks, "comm", None)
    amps = [
        _amplitudes(b - a, float(noise.sigma_white[k]), noise.spectra[k], noise.sample_rate_hz)
        for k, (a, b) in enumerate(bounds)
    ]
    sum_sq = np.zeros(n_hit)
    w_white = np.where(seen, 1.0 / np.where(seen, white_rms, 1.0) ** 2, 0.0)
    used = (weights > 0) | (map_weights > 0)

    def realisation(key: int, amplitudes: list[NDArray[np.float64]]):
        tod = noise_realisation((*seed, key), ids, bounds, amplitudes, n)
        tod[~used] = 0.0
        res = destripe(
            tod,
            pixels,
            weights,
            int(destriper["offset_length"]),
            n_hit,
            tol=max(float(destriper["tol"]), MC_TOL),
            max_iter=int(destriper["max_iter"]),
            segment_starts=segment_starts,
            map_weights=map_weights,
            lambda_ridge=float(destriper["lambda_ridge"]),
            good_fraction=float(destriper["good_fraction"]),
            comm=comm,
        )
        return tod, res

    # The residual's spectrum also holds the other segments' map noise along the segment's track: measure
    # that bias on noise of known spectrum and divide it out (docs/mapmaking.md#map-noise step 5).
    data_amps = amps
    for iteration in range(CALIBRATION_ITERATIONS):
        calibration = []
        for j in range(CALIBRATION_REALISATIONS):
            tod, res = realisation(CALIBRATION_KEY + CALIBRATION_REALISATIONS * iteration + j, amps)
            calibration.append(
                residual_segment_noise(
                    tod,
                    pixels,
                    weights,
                    map_weights,
                    segment_starts,
                    res,
                    int(destriper["offset_length"]),
                    noise.sample_rate_hz,
                    segment_ids=ids,
                )
            )
        # the estimator's output on noise drawn with ``amps`` against the data's: the next guess of the
        # noise spectrum is the current one times data/measured (a fixed-point iteration)
        response = spectral_response(calibration, data_amps, bounds, noise.sample_rate_hz)
        if ranks is not None and ranks.any(response is not None):
            if response is None:  # no measured spectrum on this rank; the others go on
                continue
        elif response is None:
            break
        amps = [a if r is None else a / np.sqrt(r) for a, r in zip(amps, response)]
    for k in range(int(n_realisations)):
        _tod, res = realisation(k, amps)
        # the map's zero level is not constrained by the data (the destriper's gauge fixes it by
        # convention), so the noise of the map is that of its departures from its weighted mean
        m = np.where(seen, np.nan_to_num(res.map), 0.0)
        m[seen] -= float(np.sum(m[seen] * w_white[seen]) / np.sum(w_white[seen]))
        sum_sq += m**2
    var_mc = sum_sq / float(n_realisations)
    ratio = np.ones(n_hit)
    ratio[seen] = var_mc[seen] / white_rms[seen] ** 2
    smooth = np.ones(n_hit)
    if seen.any():
        smooth[seen] = _smooth_on_grid(
            ratio[seen], np.asarray(hit)[seen], shape, SMOOTH_SIGMA_PIX, int(n_realisations)
        )
    rms = np.where(seen, white_rms * np.sqrt(np.maximum(smooth, 0.0)), np.nan)
    ratio_median = float(np.median(np.sqrt(smooth[seen]))) if seen.any() else 1.0
    wall = time.perf_counter() - t0
    if ranks is None or ranks.is_root:
        log.info(
            "map noise: %d noise realisations, median RMS/RMS_WHITE %.3f, %.1f s",
            int(n_realisations),
            ratio_median,
            wall,
        )
    return MapNoise(rms, white_rms.copy(), ratio_median, int(n_realisations), tuple(seed), wall)
