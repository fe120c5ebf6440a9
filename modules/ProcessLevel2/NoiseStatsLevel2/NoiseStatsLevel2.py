"""NoiseStatsLevel2: white-noise rms and 1/f fits of the binned TOD, per segment
(docs/level2.md#noisestatslevel2)."""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
from numpy.typing import NDArray

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import BaseCOMAPModule
from utils import level2 as l2layout
from utils.errors import BadCOMAPFile
from utils.kernels import median_filter as _median_kernel
from utils.layout import DatasetPath
from utils.noise import one_over_f_model, segment_noise_stats

FLOAT_OUTPUTS: tuple[tuple[str, str], ...] = (
    ("sigma_white", "K"),
    ("sigma_red", "K"),
    ("alpha", ""),
    ("fknee_hz", "Hz"),
    ("auto_rms", "K"),
    ("good_fraction", ""),
)
"""Per-segment float32 outputs ``(F, B, K, S)`` and their units."""

DB_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sigma_white", "white_noise"),
    ("sigma_red", "red_noise"),
    ("alpha", "noise_index"),
    ("fknee_hz", "fknee"),
    ("auto_rms", "auto_rms"),
)
"""Output name → ``quality_flags`` column suffix (prefix ``filtered_`` or ``unfiltered_``)."""


def _targets(filtered: str | None, unfiltered: str | None, extra: Any) -> list[tuple[str, str | None]]:
    """``(dataset path, DB column prefix or None)`` per distinct dataset, in order."""
    out: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for path, prefix in ((filtered, "filtered_"), (unfiltered, "unfiltered_"), *((p, None) for p in extra)):
        if not path:
            continue
        path = str(path).strip("/")
        if path in seen:
            continue
        seen.add(path)
        out.append((path, prefix))
    return out


def _group_path(output_group_name: str, dataset: str) -> str:
    """``<output_group_name>/<basename of dataset>``."""
    return f"{output_group_name.strip('/')}/{posixpath.basename(dataset)}"


# ==================================================================================================
# The module
# ==================================================================================================
#: Parameters of this stage passed unchanged to :func:`utils.noise.segment_noise_stats`.
_FIT_SETTINGS = (
    "f_ref_hz",
    "n_psd_bins",
    "medfilt_length",
    "outlier_sigma",
    "min_good_fraction",
    "min_samples",
    "alpha_bounds",
    "alpha_init",
)


class NoiseStatsLevel2(BaseCOMAPModule):
    """White-noise rms and 1/f fit of every (feed, band, bin, scan) segment of binned datasets.

    Per dataset and segment (docs/level2.md#noisestatslevel2, algorithm in
    :func:`utils.noise.segment_noise_stats`): samples whose sample flags exclude them are missing
    (NaN), samples flagged as a bright source (flag 16, docs/level2.md#source-mask) are replaced by
    interpolation plus noise, then the clipped pair-difference rms, a short running median to find
    outliers, and — when enough samples are good — a fit of ``σ_red² |f/f_ref|^α + σ_white²`` to
    the log-binned periodogram.

    Outputs ``<output_group_name>/<basename>/{sigma_white, sigma_red, alpha, fknee_hz, auto_rms,
    good_fraction}`` (F, B, K, S) float32 and ``fit_ok`` bool, for every target dataset. DB: per
    (feed, band, bin), the nanmean over the scans with ``fit_ok`` of σ_white, σ_red, α, f_knee and
    auto_rms into the ``filtered_*`` (``filtered_dataset``) and ``unfiltered_*``
    (``unfiltered_dataset``) quality columns (NULL if no scan fitted). ``extra_datasets`` are
    written to HDF5 only.

    Parameters
    ----------
    filtered_dataset : str or None
        Dataset (F, B, K, N) whose statistics go to the ``filtered_*`` columns (None: skip).
    unfiltered_dataset : str or None
        Dataset whose statistics go to the ``unfiltered_*`` columns (None: skip).
    extra_datasets : list of str
        More datasets; HDF5 output only.
    f_ref_hz : float
        Reference frequency of the red-noise amplitude, Hz.
    n_psd_bins : int
        Number of log-spaced periodogram bins.
    medfilt_length : int
        Running-median window for the outlier mask, samples.
    outlier_sigma : float
        Outlier threshold in units of auto_rms.
    min_good_fraction : float
        Segments with a smaller fraction of good (finite, non-outlier) samples are not fitted.
    min_samples : int
        Segments with fewer finite samples are not fitted.
    alpha_bounds : [float, float]
        Bounds of the spectral index.
    alpha_init : float
        Start value of the spectral index.
    output_group_name : str
        Top-level level-2 group of the outputs.
    plot : bool
        Write one PNG per dataset and feed: the periodogram of every band and bin (longest scan)
        with the fitted model.
    plot_dir : str
        Directory of the PNGs.
    output_dir : str or None
        Alias of ``plot_dir`` (legacy name); wins when given.
    overwrite : bool
        Recompute even if the outputs are complete.
    """

    reads = (*l2layout.SKY_SAMPLES, l2layout.SAMPLE_FLAGS, l2layout.BINNED_CLEANED_DATA, l2layout.BINNED_DATA)
    moved_parameters = {
        name: "the bright-source mask is configured in level 2 (CreateLevel2File source_catalogue, "
        "bright_mask_map, bright_cut_k) and read from sample flag 16; see docs/level2.md#source-mask"
        for name in ("bright_mask_map", "bright_cut_k")
    }
    writes = (l2layout.NOISE_STATS,)

    def __init__(
        self,
        filtered_dataset: str | None = str(l2layout.BINNED_CLEANED_DATA),
        unfiltered_dataset: str | None = str(l2layout.BINNED_DATA),
        extra_datasets: list[str] | tuple[str, ...] = (),
        f_ref_hz: Annotated[float, Range(gt=0)] = 0.1,
        n_psd_bins: Annotated[int, Range(ge=4)] = 100,
        medfilt_length: Annotated[int, Range(ge=1)] = 50,
        outlier_sigma: Annotated[float, Range(gt=0)] = 3.0,
        min_good_fraction: Annotated[float, Range(ge=0.0, le=1.0)] = 0.95,
        min_samples: Annotated[int, Range(ge=8)] = 512,
        alpha_bounds: tuple[float, float] = (-4.0, 4.0),
        alpha_init: float = -1.5,
        output_group_name: str = l2layout.NOISE_STATS.split("/", 1)[0],
        plot: bool = False,
        plot_dir: str = "outputs/NoiseStatsLevel2",
        output_dir: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.filtered_dataset = filtered_dataset
        self.unfiltered_dataset = unfiltered_dataset
        self.extra_datasets = list(extra_datasets)
        self.f_ref_hz = f_ref_hz
        self.n_psd_bins = n_psd_bins
        self.medfilt_length = medfilt_length
        self.outlier_sigma = outlier_sigma
        self.min_good_fraction = min_good_fraction
        self.min_samples = min_samples
        self.alpha_bounds = list(alpha_bounds)
        self.alpha_init = alpha_init
        self.output_group_name = output_group_name
        self.plot = plot
        self.plot_dir = output_dir if output_dir is not None else plot_dir
        self.output_dir = output_dir
        self.overwrite = overwrite

    # ------------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[tuple[str, str | None]]:
        """``(dataset path, DB column prefix or None)`` for every dataset analysed, in order."""
        return _targets(self.filtered_dataset, self.unfiltered_dataset, self.extra_datasets)

    def _group_path(self, dataset: str) -> str:
        return _group_path(self.output_group_name, dataset)

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The datasets analysed (``filtered_dataset`` in place of ``binned_cleaned_data``, the
        others in place of ``binned_data``) and one output group per dataset."""
        targets = _targets(params["filtered_dataset"], params["unfiltered_dataset"], params["extra_datasets"])
        if entry == l2layout.NOISE_STATS:
            return tuple(_group_path(params["output_group_name"], path) for path, _ in targets)
        if entry == l2layout.BINNED_CLEANED_DATA:
            return tuple(path for path, prefix in targets if prefix == "filtered_")
        if entry == l2layout.BINNED_DATA:
            return tuple(path for path, prefix in targets if prefix != "filtered_")
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        datasets = [params["filtered_dataset"], params["unfiltered_dataset"], *list(params["extra_datasets"])]
        names: dict[str, str] = {}
        for d in datasets:
            if d is None or d == "":
                continue
            if not isinstance(d, str):
                problems.append(f"dataset names must be strings, got {d!r}")
                continue
            base = posixpath.basename(d.strip("/"))
            if base in names and names[base] != d.strip("/"):
                problems.append(f"datasets {names[base]!r} and {d!r} would share output group {base!r}")
            names[base] = d.strip("/")
        bounds, init = params["alpha_bounds"], params["alpha_init"]
        if len(bounds) == 2 and not bounds[0] < bounds[1]:
            problems.append(f"alpha_bounds must be [low, high] with low < high, got {bounds!r}")
        elif len(bounds) == 2 and not bounds[0] <= init <= bounds[1]:
            problems.append(f"alpha_init {init!r} lies outside alpha_bounds {list(bounds)}")
        group = params["output_group_name"]
        if not group.strip("/"):
            problems.append(f"output_group_name must be a non-empty string, got {group!r}")
        return problems

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        if self.already_processed(file_info):
            return
        ctx = self.observation_context(file_info)
        db_rows: dict[tuple[int, int, int], dict[str, Any]] = {}
        with ctx.open_l2("a") as l2:
            feeds = ctx.feeds
            scans = ctx.scans
            n_tod = int(ctx.mjd.shape[0])
            fs = ctx.sample_rate_hz
            for path, _ in self.targets:
                if path not in l2:
                    raise BadCOMAPFile(
                        f"level-2 file has no {path} (is the module that writes it before NoiseStatsLevel2?)"
                    )
                shape = l2[path].shape
                if len(shape) != 4 or shape[0] != feeds.size or shape[3] != n_tod:
                    raise BadCOMAPFile(
                        f"{path} has shape {shape}, expected (F={feeds.size}, B, K, N={n_tod})"
                    )
            top = l2.require_group(self.output_group_name.strip("/"))
            provenance.mark_incomplete(top)
            for path, prefix in self.targets:
                results = self._process_dataset(ctx, l2, path, feeds, scans, fs)
                self._write_group(l2, path, results, fs)
                if prefix is not None:
                    self._collect_db(ctx.obsid, feeds, results, prefix, db_rows)
            self.mark_complete(top)
        if db_rows:
            ctx.db.bulk_update_quality_statistics(list(db_rows.values()))

    def _process_dataset(
        self,
        ctx: Any,
        l2: Any,
        path: str,
        feeds: NDArray,
        scans: NDArray,
        fs: float,
    ) -> dict[str, NDArray]:
        src = l2[path]
        n_feeds, n_bands, n_bins, _ = src.shape
        n_scans = scans.shape[0]
        shape = (n_feeds, n_bands, n_bins, n_scans)
        out: dict[str, NDArray] = {
            name: np.full(shape, np.nan, dtype=np.float32) for name, _ in FLOAT_OUTPUTS
        }
        out["fit_ok"] = np.zeros(shape, dtype=bool)
        out["n_bright"] = np.zeros(shape, dtype=np.int64)
        lengths = scans[:, 1] - scans[:, 0]
        plot_scan = int(np.argmax(lengths)) if n_scans else -1
        rows_per_scan = n_bands * n_bins
        band_idx, bin_idx = np.divmod(np.arange(rows_per_scan), n_bins)

        def one_feed(ifeed: int) -> None:
            feed = int(feeds[ifeed])
            x = np.asarray(src[ifeed], dtype=np.float32)  # (B, K, N)
            flags = l2layout.read_sample_flags(l2, ifeed)
            x[..., l2layout.excluded_samples(flags)] = np.nan  # excluded samples are missing
            on_source = l2layout.bright_source_samples(flags)
            spectra: dict[int, tuple[NDArray, NDArray, NDArray]] = {}
            fits_for_plot: dict[int, tuple[float, float, float]] = {}
            for length in np.unique(lengths):
                if length <= 0:
                    continue
                group = np.flatnonzero(lengths == length)
                segs = np.stack([x[:, :, scans[s, 0] : scans[s, 1]] for s in group]).reshape(-1, int(length))
                bright_row = None
                if on_source.any():
                    bright_row = np.zeros(segs.shape, dtype=bool)
                    for j, s in enumerate(group):
                        hot = on_source[int(scans[s, 0]) : int(scans[s, 1])]
                        bright_row[j * rows_per_scan : (j + 1) * rows_per_scan] = hot
                # Replacement noise (bright and bad samples) is seeded per segment.
                scan_of_row = np.repeat(group, rows_per_scan)
                seeds = [
                    (
                        int(ctx.obsid),
                        feed,
                        int(band_idx[r % rows_per_scan]),
                        int(bin_idx[r % rows_per_scan]),
                        int(scan_of_row[r]),
                    )
                    for r in range(segs.shape[0])
                ]
                keep = []
                if self.plot and plot_scan in group:
                    j0 = int(np.flatnonzero(group == plot_scan)[0])
                    keep = list(range(j0 * rows_per_scan, (j0 + 1) * rows_per_scan))
                fit_settings = {name: getattr(self, name) for name in _FIT_SETTINGS}
                st = segment_noise_stats(
                    segs, fs, **fit_settings, bright=bright_row, seeds=seeds, keep_spectra=keep
                )
                for name, _unit in FLOAT_OUTPUTS:
                    vals = getattr(st, name).reshape(group.size, n_bands, n_bins)
                    out[name][ifeed][..., group] = np.moveaxis(vals, 0, -1)
                out["fit_ok"][ifeed][..., group] = np.moveaxis(
                    st.fit_ok.reshape(group.size, n_bands, n_bins), 0, -1
                )
                out["n_bright"][ifeed][..., group] = np.moveaxis(
                    st.n_bright.reshape(group.size, n_bands, n_bins), 0, -1
                )
                for r, spec in st.spectra.items():
                    rr = r % rows_per_scan
                    spectra[rr] = spec
                    if st.fit_ok[r]:
                        fits_for_plot[rr] = (
                            float(st.sigma_white[r]),
                            float(st.sigma_red[r]),
                            float(st.alpha[r]),
                        )
            plots[ifeed] = (spectra, fits_for_plot)

        # Feeds are independent and their segments seeded per segment, so they run in parallel
        # threads (numpy, the FFTs and the running-median kernel release the GIL) with results
        # independent of the order; plots are drawn afterwards, in this thread.
        plots: dict[int, tuple[dict, dict]] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, min(n_feeds, int(_median_kernel.max_threads()))))
        try:
            for future in [pool.submit(one_feed, ifeed) for ifeed in range(n_feeds)]:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for ifeed in range(n_feeds):
            feed = int(feeds[ifeed])
            spectra, fits_for_plot = plots[ifeed]
            if self.plot and spectra:
                self._plot_feed(ctx.obsid, path, feed, plot_scan, n_bands, n_bins, spectra, fits_for_plot)
            n_fit = int(out["fit_ok"][ifeed].sum())
            if n_fit < out["fit_ok"][ifeed].size:
                self.logger.debug(
                    "%s feed %d: %d of %d segments fitted", path, feed, n_fit, out["fit_ok"][ifeed].size
                )
        return out

    def _write_group(self, l2: Any, path: str, results: dict[str, NDArray], fs: float) -> None:
        grp_path = self._group_path(path)
        if grp_path in l2:
            provenance.mark_incomplete(l2[grp_path])
        grp = l2.require_group(grp_path)
        for name, unit in FLOAT_OUTPUTS:
            ds = self._replace(grp, name, results[name])
            if unit:
                ds.attrs["unit"] = unit
            self.mark_complete(ds)
        ds = self._replace(grp, "fit_ok", results["fit_ok"])
        self.mark_complete(ds)
        grp.attrs["dataset"] = path
        grp.attrs["f_ref_hz"] = float(self.f_ref_hz)
        grp.attrs["sample_rate_hz"] = float(fs)
        grp.attrs["model"] = "P(f) = sigma_red^2 |f/f_ref|^alpha + sigma_white^2 (periodogram |rfft|^2/N)"
        grp.attrs["n_bright_samples"] = int(results["n_bright"].sum())
        self.mark_complete(grp)

    @staticmethod
    def _replace(group: Any, name: str, data: np.ndarray) -> Any:
        if name in group:
            del group[name]
        return group.create_dataset(name, data=data, track_times=False)

    @staticmethod
    def _collect_db(
        obsid: int,
        feeds: NDArray,
        results: dict[str, NDArray],
        prefix: str,
        rows: dict[tuple[int, int, int], dict[str, Any]],
    ) -> None:
        ok = results["fit_ok"]
        means: dict[str, NDArray] = {}
        for name, _column in DB_COLUMNS:
            vals = np.where(ok, results[name].astype(np.float64), np.nan)
            good = np.isfinite(vals)
            n = good.sum(axis=-1)
            with np.errstate(invalid="ignore", divide="ignore"):
                means[name] = np.where(n > 0, np.where(good, vals, 0.0).sum(axis=-1) / n, np.nan)
        n_feeds, n_bands, n_bins = ok.shape[:3]
        for ifeed in range(n_feeds):
            feed = int(feeds[ifeed])
            for band in range(n_bands):
                for k in range(n_bins):
                    row = rows.setdefault(
                        (feed, band, k), {"obsid": int(obsid), "feed": feed, "band": band, "channel": k}
                    )
                    for name, column in DB_COLUMNS:
                        value = float(means[name][ifeed, band, k])
                        row[prefix + column] = value if math.isfinite(value) else None

    def _plot_feed(
        self,
        obsid: int,
        path: str,
        feed: int,
        scan: int,
        n_bands: int,
        n_bins: int,
        spectra: dict[int, tuple[NDArray, NDArray, NDArray]],
        fits: dict[int, tuple[float, float, float]],
    ) -> None:
        from utils.plotting import new_figure, save_figure

        base = posixpath.basename(path)
        fig, axes = new_figure(n_bands, 1, figsize=(7.0, 2.6 * n_bands), squeeze=False, sharex=True)
        for band in range(n_bands):
            ax = axes[band, 0]
            for k in range(n_bins):
                r = band * n_bins + k
                if r not in spectra:
                    continue
                f, p, _c = spectra[r]
                (line,) = ax.loglog(f, p, ".", ms=2, label=f"bin {k}")
                if r in fits:
                    sw, sr, al = fits[r]
                    ax.loglog(
                        f,
                        one_over_f_model(f, sw, sr, al, self.f_ref_hz),
                        "-",
                        color=line.get_color(),
                        lw=1,
                        label=f"fit: σw={sw:.2e} K, α={al:.2f}",
                    )
            ax.set_ylabel(f"band {band}  P [K²]")
            if ax.has_data():
                ax.legend(fontsize="x-small", loc="upper right")
        axes[0, 0].set_title(f"obsid {obsid} feed {feed} scan {scan}: {base}")
        axes[-1, 0].set_xlabel("frequency [Hz]")
        save_figure(fig, os.path.join(self.plot_dir, f"NoiseStatsLevel2_{obsid}_{base}_feed{feed:02d}.png"))
