"""NoiseStatsLevel1 (docs/level2.md#noisestatslevel1): white-noise rms of every native channel against the
radiometer truth."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import default_level2_modules, reduce_in_process

from utils.simulator import PRESETS, simulate_observation
from utils.simulator.spec import SkySpec

UPTO_NOISE = {"AtmosphereInObservation": None, "GainFilterAndBin": None}


def _spec(source):
    return next(o for o in PRESETS["test-small"].observations if o.source == source)


@pytest.fixture(scope="module")
def blank_ces(tmp_path_factory):
    """The test-small GField30 CES pointing with a blank sky (radiometer + atmosphere + δg)."""
    from utils.coordinates import galactic_to_icrs

    ra, dec = galactic_to_icrs(30.0, 0.0)
    spec = _spec("GField30").replace(
        sky=SkySpec(kind="none"), target_ra_deg=float(ra), target_dec_deg=float(dec)
    )
    return simulate_observation(spec, tmp_path_factory.mktemp("blank_ces"), seed=3)


def noise_ratio(level1, level2):
    """auto_rms_raw / (truth gain × radiometer σ), shape (F, B, C, S)."""
    with h5py.File(level1, "r") as l1, h5py.File(level2, "r") as l2:
        idx = l2["spectrometer/level1_feed_index"][...]
        expected = l1["truth/instrument/gain"][...][idx] * l1["truth/noise/radiometer_sigma_k"][...][idx]
        return l2["level1_noise_stats/auto_rms_raw"][...] / expected[..., None]


def test_white_noise_matches_radiometer_truth(blank_ces, tmp_path):
    """Each scan has ~1500 pair differences per channel: the relative error of one rms estimate is
    sqrt(1/(2·1500)) ≈ 1.8 %, so 95 % of channels lie within 2σ ≈ 3.7 % (< 5 %), and the median over
    ~750 channel-scans is good to ~0.1 % (tolerance 1 %). Gain fluctuations are far below the noise
    per sample at 50 Hz (docs/simulator.md#gain-fluctuations)."""
    l2, ctx, _ = reduce_in_process(blank_ces, tmp_path, default_level2_modules(**UPTO_NOISE))
    ratio = noise_ratio(blank_ces, l2)
    assert abs(np.nanmedian(ratio) - 1.0) < 0.01
    assert np.mean(np.abs(ratio - 1.0) < 0.05) >= 0.95
    with h5py.File(l2, "r") as f:
        # vane-K rms equals the raw rms divided by the interpolated vane gain
        rms_k = f["level1_noise_stats/auto_rms"][...]
        gain = ctx.calibration(int(f["spectrometer/feeds"][0]), 0)[0]
        np.testing.assert_allclose(
            rms_k[0, :, :, 0], f["level1_noise_stats/auto_rms_raw"][0, :, :, 0] / gain, rtol=1e-6
        )
        assert f["level1_noise_stats/n_nan"][...].sum() == 0
        # docs/level2.md#tsys-conventions: the noise-equivalent vane Tsys predicts the vane-K white noise
        # through the radiometer equation, as GainFilterAndBin's channel mask uses it. The blank CES scans
        # at the vane's elevation, so the in-scan sky equals the vane's cold sky; the median over ~750
        # channel-scans is good to ~0.1 % (tolerance 1.5 %). The legacy Tsys (Tsys − 2.73 K) would give a
        # ratio ≈ 1.06 and fails.
        feeds = f["spectrometer/feeds"][...]
        ratios, legacy = [], []
        for i, feed in enumerate(feeds):
            for scan in range(rms_k.shape[-1]):
                tsys = ctx.calibration(int(feed), scan)[1]
                radiometer = tsys / np.sqrt(np.abs(ctx.channel_width_hz) / ctx.sample_rate_hz)
                ratios.append(rms_k[i, :, :, scan] / radiometer)
                legacy.append(rms_k[i, :, :, scan] / (radiometer * (tsys - 2.73) / tsys))
    assert abs(np.nanmedian(ratios) - 1.0) < 0.015
    assert np.nanmedian(legacy) - 1.0 > 0.04


def test_clipped_estimator_resists_a_calibrator_crossing(small_archive, tmp_path):
    """Regression of the default (clipped, not plain std; docs/level2.md#noisestatslevel1). Every feed of the
    test-small Tau A Lissajous crosses the 6.5 K source, whose sample-to-sample gradient enters the pair
    differences. Plain std is visibly inflated (> 5 % on the worst feed); the clipped estimator removes most
    of that excess on every feed (at least half of it where std is inflated by more than 5 %).

    Not asserted: the spec's "within 2 % of the radiometer truth" on this file. Gradients below the
    5σ clip cannot be told from noise by any pair-difference estimator; with 32 channels (0.04 K noise
    per sample) they leave the clipped estimate 2–4 % high, and at 1024 channels a feed that crosses
    the source centre stays ~2.4 % high (measured). The 1 % white-noise accuracy is asserted on blank
    sky above.
    """
    taua = small_archive["TauA"]
    ratios = {}
    for est in ("clipped_std", "std"):
        mods = default_level2_modules(NoiseStatsLevel1={"estimator": est}, **UPTO_NOISE)
        l2, _, _ = reduce_in_process(taua, tmp_path / est, mods)
        ratios[est] = np.nanmedian(noise_ratio(taua, l2), axis=(1, 2, 3))  # per feed
    excess_std = ratios["std"] - 1.0
    excess_clipped = ratios["clipped_std"] - 1.0
    assert excess_std.max() > 0.05
    assert np.all(excess_clipped <= excess_std)
    inflated = excess_std > 0.05
    assert np.all(excess_clipped[inflated] <= 0.5 * excess_std[inflated])


def test_nan_channel_counts_and_replay(small_archive, tmp_path):
    import shutil

    src = tmp_path / small_archive["GField30"].name
    shutil.copyfile(small_archive["GField30"], src)
    with h5py.File(src, "a") as f:
        tod = f["spectrometer/tod"]
        pos = 0
        for b in range(tod.shape[1]):
            block = tod[pos, b, 5, :]
            block[::3] = np.nan
            tod[pos, b, 5, :] = block
        feed = int(f["spectrometer/feeds"][pos])
    l2, ctx, _ = reduce_in_process(src, tmp_path / "o", default_level2_modules(**UPTO_NOISE))
    with h5py.File(l2, "r") as f:
        ifeed = list(f["spectrometer/feeds"][...]).index(feed)
        n_nan = f["level1_noise_stats/n_nan"][ifeed]
        scans = f["level2/scan_edges"][...]
        in_scans = sum(len(range(a, b)[(-a) % 3 :: 3]) for a, b in scans)
        assert np.all(n_nan[:, 5] == in_scans)
        assert n_nan.sum() == n_nan.shape[0] * in_scans
        assert np.all(np.isfinite(f["level1_noise_stats/auto_rms"][ifeed, :, 5]))
