"""CalibrationModel: the calibration factor (measured / model calibrator flux) against time
(docs/level2.md#calibrationmodel)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from numpy.polynomial import polynomial as P
from numpy.typing import NDArray

from modules.pipeline_control import jobs, provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from modules.SQLModule.SQLModule import db
from utils import faults
from utils.calibrators import DAYS_PER_YEAR, MODEL_TYPES, canonical_name, flux_jy

log = logging.getLogger("comap.CalibrationModel")

Element = tuple[int, int, int]


@dataclass
class ElementModel:
    """The fitted calibration model of one (feed, band, channel) element
    (docs/database.md#calibration_model_fit).

    Attributes
    ----------
    feed, band, channel : int
        Feed number, band 0–3, binned channel.
    model_type : str
        ``polynomial``, ``mean`` or ``nearest``.
    poly_coeffs : list of float
        Polynomial coefficients, constant term first, in ``t = (mjd − mjd_ref)/365.25`` years
        (``[mean]`` for ``mean``; empty for ``nearest``).
    poly_coeff_errors : list of float
        Formal 1σ errors of ``poly_coeffs`` from the weighted least-squares covariance
        ``(Aᵀ W A)⁻¹``, ``W = 1/σ_ratio²`` (not scaled by χ²; JSON export only).
    nearest_mjds, nearest_gains : list of float
        Sorted (mjd, ratio) pairs for ``nearest``.
    fit_rms : float
        Rms of the used ratios about the model (about the weighted mean for ``nearest``).
    n_observations : int
        Rows used.
    mjd_min, mjd_max : float
        Time range of the rows used (polynomials are clamped to it when evaluated).
    """

    feed: int
    band: int
    channel: int
    model_type: str
    mjd_ref: float
    poly_coeffs: list[float] = field(default_factory=list)
    poly_coeff_errors: list[float] = field(default_factory=list)
    nearest_mjds: list[float] = field(default_factory=list)
    nearest_gains: list[float] = field(default_factory=list)
    fit_rms: float = math.nan
    n_observations: int = 0
    mjd_min: float = math.nan
    mjd_max: float = math.nan
    used: dict[str, NDArray] = field(default_factory=dict, repr=False)

    def row(self, source: str) -> dict[str, Any]:
        """The ``calibration_model_fit`` row (docs/database.md#calibration_model_fit)."""
        return {
            "source": source,
            "feed": self.feed,
            "band": self.band,
            "channel": self.channel,
            "model_type": self.model_type,
            "poly_coeffs": list(self.poly_coeffs) if self.model_type != "nearest" else None,
            "mjd_ref": self.mjd_ref,
            "nearest_mjds": list(self.nearest_mjds) if self.model_type == "nearest" else None,
            "nearest_gains": list(self.nearest_gains) if self.model_type == "nearest" else None,
            "fit_rms": self.fit_rms,
            "n_observations": self.n_observations,
            "mjd_min": self.mjd_min,
            "mjd_max": self.mjd_max,
        }

    def evaluate(self, mjd: NDArray) -> NDArray[np.float64]:
        """The model at ``mjd`` (same rules as ``utils.calibrators.CalibrationTable.factor``)."""
        from utils.calibrators import CalibrationTable

        table = CalibrationTable.from_rows("model", [self.row("model")])
        return np.asarray(table.factor(self.feed, self.band, self.channel, np.asarray(mjd, dtype=np.float64)))


@dataclass
class SelectedRows:
    """Calibration-flux rows after the cuts of docs/level2.md#calibrationmodel step 2, as arrays (one entry
    per row)."""

    obsid: NDArray[np.int64]
    element: NDArray[np.int64]  # (n, 3): feed, band, channel
    mjd: NDArray[np.float64]
    ratio: NDArray[np.float64]
    ratio_error: NDArray[np.float64]
    n_read: int
    reasons: dict[str, int]


def select_rows(
    rows: Iterable[Any],
    source: str,
    *,
    chi2_max: float,
    gain_min: float,
    gain_max: float,
) -> SelectedRows:
    """Measured/model ratios of ``calibration_flux`` rows and the cuts of docs/level2.md#calibrationmodel
    steps 1–2.

    ``S_model`` is evaluated at each row's ``frequency_ghz`` (the bin's ``central_freqs``) and
    ``mjd`` with :func:`utils.calibrators.flux_jy`. A row is kept if the ratio and its error
    (``flux_error / S_model``) are finite and positive, ``chi2 ≤ chi2_max`` and
    ``gain_min ≤ ratio ≤ gain_max``.

    Parameters
    ----------
    rows : iterable
        ``CalibrationFlux`` objects or mappings with ``obsid, feed, band, channel, mjd,
        frequency_ghz, measured_flux, flux_error, chi2``.
    source : str
        Calibrator of the flux model.
    """
    keys = ("obsid", "feed", "band", "channel", "mjd", "frequency_ghz", "measured_flux", "flux_error", "chi2")
    table: dict[str, list[Any]] = {k: [] for k in keys}
    for r in rows:
        get = r.get if isinstance(r, Mapping) else (lambda k, _r=r: getattr(_r, k, None))
        for k in keys:
            table[k].append(get(k))

    def col(name: str) -> NDArray[np.float64]:
        return np.array([np.nan if v is None else float(v) for v in table[name]], dtype=np.float64)

    n = len(table["obsid"])
    freq, mjd = col("frequency_ghz"), col("mjd")
    s_model = np.full(n, np.nan)
    good_in = np.isfinite(freq) & (freq > 0) & np.isfinite(mjd)
    if good_in.any():
        s_model[good_in] = flux_jy(source, freq[good_in], mjd[good_in])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = col("measured_flux") / s_model
        ratio_err = col("flux_error") / s_model
    chi2 = col("chi2")
    finite = np.isfinite(ratio) & np.isfinite(ratio_err) & (ratio_err > 0)
    with np.errstate(invalid="ignore"):
        chi2_ok = np.isfinite(chi2) & (chi2 <= chi2_max)
        gain_ok = (ratio >= gain_min) & (ratio <= gain_max)
    keep = finite & chi2_ok & gain_ok
    reasons = {
        "not finite": int((~finite).sum()),
        f"chi2 > {chi2_max:g} (or null)": int((finite & ~chi2_ok).sum()),
        f"ratio outside [{gain_min:g}, {gain_max:g}]": int((finite & chi2_ok & ~gain_ok).sum()),
    }
    element = np.stack([np.asarray(table[k], dtype=np.int64) for k in ("feed", "band", "channel")], axis=1)
    return SelectedRows(
        obsid=np.asarray(table["obsid"], dtype=np.int64)[keep],
        element=element.reshape(-1, 3)[keep],
        mjd=mjd[keep],
        ratio=ratio[keep],
        ratio_error=ratio_err[keep],
        n_read=n,
        reasons=reasons,
    )


def fit_element(
    element: Element,
    mjd: NDArray,
    ratio: NDArray,
    ratio_error: NDArray,
    *,
    model_type: str,
    poly_degree: int,
    mjd_ref: float,
) -> ElementModel:
    """Fit one element's calibration model (docs/level2.md#calibrationmodel step 3).

    * ``polynomial``: ``numpy.polynomial.polynomial.polyfit(t, ratio, deg, w=1/σ_ratio)`` with
      ``t = (mjd − mjd_ref)/365.25``; the degree is lowered to (number of distinct times − 1) when
      there are too few epochs;
    * ``mean``: the inverse-variance weighted mean;
    * ``nearest``: the (mjd, ratio) pairs sorted by time.
    """
    order = np.argsort(mjd, kind="stable")
    mjd, ratio, err = mjd[order], ratio[order], ratio_error[order]
    w = 1.0 / err**2
    model = ElementModel(
        feed=int(element[0]),
        band=int(element[1]),
        channel=int(element[2]),
        model_type=model_type,
        mjd_ref=float(mjd_ref),
        n_observations=int(mjd.size),
        mjd_min=float(mjd.min()),
        mjd_max=float(mjd.max()),
        used={"mjd": mjd, "ratio": ratio, "ratio_error": err},
    )
    if model_type == "polynomial":
        t = (mjd - mjd_ref) / DAYS_PER_YEAR
        deg = int(min(poly_degree, np.unique(t).size - 1))
        coeffs = P.polyfit(t, ratio, deg, w=1.0 / err)
        a = P.polyvander(t, deg)
        cov = np.linalg.inv(a.T @ (a * w[:, None]))
        model.poly_coeffs = [float(c) for c in coeffs]
        model.poly_coeff_errors = [float(e) for e in np.sqrt(np.diag(cov))]
        resid = ratio - P.polyval(t, coeffs)
    elif model_type == "mean":
        mean = float(np.sum(w * ratio) / np.sum(w))
        model.poly_coeffs = [mean]
        model.poly_coeff_errors = [float(1.0 / np.sqrt(np.sum(w)))]
        resid = ratio - mean
    elif model_type == "nearest":
        model.nearest_mjds = [float(m) for m in mjd]
        model.nearest_gains = [float(g) for g in ratio]
        resid = ratio - np.sum(w * ratio) / np.sum(w)
    else:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    model.fit_rms = float(np.sqrt(np.mean(resid**2)))
    return model


class CalibrationModel(PipelineStage):
    """Model the calibration factor of every (feed, band, channel) against time
    (docs/level2.md#calibrationmodel).

    Reads the ``calibration_flux`` rows of ``source`` (written by CalibratorFitting), divides each
    measured flux by the model flux at the row's frequency and time, applies the cuts, fits a
    polynomial, mean or nearest-neighbour model per element with at least ``min_observations``
    rows, upserts ``calibration_model_fit`` keyed by (source, feed, band, channel), and exports the
    table as JSON. Map making divides vane-K data by the factor to get K_RJ
    (docs/mapmaking.md#level2datareader).

    The command-line ``--obsid`` restriction does not apply: a calibration model is a fit over
    time to every calibrator observation in ``[min_obsid, max_obsid]``, and refitting it from a
    subset would overwrite the model of the whole archive.

    Parameters
    ----------
    source : str
        Calibrator whose fluxes define the model: TauA, CasA, CygA or Jupiter.
    min_obsid : int
        Lowest obsid (inclusive) of the calibrator fits used.
    max_obsid : int or None
        Highest obsid (inclusive) of the calibrator fits used; None = no upper limit.
    model_type : {'polynomial', 'mean', 'nearest'}
        Model of measured/model flux against time: a weighted polynomial in years, the
        inverse-variance weighted mean, or the measurement nearest in time.
    poly_degree : int
        Degree of the polynomial model.
    mjd_ref : float
        Time origin (MJD): ``t = (mjd − mjd_ref)/365.25`` years.
    chi2_max : float
        Rows with a larger reduced χ² are ignored.
    gain_min, gain_max : float
        Accepted range [gain_min, gain_max] of the ratio measured/model flux (dimensionless); rows
        outside it are ignored.
    min_observations : int
        Elements with fewer rows get no model.
    output_path : str or None
        JSON export of the fitted table (written atomically); None to skip.
    plot : bool
        One PNG per (feed, band): ratio against MJD with the model.
    plot_dir : str
        Directory of the plots.
    """

    def __init__(
        self,
        source: str = "TauA",
        min_obsid: int = 0,
        max_obsid: int | None = None,
        model_type: Literal[MODEL_TYPES] = "polynomial",
        poly_degree: Annotated[int, Range(ge=0)] = 2,
        mjd_ref: float = 59000.0,
        chi2_max: Annotated[float, Range(gt=0)] = 10.0,
        gain_min: float = 0.3,
        gain_max: float = 3.0,
        min_observations: Annotated[int, Range(ge=1)] = 10,
        output_path: str | None = "calibration/calibration_model.json",
        plot: bool = False,
        plot_dir: str = "outputs/CalibrationModel",
    ) -> None:
        self.source = source
        self.min_obsid = min_obsid
        self.max_obsid = max_obsid
        self.model_type = model_type
        self.poly_degree = int(poly_degree)
        self.mjd_ref = float(mjd_ref)
        self.chi2_max = float(chi2_max)
        self.gain_min = float(gain_min)
        self.gain_max = float(gain_max)
        self.min_observations = int(min_observations)
        self.output_path = output_path
        self.plot = bool(plot)
        self.plot_dir = plot_dir

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        try:
            canonical_name(str(params["source"]))
        except KeyError as exc:
            problems.append(f"source: {exc.args[0]}")
        lo, hi = float(params["gain_min"]), float(params["gain_max"])
        if not 0 < lo < hi:
            problems.append(f"need 0 < gain_min < gain_max, got {lo} and {hi}")
        if not math.isfinite(float(params["mjd_ref"])):
            problems.append("mjd_ref must be a finite MJD")
        mx = params["max_obsid"]
        if mx is not None and int(mx) < int(params["min_obsid"] or 0):
            problems.append(f"max_obsid {mx} is below min_obsid {params['min_obsid']}")
        return problems

    # ------------------------------------------------------------------------------------------
    @property
    def canonical_source(self) -> str:
        return canonical_name(self.source)

    def _select(self) -> SelectedRows:
        rows = db.query_calibration_flux(
            self.canonical_source, min_obsid=self.min_obsid, max_obsid=self.max_obsid
        )
        return select_rows(
            rows,
            self.canonical_source,
            chi2_max=self.chi2_max,
            gain_min=self.gain_min,
            gain_max=self.gain_max,
        )

    def _groups(self, sel: SelectedRows) -> tuple[list[tuple[Element, NDArray]], list[Element]]:
        """Indices of the rows of each element; elements with enough rows, and those without."""
        if sel.element.size == 0:
            return [], []
        keys, inverse = np.unique(sel.element, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        enough, short = [], []
        for k, key in enumerate(keys):
            idx = np.flatnonzero(inverse == k)
            element = (int(key[0]), int(key[1]), int(key[2]))
            (enough if idx.size >= self.min_observations else short).append((element, idx))
        return enough, [e for e, _ in short]

    def _describe_model(self) -> str:
        if self.model_type == "polynomial":
            return f"polynomial (degree {self.poly_degree}, t in years from MJD {self.mjd_ref:g})"
        return self.model_type

    def plan(self) -> list[str]:
        sel = self._select()
        enough, short = self._groups(sel)
        obs_range = f"{self.min_obsid}–{self.max_obsid if self.max_obsid is not None else 'last'}"
        lines = [
            f"CalibrationModel: {self.canonical_source}, model {self._describe_model()}: {sel.n_read} "
            f"calibration_flux row(s) in obsids {obs_range}, {len(sel.ratio)} pass the cuts "
            f"(chi2 <= {self.chi2_max:g}, ratio in [{self.gain_min:g}, {self.gain_max:g}])",
            f"  {len(enough)} (feed, band, channel) element(s) would get a model; {len(short)} have fewer "
            f"than {self.min_observations} rows and would be left unchanged",
            f"  export: {self.output_path if self.output_path else 'none'}"
            + (f"; plots in {self.plot_dir}" if self.plot else ""),
        ]
        if self.context.obsids is not None:
            lines.append(
                "  --obsid does not restrict the calibration model (it is fitted over all obsids in range)"
            )
        return lines

    def run(self) -> StageResult:
        result = StageResult(stage="CalibrationModel")
        if self.context.obsids is not None:
            log.info("--obsid does not restrict the calibration model; it uses every obsid in its range")
        sel = self._select()
        dropped = ", ".join(f"{v} {k}" for k, v in sel.reasons.items() if v)
        log.info(
            "%s: %d calibration_flux row(s) read, %d kept%s",
            self.canonical_source,
            sel.n_read,
            len(sel.ratio),
            f" ({dropped} dropped)" if dropped else "",
        )
        enough, short = self._groups(sel)
        if not enough:
            msg = (
                f"no (feed, band, channel) element of {self.canonical_source} has {self.min_observations} "
                f"usable calibration_flux rows; no model written"
            )
            log.warning("%s", msg)
            result.notes.append(msg)
            result.skipped = len(short)
            return result
        inputs_sha = self._inputs_sha256(sel)
        if not self.context.force and self._export_is_current(inputs_sha):
            log.info("%s is up to date (same calibration_flux rows and parameters)", self.output_path)
            result.skipped = len(enough) + len(short)
            return result
        models = [
            fit_element(
                element,
                sel.mjd[idx],
                sel.ratio[idx],
                sel.ratio_error[idx],
                model_type=self.model_type,
                poly_degree=self.poly_degree,
                mjd_ref=self.mjd_ref,
            )
            for element, idx in enough
        ]
        db.upsert_calibration_model([m.row(self.canonical_source) for m in models])
        if short:
            log.info(
                "%d element(s) with fewer than %d rows keep their previous model, if any",
                len(short),
                self.min_observations,
            )
        if self.output_path:
            self._export(models, sel, inputs_sha)
        if self.plot:
            self._plot(models)
        ratios = np.array([m.evaluate(np.array([0.5 * (m.mjd_min + m.mjd_max)]))[0] for m in models])
        log.info(
            "%s: %s models for %d element(s); median factor %.4f",
            self.canonical_source,
            self.model_type,
            len(models),
            float(np.median(ratios)),
        )
        result.done = len(models)
        result.skipped = len(short)
        return result

    # ------------------------------------------------------------------------------------------
    def _inputs_sha256(self, sel: SelectedRows) -> str:
        """Hash of the parameters and of every selected calibration_flux row."""
        return provenance.sha256_of(
            {
                "parameters": self.parameters,
                "rows": [
                    sel.obsid.tolist(),
                    sel.element.tolist(),
                    sel.mjd.tolist(),
                    sel.ratio.tolist(),
                    sel.ratio_error.tolist(),
                ],
            }
        )

    def _export_is_current(self, inputs_sha: str) -> bool:
        """Whether ``output_path`` was written from exactly these inputs (a rerun has nothing to do)."""
        if not self.output_path:
            return False
        try:
            with open(str(self.output_path), encoding="utf-8") as fh:
                return json.load(fh).get("inputs_sha256") == inputs_sha
        except (OSError, ValueError):
            return False

    def _export(self, models: list[ElementModel], sel: SelectedRows, inputs_sha: str = "") -> Path:
        """Write the fitted table as JSON, atomically (temporary name, then ``os.replace``)."""
        path = Path(str(self.output_path))
        path.parent.mkdir(parents=True, exist_ok=True)
        elements = []
        for m in models:
            row = m.row(self.canonical_source)
            row.pop("source")
            row["poly_coeff_errors"] = list(m.poly_coeff_errors) if m.model_type != "nearest" else None
            elements.append(row)
        doc = {
            "source": self.canonical_source,
            "model_type": self.model_type,
            "mjd_ref": self.mjd_ref,
            "created_utc": provenance.utc_now_iso(),
            "comap_reduce_version": provenance.code_version(),
            "parameters": self.parameters,
            "n_rows_read": sel.n_read,
            "n_rows_used": int(sum(m.n_observations for m in models)),
            "inputs_sha256": inputs_sha,
            "elements": elements,
        }
        jobs.remove_orphaned_partials(path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(_json_safe(doc), fh, indent=1, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())
        faults.checkpoint("calibration.write")
        os.replace(tmp, path)
        faults.checkpoint("calibration.written")
        log.info("wrote %s (%d elements)", path, len(elements))
        return path

    def _plot(self, models: list[ElementModel]) -> None:
        """One PNG per (feed, band): measured/model against MJD for each channel, with the model."""
        from utils.plotting import new_figure, save_figure

        by_fb: dict[tuple[int, int], list[ElementModel]] = {}
        for m in models:
            by_fb.setdefault((m.feed, m.band), []).append(m)
        for (feed, band), group in sorted(by_fb.items()):
            fig, ax = new_figure()
            for m in sorted(group, key=lambda g: g.channel):
                u = m.used
                points = ax.errorbar(
                    u["mjd"], u["ratio"], yerr=u["ratio_error"], fmt="o", ms=3, label=f"channel {m.channel}"
                )
                grid = (
                    np.linspace(m.mjd_min, m.mjd_max, 200) if m.mjd_max > m.mjd_min else np.array([m.mjd_min])
                )
                ax.plot(grid, m.evaluate(grid), "-", color=points[0].get_color())
            ax.set_xlabel("MJD")
            ax.set_ylabel(f"measured / model flux ({self.canonical_source})")
            ax.set_title(f"feed {feed} band {band}: {self.model_type} calibration model")
            ax.legend(fontsize=8)
            save_figure(
                fig,
                os.path.join(
                    self.plot_dir, f"calibration_{self.canonical_source}_feed{feed:02d}_band{band}.png"
                ),
            )


def _json_safe(obj: Any) -> Any:
    """JSON-ready copy: NaN/inf as null, numpy scalars as Python values, tuples as lists."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
