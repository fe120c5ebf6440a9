"""Level2Pipeline: selection, job states, staging and atomic publish, failure isolation, resumability.

Every run goes through ``python run.py`` in a scratch workspace, as a user would run it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import textwrap
import time
from pathlib import Path

import h5py
import pytest

from modules.pipeline_control.provenance import is_complete

REPO = Path(__file__).resolve().parents[1]

KILL_PACKAGE = '''
import os
import signal
import time
from pathlib import Path

from modules.pipeline_control.Pipeline import RetryH5PY
from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File


class FragileCreateLevel2File(CreateLevel2File):
    """CreateLevel2File that dies half-way through when a marker file says so (test only)."""

    def __init__(self, output_dir: str = "level2", marker_dir: str = "markers"):
        super().__init__(output_dir=output_dir)
        self.marker_dir = marker_dir

    def run(self, file_info):
        markers = Path(self.marker_dir)
        with RetryH5PY(file_info.level2_path, "a") as l2:
            l2.create_dataset("half_written", data=[1, 2, 3])
            l2.flush()
        kill = markers / f"kill_{file_info.obsid}"
        if kill.exists():
            kill.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        hold = markers / f"hold_{file_info.obsid}"
        if hold.exists():
            (markers / f"started_{file_info.obsid}").write_text(str(os.getpid()))
            while hold.exists():
                time.sleep(0.05)
        with RetryH5PY(file_info.level2_path, "a") as l2:
            del l2["half_written"]
        super().run(file_info)
'''

FRAGILE = "mylab_l2test.fragile.FragileCreateLevel2File(output_dir='level2', marker_dir='markers')"
CHECK = "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()"


def obsid_of(path: Path) -> int:
    return int(re.search(r"comap-(\d{7})-", path.name).group(1))


@pytest.fixture()
def fragile_ws(workspace_factory, small_archive, tmp_path):
    pkg = tmp_path / "pkgs" / "mylab_l2test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "fragile.py").write_text(KILL_PACKAGE)
    ws = workspace_factory([small_archive["TauA"], small_archive["GField30"]])
    ws.extra_path.append(str(pkg.parent))
    (ws.root / "markers").mkdir()
    ws.write_configs([CHECK, FRAGILE], nprocess=2, module_paths=["mylab_l2test."])
    return ws


def jobs_by_obsid(ws) -> dict:
    db = ws.db()
    try:
        return {j.obsid: j for j in db.job_table("level2")}
    finally:
        db.disconnect()


def test_end_to_end_and_idempotent_rerun(workspace_factory, small_archive):
    ws = workspace_factory(small_archive.paths)
    ws.write_configs(nprocess=2)
    res = ws.run()
    assert res.returncode == 0, res.stderr
    files = ws.level2_files()
    assert len(files) == 3
    assert ws.staging_files() == []
    for f in files:
        with h5py.File(f, "r") as l2:
            assert is_complete(l2, "spectrometer/pixel_pointing/pixel_dec")
            assert l2.attrs["level2_format_version"] == 1
            assert l2.attrs["config_sha256"] and "CreateLevel2File" in l2.attrs["config_toml"]
            assert l2.attrs["obsid"] == obsid_of(f)
    db = ws.db()
    try:
        for obs in db.query_observations():
            assert obs.level2_path and Path(obs.level2_path).exists()
            assert obs.level1_size_bytes == Path(obs.level1_path).stat().st_size
        assert {j.status for j in db.job_table("level2")} == {"done"}
        summaries = db.query_observation_summaries()
        assert {s["processing_status"] for s in summaries} == {"complete"}
    finally:
        db.disconnect()
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}

    again = ws.run()
    assert again.returncode == 0, again.stderr
    assert re.search(r"Level2Pipeline\s+0\s+3\s+0\s+0", again.stdout), again.stdout
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in ws.level2_files()} == stamps


def test_bad_observation_does_not_stop_the_batch(workspace_factory, small_archive):
    ws = workspace_factory(small_archive.paths)
    bad = ws.level1 / small_archive["GField30"].name
    with h5py.File(bad, "a") as f:
        del f["hk/antenna0/vane/Tshroud"]
    ws.write_configs(nprocess=2)
    res = ws.run()
    assert res.returncode == 1, res.stderr
    bad_obsid = obsid_of(bad)
    reason = f"CheckLevel1FileExists: ObsID {bad_obsid}: missing dataset hk/antenna0/vane/Tshroud"
    assert len(ws.level2_files()) == 2 and ws.staging_files() == []
    assert f"ERROR [{bad_obsid:07d}] {reason}" in res.stderr.splitlines(), res.stderr
    assert "Traceback" not in res.stderr
    jobs = jobs_by_obsid(ws)
    assert jobs[bad_obsid].status == "failed"
    assert jobs[bad_obsid].error == reason and jobs[bad_obsid].last_module == "CheckLevel1FileExists"
    assert all(j.status == "done" for o, j in jobs.items() if o != bad_obsid)
    assert f"1 × Level2Pipeline: {reason}" in res.stdout
    db = ws.db()
    try:
        summary = db.get_observation_snapshot(bad_obsid)["summary"]
        assert summary["processing_status"] == "failed" and summary["processing_error"] == reason
    finally:
        db.disconnect()

    # skipped while failed; done once the file is repaired and --retry-failed is given
    res2 = ws.run()
    assert res2.returncode == 0 and jobs_by_obsid(ws)[bad_obsid].status == "failed"
    shutil.copyfile(small_archive["GField30"], bad)
    res3 = ws.run("--retry-failed")
    assert res3.returncode == 0, res3.stderr
    assert re.search(r"Level2Pipeline\s+1\s+2\s+0\s+1", res3.stdout), res3.stdout
    assert jobs_by_obsid(ws)[bad_obsid].status == "done"
    assert len(ws.level2_files()) == 3


def test_truncated_file_after_registration(workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()
    (l1,) = sorted(ws.level1.iterdir())
    data = l1.read_bytes()
    res = ws.run("--obsid", "1")  # registers the archive, processes nothing
    assert res.returncode == 0, res.stderr
    l1.write_bytes(data[: len(data) // 2])
    res = ws.run()
    obsid = obsid_of(l1)
    assert res.returncode == 1
    job = jobs_by_obsid(ws)[obsid]
    assert job.status == "failed"
    assert job.error.startswith(f"CheckLevel1FileExists: ObsID {obsid}: cannot open level-1 file ")
    assert "truncated" in job.error and ws.level2_files() == [] and ws.staging_files() == []


def test_worker_killed_during_create_level2_file(fragile_ws, small_archive):
    ws = fragile_ws
    victim = obsid_of(small_archive["GField30"])
    (ws.root / "markers" / f"kill_{victim}").write_text("")
    res = ws.run()
    assert res.returncode == 1, res.stderr
    finals = {obsid_of(p) for p in ws.level2_files()}
    assert victim not in finals and len(finals) == 1
    assert ws.staging_files() == []
    job = jobs_by_obsid(ws)[victim]
    assert job.status == "failed"
    assert job.error == "worker process died (signal 9); possible out-of-memory"
    assert f"ERROR [{victim:07d}] Level2Pipeline: worker process died (signal 9)" in res.stderr

    res2 = ws.run("--retry-failed")
    assert res2.returncode == 0, res2.stderr
    assert {obsid_of(p) for p in ws.level2_files()} == {victim, *finals}
    with h5py.File([p for p in ws.level2_files() if obsid_of(p) == victim][0], "r") as l2:
        assert "half_written" not in l2 and is_complete(l2, "spectrometer/pixel_pointing/pixel_dec")


def test_whole_run_killed_then_resumed(fragile_ws, small_archive):
    ws = fragile_ws
    victim = obsid_of(small_archive["GField30"])
    markers = ws.root / "markers"
    (markers / f"hold_{victim}").write_text("")
    proc = ws.popen()
    deadline = time.time() + 120
    while not (markers / f"started_{victim}").exists():
        assert proc.poll() is None, (ws.root / "popen.err").read_text()
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (markers / f"hold_{victim}").unlink()
    assert victim not in {obsid_of(p) for p in ws.level2_files()}
    assert jobs_by_obsid(ws)[victim].status == "running"
    assert ws.staging_files(), "the killed run leaves its staging file behind"

    res = ws.run()
    assert res.returncode == 0, res.stderr
    jobs = jobs_by_obsid(ws)
    assert jobs[victim].status == "done" and jobs[victim].attempts == 2
    assert ws.staging_files() == []
    assert victim in {obsid_of(p) for p in ws.level2_files()}


def _simulate_crash_after_publish(ws, obsid: int) -> None:
    """Leave the DB as a crash between os.replace and the coordinator's transaction would."""
    from sqlalchemy import update

    from modules.SQLModule.SQLModule import ProcessingJob

    db = ws.db()
    try:
        db.clear_level2_info(obsid)
        db.upsert_observation({"obsid": obsid, "level1_size_bytes": None})
        with db.session() as s:
            s.execute(
                update(ProcessingJob)
                .where(ProcessingJob.obsid == obsid)
                .values(status="running", host="elsewhere", pid=1, updated_utc=None)
            )
    finally:
        db.disconnect()


@pytest.mark.parametrize("config", ["l2.toml", "main.toml"])
def test_crash_after_publish_is_recorded_without_recomputing(workspace_factory, tiny_archive, config):
    """Level2Pipeline (run directly from its own config) and DataAssess (first stage of main.toml) both
    register the published file and replay its recorded DB outcome without recomputing anything."""
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()
    assert ws.run().returncode == 0
    (final,) = ws.level2_files()
    obsid = obsid_of(final)
    stamp = (final.stat().st_ino, final.stat().st_mtime_ns)
    db = ws.db()
    try:
        before = db.query_data(obsid)
    finally:
        db.disconnect()
    _simulate_crash_after_publish(ws, obsid)
    res = ws.run(config=config)
    assert res.returncode == 0, res.stderr
    expected = "recorded it without recomputing" if config == "l2.toml" else "DB operations replayed"
    assert expected in res.stderr
    assert (final.stat().st_ino, final.stat().st_mtime_ns) == stamp
    db = ws.db()
    try:
        after = db.query_data(obsid)
        assert after.level2_path == before.level2_path
        assert after.level1_size_bytes == before.level1_size_bytes
        (job,) = db.job_table("level2")
        assert job.status == "done"
    finally:
        db.disconnect()


SEED_TEMPLATE = '''
from modules.pipeline_control.Pipeline import BaseCOMAPModule
from modules.SQLModule.SQLModule import COMAPData

class MyNewModule(BaseCOMAPModule):
    def __init__(self, param1=True, output_dir="outputs/MyNewModule", overwrite=False):
        self.param1 = param1
        self.output_dir = output_dir
        self.overwrite = overwrite

    def already_processed(self, file_info: COMAPData, overwrite: bool = False) -> bool:
        """ Check if results already exist in the Level 2 file """
        if overwrite:
            return False 
            
        with RetryH5PY(file_info.level2_path, 'r') as lvl2:
            return "level2/my_new_results" in lvl2

    def run(self, file_info: COMAPData) -> None:
        """ Main entry point called by the pipeline """
        if self.already_processed(file_info):
            return
        # --- analysis logic here ---
        results = self.do_analysis(file_info)
        self.save_results(file_info, results)

    def do_analysis(self, file_info: COMAPData):
        """ Example processing routine """
        # Read level 1 data, perform computations, return numpy arrays
        return {"example": 42}

    def save_results(self, file_info: COMAPData, results: dict):
        """ Save results into the Level 2 HDF5 file """
        with RetryH5PY(file_info.level2_path, 'a') as lvl2:
            grp = lvl2.require_group("level2/my_new_results")
            for key, value in results.items():
                if key in grp:
                    del grp[key]
                grp.create_dataset(key, data=value)
'''


def seed_template_text() -> str:
    """The seed README's template (from the README itself), plus its one missing import."""
    readme = REPO.parent / "shared" / "seed" / "README.md"
    text = readme.read_text() if readme.exists() else SEED_TEMPLATE
    m = re.search(
        r"```python\n(from modules\.pipeline_control\.Pipeline import BaseCOMAPModule.*?)```", text, re.S
    )
    code = m.group(1) if m else SEED_TEMPLATE
    assert "RetryH5PY(" in code and "import RetryH5PY" not in code
    return "from modules.pipeline_control.Pipeline import RetryH5PY\n" + textwrap.dedent(code)


@pytest.fixture()
def seed_module_dir():
    target = REPO / "modules" / "MyModule"
    if target.exists():
        pytest.skip("modules/MyModule exists in the checkout; not overwriting a user's module")
    (target / "MyNewModule").mkdir(parents=True)
    try:
        (target / "MyNewModule" / "__init__.py").write_text("")
        (target / "MyNewModule" / "MyNewModule.py").write_text(seed_template_text())
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_seed_readme_template_runs_and_only_new_module_reruns(
    workspace_factory, tiny_archive, seed_module_dir
):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()
    assert ws.run().returncode == 0
    (final,) = ws.level2_files()
    with h5py.File(final, "r") as l2:
        created = l2.attrs["created_utc"]
        pointing_written = l2["spectrometer/pixel_pointing/pixel_dec"].attrs["written_utc"]

    # the seed README's call string, added as one more line of the level-2 list
    seed_call = "modules.MyModule.MyNewModule.MyNewModule(param1=True, output_dir='outputs/new_results')"
    from conftest import DEFAULT_LEVEL2_MODULES

    ws.write_configs([*DEFAULT_LEVEL2_MODULES, seed_call])
    res = ws.run()
    assert res.returncode == 0, res.stderr
    assert "(CheckLevel1FileExists, MyNewModule)" in res.stderr
    with h5py.File(final, "r") as l2:
        assert l2["level2/my_new_results/example"][()] == 42
        assert l2.attrs["created_utc"] == created
        assert l2["spectrometer/pixel_pointing/pixel_dec"].attrs["written_utc"] == pointing_written
    assert ws.staging_files() == []
    # and nothing is left to do afterwards
    res = ws.run()
    assert res.returncode == 0 and re.search(r"Level2Pipeline\s+0\s+1\s+0", res.stdout), res.stdout


def test_dry_run_plans_and_writes_nothing(workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()
    assert ws.run().returncode == 0
    db_bytes = ws.db_path.read_bytes()
    res = ws.run("--dry-run", "--force")
    assert res.returncode == 0, res.stderr
    assert "observations: 1 to process" in res.stdout
    assert "GB per worker" in res.stdout
    assert ws.db_path.read_bytes() == db_bytes


def test_obsid_restriction(workspace_factory, small_archive):
    ws = workspace_factory(small_archive.paths)
    ws.write_configs()
    keep = obsid_of(small_archive["TauA"])
    res = ws.run("--obsid", str(keep))
    assert res.returncode == 0, res.stderr
    assert [obsid_of(p) for p in ws.level2_files()] == [keep]


DISK_FULL_PACKAGE = '''
import errno
import os
from pathlib import Path

from modules.pipeline_control.Pipeline import BaseCOMAPModule


class DiskFull(BaseCOMAPModule):
    """Fails every observation with ENOSPC while a marker file exists (test only)."""

    def __init__(self, marker: str = "markers/disk_full"):
        self.marker = marker

    def already_processed(self, file_info, overwrite=False):
        return False

    def run(self, file_info):
        if Path(self.marker).exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
'''


@pytest.mark.parametrize(
    "fault",
    ["disk_full", "missing_mount"],
)
def test_max_consecutive_failures_stops_the_run_with_status_3(
    workspace_factory, small_archive, tmp_path, fault
):
    """docs/operations.md#error-model item 3 and docs/operations.md#failure-handling-matrix (disk full row):
    with max_consecutive_failures=2 and every observation failing with the same cause, the stage stops after
    the 2nd failure, the run exits 3, the message names the streak, both failures are recorded as failed jobs,
    and the observation that was never attempted stays pending (it is processed by the next run once the fault
    is gone)."""
    pkg = tmp_path / "pkgs" / "mylab_diskfull"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "diskfull.py").write_text(DISK_FULL_PACKAGE)
    ws = workspace_factory(small_archive.paths)
    ws.extra_path.append(str(pkg.parent))
    markers = ws.root / "markers"
    markers.mkdir()
    from conftest import DEFAULT_LEVEL2_MODULES

    ws.write_configs(
        [*DEFAULT_LEVEL2_MODULES, "mylab_diskfull.diskfull.DiskFull(marker='markers/disk_full')"],
        nprocess=1,
        module_paths=["mylab_diskfull."],
        stage_kwargs=", max_consecutive_failures=2",
    )
    if fault == "disk_full":
        (markers / "disk_full").write_text("")
        expected_reason = "no space left on device writing "  # docs/reliability.md
    else:  # registered, then the files vanish from the (empty) mount point: an unmounted disk
        assert ws.run("--obsid", "1").returncode == 0
        shutil.move(ws.level1, ws.root / "level1.unmounted")
        ws.level1.mkdir()
        expected_reason = "level-1 file not found"

    res = ws.run()
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    streak = re.search(r"2 consecutive failures with the same reason: (.*?); stopped dispatching", res.stderr)
    assert streak and expected_reason in streak.group(1), res.stderr[-2000:]
    assert "Level2Pipeline stopped the run" in res.stderr
    assert re.search(r"Level2Pipeline\s+0\s+0\s+2\s+0 \(FATAL\)", res.stdout), res.stdout
    jobs = jobs_by_obsid(ws)
    all_obsids = {obsid_of(p) for p in small_archive.paths}
    failed = {o for o, j in jobs.items() if j.status == "failed"}
    assert len(failed) == 2 and failed < all_obsids
    assert all(expected_reason in jobs[o].error for o in failed)
    (untried,) = all_obsids - failed
    assert untried not in jobs or jobs[untried].status == "pending"
    assert ws.level2_files() == [] and ws.staging_files() == []
    db = ws.db()
    try:
        assert db.get_observation_snapshot(untried)["summary"]["processing_status"] != "failed"
    finally:
        db.disconnect()

    # the fault is repaired: the next run processes the untried observation and skips the failed ones
    if fault == "disk_full":
        (markers / "disk_full").unlink()
    else:
        ws.level1.rmdir()
        shutil.move(ws.root / "level1.unmounted", ws.level1)
    res2 = ws.run()
    assert res2.returncode == 0, res2.stderr[-2000:]
    jobs = jobs_by_obsid(ws)
    assert jobs[untried].status == "done" and all(jobs[o].status == "failed" for o in failed)
    assert [obsid_of(p) for p in ws.level2_files()] == [untried]
