"""Merge one comap-reduce database into another (docs/database.md#query-scripts).

``python -m modules.scripts.merge_databases SRC DST [--apply] [--prefer-src] [--format table|csv|json]``

Every table of SRC is merged into DST (``--db`` does not apply). Rows are matched on each table's
unique key:

=========================  =================================
table                      key
=========================  =================================
``comap_data``             obsid
``observation_summary``    obsid
``quality_flags``          obsid, feed, band, channel
``calibration_flux``       obsid, feed, band, channel
``calibration_model_fit``  source, feed, band, channel
``processing_jobs``        obsid, stage
=========================  =================================

Rows missing from DST are inserted. A NULL in DST is filled from SRC. Rows that differ in non-null
values are **conflicts**: each is reported, and DST keeps its values unless ``--prefer-src``.
Bookkeeping timestamps (columns ending in ``_utc``) are filled but never reported as conflicts.
Both databases must have the current schema version. Dry run by default: SRC and DST are opened
read-only and the counts per table and the conflicts are printed; ``--apply`` writes DST in one
transaction.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, and_, insert, select, update

from modules.scripts._common import UsageError, add_format_arguments, emit, emit_json, open_db, prog, run_main
from modules.SQLModule.SQLModule import Base, SQLModule

SCRIPT = "merge_databases"  # the installed command is comap-<SCRIPT with dashes>

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "comap_data": ("obsid",),
    "observation_summary": ("obsid",),
    "quality_flags": ("obsid", "feed", "band", "channel"),
    "calibration_flux": ("obsid", "feed", "band", "channel"),
    "calibration_model_fit": ("source", "feed", "band", "channel"),
    "processing_jobs": ("obsid", "stage"),
}
"""Merge order (parents before children) and the unique key of each table (docs/database.md#schema)."""

_CHUNK = 500


@dataclass
class TableReport:
    table: str
    src_rows: int = 0
    inserted: int = 0
    filled: int = 0
    identical: int = 0
    conflicts: int = 0
    overwritten: int = 0


@dataclass
class MergeReport:
    tables: list[TableReport] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))
    return a == b


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _rows(conn, table: Table, obsids: Sequence[int] | None) -> list[dict[str, Any]]:
    stmt = select(table)
    if obsids is not None:
        stmt = stmt.where(table.c.obsid.in_(list(obsids)))
    return [dict(r._mapping) for r in conn.execute(stmt)]


def merge(src: SQLModule, dst: SQLModule, *, apply: bool, prefer_src: bool) -> MergeReport:
    """Merge ``src`` into ``dst``; write only if ``apply`` (one transaction)."""
    report = MergeReport()
    ops: list[tuple[Table, str, dict[str, Any], dict[str, Any] | None]] = []
    with src.engine.connect() as sconn, dst.engine.connect() as dconn:
        for name, key in TABLE_KEYS.items():
            table: Table = Base.metadata.tables[name]
            tr = TableReport(name)
            report.tables.append(tr)
            cols = [c.name for c in table.columns if c.name != "id"]
            if "obsid" in key:
                obsids = sorted({r[0] for r in sconn.execute(select(table.c.obsid).distinct())})
                groups: list[Sequence[int] | None] = list(_chunks(obsids))
            else:
                groups = [None]
            for group in groups:
                src_rows = _rows(sconn, table, group)
                dst_rows = {tuple(r[k] for k in key): r for r in _rows(dconn, table, group)}
                for srow in src_rows:
                    tr.src_rows += 1
                    k = tuple(srow[c] for c in key)
                    drow = dst_rows.get(k)
                    if drow is None:
                        tr.inserted += 1
                        ops.append((table, "insert", {c: srow[c] for c in cols}, None))
                        continue
                    fill: dict[str, Any] = {}
                    differ: dict[str, tuple[Any, Any]] = {}
                    for c in cols:
                        if c in key:
                            continue
                        sv, dv = srow[c], drow[c]
                        if sv is None or _same(sv, dv):
                            continue
                        if dv is None:
                            fill[c] = sv
                        elif not c.endswith("_utc"):
                            differ[c] = (dv, sv)
                    values = dict(fill)
                    if differ:
                        tr.conflicts += 1
                        for c, (dv, sv) in differ.items():
                            report.conflicts.append(
                                {
                                    "table": name,
                                    "key": ", ".join(f"{kc}={kv}" for kc, kv in zip(key, k)),
                                    "column": c,
                                    "dst_value": dv,
                                    "src_value": sv,
                                    "kept": "src" if prefer_src else "dst",
                                }
                            )
                        if prefer_src:
                            tr.overwritten += 1
                            values.update({c: srow[c] for c in cols if c not in key and srow[c] is not None})
                    elif fill:
                        tr.filled += 1
                    else:
                        tr.identical += 1
                    if values:
                        ops.append((table, "update", values, dict(zip(key, k))))
    if apply and ops:
        with dst.session() as s:
            for table, kind, values, where in ops:
                if kind == "insert":
                    s.execute(insert(table).values(**values))
                else:
                    assert where is not None
                    cond = and_(*(table.c[c] == v for c, v in where.items()))
                    s.execute(update(table).where(cond).values(**values))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Merge every table of SRC into DST (dry run by default)."
    )
    p.add_argument("src", help="source database (path or SQLAlchemy URL); opened read-only")
    p.add_argument("dst", help="destination database; read-only unless --apply")
    p.add_argument("--apply", action="store_true", help="write DST (one transaction)")
    p.add_argument("--prefer-src", action="store_true", help="on conflicts take the SRC values")
    add_format_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        if (
            "://" not in args.src
            and "://" not in args.dst
            and os.path.realpath(args.src) == os.path.realpath(args.dst)
        ):
            raise UsageError("SRC and DST are the same database")
        src = open_db(args.src, instance=SQLModule())
        dst = open_db(args.dst, write=args.apply, instance=SQLModule())
        try:
            report = merge(src, dst, apply=args.apply, prefer_src=args.prefer_src)
        finally:
            src.disconnect()
            dst.disconnect()
        rows = [vars(t) for t in report.tables]
        columns = ["table", "src_rows", "inserted", "filled", "identical", "conflicts", "overwritten"]
        if args.format == "json":
            emit_json(
                {
                    "mode": "applied" if args.apply else "dry run",
                    "tables": rows,
                    "conflicts": report.conflicts,
                }
            )
            return
        emit(rows, columns, args.format)
        if args.format == "table":
            if report.conflicts:
                print()
                emit(
                    report.conflicts,
                    ["table", "key", "column", "dst_value", "src_value", "kept"],
                    "table",
                    title=f"{len(report.conflicts)} conflicting value(s)",
                )
            print(
                "\n" + ("applied to " + args.dst if args.apply else "dry run: nothing written (use --apply)")
            )

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
