"""Private helpers of CalibratorFitting: noise estimate, source track, legacy az fix, scan combination.

Nothing here is public API; the pure fitting core lives in :mod:`utils.calibrators`
(:func:`~utils.calibrators.fit_gaussian_source`, :func:`~utils.calibrators.tangent_plane_offsets_deg`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from utils.calibrators import calibrator_position, canonical_name
from utils.coordinates import azel_to_icrs
from utils.noise import pair_difference_rms as _pair_difference_rms

MIN_NOISE_PAIRS: int = 50
"""Minimum number of off-source pairs for the local noise estimate (docs/level2.md#calibratorfitting step
3)."""
JUPITER_TRACK_STEP_S: float = 60.0
"""Spacing of the Jupiter ephemeris grid, s (docs/level2.md#calibratorfitting "Source position")."""


def pair_difference_rms(x: NDArray) -> float:
    """White-noise rms per sample of a 1-D series: the clipped pair-difference estimator
    (docs/level2.md#noisestatslevel1)."""
    return float(_pair_difference_rms(np.asarray(x), estimator="clipped_std"))


def off_source_noise_k(
    data_k: NDArray, r_deg: NDArray, beam_sigma_deg: float, fit_radius_deg: float
) -> float:
    """Noise σ_n of one (feed, band, bin, scan) segment (docs/level2.md#calibratorfitting step 3).

    The clipped pair-difference rms of the samples at ``4σ_b < r < fit_radius`` over the
    non-overlapping consecutive pairs ``(2j, 2j+1)`` of the segment whose two samples are both in
    that set, when there are at least :data:`MIN_NOISE_PAIRS` of them; otherwise that of the whole
    segment.

    Parameters
    ----------
    data_k : ndarray, shape (n,)
        Segment data (K), NaN = no value.
    r_deg : ndarray, shape (n,)
        Distance of each sample from the source, degrees.
    beam_sigma_deg, fit_radius_deg : float
        σ_b and the fit radius, degrees.
    """
    with np.errstate(invalid="ignore"):
        inset = (r_deg > 4.0 * beam_sigma_deg) & (r_deg < fit_radius_deg) & np.isfinite(data_k)
    n = data_k.size - data_k.size % 2
    pair_ok = inset[0:n:2] & inset[1:n:2]
    if int(pair_ok.sum()) >= MIN_NOISE_PAIRS:
        first = np.flatnonzero(pair_ok) * 2
        pairs = np.stack([data_k[first], data_k[first + 1]], axis=-1).ravel()
        return pair_difference_rms(pairs)
    return pair_difference_rms(data_k)


def source_track(
    name: str, mjd_start: float, mjd_stop: float
) -> Callable[[NDArray], tuple[NDArray, NDArray]]:
    """ICRS position of calibrator ``name`` as a function of MJD over ``[mjd_start, mjd_stop]``.

    Fixed sources return their catalogue position. Jupiter's topocentric position (built-in
    ephemeris, converted to ICRS with :func:`utils.coordinates.azel_to_icrs` like the telescope
    pointing) is computed every :data:`JUPITER_TRACK_STEP_S` seconds and interpolated linearly.
    """
    canon = canonical_name(name)
    if canon != "Jupiter":
        ra0, dec0 = calibrator_position(canon)
        ra0, dec0 = float(ra0), float(dec0)

        def fixed(mjd: NDArray) -> tuple[NDArray, NDArray]:
            shape = np.shape(mjd)
            return np.full(shape, ra0), np.full(shape, dec0)

        return fixed
    step = JUPITER_TRACK_STEP_S / 86400.0
    n = max(int(math.ceil((mjd_stop - mjd_start) / step)) + 1, 2)
    grid = mjd_start + step * np.arange(n)
    ra, dec = calibrator_position(canon, grid)
    ra_unwrapped = np.degrees(np.unwrap(np.radians(ra)))

    def moving(mjd: NDArray) -> tuple[NDArray, NDArray]:
        m = np.asarray(mjd, dtype=np.float64)
        return np.interp(m, grid, ra_unwrapped) % 360.0, np.interp(m, grid, dec)

    return moving


def raster_az_corrected_radec(
    az_deg: NDArray, el_deg: NDArray, mjd: NDArray, correction_arcsec: float
) -> tuple[NDArray, NDArray]:
    """ICRS pointing after the legacy raster azimuth fix (docs/level2.md#calibratorfitting
    ``raster_az_correction_arcsec``).

    Samples whose azimuth rate is positive get ``correction_arcsec`` added to their encoder
    azimuth (the encoder reading lagged the true position in the direction of motion in the early
    data); RA/Dec are then recomputed with :func:`utils.coordinates.azel_to_icrs`.

    Parameters
    ----------
    az_deg, el_deg, mjd : ndarray, shape (n,)
        Feed azimuth and elevation (deg) and sample times (MJD).
    correction_arcsec : float
        Azimuth correction, arcsec.
    """
    az = np.asarray(az_deg, dtype=np.float64)
    corrected = az.copy()
    if az.size >= 2:
        t_s = np.asarray(mjd, dtype=np.float64) * 86400.0
        rate = np.gradient(np.degrees(np.unwrap(np.radians(az))), t_s)
        corrected = np.where(rate > 0.0, az + correction_arcsec / 3600.0, az) % 360.0
    return azel_to_icrs(corrected, np.asarray(el_deg, dtype=np.float64), np.asarray(mjd, dtype=np.float64))


def inverse_variance_mean(
    values: NDArray, errors: NDArray, ok: NDArray
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inverse-variance weighted mean over the last axis of entries with ``ok``.

    Returns
    -------
    mean, error : ndarray
        Shape of ``values`` without its last axis; NaN where no entry is usable.
    """
    use = ok & np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    w = np.where(use, 1.0 / np.where(use, errors, 1.0) ** 2, 0.0)
    sw = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sw > 0, (w * np.where(use, values, 0.0)).sum(axis=-1) / sw, np.nan)
        err = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
    return mean, err


def masked_mean(values: NDArray, ok: NDArray) -> NDArray[np.float64]:
    """Plain mean over the last axis of finite entries with ``ok``; NaN where there are none."""
    use = ok & np.isfinite(values)
    n = use.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(use, values, 0.0).sum(axis=-1) / n, np.nan)


def masked_std(values: NDArray, ok: NDArray) -> NDArray[np.float64]:
    """Sample standard deviation (ddof = 1) over the last axis of entries with ``ok``; NaN if < 2."""
    use = ok & np.isfinite(values)
    n = use.sum(axis=-1)
    mean = masked_mean(values, ok)
    dev = np.where(use, values - mean[..., None], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, np.sqrt((dev**2).sum(axis=-1) / (n - 1)), np.nan)
