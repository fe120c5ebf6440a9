"""FinalizeLevel2Metadata (docs/level2.md#finalizelevel2metadata): the level-2 file carries the observation's
database rows.

The snapshot must equal what the database holds once the observation has been recorded: the rows
already in the database, merged with the operations the modules recorded during the run (still
pending when the snapshot is written) and with ``ctx.summary``.
"""

from __future__ import annotations

import json
import math
import textwrap

import h5py
import numpy as np
import pytest

from modules.pipeline_control.provenance import is_complete
from modules.pipeline_control.streaming import ObservationContext, observation
from modules.ProcessLevel2.FinalizeLevel2Metadata import FinalizeLevel2Metadata
from modules.SQLModule.SQLModule import QUALITY_STAT_COLUMNS, COMAPData, db

OBSID = 95001
TIMESTAMPS = {"updated_utc", "level2_created_utc", "registered_utc"}


def read_snapshot(path, group: str = "level2/sql_snapshot") -> dict:
    """Rows, observation attributes and summary from the file alone (no database)."""
    with h5py.File(path, "r") as l2:
        g = l2[group]
        assert is_complete(l2, group)
        n = len(g["feed"])
        rows = []
        for k in range(n):
            row = {
                name: g[name][k].item()
                for name in ("feed", "band", "channel", "observer_ok", "pipeline_ok", "is_good")
            }
            row["comment"] = g["comment"].asstr()[k] or None
            for name in QUALITY_STAT_COLUMNS:
                value = g[name][k].item()
                if name in ("n_spikes", "n_nan_values"):
                    assert g[name].dtype == np.int32
                    row[name] = None if value == -1 else value
                else:
                    assert g[name].dtype == np.float64
                    row[name] = None if math.isnan(value) else value
            rows.append(row)
        assert g["feed"].dtype == np.int16 and g["is_good"].dtype == bool
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()}
    return {"rows": rows, "attrs": attrs, "summary": json.loads(attrs["summary_json"])}


def db_rows(obsid: int) -> tuple[list[dict], dict, dict]:
    snap = db.get_observation_snapshot(obsid)
    keys = (
        "feed",
        "band",
        "channel",
        "observer_ok",
        "pipeline_ok",
        "is_good",
        "comment",
        *QUALITY_STAT_COLUMNS,
    )
    rows = [{k: r[k] for k in keys} for r in snap["quality_flags"]]
    return rows, snap["observation"], snap["summary"]


def assert_matches_database(snap: dict, obsid: int) -> None:
    rows, obs, summary = db_rows(obsid)
    assert snap["rows"] == rows
    nulls = json.loads(snap["attrs"]["null_columns"])
    for col, value in obs.items():
        if col in TIMESTAMPS:
            continue
        if value is None:
            assert col in nulls, col
        else:
            assert snap["attrs"][col] == value, col
    for col, value in summary.items():
        if col in TIMESTAMPS:
            continue
        assert snap["summary"][col] == value, col


@pytest.fixture()
def database(tmp_path):
    db.connect(tmp_path / "db.sqlite")
    try:
        yield db
    finally:
        db.disconnect()


def _register(obsid: int, tmp_path) -> COMAPData:
    db.upsert_observation(
        {
            "obsid": obsid,
            "source": "GField30",
            "utc_start": "2026-03-01-04:15:00",
            "comment": "",
            "pixels": "1,2,3,20",
            "level1_path": str(tmp_path / f"comap-{obsid:07d}.hd5"),
            "nchan": 32,
            "tsamp": 0.02,
        }
    )
    fi = db.query_data(obsid)
    fi.level2_path = str(tmp_path / f"Level2_{obsid}.hd5")
    return fi


def test_snapshot_merges_database_rows_pending_operations_and_summary(database, tmp_path):
    fi = _register(OBSID, tmp_path)
    _register(OBSID + 1, tmp_path)
    # Rows already in the database (e.g. from an earlier run or ObserverFlags).
    db.update_observation_summary(OBSID, median_tsys=40.0, n_scans=9)
    db.bulk_update_quality_statistics(
        [
            {"obsid": OBSID, "feed": 1, "band": b, "channel": c, "unfiltered_auto_rms": 0.01 * (b + 1)}
            for b in range(4)
            for c in range(2)
        ]
    )
    db.set_quality_flags(OBSID, feeds=[2], bands=[1], observer_ok=False, comment="Observer Flag: cloud")
    fi.final_level2_path = str(tmp_path / "published" / f"Level2_{OBSID}.hd5")

    ctx = ObservationContext(fi)
    with observation(ctx), db.deferring() as ops:
        ctx.summary.update(n_scans=2, mean_tau=3.5, calibrator_flux=None)
        db.update_quality_statistics(
            OBSID, 1, 0, 0, {"n_spikes": 3, "filtered_fknee": 0.25, "filtered_white_noise": float("nan")}
        )
        db.bulk_update_quality_statistics(
            [
                {"obsid": OBSID, "feed": 3, "band": 2, "channel": c, "n_nan_values": 17, "mean_atm_temp": 8.5}
                for c in range(2)
            ]
            + [{"obsid": OBSID + 1, "feed": 1, "band": 0, "channel": 0, "n_spikes": 99}]
        )
        db.set_quality_flags(OBSID, feeds=[3], pipeline_ok=False, comment="no usable channels — ü")
        db.set_quality_flags(OBSID + 1, pipeline_ok=False)  # another observation: not in this snapshot
        db.update_observation_summary(OBSID, median_tsys=41.25)
        FinalizeLevel2Metadata().run(fi)
        pending = list(ops)

    snap = read_snapshot(fi.level2_path)
    assert len(pending) == 5  # peeked, not consumed
    # Record the observation as the coordinator does, then compare with the database.
    db.apply(pending)
    db.set_level2_path(OBSID, fi.final_level2_path)
    db.update_observation_summary(OBSID, **ctx.summary)
    db.finish_job(OBSID, "level2", "done")
    assert_matches_database(snap, OBSID)
    assert snap["summary"]["median_tsys"] == 41.25 and snap["summary"]["n_scans"] == 2
    assert snap["summary"]["processing_status"] == "complete"
    assert snap["attrs"]["level2_path"] == fi.final_level2_path
    assert snap["attrs"]["source"] == "GField30" and snap["attrs"]["obsid"] == OBSID
    by_key = {(r["feed"], r["band"], r["channel"]): r for r in snap["rows"]}
    assert by_key[(1, 0, 0)]["n_spikes"] == 3 and by_key[(1, 0, 0)]["filtered_white_noise"] is None
    assert by_key[(1, 3, 1)]["unfiltered_auto_rms"] == pytest.approx(0.04)
    assert not by_key[(2, 1, 0)]["is_good"] and not by_key[(2, 1, 0)]["observer_ok"]
    assert by_key[(3, 0, 0)]["comment"] == "no usable channels — ü" and not by_key[(3, 0, 0)]["pipeline_ok"]
    assert by_key[(3, 2, 1)]["n_nan_values"] == 17
    assert all(r["feed"] != 20 for r in snap["rows"])
    assert [(r["feed"], r["band"], r["channel"]) for r in snap["rows"]] == sorted(by_key)
    # The module does not trigger processing by itself.
    assert FinalizeLevel2Metadata.runs_with_others


def test_snapshot_without_a_database(tmp_path):
    fi = COMAPData(obsid=OBSID, source="TauA", source_group="Calibrator", utc_start="2026-03-01-01:00:00")
    fi.level2_path = str(tmp_path / "l2.hd5")
    ctx = ObservationContext(fi)
    assert not db.connected
    with observation(ctx), db.deferring():
        ctx.summary["calibrator_flux"] = 330.5
        db.update_quality_statistics(OBSID, 2, 1, 0, {"filtered_white_noise": 2e-3})
        FinalizeLevel2Metadata(group_name="level2/my_snapshot").run(fi)
    snap = read_snapshot(fi.level2_path, "level2/my_snapshot")
    assert snap["attrs"]["source"] == "TauA"
    assert snap["summary"]["calibrator_flux"] == 330.5
    assert snap["rows"] == [
        {
            "feed": 2,
            "band": 1,
            "channel": 0,
            "observer_ok": True,
            "pipeline_ok": True,
            "is_good": True,
            "comment": None,
            **{c: None for c in QUALITY_STAT_COLUMNS},
            "filtered_white_noise": 2e-3,
        }
    ]
    assert FinalizeLevel2Metadata(group_name="level2/my_snapshot").already_processed(fi)


RECORDER = '''
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY


class RecordStats(BaseCOMAPModule):
    """Test module: records statistics, a flag and summary values as real stages do."""

    writes = ("level2/record_stats",)

    def __init__(self, label: str = "run1"):
        self.label = label

    def run(self, file_info):
        ctx = self.observation_context(file_info)
        feeds = [int(f) for f in ctx.feeds]
        ctx.summary["n_scans"] = 2
        ctx.summary["median_tsys"] = 41.5
        ctx.db.bulk_update_quality_statistics(
            [
                {"obsid": ctx.obsid, "feed": f, "band": b, "channel": c,
                 "filtered_white_noise": 1e-3 * (f + b + c), "n_spikes": 10 * f + b}
                for f in feeds for b in range(4) for c in range(2)
            ]
        )
        ctx.db.set_quality_flags(
            ctx.obsid, feeds=[feeds[-1]], pipeline_ok=False, comment=f"{self.label}: masked"
        )
        with RetryH5PY(file_info.level2_path, "a") as l2:
            self.mark_complete(l2.require_group("level2/record_stats"))
'''


def test_snapshot_after_a_pipeline_run_equals_the_database(workspace_factory, tiny_archive, tmp_path):
    pkg = tmp_path / "pkgs" / "mylab_finalize"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "record.py").write_text(textwrap.dedent(RECORDER))
    ws = workspace_factory(tiny_archive.paths)
    ws.extra_path.append(str(pkg.parent))
    modules = [
        "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
        "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
        "mylab_finalize.record.RecordStats()",
        "modules.ProcessLevel2.FinalizeLevel2Metadata.FinalizeLevel2Metadata.FinalizeLevel2Metadata()",
    ]
    ws.write_configs(modules, module_paths=["mylab_finalize."])
    res = ws.run()
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = ws.level2_files()
    snap = read_snapshot(path)
    obsid = snap["attrs"]["obsid"]
    ws.db()
    try:
        assert_matches_database(snap, obsid)
        assert db.get_observation_snapshot(obsid)["summary"]["processing_status"] == "complete"
        assert snap["attrs"]["level2_path"] == db.query_data(obsid).level2_path == str(path.resolve())
    finally:
        db.disconnect()
    assert len(snap["rows"]) == 2 * 4 * 2 and sum(not r["is_good"] for r in snap["rows"]) == 8
    assert snap["summary"]["median_tsys"] == 41.5

    # Self-describing: without the database the file still says what it is and how good it is.
    ws.db_path.unlink()
    again = read_snapshot(path)
    assert again["attrs"]["source"] == "GField30" and again["attrs"]["level1_path"].endswith(".hd5")
    assert again["rows"] == snap["rows"]

    # A forced rerun with different comments rewrites the snapshot; it stays equal to the DB.
    ws.write_configs(
        [*modules[:2], "mylab_finalize.record.RecordStats(label='run2')", modules[3]],
        module_paths=["mylab_finalize."],
    )
    res = ws.run("--force")  # the database was deleted: DataAssess registers the files again
    assert res.returncode == 0, res.stdout + res.stderr
    snap2 = read_snapshot(path)
    ws.db()
    try:
        assert_matches_database(snap2, obsid)
    finally:
        db.disconnect()
    assert {r["comment"] for r in snap2["rows"] if not r["is_good"]} == {"run2: masked"}
