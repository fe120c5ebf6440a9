"""PostBinCleaning: high-pass the binned TOD and refit the airmass term into a new dataset
(docs/level2.md#postbincleaning).

The input (default ``level2/binned_filtered_data``) is never modified, so the step is idempotent:
rerunning it, with or without ``overwrite``, gives bit-identical output.
"""

from __future__ import annotations

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
from utils.filters import running_median_nan
from utils.kernels import median_filter as _median_kernel
from utils.layout import DatasetPath
from utils.noise import nanmedian_rows, pair_difference_rms

STATS_GROUP = l2layout.POST_BIN_CLEANING
"""Group of the per-segment bookkeeping (``n_outliers``, ``atmosphere_k``)."""

NOT_EVALUATED = -1
"""``n_outliers`` of a segment that was not cleaned by the running median (short or empty)."""

_CHUNK_ELEMENTS = 1 << 22
"""Segments are cleaned in chunks of about this many samples (rows × n) to bound memory."""


def _airmass_fit(
    x: NDArray[np.float64], u: NDArray[np.float64], use: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Least-squares ``x ≈ a + b·u`` per row over ``use``; centred float64 sums, no row loop.

    Returns ``a``, ``b`` (R,) and ``ok`` (at least 3 samples and a non-degenerate ``u``).
    """
    n = use.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u_mean = np.where(use, u, 0.0).sum(axis=-1) / n
        x_mean = np.where(use, x, 0.0).sum(axis=-1) / n
        du = np.where(use, u - u_mean[:, None], 0.0)
        dx = np.where(use, x - x_mean[:, None], 0.0)
        suu = (du * du).sum(axis=-1)
        sux = (du * dx).sum(axis=-1)
        b = sux / suu
        a = x_mean - b * u_mean
    ok = (n >= 3) & (suu > 0) & np.isfinite(a) & np.isfinite(b)
    return a, b, ok


OUTLIER_DILATION = 10
"""Samples on each side of an outlier that are also left out of the final running median."""


def _running_median(x: NDArray, window: int) -> NDArray:
    """Running median along the last axis whose window shrinks at the ends of the segment.

    ``running_median_nan`` pads with the end samples ("nearest"): within a quarter window of either
    end the median is pulled to that one sample, and its noise would be subtracted from up to 15 s
    of data. Padding with NaN makes the median there that of the samples that exist.
    """
    half = int(window) // 2
    pad = [(0, 0)] * (np.ndim(x) - 1) + [(half, half)]
    padded = np.pad(np.asarray(x), pad, constant_values=np.nan)
    return running_median_nan(padded, window)[..., half : half + np.shape(x)[-1]]


def _dilate(mask: NDArray[np.bool_], half_width: int) -> NDArray[np.bool_]:
    """``mask`` grown by ``half_width`` samples on each side along the last axis."""
    if half_width <= 0 or not mask.any():
        return mask
    c = np.cumsum(
        np.pad(mask.astype(np.int32), [(0, 0)] * (mask.ndim - 1) + [(half_width + 1, half_width)]), axis=-1
    )
    return (c[..., 2 * half_width + 1 :] - c[..., : -(2 * half_width + 1)]) > 0


def clean_segments(
    x: NDArray,
    inv_sin_el: NDArray,
    fit_airmass: NDArray[np.bool_],
    *,
    medfilt_length: int = 3000,
    outlier_sigma: float = 5.0,
    subtract_running_median: bool = True,
) -> tuple[NDArray[np.float32], NDArray[np.int32], NDArray[np.float64], NDArray[np.bool_]]:
    """Clean segments of equal length (docs/level2.md#postbincleaning steps 1–5), one (band, bin, scan)
    segment per row.

    1. Rows with ``n_f ≤ medfilt_length`` finite samples: ``x − nanmedian(x)`` (short).
    2. ``med = running_median_nan(x, L)``, ``r = x − med`` (all long rows in one call, threaded).
    3. ``σ`` = clipped pair-difference rms of r; outliers ``O = |r| > outlier_sigma·σ``.
    4. Rows with ``fit_airmass``: fit ``a + b/sin(el)`` on finite samples outside O (at least 3)
       and subtract the model at **all** samples (outliers included; samples whose elevation is
       not finite become NaN).
    5. ``y = x' −`` the running median of ``x'`` without the outliers and 10 samples around each,
       its window shrinking at the segment ends, if ``subtract_running_median``, else
       ``x' − nanmedian(x')``.

    Parameters
    ----------
    x : ndarray, shape (R, n)
        Binned TOD segments, K (float32 is kept); NaN = missing.
    inv_sin_el : ndarray, shape (R, n) or (n,)
        ``1/sin(el)`` of each sample (airmass); only used on rows with ``fit_airmass``.
    fit_airmass : ndarray of bool, shape (R,)
        Rows whose scan spans at least ``min_elevation_range_deg``.
    medfilt_length : int
        Running-median window L, samples.
    outlier_sigma : float
        Outlier threshold in units of σ.
    subtract_running_median : bool
        High-pass by the running median (else subtract the median).

    Returns
    -------
    y : ndarray float32, shape (R, n)
        Cleaned segments, K.
    n_outliers : ndarray int32, shape (R,)
        Outlier samples per row; ``NOT_EVALUATED`` (−1) for short rows.
    atmosphere_k : ndarray float64, shape (R,)
        Fitted airmass coefficient b (K per unit airmass); NaN where not fitted.
    short : ndarray of bool, shape (R,)
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (R, n), got {x.shape}")
    n_rows, n = x.shape
    window = int(medfilt_length)
    fit_airmass = np.broadcast_to(np.asarray(fit_airmass, dtype=bool), (n_rows,))
    step = max(1, _CHUNK_ELEMENTS // max(n, 1))
    if n_rows > step:  # bound memory: the float64 temporaries cover one chunk of rows at a time
        u_rows = np.broadcast_to(np.asarray(inv_sin_el, dtype=np.float64), x.shape)
        parts = [
            clean_segments(
                x[i : i + step],
                u_rows[i : i + step],
                fit_airmass[i : i + step],
                medfilt_length=window,
                outlier_sigma=outlier_sigma,
                subtract_running_median=subtract_running_median,
            )
            for i in range(0, n_rows, step)
        ]
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]
    y = np.full(x.shape, np.nan, dtype=np.float32)
    n_outliers = np.full(n_rows, NOT_EVALUATED, dtype=np.int32)
    atmosphere_k = np.full(n_rows, np.nan)
    n_f = np.isfinite(x).sum(axis=-1)
    short = n_f <= window
    if short.any():
        xs = x[short]
        y[short] = xs - nanmedian_rows(xs)[:, None]
    long_rows = np.flatnonzero(~short)
    if long_rows.size == 0:
        return y, n_outliers, atmosphere_k, short

    xl = x[long_rows]
    med = running_median_nan(xl, window)
    resid = xl - med
    sigma = pair_difference_rms(resid, estimator="clipped_std")
    with np.errstate(invalid="ignore"):
        outlier = np.abs(resid) > outlier_sigma * sigma[:, None]
    n_outliers[long_rows] = outlier.sum(axis=-1)
    del resid

    xp = xl
    changed = np.zeros(long_rows.size, dtype=bool)
    fit_sel = np.flatnonzero(fit_airmass[long_rows])
    if fit_sel.size:
        u = np.broadcast_to(np.asarray(inv_sin_el, dtype=np.float64), x.shape)[long_rows[fit_sel]]
        xf = xl[fit_sel].astype(np.float64)
        use = np.isfinite(xf) & np.isfinite(u) & ~outlier[fit_sel]
        a, b, ok = _airmass_fit(xf, u, use)
        if ok.any():
            rows_ok = fit_sel[ok]
            model = a[ok, None] + b[ok, None] * u[ok]
            xp = xl.copy()
            xp[rows_ok] = (xf[ok] - model).astype(np.float32)
            changed[rows_ok] = True
            atmosphere_k[long_rows[rows_ok]] = b[ok]
    if subtract_running_median:
        # the level under a bright source must come from the samples around it: a source crossed
        # often in one window (a Lissajous on a calibrator) would otherwise lift the median by
        # ~1.25·f·σ (f its share of the window) and be subtracted from itself
        # rows with outliers or a refit: the whole median again, outliers left out; the others keep
        # the first median in the interior and only need the ends recomputed with a shrinking window
        redo = changed | outlier.any(axis=-1)
        if redo.any():
            xr = xp[redo]
            med_r = _running_median(np.where(_dilate(outlier[redo], OUTLIER_DILATION), np.nan, xr), window)
            empty = ~np.isfinite(med_r) & np.isfinite(xr)  # a window of outliers only
            if empty.any():
                med_r = np.where(empty, _running_median(xr, window), med_r)
            med[redo] = med_r
        keep = ~redo
        half = window // 2
        if keep.any() and half > 0:
            ends = min(2 * half, n)
            med[keep, :half] = _running_median(xp[keep, :ends], window)[:, :half]
            med[keep, n - half :] = _running_median(xp[keep, n - ends :], window)[:, ends - half :]
        y[long_rows] = xp - med
    else:
        y[long_rows] = xp - nanmedian_rows(xp)[:, None]
    return y, n_outliers, atmosphere_k, short


class PostBinCleaning(BaseCOMAPModule):
    """Running-median high-pass and outlier-robust airmass refit of the binned TOD
    (docs/level2.md#postbincleaning).

    Samples whose sample flags exclude them (docs/level2.md#sample-flags) are treated as missing: NaN
    in the input of the cleaning and NaN in the output. For each (band, bin, scan) segment of
    ``input_dataset`` (F, B, K, N): short segments are
    median-subtracted; otherwise outliers against a running median are found from the clipped
    pair-difference σ, ``a + b/sin(el)`` is refitted outside them when the scan spans at least
    ``min_elevation_range_deg`` and subtracted at all samples, and the running median (or the
    median) is subtracted. Outliers are counted, never removed: bright compact sources are
    "outliers" against a 60 s median, and spike removal belongs to the map reader.

    Outputs: ``output_dataset`` (F, B, K, N) float32 K (NaN outside scans),
    ``level2/post_bin_cleaning/n_outliers`` (F, B, K, S) int32 (−1 = segment not evaluated) and
    ``level2/post_bin_cleaning/atmosphere_k`` (F, B, K, S) float32 (NaN = not fitted); DB statistic
    ``n_spikes`` per (feed, band, bin) = outliers summed over the evaluated scans (NULL if none).

    Parameters
    ----------
    input_dataset : str
        Source dataset (F, B, K, N), never modified.
    output_dataset : str
        Destination dataset; also the done-check.
    medfilt_length : int
        Running-median window, samples (3000 = 60 s at 50 Hz).
    outlier_sigma : float
        Samples with ``|x − running median| > outlier_sigma · σ`` are excluded from the refit.
    min_elevation_range_deg : float
        Refit the airmass term only when the scan's elevation range is at least this, deg.
    subtract_running_median : bool
        High-pass by the running median (else subtract the scan median).
    plot : bool
        Write one quicklook PNG per feed (the longest scan of bin 0 of each band, before/after).
    plot_dir : str
        Directory of the PNGs.
    overwrite : bool
        Redo even if ``output_dataset`` is complete.
    """

    reads = (
        l2layout.FEEDS,
        l2layout.MJD,
        l2layout.SCAN_EDGES,
        l2layout.PIXEL_EL,
        l2layout.SAMPLE_FLAGS,
        l2layout.BINNED_FILTERED_DATA,
    )
    writes = (l2layout.BINNED_CLEANED_DATA,)
    # 2: the final running median leaves out the outliers (docs/operations.md#algorithm-versions)
    algorithm_version = 2

    def __init__(
        self,
        input_dataset: str = str(l2layout.BINNED_FILTERED_DATA),
        output_dataset: str = str(l2layout.BINNED_CLEANED_DATA),
        medfilt_length: Annotated[int, Range(ge=1)] = 3000,
        outlier_sigma: Annotated[float, Range(gt=0)] = 5.0,
        min_elevation_range_deg: Annotated[float, Range(ge=0)] = 2.0,
        subtract_running_median: bool = True,
        plot: bool = False,
        plot_dir: str = "outputs/PostBinCleaning",
        overwrite: bool = False,
    ) -> None:
        self.input_dataset = input_dataset
        self.output_dataset = output_dataset
        self.medfilt_length = medfilt_length
        self.outlier_sigma = outlier_sigma
        self.min_elevation_range_deg = min_elevation_range_deg
        self.subtract_running_median = subtract_running_median
        self.plot = plot
        self.plot_dir = plot_dir
        self.overwrite = overwrite

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """``input_dataset`` and ``output_dataset`` name the datasets read and written."""
        if entry == l2layout.BINNED_FILTERED_DATA:
            return (str(params["input_dataset"]).strip("/"),)
        if entry == l2layout.BINNED_CLEANED_DATA:
            return (str(params["output_dataset"]).strip("/"),)
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        src, dst = params["input_dataset"], params["output_dataset"]
        for name, value in (("input_dataset", src), ("output_dataset", dst)):
            if not isinstance(value, str) or not value.strip("/"):
                problems.append(f"{name} must be a non-empty HDF5 path, got {value!r}")
        if isinstance(src, str) and isinstance(dst, str) and src.strip("/") == dst.strip("/"):
            problems.append(
                f"output_dataset must differ from input_dataset ({src!r}); the input is never modified"
            )
        return problems

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        if self.already_processed(file_info):
            return
        ctx = self.observation_context(file_info)
        src_path = self.input_dataset.strip("/")
        dst_path = self.output_dataset.strip("/")
        with ctx.open_l2("a") as l2:
            if src_path not in l2:
                raise BadCOMAPFile(
                    f"level-2 file has no {src_path} (is GainFilterAndBin listed before PostBinCleaning?)"
                )
            src = l2[src_path]
            status = src.attrs.get("status")
            if isinstance(status, bytes):
                status = status.decode()
            if status is not None and status != "complete":
                raise BadCOMAPFile(f"{src_path} is incomplete (status {status!r})")
            feeds = ctx.feeds
            scans = ctx.scans
            n_tod = int(ctx.mjd.shape[0])
            if src.ndim != 4 or src.shape[0] != feeds.size or src.shape[3] != n_tod:
                raise BadCOMAPFile(
                    f"{src_path} has shape {src.shape}, expected (F={feeds.size}, B, K, N={n_tod})"
                )
            el_path = l2layout.PIXEL_EL
            if el_path not in l2:
                raise BadCOMAPFile(f"level-2 file has no {el_path}")
            el_ds = l2[el_path]
            n_feeds, n_bands, n_bins, _ = src.shape
            n_scans = scans.shape[0]

            dst = self._prepare_output(l2, src, dst_path)
            if STATS_GROUP in l2:
                provenance.mark_incomplete(l2[STATS_GROUP])
            n_out = np.full((n_feeds, n_bands, n_bins, n_scans), NOT_EVALUATED, dtype=np.int32)
            atm = np.full((n_feeds, n_bands, n_bins, n_scans), np.nan, dtype=np.float32)
            lengths = scans[:, 1] - scans[:, 0]

            def clean_feed(ifeed: int) -> tuple[NDArray, NDArray, int]:
                n_short = 0
                x = np.asarray(src[ifeed], dtype=np.float32)  # (B, K, N)
                x[..., l2layout.excluded_samples(l2layout.read_sample_flags(l2, ifeed))] = np.nan
                el = np.asarray(el_ds[ifeed], dtype=np.float64)
                y = np.full(x.shape, np.nan, dtype=np.float32)
                for length in np.unique(lengths):
                    if length <= 0:
                        continue
                    group = np.flatnonzero(lengths == length)
                    segs = np.stack([x[:, :, scans[s, 0] : scans[s, 1]] for s in group])  # (G, B, K, n)
                    els = np.stack([el[scans[s, 0] : scans[s, 1]] for s in group])  # (G, n)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        inv_sin = 1.0 / np.sin(np.radians(els))
                    fit = np.array([self._spans_elevation(e) for e in els])
                    rows_per_scan = n_bands * n_bins
                    yy, nn, aa, short = clean_segments(
                        segs.reshape(-1, int(length)),
                        np.repeat(inv_sin, rows_per_scan, axis=0),
                        np.repeat(fit, rows_per_scan),
                        medfilt_length=self.medfilt_length,
                        outlier_sigma=self.outlier_sigma,
                        subtract_running_median=self.subtract_running_median,
                    )
                    n_short += int(short.sum())
                    yy = yy.reshape(group.size, n_bands, n_bins, int(length))
                    for j, s in enumerate(group):
                        y[:, :, scans[s, 0] : scans[s, 1]] = yy[j]
                    n_out[ifeed][..., group] = np.moveaxis(nn.reshape(group.size, n_bands, n_bins), 0, -1)
                    atm[ifeed][..., group] = np.moveaxis(aa.reshape(group.size, n_bands, n_bins), 0, -1)
                return x, y, n_short

            # Feeds are independent: they are cleaned in parallel threads (numpy and the
            # running-median kernel release the GIL); results are written and drawn in feed order.
            n_short = 0
            pool = ThreadPoolExecutor(max_workers=max(1, min(n_feeds, int(_median_kernel.max_threads()))))
            try:
                for ifeed, future in enumerate([pool.submit(clean_feed, i) for i in range(n_feeds)]):
                    x, y, short = future.result()
                    n_short += short
                    dst[ifeed] = y
                    if self.plot:
                        self._plot_feed(ctx.obsid, int(feeds[ifeed]), x, y, scans)
                    del x, y
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if n_short:
                self.logger.info(
                    "%d of %d segments have <= %d finite samples: median-subtracted only",
                    n_short,
                    n_feeds * n_bands * n_bins * n_scans,
                    self.medfilt_length,
                )

            grp = l2.require_group(STATS_GROUP)
            d1 = self._replace(grp, "n_outliers", n_out)
            d1.attrs["unit"] = "samples"
            d1.attrs["missing_value"] = NOT_EVALUATED
            d1.attrs["description"] = "samples excluded from the airmass refit; -1 = segment not evaluated"
            d2 = self._replace(grp, "atmosphere_k", atm)
            d2.attrs["unit"] = "K"
            d2.attrs["description"] = "refitted airmass coefficient b of a + b/sin(el); NaN = not fitted"
            grp.attrs["input_dataset"] = src_path
            grp.attrs["output_dataset"] = dst_path
            grp.attrs["n_short_segments"] = n_short
            self.mark_complete(d1)
            self.mark_complete(d2)
            self.mark_complete(grp)
            self.mark_complete(dst)  # the done-check: last

        self._record_db(ctx, feeds, n_out)

    # ------------------------------------------------------------------------------------------
    def _spans_elevation(self, el_deg: NDArray) -> bool:
        finite = el_deg[np.isfinite(el_deg)]
        return finite.size > 0 and float(np.ptp(finite)) >= float(self.min_elevation_range_deg)

    @staticmethod
    def _prepare_output(l2: Any, src: Any, path: str) -> Any:
        if path in l2:
            ds = l2[path]
            if ds.shape == src.shape and ds.dtype == np.float32:
                provenance.mark_incomplete(ds)
                return ds
            del l2[path]
        parent, name = posixpath.split(path)
        grp = l2.require_group(parent) if parent else l2
        ds = grp.create_dataset(
            name, shape=src.shape, dtype=np.float32, chunks=src.chunks, fillvalue=np.nan, track_times=False
        )
        provenance.mark_incomplete(ds)
        ds.attrs["unit"] = "K"
        return ds

    @staticmethod
    def _replace(group: Any, name: str, data: np.ndarray) -> Any:
        if name in group:
            del group[name]
        return group.create_dataset(name, data=data, track_times=False)

    def _record_db(self, ctx: Any, feeds: NDArray, n_out: NDArray) -> None:
        evaluated = n_out >= 0
        counts = evaluated.sum(axis=-1)
        totals = np.where(evaluated, n_out, 0).sum(axis=-1)
        rows = []
        for ifeed, feed in enumerate(feeds):
            for band in range(n_out.shape[1]):
                for k in range(n_out.shape[2]):
                    value = int(totals[ifeed, band, k]) if counts[ifeed, band, k] > 0 else None
                    rows.append(
                        {"obsid": ctx.obsid, "feed": int(feed), "band": band, "channel": k, "n_spikes": value}
                    )
        if rows:
            ctx.db.bulk_update_quality_statistics(rows)

    def _plot_feed(self, obsid: int, feed: int, x: NDArray, y: NDArray, scans: NDArray) -> None:
        from utils.plotting import new_figure, save_figure

        if scans.shape[0] == 0:
            return
        s = int(np.argmax(scans[:, 1] - scans[:, 0]))
        a, b = int(scans[s, 0]), int(scans[s, 1])
        n_bands = x.shape[0]
        fig, axes = new_figure(n_bands, 1, figsize=(9.0, 2.2 * n_bands), squeeze=False, sharex=True)
        t = np.arange(a, b)
        for band in range(n_bands):
            ax = axes[band, 0]
            before = x[band, 0, a:b]
            after = y[band, 0, a:b]
            ax.plot(
                t,
                before - np.nanmedian(before) if np.isfinite(before).any() else before,
                lw=0.5,
                label=f"input ({posixpath.basename(self.input_dataset)}), median removed",
            )
            ax.plot(t, after, lw=0.5, label=f"output ({posixpath.basename(self.output_dataset)})")
            ax.set_ylabel(f"band {band} bin 0 [K]")
        axes[0, 0].set_title(f"obsid {obsid} feed {feed} scan {s}: PostBinCleaning")
        axes[0, 0].legend(loc="upper right", fontsize="small")
        axes[-1, 0].set_xlabel("sample")
        save_figure(fig, os.path.join(self.plot_dir, f"PostBinCleaning_{obsid}_feed{feed:02d}.png"))
