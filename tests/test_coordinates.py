"""utils.coordinates (docs/mapmaking.md#coordinates): the fast az/el → ICRS path against astropy's full
transform."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from utils.coordinates import (
    angular_separation_deg,
    azel_to_icrs,
    azel_to_icrs_astropy,
    galactic_to_icrs,
    icrs_to_azel,
    icrs_to_azel_astropy,
    icrs_to_galactic,
    parallactic_angle,
    sun_altitude_deg,
)

MJD0 = 61100.1  # 2026-03-01, inside the bundled IERS tables


def ces_pointing(n: int, rate_hz: float = 50.0):
    """A CES with constant-acceleration turnarounds: az swings ±1.9° around 200°, el fixed at 41°."""
    t = np.arange(n) / rate_hz
    period = 8.0
    phase = (t % period) / period
    tri = np.where(phase < 0.5, 4 * phase - 1, 3 - 4 * phase)  # triangle wave
    az = 200.0 + 1.9 * np.sign(tri) * np.abs(tri) ** 1.2
    return az, np.full(n, 41.0), MJD0 + t / 86400.0


def lissajous_pointing(n: int, rate_hz: float = 50.0):
    t = np.arange(n) / rate_hz
    el = 65.0 + 0.5 * np.sin(2 * np.pi * t / 17 + np.pi / 2)
    az = 120.0 + 0.5 * np.sin(2 * np.pi * t / 13) / np.cos(np.radians(el))
    return az, el, MJD0 + 0.3 + t / 86400.0


def raster_pointing(n: int, rate_hz: float = 50.0):
    """A raster: 2° az sweeps at 0.5°/s, stepping 0.05° in elevation after each, around az 160°, el 55°."""
    t = np.arange(n) / rate_hz
    sweep = np.floor(t / 4.0)
    frac = (t % 4.0) / 4.0
    az = 160.0 + np.where(sweep % 2 == 0, 2.0 * frac - 1.0, 1.0 - 2.0 * frac)
    el = 55.0 + 0.05 * (sweep % 40) - 1.0
    return az, el, MJD0 + 0.15 + t / 86400.0


@cache
def _tracks(pointing, n: int = 30_000):
    """az, el, mjd of a pointing track and astropy's full per-sample ICRS for them (computed once)."""
    az, el, mjd = pointing(n)
    return az, el, mjd, azel_to_icrs_astropy(az, el, mjd)


@pytest.mark.parametrize("pointing", [ces_pointing, lissajous_pointing])
def test_fast_path_within_0p1_arcsec_everywhere(pointing):
    """10 minutes at 50 Hz (30 000 samples) including every turnaround, against astropy per sample."""
    az, el, mjd, (ra_ref, dec_ref) = _tracks(pointing)
    ra, dec = azel_to_icrs(az, el, mjd)
    sep = angular_separation_deg(ra, dec, ra_ref, dec_ref) * 3600.0
    assert sep.max() <= 0.1, sep.max()
    az2, el2 = icrs_to_azel(ra_ref, dec_ref, mjd)
    az3, el3 = icrs_to_azel_astropy(ra_ref, dec_ref, mjd)
    assert (angular_separation_deg(az2, el2, az3, el3) * 3600.0).max() <= 0.1
    assert (angular_separation_deg(az2, el2, az, el) * 3600.0).max() <= 0.1


def test_several_feeds_in_one_call_equal_one_call_per_feed():
    """CreateLevel2File converts all feeds at once (one astrometry per time block for all of them,
    docs/mapmaking.md#coordinates); each feed's result must be the one a call of its own gives,
    NaN samples included."""
    az, el, mjd = lissajous_pointing(6000)
    feeds_az = np.stack([az, az + 0.7, az - 1.3])
    feeds_el = np.stack([el, el - 0.4, el + 0.9])
    feeds_el[1, 100:110] = np.nan
    ra, dec = azel_to_icrs(feeds_az, feeds_el, mjd)
    assert ra.shape == dec.shape == feeds_az.shape
    for k in range(3):
        ra_k, dec_k = azel_to_icrs(feeds_az[k], feeds_el[k], mjd)
        sep = angular_separation_deg(ra[k], dec[k], ra_k, dec_k) * 3600.0
        assert np.array_equal(np.isnan(ra[k]), np.isnan(ra_k))
        assert np.nanmax(sep) <= 1e-9, np.nanmax(sep)  # float64 rounding of the same arithmetic


POINTING_TOLERANCE_ARCSEC = 0.01
"""Level-2 pointing and the simulator take their RA/Dec from these functions; 0.01″ is 1/20 000 of
the 4.5′ beam and the tolerance issue 8 sets for replacing the implementation (the block-ERFA path
measures ≈ 0.0004″, astropy's ErfaAstromInterpolator(60 s) about the same)."""


@pytest.mark.parametrize("pointing", [ces_pointing, raster_pointing, lissajous_pointing])
def test_within_0p01_arcsec_of_full_astropy_on_ces_raster_and_lissajous(pointing):
    """Both directions against astropy's full per-sample transform (no interpolator), 10 min at
    50 Hz: every block edge and turnaround is crossed."""
    az, el, mjd, (ra_ref, dec_ref) = _tracks(pointing)
    ra, dec = azel_to_icrs(az, el, mjd)
    assert (angular_separation_deg(ra, dec, ra_ref, dec_ref) * 3600.0).max() <= POINTING_TOLERANCE_ARCSEC
    sub = slice(None, None, 5)
    az2, el2 = icrs_to_azel(ra_ref[sub], dec_ref[sub], mjd[sub])
    az3, el3 = icrs_to_azel_astropy(ra_ref[sub], dec_ref[sub], mjd[sub])
    assert (angular_separation_deg(az2, el2, az3, el3) * 3600.0).max() <= POINTING_TOLERANCE_ARCSEC


def test_unsorted_times_and_keywords_of_the_observer():
    """Samples out of time order give the same result as sorted ones; refraction keywords reach
    astropy's frame (against the full transform with refraction, same tolerance); a misspelt keyword
    is a TypeError, as with an explicit signature."""
    az, el, mjd, (ra_ref, dec_ref) = _tracks(lissajous_pointing)
    perm = np.random.default_rng(1).permutation(az.size)[:3000]
    ra, dec = azel_to_icrs(az[perm], el[perm], mjd[perm])
    assert (
        angular_separation_deg(ra, dec, ra_ref[perm], dec_ref[perm]) * 3600.0
    ).max() <= POINTING_TOLERANCE_ARCSEC
    kw = {"refraction": True, "temperature_c": 5.0, "humidity": 0.5}
    ra_r, dec_r = azel_to_icrs(az[:3000], el[:3000], mjd[:3000], **kw)
    ra_a, dec_a = azel_to_icrs_astropy(az[:3000], el[:3000], mjd[:3000], **kw)
    assert (angular_separation_deg(ra_r, dec_r, ra_a, dec_a) * 3600.0).max() <= POINTING_TOLERANCE_ARCSEC
    assert (angular_separation_deg(ra_r, dec_r, ra_ref[:3000], dec_ref[:3000]) * 3600.0).min() > 1.0
    with pytest.raises(TypeError):
        azel_to_icrs(az[:10], el[:10], mjd[:10], refracton=True)


def test_nonfinite_inputs_give_nan_and_scalars_work():
    ra, dec = azel_to_icrs([10.0, np.nan, 30.0], [40.0, 40.0, np.inf], MJD0)
    assert np.isfinite(ra[0]) and np.isnan(ra[1:]).all() and np.isnan(dec[1:]).all()
    r1, d1 = azel_to_icrs(10.0, 40.0, MJD0)
    assert r1.shape == (1,) and abs(r1[0] - ra[0]) < 1e-9


def test_galactic_rotation_matches_astropy():
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    rng = np.random.default_rng(3)
    ra = rng.uniform(0, 360, 500)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))
    gl, gb = icrs_to_galactic(ra, dec)
    ref = SkyCoord(ra=ra * u.deg, dec=dec * u.deg).galactic
    assert (angular_separation_deg(gl, gb, ref.l.deg, ref.b.deg) * 3600).max() < 1e-6
    ra2, dec2 = galactic_to_icrs(gl, gb)
    assert (angular_separation_deg(ra, dec, ra2, dec2) * 3600).max() < 1e-6
    assert np.all((gl >= 0) & (gl < 360))


def test_sun_altitude_day_and_night():
    # OVRO, 1 March: local noon ≈ 20:00 UTC (Sun high), local midnight ≈ 08:00 UTC (Sun low)
    alt = sun_altitude_deg([61100 + 20 / 24, 61100 + 8 / 24])
    assert alt[0] > 30 and alt[1] < -30


# --------------------------------------------------------------------------------------------------
# Parallactic angle
# --------------------------------------------------------------------------------------------------
POSITION_ERROR_ARCSEC = 0.1
"""Our apparent positions agree with astropy's per-sample transform to 0.1″ (docs/mapmaking.md#coordinates
requirement, checked above); that is the only error source of q besides rounding."""


def _q_tolerance_deg(dec_deg, el_deg):
    """Largest change of q from moving the source by POSITION_ERROR_ARCSEC on the sky.

    q is the angle at the source S of the triangle (pole P, zenith Z, S). Moving S by s changes the
    bearing of a fixed point at distance d by at most s / sin d, so |Δq| ≤ s (1/sin PS + 1/sin ZS)
    = s (1/cos δ + 1/cos el). The reference itself is exact up to rounding (the offset point lies on
    the great circle from S to the pole, so the bearing does not depend on the offset size); 1e-3″
    covers the round trip through astropy's frames (≈ 1e-11 rad over a 0.1° offset).
    """
    s = POSITION_ERROR_ARCSEC
    return (s * (1 / np.cos(np.radians(dec_deg)) + 1 / np.cos(np.radians(el_deg))) + 1e-3) / 3600.0


def _astropy_frames(mjd):
    from astropy import units as u
    from astropy.coordinates import AltAz, HADec
    from astropy.time import Time

    from utils.coordinates import configure_iers, earth_location

    configure_iers()
    t = Time(mjd, format="mjd", scale="utc")
    loc = earth_location()
    return (
        AltAz(obstime=t, location=loc, pressure=0 * u.hPa),
        HADec(obstime=t, location=loc, pressure=0 * u.hPa),
    )


def _wrap180(x):
    return (np.asarray(x) + 180.0) % 360.0 - 180.0


def test_parallactic_angle_is_the_bearing_of_the_pole_in_astropy_altaz():
    """q against a geometric reference built only from astropy: the bearing, in astropy's AltAz
    frame (pressure 0), from the source towards a point 0.1° further north along the apparent
    hour circle (astropy HADec, i.e. towards the apparent celestial pole), measured from "up"
    towards increasing azimuth. 4000 samples at 50 Hz-like spacing over 2 h (so block edges are
    crossed), random sources above 10° elevation, dec between −30° and 80°."""
    from astropy import units as u
    from astropy.coordinates import HADec, SkyCoord

    rng = np.random.default_rng(7)
    n = 4000
    mjd = np.sort(MJD0 + rng.uniform(0.0, 2.0 / 24.0, n))
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(-30.0)), np.sin(np.radians(80.0)), n)))
    altaz, hadec = _astropy_frames(mjd)
    src = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs")
    src_aa = src.transform_to(altaz)
    el = src_aa.alt.to_value(u.deg)
    keep = (el > 10.0) & (el < 80.0)
    assert keep.sum() > 1000
    src_hd = src.transform_to(hadec)
    north = SkyCoord(
        HADec(ha=src_hd.ha, dec=src_hd.dec + 0.1 * u.deg, obstime=hadec.obstime, location=hadec.location)
    ).transform_to(altaz)
    q_ref = _wrap180(src_aa.position_angle(north).to_value(u.deg))

    q = parallactic_angle(ra, dec, mjd)
    err = np.abs(_wrap180(q - q_ref))[keep]
    tol = _q_tolerance_deg(src_hd.dec.to_value(u.deg), el)[keep]
    assert np.all(err <= tol), (err.max() * 3600, (err / tol).max())
    # and the sign convention: west of the meridian (H > 0) q > 0, east q < 0
    ha = _wrap180(src_hd.ha.to_value(u.deg))[keep]
    clear = np.abs(ha) > 1.0
    assert np.all(np.sign(q[keep][clear]) == np.sign(ha[clear]))


@pytest.mark.parametrize(
    ("ha_h", "dec_deg", "expected"),
    [
        (0.0, 10.0, 0.0),  # on the meridian south of the zenith (OVRO latitude 37.2°)
        (0.0, 60.0, 180.0),  # on the meridian between the zenith and the pole
        (2.0, 10.0, "formula"),  # west: q > 0
        (-2.0, 10.0, "formula"),  # east: q < 0
        (4.0, 60.0, "formula"),
    ],
)
def test_parallactic_angle_convention_at_given_hour_angles(ha_h, dec_deg, expected):
    """Sources placed at a chosen apparent hour angle with astropy (HADec → ICRS). On the meridian
    q is exactly 0 (south of the zenith) or 180° (north of it); elsewhere q equals
    docs/mapmaking.md#coordinates's formula evaluated with astropy's H, δ and the site latitude, with the sign
    of H. Tolerance as above."""
    from astropy import units as u
    from astropy.coordinates import HADec, SkyCoord

    from utils.constants import OVRO_LAT_DEG

    mjd = np.array([MJD0, MJD0 + 0.37])
    altaz, hadec = _astropy_frames(mjd)
    src = SkyCoord(
        HADec(
            ha=np.full(2, ha_h) * u.hourangle,
            dec=np.full(2, dec_deg) * u.deg,
            obstime=hadec.obstime,
            location=hadec.location,
        )
    ).transform_to("icrs")
    q = parallactic_angle(src.ra.deg, src.dec.deg, mjd)
    el = src.transform_to(altaz).alt.to_value(u.deg)
    if expected == "formula":
        h, d, phi = np.radians(ha_h * 15.0), np.radians(dec_deg), np.radians(OVRO_LAT_DEG)
        expected = np.degrees(
            np.arctan2(np.sin(h) * np.cos(phi), np.sin(phi) * np.cos(d) - np.cos(phi) * np.sin(d) * np.cos(h))
        )
        assert np.all(np.sign(q) == np.sign(ha_h))
    tol = _q_tolerance_deg(dec_deg, el)
    assert np.all(np.abs(_wrap180(q - expected)) <= tol), (q, expected)


def test_parallactic_angle_broadcasts_and_gives_nan_for_nonfinite():
    q = parallactic_angle(83.63, 22.01, [MJD0, np.nan, MJD0 + 0.1])
    assert q.shape == (3,) and np.isfinite(q[[0, 2]]).all() and np.isnan(q[1])
    q2 = parallactic_angle([83.63, np.nan], [22.01, 22.01], MJD0)
    assert np.isnan(q2[1]) and abs(q2[0] - q[0]) < 1e-12
