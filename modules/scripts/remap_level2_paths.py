"""Rewrite level-2 paths under a moved directory (docs/database.md#query-scripts).

``python -m modules.scripts.remap_level2_paths OLD_PREFIX NEW_PREFIX [--apply] [--require-exists]
[--db DB] [--format table|csv|json]``

Prefixes match whole path components (``/data/l2`` matches ``/data/l2/x.hd5`` but not
``/data/l2old/x.hd5``). Dry run by default (the database is opened read-only): prints the counts
(matched, changed, skipped because the new path is missing) and a sample of old → new paths.
``--apply`` writes the changes; ``--require-exists`` changes only rows whose new path exists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from modules.scripts._common import add_common_arguments, emit, emit_json, open_db, prog, run_main

SCRIPT = "remap_level2_paths"  # the installed command is comap-<SCRIPT with dashes>


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Rewrite level2_path values that start with OLD_PREFIX."
    )
    p.add_argument("old_prefix")
    p.add_argument("new_prefix")
    p.add_argument("--apply", action="store_true", help="write the changes (default: dry run, read-only)")
    p.add_argument("--require-exists", action="store_true", help="change only rows whose new path exists")
    add_common_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        db = open_db(args.db, write=args.apply)
        res = db.remap_level2_paths(
            args.old_prefix,
            args.new_prefix,
            dry_run=not args.apply,
            require_new_path_exists=args.require_exists,
        )
        sample = [{"obsid": o, "old_path": a, "new_path": b} for o, a, b in res["sample"]]
        if args.format == "json":
            emit_json({**{k: v for k, v in res.items() if k != "sample"}, "sample": sample})
            return
        counts = [
            {
                "matched": res["matched"],
                "changed": res["changed"],
                "skipped_missing": res["skipped_missing"],
                "mode": "applied" if args.apply else "dry run",
            }
        ]
        emit(counts, ["mode", "matched", "changed", "skipped_missing"], args.format)
        if args.format == "table" and sample:
            print()
            emit(sample, ["obsid", "old_path", "new_path"], "table", title="sample (old -> new)")

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
