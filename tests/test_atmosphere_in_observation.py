"""AtmosphereInObservation (docs/level2.md#atmosphereinobservation): the zenith atmosphere from a sky dip,
against the truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import default_level2_modules, reduce_in_process

from utils.simulator import PRESETS, simulate_observation

UPTO_ATM = {"GainFilterAndBin": None}


@pytest.fixture(scope="module")
def clean_skydip(tmp_path_factory):
    """The test-small sky dip without white noise and without gain fluctuations."""
    spec = next(o for o in PRESETS["test-small"].observations if o.source == "SkyDip")
    spec = spec.replace(white_noise=False, gain_fluctuations=False, n_channels=16)
    return simulate_observation(spec, tmp_path_factory.mktemp("clean_skydip"), seed=1)


def tau_against_truth(level1, level2):
    """tau × gain_expected/gain / T_atm − 1 per (feed, band, channel), with the expected vane gain
    interpolated to the scan mid-time exactly as ObservationContext.calibration does
    (docs/level2.md#calibration-per-scan)."""
    with h5py.File(level1, "r") as l1, h5py.File(level2, "r") as l2:
        idx = l2["spectrometer/level1_feed_index"][...]
        gain_true = l1["truth/instrument/gain"][...][idx]
        gain_exp = l1["truth/vane/gain_expected"][...][:, idx]  # (E, F, B, C)
        event_mjd = l2["level2/vane/mjd"][...]
        ((start, stop),) = l2["level2/scan_edges"][...]
        mjd = l2["spectrometer/MJD"][...]
        t_mid = 0.5 * (mjd[start] + mjd[stop - 1])
        w = (t_mid - event_mjd[0]) / (event_mjd[1] - event_mjd[0])
        gain_vane = (1 - w) * gain_exp[0] + w * gain_exp[1]
        tau = l2["level2/atmosphere/tau"][..., 0].astype(np.float64)
        t_atm = l1["truth/atmosphere/t_atm_zenith_k"][...]
        assert l2["level2/atmosphere/fitted"][...].all()
        return tau * gain_vane / gain_true / t_atm[None] - 1.0


def test_skydip_recovers_zenith_atmosphere(small_archive, tmp_path):
    """Noise: the fit's slope error is σ_y/(sqrt(n)·std(x)) ≈ 0.04 K/(sqrt(6000)·0.35) ≈ 1.5 mK per
    channel against T_atm ≈ 10 K, i.e. 0.015 %; the vane gain (0.05 %) and δg dominate. 2 % median
    tolerance (spec) is ample."""
    skydip = small_archive["SkyDip"]
    l2, ctx, _ = reduce_in_process(skydip, tmp_path, default_level2_modules(**UPTO_ATM))
    err = tau_against_truth(skydip, l2)
    assert np.nanmedian(np.abs(err)) <= 0.02
    assert ctx.summary["mean_tau"] == pytest.approx(10.0, rel=0.3)


def test_noise_free_skydip_is_exact(clean_skydip, tmp_path):
    """Without white noise and δg the fit is exact up to float32 storage: 1e-5 relative."""
    l2, _, _ = reduce_in_process(clean_skydip, tmp_path, default_level2_modules(**UPTO_ATM))
    err = tau_against_truth(clean_skydip, l2)
    assert np.nanmax(np.abs(err)) <= 1e-5


def test_ces_is_not_fitted(tiny_archive, tmp_path):
    l2, ctx, _ = reduce_in_process(tiny_archive.paths[0], tmp_path, default_level2_modules(**UPTO_ATM))
    with h5py.File(l2, "r") as f:
        assert not f["level2/atmosphere/fitted"][...].any()
        tau = f["level2/atmosphere/tau"][...]
        assert np.all(tau[np.isfinite(tau)] == 0)
        np.testing.assert_array_equal(
            f["level2/atmosphere/offsets"][...], f["level2/atmosphere/median_k"][...]
        )
        assert f["level2/atmosphere"].attrs["status"] == "complete"
    assert ctx.summary["mean_tau"] is None
