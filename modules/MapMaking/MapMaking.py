"""MapMaking and LineMapMaking: top-level stages that run the map jobs of a map-making config (04 §1).

For every ``CreateMap`` entry: select the observations (04 §2) in the coordinator, expand the job
into concrete maps (band × channel × split), skip maps whose FITS file already carries the job's
configuration hash, then read (files in parallel on ``nprocess`` workers), destripe and write FITS.
A map job that fails or selects nothing is counted as failed and the others continue.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modules.MapMaking.fits_output import MapInfo, read_configsha, write_map_fits
from modules.MapMaking.geometry import job_geometry
from modules.MapMaking.read_data import Level2DataReader, compress_pixels, describe_counts, sample_pointing
from modules.pipeline_control.config import ErrorCollector, LoadedConfig, load_config
from modules.pipeline_control.executors import LocalPoolExecutor
from modules.pipeline_control.logging_setup import Progress
from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from utils.constants import SUPPORTED_LEVEL2_FORMAT_VERSIONS

log = logging.getLogger("comap.MapMaking")
line_log = logging.getLogger("comap.LineMapMaking")


class MapJobFailed(Exception):
    """A map job cannot be made (no data, no hits...): one line, the other jobs continue."""


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


class MapMaking(PipelineStage):
    """Make the destriped continuum maps listed in a map-making config (04 §1–§7).

    Parameters
    ----------
    config_file : str
        The map-making config: its ``[Master]`` (``sql_database``, ``obsid_list``, ``min_obsid``,
        ``max_obsid``, ``nprocess``) and ``pipeline`` of ``CreateMap`` calls.
    """

    sub_config_kind = "map"
    product = "map"

    def __init__(self, config_file: str = "parameter_files/level2_mapmaking.toml") -> None:
        self.config_file = config_file

    # --- config -------------------------------------------------------------------------------
    def _sub_config(self) -> LoadedConfig:
        sub = self.context.sub_config(self.config_file)
        if sub is not None:
            return sub
        errors = ErrorCollector()
        sub = load_config(self.config_file, "map", errors)
        errors.raise_if_any()
        assert sub is not None
        return sub

    def _nprocess(self, master: dict[str, Any]) -> int:
        n = self.context.nprocess if self.context.nprocess is not None else master.get("nprocess") or 1
        return max(1, int(n))

    # --- selection (04 §2) ----------------------------------------------------------------------
    def _facade(self, job: Any, master: dict[str, Any]):
        from modules.SQLModule.SQLModule import SQLModule, db

        if job.database_file:
            other = SQLModule()
            other.connect(job.database_file, create=False, read_only=True)
            return other, True
        if master.get("sql_database") and not db.connected:
            db.connect(master["sql_database"], create=False, read_only=True)
        return db, False

    def select(self, job: Any, master: dict[str, Any], facade) -> tuple[list[Any], Counter]:
        """Observations the job maps and the reasons others were dropped."""
        dropped: Counter = Counter()
        cli = self.context.obsids
        ids: list[int] | None = None
        if job.obsid_list_file or job.obsids:
            ids = facade.load_obsid_list(job.obsid_list_file or job.obsids)
            if cli is not None:
                ids = sorted(set(ids) & set(cli))
        elif cli is not None:
            ids = list(cli)
        elif master.get("obsid_list") is not None:
            ids = facade.load_obsid_list(master["obsid_list"])
        min_obsid = job.min_obsid if job.min_obsid is not None else master.get("min_obsid")
        max_obsid = job.max_obsid if job.max_obsid is not None else master.get("max_obsid")
        if ids is not None:
            obs = facade.query_observations(obsids=ids)
        else:
            obs = facade.query_observations(
                source=job.source, source_group=job.source_group, min_obsid=min_obsid, max_obsid=max_obsid
            )
        done = {j.obsid for j in facade.job_table("level2", status="done", obsids=[o.obsid for o in obs])}
        noise_group = f"level2_noise_stats/{job.tod_data_name.rstrip('/').rsplit('/', 1)[-1]}"
        keep = []
        for o in obs:
            if not o.level2_path or o.obsid not in done:
                dropped["no level-2 file or level-2 job not done"] += 1
                continue
            path = Path(o.level2_path)
            if not path.is_file():
                dropped["level-2 file missing"] += 1
                continue
            try:
                with h5py.File(path, "r", locking=False) as l2:
                    version = l2.attrs.get("level2_format_version")
                    if job.tod_data_name not in l2:
                        dropped[f"lacks {job.tod_data_name}"] += 1
                        continue
                    if noise_group not in l2:
                        dropped[f"lacks {noise_group}"] += 1
                        continue
                    if version is None or int(version) not in SUPPORTED_LEVEL2_FORMAT_VERSIONS:
                        dropped["unsupported level-2 format version"] += 1
                        continue
            except OSError:
                dropped["level-2 file unreadable"] += 1
                continue
            keep.append(o)
        return keep, dropped

    @staticmethod
    def _level2_facts(observations: list[Any]) -> tuple[dict[int, str], list[int]]:
        """``updated_utc`` of each level-2 file and the union of their feeds."""
        updated, feeds = {}, set()
        for o in observations:
            with h5py.File(o.level2_path, "r", locking=False) as l2:
                updated[o.obsid] = str(_decode(l2.attrs.get("updated_utc", "")))
                feeds.update(int(f) for f in l2["spectrometer/feeds"][...])
        return updated, sorted(feeds)

    # --- plan ---------------------------------------------------------------------------------------
    @staticmethod
    def _is_line_job(job: Any) -> bool:
        from modules.MapMaking.MapMakingModules.CreateLineMap.CreateLineMap import CreateLineMap

        return isinstance(job, CreateLineMap)

    def _rejects(self, job: Any) -> str | None:
        """Why this stage cannot run ``job`` (a line job belongs to LineMapMaking), or None."""
        return "a CreateLineMap job: list it in LineMapMaking's config" if self._is_line_job(job) else None

    def _outputs(self, job: Any, observations: list[Any]) -> list[Path]:
        """The files a job would write for this selection (for the plan)."""
        _updated, feeds = self._level2_facts(observations) if observations else ({}, [])
        return [j.output_path for j in job.expand(observations, feeds)]

    def plan(self) -> list[str]:
        sub = self._sub_config()
        lines = [f"{type(self).__name__}: config {self.config_file}"]
        for spec in sub.entries:
            job = spec.instantiate()
            reason = self._rejects(job)
            if reason is not None:
                lines.append(f"  {spec.name}: {reason} (skipped)")
                continue
            facade, own = self._facade(job, sub.master)
            try:
                obs, dropped = self.select(job, sub.master, facade)
            finally:
                if own:
                    facade.disconnect()
            outputs = self._outputs(job, obs)
            lines.append(
                f"  {spec.name}({job.map_name}): {len(obs)} observation(s) selected "
                f"({describe_counts(dropped) if dropped else 'none dropped'}); "
                f"{len(outputs)} {self.product}(s)"
            )
            lines.extend(f"    {path}" for path in outputs)
        return lines

    # --- run --------------------------------------------------------------------------------------
    @staticmethod
    def _read_task():
        from modules.MapMaking.read_data import _read_task

        return _read_task

    def _run_job(self, job: Any, master: dict[str, Any], result: StageResult, executor) -> None:
        self.run_map_job(job, None, master=master, result=result, executor=executor)

    def run(self) -> StageResult:
        result = StageResult(stage=type(self).__name__)
        sub = self._sub_config()
        nprocess = self._nprocess(sub.master)
        executor = None
        if nprocess > 1:  # one pool for every job of the config: files are read in parallel
            import multiprocessing

            log_queue = None
            if self.context.logging is not None:
                log_queue = self.context.logging.start_queue(multiprocessing.get_context("spawn"))
            executor = LocalPoolExecutor(nprocess, log_queue=log_queue, log_level=self.context.log_level)
            executor.start(self._read_task())
        try:
            for spec in sub.entries:
                job = spec.instantiate()
                reason = self._rejects(job)
                if reason is not None:
                    logging.getLogger(f"comap.{type(self).__name__}").error("%s is %s", spec.name, reason)
                    result.record_failure(spec.name, reason)
                    continue
                self._run_job(job, sub.master, result, executor)
        finally:
            if executor is not None:
                executor.shutdown()
                if self.context.logging is not None:
                    self.context.logging.stop_queue()
        return result

    def _gather(self, job: Any, files: list[Any] | None, master: dict[str, Any], result: StageResult):
        """Selection, level-2 facts, calibration table and quality flags of one job; None (and a
        failure recorded) when the selection is empty."""
        facade, own = self._facade(job, master)
        try:
            if files is None:
                observations, dropped = self.select(job, master, facade)
            else:
                observations, dropped = list(files), Counter()
            if not observations:
                logging.getLogger(f"comap.{type(self).__name__}").warning(
                    "no data for %s %s: %s",
                    self.product,
                    job.map_name,
                    describe_counts(dropped) if dropped else "empty selection (no observation matches)",
                )
                result.record_failure(job.map_name, f"no data for {self.product} {job.map_name}")
                return None
            updated, feeds = self._level2_facts(observations)
            table = facade.load_calibration_table(job.calib_source) if job.calibration == "model" else None
            flags = {}
            if job.use_quality_flags:
                for o in observations:
                    rows = facade.get_quality_flags(o.obsid)
                    flags[o.obsid] = {key: bool(row.is_good) for key, row in rows.items()}
        finally:
            if own:
                facade.disconnect()
        return observations, updated, feeds, table, flags

    def _make_output(self, job: Any, path: Path, config_sha: str, make, result: StageResult) -> bool:
        """Make one output file unless it already carries ``config_sha``; a failure is recorded
        and the others go on. Returns whether the file is there (made or up to date)."""
        logger = logging.getLogger(f"comap.{type(self).__name__}")
        name = path.name
        if not (job.overwrite or self.context.force) and path.exists() and read_configsha(path) == config_sha:
            logger.info("%s is up to date", name)
            result.skipped += 1
            return True
        t0 = time.perf_counter()
        try:
            make()
        except MapJobFailed as exc:
            logger.warning("%s", exc)
            result.record_failure(name, str(exc))
            return False
        except Exception as exc:  # one output failing does not stop the others
            logger.error("%s %s failed: %s: %s", self.product, name, type(exc).__name__, exc, exc_info=True)
            result.record_failure(name, f"{type(exc).__name__}: {exc}")
            return False
        result.done += 1
        logger.info("wrote %s in %.1f s", path, time.perf_counter() - t0)
        return True

    def run_map_job(
        self,
        job: Any,
        files: list[Any] | None,
        *,
        master: dict[str, Any] | None = None,
        result: StageResult | None = None,
        executor=None,
    ) -> StageResult:
        """Make every map of one CreateMap job; ``files`` overrides the DB selection."""
        master = master or {}
        result = result or StageResult(stage=type(self).__name__)
        gathered = self._gather(job, files, master, result)
        if gathered is None:
            return result
        observations, updated, feeds, table, flags = gathered
        concrete = job.expand(observations, feeds)
        grid: list = []  # one geometry for every map of the job, made when first needed

        def geometry():
            if not grid:
                grid.append(self._geometry(job, observations, table, flags))
            return grid[0]

        made: dict[str, Path] = {}
        for spec in concrete:
            sha = job.job_config_hash(spec, observations, updated)

            def make(spec=spec, sha=sha):
                self.make_map(job, spec, observations, table, flags, geometry(), sha, executor)

            if self._make_output(job, spec.output_path, sha, make, result):
                made[spec.suffix] = spec.output_path
        if job.write_difference:
            self._write_differences(job, concrete, made, result)
        return result

    def _geometry(self, job: Any, observations: list[Any], table: Any, flags: dict):
        """One grid for all maps of the job (so that split maps can be differenced)."""
        if job.wcs_def != "dynamic":
            return job_geometry(job.wcs_def, job.wcs_def_file)
        reader = Level2DataReader(job.reader_settings(job.bands[0], job.channels[0]), table, flags)
        plans = reader.prepass(observations)
        if not plans:
            raise MapJobFailed(f"no data for map {job.map_name}: {describe_counts(reader.counts)}")
        lon, lat = sample_pointing(plans, job.dynamic_frame)
        return job_geometry(
            "dynamic",
            job.wcs_def_file,
            lon,
            lat,
            frame=job.dynamic_frame,
            cdelt_deg=job.dynamic_wcs_cdelt,
            padding_deg=job.dynamic_wcs_padding,
        )

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
        # odd/even: scans numbered in time order across the selection
        scans = sorted({(p.mjd_mid, p.obsid, p.scan) for p in plans})
        number = {(o, s): k for k, (_m, o, s) in enumerate(scans)}
        parity = 0 if spec.segment_filter == "even" else 1
        return [p for p in plans if number[(p.obsid, p.scan)] % 2 == parity]

    def make_map(
        self,
        job: Any,
        spec: Any,
        observations: list[Any],
        table: Any,
        flags: dict,
        geometry: Any,
        config_sha: str,
        executor=None,
    ) -> Path:
        """Read, destripe and write one concrete map (04 §3–§5)."""
        from modules.MapMaking.destriper import destripe

        name = spec.output_path.name
        selected = [o for o in observations if spec.obsids is None or o.obsid in spec.obsids]
        reader = Level2DataReader(job.reader_settings(spec.band, spec.channel, spec.feeds), table, flags)
        plans = self._filter_segments(reader.prepass(selected), spec, job.sun_elevation_threshold_deg)
        if not plans:
            raise MapJobFailed(f"no data for map {name}: {describe_counts(reader.counts)}")
        log.info(
            "%s: %d segment(s) from %d observation(s); %s",
            name,
            len(plans),
            len({p.obsid for p in plans}),
            describe_counts(reader.counts),
        )
        files = len({p.path for p in plans})
        with Progress(files, desc=f"reading {name}", logger=log, unit="file") as bar:
            out = reader.read(
                plans, geometry, executor=_ExecutorAdapter(executor) if executor else None, progress=bar
            )
        hit, comp = compress_pixels(out.pixels, out.weights, out.map_weights)
        if hit.size == 0:
            raise MapJobFailed(f"no data for map {name}: no sample lands on the map with non-zero weight")
        res = destripe(
            out.tod,
            comp,
            out.weights,
            int(job.offset_length),
            int(hit.size),
            tol=float(job.tol),
            max_iter=int(job.max_iter),
            segment_starts=out.segment_starts,
            map_weights=out.map_weights,
            lambda_ridge=float(job.lambda_ridge),
            good_fraction=float(job.good_fraction),
        )
        if res.status != "converged":
            log.warning(
                "%s: destriper %s after %d iterations (residual %.3g); map written with DSTATUS",
                name,
                res.status,
                res.n_iter,
                float(np.min(res.residuals)),
            )

        def grid(values, fill=np.nan, dtype=np.float64):
            full = np.full(geometry.n_pixels, fill, dtype=dtype)
            full[hit] = values
            return full.reshape(geometry.shape)

        info = MapInfo(
            object_name=job.map_name,
            band=spec.band,
            channel=spec.channel,
            feeds=out.feeds,
            obsids=out.obsids,
            mjd_min=out.mjd_range[0],
            mjd_max=out.mjd_range[1],
            freq_hz=out.freq_ghz * 1e9,
            bandwidth_hz=out.bandwidth_ghz * 1e9,
            n_segment=out.n_segments,
            n_sample=int(out.tod.size),
            destriper={
                "OFFLEN": int(job.offset_length),
                "LAMBDA": float(job.lambda_ridge),
                "GOODFRAC": float(job.good_fraction),
                "TOL": float(job.tol),
                "NITER": int(res.n_iter),
                "RESID": float(np.min(res.residuals)),
                "DSTATUS": str(res.status),
            },
            calibration={
                "MODE": job.calibration,
                "SOURCE": job.calib_source,
                "MEDFACT": float(np.median([p.factor for p in plans])),
            },
            mean_azel_mjd=out.mean_azel_mjd,
        )
        params = dict(job.parameters)
        params.update(band=spec.band, channel=spec.channel, split=spec.suffix or "none")
        path = write_map_fits(
            spec.output_path,
            geometry,
            destriped=grid(res.map),
            naive=grid(res.naive_map),
            hits=grid(res.hits, 0, np.int64),
            weights=grid(res.weights, 0.0),
            info=info,
            params=params,
            config_sha=config_sha,
            hit_percentile=float(job.hit_percentile),
            min_hits=int(job.min_hits),
            edge_clip_enabled=bool(job.edge_clip),
            edge_clip_width=int(job.edge_clip_width),
            clip_percentiles=tuple(job.clip_percentiles),
            resolved_config={
                "class": job.module_path,
                "params": params,
                "config_sha256": config_sha,
                "obsids": out.obsids,
            },
        )
        if job.quicklook:
            quicklook_png(path)
        return path

    def _write_differences(
        self, job: Any, concrete: list[Any], made: dict[str, Path], result: StageResult
    ) -> None:
        """``(A − B)/2`` of two-way splits, with ``RMS = ½ sqrt(RMS_A² + RMS_B²)``, as ``_diff``."""
        for spec in concrete:
            if not spec.pair or spec.suffix != spec.pair[0]:
                continue
            a = made.get(spec.pair[0])
            b_path = spec.output_path.with_name(
                spec.output_path.name.replace(spec.pair[0] + ".fits", spec.pair[1] + ".fits")
            )
            if a is None or not b_path.exists():
                continue
            diff_path = spec.output_path.with_name(
                spec.output_path.name.replace(spec.pair[0] + ".fits", "_diff.fits")
            )
            try:
                write_difference_map(a, b_path, diff_path)
                result.done += 1
            except Exception as exc:
                log.error("difference map %s failed: %s", diff_path.name, exc, exc_info=True)
                result.record_failure(diff_path.name, f"{type(exc).__name__}: {exc}")


class _ExecutorAdapter:
    """Expose a started LocalPoolExecutor as ``map_unordered`` without restarting it per job."""

    def __init__(self, executor: LocalPoolExecutor) -> None:
        self.executor = executor

    def map_unordered(self, fn, items):
        items = list(items)
        pending = list(enumerate(items))
        in_flight = 0
        while pending or in_flight:
            while pending and self.executor.free_slots():
                key, item = pending.pop(0)
                self.executor.submit(key, item)
                in_flight += 1
            outcome = self.executor.wait()
            in_flight -= 1
            yield outcome


def write_difference_map(a_path: Path, b_path: Path, out_path: Path) -> Path:
    """Jackknife difference ``(A − B)/2`` of two maps on the same grid (RMS ½√(RMS_A²+RMS_B²))."""
    from astropy.io import fits

    from modules.MapMaking.fits_output import write_atomic_fits

    with fits.open(a_path, memmap=False) as a, fits.open(b_path, memmap=False) as b:
        if a[0].data.shape != b[0].data.shape:
            raise ValueError(f"{a_path.name} and {b_path.name} are on different grids")
        diff = 0.5 * (a["DESTRIPED"].data - b["DESTRIPED"].data)
        rms = 0.5 * np.sqrt(a["RMS"].data.astype(np.float64) ** 2 + b["RMS"].data.astype(np.float64) ** 2)
        hdr = a[0].header.copy()
        hdr["OBJECT"] = f"{hdr.get('OBJECT', '')} (A-B)/2"
        hdr["HIERARCH COMAP DIFFA"] = a_path.name
        hdr["HIERARCH COMAP DIFFB"] = b_path.name
        primary = fits.PrimaryHDU(diff.astype(np.float32), header=hdr)
        hits = np.minimum(a["HITS"].data, b["HITS"].data)
        mask = (a["MASK"].data | b["MASK"].data).astype(np.uint8)
        hdus = [
            primary,
            fits.ImageHDU(
                np.full_like(diff, np.nan, dtype=np.float32), header=a["NAIVE"].header, name="NAIVE"
            ),
            fits.ImageHDU(hits.astype(np.int32), header=a["HITS"].header, name="HITS"),
            fits.ImageHDU(rms.astype(np.float32), header=a["RMS"].header, name="RMS"),
            fits.ImageHDU(mask, header=a["MASK"].header, name="MASK"),
        ]
    return write_atomic_fits(out_path, hdus)


def quicklook_png(fits_path: Path) -> Path:
    """A PNG of the DESTRIPED map beside the FITS file (same stem)."""
    from astropy.io import fits

    from utils.plotting import new_figure, save_figure

    with fits.open(fits_path, memmap=False) as hdul:
        data = hdul[0].data
        header = hdul[0].header
    fig, ax = new_figure(figsize=(7.0, 6.0))
    finite = data[np.isfinite(data)]
    vmin, vmax = np.percentile(finite, [1, 99]) if finite.size else (0, 1)
    im = ax.imshow(data, origin="lower", cmap="inferno", vmin=vmin, vmax=vmax)
    fig.colorbar(im, ax=ax, label="K (Rayleigh-Jeans)")
    ax.set_title(
        f"{header.get('OBJECT', '')} band {header.get('BAND')} ch {header.get('CHANNEL')} "
        f"({header.get('FREQ', 0) / 1e9:.2f} GHz)"
    )
    ax.set_xlabel(f"{header.get('CTYPE1', 'x')} pixel")
    ax.set_ylabel(f"{header.get('CTYPE2', 'y')} pixel")
    return save_figure(fig, fits_path.with_suffix(".png"))


class LineMapMaking(MapMaking):
    """Make the RRL cubes listed in a line-map config (04 §9); its jobs are ``CreateLineMap`` calls.

    Parameters
    ----------
    config_file : str
        The line-map config: ``[Master]`` as for MapMaking and a ``pipeline`` of ``CreateLineMap``
        calls.
    """

    product = "cube"

    def __init__(self, config_file: str = "parameter_files/level2_line_mapmaking.toml") -> None:
        super().__init__(config_file)

    def _rejects(self, job: Any) -> str | None:
        return None if self._is_line_job(job) else "not a CreateLineMap job; LineMapMaking makes cubes only"

    def _outputs(self, job: Any, observations: list[Any]) -> list[Path]:
        return [c.output_path for c in job.expand()]

    @staticmethod
    def _read_task():
        from modules.MapMaking.read_line_data import _read_line_task

        return _read_line_task

    def _run_job(self, job: Any, master: dict[str, Any], result: StageResult, executor) -> None:
        self.run_line_job(job, None, master=master, result=result, executor=executor)

    def run_line_job(
        self,
        job: Any,
        files: list[Any] | None,
        *,
        master: dict[str, Any] | None = None,
        result: StageResult | None = None,
        executor=None,
    ) -> StageResult:
        """Make every cube of one CreateLineMap job; ``files`` overrides the DB selection."""
        master = master or {}
        result = result or StageResult(stage=type(self).__name__)
        gathered = self._gather(job, files, master, result)
        if gathered is None:
            return result
        observations, updated, _feeds, table, flags = gathered
        for cube in job.expand():
            sha = job.job_config_hash(cube, observations, updated)

            def make(cube=cube, sha=sha):
                self.make_cube(job, cube, observations, table, flags, sha, executor)

            self._make_output(job, cube.output_path, sha, make, result)
        return result

    @staticmethod
    def _native_step_kms(cube: Any, path: str) -> float:
        """Native channel width ``c |Δν| / ν0`` (km/s) of the widest of the cube's lines."""
        from utils.rrl import SPEED_OF_LIGHT_KMS

        with h5py.File(path, "r", locking=False) as l2:
            freq = np.asarray(l2["spectrometer/frequency"][...], dtype=np.float64)
        width_ghz = float(np.median(np.abs(np.diff(freq, axis=1))))
        return max(SPEED_OF_LIGHT_KMS * width_ghz / s.rest_freq_ghz for s in cube.lines)

    def make_cube(
        self,
        job: Any,
        cube: Any,
        observations: list[Any],
        table: Any,
        flags: dict,
        config_sha: str,
        executor=None,
    ) -> Path:
        """Pre-pass, read, assemble and write one cube (04 §9.3–§9.6)."""
        from modules.MapMaking.fits_output import SpectralAxis, write_cube_fits
        from modules.MapMaking.line_cube import (
            Cube,
            cube_from_sums,
            cube_quicklook_png,
            destripe_channels,
            pixel_baselines,
        )
        from modules.MapMaking.read_line_data import LineDataReader

        name = cube.output_path.name
        reader = LineDataReader(job.reader_settings(cube, 1.0), table, flags)
        plans = reader.prepass(observations)
        if not plans:
            raise MapJobFailed(f"no data for cube {name}: {describe_counts(reader.counts)}")
        step = job.velocity_resolution_kms or self._native_step_kms(cube, plans[0].path)
        settings = job.reader_settings(cube, float(step))
        reader.settings = settings
        grid = settings.grid
        if job.wcs_def != "dynamic":
            geometry = job_geometry(job.wcs_def, job.wcs_def_file)
        else:
            lon, lat = sample_pointing(plans, job.dynamic_frame)
            geometry = job_geometry(
                "dynamic",
                job.wcs_def_file,
                lon,
                lat,
                frame=job.dynamic_frame,
                cdelt_deg=job.dynamic_wcs_cdelt,
                padding_deg=job.dynamic_wcs_padding,
            )
        line_log.info(
            "%s: %d segment(s) from %d observation(s), %d velocity channels of %.2f km/s; %s",
            name,
            len(plans),
            len({p.obsid for p in plans}),
            grid.n_v,
            grid.step_kms,
            describe_counts(reader.counts),
        )
        files = len({p.path for p in plans})
        with Progress(files, desc=f"reading {name}", logger=log, unit="file") as bar:
            acc = reader.read(
                plans, geometry, executor=_ExecutorAdapter(executor) if executor else None, progress=bar
            )
        for note in acc.notes:
            line_log.info("%s: %s", name, note)
        if acc.hit.size == 0 or not (acc.acc_w > 0).any():
            raise MapJobFailed(
                f"no data for cube {name}: no sample with weight lands on the map "
                f"({describe_counts(acc.counts)})"
            )
        line, rms = cube_from_sums(acc)
        with np.errstate(divide="ignore", invalid="ignore"):
            continuum = np.where(acc.cont_w > 0, acc.cont_sum / acc.cont_w, np.nan)
        destriper_cards: dict[str, Any] = {}
        if settings.per_sample:
            line, destriper_cards = destripe_channels(
                acc, settings, offset_length=job.offset_length, tol=job.tol, max_iter=job.max_iter
            )
        if settings.continuum_subtraction == "pixel":
            line, continuum = pixel_baselines(line, acc.acc_w, settings)
        first = cube.lines[0]
        lines_cards: dict[str, Any] = {"STACKED": len(cube.lines) > 1}
        total_weight = float(acc.line_weight.sum()) if acc.line_weight is not None else 0.0
        for k, spec in enumerate(cube.lines, start=1):
            lines_cards[f"LINE{k}"] = spec.label
            lines_cards[f"RFREQ{k}"] = (spec.rest_freq_ghz * 1e9, "Hz")
            if total_weight > 0:
                share = float(acc.line_weight[k - 1]) / total_weight
                lines_cards[f"HIERARCH LINE W{k}"] = (share, f"share of {spec.label} in the weights")
        lines_cards.update(
            {
                "HIERARCH LINE CONTSUB": settings.continuum_subtraction,
                "HIERARCH LINE BASEORD": int(settings.baseline_order),
                "HIERARCH LINE MASKLO": (settings.mask_kms[0], "km/s LSRK"),
                "HIERARCH LINE MASKHI": (settings.mask_kms[1], "km/s LSRK"),
                "HIERARCH LINE VCENTER": (grid.center_kms, "km/s LSRK"),
                "HIERARCH LINE DV": (grid.step_kms, "km/s"),
                "HIERARCH LINE L1BYTES": (int(acc.bytes_read), "level-1 TOD bytes read"),
            }
        )
        lines_cards.update(destriper_cards)
        from utils.rrl import SPEED_OF_LIGHT_KMS

        info = MapInfo(
            object_name=job.map_name,
            band=int(plans[0].uses[0].band) if len(cube.lines) == 1 else -1,
            channel=-1,
            feeds=sorted({f for _o, f, _s in acc.used}),
            obsids=sorted({o for o, _f, _s in acc.used}),
            mjd_min=acc.mjd_range[0],
            mjd_max=acc.mjd_range[1],
            freq_hz=first.rest_freq_ghz * 1e9,
            bandwidth_hz=first.rest_freq_ghz * 1e9 * grid.step_kms / SPEED_OF_LIGHT_KMS,
            n_segment=len(acc.used),
            n_sample=int(acc.n_samples),
            calibration={
                "MODE": job.calibration,
                "SOURCE": job.calib_source,
                "MEDFACT": float(np.median([u.factor for p in plans for u in p.uses])),
            },
        )
        spectral = SpectralAxis(
            job.spectral_axis, grid.center_kms, grid.step_kms, grid.n_v, first.rest_freq_ghz * 1e9
        )
        params = dict(job.parameters)
        params.update(cube=cube.label)
        path = write_cube_fits(
            cube.output_path,
            geometry,
            spectral,
            hit=acc.hit,
            line=line,
            rms=rms,
            hits=acc.hits,
            continuum=continuum,
            info=info,
            params=params,
            config_sha=config_sha,
            line_cards=lines_cards,
            hit_percentile=float(job.hit_percentile),
            min_hits=int(job.min_hits),
            resolved_config={
                "class": job.module_path,
                "params": params,
                "config_sha256": config_sha,
                "obsids": info.obsids,
                "lines": {s.label: s.rest_freq_ghz for s in cube.lines},
            },
        )
        line_log.info(
            "%s: %d samples, %.1f MB of level-1 TOD read", name, acc.n_samples, acc.bytes_read / 1e6
        )
        if job.quicklook:
            from modules.MapMaking.fits_output import hit_mask

            hits_full = np.zeros(geometry.n_pixels, dtype=np.int64)
            hits_full[acc.hit] = acc.hits
            mask, _thr = hit_mask(
                hits_full.reshape(geometry.shape), hit_percentile=job.hit_percentile, min_hits=job.min_hits
            )
            cube_quicklook_png(
                path.with_suffix(".png"),
                geometry,
                acc.hit,
                Cube(line, rms, continuum),
                grid.velocities_kms,
                settings.mask_kms,
                mask.ravel()[acc.hit] != 0,
                f"{job.map_name} {cube.label}",
            )
        return path


__all__ = ["LineMapMaking", "MapJobFailed", "MapMaking", "quicklook_png", "write_difference_map"]
