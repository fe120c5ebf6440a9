"""DataCheckRemote (docs/acquisition.md#datacheckremote): list the remote, apply the filters, write a JSON
report, never write the DB."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest
from rsync_daemon import needs_rsync, start_rsync_daemon

from modules.DataAcquisition.DataCheckRemote.DataCheckRemote import DataCheckRemote
from modules.pipeline_control.Pipeline import RunContext
from modules.SQLModule.SQLModule import db


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def remote(small_archive, tmp_path):
    """A copy of test-small plus a CO observation, a badly named file and an out-of-range obsid."""
    root = tmp_path / "remote"
    shutil.copytree(small_archive.root, root)
    month = root / "2026-03"
    shutil.copyfile(small_archive["GField30"], month / "comap-0090200-2026-03-02-000000.hd5")
    shutil.copyfile(small_archive["GField30"], month / "comap-0000005-2026-03-02-000000.hd5")
    (root / "odd dir").mkdir()
    shutil.copyfile(small_archive["GField30"], root / "odd dir" / "comap-0090300-2026-03-02-000000.hd5")
    index = (root / "obs_index.csv").read_text()
    index += "90200,2026-03/comap-0090200-2026-03-02-000000.hd5,co2,,2026-03-02-00:00:00,1\n"
    (root / "obs_index.csv").write_text(index)
    return root


@pytest.fixture()
def registered_db(tmp_path, small_archive):
    """A database where 90101 is registered with a matching copy and 90102 with a wrong-size copy."""
    local = tmp_path / "level1" / "2026-03"
    local.mkdir(parents=True)
    good = local / small_archive["TauA"].name
    shutil.copyfile(small_archive["TauA"], good)
    bad = local / small_archive["SkyDip"].name
    bad.write_bytes(b"short")
    db.connect(str(tmp_path / "db.sqlite"))
    db.upsert_observation({"obsid": 90101, "source": "TauA", "level1_path": str(good)})
    db.upsert_observation({"obsid": 90102, "source": "SkyDip", "level1_path": str(bad)})
    db.disconnect()
    db.connect(str(tmp_path / "db.sqlite"), create=False)
    yield db
    db.disconnect()


def run_check(remote, tmp_path, **kwargs):
    stage = DataCheckRemote(
        remote=str(remote), local_dir=str(tmp_path / "level1"), report_dir=str(tmp_path / "reports"), **kwargs
    )
    stage.context = RunContext(timestamp="2026-03-05_00-00-00")
    result = stage.run()
    reports = sorted((tmp_path / "reports").glob("remote_check_*.json"))
    return result, (json.loads(reports[-1].read_text()) if reports else None)


def test_report_counts_and_new_files_and_no_db_writes(remote, tmp_path, registered_db, caplog):
    db_file = tmp_path / "db.sqlite"
    before = digest(db_file)
    with caplog.at_level(logging.INFO, logger="comap.DataCheckRemote"):
        result, report = run_check(remote, tmp_path, remote_index="obs_index.csv", min_obsid_download=100)
    assert result.done == 1 and result.failed == 0
    counts = report["counts"]
    assert report["remote"] == str(remote)
    assert counts["remote_total"] == 6
    assert counts["registered"] == 1  # 90101: copy exists with the listed size
    assert counts["size_mismatch"] == 1  # 90102: registered copy has another size
    assert counts["new"] == 1  # 90103
    assert counts["rejected"] == {
        "invalid path: component with characters outside [A-Za-z0-9._+-]": 1,
        "obsid below min_obsid_download": 1,
        "source group in exclude_source_groups": 1,
    }
    assert [f["obsid"] for f in report["new_files"]] == [90103]
    assert report["new_files"][0] == {
        "relpath": "2026-03/comap-0090103-2026-03-01-143125.hd5",
        "size_bytes": (remote / "2026-03/comap-0090103-2026-03-01-143125.hd5").stat().st_size,
        "obsid": 90103,
    }
    assert [f["obsid"] for f in report["size_mismatch_files"]] == [90102]
    line = next(r.getMessage() for r in caplog.records if "; report " in r.getMessage())
    assert "6 listed, 1 new, 1 registered, 1 size mismatch" in line
    # never writes the DB
    assert digest(db_file) == before
    assert not os.path.exists(str(db_file) + "-wal") or os.path.getsize(str(db_file) + "-wal") == 0
    assert [j for j in db.job_table(None)] == []


def test_without_index_source_filters_warn_once(remote, tmp_path, registered_db, caplog):
    with caplog.at_level(logging.WARNING):
        _, report = run_check(remote, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "remote_index" in r.getMessage()]
    assert len(warnings) == 1 and "exclude_source_groups=['CO']" in warnings[0]
    # the CO field is not excluded without the index
    assert 90200 in [f["obsid"] for f in report["new_files"]]
    rejected_names = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert rejected_names and "odd dir/comap-0090300" in rejected_names[0]


def test_obsid_restriction_and_include_filters(remote, tmp_path, registered_db):
    def check(obsids=None, **kwargs):
        stage = DataCheckRemote(
            remote=str(remote),
            local_dir=str(tmp_path / "level1"),
            report_dir=str(tmp_path / "reports"),
            remote_index="obs_index.csv",
            **kwargs,
        )
        stage.context = RunContext(timestamp="t", obsids=obsids)
        stage.run()
        return json.loads((tmp_path / "reports" / "remote_check_t.json").read_text())

    report = check(obsids=[90103], min_obsid_download=100)
    assert [f["obsid"] for f in report["new_files"]] == [90103]
    assert report["counts"]["rejected"]["not selected by --obsid"] == 1  # 90102 (size mismatch)
    report = check(include_sources=["gfield*"])
    assert [f["obsid"] for f in report["new_files"]] == [90103]
    assert report["counts"]["rejected"]["source not in include_sources"] == 2  # SkyDip (90102), co2
    assert report["counts"]["rejected"]["not in the remote index"] == 1  # obsid 5
    report = check(include_source_groups=["galactic"], exclude_sources=["GField30"])
    assert report["new_files"] == []
    assert report["counts"]["rejected"]["source in exclude_sources"] == 1


def test_listing_failure_fails_the_stage(tmp_path, registered_db):
    from rsync_daemon import REAL_RSYNC, free_port

    if REAL_RSYNC is None:
        pytest.skip("rsync is not installed")
    url = f"rsync://127.0.0.1:{free_port()}/comap/"
    result, report = run_check(url, tmp_path)
    assert result.failed == 1 and report is None
    assert result.failures[0][1].startswith(f"cannot list {url}: rsync exit 10: ")


@needs_rsync
def test_daemon_remote_report(small_archive, tmp_path, registered_db):
    with start_rsync_daemon(small_archive.root, tmp_path / "daemon") as d:
        _, report = run_check(d.url, tmp_path, remote_index="obs_index.csv")
    assert report["counts"]["remote_total"] == 3
    assert report["counts"]["registered"] == 1 and report["counts"]["size_mismatch"] == 1
    assert [f["obsid"] for f in report["new_files"]] == [90103]


def test_missing_demo_remote_gives_the_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from modules.pipeline_control.config import class_parameters

    params = {n: p.default for n, p in class_parameters(DataCheckRemote)[0].items()}
    params.update(remote="demo/remote/", local_dir="demo/level1")
    (problem,) = DataCheckRemote.validate_config(params)
    assert problem == (
        "remote directory demo/remote/ does not exist; "
        "run make demo or python -m utils.simulator archive --preset demo --out demo/remote"
    )
