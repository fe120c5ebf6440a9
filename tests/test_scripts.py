"""Query scripts of docs/database.md#query-scripts on a small database built by the test (direct ``db``
calls).

Each script is checked for its output rows, and its dry-run / read-only modes for leaving the
database byte-identical. Exit codes: 0 success, 2 usage, 3 database unreachable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from modules.scripts import (
    db_overview,
    export_paths,
    merge_databases,
    query_statistics,
    query_target,
    reconcile_level2_inventory,
    remap_level2_paths,
)
from modules.SQLModule.SQLModule import db

REPO = Path(__file__).resolve().parents[1]

# obsid: (source, comment, level-2 state)
OBSERVATIONS = {
    60001: ("TauA", "", "done"),
    60002: ("TauA", "", "done"),
    60003: ("SkyDip", "sky nod", "done"),
    60004: ("GField30", "", "done"),
    60005: ("GField30", "", "missing-file"),
    60006: ("co2", "", "failed"),
    60007: ("GField30", "", None),
}


def write_level2(path: Path, obsid: int, ra: float, dec: float, *, complete: bool = True) -> Path:
    """A minimal published level-2 file: format version, obsid and pixel pointing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["obsid"] = obsid
        f.attrs["level2_format_version"] = 1
        g = f.create_group("spectrometer/pixel_pointing")
        n = 400
        # RA straddles 0°: the first half of the samples at ra - 1, the second at ra + 1 (mod 360)
        ras = np.where(np.arange(n) < n // 2, ra - 1.0, ra + 1.0) % 360.0
        g.create_dataset("pixel_ra", data=np.tile(ras, (2, 1)))
        g.create_dataset("pixel_dec", data=np.full((2, n), dec))
        g.attrs["status"] = "complete" if complete else "running"
    return path


def build_script_db(root: Path) -> Path:
    """The test database: 7 observations of 4 source groups with jobs, summaries, statistics,
    flags, calibrator fluxes and a calibration model; level-1 stand-ins and level-2 files on disk."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "db.sqlite"
    db.connect(str(path))
    for i, (obsid, (source, comment, state)) in enumerate(OBSERVATIONS.items()):
        l1 = root / "level1" / "2026-03" / f"comap-{obsid:07d}-2026-03-0{1 + i % 3}-000000.hd5"
        l1.parent.mkdir(parents=True, exist_ok=True)
        l1.write_bytes(b"\0" * (1000 * (i + 1)))
        row = {
            "obsid": obsid,
            "source": source,
            "comment": comment,
            "utc_start": f"2026-03-0{1 + i % 3}-0{i}:00:00",
            "level1_path": str(l1),
            "level1_size_bytes": 1000 * (i + 1),
            "pixels": "1,2,3,20",
        }
        db.upsert_observation(row)
        if state == "done":
            l2 = write_level2(
                root / "level2" / f"Level2_{l1.name}", obsid, ra=0.0 if obsid == 60004 else 84.0, dec=22.0
            )
            db.set_level2_path(obsid, str(l2))
            db.finish_job(obsid, "level2", "done", last_module="FinalizeLevel2Metadata")
        elif state == "missing-file":
            db.set_level2_path(obsid, str(root / "level2" / "gone.hd5"))
            db.finish_job(obsid, "level2", "done")
        elif state == "failed":
            db.finish_job(
                obsid, "level2", "failed", error="FindScans: no scans found", last_module="FindScans"
            )
    db.finish_job(60099, "download", "failed", error="rsync exit 10: connection refused")
    for obsid, tsys, tau in ((60001, 40.0, 10.0), (60002, 44.0, 12.0), (60004, 42.0, 11.0)):
        db.update_observation_summary(obsid, median_tsys=tsys, mean_tau=tau)
    db.update_observation_summary(
        60001, calibrator_flux=300.0, calibrator_flux_error=3.0, calibrator_chi2=1.1, pointing_offset_az=0.01
    )
    stats = []
    for obsid in (60001, 60002, 60004):
        for feed in (1, 2, 3):
            for band in range(4):
                for channel in (0, 1):
                    stats.append(
                        {
                            "obsid": obsid,
                            "feed": feed,
                            "band": band,
                            "channel": channel,
                            "filtered_white_noise": float(feed),  # median over feeds 1–3 = 2
                            "mean_atm_temp": 10.0 + band,
                        }
                    )
    db.bulk_update_quality_statistics(stats)
    db.set_quality_flags(60004, feeds=[2], observer_ok=False, comment="Observer Flag: wind")
    for obsid, mjd in ((60001, 61100.1), (60002, 61101.2)):
        db.replace_calibration_flux(
            obsid,
            [
                {
                    "feed": feed,
                    "band": 0,
                    "channel": 0,
                    "mjd": mjd,
                    "source": "TauA",
                    "frequency_ghz": 27.0,
                    "measured_flux": 300.0 + feed,
                    "flux_error": 3.0,
                    "chi2": 1.0,
                }
                for feed in (1, 2)
            ],
        )
    db.upsert_calibration_model(
        [
            {
                "source": "TauA",
                "feed": 1,
                "band": 0,
                "channel": 0,
                "model_type": "mean",
                "poly_coeffs": [0.9],
                "mjd_min": 61100.0,
                "mjd_max": 61102.0,
                "n_observations": 2,
            }
        ]
    )
    db.disconnect()
    return path


@pytest.fixture()
def script_db(tmp_path):
    return build_script_db(tmp_path / "ws")


def digest(path: Path) -> str:
    h = hashlib.sha256(path.read_bytes())
    wal = Path(str(path) + "-wal")
    if wal.exists():
        h.update(wal.read_bytes())
    return h.hexdigest()


def run(module, capsys, *args):
    status = module.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


# ------------------------------------------------------------------------------------------------
# db_overview
# ------------------------------------------------------------------------------------------------


def test_db_overview_summary_and_readonly(script_db, capsys):
    before = digest(script_db)
    status, out, _ = run(db_overview, capsys, "summary", "--db", script_db, "--format", "json")
    assert status == 0
    rows = {r["source_group"]: r for r in json.loads(out)}
    assert set(rows) == {"Calibrator", "SkyDip", "Galactic", "CO", "TOTAL"}
    gal = rows["Galactic"]
    assert (gal["registered"], gal["level1"], gal["level2_done"], gal["failed"], gal["pending"]) == (
        3,
        3,
        2,
        0,
        1,
    )
    assert gal["min_obsid"] == 60004 and gal["max_obsid"] == 60007
    assert gal["level1_gb"] == pytest.approx((4000 + 5000 + 7000) / 1e9, abs=1e-3)
    assert rows["CO"]["failed"] == 1
    assert rows["TOTAL"]["registered"] == 7
    assert (
        rows["Calibrator"]["first_date"] == "2026-03-01" and rows["Calibrator"]["last_date"] == "2026-03-02"
    )
    status, out, _ = run(db_overview, capsys, "summary", "--db", script_db, "--source-group", "gal*")
    assert status == 0 and "Galactic" in out and "Calibrator" not in out
    status, out, _ = run(db_overview, capsys, "summary", "--db", script_db, "--csv")
    assert [r["source_group"] for r in csv_rows(out)][-1] == "TOTAL"
    assert digest(script_db) == before


def test_db_overview_missing_level2(script_db, capsys):
    status, out, _ = run(db_overview, capsys, "missing-level2", "--db", script_db, "--csv")
    rows = {int(r["obsid"]): r for r in csv_rows(out)}
    assert status == 0 and sorted(rows) == [60005, 60006, 60007]
    assert rows[60005]["job_status"] == "done" and rows[60005]["level2_file"] == "missing"
    assert rows[60006]["job_status"] == "failed" and rows[60006]["error"] == "FindScans: no scans found"
    assert rows[60007]["job_status"] == "pending" and rows[60007]["level2_file"] == "none"
    status, out, _ = run(
        db_overview, capsys, "missing-level2", "--db", script_db, "--csv", "--max-obsid", 60005
    )
    assert [int(r["obsid"]) for r in csv_rows(out)] == [60005]


def test_db_overview_query_obsid(script_db, capsys):
    status, out, _ = run(db_overview, capsys, "query-obsid", 60004, "--db", script_db, "--format", "json")
    assert status == 0
    snap = json.loads(out)
    assert snap["observation"]["source"] == "GField30"
    feeds = {f["feed"]: f for f in snap["flag_counts_per_feed"]}
    assert feeds[2] == {"feed": 2, "rows": 8, "bad": 8, "observer_bad": 8, "pipeline_bad": 0, "with_stats": 8}
    assert feeds[1]["bad"] == 0 and feeds[1]["rows"] == 8
    status, out, _ = run(db_overview, capsys, "query-obsid", 60004, "--db", script_db)
    assert status == 0 and "flags per feed" in out and "GField30" in out
    status, out, _ = run(db_overview, capsys, "query-obsid", 60004, "--db", script_db, "--csv")
    rows = csv_rows(out)
    assert {"section": "flags feed 2", "key": "observer_bad", "value": "8"} in rows
    status, _, err = run(db_overview, capsys, "query-obsid", 12345, "--db", script_db)
    assert status == 2 and "obsid 12345 is not registered" in err


def test_db_overview_path_search_and_field_status(script_db, capsys):
    status, out, _ = run(db_overview, capsys, "path-search", "*2026-03-02*", "--db", script_db, "--csv")
    assert status == 0 and [int(r["obsid"]) for r in csv_rows(out)] == [60002, 60005]
    status, out, _ = run(
        db_overview, capsys, "path-search", "*Level2_*", "--level", 2, "--db", script_db, "--csv"
    )
    assert [int(r["obsid"]) for r in csv_rows(out)] == [60001, 60002, 60003, 60004]
    status, out, _ = run(db_overview, capsys, "field-status", "--db", script_db, "--csv")
    rows = {r["source"]: r for r in csv_rows(out)}
    assert rows["GField30"]["observations"] == "3" and rows["GField30"]["processed"] == "2"
    assert rows["GField30"]["last_obsid"] == "60007" and rows["co2"]["failed"] == "1"
    status, out, _ = run(
        db_overview, capsys, "field-status", "--source-group", "Calibrator", "--db", script_db, "--csv"
    )
    assert [r["source"] for r in csv_rows(out)] == ["TauA"]


# ------------------------------------------------------------------------------------------------
# query_target
# ------------------------------------------------------------------------------------------------


def test_query_target(script_db, capsys):
    before = digest(script_db)
    status, out, _ = run(query_target, capsys, "gfield*", "--db", script_db, "--csv", "--coords", "--paths")
    assert status == 0
    rows = csv_rows(out)
    # 60005 has a (missing) level-2 path registered: it is listed; its coordinates cannot be read
    assert [int(r["obsid"]) for r in rows] == [60004, 60005]
    ra = float(rows[0]["ra_deg"])
    assert min(ra, 360.0 - ra) == pytest.approx(0.0, abs=1e-9)  # circular mean of 359° and 1°
    assert float(rows[0]["dec_deg"]) == pytest.approx(22.0)
    assert rows[0]["level2_path"].endswith("Level2_comap-0060004-2026-03-01-000000.hd5")
    assert rows[1]["ra_deg"] == ""
    status, out, _ = run(
        query_target, capsys, "TauA", "--db", script_db, "--format", "json", "--utc-offset-hours", -8
    )
    rows = json.loads(out)
    assert [r["obsid"] for r in rows] == [60001, 60002]
    assert rows[0]["utc_start"] == "2026-03-01-00:00:00" and rows[0]["local_time"] == "2026-02-28 16:00:00"
    # sky dips are left out unless asked for
    status, out, _ = run(query_target, capsys, "sky*", "--db", script_db, "--csv")
    assert csv_rows(out) == []
    status, out, _ = run(query_target, capsys, "sky*", "--db", script_db, "--csv", "--include-skydips")
    assert [int(r["obsid"]) for r in csv_rows(out)] == [60003]
    assert digest(script_db) == before


# ------------------------------------------------------------------------------------------------
# query_statistics
# ------------------------------------------------------------------------------------------------


def test_query_statistics(script_db, capsys):
    before = digest(script_db)
    status, out, _ = run(
        query_statistics, capsys, "summary", "--db", script_db, "--stat", "filtered_white_noise", "--csv"
    )
    assert status == 0
    (row,) = csv_rows(out)
    assert (
        row["n"] == "72"
        and float(row["median"]) == 2.0
        and float(row["min"]) == 1.0
        and float(row["max"]) == 3.0
    )
    status, out, _ = run(
        query_statistics, capsys, "summary", "--db", script_db, "--stat", "mean_atm_temp", "--by", "band",
        "--feed", "1,2", "--format", "json",
    )  # fmt: skip
    rows = json.loads(out)
    assert [(r["band"], r["n"], r["median"]) for r in rows] == [(b, 12, 10.0 + b) for b in range(4)]
    status, out, _ = run(query_statistics, capsys, "summary", "--db", script_db, "--good-only", "--csv",
                         "--stat", "filtered_white_noise")  # fmt: skip
    assert csv_rows(out)[0]["n"] == "64"  # feed 2 of 60004 is flagged
    status, out, _ = run(query_statistics, capsys, "tsys", "--db", script_db, "--csv")
    assert [(int(r["obsid"]), float(r["median_tsys"])) for r in csv_rows(out)] == [
        (60001, 40.0),
        (60002, 44.0),
        (60004, 42.0),
    ]
    status, out, _ = run(query_statistics, capsys, "tau", "--db", script_db, "--csv", "--source", "TauA")
    assert [float(r["mean_tau"]) for r in csv_rows(out)] == [10.0, 12.0]
    status, out, _ = run(query_statistics, capsys, "calibrator", "--db", script_db, "--format", "json")
    (cal,) = json.loads(out)
    assert cal["obsid"] == 60001 and cal["calibrator_flux"] == 300.0 and cal["calibrator_chi2"] == 1.1
    status, out, _ = run(query_statistics, capsys, "failed", "--db", script_db, "--csv")
    failed = {(int(r["obsid"]), r["stage"]): r for r in csv_rows(out)}
    assert sorted(failed) == [(60006, "level2"), (60099, "download")]
    assert failed[(60006, "level2")]["error"] == "FindScans: no scans found"
    status, out, _ = run(
        query_statistics, capsys, "failed", "--db", script_db, "--csv", "--stage", "download"
    )
    assert [r["obsid"] for r in csv_rows(out)] == ["60099"]
    status, out, _ = run(query_statistics, capsys, "status", "--db", script_db, "--csv")
    counts = {(r["stage"], r["status"]): int(r["count"]) for r in csv_rows(out)}
    assert counts == {
        ("download", "failed"): 1,
        ("level2", "done"): 5,
        ("level2", "failed"): 1,
        ("level2", "pending"): 1,
    }
    status, _, err = run(query_statistics, capsys, "summary", "--db", script_db, "--stat", "nonsense")
    assert status == 2 and "unknown statistic" in err
    assert digest(script_db) == before


# ------------------------------------------------------------------------------------------------
# export_paths
# ------------------------------------------------------------------------------------------------


def test_export_paths(script_db, capsys, tmp_path):
    before = digest(script_db)
    status, out, _ = run(export_paths, capsys, "level2", "--db", script_db, "--source-group", "Galactic")
    assert status == 0
    assert [Path(p).name for p in out.split()] == ["Level2_comap-0060004-2026-03-01-000000.hd5", "gone.hd5"]
    status, out, _ = run(export_paths, capsys, "both", "--db", script_db, "--source", "TauA")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 2 for line in lines)
    assert Path(lines[0].split()[0]).name.startswith("comap-0060001")
    out_file = tmp_path / "lists" / "l1.txt"
    status, _, err = run(
        export_paths, capsys, "level1", "--db", script_db, "--output", out_file, "--max-obsid", 60002
    )
    assert status == 0 and "wrote 2 line(s)" in err
    assert [Path(p).name[:13] for p in out_file.read_text().split()] == ["comap-0060001", "comap-0060002"]
    status, out, _ = run(
        export_paths, capsys, "level1", "--db", script_db, "--format", "json", "--min-obsid", 60007
    )
    assert [r["obsid"] for r in json.loads(out)] == [60007]
    assert digest(script_db) == before


# ------------------------------------------------------------------------------------------------
# remap_level2_paths
# ------------------------------------------------------------------------------------------------


def test_remap_level2_paths(script_db, capsys, tmp_path):
    old = str(script_db.parent / "level2")
    new = str(tmp_path / "moved")
    before = digest(script_db)
    status, out, _ = run(remap_level2_paths, capsys, old, new, "--db", script_db, "--format", "json")
    assert status == 0
    res = json.loads(out)
    assert (res["matched"], res["changed"], res["skipped_missing"], res["dry_run"]) == (5, 5, 0, True)
    assert res["sample"][0]["new_path"] == res["sample"][0]["old_path"].replace(old, new)
    assert digest(script_db) == before  # dry run is read-only
    # move two files; --require-exists changes only those
    Path(new).mkdir()
    for name in os.listdir(old)[:2]:
        os.replace(Path(old) / name, Path(new) / name)
    status, out, _ = run(
        remap_level2_paths, capsys, old, new, "--db", script_db, "--require-exists", "--apply"
    )
    assert status == 0 and "applied" in out
    db.connect(str(script_db), create=False, read_only=True)
    moved = [o.obsid for o in db.query_observations(has_level2=True) if o.level2_path.startswith(new + "/")]
    db.disconnect()
    assert len(moved) == 2


# ------------------------------------------------------------------------------------------------
# reconcile_level2_inventory
# ------------------------------------------------------------------------------------------------


def test_reconcile_level2_inventory(script_db, capsys, tmp_path):
    root = script_db.parent / "level2"
    # an unregistered complete file (60007), an incomplete one for 60006, a moved file (60004),
    # an unknown obsid, and an old staging file
    write_level2(root / "2026-03" / "Level2_comap-0060007-2026-03-01-060000.hd5", 60007, 84.0, 22.0)
    write_level2(root / "Level2_comap-0060006-2026-03-03-000000.hd5", 60006, 84.0, 22.0, complete=False)
    os.replace(
        root / "Level2_comap-0060004-2026-03-01-000000.hd5", root / "2026-03" / "Level2_comap-0060004-x.hd5"
    )
    write_level2(root / "Level2_comap-0070000-2026-03-01-000000.hd5", 70000, 84.0, 22.0)
    staging = root / ".Level2_comap-0060003-2026-03-03-000000.hd5.partial-host-123"
    staging.write_bytes(b"x")
    os.utime(staging, (1e9, 1e9))
    reports = tmp_path / "reports"
    before = digest(script_db)
    status, out, _ = run(
        reconcile_level2_inventory, capsys, "--root", root, "--db", script_db, "--report-dir", reports,
        "--format", "json",
    )  # fmt: skip
    assert status == 0
    res = json.loads(out)
    assert res["mode"] == "dry run" and res["changes_applied"] == 0
    assert res["counts"] == {
        "incomplete": 1,
        "missing": 1,
        "moved": 1,
        "not_in_db": 1,
        "ok": 3,
        "unregistered": 1,
        "stale_staging": 1,
    }
    cats = {r["obsid"]: r["category"] for r in res["rows"]}
    assert cats == {
        60004: "moved",
        60005: "missing",
        60006: "incomplete",
        60007: "unregistered",
        70000: "not_in_db",
    }
    assert res["stale_staging"] == [str(staging)]
    assert digest(script_db) == before
    (tsv,) = reports.glob("reconcile_*.tsv")
    lines = tsv.read_text().splitlines()
    assert lines[0] == "category\tobsid\tdb_path\tdisk_path\taction\tdetail"
    assert any(line.startswith("stale_staging\t") for line in lines)

    status, out, _ = run(reconcile_level2_inventory, capsys, "--root", root, "--db", script_db, "--apply",
                         "--report-dir", reports)  # fmt: skip
    assert status == 0 and "applied 3 change(s)" in out
    assert staging.exists()  # never deleted
    db.connect(str(script_db), create=False, read_only=True)
    assert db.query_data(60007).level2_path == str(
        root / "2026-03" / "Level2_comap-0060007-2026-03-01-060000.hd5"
    )
    assert db.query_data(60004).level2_path.endswith("2026-03/Level2_comap-0060004-x.hd5")
    assert db.query_data(60005).level2_path is None
    assert db.query_data(60006).level2_path is None
    db.disconnect()
    status, _, err = run(reconcile_level2_inventory, capsys, "--root", tmp_path / "nope", "--db", script_db)
    assert status == 2 and "is not a directory" in err


# ------------------------------------------------------------------------------------------------
# merge_databases
# ------------------------------------------------------------------------------------------------


def test_merge_databases(script_db, capsys, tmp_path):
    dst = tmp_path / "dst.sqlite"
    db.connect(str(dst))
    db.upsert_observation(
        {"obsid": 60001, "source": "TauA", "comment": "", "utc_start": "2026-03-01-00:00:00"}
    )
    db.finish_job(60001, "level2", "done")
    db.update_observation_summary(60001, median_tsys=41.0)  # conflicts with SRC's 40.0
    db.upsert_observation({"obsid": 50000, "source": "CasA"})
    db.disconnect()
    src_before, dst_before = digest(script_db), digest(dst)
    status, out, _ = run(merge_databases, capsys, script_db, dst, "--format", "json")
    assert status == 0
    res = json.loads(out)
    tables = {t["table"]: t for t in res["tables"]}
    assert tables["comap_data"]["inserted"] == 6 and tables["comap_data"]["filled"] == 1
    assert tables["observation_summary"]["conflicts"] == 1
    assert tables["quality_flags"]["inserted"] == 72
    assert tables["calibration_flux"]["inserted"] == 4
    assert tables["calibration_model_fit"]["inserted"] == 1
    assert tables["processing_jobs"]["inserted"] == 6 and tables["processing_jobs"]["filled"] == 1
    (conflict,) = res["conflicts"]
    assert conflict == {
        "table": "observation_summary",
        "key": "obsid=60001",
        "column": "median_tsys",
        "dst_value": 41.0,
        "src_value": 40.0,
        "kept": "dst",
    }
    assert (digest(script_db), digest(dst)) == (src_before, dst_before)  # dry run

    status, out, _ = run(merge_databases, capsys, script_db, dst, "--apply")
    assert status == 0 and "applied to" in out
    db.connect(str(dst), create=False, read_only=True)
    assert db.query_all_obsids() == [50000, *OBSERVATIONS]
    assert db.query_data(60001).level1_path is not None  # NULL filled from SRC
    summ = {r["obsid"]: r for r in db.query_observation_summaries()}
    assert summ[60001]["median_tsys"] == 41.0  # DST kept
    assert len(db.get_quality_flags(60004)) == 24 and not db.is_good(60004, 2, 0, 0)
    assert len(db.query_calibration_flux("TauA")) == 4
    db.disconnect()
    assert digest(script_db) == src_before

    status, out, _ = run(merge_databases, capsys, script_db, dst, "--apply", "--prefer-src", "--csv")
    assert status == 0
    db.connect(str(dst), create=False, read_only=True)
    assert {r["obsid"]: r for r in db.query_observation_summaries()}[60001]["median_tsys"] == 40.0
    db.disconnect()
    status, _, err = run(merge_databases, capsys, script_db, script_db)
    assert status == 2 and "same database" in err


# ------------------------------------------------------------------------------------------------
# common behaviour
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "args"),
    [
        (db_overview, ["summary"]),
        (query_target, ["TauA"]),
        (query_statistics, ["status"]),
        (export_paths, ["level1"]),
        (remap_level2_paths, ["/a", "/b"]),
    ],
)
def test_unreachable_database_exits_3(module, args, capsys, tmp_path):
    status, _, err = run(module, capsys, *args, "--db", tmp_path / "missing.db")
    assert status == 3 and err.startswith("DatabaseError: ")
    assert not (tmp_path / "missing.db").exists()


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    assert db_overview.main(["no-such-subcommand"]) == 2
    assert query_statistics.main(["summary", "--feed", "x", "--db", "/nonexistent.db"]) == 3
    assert db_overview.main(["--help"]) == 0
    assert "summary" in capsys.readouterr().out
    assert merge_databases.main(["only-one"]) == 2


def test_default_database_and_module_entry_points(tmp_path):
    """Every script's ``--help`` works; ``--db`` defaults to databases/COMAP_manchester.db."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    names = ["db_overview", "query_target", "query_statistics", "reconcile_level2_inventory", "export_paths",
             "remap_level2_paths", "merge_databases", "diagnostics"]  # fmt: skip
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    mod = importlib.import_module('modules.scripts.' + name)\n"
        "    try:\n"
        "        status = mod.main(['--help'])\n"
        "    except SystemExit as exc:\n"
        "        status = exc.code\n"
        "    assert status == 0, name\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "databases/COMAP_manchester.db" in done.stdout
    status = subprocess.run(
        [sys.executable, "-m", "modules.scripts.db_overview", "summary"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 3 and "databases/COMAP_manchester.db" in status.stderr
    assert not (tmp_path / "databases").exists()
