"""Map geometry: named WCS definitions, the dynamic WCS and world → pixel indices
(docs/mapmaking.md#map-geometry).

All maps are plate carrée (CAR) grids in Galactic (``GLON-CAR``/``GLAT-CAR``) or ICRS
(``RA---CAR``/``DEC--CAR``) coordinates. Pixel indices are 0-based and flattened row-major:
``index = iy·nx + ix``; samples off the map get −1.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

WCS_KEYS = (
    "CTYPE1",
    "CTYPE2",
    "NAXIS1",
    "NAXIS2",
    "CRPIX1",
    "CRPIX2",
    "CDELT1",
    "CDELT2",
    "CRVAL1",
    "CRVAL2",
)


@dataclass(frozen=True)
class MapGeometry:
    """A CAR map grid: its WCS keywords, size and sky frame.

    Attributes
    ----------
    header : dict
        ``CTYPE1/2``, ``CRPIX1/2``, ``CDELT1/2``, ``CRVAL1/2`` (deg), ``NAXIS1/2``.
    frame : {'galactic', 'icrs'}
    """

    header: Mapping[str, Any]

    @property
    def nx(self) -> int:
        return int(self.header["NAXIS1"])

    @property
    def ny(self) -> int:
        return int(self.header["NAXIS2"])

    @property
    def n_pixels(self) -> int:
        return self.nx * self.ny

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (ny, nx) as stored in FITS."""
        return (self.ny, self.nx)

    @property
    def frame(self) -> str:
        return frame_of_ctype(str(self.header["CTYPE1"]))

    @property
    def wcs(self):
        """An ``astropy.wcs.WCS`` of this grid (built on demand)."""
        from astropy.wcs import WCS

        w = WCS(naxis=2)
        w.wcs.ctype = [str(self.header["CTYPE1"]), str(self.header["CTYPE2"])]
        w.wcs.crpix = [float(self.header["CRPIX1"]), float(self.header["CRPIX2"])]
        w.wcs.cdelt = [float(self.header["CDELT1"]), float(self.header["CDELT2"])]
        w.wcs.crval = [float(self.header["CRVAL1"]), float(self.header["CRVAL2"])]
        w.wcs.cunit = ["deg", "deg"]
        if self.frame == "icrs":
            w.wcs.radesys = "ICRS"
        w.pixel_shape = (self.nx, self.ny)
        return w

    def fits_header(self):
        """The WCS as an ``astropy.io.fits.Header`` (CUNIT = deg; RADESYS = ICRS when equatorial)."""
        return self.wcs.to_header()


def frame_of_ctype(ctype1: str) -> str:
    """'galactic' for GLON axes, 'icrs' for RA axes."""
    c = ctype1.upper()
    if c.startswith("GLON"):
        return "galactic"
    if c.startswith("RA"):
        return "icrs"
    raise ValueError(f"unsupported longitude axis {ctype1!r} (expected GLON-CAR or RA---CAR)")


def load_wcs_definitions(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read the named geometries of a WCS definitions TOML file (one table per name)."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    out = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        missing = [k for k in WCS_KEYS if k not in table]
        if missing:
            raise ValueError(f"{path}: WCS definition {name!r} lacks {', '.join(missing)}")
        out[name] = {k: table[k] for k in WCS_KEYS}
    return out


def named_geometry(name: str, definitions: Mapping[str, Mapping[str, Any]]) -> MapGeometry:
    """The geometry called ``name``; KeyError listing the known names otherwise."""
    if name not in definitions:
        raise KeyError(f"unknown WCS definition {name!r}; known: {', '.join(sorted(definitions))}")
    return MapGeometry(dict(definitions[name]))


def circular_mean_deg(lon_deg: ArrayLike) -> float:
    """Circular mean of longitudes (deg) in [0, 360)."""
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    return float(np.degrees(np.arctan2(np.mean(np.sin(lon)), np.mean(np.cos(lon)))) % 360.0)


def wrap180(angle_deg: ArrayLike) -> NDArray[np.float64]:
    """Wrap angles to (−180, 180]."""
    a = np.asarray(angle_deg, dtype=np.float64)
    return 180.0 - (180.0 - a) % 360.0


def dynamic_geometry(
    lon_deg: ArrayLike,
    lat_deg: ArrayLike,
    *,
    frame: str = "galactic",
    cdelt_deg: float = 0.0166667,
    padding_deg: float = 0.5,
    lon_ref_deg: float | None = None,
    extent: tuple[float, float, float, float] | None = None,
) -> MapGeometry:
    """The dynamic CAR grid covering the given pointing (docs/mapmaking.md#dynamic-wcs).

    Parameters
    ----------
    lon_deg, lat_deg : array_like
        Longitudes and latitudes (deg, in ``frame``) of the samples to cover (e.g. every 10th).
    frame : {'galactic', 'icrs'}
    cdelt_deg, padding_deg : float
        Pixel size and padding around the covered area (deg).
    lon_ref_deg : float, optional
        Reference longitude; default the circular mean of ``lon_deg`` (MPI: rank 0's, broadcast).
    extent : (dlon_min, dlon_max, lat_min, lat_max), optional
        Precomputed extents relative to ``lon_ref_deg`` (MPI: Allreduce MIN/MAX).

    Notes
    -----
    Longitudes are unwrapped around the reference, so a field straddling l = 0/360 gives a map a
    few degrees wide, not 360°. ``CRVAL2 = 0`` keeps the CAR grid aligned with latitude (a non-zero
    CRVAL2 would make the projection oblique); the latitude centre is set through ``CRPIX2``.
    """
    lon = np.asarray(lon_deg, dtype=np.float64)
    lat = np.asarray(lat_deg, dtype=np.float64)
    good = np.isfinite(lon) & np.isfinite(lat)
    if lon_ref_deg is None:
        if not good.any():
            raise ValueError("no finite pointing to build a dynamic WCS from")
        lon_ref_deg = circular_mean_deg(lon[good])
    if extent is None:
        if not good.any():
            raise ValueError("no finite pointing to build a dynamic WCS from")
        dlon = wrap180(lon[good] - lon_ref_deg)
        extent = (float(dlon.min()), float(dlon.max()), float(lat[good].min()), float(lat[good].max()))
    dmin, dmax, bmin, bmax = extent
    lon_c = (lon_ref_deg + 0.5 * (dmin + dmax)) % 360.0
    nx = math.ceil((dmax - dmin + 2 * padding_deg) / cdelt_deg)
    ny = math.ceil((bmax - bmin + 2 * padding_deg) / cdelt_deg)
    nx += 1 - nx % 2
    ny += 1 - ny % 2
    lat_c = 0.5 * (bmin + bmax)
    ctype = ("GLON-CAR", "GLAT-CAR") if frame == "galactic" else ("RA---CAR", "DEC--CAR")
    if frame not in ("galactic", "icrs"):
        raise ValueError(f"dynamic_frame must be 'galactic' or 'icrs', got {frame!r}")
    header = {
        "CTYPE1": ctype[0],
        "CTYPE2": ctype[1],
        "NAXIS1": int(nx),
        "NAXIS2": int(ny),
        "CRPIX1": (nx + 1) / 2.0,
        "CRPIX2": (ny + 1) / 2.0 - lat_c / cdelt_deg,
        "CDELT1": -float(cdelt_deg),
        "CDELT2": float(cdelt_deg),
        "CRVAL1": float(lon_c),
        "CRVAL2": 0.0,
    }
    return MapGeometry(header)


def world_to_pixel_index(geometry: MapGeometry, lon_deg: ArrayLike, lat_deg: ArrayLike) -> NDArray[np.int64]:
    """Flattened pixel index of each position by rounding to the nearest pixel centre
    (docs/mapmaking.md#pixelisation).

    ``x, y = wcs.world_to_pixel_values(lon, lat)`` (0-based), ``ix = floor(x + 0.5)``,
    ``iy = floor(y + 0.5)``; valid if finite and inside ``[0, nx) × [0, ny)``, else −1.
    Rounding, not truncation: the legacy code truncated and shifted maps by half a pixel.
    """
    lon = np.asarray(lon_deg, dtype=np.float64)
    lat = np.asarray(lat_deg, dtype=np.float64)
    out = np.full(lon.shape, -1, dtype=np.int64)
    good = np.isfinite(lon) & np.isfinite(lat)
    if not good.any():
        return out
    x, y = geometry.wcs.world_to_pixel_values(lon[good], lat[good])
    ix = np.floor(np.asarray(x) + 0.5)
    iy = np.floor(np.asarray(y) + 0.5)
    ok = np.isfinite(ix) & np.isfinite(iy) & (ix >= 0) & (ix < geometry.nx) & (iy >= 0) & (iy < geometry.ny)
    idx = np.full(ix.shape, -1, dtype=np.int64)
    idx[ok] = iy[ok].astype(np.int64) * geometry.nx + ix[ok].astype(np.int64)
    out[good] = idx
    return out


def pixel_centres(geometry: MapGeometry) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """World coordinates (deg) of every pixel centre, each of shape (ny, nx)."""
    yy, xx = np.mgrid[0 : geometry.ny, 0 : geometry.nx]
    lon, lat = geometry.wcs.pixel_to_world_values(xx, yy)
    return np.asarray(lon) % 360.0, np.asarray(lat)
