"""Calibrator flux models, positions, beam helpers and the calibration-factor table.

Used by the pipeline (docs/level2.md#calibratorfitting, docs/level2.md#calibrationmodel). The models, their
sources and conventions are described in docs/calibrators.md#flux-models; the simulator has its own,
independently written truth (``utils/simulator/calibrator_truth.py``,
docs/calibrators.md#two-implementations).

Flux models (frequency ν in GHz; ``x = log10(ν / ν_ref)``):

========  ==============================================  ==========  ===========  =========================
Source    log10 S [Jy]                                    epoch       secular      source
========  ==============================================  ==========  ===========  =========================
TauA      2.506 − 0.302 x, ν_ref = 40 GHz                 2005.0      −0.22 %/yr   Weiland et al. 2011 [1]
CasA      2.204 − 0.682 x + 0.038 x², ν_ref = 40 GHz      2000.0      −0.53 %/yr   Weiland et al. 2011 [1]
CygA      7.161 − 1.244 x, ν_ref = 1 MHz (x = log10 ν_MHz)  —         none         Baars et al. 1977 [2]
Jupiter   S = 1e26 · 2kν²/c² · (T_b − T_CMB,RJ) · Ω        —           —            [3], [1]
========  ==============================================  ==========  ===========  =========================

[1] Weiland et al. 2011, ApJS 192, 19 (WMAP seven-year planets and celestial calibrators): the Stokes I
    spectral fits of the fixed sources (their Table 17, Tau A at epoch 2005.0 and Cas A at epoch 2000.0),
    the secular decreases of 0.22 %/yr (Tau A) and 0.53 %/yr (Cas A) (their Section 5), and Jupiter's
    reference solid angle Ω_ref = 2.481e-8 sr at 5.2 AU.
[2] Baars et al. 1977, A&A 61, 99, Table 5: Cyg A between 2 and 31 GHz (ν in MHz). The COMAP band
    reaches 34 GHz, 10 % beyond the fitted range.
[3] Karim et al. 2018, AJ 155, 129: disc-averaged brightness temperature of Jupiter at 27.7–34.7 GHz;
    ``log10 T_b = 0.282419 log10(ν/30 GHz) + 2.161409`` is the least-squares power law through their
    fifteen band values. T_b is the absolute disc temperature; the telescope sees the increment over the
    CMB the disc blocks, ``T_b − T_CMB,RJ(ν)`` with ``T_CMB,RJ = T x/(eˣ − 1)``, ``x = hν/(k T_CMB)``
    (≈ 2.07 K at 30 GHz; docs/calibrators.md#jupiter).

The secular decline is linear, ``S(t) = S_ref · [1 − r · (MJD − MJD_ref)/365.25]``, with MJD_ref the
MJD of 1 January 00:00 UTC of the epoch year. Jupiter's disc solid angle is ``Ω = 2.481e-8 sr · (5.2 AU /
d)²``; its position comes from astropy ``get_body`` with the **built-in** ephemeris (never the network).

Positions (ICRS, J2000; docs/calibrators.md#positions): Tau A 05h34m31.94s +22°00′52.2″, Cas A 23h23m24s
+58°48′54″ (the remnant's centre, SIMBAD and Green's catalogue of Galactic SNRs), Cyg A 19h59m28.356s
+40°44′02.10″ (SIMBAD).

Brightness of a point source of flux S seen by a circular Gaussian beam of solid angle
``Ω_b = 2π σ_b²``: ``T_peak = 1e-26 S c² / (2 k ν² Ω_b)`` with the exact SI c and k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import BOLTZMANN_J_K, JY_W_M2_HZ, PLANCK_J_S, SPEED_OF_LIGHT_M_S, T_CMB_K

FWHM_TO_SIGMA: float = 1.0 / math.sqrt(8.0 * math.log(2.0))
"""σ = FWHM · FWHM_TO_SIGMA for a Gaussian."""
BEAM_FWHM_ARCMIN_30GHZ: float = 4.5
"""Default COMAP beam FWHM at 30 GHz (arcmin); it scales as 30 GHz/ν."""
DAYS_PER_YEAR: float = 365.25

JUPITER_TB_SLOPE: float = 0.282419
"""Power-law slope of Jupiter's disc brightness temperature (fit to Karim et al. 2018, AJ 155, 129)."""
JUPITER_TB_LOG10_30GHZ: float = 2.161409
"""log10 of Jupiter's absolute disc brightness temperature at 30 GHz (K), same fit."""
JUPITER_OMEGA_REF_SR: float = 2.481e-8
"""Jupiter's reference disc solid angle at 5.2 AU (Weiland et al. 2011, ApJS 192, 19)."""
JUPITER_DISTANCE_REF_AU: float = 5.2


@dataclass(frozen=True)
class CalibratorModel:
    """A fixed-position calibrator with a log-polynomial spectrum and a linear secular decline.

    Attributes
    ----------
    name : str
        Canonical name (``TauA``, ``CasA``, ``CygA``).
    ra_deg, dec_deg : float
        ICRS position, degrees.
    log10_coeffs : tuple of float
        Coefficients of ``log10 S[Jy]`` in powers of ``x = log10(ν / ref_freq_ghz)``, constant first.
    ref_freq_ghz : float
        Reference frequency of ``x`` (40 GHz).
    mjd_ref : float or None
        Epoch of the reference flux (MJD); None for no secular change.
    rate_per_year : float
        Fractional decline per year (0.0022 = 0.22 %/yr).
    reference : str
        Where the spectrum, epoch and rate come from (docs/calibrators.md#flux-models).
    """

    name: str
    ra_deg: float
    dec_deg: float
    log10_coeffs: tuple[float, ...]
    ref_freq_ghz: float = 40.0
    mjd_ref: float | None = None
    rate_per_year: float = 0.0
    reference: str = ""

    def flux_jy(self, freq_ghz: ArrayLike, mjd: ArrayLike | None = None) -> NDArray[np.float64]:
        """Flux density (Jy) at ``freq_ghz`` (GHz) and time ``mjd`` (broadcast together).

        ``mjd`` may be None only for sources without secular change.
        """
        x = np.log10(np.asarray(freq_ghz, dtype=np.float64) / self.ref_freq_ghz)
        s = 10.0 ** np.polynomial.polynomial.polyval(x, self.log10_coeffs)
        if self.mjd_ref is not None and self.rate_per_year != 0.0:
            if mjd is None:
                raise ValueError(f"{self.name} flux needs an MJD (secular decline)")
            years = (np.asarray(mjd, dtype=np.float64) - self.mjd_ref) / DAYS_PER_YEAR
            s = s * (1.0 - self.rate_per_year * years)
        return np.asarray(s, dtype=np.float64)


WEILAND_2011 = "Weiland et al. 2011, ApJS 192, 19, Table 17 (spectrum) and Section 5 (secular decrease)"
BAARS_1977 = "Baars et al. 1977, A&A 61, 99, Table 5 (Cyg A, 2-31 GHz, nu in MHz)"

FIXED_CALIBRATORS: dict[str, CalibratorModel] = {
    # Crab nebula, SIMBAD: 05h34m31.94s +22d00m52.2s
    "TauA": CalibratorModel(
        "TauA", 83.633083, 22.014500, (2.506, -0.302), 40.0, 53371.0, 0.0022, WEILAND_2011
    ),
    # remnant centre 23h23m24s +58d48m54s (SIMBAD; Green's catalogue of Galactic SNRs, G111.7-2.1)
    "CasA": CalibratorModel(
        "CasA", 350.850000, 58.815000, (2.204, -0.682, 0.038), 40.0, 51544.0, 0.0053, WEILAND_2011
    ),
    # SIMBAD: 19h59m28.356s +40d44m02.10s; ref_freq 1 MHz makes x = log10(nu / MHz) as in Baars et al.
    "CygA": CalibratorModel("CygA", 299.868150, 40.733916, (7.161, -1.244), 1.0e-3, None, 0.0, BAARS_1977),
}
CALIBRATOR_NAMES: tuple[str, ...] = ("TauA", "CasA", "CygA", "Jupiter")


def canonical_name(name: str) -> str:
    """Return the canonical calibrator name for ``name`` (case-insensitive; spaces, ``_``, ``-`` ignored).

    >>> canonical_name("taua"), canonical_name("Cas A"), canonical_name("JUPITER")
    ('TauA', 'CasA', 'Jupiter')

    Raises
    ------
    KeyError
        If the name is not one of TauA, CasA, CygA, Jupiter (the message lists the known names).
    """
    key = "".join(ch for ch in str(name).lower() if ch not in " _-")
    for known in CALIBRATOR_NAMES:
        if known.lower() == key:
            return known
    raise KeyError(f"unknown calibrator {name!r}; known calibrators: {', '.join(CALIBRATOR_NAMES)}")


def is_calibrator(name: str) -> bool:
    """True if ``name`` is a supported calibrator (case-insensitive)."""
    try:
        canonical_name(name)
    except KeyError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Beam and Jy <-> K
# --------------------------------------------------------------------------------------------------
def beam_fwhm_arcmin(freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float = BEAM_FWHM_ARCMIN_30GHZ) -> NDArray:
    """Beam FWHM (arcmin) at ``freq_ghz``: ``fwhm_30 · (30 GHz / ν)``."""
    return fwhm_arcmin_30ghz * 30.0 / np.asarray(freq_ghz, dtype=np.float64)


def beam_sigma_rad(freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float = BEAM_FWHM_ARCMIN_30GHZ) -> NDArray:
    """Gaussian beam σ (radians) at ``freq_ghz``."""
    return np.radians(beam_fwhm_arcmin(freq_ghz, fwhm_arcmin_30ghz) / 60.0) * FWHM_TO_SIGMA


def beam_solid_angle_sr(freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float = BEAM_FWHM_ARCMIN_30GHZ) -> NDArray:
    """Solid angle ``Ω_b = 2π σ_b²`` (sr) of the Gaussian beam at ``freq_ghz``."""
    return 2.0 * np.pi * beam_sigma_rad(freq_ghz, fwhm_arcmin_30ghz) ** 2


def jy_to_k_factor(freq_ghz: ArrayLike, solid_angle_sr: ArrayLike) -> NDArray:
    """Rayleigh–Jeans K per Jy for a source filling ``solid_angle_sr``: ``1e-26 c² / (2 k ν² Ω)``."""
    nu_hz = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    return JY_W_M2_HZ * SPEED_OF_LIGHT_M_S**2 / (2.0 * BOLTZMANN_J_K * nu_hz**2 * np.asarray(solid_angle_sr))


def point_source_peak_k(
    flux_jy: ArrayLike,
    freq_ghz: ArrayLike,
    fwhm_arcmin: ArrayLike | None = None,
    *,
    source_fwhm_arcmin: float = 0.0,
) -> NDArray[np.float64]:
    """Peak brightness (K_RJ) of a source of flux ``flux_jy`` seen by a Gaussian beam.

    Parameters
    ----------
    flux_jy : array_like
        Flux density, Jy.
    freq_ghz : array_like
        Frequency, GHz (broadcast with ``flux_jy``).
    fwhm_arcmin : array_like, optional
        Beam FWHM (arcmin); default ``beam_fwhm_arcmin(freq_ghz)`` (4.5′ at 30 GHz).
    source_fwhm_arcmin : float
        Intrinsic Gaussian source FWHM; added in quadrature to the beam (flux conserved). 0 = point.

    Returns
    -------
    ndarray
        ``T_peak = 1e-26 S c² / (2 k ν² Ω)`` with ``Ω = 2π σ²`` of the (convolved) beam, K.
    """
    if fwhm_arcmin is None:
        fwhm_arcmin = beam_fwhm_arcmin(freq_ghz)
    fwhm = np.sqrt(np.asarray(fwhm_arcmin, dtype=np.float64) ** 2 + float(source_fwhm_arcmin) ** 2)
    omega = 2.0 * np.pi * (np.radians(fwhm / 60.0) * FWHM_TO_SIGMA) ** 2
    return np.asarray(flux_jy, dtype=np.float64) * jy_to_k_factor(freq_ghz, omega)


def gaussian_flux_jy(
    amplitude_k: ArrayLike, sigma_x_deg: ArrayLike, sigma_y_deg: ArrayLike, freq_ghz: ArrayLike
) -> NDArray[np.float64]:
    """Flux (Jy) of an elliptical Gaussian of peak ``amplitude_k`` (K_RJ) and widths σx, σy (deg).

    ``S = 2π A σx σy · 2 k ν² / c² · 1e26`` (docs/level2.md#calibratorfitting step 6), σ in radians, ν in Hz.
    """
    nu_hz = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    sx = np.radians(np.asarray(sigma_x_deg, dtype=np.float64))
    sy = np.radians(np.asarray(sigma_y_deg, dtype=np.float64))
    return (
        2.0
        * np.pi
        * np.asarray(amplitude_k, dtype=np.float64)
        * sx
        * sy
        * 2.0
        * BOLTZMANN_J_K
        * nu_hz**2
        / SPEED_OF_LIGHT_M_S**2
        / JY_W_M2_HZ
    )


# --------------------------------------------------------------------------------------------------
# Flux models
# --------------------------------------------------------------------------------------------------
def jupiter_brightness_temperature_k(freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Jupiter disc brightness temperature (K): ``log10 T_b = 0.282419 log10(ν/30) + 2.161409``."""
    nu = np.asarray(freq_ghz, dtype=np.float64)
    return 10.0 ** (JUPITER_TB_SLOPE * np.log10(nu / 30.0) + JUPITER_TB_LOG10_30GHZ)


def jupiter_solid_angle_sr(distance_au: ArrayLike) -> NDArray[np.float64]:
    """Jupiter disc solid angle (sr) at ``distance_au``: ``2.481e-8 · (5.2 AU / d)²``."""
    return JUPITER_OMEGA_REF_SR * (JUPITER_DISTANCE_REF_AU / np.asarray(distance_au, dtype=np.float64)) ** 2


def cmb_rj_temperature_k(freq_ghz: ArrayLike, t_cmb_k: float = T_CMB_K) -> NDArray[np.float64]:
    """Rayleigh–Jeans brightness temperature (K) of the CMB at ``freq_ghz``: ``T x/(eˣ − 1)``, ``x = hν/kT``.

    ≈ 2.07 K at 30 GHz (docs/calibrators.md#jupiter).
    """
    x = PLANCK_J_S * np.asarray(freq_ghz, dtype=np.float64) * 1.0e9 / (BOLTZMANN_J_K * t_cmb_k)
    return t_cmb_k * x / np.expm1(x)


def jupiter_flux_jy(freq_ghz: ArrayLike, distance_au: ArrayLike) -> NDArray[np.float64]:
    """Jupiter flux density (Jy) seen against the sky: ``1e26 · 2kν²/c² · (T_b − T_CMB,RJ) · Ω``.

    The disc blocks the CMB behind it, so a total-power telescope sees the increment of the disc over the
    CMB, not the absolute disc temperature ``T_b`` (docs/calibrators.md#jupiter).
    """
    nu_hz = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    t_increment = jupiter_brightness_temperature_k(freq_ghz) - cmb_rj_temperature_k(freq_ghz)
    return (
        2.0
        * BOLTZMANN_J_K
        * nu_hz**2
        / SPEED_OF_LIGHT_M_S**2
        / JY_W_M2_HZ
        * t_increment
        * jupiter_solid_angle_sr(distance_au)
    )


def flux_jy(
    name: str, freq_ghz: ArrayLike, mjd: ArrayLike | None = None, *, distance_au: ArrayLike | None = None
) -> NDArray[np.float64]:
    """Model flux density (Jy) of calibrator ``name`` at ``freq_ghz`` (GHz) and ``mjd``.

    Parameters
    ----------
    name : str
        TauA, CasA, CygA or Jupiter (case-insensitive).
    freq_ghz : array_like
        Frequencies, GHz.
    mjd : array_like, optional
        Time (MJD UTC); needed for the secular decline and for Jupiter's distance.
    distance_au : array_like, optional
        Jupiter only: geocentric/topocentric distance; computed from the built-in ephemeris at
        ``mjd`` (as seen from OVRO) when omitted.
    """
    canon = canonical_name(name)
    if canon == "Jupiter":
        if distance_au is None:
            if mjd is None:
                raise ValueError("Jupiter flux needs distance_au or mjd")
            distance_au = jupiter_azel(mjd)[2]
        return jupiter_flux_jy(freq_ghz, distance_au)
    return FIXED_CALIBRATORS[canon].flux_jy(freq_ghz, mjd)


def taua_flux_jy(freq_ghz: ArrayLike, mjd: ArrayLike) -> NDArray[np.float64]:
    """Tau A flux (Jy) at ``freq_ghz`` and ``mjd``."""
    return FIXED_CALIBRATORS["TauA"].flux_jy(freq_ghz, mjd)


def casa_flux_jy(freq_ghz: ArrayLike, mjd: ArrayLike) -> NDArray[np.float64]:
    """Cas A flux (Jy) at ``freq_ghz`` and ``mjd``."""
    return FIXED_CALIBRATORS["CasA"].flux_jy(freq_ghz, mjd)


def cyga_flux_jy(freq_ghz: ArrayLike, mjd: ArrayLike | None = None) -> NDArray[np.float64]:
    """Cyg A flux (Jy) at ``freq_ghz`` (no secular change)."""
    return FIXED_CALIBRATORS["CygA"].flux_jy(freq_ghz, mjd)


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------
def jupiter_azel(mjd: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    """Topocentric Jupiter az, el (deg, no refraction) and distance (AU) from OVRO at ``mjd``.

    Uses astropy ``get_body`` with the built-in ephemeris (no network).
    """
    from astropy import units as u
    from astropy.coordinates import AltAz, get_body, solar_system_ephemeris
    from astropy.time import Time

    from utils.coordinates import configure_iers, earth_location

    configure_iers()
    m = np.atleast_1d(np.asarray(mjd, dtype=np.float64))
    t = Time(m, format="mjd", scale="utc")
    loc = earth_location()
    with solar_system_ephemeris.set("builtin"):
        body = get_body("jupiter", t, location=loc)
    aa = body.transform_to(AltAz(obstime=t, location=loc, pressure=0.0 * u.hPa))
    az = np.asarray(aa.az.to_value(u.deg), dtype=np.float64) % 360.0
    el = np.asarray(aa.alt.to_value(u.deg), dtype=np.float64)
    dist = np.asarray(aa.distance.to_value(u.AU), dtype=np.float64)
    shape = np.shape(mjd)
    return az.reshape(shape), el.reshape(shape), dist.reshape(shape)


def calibrator_position(name: str, mjd: ArrayLike | None = None) -> tuple[NDArray, NDArray]:
    """ICRS position (ra_deg, dec_deg) of calibrator ``name`` (case-insensitive).

    Fixed sources return their catalogue position (``mjd`` ignored). Jupiter needs ``mjd``: its
    topocentric AltAz from OVRO (built-in ephemeris) is converted back to an ICRS direction with
    :func:`utils.coordinates.azel_to_icrs`, the same transform used for the telescope pointing.

    Raises
    ------
    KeyError
        Unknown calibrator name.
    """
    canon = canonical_name(name)
    if canon != "Jupiter":
        model = FIXED_CALIBRATORS[canon]
        if mjd is None:
            return np.float64(model.ra_deg), np.float64(model.dec_deg)
        shape = np.shape(mjd)
        return np.full(shape, model.ra_deg), np.full(shape, model.dec_deg)
    if mjd is None:
        raise ValueError("Jupiter's position needs an MJD")
    from utils.coordinates import azel_to_icrs

    az, el, _ = jupiter_azel(mjd)
    ra, dec = azel_to_icrs(np.atleast_1d(az), np.atleast_1d(el), np.atleast_1d(mjd))
    shape = np.shape(mjd)
    return ra.reshape(shape), dec.reshape(shape)


# --------------------------------------------------------------------------------------------------
# Tangent plane and Gaussian source fitting (docs/level2.md#calibratorfitting)
# --------------------------------------------------------------------------------------------------
def tangent_plane_offsets_deg(
    ra_deg: ArrayLike, dec_deg: ArrayLike, ra0_deg: ArrayLike, dec0_deg: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Gnomonic (tangent-plane) offsets of (α, δ) from the centre (α0, δ0), docs/level2.md#calibratorfitting
    step 1.

    ``cos c = sin δ0 sin δ + cos δ0 cos δ cos(α − α0)``,
    ``x = cos δ sin(α − α0) / cos c``,
    ``y = (cos δ0 sin δ − sin δ0 cos δ cos(α − α0)) / cos c``.

    Parameters
    ----------
    ra_deg, dec_deg : array_like
        ICRS positions, degrees (broadcast with the centre).
    ra0_deg, dec0_deg : array_like
        Tangent point, degrees (scalars, or per-sample arrays for a moving source).

    Returns
    -------
    x_deg, y_deg : ndarray
        Offsets in degrees of the tangent plane; x grows towards east (increasing α), y towards
        north. Points 90° or more from the centre give NaN.
    """
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    ra0 = np.radians(np.asarray(ra0_deg, dtype=np.float64))
    dec0 = np.radians(np.asarray(dec0_deg, dtype=np.float64))
    dra = ra - ra0
    cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(dra)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(cos_c > 0.0, 1.0 / cos_c, np.nan)
    x = np.cos(dec) * np.sin(dra) * inv
    y = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(dra)) * inv
    return np.degrees(x), np.degrees(y)


def tangent_plane_to_icrs_deg(
    x_deg: ArrayLike, y_deg: ArrayLike, ra0_deg: ArrayLike, dec0_deg: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inverse of :func:`tangent_plane_offsets_deg`: tangent-plane offsets (deg) → ICRS (deg).

    Returns
    -------
    ra_deg, dec_deg : ndarray
        RA in [0, 360), Dec in degrees.
    """
    x = np.radians(np.asarray(x_deg, dtype=np.float64))
    y = np.radians(np.asarray(y_deg, dtype=np.float64))
    ra0 = np.radians(np.asarray(ra0_deg, dtype=np.float64))
    dec0 = np.radians(np.asarray(dec0_deg, dtype=np.float64))
    denom = np.cos(dec0) - y * np.sin(dec0)
    ra = ra0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(dec0) + y * np.cos(dec0), np.hypot(x, denom))
    return np.degrees(ra) % 360.0, np.degrees(dec)


BACKGROUND_MODELS: tuple[str, ...] = ("constant", "plane")


@dataclass
class GaussianSourceFit:
    """Result of :func:`fit_gaussian_source` (docs/level2.md#calibratorfitting steps 4–7).

    Failed or rejected fits have ``fit_ok = False``, NaN parameters and a ``reason``.

    Attributes
    ----------
    fit_ok : bool
        Converged, every value finite and no bound active.
    reason : str
        Why the fit was rejected ('' if ``fit_ok``).
    amplitude_k, amplitude_error_k : float
        Peak A above the background (same unit as the data, e.g. vane K).
    x0_deg, y0_deg, x0_error_deg, y0_error_deg : float
        Fitted centre in the tangent plane of the fit coordinates, degrees.
    sigma_x_deg, sigma_y_deg, sigma_x_error_deg, sigma_y_error_deg : float
        Gaussian widths along the (rotated) axes, degrees.
    position_angle_deg : float
        θ of the x′ axis from +x towards +y, degrees in (−90, 90]; 0 unless fitted.
    position_angle_error_deg : float
        NaN unless ``fit_rotation``.
    background : ndarray
        ``(c0,)`` or ``(c0, c1, c2)`` of the background model (data unit, per degree).
    chi2_reduced : float
        ``Σ r² / (n − p)`` of the residuals weighted by ``1/noise_k``.
    n_samples : int
        Samples inside the fit region.
    covariance : ndarray
        Parameter covariance ``(JᵀJ)⁻¹ · max(χ²_red, 1)`` in the order
        ``(A, x0, y0, σx, σy[, θ], c0[, c1, c2])`` (θ in radians).
    params : ndarray
        Best-fit parameters in the same order (for :func:`gaussian_source_model`).
    median_k : float
        Median of the region that was subtracted before the fit.
    """

    fit_ok: bool = False
    reason: str = ""
    amplitude_k: float = math.nan
    amplitude_error_k: float = math.nan
    x0_deg: float = math.nan
    y0_deg: float = math.nan
    x0_error_deg: float = math.nan
    y0_error_deg: float = math.nan
    sigma_x_deg: float = math.nan
    sigma_y_deg: float = math.nan
    sigma_x_error_deg: float = math.nan
    sigma_y_error_deg: float = math.nan
    position_angle_deg: float = math.nan
    position_angle_error_deg: float = math.nan
    background: NDArray[np.float64] = field(default_factory=lambda: np.full(1, np.nan))
    chi2_reduced: float = math.nan
    n_samples: int = 0
    covariance: NDArray[np.float64] = field(default_factory=lambda: np.full((0, 0), np.nan))
    params: NDArray[np.float64] = field(default_factory=lambda: np.full(0, np.nan))
    median_k: float = math.nan

    def flux_jy(self, freq_ghz: float) -> tuple[float, float]:
        """Flux density and its 1σ error (Jy) at ``freq_ghz`` (docs/level2.md#calibratorfitting step 6).

        ``S = 2π A σx σy · 2kν²/c² · 1e26``. The relative error is propagated with the full
        parameter covariance, ``(δS/S)² = gᵀ C g`` with ``g = ∂ln S/∂p = (1/A, 1/σx, 1/σy)`` on
        (A, σx, σy). **Deliberate difference** from the spec's ``sqrt((δA/A)² + (δσx/σx)² +
        (δσy/σy)²)``: A and σ are strongly anti-correlated in a Gaussian fit, and dropping the
        covariances overestimates δS by about a factor 2. NaN for a failed fit.
        """
        if not self.fit_ok:
            return math.nan, math.nan
        s = float(gaussian_flux_jy(self.amplitude_k, self.sigma_x_deg, self.sigma_y_deg, freq_ghz))
        idx = [0, 3, 4]
        g = np.array([1.0 / self.amplitude_k, 1.0 / self.sigma_x_deg, 1.0 / self.sigma_y_deg])
        var = float(g @ self.covariance[np.ix_(idx, idx)] @ g)
        return s, abs(s) * math.sqrt(var) if var >= 0.0 else math.nan


def _n_background(background: str) -> int:
    if background not in BACKGROUND_MODELS:
        raise ValueError(f"background must be one of {BACKGROUND_MODELS}, got {background!r}")
    return 1 if background == "constant" else 3


def gaussian_source_model(
    params: ArrayLike,
    x_deg: ArrayLike,
    y_deg: ArrayLike,
    *,
    background: str = "plane",
    fit_rotation: bool = False,
) -> NDArray[np.float64]:
    """Elliptical Gaussian plus background at tangent-plane offsets (docs/level2.md#calibratorfitting step 5).

    ``A·exp(−½[(x′/σx)² + (y′/σy)²]) + c0 [+ c1 x + c2 y]`` with
    ``x′ = (x − x0) cos θ + (y − y0) sin θ`` and ``y′ = −(x − x0) sin θ + (y − y0) cos θ``.

    Parameters
    ----------
    params : array_like
        ``(A, x0, y0, σx, σy[, θ], c0[, c1, c2])`` (degrees; θ in radians), as in
        :attr:`GaussianSourceFit.params`.
    x_deg, y_deg : array_like
        Offsets, degrees.
    background : {'constant', 'plane'}
    fit_rotation : bool
        Whether ``params`` contains θ.
    """
    return _model_and_jacobian(
        np.asarray(params, dtype=np.float64),
        np.asarray(x_deg, dtype=np.float64),
        np.asarray(y_deg, dtype=np.float64),
        _n_background(background),
        fit_rotation,
        jac=False,
    )[0]


def _model_and_jacobian(
    p: NDArray, x: NDArray, y: NDArray, n_bg: int, rotation: bool, *, jac: bool
) -> tuple[NDArray, NDArray | None]:
    a, x0, y0, sx, sy = p[:5]
    k = 5
    if rotation:
        theta = p[5]
        k = 6
        ct, st = math.cos(theta), math.sin(theta)
    else:
        ct, st = 1.0, 0.0
    c = p[k : k + n_bg]
    dx = x - x0
    dy = y - y0
    xp = dx * ct + dy * st
    yp = -dx * st + dy * ct
    g = np.exp(-0.5 * ((xp / sx) ** 2 + (yp / sy) ** 2))
    model = a * g + c[0]
    if n_bg == 3:
        model = model + c[1] * x + c[2] * y
    if not jac:
        return model, None
    j = np.empty((x.size, p.size))
    ag = a * g
    j[:, 0] = g
    j[:, 1] = ag * (xp * ct / sx**2 - yp * st / sy**2)
    j[:, 2] = ag * (xp * st / sx**2 + yp * ct / sy**2)
    j[:, 3] = ag * xp**2 / sx**3
    j[:, 4] = ag * yp**2 / sy**3
    if rotation:
        j[:, 5] = -ag * xp * yp * (1.0 / sx**2 - 1.0 / sy**2)
    j[:, k] = 1.0
    if n_bg == 3:
        j[:, k + 1] = x
        j[:, k + 2] = y
    return model, j


def fit_gaussian_source(
    x_deg: ArrayLike,
    y_deg: ArrayLike,
    data_k: ArrayLike,
    noise_k: float,
    beam_sigma_deg: float,
    *,
    fit_radius_deg: float = 0.25,
    min_width_factor: float = 0.3,
    max_width_factor: float = 3.0,
    min_samples: int = 50,
    background: str = "plane",
    fit_rotation: bool = False,
) -> GaussianSourceFit:
    """Fit an elliptical Gaussian source plus background to samples around a calibrator.

    Implements steps 4–7 of docs/level2.md#calibratorfitting: the region is ``r = hypot(x, y) <
    fit_radius_deg`` with finite data (at least ``min_samples`` samples); its median is subtracted; the model
    of :func:`gaussian_source_model` is fitted with ``scipy.optimize.least_squares(method='trf')`` on
    residuals weighted by ``1/noise_k``, with ``A > 0``, ``σ ∈ [min, max]·σ_b`` and ``|x0|, |y0| <
    fit_radius``. Errors are ``sqrt(diag((JᵀJ)⁻¹))·sqrt(max(χ²_red, 1))``. A fit that did not converge, has a
    non-finite value or an active bound is rejected (``fit_ok = False``, NaN values).

    Parameters
    ----------
    x_deg, y_deg : array_like, shape (n,)
        Tangent-plane offsets of the samples from the source, degrees.
    data_k : array_like, shape (n,)
        Data (e.g. vane K); NaN = no value.
    noise_k : float
        White-noise rms per sample of ``data_k`` (same unit).
    beam_sigma_deg : float
        Beam σ_b at the data's frequency, degrees (start value and width bounds).
    fit_radius_deg : float
        Radius of the fit region and bound on the centre, degrees.
    min_width_factor, max_width_factor : float
        Allowed σx, σy relative to σ_b.
    min_samples : int
        Minimum number of samples in the region.
    background : {'constant', 'plane'}
        ``c0`` or ``c0 + c1 x + c2 y``.
    fit_rotation : bool
        Fit the position angle θ (otherwise θ ≡ 0: σx along x, σy along y).

    Returns
    -------
    GaussianSourceFit
    """
    from scipy.optimize import least_squares

    n_bg = _n_background(background)
    x = np.asarray(x_deg, dtype=np.float64).ravel()
    y = np.asarray(y_deg, dtype=np.float64).ravel()
    d = np.asarray(data_k, dtype=np.float64).ravel()
    sig_b = float(beam_sigma_deg)
    noise = float(noise_k)
    if not (np.isfinite(noise) and noise > 0.0):
        return GaussianSourceFit(reason=f"noise rms {noise!r} is not a positive number")
    if not (np.isfinite(sig_b) and sig_b > 0.0):
        return GaussianSourceFit(reason=f"beam sigma {sig_b!r} is not a positive number")
    with np.errstate(invalid="ignore"):
        sel = np.isfinite(d) & np.isfinite(x) & np.isfinite(y) & (np.hypot(x, y) < fit_radius_deg)
    n = int(sel.sum())
    if n < max(int(min_samples), 1):
        return GaussianSourceFit(
            reason=f"{n} samples within {fit_radius_deg} deg (need >= {min_samples})", n_samples=n
        )
    x, y, d = x[sel], y[sel], d[sel]
    median = float(np.median(d))
    d = d - median
    n_par = 5 + int(fit_rotation) + n_bg
    if n <= n_par:
        return GaussianSourceFit(reason=f"{n} samples for {n_par} parameters", n_samples=n, median_k=median)
    ipk = int(np.argmax(d))
    a0 = float(d[ipk])
    if not a0 > 0.0:
        return GaussianSourceFit(reason="no positive signal in the fit region", n_samples=n, median_k=median)
    s_lo, s_hi = min_width_factor * sig_b, max_width_factor * sig_b
    r = float(fit_radius_deg)
    p0 = [a0, float(x[ipk]), float(y[ipk]), sig_b, sig_b * (1.05 if fit_rotation else 1.0)]
    lo = [0.0, -r, -r, s_lo, s_lo]
    hi = [np.inf, r, r, s_hi, s_hi]
    if fit_rotation:
        p0.append(0.0)
        lo.append(-np.inf)
        hi.append(np.inf)
    p0 += [0.0] * n_bg
    lo += [-np.inf] * n_bg
    hi += [np.inf] * n_bg
    p0a = np.clip(np.asarray(p0), np.nextafter(np.asarray(lo), np.inf), np.nextafter(np.asarray(hi), -np.inf))
    inv_noise = 1.0 / noise

    def fun(p: NDArray) -> NDArray:
        return (_model_and_jacobian(p, x, y, n_bg, fit_rotation, jac=False)[0] - d) * inv_noise

    def jac(p: NDArray) -> NDArray:
        return _model_and_jacobian(p, x, y, n_bg, fit_rotation, jac=True)[1] * inv_noise

    try:
        res = least_squares(fun, p0a, jac=jac, bounds=(lo, hi), method="trf", x_scale="jac")
    except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - defensive
        return GaussianSourceFit(reason=f"least_squares failed: {exc}", n_samples=n, median_k=median)
    p = res.x
    chi2_red = float(2.0 * res.cost / (n - n_par))
    failed = GaussianSourceFit(n_samples=n, median_k=median, chi2_reduced=math.nan)
    if not res.success:
        failed.reason = f"did not converge: {res.message}"
        return failed
    lo_a, hi_a = np.asarray(lo), np.asarray(hi)
    span = np.array([max(a0, 1e-300), r, r, sig_b, sig_b] + [1.0] * (n_par - 5))
    tol = 1e-6 * span
    at_bound = (res.active_mask != 0) | (np.abs(p - lo_a) <= tol) | (np.abs(hi_a - p) <= tol)
    if at_bound.any():
        names = ["amplitude", "x0", "y0", "sigma_x", "sigma_y"] + ["theta"] * int(fit_rotation)
        names += ["c0", "c1", "c2"][:n_bg]
        failed.reason = "bound active on " + ", ".join(nm for nm, b in zip(names, at_bound) if b)
        return failed
    try:
        cov = np.linalg.inv(res.jac.T @ res.jac) * max(chi2_red, 1.0)
    except np.linalg.LinAlgError:
        failed.reason = "singular normal matrix"
        return failed
    err = np.sqrt(np.diag(cov)) if np.all(np.diag(cov) >= 0) else np.full(n_par, np.nan)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(err)) and np.isfinite(chi2_red)):
        failed.reason = "non-finite parameter, error or chi2"
        return failed
    k = 5 + int(fit_rotation)
    theta = float(p[5]) if fit_rotation else 0.0
    # Report θ in (−90°, 90°]: a Gaussian is symmetric under θ → θ + 180°.
    pa = math.degrees(theta)
    pa = pa - 180.0 * math.ceil((pa - 90.0) / 180.0)
    return GaussianSourceFit(
        fit_ok=True,
        amplitude_k=float(p[0]),
        amplitude_error_k=float(err[0]),
        x0_deg=float(p[1]),
        y0_deg=float(p[2]),
        x0_error_deg=float(err[1]),
        y0_error_deg=float(err[2]),
        sigma_x_deg=float(p[3]),
        sigma_y_deg=float(p[4]),
        sigma_x_error_deg=float(err[3]),
        sigma_y_error_deg=float(err[4]),
        position_angle_deg=pa,
        position_angle_error_deg=math.degrees(float(err[5])) if fit_rotation else math.nan,
        background=np.asarray(p[k:], dtype=np.float64),
        chi2_reduced=chi2_red,
        n_samples=n,
        covariance=cov,
        params=np.asarray(p, dtype=np.float64),
        median_k=median,
    )


# --------------------------------------------------------------------------------------------------
# Calibration-factor table (docs/level2.md#calibrationmodel "Evaluation")
# --------------------------------------------------------------------------------------------------
MODEL_TYPES: tuple[str, ...] = ("polynomial", "mean", "nearest")
Element = tuple[int, int, int]


def _as_list(value) -> list[float]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        value = json.loads(value) if value.strip() else []
    return [float(v) for v in np.atleast_1d(np.asarray(value, dtype=np.float64))]


@dataclass(frozen=True)
class CalibrationModelRow:
    """One fitted calibration model for a (feed, band, channel) element
    (docs/database.md#calibration_model_fit)."""

    feed: int
    band: int
    channel: int
    model_type: str
    poly_coeffs: tuple[float, ...] = ()
    mjd_ref: float = 59000.0
    nearest_mjds: tuple[float, ...] = ()
    nearest_gains: tuple[float, ...] = ()
    mjd_min: float | None = None
    mjd_max: float | None = None
    fit_rms: float | None = None
    n_observations: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def factor(self, mjd: ArrayLike) -> NDArray[np.float64]:
        """Evaluate the calibration factor at ``mjd`` (array-friendly)."""
        m = np.asarray(mjd, dtype=np.float64)
        if self.model_type == "polynomial":
            if not self.poly_coeffs:
                return np.full(m.shape, np.nan)
            lo = -np.inf if self.mjd_min is None else self.mjd_min
            hi = np.inf if self.mjd_max is None else self.mjd_max
            t = (np.clip(m, lo, hi) - self.mjd_ref) / DAYS_PER_YEAR
            return np.asarray(np.polynomial.polynomial.polyval(t, self.poly_coeffs), dtype=np.float64)
        if self.model_type == "mean":
            value = self.poly_coeffs[0] if self.poly_coeffs else np.nan
            return np.full(m.shape, value, dtype=np.float64)
        # nearest: ratio at the closest MJD (ties go to the earlier point)
        if not self.nearest_mjds:
            return np.full(m.shape, np.nan)
        mjds = np.asarray(self.nearest_mjds, dtype=np.float64)
        gains = np.asarray(self.nearest_gains, dtype=np.float64)
        order = np.argsort(mjds, kind="stable")
        mjds, gains = mjds[order], gains[order]
        pick = np.argmin(np.abs(m[..., None] - mjds), axis=-1)  # first (earliest) on ties
        return np.asarray(gains[pick], dtype=np.float64)


class CalibrationTable:
    """Calibration factors (measured / model calibrator flux) per (feed, band, channel) and time.

    Build it with :meth:`from_rows` from ``calibration_model_fit`` rows
    (docs/database.md#calibration_model_fit). Data in vane kelvin divided by :meth:`factor` are in K_RJ
    (docs/mapmaking.md#level2datareader).

    Evaluation (docs/level2.md#calibrationmodel):

    * ``polynomial``: ``Σ c_k t^k`` with ``t = (mjd − mjd_ref)/365.25``; outside
      ``[mjd_min, mjd_max]`` the polynomial is evaluated at the nearest end (never extrapolated);
    * ``mean``: the constant (stored as ``poly_coeffs[0]``);
    * ``nearest``: the ratio at the closest MJD.
    """

    def __init__(self, source: str, models: Mapping[Element, CalibrationModelRow] | None = None) -> None:
        self.source: str = str(source)
        self._models: dict[Element, CalibrationModelRow] = dict(models or {})

    @classmethod
    def from_rows(cls, source: str, rows: Iterable[Mapping]) -> CalibrationTable:
        """Build a table from mappings with keys ``feed, band, channel, model_type, poly_coeffs,
        mjd_ref, nearest_mjds, nearest_gains, mjd_min, mjd_max, fit_rms, n_observations``.

        JSON-encoded strings are accepted for the list-valued keys. Missing optional keys default to
        empty/None. An unknown ``model_type`` raises ``ValueError``.
        """
        models: dict[Element, CalibrationModelRow] = {}
        known = {f.name for f in fields(CalibrationModelRow)} - {"extra"}
        for row in rows:
            model_type = str(row["model_type"]).lower()
            if model_type not in MODEL_TYPES:
                raise ValueError(
                    f"unknown calibration model_type {row['model_type']!r}; "
                    f"expected one of {', '.join(MODEL_TYPES)}"
                )
            key = (int(row["feed"]), int(row["band"]), int(row["channel"]))
            mjd_ref = row.get("mjd_ref")
            mjd_min = row.get("mjd_min")
            mjd_max = row.get("mjd_max")
            models[key] = CalibrationModelRow(
                feed=key[0],
                band=key[1],
                channel=key[2],
                model_type=model_type,
                poly_coeffs=tuple(_as_list(row.get("poly_coeffs"))),
                mjd_ref=59000.0 if mjd_ref is None else float(mjd_ref),
                nearest_mjds=tuple(_as_list(row.get("nearest_mjds"))),
                nearest_gains=tuple(_as_list(row.get("nearest_gains"))),
                mjd_min=None if mjd_min is None else float(mjd_min),
                mjd_max=None if mjd_max is None else float(mjd_max),
                fit_rms=None if row.get("fit_rms") is None else float(row["fit_rms"]),
                n_observations=None if row.get("n_observations") is None else int(row["n_observations"]),
                extra={k: v for k, v in row.items() if k not in known},
            )
        return cls(source, models)

    def has(self, feed: int, band: int, channel: int) -> bool:
        """True if a model exists for this element."""
        return (int(feed), int(band), int(channel)) in self._models

    def elements(self) -> list[Element]:
        """Sorted list of (feed, band, channel) elements with a model."""
        return sorted(self._models)

    def model(self, feed: int, band: int, channel: int) -> CalibrationModelRow | None:
        """The model row of an element, or None."""
        return self._models.get((int(feed), int(band), int(channel)))

    def factor(self, feed: int, band: int, channel: int, mjd: ArrayLike) -> float | NDArray[np.float64]:
        """Calibration factor at ``mjd``; NaN if the element has no model.

        Returns a float for scalar ``mjd`` and an array of the same shape otherwise.
        """
        model = self._models.get((int(feed), int(band), int(channel)))
        m = np.asarray(mjd, dtype=np.float64)
        out = np.full(m.shape, np.nan) if model is None else model.factor(m)
        return float(out) if out.ndim == 0 else out

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, element: Sequence[int]) -> bool:
        return tuple(int(v) for v in element) in self._models

    def __repr__(self) -> str:
        return f"CalibrationTable(source={self.source!r}, n_elements={len(self)})"


__all__ = [
    "BACKGROUND_MODELS",
    "BEAM_FWHM_ARCMIN_30GHZ",
    "CALIBRATOR_NAMES",
    "FIXED_CALIBRATORS",
    "FWHM_TO_SIGMA",
    "CalibrationModelRow",
    "CalibrationTable",
    "CalibratorModel",
    "GaussianSourceFit",
    "beam_fwhm_arcmin",
    "beam_sigma_rad",
    "beam_solid_angle_sr",
    "calibrator_position",
    "canonical_name",
    "casa_flux_jy",
    "cmb_rj_temperature_k",
    "cyga_flux_jy",
    "fit_gaussian_source",
    "flux_jy",
    "gaussian_flux_jy",
    "gaussian_source_model",
    "is_calibrator",
    "jupiter_azel",
    "jupiter_brightness_temperature_k",
    "jupiter_flux_jy",
    "jupiter_solid_angle_sr",
    "jy_to_k_factor",
    "point_source_peak_k",
    "tangent_plane_offsets_deg",
    "tangent_plane_to_icrs_deg",
    "taua_flux_jy",
]
