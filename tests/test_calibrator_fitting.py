"""CalibratorFitting (docs/level2.md#calibratorfitting) and its fitting core in utils.calibrators.

Truth tests run the module on level-2 files whose pointing comes from simulated calibrator
observations (CreateLevel2File on a simulator level-1 file) and whose binned TOD is synthesised in
the test from the simulator's truth: the model flux at the bin's central frequency, converted to a
peak with ``point_source_peak_k``, a circular Gaussian beam in the distance of each sample from the
source, plus white noise at the bin's radiometer level (``truth/noise/radiometer_sigma_k`` combined
over the bin's channels). Tolerances are derived from that noise through the Fisher matrix of the
fitted model, computed here independently of the code (numerical derivatives, flat-sky offsets).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import LEVEL2_THROUGH_NOISE_STATS

from modules.pipeline_control.provenance import is_complete
from modules.pipeline_control.streaming import ObservationContext, observation
from modules.ProcessLevel2.CalibratorFitting import CalibratorFitting
from modules.ProcessLevel2.CalibratorFitting._helpers import (
    off_source_noise_k,
    raster_az_corrected_radec,
)
from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File
from modules.SQLModule.SQLModule import COMAPData, db
from utils import calibrators as cal
from utils.coordinates import angular_separation_deg, icrs_to_azel
from utils.errors import BadCOMAPFile
from utils.simulator import ObservationSpec, ScanSpec, SkySpec, simulate_observation

N_BIN = 2
ARCSEC = 1.0 / 3600.0


# --------------------------------------------------------------------------------------------------
# Fixtures: simulated pointing + level-2 skeletons (made once per module)
# --------------------------------------------------------------------------------------------------
def _build(tmp_root: Path, spec: ObservationSpec) -> dict:
    l1 = simulate_observation(spec, tmp_root / "level1", seed=3)
    with h5py.File(l1, "r") as f:
        attrs = dict(f["comap"].attrs)
    fi = COMAPData(
        obsid=spec.obsid,
        level1_path=str(l1),
        source=str(attrs["source"]),
        source_group="Calibrator",
        utc_start=str(attrs["utc_start"]),
    )
    base = tmp_root / f"base_{spec.obsid}.hd5"
    fi.level2_path = str(base)
    CreateLevel2File(output_dir=str(tmp_root)).run(fi)
    return {"l1": Path(l1), "base": base, "fields": fi.to_dict()}


@pytest.fixture(scope="module")
def taua(tmp_path_factory) -> dict:
    """A short Tau A Lissajous observation: feeds 1 (boresight) and 2 (12′ off), 8 channels."""
    spec = ObservationSpec(
        obsid=91001,
        source="TauA",
        hour_angle_h=-1.0,
        feeds=[1, 2, 20],
        n_channels=8,
        scan=ScanSpec(kind="lissajous", duration_s=100.0),
        sky=SkySpec(kind="taua"),
    )
    return _build(tmp_path_factory.mktemp("taua"), spec)


@pytest.fixture(scope="module")
def jupiter(tmp_path_factory) -> dict:
    spec = ObservationSpec(
        obsid=91002,
        source="Jupiter",
        hour_angle_h=-1.0,
        feeds=[1, 2, 20],
        n_channels=8,
        scan=ScanSpec(kind="lissajous"),  # 150 s: a 60 s pattern never crosses the peak (>2′ away)
        sky=SkySpec(kind="jupiter"),
    )
    return _build(tmp_path_factory.mktemp("jupiter"), spec)


def _file_info(obs: dict, path: Path, **changes) -> COMAPData:
    fi = COMAPData(**{**obs["fields"], **changes})
    fi.level2_path = str(path)
    return fi


def _jupiter_azel_interpolator(mjd: np.ndarray):
    """Jupiter's topocentric az/el from a 60 s ephemeris grid and cubic splines (as
    docs/simulator.md#pointing)."""
    from scipy.interpolate import CubicSpline

    grid = np.arange(mjd.min() - 120 / 86400, mjd.max() + 180 / 86400, 60 / 86400)
    az, el, _ = cal.jupiter_azel(grid)
    s_az = CubicSpline(grid, np.degrees(np.unwrap(np.radians(az))))
    s_el = CubicSpline(grid, el)
    return lambda m: (s_az(m) % 360.0, s_el(m))


def synthesise(obs: dict, dst: Path, *, seed: int = 7, edit=None, azel_offset_arcsec=None) -> dict:
    """Copy the level-2 skeleton to ``dst`` and add scan_edges, central_freqs and binned TOD.

    ``edit(truth, tod)`` may modify the TOD ``(F, B, K, N)`` in place before it is written.
    ``azel_offset_arcsec = (Δxel, Δel)`` displaces the (fixed) source in the horizontal frame, as a
    pointing error would: distances are then computed in az/el from the displaced position.
    Returns the truth used: frequencies, fluxes, peaks, beam σ, noise, distances per feed.
    """
    shutil.copyfile(obs["base"], dst)
    rng = np.random.default_rng(seed)
    with h5py.File(obs["l1"], "r") as f1, h5py.File(dst, "a") as l2:
        edges = f1["truth/scans/edges"][...]
        freq = f1["spectrometer/frequency"][...]
        n_band, n_chan = freq.shape
        l1_feeds = list(f1["spectrometer/feeds"][...])
        feeds = l2["spectrometer/feeds"][...]
        mjd = l2["spectrometer/MJD"][...]
        cattrs = f1["truth/calibrator"].attrs
        name, mjd_mid = str(cattrs["name"]), float(cattrs["mjd_mid"])
        sigma_chan = f1["truth/noise/radiometer_sigma_k"][...]
        n_feed, n_tod = len(feeds), len(mjd)
        # Bins: consecutive channels in storage order; weights = inverse radiometer variance.
        cf = np.empty((n_feed, n_band, N_BIN))
        noise = np.empty((n_feed, n_band, N_BIN))
        for i, feed in enumerate(feeds):
            s2 = sigma_chan[l1_feeds.index(feed)].reshape(n_band, N_BIN, -1) ** 2
            w = 1.0 / s2
            cf[i] = (w * freq.reshape(n_band, N_BIN, -1)).sum(-1) / w.sum(-1)
            noise[i] = 1.0 / np.sqrt(w.sum(-1))
        if name == "Jupiter":
            flux = cal.jupiter_flux_jy(cf, float(cattrs["distance_au"]))
            azel = _jupiter_azel_interpolator(mjd[edges.min() : edges.max()])
        else:
            flux = cal.flux_jy(name, cf, mjd_mid)
        peak = cal.point_source_peak_k(flux, cf)
        sigma_b = cal.beam_fwhm_arcmin(cf) / 60.0 * cal.FWHM_TO_SIGMA
        tod = np.full((n_feed, n_band, N_BIN, n_tod), np.nan, dtype=np.float32)
        dist = np.full((n_feed, n_tod), np.nan)
        pp = l2["spectrometer/pixel_pointing"]
        for i in range(n_feed):
            for a, b in edges:
                if name == "Jupiter":
                    az_j, el_j = azel(mjd[a:b])
                    r = angular_separation_deg(pp["pixel_az"][i, a:b], pp["pixel_el"][i, a:b], az_j, el_j)
                elif azel_offset_arcsec is not None:
                    az_s, el_s = icrs_to_azel(cattrs["ra_deg"], cattrs["dec_deg"], mjd[a:b])
                    el_s = el_s + azel_offset_arcsec[1] / 3600.0
                    az_s = az_s + azel_offset_arcsec[0] / 3600.0 / np.cos(np.radians(el_s))
                    r = angular_separation_deg(pp["pixel_az"][i, a:b], pp["pixel_el"][i, a:b], az_s, el_s)
                else:
                    r = angular_separation_deg(
                        pp["pixel_ra"][i, a:b], pp["pixel_dec"][i, a:b], cattrs["ra_deg"], cattrs["dec_deg"]
                    )
                dist[i, a:b] = r
                signal = peak[i, :, :, None] * np.exp(-0.5 * (r / sigma_b[i, :, :, None]) ** 2)
                tod[i, :, :, a:b] = signal + noise[i, :, :, None] * rng.standard_normal(
                    (n_band, N_BIN, b - a)
                )
        truth = {
            "name": name,
            "feeds": feeds,
            "edges": edges,
            "central_freqs": cf,
            "flux": flux,
            "peak": peak,
            "sigma_b": sigma_b,
            "noise": noise,
            "dist": dist,
            "mjd_mid": mjd_mid,
            "ra_dec": (
                l2["spectrometer/pixel_pointing/pixel_ra"][...],
                l2["spectrometer/pixel_pointing/pixel_dec"][...],
            ),
            "source_radec": (float(cattrs["ra_deg"]), float(cattrs["dec_deg"])),
        }
        if edit is not None:
            edit(truth, tod)
        l2.create_dataset("level2/scan_edges", data=edges.astype(np.int64))
        l2.create_dataset("level2/central_freqs", data=cf)
        l2.create_dataset("level2/binned_filtered_data", data=tod, chunks=(1, 1, 1, n_tod))
    return truth


def run_module(fi: COMAPData, **params):
    """Run CalibratorFitting in an observation context; return (context summary, deferred DB ops)."""
    ctx = ObservationContext(fi)
    with observation(ctx), db.deferring() as ops:
        CalibratorFitting(**params).run(fi)
    return ctx.summary, list(ops)


def read_group(path: Path, group: str = "level2/calibrator_fit") -> dict:
    with h5py.File(path, "r") as l2:
        g = l2[group]
        out = {k: g[k][...] for k in g if isinstance(g[k], h5py.Dataset)}
        out["per_scan"] = {k: g["per_scan"][k][...] for k in g["per_scan"]}
        out["attrs"] = dict(g.attrs)
        out["complete"] = is_complete(l2, group)
    return out


def fisher_prediction(truth: dict, i: int, b: int, j: int, fit_radius_deg: float = 0.25) -> dict:
    """1σ errors of ln S, A, σ and the centre predicted from the noise (Fisher matrix).

    Model: A·exp(−½(r/σ)²) with independent σx, σy, centre (x0, y0) and a plane background, on the
    samples of feed i within the fit radius; x, y are flat-sky offsets (error ~1e-4 relative at
    0.25°). The derivatives are central differences, independent of the code's analytic Jacobian.
    """
    ra, dec = truth["ra_dec"]
    ra0, dec0 = truth["source_radec"]
    sel = np.isfinite(truth["dist"][i]) & (truth["dist"][i] < fit_radius_deg)
    x = ((ra[i, sel] - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0))
    y = dec[i, sel] - dec0
    if truth["name"] == "Jupiter":  # offsets in the moving source's frame: use the true distances
        r = truth["dist"][i, sel]
        ang = np.arctan2(y, x)
        x, y = r * np.cos(ang), r * np.sin(ang)
    a, s = truth["peak"][i, b, j], truth["sigma_b"][i, b, j]
    p0 = np.array([a, 0.0, 0.0, s, s, 0.0, 0.0, 0.0])

    def model(p):
        return (
            p[0] * np.exp(-0.5 * (((x - p[1]) / p[3]) ** 2 + ((y - p[2]) / p[4]) ** 2))
            + p[5]
            + p[6] * x
            + p[7] * y
        )

    steps = np.array([a, s, s, s, s, a, a, a]) * 1e-5
    jac = np.stack(
        [(model(p0 + h * e) - model(p0 - h * e)) / (2 * h) for h, e in zip(steps, np.eye(8))], axis=1
    )
    cov = np.linalg.inv(jac.T @ jac) * truth["noise"][i, b, j] ** 2
    g = np.array([1 / a, 0, 0, 1 / s, 1 / s, 0, 0, 0])
    return {
        "ln_flux": float(np.sqrt(g @ cov @ g)),
        "amplitude": float(np.sqrt(cov[0, 0])),
        "sigma_x": float(np.sqrt(cov[3, 3])),
        "sigma_y": float(np.sqrt(cov[4, 4])),
        "x0": float(np.sqrt(cov[1, 1])),
        "y0": float(np.sqrt(cov[2, 2])),
    }


# --------------------------------------------------------------------------------------------------
# Core functions
# --------------------------------------------------------------------------------------------------
def test_tangent_plane_offsets_round_trip_and_distance():
    rng = np.random.default_rng(1)
    ra0, dec0 = 83.633083, 22.0145
    ra = ra0 + rng.uniform(-1, 1, 500)
    dec = dec0 + rng.uniform(-1, 1, 500)
    x, y = cal.tangent_plane_offsets_deg(ra, dec, ra0, dec0)
    # gnomonic: the radial coordinate is tan(c) of the true angular distance c
    c = np.radians(angular_separation_deg(ra, dec, ra0, dec0))
    np.testing.assert_allclose(np.radians(np.hypot(x, y)), np.tan(c), rtol=1e-9, atol=1e-15)
    # east (increasing RA) is +x, north is +y
    assert cal.tangent_plane_offsets_deg(ra0 + 0.1, dec0, ra0, dec0)[0] > 0
    assert cal.tangent_plane_offsets_deg(ra0, dec0 + 0.1, ra0, dec0)[1] > 0
    ra2, dec2 = cal.tangent_plane_to_icrs_deg(x, y, ra0, dec0)
    np.testing.assert_allclose(ra2, ra, atol=1e-10)
    np.testing.assert_allclose(dec2, dec, atol=1e-10)
    # across RA = 0 and for a per-sample (moving) centre
    x, y = cal.tangent_plane_offsets_deg(np.array([0.05, 359.95]), 10.0, np.array([359.99, 0.01]), 10.0)
    np.testing.assert_allclose(x, [0.06 * np.cos(np.radians(10)), -0.06 * np.cos(np.radians(10))], rtol=1e-4)


def test_fit_core_recovers_a_rotated_elliptical_source():
    """σx = 1.4σ_b, σy = 0.8σ_b, θ = 30°, offset centre, plane background; 5σ (Fisher) tolerances."""
    rng = np.random.default_rng(5)
    sb = 4.5 / 60 * cal.FWHM_TO_SIGMA
    x, y = rng.uniform(-0.25, 0.25, (2, 6000))
    truth = np.array([1.5, 0.02, -0.01, 1.4 * sb, 0.8 * sb, np.radians(30.0), 0.3, 0.2, -0.1])
    noise = 0.02
    data = cal.gaussian_source_model(truth, x, y, background="plane", fit_rotation=True)
    data = data + noise * rng.standard_normal(x.size)
    fit = cal.fit_gaussian_source(x, y, data, noise, sb, fit_rotation=True)
    assert fit.fit_ok, fit.reason
    # Independent error prediction: numerical Fisher matrix on the samples inside the radius.
    sel = np.hypot(x, y) < 0.25
    steps = np.abs(truth) * 1e-6 + 1e-9

    def model(p):
        return cal.gaussian_source_model(p, x[sel], y[sel], background="plane", fit_rotation=True)

    jac = np.stack(
        [(model(truth + h * e) - model(truth - h * e)) / (2 * h) for h, e in zip(steps, np.eye(9))], 1
    )
    err = np.sqrt(np.diag(np.linalg.inv(jac.T @ jac))) * noise
    got = [
        fit.amplitude_k,
        fit.x0_deg,
        fit.y0_deg,
        fit.sigma_x_deg,
        fit.sigma_y_deg,
        np.radians(fit.position_angle_deg),
    ]
    for k, value in enumerate(got):
        assert abs(value - truth[k]) < 5 * err[k], (k, value, truth[k], err[k])
    for k in (7, 8):  # plane slopes (c0 absorbs the subtracted region median)
        assert abs(fit.background[k - 6] - truth[k]) < 5 * err[k]
    # the code's errors agree with the independent prediction (χ²_red ≈ 1)
    code_err = [
        fit.amplitude_error_k,
        fit.x0_error_deg,
        fit.y0_error_deg,
        fit.sigma_x_error_deg,
        fit.sigma_y_error_deg,
    ]
    np.testing.assert_allclose(code_err, err[:5], rtol=0.1)
    assert fit.chi2_reduced == pytest.approx(1.0, abs=5 * np.sqrt(2 / sel.sum()))


def test_fit_core_rejections_give_nan():
    rng = np.random.default_rng(2)
    sb = 4.5 / 60 * cal.FWHM_TO_SIGMA
    x, y = rng.uniform(-0.3, 0.3, (2, 4000))
    gauss = np.exp(-0.5 * (x**2 + y**2) / sb**2)
    cases = {
        "too wide": 2.0 * np.exp(-0.5 * (x**2 + y**2) / (6 * sb) ** 2),  # σ would exceed 3σ_b
        "negative": -2.0 * gauss,
        "all NaN": np.full(x.size, np.nan),
    }
    for label, signal in cases.items():
        fit = cal.fit_gaussian_source(x, y, signal + 0.01 * rng.standard_normal(x.size), 0.01, sb)
        assert not fit.fit_ok, label
        assert fit.reason, label
        assert np.isnan([fit.amplitude_k, fit.sigma_x_deg, fit.x0_deg, fit.amplitude_error_k]).all(), label
        assert np.isnan(fit.flux_jy(30.0)).all()
    assert "bound active on sigma" in cal.fit_gaussian_source(x, y, cases["too wide"], 0.01, sb).reason
    assert "samples" in cal.fit_gaussian_source(x, y, cases["all NaN"], 0.01, sb).reason


def test_off_source_noise_uses_pairs_away_from_the_source():
    rng = np.random.default_rng(3)
    n = 4000
    r = np.abs(np.linspace(-0.3, 0.3, n))  # a raster-like sweep through the source
    sb = 0.03
    noise = 0.01
    data = 50.0 * np.exp(-0.5 * (r / sb) ** 2) + noise * rng.standard_normal(n)
    est = off_source_noise_k(data, r, sb, 0.25)
    # ring 4σ_b < r < 0.25 holds ~2600 samples → ~1300 pairs; rms precision sqrt(1/(2·1300)) ≈ 2 %
    assert est == pytest.approx(noise, rel=0.1)
    # With too few ring pairs the whole segment is used: still the white level (clipping removes
    # the steep source gradient only partly, so allow for a modest excess).
    tiny = off_source_noise_k(data[:200], r[:200], sb, 0.25)
    assert tiny == pytest.approx(noise, rel=0.25)


def test_raster_az_correction_moves_only_positive_rate_samples():
    mjd = 61100.0 + np.arange(400) * 0.02 / 86400
    az = 180.0 + 0.5 * np.sin(2 * np.pi * np.arange(400) / 200)  # back and forth
    el = np.full(400, 50.0)
    from utils.coordinates import azel_to_icrs

    ra0, dec0 = azel_to_icrs(az, el, mjd)
    ra1, dec1 = raster_az_corrected_radec(az, el, mjd, 100.0)
    moved = angular_separation_deg(ra0, dec0, ra1, dec1)
    rate = np.gradient(az)
    clear = np.abs(rate) > 1e-6  # leave out the turning points, where the rate's sign is moot
    np.testing.assert_allclose(moved[clear & (rate > 0)], 100.0 / 3600 * np.cos(np.radians(50.0)), rtol=1e-3)
    np.testing.assert_array_equal(moved[clear & (rate < 0)], 0.0)


# --------------------------------------------------------------------------------------------------
# The module on synthetic level-2 data
# --------------------------------------------------------------------------------------------------
def test_taua_truth_recovery_outputs_and_database(taua, tmp_path, caplog):
    dst = tmp_path / "taua.hd5"
    truth = synthesise(taua, dst)
    fi = _file_info(taua, dst)
    plot_dir = tmp_path / "plots"
    summary, ops = run_module(fi, plot=True, plot_dir=str(plot_dir))
    out = read_group(dst)
    assert out["complete"]
    assert out["attrs"]["source"] == "TauA"
    assert out["attrs"]["ra_deg"] == pytest.approx(83.633083)
    n_feed, n_band, n_bin = truth["central_freqs"].shape
    assert out["flux"].shape == (n_feed, n_band, n_bin)
    assert out["per_scan"]["flux"].shape == (n_feed, n_band, n_bin, len(truth["edges"]))
    assert out["fit_ok"].all() and (out["n_scans_used"] == len(truth["edges"])).all()

    ratios = []
    for i in range(n_feed):
        for b in range(n_band):
            for j in range(n_bin):
                pred = fisher_prediction(truth, i, b, j)
                ratio = out["flux"][i, b, j] / truth["flux"][i, b, j]
                ratios.append(ratio)
                # noise-derived tolerance (5σ of ln S) and the spec's 3 %
                assert abs(ratio - 1) < min(5 * pred["ln_flux"], 0.03), (i, b, j, ratio, pred)
                for name in ("sigma_x", "sigma_y"):
                    dev = out[name][i, b, j] - truth["sigma_b"][i, b, j]
                    assert abs(dev) < min(5 * pred[name], 0.05 * truth["sigma_b"][i, b, j]), (name, i, b, j)
                for name, key in (("x_offset", "x0"), ("y_offset", "y0")):
                    assert abs(out[name][i, b, j]) < min(5 * pred[key], 6 * ARCSEC), (name, i, b, j)
                for name in ("az_offset", "el_offset"):
                    assert abs(out[name][i, b, j]) < 6 * ARCSEC
                # the code's errors agree with the noise prediction (σ_n is estimated from ~300
                # pairs per scan, ±4 %, and errors are scaled up when χ²_red > 1)
                assert out["amplitude_error"][i, b, j] == pytest.approx(pred["amplitude"], rel=0.2)
                rel_error = out["flux_error"][i, b, j] / out["flux"][i, b, j]
                assert rel_error == pytest.approx(pred["ln_flux"], rel=0.2)
    ratios = np.array(ratios)
    print(f"TauA flux/truth: median {np.median(ratios):.5f}, min {ratios.min():.5f}, max {ratios.max():.5f}")
    np.testing.assert_allclose(out["model_flux"], truth["flux"], rtol=1e-6)
    np.testing.assert_allclose(out["frequency_ghz"], truth["central_freqs"], rtol=1e-6)
    # Regression (bands stored in descending frequency): bin 0 of bands 0 and 2 is the higher one.
    assert (out["frequency_ghz"][:, [0, 2], 0] > out["frequency_ghz"][:, [0, 2], 1]).all()
    assert (out["frequency_ghz"][:, [1, 3], 0] < out["frequency_ghz"][:, [1, 3], 1]).all()
    # χ² uses the estimated σ_n: χ²_red·σ_n²/σ_true² is the truth χ²_red, 1 ± sqrt(2/(n − p))
    ps = out["per_scan"]
    chi2_true = ps["chi2_reduced"] * ps["noise_k"] ** 2 / truth["noise"][..., None] ** 2
    assert np.all(np.abs(chi2_true - 1) < 5 * np.sqrt(2.0 / (ps["n_samples"] - 8)))
    # σ_n from the off-source pairs matches the injected noise within its precision (~sqrt(1/n_pairs))
    assert np.all(
        np.abs(ps["noise_k"] / truth["noise"][..., None] - 1) < 5 * np.sqrt(1.0 / (0.2 * ps["n_samples"]))
    )

    # DB: one calibration_flux row per (feed, band, bin), keyed by feed NUMBER
    assert [op.name for op in ops] == ["replace_calibration_flux"]
    obsid, rows = ops[0].args
    assert obsid == 91001 and len(rows) == n_feed * n_band * n_bin
    feeds = list(truth["feeds"])
    for row in rows:
        i = feeds.index(row["feed"])
        k = (i, row["band"], row["channel"])
        assert row["source"] == "TauA"
        assert row["frequency_ghz"] == pytest.approx(truth["central_freqs"][k], rel=1e-12)
        assert row["measured_flux"] == pytest.approx(out["flux"][k], rel=1e-6)
        assert row["chi2"] == pytest.approx(out["chi2_reduced"][k], rel=1e-6)
        assert row["mjd"] == pytest.approx(truth["mjd_mid"], abs=60 / 86400)
    assert summary["calibrator_flux"] == pytest.approx(np.median(out["flux"]), rel=1e-6)
    assert summary["calibrator_chi2"] == pytest.approx(np.median(out["chi2_reduced"]), rel=1e-6)
    assert (
        abs(summary["pointing_offset_az"]) < 6 * ARCSEC and abs(summary["pointing_offset_dec"]) < 6 * ARCSEC
    )
    pngs = sorted(plot_dir.glob("*.png"))
    assert len(pngs) == n_feed * len(truth["edges"])

    # done-check; non-default group name is honoured
    mod = CalibratorFitting()
    assert mod.already_processed(fi)
    assert not mod.already_processed(fi, overwrite=True)
    other = CalibratorFitting(calibrator_fit_group_name="calfit_b", background="constant")
    assert not other.already_processed(fi)
    run_module(fi, calibrator_fit_group_name="calfit_b", background="constant")
    assert other.already_processed(fi)
    out_b = read_group(dst, "level2/calfit_b")
    np.testing.assert_allclose(out_b["flux"], truth["flux"], rtol=0.03)


def test_failed_fits_are_nan_and_not_in_the_database(taua, tmp_path, caplog):
    def edit(truth, tod):
        i, (a, b) = 1, truth["edges"][0]
        tod[i, 1, 0, :] = np.nan  # no data: too few samples
        r = truth["dist"][i, a:b]
        wide = 6.0 * truth["sigma_b"][i, 3, 1]  # too wide: the width bound is active
        tod[i, 3, 1, a:b] = truth["peak"][i, 3, 1] * np.exp(-0.5 * (r / wide) ** 2)
        tod[i, 3, 1, a:b] += truth["noise"][i, 3, 1] * np.random.default_rng(1).standard_normal(b - a)
        tod[i, 2, 0, a:b] = -tod[i, 2, 0, a:b]  # a negative source: A > 0 cannot be met

    dst = tmp_path / "bad.hd5"
    truth = synthesise(taua, dst, edit=edit)
    summary, ops = run_module(_file_info(taua, dst))
    out = read_group(dst)
    bad = [(1, 1, 0), (1, 3, 1), (1, 2, 0)]
    for k in bad:
        assert not out["fit_ok"][k] and out["n_scans_used"][k] == 0
        for name in ("flux", "flux_error", "amplitude", "sigma_x", "x_offset", "az_offset", "chi2_reduced"):
            assert np.isnan(out[name][k]), (name, k)
        assert not out["per_scan"]["fit_ok"][k].any()
        assert np.isnan(out["per_scan"]["flux"][k]).all()
        assert np.isfinite(out["model_flux"][k]) and np.isfinite(out["frequency_ghz"][k])
    assert out["fit_ok"].sum() == out["fit_ok"].size - len(bad)
    rows = ops[0].args[1]
    feeds = list(truth["feeds"])
    keys = {(feeds.index(r["feed"]), r["band"], r["channel"]) for r in rows}
    assert len(rows) == out["fit_ok"].size - len(bad) and not keys & set(bad)
    # medians over successful fits only
    assert summary["calibrator_flux"] == pytest.approx(np.median(out["flux"][out["fit_ok"]]), rel=1e-6)


def test_all_fits_failing_is_a_warning_not_a_failure(taua, tmp_path, caplog):
    dst = tmp_path / "nan.hd5"
    synthesise(taua, dst, edit=lambda truth, tod: tod.fill(np.nan))
    with caplog.at_level(logging.WARNING, logger="comap.CalibratorFitting"):
        summary, ops = run_module(_file_info(taua, dst))
    assert "no calibrator fit succeeded" in caplog.text
    out = read_group(dst)
    assert out["complete"] and not out["fit_ok"].any() and np.isnan(out["flux"]).all()
    assert ops[0].name == "replace_calibration_flux" and ops[0].args[1] == []
    assert summary["calibrator_flux"] is None and summary["pointing_offset_az"] is None


def test_jupiter_flux_without_network(jupiter, tmp_path):
    """Jupiter: the module's ICRS track (ephemeris → AltAz → ICRS) against AltAz distances."""
    dst = tmp_path / "jupiter.hd5"
    truth = synthesise(jupiter, dst)
    _, ops = run_module(_file_info(jupiter, dst))
    out = read_group(dst)
    assert out["fit_ok"].all()
    ratio = out["flux"] / truth["flux"]
    n_feed, n_band, n_bin = ratio.shape
    for k in np.ndindex(ratio.shape):
        pred = fisher_prediction(truth, *k)
        assert abs(ratio[k] - 1) < min(5 * pred["ln_flux"], 0.03), (k, ratio[k], pred)
    print(f"Jupiter flux/truth: median {np.median(ratio):.5f}, range {ratio.min():.5f}–{ratio.max():.5f}")
    assert np.abs(out["x_offset"]).max() < 6 * ARCSEC and np.abs(out["y_offset"]).max() < 6 * ARCSEC
    np.testing.assert_allclose(out["model_flux"], truth["flux"], rtol=1e-4)  # distance at the fit's mid-time
    assert ops[0].args[1][0]["source"] == "Jupiter"


def test_pointing_offsets_in_azimuth_and_elevation(taua, tmp_path):
    """A source displaced by (Δxel, Δel) = (+30″, −20″) in the horizontal frame is found there.

    Over the 100 s scan the parallactic angle changes by < 1°, which smears a 36″ offset by < 0.6″
    in the equatorial tangent plane; the tolerance is 5σ of the reported errors plus that 0.6″.
    """
    dxel, delev = 30.0, -20.0
    dst = tmp_path / "offset.hd5"
    synthesise(taua, dst, azel_offset_arcsec=(dxel, delev))
    summary, _ = run_module(_file_info(taua, dst))
    out = read_group(dst)
    assert out["fit_ok"].all()
    for name, truth in (("az_offset", dxel), ("el_offset", delev)):
        dev = np.abs(out[name] * 3600 - truth)
        assert np.all(dev < 5 * out[f"{name}_error"] * 3600 + 0.6), (name, dev.max())
    # the equatorial offsets are the same displacement, rotated by the parallactic angle
    np.testing.assert_allclose(
        np.hypot(out["x_offset"], out["y_offset"]) * 3600, np.hypot(dxel, delev), atol=1.0
    )
    # errors propagated through the rotation keep the size of the equatorial errors
    rot = np.hypot(out["az_offset_error"], out["el_offset_error"]) / np.hypot(
        out["x_offset_error"], out["y_offset_error"]
    )
    np.testing.assert_allclose(rot, 1.0, rtol=1e-3)
    print(
        f"injected (Δxel, Δel) = ({dxel}, {delev})″: recovered median "
        f"({summary['pointing_offset_az'] * 3600:.2f}, {summary['pointing_offset_el'] * 3600:.2f})″"
    )
    assert summary["pointing_offset_az"] * 3600 == pytest.approx(dxel, abs=1.0)
    assert summary["pointing_offset_el"] * 3600 == pytest.approx(delev, abs=1.0)


def test_legacy_raster_correction_only_for_early_obsids(taua, tmp_path):
    dst = tmp_path / "legacy.hd5"
    synthesise(taua, dst)
    run_module(_file_info(taua, dst))
    modern = read_group(dst)
    run_module(_file_info(taua, dst, obsid=20000), overwrite=True)  # obsid < 28852: correction applied
    early = read_group(dst)
    assert CalibratorFitting().already_processed(_file_info(taua, dst))
    shift = np.abs(early["x_offset"] - modern["x_offset"]) + np.abs(early["y_offset"] - modern["y_offset"])
    assert np.all(shift[early["fit_ok"]] > 5 * ARCSEC)  # half the samples moved by 100″ in azimuth


def test_non_calibrator_is_done_trivially(taua, tmp_path):
    dst = tmp_path / "field.hd5"
    shutil.copyfile(taua["base"], dst)
    fi = _file_info(taua, dst, source="GField30", source_group="Galactic")
    mod = CalibratorFitting()
    assert mod.already_processed(fi)
    _, ops = run_module(fi)
    assert ops == []
    with h5py.File(dst, "r") as l2:
        assert "level2/calibrator_fit" not in l2


def test_unsupported_calibrator_writes_an_empty_complete_group(taua, tmp_path, caplog):
    dst = tmp_path / "venus.hd5"
    shutil.copyfile(taua["base"], dst)
    fi = _file_info(taua, dst, source="Venus")
    mod = CalibratorFitting()
    assert not mod.already_processed(fi)
    with caplog.at_level(logging.WARNING, logger="comap.CalibratorFitting"):
        _, ops = run_module(fi)
    assert "'Venus' is not supported" in caplog.text
    with h5py.File(dst, "r") as l2:
        g = l2["level2/calibrator_fit"]
        assert is_complete(l2, "level2/calibrator_fit")
        assert "Venus" in g.attrs["skipped_reason"] and len(g) == 0
    assert mod.already_processed(fi)
    assert ops[0].name == "replace_calibration_flux" and ops[0].args[1] == []


def test_bad_inputs_raise_one_line_bad_file(taua, tmp_path):
    dst = tmp_path / "noscans.hd5"
    synthesise(taua, dst)
    with h5py.File(dst, "a") as l2:
        del l2["level2/scan_edges"]
        l2.create_dataset("level2/scan_edges", data=np.zeros((0, 2), dtype=np.int64))
    with pytest.raises(BadCOMAPFile, match=r"^calibrator observation has no scans$"):
        run_module(_file_info(taua, dst))
    with h5py.File(dst, "a") as l2:
        del l2["level2/scan_edges"]
        l2.create_dataset("level2/scan_edges", data=np.array([[100, 2000]], dtype=np.int64))
        del l2["level2/binned_filtered_data"]
    with pytest.raises(BadCOMAPFile, match="no level2/binned_filtered_data"):
        run_module(_file_info(taua, dst))
    with h5py.File(dst, "a") as l2:
        l2.create_dataset("level2/binned_filtered_data", data=np.zeros((1, 4, 2, 10), dtype=np.float32))
    with pytest.raises(
        BadCOMAPFile, match=r"binned_filtered_data has shape \(1, 4, 2, 10\) but spectrometer/feeds"
    ):
        run_module(_file_info(taua, dst))


def test_validate_config():
    assert CalibratorFitting.validate_config({}) == []
    problems = CalibratorFitting.validate_config(
        {
            "background": "quadratic",
            "min_width_factor": 2.0,
            "fit_radius_deg": 0,
            "calibrator_fit_group_name": "a/b",
        }
    )
    assert len(problems) == 4


# --------------------------------------------------------------------------------------------------
# End to end through the real upstream stages (docs/level2.md#calibratorfitting truth test)
# --------------------------------------------------------------------------------------------------
UPSTREAM = [
    *LEVEL2_THROUGH_NOISE_STATS,
    "modules.ProcessLevel2.CalibratorFitting.CalibratorFitting.CalibratorFitting()",
    "modules.ProcessLevel2.FinalizeLevel2Metadata.FinalizeLevel2Metadata.FinalizeLevel2Metadata()",
]


def _upstream_available() -> bool:
    """True once every module of the list exists in the tree (an import error then fails the test)."""
    root = Path(__file__).resolve().parents[1]
    return all(
        (root / (call.split("(")[0].rsplit(".", 1)[0].replace(".", "/") + ".py")).is_file()
        for call in UPSTREAM
    )


@pytest.mark.skipif(not _upstream_available(), reason="the upstream level-2 stages have not landed yet")
@pytest.mark.parametrize("atmosphere", [False, True], ids=["atm0", "atm10"])
def test_end_to_end_taua(workspace_factory, tmp_path, atmosphere):
    """test-small Tau A through the real level-2 chain (docs/level2.md#calibratorfitting truth tests).

    ``atm_zenith_k = 0``: the vane gain is unbiased (the vane is taken off-source), so every feed
    and bin is within 3 % of ``truth/calibrator/flux_jy`` averaged over the bin's channels and the
    median within 1.5 %; σx, σy within 5 % of σ_b; offsets < 6″.
    With the atmosphere on, the vane underestimates G, so the flux in vane K exceeds the truth by
    the bin-averaged truth gain ratio gain/gain_expected: flux/truth equals it within 3 %.
    """
    from utils.simulator import PRESETS

    spec = PRESETS["test-small"].observations[0]
    if not atmosphere:
        spec = spec.replace(atm_zenith_k=0.0)
    l1 = simulate_observation(spec, tmp_path / "sim", seed=1)
    ws = workspace_factory([l1])
    ws.write_configs(UPSTREAM, nprocess=1)
    res = ws.run()
    assert res.returncode == 0, res.stdout + res.stderr
    (l2_path,) = ws.level2_files()
    out = read_group(l2_path)
    with h5py.File(l2_path, "r") as l2:
        feeds = list(l2["spectrometer/feeds"][...])
        n_snapshot_rows = len(l2["level2/sql_snapshot/feed"])
    with h5py.File(l1, "r") as f1:
        flux_chan = f1["truth/calibrator/flux_jy"][...]
        l1_feeds = list(f1["spectrometer/feeds"][...])
        gain_ratio = f1["truth/instrument/gain"][...] / f1["truth/vane/gain_expected"][...].mean(axis=0)
    n_band, n_chan = flux_chan.shape
    n_bin = out["flux"].shape[2]
    truth_bin = flux_chan.reshape(n_band, n_bin, n_chan // n_bin).mean(-1)
    expected = np.ones(out["flux"].shape)
    if atmosphere:
        for i, feed in enumerate(feeds):
            expected[i] = gain_ratio[l1_feeds.index(feed)].reshape(n_band, n_bin, -1).mean(-1)
    ratio = out["flux"] / truth_bin[None] / expected
    sigma_b = cal.beam_fwhm_arcmin(out["frequency_ghz"]) / 60 * cal.FWHM_TO_SIGMA
    offset = np.hypot(out["x_offset"], out["y_offset"]) / ARCSEC
    sx, sy = out["sigma_x"] / sigma_b, out["sigma_y"] / sigma_b
    print(
        f"end-to-end TauA ({'atm 10 K' if atmosphere else 'atm 0'}): flux/(truth×expected) median "
        f"{np.median(ratio):.4f}, range {ratio.min():.4f}–{ratio.max():.4f}; expected gain ratio "
        f"{expected.min():.4f}–{expected.max():.4f}; σx/σ_b {sx.min():.4f}–{sx.max():.4f}; "
        f"σy/σ_b {sy.min():.4f}–{sy.max():.4f}; |offset| max {offset.max():.2f}″"
    )
    assert out["fit_ok"].all()
    assert np.all(np.abs(ratio - 1) < 0.03)
    if not atmosphere:
        assert abs(np.median(ratio) - 1) < 0.015
        assert np.all(np.abs(sx - 1) < 0.05) and np.all(np.abs(sy - 1) < 0.05)
        assert np.all(offset < 6)
    db_ = ws.db()
    try:
        rows = db_.query_calibration_flux("TauA")
        assert len(rows) == out["fit_ok"].sum()
        obsid = spec.obsid
        assert len(db_.get_quality_flags(obsid)) == n_snapshot_rows
        summary = db_.get_observation_snapshot(obsid)["summary"]
        assert summary["calibrator_flux"] == pytest.approx(float(np.median(out["flux"])), rel=1e-6)
    finally:
        db_.disconnect()


def test_excluded_samples_do_not_reach_the_calibrator_fit(taua, tmp_path):
    """A burst on 40 samples of feed 1 inside the fit radius but off the beam (r > 4σ_b), raised by 50×
    the peak and flagged 4 (level-1 NaN)
    leaves every fit exactly as the same file without the burst (the flagged samples are missing either
    way) and, within 3σ of its own flux error, as the unflagged file without it (dropping 40 of the
    samples only adds noise). Unflagged, the burst moves feed 1's flux by far more than 3σ, so the test
    can fail."""
    from utils.level2 import FLAG_LEVEL1_NAN

    picked: dict = {}

    def burst(truth, tod):
        d = truth["dist"][0]
        with np.errstate(invalid="ignore"):
            ring = np.flatnonzero((d > 4 * float(truth["sigma_b"][0].max())) & (d < 0.2))
        picked["idx"] = ring[:40]  # inside the fit radius, off the beam: background samples
        tod[0][..., picked["idx"]] += 50 * truth["peak"][0][..., None]

    def fit(name, edit, flagged):
        dst = tmp_path / f"{name}.hd5"
        synthesise(taua, dst, edit=edit)
        if flagged:
            with h5py.File(dst, "a") as l2:
                row = l2["level2/sample_flags"][0]
                row[picked["idx"]] |= FLAG_LEVEL1_NAN
                l2["level2/sample_flags"][0] = row
        run_module(_file_info(taua, dst))
        return read_group(dst)

    spiked_flagged = fit("spiked_flagged", burst, True)
    assert picked["idx"].size == 40
    clean_flagged = fit("clean_flagged", None, True)
    clean = fit("clean", None, False)
    spiked = fit("spiked", burst, False)
    assert spiked_flagged["fit_ok"].all()
    for k in ("flux", "amplitude", "x_offset", "y_offset"):
        np.testing.assert_array_equal(spiked_flagged[k], clean_flagged[k])
    err = clean["flux_error"]
    assert np.all(np.abs(spiked_flagged["flux"] - clean["flux"]) < 3 * err)
    moved = np.abs(np.where(spiked["fit_ok"][0], spiked["flux"][0], np.inf) - clean["flux"][0])
    assert np.all(moved > 3 * err[0])


def test_calibrator_samples_are_flagged_bright_at_the_defaults(taua):
    """CreateLevel2File at its defaults sets flag 16 on exactly the samples within 2.5 beam FWHM
    (11.25′) of Tau A (distance computed here independently), and the attribute names the mask.
    Samples within 0.01′ of the edge are not compared (rounding)."""
    from utils.level2 import FLAG_BRIGHT_SOURCE

    with h5py.File(taua["base"], "r") as l2:
        flags = l2["level2/sample_flags"][...]
        ra = l2["spectrometer/pixel_pointing/pixel_ra"][...]
        dec = l2["spectrometer/pixel_pointing/pixel_dec"][...]
        desc = l2["level2/sample_flags"].attrs["bright_source_mask"]
    r_arcmin = 60.0 * angular_separation_deg(ra, dec, 83.633083, 22.014500)
    flagged = (flags & FLAG_BRIGHT_SOURCE) != 0
    sure = np.abs(r_arcmin - 11.25) > 0.01
    np.testing.assert_array_equal(flagged[sure], (r_arcmin <= 11.25)[sure])
    assert flagged.sum() > 100 and (~flagged).sum() > 100
    assert "TauA" in desc
