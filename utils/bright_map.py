"""Bright-source maps sampled at the telescope pointing (noise statistics and map making).

A FITS image with a celestial CAR WCS (GLON/GLAT or RA/DEC), or a HEALPix map (needs ``healpy``),
e.g. a Planck or simulator truth map; samples where its value exceeds a cut are treated as bright.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from utils.coordinates import icrs_to_galactic


@dataclass
class BrightMap:
    """A bright-source map sampled at the telescope pointing (Galactic or ICRS; CAR or HEALPix)."""

    path: str
    frame: str  # 'galactic' or 'icrs'
    data: NDArray[np.float64]
    wcs: Any = None
    nside: int = 0

    def sample(self, ra_deg: NDArray, dec_deg: NDArray) -> NDArray[np.float64]:
        """Map value (K) at each ICRS position (deg); NaN outside the map or for NaN pointing."""
        ra = np.asarray(ra_deg, dtype=np.float64)
        dec = np.asarray(dec_deg, dtype=np.float64)
        if self.frame == "galactic":
            lon, lat = icrs_to_galactic(ra, dec)
        else:
            lon, lat = ra, dec
        out = np.full(lon.shape, np.nan)
        ok = np.isfinite(lon) & np.isfinite(lat)
        if not ok.any():
            return out
        if self.wcs is not None:
            px, py = self.wcs.wcs_world2pix(lon[ok], lat[ok], 0)
            ny, nx = self.data.shape
            with np.errstate(invalid="ignore"):
                ix = np.floor(px + 0.5)
                iy = np.floor(py + 0.5)
            inside = np.isfinite(ix) & np.isfinite(iy) & (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
            vals = np.full(ix.shape, np.nan)
            vals[inside] = self.data[iy[inside].astype(np.intp), ix[inside].astype(np.intp)]
        else:  # HEALPix (RING ordering after loading)
            import healpy

            vals = self.data[healpy.ang2pix(self.nside, lon[ok], lat[ok], lonlat=True)]
        out[ok] = vals
        return out


def load_bright_map(path: str) -> BrightMap:
    """Load a bright-source map: a FITS image with a celestial CAR WCS (GLON/GLAT or RA/DEC), or
    a HEALPix binary table (needs ``healpy``).

    Image axes beyond the two celestial ones (e.g. frequency) are collapsed with a NaN-ignoring
    maximum, the conservative choice for a mask.

    Raises
    ------
    ValueError
        The file cannot be read or is not a usable map (one-line message).
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    if not os.path.exists(path):
        raise ValueError(f"bright_mask_map {path} does not exist")
    try:
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                header = hdu.header
                if str(header.get("PIXTYPE", "")).upper() == "HEALPIX":
                    return _load_healpix(path, header)
                if hdu.data is None or getattr(hdu.data, "ndim", 0) < 2 or not hdu.is_image:
                    continue
                wcs = WCS(header).celestial
                if wcs.naxis != 2 or wcs.wcs.lng < 0:
                    continue
                lngtyp = wcs.wcs.lngtyp.strip().upper()
                if lngtyp not in ("GLON", "RA"):
                    raise ValueError(f"bright_mask_map {path}: unsupported celestial axes {wcs.wcs.ctype}")
                data = np.asarray(hdu.data, dtype=np.float64)
                if data.ndim > 2:
                    data = np.fmax.reduce(data.reshape(-1, *data.shape[-2:]), axis=0)
                return BrightMap(path, "galactic" if lngtyp == "GLON" else "icrs", data, wcs=wcs)
    except OSError as exc:
        raise ValueError(f"bright_mask_map {path}: cannot read: {' '.join(str(exc).split())}") from None
    raise ValueError(f"bright_mask_map {path}: no image HDU with a celestial WCS and no HEALPix table")


def _load_healpix(path: str, header: Any) -> BrightMap:
    try:
        import healpy
    except ImportError:
        raise ValueError(
            f"bright_mask_map {path} is a HEALPix map, which needs healpy (pip install comap-reduce[healpix])"
        ) from None
    coordsys = str(header.get("COORDSYS", "G")).strip().upper()[:1]
    if coordsys not in ("G", "C"):
        raise ValueError(f"bright_mask_map {path}: unsupported COORDSYS {coordsys!r} (need G or C)")
    data = np.asarray(healpy.read_map(path, field=0, nest=False, dtype=np.float64))
    data = np.where(data == healpy.UNSEEN, np.nan, data)
    return BrightMap(
        path, "galactic" if coordsys == "G" else "icrs", data, nside=healpy.npix2nside(data.size)
    )
