"""CalibrationModel (docs/level2.md#calibrationmodel): calibration factors against time from calibration_flux
rows.

Flux rows are simulated here: ``measured = S_model(ν, mjd) · g(t) · (1 + noise)`` with a known
calibration factor g(t) per (feed, band, channel) and a 1 % Gaussian error, so every expectation
is computed from the injected truth and the stated errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy.polynomial import polynomial as P

from modules.pipeline_control.Pipeline import RunContext
from modules.ProcessLevel2.CalibrationModel import CalibrationModel
from modules.SQLModule.SQLModule import db
from utils.calibrators import CalibrationTable, flux_jy

FEEDS = (1, 2)
BANDS = (0, 1, 2, 3)
CHANNELS = (0, 1)
SIGMA = 0.01  # fractional flux error of every row
MJD_REF = 59000.0
DRIFT_PER_YEAR = 0.02


def bin_frequency(band: int, channel: int) -> float:
    """Central frequency of a 2-bin channel; bands 0 and 2 are stored in descending frequency."""
    lo = 26.0 + 2.0 * band
    centres = (lo + 0.5, lo + 1.5)
    return centres[::-1][channel] if band in (0, 2) else centres[channel]


def g0_of(feed: int, band: int, channel: int) -> float:
    return 0.9 + 0.02 * feed + 0.03 * band + 0.01 * channel


def true_factor(element, mjd, drift=DRIFT_PER_YEAR):
    t = (np.asarray(mjd) - MJD_REF) / 365.25
    return g0_of(*element) * (1.0 + drift * t)


def make_rows(rng, source, obsid, mjd, factor=true_factor, elements=None, **overrides):
    rows = []
    for feed in FEEDS:
        for band in BANDS:
            for channel in CHANNELS:
                element = (feed, band, channel)
                if elements is not None and element not in elements:
                    continue
                nu = bin_frequency(band, channel)
                s_model = float(flux_jy(source, nu, mjd))
                measured = s_model * (float(factor(element, mjd)) + SIGMA * rng.standard_normal())
                row = {
                    "feed": feed,
                    "band": band,
                    "channel": channel,
                    "mjd": mjd,
                    "source": source,
                    "frequency_ghz": nu,
                    "measured_flux": measured,
                    "flux_error": SIGMA * s_model,
                    "amplitude": 1.0,
                    "amplitude_error": 0.01,
                    "chi2": 1.05,
                    "x_offset_deg": 0.0,
                    "y_offset_deg": 0.0,
                }
                row.update(overrides)
                rows.append(row)
    return rows


@pytest.fixture()
def database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db.connect(tmp_path / "db.sqlite")
    try:
        yield db
    finally:
        db.disconnect()


def register(obsid: int, source: str, rows) -> None:
    db.upsert_observation({"obsid": obsid, "source": source, "utc_start": "2026-03-01-00:00:00"})
    db.replace_calibration_flux(obsid, rows)


def fill(source="TauA", first_obsid=10000, n=40, mjd0=59400.0, span_days=3 * 365.25, seed=1, **kw):
    """n observations evenly spread over span_days; returns {element: (mjd, ratio_truth)}."""
    rng = np.random.default_rng(seed)
    mjds = mjd0 + np.linspace(0.0, span_days, n) + rng.uniform(-5, 5, n)
    for k, mjd in enumerate(mjds):
        register(first_obsid + k, source, make_rows(rng, source, first_obsid + k, float(mjd), **kw))
    return mjds


def formal_covariance(mjds: np.ndarray, degree: int) -> np.ndarray:
    """(Aᵀ W A)⁻¹ of the weighted polynomial fit in t = (mjd − mjd_ref)/365.25, W = 1/σ_ratio²."""
    t = (mjds - MJD_REF) / 365.25
    a = np.vander(t, degree + 1, increasing=True)
    return np.linalg.inv(a.T @ a / SIGMA**2)


def models_by_element(source: str) -> dict:
    return {(m.feed, m.band, m.channel): m for m in db.query_calibration_models(source)}


@pytest.mark.parametrize("degree", [1, 2])
def test_polynomial_recovers_a_linear_drift_within_its_formal_error(database, degree):
    mjds = fill()
    stage = CalibrationModel(source="TauA", model_type="polynomial", poly_degree=degree, min_observations=10)
    result = stage.run()
    n_el = len(FEEDS) * len(BANDS) * len(CHANNELS)
    assert result.done == n_el and result.failed == 0
    models = models_by_element("TauA")
    assert len(models) == n_el
    # Rows carry flux_error = SIGMA·S_model, so σ_ratio = SIGMA and the formal covariance is
    # SIGMA²·(AᵀA)⁻¹ of the design alone.
    cov = formal_covariance(mjds, degree)
    t_mid = float(np.mean((mjds - MJD_REF) / 365.25))
    grad = np.array([0.0, 1.0] + ([2 * t_mid] if degree == 2 else []))
    pulls = []
    for element, m in models.items():
        c = np.asarray(m.poly_coeffs)
        assert m.model_type == "polynomial" and len(c) == degree + 1
        assert m.n_observations == len(mjds) and m.mjd_ref == MJD_REF
        assert m.mjd_min == pytest.approx(mjds.min()) and m.mjd_max == pytest.approx(mjds.max())
        # drift = d factor / dt at the mean epoch (for degree 1 simply c1)
        slope = float(grad @ c)
        slope_err = float(np.sqrt(grad @ cov @ grad))
        slope_true = g0_of(*element) * DRIFT_PER_YEAR
        pulls.append((slope - slope_true) / slope_err)
        assert abs(slope - slope_true) < 3 * slope_err, (element, slope, slope_true, slope_err)
        # the level at the mean epoch is right too (a wrong frequency for bands 0 and 2 would bias it
        # by ~1 % = 5σ here)
        level = float(P.polyval(t_mid, c))
        basis = t_mid ** np.arange(degree + 1)
        level_err = float(np.sqrt(basis @ cov @ basis))
        assert abs(level - float(true_factor(element, MJD_REF + 365.25 * t_mid))) < 4 * level_err
        # rms of n residuals of unit-σ noise: precision ~ 1/sqrt(2n) ≈ 11 % for n = 40
        assert m.fit_rms == pytest.approx(SIGMA, rel=0.4)
    pulls = np.array(pulls)
    print(f"degree {degree}: drift pulls mean {pulls.mean():+.2f}, rms {np.sqrt(np.mean(pulls**2)):.2f}")
    assert np.sqrt(np.mean(pulls**2)) < 1.6  # 16 pulls of unit variance

    # JSON export: atomic, self-contained, same factors as the database table
    doc = json.loads(Path("calibration/calibration_model.json").read_text())
    assert doc["source"] == "TauA" and len(doc["elements"]) == n_el
    assert not list(Path("calibration").glob(".*partial*"))
    table_db = db.load_calibration_table("TauA")
    table_json = CalibrationTable.from_rows("TauA", doc["elements"])
    for element in models:
        for mjd in (mjds.min() - 400, mjds.mean(), mjds.max() + 400):
            assert table_json.factor(*element, mjd) == pytest.approx(
                table_db.factor(*element, mjd), rel=1e-12
            )
        errors = np.array(
            next(e for e in doc["elements"] if (e["feed"], e["band"], e["channel"]) == element)[
                "poly_coeff_errors"
            ]
        )
        np.testing.assert_allclose(errors, np.sqrt(np.diag(cov)), rtol=1e-6)
    # Never extrapolated: outside [mjd_min, mjd_max] the polynomial is held at the nearest end.
    element = (1, 0, 0)
    assert table_db.factor(*element, mjds.max() + 1000) == pytest.approx(
        table_db.factor(*element, mjds.max()), rel=1e-12
    )
    assert table_db.factor(*element, mjds.min() - 1000) == pytest.approx(
        table_db.factor(*element, mjds.min()), rel=1e-12
    )


def test_rows_outside_the_cuts_are_ignored(database):
    mjds = fill(n=20)
    rng = np.random.default_rng(9)
    # same elements, other obsids: a bad χ², a ratio far outside [gain_min, gain_max], no error, no frequency
    register(20001, "TauA", make_rows(rng, "TauA", 20001, 59600.0, factor=lambda e, m: 1.5, chi2=50.0))
    register(20002, "TauA", make_rows(rng, "TauA", 20002, 59700.0, factor=lambda e, m: 5.0))
    register(20003, "TauA", make_rows(rng, "TauA", 20003, 59800.0, flux_error=None))
    register(20004, "TauA", make_rows(rng, "TauA", 20004, 59900.0, frequency_ghz=None))
    result = CalibrationModel(
        source="TauA", model_type="polynomial", poly_degree=1, min_observations=10
    ).run()
    assert result.done == 16
    rows = {
        (r.obsid, r.feed, r.band, r.channel): r for r in db.query_calibration_flux("TauA", max_obsid=19999)
    }
    for element, m in models_by_element("TauA").items():
        assert m.n_observations == len(mjds)
        # identical to a weighted fit over the clean rows only
        clean = [rows[(o, *element)] for o in range(10000, 10000 + len(mjds))]
        mjd = np.array([r.mjd for r in clean])
        s_model = flux_jy("TauA", np.array([r.frequency_ghz for r in clean]), mjd)
        ratio = np.array([r.measured_flux for r in clean]) / s_model
        w = s_model / np.array([r.flux_error for r in clean])
        expected = P.polyfit((mjd - MJD_REF) / 365.25, ratio, 1, w=w)
        np.testing.assert_allclose(m.poly_coeffs, expected, rtol=1e-9)
    # an obsid range restricts the rows used
    CalibrationModel(source="TauA", model_type="mean", min_observations=10, max_obsid=10009).run()
    assert {m.n_observations for m in models_by_element("TauA").values()} == {10}
    # too few rows: no model, counted as skipped; the previous model is kept
    result = CalibrationModel(
        source="TauA", model_type="nearest", min_observations=1000, output_path=None
    ).run()
    assert result.done == 0 and result.skipped == 16
    assert {m.model_type for m in models_by_element("TauA").values()} == {"mean"}


def test_mean_and_nearest_models(database):
    constant = lambda element, mjd: g0_of(*element)  # noqa: E731
    mjds = fill(n=30, factor=constant)
    CalibrationModel(source="TauA", model_type="mean", min_observations=5, output_path="out/mean.json").run()
    table = db.load_calibration_table("TauA")
    err = SIGMA / np.sqrt(len(mjds))  # error of the weighted mean of equal-weight ratios
    for element in models_by_element("TauA"):
        value = table.factor(*element, 61000.0)
        assert abs(value - g0_of(*element)) < 4 * err, element
        assert table.factor(*element, 50000.0) == value  # the constant
    assert Path("out/mean.json").exists()

    CalibrationModel(source="TauA", model_type="nearest", min_observations=5, output_path=None).run()
    table = db.load_calibration_table("TauA")
    element = (2, 3, 1)
    m = models_by_element("TauA")[element]
    assert m.model_type == "nearest" and m.poly_coeffs is None
    got_mjds, gains = np.array(m.nearest_mjds), np.array(m.nearest_gains)
    assert np.all(np.diff(got_mjds) > 0)
    np.testing.assert_allclose(got_mjds, np.sort(mjds))
    # the ratio at each epoch is the row's measured/model, within its noise of the truth
    assert np.all(np.abs(gains - g0_of(*element)) < 5 * SIGMA)
    for k in (0, 7, len(mjds) - 1):
        assert table.factor(*element, got_mjds[k]) == pytest.approx(gains[k])
    between = 0.25 * got_mjds[3] + 0.75 * got_mjds[4]  # closer to epoch 4
    assert table.factor(*element, between) == pytest.approx(gains[4])
    assert table.factor(*element, got_mjds[-1] + 500) == pytest.approx(gains[-1])


def test_a_second_source_does_not_overwrite_the_first(database):
    fill(source="TauA", first_obsid=10000, n=12, factor=lambda e, m: 1.10)
    fill(source="CasA", first_obsid=30000, n=12, factor=lambda e, m: 0.80, seed=2)
    CalibrationModel(source="TauA", model_type="mean", min_observations=10, output_path=None).run()
    taua_before = {k: m.poly_coeffs for k, m in models_by_element("TauA").items()}
    CalibrationModel(source="casa", model_type="mean", min_observations=10, output_path=None).run()
    taua, casa = models_by_element("TauA"), models_by_element("CasA")
    assert len(taua) == len(casa) == 16
    assert {k: m.poly_coeffs for k, m in taua.items()} == taua_before
    assert all(abs(m.poly_coeffs[0] - 1.10) < 5 * SIGMA / np.sqrt(12) for m in taua.values())
    assert all(abs(m.poly_coeffs[0] - 0.80) < 5 * SIGMA / np.sqrt(12) for m in casa.values())
    assert db.load_calibration_table("TauA").factor(1, 0, 0, 60000.0) != db.load_calibration_table(
        "CasA"
    ).factor(1, 0, 0, 60000.0)


def test_plan_writes_nothing_and_plots(database, tmp_path):
    fill(n=12)
    stage = CalibrationModel(source="TauA", min_observations=10)
    stage.context = RunContext(obsids=[10000])
    lines = stage.plan()
    assert f"{12 * 16} calibration_flux row(s)" in lines[0]
    assert "16 (feed, band, channel) element(s) would get a model" in lines[1]
    assert any("--obsid does not restrict" in line for line in lines)
    assert db.query_calibration_models() == [] and not Path("calibration").exists()
    # --obsid does not restrict the fit
    result = CalibrationModel(source="TauA", min_observations=10, plot=True, plot_dir="plots").run()
    assert result.done == 16
    assert len(list(Path("plots").glob("*.png"))) == len(FEEDS) * len(BANDS)


def test_no_rows_is_a_warning(database, caplog):
    result = CalibrationModel(source="Jupiter").run()
    assert result.done == 0 and result.failed == 0
    assert "no (feed, band, channel) element of Jupiter" in caplog.text


def test_validate_config():
    assert CalibrationModel.validate_config({}) == []
    problems = CalibrationModel.validate_config(
        {
            "source": "Venus",
            "model_type": "spline",
            "poly_degree": -1,
            "gain_min": 2.0,
            "gain_max": 1.0,
            "chi2_max": 0,
            "min_observations": 0,
            "min_obsid": 10,
            "max_obsid": 5,
        }
    )
    assert len(problems) == 7
    assert "unknown calibrator 'Venus'" in problems[0]
