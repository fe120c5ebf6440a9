"""The RRL cube reader (docs/mapmaking.md).

Level 2 holds only binned data, so the cube reader goes back to level 1 for the **native channels
around each line**. A **pre-pass** reads small level-2 datasets (frequencies, scan edges, noise
statistics, calibration) and accepts or rejects every segment (file, feed, scan) for every line,
counting the reasons. The **read** then, per accepted segment and line:

1. reads the channel window ``tod[feed, band, i_lo:i_hi, start:stop]`` from level 1 (one
   hyperslab), drops the samples whose level-2 sample flags exclude them
   (docs/level2.md#sample-flags), divides by the vane gain interpolated to the scan
   (docs/level2.md#calibration-per-scan) and by the calibration factor, and weights each channel
   by ``1/σ_k²`` from the level-1 white noise (``AUTO_RMS``);
2. subtracts each channel's level over the scan, from its quiet samples chosen without their own
   noise (docs/mapmaking.md#channel-levels);
3. subtracts a polynomial baseline in velocity fitted to the line-free channels of every sample
   (``continuum_subtraction='spectrum'``), keeping its constant term for the CONTINUUM image, and
   flags a line whose line-free channels with weight lie on one side only
   (docs/mapmaking.md#masked-channels);
4. regrids the channels onto the LSRK radio-velocity grid with linear weights and accumulates
   ``Σ f w y`` and ``Σ f w`` per pixel and velocity channel (Cython ``bin_cube``), or per sample for
   the per-channel destriper, with the noise variance of ``Σ f w y`` propagated through the levels,
   the baseline and the deposit (docs/mapmaking.md#noise-of-the-cube).

One worker handles one file and returns accumulators over the pixels that file hits; the
coordinator adds them on the union of hit pixels, so memory follows the observed area
(docs/mapmaking.md#performance-and-memory).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import h5py
import numpy as np
from numpy.typing import NDArray

from modules.MapMaking.read_data import Level2DataReader, frame_coordinates, run_file_tasks
from modules.MapMaking.segments import ELEVATION_REASON, SegmentSelection, elevation_ok, scan_table
from modules.pipeline_control.streaming import interpolate_vane_events
from utils.level1 import TOD, Level1File
from utils.level2 import (
    AUTO_RMS,
    CHANNEL_MASK,
    FREQUENCY,
    LEVEL1_FEED_INDEX,
    PIXEL_DEC,
    PIXEL_RA,
    SCAN_EDGES,
    VANE_GAIN,
    VANE_MJD,
    excluded_samples,
    read_sample_flags,
)
from utils.rrl import SPEED_OF_LIGHT_KMS, lsrk_correction_kms
from utils.wcs import MapGeometry, world_to_pixel_index

log = logging.getLogger("comap.ReadLineData")

ContinuumMode = Literal["spectrum", "pixel", "none"]


# --------------------------------------------------------------------------------------------------
# Lines and the velocity grid
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LineSpec:
    """One line of a cube: its label (``H59a`` or ``31.22332GHz``) and rest frequency (GHz)."""

    label: str
    rest_freq_ghz: float


@dataclass(frozen=True)
class VelocityGrid:
    """The output LSRK radio-velocity grid ``v_j = v_c + (j − (n_v − 1)/2) Δv``
    (docs/mapmaking.md#velocity-regridding-and-accumulation)."""

    center_kms: float
    step_kms: float
    n_v: int

    @classmethod
    def build(cls, center_kms: float, halfwidth_kms: float, step_kms: float) -> VelocityGrid:
        """``n_v = 2 ceil(halfwidth/Δv) + 1`` channels centred on ``center_kms``."""
        if not (step_kms > 0 and halfwidth_kms > 0):
            raise ValueError("velocity step and half-width must be > 0")
        n_v = 2 * math.ceil(halfwidth_kms / step_kms - 1e-9) + 1
        return cls(float(center_kms), float(step_kms), int(n_v))

    @property
    def v0_kms(self) -> float:
        return self.center_kms - 0.5 * (self.n_v - 1) * self.step_kms

    @property
    def velocities_kms(self) -> NDArray[np.float64]:
        """Channel centres, shape (n_v,), km/s."""
        return self.v0_kms + self.step_kms * np.arange(self.n_v, dtype=np.float64)

    def deposit(self, v_kms: NDArray) -> tuple[NDArray[np.int32], NDArray[np.float64]]:
        """Linear-interpolation weights of input velocities: ``(⌊u⌋, 1 − (u − ⌊u⌋))`` with
        ``u = (v − v_0)/Δv``; the remaining fraction goes to ``⌊u⌋ + 1``."""
        u = (np.asarray(v_kms, dtype=np.float64) - self.v0_kms) / self.step_kms
        j = np.floor(u)
        return j.astype(np.int32), 1.0 - (u - j)


# --------------------------------------------------------------------------------------------------
# Settings and plans
# --------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class LineReaderSettings(SegmentSelection):
    """Everything the cube reader needs to know about one cube (picklable): the shared segment
    cuts, the lines, the velocity grid and the spectral processing (see CreateLineMap)."""

    lines: tuple[LineSpec, ...]
    grid: VelocityGrid
    halfwidth_kms: float
    line_mask_kms: tuple[float, float]
    baseline_order: int
    continuum_subtraction: str
    channel_rms_cap_k: float
    alpha_min: float | None
    per_sample: bool
    level_stride: int
    quiet_fraction: float
    mask_center_kms: float | None = None  # the velocity the mask is relative to; default the grid's
    per_line: bool = False
    """Keep one accumulator per line (shape (n_lines, n_hit, n_v)) for smoothing to a common beam
    before stacking (docs/mapmaking.md#common-beam-stacking)."""

    @property
    def n_accumulators(self) -> int:
        return len(self.lines) if self.per_line else 1

    @property
    def mask_kms(self) -> tuple[float, float]:
        """The line mask in absolute LSRK velocity (km/s), about the requested centre (the grid's
        centre may have moved onto a native channel)."""
        c = self.grid.center_kms if self.mask_center_kms is None else self.mask_center_kms
        return c + float(self.line_mask_kms[0]), c + float(self.line_mask_kms[1])


@dataclass(frozen=True)
class LineUse:
    """One line of a segment: which line, in which band, binned channel and calibration factor."""

    line: int
    band: int
    bin: int
    factor: float


@dataclass
class LineSegmentPlan:
    """One accepted segment (file, feed, scan) and the lines it contributes to."""

    obsid: int
    path: str
    level1_path: str
    feed: int
    ifeed: int
    l1_pos: int
    scan: int
    start: int
    stop: int
    mjd_mid: float
    v_corr_kms: float
    uses: list[LineUse]

    @property
    def n(self) -> int:
        return self.stop - self.start


def _median_radec(ra_deg: NDArray, dec_deg: NDArray) -> tuple[float, float]:
    """Median pointing with RA taken about its first value (no wrap at 0/360)."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    ra = ra[np.isfinite(ra)]
    dec = np.asarray(dec_deg, dtype=np.float64)
    dec = dec[np.isfinite(dec)]
    if ra.size == 0 or dec.size == 0:
        return float("nan"), float("nan")
    med = (ra[0] + np.median((ra - ra[0] + 180.0) % 360.0 - 180.0)) % 360.0
    return float(med), float(np.median(dec))


def line_band(freq_ghz: NDArray, rest_freq_ghz: float) -> int | None:
    """The band whose channel boxes contain ``rest_freq_ghz`` (``freq_ghz`` is (B, C)), or None."""
    for b in range(freq_ghz.shape[0]):
        f = freq_ghz[b]
        half = 0.5 * float(np.median(np.abs(np.diff(f)))) if f.size > 1 else 0.0
        if float(np.min(f)) - half <= rest_freq_ghz <= float(np.max(f)) + half:
            return b
    return None


def line_prepass_file(
    obs: Any, settings: LineReaderSettings, table: Any, flags: dict | None, counts: Counter
) -> list[LineSegmentPlan]:
    """Accept or reject every (feed, scan) segment of one file for every line (docs/mapmaking.md#reading);
    count reasons."""
    plans: list[LineSegmentPlan] = []
    level1_path = getattr(obs, "level1_path", None)
    if not level1_path or not os.path.isfile(level1_path):
        counts["level-1 file missing"] += 1
        return plans
    with h5py.File(obs.level2_path, "r", locking=False) as l2:
        for name in (AUTO_RMS, VANE_GAIN, settings.noise_group, SCAN_EDGES):
            if name not in l2:
                counts[f"level-2 file lacks {name}"] += 1
                return plans
        l1_index = np.asarray(l2[LEVEL1_FEED_INDEX][...], dtype=int)
        scans = scan_table(l2)
        if scans is None:
            counts["no scans"] += 1
            return plans
        freq = np.asarray(l2[FREQUENCY][...], dtype=np.float64)
        n_chan = freq.shape[1]
        ns = l2[settings.noise_group]
        n_bin = int(ns["sigma_red"].shape[2])
        line_bands: list[tuple[int, int, int]] = []  # (line index, band, bin)
        for i, line in enumerate(settings.lines):
            b = line_band(freq, line.rest_freq_ghz)
            if b is None:
                counts[f"line {line.label} outside every band"] += 1
                continue
            k0 = int(np.argmin(np.abs(freq[b] - line.rest_freq_ghz)))
            line_bands.append((i, b, min(k0 // max(1, n_chan // n_bin), n_bin - 1)))
        if not line_bands:
            return plans
        mjd_mid = scans.mjd_mid
        sigma_red = ns["sigma_red"][...]
        alpha = ns["alpha"][...] if "alpha" in ns else None
        # LSRK correction per scan at its mid-time and median pointing (all feeds), as the simulator
        ra_med, dec_med = [], []
        for a, b in scans.edges:
            step = max(1, int((b - a) // 2000))
            r, d = _median_radec(l2[PIXEL_RA][:, a:b:step].ravel(), l2[PIXEL_DEC][:, a:b:step].ravel())
            ra_med.append(r)
            dec_med.append(d)
        v_corr = np.atleast_1d(lsrk_correction_kms(np.array(ra_med), np.array(dec_med), mjd_mid))
        for ifeed, feed in enumerate(scans.feeds):
            if not settings.feed_selected(feed):
                counts["feed not selected"] += len(scans.edges)
                continue
            for s, (a, b) in enumerate(scans.edges):
                if not np.isfinite(v_corr[s]):
                    counts["pointing not finite"] += 1
                    continue
                if not elevation_ok(scans, ifeed, s):
                    counts[ELEVATION_REASON] += 1
                    continue
                uses: list[LineUse] = []
                reasons: list[str] = []
                for i, band, chan in line_bands:
                    if settings.flagged_bad(flags, feed, band, chan):
                        reasons.append("quality flag bad")
                        continue
                    factor, reason = settings.verdict(
                        table,
                        feed,
                        band,
                        chan,
                        mjd_mid[s],
                        sigma_red=float(sigma_red[ifeed, band, chan, s]),
                        alpha=float(alpha[ifeed, band, chan, s]) if alpha is not None else math.nan,
                        alpha_min=settings.alpha_min,
                    )
                    if factor is None:
                        reasons.append(reason)
                        continue
                    uses.append(LineUse(i, band, chan, factor))
                if not uses:
                    counts[reasons[0] if reasons else "no line in any band"] += 1
                    continue
                counts["accepted"] += 1
                plans.append(
                    LineSegmentPlan(
                        obsid=int(obs.obsid),
                        path=str(obs.level2_path),
                        level1_path=str(level1_path),
                        feed=int(feed),
                        ifeed=ifeed,
                        l1_pos=int(l1_index[ifeed]),
                        scan=s,
                        start=int(a),
                        stop=int(b),
                        mjd_mid=float(mjd_mid[s]),
                        v_corr_kms=float(v_corr[s]),
                        uses=uses,
                    )
                )
    return plans


# --------------------------------------------------------------------------------------------------
# Per-segment spectral processing
# --------------------------------------------------------------------------------------------------
def line_free_channels(v_kms: NDArray, dv_kms: NDArray, mask_kms: tuple[float, float]) -> NDArray[np.bool_]:
    """Channels whose whole box ``v ± |Δv|/2`` lies outside the line mask
    (docs/mapmaking.md#continuum-subtraction)."""
    half = 0.5 * np.abs(dv_kms)
    return (v_kms + half < mask_kms[0]) | (v_kms - half > mask_kms[1])


def channel_levels(
    y: NDArray[np.float32],
    proxy_channels: NDArray[np.bool_],
    stride: int = 1,
    quiet_fraction: float = 1.0,
) -> NDArray[np.float64]:
    """Per-channel level of a window ``y (n_win, n)`` (K) over a scan: the median of each channel over
    the scan's quietest samples (docs/mapmaking.md#channel-levels).

    With ``quiet_fraction`` q < 1 the samples are taken in pairs ``(2i, 2i + 1)``: the pairs whose
    even sample has a mean over ``proxy_channels`` (a continuum brightness) in the lowest q of the
    scan give their odd samples, and vice versa, and the level is the mean of the medians of the
    two halves. The sample that chooses is never the sample that is averaged, so the white noise
    that makes a sample look quiet does not bias the level (choosing and averaging the same samples
    biased every channel low by about 1.27 σ/√n_proxy at q = 0.25). Neighbouring samples see the
    same sky, so the choice still follows the emission. A line source that fills the scan then
    leaves the level of its faintest part, not its median. q = 1 is the plain median over the scan.
    All-NaN channels get level 0.
    """
    sub = y[:, :: max(1, int(stride))]
    q = float(quiet_fraction)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows and columns
        if q >= 1.0 or not proxy_channels.any() or sub.shape[1] < 4:
            level = np.nanmedian(sub, axis=1)
        else:
            n2 = sub.shape[1] // 2
            even, odd = sub[:, 0 : 2 * n2 : 2], sub[:, 1 : 2 * n2 : 2]
            halves = []
            for chooser, used in ((even, odd), (odd, even)):
                proxy = np.nanmean(chooser[proxy_channels], axis=0)
                finite = np.isfinite(proxy) & np.isfinite(used).any(axis=0)
                if not finite.any():
                    continue
                quiet = finite & (proxy <= np.quantile(proxy[finite], q))
                halves.append(np.nanmedian(used[:, quiet], axis=1))
            level = np.mean(halves, axis=0) if halves else np.nanmedian(sub, axis=1)
    return np.where(np.isfinite(level), level, 0.0)


@dataclass
class BaselineFit:
    """The weighted polynomial baseline of one window: ``coef = P y``; ``var(coef_0) = 1/w_const``."""

    design: NDArray[np.float64]  # (n_win, q+1)
    projector: NDArray[np.float64]  # (q+1, n_win)
    w_const: float


def baseline_fit(
    v_kms: NDArray, weights: NDArray, free: NDArray, center_kms: float, halfwidth_kms: float, order: int
) -> BaselineFit | None:
    """Weighted least-squares projector of a polynomial in ``(v − v_c)/halfwidth`` over the line-free
    channels with weight; None if fewer than ``order + 2`` such channels."""
    omega = np.where(free & (weights > 0), weights, 0.0)
    if int(np.count_nonzero(omega)) < order + 2:
        return None
    x = (np.asarray(v_kms, dtype=np.float64) - center_kms) / halfwidth_kms
    design = np.vander(x, order + 1, increasing=True)
    normal = design.T @ (omega[:, None] * design)
    try:
        inv = np.linalg.inv(normal)
    except np.linalg.LinAlgError:
        return None
    projector = inv @ (design.T * omega[None, :])
    return BaselineFit(design, projector, 1.0 / float(inv[0, 0]))


def subtract_baseline(y: NDArray[np.float32], fit: BaselineFit, weights: NDArray) -> NDArray[np.float64]:
    """``y ← (I − H) y`` in place for all samples of a window ``y (n_win, n)``; returns the constant
    term per sample, shape (n,). Samples with a NaN in a weighted channel become NaN everywhere."""
    used = fit.projector.any(axis=0)
    bad = np.isnan(y[weights > 0]).any(axis=0)
    y[:, bad] = np.nan
    y0 = np.where(used[:, None], y, 0.0)
    y0[:, bad] = 0.0
    coef = fit.projector @ y0  # (q+1, n)
    y -= (fit.design @ coef).astype(np.float32)
    const = coef[0]
    const[bad] = np.nan
    return const


ONE_SIDED_NOTE = "baseline one-sided"


def one_sided_baseline(
    v_kms: NDArray, weights: NDArray, free: NDArray[np.bool_], mask_kms: tuple[float, float]
) -> str:
    """``'low'`` or ``'high'`` when no weighted line-free channel lies on that side of the line mask
    (the baseline is then extrapolated across the line, docs/mapmaking.md#masked-channels), else ``''``."""
    used = free & (np.asarray(weights) > 0)
    v = np.asarray(v_kms, dtype=np.float64)
    if not (used & (v < mask_kms[0])).any():
        return "low"
    if not (used & (v > mask_kms[1])).any():
        return "high"
    return ""


def level_samples(n: int, settings: LineReaderSettings) -> float:
    """Effective number of samples behind each channel level (docs/mapmaking.md#channel-levels): the
    median of m samples has the variance of a mean of 2m/π, so two independent half medians of
    q n/2 samples each average to ``2 q n / π`` (the plain median over the strided scan:
    ``2 n / (π stride)``)."""
    m = max(1.0, n / max(1, settings.level_stride))
    q = float(settings.quiet_fraction)
    if q >= 1.0 or m < 4:
        return 2.0 * m / math.pi
    return max(1.0, 2.0 * q * m / math.pi)


def residual_noise_scale(y: NDArray[np.float32], weights: NDArray, fit: BaselineFit | None) -> float:
    """Measured over predicted white-noise variance of a processed window ``y (n_win, n)``
    (docs/mapmaking.md#noise-of-the-cube): the median over weighted channels of half the mean square
    of differences of sample pairs ``(2i, 2i + 1)``, over the variance ``[(I − H) diag(1/w) (I − H)ᵀ]_kk``
    the weights predict. The levels and the per-sample baseline have removed the sky and the
    gain drifts common to the channels, which the level-1 pair-difference rms still contains (a few
    per cent on a scan across a bright source). 1.0 when it cannot be measured."""
    w = np.asarray(weights, dtype=np.float64)
    used = w > 0
    n2 = y.shape[1] // 2
    if not used.any() or n2 < 10:
        return 1.0
    var = np.where(used, 1.0 / np.where(used, w, 1.0), 0.0)
    resid = np.eye(w.size) if fit is None else np.eye(w.size) - fit.design @ fit.projector
    predicted = (resid**2) @ var
    d = (y[used, 1 : 2 * n2 : 2] - y[used, 0 : 2 * n2 : 2]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN channels
        measured = 0.5 * np.nanmean(d**2, axis=1)
    ratio = measured / predicted[used]
    ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
    return float(np.median(ratio)) if ratio.size else 1.0


@dataclass
class WindowNoise:
    """Noise of one channel window after levels, baseline and regridding
    (docs/mapmaking.md#noise-of-the-cube).

    ``diag`` (n_v,) and ``cov`` (n_v, n_v) are the per-sample variance numerators ``[G C Gᵀ]`` of
    the regridded sums ``Σ f w y`` (K² K⁻⁴), with ``G = F diag(w)`` the deposit and ``C`` the
    covariance of the baseline-subtracted channels; ``level_diag`` is the same for the channel
    levels' error, common to every sample of the scan; ``ratio`` (n,) is each sample's noise
    variance relative to the scan's (its total power squared over the scan mean)."""

    diag: NDArray[np.float64]
    cov: NDArray[np.float64]
    level_diag: NDArray[np.float64]
    ratio: NDArray[np.float64]


def window_noise(
    weights: NDArray,
    fit: BaselineFit | None,
    j_lo: NDArray,
    f_lo: NDArray,
    n_v: int,
    n_level: float,
    power: NDArray,
) -> WindowNoise:
    """Propagate white channel noise ``σ_k² = 1/w_k`` through ``y ← (I − H)(y − level)`` and the linear
    deposit (docs/mapmaking.md#noise-of-the-cube). ``n_level`` is the effective number of samples
    behind each level (:func:`level_samples`); ``power`` (n,) the total power of each sample."""
    w = np.asarray(weights, dtype=np.float64)
    n_win = w.size
    var = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0.0)
    resid = np.eye(n_win) if fit is None else np.eye(n_win) - fit.design @ fit.projector
    c_white = (resid * var[None, :]) @ resid.T
    c_level = c_white * 0.0 if n_level <= 0 else (resid * (var / n_level)[None, :]) @ resid.T
    g = np.zeros((n_v, n_win))
    k = np.arange(n_win)
    for j, f in ((j_lo, f_lo), (j_lo + 1, 1.0 - f_lo)):
        inside = (j >= 0) & (j < n_v) & (f > 0)
        g[j[inside], k[inside]] = f[inside] * w[inside]
    cov = g @ c_white @ g.T
    level_diag = np.einsum("jk,kl,jl->j", g, c_level, g)
    p2 = np.asarray(power, dtype=np.float64) ** 2
    mean_p2 = float(np.nanmean(p2)) if np.isfinite(p2).any() else math.nan
    ratio = np.where(np.isfinite(p2) & (mean_p2 > 0), p2 / mean_p2, 1.0)
    return WindowNoise(np.diag(cov).copy(), cov, level_diag, ratio)


# --------------------------------------------------------------------------------------------------
# Reading one file (runs in a worker)
# --------------------------------------------------------------------------------------------------
@dataclass
class LineFileResult:
    """Accumulators of one file over the pixels it hits (``hit``: full-grid pixel indices)."""

    hit: NDArray[np.int64]
    acc_sum: NDArray[np.float64]
    acc_w: NDArray[np.float64]
    acc_q: NDArray[np.float64]
    hits: NDArray[np.int64]
    cont_sum: NDArray[np.float64]
    cont_w: NDArray[np.float64]
    counts: Counter
    bytes_read: int
    n_samples: int
    used: list[tuple[int, int, int]]  # (obsid, feed, scan) that contributed
    mjd: list[float]
    line_weight: NDArray[np.float64] | None = None
    samples: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    chan_cov: NDArray[np.float64] | None = None  # (n_v, n_v) Σ over samples of the noise covariance


def read_line_file(
    plans: list[LineSegmentPlan], settings: LineReaderSettings, geometry: MapGeometry
) -> LineFileResult:
    """Read, calibrate, baseline-subtract and regrid every accepted segment of one file."""
    from utils.kernels.cube_ops import bin_cube, regrid_samples

    path = plans[0].path
    grid = settings.grid
    n_v = grid.n_v
    counts: Counter = Counter()
    notes: list[str] = []
    with h5py.File(path, "r", locking=False) as l2, Level1File(plans[0].level1_path, count_bytes=True) as l1:
        freq = np.asarray(l2[FREQUENCY][...], dtype=np.float64)
        chan_width = np.abs(np.gradient(freq, axis=1)) if freq.shape[1] > 1 else np.full(freq.shape, np.nan)
        channel_mask = l2[CHANNEL_MASK] if CHANNEL_MASK in l2 else None
        vane_mjd = np.asarray(l2[VANE_MJD][...], dtype=np.float64)
        vane_gain = l2[VANE_GAIN]
        auto_rms = l2[AUTO_RMS]
        tod_chunks = l1.file[TOD].chunks
        chunk_channels = int(tod_chunks[2]) if tod_chunks else 1
        pix_full = []
        dropped = []
        for p in plans:
            ra = l2[PIXEL_RA][p.ifeed, p.start : p.stop]
            dec = l2[PIXEL_DEC][p.ifeed, p.start : p.stop]
            lon, lat = frame_coordinates(ra, dec, geometry.frame)
            pix = world_to_pixel_index(geometry, lon, lat)
            excluded = excluded_samples(read_sample_flags(l2, p.ifeed, slice(p.start, p.stop)))
            pix[excluded] = -1  # excluded samples reach neither the cube nor the scan levels
            pix_full.append(pix)
            dropped.append(excluded)
        allpix = np.concatenate(pix_full) if pix_full else np.zeros(0, np.int64)
        hit = np.unique(allpix[allpix >= 0])
        n_hit = hit.size
        shape = (settings.n_accumulators, n_hit, n_v) if settings.per_line else (n_hit, n_v)
        acc_sum = np.zeros(shape)
        acc_w = np.zeros(shape)
        acc_q = np.zeros(shape)
        hits = np.zeros(n_hit, dtype=np.int64)
        cont_sum = np.zeros(n_hit)
        cont_w = np.zeros(n_hit)
        sample_parts: list[dict[str, Any]] = []
        line_weight = np.zeros(len(settings.lines))
        used: list[tuple[int, int, int]] = []
        mjds: list[float] = []
        n_samples = 0
        truncated: set[str] = set()
        one_sided: dict[str, set[str]] = {}
        chan_cov = np.zeros((n_v, n_v))
        lo_mask, hi_mask = settings.mask_kms
        v_need = settings.halfwidth_kms + grid.step_kms
        for p, pix, excluded in zip(plans, pix_full, dropped):
            local = np.full(pix.shape, -1, dtype=np.int32)
            on_map = pix >= 0
            local[on_map] = np.searchsorted(hit, pix[on_map]).astype(np.int32)
            touched = np.zeros(p.n, dtype=np.uint8)
            if settings.per_sample:
                s_sum = np.zeros((p.n, n_v))
                s_w = np.zeros((p.n, n_v))
                s_q = np.zeros((p.n, n_v))
            windows: list[tuple[LineUse, int, int, NDArray]] = []
            for use in p.uses:
                line = settings.lines[use.line]
                nu0 = line.rest_freq_ghz
                v_all = SPEED_OF_LIGHT_KMS * (nu0 - freq[use.band]) / nu0 + p.v_corr_kms
                need = np.abs(v_all - grid.center_kms) <= v_need
                if not need.any():
                    counts[f"line {line.label}: no channel in the velocity window"] += 1
                    continue
                idx = np.flatnonzero(need)
                windows.append((use, int(idx[0]), int(idx[-1]) + 1, v_all))
                covered = (v_all.min() - grid.center_kms, v_all.max() - grid.center_kms)
                if (covered[0] > -v_need or covered[1] < v_need) and line.label not in truncated:
                    truncated.add(line.label)
                    notes.append(
                        f"{line.label}: velocity window truncated at the edge of band {use.band} "
                        f"({covered[0]:+.0f}…{covered[1]:+.0f} km/s about the centre)"
                    )
            reads = _group_reads([(u.band, a, b) for u, a, b, _v in windows], chunk_channels)
            blocks: dict[tuple[int, int, int], NDArray[np.float32]] = {}
            for use, i_lo, i_hi, v_all in windows:
                line = settings.lines[use.line]
                nu0 = line.rest_freq_ghz
                v_k = v_all[i_lo:i_hi]
                dv_k = SPEED_OF_LIGHT_KMS * chan_width[use.band, i_lo:i_hi] / nu0
                gain = interpolate_vane_events(
                    vane_mjd, vane_gain[:, p.ifeed, use.band, i_lo:i_hi], p.mjd_mid
                )
                sigma = np.asarray(auto_rms[p.ifeed, use.band, i_lo:i_hi, p.scan], dtype=np.float64)
                sigma /= use.factor
                ok = np.isfinite(sigma) & (sigma > 0) & (sigma <= settings.channel_rms_cap_k)
                ok &= np.isfinite(gain) & (gain > 0)
                if channel_mask is not None:
                    ok &= np.asarray(channel_mask[p.ifeed, use.band, i_lo:i_hi], dtype=bool)
                w = np.where(ok, 1.0 / np.where(ok, sigma, 1.0) ** 2, 0.0)
                if not ok.any():
                    counts[f"line {line.label}: no usable channel"] += 1
                    continue
                band, lo, hi = reads[(use.band, i_lo, i_hi)]
                if (band, lo, hi) not in blocks:  # one hyperslab per group of windows sharing chunks
                    blocks[(band, lo, hi)] = l1.tod_block(
                        p.l1_pos, band, slice(lo, hi), slice(p.start, p.stop)
                    )
                raw = blocks[(band, lo, hi)][i_lo - lo : i_hi - lo]
                scale = np.where(ok, 1.0 / (np.where(ok, gain, 1.0) * use.factor), np.nan)
                y = raw * scale.astype(np.float32)[:, None]
                y[:, excluded] = np.nan
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (excluded) samples
                    power = np.nanmean(y[ok], axis=0)  # total power per sample (K)
                level = channel_levels(y, ok, settings.level_stride, settings.quiet_fraction)
                y -= level.astype(np.float32)[:, None]
                fit = None
                if settings.continuum_subtraction == "spectrum":
                    free = line_free_channels(v_k, dv_k, (lo_mask, hi_mask))
                    fit = baseline_fit(
                        v_k, w, free, grid.center_kms, settings.halfwidth_kms, settings.baseline_order
                    )
                    if fit is None:
                        counts["too few line-free channels"] += 1
                        continue
                    side = one_sided_baseline(v_k, w, free, (lo_mask, hi_mask))
                    if side:
                        one_sided.setdefault(line.label, set()).add(side)
                    const = subtract_baseline(y, fit, w)
                    good = np.isfinite(const) & (local >= 0)
                    np.add.at(cont_sum, local[good], fit.w_const * const[good])
                    np.add.at(cont_w, local[good], fit.w_const)
                w = w / residual_noise_scale(y, w, fit)
                j_lo, f_lo = grid.deposit(v_k)
                line_weight[use.line] += float(w.sum()) * int(np.count_nonzero(local >= 0))
                yt = np.ascontiguousarray(y.T, dtype=np.float32)
                noise = window_noise(w, fit, j_lo, f_lo, n_v, level_samples(y.shape[1], settings), power)
                valid = np.isfinite(y[w > 0]).all(axis=0)
                on = valid & (local >= 0)
                if settings.per_sample:
                    regrid_samples(yt, w, j_lo, f_lo, s_sum, s_w, np.zeros_like(s_q), touched)
                    s_q[valid] += noise.ratio[valid, None] * noise.diag[None, :]
                else:
                    k = use.line if settings.per_line else slice(None)
                    bin_cube(yt, local, w, j_lo, f_lo, acc_sum[k], acc_w[k], np.zeros_like(acc_q[k]), touched)
                    np.add.at(acc_q[k], local[on], noise.ratio[on, None] * noise.diag[None, :])
                # the level's error is common to every sample of the scan: coherent per pixel
                n_pix = np.bincount(local[on], minlength=n_hit).astype(np.float64)
                level_q = n_pix[:, None] ** 2 * noise.level_diag[None, :]
                if settings.per_line and not settings.per_sample:
                    acc_q[use.line] += level_q
                else:
                    acc_q += level_q
                chan_cov += float(noise.ratio[on].sum()) * noise.cov
            counted = (touched > 0) & (local >= 0)
            if not counted.any():
                continue
            hits += np.bincount(local[counted], minlength=n_hit).astype(np.int64)
            used.append((p.obsid, p.feed, p.scan))
            mjds.append(p.mjd_mid)
            n_samples += int(counted.sum())
            if settings.per_sample:
                on = local >= 0
                np.add.at(acc_sum, local[on], s_sum[on])
                np.add.at(acc_w, local[on], s_w[on])
                np.add.at(acc_q, local[on], s_q[on])
                # off-map samples stay (pixel −1, zero weight) so that offsets keep their length
                off = ~on
                s_w[off] = 0.0
                s_q[off] = 0.0
                sample_parts.append(
                    {
                        "sum": s_sum.astype(np.float32),
                        "w": s_w.astype(np.float32),
                        "q": s_q.astype(np.float32),
                        "pixels": pix,
                    }
                )
        bytes_read = int(l1.bytes_read_tod)
    for label, sides in one_sided.items():
        notes.append(f"{label}: {ONE_SIDED_NOTE} ({', '.join(sorted(sides))} side has no weighted channel)")
    samples = None
    if settings.per_sample:
        samples = {
            "parts": sample_parts,
        }
    return LineFileResult(
        hit=hit,
        acc_sum=acc_sum,
        acc_w=acc_w,
        acc_q=acc_q,
        hits=hits,
        cont_sum=cont_sum,
        cont_w=cont_w,
        counts=counts,
        bytes_read=bytes_read,
        n_samples=n_samples,
        used=used,
        mjd=mjds,
        line_weight=line_weight,
        samples=samples,
        notes=notes,
        chan_cov=chan_cov,
    )


def _group_reads(
    windows: list[tuple[int, int, int]], chunk_channels: int
) -> dict[tuple[int, int, int], tuple[int, int, int]]:
    """Map each channel window ``(band, lo, hi)`` to the hyperslab that reads it: windows of one band
    that touch a common chunk of ``chunk_channels`` channels are read together, once."""
    out: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    c = max(1, int(chunk_channels))
    for band in sorted({w[0] for w in windows}):
        group: list[tuple[int, int, int]] = []
        lo = hi = 0
        for w in sorted(w for w in windows if w[0] == band):
            if group and w[1] // c <= (hi - 1) // c:
                group.append(w)
                hi = max(hi, w[2])
                continue
            for g in group:
                out[g] = (band, lo, hi)
            group, lo, hi = [w], w[1], w[2]
        for g in group:
            out[g] = (band, lo, hi)
    return out


def _read_line_task(args) -> LineFileResult:
    plans, settings, geometry = args
    return read_line_file(plans, settings, geometry)


# --------------------------------------------------------------------------------------------------
# All files
# --------------------------------------------------------------------------------------------------
@dataclass
class LineAccumulation:
    """The merged accumulators of a cube over its hit pixels (``hit``: full-grid indices)."""

    hit: NDArray[np.int64]
    acc_sum: NDArray[np.float64]  # (n_hit, n_v); (n_lines, n_hit, n_v) with settings.per_line
    acc_w: NDArray[np.float64]
    acc_q: NDArray[np.float64]
    hits: NDArray[np.int64]
    cont_sum: NDArray[np.float64]
    cont_w: NDArray[np.float64]
    counts: Counter
    bytes_read: int
    n_samples: int
    used: list[tuple[int, int, int]]
    mjd_range: tuple[float, float]
    line_weight: NDArray[np.float64] | None = None
    samples: list[dict[str, Any]] | None = None
    segment_starts: NDArray[np.int64] | None = None
    notes: list[str] = field(default_factory=list)
    chan_cov: NDArray[np.float64] | None = None


def read_line_segments(
    plans: list[LineSegmentPlan],
    settings: LineReaderSettings,
    geometry: MapGeometry,
    *,
    executor=None,
    progress=None,
) -> LineAccumulation:
    """Read every accepted segment (files in parallel through ``executor``) and merge the results."""
    by_file: dict[str, list[LineSegmentPlan]] = {}
    for p in plans:
        by_file.setdefault(p.path, []).append(p)
    tasks = [(segs, settings, geometry) for segs in by_file.values()]
    results = run_file_tasks(
        _read_line_task, tasks, [t[0][0].level1_path for t in tasks], executor=executor, progress=progress
    )
    done = [r for r in results if r is not None]
    hit = np.unique(np.concatenate([r.hit for r in done])) if done else np.zeros(0, np.int64)
    n_v = settings.grid.n_v
    shape = (settings.n_accumulators, hit.size, n_v) if settings.per_line else (hit.size, n_v)
    acc_sum = np.zeros(shape)
    acc_w = np.zeros(shape)
    acc_q = np.zeros(shape)
    hits = np.zeros(hit.size, dtype=np.int64)
    cont_sum = np.zeros(hit.size)
    cont_w = np.zeros(hit.size)
    counts: Counter = Counter()
    used: list[tuple[int, int, int]] = []
    mjds: list[float] = []
    notes: list[str] = []
    samples: list[dict[str, Any]] | None = [] if settings.per_sample else None
    line_weight = np.zeros(len(settings.lines))
    chan_cov = np.zeros((n_v, n_v))
    for r in done:
        if r.line_weight is not None:
            line_weight += r.line_weight
        idx = np.searchsorted(hit, r.hit)
        acc_sum[..., idx, :] += r.acc_sum
        acc_w[..., idx, :] += r.acc_w
        acc_q[..., idx, :] += r.acc_q
        hits[idx] += r.hits
        cont_sum[idx] += r.cont_sum
        cont_w[idx] += r.cont_w
        counts.update(r.counts)
        used.extend(r.used)
        mjds.extend(r.mjd)
        notes.extend(n for n in r.notes if n not in notes)
        if r.chan_cov is not None:
            chan_cov += r.chan_cov
        if samples is not None and r.samples is not None:
            samples.extend(r.samples["parts"])
    starts = None
    if samples is not None:
        sizes = [len(s["pixels"]) for s in samples]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return LineAccumulation(
        hit=hit,
        acc_sum=acc_sum,
        acc_w=acc_w,
        acc_q=acc_q,
        hits=hits,
        cont_sum=cont_sum,
        cont_w=cont_w,
        counts=counts,
        bytes_read=sum(r.bytes_read for r in done),
        n_samples=sum(r.n_samples for r in done),
        used=used,
        mjd_range=(min(mjds), max(mjds)) if mjds else (float("nan"), float("nan")),
        line_weight=line_weight,
        samples=samples,
        segment_starts=starts,
        notes=notes,
        chan_cov=chan_cov,
    )


class LineDataReader(Level2DataReader):
    """The cube reader of one cube (docs/mapmaking.md#reading): pre-pass, read and merge.

    Parameters
    ----------
    settings : LineReaderSettings
    calibration_table : CalibrationTable or None
        Calibration factors of the binned channel containing each line.
    quality_flags : dict
        obsid → {(feed, band, binned channel): is_good}; a missing entry counts as good.
    """

    prepass_file = staticmethod(line_prepass_file)
    read_segments = staticmethod(read_line_segments)


__all__ = [
    "ContinuumMode",
    "LineAccumulation",
    "LineDataReader",
    "LineReaderSettings",
    "LineSegmentPlan",
    "LineSpec",
    "LineUse",
    "VelocityGrid",
    "baseline_fit",
    "channel_levels",
    "line_band",
    "line_free_channels",
    "line_prepass_file",
    "read_line_segments",
    "subtract_baseline",
]
