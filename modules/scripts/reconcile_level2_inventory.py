"""Compare the level-2 files on disk with the database (docs/database.md#query-scripts).

``python -m modules.scripts.reconcile_level2_inventory --root DIR [--root DIR ...] [--apply]
[--report-dir DIR] [--db DB] [--format table|csv|json]``

Finds ``Level2_comap-<obsid>-*.hd5`` under the roots (hidden directories skipped) and classifies
every obsid:

================  ===============================================================  ================
category          meaning                                                          ``--apply``
================  ===============================================================  ================
ok                the registered path is the file found                             —
unregistered      file found; the observation has no ``level2_path``               set the path
moved             file found; the registered path no longer exists                 set the path
path_mismatch     file found elsewhere; the registered file also exists            — (reported)
not_in_db         file found; obsid not in ``comap_data`` (run DataAssess)         —
incomplete        file found but unreadable, of another format version or with     —
                  an incomplete module output
duplicate         more than one file for the obsid under the roots                 —
missing           registered path does not exist and no file was found             clear the path
================  ===============================================================  ================

Registered paths outside the roots that exist are left alone. Every run (dry or not) writes
``<report-dir>/reconcile_<timestamp>.tsv``. Staging files (``.Level2_*.partial-*``) older than one
day are listed for manual removal and never deleted. Dry run by default (database read-only).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from modules.DataAcquisition.DataAssess.DataAssess import level2_complete
from modules.scripts._common import UsageError, add_common_arguments, emit, emit_json, open_db, prog, run_main

SCRIPT = "reconcile_level2_inventory"  # the installed command is comap-<SCRIPT with dashes>
LEVEL2_RE = re.compile(r"^Level2_comap-(\d{7})-.*\.hd5$")
STAGING_RE = re.compile(r"^\.Level2_.*\.partial-.*$")
STALE_STAGING_S = 86400.0


def walk(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``('level2', path)`` and ``('staging', path)`` under ``root``; hidden directories skipped."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            print(f"warning: cannot list {d}: {exc}", file=sys.stderr)
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if not e.name.startswith("."):
                        stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    if LEVEL2_RE.match(e.name):
                        yield "level2", Path(e.path)
                    elif STAGING_RE.match(e.name):
                        yield "staging", Path(e.path)
            except OSError:
                continue


def level2_problem(path: Path) -> str | None:
    """Why a level-2 file cannot be registered (unreadable, wrong version, incomplete), or None."""
    try:
        usable, _obsid, _code, reason = level2_complete(path)
    except OSError as exc:
        return f"unreadable: {' '.join(str(exc).split())}"
    return None if usable else reason


def reconcile(
    db, roots: Sequence[Path], *, now: float | None = None
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Classify every obsid found on disk or registered with a level-2 path (see the module docstring).

    Returns
    -------
    rows : list of dict
        ``category, obsid, db_path, disk_path, action, detail``.
    stale_staging : list of Path
        Staging files older than one day.
    """
    now = time.time() if now is None else now
    found: dict[int, list[Path]] = defaultdict(list)
    stale: list[Path] = []
    for root in roots:
        for kind, path in walk(root):
            if kind == "level2":
                m = LEVEL2_RE.match(path.name)
                assert m is not None
                found[int(m.group(1))].append(path.resolve())
            else:
                try:
                    if now - path.stat().st_mtime > STALE_STAGING_S:
                        stale.append(path)
                except OSError:
                    continue
    registered = {o.obsid: o for o in db.query_observations()}
    rows: list[dict[str, Any]] = []

    def add(category: str, obsid: int, db_path: str | None, disk: Path | None, action: str, detail: str = ""):
        rows.append(
            {
                "category": category,
                "obsid": obsid,
                "db_path": db_path,
                "disk_path": None if disk is None else str(disk),
                "action": action,
                "detail": detail,
            }
        )

    for obsid in sorted(set(found) | {o for o, r in registered.items() if r.level2_path}):
        obs = registered.get(obsid)
        db_path = obs.level2_path if obs is not None else None
        paths = found.get(obsid, [])
        if len(paths) > 1:
            add("duplicate", obsid, db_path, paths[0], "none", "; ".join(str(p) for p in paths))
            continue
        if not paths:
            if db_path and not os.path.exists(db_path):
                add("missing", obsid, db_path, None, "clear level2_path")
            continue  # registered outside the roots and present: not ours to judge
        disk = paths[0]
        if obs is None:
            add("not_in_db", obsid, None, disk, "none", "register it with DataAssess")
            continue
        if db_path and os.path.realpath(db_path) == str(disk):
            add("ok", obsid, db_path, disk, "none")
            continue
        problem = level2_problem(disk)
        if problem is not None:
            add("incomplete", obsid, db_path, disk, "none", problem)
            continue
        if not db_path:
            add("unregistered", obsid, db_path, disk, "set level2_path")
        elif not os.path.exists(db_path):
            add("moved", obsid, db_path, disk, "set level2_path")
        else:
            add("path_mismatch", obsid, db_path, disk, "none", "both files exist; resolve by hand")
    return rows, stale


def write_report(rows: list[dict[str, Any]], stale: list[Path], report_dir: Path, timestamp: str) -> Path:
    """Write ``reconcile_<timestamp>.tsv`` atomically and return its path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"reconcile_{timestamp}.tsv"
    lines = ["category\tobsid\tdb_path\tdisk_path\taction\tdetail"]
    for r in rows:
        lines.append(
            "\t".join(
                "" if r[k] is None else str(r[k])
                for k in ("category", "obsid", "db_path", "disk_path", "action", "detail")
            )
        )
    for p in stale:
        lines.append(f"stale_staging\t\t\t{p}\tremove by hand\tolder than 1 day")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _apply(db, rows: list[dict[str, Any]]) -> int:
    """Set or clear the level-2 paths the report asks for; return the number of changes."""
    n = 0
    for r in rows:
        if r["action"] == "set level2_path":
            db.set_level2_path(r["obsid"], r["disk_path"])
            n += 1
        elif r["action"] == "clear level2_path":
            db.clear_level2_info(r["obsid"])
            n += 1
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Compare level-2 files on disk with the database."
    )
    p.add_argument("--root", action="append", required=True, metavar="DIR", help="level-2 root (repeatable)")
    p.add_argument("--apply", action="store_true", help="fix the paths (default: dry run, read-only)")
    p.add_argument("--report-dir", default="logs/reconcile", metavar="DIR", help="where the TSV report goes")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        roots = [Path(r) for r in args.root]
        for r in roots:
            if not r.is_dir():
                raise UsageError(f"--root {r} is not a directory")
        db = open_db(args.db, write=args.apply)
        rows, stale = reconcile(db, roots)
        applied = 0
        if args.apply:
            with db.session():  # every fix in one transaction
                applied = _apply(db, rows)
        timestamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d_%H-%M-%S")
        report = write_report(rows, stale, Path(args.report_dir), timestamp)
        counts = Counter(r["category"] for r in rows)
        summary = [{"category": c, "count": counts[c]} for c in sorted(counts)]
        summary.append({"category": "stale_staging", "count": len(stale)})
        if args.format == "json":
            emit_json(
                {
                    "mode": "applied" if args.apply else "dry run",
                    "counts": {r["category"]: r["count"] for r in summary},
                    "changes_applied": applied,
                    "report": str(report),
                    "rows": [r for r in rows if r["category"] != "ok"],
                    "stale_staging": [str(p) for p in stale],
                }
            )
            return
        emit(summary, ["category", "count"], args.format)
        if args.format == "table":
            todo = [r for r in rows if r["category"] != "ok"]
            if todo:
                print()
                emit(todo, ["category", "obsid", "action", "db_path", "disk_path", "detail"], "table")
            for p in stale:
                print(f"stale staging file (remove by hand): {p}")
            mode = f"applied {applied} change(s)" if args.apply else "dry run: nothing changed (use --apply)"
            print(f"\n{mode}; report {report}")

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
