"""B10 — scaling over MPI ranks (docs/operations.md#scaling).

* **Level 2**: 12 GField30 CES observations of the demo's shape (4 feeds, 2 × 120 s) at 256 channels
  through ``run.py`` with ``--force``: one rank (``mpiexec -n 1``, the serial path), two ranks
  (``mpiexec -n 2``) and the strongest baseline a user would pick on one machine, the local pool
  (``--nprocess 2``). The figure is the steady-state time per observation, from the time every worker
  has finished one observation to the last one recorded in the run's log (starting the workers is paid
  once per run and left out, as over a season); targets: 2 ranks ≥ 1.7 × 1 rank and within 15 % of
  the pool. Peak RSS of the largest process of each run is sampled with psutil.
* **Destriper**: time per CG iteration of :func:`destripe` on the cross-linked raster problem of B4
  (``n`` samples on a 200 × 200 map, L = 100, a fixed 60 iterations), with one thread per rank on 1 and
  2 ranks (each rank holding ``n / ranks`` samples) against one rank with 2 OpenMP threads; targets:
  2 ranks ≥ 1.6 × 1 rank and within 15 % of 1 rank × 2 threads. Peak RSS (``ru_maxrss``) per rank.

Each configuration runs ``--repeat`` times in alternating order; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import Result

ID = "B10"
TITLE = "scaling over MPI ranks: level-2 throughput and destriper iterations, 1 vs 2 ranks"

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
N_OBS = 12
N_CHANNELS = 256
DESTRIPE_SAMPLES = 4_000_000
DESTRIPE_ITERATIONS = 60
DONE_LINE = re.compile(r"^(\S+)Z .*comap\.Level2Pipeline: done in ", re.MULTILINE)


# --------------------------------------------------------------------------------------------------
# Child: the destriper on this rank's share (run under mpiexec)
# --------------------------------------------------------------------------------------------------
def _destripe_child(n_total: int, iterations: int) -> None:
    import resource

    import numpy as np
    from mpi4py import MPI

    from benchmarks.bench_destriper import NX, NY, OFFSET_LENGTH, simulate
    from modules.MapMaking.destriper import destripe

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    sim = simulate(n_total // size, seed=4 + rank)
    del sim["x"], sim["y"]

    def call():
        return destripe(
            sim["tod"], sim["pixels"], sim["weights"], OFFSET_LENGTH, NX * NY, tol=1e-30, max_iter=iterations,
            segment_starts=sim["segment_starts"], comm=comm if size > 1 else None,
        )  # fmt: skip

    call()  # warm-up
    comm.Barrier()
    t0 = time.perf_counter()
    res = call()
    comm.Barrier()
    wall = time.perf_counter() - t0
    rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
    if rank == 0:
        out = {
            "wall_s": wall,
            "n_iter": int(res.n_iter),
            "rss": rss,
            "threads": int(os.environ["OMP_NUM_THREADS"]),
        }
        print("RESULT " + json.dumps(out), flush=True)
    assert np.isfinite(res.map).any()


def _destripe_run(ranks: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [
        str(MPIEXEC),
        "-n",
        str(ranks),
        sys.executable,
        "-m",
        "benchmarks.bench_scaling",
        "--destripe-child",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"destriper child failed: {proc.stderr[-2000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


# --------------------------------------------------------------------------------------------------
# Level 2 through run.py
# --------------------------------------------------------------------------------------------------
def _peak_rss_of_tree(proc: subprocess.Popen) -> tuple[int, int]:
    """Wait for ``proc``; return (its exit code, the peak RSS of the largest process of its tree)."""
    import psutil

    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    peak = max(peak, p.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(0.2)
    return proc.returncode, peak


def _level2_run(workdir: Path, mode: str) -> tuple[float, int, int]:
    """(seconds per observation in the steady state, observations, peak RSS of the largest process) of
    one ``--force`` level-2 run.

    The steady state is measured from the time every worker has finished its first observation to the
    last observation recorded (the coordinator's "done in" lines in the run's log), so that starting the
    workers (imports, module set-up: a few seconds, paid once per run) is left out, as it is over a
    season."""
    import datetime as dt

    run = [sys.executable, str(REPO / "run.py"), "level2_run.toml", "--force"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if mode == "pool":
        cmd = [*run, "--nprocess", "2"]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [str(MPIEXEC), "-n", "1" if mode == "1 rank" else "2", *run, "--nprocess", "1"]
    out_path = workdir / f"level2_{mode.replace(' ', '_')}.out"
    before = set((workdir / "logs").glob("*.log")) if (workdir / "logs").exists() else set()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)
        code, peak = _peak_rss_of_tree(proc)
    if code != 0:
        raise RuntimeError(f"level-2 run ({mode}) exited {code}: {out_path.read_text()[-2000:]}")
    (log,) = set((workdir / "logs").glob("*.log")) - before
    stamps = [dt.datetime.fromisoformat(t) for t in DONE_LINE.findall(log.read_text())]
    if len(stamps) < 3:
        raise RuntimeError(f"{len(stamps)} observation(s) recorded by the {mode} run; need 3 or more")
    # from the moment every worker has finished one observation (each worker's start-up is over) to the last
    workers = 1 if mode == "1 rank" else 2
    stamps.sort()
    span = (stamps[-1] - stamps[workers - 1]).total_seconds()
    return span / (len(stamps) - workers), len(stamps), peak


def _prepare_level2(workdir: Path) -> None:
    from dataclasses import replace

    from utils.simulator import make_archive
    from utils.simulator.presets import PRESETS
    from utils.simulator.spec import ArchiveSpec

    # observations of one size, so that the figure is the executor's and not the queue's last straggler
    base = next(o for o in PRESETS["demo"].observations if o.source == "GField30")
    observations = [
        replace(base, obsid=61001 + k, hour_angle_h=-3.0 + 0.5 * k, n_channels=N_CHANNELS)
        for k in range(N_OBS)
    ]
    make_archive(ArchiveSpec("scaling", observations), workdir / "demo" / "level1", seed=1)
    l2 = (REPO / "parameter_files" / "level2_processing.toml").read_text()
    (workdir / "level2_processing.toml").write_text(l2.replace("nprocess     = 2", "nprocess     = 1"))
    (workdir / "level2_run.toml").write_text(
        "[Master]\n"
        'log_file = "logs/{timestamp}_level2_run.log"\n'
        'sql_database = "demo/COMAP_demo.db"\n'
        "pipeline = [\n"
        "  \"modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=['demo/level1'], "
        "level2_data_paths=['demo/level2'])\",\n"
        "  \"modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='level2_processing.toml')\",\n"
        "]\n"
    )


def _alternating(modes: list[str], repeat: int, fn) -> dict[str, list]:
    runs: dict[str, list] = {m: [] for m in modes}
    for r in range(repeat):
        for mode in modes if r % 2 == 0 else list(reversed(modes)):
            runs[mode].append(fn(mode))
    return runs


def run(args: argparse.Namespace) -> list[Result]:
    if not MPIEXEC.exists():
        raise RuntimeError(f"no mpiexec next to {sys.executable}: install the mpi extra (make env)")
    repeat = max(1, min(int(args.repeat), 3))
    workdir = Path(args.workdir)
    results: list[Result] = []
    mb = 2.0**20

    # --- level 2 ---------------------------------------------------------------------------------
    _prepare_level2(workdir)
    _level2_run(workdir, "1 rank")  # untimed: registers the files, warms the page cache
    modes = ["1 rank", "2 ranks", "pool"]
    l2 = _alternating(modes, repeat, lambda mode: _level2_run(workdir, mode))
    secs = {m: statistics.median(s for s, _n, _p in l2[m]) for m in modes}  # s per observation
    thr = {m: 1.0 / secs[m] for m in modes}
    peak = {m: max(p for _s, _n, p in l2[m]) for m in modes}
    speed = thr["2 ranks"] / thr["1 rank"]
    vs_pool = thr["2 ranks"] / thr["pool"]
    results.append(
        Result(ID, f"level-2 s/observation (steady state), 2 ranks vs 1 rank ({N_OBS} obs)",
               secs["2 ranks"], secs["1 rank"], "s",
               ratio=speed, ratio_label="throughput 2/1", target=">= 1.7x", passed=speed >= 1.7,
               notes=f"peak RSS of the largest process: 1 rank {peak['1 rank'] / mb:.0f} MB, "
               f"2 ranks {peak['2 ranks'] / mb:.0f} MB"),
    )  # fmt: skip
    results.append(
        Result(ID, "level-2 s/observation (steady state), 2 ranks vs 2-process pool",
               secs["2 ranks"], secs["pool"], "s",
               ratio=vs_pool, ratio_label="throughput ranks/pool", target="within 15% (>= 0.85)",
               passed=vs_pool >= 0.85, notes=f"pool peak RSS {peak['pool'] / mb:.0f} MB"),
    )  # fmt: skip

    # --- destriper -------------------------------------------------------------------------------
    layouts = {"1 rank": (1, 1), "2 ranks": (2, 1), "1 rank x 2 threads": (1, 2)}
    ds = _alternating(list(layouts), repeat, lambda name: _destripe_run(*layouts[name]))
    per_iter = {k: statistics.median(r["wall_s"] / r["n_iter"] for r in v) for k, v in ds.items()}
    rss = {k: max(max(r["rss"]) for r in v) for k, v in ds.items()}
    speed = per_iter["1 rank"] / per_iter["2 ranks"]
    vs_threads = per_iter["1 rank x 2 threads"] / per_iter["2 ranks"]
    results.append(
        Result(ID, f"destriper time/iteration, 2 ranks vs 1 rank ({DESTRIPE_SAMPLES:.0e} samples)",
               per_iter["2 ranks"], per_iter["1 rank"], "s", ratio=speed, ratio_label="speed-up",
               target=">= 1.6x", passed=speed >= 1.6,
               notes=f"peak RSS per rank: 1 rank {rss['1 rank'] / mb:.0f} MB, "
               f"2 ranks {rss['2 ranks'] / mb:.0f} MB"),
    )  # fmt: skip
    results.append(
        Result(ID, "destriper time/iteration, 2 ranks vs 1 rank x 2 threads", per_iter["2 ranks"],
               per_iter["1 rank x 2 threads"], "s", ratio=vs_threads, ratio_label="threads/ranks",
               target="within 15% (>= 0.85)", passed=vs_threads >= 0.85,
               notes=f"1 rank x 2 threads peak RSS {rss['1 rank x 2 threads'] / mb:.0f} MB"),
    )  # fmt: skip
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--destripe-child", action="store_true")
    parser.add_argument("--samples", type=int, default=DESTRIPE_SAMPLES)
    parser.add_argument("--iterations", type=int, default=DESTRIPE_ITERATIONS)
    ns = parser.parse_args()
    if ns.destripe_child:
        _destripe_child(ns.samples, ns.iterations)
