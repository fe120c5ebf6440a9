"""AtmosphereInObservation: per-scan airmass fit ``offset + tau/sin(el)`` of every channel
(docs/level2.md#atmosphereinobservation)."""

from __future__ import annotations

from typing import Annotated

import numpy as np

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import StreamingStage
from utils import level2 as l2layout
from utils.block_ops import airmass_fit, decimated_nanmedian, inverse_gain
from utils.vane import BLOCK_READS, vane_calibration

GROUP = l2layout.ATMOSPHERE


def _stored_parameter(grp, name: str):
    """A parameter recorded in a group's provenance (``parameters_json``), or None."""
    import json

    text = grp.attrs.get("parameters_json")
    if text is None:
        return None
    try:
        return json.loads(text if isinstance(text, str) else text.decode()).get(name)
    except (ValueError, AttributeError):
        return None


class AtmosphereInObservation(StreamingStage):
    """Fit ``y = offset + tau/sin(el)`` per channel and scan in vane K, and the scan median power.

    Reads: the raw block (shared pass), vane gain, the feed's elevation. Writes:
    ``level2/atmosphere/{offsets, tau, fitted, median_k}``. Provides ``atmosphere`` = (offset,
    tau, fitted), ``median_k`` (B, C) and ``median_stride`` to later stages. Sets ``mean_tau`` in the summary.

    Parameters
    ----------
    min_elevation_range_deg : float
        Fit only scans whose elevation range is at least this (deg); otherwise ``offset = median``
        and ``tau = 0``. 2° rather than the legacy 0.2°: a fit over a fraction of a degree is
        degenerate with the sky and absorbed calibrator signal (Deliberate difference,
        docs/level2.md#atmosphereinobservation).
    median_stride : int
        Stride of the decimated per-scan median (samples).
    plot : bool
        Write a quicklook PNG of tau against frequency per feed.
    plot_dir : str
        Directory of the PNGs.
    overwrite : bool
        Refit even if ``level2/atmosphere`` is complete.
    """

    provides = ("atmosphere", "median_k", "median_stride")
    reads = BLOCK_READS
    writes = (GROUP,)
    calibration = staticmethod(vane_calibration)

    def __init__(
        self,
        min_elevation_range_deg: Annotated[float, Range(ge=0)] = 2.0,
        median_stride: Annotated[int, Range(ge=1)] = 10,
        plot: bool = False,
        plot_dir: str = "outputs/AtmosphereInObservation",
        overwrite: bool = False,
    ) -> None:
        self.min_elevation_range_deg = float(min_elevation_range_deg)
        self.median_stride = int(median_stride)
        self.plot = plot
        self.plot_dir = plot_dir
        self.overwrite = overwrite

    @property
    def decimation_stride(self) -> int:
        """The median reads every ``median_stride``-th sample (``block.decimated``)."""
        return self.median_stride

    def begin(self, ctx) -> None:
        shape, chunks = ctx.channel_scan_shape()
        n_feeds, n_bands, n_chan, n_scans = shape
        grp = ctx.l2.require_group(GROUP)
        provenance.mark_incomplete(grp)
        for name in ("offsets", "tau", "median_k"):
            ds = l2layout.replace_dataset(grp, name, shape, np.float32, fillvalue=np.nan, chunks=chunks)
            ds.attrs["unit"] = "K"
        l2layout.replace_dataset(grp, "fitted", (n_feeds, n_scans), bool, fillvalue=False, chunks=None)

    def process_block(self, ctx, block) -> None:
        inv_gain = inverse_gain(block.gain)
        el = np.asarray(block.el_deg, dtype=np.float64)
        median = decimated_nanmedian(block.decimated(self.median_stride), inv_gain, 1)
        finite_el = el[np.isfinite(el)]
        fitted = bool(finite_el.size >= 2 and np.ptp(finite_el) >= self.min_elevation_range_deg)
        offset, tau = median.copy(), np.zeros_like(median)
        if fitted:
            with np.errstate(divide="ignore", invalid="ignore"):
                airmass = 1.0 / np.sin(np.radians(el))
            fit = airmass_fit(block.raw, inv_gain, airmass)
            offset = np.where(fit.ok, fit.offset, median)
            tau = np.where(fit.ok, fit.tau, 0.0)
            fitted = bool(fit.ok.any())
        # products are exactly the stored (float32) values, so a later replay gives identical results
        offset, tau, median = (a.astype(np.float32) for a in (offset, tau, median))
        grp = ctx.l2[GROUP]
        grp["offsets"][block.ifeed, :, :, block.scan] = offset
        grp["tau"][block.ifeed, :, :, block.scan] = tau
        grp["median_k"][block.ifeed, :, :, block.scan] = median
        grp["fitted"][block.ifeed, block.scan] = fitted
        block.products["atmosphere"] = (offset.astype(np.float64), tau.astype(np.float64), fitted)
        block.products["median_k"] = median.astype(np.float64)
        block.products["median_stride"] = self.median_stride

    def finish(self, ctx) -> None:
        grp = ctx.l2[GROUP]
        fitted = grp["fitted"][...]
        if fitted.any():
            tau = grp["tau"][...]  # (F, B, C, S), small
            values = np.moveaxis(tau, -1, 1)[fitted]  # (n_fitted, B, C)
            ctx.summary["mean_tau"] = float(np.nanmedian(values)) if np.isfinite(values).any() else None
        else:
            ctx.summary["mean_tau"] = None
        for name in ("offsets", "tau", "median_k", "fitted"):
            self.mark_complete(grp[name])
        self.mark_complete(grp)
        if self.plot:
            self._plot(ctx)

    def replay_block(self, ctx, block) -> None:
        grp = ctx.l2[GROUP]
        offset = grp["offsets"][block.ifeed, :, :, block.scan].astype(np.float64)
        tau = grp["tau"][block.ifeed, :, :, block.scan].astype(np.float64)
        fitted = bool(grp["fitted"][block.ifeed, block.scan])
        block.products["atmosphere"] = (offset, tau, fitted)
        block.products["median_k"] = grp["median_k"][block.ifeed, :, :, block.scan].astype(np.float64)
        block.products["median_stride"] = _stored_parameter(grp, "median_stride")

    def _plot(self, ctx) -> None:
        from utils.plotting import new_figure, save_figure

        grp = ctx.l2[GROUP]
        freq = ctx.frequency_ghz
        fitted = grp["fitted"][...]
        for ifeed, feed in enumerate(ctx.feeds):
            if not fitted[ifeed].any():
                continue
            tau = np.nanmedian(grp["tau"][ifeed][..., fitted[ifeed]], axis=-1)
            fig, ax = new_figure()
            for b in range(freq.shape[0]):
                order = np.argsort(freq[b])
                ax.plot(freq[b][order], tau[b][order], lw=0.8)
            ax.set_xlabel("frequency (GHz)")
            ax.set_ylabel("zenith atmosphere tau (K, vane K)")
            ax.set_title(f"obsid {ctx.obsid} feed {int(feed)}")
            save_figure(fig, f"{self.plot_dir}/{ctx.obsid:07d}_feed{int(feed):02d}_tau.png")
