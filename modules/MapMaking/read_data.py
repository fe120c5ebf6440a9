"""Level2DataReader: the continuum map maker's reader of level-2 files (docs/mapmaking.md#level2datareader).

A **pre-pass** reads only small datasets (feeds, scan edges, MJD at scan boundaries, central
frequencies, noise statistics) and accepts or rejects every segment (file, feed, scan), counting
the reasons. The **read** then takes each accepted segment's samples of one (band, channel),
zero-weights the samples whose level-2 sample flags exclude them (docs/level2.md#sample-flags) and, for
the ``scan_direction`` split, those sweeping the other way in azimuth,
calibrates them to K_RJ, weights, detrends, flags spikes, down-weights bright-source samples (flag 16)
in the destriper, converts the pointing to the map frame and to pixel indices, and appends them to
arrays allocated once at the exact size.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from modules.MapMaking.segments import ELEVATION_REASON, SegmentSelection, elevation_ok, scan_table
from utils.coordinates import icrs_to_galactic
from utils.h5io import RetryH5PY
from utils.level2 import (
    BANDWIDTHS,
    CENTRAL_FREQS,
    PIXEL_AZ,
    PIXEL_DEC,
    PIXEL_EL,
    PIXEL_RA,
    bright_source_samples,
    excluded_samples,
    read_sample_flags,
)
from utils.wcs import MapGeometry, world_to_pixel_index

log = logging.getLogger("comap.ReadData")

Detrend = Literal["median", "linear", "legendre", "none"]


@dataclass(kw_only=True)
class ChannelSelection(SegmentSelection):
    """The segment cuts of one binned channel (picklable): the shared cuts, the white-noise cap
    and the 1/f knee limit (docs/mapmaking.md#pre-pass-and-segment-selection).

    Parameters
    ----------
    band, channel : int
        Band and binned channel.
    auto_rms_cap_k : float
        Segments whose white-noise rms (K) is not finite, <= 0 or above this are dropped.
    fknee_max_hz : float or None
        Segments whose knee frequency (Hz) exceeds this are dropped (None: no limit).
    """

    band: int
    channel: int
    auto_rms_cap_k: float
    fknee_max_hz: float | None


@dataclass(kw_only=True)
class ReaderSettings(ChannelSelection):
    """Everything the continuum reader needs to know about one map (picklable): the segment cuts,
    detrending, spike flagging and the solver weight of bright-source samples (see CreateMap for the
    meanings). ``scan_direction`` (+1, −1 or None) keeps only the samples whose azimuth increases /
    decreases (:func:`scan_direction_samples`), for the ``scan_direction`` split."""

    detrend: str
    detrend_order: int
    detrend_mask_abs_b_deg: float
    spike_sigma: float | None
    spike_medfilt_length: int
    spike_dilate: int
    bright_downweight: float
    write_mean_azel: bool
    scan_direction: int | None


@dataclass
class SegmentPlan:
    """One accepted segment (file, feed, scan) and the numbers its read needs."""

    obsid: int
    path: str
    feed: int
    ifeed: int
    scan: int
    start: int
    stop: int
    mjd_mid: float
    auto_rms_k: float
    factor: float
    freq_ghz: float
    bandwidth_ghz: float

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class ReaderOutput:
    """Concatenated samples of all accepted segments (docs/mapmaking.md#per-segment-processing "Reader
    output")."""

    tod: np.ndarray
    pixels: np.ndarray
    weights: np.ndarray
    map_weights: np.ndarray
    segment_starts: np.ndarray
    obsids: list[int]
    feeds: list[int]
    mjd_range: tuple[float, float]
    freq_ghz: float
    bandwidth_ghz: float
    n_segments: int
    mean_azel_mjd: tuple[float, float, float] | None = None
    counts: Counter = field(default_factory=Counter)
    plans: list[SegmentPlan] = field(default_factory=list)
    sample_rate_hz: float = float("nan")
    azelmjd_sums: np.ndarray = field(default_factory=lambda: np.zeros(4))
    n_samples_total: int | None = None

    @property
    def n_samples(self) -> int:
        """Samples of the whole map: this process's, or every rank's in a distributed map
        (docs/mapmaking.md#distributed-map-making)."""
        return int(self.tod.size) if self.n_samples_total is None else int(self.n_samples_total)


def prepass_file(
    obs: Any, settings: ChannelSelection, table: Any, flags: dict | None, counts: Counter
) -> list[SegmentPlan]:
    """Accept or reject every (feed, scan) segment of one level-2 file
    (docs/mapmaking.md#pre-pass-and-segment-selection); count reasons."""
    band, chan = settings.band, settings.channel
    plans: list[SegmentPlan] = []
    with RetryH5PY(obs.level2_path, "r", locking=False) as l2:
        scans = scan_table(l2)
        if scans is None:
            counts["no scans"] += 1
            return plans
        n_scan = len(scans.edges)
        cf = l2[CENTRAL_FREQS][:, band, chan]
        bw = l2[BANDWIDTHS][:, band, chan] if BANDWIDTHS in l2 else np.full(len(scans.feeds), np.nan)
        ns = l2[settings.noise_group]
        auto_rms = ns["auto_rms"][:, band, chan, :]
        sigma_red = ns["sigma_red"][:, band, chan, :]
        fknee = ns["fknee_hz"][:, band, chan, :]
        for ifeed, feed in enumerate(scans.feeds):
            if not settings.feed_selected(feed):
                counts["feed not selected"] += n_scan
                continue
            if settings.flagged_bad(flags, feed, band, chan):
                counts["quality flag bad"] += n_scan
                continue
            for s, (a, b) in enumerate(scans.edges):
                rms = float(auto_rms[ifeed, s])
                if not (math.isfinite(rms) and 0 < rms <= settings.auto_rms_cap_k):
                    counts["auto_rms not finite, <= 0 or above cap"] += 1
                    continue
                factor, reason = settings.verdict(
                    table,
                    feed,
                    band,
                    chan,
                    scans.mjd_mid[s],
                    sigma_red=float(sigma_red[ifeed, s]),
                    fknee_hz=float(fknee[ifeed, s]),
                    fknee_max_hz=settings.fknee_max_hz,
                )
                if factor is None:
                    counts[reason] += 1
                    continue
                if not elevation_ok(scans, ifeed, s):
                    counts[ELEVATION_REASON] += 1
                    continue
                counts["accepted"] += 1
                plans.append(
                    SegmentPlan(
                        int(obs.obsid),
                        str(obs.level2_path),
                        int(feed),
                        ifeed,
                        s,
                        int(a),
                        int(b),
                        float(scans.mjd_mid[s]),
                        rms,
                        factor,
                        float(cf[ifeed]),
                        float(bw[ifeed]),
                    )
                )
    return plans


def frame_coordinates(ra_deg: np.ndarray, dec_deg: np.ndarray, frame: str) -> tuple[np.ndarray, np.ndarray]:
    """ICRS pointing converted to the map frame ('galactic' or 'icrs'), degrees."""
    if frame == "galactic":
        return icrs_to_galactic(ra_deg, dec_deg)
    return np.asarray(ra_deg, dtype=np.float64) % 360.0, np.asarray(dec_deg, dtype=np.float64)


def sample_pointing(plans: list[SegmentPlan], frame: str, stride: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Every ``stride``-th pointing sample of every accepted segment, in the map frame (dynamic WCS)."""
    lon, lat = [], []
    by_file: dict[str, list[SegmentPlan]] = {}
    for p in plans:
        by_file.setdefault(p.path, []).append(p)
    for path, segs in by_file.items():
        with RetryH5PY(path, "r", locking=False) as l2:
            for p in segs:
                ra = l2[PIXEL_RA][p.ifeed, p.start : p.stop : stride]
                dec = l2[PIXEL_DEC][p.ifeed, p.start : p.stop : stride]
                a, b = frame_coordinates(ra, dec, frame)
                lon.append(a)
                lat.append(b)
    if not lon:
        return np.empty(0), np.empty(0)
    return np.concatenate(lon), np.concatenate(lat)


# --------------------------------------------------------------------------------------------------
# Per-segment processing
# --------------------------------------------------------------------------------------------------
def _legendre_basis(n: int, order: int, *coords: np.ndarray) -> np.ndarray:
    """Legendre P0…P_order of each coordinate normalised to [−1, 1] (one shared constant)."""
    from numpy.polynomial import legendre

    cols = [np.ones(n)]
    for c in coords:
        c = np.asarray(c, dtype=np.float64)
        lo, hi = np.nanmin(c), np.nanmax(c)
        u = 2 * (c - lo) / (hi - lo) - 1 if hi > lo else np.zeros(n)
        for k in range(1, order + 1):
            coef = np.zeros(k + 1)
            coef[k] = 1.0
            cols.append(legendre.legval(u, coef))
    return np.stack(cols, axis=1)


def _huber_irls(
    design: np.ndarray, y: np.ndarray, use: np.ndarray, k: float = 1.345, n_iter: int = 5
) -> np.ndarray:
    """Robust least squares (Huber weights, IRLS) on the rows ``use``; returns the coefficients."""
    a, b = design[use], y[use]
    w = np.ones(b.size)
    coef = np.zeros(design.shape[1])
    for _ in range(n_iter):
        sw = np.sqrt(w)
        coef = np.linalg.lstsq(a * sw[:, None], b * sw, rcond=None)[0]
        r = b - a @ coef
        scale = 1.4826 * np.median(np.abs(r - np.median(r))) or 1.0
        u = np.abs(r) / (k * scale)
        w = np.where(u <= 1, 1.0, 1.0 / np.maximum(u, 1e-12))
    return coef


def detrend_segment(
    x: np.ndarray,
    w: np.ndarray,
    settings: ReaderSettings,
    *,
    lat_deg: np.ndarray | None = None,
    el_deg: np.ndarray | None = None,
    az_deg: np.ndarray | None = None,
    quiet: np.ndarray | None = None,
) -> np.ndarray:
    """Subtract the segment's trend in place (docs/mapmaking.md#per-segment-processing step 3); returns
    ``x``. ``quiet`` (None: all) marks the samples off bright sources: only they enter the fit."""
    good = w > 0
    if settings.detrend == "none" or not good.any():
        return x
    fit_ok = good if quiet is None or not (good & quiet).any() else good & quiet
    if settings.detrend == "median":
        x[good] -= np.median(x[fit_ok])
        return x
    n = x.size
    t = np.arange(n, dtype=np.float64)
    if settings.detrend == "linear":
        coef = np.polyfit(t[fit_ok], x[fit_ok].astype(np.float64), 1)
        x -= np.polyval(coef, t).astype(x.dtype)
        x[~good] = 0.0
        return x
    coords = [t, el_deg if el_deg is not None else t, az_deg if az_deg is not None else t]
    design = _legendre_basis(n, settings.detrend_order, *coords)
    use = fit_ok.copy()
    if lat_deg is not None:
        use &= np.abs(lat_deg) > settings.detrend_mask_abs_b_deg
    if use.sum() < max(design.shape[1] + 2, 32):
        x[good] -= np.median(x[good])  # too few quiet samples for the Legendre fit
        return x
    coef = _huber_irls(design, x.astype(np.float64), use)
    x -= (design @ coef).astype(x.dtype)
    x[~good] = 0.0
    return x


def spike_flags(
    x: np.ndarray, w: np.ndarray, sigma: float, settings: ReaderSettings, quiet: np.ndarray | None
) -> np.ndarray:
    """Samples to zero-weight as spikes (docs/mapmaking.md#per-segment-processing step 4), dilated by
    ``spike_dilate``."""
    from scipy import ndimage

    from utils.filters import running_median_nan

    y = np.where(w > 0, x, np.nan).astype(np.float64)
    med = running_median_nan(y, settings.spike_medfilt_length)
    with np.errstate(invalid="ignore"):
        flagged = np.abs(y - med) > settings.spike_sigma * sigma
    if quiet is not None:
        flagged &= quiet
    if settings.spike_dilate > 1 and flagged.any():
        flagged = ndimage.binary_dilation(flagged, structure=np.ones(int(settings.spike_dilate), dtype=bool))
    return flagged


#: Samples whose azimuth speed is below this fraction of the segment's median speed are turnarounds:
#: they belong to neither direction of the ``scan_direction`` split.
TURNAROUND_SPEED_FRACTION = 0.1


def scan_direction_samples(az_deg: np.ndarray, direction: int) -> np.ndarray:
    """Samples of one segment that sweep in azimuth direction ``direction`` (+1: azimuth increasing,
    −1: decreasing; docs/mapmaking.md#createmap-and-its-variants).

    The azimuth velocity is the central difference of the unwrapped azimuth smoothed over 5 samples;
    samples slower than :data:`TURNAROUND_SPEED_FRACTION` of the segment's median speed (turnarounds,
    a segment that does not move) and samples without a finite azimuth belong to neither direction.

    Parameters
    ----------
    az_deg : ndarray, shape (N,)
        Azimuth of the feed (deg).
    direction : {+1, −1}

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    from scipy.ndimage import uniform_filter1d

    az = np.asarray(az_deg, dtype=np.float64)
    finite = np.isfinite(az)
    if finite.sum() < 2:
        return np.zeros(az.shape, dtype=bool)
    idx = np.arange(az.size)
    filled = np.interp(idx, idx[finite], np.unwrap(az[finite], period=360.0))
    velocity = uniform_filter1d(np.gradient(filled), 5, mode="nearest")
    speed = np.median(np.abs(velocity[finite]))
    moving = np.abs(velocity) > TURNAROUND_SPEED_FRACTION * speed
    return finite & moving & (np.sign(velocity) == np.sign(direction))


def read_file_segments(
    path: str, plans: list[SegmentPlan], settings: ReaderSettings, geometry: MapGeometry
) -> dict[str, Any]:
    """Read and process every accepted segment of one file (runs in a reader worker).

    Samples with an excluding sample flag get zero weight; samples flagged as a bright source
    (flag 16) are left out of the detrend fit and the spike search and keep ``bright_downweight``
    of their solver weight (docs/mapmaking.md#per-segment-processing)."""
    n = sum(p.n for p in plans)
    tod = np.empty(n, dtype=np.float32)
    pix = np.empty(n, dtype=np.int64)
    wts = np.empty(n, dtype=np.float32)
    mwt = np.empty(n, dtype=np.float32)
    starts = []
    az_sum = el_sum = mjd_sum = 0.0
    n_sum = 0
    pos = 0
    band, chan = settings.band, settings.channel
    with RetryH5PY(path, "r", locking=False) as l2:
        data = l2[settings.tod_data_name]
        sample_rate_hz = float(l2[settings.noise_group].attrs.get("sample_rate_hz", np.nan))
        for p in plans:
            sl = slice(p.start, p.stop)
            x = np.asarray(data[p.ifeed, band, chan, sl], dtype=np.float32) / np.float32(p.factor)
            sigma = p.auto_rms_k / p.factor
            w = np.full(p.n, 1.0 / sigma**2, dtype=np.float32)
            flags = read_sample_flags(l2, p.ifeed, sl)
            bad = ~np.isfinite(x) | excluded_samples(flags)
            if settings.scan_direction is not None:
                bad |= ~scan_direction_samples(l2[PIXEL_AZ][p.ifeed, sl], settings.scan_direction)
            w[bad] = 0.0
            x[bad] = 0.0
            ra = l2[PIXEL_RA][p.ifeed, sl]
            dec = l2[PIXEL_DEC][p.ifeed, sl]
            lon, lat = frame_coordinates(ra, dec, geometry.frame)
            bright = bright_source_samples(flags)
            quiet = ~bright if bright.any() else None
            need_azel = settings.detrend == "legendre" or settings.write_mean_azel
            el = l2[PIXEL_EL][p.ifeed, sl] if need_azel else None
            az = l2[PIXEL_AZ][p.ifeed, sl] if need_azel else None
            gal_lat = lat if geometry.frame == "galactic" else icrs_to_galactic(ra, dec)[1]
            detrend_segment(x, w, settings, lat_deg=gal_lat, el_deg=el, az_deg=az, quiet=quiet)
            if settings.spike_sigma is not None:
                w[spike_flags(x, w, sigma, settings, quiet)] = 0.0
            idx = world_to_pixel_index(geometry, lon, lat)
            w[idx < 0] = 0.0
            ws = w.copy()
            ws[bright] *= np.float32(settings.bright_downweight)
            sl_out = slice(pos, pos + p.n)
            tod[sl_out] = x
            pix[sl_out] = idx
            wts[sl_out] = ws
            mwt[sl_out] = w
            starts.append(pos)
            if settings.write_mean_azel and el is not None:
                good = w > 0
                az_sum += float(np.sum(az[good]))
                el_sum += float(np.sum(el[good]))
                mjd_sum += float(p.mjd_mid) * int(good.sum())
                n_sum += int(good.sum())
            pos += p.n
    return {
        "tod": tod,
        "pixels": pix,
        "weights": wts,
        "map_weights": mwt,
        "starts": np.asarray(starts, np.int64),
        "azelmjd": (az_sum, el_sum, mjd_sum, n_sum),
        "sample_rate_hz": sample_rate_hz,
    }


def _read_task(args) -> dict[str, Any]:
    path, plans, settings, geometry = args
    return read_file_segments(path, plans, settings, geometry)


def run_file_tasks(task_fn, tasks: list, names: list[str], *, executor=None, progress=None) -> list:
    """Results of ``task_fn(task)`` for every task, in order: serially, or through ``executor``
    (``map_unordered``) when given. A task that fails raises ``RuntimeError`` naming its file."""
    results: list = [None] * len(tasks)
    if executor is None:
        for k, task in enumerate(tasks):
            results[k] = task_fn(task)
            if progress is not None:
                progress.update(1)
        return results
    for outcome in executor.map_unordered(task_fn, tasks):
        if not outcome.ok:
            cause = outcome.died or f"{outcome.error_type}: {outcome.error}"
            raise RuntimeError(f"reading {names[outcome.key]} failed: {cause}")
        results[outcome.key] = outcome.result
        if progress is not None:
            progress.update(1)
    return results


def read_segments(
    plans: list[SegmentPlan], settings: ReaderSettings, geometry: MapGeometry, *, executor=None, progress=None
) -> ReaderOutput:
    """Read every accepted segment into concatenated arrays (files in parallel through ``executor``)."""
    by_file: dict[str, list[SegmentPlan]] = {}
    for p in plans:
        by_file.setdefault(p.path, []).append(p)
    tasks = [(path, segs, settings, geometry) for path, segs in by_file.items()]
    results = run_file_tasks(_read_task, tasks, [t[0] for t in tasks], executor=executor, progress=progress)
    n = sum(p.n for p in plans)
    tod = np.empty(n, dtype=np.float32)
    pix = np.empty(n, dtype=np.int64)
    wts = np.empty(n, dtype=np.float32)
    mwt = np.empty(n, dtype=np.float32)
    starts = []
    pos = 0
    sums = np.zeros(4)
    for k in range(len(tasks)):
        r = results[k]
        m = r["tod"].size
        tod[pos : pos + m] = r["tod"]
        pix[pos : pos + m] = r["pixels"]
        wts[pos : pos + m] = r["weights"]
        mwt[pos : pos + m] = r["map_weights"]
        starts.append(r["starts"] + pos)
        sums += np.asarray(r["azelmjd"], dtype=np.float64)
        pos += m
    w_seg = np.array([p.n / (p.auto_rms_k / p.factor) ** 2 for p in plans]) if plans else np.zeros(0)
    freq = float(np.average([p.freq_ghz for p in plans], weights=w_seg)) if plans else float("nan")
    bw = float(np.nanmedian([p.bandwidth_ghz for p in plans])) if plans else float("nan")
    mean = None
    if settings.write_mean_azel and sums[3] > 0:
        mean = (sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3])
    mjds = [p.mjd_mid for p in plans]
    rates = [r["sample_rate_hz"] for r in results if np.isfinite(r["sample_rate_hz"])]
    return ReaderOutput(
        tod=tod,
        pixels=pix,
        weights=wts,
        map_weights=mwt,
        segment_starts=np.concatenate(starts) if starts else np.zeros(1, dtype=np.int64),
        obsids=sorted({p.obsid for p in plans}),
        feeds=sorted({p.feed for p in plans}),
        mjd_range=(min(mjds), max(mjds)) if mjds else (float("nan"), float("nan")),
        freq_ghz=freq,
        bandwidth_ghz=bw,
        n_segments=len(plans),
        mean_azel_mjd=mean,
        plans=[p for segs in by_file.values() for p in segs],
        sample_rate_hz=float(np.median(rates)) if rates else float("nan"),
        azelmjd_sums=sums,
    )


def compress_pixels(pixels: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel indices to the set of hit pixels (docs/mapmaking.md#per-segment-processing, last paragraph):
    returns (hit pixel ids, compressed int32 indices with −1 kept). Pixels seen only by samples whose weights
    are all zero are left out."""
    used = pixels >= 0
    if weights:
        any_weight = np.zeros(pixels.shape, dtype=bool)
        for w in weights:
            any_weight |= w > 0
        used &= any_weight
    hit = np.unique(pixels[used])
    comp = np.full(pixels.shape, -1, dtype=np.int32)
    comp[used] = np.searchsorted(hit, pixels[used]).astype(np.int32)
    return hit, comp


def describe_counts(counts: Counter) -> str:
    """One line per rejection reason, accepted first."""
    items = sorted(counts.items(), key=lambda kv: (kv[0] != "accepted", -kv[1]))
    return "; ".join(f"{k}: {v}" for k, v in items) if items else "no segments"


class Level2DataReader:
    """The continuum reader of one map job (docs/mapmaking.md#level2datareader): pre-pass, pointing sample,
    read.

    Parameters
    ----------
    settings : ReaderSettings
    calibration_table : CalibrationTable or None
        Calibration factors (``factor(feed, band, channel, mjd)``); None with ``calibration='none'``.
    quality_flags : dict
        obsid → {(feed, band, channel): is_good}; a missing entry counts as good.
    """

    def __init__(
        self,
        settings: ReaderSettings,
        calibration_table: Any = None,
        quality_flags: dict[int, dict] | None = None,
    ) -> None:
        self.settings = settings
        self.table = calibration_table
        self.flags = quality_flags or {}
        self.counts: Counter = Counter()

    # the per-file pre-pass and the read; the cube reader (read_line_data) plugs in its own
    prepass_file = staticmethod(prepass_file)
    read_segments = staticmethod(read_segments)

    def prepass(self, observations: list[Any]) -> list[Any]:
        """Accepted segments of ``observations`` (COMAPData rows with a level-2 path)."""
        plans: list[Any] = []
        for obs in observations:
            plans.extend(
                self.prepass_file(obs, self.settings, self.table, self.flags.get(int(obs.obsid)), self.counts)
            )
        return plans

    def read(self, plans: list[Any], geometry: MapGeometry, *, executor=None, progress=None):
        """Read the accepted segments; ``counts`` holds the pre-pass's and the read's reasons."""
        out = self.read_segments(plans, self.settings, geometry, executor=executor, progress=progress)
        out.counts = Counter(self.counts) + out.counts
        return out


__all__ = [
    "Detrend",
    "Level2DataReader",
    "ReaderOutput",
    "ReaderSettings",
    "ChannelSelection",
    "SegmentPlan",
    "compress_pixels",
    "prepass_file",
    "read_segments",
    "sample_pointing",
    "scan_direction_samples",
]
