"""Worker side of Level2Pipeline: process one observation in a staging file
(docs/level2.md#processing-one-observation).

``init_worker`` runs once per worker process: it sets deferred database writes and instantiates the
configured modules once (docs/developer.md#kinds-of-modules rule 2). ``process_observation`` runs the modules
in list order, grouping adjacent streaming stages into one pass over the level-1 TOD, and publishes the
staging file with ``os.replace`` on success. It never raises: every outcome is an ``ObservationResult``.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.pipeline_control import jobs, provenance
from modules.pipeline_control.base import describe_stale, stale_stages
from modules.pipeline_control.config import ModuleSpec
from modules.pipeline_control.jobs import ObservationResult, ops_to_json
from modules.pipeline_control.logging_setup import obsid_context
from modules.pipeline_control.Pipeline import StreamingStage
from modules.pipeline_control.streaming import ObservationContext, observation, run_streaming_group
from modules.SQLModule.SQLModule import COMAPData, db
from utils import faults
from utils.disk import is_no_space, no_space_reason
from utils.errors import BadCOMAPFile
from utils.h5io import RetryH5PY

log = logging.getLogger("comap.Level2Pipeline")


@dataclass
class WorkerOptions:
    """Run options shipped to every worker (picklable)."""

    hk_time_offset_s: float = 0.6
    on_parameter_change: str = "warn"
    force: bool = False
    config_sha256: str = ""
    config_toml: str = ""
    count_bytes: bool = False
    db_target: str | None = None
    in_process: bool = True


@dataclass
class ObservationTask:
    """One observation to process (picklable)."""

    fields: dict[str, Any]
    final_level2_path: str


@dataclass
class _WorkerState:
    specs: list[ModuleSpec] = field(default_factory=list)
    modules: list[Any] = field(default_factory=list)
    options: WorkerOptions = field(default_factory=WorkerOptions)
    # block buffers of the streaming pass, kept from one observation to the next: touching a fresh
    # block-sized array costs a page fault per page, which takes longer than the read itself
    buffers: dict[str, Any] = field(default_factory=dict)


_STATE = _WorkerState()


def instantiate_modules(specs: list[ModuleSpec], on_parameter_change: str) -> list[Any]:
    """Instantiate the level-2 modules once and attach the run's parameter-change policy."""
    modules = []
    for spec in specs:
        mod = spec.instantiate()
        try:
            mod._comap_on_parameter_change = on_parameter_change
        except AttributeError:
            pass
        modules.append(mod)
    return modules


def init_worker(specs: list[ModuleSpec], options: WorkerOptions) -> None:
    """Once per worker process: DB in deferred mode, modules instantiated once."""
    if not options.in_process and options.db_target:
        db.connect(options.db_target, create=False, read_only=True)
    _STATE.specs = list(specs)
    _STATE.options = options
    _STATE.modules = instantiate_modules(specs, options.on_parameter_change)
    _STATE.buffers = {}


def release_worker() -> None:
    """Drop the modules and block buffers of :func:`init_worker` (the end of an in-process run)."""
    _STATE.modules = []
    _STATE.buffers = {}


def file_info_from_fields(fields: dict[str, Any]) -> COMAPData:
    """A transient COMAPData built from plain fields (detached, safe to modify)."""
    columns = {c.key for c in COMAPData.__table__.columns}
    return COMAPData(**{k: v for k, v in fields.items() if k in columns})


def _steps(modules: list[Any]) -> list[tuple[str, list[Any]]]:
    steps: list[tuple[str, list[Any]]] = []
    for mod in modules:
        if isinstance(mod, StreamingStage):
            if steps and steps[-1][0] == "stream":
                steps[-1][1].append(mod)
            else:
                steps.append(("stream", [mod]))
        else:
            steps.append(("module", [mod]))
    return steps


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _error_text(module_name: str, exc: BaseException, obsid: int) -> str:
    if isinstance(exc, BadCOMAPFile):
        if exc.obsid is None:
            exc.obsid = obsid
        return f"{module_name}: {exc}"
    msg = " ".join(str(exc).split())
    return f"{module_name}: {type(exc).__name__}: {msg}"


def process_observation(task: ObservationTask) -> ObservationResult:
    """Process one observation; never raises (worker entry point)."""
    options = _STATE.options
    fields = task.fields
    obsid = int(fields["obsid"])
    final = Path(task.final_level2_path)
    result = ObservationResult(obsid=obsid, status="failed", level2_path=str(final))
    staging: Path | None = None
    previous_deferred = db.deferred
    db.set_deferred(True)
    db.take_deferred()
    current = "Level2Pipeline"
    with obsid_context(obsid):
        try:
            # The objects alive before the observation (astropy, h5py, SQLAlchemy, the modules) are
            # set aside from the cyclic garbage collector while it runs: its collections then walk
            # only what the observation made, whose cycles are still freed (docs/level2.md#streaming).
            gc.freeze()
            file_info = file_info_from_fields(fields)
            staging = jobs.prepare_staging(final, start_from_published=not options.force)
            file_info.level2_path = str(staging)
            file_info.final_level2_path = str(final)
            ctx = ObservationContext(
                file_info,
                hk_time_offset_s=options.hk_time_offset_s,
                count_bytes=options.count_bytes,
                buffers=_STATE.buffers,
            )
            with observation(ctx):
                ran = _run_modules(ctx, _STATE.modules, result)
                current = "Level2Pipeline"
                if ran:
                    db.set_level2_path(obsid, str(final))
                    summary = dict(ctx.summary)
                    summary["level2_created_utc"] = provenance.utc_now()
                    db.update_observation_summary(obsid, **summary)
                    ops = db.take_deferred()
                    _finalise_file(staging, ops, options)
                    jobs.publish(staging, final)
                    staging = None
                    result.db_ops = ops
                else:
                    jobs.discard(staging)
                    staging = None
                    result.db_ops = db.take_deferred()
                result.timings = dict(ctx.timings)
            result.bytes_read_tod = ctx.bytes_read_tod
            result.bytes_read_total = ctx.bytes_read_total
            result.status = "done"
            result.last_module = result.modules_run[-1] if result.modules_run else None
        except BaseException as exc:
            current = result.last_module or current
            result.status = "failed"
            result.error = _error_text(current, exc, obsid)
            no_space = is_no_space(exc)  # docs/reliability.md#transient-io-errors-and-full-disks
            if no_space:
                result.error = f"{current}: {no_space_reason(final)}"
            result.db_ops = []
            db.take_deferred()
            mod_log = logging.getLogger(f"comap.{current}")
            if isinstance(exc, BadCOMAPFile) or no_space:
                mod_log.error("%s", result.error.split(": ", 1)[1])
            elif isinstance(exc, SystemExit | KeyboardInterrupt):
                mod_log.error("interrupted")
            else:
                mod_log.error("%s", result.error.split(": ", 1)[1], exc_info=True)
            jobs.discard(staging)
            staging = None
            if isinstance(exc, SystemExit | KeyboardInterrupt):
                raise
        finally:
            db.set_deferred(previous_deferred)
            result.peak_rss_mb = _peak_rss_mb()
            gc.unfreeze()
    return result


def _run_modules(ctx: ObservationContext, modules: list[Any], result: ObservationResult) -> bool:
    """Run the modules in list order; return True if any module did work."""
    file_info = ctx.file_info
    _invalidate_stale(modules, file_info)
    normal = [m for m in modules if not getattr(m, "runs_with_others", False)]
    if not any(not _done(m, file_info) for m in normal):
        log.info("every module is already done; nothing to recompute")
        return False
    for kind, group in _steps(modules):
        if kind == "module":
            mod = group[0]
            name = type(mod).__name__
            result.last_module = name
            if not getattr(mod, "runs_with_others", False) and _done(mod, file_info):
                continue
            t0 = time.perf_counter()
            mod.run(file_info)
            ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t0
            ctx.invalidate()
            result.modules_run.append(name)
            faults.checkpoint("level2.staged")
        else:
            active = [not _done(s, file_info) for s in group]
            if not any(active):
                continue
            result.last_module = "+".join(type(s).__name__ for s, a in zip(group, active) if a)
            run_streaming_group(ctx, group, active)
            ctx.invalidate()
            result.modules_run.extend(type(s).__name__ for s, a in zip(group, active) if a)
            faults.checkpoint("level2.staged")
    return True


def _invalidate_stale(modules: list[Any], file_info: Any) -> None:
    """Mark the outputs of out-of-date modules incomplete in the staging file, so that they and the
    modules after them run again (docs/operations.md#algorithm-versions); the published file is
    untouched until the new one replaces it."""
    stale = stale_stages(modules, file_info)
    if not stale:
        return
    log.info("out of date: %s; recomputing", describe_stale(stale))
    with RetryH5PY(file_info.level2_path, "a") as l2:
        for mod, _reason in stale:
            for path in tuple(getattr(mod, "writes", None) or ()):
                if path in l2:
                    provenance.mark_incomplete(l2[path])


def _done(mod: Any, file_info: Any) -> bool:
    """A module is done only if the staging file exists and its own check says so."""
    path = getattr(file_info, "level2_path", None)
    if not path or not os.path.exists(path):
        return False
    return bool(mod.already_processed(file_info, overwrite=bool(getattr(mod, "overwrite", False))))


def _finalise_file(staging: Path, ops: list[Any], options: WorkerOptions) -> None:
    """Root attributes written at publish time (docs/level2.md#processing-one-observation step 5.1) and the
    replayable DB outcome."""
    with RetryH5PY(staging, "a") as l2:
        l2.attrs["updated_utc"] = provenance.utc_now_iso()
        l2.attrs["config_sha256"] = options.config_sha256
        l2.attrs["config_toml"] = options.config_toml
        l2.attrs["comap_reduce_version"] = provenance.code_version()
        l2.attrs["db_ops_json"] = ops_to_json(ops)


__all__ = [
    "ObservationTask",
    "WorkerOptions",
    "init_worker",
    "instantiate_modules",
    "process_observation",
    "release_worker",
]


def reduce_in_process(
    level1_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    modules: list[Any],
    *,
    source_group: str | None = None,
):
    """Run ``modules`` on one level-1 file as a Level2Pipeline worker does (adjacent streaming stages
    in one pass), without a database or staging: for tools and tests that study one observation.

    Returns
    -------
    (level2_path, context, deferred database operations)
    """
    from modules.SQLModule.source_groups import classify
    from utils.level1 import Level1File

    with Level1File(level1_path) as l1:
        attrs = l1.attrs()
    source, group = classify(str(attrs["source"]), str(attrs.get("comment", "")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fi = COMAPData(
        obsid=int(attrs["obsid"]),
        level1_path=str(level1_path),
        source=source,
        source_group=source_group or group,
        utc_start=str(attrs["utc_start"]),
    )
    fi.level2_path = str(out / f"Level2_{Path(level1_path).name}")
    ctx = ObservationContext(fi)
    result = ObservationResult(obsid=fi.obsid, status="running")
    with db.deferring() as ops, observation(ctx):
        _run_modules(ctx, modules, result)
    return Path(fi.level2_path), ctx, list(ops)
