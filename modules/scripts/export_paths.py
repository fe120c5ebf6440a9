"""Export file paths for other workflows (docs/database.md#query-scripts).

``python -m modules.scripts.export_paths {level1,level2,both} [--source S] [--source-group G]
[--min-obsid N] [--max-obsid N] [--output FILE] [--db DB] [--format table|csv|json]``

The default output is one path per line (``both``: ``level1 level2`` on one line, only for
observations that have both), suitable for ``obsid_list``-style workflows. ``--format csv|json``
adds the obsid. ``--output`` writes the file atomically instead of printing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from modules.scripts._common import (
    add_common_arguments,
    add_selection_arguments,
    emit,
    open_db,
    prog,
    run_main,
)

SCRIPT = "export_paths"  # the installed command is comap-<SCRIPT with dashes>


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Print level-1 and/or level-2 paths, one per line."
    )
    p.add_argument("which", choices=("level1", "level2", "both"))
    add_selection_arguments(p)
    p.add_argument("--output", default=None, metavar="FILE", help="write to FILE instead of stdout")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        db = open_db(args.db)
        need = {"level1": {"has_level1": True}, "level2": {"has_level2": True}}.get(
            args.which, {"has_level1": True, "has_level2": True}
        )
        obs = db.query_observations(
            source=args.source,
            source_group=args.source_group,
            min_obsid=args.min_obsid,
            max_obsid=args.max_obsid,
            **need,
        )
        columns = ["obsid"] + (
            ["level1_path", "level2_path"] if args.which == "both" else [f"{args.which}_path"]
        )
        rows = [{c: getattr(o, c) for c in columns} for o in obs]
        buf = io.StringIO()
        if args.format == "table":
            for r in rows:
                buf.write(" ".join(str(r[c]) for c in columns[1:]) + "\n")
        else:
            emit(rows, columns, args.format, out=buf)
        if args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
            tmp.write_text(buf.getvalue(), encoding="utf-8")
            os.replace(tmp, out)
            print(f"wrote {len(rows)} line(s) to {out}", file=sys.stderr)
        else:
            sys.stdout.write(buf.getvalue())

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
