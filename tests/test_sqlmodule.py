"""Tests of the database facade and ORM models (docs/database.md, docs/operations.md#single-db-writer,
docs/operations.md#resumability)."""

from __future__ import annotations

import ast
import hashlib
import logging
import math
import multiprocessing
import os
import pickle
import socket
import sqlite3
import subprocess
import sys
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect, select, update

from modules.SQLModule.SQLModule import (
    CalibrationFlux,
    ClaimResult,
    COMAPData,
    DbOp,
    ProcessingJob,
    QualityFlag,
    SQLModule,
    db,
    mjd_from_utc_start,
)
from utils.constants import DEFAULT_SCIENCE_FEEDS, GROUND_FEED
from utils.errors import ConfigError, DatabaseError

SQL_ENGINE = sys.modules["modules.SQLModule.engine"]
HOST = socket.gethostname()
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def dbfile(tmp_path) -> Path:
    return tmp_path / "db" / "test.db"


@pytest.fixture
def fdb(db_url):
    """A fresh facade connected to a new database: a SQLite file, or a PostgreSQL database on the
    session's server (the ``db_url`` fixture of tests/conftest.py)."""
    facade = SQLModule().connect(db_url)
    yield facade
    facade.disconnect()


def obs(obsid: int, **kw) -> dict:
    data = {
        "obsid": obsid,
        "source": "GField30",
        "comment": "",
        "utc_start": "2026-03-01-04:15:00",
        "level1_path": f"/data/level1/comap-{obsid:07d}.hd5",
        "pixels": "1,2,3,20",
    }
    data.update(kw)
    return data


def register(facade: SQLModule, *obsids: int, **kw) -> None:
    for o in obsids:
        facade.upsert_observation(obs(o, **kw))


def claim(facade: SQLModule, obsids, run_id="run-A", pid=None, host=HOST, **kw) -> ClaimResult:
    return facade.claim_jobs(
        obsids,
        "level2",
        run_id=run_id,
        host=host,
        pid=os.getpid() if pid is None else pid,
        code_version="v1",
        config_sha256="c" * 64,
        **kw,
    )


def pragma(facade: SQLModule, name: str):
    with facade.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------------------
# import contract and dependency rule
# --------------------------------------------------------------------------------------------------
def test_singleton_and_imports():
    from modules.SQLModule import COMAPData as C2
    from modules.SQLModule import db as db2

    assert isinstance(db, SQLModule)
    assert db2 is db
    assert C2 is COMAPData
    assert COMAPData.__tablename__ == "comap_data"


def test_sqlmodule_imports_only_utils_and_third_party():
    for path in (REPO / "modules" / "SQLModule").glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("modules"):
                    assert name.startswith("modules.SQLModule"), f"{path.name} imports {name}"


def test_not_connected_raises():
    with pytest.raises(DatabaseError, match="not connected"):
        SQLModule().query_all_obsids()


# --------------------------------------------------------------------------------------------------
# connection, pragmas, schema version, read-only
# --------------------------------------------------------------------------------------------------
def test_connect_creates_schema_and_pragmas(fdb):
    assert fdb.schema_version() == 1
    names = set(inspect(fdb.engine).get_table_names())
    assert names == {
        "alembic_version",
        "comap_data",
        "observation_summary",
        "quality_flags",
        "calibration_flux",
        "calibration_model_fit",
        "processing_jobs",
        "schema_info",
    }
    if fdb.engine.dialect.name == "sqlite":
        assert Path(fdb.url.database).is_file()
        assert pragma(fdb, "journal_mode") == "wal"
        assert pragma(fdb, "foreign_keys") == 1
        assert pragma(fdb, "synchronous") == 1  # NORMAL
        assert pragma(fdb, "busy_timeout") == 30000
    indexes = {ix["name"] for ix in inspect(fdb.engine).get_indexes("processing_jobs")}
    assert "ix_processing_jobs_stage_status" in indexes
    uniques = inspect(fdb.engine).get_unique_constraints("quality_flags")
    assert any(u["column_names"] == ["obsid", "feed", "band", "channel"] for u in uniques)


def test_connect_env_overrides(dbfile, monkeypatch):
    monkeypatch.setenv("COMAP_SQLITE_JOURNAL_MODE", "delete")
    monkeypatch.setenv("COMAP_SQLITE_BUSY_TIMEOUT_S", "2.5")
    facade = SQLModule().connect(dbfile)
    try:
        assert pragma(facade, "journal_mode") == "delete"
        assert pragma(facade, "busy_timeout") == 2500
    finally:
        facade.disconnect()
    monkeypatch.setenv("COMAP_SQLITE_JOURNAL_MODE", "bogus")
    with pytest.raises(DatabaseError, match="COMAP_SQLITE_JOURNAL_MODE"):
        SQLModule().connect(dbfile)


def test_connect_url_and_unreachable(tmp_path):
    facade = SQLModule().connect(f"sqlite:///{tmp_path / 'url.db'}")
    try:
        assert facade.schema_version() == 1
        assert (tmp_path / "url.db").is_file()
    finally:
        facade.disconnect()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(DatabaseError) as err:
        SQLModule().connect(blocker / "x.db")
    assert "\n" not in str(err.value) and "not_a_dir" in str(err.value)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="garbage.db: cannot connect: file is not a database"):
        SQLModule().connect(garbage)


def _legacy_db(path: Path, version: str | None = None) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE comap_data (obsid INTEGER PRIMARY KEY, source VARCHAR)")
    if version is not None:
        con.execute("CREATE TABLE schema_info (key VARCHAR PRIMARY KEY, value VARCHAR)")
        con.execute("INSERT INTO schema_info VALUES ('schema_version', ?)", (version,))
    con.commit()
    con.close()


def test_schema_version_mismatch_messages(tmp_path):
    legacy = tmp_path / "legacy.db"
    _legacy_db(legacy)
    with pytest.raises(DatabaseError) as err:
        SQLModule().connect(str(legacy))
    assert str(err.value) == (
        f"database {legacy} has schema version legacy, expected 1; "
        f"run: python -m modules.SQLModule.migrate {legacy}"
    )
    older = tmp_path / "older.db"
    _legacy_db(older, "0")
    with pytest.raises(DatabaseError) as err:
        SQLModule().connect(str(older))
    assert str(err.value) == (
        f"database {older} has schema version 0, expected 1; run: python -m modules.SQLModule.migrate {older}"
    )
    newer = tmp_path / "newer.db"
    _legacy_db(newer, "2")
    with pytest.raises(DatabaseError, match="newer than this code supports"):
        SQLModule().connect(str(newer))


def test_read_only_cannot_write_and_leaves_file_identical(dbfile, tmp_path):
    writer = SQLModule().connect(dbfile)
    register(writer, 1, 2)
    writer.set_quality_flags(1, feeds=[1], observer_ok=False)
    writer.disconnect()
    before = sha(dbfile)

    ro = SQLModule().connect(dbfile, read_only=True)
    try:
        assert ro.read_only
        assert ro.query_all_obsids() == [1, 2]
        assert ro.is_good(1, 1, 0, 0) is False
        assert ro.remap_level2_paths("/a", "/b")["matched"] == 0  # dry run reads only
        with pytest.raises(DatabaseError, match="read-only"):
            ro.upsert_observation(obs(3))
        with pytest.raises(DatabaseError, match="read-only"):
            claim(ro, [1])
        # the connection itself is read-only too, not just the facade
        with pytest.raises(DatabaseError, match="readonly"):
            with ro.session(write=False) as s:
                s.execute(update(COMAPData).values(source="x"))
    finally:
        ro.disconnect()
    assert sha(dbfile) == before

    missing = tmp_path / "missing.db"
    with pytest.raises(DatabaseError, match="does not exist"):
        SQLModule().connect(missing, read_only=True)
    assert not missing.exists()
    with pytest.raises(DatabaseError, match="does not exist"):
        SQLModule().connect(missing, create=False)
    assert not missing.exists()


# --------------------------------------------------------------------------------------------------
# observations: upsert, detached results, queries
# --------------------------------------------------------------------------------------------------
def test_upsert_observation(fdb, caplog):
    caplog.set_level(logging.DEBUG, logger="comap.db")
    created = fdb.upsert_observation(
        {
            "obsid": np.int64(60012),
            "source": "GField30, extra",
            "comment": b"",
            "utc_start": "2026-03-01-04:15:00",
            "level1_path": "rel/comap-0060012.hd5",
            "nchan": np.int64(1024),
            "bw": np.float32(2.0),
            "not_a_column": 5,
        }
    )
    assert created is True
    assert "not_a_column" in caplog.text
    o = fdb.query_data(60012)
    assert (o.source, o.source_group) == ("GField30", "Galactic")
    assert o.mjd_start == pytest.approx(mjd_from_utc_start("2026-03-01-04:15:00"))
    assert o.mjd_start == pytest.approx(61100.0 + (4 * 3600 + 15 * 60) / 86400.0)
    assert o.level1_path == os.path.abspath("rel/comap-0060012.hd5")
    assert o.nchan == 1024 and isinstance(o.nchan, int) and o.bw == 2.0
    assert o.registered_utc.tzinfo is not None and o.registered_utc.utcoffset() == timedelta(0)
    first_registered = o.registered_utc

    assert fdb.upsert_observation({"obsid": 60012, "level1_size_bytes": 2**40}) is False
    o = fdb.query_data(60012)
    assert o.level1_size_bytes == 2**40
    assert o.source == "GField30" and o.registered_utc == first_registered
    assert o.updated_utc >= first_registered

    snap = fdb.get_observation_snapshot(60012)
    assert snap["summary"]["processing_status"] == "pending"
    assert fdb.obsid_exists(60012) and not fdb.obsid_exists(1)
    assert fdb.query_data(1) is None

    # COMAPData input; explicit source_group is kept
    fdb.upsert_observation(COMAPData(obsid=7, source="TauA", source_group="Special"))
    assert fdb.query_data(7).source_group == "Special"
    with pytest.raises(ValueError, match="obsid"):
        fdb.upsert_observation({"source": "x"})


def test_query_results_are_detached_and_picklable(fdb):
    register(fdb, 1, 2)
    rows = fdb.query_observations()
    assert [r.obsid for r in rows] == [1, 2]
    assert all(inspect(r).detached for r in rows)
    clone = pickle.loads(pickle.dumps(rows[0]))
    assert clone.obsid == 1 and clone.source == "GField30" and clone.level1_path.endswith("0000001.hd5")
    as_dict = rows[0].to_dict()
    assert as_dict["obsid"] == 1 and pickle.loads(pickle.dumps(as_dict)) == as_dict
    rebuilt = COMAPData.from_dict({**as_dict, "final_level2_path": "x"})
    assert rebuilt.obsid == 1 and rebuilt.source == "GField30"
    rows[0].final_level2_path = "/tmp/x.hd5"  # the pipeline sets this on file_info
    jobs_flags = fdb.get_quality_flags(1)
    assert jobs_flags == {}


def test_wildcard_source_queries(fdb):
    sources = {1: "GField30", 2: "gfield31", 3: "TauA", 4: "my_src", 5: "myXsrc", 6: "50%off", 7: "50Xoff"}
    for o, s in sources.items():
        fdb.upsert_observation(obs(o, source=s))

    def ids(**kw):
        return [r.obsid for r in fdb.query_observations(**kw)]

    assert ids(source="gfield*") == [1, 2]
    assert ids(source="GFIELD3?") == [1, 2]
    assert ids(source="GField30") == [1]
    assert ids(source="taua") == [3]
    assert ids(source="my_src") == [4]  # '_' is literal
    assert ids(source="my?src") == [4, 5]
    assert ids(source="50%off") == [6]  # '%' is literal
    assert ids(source="50*") == [6, 7]
    assert ids(source=["TauA", "gfield30"]) == [1, 3]
    assert ids(source=[]) == []
    assert ids(source_group="galactic") == [1, 2]
    assert ids(source_group=["Calib*", "Other"]) == [3, 4, 5, 6, 7]
    assert ids(source="*", source_group="Calibrator") == [3]
    assert [r.obsid for r in fdb.get_files(source_group="Galactic")] == [1, 2]


def test_obsid_ranges_lists_and_level_filters(fdb):
    for o in range(1, 11):
        fdb.upsert_observation(obs(o, level1_path=None if o == 10 else f"/l1/{o}.hd5"))
    fdb.set_level2_path(3, "/l2/3.hd5")
    fdb.set_level2_path(4, "/l2/4.hd5")

    def ids(**kw):
        return [r.obsid for r in fdb.query_observations(**kw)]

    assert ids(min_obsid=3, max_obsid=5) == [3, 4, 5]
    assert ids(obsids=[9, 2, 2, 42]) == [2, 9]
    assert ids(obsids=(o for o in (5, 1))) == [1, 5]
    assert ids(obsids=np.array([4, 6])) == [4, 6]
    assert ids(obsids=[]) == []
    assert ids(obsids=list(range(0, 1300)), min_obsid=8) == [8, 9, 10]  # chunked IN lists
    assert ids(has_level1=False) == [10]
    assert len(ids(has_level1=True)) == 9
    assert ids(has_level2=True) == [3, 4]
    assert ids(has_level2=True, min_obsid=4) == [4]
    assert fdb.query_all_obsids() == list(range(1, 11))


def test_load_obsid_list(fdb, tmp_path):
    assert fdb.load_obsid_list([3, 1, 3]) == [3, 1, 3]  # nothing dropped, order kept
    assert fdb.load_obsid_list((np.int64(5), "6")) == [5, 6]
    assert fdb.load_obsid_list(7) == [7]
    assert fdb.load_obsid_list(None) == []
    good = tmp_path / "obsids.txt"
    good.write_text("# my list\n60012\n\n  60013   # bad weather?\n60020\n")
    assert fdb.load_obsid_list(good) == [60012, 60013, 60020]
    assert fdb.load_obsid_list(str(good)) == [60012, 60013, 60020]
    bad = tmp_path / "bad.txt"
    bad.write_text("60012\n# ok\n\n600x3\n")
    with pytest.raises(ConfigError) as err:
        fdb.load_obsid_list(bad)
    assert str(err.value).startswith(f"{bad}: line 4: ")
    assert "600x3" in str(err.value)
    with pytest.raises(ConfigError, match="cannot read"):
        fdb.load_obsid_list(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="item 1"):
        fdb.load_obsid_list([1, True])
    with pytest.raises(ConfigError, match="item 0"):
        fdb.load_obsid_list([1.5])


# --------------------------------------------------------------------------------------------------
# quality flags and statistics
# --------------------------------------------------------------------------------------------------
def test_quality_flags_semantics(fdb):
    register(fdb, 1)  # pixels "1,2,3,20"
    fdb.upsert_observation(obs(2, pixels=None))
    # lazy: no rows, missing means good
    assert fdb.get_quality_flags(1) == {}
    assert fdb.is_good(1, 5, 0, 0) is True

    # "all feeds" from pixels, never the ground feed; default channels range(2)
    n = fdb.set_quality_flags(1, observer_ok=False, comment="Observer Flag: wind")
    flags = fdb.get_quality_flags(1)
    assert n == len(flags) == 3 * 4 * 2
    assert {k[0] for k in flags} == {1, 2, 3}
    assert {k[2] for k in flags} == {0, 1}
    assert all(not f.observer_ok and f.pipeline_ok and not f.is_good for f in flags.values())
    assert fdb.is_good(1, 2, 3, 1) is False
    assert fdb.is_good(1, GROUND_FEED, 0, 0) is True  # no row for the ground feed

    # no pixels attribute: the default science feeds (never GROUND_FEED)
    fdb.set_quality_flags(2, bands=[0], default_channels=[0, 1, 2], pipeline_ok=False)
    flags2 = fdb.get_quality_flags(2)
    assert {k[0] for k in flags2} == set(DEFAULT_SCIENCE_FEEDS) - {GROUND_FEED}
    assert {k[2] for k in flags2} == {0, 1, 2} and {k[1] for k in flags2} == {0}

    # channels default to those already present for the obsid
    fdb.update_quality_statistics(1, 1, 0, 5, {"n_spikes": 3})
    fdb.set_quality_flags(1, feeds=[1], bands=[0], pipeline_ok=False)
    flags = fdb.get_quality_flags(1)
    assert not flags[(1, 0, 5)].pipeline_ok and not flags[(1, 0, 0)].pipeline_ok
    assert (2, 0, 5) not in flags

    # resetting observer flags keeps pipeline_ok and recomputes is_good
    changed = fdb.reset_observer_flags()
    flags = fdb.get_quality_flags(1)
    assert changed == 24
    assert all(f.observer_ok for f in flags.values())
    assert all(f.is_good == f.pipeline_ok for f in flags.values())
    assert flags[(1, 0, 0)].is_good is False and flags[(2, 1, 1)].is_good is True
    assert all(f.comment is None for f in flags.values())  # observer comments cleared
    assert fdb.get_quality_flags(2)[(4, 0, 2)].is_good is False  # pipeline flag untouched
    # idempotent: nothing left to reset
    assert fdb.reset_observer_flags([1, 2]) == 0

    # setting observer flags again combines with pipeline_ok
    fdb.set_quality_flags(1, feeds=[1, 2], bands=[0], channels=[0], observer_ok=False)
    fdb.set_quality_flags(1, feeds=[2], bands=[0], channels=[0], observer_ok=True)
    flags = fdb.get_quality_flags(1)
    assert (flags[(1, 0, 0)].observer_ok, flags[(1, 0, 0)].is_good) == (False, False)
    assert (flags[(2, 0, 0)].observer_ok, flags[(2, 0, 0)].is_good) == (True, True)

    with pytest.raises(DatabaseError, match="obsid 99 is not registered"):
        fdb.set_quality_flags(99, observer_ok=False)


def test_quality_statistics(fdb):
    register(fdb, 1, 2)
    fdb.update_quality_statistics(
        1, 3, 2, 1, {"filtered_white_noise": np.float32(0.5), "unfiltered_fknee": float("nan"), "n_spikes": 4}
    )
    row = fdb.get_quality_flags(1)[(3, 2, 1)]
    assert row.filtered_white_noise == 0.5 and row.unfiltered_fknee is None and row.n_spikes == 4
    assert row.is_good and row.observer_ok and row.pipeline_ok
    # updating statistics leaves flags alone
    fdb.set_quality_flags(1, feeds=[3], bands=[2], channels=[1], pipeline_ok=False)
    fdb.update_quality_statistics(1, 3, 2, 1, {"n_spikes": 5})
    row = fdb.get_quality_flags(1)[(3, 2, 1)]
    assert row.n_spikes == 5 and row.filtered_white_noise == 0.5 and row.is_good is False

    n = fdb.bulk_update_quality_statistics(
        {"obsid": o, "feed": f, "band": 0, "channel": 0, "mean_atm_temp": 10.0 * f}
        for o in (1, 2)
        for f in (1, 2)
    )
    assert n == 4
    stats = fdb.query_statistics(["mean_atm_temp", "n_spikes"], source_group="Galactic", feed=[2])
    assert [(r["obsid"], r["feed"], r["mean_atm_temp"]) for r in stats] == [(1, 2, 20.0), (2, 2, 20.0)]
    assert set(stats[0]) == {
        "obsid",
        "source",
        "source_group",
        "mjd_start",
        "feed",
        "band",
        "channel",
        "mean_atm_temp",
        "n_spikes",
    }
    assert len(fdb.query_statistics("n_spikes", obsids=[1], is_good=False)) == 1
    assert len(fdb.query_statistics("n_spikes", min_obsid=2, band=0)) == 2

    with pytest.raises(ValueError, match="unknown column"):
        fdb.update_quality_statistics(1, 1, 0, 0, {"whit_noise": 1.0})
    with pytest.raises(ValueError, match="invalid element"):
        fdb.update_quality_statistics(1, 0, 0, 0, {"n_spikes": 1})
    with pytest.raises(DatabaseError, match="not registered"):
        fdb.update_quality_statistics(77, 1, 0, 0, {"n_spikes": 1})
    with pytest.raises(ValueError, match="unknown quality_flags column"):
        fdb.query_statistics(["nope"])
    with pytest.raises(TypeError, match="unknown filter"):
        fdb.query_statistics(["n_spikes"], colour="red")


def test_summaries_and_snapshot(fdb):
    register(fdb, 1, 2)
    fdb.upsert_observation(obs(3, source="TauA"))
    fdb.update_observation_summary(1, median_tsys=np.float64(42.0), n_scans=np.int32(7))
    fdb.update_observation_summary(3, calibrator_flux=300.0, processing_error="boom\nsecond line")
    rows = fdb.query_observation_summaries(min_obsid=1)
    assert [r["obsid"] for r in rows] == [1, 2, 3]
    assert rows[0]["median_tsys"] == 42.0 and rows[0]["n_scans"] == 7 and rows[0]["source"] == "GField30"
    assert rows[2]["processing_error"] == "boom"
    assert [r["obsid"] for r in fdb.query_observation_summaries(source="tau*")] == [3]
    assert [r["obsid"] for r in fdb.query_observation_summaries(processing_status=["pending"])] == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown column"):
        fdb.update_observation_summary(1, median_tys=1.0)
    with pytest.raises(DatabaseError, match="obsid 9 is not registered"):
        fdb.update_observation_summary(9, median_tsys=1.0)

    fdb.set_quality_flags(1, feeds=[1], bands=[0], channels=[0], observer_ok=False)
    fdb.replace_calibration_flux(
        1, [{"feed": 1, "band": 0, "channel": 0, "source": "TauA", "measured_flux": 1.0}]
    )
    claim(fdb, [1])
    snap = fdb.get_observation_snapshot(1)
    assert snap["observation"]["source"] == "GField30"
    assert snap["summary"]["median_tsys"] == 42.0 and snap["summary"]["processing_status"] == "running"
    assert [(f["feed"], f["is_good"]) for f in snap["quality_flags"]] == [(1, False)]
    assert [j["status"] for j in snap["jobs"]] == ["running"]
    assert snap["calibration_flux"][0]["measured_flux"] == 1.0
    pickle.dumps(snap)
    empty = fdb.get_observation_snapshot(12345)
    assert empty["observation"] is None and empty["jobs"] == []


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------
def _flux(feed, band, channel, **kw):
    row = dict(feed=feed, band=band, channel=channel, mjd=61100.2, source="TauA", frequency_ghz=27.5)
    row.update(measured_flux=350.0, flux_error=3.0, chi2=1.1, x_offset_deg=0.001, y_offset_deg=-0.002)
    row.update(kw)
    return row


def test_calibration_flux_and_models(fdb):
    fdb.upsert_observation(obs(1, source="TauA"))
    fdb.upsert_observation(obs(2, source="TauA"))
    assert fdb.replace_calibration_flux(1, [_flux(1, 0, 0), _flux(2, 0, 0), _flux(1, 1, 1)]) == 3
    assert fdb.replace_calibration_flux(1, [_flux(1, 0, 0, measured_flux=351.0), _flux(3, 0, 0)]) == 2
    fdb.replace_calibration_flux(2, [_flux(1, 0, 0, source="taua")])
    rows = fdb.query_calibration_flux("TauA")
    assert [(r.obsid, r.feed, r.measured_flux) for r in rows] == [(1, 1, 351.0), (1, 3, 350.0), (2, 1, 350.0)]
    assert all(isinstance(r, CalibrationFlux) and inspect(r).detached for r in rows)
    assert [r.feed for r in fdb.query_calibration_flux("TauA", feeds=[3])] == [3]
    assert [r.obsid for r in fdb.query_calibration_flux("TauA", min_obsid=2)] == [2]
    assert fdb.query_calibration_flux("CasA") == []
    with pytest.raises(ValueError, match="unknown column"):
        fdb.replace_calibration_flux(1, [_flux(1, 0, 0, flux=1.0)])

    model = dict(source="TauA", feed=1, band=0, channel=0, model_type="polynomial", fit_rms=0.01)
    model.update(poly_coeffs=np.array([1.0, 0.02]), mjd_min=61000.0, mjd_max=61200.0, n_observations=12)
    assert fdb.upsert_calibration_model([model, {**model, "source": "CasA", "poly_coeffs": [0.9]}]) == 2
    fdb.upsert_calibration_model([{**model, "poly_coeffs": [1.1, 0.0, 0.001]}])
    models = fdb.query_calibration_models("taua")
    assert len(models) == 1 and models[0].poly_coeffs == [1.1, 0.0, 0.001] and models[0].mjd_ref == 59000.0
    assert len(fdb.query_calibration_models()) == 2  # the key includes the source
    with pytest.raises(ValueError, match="model_type"):
        fdb.upsert_calibration_model([{**model, "model_type": "spline"}])


def test_load_calibration_table_contract(fdb, monkeypatch):
    """``load_calibration_table`` hands every model row of the source to ``from_rows``."""
    calls = []

    class FakeTable:
        @classmethod
        def from_rows(cls, source, rows):
            calls.append((source, list(rows)))
            return "table"

    monkeypatch.setitem(sys.modules, "utils.calibrators", types.SimpleNamespace(CalibrationTable=FakeTable))
    base = dict(
        model_type="mean", poly_coeffs=[1.05], n_observations=3, fit_rms=0.0, mjd_min=1.0, mjd_max=2.0
    )
    fdb.upsert_calibration_model(
        [
            {**base, "source": "TauA", "feed": 1, "band": 0, "channel": 0},
            {**base, "source": "TauA", "feed": 1, "band": 0, "channel": 1},
            {**base, "source": "CasA", "feed": 1, "band": 0, "channel": 0},
        ]
    )
    assert fdb.load_calibration_table("TauA") == "table"
    source, rows = calls[0]
    assert source == "TauA" and len(rows) == 2
    assert set(rows[0]) == {
        "feed",
        "band",
        "channel",
        "model_type",
        "poly_coeffs",
        "mjd_ref",
        "nearest_mjds",
        "nearest_gains",
        "mjd_min",
        "mjd_max",
        "fit_rms",
        "n_observations",
    }
    assert rows[1]["channel"] == 1 and rows[1]["poly_coeffs"] == [1.05]


def test_load_calibration_table_with_real_calibrators(fdb):
    calibrators = pytest.importorskip("utils.calibrators", reason="utils.calibrators not written yet")
    if not hasattr(calibrators, "CalibrationTable"):
        pytest.skip("utils.calibrators has no CalibrationTable yet")
    row = dict(source="TauA", feed=2, band=1, channel=0, model_type="polynomial", poly_coeffs=[1.05])
    row.update(mjd_ref=59000.0, mjd_min=61000.0, mjd_max=61200.0, fit_rms=0.0, n_observations=10)
    fdb.upsert_calibration_model([row])
    table = fdb.load_calibration_table("TauA")
    assert table.factor(2, 1, 0, 61100.0) == pytest.approx(1.05)


# --------------------------------------------------------------------------------------------------
# maintenance
# --------------------------------------------------------------------------------------------------
def test_level2_path_maintenance(fdb, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    (new / "a").mkdir(parents=True)
    register(fdb, 1, 2, 3, 4)
    for o in (1, 2, 3):
        (old / "a").mkdir(parents=True, exist_ok=True)
        path = old / "a" / f"L2_{o}.hd5"
        path.write_text("x")
        fdb.set_level2_path(o, path)
    (new / "a" / "L2_1.hd5").write_text("x")
    fdb.set_level2_path(4, tmp_path / "oldish" / "L2_4.hd5")  # shares the text prefix only

    dry = fdb.remap_level2_paths(str(old), str(new) + "/")
    assert (dry["matched"], dry["changed"], dry["skipped_missing"], dry["dry_run"]) == (3, 3, 0, True)
    assert dry["sample"][0] == (1, str(old / "a" / "L2_1.hd5"), str(new / "a" / "L2_1.hd5"))
    assert fdb.query_data(1).level2_path.startswith(str(old))
    res = fdb.remap_level2_paths(str(old), str(new), dry_run=False, require_new_path_exists=True)
    assert (res["matched"], res["changed"], res["skipped_missing"]) == (3, 1, 2)
    assert fdb.query_data(1).level2_path == str(new / "a" / "L2_1.hd5")
    assert fdb.query_data(2).level2_path == str(old / "a" / "L2_2.hd5")
    assert fdb.query_data(4).level2_path == str(tmp_path / "oldish" / "L2_4.hd5")

    # obsid 4's file never existed; obsid 3's disappears
    (old / "a" / "L2_3.hd5").unlink()
    fdb.update_quality_statistics(3, 1, 0, 0, {"n_spikes": 1})
    fdb.update_observation_summary(3, median_tsys=40.0, level2_created_utc=datetime.now(UTC))
    assert fdb.scrub_missing_level2_paths() == 2
    assert fdb.query_data(3).level2_path is None and fdb.query_data(4).level2_path is None
    assert fdb.query_data(2).level2_path is not None
    snap = fdb.get_observation_snapshot(3)
    assert snap["summary"]["median_tsys"] == 40.0 and snap["summary"]["level2_created_utc"] is None
    assert snap["quality_flags"][0]["n_spikes"] == 1
    fdb.replace_calibration_flux(3, [_flux(1, 0, 0)])
    fdb.clear_level2_info(3, clear_statistics=True)
    snap = fdb.get_observation_snapshot(3)
    assert snap["summary"]["median_tsys"] is None and snap["calibration_flux"] == []
    assert snap["quality_flags"][0]["n_spikes"] is None


def test_delete_observation(fdb, tmp_path):
    l1, l2 = tmp_path / "l1.hd5", tmp_path / "l2.hd5"
    l1.write_text("1")
    l2.write_text("2")
    fdb.upsert_observation(obs(1, level1_path=str(l1)))
    fdb.set_level2_path(1, l2)
    fdb.set_quality_flags(1, observer_ok=False)
    fdb.replace_calibration_flux(1, [_flux(1, 0, 0)])
    claim(fdb, [1])
    register(fdb, 2)
    assert fdb.delete_observation(1, delete_files=True) is True
    assert not l1.exists() and not l2.exists()
    snap = fdb.get_observation_snapshot(1)
    assert snap == {
        "obsid": 1,
        "observation": None,
        "summary": None,
        "quality_flags": [],
        "jobs": [],
        "calibration_flux": [],
    }
    assert fdb.query_all_obsids() == [2]
    assert fdb.delete_observation(1) is False


# --------------------------------------------------------------------------------------------------
# jobs (docs/operations.md#job-states)
# --------------------------------------------------------------------------------------------------
def _job(facade, obsid, stage="level2") -> ProcessingJob:
    (job,) = facade.job_table(stage, obsids=[obsid])
    return job


def test_job_lifecycle(fdb, caplog):
    register(fdb, 1, 2, 3)
    res = claim(fdb, [1, 2, 2, 3, 500])  # 500: job row without an observation (no FK)
    assert res.claimed == [1, 2, 3, 500] and res.counts()["busy"] == 0
    job = _job(fdb, 1)
    assert (job.status, job.attempts, job.run_id, job.host, job.pid) == (
        "running",
        1,
        "run-A",
        HOST,
        os.getpid(),
    )
    assert job.code_version == "v1" and job.started_utc.tzinfo is not None
    assert fdb.get_observation_snapshot(1)["summary"]["processing_status"] == "running"

    # same run claiming again: already ours, attempts unchanged
    assert claim(fdb, [1]).claimed == [1] and _job(fdb, 1).attempts == 1

    # done -> mirrored as complete
    fdb.finish_job(1, "level2", "done", last_module="FinalizeLevel2Metadata")
    job = _job(fdb, 1)
    assert (job.status, job.error, job.last_module) == ("done", None, "FinalizeLevel2Metadata")
    assert job.finished_utc is not None
    summary = fdb.get_observation_snapshot(1)["summary"]
    assert (summary["processing_status"], summary["processing_error"]) == ("complete", None)

    # failed, first line only, mirrored
    fdb.finish_job(
        2, "level2", "failed", error="SystemTemperature: no vane event\nTraceback...", last_module="X"
    )
    job = _job(fdb, 2)
    assert (job.status, job.error, job.last_module) == ("failed", "SystemTemperature: no vane event", "X")
    summary = fdb.get_observation_snapshot(2)["summary"]
    assert summary["processing_status"] == "failed"
    assert summary["processing_error"] == "SystemTemperature: no vane event"

    # a later run: done skipped, failed skipped, running job of a live run busy
    res = claim(fdb, [1, 2, 3], run_id="run-B")
    assert (res.claimed, res.skipped_done, res.skipped_failed, res.busy) == ([], [1], [2], [3])
    # retry_failed claims the failed job; force claims done too, but never a live running job
    res = claim(fdb, [1, 2, 3], run_id="run-B", retry_failed=True)
    assert (res.claimed, res.skipped_done, res.busy) == ([2], [1], [3])
    assert _job(fdb, 2).attempts == 2 and _job(fdb, 2).error is None
    res = claim(fdb, [1, 3], run_id="run-C", force=True)
    assert (res.claimed, res.busy) == ([1], [3])
    assert _job(fdb, 1).attempts == 2 and _job(fdb, 1).run_id == "run-C"

    # heartbeat
    before = _job(fdb, 3).updated_utc
    assert fdb.touch_job(3, "level2", "run-A") is True
    assert fdb.touch_job(3, "level2", "run-B") is False
    assert _job(fdb, 3).updated_utc >= before

    # release (Ctrl-C) and reset_failed
    assert fdb.release_jobs("run-A") == 2  # obsids 3 and 500
    assert _job(fdb, 3).status == "pending"
    assert fdb.get_observation_snapshot(3)["summary"]["processing_status"] == "pending"
    assert [j.obsid for j in fdb.job_table("level2", status="running")] == [1, 2]
    fdb.finish_job(2, "level2", "failed", error="boom")
    fdb.finish_job(3, "level2", "failed", error="boom")
    assert fdb.reset_failed("level2", obsids=[3]) == 1
    assert _job(fdb, 2).status == "failed" and _job(fdb, 3).status == "pending"
    assert fdb.reset_failed("level2") == 1
    assert _job(fdb, 2).error is None
    assert fdb.get_observation_snapshot(2)["summary"]["processing_status"] == "pending"

    # job filters of the selector
    assert [o.obsid for o in fdb.query_observations(job_status="running")] == [1]
    assert [o.obsid for o in fdb.get_unprocessed_files()] == [1, 2, 3]
    fdb.finish_job(1, "level2", "done")
    assert [o.obsid for o in fdb.get_unprocessed_files()] == [2, 3]
    register(fdb, 4)  # no job row counts as pending
    assert [o.obsid for o in fdb.query_observations(job_status="pending")] == [2, 3, 4]
    assert [o.obsid for o in fdb.query_observations(job_stage="level2")] == [1, 2, 3]

    with pytest.raises(ValueError, match="status"):
        fdb.finish_job(1, "level2", "complete")


def test_stale_jobs_are_reclaimed(fdb, caplog):
    register(fdb, 1, 2, 3, 4)
    gone = dead_pid()
    claim(fdb, [1], run_id="crashed", pid=gone)  # dead pid on this host
    claim(fdb, [2], run_id="elsewhere", pid=gone, host="other-host")  # cannot check a remote pid
    claim(fdb, [3], run_id="old", pid=os.getpid())  # alive, but silent for too long
    with fdb.session() as s:
        s.execute(
            update(ProcessingJob)
            .where(ProcessingJob.obsid == 3)
            .values(updated_utc=datetime.now(UTC) - timedelta(hours=7))
        )
    caplog.set_level(logging.WARNING, logger="comap.db")
    res = claim(fdb, [1, 2, 3], run_id="new")
    assert sorted(res.claimed) == [1, 3] and res.busy == [2]
    assert sorted(res.reclaimed_stale) == [1, 3]
    assert "reclaiming stale level2 job of obsid 1" in caplog.text and "not alive" in caplog.text
    assert _job(fdb, 1).attempts == 2 and _job(fdb, 1).run_id == "new" and _job(fdb, 1).pid == os.getpid()
    # the remote job becomes stale only by age
    res = claim(fdb, [2], run_id="new", stale_after_s=0)
    assert res.claimed == [2] and res.reclaimed_stale == [2]


def test_claim_jobs_not_deferrable(fdb):
    fdb.set_deferred(True)
    try:
        with pytest.raises(DatabaseError, match="deferred"):
            claim(fdb, [1])
    finally:
        fdb.set_deferred(False)


# --------------------------------------------------------------------------------------------------
# deferred writes and apply (docs/database.md#single-writer-and-deferred-writes)
# --------------------------------------------------------------------------------------------------
def test_deferred_round_trip_through_pickle(fdb):
    register(fdb, 1)
    claim(fdb, [1])
    assert fdb.set_deferred(True) is False
    assert fdb.deferred
    assert fdb.upsert_observation(COMAPData(obsid=1, level1_size_bytes=123)) is None
    assert fdb.update_observation_summary(1, median_tsys=41.0) is None
    fdb.bulk_update_quality_statistics(
        {"obsid": 1, "feed": f, "band": 0, "channel": 0, "n_spikes": f}
        for f in (1, 2)  # generator
    )
    fdb.set_quality_flags(1, feeds=[2], pipeline_ok=False)
    fdb.replace_calibration_flux(1, [_flux(1, 0, 0)])
    assert fdb.query_data(1).level1_size_bytes is None  # nothing written yet
    assert fdb.get_quality_flags(1) == {}
    ops = fdb.take_deferred()
    assert fdb.take_deferred() == []
    assert [op.name for op in ops] == [
        "upsert_observation",
        "update_observation_summary",
        "bulk_update_quality_statistics",
        "set_quality_flags",
        "replace_calibration_flux",
    ]
    assert all(isinstance(op, DbOp) for op in ops)
    shipped = pickle.loads(pickle.dumps(ops))  # what a worker returns to the coordinator
    assert fdb.set_deferred(False) is True

    results = fdb.apply(
        shipped, job=dict(obsid=1, stage="level2", status="done", error=None, last_module="Finalize")
    )
    assert results[2] == 2 and results[4] == 1
    assert fdb.query_data(1).level1_size_bytes == 123
    flags = fdb.get_quality_flags(1)
    assert flags[(1, 0, 0)].n_spikes == 1 and flags[(2, 0, 0)].is_good is False
    snap = fdb.get_observation_snapshot(1)
    assert snap["summary"]["median_tsys"] == 41.0 and snap["summary"]["processing_status"] == "complete"
    assert snap["jobs"][0]["status"] == "done" and snap["jobs"][0]["last_module"] == "Finalize"
    assert len(snap["calibration_flux"]) == 1


def test_deferring_context_and_apply_in_deferred_mode(fdb):
    register(fdb, 1)
    with fdb.deferring() as ops:
        fdb.update_observation_summary(1, n_scans=3)
        fdb.finish_job(1, "level2", "failed", error="x")
    assert not fdb.deferred and len(ops) == 2
    fdb.set_deferred(True)
    try:
        assert fdb.apply(ops[:1], job=dict(obsid=1, stage="level2", status="done")) == []
        recorded = fdb.take_deferred()
        assert [op.name for op in recorded] == ["update_observation_summary", "finish_job"]
    finally:
        fdb.set_deferred(False)
    assert fdb.get_observation_snapshot(1)["jobs"] == []


def test_apply_is_one_transaction(fdb):
    register(fdb, 1)
    claim(fdb, [1])
    good = [
        DbOp("upsert_observation", ({"obsid": 10, "source": "TauA"},)),
        DbOp("update_observation_summary", (1,), {"median_tsys": 50.0}),
    ]
    job = dict(obsid=1, stage="level2", status="done")
    with pytest.raises(DatabaseError, match="obsid 999 is not registered"):
        fdb.apply([*good, DbOp("set_quality_flags", (999,), {"observer_ok": False})], job=job)
    with pytest.raises(ValueError, match="unknown column"):
        fdb.apply([*good, DbOp("update_quality_statistics", (1, 1, 0, 0, {"bogus": 1}))], job=job)
    with pytest.raises(ValueError, match="not a deferrable"):
        fdb.apply([*good, DbOp("claim_jobs", ([1], "level2"))])
    # nothing of the failed batches is visible
    assert not fdb.obsid_exists(10)
    snap = fdb.get_observation_snapshot(1)
    assert snap["summary"]["median_tsys"] is None
    assert snap["jobs"][0]["status"] == "running"
    # the failure record can then be written on its own
    fdb.finish_job(1, "level2", "failed", error="set_quality_flags failed")
    assert _job(fdb, 1).status == "failed"


def test_session_groups_facade_writes(fdb):
    register(fdb, 1)
    with pytest.raises(RuntimeError):
        with fdb.session():
            fdb.upsert_observation(obs(2))
            fdb.set_quality_flags(2, observer_ok=False)
            assert fdb.obsid_exists(2)  # reads inside see the transaction's own writes
            raise RuntimeError("abort")
    assert not fdb.obsid_exists(2)
    with fdb.session() as s:
        fdb.reset_observer_flags()
        fdb.set_quality_flags(1, feeds=[1], observer_ok=False)
        s.add(
            QualityFlag(obsid=1, feed=9, band=0, channel=0, observer_ok=True, pipeline_ok=True, is_good=True)
        )
    assert len(fdb.get_quality_flags(1)) == 4 * 2 + 1


# --------------------------------------------------------------------------------------------------
# locking: retry with backoff, then DatabaseError
# --------------------------------------------------------------------------------------------------
def test_locked_writes_retry_with_backoff(dbfile, monkeypatch):
    monkeypatch.setenv("COMAP_SQLITE_BUSY_TIMEOUT_S", "0.01")
    facade = SQLModule().connect(dbfile)
    blocker = sqlite3.connect(dbfile, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        delays = []
        monkeypatch.setattr(SQL_ENGINE, "_sleep", delays.append)
        with pytest.raises(DatabaseError) as err:
            facade.upsert_observation(obs(1))
        assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
        assert "database is locked after 5 retries" in str(err.value) and "\n" not in str(err.value)

        def release_on_second_retry(delay):
            delays.append(delay)
            if len(delays) == 2:
                blocker.execute("COMMIT")

        delays.clear()
        monkeypatch.setattr(SQL_ENGINE, "_sleep", release_on_second_retry)
        facade.upsert_observation(obs(1))
        assert delays == [0.5, 1.0] and facade.obsid_exists(1)
    finally:
        blocker.close()
        facade.disconnect()


# --------------------------------------------------------------------------------------------------
# two processes writing at the same time
# --------------------------------------------------------------------------------------------------
N_CONCURRENT = 60


def _concurrent_writer(path: str, start: int, barrier, queue) -> None:
    """Spawned worker: many small upserts through its own facade."""
    from modules.SQLModule.SQLModule import SQLModule as Facade

    try:
        facade = Facade().connect(path)
        barrier.wait(timeout=60)
        for i in range(N_CONCURRENT):
            obsid = start + i
            facade.upsert_observation(
                {"obsid": obsid, "source": "GField30", "utc_start": "2026-03-01-04:15:00"}
            )
            facade.update_quality_statistics(obsid, 1 + i % 19, i % 4, 0, {"n_spikes": i})
            if i % 10 == 0:
                facade.query_observations(min_obsid=start)
        facade.disconnect()
        queue.put(("ok", start))
    except BaseException as exc:  # report everything to the parent
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def test_two_processes_write_concurrently(db_url):
    SQLModule().connect(db_url).disconnect()  # create the schema first
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_writer, args=(str(db_url), s, barrier, queue)) for s in (1000, 2000)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert outcomes and all(status == "ok" for status, _ in outcomes), outcomes
    assert all(p.exitcode == 0 for p in procs)
    facade = SQLModule().connect(db_url)
    try:
        expected = list(range(1000, 1000 + N_CONCURRENT)) + list(range(2000, 2000 + N_CONCURRENT))
        assert facade.query_all_obsids() == expected
        stats = facade.query_statistics("n_spikes")
        assert len(stats) == 2 * N_CONCURRENT
        assert sorted(r["n_spikes"] for r in stats) == sorted(list(range(N_CONCURRENT)) * 2)
        if facade.engine.dialect.name == "sqlite":
            with facade.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        summaries = facade.query_observation_summaries()
        assert len(summaries) == 2 * N_CONCURRENT
    finally:
        facade.disconnect()


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------
def test_mjd_and_utc_datetimes(fdb):
    assert mjd_from_utc_start("1858-11-17-00:00:00") == 0.0
    assert mjd_from_utc_start("2000-01-01-12:00:00") == pytest.approx(51544.5)
    with pytest.raises(ValueError):
        mjd_from_utc_start("2026-03-01T04:15:00")
    register(fdb, 1)
    naive = datetime(2026, 3, 1, 12, 0, 0)
    fdb.update_observation_summary(1, level2_created_utc=naive)
    value = fdb.get_observation_snapshot(1)["summary"]["level2_created_utc"]
    assert value == naive.replace(tzinfo=UTC)
    with fdb.session(write=False) as s:
        assert s.scalar(select(COMAPData.mjd_start)) == pytest.approx(61100.177083333)
    assert not math.isnan(fdb.query_data(1).mjd_start)
