"""CreateMap: one destriped continuum map per (band, channel, split) of a selection
(docs/mapmaking.md#createmap-and-its-variants).

The product's steps: :meth:`CreateMap.expand` (band × channel × split), then per map the pre-pass
and read of :mod:`modules.MapMaking.read_data` (files in parallel through its picklable
``_read_task``), the destriper on the job's one geometry, and the FITS writer.
"""

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from modules.MapMaking.destriper import destripe
from modules.MapMaking.dispatch import JobInputs, MapJobFailed
from modules.MapMaking.distributed import (
    Ranks,
    complete_output,
    compress_pixels_global,
    gather_plans,
    gather_rows,
    restrict_output,
    segment_ids,
    share_of_files,
)
from modules.MapMaking.fits_metadata import map_beam, product_cards, segment_records
from modules.MapMaking.fits_output import MapInfo, write_map_fits
from modules.MapMaking.geometry import geometry_for
from modules.MapMaking.job_parameters import (
    CalibrationParameters,
    ChannelParameters,
    DestriperParameters,
    GeometryParameters,
    MaskingParameters,
    OutputParameters,
    SelectionParameters,
)
from modules.MapMaking.map_noise import (
    MC_SEED,
    SMOOTH_SIGMA_PIX,
    MapNoise,
    SegmentNoise,
    monte_carlo_rms,
    residual_segment_noise,
    segment_verdicts,
)
from modules.MapMaking.product import MapProduct, feed_label
from modules.MapMaking.read_data import (
    Detrend,
    Level2DataReader,
    ReaderOutput,
    ReaderSettings,
    describe_counts,
)
from modules.MapMaking.segments import segment_hour_angle_deg
from modules.pipeline_control.parameters import Range

SplitMode = Literal[
    "none",
    "per_feed",
    "day_night",
    "odd_even_scans",
    "first_second_half",
    "alternate_obs",
    "custom",
    "scan_direction",
    "rising_setting",
    "feed_halves",
]
TWO_WAY = {
    "day_night": ("_day", "_night"),
    "odd_even_scans": ("_jkA", "_jkB"),
    "first_second_half": ("_jkA", "_jkB"),
    "alternate_obs": ("_jkA", "_jkB"),
    "scan_direction": ("_jkA", "_jkB"),
    "rising_setting": ("_jkA", "_jkB"),
    "feed_halves": ("_jkA", "_jkB"),
}


@dataclass
class MapJobSpec:
    """One concrete map: band, channel, split and the observations/segments it takes.

    ``obsids`` restricts the observations (None = the whole selection); ``segment_filter`` names a
    segment-level split ('day', 'night', 'even', 'odd', 'rising', 'setting'); ``feeds`` restricts the
    feeds; ``scan_direction`` (+1/−1) keeps the samples sweeping in increasing/decreasing azimuth.
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
    scan_direction: int | None = None


@dataclass(kw_only=True, eq=False)
class CreateMap(
    MapProduct,
    OutputParameters,
    SelectionParameters,
    ChannelParameters,
    CalibrationParameters,
    GeometryParameters,
    DestriperParameters,
    MaskingParameters,
):
    """Destriped continuum maps of a selection of observations, one per band, channel and split.

    Each map is a FITS file with DESTRIPED, NAIVE, HITS, RMS, MASK, RMS_WHITE and SEGNOISE HDUs.

    The parameters shared with the other map products are described once, in their parameter
    groups (:mod:`modules.MapMaking.job_parameters`): output (``map_name`` … ``overwrite``),
    selection (``source`` … ``sigma_red_cutoff_k``), channels (``band`` … ``fknee_max_hz``),
    calibration, geometry, destriper (``offset_length``, ``tol``, ``max_iter``) and masking
    (``hit_percentile``, ``min_hits``). Below are those of CreateMap alone, and the shared ones
    whose meaning differs here.

    Parameters
    ----------
    map_name : str
        Output prefix: ``{output_dir}/{map_name}_band{band}_ch{channel}_{feedlabel}{suffix}.fits``.
    sigma_red_cutoff_k : float
        Segments whose red-noise amplitude σ_red (K), measured on the sky-free residual after a
        first destriping and compared in level-2 units, exceeds this are dropped
        (docs/mapmaking.md#map-noise); NaN passes.
    fknee_max_hz : float, optional
        Segments whose 1/f knee frequency (Hz), measured on the sky-free residual after a first
        destriping, is above this are dropped (docs/mapmaking.md#map-noise); None = no limit.
    lambda_ridge : float
        Ridge regularisation λ (K⁻²) added to the diagonal of the destriper's offset system
        (docs/mapmaking.md#model-and-equations); 0 (the default) = no regularisation.
    good_fraction : float
        An offset is solved for only when more than this fraction (dimensionless, 0 to 1) of its
        samples have a positive weight and a pixel on the map; the other offsets are fixed at 0.
    split_mode : str
        ``none``, ``per_feed``, ``day_night``, ``odd_even_scans``, ``first_second_half``,
        ``alternate_obs``, ``custom``, ``scan_direction`` (samples by the sign of the azimuth velocity),
        ``rising_setting`` (segments by the sign of the hour angle) or ``feed_halves`` (alternate
        feeds); docs/mapmaking.md#createmap-and-its-variants.
    sun_elevation_threshold_deg : float
        Day/night boundary (Sun altitude at each scan's mid-time).
    split_groups : dict, optional
        label → list of obsids, for ``custom``.
    write_difference : bool
        For two-way splits also write ``(A − B)/2`` as ``_diff``.
    write_mean_azel : bool
        Record the mean az/el/MJD in the header.
    noise_realizations : int
        Noise-only simulations through the destriper behind the RMS HDU (docs/mapmaking.md#map-noise);
        0 writes the white-noise RMS.
    detrend : {'median', 'linear', 'legendre', 'none'}
        Trend subtracted from each segment before destriping: its median, a line in time, a robust
        Legendre fit in time, elevation and azimuth, or nothing
        (docs/mapmaking.md#per-segment-processing); bright-source samples are left out of the fit.
    detrend_order : int
        Highest Legendre order, in each of time, elevation and azimuth, of the ``'legendre'``
        detrend.
    detrend_mask_abs_b_deg : float
        Samples at Galactic latitude |b| up to this (deg) are left out of the ``'legendre'`` detrend
        fit, so that the Galactic plane does not bias it.
    spike_sigma : float, optional
        Samples further than this many white-noise σ from a running median get weight 0 (bright
        sources excepted); None (the default) = no spike flagging.
    spike_medfilt_length : int
        Window of the running median of the spike flagging (samples).
    spike_dilate : int
        Each spike flag is widened to a window of this many samples centred on it (samples); 1 or
        less = no widening.
    bright_downweight : float
        Solver weight factor of the samples flagged as bright sources in level 2 (sample flag 16,
        docs/level2.md#source-mask; configured in CreateLevel2File).
    edge_clip : bool
        Mask (MASK bit 4, docs/mapmaking.md#name-and-hdus) the pixels within ``edge_clip_width`` of
        the boundary of the unmasked area whose destriped value lies outside ``clip_percentiles`` of
        the interior pixels.
    edge_clip_width : int
        Width of the boundary band examined by ``edge_clip`` (pixels).
    clip_percentiles : [low, high], optional
        Percentiles (%) of the interior pixels' destriped values outside which ``edge_clip`` masks
        a boundary pixel; None = ``[0.5, 99.5]``. Acts only with ``edge_clip``.
    overwrite : bool
        Remake maps even when their configuration hash matches.
    """

    product = "map"
    distributed = True  # make() runs on every rank of an MPI run (docs/mapmaking.md#distributed-map-making)
    default_split_mode = "none"
    moved_parameters = {
        name: "the bright-source mask is configured in level 2 (CreateLevel2File source_catalogue, "
        "bright_mask_map, bright_cut_k) and read from sample flag 16; see docs/level2.md#source-mask"
        for name in ("bright_mask_map", "bright_cut_k")
    }

    lambda_ridge: float = 0.0
    good_fraction: float = 0.5
    split_mode: SplitMode | None = None
    sun_elevation_threshold_deg: float = 0.0
    split_groups: dict | None = None
    write_difference: bool = False
    write_mean_azel: bool = False
    detrend: Detrend = "median"
    detrend_order: int = 3
    detrend_mask_abs_b_deg: float = 0.75
    spike_sigma: float | None = None
    spike_medfilt_length: int = 100
    spike_dilate: int = 201
    bright_downweight: float = 0.1
    edge_clip: bool = False
    edge_clip_width: int = 2
    clip_percentiles: list | None = None
    noise_realizations: Annotated[int, Range(ge=0)] = 16

    def __post_init__(self) -> None:
        if self.split_mode is None:
            self.split_mode = self.default_split_mode
        if self.clip_percentiles is None:
            self.clip_percentiles = [0.5, 99.5]

    # --- validation -----------------------------------------------------------------------------
    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = []
        mode = params["split_mode"] or cls.default_split_mode
        if mode == "custom" and not isinstance(params["split_groups"], dict):
            problems.append("split_mode='custom' needs split_groups = {label: [obsids]}")
        clip = params["clip_percentiles"]
        if clip is not None:
            # percentiles of the edge clipping (docs/mapmaking.md#name-and-hdus): alone they do nothing
            if not params["edge_clip"]:
                problems.append("clip_percentiles acts only with edge_clip=True")
            if not (
                isinstance(clip, list | tuple)
                and len(clip) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in clip)
                and 0 <= clip[0] < clip[1] <= 100
            ):
                problems.append(
                    f"clip_percentiles must be [low, high] with 0 <= low < high <= 100, got {clip!r}"
                )
        problems += super().parameter_rules(params)
        return problems

    # --- outputs ---------------------------------------------------------------------------------
    def reader_settings(
        self, band: int, channel: int, feeds: list[int] | None = None, scan_direction: int | None = None
    ) -> ReaderSettings:
        """The continuum reader's settings for one (band, channel), optionally restricted to ``feeds``
        and to the samples sweeping in azimuth direction ``scan_direction`` (+1/−1).

        The pre-pass does not apply the red-noise cuts: the level-2 statistics include the sky, so
        ``sigma_red_cutoff_k`` and ``fknee_max_hz`` are applied after a first destriping to the residual's
        statistics (docs/mapmaking.md#map-noise)."""
        given: dict[str, Any] = {"band": band, "channel": channel, "scan_direction": scan_direction}
        if feeds is not None:
            given["feeds"] = list(feeds)
        return replace(self.settings(ReaderSettings, **given), sigma_red_cutoff_k=np.inf, fknee_max_hz=None)

    def expand(self, observations: list[Any], selection_feeds: list[int]) -> list[MapJobSpec]:
        """Concrete maps for this selection: band × channel × split (docs/mapmaking.md#orchestration step 1,
        docs/mapmaking.md#createmap-and-its-variants)."""
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
        elif mode == "scan_direction":
            splits += [("_jkA", {"scan_direction": 1}), ("_jkB", {"scan_direction": -1})]
        elif mode == "rising_setting":
            splits += [("_jkA", {"segment_filter": "rising"}), ("_jkB", {"segment_filter": "setting"})]
        elif mode == "feed_halves":
            # both halves carry the whole selection's feed label, so that A and B differ only by suffix
            for suffix, half in (("_jkA", base_feeds[0::2]), ("_jkB", base_feeds[1::2])):
                splits.append((suffix, {"feeds": [int(f) for f in half], "label_feeds": base_feeds}))
        pair = TWO_WAY.get(mode)
        jobs = []
        for band in self.bands:
            for channel in self.channels:
                for suffix, kw in splits:
                    feeds = kw.get("feeds", self.feeds)
                    label_feeds = kw.get("label_feeds", kw.get("feeds", base_feeds))
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
                            scan_direction=kw.get("scan_direction"),
                        )
                    )
        return jobs

    def output_identity(self, output: MapJobSpec) -> dict[str, Any]:
        job: dict[str, Any] = {
            "band": output.band,
            "channel": output.channel,
            "suffix": output.suffix,
            "feeds": output.feeds,
            "segment_filter": output.segment_filter,
        }
        if output.scan_direction is not None:  # absent otherwise: the hashes of older maps hold
            job["scan_direction"] = output.scan_direction
        return {"job": job}

    # --- making one map --------------------------------------------------------------------------
    def _geometry(self, inputs: JobInputs):
        """One grid for all maps of the job (so that split maps can be differenced)."""

        def plans():
            reader = Level2DataReader(
                self.reader_settings(self.bands[0], self.channels[0]), inputs.table, inputs.flags
            )
            accepted = reader.prepass(inputs.observations)
            if not accepted:
                raise MapJobFailed(f"no data for map {self.map_name}: {describe_counts(reader.counts)}")
            return accepted

        return geometry_for(self, plans)

    @staticmethod
    def _filter_segments(plans: list[Any], spec: Any, threshold_deg: float) -> list[Any]:
        if spec.segment_filter is None:
            return plans
        if spec.segment_filter in ("day", "night"):
            from utils.coordinates import sun_altitude_deg

            if not plans:
                return plans
            alt = sun_altitude_deg(np.array([p.mjd_mid for p in plans]))
            day = alt >= threshold_deg
            want = spec.segment_filter == "day"
            return [p for p, d in zip(plans, day) if d == want]
        if spec.segment_filter in ("rising", "setting"):
            # hour angle of the segment's mean pointing at its mid-time; NaN (no pointing) goes nowhere
            ha = segment_hour_angle_deg(plans)
            keep = ha < 0 if spec.segment_filter == "rising" else ha >= 0
            return [p for p, k in zip(plans, keep) if k]
        # odd/even: scans numbered in time order across the selection
        scans = sorted({(p.mjd_mid, p.obsid, p.scan) for p in plans})
        number = {(o, s): k for k, (_m, o, s) in enumerate(scans)}
        parity = 0 if spec.segment_filter == "even" else 1
        return [p for p in plans if number[(p.obsid, p.scan)] % 2 == parity]

    def make(
        self, output: MapJobSpec, inputs: JobInputs, config_sha: str, executor=None, world=None
    ) -> Path | None:
        """Read, destripe and write one concrete map (docs/mapmaking.md).

        With ``world`` (an MPI run, docs/mapmaking.md#distributed-map-making) every rank calls this with the
        same arguments: each reads its share of the files and holds only its share of the TOD, the
        destriper and the noise simulations combine the ranks, and rank 0 writes the file (the other
        ranks return None)."""
        spec, log = output, inputs.log
        ranks = Ranks(world.comm if world is not None else None)
        name = spec.output_path.name
        reader = Level2DataReader(
            self.reader_settings(spec.band, spec.channel, spec.feeds, spec.scan_direction),
            inputs.table,
            inputs.flags,
        )

        def prepass():
            geometry = inputs.shared("geometry", lambda: self._geometry(inputs))
            selected = [o for o in inputs.observations if spec.obsids is None or o.obsid in spec.obsids]
            plans = self._filter_segments(reader.prepass(selected), spec, self.sun_elevation_threshold_deg)
            if not plans:
                raise MapJobFailed(f"no data for map {name}: {describe_counts(reader.counts)}")
            return geometry, plans, reader.counts

        geometry, plans, reader.counts = ranks.on_root(prepass)
        if ranks.is_root:
            log.info(
                "%s: %d segment(s) from %d observation(s)%s; %s",
                name,
                len(plans),
                len({p.obsid for p in plans}),
                f" on {ranks.size} MPI ranks" if ranks.size > 1 else "",
                describe_counts(reader.counts),
            )
        mine = share_of_files(plans, ranks)
        if not ranks.is_root:
            reader.counts = Counter()  # the pre-pass counts are rank 0's; the read's are summed over ranks

        def read():
            if not ranks.is_root:
                return reader.read(mine, geometry)
            with inputs.read_progress(len({p.path for p in mine}), name) as bar:
                return reader.read(mine, geometry, executor=executor, progress=bar)

        out = complete_output(ranks.agree(read), plans, ranks)
        ids = segment_ids(out.plans, plans)
        hit, comp = compress_pixels_global(out.pixels, ranks, out.weights, out.map_weights)
        if hit.size == 0:
            raise MapJobFailed(f"no data for map {name}: no sample lands on the map with non-zero weight")
        res = self._destripe(out, comp, hit, ranks)
        # sky-free segment noise, the red-noise cuts on it and the new weights (docs/mapmaking.md#map-noise)
        noise = residual_segment_noise(
            out.tod,
            comp,
            out.weights,
            out.map_weights,
            out.segment_starts,
            res,
            int(self.offset_length),
            out.sample_rate_hz,
            segment_ids=ids,
        )
        factors = np.array([p.factor for p in out.plans])
        reasons = segment_verdicts(noise, factors, float(self.sigma_red_cutoff_k), self.fknee_max_hz)
        rows, row_ids = _segment_table(out.plans, noise, reasons), ids
        keep = np.array([r is None for r in reasons], dtype=bool)
        dropped: Counter = Counter(r for r in reasons if r is not None)
        for counted in ranks.allgather(dict(dropped)):
            for r, k in counted.items():
                out.counts[r] += k
                out.counts["accepted"] -= k
        if not ranks.any(keep.any()):
            raise MapJobFailed(f"no data for map {name}: {describe_counts(out.counts)}")
        old_sigma = np.array([p.auto_rms_k / p.factor for p in out.plans])
        new_sigma = np.where(
            np.isfinite(noise.sigma_white) & (noise.sigma_white > 0), noise.sigma_white, old_sigma
        )
        scale = (old_sigma / new_sigma) ** 2
        noise.sigma_white = new_sigma  # the Monte Carlo's white level: the rms the weights now assume
        if ranks.any(not keep.all() or bool(np.any(np.abs(scale - 1.0) > 0.05))):
            out, noise = _reweight(out, noise, keep, scale)
            ids = ids[keep]
            out = restrict_output(out, [p for part in ranks.allgather(out.plans) for p in part], ranks)
            hit, comp = compress_pixels_global(out.pixels, ranks, out.weights, out.map_weights)
            res = self._destripe(out, comp, hit, ranks)
        if ranks.is_root and res.status != "converged":
            log.warning(
                "%s: destriper %s after %d iterations (residual %.3g); map written with DSTATUS",
                name,
                res.status,
                res.n_iter,
                float(np.min(res.residuals)),
            )
        map_noise = monte_carlo_rms(
            noise,
            pixels=comp,
            weights=out.weights,
            map_weights=out.map_weights,
            segment_starts=out.segment_starts,
            white_rms=res.rms,
            hit=hit,
            shape=geometry.shape,
            n_realisations=int(self.noise_realizations),
            seed=(MC_SEED, int(spec.band), int(spec.channel)),
            destriper=self._destriper_settings(),
            ranks=ranks,
            segment_ids=ids,
        )
        # gathered last: a failure while merging on rank 0 cannot leave the other ranks in a collective
        table = gather_rows(row_ids, rows, ranks)
        kept_plans = gather_plans(ids, out.plans, ranks)
        if not ranks.is_root:
            return None
        log.info(
            "%s: sky-free segment noise: %d of %d segment(s) kept (%s); median sigma_white %.3g K, "
            "median sigma_red %.3g K, median fknee %.3g Hz",
            name,
            int(np.sum(table["reason"] == "")),
            table["reason"].size,
            describe_counts(out.counts),
            _median(table["sigma_white"]),
            _median(table["sigma_red"]),
            _median(table["fknee_hz"]),
        )
        log.info(
            "%s: map noise from %d realisation(s): median RMS/RMS_WHITE %.3f (%.1f s)",
            name,
            map_noise.n_realisations,
            map_noise.ratio_median,
            map_noise.wall_time_s,
        )
        return self._write(
            spec, geometry, hit, out, res, kept_plans, config_sha, map_noise, table, inputs=inputs
        )

    def _destriper_settings(self) -> dict[str, Any]:
        return {
            "offset_length": int(self.offset_length),
            "tol": float(self.tol),
            "max_iter": int(self.max_iter),
            "lambda_ridge": float(self.lambda_ridge),
            "good_fraction": float(self.good_fraction),
        }

    def _destripe(self, out: ReaderOutput, comp: np.ndarray, hit: np.ndarray, ranks: Ranks):
        d = self._destriper_settings()
        return destripe(
            out.tod,
            comp,
            out.weights,
            d["offset_length"],
            int(hit.size),
            tol=d["tol"],
            max_iter=d["max_iter"],
            segment_starts=out.segment_starts,
            map_weights=out.map_weights,
            lambda_ridge=d["lambda_ridge"],
            good_fraction=d["good_fraction"],
            comm=ranks.comm,
        )

    def _header_cards(self, spec: MapJobSpec, out, plans, inputs: JobInputs | None) -> dict[str, Any]:
        """Beam and brightness-scale cards (docs/map_products.md#beam-brightness-and-provenance)."""
        beam = map_beam(inputs.beams if inputs else None, out.feeds, [spec.band], out.freq_ghz)
        return product_cards(
            beam,
            out.freq_ghz,
            calibration=str(self.calibration),
            calib_source=str(self.calib_source),
            table=inputs.table if inputs else None,
            elements=[(f, spec.band, spec.channel) for f in out.feeds],
            mjd=0.5 * (out.mjd_range[0] + out.mjd_range[1]),
        )

    def _write(
        self,
        spec: MapJobSpec,
        geometry,
        hit,
        out,
        res,
        plans,
        config_sha: str,
        noise: MapNoise,
        table: dict,
        inputs: JobInputs | None = None,
    ) -> Path:
        """The FITS file of one destriped map (and its quicklook)."""

        def grid(values, fill=np.nan, dtype=np.float64):
            full = np.full(geometry.n_pixels, fill, dtype=dtype)
            full[hit] = values
            return full.reshape(geometry.shape)

        info = MapInfo(
            object_name=self.map_name,
            band=spec.band,
            channel=spec.channel,
            feeds=out.feeds,
            obsids=out.obsids,
            mjd_min=out.mjd_range[0],
            mjd_max=out.mjd_range[1],
            freq_hz=out.freq_ghz * 1e9,
            bandwidth_hz=out.bandwidth_ghz * 1e9,
            n_segment=out.n_segments,
            n_sample=out.n_samples,
            destriper={
                "OFFLEN": int(self.offset_length),
                "LAMBDA": float(self.lambda_ridge),
                "GOODFRAC": float(self.good_fraction),
                "TOL": float(self.tol),
                "NITER": int(res.n_iter),
                "RESID": float(np.min(res.residuals)),
                "DSTATUS": str(res.status),
            },
            calibration={
                "MODE": self.calibration,
                "SOURCE": self.calib_source,
                "MEDFACT": float(np.median([p.factor for p in plans])),
            },
            mean_azel_mjd=out.mean_azel_mjd,
            cards=self._header_cards(spec, out, plans, inputs),
            segments=segment_records(plans, lambda _p: [spec.band]),
        )
        params = dict(self.parameters)
        params.update(band=spec.band, channel=spec.channel, split=spec.suffix or "none")
        path = write_map_fits(
            spec.output_path,
            geometry,
            destriped=grid(res.map),
            naive=grid(res.naive_map),
            hits=grid(res.hits, 0, np.int64),
            weights=grid(res.weights, 0.0),
            rms=grid(noise.rms),
            noise_cards={
                "METHOD": "monte_carlo" if noise.n_realisations > 0 else "white",
                "NREAL": int(noise.n_realisations),
                "SEED": ",".join(str(int(v)) for v in noise.seed),
                "RATIO": float(noise.ratio_median),
                "SMOOTH": SMOOTH_SIGMA_PIX,
                "TIME": round(float(noise.wall_time_s), 2),
            },
            segment_table=table,
            info=info,
            params=params,
            config_sha=config_sha,
            hit_percentile=float(self.hit_percentile),
            min_hits=int(self.min_hits),
            edge_clip_enabled=bool(self.edge_clip),
            edge_clip_width=int(self.edge_clip_width),
            clip_percentiles=tuple(self.clip_percentiles),
            resolved_config={
                "class": self.module_path,
                "params": params,
                "config_sha256": config_sha,
                "obsids": out.obsids,
            },
        )
        if self.quicklook:
            self.write_quicklook(path)
        return path

    def write_quicklook(self, fits_path: Path) -> Path:
        """The quicklook PNG beside one of this job's FITS files: a map, or the jackknife difference
        of a two-way split, which has the same layout."""
        return quicklook_png(fits_path)


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def _segment_table(plans: list[Any], noise: SegmentNoise, reasons: list[str | None]) -> dict[str, np.ndarray]:
    """Columns of the SEGNOISE HDU: every segment read, its sky-free noise and why it was dropped."""
    return {
        "obsid": np.array([p.obsid for p in plans], dtype=np.int64),
        "feed": np.array([p.feed for p in plans], dtype=np.int16),
        "scan": np.array([p.scan for p in plans], dtype=np.int16),
        "sigma_white": noise.sigma_white.copy(),
        "sigma_red": noise.sigma_red.copy(),
        "alpha": noise.alpha.copy(),
        "fknee_hz": noise.fknee_hz.copy(),
        "level2_auto_rms": np.array([p.auto_rms_k / p.factor for p in plans], dtype=np.float64),
        "reason": np.array([r or "" for r in reasons], dtype=str),
    }


def _reweight(
    out: ReaderOutput, noise: SegmentNoise, keep: np.ndarray, scale: np.ndarray
) -> tuple[ReaderOutput, SegmentNoise]:
    """The reader output without the dropped segments, each kept segment's weights multiplied by ``scale``
    (level-2 white rms replaced by the sky-free one, docs/mapmaking.md#map-noise)."""
    n = out.tod.size
    edges = [int(s) for s in out.segment_starts] + [n] if n else [0]  # no sample: no segment
    sel = np.zeros(n, dtype=bool)
    weights = out.weights.copy()
    map_weights = out.map_weights.copy()
    starts, pos = [], 0
    for k in range(len(edges) - 1):
        a, b = edges[k], edges[k + 1]
        weights[a:b] *= np.float32(scale[k])
        map_weights[a:b] *= np.float32(scale[k])
        if keep[k]:
            sel[a:b] = True
            starts.append(pos)
            pos += b - a
    plans = [p for p, k in zip(out.plans, keep) if k]
    new = replace(
        out,
        tod=out.tod[sel],
        pixels=out.pixels[sel],
        weights=weights[sel],
        map_weights=map_weights[sel],
        segment_starts=np.asarray(starts or [0], dtype=np.int64),
        obsids=sorted({p.obsid for p in plans}),
        feeds=sorted({p.feed for p in plans}),
        mjd_range=(min(p.mjd_mid for p in plans), max(p.mjd_mid for p in plans)) if plans else out.mjd_range,
        n_segments=len(plans),
        plans=plans,
    )
    idx = np.flatnonzero(keep)
    kept = SegmentNoise(
        noise.sigma_white[idx],
        noise.sigma_red[idx],
        noise.alpha[idx],
        noise.fknee_hz[idx],
        [noise.spectra[i] for i in idx],
        noise.sample_rate_hz,
    )
    return new, kept


def quicklook_figure(fits_path: Path):
    """The quicklook of the DESTRIPED map of ``fits_path`` on the sky (docs/map_products.md#quicklooks):
    coverage from its HITS image, beam from BMAJ/BMIN/BPA; a jackknife difference map (``COMAP DIFFA``
    in its header) in a diverging colour map, symmetric about zero.

    Returns
    -------
    fig : matplotlib.figure.Figure
    ax : astropy.visualization.wcsaxes.WCSAxes
    drawn : utils.sky_plot.SkyImage
    """
    from astropy.io import fits

    from utils.sky_plot import DIVERGING_CMAP, draw_sky_image, new_sky_figure, unit_label

    with fits.open(fits_path, memmap=False) as hdul:
        data = hdul[0].data
        header = hdul[0].header
        hits = hdul["HITS"].data if "HITS" in hdul else None
    coverage = hits > 0 if hits is not None else np.isfinite(data)
    fig, ax, _ = new_sky_figure(header, figsize=(7.0, 6.0))
    difference = "COMAP DIFFA" in header
    drawn = draw_sky_image(
        ax,
        data,
        coverage=coverage,
        label=unit_label(header),
        beam_header=header,
        cmap=DIVERGING_CMAP if difference else "inferno",
        symmetric=difference,
    )
    ax.set_title(
        f"{header.get('OBJECT', '')} band {header.get('BAND')} ch {header.get('CHANNEL')} "
        f"({header.get('FREQ', 0) / 1e9:.2f} GHz)"
    )
    return fig, ax, drawn


def quicklook_png(fits_path: Path) -> Path:
    """A PNG of the DESTRIPED map on the sky beside the FITS file (same stem)."""
    from utils.plotting import save_figure

    fig, _ax, _drawn = quicklook_figure(fits_path)
    return save_figure(fig, fits_path.with_suffix(".png"))


__all__ = ["CreateMap", "MapJobSpec", "feed_label", "quicklook_figure", "quicklook_png"]
