"""Level2Pipeline: reduce registered level-1 observations to level-2 files (docs/level2.md#execution-model).

The coordinator selects observations from the database, classifies each against its
``processing_jobs`` row, claims the ones with work to do, dispatches them to an executor (serial or a
local process pool with a dynamic queue) and records every outcome in one transaction per
observation: it is the single database writer. Workers build each level-2 file in a staging file and
publish it atomically (``observation.py``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np

from modules.pipeline_control import jobs, signals
from modules.pipeline_control.base import describe_stale, stale_stages
from modules.pipeline_control.config import ErrorCollector, LoadedConfig, load_config
from modules.pipeline_control.config_dump import dump_toml, tomlable
from modules.pipeline_control.executors import PoolInitError, make_executor
from modules.pipeline_control.logging_setup import Progress, obsid_context
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import PipelineStage, StageResult, StreamingStage
from modules.pipeline_control.provenance import canonical_json
from modules.pipeline_control.streaming import check_products
from modules.ProcessLevel2.observation import (
    ObservationTask,
    WorkerOptions,
    file_info_from_fields,
    init_worker,
    instantiate_modules,
    process_observation,
    release_worker,
)
from modules.SQLModule.SQLModule import COMAPData, db
from utils import level1_layout as L1
from utils.errors import BadCOMAPFile, ConfigError

log = logging.getLogger("comap.Level2Pipeline")


def _fields(obs: COMAPData) -> dict[str, Any]:
    return {c.key: getattr(obs, c.key) for c in COMAPData.__table__.columns}


_OBSID_PREFIX = re.compile(r"\bObsID\s+\d+:\s*", re.IGNORECASE)
_PATH_TOKEN = re.compile(r"\S*/\S*")
_NUMBER = re.compile(r"\d+")


def failure_signature(reason: str) -> str:
    """A failure reason without what differs between observations (obsid, file paths, numbers), so
    that a missing mount or a full disk counts as the same reason for every file
    (docs/operations.md#error-model item 3)."""
    text = _OBSID_PREFIX.sub("", reason)
    text = _PATH_TOKEN.sub("<path>", text)
    return _NUMBER.sub("#", text)


class Level2Pipeline(PipelineStage):
    """Reduce level-1 observations to calibrated, filtered, binned level-2 files
    (docs/level2.md#execution-model).

    Parameters
    ----------
    config_file : str
        The level-2 config (its ``[Master]`` selects observations; its ``pipeline`` lists modules).
    hk_time_offset_s : float
        Housekeeping clock lag, s (docs/formats/level1.md#housekeeping-time-alignment).
    on_parameter_change : {'warn', 'recompute'}
        What to do when a module's stored output was written with other parameters
        (docs/level2.md#done-checks-and-provenance).
    stale_job_timeout_s : float
        A ``running`` job older than this, or whose owner PID is dead on this host, is reclaimed.
    max_consecutive_failures : int
        Stop dispatching after this many failures in a row with the same first line
        (docs/operations.md#error-model).
    """

    sub_config_kind = "level2"

    def __init__(
        self,
        config_file: str = "parameter_files/level2_processing.toml",
        hk_time_offset_s: float = 0.6,
        on_parameter_change: Literal["warn", "recompute"] = "warn",
        stale_job_timeout_s: Annotated[float, Range(gt=0)] = 21600.0,
        max_consecutive_failures: Annotated[int, Range(ge=1)] = 20,
    ) -> None:
        self.config_file = config_file
        self.hk_time_offset_s = float(hk_time_offset_s)
        self.on_parameter_change = on_parameter_change
        self.stale_job_timeout_s = float(stale_job_timeout_s)
        self.max_consecutive_failures = int(max_consecutive_failures)

    # --- validation ----------------------------------------------------------------------------
    @classmethod
    def validate_sub_config(cls, sub: LoadedConfig) -> list[Any]:
        problems: list[Any] = []
        creators = [i for i, e in enumerate(sub.entries) if hasattr(e.cls, "level2_path_for")]
        if len(sub.entries) and not creators:
            problems.append(
                ConfigError(
                    "a level-2 pipeline list must contain CreateLevel2File (it decides the level-2 path)",
                    str(sub.path),
                    "pipeline",
                )
            )
        elif creators:
            first_writer = next(
                (i for i, e in enumerate(sub.entries) if not getattr(e.cls, "runs_with_others", False)), None
            )
            if first_writer is not None and creators[0] > first_writer:
                problems.append(
                    ConfigError(
                        "CreateLevel2File must come before every module that writes level 2",
                        str(sub.path),
                        f"pipeline[{creators[0]}]",
                        sub.entries[creators[0]].call.text,
                    )
                )
        for group in cls._stream_groups(sub):
            for msg in check_products([e.cls for e in group]):
                problems.append(ConfigError(msg, str(sub.path), group[0].call.where, group[0].call.text))
        return problems

    @staticmethod
    def _stream_groups(sub: LoadedConfig) -> list[list[Any]]:
        groups: list[list[Any]] = []
        prev_stream = False
        for e in sub.entries:
            is_stream = isinstance(e.cls, type) and issubclass(e.cls, StreamingStage)
            if is_stream:
                if prev_stream:
                    groups[-1].append(e)
                else:
                    groups.append([e])
            prev_stream = is_stream
        return groups

    # --- helpers -----------------------------------------------------------------------------------
    def _sub_config(self) -> LoadedConfig:
        sub = self.context.sub_config(self.config_file)
        if sub is not None:
            return sub
        errors = ErrorCollector()
        sub = load_config(self.config_file, "level2", errors)
        if sub is not None:
            for p in self.validate_sub_config(sub):
                errors.extend([p] if isinstance(p, ConfigError) else [])
        errors.raise_if_any()
        assert sub is not None
        return sub

    def _select(self, sub: LoadedConfig) -> list[COMAPData]:
        master = sub.master
        ctx = self.context
        if ctx.obsids is not None:
            obs = db.query_observations(obsids=ctx.obsids)
            missing = sorted(set(ctx.obsids) - {o.obsid for o in obs})
            if missing:
                log.warning(
                    "--obsid: %d obsid(s) are not registered in the database: %s",
                    len(missing),
                    _abbrev(missing),
                )
            return [o for o in obs if o.level1_path]
        obsids = None
        if master.get("target_obsid") is not None:
            obsids = db.load_obsid_list(master["target_obsid"])
        obs = db.query_observations(
            source=master.get("source"),
            source_group=master.get("source_group"),
            min_obsid=master.get("min_obsid"),
            max_obsid=master.get("max_obsid"),
            obsids=obsids,
            has_level1=True,
        )
        if obsids is not None:
            missing = sorted(set(obsids) - {o.obsid for o in obs})
            if missing:
                log.warning(
                    "target_obsid: %d obsid(s) not registered or without level 1: %s",
                    len(missing),
                    _abbrev(missing),
                )
        return obs

    @staticmethod
    def _creator(modules: list[Any]) -> Any:
        for m in modules:
            if hasattr(m, "level2_path_for"):
                return m
        raise ConfigError("the level-2 pipeline list has no CreateLevel2File")

    @staticmethod
    def _stale(modules: list[Any], fields: dict[str, Any], final: Path | None) -> str:
        """Why the published file is out of date (docs/operations.md#algorithm-versions), or ``''``."""
        if final is None or not final.exists():
            return ""
        fi = file_info_from_fields(fields)
        fi.level2_path = str(final)
        try:
            return describe_stale(stale_stages(modules, fi))
        except (BadCOMAPFile, OSError) as exc:
            return f"unreadable: {exc}"

    @classmethod
    def _published_complete(cls, modules: list[Any], fields: dict[str, Any], final: Path) -> bool:
        if not final.exists() or cls._stale(modules, fields, final):
            return False
        fi = file_info_from_fields(fields)
        fi.level2_path = str(final)
        for m in modules:
            if getattr(m, "runs_with_others", False):
                continue
            try:
                if not m.already_processed(fi, overwrite=bool(getattr(m, "overwrite", False))):
                    return False
            except BadCOMAPFile:
                return False
        return True

    def _classify(self, sub: LoadedConfig, modules: list[Any]) -> dict[str, Any]:
        ctx = self.context
        force = bool(ctx.force or sub.master.get("force_run"))
        observations = self._select(sub)
        creator = self._creator(modules)
        job_rows = {j.obsid: j for j in db.job_table("level2", obsids=[o.obsid for o in observations])}
        out: dict[str, Any] = {
            "candidates": [],
            "skip": [],
            "skip_failed": [],
            "finals": {},
            "fields": {},
            "stale": {},
            "force": force,
            # the job states this classification is based on; claim_jobs re-checks them under its lock
            "seen": {o: (j.status, j.updated_utc) for o, j in job_rows.items()},
        }
        for o in observations:
            fields = _fields(o)
            try:
                final = Path(creator.level2_path_for(o))
            except (BadCOMAPFile, ValueError) as exc:
                final = None
                log.warning("obsid %s: cannot build its level-2 path: %s", o.obsid, exc)
            out["fields"][o.obsid] = fields
            out["finals"][o.obsid] = final
            job = job_rows.get(o.obsid)
            state = job.status if job is not None else None
            if force:
                out["candidates"].append(o.obsid)
            elif state == "failed" and not ctx.retry_failed:
                out["skip_failed"].append(o.obsid)
            elif state == "done" and final is not None and self._published_complete(modules, fields, final):
                out["skip"].append(o.obsid)
            else:
                out["candidates"].append(o.obsid)
                stale = self._stale(modules, fields, final) if state == "done" else ""
                if stale:
                    out["stale"][o.obsid] = stale
        return out

    # --- plan ----------------------------------------------------------------------------------------
    def plan(self) -> list[str]:
        sub = self._sub_config()
        lines = [f"Level2Pipeline: config {self.config_file}"]
        for e in sub.entries:
            params = ", ".join(f"{k}={v!r}" for k, v in e.params.items())
            lines.append(f"  {e.class_path}({params})")
        groups = self._stream_groups(sub)
        if len(groups) > 1:
            lines.append(f"  WARNING: pipeline order forces {len(groups)} passes over {L1.TOD}")
        modules = instantiate_modules(sub.entries, self.on_parameter_change)
        cls_out = self._classify(sub, modules)
        n_retry = 0
        if self.context.retry_failed:
            failed = {j.obsid for j in db.job_table("level2", status="failed")}
            n_retry = len(set(cls_out["candidates"]) & failed)
        stale = cls_out["stale"]
        for obsid in sorted(stale):
            lines.append(f"  stale: {obsid} {cls_out['finals'][obsid]}: {stale[obsid]}")
        lines.append(
            f"  observations: {len(cls_out['candidates'])} to process ({n_retry} retries, "
            f"{len(stale)} stale), {len(cls_out['skip'])} already done, {len(cls_out['skip_failed'])} "
            "failed (skipped; use --retry-failed)"
        )
        nproc = int(sub.master.get("nprocess") or 1)
        est = self._memory_estimate_gb([cls_out["fields"][o] for o in cls_out["candidates"]])
        if est is not None:
            lines.append(
                f"  memory: about {est:.2f} GB per worker × {nproc} worker(s) "
                "(4 × largest single-feed scan block + 0.5 GB)"
            )
        return lines

    @staticmethod
    def _memory_estimate_gb(fields: list[dict[str, Any]]) -> float | None:
        if not fields:
            return None
        biggest = max(fields, key=lambda f: f.get("level1_size_bytes") or 0)
        path = biggest.get("level1_path")
        try:
            from utils.level1 import Level1File

            with Level1File(path) as l1:
                n_feeds, n_bands, n_chan, n_tod = l1.tod_shape
                fs = l1.sample_rate_hz()
        except Exception:
            return None
        block = 4.0 * n_bands * n_chan * min(n_tod, 600.0 * fs)
        return (4.0 * block) / 1e9 + 0.5

    # --- run -----------------------------------------------------------------------------------------
    def run(self) -> StageResult:
        result = StageResult(stage="Level2Pipeline")
        ctx = self.context
        sub = self._sub_config()
        modules = instantiate_modules(sub.entries, self.on_parameter_change)
        info = self._classify(sub, modules)
        force = info["force"]
        result.skipped = len(info["skip"]) + len(info["skip_failed"])
        self._log_stale(info["stale"])
        if info["skip_failed"]:
            log.info(
                "%d observation(s) skipped because their level-2 job failed earlier (use --retry-failed): %s",
                len(info["skip_failed"]),
                _abbrev(info["skip_failed"]),
            )
        candidates = [o for o in info["candidates"] if info["finals"][o] is not None]
        for o in info["candidates"]:
            if info["finals"][o] is None:
                db.finish_job(
                    o,
                    "level2",
                    "failed",
                    error="CreateLevel2File: cannot build the level-2 path",
                    last_module="CreateLevel2File",
                )
                result.record_failure(o, "cannot build the level-2 path")
        if not candidates:
            log.info(
                "nothing to do: %d observation(s) already done, %d failed earlier",
                len(info["skip"]),
                len(info["skip_failed"]),
            )
            return result

        failed_before = {j.obsid for j in db.job_table("level2", status="failed", obsids=candidates)}
        claim = db.claim_jobs(
            candidates,
            "level2",
            run_id=ctx.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            code_version=ctx.code_version,
            config_sha256=sub.sha256,
            retry_failed=ctx.retry_failed,
            force=True,
            stale_after_s=self.stale_job_timeout_s,
            seen=info["seen"],
        )
        if claim.busy:
            log.warning(
                "%d observation(s) are being processed by another live run and are skipped: %s",
                len(claim.busy),
                _abbrev(claim.busy),
            )
            result.skipped += len(claim.busy)
        result.retried = len(set(claim.claimed) & failed_before)

        tasks: list[ObservationTask] = []
        for obsid in sorted(claim.claimed):
            final = info["finals"][obsid]
            fields = info["fields"][obsid]
            if not force and self._published_complete(modules, fields, final):
                self._recover(obsid, final, result)
                continue
            tasks.append(ObservationTask(fields=fields, final_level2_path=str(final)))
        if not tasks:
            return result
        self._write_resolved_config(sub, modules)
        self._dispatch(sub, tasks, force, result)
        return result

    def _write_resolved_config(self, sub: LoadedConfig, modules: list[Any]) -> None:
        """The resolved level-2 configuration of this run beside its outputs, as
        ``<output_dir>/resolved_configs/<timestamp>_level2.toml``
        (docs/configuration.md#the-resolved-config-dump)."""
        stamp = self.context.timestamp or time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime())
        path = Path(self._creator(modules).output_dir) / "resolved_configs" / f"{stamp}_level2.toml"
        try:
            dump_toml(sub.resolved_dict(), path)
        except OSError as exc:  # the level-2 files still carry it in their config_toml attribute
            log.warning("cannot write the resolved level-2 configuration %s: %s", path, exc)
            return
        log.info("resolved level-2 configuration written to %s", path)

    @staticmethod
    def _log_stale(stale: dict[int, str]) -> None:
        """One INFO line counting the out-of-date files by reason; one DEBUG line per file."""
        if not stale:
            return
        reasons = collections.Counter(stale.values())
        log.info(
            "%d level-2 file(s) are out of date and will be reprocessed: %s",
            len(stale),
            "; ".join(f"{n} × {r}" for r, n in reasons.most_common()),
        )
        for obsid in sorted(stale):
            log.debug("obsid %s out of date: %s", obsid, stale[obsid])

    def _recover(self, obsid: int, final: Path, result: StageResult) -> None:
        """The published file is complete but the job was not recorded (crash after os.replace)."""
        ops = jobs.stored_db_ops(final) or []
        with obsid_context(obsid):
            db.apply(
                ops,
                job={
                    "obsid": obsid,
                    "stage": "level2",
                    "status": "done",
                    "error": None,
                    "last_module": "Level2Pipeline",
                },
            )
            if not ops:
                db.set_level2_path(obsid, str(final))
            log.info(
                "published level-2 file is complete; recorded it without recomputing (%d DB operations "
                "replayed)",
                len(ops),
            )
        result.done += 1

    def _order(self, tasks: list[ObservationTask]) -> list[ObservationTask]:
        skydips = [t for t in tasks if (t.fields.get("source_group") or "") == "SkyDip"]
        others = [t for t in tasks if t not in skydips]
        return sorted(others, key=lambda t: t.fields["obsid"]) + sorted(
            skydips, key=lambda t: t.fields["obsid"]
        )

    @staticmethod
    def _has_vane(fields: dict[str, Any]) -> bool:
        try:
            from utils.constants import FEATURE_VANE
            from utils.level1 import Level1File

            with Level1File(fields["level1_path"]) as l1:
                return bool(np.any(l1.decoded_features() == FEATURE_VANE))
        except Exception:
            return True  # let the worker report the real problem

    def _dispatch(
        self, sub: LoadedConfig, tasks: list[ObservationTask], force: bool, result: StageResult
    ) -> None:
        ctx = self.context
        nprocess = int(sub.master.get("nprocess") or 1)
        if ctx.nprocess is not None:
            nprocess = int(ctx.nprocess)
        nprocess = max(1, min(nprocess, len(tasks)))
        world = ctx.mpi if ctx.mpi is not None and ctx.mpi.size > 1 else None
        if world is not None:
            nprocess = world.size  # every rank is a worker (docs/operations.md#running-under-mpi)
        options = WorkerOptions(
            hk_time_offset_s=self.hk_time_offset_s,
            on_parameter_change=self.on_parameter_change,
            force=force,
            config_sha256=sub.sha256,
            config_toml=_config_toml(sub),
            count_bytes=bool(os.environ.get("COMAP_COUNT_BYTES")),
            db_target=db.target,
            in_process=nprocess == 1,
        )
        log_queue = None
        if nprocess > 1 and ctx.logging is not None:
            import multiprocessing

            with signals.spawning():  # the queue may start multiprocessing's resource tracker
                log_queue = ctx.logging.start_queue(multiprocessing.get_context("spawn"))
        executor = make_executor(nprocess, log_queue=log_queue, log_level=ctx.log_level, world=world)

        ordered = self._order(tasks)
        queued = {t.fields["obsid"] for t in ordered}
        held = {
            t.fields["obsid"]
            for t in ordered
            if t.fields.get("source_group") == "SkyDip"
            and t.fields["obsid"] + 1 in queued
            and not self._has_vane(t.fields)
        }
        pending = collections.deque(ordered)
        finished: set[int] = set()
        in_flight: set[int] = set()
        streak_reason, streak = None, 0
        log.info(
            "processing %d observation(s) with %d worker(s)%s",
            len(ordered),
            nprocess,
            f" on {world.size} MPI ranks" if world is not None else "",
        )
        bar = Progress(len(ordered), desc="level-2 observations", logger=log, unit="obs")
        t_start = time.perf_counter()
        started = False
        try:
            executor.start(process_observation, initializer=init_worker, initargs=(sub.entries, options))
            started = True
            while pending or in_flight:
                while pending and executor.free_slots() and not signals.drain_requested():
                    task = self._next_ready(pending, held, finished, in_flight)
                    if task is None:
                        break
                    pending.remove(task)
                    in_flight.add(task.fields["obsid"])
                    executor.submit(task.fields["obsid"], task)
                if not in_flight:
                    break
                outcome = executor.wait()
                obsid = int(outcome.key)
                in_flight.discard(obsid)
                finished.add(obsid)
                reason = self._record(outcome, result)
                bar.update(1)
                if reason is None:
                    streak_reason, streak = None, 0
                else:
                    first = reason.split(": ", 1)[-1]
                    signature = failure_signature(first)
                    streak = streak + 1 if signature == streak_reason else 1
                    streak_reason = signature
                    if streak >= self.max_consecutive_failures:
                        result.fatal = (
                            f"{streak} consecutive failures with the same reason: {first}; "
                            "stopped dispatching (check disks and mounts)"
                        )
                        pending.clear()
        except KeyboardInterrupt:
            result.interrupted = True
            executor.shutdown(terminate=True)
            started = False
            for task in ordered:  # what a worker ended by the launcher could not remove
                if task.fields["obsid"] in in_flight:
                    jobs.remove_staging_files(task.final_level2_path)
        except PoolInitError as exc:
            result.fatal = str(exc)
            started = False
        finally:
            bar.close()
            if started:
                executor.shutdown(terminate=result.interrupted)
            release_worker()  # what an in-process worker kept between observations
            if log_queue is not None:
                ctx.logging.stop_queue()
        if result.fatal:
            n = db.release_jobs(ctx.run_id)
            log.error("%s; %d job(s) returned to pending", result.fatal, n)
        elif pending and not result.interrupted and signals.drain_requested():
            db.release_jobs(ctx.run_id)  # claimed but never started (docs/reliability.md#signals)
            signals.left_pending(len(pending))
            log.warning(
                "drain requested (SIGUSR1): finished the observation(s) in hand; %d left pending",
                len(pending),
            )
        log.info(
            "level-2: %d done, %d failed, %d skipped in %.1f s",
            result.done,
            result.failed,
            result.skipped,
            time.perf_counter() - t_start,
        )

    @staticmethod
    def _next_ready(pending, held, finished, in_flight) -> ObservationTask | None:
        for task in pending:
            obsid = task.fields["obsid"]
            if obsid in held and (obsid + 1) not in finished:
                continue
            return task
        if not in_flight and pending:
            return pending[0]  # only held sky dips remain and nothing will release them
        return None

    def _record(self, outcome, result: StageResult) -> str | None:
        """Apply one observation's outcome in one transaction; return its failure reason or None."""
        obsid = int(outcome.key)
        task: ObservationTask = outcome.item
        with obsid_context(obsid):
            if outcome.died:
                reason = outcome.died
                log.error("%s", reason)
                jobs.remove_staging_files(task.final_level2_path)
                db.finish_job(obsid, "level2", "failed", error=reason, last_module="Level2Pipeline")
                result.record_failure(obsid, reason)
                return reason
            if outcome.error is not None:
                reason = f"Level2Pipeline: {outcome.error_type}: {outcome.error}"
                log.error("%s", reason)
                log.debug("%s", outcome.traceback)
                db.finish_job(obsid, "level2", "failed", error=reason, last_module="Level2Pipeline")
                result.record_failure(obsid, reason)
                return reason
            res = outcome.result
            if res.status == "done":
                db.apply(
                    res.db_ops,
                    job={
                        "obsid": obsid,
                        "stage": "level2",
                        "status": "done",
                        "error": None,
                        "last_module": res.last_module,
                    },
                )
                result.done += 1
                total = sum(res.timings.values())
                log.info("done in %.1f s (%s)", total, ", ".join(res.modules_run) or "nothing to recompute")
                return None
            db.finish_job(obsid, "level2", "failed", error=res.error, last_module=res.last_module)
            result.record_failure(obsid, res.error or "failed")
            return res.error or "failed"


def _config_toml(sub: LoadedConfig) -> str:
    import tomli_w

    try:
        return tomli_w.dumps(tomlable(sub.resolved_dict()))
    except (TypeError, ValueError):
        return canonical_json(sub.resolved_dict())


def _abbrev(values: list[int], n: int = 10) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:n])
    return text + (f", … ({len(values)} in all)" if len(values) > n else "")


__all__ = ["Level2Pipeline"]
