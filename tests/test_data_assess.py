"""DataAssess (docs/acquisition.md#dataassess): discover level-1 and level-2 files on disk and register
them."""

from __future__ import annotations

import shutil

import h5py
import pytest

from modules.DataAcquisition.DataAssess.DataAssess import DataAssess
from modules.pipeline_control.Pipeline import RunContext
from modules.SQLModule.SQLModule import db


@pytest.fixture()
def fresh_db(tmp_path):
    db.connect(str(tmp_path / "db.sqlite"))
    yield db
    db.disconnect()


def run_stage(**kwargs):
    stage = DataAssess(**kwargs)
    stage.context = RunContext()
    return stage.run()


def test_registers_level1_with_source_groups(small_archive, tmp_path, fresh_db):
    root = tmp_path / "l1"
    shutil.copytree(small_archive.root, root)
    result = run_stage(level1_data_paths=[str(root)])
    assert result.done == 3 and result.failed == 0
    rows = {o.source: o for o in fresh_db.query_observations()}
    assert rows["TauA"].source_group == "Calibrator"
    assert rows["GField30"].source_group == "Galactic"
    assert rows["SkyDip"].source_group == "SkyDip"
    for o in rows.values():
        assert o.level1_path.startswith(str(root.resolve()))
        assert o.level1_size_bytes > 0 and o.n_feeds == 3
        assert o.mjd_start is not None and o.utc_start
    again = run_stage(level1_data_paths=[str(root)])
    assert again.done == 0 and again.skipped == 3


def test_skips_hidden_dirs_staging_and_reports_unreadable(tiny_archive, tmp_path, fresh_db):
    root = tmp_path / "l1"
    (root / ".quarantine").mkdir(parents=True)
    (root / ".rsync-partial").mkdir()
    src = tiny_archive.paths[0]
    shutil.copyfile(src, root / src.name)
    shutil.copyfile(src, root / ".quarantine" / src.name.replace("0090001", "0090002"))
    shutil.copyfile(src, root / ".rsync-partial" / src.name.replace("0090001", "0090003"))
    bad = root / "sub" / "comap-0090004-2026-03-01-000000.hd5"
    bad.parent.mkdir()
    bad.write_bytes(b"not an hdf5 file")
    mismatch = root / "comap-0090005-2026-03-01-000000.hd5"
    shutil.copyfile(src, mismatch)
    result = run_stage(level1_data_paths=[str(root)])
    assert sorted(fresh_db.query_all_obsids()) == [90001]
    assert result.failed == 2
    reasons = " | ".join(r for _, r in result.failures)
    assert "cannot open level-1 file" in reasons
    assert "obsid mismatch: file name says 90005, /comap.obsid says 90001" in reasons


def test_registers_complete_level2_and_scrubs_missing(tiny_archive, tmp_path, fresh_db, workspace_factory):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()
    assert ws.run().returncode == 0
    (l2,) = ws.level2_files()
    # a brand-new database learns about both files from disk alone
    run_stage(level1_data_paths=[str(ws.level1)], level2_data_paths=[str(ws.root / "level2")])
    (obs,) = fresh_db.query_observations()
    assert obs.level2_path == str(l2.resolve())
    (job,) = fresh_db.job_table("level2")
    assert job.status == "done"
    # the recorded DB outcome of the observation was replayed
    assert obs.level1_size_bytes == tiny_archive.paths[0].stat().st_size

    # an incomplete level-2 file is not registered
    moved = tmp_path / "l2b" / l2.name
    moved.parent.mkdir()
    shutil.copyfile(l2, moved)
    with h5py.File(moved, "a") as f:
        f["spectrometer/pixel_pointing/pixel_dec"].attrs["status"] = "incomplete"
    fresh_db.clear_level2_info(obs.obsid)
    r = run_stage(level2_data_paths=[str(moved.parent)])
    assert r.done == 0 and fresh_db.query_data(obs.obsid).level2_path is None

    # a registered path whose file disappeared is scrubbed
    fresh_db.set_level2_path(obs.obsid, str(tmp_path / "gone.hd5"))
    run_stage(level2_data_paths=[])
    assert fresh_db.query_data(obs.obsid).level2_path is None


def test_missing_demo_root_gives_the_hint():
    problems = DataAssess.validate_config({"level1_data_paths": ["demo/no-such-remote"]})
    assert len(problems) == 1
    assert "make demo" in problems[0] and "python -m utils.simulator archive --preset demo" in problems[0]
    assert DataAssess.validate_config({"level1_data_paths": [], "level2_data_paths": ["not/yet"]}) == []
