"""Simulated archives (docs/simulator.md#interfaces, docs/simulator.md#presets-and-sizes):
``<out>/<YYYY-MM>/comap-…hd5`` plus ``<out>/obs_index.csv``.

``obs_index.csv`` is written last and atomically, so its presence means the archive is complete.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import h5py

from .presets import PRESETS
from .spec import ArchiveSpec
from .writer import simulate_observation

log = logging.getLogger("comap.simulator")

INDEX_NAME: str = "obs_index.csv"
INDEX_COLUMNS: tuple[str, ...] = ("obsid", "relative_path", "source", "comment", "utc_start", "size_bytes")


def resolve_archive(preset: str | ArchiveSpec) -> tuple[str, ArchiveSpec]:
    """(preset name, ArchiveSpec) for a preset name or an ArchiveSpec."""
    if isinstance(preset, ArchiveSpec):
        return preset.name, preset
    return str(preset), PRESETS[str(preset)]


def make_archive(
    preset: str | ArchiveSpec,
    out_dir: str | os.PathLike,
    seed: int = 1,
    *,
    date: str | None = None,
    timings: dict[int, dict[str, float]] | None = None,
) -> list[Path]:
    """Simulate every observation of ``preset`` into ``out_dir`` in the archive layout.

    Parameters
    ----------
    preset : str or ArchiveSpec
        A name from :data:`PRESETS` (``test-tiny``, ``test-small``, ``demo``, ``rrl-fullres``,
        ``bench-full``) or an explicit archive specification.
    out_dir : path
        Archive root; created if missing. An existing ``obs_index.csv`` is removed first and
        rewritten at the end.
    seed : int
        Noise (and default instrument) seed.
    date : str, optional
        ``YYYY-MM-DD`` replacing every observation's date (and the date part of explicit
        ``start_utc`` values); presets observe on 2026-03-01 otherwise.
    timings : dict, optional
        Filled with per-obsid phase timings (see :func:`simulate_observation`).

    Returns
    -------
    list of Path
        The level-1 files, in the order of the specification.
    """
    name, archive = resolve_archive(preset)
    if date is not None:
        archive = with_date(archive, date)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    index = root / INDEX_NAME
    if index.exists():
        index.unlink()
    paths: list[Path] = []
    rows: list[dict[str, object]] = []
    for obs in archive.observations:
        t: dict[str, float] = {}
        path = simulate_observation(obs, root, seed=seed, preset=name, timings=t, month_subdir=True)
        if timings is not None:
            timings[obs.obsid] = t
        log.info("simulated %s in %.1f s", path.name, t.get("total", float("nan")))
        paths.append(path)
        with h5py.File(path, "r") as h5:
            attrs = h5["comap"].attrs
            rows.append(
                {
                    "obsid": int(attrs["obsid"]),
                    "relative_path": path.relative_to(root).as_posix(),
                    "source": str(attrs["source"]),
                    "comment": str(attrs["comment"]),
                    "utc_start": str(attrs["utc_start"]),
                    "size_bytes": path.stat().st_size,
                }
            )
    write_index(root, rows)
    return paths


def with_date(archive: ArchiveSpec, date: str) -> ArchiveSpec:
    """Copy of ``archive`` observing on ``date`` (YYYY-MM-DD)."""
    from datetime import date as _date

    _date.fromisoformat(date)  # validates the format
    obs = []
    for o in archive.observations:
        start = o.start_utc if o.start_utc == "auto" else date + o.start_utc[10:]
        obs.append(o.replace(date=date, start_utc=start))
    return ArchiveSpec(archive.name, obs)


def write_index(root: Path, rows: list[dict[str, object]]) -> Path:
    """Write ``obs_index.csv`` atomically (temporary file, then ``os.replace``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(INDEX_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: int(r["obsid"])):
        writer.writerow(row)
    final = root / INDEX_NAME
    tmp = root / (INDEX_NAME + ".partial")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, final)
    return final


def read_index(root: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of ``<root>/obs_index.csv`` as dicts of strings."""
    with open(Path(root) / INDEX_NAME, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
