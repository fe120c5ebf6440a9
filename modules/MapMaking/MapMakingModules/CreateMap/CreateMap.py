"""CreateMap: one destriped continuum map per (band, channel, split) of a selection (04 §7)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modules.pipeline_control.Pipeline import MapJob
from modules.pipeline_control.provenance import sha256_of

log = logging.getLogger("comap.CreateMap")

SPLIT_MODES = (
    "none",
    "per_feed",
    "day_night",
    "odd_even_scans",
    "first_second_half",
    "alternate_obs",
    "custom",
)
TWO_WAY = {
    "day_night": ("_day", "_night"),
    "odd_even_scans": ("_jkA", "_jkB"),
    "first_second_half": ("_jkA", "_jkB"),
    "alternate_obs": ("_jkA", "_jkB"),
}

READER_KEYS = (
    "feeds",
    "use_quality_flags",
    "auto_rms_cap_k",
    "sigma_red_cutoff_k",
    "fknee_max_hz",
    "calibration",
    "calib_source",
    "calib_min_factor",
    "calib_max_factor",
    "missing_calibration",
    "detrend",
    "detrend_order",
    "detrend_mask_abs_b_deg",
    "spike_sigma",
    "spike_medfilt_length",
    "spike_dilate",
    "bright_mask_map",
    "bright_cut_k",
    "bright_downweight",
    "write_mean_azel",
    "tod_data_name",
)


def feed_label(feeds: list[int]) -> str:
    """Compress a feed list into ranges: ``feed01to19``, ``feed01to03_07``, ``feed05``."""
    feeds = sorted({int(f) for f in feeds})
    if not feeds:
        return "feednone"
    parts = []
    start = prev = feeds[0]
    for f in feeds[1:] + [None]:
        if f is not None and f == prev + 1:
            prev = f
            continue
        parts.append(f"{start:02d}" if start == prev else f"{start:02d}to{prev:02d}")
        if f is not None:
            start = prev = f
    return "feed" + "_".join(parts)


def common_job_problems(params: dict[str, Any]) -> list[str]:
    """Checks shared by the map and cube jobs: calibration, dynamic WCS, destriper offsets, wcs_def."""
    from modules.MapMaking.geometry import wcs_def_problems

    problems = []
    if params.get("calibration") not in ("model", "none"):
        problems.append("calibration must be 'model' or 'none'")
    if params.get("missing_calibration") not in ("skip", "unity"):
        problems.append("missing_calibration must be 'skip' or 'unity'")
    if params.get("dynamic_frame") not in ("galactic", "icrs"):
        problems.append("dynamic_frame must be 'galactic' or 'icrs'")
    if int(params.get("offset_length", 1)) < 1:
        problems.append("offset_length must be >= 1")
    return problems + wcs_def_problems(params.get("wcs_def", "dynamic"), params.get("wcs_def_file"))


@dataclass
class MapJobSpec:
    """One concrete map: band, channel, split and the observations/segments it takes.

    ``obsids`` restricts the observations (None = the whole selection); ``segment_filter`` names a
    segment-level split ('day', 'night', 'even', 'odd'); ``feeds`` restricts the feeds.
    """

    band: int
    channel: int
    suffix: str = ""
    feeds: list[int] | None = None
    obsids: list[int] | None = None
    segment_filter: str | None = None
    label_feeds: list[int] = field(default_factory=list)
    output_path: Path = Path()
    pair: tuple[str, str] | None = None


class CreateMap(MapJob):
    """Destriped continuum maps of a selection of observations, one per band, channel and split.

    Each map is a FITS file with DESTRIPED, NAIVE, HITS, RMS and MASK HDUs.

    Parameters
    ----------
    map_name : str
        Output prefix: ``{output_dir}/{map_name}_band{band}_ch{channel}_{feedlabel}{suffix}.fits``.
    band, channel : int or list of int
        Band(s) 0–3 and binned channel(s); a list makes one map per combination.
    output_dir : str
    source, source_group : str or list, optional
        Selection by source name / group (``*`` and ``?`` wildcards, case-insensitive).
    obsids, obsid_list_file, min_obsid, max_obsid
        Selection by obsid list or range (override the ``[Master]`` values).
    tod_data_name : str
        Level-2 dataset mapped.
    database_file : str, optional
        Another database (opened read-only) for this job's selection, flags and calibration.
    wcs_def, wcs_def_file : str
        Named geometry (``wcs_definitions.toml``) or ``'dynamic'``.
    dynamic_wcs_cdelt, dynamic_wcs_padding, dynamic_frame
        Pixel size and padding (deg) and frame (``'galactic'``/``'icrs'``) of the dynamic WCS.
    offset_length, lambda_ridge, good_fraction, tol, max_iter
        Destriper settings (samples, —, —, —, iterations).
    split_mode : str
        ``none``, ``per_feed``, ``day_night``, ``odd_even_scans``, ``first_second_half``,
        ``alternate_obs`` or ``custom``.
    sun_elevation_threshold_deg : float
        Day/night boundary (Sun altitude at each scan's mid-time).
    split_groups : dict, optional
        label → list of obsids, for ``custom``.
    write_difference : bool
        For two-way splits also write ``(A − B)/2`` as ``_diff``.
    write_mean_azel : bool
        Record the mean az/el/MJD in the header.
    feeds, use_quality_flags, auto_rms_cap_k, sigma_red_cutoff_k, fknee_max_hz
        Segment selection (04 §3.1).
    calibration, calib_source, calib_min_factor, calib_max_factor, missing_calibration
        Calibration factors from CalibrationModel (``'model'``) or none.
    detrend, detrend_order, detrend_mask_abs_b_deg
        Per-segment detrending (``median``, ``linear``, ``legendre``, ``none``).
    spike_sigma, spike_medfilt_length, spike_dilate
        Optional spike flagging (off by default).
    bright_mask_map, bright_cut_k, bright_downweight
        Bright-source map (FITS) and its use for solver weights.
    hit_percentile, min_hits, edge_clip, edge_clip_width, clip_percentiles
        Masking (04 §5.1).
    quicklook : bool
        Write a PNG quicklook beside each FITS file.
    overwrite : bool
        Remake maps even when their configuration hash matches.
    """

    default_split_mode = "none"

    def __init__(
        self,
        map_name: str = "Unknown",
        band: int | list = 0,
        channel: int | list = 0,
        output_dir: str = "outputs/maps",
        source: str | list | None = None,
        source_group: str | list | None = None,
        obsids: list | None = None,
        obsid_list_file: str | None = None,
        min_obsid: int | None = None,
        max_obsid: int | None = None,
        tod_data_name: str = "level2/binned_cleaned_data",
        database_file: str | None = None,
        wcs_def: str = "dynamic",
        wcs_def_file: str = "map_making_configs/wcs_definitions.toml",
        dynamic_wcs_cdelt: float = 0.0166667,
        dynamic_wcs_padding: float = 0.5,
        dynamic_frame: str = "galactic",
        offset_length: int = 100,
        lambda_ridge: float = 0.0,
        good_fraction: float = 0.5,
        tol: float = 1e-6,
        max_iter: int = 1000,
        split_mode: str | None = None,
        sun_elevation_threshold_deg: float = 0.0,
        split_groups: dict | None = None,
        write_difference: bool = False,
        write_mean_azel: bool = False,
        feeds: list | None = None,
        use_quality_flags: bool = True,
        auto_rms_cap_k: float = 0.1,
        sigma_red_cutoff_k: float = 0.4,
        fknee_max_hz: float | None = None,
        calibration: str = "model",
        calib_source: str = "TauA",
        calib_min_factor: float = 0.3,
        calib_max_factor: float = 3.0,
        missing_calibration: str = "skip",
        detrend: str = "median",
        detrend_order: int = 3,
        detrend_mask_abs_b_deg: float = 0.75,
        spike_sigma: float | None = None,
        spike_medfilt_length: int = 100,
        spike_dilate: int = 201,
        bright_mask_map: str | None = None,
        bright_cut_k: float = 0.045,
        bright_downweight: float = 0.1,
        hit_percentile: float = 5.0,
        min_hits: int = 1,
        edge_clip: bool = False,
        edge_clip_width: int = 2,
        clip_percentiles: list | None = None,
        quicklook: bool = True,
        overwrite: bool = False,
    ) -> None:
        self.map_name = map_name
        self.band = band
        self.channel = channel
        self.output_dir = output_dir
        self.source = source
        self.source_group = source_group
        self.obsids = obsids
        self.obsid_list_file = obsid_list_file
        self.min_obsid = min_obsid
        self.max_obsid = max_obsid
        self.tod_data_name = tod_data_name
        self.database_file = database_file
        self.wcs_def = wcs_def
        self.wcs_def_file = wcs_def_file
        self.dynamic_wcs_cdelt = dynamic_wcs_cdelt
        self.dynamic_wcs_padding = dynamic_wcs_padding
        self.dynamic_frame = dynamic_frame
        self.offset_length = offset_length
        self.lambda_ridge = lambda_ridge
        self.good_fraction = good_fraction
        self.tol = tol
        self.max_iter = max_iter
        self.split_mode = self.default_split_mode if split_mode is None else split_mode
        self.sun_elevation_threshold_deg = sun_elevation_threshold_deg
        self.split_groups = split_groups
        self.write_difference = write_difference
        self.write_mean_azel = write_mean_azel
        self.feeds = feeds
        self.use_quality_flags = use_quality_flags
        self.auto_rms_cap_k = auto_rms_cap_k
        self.sigma_red_cutoff_k = sigma_red_cutoff_k
        self.fknee_max_hz = fknee_max_hz
        self.calibration = calibration
        self.calib_source = calib_source
        self.calib_min_factor = calib_min_factor
        self.calib_max_factor = calib_max_factor
        self.missing_calibration = missing_calibration
        self.detrend = detrend
        self.detrend_order = detrend_order
        self.detrend_mask_abs_b_deg = detrend_mask_abs_b_deg
        self.spike_sigma = spike_sigma
        self.spike_medfilt_length = spike_medfilt_length
        self.spike_dilate = spike_dilate
        self.bright_mask_map = bright_mask_map
        self.bright_cut_k = bright_cut_k
        self.bright_downweight = bright_downweight
        self.hit_percentile = hit_percentile
        self.min_hits = min_hits
        self.edge_clip = edge_clip
        self.edge_clip_width = edge_clip_width
        self.clip_percentiles = [0.5, 99.5] if clip_percentiles is None else clip_percentiles
        self.quicklook = quicklook
        self.overwrite = overwrite

    # --- validation -----------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, params: dict[str, Any]) -> list[str]:
        from modules.MapMaking.read_data import DETRENDS

        problems = []
        mode = params.get("split_mode") or cls.default_split_mode
        if mode not in SPLIT_MODES:
            problems.append(f"split_mode must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
        if mode == "custom" and not isinstance(params.get("split_groups"), dict):
            problems.append("split_mode='custom' needs split_groups = {label: [obsids]}")
        for key in ("band", "channel"):
            values = params.get(key)
            values = values if isinstance(values, list | tuple) else [values]
            if not values or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
            ):
                problems.append(f"{key} must be an integer >= 0 or a list of them, got {params.get(key)!r}")
        if params.get("detrend") not in DETRENDS:
            problems.append(f"detrend must be one of {', '.join(DETRENDS)}")
        problems += common_job_problems(params)
        if params.get("bright_mask_map") and not Path(str(params["bright_mask_map"])).exists():
            problems.append(f"bright_mask_map {params['bright_mask_map']} does not exist")
        return problems

    # --- jobs ------------------------------------------------------------------------------------
    @property
    def bands(self) -> list[int]:
        return list(self.band) if isinstance(self.band, list | tuple) else [int(self.band)]

    @property
    def channels(self) -> list[int]:
        return list(self.channel) if isinstance(self.channel, list | tuple) else [int(self.channel)]

    def reader_settings(self, band: int, channel: int, feeds: list[int] | None = None):
        from modules.MapMaking.read_data import ReaderSettings

        kwargs = {k: getattr(self, k) for k in READER_KEYS}
        if feeds is not None:
            kwargs["feeds"] = list(feeds)
        return ReaderSettings(band=band, channel=channel, **kwargs)

    def expand(self, observations: list[Any], selection_feeds: list[int]) -> list[MapJobSpec]:
        """Concrete maps for this selection: band × channel × split (04 §1 step 1, §7)."""
        base_feeds = sorted(self.feeds) if self.feeds else sorted(selection_feeds)
        splits: list[tuple[str, dict[str, Any]]] = []
        mode = self.split_mode
        if mode == "none":
            splits.append(("", {}))
        elif mode == "per_feed":
            for f in base_feeds:
                splits.append((f"_feed{int(f):02d}", {"feeds": [int(f)]}))
        elif mode == "day_night":
            splits += [("_day", {"segment_filter": "day"}), ("_night", {"segment_filter": "night"})]
        elif mode == "odd_even_scans":
            splits += [("_jkA", {"segment_filter": "even"}), ("_jkB", {"segment_filter": "odd"})]
        elif mode in ("first_second_half", "alternate_obs"):
            ordered = (
                sorted(observations, key=lambda o: (o.mjd_start or 0.0, o.obsid))
                if mode == "first_second_half"
                else sorted(observations, key=lambda o: o.obsid)
            )
            if mode == "first_second_half":
                mjds = np.array([o.mjd_start or 0.0 for o in ordered])
                median = float(np.median(mjds)) if mjds.size else 0.0
                a = [o.obsid for o, m in zip(ordered, mjds) if m < median] or [o.obsid for o in ordered[:1]]
                b = [o.obsid for o in ordered if o.obsid not in a]
            else:
                a = [o.obsid for o in ordered[0::2]]
                b = [o.obsid for o in ordered[1::2]]
            splits += [("_jkA", {"obsids": a}), ("_jkB", {"obsids": b})]
        elif mode == "custom":
            for label, ids in (self.split_groups or {}).items():
                splits.append((f"_{label}", {"obsids": [int(i) for i in ids]}))
        pair = TWO_WAY.get(mode)
        jobs = []
        for band in self.bands:
            for channel in self.channels:
                for suffix, kw in splits:
                    feeds = kw.get("feeds", self.feeds)
                    label_feeds = kw.get("feeds", base_feeds)
                    name = f"{self.map_name}_band{band}_ch{channel}_{feed_label(label_feeds)}{suffix}.fits"
                    jobs.append(
                        MapJobSpec(
                            band=band,
                            channel=channel,
                            suffix=suffix,
                            feeds=feeds,
                            obsids=kw.get("obsids"),
                            segment_filter=kw.get("segment_filter"),
                            label_feeds=list(label_feeds),
                            output_path=Path(self.output_dir) / name,
                            pair=pair,
                        )
                    )
        return jobs

    def job_config_hash(self, job: MapJobSpec, observations: list[Any], updated: dict[int, str]) -> str:
        """Hash of the resolved parameters, the concrete job, the sorted obsids it selects and each
        level-2 file's ``updated_utc`` (04 §1 step 2): a new or reprocessed observation remakes the map."""
        ids = sorted(o.obsid for o in observations if job.obsids is None or o.obsid in job.obsids)
        return sha256_of(
            {
                "params": self.parameters,
                "job": {
                    "band": job.band,
                    "channel": job.channel,
                    "suffix": job.suffix,
                    "feeds": job.feeds,
                    "segment_filter": job.segment_filter,
                },
                "obsids": ids,
                "level2_updated_utc": [updated.get(i, "") for i in ids],
            }
        )

    def run(self, files: list[Any]) -> Any:
        """Make every map of this job from ``files`` (COMAPData rows) — used standalone; inside a run
        the MapMaking stage drives the jobs (selection, skip checks, parallel reading)."""
        from modules.MapMaking.MapMaking import MapMaking

        stage = MapMaking()
        return stage.run_map_job(self, files)


__all__ = ["CreateMap", "MapJobSpec", "common_job_problems", "feed_label"]
