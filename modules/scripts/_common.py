"""Shared plumbing of the query scripts (docs/database.md#query-scripts): arguments, read-only DB opening,
output, exit codes.

Every script:

* takes ``--db PATH_OR_URL`` (default ``databases/COMAP_manchester.db``);
* opens the database **read-only** unless it was given ``--apply``;
* prints a plain-text table by default, or ``--format csv|json`` (``--csv`` = ``--format csv``);
* exits 0 on success, 2 on usage errors and 3 if the database is unreachable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from modules.scripts._commands import command_name as command_name
from modules.scripts._commands import prog as prog
from modules.SQLModule.SQLModule import SQLModule, db
from utils.errors import ConfigError, DatabaseError

DEFAULT_DB = "databases/COMAP_manchester.db"
EXIT_OK, EXIT_USAGE, EXIT_DB = 0, 2, 3
FORMATS = ("table", "csv", "json")


class UsageError(Exception):
    """A bad argument value found after parsing (exit status 2)."""


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=DEFAULT_DB,
        metavar="PATH_OR_URL",
        help=f"database path or SQLAlchemy URL ({DEFAULT_DB})",
    )


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument(
        "--csv", dest="format", action="store_const", const="csv", help="same as --format csv"
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--db``, ``--format`` and ``--csv``."""
    add_db_argument(parser)
    add_format_arguments(parser)


def add_selection_arguments(parser: argparse.ArgumentParser, *, obsid_range: bool = True) -> None:
    """``--source``, ``--source-group`` (wildcards ``*``/``?``), and ``--min-obsid``/``--max-obsid``."""
    parser.add_argument("--source", default=None, help="source name; wildcards * and ? allowed")
    parser.add_argument("--source-group", default=None, help="source group, e.g. Galactic; wildcards allowed")
    if obsid_range:
        parser.add_argument("--min-obsid", type=int, default=None)
        parser.add_argument("--max-obsid", type=int, default=None)


def open_db(target: str, *, write: bool = False, instance: SQLModule | None = None) -> SQLModule:
    """Connect ``instance`` (default the ``db`` singleton): read-only unless ``write``; never creates."""
    facade = instance if instance is not None else db
    facade.connect(target, create=False, read_only=not write)
    return facade


def run_main(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, run ``body(args)`` and map errors to the exit status (0, 2, 3)."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        status = body(args)
    except DatabaseError as exc:
        print(f"DatabaseError: {exc}", file=sys.stderr)
        return EXIT_DB
    except (UsageError, ConfigError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # pragma: no cover - e.g. piped into head
        return EXIT_OK
    finally:
        db.disconnect()
    return EXIT_OK if status is None else int(status)


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """JSON-friendly value: datetimes as ISO strings, NaN as None, tuples as lists."""
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def cell(value: Any) -> str:
    """Text of one table or CSV cell."""
    value = plain(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Aligned plain-text table with a header and a dashed rule."""
    text = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in text]) for i, c in enumerate(columns)]
    numeric = [
        all(_is_number(t[i]) for t in text if t[i]) and any(t[i] for t in text) for i in range(len(columns))
    ]

    def fmt(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [fmt(columns), "  ".join("-" * w for w in widths)]
    lines += [fmt(t) for t in text]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def emit(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    fmt: str,
    *,
    out: TextIO | None = None,
    title: str | None = None,
    empty: str = "(no rows)",
) -> None:
    """Print ``rows`` (dicts) restricted to ``columns`` as a table, CSV or JSON."""
    out = out or sys.stdout
    if fmt == "json":
        json.dump([{c: plain(r.get(c)) for c in columns} for r in rows], out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            writer.writerow([cell(r.get(c)) for c in columns])
    else:
        if title:
            out.write(f"{title}\n")
        out.write((render_table(rows, columns) if rows else empty) + "\n")


def emit_json(obj: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(plain(obj), out, indent=2)
    out.write("\n")


def int_list(values: Iterable[str] | None, what: str) -> list[int] | None:
    """Parse repeatable or comma-separated integer options (``--feed 1,2 --feed 3``)."""
    if not values:
        return None
    out: list[int] = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise UsageError(f"{what} {part!r} is not an integer") from None
    return out or None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of a sorted, NaN-free sequence (NaN if empty)."""
    if not values:
        return math.nan
    pos = (len(values) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(values) - 1)
    return float(values[lo] + (values[hi] - values[lo]) * (pos - lo))
