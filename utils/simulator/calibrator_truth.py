"""Calibrator truth of the simulator: flux densities, positions and beam-diluted peak brightness
(docs/calibrators.md#two-implementations, docs/simulator.md#calibrators).

Written from the literature independently of the pipeline's ``utils/calibrators.py``, which the simulator
never imports: the two implementations of the same cited models check each other (tests/test_calibrators.py).
Each model is coded in the form its paper gives it.

* **Tau A, Cas A** — Weiland et al. 2011, ApJS 192, 19 (WMAP seven-year celestial calibrators), Table 17:
  ``log10 S = a + b log10(ν/40 GHz) + c [log10(ν/40 GHz)]²``; Tau A (a, b) = (2.506, −0.302) at epoch 2005.0,
  Cas A (a, b, c) = (2.204, −0.682, 0.038) at epoch 2000.0. Secular decrease (their Section 5), linear in
  time: 0.22 %/yr (Tau A), 0.53 %/yr (Cas A).
* **Cyg A** — Baars et al. 1977, A&A 61, 99, Table 5, 2–31 GHz: ``log10 S = 7.161 − 1.244 log10(ν/MHz)``.
* **Jupiter** — disc-averaged brightness temperatures of Karim et al. 2018, AJ 155, 129 at fifteen
  frequencies from 27.7 to 34.7 GHz (tabulated below), interpolated by the least-squares power law through
  them; the disc solid angle is 2.481e-8 sr at 5.2 AU (Weiland et al. 2011). The telescope sees the disc's
  increment over the CMB it hides, ``T_b − T_CMB,RJ(ν)``, with T_CMB = 2.72548 K (Fixsen 2009, ApJ 707, 916).
  Position and distance: astropy ``get_body`` with the built-in ephemeris, topocentric at OVRO.
* **Positions** (ICRS): Tau A 05h34m31.94s +22°00′52.2″ (SIMBAD), Cas A 23h23m24s +58°48′54″ (SIMBAD, Green's
  catalogue of Galactic SNRs), Cyg A 19h59m28.356s +40°44′02.10″ (SIMBAD).
* **Peak brightness** of a source of flux S in a circular Gaussian beam (FWHM θ): the beam solid angle is
  ``Ω = π θ² / (4 ln 2)`` and ``T_peak = S λ² / (2 k Ω)`` (Rayleigh–Jeans), with a Gaussian source of FWHM
  θ_s broadening the beam to ``sqrt(θ² + θ_s²)``.

Physical constants come from ``astropy.constants`` (CODATA), not from the pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FWHM_TO_SIGMA: float = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
"""σ of a Gaussian per unit FWHM."""
BEAM_FWHM_ARCMIN_AT_30GHZ: float = 4.5
"""Simulated beam FWHM at 30 GHz (arcmin), scaling as 1/ν (docs/simulator.md#sky-models)."""
JULIAN_YEAR_DAYS: float = 365.25
T_CMB_FIXSEN_K: float = 2.72548
"""CMB temperature, Fixsen 2009, ApJ 707, 916."""

# Karim et al. 2018, AJ 155, 129: Jupiter disc-averaged brightness temperature (K) per band (GHz)
KARIM_2018_FREQ_GHZ: tuple[float, ...] = (
    27.688, 28.188, 28.688, 29.188, 29.688, 30.188, 30.688, 31.188,
    31.688, 32.188, 32.688, 33.188, 33.688, 34.188, 34.688,
)  # fmt: skip
KARIM_2018_TB_K: tuple[float, ...] = (
    141.757, 142.369, 143.225, 143.911, 144.794, 145.347, 145.720, 146.635,
    147.235, 147.707, 148.534, 149.876, 149.615, 150.385, 151.013,
)  # fmt: skip
JUPITER_OMEGA_AT_5P2_AU_SR: float = 2.481e-8
"""Jupiter's disc solid angle at 5.2 AU (Weiland et al. 2011)."""

CALIBRATOR_NAMES: tuple[str, ...] = ("TauA", "CasA", "CygA", "Jupiter")


def _constants() -> tuple[float, float, float]:
    """(c m/s, k J/K, h J s) from astropy.constants."""
    from astropy import constants as const

    return float(const.c.si.value), float(const.k_B.si.value), float(const.h.si.value)


@dataclass(frozen=True)
class FixedCalibrator:
    """Catalogue position (sexagesimal, ICRS) and spectrum of a fixed calibrator."""

    name: str
    ra_hms: str
    dec_dms: str
    reference: str

    @property
    def ra_deg(self) -> float:
        return _sexagesimal_deg(self.ra_hms, hours=True)

    @property
    def dec_deg(self) -> float:
        return _sexagesimal_deg(self.dec_dms, hours=False)


def _sexagesimal_deg(text: str, hours: bool) -> float:
    """Degrees of ``'hh mm ss.s'`` (``hours``) or ``'±dd mm ss.s'``."""
    parts = text.split()
    sign = -1.0 if parts[0].startswith("-") else 1.0
    a, b, c = (abs(float(p)) for p in parts)
    value = sign * (a + b / 60.0 + c / 3600.0)
    return value * 15.0 if hours else value


FIXED: dict[str, FixedCalibrator] = {
    "TauA": FixedCalibrator("TauA", "05 34 31.94", "+22 00 52.2", "Weiland et al. 2011 Table 17"),
    "CasA": FixedCalibrator("CasA", "23 23 24.0", "+58 48 54.0", "Weiland et al. 2011 Table 17"),
    "CygA": FixedCalibrator("CygA", "19 59 28.356", "+40 44 02.10", "Baars et al. 1977 Table 5"),
}


def canonical_name(name: str) -> str:
    """``TauA``, ``CasA``, ``CygA`` or ``Jupiter`` for any spelling (case, spaces, ``_``, ``-`` ignored).

    Raises
    ------
    KeyError
        Not a calibrator of the simulator.
    """
    key = str(name).lower().replace(" ", "").replace("_", "").replace("-", "")
    table = {n.lower(): n for n in CALIBRATOR_NAMES}
    if key not in table:
        raise KeyError(f"unknown calibrator {name!r}; known calibrators: {', '.join(CALIBRATOR_NAMES)}")
    return table[key]


def is_calibrator(name: str) -> bool:
    """True if ``name`` is one of the simulator's calibrators."""
    try:
        canonical_name(name)
    except KeyError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------------
def _years_since(mjd: ArrayLike, year: int) -> NDArray[np.float64]:
    from astropy.time import Time

    epoch = Time(f"{year}-01-01T00:00:00", format="isot", scale="utc").mjd
    return (np.asarray(mjd, dtype=np.float64) - epoch) / JULIAN_YEAR_DAYS


def taua_flux(freq_ghz: ArrayLike, mjd: ArrayLike) -> NDArray[np.float64]:
    """Tau A (Jy): Weiland et al. 2011 Table 17 at epoch 2005.0, fading 0.22 %/yr."""
    lg = np.log10(np.asarray(freq_ghz, dtype=np.float64) / 40.0)
    return 10.0 ** (2.506 - 0.302 * lg) * (1.0 - 0.0022 * _years_since(mjd, 2005))


def casa_flux(freq_ghz: ArrayLike, mjd: ArrayLike) -> NDArray[np.float64]:
    """Cas A (Jy): Weiland et al. 2011 Table 17 at epoch 2000.0, fading 0.53 %/yr."""
    lg = np.log10(np.asarray(freq_ghz, dtype=np.float64) / 40.0)
    return 10.0 ** (2.204 - 0.682 * lg + 0.038 * lg * lg) * (1.0 - 0.0053 * _years_since(mjd, 2000))


def cyga_flux(freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Cyg A (Jy): Baars et al. 1977 Table 5, ``log S = 7.161 − 1.244 log ν[MHz]``."""
    nu_mhz = np.asarray(freq_ghz, dtype=np.float64) * 1000.0
    return 10.0 ** (7.161 - 1.244 * np.log10(nu_mhz))


def jupiter_disc_temperature_k(freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Jupiter's absolute disc brightness temperature (K): power law through Karim et al. (2018)."""
    slope, intercept = np.polyfit(
        np.log(np.asarray(KARIM_2018_FREQ_GHZ)), np.log(np.asarray(KARIM_2018_TB_K)), 1
    )
    return np.exp(intercept + slope * np.log(np.asarray(freq_ghz, dtype=np.float64)))


def cmb_rayleigh_jeans_k(freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Rayleigh–Jeans temperature of the CMB (K): the Planck intensity at T_CMB divided by 2kν²/c²."""
    _, k, h = _constants()
    nu = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    return (h * nu / k) / (np.exp(h * nu / (k * T_CMB_FIXSEN_K)) - 1.0)


def jupiter_flux(freq_ghz: ArrayLike, distance_au: ArrayLike) -> NDArray[np.float64]:
    """Jupiter (Jy) against the sky: ``2kν²/c² · (T_b − T_CMB,RJ) · Ω(d)`` in Jy."""
    c, k, _ = _constants()
    nu = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    omega = JUPITER_OMEGA_AT_5P2_AU_SR * (5.2 / np.asarray(distance_au, dtype=np.float64)) ** 2
    dt = jupiter_disc_temperature_k(freq_ghz) - cmb_rayleigh_jeans_k(freq_ghz)
    return 2.0 * k * nu**2 / c**2 * dt * omega / 1.0e-26


def flux_jy(
    name: str, freq_ghz: ArrayLike, mjd: ArrayLike | None = None, *, distance_au: ArrayLike | None = None
) -> NDArray[np.float64]:
    """True flux density (Jy) of ``name`` at ``freq_ghz`` (GHz) and ``mjd``.

    Tau A and Cas A need ``mjd`` (secular decrease); Jupiter needs ``distance_au`` or ``mjd``.
    """
    canon = canonical_name(name)
    if canon == "CygA":
        return cyga_flux(freq_ghz)
    if canon == "Jupiter":
        if distance_au is None:
            if mjd is None:
                raise ValueError("Jupiter flux needs distance_au or mjd")
            distance_au = jupiter_azel(mjd)[2]
        return jupiter_flux(freq_ghz, distance_au)
    if mjd is None:
        raise ValueError(f"{canon} flux needs an MJD (secular decrease)")
    return taua_flux(freq_ghz, mjd) if canon == "TauA" else casa_flux(freq_ghz, mjd)


# --------------------------------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------------------------------
def beam_fwhm_arcmin(freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float = BEAM_FWHM_ARCMIN_AT_30GHZ) -> NDArray:
    """Beam FWHM (arcmin) at ``freq_ghz``, proportional to wavelength."""
    return fwhm_arcmin_30ghz * (30.0 / np.asarray(freq_ghz, dtype=np.float64))


def point_source_peak_k(
    flux_jy: ArrayLike,
    freq_ghz: ArrayLike,
    fwhm_arcmin: ArrayLike | None = None,
    *,
    source_fwhm_arcmin: float = 0.0,
) -> NDArray[np.float64]:
    """Peak Rayleigh–Jeans brightness (K) of a source of ``flux_jy`` in a Gaussian beam of ``fwhm_arcmin``.

    ``T = S λ² / (2 k Ω)`` with ``Ω = π θ²/(4 ln 2)``, θ the beam FWHM broadened by a Gaussian source of
    FWHM ``source_fwhm_arcmin`` (flux conserved).
    """
    c, k, _ = _constants()
    if fwhm_arcmin is None:
        fwhm_arcmin = beam_fwhm_arcmin(freq_ghz)
    theta2 = np.asarray(fwhm_arcmin, dtype=np.float64) ** 2 + float(source_fwhm_arcmin) ** 2
    theta2_rad = theta2 * (math.pi / (180.0 * 60.0)) ** 2
    omega = math.pi * theta2_rad / (4.0 * math.log(2.0))
    wavelength = c / (np.asarray(freq_ghz, dtype=np.float64) * 1.0e9)
    return np.asarray(flux_jy, dtype=np.float64) * 1.0e-26 * wavelength**2 / (2.0 * k * omega)


# --------------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------------
def jupiter_azel(mjd: ArrayLike) -> tuple[NDArray, NDArray, NDArray]:
    """Jupiter's geometric (unrefracted) az, el (deg) and distance (AU) from OVRO at ``mjd`` (UTC).

    astropy ``get_body`` with the built-in ephemeris, transformed to ``AltAz(pressure=0)``
    (docs/calibrators.md#elevations-and-refraction).
    """
    from astropy import units as u
    from astropy.coordinates import AltAz, get_body, solar_system_ephemeris
    from astropy.time import Time

    from utils.coordinates import configure_iers, earth_location

    configure_iers()
    shape = np.shape(mjd)
    t = Time(np.atleast_1d(np.asarray(mjd, dtype=np.float64)), format="mjd", scale="utc")
    site = earth_location()
    with solar_system_ephemeris.set("builtin"):
        body = get_body("jupiter", t, location=site)
    altaz = body.transform_to(AltAz(obstime=t, location=site, pressure=0.0 * u.hPa))
    return (
        (np.asarray(altaz.az.deg, dtype=np.float64) % 360.0).reshape(shape),
        np.asarray(altaz.alt.deg, dtype=np.float64).reshape(shape),
        np.asarray(altaz.distance.to_value(u.AU), dtype=np.float64).reshape(shape),
    )


def calibrator_position(name: str, mjd: ArrayLike | None = None) -> tuple[NDArray, NDArray]:
    """ICRS (ra_deg, dec_deg) of ``name``; Jupiter's topocentric direction at ``mjd`` expressed in ICRS."""
    canon = canonical_name(name)
    if canon != "Jupiter":
        cal = FIXED[canon]
        if mjd is None:
            return np.float64(cal.ra_deg), np.float64(cal.dec_deg)
        shape = np.shape(mjd)
        return np.full(shape, cal.ra_deg), np.full(shape, cal.dec_deg)
    if mjd is None:
        raise ValueError("Jupiter's position needs an MJD")
    from astropy import units as u
    from astropy.coordinates import ICRS, AltAz, SkyCoord
    from astropy.time import Time

    from utils.coordinates import earth_location

    az, el, _ = jupiter_azel(np.atleast_1d(mjd))
    t = Time(np.atleast_1d(np.asarray(mjd, dtype=np.float64)), format="mjd", scale="utc")
    frame = AltAz(obstime=t, location=earth_location(), pressure=0.0 * u.hPa)
    icrs = SkyCoord(az=az * u.deg, alt=el * u.deg, frame=frame).transform_to(ICRS())
    shape = np.shape(mjd)
    return (
        (np.asarray(icrs.ra.deg, dtype=np.float64) % 360.0).reshape(shape),
        np.asarray(icrs.dec.deg, dtype=np.float64).reshape(shape),
    )


__all__ = [
    "CALIBRATOR_NAMES",
    "FIXED",
    "FWHM_TO_SIGMA",
    "beam_fwhm_arcmin",
    "calibrator_position",
    "canonical_name",
    "flux_jy",
    "is_calibrator",
    "jupiter_azel",
    "point_source_peak_k",
]
