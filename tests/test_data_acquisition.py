"""DataAcquisition (docs/acquisition.md#dataacquisition, docs/acquisition.md#tests): download with parallel
rsync, verify, quarantine, register.

Remotes are a local directory filled by the simulator, or a real ``rsync --daemon`` on 127.0.0.1
(``rsync_daemon.py``). Wrapper ``rsync`` scripts on a private ``PATH`` inject failures and
interruptions. Retry delays are checked with an injected sleep and jitter source.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import h5py
import pytest
from rsync_daemon import needs_rsync, start_rsync_daemon, write_wrapper

from modules.DataAcquisition.DataAcquisition.DataAcquisition import DataAcquisition
from modules.DataAcquisition.rsync import INSTALL_HINT
from modules.pipeline_control.Pipeline import RunContext
from modules.SQLModule.SQLModule import db

GROUPS = {90101: "Calibrator", 90102: "SkyDip", 90103: "Galactic"}


@pytest.fixture()
def fresh_db(tmp_path):
    db.connect(str(tmp_path / "db.sqlite"))
    yield db
    db.disconnect()


@pytest.fixture(scope="module")
def daemon(small_archive, tmp_path_factory):
    """The test-small archive served read-only by a loopback rsync daemon."""
    with start_rsync_daemon(small_archive.root, tmp_path_factory.mktemp("rsyncd")) as d:
        yield d


class Recorder:
    """Injected sleep: records the delays instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


class FixedJitter:
    """Injected jitter source returning the given fractions in turn."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, a, b):
        assert (a, b) == (-0.3, 0.3)
        return self.values.pop(0)


def make_stage(remote, local_dir, *, obsids=None, retry_failed=False, run_id="run-1", **kwargs):
    stage = DataAcquisition(remote=str(remote), local_dir=str(local_dir), **kwargs)
    stage.context = RunContext(run_id=run_id, obsids=obsids, retry_failed=retry_failed)
    stage.sleep = Recorder()
    return stage


def jobs_by_obsid():
    return {j.obsid: j for j in db.job_table("download")}


def assert_registered(local_dir: Path, archive, obsids):
    rows = {o.obsid: o for o in db.query_observations()}
    assert sorted(rows) == sorted(obsids)
    for path in archive.paths:
        obsid = int(path.name.split("-")[1])
        if obsid not in obsids:
            continue
        local = local_dir / path.relative_to(archive.root)
        assert local.is_file() and local.stat().st_size == path.stat().st_size
        row = rows[obsid]
        assert row.level1_path == str(local.resolve())
        assert os.path.isabs(row.level1_path)
        assert row.level1_size_bytes == path.stat().st_size
        assert row.n_feeds == 3
        assert row.source_group == GROUPS[obsid]
        assert jobs_by_obsid()[obsid].status == "done"


# ------------------------------------------------------------------------------------------------
# download + register; already registered
# ------------------------------------------------------------------------------------------------


@needs_rsync
def test_local_remote_downloads_registers_and_second_run_does_nothing(
    small_archive, tmp_path, fresh_db, caplog
):
    local = tmp_path / "level1"
    stage = make_stage(small_archive.root, local, remote_index="obs_index.csv")
    result = stage.run()
    assert (result.done, result.failed) == (3, 0)
    assert_registered(local, small_archive, [90101, 90102, 90103])
    assert {j.attempts for j in jobs_by_obsid().values()} == {1}
    # nothing half-written or hidden remains
    assert not list(local.rglob(".rsync-partial")) and not list(local.rglob(".quarantine"))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="comap.DataAcquisition"):
        again = make_stage(small_archive.root, local, remote_index="obs_index.csv", run_id="run-2").run()
    assert (again.done, again.failed, again.skipped) == (0, 0, 3)
    assert {j.attempts for j in jobs_by_obsid().values()} == {1}  # claimed nothing
    assert {j.run_id for j in jobs_by_obsid().values()} == {"run-1"}
    summary = [r.getMessage() for r in caplog.records if "summary" in r.getMessage()]
    assert summary and summary[-1].startswith("DataAcquisition summary: 0 file(s), 0.0 MB transferred")
    assert "3 already registered" in summary[-1]


@needs_rsync
def test_daemon_remote_downloads_and_registers(small_archive, daemon, tmp_path, fresh_db, caplog):
    local = tmp_path / "level1"
    with caplog.at_level(logging.INFO, logger="comap.DataAcquisition"):
        result = make_stage(daemon.url, local, remote_index="obs_index.csv", n_rsyncs=2).run()
    assert (result.done, result.failed) == (3, 0)
    assert_registered(local, small_archive, [90101, 90102, 90103])
    summary = next(r.getMessage() for r in caplog.records if "summary" in r.getMessage())
    assert summary.startswith("DataAcquisition summary: 3 file(s), 69.0 MB transferred")
    assert "3 verified, 0 quarantined, 0 failed" in summary
    # files were written with the configured modes, not the remote's owner
    path = next(local.rglob("comap-*.hd5"))
    assert oct(path.stat().st_mode & 0o777) == oct(0o664)


@needs_rsync
def test_source_filters_and_obsid_restriction(small_archive, tmp_path, fresh_db):
    stage = make_stage(
        small_archive.root,
        tmp_path / "l1",
        remote_index="obs_index.csv",
        exclude_source_groups=["SkyDip"],
        obsids=[90101, 90102],
    )
    result = stage.run()
    assert result.done == 1 and result.skipped == 2
    assert db.query_all_obsids() == [90101]


@needs_rsync
def test_done_jobs_are_not_fetched_again_and_size_mismatches_are(tiny_archive, tmp_path, fresh_db):
    local = tmp_path / "level1"
    assert make_stage(tiny_archive.root, local).run().done == 1
    (path,) = local.rglob("comap-*.hd5")
    # the local copy was removed on purpose: the done job keeps it from coming back ...
    path.unlink()
    again = make_stage(tiny_archive.root, local, run_id="run-2").run()
    assert (again.done, again.skipped) == (0, 1) and not path.exists()
    # ... unless --force
    forced = make_stage(tiny_archive.root, local, run_id="run-3")
    forced.context.force = True
    assert forced.run().done == 1 and path.exists()
    # a registered copy with another size than the remote is fetched again without --force
    os.truncate(path, 1000)
    os.utime(path, (0, 0))
    fixed = make_stage(tiny_archive.root, local, run_id="run-4").run()
    assert fixed.done == 1 and path.stat().st_size == tiny_archive.paths[0].stat().st_size
    assert jobs_by_obsid()[90001].attempts == 3


@needs_rsync
def test_a_size_mismatch_fetched_by_another_run_meanwhile_is_not_fetched_twice(
    tiny_archive, tmp_path, fresh_db, monkeypatch
):
    """Two runs see the same mismatched copy; the one that claims second finds the job finished
    since its selection and leaves it (docs/operations.md#job-states)."""
    local = tmp_path / "level1"
    assert make_stage(tiny_archive.root, local).run().done == 1
    (path,) = local.rglob("comap-*.hd5")
    os.truncate(path, 1000)
    os.utime(path, (0, 0))
    late = make_stage(tiny_archive.root, local, run_id="run-late")
    select = type(late)._select

    def select_then_other_run_finishes(self, remote, rsync):
        sel = select(self, remote, rsync)
        if self is late:  # the other run selects, claims and fetches with the real _select
            monkeypatch.setattr(type(late), "_select", select)
            assert make_stage(tiny_archive.root, local, run_id="run-other").run().done == 1
        return sel

    monkeypatch.setattr(type(late), "_select", select_then_other_run_finishes)
    result = late.run()
    assert (result.done, result.skipped) == (0, 1)
    job = jobs_by_obsid()[90001]
    assert (job.run_id, job.attempts) == ("run-other", 2)
    assert path.stat().st_size == tiny_archive.paths[0].stat().st_size


def test_a_verified_download_ends_an_unusable_level1_record(tiny_archive, tmp_path, fresh_db):
    """docs/acquisition.md#unusable-level-1-files: a copy DataAcquisition verifies and registers sets
    the obsid's failed ``level1`` job (written by DataAssess) back to pending, without the error."""
    db.finish_job(90001, "level1", "failed", error="truncated file", last_module="DataAssess")
    assert make_stage(tiny_archive.root, tmp_path / "level1").run().done == 1
    (job,) = db.job_table("level1", obsids=[90001])
    assert (job.status, job.error) == ("pending", None)


# ------------------------------------------------------------------------------------------------
# partial transfers are never complete
# ------------------------------------------------------------------------------------------------


@needs_rsync
def test_interrupted_transfer_leaves_no_final_file_and_resumes(
    small_archive, daemon, tmp_path, fresh_db, monkeypatch
):
    bin_dir = tmp_path / "bin"
    write_wrapper(
        bin_dir,
        'case "$*" in *--files-from=*) exec timeout -s TERM 1 "$REAL_RSYNC" "$@";; esac\n'
        'exec "$REAL_RSYNC" "$@"',
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    local = tmp_path / "level1"
    rel = small_archive["TauA"].relative_to(small_archive.root)
    full = small_archive["TauA"].stat().st_size
    result = make_stage(daemon.url, local, obsids=[90101], bwlimit_kbps=2000, max_retries=0).run()
    assert result.failed == 1 and result.done == 0
    assert not (local / rel).exists()  # never under the final name
    partial = local / rel.parent / ".rsync-partial" / rel.name
    assert partial.is_file() and 0 < partial.stat().st_size < full
    assert db.query_all_obsids() == []  # no DB row
    job = jobs_by_obsid()[90101]
    assert job.status == "failed" and job.error.startswith("rsync exit 124: ")

    monkeypatch.undo()  # the real rsync again
    rerun = make_stage(daemon.url, local, obsids=[90101], retry_failed=True, run_id="run-2").run()
    assert (rerun.done, rerun.failed, rerun.retried) == (1, 0, 1)
    assert (local / rel).stat().st_size == full
    assert not partial.exists()
    assert jobs_by_obsid()[90101].status == "done" and jobs_by_obsid()[90101].attempts == 2
    assert db.query_data(90101).level1_path == str((local / rel).resolve())


# ------------------------------------------------------------------------------------------------
# verification and quarantine
# ------------------------------------------------------------------------------------------------


@needs_rsync
def test_truncated_and_mismatched_files_are_quarantined(small_archive, tmp_path, fresh_db):
    remote = tmp_path / "remote" / "2026-03"
    remote.mkdir(parents=True)
    good = small_archive["TauA"]
    shutil.copyfile(good, remote / good.name)
    truncated = remote / small_archive["SkyDip"].name
    shutil.copyfile(small_archive["SkyDip"], truncated)
    os.truncate(truncated, truncated.stat().st_size // 2)
    mismatch = remote / small_archive["GField30"].name.replace("0090103", "0090104")
    shutil.copyfile(small_archive["GField30"], mismatch)

    local = tmp_path / "level1"
    result = make_stage(tmp_path / "remote", local).run()
    assert (result.done, result.failed) == (1, 2)
    jobs = jobs_by_obsid()
    assert jobs[90101].status == "done" and db.query_all_obsids() == [90101]
    assert jobs[90102].status == "failed"
    assert jobs[90102].error.startswith(
        f"cannot open level-1 file {local.resolve()}/2026-03/{truncated.name}"
    )
    assert "truncated file" in jobs[90102].error
    assert jobs[90104].status == "failed"
    assert jobs[90104].error == "obsid mismatch: file name says 90104, /comap.obsid says 90103"
    for name in (truncated.name, mismatch.name):
        assert not (local / "2026-03" / name).exists()
        assert (local / ".quarantine" / "2026-03" / name).is_file()
    assert (local / "2026-03" / good.name).is_file()


# ------------------------------------------------------------------------------------------------
# retries and exit codes
# ------------------------------------------------------------------------------------------------

FAILING = """
case "$*" in *--files-from=*)
  n=$(cat "$COMAP_TEST_COUNTER" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "$COMAP_TEST_COUNTER"
  if [ "$n" -le "$COMAP_TEST_FAILS" ]; then
    echo "rsync: [Receiver] failed to connect to 127.0.0.1 (127.0.0.1): Connection refused (111)" >&2
    echo "rsync error: $COMAP_TEST_TEXT" >&2
    exit "$COMAP_TEST_CODE"
  fi;;
esac
exec "$REAL_RSYNC" "$@"
"""


@pytest.fixture()
def failing_rsync(tmp_path, monkeypatch):
    """Wrapper rsync: the first $COMAP_TEST_FAILS transfers exit $COMAP_TEST_CODE; returns a setter."""
    bin_dir = tmp_path / "bin"
    write_wrapper(bin_dir, FAILING)
    counter = tmp_path / "counter"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("COMAP_TEST_COUNTER", str(counter))

    def configure(
        fails: int, code: int = 10, text: str = "error in socket IO (code 10) at clientserver.c(139)"
    ):
        monkeypatch.setenv("COMAP_TEST_FAILS", str(fails))
        monkeypatch.setenv("COMAP_TEST_CODE", str(code))
        monkeypatch.setenv("COMAP_TEST_TEXT", text)
        counter.unlink(missing_ok=True)
        return lambda: int(counter.read_text()) if counter.exists() else 0

    return configure


@needs_rsync
def test_connection_error_once_then_success(tiny_archive, tmp_path, fresh_db, failing_rsync):
    attempts = failing_rsync(fails=1)
    stage = make_stage(tiny_archive.root, tmp_path / "l1", retry_delay_s=10.0, backoff_factor=2.0)
    stage.rng = FixedJitter([0.3])
    result = stage.run()
    assert (result.done, result.failed) == (1, 0)
    assert attempts() == 2
    assert stage.sleep.delays == pytest.approx([13.0])
    assert jobs_by_obsid()[90001].status == "done"


@needs_rsync
def test_connection_error_always_fails_after_max_retries_with_backoff(
    tiny_archive, tmp_path, fresh_db, failing_rsync
):
    attempts = failing_rsync(fails=99)
    stage = make_stage(
        tiny_archive.root, tmp_path / "l1", max_retries=3, retry_delay_s=10.0, backoff_factor=2.0
    )
    stage.rng = FixedJitter([0.3, -0.3, 0.1])
    result = stage.run()
    assert (result.done, result.failed) == (0, 1)
    assert attempts() == 4  # first attempt + max_retries
    assert stage.sleep.delays == pytest.approx([10 * 1.3, 20 * 0.7, 40 * 1.1])
    job = jobs_by_obsid()[90001]
    assert job.status == "failed"
    assert job.error == "rsync exit 10: rsync error: error in socket IO (code 10) at clientserver.c(139)"
    assert db.query_all_obsids() == []

    # random jitter stays within ±30 % of the backoff schedule
    attempts = failing_rsync(fails=99)
    stage = make_stage(
        tiny_archive.root, tmp_path / "l1", max_retries=4, retry_delay_s=1.5, backoff_factor=3.0
    )
    stage.rng = random.Random(7)
    stage.context.retry_failed = True
    stage.run()
    bases = [1.5 * 3.0**k for k in range(4)]
    assert len(stage.sleep.delays) == 4
    assert all(0.7 * b <= d <= 1.3 * b for d, b in zip(stage.sleep.delays, bases))


@needs_rsync
def test_partial_transfer_code_retries_once_without_backoff(tiny_archive, tmp_path, fresh_db, failing_rsync):
    attempts = failing_rsync(fails=1, code=23, text="some files/attrs were not transferred (code 23)")
    stage = make_stage(tiny_archive.root, tmp_path / "l1")
    assert stage.run().done == 1
    assert attempts() == 2 and stage.sleep.delays == []


@needs_rsync
def test_vanished_files_fail_after_one_extra_attempt(tiny_archive, tmp_path, fresh_db, failing_rsync):
    attempts = failing_rsync(
        fails=99, code=24, text="some files vanished before they could be transferred (code 24)"
    )
    stage = make_stage(tiny_archive.root, tmp_path / "l1", max_retries=3)
    result = stage.run()
    assert result.failed == 1
    assert attempts() == 2 and stage.sleep.delays == []
    assert jobs_by_obsid()[90001].error.startswith("rsync exit 24: rsync error: some files vanished")


# ------------------------------------------------------------------------------------------------
# path traversal in the listing
# ------------------------------------------------------------------------------------------------


@needs_rsync
def test_listing_with_traversal_entries_writes_nothing_outside_local_dir(
    tiny_archive, tmp_path, fresh_db, monkeypatch
):
    (good,) = tiny_archive.paths
    rel = good.relative_to(tiny_archive.root).as_posix()
    size = good.stat().st_size
    listing = tmp_path / "listing.txt"
    listing.write_text(
        "drwxr-xr-x          4,096 2026/03/01 12:00:00 .\n"
        f"-rw-r--r--     {size:>10,} 2026/03/01 14:31:58 {rel}\n"
        "-rw-r--r--          1,000 2026/03/01 14:31:58 ../x.hd5\n"
        "-rw-r--r--          1,000 2026/03/01 14:31:58 a/../../comap-0000001-2026-01-01-000000.hd5\n"
        "-rw-r--r--          1,000 2026/03/01 14:31:58 -rf\n"
    )
    bin_dir = tmp_path / "bin"
    write_wrapper(
        bin_dir, f'case "$*" in *--list-only*) cat "{listing}"; exit 0;; esac\nexec "$REAL_RSYNC" "$@"'
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    local = work / "level1"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = make_stage(tiny_archive.root, local).run()
    assert (result.done, result.failed, result.skipped) == (1, 0, 3)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert new and all(p.parts[:2] == ("work", "level1") or p == Path("work") for p in new), new
    assert not (tmp_path / "x.hd5").exists() and not Path("/comap-0000001-2026-01-01-000000.hd5").exists()


# ------------------------------------------------------------------------------------------------
# dry run; rsync absent
# ------------------------------------------------------------------------------------------------


@needs_rsync
def test_dry_run_writes_nothing_and_prints_the_plan(small_archive, tmp_path, fresh_db, capsys):
    local = tmp_path / "level1"
    local.mkdir()
    result = make_stage(small_archive.root, local, dry_run=True).run()
    out = capsys.readouterr().out
    assert "3 file(s) to download (69.0 MB) in 2 batch(es) (dry run" in out
    assert "batch 0:" in out and "batch 1:" in out
    assert "rsync --dry-run would transfer 3 file(s)" in out
    assert result.done == 0 and result.failed == 0
    assert list(local.rglob("*")) == []
    assert db.query_all_obsids() == [] and db.job_table(None) == []


def test_without_rsync_local_remote_uses_the_python_copy(
    small_archive, tmp_path, fresh_db, monkeypatch, caplog
):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    local = tmp_path / "level1"
    with caplog.at_level(logging.INFO):
        result = make_stage(small_archive.root, local, remote_index="obs_index.csv").run()
    assert (result.done, result.failed) == (3, 0)
    assert_registered(local, small_archive, [90101, 90102, 90103])
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "comap.DataAcquisition"
    ]
    assert len(warnings) == 1 and warnings[0].startswith("rsync not found on PATH")
    assert not [p for p in local.rglob(".*")]  # no temporary names left
    with h5py.File(next(local.rglob("comap-*.hd5")), "r") as f:
        assert "comap" in f

    caplog.clear()
    ssh = make_stage("comap@archive.example:level1/", tmp_path / "l2").run()
    assert ssh.failed == 1 and ssh.failures == [("comap@archive.example:level1/", INSTALL_HINT)]
    assert INSTALL_HINT == (
        "rsync not found on PATH; install it "
        "(apt-get install rsync, conda install rsync or brew install rsync)"
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [INSTALL_HINT]
    assert not (tmp_path / "l2").exists()


# ------------------------------------------------------------------------------------------------
# configuration and the demo pipeline
# ------------------------------------------------------------------------------------------------


def test_validate_config(tmp_path):
    from modules.pipeline_control.config import class_parameters

    params = {n: p.default for n, p in class_parameters(DataAcquisition)[0].items()}
    (tmp_path / "remote").mkdir()
    params.update(remote=str(tmp_path / "remote"), local_dir=str(tmp_path / "l1"))
    assert DataAcquisition.validate_config(params) == []
    bad = dict(params, n_rsyncs=0, backoff_factor=0.5, bwlimit_kbps=0, partial_dir="../p", file_mode="F664;x")
    problems = DataAcquisition.validate_config(bad)
    assert len(problems) == 5, problems
    overlap = dict(params, local_dir=str(tmp_path / "remote" / "sub"))
    assert "overlaps the remote directory" in DataAcquisition.validate_config(overlap)[0]


@needs_rsync
def test_demo_style_pipeline_through_run_py(tiny_archive, workspace_factory):
    """DataCheckRemote → DataAcquisition → DataAssess from demo/remote/ into demo/level1 via run.py."""
    ws = workspace_factory([])
    stages = [
        "modules.DataAcquisition.DataCheckRemote.DataCheckRemote.DataCheckRemote(remote='demo/remote/', "
        "local_dir='demo/level1', remote_index='obs_index.csv')",
        "modules.DataAcquisition.DataAcquisition.DataAcquisition.DataAcquisition(remote='demo/remote/', "
        "local_dir='demo/level1', remote_index='obs_index.csv')",
        "modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=['demo/level1'], "
        "level2_data_paths=['demo/level2'])",
    ]
    (ws.root / "main.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        + "".join(f"  {s!r},\n" for s in stages)
        + "]\n"
    )
    missing = ws.run()
    assert missing.returncode == 2
    hint = "run make demo or python -m utils.simulator archive --preset demo --out demo/remote"
    lines = [ln for ln in missing.stderr.splitlines() if ln.startswith("ConfigError")]
    assert lines and all(hint in ln for ln in lines), missing.stderr
    assert not (ws.root / "demo").exists() and not ws.db_path.exists()

    shutil.copytree(tiny_archive.root, ws.root / "demo" / "remote")
    plan = ws.run("--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "DataAcquisition: demo/remote/ -> demo/level1: 1 listed, 1 file(s) to download" in plan.stdout
    assert "DataCheckRemote: demo/remote/: 1 listed, 1 new" in plan.stdout
    assert not (ws.root / "demo" / "level1").exists() and not ws.db_path.exists()
    done = ws.run()
    assert done.returncode == 0, done.stderr
    assert "DataAcquisition" in done.stdout
    assert list((ws.root / "logs" / "acquisition").glob("remote_check_*.json"))
    db_ = ws.db()
    (obs,) = db_.query_observations()
    assert obs.level1_path == str(
        (ws.root / "demo" / "level1" / tiny_archive.paths[0].relative_to(tiny_archive.root)).resolve()
    )
    assert [j.status for j in db_.job_table("download")] == ["done"]
    db_.disconnect()
