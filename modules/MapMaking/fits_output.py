"""FITS writers for continuum maps and RRL cubes (docs/mapmaking.md#continuum-fits-output,
docs/mapmaking.md#fits-cube).

Files are written to ``<name>.partial-<pid>`` and moved into place with ``os.replace``; the
resolved job configuration is written beside each file as ``<stem>.config.toml``. Every HDU
carries the WCS; the primary header carries the observation, destriper, mask, calibration and
provenance keywords, with one ``HISTORY`` card per resolved parameter.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modules.MapMaking.fits_metadata import merge_obslists, obslist_hdu
from modules.pipeline_control.config import dump_toml
from modules.pipeline_control.provenance import code_version, fits_history_cards
from utils import faults
from utils.processes import pid_alive
from utils.wcs import MapGeometry

MASK_NEVER_HIT = 1
MASK_LOW_HITS = 2
MASK_EDGE_CLIPPED = 4


@dataclass
class MapInfo:
    """Observation, destriper and calibration facts recorded in the FITS header of a map.

    ``cards`` are further primary-header cards (beam, brightness scale;
    docs/map_products.md#beam-brightness-and-provenance); ``segments`` (SegmentRecord list) become the
    OBSLIST table.
    """

    object_name: str
    band: int
    channel: int
    feeds: list[int]
    obsids: list[int]
    mjd_min: float
    mjd_max: float
    freq_hz: float
    bandwidth_hz: float
    n_segment: int
    n_sample: int
    destriper: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    mean_azel_mjd: tuple[float, float, float] | None = None
    cards: dict[str, Any] = field(default_factory=dict)
    segments: list[Any] | None = None


def hit_mask(hits: np.ndarray, *, hit_percentile: float = 5.0, min_hits: int = 1) -> tuple[np.ndarray, float]:
    """MASK bits 1 (never hit) and 2 (below the hit threshold) and the threshold used
    (docs/mapmaking.md#name-and-hdus).

    ``threshold = max(percentile(hits[hits > 0], hit_percentile), min_hits)``.
    """
    mask = np.zeros(hits.shape, dtype=np.uint8)
    mask[hits <= 0] |= MASK_NEVER_HIT
    hit = hits[hits > 0]
    threshold = float(max(np.percentile(hit, hit_percentile) if hit.size else 0.0, min_hits))
    mask[(hits > 0) & (hits < threshold)] |= MASK_LOW_HITS
    return mask, threshold


def edge_clip(
    values: np.ndarray, mask: np.ndarray, *, width: int = 2, percentiles: tuple[float, float] = (0.5, 99.5)
) -> int:
    """Set MASK bit 4 on pixels within ``width`` of the hit boundary whose value lies outside the
    ``percentiles`` of the interior pixels; returns the number clipped (in place)."""
    from scipy import ndimage

    good = mask == 0
    interior = ndimage.binary_erosion(good, iterations=max(1, int(width)))
    edge = good & ~interior
    inner = values[interior & np.isfinite(values)]
    if inner.size == 0 or not edge.any():
        return 0
    lo, hi = np.percentile(inner, percentiles)
    bad = edge & np.isfinite(values) & ((values < lo) | (values > hi))
    mask[bad] |= MASK_EDGE_CLIPPED
    return int(bad.sum())


def _feed_label_list(feeds: list[int]) -> str:
    return ",".join(str(int(f)) for f in sorted(feeds))


def base_header(geometry: MapGeometry, info: MapInfo, params: Mapping[str, Any], config_sha: str):
    """Primary header: WCS, units, observation, destriper, calibration and provenance keywords."""
    from astropy.io import fits
    from astropy.time import Time

    h = fits.Header()
    h.update(geometry.fits_header())
    h["BUNIT"] = ("K", "Rayleigh-Jeans brightness temperature")
    h["HIERARCH COMAP TEMPTYPE"] = "K_RJ"
    h["TELESCOP"] = "COMAP"
    h["INSTRUME"] = "COMAP"
    h["OBJECT"] = info.object_name
    h["DATE"] = (_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"), "file creation (UTC)")
    mjd_min, mjd_max = info.mjd_min, info.mjd_max
    if info.segments:  # the segments' first and last samples (mjd_min/max are segment mid-times)
        mjd_min = min(r.mjd_start for r in info.segments)
        mjd_max = max(r.mjd_stop for r in info.segments)
    if np.isfinite(mjd_min):
        h["DATE-OBS"] = Time(mjd_min, format="mjd", scale="utc").isot
        h["MJD-OBS"] = (float(mjd_min), "first sample (MJD, UTC)")
        h["MJD-END"] = (float(mjd_max), "last sample (MJD, UTC)")
    h["FREQ"] = (float(info.freq_hz), "Hz, weighted mean of central_freqs")
    h["BANDWID"] = (float(info.bandwidth_hz), "Hz")
    if info.band >= 0:
        h["BAND"] = (int(info.band), "spectrometer band 0-3")
    if info.channel >= 0:
        h["CHANNEL"] = (int(info.channel), "binned channel")
    h["FEEDS"] = _feed_label_list(info.feeds)
    h["NOBS"] = len(info.obsids)
    h["OBSIDMIN"] = int(min(info.obsids)) if info.obsids else -1
    h["OBSIDMAX"] = int(max(info.obsids)) if info.obsids else -1
    h["NSEGMENT"] = int(info.n_segment)
    h["NSAMPLE"] = int(info.n_sample)
    for key, value in info.destriper.items():
        h[f"HIERARCH DESTRIPER {key}"] = value
    for key, value in info.calibration.items():
        h[f"HIERARCH CALIB {key}"] = value
    if info.mean_azel_mjd is not None:
        az, el, mjd = info.mean_azel_mjd
        h["MEAN_AZ"] = (float(az), "deg")
        h["MEAN_EL"] = (float(el), "deg")
        h["MEAN_MJD"] = float(mjd)
    for key, value in info.cards.items():  # beam and brightness scale (modules/MapMaking/fits_metadata.py)
        h[key] = value
    h["HIERARCH COMAP VERSION"] = code_version()
    h["HIERARCH COMAP CONFIGSHA"] = config_sha
    for line in fits_history_cards(params):
        h.add_history(line)
    return h


def write_atomic_fits(path: str | Path, hdus) -> Path:
    """Write an HDUList to ``<path>.partial-<pid>`` and ``os.replace`` it onto ``path``."""
    from astropy.io import fits

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
        faults.checkpoint("fits.write")
        os.replace(tmp, path)
        faults.checkpoint("fits.written")
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_partials(path: str | Path) -> None:
    """Delete ``<name>.partial-<pid>`` files left by an interrupted write of ``path``: those of processes
    of this host that are no longer alive. A live writer's file (another run making the same output at
    once) is kept (docs/reliability.md#concurrent-runs)."""
    path = Path(path)
    if path.parent.is_dir():
        for p in path.parent.glob(f"{path.name}.partial-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and pid_alive(int(pid)):
                continue
            try:
                p.unlink()
            except OSError:
                pass


def write_config_beside(path: str | Path, resolved: Mapping[str, Any]) -> Path:
    """The resolved job configuration as ``<stem>.config.toml`` beside the FITS file."""
    path = Path(path)
    return dump_toml(resolved, path.with_name(path.stem + ".config.toml"))


def write_map_fits(
    path: str | Path,
    geometry: MapGeometry,
    *,
    destriped: np.ndarray,
    naive: np.ndarray,
    hits: np.ndarray,
    weights: np.ndarray,
    info: MapInfo,
    params: Mapping[str, Any],
    config_sha: str,
    rms: np.ndarray | None = None,
    noise_cards: Mapping[str, Any] | None = None,
    segment_table: Mapping[str, np.ndarray] | None = None,
    hit_percentile: float = 5.0,
    min_hits: int = 1,
    edge_clip_enabled: bool = False,
    edge_clip_width: int = 2,
    clip_percentiles: tuple[float, float] = (0.5, 99.5),
    resolved_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a continuum map: DESTRIPED, NAIVE, HITS, RMS, MASK and RMS_WHITE HDUs, OBSLIST when
    ``info.segments`` is given and SEGNOISE when ``segment_table`` is given
    (docs/mapmaking.md#name-and-hdus, docs/mapmaking.md#map-noise).

    Parameters
    ----------
    destriped, naive, hits, weights : ndarray, shape (ny, nx)
        Maps on the full grid (K), hit counts and Σ of map weights per pixel (K⁻²).
    rms : ndarray, shape (ny, nx), optional
        The map's total noise rms (K); default the white-noise rms ``1/sqrt(weights)``.
    noise_cards : mapping, optional
        ``HIERARCH NOISE <key>`` cards of the primary header (method, realisations, seed, ratio).
    segment_table : mapping of column name → ndarray, optional
        Per-segment noise and cut reasons, written as the SEGNOISE binary table.
    """
    from astropy.io import fits

    hits = np.asarray(hits)
    mask, threshold = hit_mask(hits, hit_percentile=hit_percentile, min_hits=min_hits)
    n_clipped = 0
    if edge_clip_enabled:
        n_clipped = edge_clip(
            np.asarray(destriped), mask, width=edge_clip_width, percentiles=clip_percentiles
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        rms_white = np.where(weights > 0, 1.0 / np.sqrt(np.where(weights > 0, weights, 1.0)), np.nan)
    if rms is None:
        rms = rms_white
    masked = mask != 0

    def image(a):
        return np.where(masked, np.nan, a).astype(np.float32)

    header = base_header(geometry, info, params, config_sha)
    header["HIERARCH MASK HITPCT"] = float(hit_percentile)
    header["HIERARCH MASK HITMIN"] = int(min_hits)
    header["HIERARCH MASK HITTHR"] = float(threshold)
    header["HIERARCH MASK EDGECLIP"] = (bool(edge_clip_enabled), f"{n_clipped} pixels clipped")
    for key, value in (noise_cards or {"METHOD": "white"}).items():
        header[f"HIERARCH NOISE {key}"] = value
    wcs_header = geometry.fits_header()
    primary = fits.PrimaryHDU(image(destriped), header=header)
    primary.header["EXTNAME"] = "DESTRIPED"
    hdus = [primary]
    for name, data in (
        ("NAIVE", image(naive)),
        ("HITS", hits.astype(np.int32)),
        ("RMS", image(rms)),
        ("MASK", mask),
        ("RMS_WHITE", image(rms_white)),
    ):
        h = wcs_header.copy()
        h["BUNIT"] = {"NAIVE": "K", "HITS": "", "RMS": "K", "MASK": "", "RMS_WHITE": "K"}[name]
        hdus.append(fits.ImageHDU(data, header=h, name=name))
    if info.segments is not None:
        hdus.append(obslist_hdu(info.segments))
    if segment_table is not None:
        hdus.append(segment_noise_hdu(segment_table))
    remove_stale_partials(path)
    if resolved_config is not None:  # before the FITS file, whose appearance marks the job done
        write_config_beside(path, resolved_config)
    return write_atomic_fits(path, hdus)


SEGNOISE_UNITS = {"sigma_white": "K", "sigma_red": "K", "fknee_hz": "Hz", "level2_auto_rms": "K"}


def segment_noise_hdu(columns: Mapping[str, np.ndarray]):
    """The SEGNOISE binary table: one row per segment read, its sky-free noise (calibrated K) and the cut
    that dropped it ('' if used), docs/mapmaking.md#map-noise."""
    from astropy.table import Table

    table = Table({k.upper(): np.asarray(v) for k, v in columns.items()})
    for name, unit in SEGNOISE_UNITS.items():
        if name.upper() in table.colnames:
            table[name.upper()].unit = unit
    from astropy.io import fits

    hdu = fits.table_to_hdu(table)
    hdu.name = "SEGNOISE"
    return hdu


@dataclass(frozen=True)
class SpectralAxis:
    """The spectral axis of an RRL cube (docs/mapmaking.md#fits-cube): LSRK radio velocity grid and the rest
    frequency.

    ``kind`` is ``'VRAD'`` (m/s) or ``'FREQ'`` (Hz, ``ν = ν0 (1 − v/c)``); both are exactly linear.
    """

    kind: str
    center_kms: float
    step_kms: float
    n_v: int
    rest_freq_hz: float

    def header_cards(self) -> dict[str, Any]:
        from utils.rrl import SPEED_OF_LIGHT_KMS

        crpix = 0.5 * (self.n_v + 1)
        if self.kind == "VRAD":
            cards = {
                "CTYPE3": "VRAD",
                "CUNIT3": "m/s",
                "CRPIX3": crpix,
                "CRVAL3": self.center_kms * 1e3,
                "CDELT3": self.step_kms * 1e3,
                "VELREF": 257,
            }
        elif self.kind == "FREQ":
            cards = {
                "CTYPE3": "FREQ",
                "CUNIT3": "Hz",
                "CRPIX3": crpix,
                "CRVAL3": self.rest_freq_hz * (1.0 - self.center_kms / SPEED_OF_LIGHT_KMS),
                "CDELT3": -self.rest_freq_hz * self.step_kms / SPEED_OF_LIGHT_KMS,
            }
        else:
            raise ValueError(f"spectral axis must be VRAD or FREQ, got {self.kind!r}")
        cards["SPECSYS"] = "LSRK"
        cards["RESTFRQ"] = float(self.rest_freq_hz)
        return cards


def _streaming_header(shape: tuple[int, ...], *, primary: bool, bitpix: int = -32):
    """An image header for ``shape`` (NumPy order) without allocating the data."""
    from astropy.io import fits

    h = (fits.PrimaryHDU() if primary else fits.ImageHDU()).header
    h["BITPIX"] = bitpix
    h["NAXIS"] = len(shape)
    after = "NAXIS"
    for i, n in enumerate(reversed(shape)):
        h.set(f"NAXIS{i + 1}", int(n), after=after)
        after = f"NAXIS{i + 1}"
    return h


def write_cube_fits(
    path: str | Path,
    geometry: MapGeometry,
    spectral: SpectralAxis,
    *,
    hit: np.ndarray,
    line: np.ndarray,
    rms: np.ndarray,
    hits: np.ndarray,
    continuum: np.ndarray,
    info: MapInfo,
    params: Mapping[str, Any],
    config_sha: str,
    line_cards: Mapping[str, Any],
    hit_percentile: float = 5.0,
    min_hits: int = 1,
    resolved_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write an RRL cube: LINE, RMS, HITS, CONTINUUM, MASK (and OBSLIST) HDUs (docs/mapmaking.md#fits-cube).

    The data are given on the hit pixels only and the full planes are assembled one velocity
    channel at a time while streaming to disk, so memory follows the observed area.

    Parameters
    ----------
    hit : int array, shape (n_hit,)
        Flattened full-grid index of every hit pixel.
    line, rms : ndarray, shape (n_hit, n_v)
        Cube and its rms (K) on the hit pixels; NaN where no weight.
    hits : int array, shape (n_hit,)
        Samples per pixel, each sample counted once.
    continuum : ndarray, shape (n_hit,)
        Weighted baseline level at the cube centre (K).
    line_cards : mapping
        Extra primary-header cards (lines, continuum handling).
    """
    from astropy.io import fits

    path = Path(path)
    n_pix = geometry.n_pixels
    hits_full = np.zeros(n_pix, dtype=np.int64)
    hits_full[hit] = hits
    hits_image = hits_full.reshape(geometry.shape)
    mask, threshold = hit_mask(hits_image, hit_percentile=hit_percentile, min_hits=min_hits)
    masked_hit = mask.ravel()[hit] != 0
    n_v = int(line.shape[1])

    wcs2 = geometry.fits_header()
    header = base_header(geometry, info, params, config_sha)
    cube_header = _streaming_header((n_v, *geometry.shape), primary=True)
    cube_header["EXTEND"] = True
    cube_header.extend([c for c in header.cards if c.keyword not in ("HISTORY", "COMMENT", "")], update=True)
    cube_header["WCSAXES"] = 3
    for key, value in spectral.header_cards().items():
        cube_header[key] = value
    cube_header["EXTNAME"] = "LINE"
    cube_header["HIERARCH MASK HITPCT"] = float(hit_percentile)
    cube_header["HIERARCH MASK HITMIN"] = int(min_hits)
    cube_header["HIERARCH MASK HITTHR"] = float(threshold)
    for key, value in line_cards.items():
        cube_header[key] = value
    cube_header.extend([c for c in header.cards if c.keyword == "HISTORY"])

    rms_header = _streaming_header((n_v, *geometry.shape), primary=False)
    rms_header.extend(wcs2.cards, update=True)
    rms_header["WCSAXES"] = 3
    for key, value in spectral.header_cards().items():
        rms_header[key] = value
    rms_header["BUNIT"] = "K"
    rms_header["EXTNAME"] = "RMS"

    def plane(values: np.ndarray, j: int) -> np.ndarray:
        full = np.full(n_pix, np.nan, dtype=np.float32)
        full[hit] = np.where(masked_hit, np.nan, values[:, j])
        return full.reshape(geometry.shape)

    remove_stale_partials(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        if tmp.exists():
            tmp.unlink()
        for hdr, values in ((cube_header, line), (rms_header, rms)):
            stream = fits.StreamingHDU(str(tmp), hdr)  # a Path is taken for an open file
            for j in range(n_v):
                stream.write(plane(values, j))
            stream.close()
        cont_full = np.full(n_pix, np.nan, dtype=np.float32)
        cont_full[hit] = np.where(masked_hit, np.nan, continuum)
        for name, data, unit in (
            ("HITS", hits_image.astype(np.int32), ""),
            ("CONTINUUM", cont_full.reshape(geometry.shape), "K"),
            ("MASK", mask, ""),
        ):
            h = wcs2.copy()
            h["BUNIT"] = unit
            fits.append(tmp, data, header=fits.ImageHDU(data, header=h, name=name).header)
        if info.segments is not None:
            table = obslist_hdu(info.segments)
            fits.append(tmp, table.data, header=table.header)
        if resolved_config is not None:  # before the FITS file, whose appearance marks the job done
            write_config_beside(path, resolved_config)
        faults.checkpoint("cube.write")
        os.replace(tmp, path)
        faults.checkpoint("cube.written")
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_difference_map(a_path: Path, b_path: Path, out_path: Path) -> Path:
    """Jackknife difference ``(A − B)/2`` of two maps on the same grid (RMS ½√(RMS_A²+RMS_B²), from the total
    RMS of each half, and the same for RMS_WHITE; docs/mapmaking.md#map-noise)."""
    from astropy.io import fits

    with fits.open(a_path, memmap=False) as a, fits.open(b_path, memmap=False) as b:
        if a[0].data.shape != b[0].data.shape:
            raise ValueError(f"{a_path.name} and {b_path.name} are on different grids")
        diff = 0.5 * (a["DESTRIPED"].data - b["DESTRIPED"].data)
        rms = 0.5 * np.sqrt(a["RMS"].data.astype(np.float64) ** 2 + b["RMS"].data.astype(np.float64) ** 2)
        white = None
        if "RMS_WHITE" in a and "RMS_WHITE" in b:
            white = 0.5 * np.sqrt(
                a["RMS_WHITE"].data.astype(np.float64) ** 2 + b["RMS_WHITE"].data.astype(np.float64) ** 2
            )
        hdr = a[0].header.copy()
        hdr["OBJECT"] = f"{hdr.get('OBJECT', '')} (A-B)/2"
        hdr["HIERARCH COMAP DIFFA"] = a_path.name
        hdr["HIERARCH COMAP DIFFB"] = b_path.name
        primary = fits.PrimaryHDU(diff.astype(np.float32), header=hdr)
        hits = np.minimum(a["HITS"].data, b["HITS"].data)
        mask = (a["MASK"].data | b["MASK"].data).astype(np.uint8)
        hdus = [
            primary,
            fits.ImageHDU(
                np.full_like(diff, np.nan, dtype=np.float32), header=a["NAIVE"].header, name="NAIVE"
            ),
            fits.ImageHDU(hits.astype(np.int32), header=a["HITS"].header, name="HITS"),
            fits.ImageHDU(rms.astype(np.float32), header=a["RMS"].header, name="RMS"),
            fits.ImageHDU(mask, header=a["MASK"].header, name="MASK"),
        ]
        if white is not None:
            hdus.append(
                fits.ImageHDU(white.astype(np.float32), header=a["RMS_WHITE"].header, name="RMS_WHITE")
            )
        table = merge_obslists(*(h["OBSLIST"] for h in (a, b) if "OBSLIST" in h))
        if table is not None:
            hdus.append(table)
    return write_atomic_fits(out_path, hdus)


def read_configsha(path: str | Path) -> str | None:
    """``HIERARCH COMAP CONFIGSHA`` of an existing FITS file (None if missing or unreadable)."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            value = hdul[0].header.get("COMAP CONFIGSHA")
    except (OSError, ValueError):
        return None
    return None if value is None else str(value)
