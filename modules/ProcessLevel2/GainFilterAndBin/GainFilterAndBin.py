"""GainFilterAndBin: remove atmosphere and gain fluctuations and bin the native channels
(docs/level2.md#gainfilterandbin)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import StreamingStage
from modules.pipeline_control.resolve import check_allowed, resolve_callee
from utils import level2 as l2layout
from utils.block_ops import decimated_nanmedian, filter_and_bin, inverse_gain
from utils.errors import BadCOMAPFile
from utils.gain_filters import BUILTIN_FILTERS, GainFilter, ScanSamples, omega_sum
from utils.layout import DatasetPath
from utils.vane import BLOCK_READS, vane_calibration

NAN_SAMPLE_FRACTION = 0.1
"""A sample with more than this fraction of NaN channels (all bands) gets sample flag 4."""

#: Sample-flag bits whose samples the gain estimate does not use (it bridges them).
GAIN_UNUSABLE_FLAGS = l2layout.SAMPLE_FLAGS_EXCLUDE | l2layout.FLAG_BRIGHT_SOURCE


def resolve_gain_filter(name: str) -> type:
    """The GainFilter class named by ``name``: a built-in name or an allow-listed dotted path."""
    if name in BUILTIN_FILTERS:
        return BUILTIN_FILTERS[name]
    if not check_allowed(name, []):
        raise ValueError(
            f"gain_filter_name {name!r}: not a built-in filter ({', '.join(BUILTIN_FILTERS)}) "
            "and not a dotted path under 'modules.'"
        )
    cls = resolve_callee(name)
    if not issubclass(cls, GainFilter):
        raise ValueError(f"gain_filter_name {name!r} is not a GainFilter subclass")
    return cls


def channel_mask(
    tsys_k,
    gain,
    m_k,
    sigma_k,
    offset_k,
    nan_fraction,
    channel_width_hz,
    sample_rate_hz: float,
    *,
    edge_fraction: float,
    centre_fraction: float,
    max_rms_ratio: float,
    max_nan_fraction: float,
) -> np.ndarray:
    """Channels used by the gain filter and the binning, shape (B, C) bool (docs/level2.md#gainfilterandbin
    step 2).

    ``tsys_k`` must be the noise-equivalent system temperature ``V_cold/G`` (K, vane K; what
    ``utils.vane.vane_calibration`` returns, docs/level2.md#tsys-conventions): ``sigma_k`` is the white
    noise of the data in vane K, so its radiometer expectation is ``tsys_k / sqrt(|Δν|/f_s)``. The legacy
    Tsys, which leaves out the cold load, would set the threshold 6–7 % too low.
    """
    tsys = np.asarray(tsys_k, dtype=np.float64)
    n_bands, n_chan = tsys.shape
    idx = np.arange(n_chan)
    n_edge = math.ceil(edge_fraction * n_chan)
    n_centre = math.ceil(centre_fraction * n_chan)
    keep = (idx >= n_edge) & (idx < n_chan - n_edge)
    if n_centre > 0:
        keep &= np.abs(idx - n_chan / 2.0) >= n_centre / 2.0
    mask = np.broadcast_to(keep, (n_bands, n_chan)).copy()
    for arr in (tsys, gain, m_k, sigma_k):
        a = np.asarray(arr, dtype=np.float64)
        mask &= np.isfinite(a) & (a > 0)
    mask &= np.isfinite(np.asarray(offset_k, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        radiometer = tsys / np.sqrt(np.asarray(channel_width_hz, dtype=np.float64) / sample_rate_hz)
        mask &= ~(np.asarray(sigma_k) > max_rms_ratio * radiometer)
    mask &= ~(np.asarray(nan_fraction) > max_nan_fraction)
    return mask


class GainFilterAndBin(StreamingStage):
    """Calibrate, subtract atmosphere and level, filter the gain and bin to ``n_freq_bin`` channels.

    Reads: the raw block (shared pass), vane gain and Tsys, and the block products ``auto_rms_k``,
    ``nan_count`` (NoiseStatsLevel1), ``atmosphere`` and ``median_k`` (AtmosphereInObservation).
    Writes: ``level2/binned_data`` and ``level2/<filtered_binned_data_name>`` (F, B, K, N) vane K,
    ``level2/central_freqs``, ``bandwidths``, ``channel_mask``, ``binning_weights``,
    ``level2/gain_filter/{gain, prior, z}``, sample flag 4; DB statistics ``n_nan_values`` and
    ``mean_atm_temp`` per (feed, band, binned channel).

    Parameters
    ----------
    n_freq_bin : int
        Binned channels per band; must divide the number of native channels.
    gain_filter_name : str
        ``'GainFilterDestriped'`` (gain baselines with the sky marginalised), ``'GainFilterBase'``,
        ``'GainFilterWithPrior'`` or a dotted path under ``modules.`` to a ``GainFilter`` subclass.
    gain_filter_kwargs : dict
        Keyword arguments of the filter.
    edge_fraction : float
        Fraction of channels masked at each end of every band.
    centre_fraction : float
        Width (fraction of the band) masked around the band-centre channel.
    max_rms_ratio : float
        Mask channels whose white noise exceeds this times the radiometer expectation
        ``Tsys/sqrt(|Δν|/f_s)``, with the noise-equivalent vane Tsys (docs/level2.md#tsys-conventions).
    max_nan_fraction : float
        Mask channels with more NaN samples than this fraction of the scan.
    min_z_ratio : float
        A feed and scan whose z/Σω (docs/level2.md#gain-baselines) is below this has a gain template
        degenerate with the sky model: no gain is removed there, one line is logged and the reason is
        recorded in the database; the observation goes on.
    median_stride : int
        Decimation of the per-channel level (median) subtracted after the atmosphere.
    filtered_binned_data_name : str
        Output name under ``level2/`` of the gain-filtered binned data.
    plot : bool
        Quicklooks of ĝ(t) and of the binned spectra per feed.
    plot_dir : str
        Directory of the PNGs.
    overwrite : bool
        Recompute even if ``filtered_binned_data_name`` is complete.
    """

    algorithm_version = 2  # 2: the new default gain filter (docs/operations.md#algorithm-versions)
    requires = ("auto_rms_k", "nan_count", "atmosphere", "median_k")
    reads = (*BLOCK_READS, l2layout.SAMPLE_FLAGS, l2layout.PIXEL_RA, l2layout.PIXEL_DEC)
    writes = (
        l2layout.BINNED_DATA,
        l2layout.CENTRAL_FREQS,
        l2layout.BANDWIDTHS,
        l2layout.CHANNEL_MASK,
        l2layout.BINNING_WEIGHTS,
        l2layout.GAIN_FILTER,
        l2layout.BINNED_FILTERED_DATA,
    )
    calibration = staticmethod(vane_calibration)

    def __init__(
        self,
        n_freq_bin: Annotated[int, Range(ge=1)] = 2,
        gain_filter_name: str = "GainFilterDestriped",
        gain_filter_kwargs: dict | None = None,
        edge_fraction: Annotated[float, Range(ge=0.0, lt=0.5)] = 0.05,
        centre_fraction: Annotated[float, Range(ge=0.0, lt=0.5)] = 0.05,
        max_rms_ratio: float = 2.0,
        max_nan_fraction: float = 0.1,
        min_z_ratio: Annotated[float, Range(ge=0.0, lt=1.0)] = 1e-5,
        median_stride: Annotated[int, Range(ge=1)] = 10,
        filtered_binned_data_name: str = "binned_filtered_data",
        plot: bool = False,
        plot_dir: str = "outputs/GainFilterAndBin",
        overwrite: bool = False,
    ) -> None:
        self.n_freq_bin = int(n_freq_bin)
        self.gain_filter_name = gain_filter_name
        self.gain_filter_kwargs = dict(gain_filter_kwargs or {})
        self.edge_fraction = float(edge_fraction)
        self.centre_fraction = float(centre_fraction)
        self.max_rms_ratio = float(max_rms_ratio)
        self.max_nan_fraction = float(max_nan_fraction)
        self.min_z_ratio = float(min_z_ratio)
        self.median_stride = int(median_stride)
        self.filtered_binned_data_name = filtered_binned_data_name
        self.plot = plot
        self.plot_dir = plot_dir
        self.overwrite = overwrite
        self.gain_filter: GainFilter = resolve_gain_filter(gain_filter_name)(**self.gain_filter_kwargs)

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """``binned_filtered_data`` is stored under ``level2/<filtered_binned_data_name>``."""
        if entry == l2layout.BINNED_FILTERED_DATA:
            return (l2layout.LEVEL2_GROUP.child(params["filtered_binned_data_name"]),)
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = []
        if not str(params["filtered_binned_data_name"]).replace("_", "").isalnum():
            problems.append("filtered_binned_data_name must be a plain dataset name")
        try:
            resolve_gain_filter(str(params["gain_filter_name"]))(**dict(params["gain_filter_kwargs"] or {}))
        except Exception as exc:
            problems.append(f"gain filter {params['gain_filter_name']!r}: {exc}")
        return problems

    # --- pass hooks -----------------------------------------------------------------------------
    @property
    def decimation_stride(self) -> int:
        """The level median reads every ``median_stride``-th sample (``block.decimated``)."""
        return self.median_stride

    def begin(self, ctx) -> None:
        n_feeds = len(ctx.feeds)
        n_bands, n_chan = ctx.frequency_ghz.shape
        n_bin = self.n_freq_bin
        if n_chan % n_bin:
            raise BadCOMAPFile(f"n_channels={n_chan} is not divisible by n_freq_bin={n_bin}")
        n_scans = len(ctx.scans)
        n_tod = len(ctx.mjd)
        l2 = ctx.l2.require_group(l2layout.LEVEL2_GROUP)
        tod_chunks = (1, 1, n_bin, min(max(n_tod, 1), 8192))
        for name in ("binned_data", self.filtered_binned_data_name):
            if name in l2:
                provenance.mark_incomplete(l2[name])
            ds = l2layout.replace_dataset(
                l2, name, (n_feeds, n_bands, n_bin, n_tod), np.float32, fillvalue=np.nan, chunks=tod_chunks
            )
            ds.attrs["unit"] = "K"
        for name in ("central_freqs", "bandwidths"):
            ds = l2layout.replace_dataset(
                l2, name, (n_feeds, n_bands, n_bin), np.float64, fillvalue=np.nan, chunks=None
            )
            ds.attrs["unit"] = "GHz"
        l2layout.replace_dataset(
            l2, "channel_mask", (n_feeds, n_bands, n_chan), bool, fillvalue=False, chunks=None
        )
        ds = l2layout.replace_dataset(
            l2,
            "binning_weights",
            (n_feeds, n_bands, n_chan, n_scans),
            np.float32,
            fillvalue=0.0,
            chunks=(1, n_bands, n_chan, max(n_scans, 1)),
        )
        ds.attrs["unit"] = "K^-2"
        gf = l2.require_group("gain_filter")
        provenance.mark_incomplete(gf)
        l2layout.replace_dataset(
            gf, "gain", (n_feeds, n_tod), np.float32, fillvalue=np.nan, chunks=(1, min(max(n_tod, 1), 65536))
        )
        ds = l2layout.replace_dataset(
            gf, "prior", (n_feeds, n_scans, 3), np.float32, fillvalue=np.nan, chunks=None
        )
        ds.attrs["columns"] = "sigma_red, alpha, f_ref_hz"
        ds = l2layout.replace_dataset(gf, "z", (n_feeds, n_scans), np.float64, fillvalue=np.nan, chunks=None)
        ds.attrs["description"] = "1ᵀΩ(I−Π)1: the per-sample noise variance of the base estimate is 1/z"
        ds = l2layout.replace_dataset(
            gf, "z_ratio", (n_feeds, n_scans), np.float64, fillvalue=np.nan, chunks=None
        )
        ds.attrs["description"] = "z/Σω: 1 = no degeneracy with the sky templates, 0 = fully degenerate"
        ds = l2layout.replace_dataset(
            gf, "baselines", (n_feeds, n_scans, 3), np.float32, fillvalue=np.nan, chunks=None
        )
        ds.attrs["columns"] = "sigma_y, sigma_step, sigma_level"
        group = np.arange(n_bands)[:, None] * n_bin + np.arange(n_chan)[None, :] // (n_chan // n_bin)
        ctx.scratch["GainFilterAndBin"] = {
            "group": group.astype(np.int32),
            "feed": self._new_feed_state(n_bands, n_chan),
            "usable_feeds": 0,
            "stats": [],
            "degenerate": {},
            "z_ratio": {},
        }

    @staticmethod
    def _new_feed_state(n_bands: int, n_chan: int) -> dict[str, np.ndarray]:
        return {
            "w_sum": np.zeros((n_bands, n_chan)),
            "n_nan": np.zeros((n_bands, n_chan), dtype=np.int64),
            "tau_sum": np.zeros((n_bands, n_chan)),
            "tau_n": np.zeros((n_bands, n_chan)),
        }

    def process_block(self, ctx, block) -> None:
        state = ctx.scratch["GainFilterAndBin"]
        feed_state = state["feed"]
        n_bands, n_chan, n = block.raw.shape
        n_bin = self.n_freq_bin
        sigma = np.asarray(block.products["auto_rms_k"], dtype=np.float64)
        nan_count = np.asarray(block.products["nan_count"])
        offset, tau, fitted = block.products["atmosphere"]
        m = np.asarray(block.products["median_k"], dtype=np.float64)
        inv_gain = inverse_gain(block.gain)
        with np.errstate(divide="ignore", invalid="ignore"):
            airmass = 1.0 / np.sin(np.radians(np.asarray(block.el_deg, dtype=np.float64)))
        tau_eff = np.where(np.isfinite(tau), tau, 0.0) if fitted else np.zeros_like(m)
        if not fitted and block.products.get("median_stride") == self.median_stride:
            # offset is then the scan median over the same samples: the remaining level is 0
            level = np.where(np.isfinite(offset), 0.0, np.nan)
        else:
            stride = self.median_stride
            level = decimated_nanmedian(
                block.decimated(stride), inv_gain, 1, offset=offset, tau=tau_eff, airmass=airmass[::stride]
            )
        mask = channel_mask(
            block.tsys,
            block.gain,
            m,
            sigma,
            offset + level,
            nan_count / max(n, 1),
            ctx.channel_width_hz,
            ctx.sample_rate_hz,
            edge_fraction=self.edge_fraction,
            centre_fraction=self.centre_fraction,
            max_rms_ratio=self.max_rms_ratio,
            max_nan_fraction=self.max_nan_fraction,
        )
        w_n, z = self.gain_filter.channel_weights(m, sigma, ctx.frequency_ghz, mask)
        wr = np.where(mask, w_n / np.where(mask, m, 1.0), 0.0)
        wb = np.where(mask, 1.0 / np.where(mask, sigma, 1.0) ** 2, 0.0)
        sums = filter_and_bin(
            block.raw,
            inv_gain,
            np.where(mask, offset, 0.0),
            np.where(mask, tau_eff, 0.0),
            airmass,
            np.where(mask, level, 0.0),
            wr,
            wb,
            np.where(mask, m, 0.0),
            state["group"],
            n_bands * n_bin,
            nan_count=nan_count,
        )
        l2 = ctx.l2[l2layout.LEVEL2_GROUP]
        sl = slice(block.start, block.stop)
        z_ratio = z / omega_sum(m, sigma, mask) if z > 0 else 0.0
        state["z_ratio"].setdefault(block.feed, []).append(z_ratio)
        if mask.any() and not z_ratio >= self.min_z_ratio:
            # the gain cannot be told from sky: remove none rather than noise or sky
            state["degenerate"].setdefault(block.feed, []).append((block.scan, z_ratio))
            est_gain, info = np.zeros(n), {}
        else:
            est = self.gain_filter.estimate(
                sums.r_sum,
                z,
                ctx.sample_rate_hz,
                feed=block.feed,
                samples=self._scan_samples(ctx, block, sums),
            )
            est_gain, info = est.gain, est.info
        gain_t = est_gain if mask.any() else np.full(n, np.nan)
        binned = sums.binned().reshape(n_bands, n_bin, n)
        filtered = sums.binned_residual(np.nan_to_num(gain_t)).reshape(n_bands, n_bin, n)

        l2["binned_data"][block.ifeed, :, :, sl] = binned.astype(np.float32)
        l2[self.filtered_binned_data_name][block.ifeed, :, :, sl] = filtered.astype(np.float32)
        l2["binning_weights"][block.ifeed, :, :, block.scan] = wb.astype(np.float32)
        l2["gain_filter/gain"][block.ifeed, sl] = gain_t.astype(np.float32)
        l2["gain_filter/prior"][block.ifeed, block.scan] = np.array(
            [info.get("sigma_red", np.nan), info.get("alpha", np.nan), info.get("f_ref_hz", np.nan)],
            dtype=np.float32,
        )
        l2["gain_filter/baselines"][block.ifeed, block.scan] = np.array(
            [info.get("sigma_y", np.nan), info.get("sigma_step", np.nan), info.get("sigma_level", np.nan)],
            dtype=np.float32,
        )
        l2["gain_filter/z"][block.ifeed, block.scan] = z
        l2["gain_filter/z_ratio"][block.ifeed, block.scan] = z_ratio
        nan_samples = sums.nan_count > NAN_SAMPLE_FRACTION * n_bands * n_chan
        if nan_samples.any():
            flags = l2["sample_flags"][block.ifeed, sl]
            flags[nan_samples] |= l2layout.FLAG_LEVEL1_NAN
            l2["sample_flags"][block.ifeed, sl] = flags

        feed_state["w_sum"] += wb * (n - nan_count)
        feed_state["n_nan"] += nan_count
        if fitted:
            used = mask & np.isfinite(tau)
            feed_state["tau_sum"] += np.where(used, tau, 0.0)
            feed_state["tau_n"] += used

    @staticmethod
    def _scan_samples(ctx, block, sums) -> ScanSamples:
        """Pointing and usable samples of a block: not flagged, no NaN in a gain-filter channel."""
        sl = slice(block.start, block.stop)
        flags = np.asarray(ctx.l2[l2layout.SAMPLE_FLAGS][block.ifeed, sl])
        usable = ((flags & GAIN_UNUSABLE_FLAGS) == 0) & (np.asarray(sums.r_nan) == 0)
        seed = np.random.SeedSequence([int(ctx.obsid), int(block.feed), int(block.scan)])
        return ScanSamples(
            np.asarray(ctx.l2[l2layout.PIXEL_RA][block.ifeed, sl], dtype=np.float64),
            np.asarray(ctx.l2[l2layout.PIXEL_DEC][block.ifeed, sl], dtype=np.float64),
            usable,
            seed=int(seed.generate_state(1)[0]),
            source_mask=(flags & l2layout.FLAG_BRIGHT_SOURCE) != 0,
            compact_target=getattr(ctx.file_info, "source_group", None) == "Calibrator",
        )

    def end_feed(self, ctx, feed: int) -> None:
        state = ctx.scratch["GainFilterAndBin"]
        fs = state["feed"]
        n_bands, n_chan = fs["w_sum"].shape
        n_bin = self.n_freq_bin
        per = n_chan // n_bin
        ifeed = ctx.ifeed(feed)
        w = fs["w_sum"].reshape(n_bands, n_bin, per)
        freq = ctx.frequency_ghz.reshape(n_bands, n_bin, per)
        width_ghz = (ctx.channel_width_hz / 1e9).reshape(n_bands, n_bin, per)
        with np.errstate(invalid="ignore", divide="ignore"):
            central = np.where(w.sum(-1) > 0, (w * freq).sum(-1) / w.sum(-1), np.nan)
        bandwidth = np.where(w.sum(-1) > 0, np.where(w > 0, width_ghz, 0.0).sum(-1), np.nan)
        l2 = ctx.l2[l2layout.LEVEL2_GROUP]
        l2["central_freqs"][ifeed] = central
        l2["bandwidths"][ifeed] = bandwidth
        l2["channel_mask"][ifeed] = fs["w_sum"] > 0
        n_nan = fs["n_nan"].reshape(n_bands, n_bin, per).sum(-1)
        tau_n = fs["tau_n"].reshape(n_bands, n_bin, per).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_tau = np.where(tau_n > 0, fs["tau_sum"].reshape(n_bands, n_bin, per).sum(-1) / tau_n, np.nan)
        rows = [
            {
                "obsid": ctx.obsid,
                "feed": int(feed),
                "band": b,
                "channel": j,
                "n_nan_values": int(n_nan[b, j]),
                "mean_atm_temp": float(mean_tau[b, j]),
            }
            for b in range(n_bands)
            for j in range(n_bin)
        ]
        state["stats"].extend(rows)
        ratios = state["z_ratio"].pop(int(feed), [])
        self.logger.debug(
            "obsid %d feed %d: z/Σω per scan %s", ctx.obsid, int(feed), " ".join(f"{r:.2e}" for r in ratios)
        )
        degenerate = state["degenerate"].pop(int(feed), [])
        if degenerate:
            worst = min(r for _, r in degenerate)
            reason = (
                f"gain filter: gain degenerate with the sky templates in {len(degenerate)} scan(s) "
                f"(z/Σω down to {worst:.1e} < {self.min_z_ratio:g}); no gain removed there"
            )
            self.logger.warning("obsid %d feed %d: %s", ctx.obsid, int(feed), reason)
            ctx.db.set_quality_flags(
                ctx.obsid, feeds=[int(feed)], default_channels=list(range(self.n_freq_bin)), comment=reason
            )
        if (fs["w_sum"] > 0).any():
            state["usable_feeds"] += 1
        else:
            self.logger.warning("feed %d has no usable channels", int(feed))
            ctx.db.set_quality_flags(
                ctx.obsid,
                feeds=[int(feed)],
                pipeline_ok=False,
                default_channels=list(range(n_bin)),
                comment="pipeline: feed has no usable channels",
            )
        state["feed"] = self._new_feed_state(n_bands, n_chan)

    def finish(self, ctx) -> None:
        state = ctx.scratch["GainFilterAndBin"]
        if state["usable_feeds"] == 0:
            raise BadCOMAPFile("no usable channels in any feed")
        ctx.db.bulk_update_quality_statistics(state["stats"])
        l2 = ctx.l2[l2layout.LEVEL2_GROUP]
        for name in ("central_freqs", "bandwidths", "channel_mask", "binning_weights", "binned_data"):
            self.mark_complete(l2[name])
        self.mark_complete(l2["gain_filter/gain"])
        self.mark_complete(l2["gain_filter/prior"])
        self.mark_complete(l2["gain_filter/z"])
        self.mark_complete(l2["gain_filter/z_ratio"])
        self.mark_complete(l2["gain_filter/baselines"])
        self.mark_complete(l2["gain_filter"])
        if self.plot:
            self._plot(ctx)
        self.mark_complete(l2[self.filtered_binned_data_name])

    def _plot(self, ctx) -> None:
        from utils.plotting import new_figure, save_figure

        l2 = ctx.l2[l2layout.LEVEL2_GROUP]
        mjd = ctx.mjd
        for ifeed, feed in enumerate(ctx.feeds):
            gain = l2["gain_filter/gain"][ifeed]
            fig, axes = new_figure(2, 1, figsize=(9.0, 6.0))
            t_s = (mjd - mjd[0]) * 86400.0
            axes[0].plot(t_s, gain, lw=0.5)
            axes[0].set_ylabel("ĝ(t)")
            axes[0].set_title(f"obsid {ctx.obsid} feed {int(feed)}: gain filter")
            binned = l2["binned_data"][ifeed]
            filtered = l2[self.filtered_binned_data_name][ifeed]
            for b in range(binned.shape[0]):
                axes[1].plot(t_s, binned[b, 0], lw=0.4, alpha=0.6)
                axes[1].plot(t_s, filtered[b, 0], lw=0.4)
            axes[1].set_xlabel("time since start (s)")
            axes[1].set_ylabel("bin 0 (K): binned and filtered")
            save_figure(fig, f"{self.plot_dir}/{ctx.obsid:07d}_feed{int(feed):02d}_gain_filter.png")
