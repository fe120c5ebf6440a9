"""Tests of utils.rrl: line frequencies (docs/mapmaking.md#line-frequencies), names, radio velocities and the
LSRK correction."""

from __future__ import annotations

import numpy as np
import pytest

from utils import rrl

R_INF_C = 3.2898419602e15
ME_MP = 5.446170214901e-4
C_KMS = 299792.458


def test_hydrogen_alpha_lines_in_band():
    lines = rrl.lines_in_range(26.0, 34.0)
    assert [ln.name for ln in lines] == ["H58a", "H59a", "H60a", "H61a", "H62a"]
    r_h = R_INF_C / (1 + ME_MP)
    for ln in lines:
        assert ln.rest_freq_ghz == pytest.approx(r_h * (1 / ln.n**2 - 1 / (ln.n + 1) ** 2) / 1e9, rel=1e-15)
    # orientation values quoted in docs/mapmaking.md#line-frequencies (to the 1 MHz they are given to)
    for ln, quoted in zip(lines, [32.852, 31.223, 29.700, 28.275, 26.939]):
        assert ln.rest_freq_ghz == pytest.approx(quoted, abs=1e-3)
    # the legacy configs' 31.22332 GHz is H59α
    assert rrl.line_frequency_ghz("H59a") == pytest.approx(31.22332, abs=1e-5)


def test_names_and_species():
    f = rrl.line_frequency_ghz("H59a")
    assert rrl.line_frequency_ghz("H59alpha") == f
    assert rrl.line_frequency_ghz("h59A") == f
    assert rrl.parse_line_name("H72b") == ("H", 72, 2)
    assert rrl.parse_line_name("He59a") == ("He", 59, 1)
    assert rrl.parse_line_name("C59alpha") == ("C", 59, 1)
    assert rrl.line_name("He", 59, 1) == "He59a"
    r_h = R_INF_C / (1 + ME_MP)
    assert rrl.line_frequency_ghz("H72b") == pytest.approx(r_h * (1 / 72**2 - 1 / 74**2) / 1e9, rel=1e-15)
    # heavier cores: smaller reduced-mass correction, the known isotope shifts (≈ −122 and −150 km/s)
    m_e_u = 5.48579909065e-4
    r_he = R_INF_C / (1 + m_e_u / 4.001506179127)
    r_c = R_INF_C / (1 + m_e_u / (12 - 6 * m_e_u))
    assert rrl.line_frequency_ghz("He59a") == pytest.approx(r_he * (1 / 59**2 - 1 / 60**2) / 1e9, rel=1e-15)
    assert rrl.line_frequency_ghz("C59a") == pytest.approx(r_c * (1 / 59**2 - 1 / 60**2) / 1e9, rel=1e-15)
    v_he = rrl.radio_velocity_kms(rrl.line_frequency_ghz("He59a"), f)
    v_c = rrl.radio_velocity_kms(rrl.line_frequency_ghz("C59a"), f)
    assert v_he == pytest.approx(-122.2, abs=0.2)
    assert v_c == pytest.approx(-149.6, abs=0.2)
    for bad in ("X59a", "H59", "H59z", "59a", ""):
        with pytest.raises(ValueError):
            rrl.line_frequency_ghz(bad)
    assert [ln.name for ln in rrl.lines_in_range(26.0, 34.0, dn=2)][0] == "H72b"


def test_radio_velocity_round_trip():
    nu0 = rrl.line_frequency_ghz("H60a")
    v = np.array([-300.0, 0.0, 95.0])
    nu = rrl.radio_frequency_ghz(v, nu0)
    np.testing.assert_allclose(rrl.radio_velocity_kms(nu, nu0), v, atol=1e-9)
    np.testing.assert_allclose(nu, nu0 * (1 - v / C_KMS), rtol=1e-15)
    assert rrl.channel_velocity_width_kms(2.0 / 1024, nu0) == pytest.approx(C_KMS * (2.0 / 1024) / nu0)
    assert rrl.topocentric_to_lsrk_velocity_kms(nu0, nu0, 12.5) == 12.5


@pytest.mark.parametrize(
    ("ra", "dec", "mjd"),
    [(281.2, -2.6, 61100.60), (83.63, 22.01, 61100.10), (10.0, 80.0, 61250.0), (200.0, -30.0, 61000.9)],
)
def test_lsrk_correction_matches_spectralcoord(ra, dec, mjd):
    from astropy import units as u
    from astropy.coordinates import EarthLocation, SkyCoord, SpectralCoord
    from astropy.time import Time

    t = Time(mjd, format="mjd", scale="utc")
    site = EarthLocation.from_geodetic(-118.2822222 * u.deg, 37.2338889 * u.deg, 1222.0 * u.m)
    target = SkyCoord(
        ra * u.deg,
        dec * u.deg,
        distance=1e6 * u.kpc,
        radial_velocity=0 * u.km / u.s,
        pm_ra_cosdec=0 * u.mas / u.yr,
        pm_dec=0 * u.mas / u.yr,
        frame="icrs",
    )
    nu0 = 31.0 * u.GHz
    topo = SpectralCoord(nu0, observer=site.get_gcrs(t), target=target)
    lsrk = topo.with_observer_stationary_relative_to("lsrk")
    # A line at rest in LSRK observed at ν0: its LSRK radio velocity is c (ν0 − ν_lsrk)/ν0 and the
    # topocentric one is 0, so the correction to add is c (ν0 − ν_lsrk)/ν0.
    expected = (C_KMS * (nu0 - lsrk) / nu0).to_value(u.one)
    assert rrl.lsrk_correction_kms(ra, dec, mjd) == pytest.approx(expected, abs=0.05)


def test_lsrk_correction_vectorised():
    ra = np.array([281.2, 83.63])
    dec = np.array([-2.6, 22.01])
    v = rrl.lsrk_correction_kms(ra, dec, 61100.6)
    assert v.shape == (2,)
    assert v[0] == pytest.approx(rrl.lsrk_correction_kms(281.2, -2.6, 61100.6), abs=1e-9)
    assert np.all(np.abs(v) < 60.0)
