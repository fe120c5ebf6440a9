"""Observed az/el ↔ ICRS ↔ Galactic, per sample, at the OVRO site (docs/mapmaking.md#coordinates).

IERS policy (shared with the simulator): the bundled ``astropy-iers-data`` tables are used, never
downloaded (``configure_iers``). UT1−UTC comes from ``Time.delta_ut1_utc`` and polar motion from
astropy's ``ErfaAstrom.apco``, as in astropy's own AltAz transform, so simulator and pipeline agree
inside and outside the tables. Only public astropy API is used.

Fast path (docs/mapmaking.md#coordinates item 3): time is split into blocks of at most ``block_s`` (60 s). For
each block the star-independent astrometry (``erfa.apco`` through astropy's ``ErfaAstrom.apco``, so
precession–nutation, aberration, polar motion and UT1−UTC are exactly astropy's) is computed once at the block
mid-time, as one ERFA record shared by the block's samples; per sample only the local Earth rotation angle is
updated from UT1 (added to the CIRS right ascension). The conversion is ``erfa.atoiq`` (observed → CIRS) then
CIRS → ICRS (``erfa.aticq``'s steps in NumPy), vectorised over the block. Freezing aberration and
precession–nutation over 60 s costs < 0.001″; the test and benchmark B5 compare with astropy's full per-sample
transform (≤ 0.01″). ``icrs_to_azel`` and ``parallactic_angle`` use the same block astrometry (``erfa.atciq``
then ``erfa.atioq``).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import OVRO_HEIGHT_M, OVRO_LAT_DEG, OVRO_LON_DEG

log = logging.getLogger("comap.coordinates")

_IERS_LOCK = threading.Lock()
_IERS_CONFIGURED = False

Site = tuple[float, float, float]
"""(longitude deg east, latitude deg, height m)."""

OVRO: Site = (OVRO_LON_DEG, OVRO_LAT_DEG, OVRO_HEIGHT_M)


def configure_iers() -> None:
    """Use astropy's bundled IERS tables with downloads off (idempotent, no network)."""
    global _IERS_CONFIGURED
    if _IERS_CONFIGURED:
        return
    with _IERS_LOCK:
        from astropy.utils import iers

        iers.conf.auto_download = False
        iers.conf.auto_max_age = None
        _IERS_CONFIGURED = True


def earth_location(site: Site = OVRO):
    """Return an astropy ``EarthLocation`` for ``site`` = (lon_deg, lat_deg, height_m)."""
    from astropy import units as u
    from astropy.coordinates import EarthLocation

    lon, lat, height = site
    return EarthLocation.from_geodetic(lon * u.deg, lat * u.deg, height * u.m)


def standard_pressure_hpa(height_m: float) -> float:
    """Standard-atmosphere pressure (hPa) at ``height_m`` (used when refraction is on)."""
    return 1013.25 * (1.0 - 2.25577e-5 * height_m) ** 5.25588


@dataclass(frozen=True)
class Observer:
    """Where and through what atmosphere az/el are observed.

    Attributes
    ----------
    site : (lon_deg, lat_deg, height_m)
        Observatory location; default OVRO.
    refraction : bool
        Apply refraction (off by default; the level-1 elevations are not refraction-corrected).
    pressure_hpa, temperature_c, humidity, wavelength_um
        Refraction parameters (hPa, °C, fraction, µm); the pressure defaults to the standard
        pressure at the site height. Ignored when ``refraction`` is off.
    """

    site: Site = OVRO
    refraction: bool = False
    pressure_hpa: float | None = None
    temperature_c: float = 10.0
    humidity: float = 0.3
    wavelength_um: float = 1.0e4

    def altaz_frame(self, mjd_utc: ArrayLike):
        """Astropy ``AltAz`` frame of this observer at the times ``mjd_utc`` (MJD, UTC)."""
        from astropy import units as u
        from astropy.coordinates import AltAz
        from astropy.time import Time

        configure_iers()
        if not self.refraction:
            pressure = 0.0
        elif self.pressure_hpa is None:
            pressure = standard_pressure_hpa(self.site[2])
        else:
            pressure = float(self.pressure_hpa)
        return AltAz(
            obstime=Time(mjd_utc, format="mjd", scale="utc"),
            location=earth_location(self.site),
            pressure=pressure * u.hPa,
            temperature=self.temperature_c * u.deg_C,
            relative_humidity=self.humidity,
            obswl=self.wavelength_um * u.micron,
        )


DEFAULT_BLOCK_S = 60.0


def _dut1_s(obstime) -> NDArray[np.float64]:
    """UT1−UTC (s) at ``obstime``; outside the IERS tables 0 with a warning, as astropy's frames do."""
    from astropy.utils import iers
    from astropy.utils.exceptions import AstropyWarning

    try:
        return np.atleast_1d(np.asarray(obstime.delta_ut1_utc, dtype=np.float64))
    except iers.IERSRangeError as err:
        warnings.warn(f"UT1-UTC taken as 0: {err}", AstropyWarning, stacklevel=3)
        return np.zeros(np.atleast_1d(obstime.mjd).shape)


def _per_block(
    lon: NDArray, lat: NDArray, mjd: NDArray, observer: Observer, block_s: float, convert, n_out: int
) -> list:
    """Apply ``convert(lon, lat, astrom, dera) -> tuple of arrays`` block by block of time.

    Time is cut into blocks of ``block_s`` seconds. Each block gets one ERFA ``ASTROM`` record
    (``erfa.apco`` through astropy's ``ErfaAstrom.apco``, so precession–nutation, aberration, polar
    motion and UT1−UTC are exactly astropy's) at its mid-time; ``dera`` (rad, per sample) is the
    local Earth rotation angle of each sample minus the record's ``eral``, the only quantity that
    is not frozen over the block.

    Returns
    -------
    list of ndarray, shape (n,)
        The first ``n_out`` outputs of ``convert``, put back in sample order.
    """
    import erfa
    from astropy.coordinates.erfa_astrom import ErfaAstrom

    t0 = float(np.min(mjd))
    step = block_s / 86400.0
    block = np.floor((mjd - t0) / step).astype(np.int64)
    order = np.argsort(block, kind="stable")
    ids, starts = np.unique(block[order], return_index=True)
    frame = observer.altaz_frame(t0 + (ids + 0.5) * step)
    astrom = np.atleast_1d(ErfaAstrom.apco(frame))
    dut1_s = _dut1_s(frame.obstime)
    bounds = np.append(starts, mjd.size)
    outs = [np.empty(mjd.size) for _ in range(n_out)]
    for k in range(ids.size):
        idx = order[bounds[k] : bounds[k + 1]]
        t = mjd[idx]
        day = np.floor(t)
        era = erfa.era00(2400000.5 + day, (t - day) + dut1_s[k] / 86400.0)
        rec = astrom[k]
        values = convert(lon[idx], lat[idx], rec, era + rec["along"] - rec["eral"])
        for out, v in zip(outs, values):
            out[idx] = v
    return outs


def _unit(p: NDArray) -> NDArray:
    return p / np.sqrt(np.einsum("ij,ij->j", p, p))


def _cirs_to_icrs(ri: NDArray, di: NDArray, astrom) -> tuple[NDArray, NDArray]:
    """``erfa.aticq`` for one ``ASTROM`` record, vectorised in NumPy (rad in, rad out).

    The same steps as ERFA (inverse bias-precession-nutation, then annual aberration and light
    deflection by the Sun undone by fixed-point iteration), with two iterations of each instead of
    ERFA's two and five: after two the deflection residual is below 1e-9″ away from the Sun's limb.
    Agrees with ``erfa.aticq`` to about 1e-9″ and is twice as fast, aticq being most of the cost.
    """
    cd = np.cos(di)
    ppr = astrom["bpn"].T @ np.stack([cd * np.cos(ri), cd * np.sin(ri), np.sin(di)])
    v, em, bm1 = astrom["v"], astrom["em"], astrom["bm1"]
    w2 = _SCHWARZSCHILD_AU / em
    d = np.zeros(3)[:, None]
    for _ in range(2):  # eraAb inverted
        before = _unit(ppr - d)
        pdv = v @ before
        after = _unit(before * (bm1 - w2 * pdv) + (1.0 + pdv / (1.0 + bm1) + w2) * v[:, None])
        d = after - before
    pnat = _unit(ppr - d)
    e = astrom["eh"]
    dlim = 1e-6 / max(em * em, 1.0)
    d = np.zeros(3)[:, None]
    for _ in range(2):  # eraLdsun inverted
        q = _unit(pnat - d)
        w = w2 / np.maximum(1.0 + e @ q, dlim)
        d = w * (e[:, None] * (q * q).sum(axis=0) - q * (e @ q))  # q × (e × q)
    pco = _unit(pnat - d)
    return np.arctan2(pco[1], pco[0]), np.arctan2(pco[2], np.hypot(pco[0], pco[1]))


_SCHWARZSCHILD_AU = 1.97412574336e-8
"""Schwarzschild radius of the Sun in au (ERFA ``ERFA_SRS``)."""


def _per_finite_sample(a: ArrayLike, b: ArrayLike, mjd: ArrayLike, convert, n_out: int = 2) -> list:
    """Broadcast two coordinates and the times, apply ``convert(a, b, mjd) -> tuple of arrays`` to
    the samples where all three are finite, and return float64 arrays that are NaN elsewhere."""
    a, b, mjd = np.broadcast_arrays(
        np.atleast_1d(np.asarray(a, dtype=np.float64)),
        np.atleast_1d(np.asarray(b, dtype=np.float64)),
        np.atleast_1d(np.asarray(mjd, dtype=np.float64)),
    )
    outs = [np.full(a.shape, np.nan) for _ in range(n_out)]
    good = np.isfinite(a) & np.isfinite(b) & np.isfinite(mjd)
    if good.any():
        for out, values in zip(outs, convert(a[good], b[good], mjd[good])):
            out[good] = values
    return outs


def _blockwise(
    a: ArrayLike,
    b: ArrayLike,
    mjd_utc: ArrayLike,
    observer: Observer,
    block_s: float,
    convert,
    n_out: int = 2,
):
    """:func:`_per_block` on the finite samples of the broadcast inputs (NaN elsewhere)."""
    return _per_finite_sample(
        a, b, mjd_utc, lambda x, y, t: _per_block(x, y, t, observer, block_s, convert, n_out), n_out
    )


def _observed_to_icrs(az, el, astrom, dera):
    import erfa

    ri, di = erfa.atoiq("A", np.radians(az), np.radians(90.0 - el), astrom)
    rc, dc = _cirs_to_icrs(ri + dera, di, astrom)
    return np.degrees(rc) % 360.0, np.degrees(dc)


def _icrs_to_observed(ra, dec, astrom, dera):
    """(az deg, el deg, local hour angle rad, local declination rad) from ICRS RA/Dec (deg)."""
    import erfa

    ri, di = erfa.atciq(np.radians(ra), np.radians(dec), 0.0, 0.0, 0.0, 0.0, astrom)
    aob, zob, hob, dob, _rob = erfa.atioq(ri - dera, di, astrom)
    return np.degrees(aob) % 360.0, 90.0 - np.degrees(zob), hob, dob


def azel_to_icrs(
    az_deg: ArrayLike, el_deg: ArrayLike, mjd_utc: ArrayLike, *, block_s: float = DEFAULT_BLOCK_S, **observer
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Convert observed azimuth/elevation to ICRS RA/Dec for every sample.

    Parameters
    ----------
    az_deg, el_deg : array_like, shape (n,) or (n_feeds, n)
        Observed azimuth (North through East) and elevation, degrees. Several feeds sharing the
        sample times are best converted in one call: the astrometry of each time block is then
        computed once for all of them.
    mjd_utc : array_like, shape (n,) or scalar
        Sample times, MJD (UTC), broadcast against the coordinates.
    block_s : float
        Length of the blocks over which the star-independent astrometry is frozen, s.
    **observer
        Keyword-only fields of :class:`Observer`: ``site`` (default OVRO), ``refraction`` (default
        off), ``pressure_hpa``, ``temperature_c``, ``humidity``, ``wavelength_um``.

    Returns
    -------
    ra_deg, dec_deg : ndarray, the broadcast shape of the inputs
        ICRS coordinates in degrees; RA in [0, 360). Non-finite inputs give NaN.
    """
    return tuple(_blockwise(az_deg, el_deg, mjd_utc, Observer(**observer), block_s, _observed_to_icrs))


def icrs_to_azel(
    ra_deg: ArrayLike, dec_deg: ArrayLike, mjd_utc: ArrayLike, *, block_s: float = DEFAULT_BLOCK_S, **observer
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Convert ICRS RA/Dec (deg) to observed azimuth/elevation (deg) at each ``mjd_utc``.

    The inverse of :func:`azel_to_icrs` (``erfa.atciq`` then ``erfa.atioq`` with the same block
    astrometry); same parameters. Returns arrays of the broadcast shape.
    """
    return tuple(_blockwise(ra_deg, dec_deg, mjd_utc, Observer(**observer), block_s, _icrs_to_observed))


def _astropy_reference(lon, lat, mjd_utc, to_icrs: bool, interpolation_s: float | None, observer: dict):
    from astropy import units as u
    from astropy.coordinates import ICRS, SkyCoord
    from astropy.coordinates.erfa_astrom import ErfaAstrom, ErfaAstromInterpolator, erfa_astrom

    obs = Observer(**observer)
    astrom = ErfaAstrom() if interpolation_s is None else ErfaAstromInterpolator(interpolation_s * u.s)

    def convert(a, b, mjd):
        frame = obs.altaz_frame(mjd)
        with erfa_astrom.set(astrom):
            if to_icrs:
                c = SkyCoord(az=a * u.deg, alt=b * u.deg, frame=frame).transform_to(ICRS())
                return c.ra.to_value(u.deg) % 360.0, c.dec.to_value(u.deg)
            c = SkyCoord(ra=a * u.deg, dec=b * u.deg, frame="icrs").transform_to(frame)
            return c.az.to_value(u.deg) % 360.0, c.alt.to_value(u.deg)

    return tuple(_per_finite_sample(lon, lat, mjd_utc, convert))


def azel_to_icrs_astropy(
    az_deg: ArrayLike,
    el_deg: ArrayLike,
    mjd_utc: ArrayLike,
    *,
    interpolation_s: float | None = None,
    **observer,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Reference implementation: astropy's ``AltAz → ICRS`` transform (public API only).

    Same parameters and returns as :func:`azel_to_icrs` except ``interpolation_s``: None (default)
    computes astropy's full astrometry for every sample (slow); a number of seconds uses
    ``ErfaAstromInterpolator`` with that resolution, the fast setting a user of astropy would
    pick (benchmark B5's baseline).
    """
    return _astropy_reference(az_deg, el_deg, mjd_utc, True, interpolation_s, observer)


def icrs_to_azel_astropy(
    ra_deg: ArrayLike,
    dec_deg: ArrayLike,
    mjd_utc: ArrayLike,
    *,
    interpolation_s: float | None = None,
    **observer,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Reference implementation of :func:`icrs_to_azel` through astropy (see :func:`azel_to_icrs_astropy`)."""
    return _astropy_reference(ra_deg, dec_deg, mjd_utc, False, interpolation_s, observer)


def parallactic_angle(
    ra_deg: ArrayLike,
    dec_deg: ArrayLike,
    mjd_utc: ArrayLike,
    *,
    site: Site = OVRO,
    block_s: float = DEFAULT_BLOCK_S,
) -> NDArray[np.float64]:
    """Parallactic angle of an ICRS position at each time, seen from ``site`` (docs/mapmaking.md#coordinates).

    ``q = atan2(sin H cos φ, sin φ cos δ − cos φ sin δ cos H)`` with H the apparent (local, true)
    hour angle, δ the apparent declination and φ the geodetic latitude of the site. The ICRS
    position goes to CIRS (``erfa.atciq``) and then to the local hour angle and declination
    (``erfa.atioq``, no refraction) with the same block astrometry as :func:`azel_to_icrs`: per
    sample only the Earth rotation angle changes, the rest is frozen over blocks of ``block_s``.
    H and δ therefore refer to the local pole (polar motion and diurnal aberration included),
    which is the pole of the az/el frame the formula is used with.

    q is the position angle of the zenith direction measured from the direction of the north
    celestial pole, positive towards east; equivalently, the bearing of the pole in the az/el
    frame measured from "up" towards increasing azimuth. q > 0 west of the meridian (H > 0), q = 0
    on the meridian south of the zenith, ±180° on the meridian between the zenith and the pole.

    Parameters
    ----------
    ra_deg, dec_deg : array_like, shape (n,) or scalar
        ICRS right ascension and declination, degrees.
    mjd_utc : array_like, shape (n,) or scalar
        Times, MJD (UTC). The three inputs broadcast together.
    site : (lon_deg, lat_deg, height_m)
        Observatory location; default OVRO.
    block_s : float
        Length of the blocks over which the star-independent astrometry is frozen, s.

    Returns
    -------
    q_deg : ndarray, shape (n,)
        Parallactic angle in degrees, in (−180, 180]. Non-finite inputs give NaN.
    """

    def angle(ra, dec, astrom, dera):
        _az, _el, hob, dob = _icrs_to_observed(ra, dec, astrom, dera)
        sin_phi, cos_phi = astrom["sphi"], astrom["cphi"]
        q = np.arctan2(np.sin(hob) * cos_phi, sin_phi * np.cos(dob) - cos_phi * np.sin(dob) * np.cos(hob))
        return (np.degrees(q),)

    (q,) = _blockwise(ra_deg, dec_deg, mjd_utc, Observer(site=site), block_s, angle, n_out=1)
    return q


def _galactic_matrix() -> NDArray[np.float64]:
    """3×3 rotation ICRS→Galactic, from astropy's transform of the unit vectors (built once)."""
    global _GAL_MATRIX
    if _GAL_MATRIX is None:
        from astropy import units as u
        from astropy.coordinates import ICRS, Galactic

        eye = np.eye(3)
        basis = ICRS(
            ra=np.degrees(np.arctan2(eye[:, 1], eye[:, 0])) * u.deg,
            dec=np.degrees(np.arcsin(eye[:, 2])) * u.deg,
        ).transform_to(Galactic())
        g = basis.cartesian.xyz.value  # (3, 3): column k = Galactic image of ICRS unit vector k
        _GAL_MATRIX = np.asarray(g, dtype=np.float64)
    return _GAL_MATRIX


_GAL_MATRIX: NDArray[np.float64] | None = None


def _to_vec(lon_deg: NDArray, lat_deg: NDArray) -> NDArray:
    lon = np.radians(lon_deg)
    lat = np.radians(lat_deg)
    cl = np.cos(lat)
    return np.stack([cl * np.cos(lon), cl * np.sin(lon), np.sin(lat)])


def _from_vec(v: NDArray) -> tuple[NDArray, NDArray]:
    lon = np.degrees(np.arctan2(v[1], v[0])) % 360.0
    lat = np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))
    return lon, lat


def icrs_to_galactic(ra_deg: ArrayLike, dec_deg: ArrayLike) -> tuple[NDArray, NDArray]:
    """ICRS (deg) → Galactic (l, b) in degrees, l in [0, 360); a fixed rotation."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    v = _to_vec(ra, dec)
    g = np.tensordot(_galactic_matrix(), v, axes=1)
    return _from_vec(g)


def galactic_to_icrs(l_deg: ArrayLike, b_deg: ArrayLike) -> tuple[NDArray, NDArray]:
    """Galactic (l, b) in degrees → ICRS (ra, dec) in degrees; the transpose rotation."""
    gl = np.asarray(l_deg, dtype=np.float64)
    gb = np.asarray(b_deg, dtype=np.float64)
    v = _to_vec(gl, gb)
    e = np.tensordot(_galactic_matrix().T, v, axes=1)
    return _from_vec(e)


def angular_separation_deg(lon1: ArrayLike, lat1: ArrayLike, lon2: ArrayLike, lat2: ArrayLike) -> NDArray:
    """Great-circle distance (deg) between points given in degrees (Vincenty formula, stable)."""
    l1, b1, l2, b2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (lon1, lat1, lon2, lat2))
    dl = l2 - l1
    num = np.hypot(np.cos(b2) * np.sin(dl), np.cos(b1) * np.sin(b2) - np.sin(b1) * np.cos(b2) * np.cos(dl))
    den = np.sin(b1) * np.sin(b2) + np.cos(b1) * np.cos(b2) * np.cos(dl)
    return np.degrees(np.arctan2(num, den))


def sun_altitude_deg(mjd_utc: ArrayLike, *, site: Site = OVRO) -> NDArray[np.float64]:
    """Altitude (deg, no refraction) of the Sun at ``site`` for each time (built-in ephemeris)."""
    from astropy import units as u
    from astropy.coordinates import get_body

    mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
    frame = Observer(site=site).altaz_frame(mjd)
    sun = get_body("sun", frame.obstime, location=frame.location).transform_to(frame)
    return np.asarray(sun.alt.to_value(u.deg), dtype=np.float64)


def hour_angle_deg(
    ra_deg: ArrayLike, dec_deg: ArrayLike, mjd_utc: ArrayLike, *, site: Site = OVRO
) -> NDArray[np.float64]:
    """Hour angle (deg, wrapped to [−180, 180); negative: east of the meridian, rising) of ICRS
    positions at the times ``mjd_utc`` seen from ``site`` (astropy's HADec frame, no refraction)."""
    from astropy import units as u
    from astropy.coordinates import HADec, SkyCoord
    from astropy.time import Time

    configure_iers()
    mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
    frame = HADec(obstime=Time(mjd, format="mjd", scale="utc"), location=earth_location(site))
    sky = SkyCoord(np.atleast_1d(ra_deg) * u.deg, np.atleast_1d(dec_deg) * u.deg, frame="icrs")
    ha = sky.transform_to(frame).ha.to_value(u.deg)
    return (np.asarray(ha, dtype=np.float64) + 180.0) % 360.0 - 180.0


__all__: Sequence[str] = (
    "OVRO",
    "Observer",
    "angular_separation_deg",
    "azel_to_icrs",
    "azel_to_icrs_astropy",
    "configure_iers",
    "earth_location",
    "galactic_to_icrs",
    "hour_angle_deg",
    "icrs_to_azel",
    "icrs_to_azel_astropy",
    "icrs_to_galactic",
    "parallactic_angle",
    "sun_altitude_deg",
)
