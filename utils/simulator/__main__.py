"""Command line of the simulator (docs/simulator.md#interfaces)::

    python -m utils.simulator archive --preset demo --out demo/remote [--seed 1]
    python -m utils.simulator archive --config my_archive.toml --out DIR [--seed 1]
    python -m utils.simulator observation --config my_obs.toml --out DIR [--seed 1]
    python -m utils.simulator report demo/

Exit status: 0 on success, 2 for usage/specification errors (SimulatorError), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

from utils.errors import SimulatorError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.simulator", description="COMAP level-1 simulator")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("archive", help="simulate a preset or an archive TOML into an archive directory")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="test-tiny, test-small, demo, rrl-fullres or bench-full")
    src.add_argument("--config", help="ArchiveSpec TOML ([[observations]] tables, optional [defaults])")
    a.add_argument("--out", required=True, help="archive root (files go to <out>/<YYYY-MM>/)")
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--date", help="observe on this date (YYYY-MM-DD) instead of the preset's")
    a.add_argument("--quiet", action="store_true", help="do not print per-file timings")
    o = sub.add_parser("observation", help="simulate one observation from an ObservationSpec TOML")
    o.add_argument("--config", required=True)
    o.add_argument("--out", required=True, help="output directory")
    o.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("report", help="recovered-versus-truth summary for a reduced archive")
    r.add_argument("dir")
    return p


def _print_timings(name: str, t: dict[str, float]) -> None:
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k != "total")
    print(f"{name}: {t.get('total', float('nan')):.1f} s ({parts})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "archive":
            from .archive import make_archive
            from .spec import ArchiveSpec

            target = args.preset if args.preset else ArchiveSpec.from_toml(args.config)
            timings: dict[int, dict[str, float]] = {}
            t0 = time.perf_counter()
            paths = make_archive(target, args.out, seed=args.seed, date=args.date, timings=timings)
            if not args.quiet:
                for path in paths:
                    obsid = int(path.name[6:13])
                    _print_timings(path.name, timings.get(obsid, {}))
            size = sum(p.stat().st_size for p in paths)
            print(
                f"wrote {len(paths)} files ({size / 1e6:.1f} MB) and obs_index.csv to {args.out} "
                f"in {time.perf_counter() - t0:.1f} s"
            )
        elif args.command == "observation":
            from .spec import ObservationSpec
            from .writer import simulate_observation

            t: dict[str, float] = {}
            path = simulate_observation(
                ObservationSpec.from_toml(args.config), args.out, seed=args.seed, timings=t
            )
            _print_timings(str(path), t)
        else:
            from .report import build_report

            print(build_report(args.dir))
    except (SimulatorError, KeyError, FileNotFoundError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
