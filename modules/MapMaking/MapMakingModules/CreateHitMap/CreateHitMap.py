"""CreateHitMap: hit count and integration time per pixel of a selection (coverage maps).

The worked example of a map product (docs/map_products.md): the job class takes the shared
parameter groups it needs, expands the job into one output per band, channel (and feed), reads
each file in a picklable task that counts the valid samples per pixel, adds the files' counts on
the job's geometry and writes a FITS file with HITS and TIME images.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modules.MapMaking.dispatch import JobInputs, MapJobFailed
from modules.MapMaking.fits_metadata import obslist_hdu, segment_records
from modules.MapMaking.fits_output import MapInfo, base_header, remove_stale_partials, write_atomic_fits
from modules.MapMaking.geometry import geometry_for
from modules.MapMaking.job_parameters import (
    CalibrationParameters,
    ChannelParameters,
    GeometryParameters,
    OutputParameters,
    SelectionParameters,
)
from modules.MapMaking.product import MapProduct, feed_label
from modules.MapMaking.read_data import (
    ChannelSelection,
    Level2DataReader,
    SegmentPlan,
    describe_counts,
    frame_coordinates,
    run_file_tasks,
)
from utils.level2 import MJD, PIXEL_DEC, PIXEL_RA
from utils.wcs import MapGeometry, world_to_pixel_index


@dataclass
class HitMapSpec:
    """One hit map: band, binned channel, the feeds it counts (None: all) and its file."""

    band: int
    channel: int
    feeds: list[int] | None
    output_path: Path


def count_hits(
    path: str, plans: list[SegmentPlan], settings: ChannelSelection, geometry: MapGeometry
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid samples per pixel of one file's accepted segments: (pixel indices, hit counts,
    seconds). A sample is valid when its ``tod_data_name`` value is finite and it lands on the map;
    each counts the file's sample time (median MJD step, s)."""
    pixels = []
    with h5py.File(path, "r", locking=False) as l2:
        sample_time_s = float(np.median(np.diff(l2[MJD][...]))) * 86400.0
        data = l2[settings.tod_data_name]
        for p in plans:
            sl = slice(p.start, p.stop)
            x = data[p.ifeed, settings.band, settings.channel, sl]
            lon, lat = frame_coordinates(
                l2[PIXEL_RA][p.ifeed, sl], l2[PIXEL_DEC][p.ifeed, sl], geometry.frame
            )
            idx = world_to_pixel_index(geometry, lon, lat)
            pixels.append(idx[np.isfinite(x) & (idx >= 0)])
    hit, counts = np.unique(np.concatenate(pixels) if pixels else np.zeros(0, np.int64), return_counts=True)
    return hit, counts, counts * sample_time_s


def _count_hits_task(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return count_hits(*args)


@dataclass(kw_only=True, eq=False)
class CreateHitMap(
    MapProduct,
    OutputParameters,
    SelectionParameters,
    ChannelParameters,
    CalibrationParameters,
    GeometryParameters,
):
    """Hit count and integration time per pixel, one map per band, channel (and feed).

    Each map is a FITS file ``{output_dir}/{map_name}_band{band}_ch{channel}_{feedlabel}_hits.fits``
    with a HITS image (valid samples per pixel) and a TIME image (integration time, s). The
    segments counted are those a CreateMap job with the same selection, channel cuts and
    calibration would take.

    The parameters shared with CreateMap are described once, in their parameter groups
    (:mod:`modules.MapMaking.job_parameters`): output, selection, channels, calibration and
    geometry. The red-noise cuts (``sigma_red_cutoff_k``, ``fknee_max_hz``) use the level-2 noise
    statistics here (docs/mapmaking.md#pre-pass-and-segment-selection). Below are those of
    CreateHitMap alone, and the shared ones whose meaning differs here.

    Parameters
    ----------
    quicklook : bool
        Write a PNG quicklook of the HITS image beside each FITS file.
    calibration : {'model', 'none'}
        ``'model'``: a segment is counted only when its CalibrationModel factor passes the cuts of
        ``calib_min_factor``, ``calib_max_factor`` and ``missing_calibration`` (hits are counts:
        nothing is divided); ``'none'``: no calibration cut.
    per_feed : bool
        One map per feed (``_feedNN``) instead of one for all feeds.
    """

    product = "map"

    per_feed: bool = False

    def expand(self, observations: list[Any], selection_feeds: list[int]) -> list[HitMapSpec]:
        """One hit map per band × channel (× feed with ``per_feed``)."""
        base_feeds = sorted(self.feeds) if self.feeds else sorted(selection_feeds)
        feed_sets = [[int(f)] for f in base_feeds] if self.per_feed else [None]
        outputs = []
        for band in self.bands:
            for channel in self.channels:
                for feeds in feed_sets:
                    label = feed_label(feeds or base_feeds)
                    name = f"{self.map_name}_band{band}_ch{channel}_{label}_hits.fits"
                    outputs.append(HitMapSpec(band, channel, feeds, Path(self.output_dir) / name))
        return outputs

    def output_identity(self, output: HitMapSpec) -> dict[str, Any]:
        return {"hits": {"band": output.band, "channel": output.channel, "feeds": output.feeds}}

    def _prepass(
        self, inputs: JobInputs, band: int, channel: int, feeds: list[int] | None
    ) -> Level2DataReader:
        given: dict[str, Any] = {"band": band, "channel": channel}
        if feeds is not None:
            given["feeds"] = feeds
        return Level2DataReader(self.settings(ChannelSelection, **given), inputs.table, inputs.flags)

    def _geometry(self, inputs: JobInputs) -> MapGeometry:
        def plans():
            reader = self._prepass(inputs, self.bands[0], self.channels[0], None)
            accepted = reader.prepass(inputs.observations)
            if not accepted:
                raise MapJobFailed(f"no data for map {self.map_name}: {describe_counts(reader.counts)}")
            return accepted

        return geometry_for(self, plans)

    def make(self, output: HitMapSpec, inputs: JobInputs, config_sha: str, executor=None) -> Path:
        """Count the valid samples of the accepted segments per pixel and write the hit map."""
        name = output.output_path.name
        geometry = inputs.shared("geometry", lambda: self._geometry(inputs))
        reader = self._prepass(inputs, output.band, output.channel, output.feeds)
        plans = reader.prepass(inputs.observations)
        if not plans:
            raise MapJobFailed(f"no data for map {name}: {describe_counts(reader.counts)}")
        by_file: dict[str, list[SegmentPlan]] = {}
        for p in plans:
            by_file.setdefault(p.path, []).append(p)
        tasks = [(path, segs, reader.settings, geometry) for path, segs in by_file.items()]
        with inputs.read_progress(len(tasks), name) as bar:
            parts = run_file_tasks(_count_hits_task, tasks, list(by_file), executor=executor, progress=bar)
        hits = np.zeros(geometry.n_pixels, dtype=np.int64)
        seconds = np.zeros(geometry.n_pixels, dtype=np.float64)
        for hit, counts, time_s in parts:
            np.add.at(hits, hit, counts)
            np.add.at(seconds, hit, time_s)
        if not hits.any():
            raise MapJobFailed(f"no data for map {name}: no valid sample lands on the map")
        return self._write(output, geometry, plans, hits, seconds, config_sha)

    def _write(self, output: HitMapSpec, geometry, plans, hits, seconds, config_sha: str) -> Path:
        """HITS (primary) and TIME images with the map header (WCS, observations, provenance) and the
        OBSLIST table (docs/map_products.md#obslist)."""
        from astropy.io import fits

        mjds = [p.mjd_mid for p in plans]
        info = MapInfo(
            object_name=self.map_name,
            band=output.band,
            channel=output.channel,
            feeds=sorted({p.feed for p in plans}),
            obsids=sorted({p.obsid for p in plans}),
            mjd_min=min(mjds),
            mjd_max=max(mjds),
            freq_hz=float(np.median([p.freq_ghz for p in plans])) * 1e9,
            bandwidth_hz=float(np.nanmedian([p.bandwidth_ghz for p in plans])) * 1e9,
            n_segment=len(plans),
            n_sample=int(hits.sum()),
            segments=segment_records(plans, lambda _p: [output.band]),
        )
        params = dict(self.parameters)
        params.update(band=output.band, channel=output.channel)
        header = base_header(geometry, info, params, config_sha)
        header["BUNIT"] = ("", "valid samples per pixel")
        primary = fits.PrimaryHDU(hits.reshape(geometry.shape).astype(np.int32), header=header)
        primary.header["EXTNAME"] = "HITS"
        time_header = geometry.fits_header()
        time_header["BUNIT"] = ("s", "integration time")
        time_hdu = fits.ImageHDU(
            seconds.reshape(geometry.shape).astype(np.float32), header=time_header, name="TIME"
        )
        remove_stale_partials(output.output_path)
        path = write_atomic_fits(output.output_path, [primary, time_hdu, obslist_hdu(info.segments)])
        if self.quicklook:
            _quicklook(
                path,
                hits.reshape(geometry.shape),
                header,
                f"{self.map_name} band {output.band} ch {output.channel}",
            )
        return path


def _quicklook(fits_path: Path, hits: np.ndarray, header, title: str) -> Path:
    """A PNG of the HITS image on the sky beside the FITS file (docs/map_products.md#quicklooks)."""
    from utils.plotting import save_figure
    from utils.sky_plot import draw_sky_image, new_sky_figure

    fig, ax, _ = new_sky_figure(header, figsize=(7.0, 6.0))
    coverage = hits > 0
    draw_sky_image(
        ax,
        np.where(coverage, hits, np.nan),
        coverage=coverage,
        label="valid samples",
        percentiles=(0.0, 99.5),
        stretch="linear",
    )
    ax.set_title(f"{title}: hits")
    return save_figure(fig, fits_path.with_suffix(".png"))


__all__ = ["CreateHitMap", "HitMapSpec", "count_hits"]
