"""Overview of the database (docs/database.md#query-scripts): ``python -m modules.scripts.db_overview
SUBCOMMAND [options]``.

Subcommands:

``summary``         per source group: registered, with a level-1 file, level-2 done, failed, pending,
                    total level-1 bytes, obsid and date range
``missing-level2``  obsids with a level-1 file whose ``level2`` job is not done or whose level-2
                    file is missing, with the job status and error
``query-obsid N``   everything about one obsid, including flag counts per feed
``path-search P``   obsids whose level-1 (``--level 1``) or level-2 path matches a glob
``field-status``    per source: observations, processed, failed, last obsid, last date

The database is opened read-only.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from modules.scripts._common import (
    UsageError,
    add_common_arguments,
    add_selection_arguments,
    emit,
    emit_json,
    open_db,
    prog,
    run_main,
)

SCRIPT = "db_overview"  # the installed command is comap-<SCRIPT with dashes>


def _date(utc_start: str | None) -> str | None:
    return utc_start[:10] if utc_start else None


def _level2_states(db, obsids: list[int]) -> dict[int, Any]:
    return {j.obsid: j for j in db.job_table("level2", obsids=obsids)} if obsids else {}


def cmd_summary(db, args: argparse.Namespace) -> None:
    obs = db.query_observations(source=args.source, source_group=args.source_group)
    jobs = _level2_states(db, [o.obsid for o in obs])
    groups: dict[str, list[Any]] = defaultdict(list)
    for o in obs:
        groups[o.source_group or "(none)"].append(o)

    def row(name: str, items: list[Any]) -> dict[str, Any]:
        states = [jobs[o.obsid].status if o.obsid in jobs else "pending" for o in items]
        dates = sorted(d for o in items if (d := _date(o.utc_start)))
        return {
            "source_group": name,
            "registered": len(items),
            "level1": sum(1 for o in items if o.level1_path),
            "level2_done": states.count("done"),
            "failed": states.count("failed"),
            "pending": sum(1 for s in states if s in ("pending", "running")),
            "level1_gb": round(sum(o.level1_size_bytes or 0 for o in items) / 1e9, 3),
            "min_obsid": min((o.obsid for o in items), default=None),
            "max_obsid": max((o.obsid for o in items), default=None),
            "first_date": dates[0] if dates else None,
            "last_date": dates[-1] if dates else None,
        }

    rows = [row(g, groups[g]) for g in sorted(groups)]
    if len(rows) > 1:
        rows.append(row("TOTAL", obs))
    columns = list(row("x", []).keys())
    emit(rows, columns, args.format)


def cmd_missing_level2(db, args: argparse.Namespace) -> None:
    obs = db.query_observations(
        source=args.source,
        source_group=args.source_group,
        min_obsid=args.min_obsid,
        max_obsid=args.max_obsid,
        has_level1=True,
    )
    jobs = _level2_states(db, [o.obsid for o in obs])
    rows = []
    for o in obs:
        job = jobs.get(o.obsid)
        status = job.status if job else "pending"
        if not o.level2_path:
            file_state = "none"
        elif os.path.exists(o.level2_path):
            file_state = "ok"
        else:
            file_state = "missing"
        if status == "done" and file_state == "ok":
            continue
        rows.append(
            {
                "obsid": o.obsid,
                "source": o.source,
                "source_group": o.source_group,
                "job_status": status,
                "level2_file": file_state,
                "attempts": job.attempts if job else 0,
                "error": job.error if job else None,
                "level2_path": o.level2_path,
            }
        )
    emit(
        rows,
        ["obsid", "source", "source_group", "job_status", "level2_file", "attempts", "error"],
        args.format,
    )


def _flag_counts(flags: list[dict[str, Any]]) -> list[dict[str, Any]]:
    per_feed: dict[int, dict[str, Any]] = {}
    for f in flags:
        r = per_feed.setdefault(
            f["feed"],
            {"feed": f["feed"], "rows": 0, "bad": 0, "observer_bad": 0, "pipeline_bad": 0, "with_stats": 0},
        )
        r["rows"] += 1
        r["bad"] += 0 if f["is_good"] else 1
        r["observer_bad"] += 0 if f["observer_ok"] else 1
        r["pipeline_bad"] += 0 if f["pipeline_ok"] else 1
        r["with_stats"] += 1 if f.get("filtered_white_noise") is not None else 0
    return [per_feed[k] for k in sorted(per_feed)]


def cmd_query_obsid(db, args: argparse.Namespace) -> None:
    snap = db.get_observation_snapshot(args.obsid)
    if snap["observation"] is None and not snap["jobs"]:
        raise UsageError(f"obsid {args.obsid} is not registered")
    feeds = _flag_counts(snap["quality_flags"])
    if args.format == "json":
        emit_json({**snap, "flag_counts_per_feed": feeds})
        return
    if args.format == "csv":
        rows: list[dict[str, Any]] = []
        for section in ("observation", "summary"):
            for k, v in (snap[section] or {}).items():
                rows.append({"section": section, "key": k, "value": v})
        for j in snap["jobs"]:
            for k in ("status", "attempts", "error", "last_module", "finished_utc"):
                rows.append({"section": f"job {j['stage']}", "key": k, "value": j.get(k)})
        for f in feeds:
            for k in ("rows", "bad", "observer_bad", "pipeline_bad", "with_stats"):
                rows.append({"section": f"flags feed {f['feed']}", "key": k, "value": f[k]})
        rows.append({"section": "calibration_flux", "key": "rows", "value": len(snap["calibration_flux"])})
        emit(rows, ["section", "key", "value"], "csv")
        return
    out = sys.stdout
    out.write(f"obsid {args.obsid}\n\n")
    for section in ("observation", "summary"):
        data = snap[section] or {}
        emit(
            [{"key": k, "value": v} for k, v in data.items() if v is not None],
            ["key", "value"],
            "table",
            title=section,
        )
        out.write("\n")
    emit(
        snap["jobs"],
        ["stage", "status", "attempts", "last_module", "finished_utc", "error"],
        "table",
        title="jobs",
    )
    out.write("\n")
    emit(
        feeds,
        ["feed", "rows", "bad", "observer_bad", "pipeline_bad", "with_stats"],
        "table",
        title="flags per feed",
    )
    out.write(f"\ncalibration_flux rows: {len(snap['calibration_flux'])}\n")


def cmd_path_search(db, args: argparse.Namespace) -> None:
    column = "level1_path" if args.level == 1 else "level2_path"
    obs = db.query_observations(**{"has_level1" if args.level == 1 else "has_level2": True})
    rows = [
        {"obsid": o.obsid, "source": o.source, column: getattr(o, column)}
        for o in obs
        if fnmatch.fnmatchcase(getattr(o, column), args.pattern)
    ]
    emit(rows, ["obsid", "source", column], args.format)


def cmd_field_status(db, args: argparse.Namespace) -> None:
    obs = db.query_observations(source_group=args.source_group)
    jobs = _level2_states(db, [o.obsid for o in obs])
    per: dict[str, list[Any]] = defaultdict(list)
    for o in obs:
        per[o.source or "(none)"].append(o)
    rows = []
    for source in sorted(per):
        items = per[source]
        last = max(items, key=lambda o: o.obsid)
        states = [jobs[o.obsid].status if o.obsid in jobs else "pending" for o in items]
        rows.append(
            {
                "source": source,
                "source_group": last.source_group,
                "observations": len(items),
                "processed": states.count("done"),
                "failed": states.count("failed"),
                "last_obsid": last.obsid,
                "last_date": _date(last.utc_start),
            }
        )
    emit(
        rows,
        ["source", "source_group", "observations", "processed", "failed", "last_obsid", "last_date"],
        args.format,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Overview of the comap-reduce database (read-only)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("summary", help="counts per source group")
    add_selection_arguments(p, obsid_range=False)
    add_common_arguments(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("missing-level2", help="observations with level 1 but no finished level 2")
    add_selection_arguments(p)
    add_common_arguments(p)
    p.set_defaults(func=cmd_missing_level2)

    p = sub.add_parser("query-obsid", help="everything about one obsid")
    p.add_argument("obsid", type=int)
    add_common_arguments(p)
    p.set_defaults(func=cmd_query_obsid)

    p = sub.add_parser("path-search", help="obsids whose path matches a glob")
    p.add_argument("pattern", help="glob, e.g. '*/2026-03/*'")
    p.add_argument(
        "--level", type=int, choices=(1, 2), default=1, help="search level-1 (default) or level-2 paths"
    )
    add_common_arguments(p)
    p.set_defaults(func=cmd_path_search)

    p = sub.add_parser("field-status", help="per source: observations, processed, failed, last obsid")
    p.add_argument("--source-group", default=None)
    add_common_arguments(p)
    p.set_defaults(func=cmd_field_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        facade = open_db(args.db)
        args.func(facade, args)

    return run_main(build_parser(), body, argv)


__all__ = ["build_parser", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
