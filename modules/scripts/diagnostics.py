"""Diagnostic plots from the database (PNG, written atomically).

``python -m modules.scripts.diagnostics PLOT --db DB --out PNG [options]``

Plots:

``stat-vs-mjd``    a quality statistic (``--stat``, default ``filtered_white_noise``) against MJD, one
                   series per feed or band (``--by feed|band``), median over the other axes of each
                   observation
``feed-band-map``  feed × band heat map of the median of a statistic over observations and channels
``calibrator``     measured calibrator flux (Jy) against date, with the source model flux and the
                   calibration model (model flux × calibration factor); ``--source TauA``,
                   ``--band``, ``--channel``
``source-groups``  observations per source group, stacked by level-2 status

Selections: ``--source``, ``--source-group``, ``--min-obsid``, ``--max-obsid``, ``--feed``,
``--band``, ``--channel``. The database is opened read-only.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from modules.scripts._common import (
    UsageError,
    add_db_argument,
    add_selection_arguments,
    int_list,
    open_db,
    prog,
    run_main,
)
from modules.SQLModule.SQLModule import QUALITY_STAT_COLUMNS
from utils.constants import BAND_EDGES_GHZ
from utils.plotting import new_figure, save_figure

SCRIPT = "diagnostics"  # the installed command is comap-<SCRIPT with dashes>
STATUS_ORDER = ("done", "failed", "running", "pending")
STATUS_COLOURS = {"done": "tab:green", "failed": "tab:red", "running": "tab:orange", "pending": "tab:grey"}


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    f: dict[str, Any] = {
        "source": args.source,
        "source_group": args.source_group,
        "min_obsid": args.min_obsid,
        "max_obsid": args.max_obsid,
    }
    for name in ("feed", "band", "channel"):
        values = int_list(getattr(args, name), f"--{name}")
        if values is not None:
            f[name + "s"] = values
    return f


def _check_stat(stat: str) -> None:
    if stat not in QUALITY_STAT_COLUMNS:
        raise UsageError(f"unknown statistic {stat!r}; choose from {', '.join(QUALITY_STAT_COLUMNS)}")


def _no_data(ax, text: str = "no data for this selection") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    print(f"warning: {text}", file=sys.stderr)


def plot_stat_vs_mjd(db, args: argparse.Namespace):
    """Per observation and series (feed or band): median of the statistic against MJD."""
    _check_stat(args.stat)
    rows = db.query_statistics([args.stat], **_filters(args))
    series: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    mjd: dict[int, float] = {}
    for r in rows:
        v = r[args.stat]
        if v is None or r["mjd_start"] is None or not np.isfinite(v):
            continue
        series[r[args.by]][r["obsid"]].append(float(v))
        mjd[r["obsid"]] = float(r["mjd_start"])
    fig, ax = new_figure(figsize=(9.0, 5.0))
    if not series:
        _no_data(ax)
    for key in sorted(series):
        obsids = sorted(series[key], key=lambda o: mjd[o])
        x = [mjd[o] for o in obsids]
        y = [float(np.median(series[key][o])) for o in obsids]
        ax.plot(x, y, marker="o", linestyle="-", label=f"{args.by} {key}")
    ax.set_xlabel("MJD")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_ylabel(args.stat)
    ax.set_title(f"{args.stat} against time, by {args.by}")
    if series:
        ax.legend(fontsize="small", ncols=2 if len(series) > 8 else 1)
    return fig, sum(len(v) for v in series.values())


def plot_feed_band_map(db, args: argparse.Namespace):
    """Median of the statistic over observations and channels, per (feed, band)."""
    _check_stat(args.stat)
    rows = db.query_statistics([args.stat], **_filters(args))
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    for r in rows:
        v = r[args.stat]
        if v is not None and np.isfinite(v):
            cells[(r["feed"], r["band"])].append(float(v))
    fig, ax = new_figure(figsize=(6.0, 8.0))
    if not cells:
        _no_data(ax)
        return fig, 0
    feeds = sorted({f for f, _ in cells})
    bands = sorted({b for _, b in cells} | set(range(4)))
    grid = np.full((len(feeds), len(bands)), np.nan)
    for (f, b), values in cells.items():
        grid[feeds.index(f), bands.index(b)] = np.median(values)
    im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis")
    ax.set_xticks(
        range(len(bands)), [f"{b}\n{BAND_EDGES_GHZ[b][0]:.0f}-{BAND_EDGES_GHZ[b][1]:.0f} GHz" for b in bands]
    )
    ax.set_yticks(range(len(feeds)), [str(f) for f in feeds])
    ax.set_xlabel("band")
    ax.set_ylabel("feed")
    ax.set_title(f"median {args.stat}")
    fig.colorbar(im, ax=ax, label=args.stat)
    return fig, len(cells)


def plot_calibrator(db, args: argparse.Namespace):
    """Measured flux against date per feed, with the model flux and model × calibration factor."""
    from utils.calibrators import flux_jy

    feeds = int_list(args.feed, "--feed")
    band = int(int_list(args.band, "--band")[0]) if args.band else 0
    channel = int(int_list(args.channel, "--channel")[0]) if args.channel else 0
    rows = [
        r
        for r in db.query_calibration_flux(
            args.source, min_obsid=args.min_obsid, max_obsid=args.max_obsid, feeds=feeds
        )
        if r.band == band and r.channel == channel and r.mjd is not None and r.measured_flux is not None
    ]
    fig, ax = new_figure(figsize=(9.0, 5.0))
    if not rows:
        _no_data(ax, f"no {args.source} flux for band {band}, channel {channel}")
        return fig, 0
    try:
        table = db.load_calibration_table(args.source)
    except ValueError as exc:
        print(f"warning: calibration model of {args.source} unusable: {exc}", file=sys.stderr)
        table = None
    by_feed: dict[int, list[Any]] = defaultdict(list)
    for r in rows:
        by_feed[r.feed].append(r)
    all_mjd = np.array([r.mjd for r in rows])
    grid = np.linspace(all_mjd.min() - 1.0, all_mjd.max() + 1.0, 200)
    freq = float(np.nanmedian([r.frequency_ghz for r in rows if r.frequency_ghz is not None] or [np.nan]))
    model = None
    if np.isfinite(freq):
        try:
            model = np.asarray(flux_jy(args.source, freq, grid), dtype=float)
            ax.plot(grid, model, color="k", linestyle="--", label=f"{args.source} model at {freq:.2f} GHz")
        except (KeyError, ValueError) as exc:
            print(f"warning: no flux model for {args.source}: {exc}", file=sys.stderr)
    for feed in sorted(by_feed):
        rs = sorted(by_feed[feed], key=lambda r: r.mjd)
        x = np.array([r.mjd for r in rs])
        y = np.array([r.measured_flux for r in rs], dtype=float)
        e = np.array([r.flux_error if r.flux_error is not None else np.nan for r in rs], dtype=float)
        line = ax.errorbar(x, y, yerr=e, fmt="o", capsize=2, label=f"feed {feed}")
        if model is not None and table is not None and table.has(feed, band, channel):
            ax.plot(
                grid,
                model * table.factor(feed, band, channel, grid),
                color=line[0].get_color(),
                alpha=0.7,
                label=f"feed {feed}: model × calibration factor",
            )
    ax.set_xlabel("MJD")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_ylabel("flux density (Jy)")
    ax.set_title(f"{args.source} flux, band {band} channel {channel} (lines: model × calibration factor)")
    ax.legend(fontsize="small")
    return fig, len(rows)


def plot_source_groups(db, args: argparse.Namespace):
    """Observations per source group, stacked by level-2 job status."""
    obs = db.query_observations(
        source=args.source, source_group=args.source_group, min_obsid=args.min_obsid, max_obsid=args.max_obsid
    )
    jobs = {j.obsid: j.status for j in db.job_table("level2", obsids=[o.obsid for o in obs])} if obs else {}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATUS_ORDER, 0))
    for o in obs:
        counts[o.source_group or "(none)"][jobs.get(o.obsid, "pending")] += 1
    fig, ax = new_figure(figsize=(8.0, 5.0))
    if not counts:
        _no_data(ax)
        return fig, 0
    groups = sorted(counts)
    bottom = np.zeros(len(groups))
    for status in STATUS_ORDER:
        values = np.array([counts[g][status] for g in groups], dtype=float)
        if values.any():
            ax.bar(groups, values, bottom=bottom, label=status, color=STATUS_COLOURS[status])
            bottom += values
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{int(total)}", ha="center", va="bottom")
    ax.set_ylabel("observations")
    ax.set_title("observations per source group (level-2 status)")
    ax.legend()
    return fig, len(obs)


PLOTS = {
    "stat-vs-mjd": plot_stat_vs_mjd,
    "feed-band-map": plot_feed_band_map,
    "calibrator": plot_calibrator,
    "source-groups": plot_source_groups,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(SCRIPT), description="Diagnostic plots from the comap-reduce database."
    )
    p.add_argument("plot", choices=sorted(PLOTS))
    p.add_argument("--out", required=True, metavar="PNG", help="output PNG file")
    add_db_argument(p)
    add_selection_arguments(p)
    p.add_argument("--feed", action="append", help="feed number(s), e.g. 1,2")
    p.add_argument(
        "--band", action="append", help="band(s) 0-3 (calibrator: the one band plotted, default 0)"
    )
    p.add_argument("--channel", action="append", help="binned channel(s) (calibrator: default 0)")
    p.add_argument(
        "--stat", default="filtered_white_noise", help="quality statistic (stat-vs-mjd, feed-band-map)"
    )
    p.add_argument("--by", choices=("feed", "band"), default="feed", help="series of stat-vs-mjd")
    p.add_argument("--dpi", type=int, default=100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 usage, 3 database unreachable)."""

    def body(args: argparse.Namespace) -> None:
        if args.plot == "calibrator" and args.source is None:
            args.source = "TauA"
        db = open_db(args.db)
        fig, n = PLOTS[args.plot](db, args)
        path = save_figure(fig, args.out, dpi=args.dpi)
        print(f"wrote {path} ({n} point(s))")

    return run_main(build_parser(), body, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
