"""What a map or cube FITS file says about itself beyond its pixels
(docs/map_products.md#beam-brightness-and-provenance): the beam (BMAJ/BMIN/BPA and where it came
from), the brightness scale (temperature scale, Jy/beam per K, calibration uncertainty), the rest
frequencies of stacked lines and the OBSLIST table of the segments used.

The beam comes from the calibrator fits in the database where there are any for the feeds and bands of
a map: every ``calibration_flux`` row holds the fitted peak ``amplitude`` (K) and the flux
``S = 2π A σx σy · 2kν²/c²`` it integrates to, so the geometric-mean width of the fitted Gaussian is
``σ = sqrt(S / (2π A · 2kν²/c²))`` at the row's ``frequency_ghz``. Calibrators are taken as point
sources (their extent is not removed). Widths scale as 1/ν.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.calibrators import (
    BEAM_FWHM_ARCMIN_30GHZ,
    FWHM_TO_SIGMA,
    beam_fwhm_arcmin,
    gaussian_flux_jy,
    jy_to_k_factor,
)

BEAM_REF_GHZ = 30.0
"""Beam widths are kept as the FWHM they would have at this frequency (arcmin), FWHM ∝ 1/ν."""
FLUX_MODEL_UNCERTAINTY: Mapping[str, float] = {"taua": 0.03, "casa": 0.03, "jupiter": 0.03, "cyga": 0.05}
"""Fractional uncertainty of the calibrators' flux models (docs/calibrators.md#flux-models: the WMAP
fits of Tau A, Cas A and Jupiter's solid angle are good to 1–3 %, the upper end is taken; Cyg A's
Baars et al. scale differs from WMAP's by a few per cent)."""
TEMPSCAL_CALIBRATED = "Rayleigh-Jeans main-beam brightness temperature"
TEMPSCAL_VANE = "vane-calibrated antenna temperature (no calibrator scale)"


# --------------------------------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Beam:
    """A circular Gaussian beam at ``freq_ghz``: its FWHM (deg) and where it came from.

    ``source`` is ``'calibrator-fit'`` (median over ``n_fit`` database fits), ``'nominal'``
    (``BEAM_FWHM_ARCMIN_30GHZ`` scaled to ``freq_ghz``) or ``'common'`` (the common beam of a stack).
    """

    fwhm_deg: float
    freq_ghz: float
    source: str
    n_fit: int = 0

    @property
    def sigma_rad(self) -> float:
        return math.radians(self.fwhm_deg) * FWHM_TO_SIGMA

    @property
    def solid_angle_sr(self) -> float:
        """``Ω = 2π σ²`` (sr)."""
        return 2.0 * math.pi * self.sigma_rad**2

    def at(self, freq_ghz: float) -> Beam:
        """The same beam scaled to ``freq_ghz`` (FWHM ∝ 1/ν)."""
        return Beam(self.fwhm_deg * self.freq_ghz / float(freq_ghz), float(freq_ghz), self.source, self.n_fit)


def fitted_fwhm_arcmin(amplitude_k: float, flux_jy: float, freq_ghz: float) -> float:
    """Geometric-mean FWHM (arcmin) of a calibrator fit from its peak ``amplitude_k`` and ``flux_jy``
    at ``freq_ghz``; NaN if the row cannot give one."""
    if not all(
        isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in (amplitude_k, flux_jy, freq_ghz)
    ):
        return math.nan
    # flux of a Gaussian with σx = σy = 1 deg, then σ² scales the flux linearly
    unit = float(gaussian_flux_jy(amplitude_k, 1.0, 1.0, freq_ghz))
    sigma_deg = math.sqrt(flux_jy / unit)
    return sigma_deg / FWHM_TO_SIGMA * 60.0


def calibrator_beam_table(rows: Iterable[Any]) -> dict[tuple[int, int], tuple[float, int]]:
    """(feed, band) → (median FWHM at 30 GHz in arcmin, number of fits) from ``calibration_flux`` rows
    (objects or mappings with ``feed, band, amplitude, measured_flux, frequency_ghz``)."""
    per: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        get = row.get if isinstance(row, Mapping) else lambda k, r=row: getattr(r, k, None)
        amp, flux, freq = get("amplitude"), get("measured_flux"), get("frequency_ghz")
        if amp is None or flux is None or freq is None:
            continue
        fwhm = fitted_fwhm_arcmin(float(amp), float(flux), float(freq))
        if math.isfinite(fwhm):
            per.setdefault((int(get("feed")), int(get("band"))), []).append(fwhm * float(freq) / BEAM_REF_GHZ)
    return {k: (float(np.median(v)), len(v)) for k, v in per.items()}


def map_beam(
    table: Mapping[tuple[int, int], tuple[float, int]] | None,
    feeds: Iterable[int],
    bands: Iterable[int],
    freq_ghz: float,
) -> Beam:
    """The beam of a map made from ``feeds`` × ``bands`` at ``freq_ghz``: the median over those
    (feed, band) of the calibrator-fitted FWHM scaled to ``freq_ghz`` where the table has any, else the
    nominal beam."""
    want = {(int(f), int(b)) for f in feeds for b in bands}
    found = [v for k, v in (table or {}).items() if k in want]
    if found:
        fwhm30 = float(np.median([v[0] for v in found]))
        n = int(sum(v[1] for v in found))
        return Beam(fwhm30 / 60.0 * BEAM_REF_GHZ / float(freq_ghz), float(freq_ghz), "calibrator-fit", n)
    nominal = float(beam_fwhm_arcmin(freq_ghz, BEAM_FWHM_ARCMIN_30GHZ)) / 60.0
    return Beam(nominal, float(freq_ghz), "nominal", 0)


def beam_cards(beam: Beam) -> dict[str, Any]:
    """BMAJ, BMIN, BPA (deg) and BEAMSRC/BEAMFREQ/BEAMNFIT."""
    cards: dict[str, Any] = {
        "BMAJ": (float(beam.fwhm_deg), "[deg] beam FWHM (circular Gaussian)"),
        "BMIN": (float(beam.fwhm_deg), "[deg] beam FWHM (circular Gaussian)"),
        "BPA": (0.0, "[deg] beam position angle"),
        "BEAMSRC": (beam.source, "calibrator-fit, nominal or common (stack)"),
        "BEAMFREQ": (float(beam.freq_ghz) * 1e9, "[Hz] frequency the beam is given at"),
    }
    if beam.n_fit:
        cards["BEAMNFIT"] = (int(beam.n_fit), "calibrator fits in the median")
    return cards


# --------------------------------------------------------------------------------------------------
# Brightness scale
# --------------------------------------------------------------------------------------------------
def jy_per_k(freq_ghz: ArrayLike, beam: Beam) -> NDArray[np.float64]:
    """Jy/beam per K at ``freq_ghz`` for ``beam`` (its FWHM scaled to each frequency when
    ``beam.source`` is not ``'common'``): ``2 k ν² Ω / c²`` in Jy."""
    nu = np.asarray(freq_ghz, dtype=np.float64)
    omega = beam.solid_angle_sr * (1.0 if beam.source == "common" else (beam.freq_ghz / nu) ** 2)
    return 1.0 / jy_to_k_factor(nu, omega)


def calibration_uncertainty(
    table: Any, elements: Iterable[tuple[int, int, int]], mjd: float, calib_source: str
) -> tuple[float, float, float]:
    """(total, statistical, flux-model) fractional calibration uncertainty of a map.

    Statistical: the median over the (feed, band, channel) ``elements`` used of the model's scatter
    about its fit over the square root of the number of calibrator observations, relative to the factor
    at ``mjd`` (``fit_rms / (factor √n)``); elements without a model are left out. Flux model: the
    calibrator's ``FLUX_MODEL_UNCERTAINTY``. They add in quadrature. NaN parts when unknown.
    """
    stat = []
    for feed, band, channel in elements:
        model = table.model(feed, band, channel) if table is not None else None
        if model is None or model.fit_rms is None or not model.n_observations:
            continue
        factor = float(model.factor(np.asarray(mjd)))
        if math.isfinite(factor) and factor > 0 and math.isfinite(model.fit_rms):
            stat.append(model.fit_rms / (factor * math.sqrt(model.n_observations)))
    s = float(np.median(stat)) if stat else math.nan
    key = str(calib_source).lower().replace(" ", "").replace("_", "")
    m = float(FLUX_MODEL_UNCERTAINTY.get(key, math.nan))
    total = math.hypot(s, m) if math.isfinite(s) and math.isfinite(m) else (m if math.isfinite(m) else s)
    return total, s, m


def brightness_cards(
    beam: Beam,
    ref_freq_ghz: float,
    calibration: str,
    calib_source: str,
    uncertainty: tuple[float, float, float] | None,
) -> dict[str, Any]:
    """BUNIT, TEMPSCAL, JYPERK (with its reference frequency JYKREF and index JYKIDX, so that
    ``JYPERK(ν) = JYPERK · (ν/JYKREF)^JYKIDX``) and the calibration uncertainty CALERR."""
    calibrated = calibration == "model"
    cards: dict[str, Any] = {
        "BUNIT": ("K", "brightness temperature"),
        "TEMPSCAL": (TEMPSCAL_CALIBRATED if calibrated else TEMPSCAL_VANE, "temperature scale"),
        "JYPERK": (float(jy_per_k(ref_freq_ghz, beam)), "[Jy/beam per K] at JYKREF, beam BMAJ"),
        "JYKREF": (float(ref_freq_ghz) * 1e9, "[Hz] reference frequency of JYPERK"),
        "JYKIDX": (
            2.0 if beam.source == "common" else 0.0,
            "JYPERK(nu) = JYPERK*(nu/JYKREF)**JYKIDX",
        ),
    }
    if calibrated and uncertainty is not None:
        total, stat, model = uncertainty
        if math.isfinite(total):
            cards["CALERR"] = (float(total), "fractional calibration uncertainty (1 sigma)")
        if math.isfinite(stat):
            cards["CALERRST"] = (float(stat), "from the calibration model's scatter")
        if math.isfinite(model):
            cards["CALERRFM"] = (float(model), f"{calib_source} flux-model uncertainty")
    else:
        cards["CALNOTE"] = ("uncalibrated: vane scale, uncertainty not assessed", "")
    return cards


def product_cards(
    beam: Beam,
    ref_freq_ghz: float,
    *,
    calibration: str,
    calib_source: str,
    table: Any,
    elements: Iterable[tuple[int, int, int]],
    mjd: float,
) -> dict[str, Any]:
    """The beam and brightness-scale cards of one map or cube (the uncertainty from ``table`` when
    ``calibration == 'model'``)."""
    unc = calibration_uncertainty(table, elements, mjd, calib_source) if calibration == "model" else None
    return {**beam_cards(beam), **brightness_cards(beam, ref_freq_ghz, calibration, calib_source, unc)}


# --------------------------------------------------------------------------------------------------
# Lines
# --------------------------------------------------------------------------------------------------
def rest_frequency_cards(lines: Sequence[Any]) -> dict[str, Any]:
    """RESTFRQ (the first, reference line; the velocity axis is for it) and LINEk/RESTFk of every line."""
    cards: dict[str, Any] = {
        "RESTFRQ": (float(lines[0].rest_freq_ghz) * 1e9, f"[Hz] {lines[0].label}, reference line"),
        "NLINES": (len(lines), "lines in this cube"),
    }
    for k, spec in enumerate(lines, start=1):
        cards[f"LINE{k}"] = (spec.label, "line name")
        cards[f"RESTF{k}"] = (float(spec.rest_freq_ghz) * 1e9, f"[Hz] rest frequency of {spec.label}")
    return cards


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentRecord:
    """One (obsid, feed, band, scan) segment used by a map, with its time range."""

    obsid: int
    feed: int
    band: int
    scan: int
    mjd_start: float
    mjd_stop: float
    n_sample: int


def segment_records(plans: Iterable[Any], bands_of: Any = None) -> list[SegmentRecord]:
    """Time ranges of the segments of ``plans`` (objects with ``obsid, path, feed, scan, start, stop``),
    read from each level-2 file's MJD at the first and last sample; ``bands_of(plan)`` gives the bands a
    plan contributes (default ``[plan.band]``)."""
    import h5py

    from utils.level2 import MJD

    by_path: dict[str, list[Any]] = {}
    for p in plans:
        by_path.setdefault(str(p.path), []).append(p)
    out: list[SegmentRecord] = []
    for path, group in by_path.items():
        with h5py.File(path, "r", locking=False) as l2:
            mjd = l2[MJD]
            for p in group:
                t0, t1 = float(mjd[int(p.start)]), float(mjd[int(p.stop) - 1])
                for band in bands_of(p) if bands_of else [int(p.band)]:
                    out.append(
                        SegmentRecord(
                            int(p.obsid), int(p.feed), int(band), int(p.scan), t0, t1, int(p.stop - p.start)
                        )
                    )
    return sorted(out, key=lambda r: (r.obsid, r.feed, r.band, r.scan))


def obslist_hdu(records: Sequence[SegmentRecord]):
    """The OBSLIST binary table: one row per segment used (OBSID, FEED, BAND, SCAN, MJDSTART, MJDSTOP,
    NSAMPLE)."""
    from astropy.io import fits

    def col(name, fmt, values, unit=None):
        return fits.Column(name=name, format=fmt, array=np.asarray(values), unit=unit)

    hdu = fits.BinTableHDU.from_columns(
        [
            col("OBSID", "J", [r.obsid for r in records]),
            col("FEED", "I", [r.feed for r in records]),
            col("BAND", "I", [r.band for r in records]),
            col("SCAN", "I", [r.scan for r in records]),
            col("MJDSTART", "D", [r.mjd_start for r in records], "d"),
            col("MJDSTOP", "D", [r.mjd_stop for r in records], "d"),
            col("NSAMPLE", "J", [r.n_sample for r in records]),
        ],
        name="OBSLIST",
    )
    hdu.header["COMMENT"] = "segments (obsid, feed, band, scan) that went into this file; MJD UTC"
    return hdu


def merge_obslists(*tables: Any):
    """One OBSLIST HDU from the rows of several (e.g. the two halves of a jackknife difference)."""
    from astropy.io import fits

    rows = [np.asarray(t.data) for t in tables if t is not None and t.data is not None]
    if not rows:
        return None
    data = np.unique(np.concatenate(rows))
    hdu = fits.BinTableHDU(data, name="OBSLIST")
    return hdu


__all__ = [
    "BEAM_REF_GHZ",
    "FLUX_MODEL_UNCERTAINTY",
    "Beam",
    "SegmentRecord",
    "beam_cards",
    "brightness_cards",
    "calibration_uncertainty",
    "calibrator_beam_table",
    "fitted_fwhm_arcmin",
    "jy_per_k",
    "map_beam",
    "merge_obslists",
    "obslist_hdu",
    "product_cards",
    "rest_frequency_cards",
    "segment_records",
]
