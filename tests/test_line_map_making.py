"""RRL cubes (docs/mapmaking.md#rrl-cubes): truth recovery on the full-resolution preset, stacking, axes,
hits, continuum, Doppler, the demo-like unresolved case, the cube's FITS layout and bad input.

One module-scoped workspace holds four simulated observations reduced to level 2 once:

* 80001 — the ``rrl-fullres`` preset (raster on HII region 1, 1024 channels, 2026-03-01);
* 80002 — the same raster on 2026-08-01, when the LSRK correction is ≥ 25 km/s different;
* 80003 — a 256-channel raster of the same field with no line emission (R = 0);
* 80004 — a demo-like 128-channel CES of the field (feeds 1–3) with R = 0.6, for the unresolved case;
* 80005 — 80001 with region 1 at 101 km/s, 0.4 of a native channel from the nearest channel centre.

Tolerances: each test derives the measurement noise from the cube's RMS (scaled by the fit's
sqrt(χ²/dof) where channels or pixels are correlated) and asserts that the stated tolerance is at
least 3σ, so no assertion can pass or fail by noise alone (docs/mapmaking.md#truth-tests).
"""

from __future__ import annotations

import math
import re

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import LEVEL2_THROUGH_NOISE_STATS, PipelineWorkspace, small_line_raster
from scipy.optimize import curve_fit
from scipy.special import erf

from utils.coordinates import angular_separation_deg
from utils.rrl import SPEED_OF_LIGHT_KMS, line_frequency_ghz
from utils.simulator import PRESETS, simulate_observation
from utils.simulator.cube_report import cube_validation, read_cube, read_hii_truth
from utils.simulator.spec import HIIRegion, ScanSpec, SkySpec

pytestmark = pytest.mark.slow

LEVEL2 = LEVEL2_THROUGH_NOISE_STATS
LINE_JOB = "modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap"
MAP_JOB = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"
H_ALPHA = ["H58a", "H59a", "H60a", "H61a", "H62a"]
V1 = 95.0  # LSRK velocity of HII region 1 (docs/simulator.md#galactic-field)
V_OFF = 101.0  # region 1 of 80005: 0.4 of a native channel off the channel centres


@pytest.fixture(scope="module")
def rrl(tmp_path_factory):
    """The four observations reduced to level 2 in one workspace; ``rrl.l1[obsid]`` is the level-1 path."""
    ws = PipelineWorkspace(tmp_path_factory.mktemp("rrl_ws"), [])
    base = PRESETS["rrl-fullres"].observations[0]
    specs = [
        base,
        base.replace(obsid=80002, date="2026-08-01"),
        base.replace(
            obsid=80003,
            n_channels=256,
            scan=small_line_raster(),
            sky=SkySpec(kind="galactic", hii_regions=[HIIRegion(line_ratio=0.0)]),
        ),
        base.replace(
            obsid=80004,
            feeds=[1, 2, 3, 20],
            n_channels=128,
            hour_angle_h=-1.5,
            scan=ScanSpec(kind="ces", n_segments=2, segment_s=120.0),
            sky=SkySpec(
                kind="galactic",
                hii_regions=[
                    HIIRegion(0.00, 0.00, 4.0, 6.0, -2.1, 0.6, 95.0, 25.0),
                    HIIRegion(0.35, -0.10, 3.0, 2.0, -2.1, 0.6, 60.0, 25.0),
                    HIIRegion(-0.40, 0.15, 6.0, 1.5, -2.1, 0.6, -20.0, 25.0),
                ],
            ),
        ),
        base.replace(
            obsid=80005,
            sky=SkySpec(
                kind="galactic",
                hii_regions=[
                    HIIRegion(0.00, 0.00, 4.0, 6.0, -2.1, 0.15, V_OFF, 25.0),
                    HIIRegion(0.35, -0.10, 3.0, 2.0, -2.1, 0.15, 60.0, 25.0),
                    HIIRegion(-0.40, 0.15, 6.0, 1.5, -2.1, 0.15, -20.0, 25.0),
                ],
            ),
        ),
    ]
    paths = [simulate_observation(s, ws.level1, seed=1) for s in specs]
    ws.write_configs(LEVEL2, nprocess=2)
    res = ws.run()
    assert res.returncode == 0, res.stderr[-3000:]
    ws.l1 = {s.obsid: p for s, p in zip(specs, paths)}
    return ws


def make_cubes(ws, name: str, jobs: list[str], section: str = "", expect: int = 0):
    """Run LineMapMaking with ``jobs`` in the workspace (config ``{name}.toml``); return the run."""
    (ws.root / f"{name}_lines.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 2\npipeline = [\n"
        + "".join(f"  {j!r},\n" for j in jobs)
        + f"]\n[{LINE_JOB}]\noutput_dir = 'cubes_{name}'\ncalibration = 'none'\n"
        "dynamic_wcs_padding = 0.05\n" + section
    )
    (ws.root / f"{name}.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        f"  \"modules.MapMaking.MapMaking.LineMapMaking(config_file='{name}_lines.toml')\",\n]\n"
    )
    res = ws.run(config=f"{name}.toml")
    assert res.returncode == expect, res.stderr[-3000:]
    return res


def native_center_kms(level1_path, line: str, near_kms: float) -> float:
    """The LSRK velocity of the native channel nearest ``near_kms`` (truth v_corr): a cube centred on
    it has output channels equal to the native ones (no interpolation between channels)."""
    nu0 = line_frequency_ghz(line)
    with h5py.File(level1_path, "r") as f:
        freq = f["spectrometer/frequency"][...]
        v_corr = float(f["truth/rrl/v_corr_kms"][0])
    band = next(b for b in range(freq.shape[0]) if freq[b].min() <= nu0 <= freq[b].max())
    v = SPEED_OF_LIGHT_KMS * (nu0 - freq[band]) / nu0 + v_corr
    return float(v[np.argmin(np.abs(v - near_kms))])


def on_spectrum(cube, l1_path, radius_fwhm: float = 1.0):
    """Mean spectrum and its rms over the unmasked pixels within ``radius_fwhm`` beams of region 1."""
    regions, beam30 = read_hii_truth(l1_path)
    reg = regions[0]
    good = (cube.mask == 0) & np.isfinite(cube.line).all(axis=0)
    r = angular_separation_deg(cube.lon_deg, cube.lat_deg, reg.l_deg, reg.b_deg) * 60.0
    on = good & (r <= radius_fwhm * beam30 * 30.0 / cube.line_freqs_ghz[0])
    return (
        cube.line[:, on].mean(axis=1),
        np.sqrt((cube.rms[:, on] ** 2).sum(axis=1)) / on.sum(),
        int(on.sum()),
    )


def template_spectrum(cube, l1_path):
    """Spectrum of the unmasked pixels weighted by region 1's true line amplitude (a matched
    filter over the map), and its rms."""
    regions, beam30 = read_hii_truth(l1_path)
    good = (cube.mask == 0) & np.isfinite(cube.line).all(axis=0)
    t = regions[0].line_peak_k(cube.line_freqs_ghz[0], cube.lon_deg[good], cube.lat_deg[good], beam30)
    s = (cube.line[:, good] * t).sum(axis=1) / t.sum()
    e = np.sqrt((cube.rms[:, good] ** 2 * t**2).sum(axis=1)) / t.sum()
    return s, e


def fit_gaussian_box(v, s, e, dv):
    """Least-squares Gaussian averaged over channel boxes of width ``dv``: (amp, centre, FWHM),
    their σ scaled by sqrt(χ²/dof) when above 1, and χ²/dof."""

    def model(x, a, v0, fwhm):
        s2 = fwhm / math.sqrt(8 * math.log(2)) * math.sqrt(2)
        return 0.5 * a * (erf((x + dv / 2 - v0) / s2) - erf((x - dv / 2 - v0) / s2))

    p, cov = curve_fit(model, v, s, p0=[s.max(), v[np.argmax(s)], 1.5 * dv], sigma=e, absolute_sigma=True)
    chi2 = float(np.sum(((s - model(v, *p)) / e) ** 2) / (v.size - 3))
    return p, np.sqrt(np.diag(cov)) * math.sqrt(max(chi2, 1.0)), chi2


# --------------------------------------------------------------------------------------------------
# 1. Full resolution (rrl-fullres, H59a, VRAD)
# --------------------------------------------------------------------------------------------------
def window_moments(cube, pixels, width: int, skip_kms: float):
    """Zeroth moments (K km/s) of the mean spectrum of ``pixels`` over consecutive windows of
    ``width`` channels whose centres lie more than ``skip_kms`` from v1 (line-free), shape (n_win,)."""
    v = cube.velocities_kms
    dv = float(np.median(np.diff(v)))
    spectrum = cube.line[:, pixels].mean(axis=1)
    free = np.flatnonzero((np.abs(v - V1) > skip_kms) & np.isfinite(spectrum))
    out = []
    for run in np.split(free, np.flatnonzero(np.diff(free) > 1) + 1):
        for k in range(0, run.size - width + 1, width):
            out.append(spectrum[run[k : k + width]].sum() * dv)
    return np.asarray(out)


def test_full_resolution_absolute_intensity_at_defaults(rrl):
    """Default settings on both dates of the raster centred on region 1 (the line fills the
    scan): the on-source zeroth moment over three channels about v1 is within 10 % of the truth,
    absolutely (no free zero level). Its noise is measured, not assumed: the same ON average over
    three-channel windows of line-free channels (they carry the channel levels' error common to
    all pixels of a scan, which the per-pixel RMS cannot spread over pixels); 3σ ≤ 10 % is
    asserted. With the plain median over the scan (``quiet_fraction=1``) the line that fills the
    scan is partly taken out (≈ 0.77 of the truth), which the test shows to be a real difference."""
    both = "lines=['H59a'], obsids=[80001, 80002], velocity_center_kms=95.0"
    make_cubes(
        rrl,
        "abs",
        [f"{LINE_JOB}(map_name='A', {both})", f"{LINE_JOB}(map_name='M', quiet_fraction=1.0, {both})"],
    )
    l1 = rrl.l1[80001]
    ratios = {}
    for name in ("A", "M"):
        path = rrl.root / "cubes_abs" / f"{name}_H59a.fits"
        cube = read_cube(path)
        dv = float(np.median(np.diff(cube.velocities_kms)))
        val = cube_validation(path, l1, window_kms=(V1 - 1.6 * dv, V1 + 1.6 * dv))
        regions, beam30 = read_hii_truth(l1)
        good = (cube.mask == 0) & np.isfinite(cube.line).all(axis=0)
        r = angular_separation_deg(cube.lon_deg, cube.lat_deg, regions[0].l_deg, regions[0].b_deg) * 60.0
        on = good & (r <= beam30 * 30.0 / cube.line_freqs_ghz[0])
        noise = window_moments(cube, on, 3, 200.0)
        assert noise.size >= 8, noise
        sigma = float(np.sqrt(np.mean(noise**2))) / val["m0_on_truth"]
        ratios[name] = (val["m0_on"] / val["m0_on_truth"], sigma)
    ratio, sigma = ratios["A"]
    assert 3 * sigma <= 0.10, ratios
    assert abs(ratio - 1.0) <= 0.10, ratios
    assert ratios["M"][0] < ratio - 3 * math.hypot(sigma, ratios["M"][1]), ratios


def test_full_resolution_line_centre_and_width_at_defaults(rrl):
    """Default grid on 80005, whose region 1 lies 0.4 of a native channel off the channel centres:
    the grid centre moves onto a native channel (output channels are the native ones, so
    regridding adds no width). A Gaussian averaged over the channel boxes fitted to the ON spectrum
    gives the centre within half a channel (≥ 3σ) and the FWHM within 15 % of 25 km/s or 3σ,
    whichever is larger (σ from the RMS cube scaled by sqrt(χ²/dof); a line 1.3 channels wide
    between two channels measures its width to about ±1.6 km/s, 3σ ≤ 25 % is asserted). The same
    channel width centred half a channel off the native channels (what the default grid did
    before) adds f(1 − f)Δv² ≈ 88 (km/s)² to the line's variance and widens it by more than 3σ."""
    l1 = rrl.l1[80005]
    dv = SPEED_OF_LIGHT_KMS * (2.0 / 1024) / line_frequency_ghz("H59a")
    native = native_center_kms(l1, "H59a", 95.0)
    res = make_cubes(
        rrl,
        "full",
        [
            f"{LINE_JOB}(map_name='R5', lines=['H59a'], obsids=[80005], velocity_center_kms=95.0)",
            f"{LINE_JOB}(map_name='U5', lines=['H59a'], obsids=[80005], "
            f"velocity_center_kms={native + 0.5 * dv}, velocity_resolution_kms={dv})",
        ],
    )
    assert "R5_H59a.fits: 1 segment(s) from 1 observation(s), 45 velocity channels" in res.stderr
    offset = abs(V_OFF - native_center_kms(l1, "H59a", V_OFF)) / dv
    assert 0.3 <= offset <= 0.5, offset  # the source is not centred on a channel
    fits_ = {}
    for name in ("R5", "U5"):
        path = rrl.root / "cubes_full" / f"{name}_H59a.fits"
        cube = read_cube(path)
        assert abs(float(np.median(np.diff(cube.velocities_kms))) - dv) < 1e-6
        s, e, _n_on = on_spectrum(cube, l1)
        near = np.abs(cube.velocities_kms - V_OFF) <= 100.0
        fits_[name] = fit_gaussian_box(cube.velocities_kms[near], s[near], e[near], dv)
    centre = float(read_cube(rrl.root / "cubes_full" / "R5_H59a.fits").header["LINE VCENTER"])
    assert abs(centre - native) <= 0.01 * dv, (centre, native)  # aligned (pipeline vs truth v_corr)
    p, sig, chi2 = fits_["R5"]
    assert 3 * sig[1] <= 0.5 * dv and abs(p[1] - V_OFF) <= 0.5 * dv, (p, sig)
    assert 3 * sig[2] <= 0.25 * 25.0, (p, sig, chi2)
    assert abs(p[2] - 25.0) <= max(0.15 * 25.0, 3 * sig[2]), (p, sig, chi2)
    val = cube_validation(rrl.root / "cubes_full" / "R5_H59a.fits", l1, window_kms=(V_OFF - 30, V_OFF + 30))
    assert val["v_truth_kms"] == V_OFF
    assert abs(val["m1_kms"] - V_OFF) <= max(0.5 * dv, 3 * val["m1_sigma"]), val
    pu, sigu, _ = fits_["U5"]
    assert pu[2] - p[2] > 3 * math.hypot(sig[2], sigu[2]), (fits_["U5"], fits_["R5"])


def test_rms_plane_matches_the_line_free_scatter(rrl):
    """χ²/N of LINE/RMS over the line-free channels (|v − v1| > 160 km/s) and unmasked pixels of
    single-date cubes at defaults is within 5 % of 1. Its σ is measured from the scatter of the
    per-channel χ²/N (channels share the levels' error across pixels, so pixels are not all
    independent), divided by sqrt(number of channels); 3σ ≤ 5 % is asserted."""
    jobs = [
        f"{LINE_JOB}(map_name='N{o}', lines=['H59a'], obsids=[{o}], velocity_center_kms=95.0)"
        for o in (80001, 80002)
    ]
    make_cubes(rrl, "rmsplane", jobs)
    per_channel = []
    for o in (80001, 80002):
        cube = read_cube(rrl.root / "cubes_rmsplane" / f"N{o}_H59a.fits")
        good = (cube.mask == 0) & np.isfinite(cube.line).all(axis=0)
        free = np.abs(cube.velocities_kms - V1) > 160.0
        z = cube.line[free][:, good] / cube.rms[free][:, good]
        per_channel.extend((z**2).mean(axis=1))
    per_channel = np.asarray(per_channel)
    chi2 = float(per_channel.mean())
    sigma = float(per_channel.std(ddof=1) / math.sqrt(per_channel.size))
    assert 3 * sigma <= 0.05, (chi2, sigma, per_channel.size)
    assert abs(chi2 - 1.0) <= 0.05, (chi2, sigma)


def test_moment0_sigma_includes_the_channel_correlations(rrl):
    """A 12 km/s grid on 18.75 km/s native channels (every output channel shares input channels
    with its neighbours; LINE CORR1 > 0.2): zeroth moments over windows of four line-free channels
    (|v − v1| > 200 km/s) per unmasked pixel, divided by their σ from ``moment0_sigma_kkms`` with
    the header's correlations, have χ²/N within 3σ of 1 (σ from the scatter of the per-window
    χ²/N), and the σ that treats channels as independent is too small by more than that."""
    from utils.rrl import moment0_sigma_kkms

    make_cubes(
        rrl,
        "m0sigma",
        [
            f"{LINE_JOB}(map_name='S', lines=['H59a'], obsids=[80001], velocity_center_kms=95.0, "
            "velocity_resolution_kms=12.0)"
        ],
    )
    cube = read_cube(rrl.root / "cubes_m0sigma" / "S_H59a.fits")
    rho1, rhob = cube.correlation
    assert rho1 > 0.2, cube.correlation
    v = cube.velocities_kms
    dv = float(np.median(np.diff(v)))
    measured = np.isfinite(cube.line).sum(axis=(1, 2))
    chans = measured >= 0.5 * measured.max()  # edge channels reached by few native channels
    good = (cube.mask == 0) & np.isfinite(cube.line[chans]).all(axis=0)
    line, rms = cube.line[:, good].T, cube.rms[:, good].T  # (n_pix, n_v)
    free = np.flatnonzero((np.abs(v - V1) > 200.0) & chans)
    chi2, naive = [], []
    for run in np.split(free, np.flatnonzero(np.diff(free) > 1) + 1):
        for k in range(0, run.size - 3, 4):
            lo, hi = v[run[k]] - 0.1 * dv, v[run[k + 3]] + 0.1 * dv
            sel = (v >= lo) & (v <= hi)
            m0 = line[:, sel].sum(axis=1) * dv
            chi2.append(np.mean((m0 / moment0_sigma_kkms(rms, v, (lo, hi), rho1, rhob)) ** 2))
            naive.append(np.mean((m0 / moment0_sigma_kkms(rms, v, (lo, hi))) ** 2))
    chi2, naive = np.asarray(chi2), np.asarray(naive)
    assert chi2.size >= 6, chi2
    sigma = float(chi2.std(ddof=1) / math.sqrt(chi2.size))
    assert abs(chi2.mean() - 1.0) <= max(3 * sigma, 0.05), (chi2, sigma)  # 3σ, at least 5 %
    assert naive.mean() > chi2.mean() + 3 * sigma, (naive, chi2, sigma)


# --------------------------------------------------------------------------------------------------
# 2. Stacking five H alpha lines
# --------------------------------------------------------------------------------------------------
def test_stack_of_five_lines(rrl):
    l1 = rrl.l1[80001]
    common = "obsids=[80001], velocity_center_kms=95.0, velocity_resolution_kms=20.0"
    res = make_cubes(
        rrl,
        "stack",
        [
            f"{LINE_JOB}(map_name='R1', lines={H_ALPHA!r}, {common})",
            f"{LINE_JOB}(map_name='R1', lines={H_ALPHA!r}, stack_lines=False, {common})",
        ],
    )
    out = rrl.root / "cubes_stack"
    assert sorted(p.name for p in out.glob("*.fits")) == sorted(
        [f"R1_{n}.fits" for n in H_ALPHA] + ["R1_stackH58a-H62a.fits"]
    )
    stack = out / "R1_stackH58a-H62a.fits"
    with fits.open(stack) as hdul:
        h = hdul[0].header
        assert h["STACKED"] is True
        assert [h[f"LINE{k}"] for k in range(1, 6)] == H_ALPHA
        assert h["RESTFRQ"] == pytest.approx(line_frequency_ghz("H58a") * 1e9)
        shares = [h[f"LINE W{k}"] for k in range(1, 6)]
        assert sum(shares) == pytest.approx(1.0) and min(shares) > 0.1
    window = (V1 - 50.0, V1 + 50.0)
    val = cube_validation(stack, l1, window_kms=window)
    # absolute scale through the origin over every pixel (truth = weighted mean of the five
    # lines' truths); its σ scaled by sqrt(χ²/N) for what the per-pixel σ leaves correlated
    sigma_a = val["scale_abs_sigma"] * math.sqrt(max(val["m0_chi2"], 1.0))
    assert 3 * sigma_a <= 0.10, val
    assert abs(val["scale_abs"] - 1.0) <= 0.10, val
    # H62a loses the low side of its window to the band-0 centre-channel mask: flagged
    assert "WARNING" in res.stderr and "R1_H62a.fits: H62a: baseline one-sided" in res.stderr
    with fits.open(out / "R1_H62a.fits") as h62, fits.open(out / "R1_H59a.fits") as h59:
        assert h62[0].header["LINE BASE1"] == "one-sided"
        assert h59[0].header["LINE BASE1"] == "two-sided"

    # off-line noise of the stack against the single H59a line, both on the same 20 km/s grid
    def offline_rms(path):
        cube = read_cube(path)
        good = (cube.mask == 0) & np.isfinite(cube.line).all(axis=0)
        off = np.abs(cube.velocities_kms - V1) > 150.0
        return float(np.std(cube.line[off][:, good]))

    single = offline_rms(out / "R1_H59a.fits")
    stacked = offline_rms(stack)
    assert stacked <= 1.2 / math.sqrt(5) * single, (stacked, single)


# --------------------------------------------------------------------------------------------------
# 3. Spectral axes
# --------------------------------------------------------------------------------------------------
def test_vrad_and_freq_axes_hold_the_same_values(rrl):
    common = "lines=['H59a'], obsids=[80001], velocity_center_kms=95.0"
    jobs = [
        f"{LINE_JOB}(map_name='V', {common})",
        f"{LINE_JOB}(map_name='F', {common}, spectral_axis='FREQ')",
    ]
    make_cubes(rrl, "axes", jobs)
    out = rrl.root / "cubes_axes"
    nu0 = line_frequency_ghz("H59a") * 1e9
    with fits.open(out / "V_H59a.fits") as v, fits.open(out / "F_H59a.fits") as f:
        assert [h.name for h in v] == ["LINE", "RMS", "HITS", "CONTINUUM", "MASK", "OBSLIST"]
        np.testing.assert_array_equal(v["LINE"].data, f["LINE"].data)
        np.testing.assert_array_equal(v["RMS"].data, f["RMS"].data)
        hv, hf = v[0].header, f[0].header
        assert hv["CTYPE3"] == "VRAD" and hv["CUNIT3"] == "m/s" and hv["SPECSYS"] == "LSRK"
        assert hv["VELREF"] == 257 and hv["RESTFRQ"] == pytest.approx(nu0)
        assert hf["CTYPE3"] == "FREQ" and hf["CUNIT3"] == "Hz" and hf["SPECSYS"] == "LSRK"
        n_v = v[0].data.shape[0]
        dv = hv["LINE DV"]
        assert abs(hv["LINE VCENTER"] - 95.0) <= 0.5 * dv  # moved onto a native channel
        v_j = hv["LINE VCENTER"] + (np.arange(n_v) - (n_v - 1) / 2) * dv
        world_v = WCS(hv).spectral.pixel_to_world_values(np.arange(n_v))
        world_f = WCS(hf).spectral.pixel_to_world_values(np.arange(n_v))
        np.testing.assert_allclose(world_v, v_j * 1e3, rtol=1e-9)
        np.testing.assert_allclose(world_f, nu0 * (1 - v_j / SPEED_OF_LIGHT_KMS), rtol=1e-9)
        # the RMS cube carries the same spectral WCS; the images carry the celestial one
        assert v["RMS"].header["CTYPE3"] == "VRAD" and v["HITS"].header["NAXIS"] == 2
        assert v["HITS"].data.dtype.kind == "i" and v["MASK"].data.dtype == np.uint8
        assert "HIERARCH LINE CONTSUB" in repr(hv) or hv["LINE CONTSUB"] == "spectrum"
        assert hv["LINE L1BYTES"] > 0 and hv["COMAP CONFIGSHA"]
    assert (out / "V_H59a.png").exists() and (out / "V_H59a.config.toml").exists()


# --------------------------------------------------------------------------------------------------
# 4. Hits: each sample once, as the continuum map of the same selection
# --------------------------------------------------------------------------------------------------
def test_cube_hits_equal_continuum_map_hits(rrl):
    make_cubes(rrl, "hits", [f"{LINE_JOB}(map_name='C', lines=['H59a', 'H60a'], obsids=[80001])"])
    (rrl.root / "hits_maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{MAP_JOB}(map_name='M', obsids=[80001], band=2, channel=0, calibration='none', "
        "output_dir='maps_hits', dynamic_wcs_padding=0.05, quicklook=False)\",\n]\n"
    )
    (rrl.root / "hits_main.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        "  \"modules.MapMaking.MapMaking.MapMaking(config_file='hits_maps.toml')\",\n]\n"
    )
    res = rrl.run(config="hits_main.toml")
    assert res.returncode == 0, res.stderr[-2000:]
    with fits.open(rrl.root / "cubes_hits" / "C_stackH59a-H60a.fits") as c:
        with fits.open(next((rrl.root / "maps_hits").glob("M_band2_ch0_*.fits"))) as m:
            assert c["HITS"].data.shape == m["HITS"].data.shape
            np.testing.assert_array_equal(c["HITS"].data, m["HITS"].data)
            assert c["HITS"].data.sum() == c[0].header["NSAMPLE"]


# --------------------------------------------------------------------------------------------------
# 5. Continuum without a line gives a cube consistent with zero
# --------------------------------------------------------------------------------------------------
def test_continuum_source_without_line_is_consistent_with_zero(rrl):
    make_cubes(
        rrl, "zero", [f"{LINE_JOB}(map_name='Z', lines=['H59a'], obsids=[80003], velocity_center_kms=95.0)"]
    )
    cube = read_cube(rrl.root / "cubes_zero" / "Z_H59a.fits")
    good = (cube.mask == 0)[None] & np.isfinite(cube.line) & np.isfinite(cube.rms)
    chi2 = float(np.mean((cube.line[good] / cube.rms[good]) ** 2))
    assert good.sum() > 1000
    assert chi2 <= 1.3, chi2
    # the continuum is there (the CONTINUUM image is a high-pass continuum map): HII region 1 stands out
    with fits.open(rrl.root / "cubes_zero" / "Z_H59a.fits") as hdul:
        cont = hdul["CONTINUUM"].data
    assert np.nanmax(cont) - np.nanmedian(cont) > 1.0


# --------------------------------------------------------------------------------------------------
# 6. Doppler: LSRK velocities agree between dates whose corrections differ by >= 25 km/s
# --------------------------------------------------------------------------------------------------
def test_doppler_correction_aligns_observations(rrl):
    """Stacks of the five lines from each date, on one LSRK grid: the fitted line centres agree."""
    v_corr = []
    for obsid in (80001, 80002):
        with h5py.File(rrl.l1[obsid], "r") as f:
            v_corr.append(float(f["truth/rrl/v_corr_kms"][0]))
    assert abs(v_corr[0] - v_corr[1]) >= 25.0, v_corr
    common = f"lines={H_ALPHA!r}, velocity_center_kms=95.0, velocity_resolution_kms=20.0"
    make_cubes(
        rrl,
        "doppler",
        [
            f"{LINE_JOB}(map_name='A', obsids=[80001], {common})",
            f"{LINE_JOB}(map_name='B', obsids=[80002], {common})",
        ],
    )
    centre, sigma = [], []
    for name, obsid in (("A", 80001), ("B", 80002)):
        cube = read_cube(rrl.root / "cubes_doppler" / f"{name}_stackH58a-H62a.fits")
        s, e = template_spectrum(cube, rrl.l1[obsid])
        near = np.abs(cube.velocities_kms - V1) <= 100.0
        p, sig, _chi2 = fit_gaussian_box(cube.velocities_kms[near], s[near], e[near], 20.0)
        centre.append(p[1])
        sigma.append(sig[1])
        assert 3 * sig[1] <= 0.5 * 20.0 and abs(p[1] - V1) <= 0.5 * 20.0, (name, p, sig)
    assert 3 * math.hypot(*sigma) <= 2.0, sigma
    assert abs(centre[0] - centre[1]) <= 2.0, (centre, sigma)


# --------------------------------------------------------------------------------------------------
# 7. Demo-like: 128 channels, unresolved lines, stacked
# --------------------------------------------------------------------------------------------------
def test_demo_like_unresolved_stack(rrl):
    """The shipped line-map settings on a 128-channel CES (lines R = 0.6 for signal to noise)."""
    import tomllib

    from conftest import REPO_ROOT

    shipped = tomllib.loads((REPO_ROOT / "parameter_files" / "level2_line_mapmaking.toml").read_text())
    section = shipped["modules"]["MapMaking"]["MapMakingModules"]["CreateLineMap"]["CreateLineMap"]
    settings = ", ".join(f"{k}={v!r}" for k, v in section.items() if k != "output_dir")
    make_cubes(rrl, "demo", [f"{LINE_JOB}(map_name='D', lines={H_ALPHA!r}, obsids=[80004], {settings})"])
    path = rrl.root / "cubes_demo" / "D_stackH58a-H62a.fits"
    val = cube_validation(path, rrl.l1[80004])
    assert val["peak_channel_contains_v"], val
    sigma_a = val["scale_abs_sigma"] * math.sqrt(max(val["m0_chi2"], 1.0))
    assert 3 * sigma_a <= 0.20, val
    assert abs(val["scale_abs"] - 1.0) <= 0.20, val


# --------------------------------------------------------------------------------------------------
# Options: per-pixel continuum subtraction, per-channel destriping, quiet reference
# --------------------------------------------------------------------------------------------------
def test_pixel_subtraction_and_channel_destriping_recover_the_line(rrl):
    """The options at their other settings: the absolute zeroth moment over three channels about v1
    (scale through the origin over every pixel, σ scaled by sqrt(χ²/N)) within 15 % at ≥ 3σ, and
    the centroid within half a channel. The per-channel destriper needs offsets longer than the
    raster's 2-s rows (``offset_length=1000``): with the default 100 samples an offset spans one
    row and absorbs the line along it (0.42 of the truth); a known limit of destriping a raster
    per channel, left open."""
    l1 = rrl.l1[80001]
    common = "lines=['H59a'], obsids=[80001], velocity_center_kms=95.0"
    make_cubes(
        rrl,
        "opts",
        [
            f"{LINE_JOB}(map_name='P', continuum_subtraction='pixel', {common})",
            f"{LINE_JOB}(map_name='D', destripe_channels=True, offset_length=1000, {common})",
        ],
    )
    dv = SPEED_OF_LIGHT_KMS * (2.0 / 1024) / line_frequency_ghz("H59a")
    window = (V1 - 1.6 * dv, V1 + 1.6 * dv)
    out = rrl.root / "cubes_opts"
    for name in ("P", "D"):
        val = cube_validation(out / f"{name}_H59a.fits", l1, window_kms=window)
        sigma_a = val["scale_abs_sigma"] * math.sqrt(max(val["m0_chi2"], 1.0))
        assert 3 * sigma_a <= 0.15, (name, val)
        assert abs(val["scale_abs"] - 1.0) <= 0.15, (name, val)
        assert abs(val["m1_kms"] - V1) <= 0.5 * dv, (name, val)
    with fits.open(out / "D_H59a.fits") as hdul:
        assert hdul[0].header["DESTRIPER DSTATUS"] == "converged"


# --------------------------------------------------------------------------------------------------
# Bad input, idempotence
# --------------------------------------------------------------------------------------------------
def test_bad_line_configs_are_reported_before_any_work(rrl):
    (rrl.root / "bad_lines.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        f"  \"{LINE_JOB}(map_name='X', line_frequency=22.235)\",\n"
        f"  \"{LINE_JOB}(map_name='Y', lines=['H59q'])\",\n"
        f"  \"{LINE_JOB}(map_name='Z', lines=['H58a', 'H59a'], spectral_axis='FREQ')\",\n"
        f"  \"{LINE_JOB}(map_name='W', lines=['H59a'], wcs_def='NoSuchField')\",\n"
        "]\n"
    )
    (rrl.root / "bad.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        "  \"modules.MapMaking.MapMaking.LineMapMaking(config_file='bad_lines.toml')\",\n]\n"
    )
    res = rrl.run(config="bad.toml")
    assert res.returncode == 2
    assert "line 22.23500GHz at 22.23500 GHz is outside every band (26–34 GHz)" in res.stderr
    assert "bad recombination-line name 'H59q'" in res.stderr
    assert "spectral_axis='FREQ' is not allowed when stacking lines" in res.stderr
    assert "unknown WCS definition 'NoSuchField'" in res.stderr
    assert not (rrl.root / "outputs").exists()


def test_failed_cube_does_not_stop_the_others_and_reruns_skip(rrl):
    """Empty selection, a level-2 dataset that is not there, all channel weights zero: one line
    each, exit status 1; the good cube is written, and a rerun remakes nothing."""
    jobs = [
        f"{LINE_JOB}(map_name='Empty', lines=['H59a'], source='NoSuchField')",
        f"{LINE_JOB}(map_name='NoSet', lines=['H59a'], obsids=[80003], tod_data_name='level2/not_there')",
        f"{LINE_JOB}(map_name='NoWeight', lines=['H59a'], obsids=[80003], channel_rms_cap_k=1e-6)",
        f"{LINE_JOB}(map_name='Ok', lines=['H59a'], obsids=[80003], velocity_center_kms=95.0, "
        "quicklook=False)",
    ]
    res = make_cubes(rrl, "mixed", jobs, expect=1)
    assert "no data for cube Empty: empty selection" in res.stderr
    assert "no data for cube NoSet: lacks level2/not_there: 1" in res.stderr
    assert re.search(
        r"no data for cube NoWeight_H59a.fits: no sample with weight lands on the map .*"
        r"line H59a: no usable channel: 1",
        res.stderr,
    ), res.stderr
    assert re.search(r"LineMapMaking\s+1\s+0\s+3", res.stdout), res.stdout
    path = rrl.root / "cubes_mixed" / "Ok_H59a.fits"
    assert path.exists()
    assert not (rrl.root / "cubes_mixed" / "NoWeight_H59a.fits").exists()
    stamp = path.stat().st_mtime_ns
    again = make_cubes(rrl, "mixed", jobs, expect=1)
    assert re.search(r"LineMapMaking\s+0\s+1\s+3", again.stdout), again.stdout
    assert path.stat().st_mtime_ns == stamp
    assert not list(path.parent.glob("*.partial-*"))


def test_missing_level1_file_is_counted(rrl, tmp_path):
    """A level-1 file that has gone away is a counted rejection, not a crash (docs/mapmaking.md#reading)."""
    from collections import Counter
    from types import SimpleNamespace

    from modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap import CreateLineMap
    from modules.MapMaking.read_line_data import line_prepass_file

    level2 = next(p for p in rrl.level2_files() if "0080003" in p.name)
    job = CreateLineMap(lines=["H59a"], calibration="none")
    settings = job.reader_settings(job.expand()[0], 20.0)
    counts = Counter()
    obs = SimpleNamespace(obsid=80003, level2_path=str(level2), level1_path=str(tmp_path / "gone.hd5"))
    assert line_prepass_file(obs, settings, None, None, counts) == []
    assert counts == Counter({"level-1 file missing": 1})
    obs.level1_path = str(rrl.l1[80003])
    plans = line_prepass_file(obs, settings, None, None, counts)
    assert len(plans) == 1 and plans[0].uses[0].band == 2


def test_excluded_samples_do_not_reach_the_cube(rrl, tmp_path):
    """A 300-sample burst in the level-1 TOD (raw counts × 1.5 and × 0.5 in alternate channels: tens
    of K that no velocity baseline removes) flagged 4 in level 2
    leaves the cube's accumulators exactly as the same files with the flag and no burst (the flagged
    samples are dropped before the channel levels), and removes those samples from the hits.
    Unflagged, the burst reaches the cube (some weighted sums move by > 100× their noise sqrt(Σ f² w)),
    so the test can fail (docs/level2.md#sample-flags)."""
    import shutil
    from collections import Counter
    from types import SimpleNamespace

    from modules.MapMaking.geometry import job_geometry
    from modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap import CreateLineMap
    from modules.MapMaking.read_data import frame_coordinates
    from modules.MapMaking.read_line_data import line_prepass_file, read_line_file
    from utils.level1 import TOD
    from utils.level2 import FLAG_LEVEL1_NAN

    level2 = next(p for p in rrl.level2_files() if "0080003" in p.name)
    job = CreateLineMap(lines=["H59a"], calibration="none")
    settings = job.reader_settings(job.expand()[0], 20.0)

    def copy(name, *, spike, flag):
        l1 = tmp_path / f"{name}_l1.hd5"
        l2 = tmp_path / f"{name}_l2.hd5"
        shutil.copyfile(rrl.l1[80003], l1)
        shutil.copyfile(level2, l2)
        obs = SimpleNamespace(obsid=80003, level2_path=str(l2), level1_path=str(l1))
        (plan,) = line_prepass_file(obs, settings, None, None, Counter())
        a = plan.start + 2000
        if spike:
            with h5py.File(l1, "a") as f:
                block = f[TOD][plan.l1_pos, plan.uses[0].band, :, a : a + 300]
                zigzag = 1.0 + 0.5 * (-1.0) ** np.arange(block.shape[0])  # no baseline can follow it
                f[TOD][plan.l1_pos, plan.uses[0].band, :, a : a + 300] = block * zigzag[:, None]
        if flag:
            with h5py.File(l2, "a") as f:
                row = f["level2/sample_flags"][plan.ifeed]
                row[a : a + 300] |= FLAG_LEVEL1_NAN
                f["level2/sample_flags"][plan.ifeed] = row
        with h5py.File(l2, "r") as f:
            lon, lat = frame_coordinates(
                f["spectrometer/pixel_pointing/pixel_ra"][...].ravel(),
                f["spectrometer/pixel_pointing/pixel_dec"][...].ravel(),
                "galactic",
            )
        geometry = job_geometry("dynamic", job.wcs_def_file, lon, lat, cdelt_deg=job.dynamic_wcs_cdelt)
        return read_line_file([plan], settings, geometry)

    clean = copy("clean", spike=False, flag=False)
    clean_flagged = copy("clean_flagged", spike=False, flag=True)
    flagged = copy("flagged", spike=True, flag=True)
    spiked = copy("spiked", spike=True, flag=False)
    for name in ("hit", "acc_sum", "acc_w", "hits", "cont_sum"):
        np.testing.assert_array_equal(getattr(flagged, name), getattr(clean_flagged, name))
    assert clean.hits.sum() - flagged.hits.sum() == 300
    np.testing.assert_array_equal(spiked.hit, clean.hit)
    # Σ f w y of white noise with w = 1/σ² has variance Σ f² w = acc_q
    used = clean.acc_q > 0
    z = np.abs(spiked.acc_sum - clean.acc_sum)[used] / np.sqrt(clean.acc_q[used])
    assert np.max(z) > 100
