"""What the run report shows, read from the database and the run's outputs (docs/operations.md#run-report).

Everything here is bounded so that a report of a season (thousands of observations) is made in
seconds: per-observation rows are one query each for observations, summaries and jobs; the noise
medians use at most :data:`MAX_NOISE_OBSERVATIONS` observations and the Tsys and gain spectra at
most :data:`MAX_LEVEL2_FILES` level-2 files, both spread evenly over the observations.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("comap.report")

MAX_LEVEL2_FILES = 24
"""Level-2 files read for the Tsys and gain spectra (spread evenly over the done observations)."""
MAX_NOISE_OBSERVATIONS = 200
"""Observations whose ``quality_flags`` statistics enter the noise medians."""
MAX_QUICKLOOKS = 60
"""Map and cube products shown (sorted by name; the rest are counted)."""
MAP_MODULE_PACKAGE = "modules.MapMaking."
"""Entries under this package with an ``output_dir`` parameter write FITS products."""
NOISE_COLUMNS = ("filtered_white_noise", "filtered_fknee", "filtered_noise_index")
"""``quality_flags`` columns of the noise section: white level (K), knee frequency (Hz), spectral slope."""


@dataclass
class ObservationRow:
    """One observation as the report lists it.

    ``status`` is ``failed`` if any of its jobs failed, else ``running``, ``pending``, ``done`` (every
    job done), or the summary's ``processing_status`` (``registered`` without either).
    """

    obsid: int
    source: str = ""
    utc_start: str = ""
    status: str = "registered"
    reason: str = ""
    stages: str = ""
    level2_path: str | None = None
    median_tsys: float | None = None
    this_run: bool = False


@dataclass
class Spectra:
    """Median Tsys and gain spectra per feed over vane events and level-2 files.

    ``frequency_ghz`` has shape (B, C); ``tsys_k`` and ``gain`` map a feed number to (B, C) arrays
    (K and counts/K).
    """

    frequency_ghz: np.ndarray | None = None
    tsys_k: dict[int, np.ndarray] = field(default_factory=dict)
    gain: dict[int, np.ndarray] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    n_candidates: int = 0


@dataclass
class NoiseTable:
    """Medians over channels and observations of the noise statistics per (feed, band)."""

    medians: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    n_observations: int = 0
    n_candidates: int = 0


@dataclass
class CalibratorPoints:
    """Calibrator flux per (source, band) and observation, with the calibration model.

    ``points[(source, band)]`` is a list of ``(obsid, mjd, flux_jy, flux_error_jy, frequency_ghz)``
    (medians over feeds and channels); ``model[(source, band)]`` is ``(mjd grid, factor)`` with the
    factor the median over the band's elements of the calibration model.
    """

    points: dict[tuple[str, int], list[tuple[int, float, float, float, float]]] = field(default_factory=dict)
    model: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass
class MapProduct:
    """A FITS product of a map-making module with its quicklook PNG (None if there is none)."""

    fits: Path
    png: Path | None
    module: str


def _chunks(values: list[int], n: int = 500) -> Iterable[list[int]]:
    for i in range(0, len(values), n):
        yield values[i : i + n]


def spread(values: list[Any], n: int) -> list[Any]:
    """At most ``n`` of ``values``, evenly spaced and including the first and last."""
    if len(values) <= n:
        return list(values)
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, n)).astype(int))
    return [values[i] for i in idx]


def observation_rows(db: Any, run_id: str) -> list[ObservationRow]:
    """Every observation of the database and every obsid with a job, failures first, then by obsid.

    Parameters
    ----------
    db : modules.SQLModule.SQLModule.SQLModule
        The connected database facade.
    run_id : str
        The run whose jobs are marked ``this_run``.
    """
    rows: dict[int, ObservationRow] = {}
    for s in db.query_observation_summaries():
        rows[int(s["obsid"])] = ObservationRow(
            obsid=int(s["obsid"]),
            source=s.get("source") or "",
            utc_start=s.get("utc_start") or "",
            status=s.get("processing_status") or "registered",
            reason=s.get("processing_error") or "",
            level2_path=s.get("level2_path"),
            median_tsys=s.get("median_tsys"),
        )
    jobs: dict[int, list[Any]] = defaultdict(list)
    for job in db.job_table(None):
        jobs[int(job.obsid)].append(job)
    for obsid, its in jobs.items():
        row = rows.setdefault(obsid, ObservationRow(obsid=obsid))
        its.sort(key=lambda j: j.created_utc or j.updated_utc or 0)
        row.stages = ", ".join(f"{j.stage} {j.status}" for j in its)
        row.this_run = any(j.run_id == run_id for j in its)
        statuses = {j.status for j in its}
        failed = [j for j in its if j.status == "failed"]
        if failed:
            row.status = "failed"
            row.reason = "; ".join(
                f"{j.stage}{f' ({j.last_module})' if j.last_module else ''}: {j.error or 'no reason given'}"
                for j in failed
            )
        elif "running" in statuses:
            row.status = "running"
        elif "pending" in statuses:
            row.status = "pending"
        else:
            row.status = "done"
    return sorted(rows.values(), key=lambda r: (r.status != "failed", r.obsid))


def noise_table(db: Any, rows: list[ObservationRow]) -> NoiseTable:
    """Medians of :data:`NOISE_COLUMNS` per (feed, band) over channels and at most
    :data:`MAX_NOISE_OBSERVATIONS` observations with a level-2 file."""
    from sqlalchemy import select

    from modules.SQLModule.SQLModule import QualityFlag

    candidates = sorted(r.obsid for r in rows if r.level2_path)
    chosen = spread(candidates, MAX_NOISE_OBSERVATIONS)
    table = NoiseTable(n_candidates=len(candidates))
    cols = [getattr(QualityFlag, c) for c in NOISE_COLUMNS]
    values: dict[tuple[int, int], list[tuple]] = defaultdict(list)
    seen: set[int] = set()
    with db.session(write=False) as s:
        for chunk in _chunks(chosen):
            stmt = select(QualityFlag.obsid, QualityFlag.feed, QualityFlag.band, *cols).where(
                QualityFlag.obsid.in_(chunk), QualityFlag.filtered_white_noise.is_not(None)
            )
            for obsid, feed, band, *vals in s.execute(stmt):
                seen.add(int(obsid))
                values[(int(feed), int(band))].append(tuple(np.nan if v is None else float(v) for v in vals))
    for key, vals in sorted(values.items()):
        arr = np.asarray(vals, dtype=np.float64)
        with np.errstate(all="ignore"):
            table.medians[key] = {
                c: float(np.nanmedian(arr[:, i])) if np.isfinite(arr[:, i]).any() else float("nan")
                for i, c in enumerate(NOISE_COLUMNS)
            }
    table.n_observations = len(seen)
    return table


def tsys_gain_spectra(rows: list[ObservationRow]) -> Spectra:
    """Median over vane events and level-2 files of ``level2/vane/system_temperature`` and
    ``level2/vane/gain`` per feed (docs/formats/level2.md#level-2-file-layout); files whose
    frequency axis differs from the first are left out."""
    import h5py

    from utils import level2 as l2

    candidates = [Path(r.level2_path) for r in sorted(rows, key=lambda r: r.obsid) if r.level2_path]
    candidates = [p for p in candidates if p.is_file()]
    out = Spectra(n_candidates=len(candidates))
    per_feed_tsys: dict[int, list[np.ndarray]] = defaultdict(list)
    per_feed_gain: dict[int, list[np.ndarray]] = defaultdict(list)
    for path in spread(candidates, MAX_LEVEL2_FILES):
        try:
            with h5py.File(path, "r", locking=False) as f:
                if l2.VANE_TSYS not in f or l2.FREQUENCY not in f:
                    continue
                freq = np.asarray(f[l2.FREQUENCY][...], dtype=np.float64)
                if out.frequency_ghz is None:
                    out.frequency_ghz = freq
                elif out.frequency_ghz.shape != freq.shape:
                    continue
                feeds = [int(v) for v in f[l2.FEEDS][...]]
                tsys = np.asarray(f[l2.VANE_TSYS][...], dtype=np.float64)
                gain = np.asarray(f[l2.VANE_GAIN][...], dtype=np.float64)
        except (OSError, KeyError) as exc:
            log.debug("report: cannot read %s: %s", path, exc)
            continue
        if tsys.shape[0] == 0:
            continue
        with _quiet_nan_warnings():
            tsys_med, gain_med = np.nanmedian(tsys, axis=0), np.nanmedian(gain, axis=0)
        for i, feed in enumerate(feeds):
            per_feed_tsys[feed].append(tsys_med[i])
            per_feed_gain[feed].append(gain_med[i])
        out.files.append(path)
    with _quiet_nan_warnings():
        for feed in sorted(per_feed_tsys):
            out.tsys_k[feed] = np.nanmedian(np.stack(per_feed_tsys[feed]), axis=0)
            out.gain[feed] = np.nanmedian(np.stack(per_feed_gain[feed]), axis=0)
    return out


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """Medians of all-NaN slices are NaN here, without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def calibrator_points(db: Any) -> CalibratorPoints:
    """Calibrator fluxes per (source, band, observation) from ``calibration_flux`` and the
    calibration model from ``calibration_model_fit`` (docs/level2.md#calibrationmodel)."""
    out = CalibratorPoints()
    grouped: dict[tuple[str, int, int], list[Any]] = defaultdict(list)
    for r in db.query_calibration_flux(None):
        if r.measured_flux is None or r.mjd is None:
            continue
        grouped[(str(r.source), int(r.band), int(r.obsid))].append(r)
    for (source, band, obsid), rs in sorted(grouped.items()):
        flux = np.array([r.measured_flux for r in rs], dtype=np.float64)
        err = np.array([np.nan if r.flux_error is None else r.flux_error for r in rs], dtype=np.float64)
        freq = np.array(
            [np.nan if r.frequency_ghz is None else r.frequency_ghz for r in rs], dtype=np.float64
        )
        with _quiet_nan_warnings():
            out.points.setdefault((source, band), []).append(
                (
                    obsid,
                    float(rs[0].mjd),
                    float(np.nanmedian(flux)),
                    float(np.nanmedian(err)),
                    float(np.nanmedian(freq)),
                )
            )
    models: dict[str, list[Any]] = defaultdict(list)
    for m in db.query_calibration_models():
        models[str(m.source)].append(m)
    for source in sorted(models):
        table = db.load_calibration_table(source)
        mjds = [p[1] for (s, _b), pts in out.points.items() if s.lower() == source.lower() for p in pts]
        lo = min([m.mjd_min for m in models[source] if m.mjd_min is not None] + mjds, default=None)
        hi = max([m.mjd_max for m in models[source] if m.mjd_max is not None] + mjds, default=None)
        if lo is None or hi is None:
            continue
        pad = max(0.05 * (hi - lo), 0.02)
        grid = np.linspace(lo - pad, hi + pad, 200)
        for band in sorted({m.band for m in models[source]}):
            elems = [e for e in table.elements() if e[1] == band]
            with _quiet_nan_warnings():
                factor = np.nanmedian(np.stack([table.factor(*e, grid) for e in elems]), axis=0)
            out.model[(source, int(band))] = (grid, factor)
    return out


def map_products(resolved: Mapping[str, Any]) -> tuple[list[MapProduct], int]:
    """FITS products in the ``output_dir`` of every map-making entry of the resolved configuration
    (the main config and its sub-configs), sorted by path: at most :data:`MAX_QUICKLOOKS`, and how
    many there are in all."""
    configs = [resolved.get("main", {}), *dict(resolved.get("sub_configs") or {}).values()]
    dirs: dict[Path, str] = {}
    for cfg in configs:
        for entry in cfg.get("pipeline", []):
            cls = str(entry.get("class", ""))
            out_dir = (entry.get("params") or {}).get("output_dir")
            if cls.startswith(MAP_MODULE_PACKAGE) and out_dir:
                dirs.setdefault(Path(out_dir), cls.rsplit(".", 1)[-1])
    found: dict[Path, MapProduct] = {}
    for d, module in dirs.items():
        if d.is_dir():
            for fits in sorted(d.glob("*.fits")):
                png = fits.with_suffix(".png")
                found.setdefault(fits.resolve(), MapProduct(fits, png if png.is_file() else None, module))
    products = sorted(found.values(), key=lambda p: str(p.fits))
    return products[:MAX_QUICKLOOKS], len(products)


def calibration_model_files(resolved: Mapping[str, Any]) -> list[Path]:
    """The ``output_path`` JSON files of CalibrationModel entries that exist."""
    configs = [resolved.get("main", {}), *dict(resolved.get("sub_configs") or {}).values()]
    out = []
    for cfg in configs:
        for entry in cfg.get("pipeline", []):
            if str(entry.get("class", "")).endswith(".CalibrationModel"):
                path = (entry.get("params") or {}).get("output_path")
                if path and Path(path).is_file():
                    out.append(Path(path))
    return out
