"""Tests of the legacy → version-1 migration (docs/database.md#migration)."""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.exc import OperationalError

from modules.SQLModule.migrate import LEGACY_TABLES, main, migrate
from modules.SQLModule.SQLModule import SQLModule, mjd_from_utc_start
from utils.errors import DatabaseError

MIGRATE = sys.modules["modules.SQLModule.migrate"]

STATS = (
    "filtered_white_noise, filtered_red_noise, filtered_noise_index, filtered_auto_rms, filtered_fknee, "
    "unfiltered_white_noise, unfiltered_red_noise, unfiltered_noise_index, unfiltered_auto_rms, "
    "unfiltered_fknee, n_spikes, n_nan_values, mean_atm_temp"
)
STAT_COLS = ", ".join(
    f"{c.strip()} {'INTEGER' if c.strip().startswith('n_') else 'FLOAT'}" for c in STATS.split(",")
)

LEGACY_SCHEMA = f"""
CREATE TABLE comap_data (
    obsid INTEGER PRIMARY KEY, level1_path VARCHAR, level2_path VARCHAR, source VARCHAR,
    source_group VARCHAR, utc_start VARCHAR, comment TEXT, telescope VARCHAR, instrument VARCHAR,
    platform VARCHAR, pixels VARCHAR, version VARCHAR, bof VARCHAR, bw FLOAT, tsamp FLOAT,
    coeff_iq INTEGER, features INTEGER, fft_shift INTEGER, iqcalid INTEGER, level INTEGER,
    nbit INTEGER, nchan INTEGER, nint INTEGER, legacy_flag INTEGER);
CREATE INDEX ix_comap_data_source ON comap_data (source);
CREATE INDEX ix_comap_data_source_group ON comap_data (source_group);
CREATE TABLE observation_summary (
    obsid INTEGER PRIMARY KEY REFERENCES comap_data (obsid), processing_status VARCHAR,
    median_tsys FLOAT, mean_tau FLOAT, calibrator_flux FLOAT, calibrator_flux_error FLOAT,
    calibrator_chi2 FLOAT, pointing_offset_az FLOAT, pointing_offset_el FLOAT,
    pointing_offset_ra FLOAT, pointing_offset_dec FLOAT, n_scans INTEGER, last_updated DATETIME);
CREATE TABLE quality_flags (
    id INTEGER PRIMARY KEY, obsid INTEGER REFERENCES comap_data (obsid), pixel INTEGER,
    frequency_band INTEGER, is_good BOOLEAN, comment TEXT, {STAT_COLS});
CREATE INDEX ix_quality_flags_obsid ON quality_flags (obsid);
CREATE TABLE calibration_flux (
    id INTEGER PRIMARY KEY, obsid INTEGER REFERENCES comap_data (obsid), pixel INTEGER,
    frequency_band INTEGER, mjd FLOAT, source VARCHAR, measured_flux FLOAT, flux_error FLOAT,
    amplitude FLOAT, amplitude_error FLOAT, chi2 FLOAT, x_offset FLOAT, y_offset FLOAT);
CREATE TABLE calibration_model_fit (
    id INTEGER PRIMARY KEY, pixel INTEGER, frequency_band INTEGER, model_type VARCHAR,
    poly_coeffs TEXT, mjd_ref FLOAT, nearest_mjds TEXT, nearest_gains TEXT, fit_rms FLOAT,
    n_observations INTEGER, mjd_min FLOAT, mjd_max FLOAT,
    UNIQUE (pixel, frequency_band));
CREATE TABLE old_path_data (obsid INTEGER PRIMARY KEY, old_level1_path VARCHAR, old_level2_path VARCHAR);
"""

# central_freqs[ifeed, band, channel] of the level-2 file of obsid 1001 (feeds 1, 2, 3).
CENTRAL = np.arange(3 * 4 * 2, dtype=np.float64).reshape(3, 4, 2) * 0.25 + 26.0


def _stats(**kw) -> tuple:
    names = [c.strip() for c in STATS.split(",")]
    return tuple(kw.get(n) for n in names)


@pytest.fixture
def legacy(tmp_path) -> Path:
    """A synthetic legacy database (and one readable level-2 file)."""
    l2 = tmp_path / "Level2_comap-0001001.hd5"
    with h5py.File(l2, "w") as f:
        f["level2/central_freqs"] = CENTRAL
        f["spectrometer/feeds"] = np.array([1, 2, 3], dtype=np.int32)
    path = tmp_path / "legacy.db"
    con = sqlite3.connect(path)
    con.executescript(LEGACY_SCHEMA)
    obs = [
        (1001, "/l1/1001.hd5", str(l2), "GField30, x", "Galactic", "2026-03-01-04:15:00", "", "1,2,3,20"),
        (
            1002,
            "/l1/1002.hd5",
            str(tmp_path / "missing.hd5"),
            "Cosmos",
            "CO",
            "2026-03-02-00:00:00",
            "",
            None,
        ),
        (1003, "/l1/1003.hd5", None, "TauA", "Calibrator", "bad-date", "sky nod", None),
    ]
    con.executemany(
        "INSERT INTO comap_data (obsid, level1_path, level2_path, source, source_group, utc_start, comment, "
        "pixels, nchan, legacy_flag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1024, 1)",
        obs,
    )
    con.executemany(
        "INSERT INTO observation_summary (obsid, processing_status, median_tsys, n_scans, last_updated) "
        "VALUES (?, ?, ?, ?, '2024-01-01 00:00:00')",
        [(1001, "complete", 40.0, 5), (1002, "processing", None, None), (9999, "complete", 1.0, 1)],
    )
    marks = ", ".join("?" * 18)
    q = f"INSERT INTO quality_flags (obsid, pixel, frequency_band, is_good, comment, {STATS}) "
    q += f"VALUES ({marks})"
    rows = [
        (1001, 2, 5, 1, None, *_stats(filtered_white_noise=0.1, n_spikes=3)),  # -> feed 2 band 2 ch 1
        (1001, 1, 0, 0, "bad", *_stats(mean_atm_temp=12.0)),  # -> feed 1 band 0 ch 0 (flags reset)
        (1001, 2, 5, 1, None, *_stats(n_spikes=9)),  # duplicate -> dropped
        (1001, 20, 0, 1, None, *_stats(n_spikes=1)),  # ground feed -> dropped
        (1001, 3, 8, 1, None, *_stats(n_spikes=1)),  # flat band out of range -> dropped
        (1002, 4, 7, 1, None, *_stats(unfiltered_fknee=0.5)),  # -> feed 4 band 3 ch 1
        (5555, 1, 0, 1, None, *_stats(n_spikes=1)),  # orphan -> dropped
    ]
    rows += [(1001, p, fb, 1, None, *_stats()) for p in (5, 6) for fb in range(8)]  # defaults: 16
    rows += [(1002, 7, b, 0, "Observer Flag: wind", *_stats()) for b in range(4)]  # observer: 4
    con.executemany(q, rows)
    con.executemany(
        "INSERT INTO calibration_flux (obsid, pixel, frequency_band, mjd, source, measured_flux, "
        "flux_error, amplitude, amplitude_error, chi2, x_offset, y_offset) "
        "VALUES (?, ?, ?, ?, 'TauA', ?, 1, 2, 0.1, 1.0, ?, ?)",
        [
            (1001, 2, 5, 61100.2, 350.0, 0.01, -0.02),  # freq from CENTRAL[1, 2, 1]
            (1001, 3, 0, 61100.2, 351.0, 0.0, 0.0),  # freq from CENTRAL[2, 0, 0]
            (1002, 1, 0, 61101.0, 349.0, 0.0, 0.0),  # level-2 file missing -> NULL + warning
            (4242, 1, 0, 61101.0, 349.0, 0.0, 0.0),  # orphan -> dropped
        ],
    )
    con.executemany(
        "INSERT INTO calibration_model_fit (pixel, frequency_band, model_type, poly_coeffs, mjd_ref, "
        "nearest_mjds, nearest_gains, fit_rms, n_observations, mjd_min, mjd_max) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0.01, 12, 1, 2)",
        [
            (3, 7, "polynomial", "[1.0, 0.01]", 59000.0, None, None),  # -> feed 3 band 3 ch 1
            (1, 0, "nearest", None, None, "[61000.0, 61010.0]", "[1.0, 1.1]"),
            (2, 2, "cubic", "[1.0]", 59000.0, None, None),  # unknown model type -> dropped
        ],
    )
    con.executemany(
        "INSERT INTO old_path_data VALUES (?, ?, ?)", [(1001, "/old/a", "/old/b"), (1002, "/o", "/p")]
    )
    con.commit()
    con.close()
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tables(path: Path) -> set[str]:
    con = sqlite3.connect(path)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


def test_legacy_database_is_refused_by_connect(legacy):
    with pytest.raises(DatabaseError, match="schema version legacy, expected 1; run: python -m modules"):
        SQLModule().connect(legacy)


def test_dry_run_reports_and_writes_nothing(legacy, capsys):
    before = _sha(legacy)
    assert main([str(legacy), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DRY RUN (nothing written): migration of")
    assert _sha(legacy) == before
    assert not list(legacy.parent.glob("*.bak-*"))
    report = migrate(legacy, dry_run=True)
    _check_counts(report)
    assert _sha(legacy) == before


def _check_counts(report) -> None:
    t = report.tables
    assert (t["comap_data"].legacy_rows, t["comap_data"].written) == (3, 3)
    assert (t["observation_summary"].legacy_rows, t["observation_summary"].written) == (3, 2)
    assert t["observation_summary"].dropped == {"obsid not in comap_data": 1}
    qf = t["quality_flags"]
    assert (qf.legacy_rows, qf.written, qf.mapped) == (27, 3, 3)
    assert qf.dropped == {
        "no statistic (default or observer-flag row)": 20,
        "duplicate (obsid, pixel, frequency_band)": 1,
        "pixel or flat band out of range": 2,
        "obsid not in comap_data": 1,
    }
    cf = t["calibration_flux"]
    assert (cf.legacy_rows, cf.written, cf.mapped, cf.dropped) == (4, 3, 3, {"obsid not in comap_data": 1})
    cm = t["calibration_model_fit"]
    assert (cm.legacy_rows, cm.written, cm.dropped) == (3, 2, {"unknown model_type": 1})
    assert t["old_path_data"].dropped == {"table dropped": 2}
    assert any("frequency_ghz left NULL for 1 row(s)" in w and "obsid 1002" in w for w in report.warnings)
    assert any("ObserverFlags" in n for n in report.notes)


def test_migration_of_a_synthetic_legacy_database(legacy, capsys):
    original = legacy.read_bytes()
    assert main([str(legacy)]) == 0
    out = capsys.readouterr().out
    assert "legacy -> schema version 1" in out and "re-run ObserverFlags" in out
    assert "WARNING: calibration_flux: obsid 1002" in out

    backups = list(legacy.parent.glob("legacy.db.bak-*"))
    assert len(backups) == 1
    assert _tables(backups[0]) == _tables_of_bytes(original, legacy.parent / "orig.db")
    assert "schema_info" not in _tables(backups[0])
    assert not any(name.startswith("_legacy_") or name == "old_path_data" for name in _tables(legacy))

    db = SQLModule().connect(legacy)
    try:
        assert db.schema_version() == 1
        obs = {o.obsid: o for o in db.query_observations()}
        assert sorted(obs) == [1001, 1002, 1003]
        assert obs[1001].mjd_start == pytest.approx(mjd_from_utc_start("2026-03-01-04:15:00"))
        assert obs[1003].mjd_start is None
        assert (obs[1001].source, obs[1001].source_group) == ("GField30", "Galactic")
        assert obs[1002].source_group == "Other"  # legacy "CO" substring bug fixed
        assert obs[1003].source_group == "SkyDip"
        assert obs[1001].nchan == 1024 and obs[1001].pixels == "1,2,3,20"

        summaries = {r["obsid"]: r for r in db.query_observation_summaries()}
        assert summaries[1001]["processing_status"] == "complete" and summaries[1001]["median_tsys"] == 40.0
        assert summaries[1001]["n_scans"] == 5
        assert summaries[1002]["processing_status"] == "pending"
        assert summaries[1003]["processing_status"] == "pending"  # created for an obs without summary

        flags = db.get_quality_flags(1001)
        assert sorted(flags) == [(1, 0, 0), (2, 2, 1)]
        assert flags[(2, 2, 1)].filtered_white_noise == 0.1 and flags[(2, 2, 1)].n_spikes == 3
        assert flags[(1, 0, 0)].mean_atm_temp == 12.0
        assert all(
            f.is_good and f.observer_ok and f.pipeline_ok and f.comment is None for f in flags.values()
        )
        assert sorted(db.get_quality_flags(1002)) == [(4, 3, 1)]  # observer rows not carried
        assert db.is_good(1002, 7, 0, 0) is True

        flux = db.query_calibration_flux("TauA")
        assert [(r.obsid, r.feed, r.band, r.channel) for r in flux] == [
            (1001, 2, 2, 1),
            (1001, 3, 0, 0),
            (1002, 1, 0, 0),
        ]
        assert flux[0].frequency_ghz == CENTRAL[1, 2, 1] and flux[1].frequency_ghz == CENTRAL[2, 0, 0]
        assert flux[2].frequency_ghz is None
        assert (flux[0].x_offset_deg, flux[0].y_offset_deg) == (0.01, -0.02)

        models = {(m.feed, m.band, m.channel): m for m in db.query_calibration_models("TauA")}
        assert sorted(models) == [(1, 0, 0), (3, 3, 1)]
        assert models[(3, 3, 1)].poly_coeffs == [1.0, 0.01] and models[(3, 3, 1)].model_type == "polynomial"
        assert models[(1, 0, 0)].nearest_gains == [1.0, 1.1] and models[(1, 0, 0)].mjd_ref == 59000.0
        assert db.job_table(None) == []
        # the migrated database is fully usable
        db.set_quality_flags(1001, feeds=[1], observer_ok=False)
        assert db.is_good(1001, 1, 0, 0) is False
    finally:
        db.disconnect()

    # a second run has nothing to do
    assert main([str(legacy)]) == 0
    assert "already has schema version 1; nothing to do" in capsys.readouterr().out
    assert len(list(legacy.parent.glob("legacy.db.bak-*"))) == 1


def _tables_of_bytes(data: bytes, path: Path) -> set[str]:
    path.write_bytes(data)
    return _tables(path)


def test_failed_migration_rolls_back(legacy, monkeypatch):
    def boom(*args, **kwargs):
        raise OperationalError("INSERT ...", {}, Exception("disk I/O error"))

    monkeypatch.setattr(MIGRATE, "_copy_models", boom)
    before = _tables(legacy)
    with pytest.raises(DatabaseError, match="migration failed and was rolled back: disk I/O error"):
        migrate(legacy)
    assert _tables(legacy) == before  # renames, new tables and copies all undone
    assert len(list(legacy.parent.glob("legacy.db.bak-*"))) == 1  # the backup stays


def test_nothing_to_migrate_and_errors(tmp_path, capsys):
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert migrate(empty).state == "empty"
    assert main([str(tmp_path / "missing.db")]) == 3
    assert "does not exist" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["mysql://u:secret@localhost/x"]) == 2  # no automatic backup there
    assert "secret" not in capsys.readouterr().err
    unknown = tmp_path / "v7.db"
    con = sqlite3.connect(unknown)
    con.execute("CREATE TABLE schema_info (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO schema_info VALUES ('schema_version', '7')")
    con.commit()
    con.close()
    with pytest.raises(DatabaseError, match="schema version '7'"):
        migrate(unknown)


def _copy_to(legacy: Path, url: str) -> None:
    """Copy the legacy SQLite database table by table into the (empty) database at ``url``."""
    src = create_engine(f"sqlite:///{legacy}")
    dst = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(src)
        for table in meta.tables.values():
            for column in table.columns:
                column.type = column.type.as_generic()  # DATETIME -> TIMESTAMP etc.
            for fk in list(table.foreign_key_constraints):  # SQLite did not enforce them: orphans
                table.constraints.discard(fk)
        meta.create_all(dst)
        with src.connect() as s, dst.begin() as d:
            for table in meta.sorted_tables:
                rows = [dict(r._mapping) for r in s.execute(table.select())]
                if rows:
                    d.execute(table.insert(), rows)
    finally:
        src.dispose()
        dst.dispose()


def test_migration_of_a_legacy_postgresql_database(legacy, pg_url, capsys):
    """The same legacy database on the PostgreSQL server: the same report; the legacy tables are
    kept in a schema of their own as the backup; the result is usable and at the head revision."""
    _copy_to(legacy, pg_url)
    with pytest.raises(DatabaseError, match="schema version legacy"):
        SQLModule().connect(pg_url)
    report = migrate(pg_url)
    _check_counts(report)
    keep = report.backup.rsplit(" ", 1)[1]
    assert keep.startswith("comap_legacy_")
    engine = create_engine(pg_url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names(schema=keep)) == set(LEGACY_TABLES)
        assert not any(n.startswith("_legacy_") or n == "old_path_data" for n in insp.get_table_names())
        with engine.connect() as conn:
            assert conn.execute(text(f'SELECT count(*) FROM "{keep}".quality_flags')).scalar() == 27
    finally:
        engine.dispose()
    db = SQLModule().connect(pg_url, create=False)
    try:
        assert db.schema_version() == 1
        assert db.query_all_obsids() == [1001, 1002, 1003]
        assert sorted(db.get_quality_flags(1001)) == [(1, 0, 0), (2, 2, 1)]
        assert [m.poly_coeffs for m in db.query_calibration_models("TauA") if m.feed == 3] == [[1.0, 0.01]]
        db.set_quality_flags(1001, feeds=[1], observer_ok=False)
        assert db.is_good(1001, 1, 0, 0) is False
    finally:
        db.disconnect()
    assert main([pg_url]) == 0
    assert "already has schema version 1; nothing to do" in capsys.readouterr().out
