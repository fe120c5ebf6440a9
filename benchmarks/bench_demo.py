"""B8 — ``make demo``: wall time and disk use (docs/operations.md#performance-targets; target < 5 min and < 2
GB on 2 cores).

The three steps of ``make demo`` (Makefile, docs/install.md#the-demo) run as subprocesses in a fresh directory
under the benchmark's work directory, exactly as a user runs them from a checkout:

1. ``python -m utils.simulator archive --preset demo --out demo/remote --seed 1``
2. ``python run.py parameter_files/main_run.toml`` — whatever the working tree's
   ``parameter_files/main_run.toml`` lists (acquisition, level 2, calibration model, maps ...);
3. ``python -m utils.simulator report demo/``.

The work directory holds a copy of the working tree's ``parameter_files/`` (whose ``demo/`` paths
are relative, so everything lands under the work directory); ``run.py`` and the packages are used
from the repository through ``PYTHONPATH``, as ``tests/conftest.py``'s ``PipelineWorkspace`` does.
``make env`` (a no-op once the environment is installed) is not timed.

Rows: the wall time of each step and their total (target < 300 s), the disk use of ``demo/``
(target < 2 GB; the acquisition step copies the archive, so the level-1 data are on disk twice), and
an informative rerun of step 2, which must find nothing to do (docs/operations.md#idempotence). Each step's
peak memory is reported as the largest single-process ``ru_maxrss`` among its processes and as the peak of the
summed RSS of its process tree (sampled every 0.2 s). The demo is run once per invocation whatever
``--repeat`` says (it takes minutes); run the benchmark several times for a median.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import Result

ID = "B8"
TITLE = "make demo: simulate, main run, report - wall time and disk use"

REPO = Path(__file__).resolve().parents[1]
TARGET_WALL_S = 300.0
TARGET_DISK_GB = 2.0


def _steps() -> list[tuple[str, list[str]]]:
    py = sys.executable
    return [
        (
            "simulate",
            [
                py,
                "-m",
                "utils.simulator",
                "archive",
                "--preset",
                "demo",
                "--out",
                "demo/remote",
                "--seed",
                "1",
            ],
        ),
        ("main run", [py, str(REPO / "run.py"), "parameter_files/main_run.toml"]),
        ("report", [py, "-m", "utils.simulator", "report", "demo/"]),
    ]


def _measure_child(out_json: str, cmd: list[str]) -> int:
    """Wrapper process: run ``cmd``, then record its wall time and the largest ru_maxrss among it
    and every descendant it waited for (RUSAGE_CHILDREN)."""
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    maxrss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    Path(out_json).write_text(json.dumps({"rc": rc, "wall_s": wall, "max_rss_mb": maxrss_kb / 1024.0}))
    return rc


def _run_step(name: str, cmd: list[str], cwd: Path) -> dict:
    """Run one step through the wrapper; sample the summed RSS of its process tree meanwhile."""
    import psutil

    tag = name.replace(" ", "_")
    out_json = cwd / f".b8_{tag}.json"
    log_out, log_err = cwd / f"b8_{tag}.out", cwd / f"b8_{tag}.err"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("COLUMNS", None)
    with open(log_out, "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_demo", "--measure", str(out_json), "--", *cmd],
            cwd=cwd,
            stdout=fo,
            stderr=fe,
            env=env,
        )
        root = psutil.Process(proc.pid)
        peak_tree = 0
        while proc.poll() is None:
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak_tree = max(peak_tree, total)
            time.sleep(0.2)
    info = json.loads(out_json.read_text()) if out_json.exists() else {"rc": proc.returncode, "wall_s": None}
    info["peak_tree_rss_mb"] = peak_tree / 2**20
    info["stderr_tail"] = log_err.read_text().strip().splitlines()[-3:]
    return info


def disk_usage_bytes(path: Path) -> int:
    """Allocated bytes under ``path`` (``du`` semantics: st_blocks × 512, hard links counted once)."""
    if not path.is_dir():
        return os.lstat(path).st_blocks * 512
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [*filenames, *dirnames]:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_blocks * 512
    return total


def run(args: argparse.Namespace) -> list[Result]:
    work = Path(args.workdir) / "demo_checkout"
    work.mkdir(parents=True)
    shutil.copytree(REPO / "parameter_files", work / "parameter_files")
    main_cfg = (work / "parameter_files" / "main_run.toml").read_text()
    stages = [
        line.split("(")[0].rsplit(".", 1)[-1]
        for line in main_cfg.splitlines()
        if line.strip().startswith('"modules.')
    ]

    rows: list[Result] = []
    total = 0.0
    failed = False
    for name, cmd in _steps():
        info = _run_step(name, cmd, work)
        ok = info.get("rc") == 0
        failed |= not ok
        wall = info.get("wall_s") or float("nan")
        total += wall
        note = (
            f"peak RSS: largest process {info.get('max_rss_mb', float('nan')):.0f} MB, "
            f"process tree {info['peak_tree_rss_mb']:.0f} MB"
        )
        if name == "main run":
            note += f"; stages: {', '.join(stages)}"
        if not ok:
            note += f"; EXIT {info.get('rc')}: {' | '.join(info['stderr_tail'])}"
        rows.append(Result(ID, f"make demo step: {name}", wall, None, "s", None, "-", "exit 0", ok, note))
        if not ok:
            break

    sizes = (
        {p.name: disk_usage_bytes(p) for p in sorted((work / "demo").iterdir())}
        if (work / "demo").exists()
        else {}
    )
    disk = disk_usage_bytes(work / "demo") if (work / "demo").exists() else 0
    rows.insert(
        0,
        Result(
            ID,
            "make demo wall time (3 steps)",
            total,
            None,
            "s",
            None,
            "-",
            f"< {TARGET_WALL_S:g} s",
            (total < TARGET_WALL_S) and not failed,
            f"{os.cpu_count()} logical cores, load average at end {os.getloadavg()[0]:.2f}",
        ),
    )
    breakdown = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
    rows.insert(
        1,
        Result(
            ID,
            "disk use of demo/",
            disk / 1e9,
            None,
            "GB",
            None,
            "-",
            f"< {TARGET_DISK_GB:g} GB",
            disk / 1e9 < TARGET_DISK_GB and not failed,
            f"{breakdown}; logs/ {disk_usage_bytes(work / 'logs') / 1e6:.2f} MB (outside demo/)"
            if (work / "logs").exists()
            else breakdown,
        ),
    )
    if not failed:
        info = _run_step("rerun", _steps()[1][1], work)
        rows.append(
            Result(
                ID,
                "main run again (idempotent, nothing to do)",
                info.get("wall_s"),
                None,
                "s",
                None,
                "-",
                "exit 0",
                info.get("rc") == 0,
                f"peak RSS largest process {info.get('max_rss_mb', float('nan')):.0f} MB",
            )
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--measure" and sys.argv[3] == "--":
        sys.exit(_measure_child(sys.argv[2], sys.argv[4:]))
    print("usage: python -m benchmarks.bench_demo --measure OUT_JSON -- CMD ... (internal)", file=sys.stderr)
    sys.exit(2)
