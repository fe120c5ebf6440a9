"""Engines and lock retries of the database facade (docs/database.md#sqlite-settings).

:func:`make_engine` applies the comap-reduce connection settings. Every transaction that meets
``database is locked`` is retried :data:`LOCK_RETRIES` times with exponential backoff from
:data:`LOCK_BACKOFF_S` (:func:`backoff`), then raises :class:`~utils.errors.DatabaseError`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from modules.SQLModule.values import _one_line
from utils import faults
from utils.errors import DatabaseError

LOCK_RETRIES: int = 5
LOCK_BACKOFF_S: float = 0.5
_SQLITE_JOURNAL_MODES = ("DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL", "OFF")

# Indirection so tests can observe the backoff without sleeping.
_sleep = time.sleep


_LOCK_CONFLICTS = ("locked", "busy", "deadlock", "could not serialize", "lock not available")


def _is_locked(exc: BaseException) -> bool:
    """True for a lock conflict that a retry of the whole transaction resolves: SQLite ``database is
    locked``/busy, PostgreSQL deadlocks and serialisation failures (docs/database.md#concurrent-runs)."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    return isinstance(exc, OperationalError) and any(word in text for word in _LOCK_CONFLICTS)


def backoff(delay: float) -> float:
    """Wait ``delay`` seconds before the next lock retry; return the delay of the one after."""
    _sleep(delay)
    return delay * 2


def _resolve_target(target: str | os.PathLike | URL) -> tuple[URL, str, Path | None]:
    """Return ``(url, display, sqlite_path)`` for a path or URL target."""
    if isinstance(target, URL):
        url = target
    elif isinstance(target, str) and "://" in target:
        try:
            url = make_url(target)
        except ArgumentError as exc:
            raise DatabaseError(f"database {target}: invalid database URL: {_one_line(exc)}") from None
    else:
        path = Path(os.fspath(target)).expanduser().absolute()
        return URL.create("sqlite", database=str(path)), str(os.fspath(target)), path
    display = url.render_as_string(hide_password=True)
    path = None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_path = url.database
        if db_path.startswith("file:"):
            db_path = db_path[5:]
        path = Path(db_path).expanduser().absolute()
    return url, display, path


def _busy_timeout_s(default: float) -> float:
    env = os.environ.get("COMAP_SQLITE_BUSY_TIMEOUT_S")
    if env is None or not env.strip():
        return float(default)
    try:
        value = float(env)
    except ValueError:
        raise DatabaseError(f"COMAP_SQLITE_BUSY_TIMEOUT_S={env!r} is not a number of seconds") from None
    if value < 0:
        raise DatabaseError(f"COMAP_SQLITE_BUSY_TIMEOUT_S={env!r} must be >= 0")
    return value


def _journal_mode() -> str:
    mode = os.environ.get("COMAP_SQLITE_JOURNAL_MODE", "WAL").strip().upper() or "WAL"
    if mode not in _SQLITE_JOURNAL_MODES:
        raise DatabaseError(
            f"COMAP_SQLITE_JOURNAL_MODE={mode!r} is not one of {', '.join(_SQLITE_JOURNAL_MODES)}"
        )
    return mode


def make_engine(
    url: URL,
    *,
    read_only: bool = False,
    busy_timeout_s: float = 30.0,
    echo: bool = False,
    sqlite_path: Path | None = None,
    foreign_keys: bool = True,
    journal_mode: str | None = None,
) -> Engine:
    """Create an engine with the comap-reduce connection settings (docs/database.md#sqlite-settings).

    SQLite connections get ``busy_timeout``, ``journal_mode`` (WAL unless overridden; not set on
    read-only connections), ``foreign_keys`` and ``synchronous = NORMAL``. The driver's implicit
    transaction handling is switched off and the engine emits ``BEGIN`` itself: ``BEGIN IMMEDIATE``
    on connections with the execution option ``comap_write=True``, a deferred ``BEGIN`` otherwise.
    Read-only SQLite opens the file through the URI ``file:...?mode=ro``; other back-ends run
    ``SET TRANSACTION READ ONLY`` at the start of each transaction.

    Parameters
    ----------
    url : sqlalchemy.engine.URL
        Database URL.
    read_only : bool
        Open read-only.
    busy_timeout_s : float
        SQLite busy timeout (s).
    echo : bool
        Log SQL statements.
    sqlite_path : pathlib.Path or None
        Absolute path of the SQLite file (required for read-only SQLite).
    foreign_keys : bool
        Enforce foreign keys on SQLite (the migrator switches this off).
    journal_mode : str or None
        SQLite journal mode; None = ``COMAP_SQLITE_JOURNAL_MODE`` or WAL.

    Returns
    -------
    sqlalchemy.engine.Engine
    """
    faults.watch_commits()  # test-only; off unless set (docs/developer.md#fault-injection-hook)
    is_sqlite = url.get_backend_name() == "sqlite"
    if not is_sqlite:
        engine = create_engine(url, echo=echo, pool_pre_ping=True)
        if read_only and engine.dialect.name in ("postgresql", "mysql", "mariadb"):

            @event.listens_for(engine, "begin")
            def _read_only_transaction(conn):
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")

        return engine

    timeout_ms = int(round(busy_timeout_s * 1000.0))
    mode = (journal_mode or _journal_mode()).upper()
    if read_only:
        if sqlite_path is None:
            raise DatabaseError(f"database {url}: an in-memory database cannot be opened read-only")
        uri = f"file:{quote(str(sqlite_path), safe='/:')}?mode=ro"

        def _creator():
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=busy_timeout_s)

        engine = create_engine(url, echo=echo, creator=_creator)
    else:
        engine = create_engine(url, echo=echo)

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the "begin" listener below emits BEGIN itself
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            if not read_only:
                cur.execute(f"PRAGMA journal_mode = {mode}")
                cur.fetchall()
            cur.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        write = bool(conn.get_execution_options().get("comap_write")) and not read_only
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
