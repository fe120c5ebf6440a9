"""The shared pass over the level-1 TOD (docs/level2.md#streaming): one read, replay, product validation."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import default_level2_modules, reduce_in_process

from modules.pipeline_control.config import ErrorCollector, load_config
from modules.pipeline_control.streaming import FeedScanBlock, ObservationContext
from modules.ProcessLevel2.ProcessLevel2 import Level2Pipeline

CHAIN = [
    "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
    "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
    "modules.ProcessLevel2.SystemTemperature.SystemTemperature.SystemTemperature()",
    "modules.ProcessLevel2.FindScans.FindScans.FindScans()",
    "modules.ProcessLevel2.NoiseStatsLevel1.NoiseStatsLevel1.NoiseStatsLevel1()",
    "modules.ProcessLevel2.AtmosphereInObservation.AtmosphereInObservation.AtmosphereInObservation()",
    "modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin.GainFilterAndBin(n_freq_bin=2)",
]


def test_level1_tod_is_read_once(small_archive, tmp_path, monkeypatch):
    """Bytes read from spectrometer/tod — validation probe, vane events and the pass — stay ≤ 1.3 ×
    its storage size (docs/level2.md#streaming rule 3, benchmark B2), counted through h5py's fileobj
    driver."""
    counted = {}
    original = ObservationContext.__init__

    def counting_init(self, file_info, **kwargs):
        kwargs["count_bytes"] = True
        original(self, file_info, **kwargs)
        counted["ctx"] = self

    monkeypatch.setattr(ObservationContext, "__init__", counting_init)
    from modules.pipeline_control import streaming

    monkeypatch.setattr(streaming.ObservationContext, "__init__", counting_init)
    path = small_archive["GField30"]
    level2, ctx, _ = reduce_in_process(path, tmp_path, default_level2_modules())
    storage = ctx.tod_storage_size
    assert ctx.bytes_read_tod > 0.5 * storage  # the in-scan data really were read
    assert ctx.bytes_read_tod <= 1.3 * storage


def test_replayed_products_give_the_same_result(small_archive, tmp_path):
    """GainFilterAndBin added after NoiseStatsLevel1 and AtmosphereInObservation are done replays
    their stored products and gives bit-identical output to one combined pass."""
    path = small_archive["TauA"]
    together, _, _ = reduce_in_process(path, tmp_path / "together", default_level2_modules())
    first, _, _ = reduce_in_process(path, tmp_path / "split", default_level2_modules(GainFilterAndBin=None))
    with h5py.File(first, "r") as f:
        assert "level2/binned_data" not in f
        written = f["level1_noise_stats"].attrs["written_utc"]
    second, ctx, _ = reduce_in_process(path, tmp_path / "split", default_level2_modules())
    assert "NoiseStatsLevel1" in ctx.timings  # replayed, not recomputed
    with h5py.File(together, "r") as a, h5py.File(second, "r") as b:
        assert b["level1_noise_stats"].attrs["written_utc"] == written
        for name in ("level2/binned_data", "level2/binned_filtered_data", "level2/central_freqs"):
            np.testing.assert_array_equal(a[name][...], b[name][...])


def test_product_order_is_validated(tmp_path):
    chain = list(CHAIN)
    chain[5], chain[6] = chain[6], chain[5]  # GainFilterAndBin before AtmosphereInObservation
    cfg = tmp_path / "l2.toml"
    cfg.write_text("[Master]\npipeline = [\n" + "".join(f"  {c!r},\n" for c in chain) + "]\n")
    errors = ErrorCollector()
    sub = load_config(cfg, "level2", errors)
    assert not errors.errors
    problems = Level2Pipeline.validate_sub_config(sub)
    assert any("requires block product 'atmosphere'" in p.message for p in problems)


def test_two_passes_are_announced(tmp_path, small_archive):
    chain = list(CHAIN)
    chain.insert(
        6, "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()"
    )
    cfg = tmp_path / "l2.toml"
    cfg.write_text("[Master]\npipeline = [\n" + "".join(f"  {c!r},\n" for c in chain) + "]\n")
    errors = ErrorCollector()
    sub = load_config(cfg, "level2", errors)
    assert len(Level2Pipeline._stream_groups(sub)) == 2
    # GainFilterAndBin is now alone in its pass and its requirements are not met there
    assert any("requires block product" in p.message for p in Level2Pipeline.validate_sub_config(sub))


@pytest.mark.parametrize("n", [1, 3])
def test_calibration_interpolates_between_vane_events(small_archive, tmp_path, n):
    """docs/level2.md#calibration-per-scan: the gain used for a scan is interpolated linearly in time between
    the bracketing vane events (nearest outside)."""
    path = small_archive["GField30"]
    l2, ctx, _ = reduce_in_process(path, tmp_path, default_level2_modules(GainFilterAndBin=None))
    with h5py.File(l2, "r") as f:
        vane_mjd = f["level2/vane/mjd"][...]
        gains = f["level2/vane/gain"][...]
        scans = f["level2/scan_edges"][...]
        mjd = f["spectrometer/MJD"][...]
        feed = int(f["spectrometer/feeds"][0])
    for s, (a, b) in enumerate(scans):
        t = 0.5 * (mjd[a] + mjd[b - 1])
        w = (t - vane_mjd[0]) / (vane_mjd[-1] - vane_mjd[0])
        expected = (1 - w) * gains[0, 0].astype(np.float64) + w * gains[-1, 0]
        np.testing.assert_allclose(ctx.calibration(feed, s)[0], expected, rtol=1e-12)


def test_the_decimated_copy_is_taken_in_the_first_read_of_each_row(small_archive, tmp_path, monkeypatch):
    """NoiseStatsLevel1 reads every row, so it fills the decimated copy that
    AtmosphereInObservation's median reads (docs/level2.md#streaming): no stage copies it again,
    and the stored median is the median of every median_stride-th calibrated sample."""
    from utils.block_ops import decimated_nanmedian, inverse_gain
    from utils.level1 import Level1File

    copies = []
    original = FeedScanBlock.decimated

    def spy(self, stride):
        copies.append(int(stride) not in self._decimated)
        return original(self, stride)

    monkeypatch.setattr(FeedScanBlock, "decimated", spy)
    path = small_archive["GField30"]
    l2, ctx, _ = reduce_in_process(path, tmp_path, default_level2_modules(GainFilterAndBin=None))
    assert copies and not any(copies)  # every block's copy was already there
    with h5py.File(l2, "r") as f:
        median_k = f["level2/atmosphere/median_k"][...]
        scans = f["level2/scan_edges"][...]
        stride = int(f["level2/atmosphere"].attrs.get("median_stride", 10))
    with Level1File(path) as l1:
        for s, (a, b) in enumerate(scans):
            feed = int(ctx.feeds[0])
            raw = l1.tod_block(ctx.l1_index(feed), None, None, slice(int(a), int(b)))
            gain, _ = ctx.calibration(feed, s)
            expected = decimated_nanmedian(raw, inverse_gain(gain), stride).astype(np.float32)
            np.testing.assert_array_equal(median_k[0, :, :, s], expected)


def test_block_decimated_copy_filled_or_made_once():
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(2, 3, 101)).astype(np.float32)
    raw.setflags(write=False)
    n = raw.shape[-1]
    block = FeedScanBlock(
        1, 0, 0, 0, n, raw, np.zeros(n), np.zeros(n), np.zeros(n), np.ones((2, 3)), np.ones((2, 3))
    )
    assert block.decimation_request() is None  # no stage of the pass asked for one
    block.plan_decimation(10)
    stride, buf = block.decimation_request()
    assert stride == 10 and buf.shape == (2, 3, 11)
    buf[...] = raw[..., ::10]
    block.keep_decimated(stride, buf)
    assert block.decimation_request() is None
    assert not block.decimated(10).flags.writeable
    np.testing.assert_array_equal(block.decimated(10), raw[..., ::10])
    made = block.decimated(7)  # not asked for: copied from raw once
    assert made.flags.c_contiguous and block.decimated(7) is made
    np.testing.assert_array_equal(made, raw[..., ::7])
