"""One bright-source mask for level 2, noise statistics and map making (docs/level2.md#source-mask).

A :class:`SourceMask` combines

* the observation's calibrator, when the observed source is one (TauA, CasA, CygA, Jupiter;
  positions from :mod:`utils.calibrators`, Jupiter from its ephemeris at each sample's MJD);
* an optional catalogue of bright sources (CSV or TOML: name, frame, lon, lat, radius_arcmin);
* an optional bright map (:mod:`utils.bright_map`) with a cut in K.

CreateLevel2File evaluates it once per feed and writes the result as the informational sample flag
``FLAG_BRIGHT_SOURCE`` (16); every later reader uses that flag instead of its own mask.

The default point-source radius is 2.5 beam FWHM at 30 GHz (2.5 × 4.5′ = 11.25′). A Gaussian beam
has fallen to ``2^-(4·2.5²) ≈ 3e-8`` of its peak there; at 26 GHz (FWHM 5.2′) the radius is still
2.2 FWHM (``≈ 2e-6`` of the peak). Tau A's 30 GHz peak is about 6 K, so what leaks past the edge is
< 1e-4 K, far below the white noise of one binned sample (≈ 0.01–0.05 K), with room for a 1′
pointing error and the near sidelobes.
"""

from __future__ import annotations

import csv
import math
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.bright_map import BrightMap, load_bright_map
from utils.calibrators import BEAM_FWHM_ARCMIN_30GHZ, calibrator_position, canonical_name, is_calibrator
from utils.coordinates import angular_separation_deg, galactic_to_icrs

MASK_RADIUS_FWHM: float = 2.5
"""Default point-source mask radius in units of the 30 GHz beam FWHM."""
DEFAULT_MASK_RADIUS_ARCMIN: float = MASK_RADIUS_FWHM * BEAM_FWHM_ARCMIN_30GHZ
"""Default point-source mask radius, arcmin (11.25′)."""
TRACK_STEP_S: float = 60.0
"""Spacing of the ephemeris grid of a moving calibrator (Jupiter), s; interpolated linearly."""
CATALOGUE_COLUMNS: tuple[str, ...] = ("name", "frame", "lon", "lat", "radius_arcmin")
FRAMES: tuple[str, ...] = ("icrs", "galactic")


@dataclass(frozen=True)
class CatalogueSource:
    """One catalogue entry: a disc of ``radius_arcmin`` about an ICRS position (deg)."""

    name: str
    ra_deg: float
    dec_deg: float
    radius_arcmin: float


def _entry(raw: dict[str, Any], where: str, default_radius_arcmin: float) -> CatalogueSource:
    missing = [k for k in ("name", "frame", "lon", "lat") if raw.get(k) in (None, "")]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)} (columns: {', '.join(CATALOGUE_COLUMNS)})")
    frame = str(raw["frame"]).strip().lower()
    if frame not in FRAMES:
        raise ValueError(f"{where}: frame must be one of {', '.join(FRAMES)}, got {raw['frame']!r}")
    try:
        lon, lat = float(raw["lon"]), float(raw["lat"])
        r = raw.get("radius_arcmin")
        radius = default_radius_arcmin if r in (None, "") else float(r)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: lon, lat and radius_arcmin must be numbers") from None
    if not (math.isfinite(lon) and -90.0 <= lat <= 90.0 and radius > 0):
        raise ValueError(f"{where}: need finite lon, -90 <= lat <= 90 and radius_arcmin > 0")
    if frame == "galactic":
        ra, dec = galactic_to_icrs(lon, lat)
        lon, lat = float(ra), float(dec)
    return CatalogueSource(str(raw["name"]), lon % 360.0, lat, radius)


def load_source_catalogue(
    path: str, default_radius_arcmin: float = DEFAULT_MASK_RADIUS_ARCMIN
) -> list[CatalogueSource]:
    """Read a bright-source catalogue (docs/level2.md#source-mask).

    ``*.toml``: ``[[source]]`` tables with keys ``name, frame, lon, lat[, radius_arcmin]``; anything
    else is CSV with a header row naming those columns (``#`` lines are comments). ``frame`` is
    ``icrs`` or ``galactic``, positions in degrees; an empty or absent ``radius_arcmin`` means
    ``default_radius_arcmin``.

    Raises
    ------
    ValueError
        The file is missing or malformed (one-line message naming the file and row).
    """
    if not os.path.isfile(path):
        raise ValueError(f"source_catalogue {path} does not exist")
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        if path.lower().endswith(".toml"):
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
            entries = doc.get("source", [])
            if not isinstance(entries, list):
                raise ValueError(f"source_catalogue {path}: expected [[source]] tables")
            rows = [(f"source_catalogue {path}: [[source]] #{i + 1}", e) for i, e in enumerate(entries)]
        else:
            with open(path, newline="") as fh:
                lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
            reader = csv.DictReader(lines, skipinitialspace=True)
            rows = [(f"source_catalogue {path}: row {i + 2}", dict(r)) for i, r in enumerate(reader)]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, csv.Error) as exc:
        raise ValueError(f"source_catalogue {path}: cannot read: {' '.join(str(exc).split())}") from None
    return [_entry(raw, where, default_radius_arcmin) for where, raw in rows]


class SourceMask:
    """Which samples lie on a bright source (docs/level2.md#source-mask).

    Parameters
    ----------
    calibrator : str or None
        A calibrator name (TauA, CasA, CygA, Jupiter; any spelling :func:`canonical_name` accepts)
        masked within ``radius_arcmin``; None for none.
    sources : sequence of CatalogueSource
        Catalogue discs, each with its own radius.
    bright_map : BrightMap or None
        Samples where the map is at or above ``bright_cut_k`` are masked.
    bright_cut_k : float
        Cut of the bright map, K.
    radius_arcmin : float
        Radius of the calibrator disc, arcmin.
    """

    def __init__(
        self,
        *,
        calibrator: str | None = None,
        sources: Sequence[CatalogueSource] = (),
        bright_map: BrightMap | None = None,
        bright_cut_k: float = math.inf,
        radius_arcmin: float = DEFAULT_MASK_RADIUS_ARCMIN,
    ) -> None:
        self.calibrator = canonical_name(calibrator) if calibrator else None
        self.sources = list(sources)
        self.bright_map = bright_map
        self.bright_cut_k = float(bright_cut_k)
        self.radius_arcmin = float(radius_arcmin)

    @classmethod
    def for_observation(
        cls,
        source: str | None,
        *,
        mask_calibrator: bool = True,
        catalogue: str | None = None,
        bright_map: str | None = None,
        bright_cut_k: float = math.inf,
        radius_arcmin: float = DEFAULT_MASK_RADIUS_ARCMIN,
    ) -> SourceMask:
        """The mask of an observation of ``source``: its calibrator (if ``source`` is one and
        ``mask_calibrator``), the catalogue file and the bright map (paths; None for none).

        Raises
        ------
        ValueError
            A catalogue or map that cannot be read (one-line message).
        """
        cal = source if (mask_calibrator and source and is_calibrator(source)) else None
        return cls(
            calibrator=cal,
            sources=load_source_catalogue(catalogue, radius_arcmin) if catalogue else (),
            bright_map=load_bright_map(bright_map) if bright_map else None,
            bright_cut_k=bright_cut_k,
            radius_arcmin=radius_arcmin,
        )

    @property
    def empty(self) -> bool:
        """True if nothing can be masked."""
        return self.calibrator is None and not self.sources and self.bright_map is None

    def describe(self) -> str:
        """One line naming what is masked (stored as an attribute of the sample flags)."""
        parts = []
        if self.calibrator:
            parts.append(f"calibrator {self.calibrator} within {self.radius_arcmin:g} arcmin")
        if self.sources:
            parts.append(f"{len(self.sources)} catalogue source(s)")
        if self.bright_map is not None:
            parts.append(f"bright map {self.bright_map.path} >= {self.bright_cut_k:g} K")
        return "; ".join(parts) if parts else "nothing"

    def calibrator_position(self, mjd: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """ICRS (ra, dec) of the calibrator at each ``mjd`` (deg). Jupiter's ephemeris is evaluated
        every :data:`TRACK_STEP_S` s over the span of ``mjd`` and interpolated."""
        if self.calibrator is None:
            raise ValueError("this mask has no calibrator")
        m = np.asarray(mjd, dtype=np.float64)
        if self.calibrator != "Jupiter":
            ra0, dec0 = calibrator_position(self.calibrator)
            return np.full(m.shape, float(ra0)), np.full(m.shape, float(dec0))
        finite = m[np.isfinite(m)]
        if finite.size == 0:
            return np.full(m.shape, np.nan), np.full(m.shape, np.nan)
        lo, hi = float(finite.min()), float(finite.max())
        step = TRACK_STEP_S / 86400.0
        grid = lo + step * np.arange(max(int(math.ceil((hi - lo) / step)) + 1, 2))
        ra, dec = calibrator_position(self.calibrator, grid)
        ra_unwrapped = np.degrees(np.unwrap(np.radians(ra)))
        return np.interp(m, grid, ra_unwrapped) % 360.0, np.interp(m, grid, dec)

    def mask(self, ra_deg: ArrayLike, dec_deg: ArrayLike, mjd: ArrayLike) -> NDArray[np.bool_]:
        """True for samples on a masked source.

        Parameters
        ----------
        ra_deg, dec_deg : array_like, shape (n,)
            ICRS pointing of each sample, deg (NaN: never masked).
        mjd : array_like, shape (n,)
            Time of each sample, MJD (used for a moving calibrator).

        Returns
        -------
        ndarray of bool, shape (n,)
        """
        ra = np.asarray(ra_deg, dtype=np.float64)
        dec = np.asarray(dec_deg, dtype=np.float64)
        out = np.zeros(ra.shape, dtype=bool)
        ok = np.isfinite(ra) & np.isfinite(dec)
        if not ok.any() or self.empty:
            return out
        if self.calibrator is not None:
            ra0, dec0 = self.calibrator_position(np.broadcast_to(np.asarray(mjd, dtype=np.float64), ra.shape))
            with np.errstate(invalid="ignore"):
                out |= angular_separation_deg(ra, dec, ra0, dec0) * 60.0 <= self.radius_arcmin
        if self.sources:
            # the distance of every sample from one reference point bounds the observation's extent
            i0 = int(np.flatnonzero(ok)[0])
            ref_ra, ref_dec = float(ra[i0]), float(dec[i0])
            extent = float(np.nanmax(angular_separation_deg(ra[ok], dec[ok], ref_ra, ref_dec)))
            for src in self.sources:
                r_deg = src.radius_arcmin / 60.0
                if float(angular_separation_deg(src.ra_deg, src.dec_deg, ref_ra, ref_dec)) > extent + r_deg:
                    continue
                with np.errstate(invalid="ignore"):
                    out |= angular_separation_deg(ra, dec, src.ra_deg, src.dec_deg) <= r_deg
        if self.bright_map is not None:
            with np.errstate(invalid="ignore"):
                out |= self.bright_map.sample(ra, dec) >= self.bright_cut_k
        return out & ok


__all__ = [
    "DEFAULT_MASK_RADIUS_ARCMIN",
    "MASK_RADIUS_FWHM",
    "CatalogueSource",
    "SourceMask",
    "load_source_catalogue",
]
