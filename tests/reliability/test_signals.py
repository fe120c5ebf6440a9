"""Signals a scheduler, a terminal or an operator sends to a run (docs/reliability.md#signals).

Each test drives one way of running (serial, a local pool of two workers, ``mpiexec -n 2``) through a
sequence of runs of the same workspace, each stopped by a signal at a chosen point, and after each
checks what the page promises: the exit status (128 + signum, or 75 for the SIGUSR1 drain), no job
of the run left ``running``, no staging file left, no process of the run alive once the coordinator
has exited. The last run completes and every observation ends ``done``.

The points are reached by events, not by sleeping: a test stage and a test level-2 module wait while
a marker file exists, after writing a marker of their own:

* ``between stages`` — DataAssess is done, a stage before Level2Pipeline is running;
* ``staging`` — every worker holds an observation whose staging file is written, nothing published;
* ``published`` — the first observation is published and recorded, the second is held.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from components import mpi_environment, mpiexec_path

from modules.pipeline_control import signals
from modules.pipeline_control.executors import LocalPoolExecutor

REPO = Path(__file__).resolve().parents[2]

HOLD_PACKAGE = '''
import os
import time
from pathlib import Path

from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File


class HoldingCreateLevel2File(CreateLevel2File):
    """CreateLevel2File that, once its staging file is written, waits while markers/hold_<obsid> or
    markers/hold_all exists (test only)."""

    def __init__(self, output_dir: str = "level2", marker_dir: str = "markers"):
        super().__init__(output_dir=output_dir)
        self.marker_dir = marker_dir

    def run(self, file_info):
        super().run(file_info)
        markers = Path(self.marker_dir)
        holds = (markers / f"hold_{file_info.obsid}", markers / "hold_all")
        if any(h.exists() for h in holds):
            (markers / f"started_{file_info.obsid}").write_text(str(os.getpid()))
            while any(h.exists() for h in holds):
                time.sleep(0.02)


class HoldStage(PipelineStage):
    """A top-level stage that writes markers/<name>_ran and waits while markers/<name>_hold exists."""

    def __init__(self, name: str = "stage", marker_dir: str = "markers"):
        self.name, self.marker_dir = name, marker_dir

    def run(self):
        markers = Path(self.marker_dir)
        (markers / f"{self.name}_ran").write_text(str(os.getpid()))
        while (markers / f"{self.name}_hold").exists():
            time.sleep(0.02)
        return StageResult(stage=f"HoldStage {self.name}", done=1)
'''

ASSESS = (
    "modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=['level1'], "
    "level2_data_paths=['level2'])"
)
CHECK = "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()"
HOLDING = "mylab_sigtest.hold.HoldingCreateLevel2File(output_dir='level2', marker_dir='markers')"
PIPELINE = [
    ASSESS,
    "mylab_sigtest.hold.HoldStage(name='before')",
    "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='l2.toml')",
    "mylab_sigtest.hold.HoldStage(name='after')",
]
TIMEOUT_S = 90.0
"""Longest wait for a point of the run or for the run to end, s (a loaded 2-core machine)."""


@pytest.fixture()
def ws(workspace_factory, small_archive, tmp_path):
    """Two observations (TauA, GField30), the level-2 modules a user gets with CreateLevel2File made
    to hold on markers, and a stage before and after Level2Pipeline."""
    pkg = tmp_path / "pkgs" / "mylab_sigtest"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "hold.py").write_text(HOLD_PACKAGE)
    ws = workspace_factory([small_archive["TauA"], small_archive["GField30"]])
    ws.extra_path.append(str(pkg.parent))
    (ws.root / "markers").mkdir()
    (ws.root / "main.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nmodule_paths = ['mylab_sigtest.']\npipeline = [\n"
        + "".join(f"  {s!r},\n" for s in PIPELINE)
        + "]\n"
    )
    (ws.root / "l2.toml").write_text(
        f"[Master]\nsql_database = 'db.sqlite'\npipeline = [\n  {CHECK!r},\n  {HOLDING!r},\n]\n"
    )
    ws.runs = []
    ws.obsids = sorted(int(Path(p).name[6:13]) for p in (small_archive["TauA"], small_archive["GField30"]))
    yield ws
    for run in ws.runs:  # a failed test must not leave its run behind
        if run.proc.poll() is None:
            run.kill()


# --------------------------------------------------------------------------------------------------
# Running and observing
# --------------------------------------------------------------------------------------------------


class Run:
    """One ``run.py`` (or ``mpiexec -n 2 run.py``) in its own session, output to ``run<n>.out``."""

    count = 0

    def __init__(self, ws, mode: str) -> None:
        Run.count += 1
        self.ws, self.mode = ws, mode
        self.out_path = ws.root / f"run{Run.count}.out"
        if mode == "mpi":
            cmd = [mpiexec_path(), "-n", "2", sys.executable, str(REPO / "run.py"), "main.toml"]
            env = mpi_environment(PYTHONPATH=ws.env()["PYTHONPATH"])
        else:
            cmd = [sys.executable, str(REPO / "run.py"), "main.toml"]
            cmd += ["--nprocess", "2" if mode == "pool" else "1"]
            env = ws.env()
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ws.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.tree: list[psutil.Process] = []
        self.published_before = published(ws)
        ws.runs.append(self)

    @property
    def output(self) -> str:
        return self.out_path.read_text()

    def wait_for(self, what: str, ready) -> None:
        """Poll ``ready()`` until true; fail (and end the run) if the run exits or time runs out."""
        deadline = time.monotonic() + TIMEOUT_S
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{self.mode}: never reached '{what}'\n{self.output[-3000:]}")
            time.sleep(0.05)
        self.tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]

    def send(self, signum: int, *, to: str = "coordinator") -> None:
        """``to``: the coordinator (or mpiexec); its process ``group``; ``all`` its processes, as Slurm
        signals the processes of a job step (under MPI every rank gets the signal at once)."""
        if to == "group":
            os.killpg(self.proc.pid, signum)
        elif to == "all":
            for p in self.tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.send_signal(signum)
        else:
            self.proc.send_signal(signum)

    def finish(self) -> int:
        """Wait for the run to end; return its exit status after checking that none of its processes
        seen at the last point outlives it by more than a second."""
        try:
            code = self.proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.mode}: the run did not end\n{self.output[-3000:]}")
        _gone, alive = psutil.wait_procs(self.tree[1:], timeout=1.0)
        alive = [p for p in alive if _alive(p)]
        for p in alive:
            p.kill()
        assert not alive, f"{self.mode}: processes outlived the run: {alive}\n{self.output[-3000:]}"
        return code

    def kill(self) -> None:
        for p in self.tree[1:]:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def jobs(ws) -> dict[int, str]:
    """obsid → status of the level-2 jobs (empty before the first run made the database)."""
    if not ws.db_path.exists():
        return {}
    with sqlite3.connect(ws.db_path) as con:
        try:
            rows = con.execute("SELECT obsid, status FROM processing_jobs WHERE stage = 'level2'").fetchall()
        except sqlite3.OperationalError:  # the first run is still creating the tables
            return {}
    return {int(o): s for o, s in rows}


def published(ws) -> set[int]:
    return {int(p.name.split("-")[1]) for p in ws.level2_files()}


def markers(ws) -> Path:
    return ws.root / "markers"


def hold(ws, *names: str) -> None:
    for name in names:
        (markers(ws) / name).write_text("")


def release(ws) -> None:
    for p in markers(ws).iterdir():
        p.unlink()


def started(ws) -> set[int]:
    return {int(p.name.split("_")[1]) for p in markers(ws).glob("started_*")}


def workers(mode: str) -> int:
    return 1 if mode == "serial" else 2


# --------------------------------------------------------------------------------------------------
# The points of a run, and a stop signal at each
# --------------------------------------------------------------------------------------------------


def between_stages(ws, run: Run) -> None:
    hold(ws, "before_hold")
    run.wait_for("between stages", lambda: (markers(ws) / "before_ran").exists())


def staging(ws, run: Run) -> None:
    hold(ws, "hold_all")
    n = min(workers(run.mode), len([o for o in ws.obsids if jobs(ws).get(o) != "done"]))
    run.wait_for("staging files written", lambda: len(started(ws)) == n)
    assert ws.staging_files() and not published(ws) - run.published_before


def first_published(ws, run: Run) -> None:
    first, second = ws.obsids
    hold(ws, f"hold_{second}")
    run.wait_for("first file published", lambda: second in started(ws) and jobs(ws).get(first) == "done")
    assert first in published(ws)


def interrupted(ws, mode: str, point, signum: int, *, group: bool = False) -> None:
    """Start a run, stop it with ``signum`` at ``point`` and check what it leaves."""
    run = Run(ws, mode)
    point(ws, run)
    run.send(signum, to="group" if group else "coordinator")
    code = run.finish()
    release(ws)
    what = f"{mode}: {signal.Signals(signum).name}{' to the group' if group else ''} at {point.__name__}"
    assert code == 128 + signum, f"{what}: exit {code}\n{run.output[-3000:]}"
    assert "running" not in jobs(ws).values(), f"{what}: {jobs(ws)}"
    assert ws.staging_files() == [], what
    assert "Traceback" not in run.output, f"{what}\n{run.output[-3000:]}"
    if point is not between_stages:
        assert "jobs returned to pending" in run.output, run.output[-3000:]


def coordinator_killed(ws, mode: str) -> None:
    """SIGKILL to the coordinator alone while its workers hold observations: the workers die with it;
    the jobs stay ``running`` and the staging files stay, for the next run to take back and remove."""
    run = Run(ws, mode)
    staging(ws, run)
    held = started(ws)
    run.send(signal.SIGKILL)
    code = run.finish()
    release(ws)
    assert code == -signal.SIGKILL
    assert {jobs(ws)[o] for o in held} == {"running"} and ws.staging_files()


def drained(ws, mode: str, *, to: str = "coordinator") -> None:
    """SIGUSR1 while every worker holds an observation: those finish, nothing new starts, the run stops
    after Level2Pipeline with exit 75."""
    run = Run(ws, mode)
    todo = {o for o, s in jobs(ws).items() if s != "done"} or set(ws.obsids)
    staging(ws, run)
    in_hand = set(started(ws))
    run.send(signal.SIGUSR1, to=to)  # delivered before the workers can see their markers go
    release(ws)
    code = run.finish()
    assert code == 75, f"{mode}: SIGUSR1: exit {code}\n{run.output[-3000:]}"
    state = jobs(ws)
    assert {o for o in in_hand if state[o] == "done"} == in_hand, state
    assert {o for o in todo - in_hand if state[o] == "pending"} == todo - in_hand, state
    assert in_hand <= published(ws)
    assert not (markers(ws) / "after_ran").exists(), "the stage after the drain must not start"
    assert ws.staging_files() == [] and "Traceback" not in run.output
    if todo - in_hand:
        assert f"{len(todo - in_hand)} left pending" in run.output, run.output[-3000:]


def completes(ws, mode: str) -> None:
    run = Run(ws, mode)
    code = run.finish()
    assert code == 0, f"{mode}: the next run: exit {code}\n{run.output[-3000:]}"
    assert jobs(ws) == dict.fromkeys(ws.obsids, "done")
    assert published(ws) == set(ws.obsids) and ws.staging_files() == []
    assert (markers(ws) / "after_ran").exists()


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_serial(ws):
    interrupted(ws, "serial", between_stages, signal.SIGHUP)
    interrupted(ws, "serial", staging, signal.SIGINT)
    drained(ws, "serial")  # the first observation finishes, the second stays pending
    interrupted(ws, "serial", staging, signal.SIGTERM)
    completes(ws, "serial")


@pytest.mark.timeout(300)
def test_pool(ws):
    interrupted(ws, "pool", staging, signal.SIGTERM, group=True)  # as Slurm, systemd, docker stop send it
    interrupted(ws, "pool", first_published, signal.SIGHUP, group=True)  # the terminal closes
    coordinator_killed(ws, "pool")
    # the second observation finishes; the stage after Level2Pipeline does not start
    drained(ws, "pool", to="group")
    completes(ws, "pool")


@pytest.mark.timeout(300)
def test_mpi(ws):
    mpiexec_path()
    interrupted(ws, "mpi", staging, signal.SIGTERM, group=True)  # mpiexec forwards it to every rank
    drained(ws, "mpi", to="all")  # Slurm signals every rank (mpiexec would forward it, later)
    completes(ws, "mpi")


def _hold_a_file(item: tuple[str, str]) -> str:
    """Pool task: own and write ``path``, write ``marker`` (the pid), wait while it exists."""
    path, marker = (Path(p) for p in item)
    signals.own(path)
    path.write_text("staging")
    marker.write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.02)
    signals.disown(path)
    path.unlink()
    return "finished"


@pytest.mark.timeout(120)
def test_a_pool_worker_and_its_signals(tmp_path):
    """A pool worker survives SIGINT, SIGHUP and SIGUSR1 (its coordinator's to handle) and finishes its
    item; on SIGTERM it removes the file it owns and exits with 143, and the coordinator stops as if it
    had received the SIGTERM itself."""
    staging_file, marker = tmp_path / "staging", tmp_path / "marker"
    pool = LocalPoolExecutor(1)
    try:
        pool.start(_hold_a_file)
        for stop in (False, True):
            pool.submit(stop, (str(staging_file), str(marker)))
            deadline = time.monotonic() + TIMEOUT_S
            while not (marker.exists() and marker.read_text()):
                assert time.monotonic() < deadline, "the worker never started its item"
                time.sleep(0.02)
            pid = int(marker.read_text())
            if not stop:
                for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                    os.kill(pid, signum)  # delivered before the worker can see the marker go
                marker.unlink()
                outcome = pool.wait(timeout=TIMEOUT_S)
                assert outcome is not None and outcome.result == "finished", outcome
                assert not staging_file.exists()
            else:
                (worker,) = (w.process for w in pool._workers if w.process.pid == pid)
                os.kill(pid, signal.SIGTERM)
                with pytest.raises(signals.Interrupted) as exc:
                    pool.wait(timeout=TIMEOUT_S)
                assert exc.value.signum == signal.SIGTERM
                assert worker.exitcode == 128 + signal.SIGTERM
                assert not staging_file.exists()
                assert signals.interrupt_status() == 143
    finally:
        pool.shutdown(terminate=True)
        marker.unlink(missing_ok=True)
        signals.reset()


def test_the_coordinator_handlers():
    """In the coordinator a stop signal raises Interrupted carrying its number (exit 128 + signum), a
    second one is ignored while the first is handled, SIGUSR1 only sets the drain flag, and the previous
    handlers are back afterwards."""
    before = {s: signal.getsignal(s) for s in (*signals.STOP_SIGNALS, signals.DRAIN_SIGNAL)}
    with signals.coordinator_signals():
        os.kill(os.getpid(), signals.DRAIN_SIGNAL)
        assert signals.drain_requested()
        with pytest.raises(signals.Interrupted) as exc:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(5)  # the handler raises on the next bytecode; the sleep never ends
        assert exc.value.signum == signal.SIGHUP and signals.interrupt_status() == 129
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the run is already stopping
        assert signals.interrupt_status() == 129
    assert {s: signal.getsignal(s) for s in before} == before
    signals.reset()


def test_a_drained_map_making_stage_starts_no_map_job():
    """SIGUSR1 before a map-making stage's next job: no job starts, and the run stops after the stage."""
    from modules.MapMaking.dispatch import Dispatcher

    class NeverMade:
        def instantiate(self):
            raise AssertionError("a map job was started after the drain")

    with signals.coordinator_signals():
        os.kill(os.getpid(), signals.DRAIN_SIGNAL)
        result = Dispatcher("MapMaking", "map").run([NeverMade(), NeverMade()], {})
        assert result.done == 0 and result.failed == 0
        assert signals.stop_after_stage(last=True) and signals.drained()
    signals.reset()
