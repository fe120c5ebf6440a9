"""Two runs started at the same instant on one archive and one database
(docs/reliability.md#concurrent-runs), on SQLite and on PostgreSQL.

Both ``run.py`` processes are started while the test holds the database (an exclusive SQLite
transaction, or ``LOCK TABLE processing_jobs`` on PostgreSQL), so they meet at their first write and
race from there: registering the archive, claiming the level-2 jobs, recording the results. Each
observation must be reduced by exactly one of them (one claim, one ``done`` line in one log), neither
may report a lock conflict, and each writes its own log file even though both start in the same second.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modules.pipeline_control.runner import make_timestamp

REPO = Path(__file__).resolve().parents[2]
CTX = multiprocessing.get_context("spawn")
LOCK_WORDS = ("database is locked", "deadlock", "could not serialize", "duplicate key", "UNIQUE constraint")


class _Held:
    """The database held by the test: SQLite ``BEGIN EXCLUSIVE``, or PostgreSQL ``LOCK TABLE``."""

    def __init__(self, target: str, pg_server) -> None:
        self.target, self.pg = target, pg_server

    def __enter__(self) -> _Held:
        if self.pg is None:
            self.conn = sqlite3.connect(self.target, isolation_level=None)
            self.conn.execute("BEGIN EXCLUSIVE")
        else:
            from sqlalchemy.engine import make_url

            self.conn = self.pg.connect_admin(dbname=make_url(self.target).database)
            self.conn.autocommit = False
            self.conn.execute("LOCK TABLE processing_jobs IN ACCESS EXCLUSIVE MODE")
        return self

    def __exit__(self, *exc) -> None:
        if self.pg is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.commit()
        self.conn.close()


def _start(ws, name: str) -> subprocess.Popen:
    out = open(ws.root / f"{name}.out", "w")
    try:
        return subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), "main.toml"],
            cwd=ws.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(ws.env(), OMP_NUM_THREADS="1"),
            start_new_session=True,
        )
    finally:
        out.close()


def _wait_until_both_wait(ws, procs, target: str, pg_server) -> None:
    """Return once both runs have written their log's first lines and (PostgreSQL) wait for the lock."""
    deadline = time.monotonic() + 60
    while True:
        assert all(p.poll() is None for p in procs), "a run ended while the database was held"
        consoles = [ws.root / f"{n}.out" for n in ("a", "b")]
        started = sum(p.exists() and ", config main.toml" in p.read_text() for p in consoles)
        waiting = 2
        if pg_server is not None:
            from sqlalchemy.engine import make_url

            with pg_server.connect_admin(dbname=make_url(target).database) as q:
                waiting = q.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]
        if started >= 2 and waiting >= 2:
            time.sleep(0.3)  # both are now at (or just before) their first write
            return
        assert time.monotonic() < deadline, f"{started} run(s) started, {waiting} waiting"
        time.sleep(0.05)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_runs_at_once_do_each_observation_once(
    backend, request, workspace_factory, small_archive, tiny_archive
):
    pg_server = request.getfixturevalue("pg_server") if backend == "postgres" else None
    ws = workspace_factory([*small_archive.paths, *tiny_archive.paths])
    ws.write_configs()  # the default level-2 list of the workspace
    target = str(ws.db_path)
    if pg_server is not None:
        target = request.getfixturevalue("pg_url")
        for name in ("main.toml", "l2.toml"):
            text = (ws.root / name).read_text().replace("'db.sqlite'", repr(target))
            (ws.root / name).write_text(text)
    from modules.SQLModule.SQLModule import SQLModule

    SQLModule().connect(target).disconnect()  # the schema, as a first run would leave it

    # Both in the same second, so that both want the same log file name.
    while time.time() % 1.0 > 0.5:
        time.sleep(0.05)
    second = make_timestamp()
    procs = []
    try:
        with _Held(target, pg_server):
            procs = [_start(ws, "a"), _start(ws, "b")]
            _wait_until_both_wait(ws, procs, target, pg_server)
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = [(ws.root / f"{n}.out").read_text() for n in ("a", "b")]
    assert [p.returncode for p in procs] == [0, 0], outputs

    logs = sorted((ws.root / "logs").glob("*.log"))
    assert len(logs) == 2, logs  # one log file each
    texts = [p.read_text() for p in logs]
    run_ids = [re.search(r"run (\S+), config", t).group(1) for t in texts]
    assert run_ids[0] != run_ids[1]
    if all(rid.startswith(second) for rid in run_ids):  # the same second: one name carries a suffix
        assert sorted(p.name for p in logs)[0] == f"{second}_main.log"
    dumps = sorted((ws.root / "logs").glob("*.resolved.toml"))
    assert len(dumps) == 2 and all(p.stat().st_size > 0 for p in dumps), dumps

    for text in [*texts, *outputs]:
        for word in LOCK_WORDS:
            assert word not in text, f"{word!r} reported:\n{text[-3000:]}"

    obsids = sorted(int(p.name.split("-")[1]) for p in ws.level1.glob("*.hd5"))
    done = [re.findall(r"\[(\d{7})\] (?:comap\.)?Level2Pipeline: done in ", t) for t in texts]
    assert sorted(int(o) for d in done for o in d) == obsids, done  # each observation in one log only

    db = ws.db() if pg_server is None else SQLModule().connect(target)
    try:
        jobs = {j.obsid: j for j in db.job_table("level2")}
    finally:
        db.disconnect()
    assert sorted(jobs) == obsids
    assert {(j.status, j.attempts) for j in jobs.values()} == {("done", 1)}
    assert len(ws.level2_files()) == len(obsids) and ws.staging_files() == []


def _register(url: str, obsids: list[int], go, results) -> None:
    """One run's registration of ``obsids`` (what DataAssess does), once ``go`` is set."""
    from modules.SQLModule.SQLModule import SQLModule

    try:
        db = SQLModule().connect(url, create=False)
        go.wait(timeout=60)
        for o in obsids:
            db.upsert_observation({"obsid": o, "source": "GField30", "utc_start": "2026-03-01-04:15:00"})
        db.disconnect()
        results.put("ok")
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.timeout(120)
def test_two_runs_register_the_same_observations_at_once(pg_server, pg_url):
    """PostgreSQL: both runs find an observation missing and insert it; the second used to fail with a
    duplicate key on ``comap_data`` (found by the test above). The two block behind a lock on
    ``comap_data`` that the test releases once both wait, so that they read and insert at once."""
    from sqlalchemy.engine import make_url

    from modules.SQLModule.SQLModule import SQLModule

    SQLModule().connect(pg_url).disconnect()
    obsids = list(range(5000, 5010))
    go, results = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_register, args=(pg_url, obsids, go, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        conn = pg_server.connect_admin(dbname=make_url(pg_url).database)
        conn.autocommit = False
        conn.execute("LOCK TABLE comap_data IN ACCESS EXCLUSIVE MODE")
        go.set()
        deadline = time.monotonic() + 60
        with pg_server.connect_admin(dbname=make_url(pg_url).database) as q:
            while q.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] < 2:
                assert time.monotonic() < deadline, "the two registrations never waited for the lock"
                time.sleep(0.02)
        conn.commit()
        conn.close()
        assert [results.get(timeout=60) for _ in procs] == ["ok", "ok"]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    db = SQLModule().connect(pg_url, create=False)
    try:
        assert sorted(o.obsid for o in db.query_observations()) == obsids
        assert sorted(s["obsid"] for s in db.query_observation_summaries()) == obsids
    finally:
        db.disconnect()


def test_a_live_writers_partial_map_is_kept(tmp_path):
    """Two runs making the same map at once: the second must not delete the first one's temporary file
    (its rename would fail); a dead process's file goes."""
    from modules.MapMaking.fits_output import remove_stale_partials

    code = "import os; print(os.getpid())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # a pid now free
    final = tmp_path / "GField30_band1_ch0_feed01to03.fits"
    live, dead = (final.with_name(f"{final.name}.partial-{pid}") for pid in (os.getpid(), int(child.stdout)))
    for p in (live, dead):
        p.write_bytes(b"SIMPLE")
    remove_stale_partials(final)
    assert live.exists() and not dead.exists()
