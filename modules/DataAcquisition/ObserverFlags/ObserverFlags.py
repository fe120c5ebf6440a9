"""ObserverFlags: apply observer flags from a CSV file to ``quality_flags``
(docs/acquisition.md#observerflags).

CSV format (header required; column names matched case-insensitively after trimming):

============  ========  ==============================================================================
column        required  values
============  ========  ==============================================================================
ObsID start   yes       integer
ObsID end     no        integer; empty = start; ``ongoing`` = the largest obsid in the database
Pixels        yes       ``all`` (or any text without digits) = every feed; else feed numbers
                        ``"3, 7, 12"`` (ranges ``"1-4"`` are accepted too)
Sidebands     yes       ``all`` = bands 0–3; ``bandA`` = 0, 1; ``bandB`` = 2, 3; or band numbers ``"0,2"``
Comment       no        free text, stored as ``Observer Flag: <comment>``
============  ========  ==============================================================================

The whole file is parsed and validated at config load; every bad line is reported as
``<csv>:<line>: <problem>``. ``run()`` resets every observer flag and applies the CSV in one
transaction, so running it twice gives the same flags; pipeline flags are never touched.

Command line::

    python -m modules.DataAcquisition.ObserverFlags.ObserverFlags CSV [--db DB] [--dry-run]
"""

from __future__ import annotations

import argparse
import bisect
import csv
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from modules.SQLModule.SQLModule import db
from utils.constants import MAX_FEED, MIN_FEED
from utils.errors import ConfigError, ConfigErrors, DatabaseError

log = logging.getLogger("comap.ObserverFlags")

COMMENT_PREFIX = "Observer Flag:"
_SIDEBAND_WORDS: dict[str, tuple[int, ...]] = {
    "all": (0, 1, 2, 3),
    "banda": (0, 1),
    "bandb": (2, 3),
}
_REQUIRED = ("obsid start", "pixels", "sidebands")
_KNOWN = (*_REQUIRED, "obsid end", "comment")


@dataclass(frozen=True)
class FlagRow:
    """One parsed CSV row.

    Attributes
    ----------
    line : int
        Line number in the CSV (1 = header).
    start : int
    end : int or None
        None means ``ongoing`` (the largest obsid in the database).
    feeds : tuple of int or None
        None = every feed of the observation.
    bands : tuple of int
    comment : str
        As stored: ``Observer Flag: <comment>``.
    """

    line: int
    start: int
    end: int | None
    feeds: tuple[int, ...] | None
    bands: tuple[int, ...]
    comment: str


def _int_list(text: str, what: str, lo: int, hi: int) -> tuple[int, ...]:
    out: set[int] = set()
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"empty {what} range '{part}'")
            values = range(a, b + 1)
        elif re.fullmatch(r"\d+", part):
            values = range(int(part), int(part) + 1)
        else:
            raise ValueError(f"bad {what} value '{part}' (expected numbers separated by commas)")
        for v in values:
            if not lo <= v <= hi:
                raise ValueError(f"{what} {v} is outside {lo}–{hi}")
            out.add(v)
    if not out:
        raise ValueError(f"no {what} given")
    return tuple(sorted(out))


def parse_pixels(text: str) -> tuple[int, ...] | None:
    """``all`` or any text without digits → None (every feed); else the listed feed numbers."""
    if not re.search(r"\d", text):
        return None
    return _int_list(text, "feed", MIN_FEED, MAX_FEED)


def parse_sidebands(text: str) -> tuple[int, ...]:
    """``all``, ``bandA`` (0, 1), ``bandB`` (2, 3) or band numbers 0–3; anything else raises."""
    key = re.sub(r"[\s_-]", "", text).lower()
    if key in _SIDEBAND_WORDS:
        return _SIDEBAND_WORDS[key]
    if re.fullmatch(r"[\d,\s]+", text.strip()) and text.strip():
        return _int_list(text, "band", 0, 3)
    raise ValueError(f"unknown Sidebands value '{text.strip()}' (expected all, bandA, bandB or e.g. 0,2)")


def parse_flags_csv(path: str | Path) -> tuple[list[FlagRow], list[str]]:
    """Parse and validate the whole observer-flag CSV.

    Returns
    -------
    rows : list of FlagRow
        The valid rows.
    problems : list of str
        One ``<csv>:<line>: <problem>`` per bad line (empty if the file is valid).
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        return [], [f"{name}: cannot read the observer-flag CSV: {exc.strerror or exc}"]
    lines = list(csv.reader(text.splitlines()))
    header_idx = next((i for i, rec in enumerate(lines) if any(c.strip() for c in rec)), None)
    if header_idx is None:
        return [], [f"{name}:1: empty file; a header row is required"]
    header = [c.strip().lower() for c in lines[header_idx]]
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        return [], [
            f"{name}:{header_idx + 1}: header lacks required column(s) "
            + ", ".join(repr(m) for m in missing)
            + f" (found {', '.join(repr(h) for h in header)})"
        ]
    unknown = [h for h in header if h and h not in _KNOWN]
    if unknown:
        log.info("%s: ignoring unknown column(s) %s", name, ", ".join(unknown))
    col = {h: i for i, h in enumerate(header) if h}
    rows: list[FlagRow] = []
    problems: list[str] = []
    for i in range(header_idx + 1, len(lines)):
        rec = lines[i]
        lineno = i + 1
        if not any(c.strip() for c in rec):
            continue

        def cell(key: str, rec: Sequence[str] = rec) -> str:
            j = col.get(key)
            return rec[j].strip() if j is not None and j < len(rec) else ""

        try:
            start_text = cell("obsid start")
            if not re.fullmatch(r"\d+", start_text):
                raise ValueError(f"ObsID start '{start_text}' is not an obsid")
            start = int(start_text)
            end_text = cell("obsid end")
            if not end_text:
                end: int | None = start
            elif end_text.lower() == "ongoing":
                end = None
            elif re.fullmatch(r"\d+", end_text):
                end = int(end_text)
                if end < start:
                    raise ValueError(f"ObsID end {end} is before ObsID start {start}")
            else:
                raise ValueError(f"ObsID end '{end_text}' is not an obsid, empty or 'ongoing'")
            pixels = cell("pixels")
            if not pixels:
                raise ValueError("Pixels is empty (write 'all' for every feed)")
            feeds = parse_pixels(pixels)
            sidebands = cell("sidebands")
            if not sidebands:
                raise ValueError("Sidebands is empty (write 'all', 'bandA', 'bandB' or band numbers)")
            bands = parse_sidebands(sidebands)
        except ValueError as exc:
            problems.append(f"{name}:{lineno}: {exc}")
            continue
        comment = cell("comment")
        rows.append(
            FlagRow(
                line=lineno,
                start=start,
                end=end,
                feeds=feeds,
                bands=bands,
                comment=f"{COMMENT_PREFIX} {comment}" if comment else COMMENT_PREFIX,
            )
        )
    return rows, problems


@dataclass
class FlagPlan:
    """What :meth:`ObserverFlags.run` does: the obsids of each row and the rows matching nothing."""

    per_row: list[tuple[FlagRow, list[int]]]
    unmatched: list[FlagRow]

    @property
    def obsids(self) -> list[int]:
        return sorted({o for _, ids in self.per_row for o in ids})


def plan_flags(rows: Sequence[FlagRow], registered: Sequence[int]) -> FlagPlan:
    """Resolve each row's obsid range against the registered obsids (``ongoing`` = the largest)."""
    ids = sorted(registered)
    latest = ids[-1] if ids else None
    per_row: list[tuple[FlagRow, list[int]]] = []
    unmatched: list[FlagRow] = []
    for row in rows:
        end = row.end if row.end is not None else latest
        matched = (
            [] if end is None else ids[bisect.bisect_left(ids, row.start) : bisect.bisect_right(ids, end)]
        )
        if matched:
            per_row.append((row, matched))
        else:
            unmatched.append(row)
    return FlagPlan(per_row, unmatched)


BinnedChannel = Annotated[int, Range(ge=0)]
"""A binned channel number (the ``default_channels`` items)."""


class ObserverFlags(PipelineStage):
    """Apply observer flags from a CSV file to quality_flags (reset, then flag, in one transaction).

    Parameters
    ----------
    observer_flags_csv_file : str
        The CSV (columns ``ObsID start``, ``ObsID end``, ``Pixels``, ``Sidebands``, ``Comment``).
    default_channels : list of int
        Binned channels for rows that must be created for an observation that has none yet.
    """

    def __init__(
        self,
        observer_flags_csv_file: str,
        default_channels: list[BinnedChannel] | tuple[BinnedChannel, ...] = (0, 1),
    ) -> None:
        self.observer_flags_csv_file = observer_flags_csv_file
        self.default_channels = default_channels
        self._rows: list[FlagRow] | None = None

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        channels = params["default_channels"]
        if isinstance(channels, list | tuple) and not channels:
            problems.append(
                f"default_channels must be a non-empty list of channel numbers >= 0, got {channels!r}"
            )
        path = params["observer_flags_csv_file"]
        if not isinstance(path, str) or not path:
            return [*problems, "observer_flags_csv_file must be the path of the observer-flag CSV"]
        _, csv_problems = parse_flags_csv(path)
        return problems + csv_problems

    def rows(self) -> list[FlagRow]:
        """The parsed CSV rows (raises ConfigErrors if the file became invalid since config load)."""
        if self._rows is None:
            rows, problems = parse_flags_csv(self.observer_flags_csv_file)
            if problems:
                raise ConfigErrors([ConfigError(p) for p in problems])
            self._rows = rows
        return self._rows

    def plan(self) -> list[str]:
        flag_plan = plan_flags(self.rows(), db.query_all_obsids())
        n_rows = len(self.rows())
        lines = [
            f"ObserverFlags: {self.observer_flags_csv_file}: {n_rows} CSV row(s); would reset observer flags "
            f"and flag {len(flag_plan.obsids)} observation(s)"
        ]
        if flag_plan.unmatched:
            lines.append(
                "  CSV rows matching no registered obsid: lines "
                + ", ".join(str(r.line) for r in flag_plan.unmatched)
            )
        return lines

    def run(self) -> StageResult:
        result = StageResult(stage="ObserverFlags")
        rows = self.rows()
        channels = [int(c) for c in self.default_channels]
        with db.session():
            flag_plan = plan_flags(rows, db.query_all_obsids())
            n_reset = db.reset_observer_flags()
            n_set = 0
            for row, obsids in flag_plan.per_row:
                for obsid in obsids:
                    n_set += db.set_quality_flags(
                        obsid,
                        feeds=row.feeds,
                        bands=row.bands,
                        channels=None,
                        default_channels=channels,
                        observer_ok=False,
                        comment=row.comment,
                    )
        result.done = len(flag_plan.obsids)
        ids = flag_plan.obsids
        log.info(
            "ObserverFlags: %s: %d CSV row(s); reset %d row(s); flagged %d observation(s), %d row(s)%s",
            self.observer_flags_csv_file,
            len(rows),
            n_reset or 0,
            len(ids),
            n_set,
            f": {', '.join(str(o) for o in ids[:20])}{', …' if len(ids) > 20 else ''}" if ids else "",
        )
        if flag_plan.unmatched:
            log.warning(
                "%d CSV row(s) match no registered obsid: %s",
                len(flag_plan.unmatched),
                "; ".join(
                    f"line {r.line} (obsid {r.start}–{'ongoing' if r.end is None else r.end})"
                    for r in flag_plan.unmatched[:20]
                ),
            )
        result.notes.append(f"{len(flag_plan.obsids)} observation(s) flagged, {n_set} row(s)")
        return result


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m modules.DataAcquisition.ObserverFlags.ObserverFlags CSV [--db DB] [--dry-run]``.

    Exit status: 0 success, 2 invalid CSV or usage, 3 database unreachable.
    """
    parser = argparse.ArgumentParser(
        prog="python -m modules.DataAcquisition.ObserverFlags.ObserverFlags",
        description="Apply observer flags from a CSV file to the quality_flags table.",
    )
    parser.add_argument("csv", help="observer-flag CSV (ObsID start, ObsID end, Pixels, Sidebands, Comment)")
    parser.add_argument(
        "--db", default="databases/COMAP_manchester.db", help="database path or SQLAlchemy URL"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would be flagged; write nothing")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(name)s: %(message)s")
    rows, problems = parse_flags_csv(args.csv)
    if problems:
        for p in problems:
            print(f"ConfigError: {p}", file=sys.stderr)
        return 2
    try:
        db.connect(args.db, create=False, read_only=args.dry_run)
    except DatabaseError as exc:
        print(f"DatabaseError: {exc}", file=sys.stderr)
        return 3
    stage = ObserverFlags(args.csv)
    stage._rows = rows
    try:
        if args.dry_run:
            for line in stage.plan():
                print(line)
        else:
            result = stage.run()
            print(f"ObserverFlags: {'; '.join(result.notes)}")
    except DatabaseError as exc:
        print(f"DatabaseError: {exc}", file=sys.stderr)
        return 3
    finally:
        db.disconnect()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
