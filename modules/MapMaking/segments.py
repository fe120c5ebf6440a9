"""Segment selection shared by every map-making reader (docs/mapmaking.md#pre-pass-and-segment-selection,
docs/mapmaking.md#reading).

A segment is one scan of one feed of one level-2 file. Each reader's pre-pass opens the file once
(:func:`scan_table`) and asks, for every segment and binned channel it would use, whether the
segment passes the cuts that all products share: the feed is selected, its quality flag is not
bad, its red noise is below the cutoff, and it has a calibration factor in range. The continuum
reader adds its white-noise cap and 1/f knee limit, the cube reader its spectral-index limit; both
pass those to :meth:`SegmentSelection.verdict` so that the order of the cuts (and so the counted
reason of a segment that fails several) is one and the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.level2 import FEEDS, MJD, NOISE_STATS, PIXEL_DEC, PIXEL_EL, PIXEL_RA, SCAN_EDGES

ELEVATION_REASON = "pointing not finite or elevation out of (0, 90)"


def noise_group(tod_data_name: str) -> str:
    """The noise-statistics group of the level-2 dataset ``tod_data_name``."""
    return NOISE_STATS.resolve(dataset=tod_data_name.rstrip("/").rsplit("/", 1)[-1])


@dataclass(kw_only=True)
class SegmentSelection:
    """The cuts every reader applies to a segment (picklable; values come from the job).

    Parameters
    ----------
    tod_data_name : str
        Level-2 dataset read; its noise statistics are the ``NOISE_STATS`` group of its basename.
    feeds : list of int or None
        Feeds used (None: all).
    use_quality_flags : bool
        Drop (feed, band, channel) flagged bad in the database.
    sigma_red_cutoff_k : float
        Segments whose fitted red-noise amplitude exceeds this (K) are dropped.
    calibration : {'model', 'none'}
        Divide by the calibration model's factor, or not.
    calib_min_factor, calib_max_factor : float
        Accepted range of the calibration factor.
    missing_calibration : {'skip', 'unity'}
        A segment without a factor is dropped, or taken with factor 1.
    """

    tod_data_name: str
    feeds: list[int] | None
    use_quality_flags: bool
    sigma_red_cutoff_k: float
    calibration: str
    calib_min_factor: float
    calib_max_factor: float
    missing_calibration: str

    @property
    def noise_group(self) -> str:
        """The noise-statistics group of ``tod_data_name``."""
        return noise_group(self.tod_data_name)

    def feed_selected(self, feed: int) -> bool:
        return self.feeds is None or int(feed) in self.feeds

    def flagged_bad(self, flags: dict | None, feed: int, band: int, chan: int) -> bool:
        """True if the database flags (feed, band, binned channel) of this observation bad."""
        return self.use_quality_flags and flags is not None and flags.get((int(feed), band, chan)) is False

    def verdict(
        self,
        table: Any,
        feed: int,
        band: int,
        chan: int,
        mjd: float,
        *,
        sigma_red: float,
        fknee_hz: float = math.nan,
        fknee_max_hz: float | None = None,
        alpha: float = math.nan,
        alpha_min: float | None = None,
    ) -> tuple[float, None] | tuple[None, str]:
        """``(calibration factor, None)`` if the segment passes the noise and calibration cuts in
        binned channel (band, chan), else ``(None, reason)``.

        ``fknee_max_hz`` / ``alpha_min`` (None: no limit) drop segments whose knee frequency is
        above / spectral index below the limit; NaN statistics pass.
        """
        if math.isfinite(sigma_red) and sigma_red > self.sigma_red_cutoff_k:
            return None, "sigma_red above cutoff"
        if fknee_max_hz is not None and math.isfinite(fknee_hz) and fknee_hz > fknee_max_hz:
            return None, "fknee above limit"
        if alpha_min is not None and math.isfinite(alpha) and alpha < alpha_min:
            return None, "alpha below alpha_min"
        if self.calibration == "none":
            return 1.0, None
        factor = float(table.factor(int(feed), band, chan, float(mjd))) if table is not None else math.nan
        if not math.isfinite(factor):
            if self.missing_calibration != "unity":
                return None, "no calibration factor"
            return 1.0, None
        if not self.calib_min_factor <= factor <= self.calib_max_factor:
            return None, "calibration factor out of range"
        return factor, None


@dataclass
class ScanTable:
    """The per-file facts every pre-pass needs: feeds, scan edges and scan mid-times.

    Attributes
    ----------
    feeds : ndarray of int, shape (F,)
        Feed numbers on the level-2 feed axis.
    edges : ndarray of int64, shape (S, 2)
        ``[start, stop)`` sample indices of each scan.
    mjd_mid : ndarray of float64, shape (S,)
        MJD halfway between each scan's first and last sample.
    elevation : h5py.Dataset, shape (F, N)
        Per-feed elevation (deg), read per segment by :func:`elevation_ok`.
    """

    feeds: np.ndarray
    edges: np.ndarray
    mjd_mid: np.ndarray
    elevation: Any


def scan_table(l2: Any) -> ScanTable | None:
    """The :class:`ScanTable` of an open level-2 file, or None if it has no scans."""
    edges = np.asarray(l2[SCAN_EDGES][...], dtype=np.int64)
    if edges.size == 0:
        return None
    mjd = l2[MJD]
    mjd_mid = 0.5 * (np.asarray(mjd[list(edges[:, 0])]) + np.asarray(mjd[list(edges[:, 1] - 1)]))
    return ScanTable(np.asarray(l2[FEEDS][...], dtype=int), edges, mjd_mid, l2[PIXEL_EL])


def elevation_ok(scans: ScanTable, ifeed: int, scan: int) -> bool:
    """True if the segment's elevation is finite and within (0, 90) deg throughout."""
    a, b = scans.edges[scan]
    elev = scans.elevation[ifeed, a:b]
    return bool(np.all(np.isfinite(elev)) and np.all((elev > 0) & (elev < 90)))


def segment_hour_angle_deg(plans: list[Any]) -> np.ndarray:
    """Hour angle (deg) of each segment's mean pointing at its mid-time, for the ``rising_setting`` split
    (docs/mapmaking.md#createmap-and-its-variants).

    The mean pointing is the normalised mean of the unit vectors of the segment's finite ICRS
    samples (its feed, ``[start, stop)``); a segment without any gives NaN.

    Parameters
    ----------
    plans : list
        Segments with ``path``, ``ifeed``, ``start``, ``stop`` and ``mjd_mid`` (MJD, UTC).

    Returns
    -------
    ndarray of float64, shape (len(plans),)
        Negative: the field is east of the meridian (rising); positive: setting.
    """
    import h5py

    from utils.coordinates import hour_angle_deg

    ra = np.full(len(plans), np.nan)
    dec = np.full(len(plans), np.nan)
    by_file: dict[str, list[int]] = {}
    for k, p in enumerate(plans):
        by_file.setdefault(p.path, []).append(k)
    for path, ks in by_file.items():
        with h5py.File(path, "r", locking=False) as l2:
            for k in ks:
                p = plans[k]
                a = np.radians(np.asarray(l2[PIXEL_RA][p.ifeed, p.start : p.stop], dtype=np.float64))
                d = np.radians(np.asarray(l2[PIXEL_DEC][p.ifeed, p.start : p.stop], dtype=np.float64))
                ok = np.isfinite(a) & np.isfinite(d)
                if not ok.any():
                    continue
                v = np.array([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])[:, ok].mean(axis=1)
                ra[k] = math.degrees(math.atan2(v[1], v[0])) % 360.0
                dec[k] = math.degrees(math.atan2(v[2], math.hypot(v[0], v[1])))
    ha = np.full(len(plans), np.nan)
    known = np.isfinite(ra)
    if known.any():
        mjd = np.array([p.mjd_mid for p in plans], dtype=np.float64)
        ha[known] = hour_angle_deg(ra[known], dec[known], mjd[known])
    return ha


__all__ = [
    "ELEVATION_REASON",
    "ScanTable",
    "SegmentSelection",
    "elevation_ok",
    "noise_group",
    "scan_table",
    "segment_hour_angle_deg",
]
