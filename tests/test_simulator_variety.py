"""Tests of the simulator's added sky components, NaN bursts, sky-free twins and variety presets
(docs/simulator.md#added-sky-components, docs/simulator.md#nan-bursts, docs/simulator.md#noise-twins,
docs/simulator.md#variety-presets).

Expected values are written out here from the documented formulas (constants, beam, spectra) and
astropy; observations are a few seconds long with 8–64 channels.
"""

from __future__ import annotations

import math
import tomllib

import h5py
import numpy as np
import pytest

from utils.constants import GROUND_FEED
from utils.errors import SimulatorError
from utils.simulator import (
    PRESETS,
    NaNBurst,
    ObservationSpec,
    SkyComponent,
    simulate_observation,
    sky_free_twin,
)
from utils.simulator.component_spec import spectral_shape
from utils.simulator.spec import ScanSpec, SkySpec
from utils.simulator.variety import (
    VARIETY_PRESETS,
    calibrator_observation,
    field_observation,
    nan_burst_observation,
)

C_M_S = 299792458.0
K_B = 1.380649e-23
FWHM_30 = 4.5
SIGMA_PER_FWHM = 1.0 / math.sqrt(8.0 * math.log(2.0))


# --------------------------------------------------------------------------------------------------
# independent formulas
# --------------------------------------------------------------------------------------------------
def beam_sigma_rad(freq_ghz):
    return np.radians(FWHM_30 * 30.0 / np.asarray(freq_ghz) / 60.0) * SIGMA_PER_FWHM


def k_per_jy(freq_ghz, sigma_rad):
    """Rayleigh–Jeans K per Jy for a Gaussian of σ (rad): 1e-26 c²/(2 k ν² 2π σ²)."""
    return 1e-26 * C_M_S**2 / (2 * K_B * (np.asarray(freq_ghz) * 1e9) ** 2 * 2 * math.pi * sigma_rad**2)


def logparabola(freq_ghz, nu0, nu_peak, width):
    x = np.log(np.asarray(freq_ghz) / nu_peak)
    return np.exp(-(x**2 - math.log(nu0 / nu_peak) ** 2) / (2 * width**2))


def stare_spec(components, n_channels=64, **changes) -> ObservationSpec:
    """A 2 s noise-free stare at (ra, dec) = (60°, 10°) with feeds 1 and 20, no sky model, no vanes."""
    spec = ObservationSpec(
        obsid=99101,
        feeds=[1, GROUND_FEED],
        n_channels=n_channels,
        hour_angle_h=0.0,
        target_ra_deg=60.0,
        target_dec_deg=10.0,
        vane_at_start=False,
        vane_at_end=False,
        slew_s=1.0,
        white_noise=False,
        gain_fluctuations=False,
        scan=ScanSpec(kind="stare", duration_s=2.0),
        sky=SkySpec(kind="none", components=list(components)),
    )
    return spec.replace(**changes)


def sky_k(path_sky, path_twin, feed_index=0):
    """(T_sky per channel and sample in the scan, frequencies, float32 tolerance in K, scan slice)."""
    with h5py.File(path_sky, "r") as f, h5py.File(path_twin, "r") as g:
        ((s, e),) = f["truth/scans/edges"][...]
        gain = f["truth/instrument/gain"][feed_index][:, :, None]
        a = f["spectrometer/tod"][feed_index, :, :, s:e].astype(np.float64)
        b = g["spectrometer/tod"][feed_index, :, :, s:e].astype(np.float64)
        # float32 storage: one spacing of each value, in K
        tol = (np.spacing(np.abs(a).astype(np.float32)) + np.spacing(np.abs(b).astype(np.float32))) / gain
        pointing = {
            k: f[f"spectrometer/pixel_pointing/pixel_{k}"][feed_index, s:e] for k in ("ra", "dec", "az", "el")
        }
        return (a - b) / gain, f["spectrometer/frequency"][...], tol, pointing


def separation_deg(ra, dec, ra0, dec0):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    return SkyCoord(ra * u.deg, dec * u.deg).separation(SkyCoord(ra0 * u.deg, dec0 * u.deg)).deg


# --------------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------------
def test_spectral_shapes_follow_the_documented_formulas():
    nu = np.linspace(26.0, 34.0, 257)
    power = SkyComponent(spectrum="power", index=-2.1, nu0_ghz=30.0)
    np.testing.assert_allclose(spectral_shape(power, nu), (nu / 30.0) ** -2.1, rtol=1e-13)
    lp = SkyComponent(spectrum="logparabola", nu0_ghz=30.0, nu_peak_ghz=28.0, width=0.35)
    f = spectral_shape(lp, nu)
    np.testing.assert_allclose(f, logparabola(nu, 30.0, 28.0, 0.35), rtol=1e-13)
    assert spectral_shape(lp, np.array([30.0]))[0] == pytest.approx(1.0, abs=1e-15)
    assert abs(nu[np.argmax(f)] - 28.0) <= 0.5 * (nu[1] - nu[0])
    # the standard log-parabola form (ν/ν0)^(a + b ln(ν/ν0)) with a = ln(ν_p/ν0)/w², b = −1/(2w²)
    a, b = math.log(28.0 / 30.0) / 0.35**2, -1.0 / (2 * 0.35**2)
    np.testing.assert_allclose(f, (nu / 30.0) ** (a + b * np.log(nu / 30.0)), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# components in the TOD
# --------------------------------------------------------------------------------------------------
def test_point_source_peak_is_its_flux_through_the_beam(tmp_path):
    """A 20 Jy, α = −0.7 point source on the stare position: T(ν) = S (ν/30)^α K/Jy(Ω_b(ν)) at every
    channel, times the beam at the (arcsecond) pointing offset; float32 storage sets the tolerance."""
    comp = SkyComponent(shape="point", unit="Jy", amplitude=20.0, index=-0.7, frame="icrs")
    spec = stare_spec([comp])
    p_sky = simulate_observation(spec, tmp_path / "sky")
    p_twin = simulate_observation(sky_free_twin(spec), tmp_path / "twin")
    t_sky, freq, tol, pt = sky_k(p_sky, p_twin)
    sigma = beam_sigma_rad(freq)[:, :, None]
    r = np.radians(separation_deg(pt["ra"], pt["dec"], 60.0, 10.0))
    assert r.max() < np.radians(5.0 / 3600.0)  # the stare tracks the source to arcseconds
    expected = 20.0 * (freq[:, :, None] / 30.0) ** -0.7 * k_per_jy(freq, beam_sigma_rad(freq))[:, :, None]
    expected = expected * np.exp(-0.5 * (r / sigma) ** 2)
    assert np.all(np.abs(t_sky - expected) <= tol + 1e-9 * expected)
    assert 0.3 < expected.mean() < 0.5  # ≈ 19 mK/Jy at 30 GHz


def test_logparabola_channels_follow_the_formula(tmp_path):
    """A 1 K log-parabola point source: each of 64 channels per band equals A f(ν) to float32 precision
    (≈ 1e-6 K here), much finer than the curvature a linear interpolation between the 16 beam
    frequencies would miss (checked to exceed the tolerance 50-fold)."""
    comp = SkyComponent(shape="point", spectrum="logparabola", amplitude=1.0, nu0_ghz=28.0, nu_peak_ghz=28.0)
    spec = stare_spec([comp])
    p_sky = simulate_observation(spec, tmp_path / "sky")
    p_twin = simulate_observation(sky_free_twin(spec), tmp_path / "twin")
    t_sky, freq, tol, pt = sky_k(p_sky, p_twin)
    r = np.radians(separation_deg(pt["ra"], pt["dec"], 60.0, 10.0))
    shape = logparabola(freq, 28.0, 28.0, 0.35)
    expected = shape[:, :, None] * np.exp(-0.5 * (r / beam_sigma_rad(freq)[:, :, None]) ** 2)
    err = np.abs(t_sky - expected)
    assert np.all(err <= tol) and tol.max() < 2e-5
    # what interpolating between 16 beam frequencies would do to these channels
    grid = np.linspace(26.0, 34.0, 16)
    interp = np.interp(freq.ravel(), grid, logparabola(grid, 28.0, 28.0, 0.35)).reshape(freq.shape)
    assert np.max(np.abs(interp - shape)) > 50 * np.median(tol)


def test_gaussian_gradient_and_truth_map(tmp_path):
    """Noise-free CES over GField30 with its own emission removed (base_scale = 0): a 12′ Gaussian
    (intrinsic 1 K at 30 GHz, β = −2.1) and a plane (50 mK + 50 mK/deg towards position angle 30°,
    β = −2.7) in Galactic offsets; the TOD matches the formulas (float32 tolerance plus 1e-6 of the
    peak for the gnomonic-vs-tangent-plane difference), and the truth map at its pixel centres
    matches them too."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    gauss = SkyComponent(
        shape="gaussian", amplitude=1.0, index=-2.1, fwhm_arcmin=12.0, lon_deg=0.05, lat_deg=0.02
    )
    plane = SkyComponent(
        shape="gradient", amplitude=0.05, index=-2.7, gradient_k_per_deg=0.05, angle_deg=30.0
    )
    spec = ObservationSpec(
        obsid=99102,
        feeds=[1, 2, GROUND_FEED],
        n_channels=8,
        hour_angle_h=-1.5,
        white_noise=False,
        gain_fluctuations=False,
        scan=ScanSpec(kind="ces", n_segments=1, segment_s=10.0),
        sky=SkySpec(kind="galactic", base_scale=0.0, components=[gauss, plane]),
    )
    p_sky = simulate_observation(spec, tmp_path / "sky")
    p_twin = simulate_observation(sky_free_twin(spec), tmp_path / "twin")
    centre = SkyCoord(l=30.0 * u.deg, b=0.0 * u.deg, frame="galactic")
    g_pos = SkyCoord(l=30.05 * u.deg, b=0.02 * u.deg, frame="galactic")  # |offset| ≪ 1°: tangent ≈ lon/lat

    def model(l_deg, b_deg, freq):
        pos = SkyCoord(l=l_deg * u.deg, b=b_deg * u.deg, frame="galactic")
        fr = freq.reshape(freq.shape + (1,) * pos.shape.__len__())
        theta2, beam2 = 12.0**2, (FWHM_30 * 30.0 / fr) ** 2
        r_arcmin = pos.separation(g_pos).arcmin
        t_g = (
            (fr / 30.0) ** -2.1
            * theta2
            / (theta2 + beam2)
            * np.exp(-0.5 * r_arcmin**2 / ((theta2 + beam2) / 8 / math.log(2)))
        )
        # gnomonic offsets about the centre: Cartesian components in the centre's offset frame
        off = pos.transform_to(centre.skyoffset_frame()).cartesian
        x, y = np.degrees((off.y / off.x).value), np.degrees((off.z / off.x).value)
        level = 0.05 + 0.05 * (x * math.cos(math.radians(30)) + y * math.sin(math.radians(30)))
        return t_g + (fr / 30.0) ** -2.7 * np.asarray(level)

    for i in range(2):
        t_sky, freq, tol, pt = sky_k(p_sky, p_twin, i)
        pos = SkyCoord(pt["ra"] * u.deg, pt["dec"] * u.deg).galactic
        expected = model(pos.l.deg, pos.b.deg, freq)
        assert np.all(np.abs(t_sky - expected) <= tol + 1e-6)
        if i == 0:
            assert expected.max() > 0.3  # feed 1 passes over the Gaussian
    with h5py.File(p_sky, "r") as f:
        g = f["truth/sky"]
        from astropy.wcs import WCS

        w = WCS(naxis=2)
        w.wcs.ctype = [g.attrs["CTYPE1"], g.attrs["CTYPE2"]]
        w.wcs.crpix = [g.attrs["CRPIX1"], g.attrs["CRPIX2"]]
        w.wcs.crval = [g.attrs["CRVAL1"], g.attrs["CRVAL2"]]
        w.wcs.cdelt = [g.attrs["CDELT1"], g.attrs["CDELT2"]]
        maps = g["map"][...]
        ref = g["frequency_ghz"][...]
        rng = np.random.default_rng(0)
        ys, xs = rng.integers(0, maps.shape[1], 200), rng.integers(0, maps.shape[2], 200)
        lon, lat = w.pixel_to_world_values(xs.astype(float), ys.astype(float))
        expected = model(np.asarray(lon), np.asarray(lat), ref)
        np.testing.assert_allclose(maps[:, ys, xs], expected, rtol=1e-6, atol=1e-6)  # float32 map
        table = f["truth/components/table"][...]
        assert [s.decode() for s in table["shape"]] == ["gaussian", "gradient"]
        assert table["l_deg"][0] == pytest.approx(30.05, abs=1e-6) and table["b_deg"][0] == pytest.approx(
            0.02, abs=1e-6
        )


# --------------------------------------------------------------------------------------------------
# sky-free twins: identical noise, gain fluctuations and NaNs
# --------------------------------------------------------------------------------------------------
def test_sky_free_twin_has_identical_noise_gain_and_nans(tmp_path):
    """A field observation with components and NaN bursts, and its sky-free twin, with all noise on:
    δg and the NaN masks are identical, the ground feed is bit-identical, and the white-noise draws
    n (recovered as V/V_noise-free − 1) agree to float32 precision (≈ 1e-7), while different streams
    would differ by the white-noise level w ≈ 4.5e-4 at 8 channels."""
    bursts = [
        NaNBurst(start_s=2.0, duration_s=1.0, fraction=0.5),
        NaNBurst(at_component=0, duration_s=1.0, feeds=[1], fraction=1.0, bands=[2]),
    ]
    spec = field_observation(
        99103, -1.5, n_channels=8, feeds=(1, 2), n_segments=1, segment_s=15.0, nan_bursts=bursts
    )
    spec.sky.components[0] = SkyComponent(
        shape="point", unit="Jy", amplitude=200.0, index=-0.1
    )  # at the centre
    twin = sky_free_twin(spec)
    paths = {
        (name, noisy): simulate_observation(
            s if noisy else s.replace(white_noise=False), tmp_path / f"{name}{int(noisy)}", seed=7
        )
        for name, s in (("sky", spec), ("twin", twin))
        for noisy in (True, False)
    }
    data = {}
    for key, p in paths.items():
        with h5py.File(p, "r") as f:
            data[key] = (f["spectrometer/tod"][...].astype(np.float64), f["truth/noise/dg"][...])
    np.testing.assert_array_equal(data["sky", True][1], data["twin", True][1])
    for noisy in (True, False):
        a, b = data["sky", noisy][0], data["twin", noisy][0]
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.isnan(a).any()
        np.testing.assert_array_equal(a[-1], b[-1])  # ground feed
        assert not np.array_equal(a[0][np.isfinite(a[0])], b[0][np.isfinite(b[0])])  # the sky is there
    n_sky = data["sky", True][0] / data["sky", False][0] - 1.0
    n_twin = data["twin", True][0] / data["twin", False][0] - 1.0
    ok = np.isfinite(n_sky)
    assert np.max(np.abs(n_sky[ok] - n_twin[ok])) < 5e-7
    assert np.std(n_twin[ok]) > 3e-4


# --------------------------------------------------------------------------------------------------
# NaN bursts
# --------------------------------------------------------------------------------------------------
def test_nan_bursts_where_requested(tmp_path):
    """The ``nan-bursts`` observation at 16 channels and 40 s of raster: NaNs are exactly the planned
    (feed, channel, sample) boxes; each box has round(fraction · 16) channels per affected band; the
    source-crossing bursts are centred on a local minimum of the feed's distance to Tau A within one
    FWHM; the timed burst starts 10 s after the scan; other feeds and the ground feed have no NaN."""
    spec = nan_burst_observation(n_channels=16, scan_s=40.0)
    path = simulate_observation(spec, tmp_path, seed=3)
    with h5py.File(path, "r") as f:
        tod = f["spectrometer/tod"][...]
        feeds = f["spectrometer/feeds"][...].tolist()
        spans = f["truth/nan_bursts/spans"][...]
        masks = f["truth/nan_bursts/channels"][...]
        scan0 = int(f["truth/scans/edges"][0, 0])
        ra = f["spectrometer/pixel_pointing/pixel_ra"][...]
        dec = f["spectrometer/pixel_pointing/pixel_dec"][...]
        taua = (f["truth/calibrator"].attrs["ra_deg"], f["truth/calibrator"].attrs["dec_deg"])
        table = f["truth/components/table"][...]
        point = (table["ra_deg"][0], table["dec_deg"][0])
        # a gnomonic offset of 10′ lies atan(10′) from the centre
        assert separation_deg(*point, *taua) == pytest.approx(
            math.degrees(math.atan(math.radians(1 / 6))), rel=1e-9
        )
    expected = np.zeros(tod.shape, dtype=bool)
    for row, mask in zip(spans, masks):
        burst = spec.nan_bursts[row["burst"]]
        assert row["feed"] in (burst.feeds or [1, 2, 3])
        n = round(burst.fraction * 16)
        bands = burst.bands or [0, 1, 2, 3]
        assert mask.sum(axis=1).tolist() == [n if b in bands else 0 for b in range(4)]
        assert row["stop"] - row["start"] == round(burst.duration_s * 50)
        expected[feeds.index(row["feed"]), :, :, row["start"] : row["stop"]] |= mask[:, :, None]
        if burst.at_source or burst.at_component is not None:
            ref = feeds.index((burst.feeds or [1])[0])
            centre = row["start"] + round(burst.duration_s * 50) // 2
            where = taua if burst.at_source else point
            d = separation_deg(ra[ref, centre - 3 : centre + 4], dec[ref, centre - 3 : centre + 4], *where)
            assert d[3] == d.min() and d[3] < FWHM_30 / 60.0
        if burst.at_component is None and not burst.at_source:
            assert row["start"] == scan0 + 500
    np.testing.assert_array_equal(np.isnan(tod), expected)
    assert not np.isnan(tod[feeds.index(GROUND_FEED)]).any()
    assert {int(r["burst"]) for r in spans} == set(range(len(spec.nan_bursts)))


def test_nan_burst_channels_depend_on_seed_only(tmp_path):
    """The NaN channels of a burst come from their own stream: the same with and without a
    component, different with another seed."""
    comp = SkyComponent(shape="point", amplitude=1.0)
    base = stare_spec([], n_channels=32, nan_bursts=[NaNBurst(start_s=0.5, duration_s=0.5, fraction=0.25)])
    a = simulate_observation(base, tmp_path / "a", seed=1)
    b = simulate_observation(base.replace(sky={"components": [comp]}), tmp_path / "b", seed=1)
    c = simulate_observation(base, tmp_path / "c", seed=2)
    masks = []
    for p in (a, b, c):
        with h5py.File(p, "r") as f:
            masks.append(np.isnan(f["spectrometer/tod"][0]).any(axis=-1))
    np.testing.assert_array_equal(masks[0], masks[1])
    assert masks[0].sum() == 4 * 8 and not np.array_equal(masks[0], masks[2])


# --------------------------------------------------------------------------------------------------
# specification: TOML, validation
# --------------------------------------------------------------------------------------------------
TOML_EXAMPLE = """
obsid = 91500
n_channels = 64
feeds = [1, 2, 20]
[scan]
kind = "raster"
[sky]
kind = "taua"
[[sky.components]]
shape = "gaussian"
spectrum = "logparabola"
amplitude = 0.2
nu0_ghz = 28.0
nu_peak_ghz = 28.0
width = 0.35
fwhm_arcmin = 20.0
frame = "icrs"
lon_deg = 0.2
[[nan_bursts]]
at_source = true
crossing = 1
duration_s = 2.0
feeds = [1]
fraction = 0.3
"""


def test_components_and_bursts_from_toml_round_trip():
    spec = ObservationSpec.from_dict(tomllib.loads(TOML_EXAMPLE)).validate()
    (comp,) = spec.sky.components
    assert (comp.shape, comp.spectrum, comp.frame, comp.lon_deg, comp.unit) == (
        "gaussian",
        "logparabola",
        "icrs",
        0.2,
        "K",
    )
    (burst,) = spec.nan_bursts
    assert burst.at_source and burst.at_component is None and burst.feeds == [1]
    assert ObservationSpec.from_dict(tomllib.loads(spec.to_toml())) == spec
    for name, factory in VARIETY_PRESETS.items():
        for obs in factory(n_channels=128).observations:
            assert obs.n_channels == 128
            assert ObservationSpec.from_dict(tomllib.loads(obs.to_toml())) == obs.validate(), name


@pytest.mark.parametrize(
    ("component", "burst", "message"),
    [
        ({"shape": "disc"}, None, r"sky.components\[0\]: unknown shape 'disc'"),
        ({"spectrum": "curved"}, None, r"unknown spectrum 'curved'"),
        ({"shape": "gradient", "unit": "Jy"}, None, r"a gradient has no flux density"),
        ({"shape": "gaussian", "fwhm_arcmin": 0.0}, None, r"fwhm_arcmin must be > 0"),
        ({"width": -1.0}, None, r"width must be > 0"),
        ({"frame": "fk4"}, None, r"unknown frame 'fk4'"),
        ({"offset": False, "lat_deg": 95.0}, None, r"lat_deg must lie in \[-90, 90\]"),
        ({}, {"at_component": 3}, r"nan_bursts\[0\]: at_component = 3 but the sky has 1 component"),
        ({"shape": "gradient"}, {"at_component": 0}, r"component 0 is a gradient"),
        ({}, {"at_source": True}, r"at_source needs a calibrator sky"),
        ({}, {"fraction": 0.0}, r"fraction must lie in \(0, 1\]"),
        ({}, {"feeds": [7]}, r"feeds \[7\] are not observed"),
        ({}, {"bands": [4]}, r"bands must be unique indices 0–3"),
        ({}, {"duration_s": 0.0}, r"duration_s must be > 0"),
    ],
)
def test_validation_problems(component, burst, message):
    data = {"target_ra_deg": 60.0, "target_dec_deg": 10.0, "sky": {"kind": "none", "components": [component]}}
    if burst is not None:
        data["nan_bursts"] = [burst]
    spec = ObservationSpec.from_dict(data)
    with pytest.raises(SimulatorError, match=message) as info:
        spec.validate()
    assert "\n" not in str(info.value)


def test_unknown_component_or_burst_keys_are_refused():
    with pytest.raises(SimulatorError, match="unknown sky.components parameter"):
        ObservationSpec.from_dict({"sky": {"components": [{"flux": 1.0}]}})
    with pytest.raises(SimulatorError, match="unknown nan_bursts parameter"):
        ObservationSpec.from_dict({"nan_bursts": [{"length_s": 1.0}]})


def test_missing_crossing_is_an_error(tmp_path):
    spec = stare_spec(
        [SkyComponent(shape="point", lat_deg=2.0)], nan_bursts=[NaNBurst(at_component=0, duration_s=0.2)]
    )
    with pytest.raises(SimulatorError, match="crosses it 0 time"):
        simulate_observation(spec, tmp_path)


# --------------------------------------------------------------------------------------------------
# presets: every scan kind on a calibrator, crossing CES, valid level 1
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", ["raster", "lissajous", "ces"])
def test_calibrator_scans_cross_the_source(scan, tmp_path):
    """Tau A with each scan kind (8 channels, 30 s of scan, feeds 1, 2, 20): valid level 1, the
    scan feature of the kind, and feed 1 passes within 2′ of the source."""
    from utils.level1 import Level1File

    spec = calibrator_observation(scan, n_channels=8, feeds=(1, 2), scan_s=30.0)
    path = simulate_observation(spec, tmp_path)
    Level1File(path).validate(probe_tod=True)
    with h5py.File(path, "r") as f:
        s, e = f["truth/scans/edges"][0]
        assert f["truth/scans/kind"][0].decode() == scan
        bit = {"ces": 8, "raster": 9, "lissajous": 10}[scan]
        assert np.all(f["spectrometer/features"][s:e] == 1 << bit)
        d = separation_deg(
            f["spectrometer/pixel_pointing/pixel_ra"][0, s:e],
            f["spectrometer/pixel_pointing/pixel_dec"][0, s:e],
            f["truth/calibrator"].attrs["ra_deg"],
            f["truth/calibrator"].attrs["dec_deg"],
        )
    assert d.min() < 2.0 / 60.0


def test_field_crossing_scans_cross(tmp_path):
    """The rising and setting GField30 CES of ``field-crossing`` (8 channels, 20 s): valid level 1,
    every component type in the truth, and scan directions on the sky (Galactic position angle of
    the feed-1 track) differing by more than 30°."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    from utils.level1 import Level1File

    angles = []
    for obs in PRESETS["field-crossing"].observations:
        small = obs.replace(n_channels=8, scan={"n_segments": 1, "segment_s": 20.0})
        path = simulate_observation(small, tmp_path)
        Level1File(path).validate(probe_tod=True)
        with h5py.File(path, "r") as f:
            table = f["truth/components/table"][...]
            assert {(s.decode(), p.decode()) for s, p in zip(table["shape"], table["spectrum"])} >= {
                ("point", "power"),
                ("gaussian", "logparabola"),
                ("gradient", "power"),
            }
            s, e = f["truth/scans/edges"][0]
            pos = SkyCoord(
                f["spectrometer/pixel_pointing/pixel_ra"][0, s:e] * u.deg,
                f["spectrometer/pixel_pointing/pixel_dec"][0, s:e] * u.deg,
            ).galactic
        dl = np.diff(pos.l.deg) * np.cos(np.radians(pos.b.deg[1:]))
        db = np.diff(pos.b.deg)
        fast = np.hypot(dl, db) > 0.5 * np.hypot(dl, db).max()
        # axis of the sweeps (direction modulo 180°): half the angle of the mean doubled direction
        doubled = np.mean(np.exp(2j * np.arctan2(db[fast], dl[fast])))
        angles.append(0.5 * np.degrees(np.angle(doubled)))
    diff = abs((angles[0] - angles[1] + 90.0) % 180.0 - 90.0)
    assert diff > 30.0, angles
