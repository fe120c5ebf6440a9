"""Checks made after the configuration is loaded and before a run writes anything: where the log
file and the database go, and whether this run may create the database
(docs/database.md#connection, docs/configuration.md#validation).

A mistyped ``sql_database`` must not give a new, empty database and an empty selection: only a run
with a stage that registers observations (``creates_database = True``: DataAcquisition,
DataAssess) or started with ``--create-db`` creates one. Every other run refuses a missing
database, or one without tables, with one line naming it (exit status 2).
"""

from __future__ import annotations

from pathlib import Path

from modules.pipeline_control.config_model import RunConfig
from utils.errors import ConfigError, DatabaseError
from utils.paths import unwritable_reason

__all__ = ["CREATE_HINT", "location_errors", "may_create_database", "missing_database_error"]

CREATE_HINT = (
    "check sql_database; a new database is created only by a run with DataAcquisition or DataAssess, "
    "or with run.py --create-db"
)


def may_create_database(run_config: RunConfig, create_db: bool) -> bool:
    """True if the run may create its database: ``--create-db``, or a stage of the main pipeline
    that registers observations."""
    return bool(create_db) or any(
        getattr(spec.cls, "creates_database", False) for spec in run_config.main.entries
    )


def missing_database_error(run_config: RunConfig, message: str) -> ConfigError:
    """The ConfigError of a database that does not exist or has no tables (``message`` names it)."""
    return ConfigError(
        f"{message}; {CREATE_HINT}", file=str(run_config.main.path), where="Master.sql_database"
    )


def location_errors(run_config: RunConfig, log_path: Path | None, *, create: bool) -> list[ConfigError]:
    """Problems with the run's log file and SQLite database locations (nothing is created).

    Parameters
    ----------
    run_config : RunConfig
        The loaded configuration.
    log_path : Path or None
        The run's log file (None: console only).
    create : bool
        The run may create its database (:func:`may_create_database`).

    Returns
    -------
    list of ConfigError
        An unwritable log file; an SQLite database that is missing (without ``create``) or cannot be
        created or written. A database given as a server URL is checked when connecting.
    """
    from modules.SQLModule.engine import _resolve_target

    main = run_config.main
    errors: list[ConfigError] = []
    if log_path is not None:
        reason = unwritable_reason(log_path, directory=False)
        if reason:
            errors.append(
                ConfigError(
                    f"cannot write the log file {log_path}: {reason}", str(main.path), "Master.log_file"
                )
            )
    target = str(main.master.get("sql_database"))
    try:
        _url, display, path = _resolve_target(target)
    except DatabaseError as exc:
        return [*errors, ConfigError(str(exc), str(main.path), "Master.sql_database")]
    if path is None:
        return errors
    if not path.exists() and not create:
        errors.append(missing_database_error(run_config, f"database {display} does not exist"))
        return errors
    # an existing file is opened as it is (a read-only copy may serve read-only stages)
    reason = f"{path} is a directory" if path.is_dir() else None
    if not path.exists():
        reason = unwritable_reason(path, directory=False)
    if reason:
        errors.append(
            ConfigError(
                f"cannot write the database {display}: {reason}", str(main.path), "Master.sql_database"
            )
        )
    return errors
