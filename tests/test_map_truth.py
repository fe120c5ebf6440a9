"""Continuum maps against the true sky, and jackknife null tests, at DEFAULT settings
(docs/mapmaking.md#end-to-end-map-validation).

One simulated field (``truth_field`` in tests/conftest.py, built by tests/truth_field.py): six
crossing CES observations of GField30 (rising and setting, day and night, three dates) and one Tau A
observation, through the shipped level-2 chain, CalibrationModel as the demo runs it and CreateMap
with every setting at its default, including ``calibration='model'``: the map is calibrated by the
Tau A model, end to end. Band 1, binned channel 0 (28.6 GHz), 1′ pixels.

The scale of the map (a), the HII-region peaks and the calibration are tested on that field as
simulated; χ²/N against the truth and the jackknife splits on ``faint_truth_field``, the same
observations with the field's sky times 0.03, where the noise dominates the residual: there they
test the RMS HDU (a noise figure). On the bright field the residuals are the signal's systematics
(see ``test_chi2_against_truth_on_the_bright_field``).

The truth is the simulator's beam-convolved sky sampled at every sample position of the map's feeds
and averaged per pixel like the data (utils/simulator/map_truth.py ``binned_truth``).
"""

from __future__ import annotations

import numpy as np
import pytest

from utils.simulator.map_truth import (
    binned_truth,
    compare_with_truth,
    hii_positions,
    jackknife_row,
    null_statistics,
    read_map,
)

SPLIT_MODES = (
    "odd_even_scans",
    "first_second_half",
    "day_night",
    "feed_halves",
    pytest.param(
        "scan_direction",
        marks=pytest.mark.xfail(
            strict=True,
            reason="the two directions share the noise slower than a sweep, which cancels in their "
            "difference: "
            "the independent-halves RMS of the _diff map is too large (χ²/N 0.86 measured, 1.47 with "
            "RMS_WHITE); a joint Monte Carlo of the two halves would be needed",
        ),
    ),
    "rising_setting",
)


def three_sigma(n_eff: float) -> float:
    """3σ of χ²/N for N_eff independent Gaussian pixels: Var(χ²/N) = 2/N_eff."""
    return 3.0 * float(np.sqrt(2.0 / n_eff))


def _default_map(field, name: str):
    """The default map ``name`` of a reduced truth field, its binned truth and the comparison."""
    files, log = field.make_maps(name)
    assert len(files) == 1, log
    path = files[0]
    truth = binned_truth(path, field.observation_pairs())
    hii = hii_positions(field.level1[1])
    return path, truth, compare_with_truth(path, truth, hii)


@pytest.fixture(scope="module")
def field_map(truth_field):
    """The default map of the field, its binned truth and the comparison."""
    return _default_map(truth_field, "Field")


def test_map_is_calibrated_by_the_tau_a_model(field_map):
    """calibration='model' (the default) was applied: the header says so and its median factor is the
    Tau A model's, not 1."""
    path, _, _ = field_map
    header = read_map(path)["header"]
    assert header["CALIB MODE"] == "model" and header["CALIB SOURCE"] == "TauA"
    assert header["CALIB MEDFACT"] != 1.0


def test_map_scale_against_truth(field_map):
    """Fitted scale a of map = a·truth + b off the compact HII regions within 3 % of 1: the Tau A
    calibration model carried to the field. The statistical error of a is < 0.1 % here (thousands of
    pixels, 10 mK noise against ~1 K of structure), so 3 % is the calibration budget of the issue."""
    _, _, result = field_map
    assert result["n_pixels"] > 2000, result
    assert abs(result["scale_a"] - 1.0) <= 0.03, result


def test_hii_region_peaks_against_truth(field_map):
    """The three compact HII regions (binned truth 3.8, 1.4 and 1.4 K at their peaks at 28.6 GHz,
    ridge included): mean of map − b within half a beam FWHM over that of the truth, within 3 %.
    Noise: 11–16 core pixels of RMS 6–10 mK, < 0.3 % of the faintest."""
    _, _, result = field_map
    for k in (1, 2, 3):
        assert abs(result[f"hii{k}_peak/truth"] - 1.0) <= 0.03, result


@pytest.fixture(scope="module")
def faint_field_map(faint_truth_field):
    """The default map of the noise-dominated copy of the field, its binned truth and the comparison."""
    return _default_map(faint_truth_field, "Faint")


def _chi2_bounds(field_map) -> tuple[dict, dict]:
    path, truth, result = field_map
    m = read_map(path)
    resid = m["sky"] - result["scale_a"] * truth - result["offset_b"]
    rms = m["rms"].astype(np.float64)
    use = (m["mask"] == 0) & np.isfinite(resid) & np.isfinite(rms) & (rms > 0)
    return result, null_statistics(resid, rms, use)


def test_chi2_against_truth(faint_field_map):
    """On the noise-dominated field, χ²/N of (map − a·truth − b)/RMS off the compact sources ≤ 1.3 (the
    issue's bound), and not below 1 − 3·sqrt(2/N_eff): residuals against the truth cannot be smaller
    than the noise, so a χ²/N well below 1 means an RMS that is too large. N_eff from the residual's
    autocorrelation (``null_statistics``). With the white-noise RMS alone (RMS_WHITE) the same map
    gives 1.59 (measured): the RMS HDU must carry the correlated noise."""
    result, stats = _chi2_bounds(faint_field_map)
    assert result["n_pixels"] > 2000, result
    assert result["chi2_per_pixel"] <= 1.3, (result, stats)
    assert result["chi2_per_pixel"] >= 1.0 - three_sigma(stats["n_eff"]), (result, stats)


@pytest.mark.xfail(
    strict=True,
    reason="signal systematics of the bright field: with HII peaks of 3.8 K and a ridge of 0.5 K against "
    "3–10 mK of noise per pixel, residuals of 1–3 % of the sky (the filters' transfer and "
    "pixelisation; the naive maps of opposite scan directions already differ by 44σ²) dominate: "
    "χ²/N against truth 6.3 (9.2 with RMS_WHITE; measured), the noise-dominated copy of the field passes",
)
def test_chi2_against_truth_on_the_bright_field(field_map):
    """The same bound on the bright field: documents the signal systematics that the RMS (a noise
    figure) does not describe."""
    result, _stats = _chi2_bounds(field_map)
    assert result["chi2_per_pixel"] <= 1.3, result


@pytest.mark.parametrize("split_mode", SPLIT_MODES)
def test_jackknife_difference_is_noise(faint_truth_field, split_mode):
    """(A − B)/2 of each two-way split of the noise-dominated field, at default settings, against its
    RMS HDU: χ²/N within max(10 %, 3·sqrt(2/N_eff)) of 1. With the white-noise RMS the same splits
    gave 1.43–1.70 (measured).

    ``jackknife_row``: the destriper leaves each half's zero level free, so the difference's weighted
    mean is removed (one degree of freedom of N); pixels MASK = 0 with finite difference and RMS. N_eff =
    N²/Σ_ij ρ_ij² from the autocorrelation of diff/RMS (``null_statistics``): correlated pixels
    (the destriper's offsets run along the scans) count less; χ²/N then scatters by sqrt(2/N_eff),
    and 10 % is a 3σ bound only when N_eff ≥ 1800. No pixel is masked: the halves share the
    calibration model and see the field at the same elevations, so the sky cancels."""
    name = f"JK_{split_mode}"
    files, log = faint_truth_field.make_maps(name, split_mode=split_mode, write_difference=True)
    diff_files = [f for f in files if f.name.endswith("_diff.fits")]
    if not diff_files:
        errors = [line for line in log.splitlines() if "Error" in line or "WARNING" in line]
        pytest.fail(f"split_mode={split_mode!r} wrote no _diff map: " + " | ".join(errors or [log[-2000:]]))
    stats = jackknife_row(diff_files[0])
    tolerance = max(0.10, three_sigma(stats["n_eff"]))
    # rising and setting CES strips overlap only where they cross (~300 pixels here); the tolerance
    # follows from N_eff, the floor only keeps the test off a handful of pixels
    assert stats["n_pixels"] >= 200, stats
    assert abs(stats["chi2_per_pixel"] - 1.0) <= tolerance, {**stats, "tolerance": tolerance}


def test_null_statistics_counts_correlated_pixels():
    """N_eff of ``null_statistics`` on synthetic maps: N for independent pixels, and N/Σρ² for white
    noise smoothed by a Gaussian of 1.5 pixels (Σρ² from the kernel's autocorrelation, 2πσ² = 14.1).
    Over ten realisations (measured) the smoothed estimate scatters by 6 % and Bartlett's
    approximation leaves it 6 % high, so 20 % is a 2σ-plus-bias bound; independent pixels come out
    within 0.1 %."""
    from scipy.ndimage import gaussian_filter
    from scipy.signal import fftconvolve

    rng = np.random.default_rng(5)
    use = np.zeros((100, 200), dtype=bool)
    use[20:80, 10:190] = True
    n = int(use.sum())
    delta = np.zeros((41, 41))
    delta[20, 20] = 1.0
    kernel = gaussian_filter(delta, 1.5)
    auto = fftconvolve(kernel, kernel[::-1, ::-1])
    sum_rho2 = float(np.sum((auto / auto.max()) ** 2))
    for sigma, expected, tolerance in ((0.0, n, 0.01), (1.5, n / sum_rho2, 0.20)):
        z = rng.normal(size=use.shape)
        if sigma:
            z = gaussian_filter(z, sigma)
            z /= z[use].std()
        stats = null_statistics(z, np.ones_like(z), use)
        assert stats["n_pixels"] == n
        assert abs(stats["n_eff"] / expected - 1.0) <= tolerance, (sigma, stats, expected)
        assert abs(stats["chi2_per_pixel"] - 1.0) <= three_sigma(stats["n_eff"])


def test_report_shows_truth_and_jackknife_rows(truth_field, field_map):
    """``python -m utils.simulator report`` on the reduced field prints the map against the binned
    truth and a row for the odd/even difference map with the figures of ``jackknife_row``."""
    from utils.simulator.report import build_report

    files, log = truth_field.make_maps(
        "JK_odd_even_scans", split_mode="odd_even_scans", write_difference=True
    )
    (diff,) = [f for f in files if f.name.endswith("_diff.fits")]
    text = build_report(truth_field.ws.root)
    assert "Continuum maps vs the beam-convolved truth binned like the data" in text
    row = next(line for line in text.splitlines() if line.startswith(field_map[0].name))
    assert f"{field_map[2]['scale_a']:.4f}" in row
    row = next(line for line in text.splitlines() if line.startswith(diff.name))
    stats = jackknife_row(diff)
    assert f"{stats['chi2_per_pixel']:.4f}" in row and str(stats["n_pixels"]) in row
