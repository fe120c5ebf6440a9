"""Transient I/O errors and full disks (docs/reliability.md#transient-io-errors-and-full-disks).

(a) EAGAIN / ESTALE injected into the level-1 opens and the TOD block reads (both the HDF5 reads and
    the direct ``preadv`` reads) are retried and the observation reduces to the same bytes; more
    failures than the retry budget fail the observation with one reason.
(b) A level-2 write on a real full file system (a small tmpfs) fails the observation with one
    reason and leaves nothing behind; the next run, with space, completes.
(c) The same for a FITS map.
(d) Acquisition checks the free space before it fetches anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
from conftest import LEVEL2_THROUGH_NOISE_STATS, default_level2_modules

from modules.ProcessLevel2.observation import reduce_in_process

IN_USERNS = "COMAP_TEST_IN_USERNS"


# --------------------------------------------------------------------------------------------------
# A real full file system
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of ``size`` (e.g. ``"256k"``) mounted on ``path`` for the block (needs root)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def resize_tmpfs(path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, timeout=30)


@pytest.fixture
def can_mount(request):
    """Run the test where it can mount a tmpfs: as root (CI) here; otherwise the test runs again in a
    user and mount namespace (``unshare --user --map-root-user --mount``) and its outcome is that
    run's. Skips only when neither is possible."""
    if os.geteuid() == 0:
        return
    if os.environ.get(IN_USERNS):
        pytest.fail("not root inside the user namespace")
    unshare = shutil.which("unshare")
    ns = [unshare or "unshare", "--user", "--map-root-user", "--mount"]
    if unshare is None or subprocess.run([*ns, "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("needs root, or unprivileged user namespaces, to mount a small tmpfs")
    node = f"{request.node.path}::{request.node.name}"
    child = subprocess.run(
        [*ns, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        capture_output=True,
        text=True,
        env=dict(os.environ, **{IN_USERNS: "1"}),
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-2000:]
    pytest.skip("passed in a user namespace (outcome of the run there)")


def level2_jobs(ws) -> dict:
    db = ws.db()
    try:
        return {j.obsid: j for j in db.job_table("level2")}
    finally:
        db.disconnect()


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("ERROR")]


# --------------------------------------------------------------------------------------------------
# (a) transient errors in level-1 opens and reads
# --------------------------------------------------------------------------------------------------
def failing_level1_io(monkeypatch, level1, code: int, k: int) -> dict:
    """Make the first ``k`` level-1 opens, HDF5 TOD reads and direct TOD reads fail with ``code``."""
    import utils.kernels.direct_io as direct_io

    import utils.h5io as h5io
    import utils.level1 as level1_mod

    left = {"open": k, "hdf5": k, "direct": k}
    real_file, real_hyperslab, real_runs = h5py.File, level1_mod.read_hyperslab, direct_io.read_runs

    def file(name, *args, **kwargs):
        if isinstance(name, str) and os.path.samefile(name, level1) and left["open"] > 0:
            left["open"] -= 1
            raise OSError(code, os.strerror(code))
        return real_file(name, *args, **kwargs)

    def hyperslab(*args, **kwargs):
        if left["hdf5"] > 0:
            left["hdf5"] -= 1
            raise OSError(code, f"Can't synchronously read data (file read failed: errno = {code})")
        return real_hyperslab(*args, **kwargs)

    def runs(fd, dest, file_pos, dest_pos, length, err=None, max_gap=0):
        if left["direct"] > 0:
            left["direct"] -= 1
            err[0] = code
            return -1
        return real_runs(fd, dest, file_pos, dest_pos, length, err, max_gap)

    monkeypatch.setattr(h5py, "File", file)
    monkeypatch.setattr(level1_mod, "read_hyperslab", hyperslab)
    monkeypatch.setattr(direct_io, "read_runs", runs)
    monkeypatch.setattr(h5io, "sleep", lambda s: None)
    return left


def assert_same_level2(a, b) -> None:
    """Every dataset and attribute of two level-2 files equal (NaN equal to NaN), time stamps apart."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b
        for name in ["/", *names_a]:
            oa, ob = fa[name], fb[name]
            assert sorted(oa.attrs) == sorted(ob.attrs), name
            for key in oa.attrs:
                if not key.endswith("_utc"):
                    va, vb = np.asarray(oa.attrs[key]), np.asarray(ob.attrs[key])
                    assert va.shape == vb.shape and np.array_equal(va, vb, equal_nan=va.dtype.kind == "f"), (
                        name,
                        key,
                    )
            if isinstance(oa, h5py.Dataset):
                va, vb = oa[...], ob[...]
                nan_ok = va.dtype.kind in "fc"
                assert va.dtype == vb.dtype and np.array_equal(va, vb, equal_nan=nan_ok), name


@pytest.fixture(scope="module")
def undisturbed_level2(tiny_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("undisturbed")
    path, _ctx, _ops = reduce_in_process(tiny_archive.paths[0], out, default_level2_modules())
    return path


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.ESTALE], ids=["EAGAIN", "ESTALE"])
def test_transient_level1_errors_are_retried_and_change_nothing(
    code, tiny_archive, undisturbed_level2, tmp_path, monkeypatch, caplog
):
    level1 = tiny_archive.paths[0]
    k = 2  # within the default budget of 5 retries
    left = failing_level1_io(monkeypatch, level1, code, k)
    caplog.set_level(logging.WARNING, logger="comap.h5io")
    path, _ctx, _ops = reduce_in_process(level1, tmp_path, default_level2_modules())
    assert left == {"open": 0, "hdf5": 0, "direct": 0}  # every kind of call was hit k times
    assert_same_level2(path, undisturbed_level2)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "comap.h5io"
    ]
    assert len(warnings) == 3 * k, warnings  # one per retry
    cause = f"[Errno {code}] {os.strerror(code)}"
    assert all(str(level1) in w and cause in w for w in warnings), warnings
    assert sum(w.startswith("transient error opening ") for w in warnings) == k
    reads = [w for w in warnings if w.startswith("transient error reading ")]
    assert len(reads) == 2 * k  # the HDF5 reads (TOD, pointing) and the direct TOD reads
    assert sum(w.startswith("transient error reading spectrometer/tod of ") for w in reads) >= k


INJECT = textwrap.dedent(
    """
    # Fault injection of tests/reliability/test_transient_io.py: every direct TOD read fails.
    import errno, os
    if os.environ.get("COMAP_TEST_FAIL_DIRECT_READS"):
        import utils.h5io
        import utils.kernels.direct_io as direct_io

        def read_runs(fd, dest, file_pos, dest_pos, length, err=None, max_gap=0):
            err[0] = errno.ESTALE
            return -1

        direct_io.read_runs = read_runs
        utils.h5io.sleep = lambda s: None
    """
)


def test_read_failing_beyond_the_retry_budget_fails_the_observation_cleanly(
    workspace_factory, tiny_archive, monkeypatch
):
    ws = workspace_factory(tiny_archive.paths)
    inject = ws.root / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    ws.extra_path.append(str(inject))
    ws.write_configs(LEVEL2_THROUGH_NOISE_STATS)
    monkeypatch.setenv("COMAP_TEST_FAIL_DIRECT_READS", "1")
    res = ws.run(timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    ((obsid, job),) = level2_jobs(ws).items()
    level1 = ws.level1 / tiny_archive.paths[0].name
    reason = (
        f"ObsID {obsid}: reading spectrometer/tod of {level1}: failed 6 times: "
        f"[Errno {errno.ESTALE}] {os.strerror(errno.ESTALE)}"
    )
    assert job.status == "failed" and job.error.endswith(reason), job.error
    errors = error_lines(res.stderr)
    assert len(errors) == 1 and errors[0].endswith(reason), errors
    assert sum("transient error reading spectrometer/tod" in ln for ln in res.stderr.splitlines()) == 5
    assert ws.level2_files() == [] and ws.staging_files() == []


# --------------------------------------------------------------------------------------------------
# (b) a full disk while writing level 2
# --------------------------------------------------------------------------------------------------
def test_full_disk_while_writing_level2_fails_cleanly_then_resumes(
    can_mount, workspace_factory, tiny_archive
):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs()  # the default level-2 list writes ~0.6 MB for this observation
    with small_tmpfs(ws.root / "level2", "256k") as level2:
        res = ws.run(timeout=300)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr
        ((obsid, job),) = level2_jobs(ws).items()
        assert job.status == "failed"
        assert job.error.startswith("CreateLevel2File: no space left on device writing ")
        final = job.error.split(" writing ", 1)[1]
        assert final.startswith(str(level2)) and os.path.basename(final).startswith("Level2_")
        errors = error_lines(res.stderr)
        assert errors == [f"ERROR [{obsid:07d}] {job.error}"], errors
        assert ws.level2_files() == [] and ws.staging_files() == []
        # nothing but the run's resolved sub-config (a per-run record, written before any observation)
        left = [p.relative_to(level2) for p in level2.rglob("*") if p.is_file()]
        assert [p for p in left if p.parts[0] != "resolved_configs"] == [], left
        # with space again the failed observation is reduced
        resize_tmpfs(level2, "16m")
        again = ws.run("--retry-failed", timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert len(ws.level2_files()) == 1 and ws.staging_files() == []
        assert level2_jobs(ws)[obsid].status == "done"


# --------------------------------------------------------------------------------------------------
# (c) a full disk while writing a map
# --------------------------------------------------------------------------------------------------
HIT_MAP = "modules.MapMaking.MapMakingModules.CreateHitMap.CreateHitMap"


def test_full_disk_while_writing_a_map_fails_that_map_cleanly(can_mount, workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs(
        LEVEL2_THROUGH_NOISE_STATS,
        extra_stages=["modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')"],
    )
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{HIT_MAP}(map_name='H', source='GField30', band=1, channel=0)\",\n"
        "]\n"
        # the tiny archive has no calibrator observation, so no calibration model can be made
        f"[{HIT_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\n"
    )
    with small_tmpfs(ws.root / "maps", "8k") as maps:
        res = ws.run(timeout=300)
        assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
        assert "Traceback" not in res.stderr
        name = "H_band1_ch0_feed01to02_hits.fits"
        reason = f"no space left on device writing maps/{name}"  # as the job names it
        assert f"1 × MapMaking: {reason}" in res.stdout, res.stdout[-2000:]
        errors = error_lines(res.stderr)
        assert len(errors) == 1 and errors[0].endswith(reason), errors
        assert [p.name for p in maps.iterdir()] == []  # no map, no partial file
        resize_tmpfs(maps, "16m")
        again = ws.run(timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert (maps / name).is_file() and not list(maps.glob("*.partial-*"))


# --------------------------------------------------------------------------------------------------
# (d) acquisition's free-space check
# --------------------------------------------------------------------------------------------------
def test_acquisition_stops_before_filling_the_disk(can_mount, workspace_factory, tiny_archive):
    ws = workspace_factory([])
    shutil.copytree(tiny_archive.root, ws.root / "remote")
    acquisition = (
        "modules.DataAcquisition.DataAcquisition.DataAcquisition.DataAcquisition(remote='remote/', "
        "local_dir='level1', remote_index='obs_index.csv')"
    )
    (ws.root / "main.toml").write_text(
        f"[Master]\nsql_database = 'db.sqlite'\npipeline = [{acquisition!r}]\n"
    )
    size = sum(p.stat().st_size for p in tiny_archive.paths)
    # room for the file, not for the default margin of 1 GB
    with small_tmpfs(ws.root / "level1", "16m") as level1:
        res = ws.run(timeout=300)
        assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-3000:]
        free = shutil.disk_usage(level1).free
        assert size < free < size + 1e9
        errors = error_lines(res.stderr)
        assert len(errors) == 1, errors
        assert errors[0].startswith(
            "ERROR [-] runner: DataAcquisition stopped the run: not enough free space in level1: "
        )
        assert f"({size / 1e6:.1f} MB to fetch + 1.0 GB margin)" in errors[0], errors[0]
        assert "Traceback" not in res.stderr
        assert [p for p in level1.rglob("*")] == []  # nothing fetched
        db = ws.db()
        try:
            assert {j.status for j in db.job_table("download")} <= {"pending"}  # claims returned
        finally:
            db.disconnect()


def test_byte_counts_read_in_decimal_units():
    """The free-space line's sizes (docs/reliability.md#full-disks)."""
    from utils.disk import format_bytes

    sizes = (0, 999, 1000, 7.1e6, 16.8e6, 1e9, 999.9e9, 1.5e12)
    assert [format_bytes(n) for n in sizes] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "7.1 MB",
        "16.8 MB",
        "1.0 GB",
        "999.9 GB",
        "1.5 TB",
    ]
