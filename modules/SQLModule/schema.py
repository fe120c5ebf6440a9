"""Schema creation and Alembic migrations (docs/database.md#schema-migrations).

``python -m modules.SQLModule.schema {current,upgrade,stamp} DB`` shows, upgrades or stamps the
Alembic revision of a database; :meth:`SQLModule.connect` calls :func:`ensure_schema`, which

- creates the schema of an empty database (``create=True``) and stamps it at the head revision;
- stamps a database that has the version-1 schema but no ``alembic_version`` table (made before
  Alembic was used) at the base revision :data:`BASE_REVISION`;
- upgrades a database at an older revision to the head revision.

Every change runs in one transaction that first takes a lock, so that several processes connecting
to the same new database at once create the schema exactly once: PostgreSQL
``pg_advisory_xact_lock`` (released at commit), SQLite ``BEGIN IMMEDIATE``. Legacy databases (no
``schema_info``) are converted by the separate tool :mod:`modules.SQLModule.migrate`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection, Engine

from modules.SQLModule.models import SCHEMA_VERSION, Base, SchemaInfo
from utils.errors import DatabaseError, DatabaseMissing

log = logging.getLogger("comap.db")

MIGRATIONS_DIR: Path = Path(__file__).with_name("migrations")
"""The Alembic environment (``env.py``, ``versions/``) shipped with the package."""
BASE_REVISION: str = "0001"
"""Alembic revision of the version-1 schema, the first one managed by Alembic."""
ADVISORY_LOCK_KEY: int = 0x636F6D6170  # "comap"
"""Key of the PostgreSQL advisory lock held while the schema is created or migrated."""


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic :class:`~alembic.config.Config` for the packaged environment.

    Parameters
    ----------
    connection : sqlalchemy.engine.Connection or None
        Run migrations on this connection, inside its transaction.
    url : str or None
        Otherwise, the database URL the environment opens itself.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.lru_cache(maxsize=4)
def _scripts(location: Path) -> ScriptDirectory:
    return ScriptDirectory(str(location))


def head_revision() -> str:
    """The head revision of the packaged migrations."""
    head = _scripts(MIGRATIONS_DIR).get_current_head()
    if head is None:  # pragma: no cover - the package always ships the base revision
        raise DatabaseError(f"no Alembic revisions in {MIGRATIONS_DIR}")
    return head


def known_revisions() -> set[str]:
    """Every revision of the packaged migrations."""
    return {s.revision for s in _scripts(MIGRATIONS_DIR).walk_revisions()}


@dataclass(frozen=True)
class SchemaState:
    """What a database holds: table names, ``schema_info.schema_version`` and Alembic revision."""

    names: frozenset[str]
    version: str | None
    revision: str | None


def read_state(conn: Connection) -> SchemaState:
    """Read the :class:`SchemaState` of the database behind ``conn``."""
    names = frozenset(inspect(conn).get_table_names())
    version = None
    if "schema_info" in names:
        version = conn.execute(
            select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")
        ).scalar_one_or_none()
    revision = MigrationContext.configure(conn).get_current_revision() if "alembic_version" in names else None
    return SchemaState(names, version, revision)


def _check_version(state: SchemaState, display: str) -> None:
    try:
        version = int(state.version) if state.version is not None else None
    except ValueError:
        version = None
    if version is None or version < SCHEMA_VERSION:
        raise DatabaseError(
            f"database {display} has schema version {state.version or 'legacy'}, "
            f"expected {SCHEMA_VERSION}; "
            f"run: python -m modules.SQLModule.migrate {display}"
        )
    if version > SCHEMA_VERSION or (state.revision is not None and state.revision not in known_revisions()):
        what = f"revision {state.revision}" if version <= SCHEMA_VERSION else f"version {version}"
        raise DatabaseError(
            f"database {display} has schema {what}, newer than this code supports "
            f"({SCHEMA_VERSION}, revision {head_revision()}); upgrade comap-reduce"
        )


def _needs_write(state: SchemaState, *, create: bool) -> bool:
    if not state.names:
        return True
    return state.revision != head_revision() or (create and not set(Base.metadata.tables) <= state.names)


def lock_schema(conn: Connection) -> None:
    """Serialise schema changes: PostgreSQL advisory transaction lock (SQLite: the transaction is
    already ``BEGIN IMMEDIATE``)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def ensure_schema(engine: Engine, display: str, *, create: bool, read_only: bool) -> None:
    """Check the schema of a database, creating or upgrading it where allowed
    (docs/database.md#schema-migrations).

    Parameters
    ----------
    engine : sqlalchemy.engine.Engine
        Engine made by :func:`~modules.SQLModule.engine.make_engine`.
    display : str
        The database as shown in messages.
    create : bool
        Create the schema of an empty database.
    read_only : bool
        Never write: a database that would need stamping or upgrading is still accepted if it is
        at the base schema without a revision, and refused if it is at an older revision.

    Raises
    ------
    DatabaseError
        Empty database without ``create``, legacy or unknown schema version, unknown (newer)
        revision, or an old revision on a read-only connection.
    """
    with engine.connect() as conn:
        state = read_state(conn)
    if state.names:
        _check_version(state, display)
    if not state.names and not create:
        why = "opened read-only" if read_only else "create=False"
        raise DatabaseMissing(f"database {display} is empty (no tables; {why})")
    if not _needs_write(state, create=create):
        return
    if read_only:
        if state.revision is not None:
            raise DatabaseError(
                f"database {display} is at revision {state.revision}, this code needs {head_revision()}; "
                f"run: python -m modules.SQLModule.schema upgrade {display}"
            )
        return  # version 1 without a revision: readable as it is
    with engine.execution_options(comap_write=True).begin() as conn:
        lock_schema(conn)
        state = read_state(conn)  # again: another process may have done it while we waited
        cfg = alembic_config(connection=conn)
        if not state.names:
            Base.metadata.create_all(conn)
            conn.execute(
                SchemaInfo.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
            )
            command.stamp(cfg, "head")
            log.info(
                "created database %s (schema version %d, revision %s)",
                display,
                SCHEMA_VERSION,
                head_revision(),
            )
            return
        _check_version(state, display)
        if state.revision is None:
            command.stamp(cfg, BASE_REVISION)
            log.info("database %s: stamped at the base revision %s", display, BASE_REVISION)
        if state.revision != head_revision():
            command.upgrade(cfg, "head")
            log.info("database %s: upgraded to revision %s", display, head_revision())
        if create and not set(Base.metadata.tables) <= state.names:
            Base.metadata.create_all(conn, checkfirst=True)


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m modules.SQLModule.schema {current,upgrade,stamp} DB``; returns the exit status
    (0 success, 2 usage, 3 database error)."""
    from modules.SQLModule.engine import _resolve_target, make_engine

    parser = argparse.ArgumentParser(
        prog="python -m modules.SQLModule.schema",
        description="Show, upgrade or stamp the Alembic revision of a comap-reduce database.",
    )
    parser.add_argument("action", choices=("current", "upgrade", "stamp"))
    parser.add_argument("db", help="database path or SQLAlchemy URL")
    parser.add_argument("--revision", default="head", help="target revision of upgrade/stamp (default: head)")
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    display = "<invalid target>"
    try:
        url, display, path = _resolve_target(args.db)
        if path is not None and not path.is_file():
            raise DatabaseError(f"database {display} does not exist")
        engine = make_engine(url, sqlite_path=path)
        try:
            if args.action == "current":
                with engine.connect() as conn:
                    state = read_state(conn)
                print(f"{display}: schema version {state.version or '-'}, revision {state.revision or '-'}")
                return 0
            with engine.execution_options(comap_write=True).begin() as conn:
                lock_schema(conn)
                state = read_state(conn)
                _check_version(state, display)
                cfg = alembic_config(connection=conn)
                if args.action == "stamp":
                    command.stamp(cfg, args.revision)
                else:
                    if state.revision is None:
                        command.stamp(cfg, BASE_REVISION)
                    command.upgrade(cfg, args.revision)
        finally:
            engine.dispose()
    except DatabaseError as exc:
        print(f"DatabaseError: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # database and Alembic errors
        print(f"DatabaseError: database {display}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 3
    print(f"{display}: {args.action} {args.revision} done")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
