"""Connection, sessions and transactions of the database facade (docs/database.md).

Every facade call is one short transaction. ``with db.session() as s:`` opens a longer one: facade
writes made inside the block join it, so several calls commit or roll back together. On SQLite,
write transactions start with ``BEGIN IMMEDIATE`` (the busy timeout then covers writer contention)
and reads with a deferred ``BEGIN`` (WAL readers never block the writer). A write that still meets
``database is locked`` is retried 5 times with exponential backoff from 0.5 s, then raises
:class:`~utils.errors.DatabaseError`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self, TypeVar

from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from modules.SQLModule.engine import (
    LOCK_BACKOFF_S,
    LOCK_RETRIES,
    _busy_timeout_s,
    _is_locked,
    _resolve_target,
    backoff,
    make_engine,
)
from modules.SQLModule.schema import ensure_schema
from modules.SQLModule.values import _one_line
from utils.errors import DatabaseError, DatabaseMissing

log = logging.getLogger("comap.db")

# Every facade instance, so forked children can drop inherited pooled connections.
_INSTANCES: weakref.WeakSet = weakref.WeakSet()

T = TypeVar("T")


class Connection:
    """Connection state, sessions and the retrying transaction runners of the facade (docs/database.md)."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._write_engine: Engine | None = None
        self._url: URL | None = None
        self._display: str = "<not connected>"
        self._read_only: bool = False
        self._busy_timeout_s: float = 30.0
        self._local = threading.local()
        _INSTANCES.add(self)

    def _after_fork_in_child(self) -> None:
        """A forked child must not reuse the parent's pooled connections (spawn is the norm)."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._local = threading.local()

    # ------------------------------------------------------------------ connection
    # (docs/database.md#connection)
    def connect(
        self,
        target: str | os.PathLike | URL,
        *,
        create: bool = True,
        read_only: bool = False,
        busy_timeout_s: float = 30.0,
        echo: bool = False,
    ) -> Self:
        """Connect to a database; the engine is created immediately.

        Parameters
        ----------
        target : str, path-like or sqlalchemy URL
            A filesystem path (becomes ``sqlite:///<absolute path>``; parent directories are
            created) or any SQLAlchemy URL (detected by ``://``).
        create : bool
            Create the schema in an empty database (and stamp it at the head Alembic revision).
            With ``create=False`` a missing file or an empty database raises. Either way a
            writable connection stamps a version-1 database without an Alembic revision at the
            base revision and upgrades an older revision to the head, under a lock
            (docs/database.md#schema-migrations).
        read_only : bool
            Open read-only (SQLite: URI ``file:...?mode=ro``; the file must exist). Write methods
            then raise :class:`DatabaseError`.
        busy_timeout_s : float
            SQLite busy timeout in seconds; ``COMAP_SQLITE_BUSY_TIMEOUT_S`` overrides it.
        echo : bool
            Log every SQL statement.

        Returns
        -------
        SQLModule
            ``self``, so ``db.connect(...).query_all_obsids()`` works.

        Raises
        ------
        DatabaseError
            The database is unreachable, or has another schema version (legacy databases must be
            migrated: ``python -m modules.SQLModule.migrate <target>``). Its subclass
            :class:`~utils.errors.DatabaseMissing`: missing (read-only or ``create=False``) or empty
            without ``create``.
        """
        self.disconnect()
        url, display, path = _resolve_target(target)
        timeout = _busy_timeout_s(busy_timeout_s)
        if path is not None:
            if read_only and not path.is_file():
                raise DatabaseMissing(f"database {display} does not exist (cannot open it read-only)")
            if not create and not path.is_file():
                raise DatabaseMissing(f"database {display} does not exist (create=False)")
            if not read_only:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise DatabaseError(f"database {display}: cannot create its directory: {exc}") from None
        try:
            engine = make_engine(
                url, read_only=read_only, busy_timeout_s=timeout, echo=echo, sqlite_path=path
            )
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"database {display}: {_one_line(getattr(exc, 'orig', None) or exc)}"
            ) from None
        except (ImportError, ArgumentError) as exc:
            raise DatabaseError(f"database {display}: cannot create engine: {_one_line(exc)}") from None
        try:
            self._check_schema(engine, display, create=create and not read_only, read_only=read_only)
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine
        self._write_engine = engine.execution_options(comap_write=True)
        self._url = url
        self._display = display
        self._read_only = read_only
        self._busy_timeout_s = timeout
        log.debug("connected to %s%s", display, " (read-only)" if read_only else "")
        return self

    def _check_schema(self, engine: Engine, display: str, *, create: bool, read_only: bool) -> None:
        delay = LOCK_BACKOFF_S
        for attempt in range(LOCK_RETRIES + 1):
            try:
                self._check_schema_once(engine, display, create=create, read_only=read_only)
                return
            except OperationalError as exc:
                if _is_locked(exc) and attempt < LOCK_RETRIES:
                    log.warning("database %s is locked while connecting; retrying in %.1f s", display, delay)
                    delay = backoff(delay)
                    continue
                raise DatabaseError(
                    f"database {display}: cannot connect: {_one_line(getattr(exc, 'orig', None) or exc)}"
                ) from None
            except SQLAlchemyError as exc:
                raise DatabaseError(
                    f"database {display}: cannot connect: {_one_line(getattr(exc, 'orig', None) or exc)}"
                ) from None

    @staticmethod
    def _check_schema_once(engine: Engine, display: str, *, create: bool, read_only: bool) -> None:
        ensure_schema(engine, display, create=create, read_only=read_only)

    def disconnect(self) -> None:
        """Dispose of the engine (no-op if not connected). Deferred mode is unaffected."""
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None
        self._write_engine = None
        self._url = None
        self._display = "<not connected>"
        self._read_only = False

    @property
    def connected(self) -> bool:
        """True while an engine exists."""
        return self._engine is not None

    @property
    def read_only(self) -> bool:
        """True if connected read-only."""
        return self._read_only

    @property
    def target(self) -> str:
        """The connected target as shown in messages (passwords hidden)."""
        return self._display

    @property
    def url(self) -> URL | None:
        """The SQLAlchemy URL of the connected database, or None."""
        return self._url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine; raises :class:`DatabaseError` if not connected."""
        return self._require()

    def _require(self) -> Engine:
        if self._engine is None:
            raise DatabaseError("database not connected; call db.connect(PATH_OR_URL) first")
        return self._engine

    def _error(self, exc: BaseException, what: str) -> DatabaseError:
        cause = _one_line(getattr(exc, "orig", None) or exc)
        return DatabaseError(f"database {self._display}: {what}: {cause}")

    def _fail(self, what: str, message: str) -> DatabaseError:
        return DatabaseError(f"database {self._display}: {what}: {message}")

    # ------------------------------------------------------------------ sessions and transactions
    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """Yield a :class:`~sqlalchemy.orm.Session`; commit on success, roll back on exception.

        Facade write methods called inside the block join this transaction, so they commit or
        roll back together. Keep it short: never hold a session across module runs.

        Parameters
        ----------
        write : bool
            Open a write transaction (SQLite ``BEGIN IMMEDIATE``). With ``write=False`` the
            session is read-only by convention and facade writes do not join it.
        """
        active = getattr(self._local, "session", None)
        if active is not None:
            yield active
            return
        if write:
            self._check_writable("session")
        engine = self._write_engine if write else self._require()
        s = self._begin_session(engine, "session")
        if write:
            self._local.session = s
        try:
            try:
                yield s
                s.commit()
            except SQLAlchemyError as exc:
                raise self._error(exc, "session") from exc
            finally:
                if write:
                    self._local.session = None
            self._run_post_commit(s)
        finally:
            s.close()

    def _retry_locked(self, what: str, attempt: Callable[[], T]) -> T:
        """Return ``attempt()``, calling it again while the database is locked.

        ``attempt`` opens its own session and closes it when it raises. After
        :data:`~modules.SQLModule.engine.LOCK_RETRIES` retries, or on any other database error,
        raises :class:`DatabaseError` naming ``what``.
        """
        delay = LOCK_BACKOFF_S
        for n in range(LOCK_RETRIES + 1):
            try:
                return attempt()
            except OperationalError as exc:
                if _is_locked(exc) and n < LOCK_RETRIES:
                    self._log_retry(what, n, delay)
                    delay = backoff(delay)
                    continue
                raise self._locked_or_error(exc, what) from exc
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _begin_session(self, engine: Engine, what: str) -> Session:
        """Create a session and start its transaction, retrying while the database is locked."""

        def attempt() -> Session:
            s = Session(bind=engine, expire_on_commit=False)
            try:
                s.connection()  # emits BEGIN [IMMEDIATE] now
            except BaseException:
                s.close()
                raise
            return s

        return self._retry_locked(what, attempt)

    def _log_retry(self, what: str, attempt: int, delay: float) -> None:
        log.warning(
            "database %s is locked (%s); retry %d/%d in %.1f s",
            self._display,
            what,
            attempt + 1,
            LOCK_RETRIES,
            delay,
        )

    def _locked_or_error(self, exc: BaseException, what: str) -> DatabaseError:
        if _is_locked(exc):
            return self._fail(
                what,
                f"database is locked after {LOCK_RETRIES} retries "
                f"(busy timeout {self._busy_timeout_s:g} s): {_one_line(getattr(exc, 'orig', None) or exc)}",
            )
        return self._error(exc, what)

    def _check_writable(self, what: str) -> None:
        self._require()
        if self._read_only:
            raise DatabaseError(f"database {self._display} is open read-only; cannot {what}")

    def _run_write(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one write transaction, retrying while the database is locked."""
        self._check_writable(what)
        active: Session | None = getattr(self._local, "session", None)
        if active is not None:
            try:
                return fn(active)
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc

        def attempt() -> tuple[T, Session]:
            s = Session(bind=self._write_engine, expire_on_commit=False)
            try:
                result = fn(s)
                s.commit()
            except BaseException:
                s.close()
                raise
            return result, s

        result, s = self._retry_locked(what, attempt)
        try:
            self._run_post_commit(s)
        finally:
            s.close()
        return result

    def _run_read(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a short read transaction; ORM objects come back detached."""
        engine = self._require()
        active: Session | None = getattr(self._local, "session", None)
        if active is not None:
            # Read our own uncommitted writes: a separate identity map on the same connection.
            try:
                active.flush()
                with Session(bind=active.connection(), expire_on_commit=False) as s:
                    return fn(s)
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc

        def attempt() -> T:
            with Session(bind=engine, expire_on_commit=False, autoflush=False) as s:
                return fn(s)

        return self._retry_locked(what, attempt)

    @staticmethod
    def _post_commit(s: Session, action: Callable[[], None]) -> None:
        s.info.setdefault("comap_post_commit", []).append(action)

    @staticmethod
    def _run_post_commit(s: Session) -> None:
        for action in s.info.pop("comap_post_commit", []):
            action()


def _reset_after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
