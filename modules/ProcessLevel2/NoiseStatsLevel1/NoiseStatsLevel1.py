"""NoiseStatsLevel1: white-noise rms of every native channel and scan, in the shared pass
(docs/level2.md#noisestatslevel1)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

import numpy as np

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import StreamingStage
from utils import level2 as l2layout
from utils.block_ops import pair_difference_rms_and_nans
from utils.vane import BLOCK_READS, vane_calibration

Estimator = Literal["std", "clipped_std", "mad"]
ESTIMATORS = get_args(Estimator)
GROUP = l2layout.LEVEL1_NOISE_STATS


class NoiseStatsLevel1(StreamingStage):
    """White-noise rms per sample of each native channel and scan, from pair differences.

    Reads: the raw block of each feed and scan (shared pass), the vane gain (``ctx.calibration``).
    Writes: ``level1_noise_stats/{auto_rms, auto_rms_raw, n_nan, n_nan_scan}``.
    Provides: ``auto_rms_k`` (float32 (B, C), vane K) and ``nan_count`` (int (B, C), NaN samples of
    the block) to later stages of the pass.

    Parameters
    ----------
    estimator : {'std', 'clipped_std', 'mad'}
        Pair-difference estimator (docs/level2.md#noisestatslevel1); the clipped default resists a calibrator
        crossing.
    clip_sigma : float
        Clipping threshold of ``clipped_std``.
    plot : bool
        Write a quicklook PNG of the rms spectra (K) per feed.
    plot_dir : str
        Directory of the PNGs (``output_dir`` is an alias).
    output_dir : str or None
        Alias of ``plot_dir`` (legacy name); wins when given.
    overwrite : bool
        Recompute even if complete.
    """

    provides = ("auto_rms_k", "nan_count")
    reads = BLOCK_READS
    writes = (GROUP,)
    calibration = staticmethod(vane_calibration)

    def __init__(
        self,
        estimator: Estimator = "clipped_std",
        clip_sigma: Annotated[float, Range(gt=0)] = 5.0,
        plot: bool = False,
        plot_dir: str = "outputs/NoiseStatsLevel1",
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.estimator = estimator
        self.clip_sigma = float(clip_sigma)
        self.plot = plot
        self.plot_dir = output_dir or plot_dir
        self.output_dir = output_dir
        self.overwrite = overwrite

    def begin(self, ctx) -> None:
        shape, chunks = ctx.channel_scan_shape()
        n_feeds, n_bands, n_chan, n_scans = shape
        grp = ctx.l2.require_group(GROUP)
        provenance.mark_incomplete(grp)
        for name, unit in (("auto_rms", "K"), ("auto_rms_raw", "counts")):
            ds = l2layout.replace_dataset(grp, name, shape, np.float32, fillvalue=np.nan, chunks=chunks)
            ds.attrs["unit"] = unit
        l2layout.replace_dataset(
            grp, "n_nan", (n_feeds, n_bands, n_chan), np.int64, fillvalue=0, chunks=(1, n_bands, n_chan)
        )
        l2layout.replace_dataset(grp, "n_nan_scan", shape, np.int32, fillvalue=0, chunks=chunks)
        ctx.scratch[GROUP] = {"n_nan": np.zeros((n_bands, n_chan), dtype=np.int64)}

    def process_block(self, ctx, block) -> None:
        # this pass reads every row, so it also takes the decimated copy later stages ask for
        request = block.decimation_request()
        stride, dec = request if request else (0, None)
        rms_raw, nan = pair_difference_rms_and_nans(
            block.raw, estimator=self.estimator, clip_sigma=self.clip_sigma, stride=stride, decimated_out=dec
        )
        if request:
            block.keep_decimated(stride, dec)
        gain = np.asarray(block.gain, dtype=np.float64)
        good = np.isfinite(gain) & (gain > 0)
        rms_k = np.where(good, rms_raw / np.where(good, gain, 1.0), np.nan).astype(np.float32)
        grp = ctx.l2[GROUP]
        grp["auto_rms"][block.ifeed, :, :, block.scan] = rms_k
        grp["auto_rms_raw"][block.ifeed, :, :, block.scan] = rms_raw.astype(np.float32)
        grp["n_nan_scan"][block.ifeed, :, :, block.scan] = nan.astype(np.int32)
        ctx.scratch[GROUP]["n_nan"] += nan
        block.products["auto_rms_k"] = rms_k
        block.products["nan_count"] = nan

    def end_feed(self, ctx, feed: int) -> None:
        scratch = ctx.scratch[GROUP]
        ctx.l2[GROUP]["n_nan"][ctx.ifeed(feed)] = scratch["n_nan"]
        scratch["n_nan"][...] = 0

    def finish(self, ctx) -> None:
        grp = ctx.l2[GROUP]
        for name in ("auto_rms", "auto_rms_raw", "n_nan", "n_nan_scan"):
            self.mark_complete(grp[name])
        self.mark_complete(grp)
        if self.plot:
            self._plot(ctx)

    def replay_block(self, ctx, block) -> None:
        grp = ctx.l2[GROUP]
        block.products["auto_rms_k"] = grp["auto_rms"][block.ifeed, :, :, block.scan]
        block.products["nan_count"] = grp["n_nan_scan"][block.ifeed, :, :, block.scan].astype(np.int64)

    def _plot(self, ctx) -> None:
        from utils.plotting import new_figure, save_figure

        grp = ctx.l2[GROUP]
        freq = ctx.frequency_ghz
        for ifeed, feed in enumerate(ctx.feeds):
            rms = np.nanmedian(grp["auto_rms"][ifeed], axis=-1)  # (B, C) over scans
            fig, ax = new_figure()
            for b in range(freq.shape[0]):
                order = np.argsort(freq[b])
                ax.plot(freq[b][order], rms[b][order] * 1e3, lw=0.8)
            ax.set_xlabel("frequency (GHz)")
            ax.set_ylabel("white-noise rms per sample (mK, vane K)")
            ax.set_title(f"obsid {ctx.obsid} feed {int(feed)}: level-1 noise (median over scans)")
            save_figure(fig, f"{self.plot_dir}/{ctx.obsid:07d}_feed{int(feed):02d}_auto_rms.png")
