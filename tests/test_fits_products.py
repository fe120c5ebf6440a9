"""What map and cube FITS files say about themselves (docs/map_products.md#beam-brightness-and-provenance):
BMAJ/BMIN/BPA from the database's calibrator fits or the nominal beam, the brightness scale (TEMPSCAL,
JYPERK, CALERR), the rest frequencies of a stack, the OBSLIST table, and the smoothing of stacked lines to
a common beam (docs/mapmaking.md#common-beam-stacking).

The common-beam tests work on synthetic per-line accumulators (a point source seen by each line's beam,
white noise), the header tests on one small simulated raster reduced through the default level-2 chain
and mapped at default settings (``calibration='model'`` with a calibration model written to the
database).
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from astropy import constants as const
from astropy import units as u
from astropy.io import fits
from conftest import LEVEL2_THROUGH_NOISE_STATS, MAP_HDUS, PipelineWorkspace, small_line_raster
from scipy.optimize import curve_fit

from modules.MapMaking.common_beam import stack_common_beam
from modules.MapMaking.fits_metadata import Beam, calibrator_beam_table, jy_per_k, map_beam
from utils.calibrators import beam_fwhm_arcmin, gaussian_flux_jy
from utils.level2 import MJD, SCAN_EDGES
from utils.rrl import line_frequency_ghz
from utils.wcs import MapGeometry

H_ALPHA = ["H58a", "H59a", "H60a", "H61a", "H62a"]
PIX_ARCMIN = 0.5
N_PIX = 64


# --------------------------------------------------------------------------------------------------
# Synthetic accumulators: a point source seen by every line's beam
# --------------------------------------------------------------------------------------------------
def small_geometry() -> MapGeometry:
    return MapGeometry(
        {
            "CTYPE1": "GLON-CAR",
            "CTYPE2": "GLAT-CAR",
            "CRPIX1": 0.5 * (N_PIX + 1),
            "CRPIX2": 0.5 * (N_PIX + 1),
            "CDELT1": -PIX_ARCMIN / 60.0,
            "CDELT2": PIX_ARCMIN / 60.0,
            "CRVAL1": 30.0,
            "CRVAL2": 0.0,
            "NAXIS1": N_PIX,
            "NAXIS2": N_PIX,
        }
    )


def radius_arcmin() -> np.ndarray:
    """Distance of every pixel from the grid centre (arcmin), flattened (ny·nx,)."""
    y, x = np.mgrid[0:N_PIX, 0:N_PIX]
    c = 0.5 * (N_PIX - 1)
    return (np.hypot(x - c, y - c) * PIX_ARCMIN).ravel()


def line_accumulators(peak_k, fwhm_arcmin, sigma_k, n_v, rng):
    """Per-line ``Σ f w y``, ``Σ f w``, ``Σ f² w`` (n_lines, n_pix, n_v) of a point source of peak
    ``peak_k[k]`` in a beam of ``fwhm_arcmin[k]`` in every channel, with white noise of ``sigma_k[k]``
    per pixel scaled by a smooth hit pattern (weights vary by 2× across the map). ``rng=None``: no noise."""
    r = radius_arcmin()
    y, x = np.mgrid[0:N_PIX, 0:N_PIX]
    coverage = (1.5 + 0.5 * np.cos(2 * np.pi * x / N_PIX) * np.cos(2 * np.pi * y / N_PIX)).ravel()
    sums, ws, qs = [], [], []
    for peak, fwhm, sig in zip(peak_k, fwhm_arcmin, sigma_k):
        w = coverage / sig**2  # K⁻² per pixel
        sky = peak * np.exp(-4 * math.log(2) * r**2 / fwhm**2)
        values = np.repeat(sky[:, None], n_v, axis=1)
        if rng is not None:
            values = values + rng.standard_normal(values.shape) / np.sqrt(w)[:, None]
        ws.append(np.repeat(w[:, None], n_v, axis=1))
        sums.append(ws[-1] * values)
        qs.append(ws[-1].copy())  # f = 1: Σ f² w = Σ f w
    return np.array(sums), np.array(ws), np.array(qs)


def fit_beam(image: np.ndarray) -> tuple[float, float]:
    """(peak, FWHM in arcmin) of a circular Gaussian fitted to a flattened image centred on the grid."""
    r = radius_arcmin()
    near = r < 8.0

    def model(rr, a, fwhm):
        return a * np.exp(-4 * math.log(2) * rr**2 / fwhm**2)

    (a, fwhm), _ = curve_fit(model, r[near], image[near], p0=[float(image.max()), 4.5])
    return float(a), float(fwhm)


def test_common_beam_stack_has_the_widest_beam_and_an_unbiased_peak():
    """Five H alpha lines (beams 4.11′–5.01′) of a compact HII region (1′ FWHM) with the same line
    brightness in every line: smoothed to the common beam, the stack has the H62α image width and the
    peak of one line (H58α) smoothed alike; averaged as observed it is narrower and biased high."""
    freqs = [line_frequency_ghz(n) for n in H_ALPHA]
    fwhm = [float(beam_fwhm_arcmin(f)) for f in freqs]
    assert fwhm[-1] == pytest.approx(5.01, abs=0.01) and fwhm[0] == pytest.approx(4.11, abs=0.01)
    geometry = small_geometry()
    hit = np.arange(geometry.n_pixels)
    n_v = 4
    theta_s, t_line = 1.0, 5.0  # source FWHM (arcmin) and its line brightness (K)
    width = [math.hypot(theta_s, f) for f in fwhm]  # the source as each line sees it
    peak = [t_line * theta_s**2 / (theta_s**2 + f**2) for f in fwhm]
    sigma = [0.05, 0.04, 0.05, 0.06, 0.08]  # K per pixel: unequal weights between the lines
    fwhm_deg = [f / 60.0 for f in fwhm]

    # noise-free: the beam of the stack
    s, w, q = line_accumulators(peak, width, sigma, n_v, None)
    ss, sw, _sq, common, _lw = stack_common_beam(s, w, q, hit, geometry, fwhm_deg)
    assert common * 60.0 == pytest.approx(fwhm[-1])
    _a, fwhm_stack = fit_beam(ss[:, 0] / sw[:, 0])
    # as observed (no smoothing): the plain inverse-variance mean of the five lines
    raw = (s.sum(axis=0) / w.sum(axis=0))[:, 0]
    a_raw, fwhm_raw = fit_beam(raw)
    print(f"stack FWHM: as observed {fwhm_raw:.3f}', common beam {fwhm_stack:.3f}' (H62a {width[-1]:.3f}')")
    # sampled kernels on 0.5′ pixels: the common beam is reached to 0.1 %
    assert fwhm_stack == pytest.approx(width[-1], rel=0.001)
    assert fwhm_raw < width[-1] - 0.3  # the mixture is visibly narrower

    # with noise: peak of the stack against H58a (the narrowest beam) smoothed to the same beam
    rng = np.random.default_rng(7)
    s, w, q = line_accumulators(peak, width, sigma, n_v, rng)
    ss, sw, sq, _, _lw = stack_common_beam(s, w, q, hit, geometry, fwhm_deg)
    stack_map = (ss / sw).mean(axis=1)
    # a single line smoothed to the common beam: pass the common beam as a second, empty line
    empty = np.zeros_like(s[:1])
    one_s, one_w, one_q, _, _lw1 = stack_common_beam(
        np.concatenate([s[:1], empty]),
        np.concatenate([w[:1], empty]),
        np.concatenate([q[:1], empty]),
        hit,
        geometry,
        [fwhm_deg[0], fwhm_deg[-1]],
    )
    one_map = (one_s / one_w).mean(axis=1)
    a_stack, f_stack = fit_beam(stack_map)
    a_one, f_one = fit_beam(one_map)
    ratio = a_stack / a_one
    # noise of the fitted peaks from the RMS plane: the peak of a matched fit is ~ the beam-weighted
    # mean of the pixels; its σ is bounded by the rms at the centre (conservative)
    centre = int(np.argmin(radius_arcmin()))
    sig_stack = float(np.mean(np.sqrt(sq[centre]) / sw[centre])) / math.sqrt(n_v)
    sig_one = float(np.mean(np.sqrt(one_q[centre]) / one_w[centre])) / math.sqrt(n_v)
    tol = 3.0 * math.hypot(sig_stack, sig_one)
    print(
        f"peak: stack {a_stack:.4f} (FWHM {f_stack:.3f}'), H58a smoothed {a_one:.4f} (FWHM {f_one:.3f}'), "
        f"ratio {ratio:.4f} ± {tol / 3:.4f}; as observed {a_raw:.4f} ({a_raw / a_one - 1:+.1%})"
    )
    # the true peak of the source in the common beam
    truth = peak[-1]
    assert a_one == pytest.approx(truth, abs=3 * sig_one + 0.005 * truth)
    assert abs(ratio - 1.0) <= tol, (ratio, tol)
    assert a_raw / a_one - 1.0 > 10 * tol  # without the common beam the peak is biased high

    # the RMS plane of the stack describes its scatter: a noise-only stack of 32 channels
    n_noise = 32
    s0, w0, q0 = line_accumulators([0.0] * 5, width, sigma, n_noise, np.random.default_rng(8))
    ss0, sw0, sq0, _, _lw0 = stack_common_beam(s0, w0, q0, hit, geometry, fwhm_deg)
    chi2 = float(np.mean((ss0 / sw0) ** 2 / (sq0 / sw0**2)))
    # pixels are correlated over the kernel (σ ≤ 2.4 px): N_eff ≥ n_pix n_v / (4π σ²) independent values
    n_eff = geometry.n_pixels * n_noise / (4 * math.pi * 2.4**2)
    print(f"noise-only stack chi2/N = {chi2:.3f} (N_eff ≥ {n_eff:.0f}, 3σ = {3 * math.sqrt(2 / n_eff):.3f})")
    assert abs(chi2 - 1.0) <= 3 * math.sqrt(2.0 / n_eff)


def test_common_beam_stack_keeps_the_weights_of_the_lines():
    """Lines of unequal brightness and noise: smoothing must not change their mix in the stack
    (docs/mapmaking.md#common-beam-stacking). The shares the stack reports (``LINE Wk``) are the lines'
    inverse variances before smoothing, and the noise-free stack's peak is the mean of the lines' peaks in
    the common beam weighted by those shares, the truth a stacked cube is compared with."""
    freqs = [line_frequency_ghz(n) for n in H_ALPHA]
    fwhm = [float(beam_fwhm_arcmin(f)) for f in freqs]
    geometry = small_geometry()
    hit = np.arange(geometry.n_pixels)
    theta_s = 1.0
    t_line = [5.0 * (f / 30.0) ** -2.0 for f in freqs]  # H62α 1.5 times as bright as H58α
    width = [math.hypot(theta_s, f) for f in fwhm]
    peak = [t * theta_s**2 / (theta_s**2 + f**2) for t, f in zip(t_line, fwhm)]
    sigma = [0.05, 0.04, 0.05, 0.06, 0.08]
    s, w, q = line_accumulators(peak, width, sigma, 2, None)
    ss, sw, _sq, _common, line_weight = stack_common_beam(s, w, q, hit, geometry, [f / 60.0 for f in fwhm])
    share = line_weight / line_weight.sum()
    expected = (1.0 / np.square(sigma)) / np.sum(1.0 / np.square(sigma))
    print("shares", np.round(share, 4), "before smoothing", np.round(expected, 4))
    # noise-free, and every line has the same hit pattern: the shares differ only by that pattern smoothed
    # with kernels of different widths (< 0.01 % here); 1 % of each share. Weights 1/σ'² after smoothing
    # gave H62α (not smoothed) 2 % of the weight on the RRL test field instead of its 19 %.
    np.testing.assert_allclose(share, expected, rtol=0.01)
    truth = sum(sh * t * theta_s**2 / (theta_s**2 + fwhm[-1] ** 2) for sh, t in zip(share, t_line))
    a_stack, f_stack = fit_beam((ss / sw)[:, 0])
    print(f"stack peak {a_stack:.4f} against the share-weighted truth {truth:.4f} (FWHM {f_stack:.3f}')")
    # the fit on sampled pixels reaches 0.1 % (as for the beam above); 0.5 %. The old weights 1/σ'² gave
    # a peak 6 % below this truth.
    assert a_stack == pytest.approx(truth, rel=0.005)


def test_beam_from_calibrator_rows_scales_with_frequency_and_falls_back_to_nominal():
    rows = []
    for feed, fwhm30 in ((1, 4.8), (2, 4.6), (3, 5.0)):
        nu = 30.5
        sigma_deg = fwhm30 * 30.0 / nu / 60.0 / math.sqrt(8 * math.log(2))
        flux = float(gaussian_flux_jy(3.0, sigma_deg, sigma_deg, nu))
        rows.append({"feed": feed, "band": 1, "amplitude": 3.0, "measured_flux": flux, "frequency_ghz": nu})
    table = calibrator_beam_table(rows)
    assert table[(2, 1)][0] == pytest.approx(4.6)
    beam = map_beam(table, [1, 2, 3], [1], 28.0)
    assert beam.source == "calibrator-fit" and beam.n_fit == 3
    assert beam.fwhm_deg * 60.0 == pytest.approx(4.8 * 30.0 / 28.0)  # median over feeds, scaled
    nominal = map_beam(table, [1, 2, 3], [0], 27.0)
    assert nominal.source == "nominal"
    assert nominal.fwhm_deg * 60.0 == pytest.approx(4.5 * 30.0 / 27.0)


def independent_jy_per_k(freq_ghz: float, fwhm_deg: float) -> float:
    """2k/λ² × Ω with Ω = π θ²/(4 ln 2) of a Gaussian beam of FWHM θ (astropy units)."""
    lam = const.c / (freq_ghz * u.GHz)
    theta = (fwhm_deg * u.deg).to(u.rad)
    omega = math.pi * theta**2 / (4 * math.log(2)) / u.rad**2 * u.sr
    return float((2 * const.k_B / lam**2 * omega / u.sr).to(u.Jy / u.K).value)


def test_jy_per_k_matches_an_independent_formula():
    beam = Beam(4.5 / 60.0, 30.0, "nominal")
    assert float(jy_per_k(30.0, beam)) == pytest.approx(independent_jy_per_k(30.0, 4.5 / 60.0), rel=1e-9)
    # the beam scales as 1/ν, so Jy/beam per K is the same at every frequency
    assert float(jy_per_k(26.0, beam)) == pytest.approx(
        independent_jy_per_k(26.0, 4.5 / 60.0 * 30 / 26), rel=1e-9
    )
    common = Beam(5.0 / 60.0, 27.0, "common")  # one beam for every line: ∝ ν²
    assert float(jy_per_k(33.0, common)) == pytest.approx(independent_jy_per_k(33.0, 5.0 / 60.0), rel=1e-9)


# --------------------------------------------------------------------------------------------------
# A small raster mapped at default settings
# --------------------------------------------------------------------------------------------------
CAL_FEED_FWHM30 = 4.8  # arcmin at 30 GHz, the calibrator fit written for band 0
FIT_RMS, N_CAL_OBS = 0.02, 4


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    from modules.SQLModule.SQLModule import db
    from utils.simulator import PRESETS, simulate_observation

    ws = PipelineWorkspace(tmp_path_factory.mktemp("fits_products"), [])
    spec = (
        PRESETS["rrl-fullres"]
        .observations[0]
        .replace(
            obsid=81001,
            n_channels=256,
            scan=small_line_raster(),
        )
    )
    simulate_observation(spec, ws.level1, seed=3)
    ws.write_configs(LEVEL2_THROUGH_NOISE_STATS, nprocess=1)
    res = ws.run()
    assert res.returncode == 0, res.stderr[-3000:]
    # a Tau A calibration model (factor 1, 2 % scatter over 4 observations) for every element, and a
    # calibrator fit of feed 1 in band 0 only (FWHM 4.8′ at 30 GHz)
    db.connect(str(ws.db_path), create=False)
    try:
        db.upsert_calibration_model(
            {
                "source": "TauA",
                "feed": 1,
                "band": b,
                "channel": c,
                "model_type": "mean",
                "poly_coeffs": [1.0],
                "fit_rms": FIT_RMS,
                "n_observations": N_CAL_OBS,
            }
            for b in range(4)
            for c in range(2)
        )
        db.upsert_observation({"obsid": 81000, "source": "TauA", "utc_start": "2026-02-28-12:00:00"})
        nu = 27.0
        sigma_deg = CAL_FEED_FWHM30 * 30.0 / nu / 60.0 / math.sqrt(8 * math.log(2))
        flux = float(gaussian_flux_jy(5.0, sigma_deg, sigma_deg, nu))
        db.replace_calibration_flux(
            81000,
            [
                {
                    "feed": 1,
                    "band": 0,
                    "channel": 0,
                    "mjd": 61099.5,
                    "source": "TauA",
                    "frequency_ghz": nu,
                    "measured_flux": flux,
                    "flux_error": 0.01 * flux,
                    "amplitude": 5.0,
                    "amplitude_error": 0.05,
                    "chi2": 1.0,
                }
            ],
        )
    finally:
        db.disconnect()
    map_job = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"
    line_job = "modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap"
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{map_job}(map_name='fld', source='GField30', band=[0, 3], channel=0)\",\n]\n"
        f"[{map_job}]\noutput_dir = 'maps'\n"
    )
    (ws.root / "lines.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{line_job}(map_name='fld', source='GField30', lines={H_ALPHA!r})\",\n"
        f"  \"{line_job}(map_name='one', source='GField30', lines=['H62a'])\",\n]\n"
        f"[{line_job}]\noutput_dir = 'cubes'\n"
    )
    (ws.root / "products.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        "  \"modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')\",\n"
        "  \"modules.MapMaking.MapMaking.LineMapMaking(config_file='lines.toml')\",\n]\n"
    )
    res = ws.run(config="products.toml")
    assert res.returncode == 0, res.stderr[-3000:]
    ws.log = res.stderr
    return ws


def level2_segments(ws, feeds=(1,)):
    """(obsid, feed, scan) → (MJD of the first sample, of the last, samples) from the level-2 file."""
    (path,) = ws.level2_files()
    with h5py.File(path, "r") as l2:
        edges = l2[SCAN_EDGES][...]
        mjd = l2[MJD][...]
    return {
        (81001, f, s): (float(mjd[a]), float(mjd[b - 1]), int(b - a))
        for f in feeds
        for s, (a, b) in enumerate(edges)
    }


def test_continuum_maps_carry_beam_brightness_scale_and_obslist(products):
    out = products.root / "maps"
    band0 = fits.open(out / "fld_band0_ch0_feed01.fits")
    band3 = fits.open(out / "fld_band3_ch0_feed01.fits")
    with band0, band3:
        assert [h.name for h in band0] == list(MAP_HDUS)
        h0, h3 = band0[0].header, band3[0].header
        f0, f3 = h0["FREQ"] / 1e9, h3["FREQ"] / 1e9
        # band 0 has a calibrator fit in the database: 4.8′ at 30 GHz scaled to the map frequency
        assert h0["BEAMSRC"] == "calibrator-fit" and h0["BEAMNFIT"] == 1
        assert h0["BMAJ"] * 60 == pytest.approx(CAL_FEED_FWHM30 * 30.0 / f0, rel=1e-6)
        assert h0["BMIN"] == h0["BMAJ"] and h0["BPA"] == 0.0
        # band 3 has none: the nominal 4.5′ at 30 GHz
        assert h3["BEAMSRC"] == "nominal"
        assert h3["BMAJ"] * 60 == pytest.approx(4.5 * 30.0 / f3, rel=1e-6)
        for h, f in ((h0, f0), (h3, f3)):
            assert h["BUNIT"] == "K"
            assert h["TEMPSCAL"] == "Rayleigh-Jeans main-beam brightness temperature"
            assert h["JYKREF"] == pytest.approx(h["FREQ"])
            assert h["JYPERK"] == pytest.approx(independent_jy_per_k(f, h["BMAJ"]), rel=1e-9)
            # calibration='model': 2 % scatter over 4 calibrator observations, and Tau A's 3 %
            assert h["CALERRST"] == pytest.approx(FIT_RMS / math.sqrt(N_CAL_OBS))
            assert h["CALERR"] == pytest.approx(math.hypot(FIT_RMS / math.sqrt(N_CAL_OBS), 0.03))
        table = band0["OBSLIST"].data
        got = {
            (int(r["OBSID"]), int(r["FEED"]), int(r["SCAN"])): (
                r["MJDSTART"],
                r["MJDSTOP"],
                int(r["NSAMPLE"]),
            )
            for r in table
        }
        assert set(table["BAND"]) == {0}
        assert len(table) == h0["NSEGMENT"]
        truth = level2_segments(products)
        assert set(got) <= set(truth) and len(got) >= 1
        for key, value in got.items():
            assert value == pytest.approx(truth[key], abs=1e-9)
        assert sorted({int(o) for o in table["OBSID"]}) == [81001]
        assert h0["MJD-OBS"] == pytest.approx(table["MJDSTART"].min(), abs=1e-9)
        assert h0["MJD-END"] == pytest.approx(table["MJDSTOP"].max(), abs=1e-9)


def test_cubes_carry_rest_frequencies_common_beam_and_obslist(products):
    out = products.root / "cubes"
    with fits.open(out / "fld_stackH58a-H62a.fits") as stack, fits.open(out / "one_H62a.fits") as one:
        assert [h.name for h in stack] == ["LINE", "RMS", "HITS", "CONTINUUM", "MASK", "OBSLIST"]
        h = stack[0].header
        assert h["NLINES"] == 5
        assert [h[f"LINE{k}"] for k in range(1, 6)] == H_ALPHA
        for k, name in enumerate(H_ALPHA, start=1):
            assert h[f"RESTF{k}"] == pytest.approx(line_frequency_ghz(name) * 1e9)
        assert h["RESTFRQ"] == pytest.approx(line_frequency_ghz("H58a") * 1e9)
        # the common beam is H62α's (band 0, where the database has a 4.8′ fit at 30 GHz)
        assert h["BEAMSRC"] == "common"
        f62 = line_frequency_ghz("H62a")
        assert h["BMAJ"] * 60 == pytest.approx(CAL_FEED_FWHM30 * 30.0 / f62, rel=1e-6)
        assert h["BMAJ1"] * 60 == pytest.approx(4.5 * 30.0 / line_frequency_ghz("H58a"), rel=1e-6)
        assert h["JYKIDX"] == 2.0
        for k, name in enumerate(H_ALPHA, start=1):
            f = line_frequency_ghz(name)
            assert h[f"JYPERK{k}"] == pytest.approx(independent_jy_per_k(f, h["BMAJ"]), rel=1e-9)
        assert "common beam of" in products.log
        # the single line: its own beam, no smoothing
        h1 = one[0].header
        assert h1["BEAMSRC"] == "calibrator-fit" and h1["NLINES"] == 1
        assert h1["BMAJ"] == pytest.approx(h["BMAJ"])
        assert h1["JYPERK"] == pytest.approx(independent_jy_per_k(f62, h1["BMAJ"]), rel=1e-9)
        assert h1["TEMPSCAL"] == "Rayleigh-Jeans main-beam brightness temperature"
        table = stack["OBSLIST"].data
        truth = level2_segments(products)
        segs = {(int(r["OBSID"]), int(r["FEED"]), int(r["SCAN"])) for r in table}
        assert segs and segs <= set(truth)
        assert set(int(b) for b in table["BAND"]) == {0, 1, 2, 3}  # H62a, H61/60a, H59a, H58a
        assert h["NSEGMENT"] == len(segs)
        for r in table:
            key = (int(r["OBSID"]), int(r["FEED"]), int(r["SCAN"]))
            assert (r["MJDSTART"], r["MJDSTOP"], int(r["NSAMPLE"])) == pytest.approx(truth[key], abs=1e-9)


def test_difference_map_carries_the_segments_of_both_halves(tmp_path):
    from modules.MapMaking.fits_metadata import SegmentRecord
    from modules.MapMaking.fits_output import MapInfo, write_difference_map, write_map_fits

    geometry = small_geometry()
    rng = np.random.default_rng(2)
    paths = []
    for half, scans in (("A", (0, 2)), ("B", (1, 3))):
        segments = [
            SegmentRecord(7, 1, 0, s, 61000.0 + s / 100, 61000.0 + (s + 0.5) / 100, 500) for s in scans
        ]
        info = MapInfo("X", 0, 0, [1], [7], 61000.0, 61000.1, 27e9, 1e9, 2, 1000, segments=segments)
        image = rng.standard_normal(geometry.shape)
        paths.append(
            write_map_fits(
                tmp_path / f"{half}.fits",
                geometry,
                destriped=image,
                naive=image,
                hits=np.full(geometry.shape, 10),
                weights=np.full(geometry.shape, 100.0),
                info=info,
                params={},
                config_sha="x",
            )
        )
    out = write_difference_map(paths[0], paths[1], tmp_path / "diff.fits")
    with fits.open(out) as hdul:
        assert [h.name for h in hdul][-1] == "OBSLIST"
        assert sorted(int(s) for s in hdul["OBSLIST"].data["SCAN"]) == [0, 1, 2, 3]
        with fits.open(paths[0]) as a:
            assert a[0].header["MJD-OBS"] == pytest.approx(61000.0)
            assert a[0].header["MJD-END"] == pytest.approx(61000.025)
