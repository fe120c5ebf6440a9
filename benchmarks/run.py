"""Run the benchmarks of docs/operations.md#performance-targets and print our figures against their baselines.

Usage::

    python -m benchmarks.run [--only NAME ...] [--keep] [--strict] [--repeat N] [--list]

* ``--only NAME`` runs the benchmarks whose id (``B1``) or module name (``median_filter`` for
  ``bench_median_filter.py``) matches, case-insensitively; may be repeated.
* ``--keep`` keeps the temporary input directory and prints its path.
* ``--strict`` exits with status 1 when a target is missed (a benchmark that crashes always
  gives status 1).
* ``--repeat N`` sets the number of timed repetitions (default 5; medians are reported).

The table (metric, ours, baseline, ratio, target, pass/fail) goes to stdout; the same rows plus
machine information go to ``benchmarks/results.json`` (overwritten by every run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

from benchmarks import Result, machine_info

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"


def discover() -> list[ModuleType]:
    """Import every ``benchmarks/bench_*.py``, sorted by benchmark id then name."""
    modules = []
    for path in sorted(HERE.glob("bench_*.py")):
        modules.append(importlib.import_module(f"benchmarks.{path.stem}"))

    def key(mod: ModuleType) -> tuple[int, str]:
        ident = str(getattr(mod, "ID", ""))
        number = int(ident[1:]) if ident[1:].isdigit() else 10**6
        return number, mod.__name__

    return sorted(modules, key=key)


def _matches(mod: ModuleType, names: list[str]) -> bool:
    stem = mod.__name__.rsplit(".", 1)[-1].removeprefix("bench_")
    wanted = {n.lower() for n in names}
    return stem.lower() in wanted or str(getattr(mod, "ID", "")).lower() in wanted


def _fmt(value: float | None, units: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    mag = abs(value)
    if mag == 0:
        text = "0"
    elif mag >= 1000 or mag < 0.01:
        text = f"{value:.3g}"
    elif mag >= 100:
        text = f"{value:.0f}"
    elif mag >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {units}".strip()


def format_table(results: list[Result]) -> str:
    """The results as a fixed-width text table."""
    header = ["#", "metric", "ours", "baseline", "ratio", "target", "pass/fail"]
    rows = []
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.3g}x"
        verdict = {True: "PASS", False: "FAIL", None: "-"}[r.passed]
        rows.append(
            [
                r.benchmark,
                r.metric,
                _fmt(r.ours, r.units),
                _fmt(r.baseline, r.units),
                ratio,
                r.target,
                verdict,
            ]
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    notes = [f"  [{r.benchmark}] {r.metric}: {r.notes}" for r in results if r.notes]
    if notes:
        lines.append("")
        lines.append("notes:")
        lines.extend(notes)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="benchmark id or name")
    parser.add_argument("--keep", action="store_true", help="keep the temporary inputs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--repeat", type=int, default=5, metavar="N", help="timed repetitions (default 5)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    modules = discover()
    if args.list:
        for mod in modules:
            stem = mod.__name__.rsplit(".", 1)[-1]
            print(f"{getattr(mod, 'ID', '?'):4} {stem:28} {getattr(mod, 'TITLE', '')}")
        return 0
    if args.only:
        modules = [m for m in modules if _matches(m, args.only)]
        if not modules:
            print(f"no benchmark matches {args.only}; see --list", file=sys.stderr)
            return 2

    machine = machine_info()
    print(
        f"# {machine['date']}  {machine['cpu_model']}  {machine['cores_available']} cores  "
        f"{machine['ram_gb']} GB  load {machine['load_average_1_5_15']}  "
        f"Python {machine['python']}  NumPy {machine['numpy']}  SciPy {machine['scipy']}",
        file=sys.stderr,
    )
    workroot = Path(tempfile.mkdtemp(prefix="comap-bench-"))
    results: list[Result] = []
    crashed = False
    try:
        for mod in modules:
            ident = str(getattr(mod, "ID", mod.__name__))
            workdir = workroot / mod.__name__.rsplit(".", 1)[-1]
            workdir.mkdir()
            ns = argparse.Namespace(**vars(args), workdir=workdir)
            print(f"# running {ident}: {getattr(mod, 'TITLE', '')}", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                rows = mod.run(ns)
            except Exception as exc:  # report and go on with the other benchmarks
                crashed = True
                traceback.print_exc()
                rows = [Result(ident, "benchmark crashed", None, None, passed=False, notes=repr(exc))]
            for row in rows:
                row.extra.setdefault("benchmark_wall_s", round(time.perf_counter() - t0, 2))
            results.extend(rows)
    finally:
        if args.keep:
            print(f"# inputs kept in {workroot}", file=sys.stderr)
        else:
            shutil.rmtree(workroot, ignore_errors=True)

    print(format_table(results))
    payload = {
        "machine": machine,
        "arguments": {"only": args.only, "repeat": args.repeat, "strict": args.strict},
        "results": [asdict(r) for r in results],
    }
    RESULTS_JSON.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"# wrote {RESULTS_JSON}", file=sys.stderr)

    missed = [r for r in results if r.passed is False]
    if crashed:
        return 1
    if args.strict and missed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
