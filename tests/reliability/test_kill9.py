"""``kill -9`` of a whole run at reproducible points (docs/reliability.md#killed-at-any-point).

A demo-like run (acquisition from a simulated remote, the shipped level-2 chain, the Tau A calibration
model, a continuum map and an RRL cube) on the ``test-small`` archive is killed with SIGKILL at the N-th
occurrence of an event of the test-only fault hook (utils/faults.py, docs/developer.md#fault-injection-hook):
a staging write, a publish, a database commit, a FITS or JSON write, a registered download. Each killed
run is followed by the next one of the chain (resuming the work, and killed in turn at its own point),
and the chain ends with an uninterrupted run. After every kill, every file under a final name opens and
every dataset and HDU reads, and the SQLite database passes ``PRAGMA integrity_check``; after the last
run, the outputs are those of an uninterrupted reference run (provenance stamps aside), with no staging
file left and every job done. Part of the chain runs under ``mpiexec -n 2``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from astropy.io import fits
from conftest import write_demo_like_configs

from modules.scripts.compare_outputs import compare_trees
from utils import faults

REPO = Path(__file__).resolve().parents[2]

# The kill points of the serial chain, in order: each is applied to the next run, which resumes what
# the killed runs left (events are counted from the start of each run, in every process of the run).
# The chain walks through the demo's stages: acquisition, level 2 (staging writes, publish, the
# coordinator's commits), the calibration model, the map and the cube. Every point must be reached
# (the run is asserted to die there); a change that moves the events fails the test with the list of
# events the run saw, from which the points can be chosen again.
SERIAL_POINTS = [
    "acquisition.arrived:1",  # first file arrived and verified, not registered
    "db.committed:2",  # first registration committed
    "acquisition.arrived:2",
    "db.commit:4",  # about to commit the level-2 claim
    "level2.staged:2",  # inside the first observation's staging file
    "level2.staged:8",
    "level2.publish:1",  # staging complete, not yet renamed
    "level2.published:1",  # renamed, the coordinator's transaction not yet made
    "db.commit:5",
    "level2.staged:5",  # second observation
    "level2.published:1",
    "level2.staged:3",  # third observation
    "db.committed:4",
    "level2.publish:1",
    "level2.published:1",
    "calibration.write:1",
    "calibration.written:1",
    "fits.write:1",
    "fits.written:1",
    "cube.write:1",
    "cube.written:1",
]
# Under MPI (two ranks, each reducing observations): during level 2, and after a publish.
MPI_POINTS = ["level2.staged:5", "level2.published:2", "level2.staged:3"]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant (a failed test leaves nothing running)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


class Run:
    """One ``run.py`` of a workspace, possibly killed at a fault point."""

    def __init__(self, root: Path, point: str | None, *, mpi: bool, timeout: float = 180) -> None:
        self.point = point
        self.mpi = mpi
        self.events_file = root / "fault_events.txt"
        self.events_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COMAP_FAULT_")}
        env["PYTHONPATH"] = str(REPO)
        env.pop("COLUMNS", None)
        # One OpenMP thread: threaded sums end in an order that varies from run to run, which makes the
        # destriper residual and segment noise of two identical runs' maps differ in their last bits.
        env["OMP_NUM_THREADS"] = "1"
        env[faults.ENV_COUNTER] = str(self.events_file)
        if point is not None:
            env[faults.ENV_KILL_AT] = point
        cmd = [sys.executable, str(REPO / "run.py"), "main.toml"]
        if mpi:
            from components import mpi_environment, mpiexec_path

            env = mpi_environment(**{k: v for k, v in env.items() if k == "PYTHONPATH" or "FAULT" in k})
            # the shell's pid becomes mpiexec's: the root of the tree the hook kills (ranks have sessions of
            # their own, out of reach of the launcher's process group)
            cmd = ["sh", "-c", f'{faults.ENV_KILL_ROOT}=$$ exec "$@"', "sh", mpiexec_path(), "-n", "2", *cmd]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            self.output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.communicate()
            raise
        finally:
            _kill_tree(proc.pid)
        self.seconds = time.monotonic() - t0
        self.returncode = proc.returncode
        lines = self.events_file.read_text().split("\n") if self.events_file.exists() else []
        self.events = [ln.split(" ")[0] for ln in lines if ln]

    @property
    def killed(self) -> bool:
        """True when the run died by SIGKILL at its point: its event occurred N times (under MPI, the other
        rank may record an event or two of its own while the tree is being stopped)."""
        if self.point is None or self.returncode != -signal.SIGKILL:
            return False
        event, n = self.point.rsplit(":", 1)
        # only the N-th event kills, so N must have been reached; the other rank's own events of the
        # same kind may follow it into the shared count before SIGKILL reaches that rank
        extra = 2 if self.mpi else 0
        return int(n) <= self.events.count(event) <= int(n) + extra

    def describe(self) -> str:
        seen = ", ".join(f"{e}:{self.events[: i + 1].count(e)}" for i, e in enumerate(self.events))
        return f"point {self.point}: exit {self.returncode}; events seen: {seen}\n{self.output[-3000:]}"


def _outputs(root: Path) -> list[Path]:
    """Every file the pipeline leaves under a final name (logs, database and inputs aside; the
    level-2 ``resolved_configs/`` hold one record per run, like the logs)."""
    skip = ("logs", "remote")
    keep = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        per_run = "resolved_configs" in rel.parts
        if p.is_file() and rel.parts[0] not in skip and rel.parent != Path(".") and not per_run:
            keep.append(p)
    return keep


def _hidden(root: Path) -> list[str]:
    """Staging, partial and other hidden files left in the output tree."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and (p.name.startswith(".") or ".partial-" in p.name)
    )


def _read_everything(path: Path) -> None:
    """Open ``path`` by its kind and read every dataset or HDU (raises on a partial file)."""
    if path.suffix in (".hd5", ".h5", ".hdf5"):
        with h5py.File(path, "r") as f:

            def read(_name, obj):
                if isinstance(obj, h5py.Dataset):
                    obj[()]
                for value in obj.attrs.values():
                    np.asarray(value)

            f.visititems(read)
    elif path.suffix == ".fits":
        with fits.open(path, memmap=False) as hdus:
            hdus.verify("exception")
            for hdu in hdus:
                if hdu.data is not None:
                    np.asarray(hdu.data).tobytes()
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".toml":
        tomllib.loads(path.read_text())
    elif path.suffix == ".png":
        from matplotlib.image import imread

        imread(path)


def _check_after_kill(root: Path, label: str) -> None:
    for p in _outputs(root):
        try:
            _read_everything(p)
        except Exception as exc:
            raise AssertionError(
                f"{label}: {p.relative_to(root)} is partial: {type(exc).__name__}: {exc}"
            ) from exc
    if (root / "db.sqlite").exists():
        with sqlite3.connect(root / "db.sqlite") as con:
            assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)], label
            assert con.execute("PRAGMA foreign_key_check").fetchall() == [], label


def _jobs(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "db.sqlite") as con:
        query = "SELECT obsid, stage, status, error FROM processing_jobs ORDER BY stage, obsid"
        return con.execute(query).fetchall()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, small_archive):
    """An uninterrupted run of the demo-like configuration."""
    root = tmp_path_factory.mktemp("kill9-reference")
    write_demo_like_configs(root, small_archive.root, sub_master="nprocess = 1\n")
    run = Run(root, None, mpi=False)
    assert run.returncode == 0, run.output[-3000:]
    return root, run


def _claimed(root: Path) -> set[tuple[int, str, int]]:
    """(obsid, stage, pid) of every job marked running."""
    if not (root / "db.sqlite").exists():
        return set()
    with sqlite3.connect(root / "db.sqlite") as con:
        rows = con.execute("SELECT obsid, stage, pid FROM processing_jobs WHERE status = 'running'")
        return {(int(o), str(s), int(p or 0)) for o, s, p in rows}


def _chain(root: Path, points: list[str], *, mpi: bool) -> list[Run]:
    runs = []
    stale: set[tuple[int, str, int]] = set()
    for point in points:
        run = Run(root, point, mpi=mpi)
        runs.append(run)
        print(run.describe().split("\n", 1)[0][:400], f"({run.seconds:.1f} s)")
        assert run.killed, run.describe()
        _check_after_kill(root, f"after the kill at {point}")
        claimed = _claimed(root)
        if any(e.startswith("level2.") for e in run.events):  # this run claimed its level-2 jobs
            held = {job for job in claimed & stale if job[1] == "level2"}
            assert not held, f"{point}: jobs of a killed run still claimed after the next claim: {held}"
        stale = claimed  # held by the processes just killed
    return runs


def _finish_and_compare(root: Path, reference: Path) -> Run:
    """The uninterrupted last run, and its outputs against the reference run's."""
    final = Run(root, None, mpi=False)
    assert final.returncode == 0, final.output[-3000:]
    _check_after_kill(root, "after the last run")
    assert _hidden(root) == []
    names = [str(p.relative_to(root)) for p in _outputs(root)]
    assert names == [str(p.relative_to(reference)) for p in _outputs(reference)]
    diffs = compare_trees(reference, root, skip=("logs/", "remote/"))
    assert diffs == {}, json.dumps(diffs, indent=1)[:3000]
    jobs = _jobs(root)
    assert jobs == _jobs(reference), jobs
    assert {status for _o, _s, status, _e in jobs} == {"done"}
    return final


def test_killed_at_twenty_points_then_resumed(tmp_path, reference, small_archive):
    """The serial chain: 21 kills over every stage, then the outputs of the reference run."""
    t0 = time.monotonic()
    root = tmp_path / "ws"
    root.mkdir()
    write_demo_like_configs(root, small_archive.root, sub_master="nprocess = 1\n")
    runs = _chain(root, SERIAL_POINTS, mpi=False)
    final = _finish_and_compare(root, reference[0])
    stages = {p.split(".")[0] for p in SERIAL_POINTS}
    assert {"acquisition", "level2", "db", "calibration", "fits", "cube"} <= stages
    print(
        f"{len(runs)} kills survived in {time.monotonic() - t0:.1f} s "
        f"(reference run {reference[1].seconds:.1f} s, last run {final.seconds:.1f} s)"
    )


def test_killed_under_mpi_then_resumed(tmp_path, reference, small_archive):
    """Kills under ``mpiexec -n 2`` while both ranks reduce observations; the last run is serial."""
    t0 = time.monotonic()
    root = tmp_path / "ws"
    root.mkdir()
    write_demo_like_configs(root, small_archive.root, sub_master="nprocess = 1\n")
    runs = _chain(root, MPI_POINTS, mpi=True)
    assert any("on 2 MPI ranks" in r.output for r in runs), runs[0].output[-2000:]
    _finish_and_compare(root, reference[0])
    print(f"{len(runs)} MPI kills survived in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------------------------------
# The pieces: the hook itself, partial files of dead writers
# --------------------------------------------------------------------------------------------------
HOOK_SCRIPT = """
import sys
from utils import faults
for i in range(int(sys.argv[1])):
    faults.checkpoint(sys.argv[2])
print("survived", flush=True)
"""


def _hook(tmp_path: Path, n: int, event: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("COMAP_FAULT_")}
    return subprocess.run(
        [sys.executable, "-c", HOOK_SCRIPT, str(n), event],
        env={**base, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )


def test_the_hook_counts_over_processes_and_kills_at_the_nth_event(tmp_path):
    counter = str(tmp_path / "events")
    assert _hook(tmp_path, 3, "fits.write").stdout == "survived\n"  # off: nothing recorded
    assert not (tmp_path / "events").exists() and not Path(faults.DEFAULT_COUNTER).exists()
    for _ in range(2):  # two processes of one run share the count
        res = _hook(
            tmp_path, 2, "fits.write", COMAP_FAULT_COUNTER=counter, COMAP_FAULT_KILL_AT="fits.write:5"
        )
        assert res.returncode == 0, res.stderr
    res = _hook(tmp_path, 3, "fits.write", COMAP_FAULT_COUNTER=counter, COMAP_FAULT_KILL_AT="fits.write:5")
    assert res.returncode == -signal.SIGKILL and res.stdout == ""
    assert [ln.split()[0] for ln in Path(counter).read_text().splitlines()] == ["fits.write"] * 5
    res = _hook(tmp_path, 1, "fits.write", COMAP_FAULT_KILL_AT="fits.wrote:1")
    assert res.returncode == 1 and "expected <event>:<N>" in res.stderr


def test_partial_files_of_dead_writers_are_removed(tmp_path):
    from modules.pipeline_control import jobs

    final = tmp_path / "calibration_model.json"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    names = [
        f".{final.name}.partial-{dead_pid}",  # a killed run of this host: removed
        f".{final.name}.partial-{jobs.HOST}-{dead_pid}",  # the same, level-2 style: removed
        f".{final.name}.partial-{os.getpid()}",  # a live writer: kept
        f".{final.name}.partial-elsewhere-{dead_pid}",  # another host's: kept
    ]
    for name in names:
        (tmp_path / name).write_text("{")
    removed = jobs.remove_orphaned_partials(final)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_two_runs_of_the_same_second_claim_their_own_files(tmp_path):
    from modules.pipeline_control.run_files import claim

    log = tmp_path / "logs" / "2026-03-01_12-00-00_main.log"
    assert claim(log, "2026-03-01_12-00-00-aaaa1111") == log
    assert claim(log, "2026-03-01_12-00-00-bbbb2222") == log.with_name(
        "2026-03-01_12-00-00_main_bbbb2222.log"
    )
    dump = tmp_path / "logs" / "2026-03-01_12-00-00_main.resolved.toml"
    assert claim(dump, "x-aaaa1111", suffix=".resolved.toml") == dump
    other = claim(dump, "x-bbbb2222", suffix=".resolved.toml")
    assert other.name == "2026-03-01_12-00-00_main_bbbb2222.resolved.toml" and other.exists()
