"""Observations of a target that have level 2 (docs/database.md#query-scripts).

``python -m modules.scripts.query_target TARGET [--min-obsid N] [--max-obsid N] [--paths] [--coords]
[--utc-offset-hours H] [--include-skydips] [--db DB] [--format table|csv|json]``

``TARGET`` may contain the wildcards ``*`` and ``?`` (case-insensitive). ``--coords`` adds the mean
RA/Dec (deg, ICRS) of the observation, read from ``spectrometer/pixel_pointing`` of the level-2
file (every feed, every ``--coords-stride``-th sample; RA averaged on the circle).
``--utc-offset-hours -8`` adds a local-time column (e.g. Pacific standard time at OVRO).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from modules.scripts._common import add_common_arguments, emit, open_db, prog, run_main
from utils.constants import UTC_START_FORMAT
from utils.level2 import PIXEL_DEC, PIXEL_RA

SCRIPT = "query_target"  # the installed command is comap-<SCRIPT with dashes>


def mean_radec(level2_path: str, stride: int = 50) -> tuple[float, float]:
    """Mean (RA, Dec) in degrees of a level-2 file's pixel pointing; NaN if unavailable.

    RA is averaged as a direction on the circle, so fields across RA = 0 come out right.
    """
    with h5py.File(level2_path, "r", locking=False) as l2:
        ra = np.asarray(l2[PIXEL_RA][:, ::stride], dtype=np.float64)
        dec = np.asarray(l2[PIXEL_DEC][:, ::stride], dtype=np.float64)
    good = np.isfinite(ra) & np.isfinite(dec)
    if not good.any():
        return math.nan, math.nan
    r = np.radians(ra[good])
    mean_ra = math.degrees(math.atan2(float(np.mean(np.sin(r))), float(np.mean(np.cos(r))))) % 360.0
    return mean_ra, float(np.mean(dec[good]))


def local_time(utc_start: str | None, offset_hours: float) -> str | None:
    """``utc_start`` shifted by ``offset_hours``, as ``YYYY-mm-dd HH:MM:SS``."""
    if not utc_start:
        return None
    try:
        t = _dt.datetime.strptime(utc_start, UTC_START_FORMAT)
    except ValueError:
        return None
    return (t + _dt.timedelta(hours=offset_hours)).strftime("%Y-%m-%d %H:%M:%S")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Observations of TARGET that have a level-2 file."
    )
    p.add_argument("target", help="source name; wildcards * and ? allowed (case-insensitive)")
    p.add_argument("--min-obsid", type=int, default=None)
    p.add_argument("--max-obsid", type=int, default=None)
    p.add_argument("--paths", action="store_true", help="add the level-1 and level-2 paths")
    p.add_argument("--coords", action="store_true", help="add the mean RA/Dec read from the level-2 file")
    p.add_argument("--coords-stride", type=int, default=50, help="sample stride for --coords (default 50)")
    p.add_argument(
        "--utc-offset-hours", type=float, default=None, metavar="H", help="add local time = UTC + H"
    )
    p.add_argument("--include-skydips", action="store_true", help="keep sky dips of the target")
    add_common_arguments(p)
    return p


def rows_for(db, args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    obs = db.query_observations(
        source=args.target, min_obsid=args.min_obsid, max_obsid=args.max_obsid, has_level2=True
    )
    if not args.include_skydips:
        obs = [o for o in obs if o.source_group != "SkyDip"]
    columns = ["obsid", "source", "source_group", "utc_start"]
    if args.utc_offset_hours is not None:
        columns.append("local_time")
    if args.paths:
        columns += ["level1_path", "level2_path"]
    if args.coords:
        columns += ["ra_deg", "dec_deg"]
    rows = []
    for o in obs:
        row: dict[str, Any] = {
            "obsid": o.obsid,
            "source": o.source,
            "source_group": o.source_group,
            "utc_start": o.utc_start,
            "level1_path": o.level1_path,
            "level2_path": o.level2_path,
        }
        if args.utc_offset_hours is not None:
            row["local_time"] = local_time(o.utc_start, args.utc_offset_hours)
        if args.coords:
            try:
                row["ra_deg"], row["dec_deg"] = mean_radec(o.level2_path, max(1, args.coords_stride))
            except (OSError, KeyError) as exc:
                print(
                    f"warning: obsid {o.obsid}: cannot read pointing from {o.level2_path}: {exc}",
                    file=sys.stderr,
                )
                row["ra_deg"] = row["dec_deg"] = None
        rows.append(row)
    return rows, columns


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        rows, columns = rows_for(open_db(args.db), args)
        emit(rows, columns, args.format)

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
