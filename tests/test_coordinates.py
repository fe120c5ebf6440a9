"""utils.coordinates (04 §3.3): the fast az/el → ICRS path against astropy's full transform."""

from __future__ import annotations

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


@pytest.mark.parametrize("pointing", [ces_pointing, lissajous_pointing])
def test_fast_path_within_0p1_arcsec_everywhere(pointing):
    """10 minutes at 50 Hz (30 000 samples) including every turnaround, against astropy per sample."""
    az, el, mjd = pointing(30_000)
    ra, dec = azel_to_icrs(az, el, mjd)
    ra_ref, dec_ref = azel_to_icrs_astropy(az, el, mjd)
    sep = angular_separation_deg(ra, dec, ra_ref, dec_ref) * 3600.0
    assert sep.max() <= 0.1, sep.max()
    az2, el2 = icrs_to_azel(ra_ref, dec_ref, mjd)
    az3, el3 = icrs_to_azel_astropy(ra_ref, dec_ref, mjd)
    assert (angular_separation_deg(az2, el2, az3, el3) * 3600.0).max() <= 0.1
    assert (angular_separation_deg(az2, el2, az, el) * 3600.0).max() <= 0.1


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
