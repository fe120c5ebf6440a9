"""Statistics from the database (docs/database.md#query-scripts): ``python -m modules.scripts.query_statistics
SUBCOMMAND``.

Subcommands (all take ``--source``, ``--source-group``, ``--min-obsid``, ``--max-obsid``):

``summary``     count, median and percentiles (5, 25, 75, 95) of the quality statistics of
                ``quality_flags`` (``--stat`` to choose, ``--feed/--band/--channel`` to select,
                ``--by feed|band|channel|source_group`` to split, ``--good-only`` to drop flagged rows)
``tsys``        per-obsid median noise-equivalent vane system temperature V_cold/G (K,
                docs/level2.md#tsys-conventions)
``tau``         per-obsid mean zenith atmospheric brightness (K)
``calibrator``  per-obsid calibrator flux and error (Jy), reduced χ² and pointing offsets (deg)
``failed``      failed jobs (``--stage``) with reason and attempts
``status``      number of jobs per stage and status (observations without a level-2 job count as
                ``pending``)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from modules.scripts._common import (
    UsageError,
    add_common_arguments,
    add_selection_arguments,
    emit,
    int_list,
    open_db,
    percentile,
    prog,
    run_main,
)
from modules.SQLModule.SQLModule import QUALITY_STAT_COLUMNS

SCRIPT = "query_statistics"  # the installed command is comap-<SCRIPT with dashes>
PERCENTILES = (5, 25, 75, 95)


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "source": args.source,
        "source_group": args.source_group,
        "min_obsid": args.min_obsid,
        "max_obsid": args.max_obsid,
    }


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, int | float) and math.isfinite(v)


def cmd_summary(db, args: argparse.Namespace) -> None:
    stats = args.stat or list(QUALITY_STAT_COLUMNS)
    unknown = [s for s in stats if s not in QUALITY_STAT_COLUMNS]
    if unknown:
        raise UsageError(f"unknown statistic(s) {unknown}; choose from {', '.join(QUALITY_STAT_COLUMNS)}")
    filters: dict[str, Any] = _selection(args)
    for name in ("feed", "band", "channel"):
        values = int_list(getattr(args, name), f"--{name}")
        if values is not None:
            filters[name + "s"] = values
    if args.good_only:
        filters["is_good"] = True
    rows = db.query_statistics(stats, **filters)
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r[args.by] if args.by else "all"].append(r)
    out = []
    for key in sorted(groups, key=lambda k: (str(type(k)), k)):
        for stat in stats:
            values = sorted(float(r[stat]) for r in groups[key] if _finite(r[stat]))
            row: dict[str, Any] = {args.by or "selection": key, "statistic": stat, "n": len(values)}
            row["median"] = percentile(values, 50)
            for q in PERCENTILES:
                row[f"p{q:02d}"] = percentile(values, q)
            row["min"] = values[0] if values else None
            row["max"] = values[-1] if values else None
            out.append(row)
    columns = [
        args.by or "selection",
        "statistic",
        "n",
        "median",
        *(f"p{q:02d}" for q in PERCENTILES),
        "min",
        "max",
    ]
    emit(out, columns, args.format)


def _summaries(db, args: argparse.Namespace, column: str) -> list[dict[str, Any]]:
    return [
        r
        for r in db.query_observation_summaries(**_selection(args))
        if column is None or r.get(column) is not None
    ]


def cmd_tsys(db, args: argparse.Namespace) -> None:
    rows = _summaries(db, args, "median_tsys")
    emit(rows, ["obsid", "source", "source_group", "mjd_start", "median_tsys"], args.format)


def cmd_tau(db, args: argparse.Namespace) -> None:
    rows = _summaries(db, args, "mean_tau")
    emit(rows, ["obsid", "source", "source_group", "mjd_start", "mean_tau"], args.format)


def cmd_calibrator(db, args: argparse.Namespace) -> None:
    rows = _summaries(db, args, "calibrator_flux")
    emit(
        rows,
        [
            "obsid",
            "source",
            "mjd_start",
            "calibrator_flux",
            "calibrator_flux_error",
            "calibrator_chi2",
            "pointing_offset_az",
            "pointing_offset_el",
            "pointing_offset_ra",
            "pointing_offset_dec",
        ],
        args.format,
    )


def _selected_obsids(db, args: argparse.Namespace) -> set[int] | None:
    """Obsids of the source selection, or None when no source filter is given (jobs may precede
    registration, e.g. failed downloads)."""
    if args.source is None and args.source_group is None:
        return None
    return {o.obsid for o in db.query_observations(source=args.source, source_group=args.source_group)}


def _in_range(obsid: int, args: argparse.Namespace) -> bool:
    return (args.min_obsid is None or obsid >= args.min_obsid) and (
        args.max_obsid is None or obsid <= args.max_obsid
    )


def cmd_failed(db, args: argparse.Namespace) -> None:
    chosen = _selected_obsids(db, args)
    jobs = [
        j
        for j in db.job_table(args.stage, status="failed")
        if _in_range(j.obsid, args) and (chosen is None or j.obsid in chosen)
    ]
    rows = [
        {
            "obsid": j.obsid,
            "stage": j.stage,
            "attempts": j.attempts,
            "last_module": j.last_module,
            "finished_utc": j.finished_utc,
            "error": j.error,
        }
        for j in jobs
    ]
    emit(rows, ["obsid", "stage", "attempts", "last_module", "finished_utc", "error"], args.format)


def cmd_status(db, args: argparse.Namespace) -> None:
    chosen = _selected_obsids(db, args)
    counts: Counter = Counter()
    level2_seen: set[int] = set()
    for j in db.job_table(None):
        if not _in_range(j.obsid, args) or (chosen is not None and j.obsid not in chosen):
            continue
        counts[(j.stage, j.status)] += 1
        if j.stage == "level2":
            level2_seen.add(j.obsid)
    for o in db.query_observations(**_selection(args)):
        if o.obsid not in level2_seen:
            counts[("level2", "pending")] += 1
    rows = [{"stage": s, "status": st, "count": n} for (s, st), n in sorted(counts.items())]
    emit(rows, ["stage", "status", "count"], args.format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Statistics from the comap-reduce database (read-only)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    specs = (
        ("summary", cmd_summary, "distribution of quality statistics"),
        ("tsys", cmd_tsys, "per-obsid median noise-equivalent vane Tsys (K)"),
        ("tau", cmd_tau, "per-obsid mean tau (K)"),
        ("calibrator", cmd_calibrator, "per-obsid calibrator flux, error, chi2, offsets"),
        ("failed", cmd_failed, "failed jobs with reason and attempts"),
        ("status", cmd_status, "job counts by stage and status"),
    )
    for name, func, text in specs:
        p = sub.add_parser(name, help=text)
        add_selection_arguments(p)
        p.add_argument("--feed", action="append", help="feed number(s), e.g. 1,2 (summary)")
        p.add_argument("--band", action="append", help="band(s) 0-3 (summary)")
        p.add_argument("--channel", action="append", help="binned channel(s) (summary)")
        if name == "summary":
            p.add_argument("--stat", action="append", help="statistic column (repeatable; default all)")
            p.add_argument("--by", choices=("feed", "band", "channel", "source_group"), default=None)
            p.add_argument("--good-only", action="store_true", help="only rows with is_good")
        if name == "failed":
            p.add_argument("--stage", default=None, help="job stage (level2, level1, download); default all")
        add_common_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        args.func(open_db(args.db), args)

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
