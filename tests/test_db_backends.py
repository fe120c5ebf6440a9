"""The database layer on SQLite and on a PostgreSQL server: concurrent runs claiming jobs, concurrent
first connections, Alembic revisions (docs/database.md#concurrent-runs,
docs/database.md#schema-migrations).

Every test runs on both back-ends through the ``db_url`` fixture (tests/conftest.py); the
PostgreSQL server is started once per session by tests/pg_server.py.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.engine import make_url

from modules.SQLModule import schema as SCHEMA
from modules.SQLModule.SQLModule import Base, ProcessingJob, SQLModule
from utils.errors import DatabaseError

HOST = socket.gethostname()
ROUNDS = 4  # synchronised claims per back-end; each round was a failed run before the fix
N_OBS = 20  # obsids per round: 5 done, 5 pending, 10 without a job row
CTX = multiprocessing.get_context("spawn")


def _is_pg(url: str) -> bool:
    return url.startswith("postgresql")


def _claim(facade: SQLModule, obsids, run_id: str, **kw):
    return facade.claim_jobs(
        obsids,
        "level2",
        run_id=run_id,
        host=HOST,
        pid=os.getpid(),
        code_version="v1",
        config_sha256=None,
        **kw,
    )


def _seen(facade: SQLModule, obsids) -> dict:
    """The job states a coordinator bases its decision on (as Level2Pipeline._classify reads them)."""
    return {j.obsid: (j.status, j.updated_utc) for j in facade.job_table("level2", obsids=obsids)}


# --------------------------------------------------------------------------------------------------
# two coordinators claiming at the same instant
# --------------------------------------------------------------------------------------------------
def _claim_worker(url: str, name: str, commands, results) -> None:
    """A coordinator: per round, read the job states, report ready, wait for "go", claim with
    ``force=True`` and the states it read (what Level2Pipeline.run does)."""
    try:
        facade = SQLModule().connect(url, create=False)
        while (obsids := commands.get()) is not None:
            seen = _seen(facade, obsids)
            results.put(("ready", name))
            commands.get()
            res = _claim(facade, obsids, name, force=True, seen=seen)
            results.put(("ok", name, res.claimed, res.busy))
        facade.disconnect()
    except BaseException as exc:  # every failure goes to the parent, and the exit status says so
        results.put(("error", name, f"{type(exc).__name__}: {exc}"))
        sys.exit(3)


class _TableLock:
    """Hold an exclusive lock on ``processing_jobs`` (PostgreSQL) or the whole file (SQLite)."""

    def __init__(self, url: str, pg_server) -> None:
        self.url, self.pg = url, pg_server

    def __enter__(self) -> _TableLock:
        if _is_pg(self.url):
            self.conn = self.pg.connect_admin(dbname=make_url(self.url).database)
            self.conn.autocommit = False
            self.conn.execute("LOCK TABLE processing_jobs IN ACCESS EXCLUSIVE MODE")
        else:
            self.conn = sqlite3.connect(self.url, isolation_level=None)
            self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def wait_for_waiters(self, n: int, timeout_s: float = 60.0) -> int:
        """Return once ``n`` backends wait for the lock (PostgreSQL; SQLite cannot tell: 0.5 s)."""
        if not _is_pg(self.url):
            time.sleep(0.5)
            return n
        deadline = time.monotonic() + timeout_s
        with self.pg.connect_admin(dbname=make_url(self.url).database) as q:
            while True:
                waiting = q.execute(
                    "SELECT count(*) FROM pg_locks "
                    "WHERE relation = 'processing_jobs'::regclass AND NOT granted"
                ).fetchone()[0]
                if waiting >= n or time.monotonic() > deadline:
                    return waiting
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.conn.commit() if _is_pg(self.url) else self.conn.execute("COMMIT")
        self.conn.close()


def test_two_coordinators_claim_at_the_same_instant(db_url, request):
    pg = request.getfixturevalue("pg_server") if _is_pg(db_url) else None
    setup = SQLModule().connect(db_url)
    results = CTX.Queue()
    commands = [CTX.Queue(), CTX.Queue()]
    names = ["run-A", "run-B"]
    procs = [CTX.Process(target=_claim_worker, args=(db_url, n, c, results)) for n, c in zip(names, commands)]
    for p in procs:
        p.start()
    try:
        for r in range(ROUNDS):
            obsids = list(range(1000 * (r + 1), 1000 * (r + 1) + N_OBS))
            for o in obsids[:10]:  # registered observations: the summary mirrors the job
                setup.upsert_observation(
                    {"obsid": o, "source": "GField30", "utc_start": "2026-03-01-04:15:00"}
                )
            _claim(setup, obsids[:10], "earlier")
            for o in obsids[:5]:
                setup.finish_job(o, "level2", "done")
            setup.release_jobs("earlier")  # 5 done (attempts 1), 5 pending (attempts 1), 10 new
            for c in commands:
                c.put(obsids)
            assert sorted(results.get(timeout=120)[:2] for _ in procs) == [("ready", n) for n in names]
            with _TableLock(db_url, pg) as lock:
                for c in commands:
                    c.put("go")
                waiting = lock.wait_for_waiters(2)
                assert waiting >= 2, f"round {r}: only {waiting} coordinator(s) waited for the lock"
            out = [results.get(timeout=120) for _ in procs]
            errors = [o for o in out if o[0] != "ok"]
            assert not errors, f"round {r}: {errors}"
            claimed = [o for res in out for o in res[2]]
            assert sorted(claimed) == obsids, f"round {r}: every obsid claimed by exactly one run"
            for _, _name, mine, busy in out:
                assert sorted(mine + busy) == obsids  # the other run's jobs were busy, nothing else
            jobs = {j.obsid: j for j in setup.job_table("level2", obsids=obsids)}
            assert all(jobs[o].status == "running" for o in obsids)
            assert [jobs[o].attempts for o in obsids] == [2] * 10 + [1] * 10  # one claim per round
            summaries = setup.query_observation_summaries()
            assert {s["processing_status"] for s in summaries if s["obsid"] in obsids} == {"running"}
    finally:
        for c in commands:
            c.put(None)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        setup.disconnect()
    assert [p.exitcode for p in procs] == [0, 0]


def test_force_does_not_take_a_job_finished_meanwhile(db_url):
    """A coordinator that saw a job pending (or done and out of date) must not claim it after
    another run claimed and finished it in between."""
    a = SQLModule().connect(db_url)
    b = SQLModule().connect(db_url)
    try:
        _claim(a, [1, 2], "old")
        a.finish_job(2, "level2", "done")
        a.release_jobs("old")  # 1 pending, 2 done
        seen_b = _seen(b, [1, 2, 3])  # B decides: 1 (pending), 2 (done but stale), 3 (new)
        assert sorted(_claim(a, [1, 2, 3], "run-A", force=True, seen=_seen(a, [1, 2, 3])).claimed) == [
            1,
            2,
            3,
        ]
        for o in (1, 2, 3):
            a.finish_job(o, "level2", "done")
        res = _claim(b, [1, 2, 3], "run-B", force=True, seen=seen_b)
        assert (res.claimed, res.skipped_done) == ([], [1, 2, 3])
        assert [j.attempts for j in a.job_table("level2")] == [2, 2, 1]
        # unchanged since B looked: force takes the done job over (a module was added, --force)
        res = _claim(b, [2], "run-B", force=True, seen=_seen(b, [2]))
        assert res.claimed == [2]
    finally:
        a.disconnect()
        b.disconnect()


# --------------------------------------------------------------------------------------------------
# concurrent first connections
# --------------------------------------------------------------------------------------------------
N_CONNECT = 4


def _connect_worker(urls, barrier, results) -> None:
    try:
        while (url := urls.get()) is not None:
            barrier.wait(timeout=60)
            SQLModule().connect(url).disconnect()
            results.put(("ok", url))
    except BaseException as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        sys.exit(3)


def test_concurrent_first_connections_create_the_schema_once(db_url, request):
    pg = request.getfixturevalue("pg_server") if _is_pg(db_url) else None
    urls = [CTX.Queue() for _ in range(N_CONNECT)]
    barrier = CTX.Barrier(N_CONNECT)
    results = CTX.Queue()
    procs = [CTX.Process(target=_connect_worker, args=(q, barrier, results)) for q in urls]
    for p in procs:
        p.start()
    made = []
    try:
        for r in range(3):
            url = pg.new_database("empty") if pg else str(Path(db_url).with_name(f"empty{r}.db"))
            made.append(url)
            for q in urls:
                q.put(url)
            out = [results.get(timeout=120) for _ in procs]
            assert all(o[0] == "ok" for o in out), f"round {r}: {out}"
            facade = SQLModule().connect(url, create=False)
            try:
                with facade.engine.connect() as conn:
                    assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
                    assert conn.execute(text("SELECT count(*) FROM schema_info")).scalar() == 1
            finally:
                facade.disconnect()
    finally:
        for q in urls:
            q.put(None)
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        for url in made if pg else []:
            pg.drop_database(url)
    assert [p.exitcode for p in procs] == [0] * N_CONNECT


# --------------------------------------------------------------------------------------------------
# Alembic revisions
# --------------------------------------------------------------------------------------------------
def _revision(url: str) -> str | None:
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _drop_alembic_version(url: str) -> None:
    engine = create_engine(url if "://" in url else f"sqlite:///{url}")
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()


def test_new_database_at_head_and_old_one_stamped_at_base(db_url):
    SQLModule().connect(db_url).disconnect()
    assert _revision(db_url) == SCHEMA.head_revision()
    _drop_alembic_version(db_url)  # a version-1 database made before Alembic
    ro = SQLModule().connect(db_url, read_only=True)  # readable as it is, not written
    ro.disconnect()
    assert _revision(db_url) is None
    SQLModule().connect(db_url, create=False).disconnect()
    assert _revision(db_url) == SCHEMA.BASE_REVISION == SCHEMA.head_revision()


def test_upgrade_from_nothing_gives_the_models_schema(db_url):
    """``upgrade head`` on an empty database builds what create_all builds: no differences."""
    if not _is_pg(db_url):
        Path(db_url).parent.mkdir(parents=True, exist_ok=True)
    url = db_url if "://" in db_url else f"sqlite:///{db_url}"
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            from alembic import command

            command.upgrade(SCHEMA.alembic_config(connection=conn), "head")
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            assert diff == []
            assert conn.execute(text("SELECT value FROM schema_info")).scalar() == "1"
    finally:
        engine.dispose()
    facade = SQLModule().connect(db_url, create=False)  # accepted as it is
    facade.disconnect()


NEXT_REVISION = '''"""test revision: a column added after the base"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("processing_jobs") as batch:
        batch.add_column(sa.Column("note", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("processing_jobs") as batch:
        batch.drop_column("note")
'''


def test_connect_upgrades_to_a_new_head(db_url, tmp_path, monkeypatch):
    SQLModule().connect(db_url).disconnect()  # at 0001
    with_next = tmp_path / "migrations"
    shutil.copytree(SCHEMA.MIGRATIONS_DIR, with_next, ignore=shutil.ignore_patterns("__pycache__"))
    (with_next / "versions" / "0002_note.py").write_text(NEXT_REVISION)
    try:
        monkeypatch.setattr(SCHEMA, "MIGRATIONS_DIR", with_next)
        assert SCHEMA.head_revision() == "0002"
        with pytest.raises(DatabaseError, match="revision 0001, this code needs 0002"):
            SQLModule().connect(db_url, read_only=True)
        facade = SQLModule().connect(db_url, create=False)
        try:
            columns = {c["name"] for c in inspect(facade.engine).get_columns("processing_jobs")}
            assert "note" in columns
            assert _claim(facade, [7], "run-A").claimed == [7]  # the upgraded table still works
        finally:
            facade.disconnect()
        assert _revision(db_url) == "0002"
    finally:
        monkeypatch.undo()
    # back on the shipped code, the database is newer than the code knows
    with pytest.raises(DatabaseError, match="newer than this code supports"):
        SQLModule().connect(db_url)


def test_schema_command(db_url, capsys):
    SQLModule().connect(db_url).disconnect()
    _drop_alembic_version(db_url)
    assert SCHEMA.main(["current", db_url]) == 0
    assert "revision -" in capsys.readouterr().out
    assert SCHEMA.main(["upgrade", db_url]) == 0
    assert _revision(db_url) == SCHEMA.head_revision()
    assert SCHEMA.main(["current", db_url]) == 0
    assert f"revision {SCHEMA.head_revision()}" in capsys.readouterr().out
    assert SCHEMA.main(["bogus", db_url]) == 2


# --------------------------------------------------------------------------------------------------
# back-end specific behaviour of the facade
# --------------------------------------------------------------------------------------------------
def test_read_only_connection_refuses_writes(db_url):
    writer = SQLModule().connect(db_url)
    writer.upsert_observation({"obsid": 1, "source": "GField30", "utc_start": "2026-03-01-04:15:00"})
    writer.disconnect()
    ro = SQLModule().connect(db_url, read_only=True)
    try:
        assert ro.query_all_obsids() == [1]
        with pytest.raises(DatabaseError, match="read-only"):
            _claim(ro, [1], "run-A")
        # the connection itself refuses writes, not only the facade
        with pytest.raises(DatabaseError, match="(?i)read-only|readonly"):
            with ro.session(write=False) as s:
                s.execute(ProcessingJob.__table__.insert().values(obsid=5, stage="level2", attempts=0))
        with ro.session(write=False) as s:
            assert s.scalars(select(ProcessingJob.obsid)).all() == []
    finally:
        ro.disconnect()


def test_deadlock_is_rolled_back_and_retried(pg_url, monkeypatch, caplog):
    """PostgreSQL aborts one transaction of a deadlock; the facade runs it again."""
    import threading

    sleeps = []
    monkeypatch.setattr(sys.modules["modules.SQLModule.engine"], "_sleep", sleeps.append)
    facade = SQLModule().connect(pg_url)
    _claim(facade, [1, 2], "setup")
    other = psycopg_connect(pg_url)
    other_has_2, facade_has_1 = threading.Event(), threading.Event()

    def other_run():  # locks job 2, then waits for job 1
        other.execute("UPDATE processing_jobs SET error = 'other' WHERE obsid = 2")
        other_has_2.set()
        facade_has_1.wait(30)
        other.execute("UPDATE processing_jobs SET error = 'other' WHERE obsid = 1")
        other.commit()

    thread = threading.Thread(target=other_run)
    thread.start()
    attempts = []

    def write(s):  # locks job 1, then waits for job 2 once the other transaction waits for job 1
        attempts.append(1)
        if len(attempts) == 1:
            other_has_2.wait(30)
        s.execute(text("UPDATE processing_jobs SET error = 'facade' WHERE obsid = 1"))
        if len(attempts) == 1:
            facade_has_1.set()
            time.sleep(0.5)  # the other transaction is waiting now (deadlock_timeout is 0.1 s)
        s.execute(text("UPDATE processing_jobs SET error = 'facade' WHERE obsid = 2"))
        return len(attempts)

    try:
        caplog.set_level("WARNING", logger="comap.db")
        assert facade._run_write("deadlock test", write) == 2
    finally:
        thread.join(60)
        other.close()
    assert sleeps == [0.5] and "deadlock test" in caplog.text
    assert {j.error for j in facade.job_table("level2")} == {"facade"}  # the retry ran after the other
    facade.disconnect()


def psycopg_connect(url: str):
    import psycopg

    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)
