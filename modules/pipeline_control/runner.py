"""Run a config: validate everything, set up logging and the database, run the top-level stages,
print the end-of-run summary and return the exit status (docs/configuration.md#command-line).

Exit status: 0 all selected items succeeded or were already done; 1 the batch finished with
failures; 2 configuration or usage error (nothing run); 3 fatal runtime error (database
unreachable, ``max_consecutive_failures``); 75 drained by SIGUSR1 before everything was done (run
it again); 130, 143, 129 interrupted by SIGINT, SIGTERM, SIGHUP (docs/reliability.md#signals).
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.pipeline_control import run_files, signals
from modules.pipeline_control.base import PipelineStage, RunContext, StageResult
from modules.pipeline_control.config import RunConfig, dump_toml, load_run_config
from modules.pipeline_control.logging_setup import RunLogging, setup_logging
from modules.pipeline_control.preflight import location_errors, may_create_database, missing_database_error
from modules.pipeline_control.provenance import code_version
from utils.errors import ConfigError, ConfigErrors, DatabaseError, DatabaseMissing

log = logging.getLogger("comap.runner")

EXIT_OK, EXIT_FAILURES, EXIT_CONFIG, EXIT_FATAL = 0, 1, 2, 3  # interrupted: signals.interrupt_status()


@dataclass(frozen=True)
class RunRequest:
    """What the command line asked of one run (the arguments of :func:`run_pipeline`)."""

    config_file: Path
    timestamp: str
    run_id: str
    dry_run: bool = False
    obsids: list[int] | None = None
    nprocess: int | None = None
    force: bool = False
    retry_failed: bool = False
    log_level: str = "INFO"
    console: bool = True
    create_db: bool = False  # --create-db (docs/database.md#connection)
    world: Any = None  # the MPIWorld of an MPI run (docs/operations.md#running-under-mpi)


def make_timestamp(now: _dt.datetime | None = None) -> str:
    """``YYYY-mm-dd_HH-MM-SS`` (UTC) used in log and dump names."""
    return (now or _dt.datetime.now(_dt.UTC)).strftime("%Y-%m-%d_%H-%M-%S")


def log_file_path(template: str, *, timestamp: str, config: Path, run_id: str) -> Path:
    """Expand ``{timestamp}``, ``{config}``, ``{run_id}``; prefix ``{timestamp}_`` if none is used."""
    if not re.search(r"\{(timestamp|config|run_id)\}", template):
        p = Path(template)
        template = str(p.with_name(f"{{timestamp}}_{p.name}"))
    return Path(template.format(timestamp=timestamp, config=config.stem, run_id=run_id))


def print_config_errors(exc: ConfigErrors | ConfigError) -> None:
    errors = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    for err in errors:
        print(err.line(), file=sys.stderr)


def _connect_db(target: str, *, dry_run: bool, create: bool) -> None:
    """Connect the facade; ``create`` only for a run that may create its database
    (docs/database.md#connection), else a missing or empty one raises DatabaseMissing."""
    from modules.SQLModule.SQLModule import db

    if dry_run:
        is_url = "://" in target
        if create and not is_url and not Path(target).exists():
            print(f"database will be created at {Path(target).resolve()}")
            db.connect("sqlite://", create=True)
            return
        db.connect(target, create=False, read_only=True)
        return
    db.connect(target, create=create)


def format_summary(results: list[StageResult]) -> str:
    """The end-of-run table: counts per stage and each distinct failure reason with its count."""
    lines = ["", "Run summary", f"{'stage':<28} {'done':>6} {'skipped':>8} {'failed':>7} {'retried':>8}"]
    for r in results:
        status = " (FATAL)" if r.fatal else (" (interrupted)" if r.interrupted else "")
        lines.append(f"{r.stage:<28} {r.done:>6} {r.skipped:>8} {r.failed:>7} {r.retried:>8}{status}")
    reasons: Counter[str] = Counter()
    for r in results:
        for _item, reason in r.failures:
            reasons[f"{r.stage}: {reason}"] += 1
        if r.fatal:
            reasons[f"{r.stage}: FATAL: {r.fatal}"] += 1
    if reasons:
        lines.append("failures:")
        for reason, count in reasons.most_common():
            lines.append(f"  {count:>4} × {reason}")
    return "\n".join(lines)


def exit_status(results: list[StageResult]) -> int:
    if any(r.interrupted for r in results):
        return signals.interrupt_status()
    if any(r.fatal for r in results):
        return EXIT_FATAL
    if signals.drained():
        return signals.EXIT_DRAINED
    if any(r.failed for r in results):
        return EXIT_FAILURES
    return EXIT_OK


def run_pipeline(
    config_path: str | Path,
    *,
    dry_run: bool = False,
    obsids: list[int] | None = None,
    nprocess: int | None = None,
    force: bool = False,
    retry_failed: bool = False,
    mpi: bool = False,
    log_level: str = "INFO",
    console: bool = True,
    create_db: bool = False,
) -> int:
    """Validate and run ``config_path``; return the exit status. See the module docstring."""
    timestamp = make_timestamp()
    run_id = f"{timestamp}-{uuid.uuid4().hex[:8]}"
    overrides: dict[str, Any] = {}
    if nprocess is not None:
        overrides["nprocess"] = int(nprocess)
    if force:
        overrides["force_run"] = True

    from modules.pipeline_control.executors import mpi_requested

    world = None
    if mpi_requested(mpi):
        try:
            from modules.pipeline_control.mpi import start_mpi

            world = start_mpi()
        except Exception as exc:  # ImportError (no mpi4py) or RuntimeError (no MPI library)
            print(
                f"usage error: MPI mode requested but MPI is not usable ({type(exc).__name__}: {exc}); "
                "install it with pip install -e '.[mpi]'",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        if not world.is_coordinator:
            from modules.pipeline_control.mpi import serve

            return serve(world, logging.getLevelName(log_level.upper()))
    request = RunRequest(
        config_file=Path(config_path),
        timestamp=timestamp,
        run_id=run_id,
        dry_run=dry_run,
        obsids=obsids,
        nprocess=nprocess,
        force=force,
        retry_failed=retry_failed,
        log_level=log_level,
        console=console,
        create_db=create_db,
        world=world,
    )
    status = EXIT_FATAL
    try:
        with signals.coordinator_signals():
            status = _coordinate(request, overrides)
        return status
    except KeyboardInterrupt as exc:  # a signal outside the stages (docs/reliability.md#signals)
        status = signals.interrupt_status(exc)
        print("interrupted", file=sys.stderr)
        return status
    finally:
        if world is not None and world.size > 1:
            world.end(status)  # docs/operations.md#running-under-mpi


def _coordinate(request: RunRequest, overrides: dict[str, Any]) -> int:
    """Rank 0's (or the only process's) part of :func:`run_pipeline`."""
    config_path, world = request.config_file, request.world
    try:
        run_config = load_run_config(config_path, master_overrides=overrides)
    except (ConfigErrors, ConfigError) as exc:
        print_config_errors(exc)
        return EXIT_CONFIG

    main = run_config.main
    log_path = log_file_path(
        str(main.master.get("log_file") or "logs/{timestamp}_{config}.log"),
        timestamp=request.timestamp,
        config=request.config_file,
        run_id=request.run_id,
    )
    problems = location_errors(
        run_config, log_path, create=may_create_database(run_config, request.create_db)
    )
    if problems:  # docs/configuration.md#validation: nothing written yet
        print_config_errors(ConfigErrors(problems))
        return EXIT_CONFIG
    try:
        log_path = run_files.claim(log_path, request.run_id)  # a run of the same second has its own
        run_logging = setup_logging(log_path, request.log_level, console=request.console)
    except OSError as exc:
        print_config_errors(ConfigError(f"cannot write the log file {log_path}: {exc}", str(config_path)))
        return EXIT_CONFIG
    if world is not None:
        world.log_handlers = list(run_logging.handlers)
    try:
        return _run(run_config, run_logging, request)
    finally:
        if world is not None:
            world.drain_logs()
        run_logging.close()
        try:
            from modules.SQLModule.SQLModule import db

            db.disconnect()
        except Exception:  # pragma: no cover
            pass


def _run(run_config: RunConfig, run_logging: RunLogging, request: RunRequest) -> int:
    timestamp, run_id, dry_run, world = request.timestamp, request.run_id, request.dry_run, request.world
    config_file, log_level = request.config_file, request.log_level
    main = run_config.main
    log.info(
        "comap-reduce %s, run %s, config %s%s",
        code_version(),
        run_id,
        config_file,
        " (dry run)" if dry_run else "",
    )
    log.info("log file: %s", run_logging.log_file)
    if world is not None:
        log.info(
            "MPI: %d rank(s), %d thread(s) per rank; rank 0 coordinates and writes the database",
            world.size,
            world.n_threads,
        )
    if run_config.implicit_level2:
        log.info("%s holds only per-observation modules; running it as Level2Pipeline", config_file)
    for line in run_config.warnings:  # once per run, after the log is set up (docs/configuration.md#warnings)
        logging.getLogger("comap.config").warning("%s", line)

    if not dry_run:
        dump_path = (
            run_logging.log_file.parent if run_logging.log_file else Path("logs")
        ) / f"{timestamp}_{config_file.stem}.resolved.toml"
        dump_path = run_files.claim(dump_path, run_id, suffix=".resolved.toml")
        dump_toml(run_config.resolved_dict(), dump_path)
        log.info("resolved configuration written to %s", dump_path)

    try:
        create = may_create_database(run_config, request.create_db)
        _connect_db(str(main.master.get("sql_database")), dry_run=dry_run, create=create)
    except DatabaseMissing as exc:
        print_config_errors(missing_database_error(run_config, str(exc)))
        return EXIT_CONFIG
    except DatabaseError as exc:
        log.error("DatabaseError: %s", exc)
        return EXIT_FATAL

    context = RunContext(
        run_id=run_id,
        timestamp=timestamp,
        config=run_config,
        obsids=request.obsids,
        nprocess=request.nprocess,
        force=request.force,
        retry_failed=request.retry_failed,
        dry_run=dry_run,
        mpi=world,
        log_level=logging.getLevelName(log_level.upper()) if isinstance(log_level, str) else log_level,
        logging=run_logging,
        log_dir=run_logging.log_file.parent if run_logging.log_file else Path("logs"),
    )
    stages: list[PipelineStage] = []
    for spec in main.entries:
        try:
            stage = spec.instantiate()
        except (ConfigError, ConfigErrors) as exc:
            print_config_errors(exc)
            return EXIT_CONFIG
        except Exception as exc:
            log.error("cannot construct %s: %s: %s", spec.name, type(exc).__name__, exc, exc_info=True)
            return EXIT_FATAL
        stage.context = context
        stages.append(stage)

    if dry_run:
        print(f"Plan for {config_file} (dry run; nothing will be written)")
        for stage in stages:
            try:
                lines = stage.plan()
            except (ConfigError, ConfigErrors) as exc:
                print_config_errors(exc)
                return EXIT_CONFIG
            except DatabaseError as exc:
                log.error("DatabaseError: %s", exc)
                return EXIT_FATAL
            for line in lines:
                print(f"  {line}")
        return EXIT_OK

    results: list[StageResult] = []
    for stage in stages:
        name = type(stage).__name__
        log.info("=== %s ===", name)
        try:
            result = stage.run()
            if result is None:
                result = StageResult(stage=name, done=1)
        except KeyboardInterrupt:
            n = _release(run_id)
            log.error("interrupted; %d jobs returned to pending", n)
            results.append(StageResult(stage=name, interrupted=True))
            break
        except DatabaseError as exc:
            log.error("DatabaseError: %s", exc)
            results.append(StageResult(stage=name, fatal=f"DatabaseError: {exc}"))
            break
        except (ConfigError, ConfigErrors) as exc:
            print_config_errors(exc)
            return EXIT_CONFIG
        except Exception as exc:
            log.error("%s failed: %s: %s", name, type(exc).__name__, exc, exc_info=True)
            result = StageResult(stage=name)
            result.record_failure(name, f"{type(exc).__name__}: {exc}")
        results.append(result)
        if result.interrupted:
            n = _release(run_id)
            log.error("interrupted; %d jobs returned to pending", n)
            break
        if result.fatal:
            log.error("%s stopped the run: %s", name, result.fatal)
            break
        if signals.stop_after_stage(last=stage is stages[-1]):
            log.warning("drain requested (SIGUSR1): the run stops after %s; run it again to finish", name)
            break

    summary = format_summary(results)
    print(summary, flush=True)
    _log_to_file(run_logging, summary)
    status = exit_status(results)
    _write_report(run_config, run_logging, request, results, dump_path, status)
    log.info("exit status %d", status)
    return status


def _write_report(
    run_config: RunConfig,
    run_logging: RunLogging,
    request: RunRequest,
    results: list[StageResult],
    dump_path: Path,
    status: int,
) -> None:
    """Write the HTML run report beside the log (docs/operations.md#run-report) and print its path; a
    failure is one WARNING line and never changes the exit status."""
    if run_logging.log_file is None:
        return
    if any(r.interrupted for r in results):  # a signal asks for a prompt exit (docs/reliability.md#signals)
        log.info("run report not written: the run was interrupted")
        return
    try:
        from modules.pipeline_control.report import ReportInputs, write_run_report
        from modules.SQLModule.SQLModule import db

        inputs = ReportInputs(
            run_id=request.run_id,
            timestamp=request.timestamp,
            config_file=request.config_file,
            log_file=run_logging.log_file,
            code_version=code_version(),
            results=results,
            resolved=run_config.resolved_dict(),
            dump_path=dump_path,
            database=str(run_config.main.master.get("sql_database")),
            exit_status=status,
        )
        path = write_run_report(inputs, db)
    except Exception as exc:
        log.warning("run report not written: %s: %s", type(exc).__name__, " ".join(str(exc).split()))
        return
    print(f"run report: {path}", flush=True)
    _log_to_file(run_logging, f"run report: {path}")


def _log_to_file(run_logging: RunLogging, text: str) -> None:
    """Write ``text`` to the log file only (the console already got it on stdout)."""
    for handler in run_logging.handlers:
        if isinstance(handler, logging.FileHandler):
            for line in text.splitlines():
                record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s", (line,), None)
                if handler.filter(record):
                    handler.emit(record)


def _release(run_id: str) -> int:
    try:
        from modules.SQLModule.SQLModule import db

        return int(db.release_jobs(run_id) or 0)
    except Exception as exc:  # pragma: no cover - best effort while interrupted
        log.warning("could not release jobs of run %s: %s", run_id, exc)
        return 0
