"""The map-making dispatcher: runs the map jobs of a config whatever product they make
(docs/mapmaking.md#orchestration).

For every job: select the observations (docs/mapmaking.md#file-selection) in the coordinator, expand the job
into concrete outputs (the product's :meth:`~modules.MapMaking.product.MapProduct.expand`), skip outputs whose
FITS file already carries the output's configuration hash, make the others (the product's ``make``: files read
in parallel on ``nprocess`` workers) and, for two-way splits, write the difference maps. An output that fails
or a job that selects nothing is counted as failed and the others continue.

This module knows no product: it drives jobs through the protocol of
:class:`~modules.MapMaking.product.MapProduct`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py

from modules.MapMaking.fits_metadata import calibrator_beam_table
from modules.MapMaking.fits_output import read_configsha, write_difference_map
from modules.MapMaking.read_data import describe_counts
from modules.MapMaking.segments import noise_group
from modules.pipeline_control import signals
from modules.pipeline_control.executors import LocalPoolExecutor, make_executor
from modules.pipeline_control.logging_setup import Progress
from modules.pipeline_control.Pipeline import RunContext, StageResult
from utils.constants import SUPPORTED_LEVEL2_FORMAT_VERSIONS
from utils.disk import is_no_space, no_space_reason
from utils.level2 import FEEDS, format_version


class MapJobFailed(Exception):
    """An output cannot be made (no data, no hits...): one line, the other outputs continue."""


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


@dataclass
class JobInputs:
    """What the dispatcher gathered for one job: its selection and the database facts about it.

    Attributes
    ----------
    observations : list
        COMAPData rows selected (level-2 file present, done and readable).
    updated : dict
        obsid → ``updated_utc`` of its level-2 file.
    feeds : list of int
        Union of the feeds of the selected level-2 files.
    table : CalibrationTable or None
        Calibration factors, with ``calibration='model'``.
    flags : dict
        obsid → {(feed, band, channel): is_good}, with ``use_quality_flags``.
    log : logging.Logger
        The running stage's logger.
    beams : dict
        (feed, band) → (median calibrator-fitted FWHM at 30 GHz in arcmin, number of fits), from the
        database's ``calibration_flux`` rows (docs/map_products.md#beam-brightness-and-provenance).
    """

    observations: list[Any]
    updated: dict[int, str]
    feeds: list[int]
    table: Any
    flags: dict
    log: logging.Logger
    beams: dict = field(default_factory=dict)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shared(self, key: str, make):
        """``make()`` the first time ``key`` is asked for in this job, the same value after (one
        geometry for all maps of a job, made only when a map has to be made)."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def read_progress(self, n_files: int, name: str) -> Progress:
        """A progress bar over the ``n_files`` files read for output ``name``."""
        return Progress(n_files, desc=f"reading {name}", logger=self.log, unit="file")


def call_read_task(item: tuple[Any, Any]) -> Any:
    """Worker entry point: ``item`` is (a product's module-level read task, its argument)."""
    task, args = item
    return task(args)


class PoolReader:
    """A started LocalPoolExecutor (running :func:`call_read_task`) seen as ``map_unordered``."""

    def __init__(self, executor: LocalPoolExecutor) -> None:
        self.executor = executor

    def map_unordered(self, fn, items):
        pending = list(enumerate(items))
        in_flight = 0
        while pending or in_flight:
            while pending and self.executor.free_slots():
                key, item = pending.pop(0)
                self.executor.submit(key, (fn, item))
                in_flight += 1
            outcome = self.executor.wait()
            in_flight -= 1
            yield outcome


def make_on_every_rank(world: Any, job: Any, output: Any, inputs: JobInputs, config_sha: str) -> Any:
    """One output of a distributed product, run on every rank of an MPI run
    (docs/mapmaking.md#distributed-map-making); rank 0 reports a failure, the other ranks drop it."""
    try:
        return job.make(output, inputs, config_sha, None, world=world)
    except MapJobFailed:
        if world.rank == 0:
            raise
        return None  # every rank raised it (docs/mapmaking.md#distributed-map-making); rank 0 reports
    except Exception as exc:
        if world.rank == 0:
            raise
        # not agreed between the ranks: say so at once, rank 0 may be waiting in a collective
        print(f"rank {world.rank}: {output.output_path.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        logging.getLogger("comap.mpi").debug("traceback on rank %d", world.rank, exc_info=True)
        return None


def wrong_products(entries: list[Any], stage: str, product: str) -> list[str]:
    """Why entries of a stage's config cannot run there: not a map product, or another product."""
    problems = []
    for spec in entries:
        made = getattr(spec.cls, "product", None)
        if not callable(getattr(spec.cls, "expand", None)) or made is None:
            problems.append(f"{spec.name} is not a map product; {stage} runs map products only")
        elif made != product:
            problems.append(f"{spec.name} makes {made}s; {stage} makes {product}s only")
    return problems


class Dispatcher:
    """Runs map jobs for one stage.

    Parameters
    ----------
    stage : str
        Name of the running stage (its logger is ``comap.<stage>``).
    product : str
        What the stage makes (``'map'``, ``'cube'``), for messages.
    context : RunContext, optional
        The run's context (CLI obsids, ``--force``, ``nprocess``, logging); standalone if None.
    """

    def __init__(self, stage: str, product: str, context: RunContext | None = None) -> None:
        self.stage = stage
        self.product = product
        self.context = context or RunContext()
        self.log = logging.getLogger(f"comap.{stage}")

    # --- selection (docs/mapmaking.md#file-selection)
    # ----------------------------------------------------------------------
    @staticmethod
    def _facade(job: Any, master: dict[str, Any]):
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
        group = noise_group(job.tod_data_name)
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
                    version = format_version(l2)
                    if job.tod_data_name not in l2:
                        dropped[f"lacks {job.tod_data_name}"] += 1
                        continue
                    if group not in l2:
                        dropped[f"lacks {group}"] += 1
                        continue
                    if version is None or version not in SUPPORTED_LEVEL2_FORMAT_VERSIONS:
                        dropped["unsupported level-2 format version"] += 1
                        continue
            except OSError:
                dropped["level-2 file unreadable"] += 1
                continue
            keep.append(o)
        return keep, dropped

    @staticmethod
    def level2_facts(observations: list[Any]) -> tuple[dict[int, str], list[int]]:
        """``updated_utc`` of each level-2 file and the union of their feeds."""
        updated, feeds = {}, set()
        for o in observations:
            with h5py.File(o.level2_path, "r", locking=False) as l2:
                updated[o.obsid] = str(_decode(l2.attrs.get("updated_utc", "")))
                feeds.update(int(f) for f in l2[FEEDS][...])
        return updated, sorted(feeds)

    # --- plan -------------------------------------------------------------------------------------
    def plan(self, entries: list[Any], master: dict[str, Any]) -> list[str]:
        """One line per job (selection and output count) and one per output file."""
        lines = []
        for spec in entries:
            job = spec.instantiate()
            facade, own = self._facade(job, master)
            try:
                obs, dropped = self.select(job, master, facade)
            finally:
                if own:
                    facade.disconnect()
            _updated, feeds = self.level2_facts(obs) if obs else ({}, [])
            outputs = [o.output_path for o in job.expand(obs, feeds)]
            lines.append(
                f"  {spec.name}({job.map_name}): {len(obs)} observation(s) selected "
                f"({describe_counts(dropped) if dropped else 'none dropped'}); "
                f"{len(outputs)} {self.product}(s)"
            )
            lines.extend(f"    {path}" for path in outputs)
        return lines

    # --- run --------------------------------------------------------------------------------------
    def run(self, entries: list[Any], master: dict[str, Any]) -> StageResult:
        """Run every job of a config; one pool of ``nprocess`` readers serves them all."""
        result = StageResult(stage=self.stage)
        n = self.context.nprocess if self.context.nprocess is not None else master.get("nprocess") or 1
        world = self._world()
        pool = None
        if max(1, int(n)) > 1 or world is not None:
            import multiprocessing

            log_queue = None
            if self.context.logging is not None:
                with signals.spawning():  # the queue may start multiprocessing's resource tracker
                    log_queue = self.context.logging.start_queue(multiprocessing.get_context("spawn"))
            pool = make_executor(
                max(2, int(n)), log_queue=log_queue, log_level=self.context.log_level, world=world
            )
            pool.start(call_read_task)
        stopped = True
        try:
            for i, spec in enumerate(entries):
                if signals.drain_requested():  # docs/reliability.md#signals
                    signals.left_pending(len(entries) - i)
                    self.log.warning("drain requested (SIGUSR1): %d map job(s) not started", len(entries) - i)
                    break
                self.run_job(spec.instantiate(), None, master=master, result=result, executor=pool)
            stopped = False
        finally:
            if pool is not None:
                pool.shutdown(terminate=stopped)  # interrupted: do not wait for the reads in flight
                if self.context.logging is not None:
                    self.context.logging.stop_queue()
        return result

    def _world(self):
        """The MPIWorld of an MPI run of more than one rank, else None."""
        world = self.context.mpi
        return world if world is not None and world.size > 1 else None

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
                self.log.warning(
                    "no data for %s %s: %s",
                    self.product,
                    job.map_name,
                    describe_counts(dropped) if dropped else "empty selection (no observation matches)",
                )
                result.record_failure(job.map_name, f"no data for {self.product} {job.map_name}")
                return None
            updated, feeds = self.level2_facts(observations)
            table = facade.load_calibration_table(job.calib_source) if job.calibration == "model" else None
            flags = {}
            if job.use_quality_flags:
                for o in observations:
                    rows = facade.get_quality_flags(o.obsid)
                    flags[o.obsid] = {key: bool(row.is_good) for key, row in rows.items()}
            beams = calibrator_beam_table(facade.query_calibration_flux(None, feeds=feeds or None))
        finally:
            if own:
                facade.disconnect()
        return JobInputs(observations, updated, feeds, table, flags, self.log, beams)

    def run_job(
        self,
        job: Any,
        files: list[Any] | None,
        *,
        master: dict[str, Any] | None = None,
        result: StageResult | None = None,
        executor: LocalPoolExecutor | None = None,
    ) -> StageResult:
        """Make every output of one job; ``files`` overrides the DB selection."""
        master = master or {}
        result = result or StageResult(stage=self.stage)
        inputs = self._gather(job, files, master, result)
        if inputs is None:
            return result
        reader = PoolReader(executor) if executor is not None else None
        outputs = job.expand(inputs.observations, inputs.feeds)
        made: set[Path] = set()
        for out in outputs:
            sha = job.job_config_hash(out, inputs.observations, inputs.updated)

            def make(out=out, sha=sha):
                world = self._world()
                if world is not None and job.distributed:
                    world.collective(make_on_every_rank, job, out, inputs, sha)
                else:
                    job.make(out, inputs, sha, reader)

            if self._make_output(job, out.output_path, sha, make, result):
                made.add(out.output_path)
        if getattr(job, "write_difference", False):
            self._write_differences(job, outputs, made, result)
        return result

    def _make_output(self, job: Any, path: Path, config_sha: str, make, result: StageResult) -> bool:
        """Make one output file unless it already carries ``config_sha`` (and has its quicklook PNG,
        which a run killed between the two did not write: docs/reliability.md#killed-at-any-point); a
        failure is recorded and the others go on. Returns whether the file is there (made or up to date)."""
        name = path.name
        up_to_date = path.exists() and read_configsha(path) == config_sha
        if up_to_date and getattr(job, "quicklook", False) and not path.with_suffix(".png").exists():
            self.log.info("%s has no quicklook PNG; making it again", name)
            up_to_date = False
        if not (job.overwrite or self.context.force) and up_to_date:
            self.log.info("%s is up to date", name)
            result.skipped += 1
            return True
        t0 = time.perf_counter()
        try:
            make()
        except MapJobFailed as exc:
            self.log.warning("%s", exc)
            result.record_failure(name, str(exc))
            return False
        except Exception as exc:  # one output failing does not stop the others
            if is_no_space(exc):  # docs/reliability.md#transient-io-errors-and-full-disks
                self.log.error("%s %s failed: %s", self.product, name, no_space_reason(path))
                result.record_failure(name, no_space_reason(path))
                return False
            self.log.error("%s %s failed: %s: %s", self.product, name, type(exc).__name__, exc, exc_info=True)
            result.record_failure(name, f"{type(exc).__name__}: {exc}")
            return False
        result.done += 1
        self.log.info("wrote %s in %.1f s", path, time.perf_counter() - t0)
        return True

    def _write_differences(self, job: Any, outputs: list[Any], made: set[Path], result: StageResult) -> None:
        """``(A − B)/2`` of the two-way splits whose A and B files are there, as ``_diff``, with the
        job's quicklook PNG when it draws them."""
        for out in outputs:
            pair = getattr(out, "pair", None)
            if not pair or out.suffix != pair[0] or out.output_path not in made:
                continue
            a_path = out.output_path
            b_path = a_path.with_name(a_path.name.replace(pair[0] + ".fits", pair[1] + ".fits"))
            if not b_path.exists():
                continue
            diff_path = a_path.with_name(a_path.name.replace(pair[0] + ".fits", "_diff.fits"))
            try:
                write_difference_map(a_path, b_path, diff_path)
                if getattr(job, "quicklook", False):
                    job.write_quicklook(diff_path)
                result.done += 1
            except Exception as exc:
                self.log.error("difference map %s failed: %s", diff_path.name, exc, exc_info=True)
                result.record_failure(diff_path.name, f"{type(exc).__name__}: {exc}")


__all__ = [
    "Dispatcher",
    "JobInputs",
    "MapJobFailed",
    "PoolReader",
    "call_read_task",
    "make_on_every_rank",
    "wrong_products",
]
