"""Where map geometries come from: the named definitions file and the dynamic WCS of a job."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules.MapMaking.read_data import sample_pointing
from utils.wcs import MapGeometry, dynamic_geometry, load_wcs_definitions, named_geometry

HERE = Path(__file__).resolve().parent


def wcs_definitions_path(wcs_def_file: str) -> Path | None:
    """``wcs_def_file`` as an absolute path, then relative to the working directory, then relative to
    ``modules/MapMaking/`` (docs/configuration.md#files-and-reading); None if none exists."""
    p = Path(wcs_def_file)
    for candidate in [p] if p.is_absolute() else [p, HERE / p]:
        if candidate.is_file():
            return candidate
    return None


def wcs_def_problems(wcs_def: str, wcs_def_file: str) -> list[str]:
    """Config-time check of a job's ``wcs_def``: the definitions file exists and names it."""
    if wcs_def == "dynamic":
        return []
    path = wcs_definitions_path(str(wcs_def_file))
    if path is None:
        return [f"wcs_def_file {wcs_def_file} not found"]
    try:
        known = load_wcs_definitions(path)
    except (OSError, ValueError) as exc:
        return [f"wcs_def_file {path}: {exc}"]
    if wcs_def not in known:
        return [f"unknown WCS definition {wcs_def!r}; known: {', '.join(sorted(known))}"]
    return []


def job_geometry(
    wcs_def: str,
    wcs_def_file: str,
    lon_deg=None,
    lat_deg=None,
    *,
    frame: str = "galactic",
    cdelt_deg: float = 0.0166667,
    padding_deg: float = 0.5,
) -> MapGeometry:
    """The named geometry ``wcs_def``, or the dynamic one covering (lon, lat) when ``'dynamic'``."""
    if wcs_def == "dynamic":
        return dynamic_geometry(lon_deg, lat_deg, frame=frame, cdelt_deg=cdelt_deg, padding_deg=padding_deg)
    path = wcs_definitions_path(wcs_def_file)
    if path is None:
        raise FileNotFoundError(f"wcs_def_file {wcs_def_file} not found")
    return named_geometry(wcs_def, load_wcs_definitions(path))


def geometry_for(job: Any, plans: Callable[[], list[Any]]) -> MapGeometry:
    """The geometry of a job (its ``wcs_def`` and ``dynamic_*`` parameters): the named one, or the
    dynamic one covering the accepted segments ``plans()`` (asked for only then)."""
    if job.wcs_def != "dynamic":
        return job_geometry(job.wcs_def, job.wcs_def_file)
    lon, lat = sample_pointing(plans(), job.dynamic_frame)
    return job_geometry(
        "dynamic",
        job.wcs_def_file,
        lon,
        lat,
        frame=job.dynamic_frame,
        cdelt_deg=job.dynamic_wcs_cdelt,
        padding_deg=job.dynamic_wcs_padding,
    )
