"""CalibratorFitting: fit a Gaussian beam to every calibrator scan of every feed, band and bin
(docs/level2.md#calibratorfitting)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from modules.ProcessLevel2.CalibratorFitting._helpers import (
    inverse_variance_mean,
    masked_mean,
    masked_std,
    off_source_noise_k,
    raster_az_corrected_radec,
    source_track,
)
from utils import level2 as l2layout
from utils.calibrators import (
    BACKGROUND_MODELS,
    FWHM_TO_SIGMA,
    beam_fwhm_arcmin,
    canonical_name,
    fit_gaussian_source,
    flux_jy,
    gaussian_source_model,
    tangent_plane_offsets_deg,
    tangent_plane_to_icrs_deg,
)
from utils.coordinates import icrs_to_azel
from utils.errors import BadCOMAPFile
from utils.layout import DatasetPath

CALIBRATOR_GROUP = "Calibrator"
AZEL_STEP_DEG = 1.0e-3
"""Finite-difference step (deg) used to propagate the centre covariance to az/el offsets."""

# Per-scan quantities (F, B, K, S) and their units; "_error" entries are 1σ.
PER_SCAN_FIELDS: dict[str, str] = {
    "amplitude": "K",
    "amplitude_error": "K",
    "x_offset": "deg",
    "x_offset_error": "deg",
    "y_offset": "deg",
    "y_offset_error": "deg",
    "az_offset": "deg",
    "az_offset_error": "deg",
    "el_offset": "deg",
    "el_offset_error": "deg",
    "sigma_x": "deg",
    "sigma_x_error": "deg",
    "sigma_y": "deg",
    "sigma_y_error": "deg",
    "position_angle": "deg",
    "chi2_reduced": "",
    "flux": "Jy",
    "flux_error": "Jy",
    "noise_k": "K",
}
# Quantities combined over scans by inverse-variance weighting with their own errors (step 9).
WEIGHTED_FIELDS: tuple[str, ...] = (
    "amplitude",
    "x_offset",
    "y_offset",
    "az_offset",
    "el_offset",
    "sigma_x",
    "sigma_y",
    "flux",
)
COMBINED_UNITS: dict[str, str] = {
    **{k: v for k, v in PER_SCAN_FIELDS.items() if k != "noise_k"},
    "flux_scatter": "Jy",
    "model_flux": "Jy",
    "frequency_ghz": "GHz",
}


@dataclass
class _Fits:
    """Per-scan results of one observation, arrays (F, B, K, S)."""

    shape: tuple[int, int, int, int]
    values: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    fit_ok: NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=bool))
    n_samples: NDArray[np.int32] = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    centre_cov: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        self.values = {k: np.full(self.shape, np.nan) for k in PER_SCAN_FIELDS}
        self.fit_ok = np.zeros(self.shape, dtype=bool)
        self.n_samples = np.zeros(self.shape, dtype=np.int32)
        self.centre_cov = np.full((*self.shape, 2, 2), np.nan)


class CalibratorFitting(BaseCOMAPModule):
    """Fit calibrator sources (Tau A, Cas A, Cyg A, Jupiter) in the binned level-2 TOD
    (docs/level2.md#calibratorfitting).

    Runs only for observations whose ``source_group`` is ``'Calibrator'``; for any other
    observation it is done trivially and writes nothing. For every scan, science feed, band and
    binned channel it fits an elliptical Gaussian plus background to the samples within
    ``fit_radius_deg`` of the source (tangent-plane offsets from ``pixel_ra``/``pixel_dec``; samples whose
    sample flags exclude them, docs/level2.md#sample-flags, are left out),
    converts it to a flux density, rejects fits that did not converge or hit a bound (NaN and
    ``fit_ok = False``, never zeros), converts the fitted centre to az/el pointing offsets, and
    combines the scans with inverse-variance weights. Results go to
    ``level2/<calibrator_fit_group_name>`` (combined ``(F, B, K)`` and ``per_scan`` ``(F, B, K, S)``)
    and to the ``calibration_flux`` table (one row per successful (feed, band, bin), keyed by feed
    number; ``mjd`` is the fit's mid-time, the scan mid-times weighted like the flux).
    ``ctx.summary`` gets medians over the successful fits only: ``calibrator_flux``,
    ``calibrator_flux_error``, ``calibrator_chi2`` and ``pointing_offset_az/el/ra/dec`` (deg; ``ra``
    and ``dec`` are the tangent-plane offsets x = Δα cos δ towards east and y towards north).

    Fitting happens one feed × scan block at a time (memory bounded by the longest scan of one
    feed). Amplitudes are in the unit of ``tod_dataset`` (vane K), so ``flux`` is the vane-K flux
    density whose ratio to ``model_flux`` is the calibration factor (docs/level2.md#calibrationmodel).

    Parameters
    ----------
    calibrator_fit_group_name : str
        Output group under ``level2/``.
    tod_dataset : str
        Level-2 dataset fitted, ``(F, B, K, N)`` in vane K.
    fit_radius_deg : float
        Samples within this distance of the source are fitted, deg.
    beam_fwhm_arcmin_30ghz : float
        Beam FWHM at 30 GHz (arcmin), scaled as 30 GHz/ν with ν = ``level2/central_freqs``.
    min_width_factor, max_width_factor : float
        Bounds [min_width_factor, max_width_factor] of the fitted Gaussian widths σx, σy in units of
        the beam σ_b at the channel's frequency (dimensionless).
    min_samples : int
        Minimum number of samples inside the fit radius.
    background : {'plane', 'constant'}
        Background model: ``c0 + c1 x + c2 y`` or ``c0``.
    fit_rotation : bool
        Fit the Gaussian position angle.
    raster_az_correction_arcsec : float
        Legacy azimuth fix (arcsec) added to samples with positive azimuth rate, applied only to
        ``obsid < raster_correction_max_obsid``.
    raster_correction_max_obsid : int
        First obsid that does not need the legacy fix.
    plot : bool
        Write data / model / residual quicklooks in the tangent plane, one PNG per feed and scan.
    plot_dir : str
        Directory of the quicklooks.
    overwrite : bool
        Refit even if the output group is complete.
    """

    reads = (
        *l2layout.SKY_SAMPLES,
        l2layout.SAMPLE_FLAGS,
        l2layout.CENTRAL_FREQS,
        l2layout.BINNED_FILTERED_DATA,
    )
    writes = (l2layout.CALIBRATOR_FIT,)

    def __init__(
        self,
        calibrator_fit_group_name: str = "calibrator_fit",
        tod_dataset: str = str(l2layout.BINNED_FILTERED_DATA),
        fit_radius_deg: Annotated[float, Range(gt=0)] = 0.25,
        beam_fwhm_arcmin_30ghz: Annotated[float, Range(gt=0)] = 4.5,
        min_width_factor: float = 0.3,
        max_width_factor: float = 3.0,
        min_samples: Annotated[int, Range(ge=10)] = 50,
        background: Literal[BACKGROUND_MODELS] = "plane",
        fit_rotation: bool = False,
        raster_az_correction_arcsec: float = 100.0,
        raster_correction_max_obsid: int = 28852,
        plot: bool = False,
        plot_dir: str = "outputs/CalibratorFitting",
        overwrite: bool = False,
    ) -> None:
        self.calibrator_fit_group_name = calibrator_fit_group_name
        self.tod_dataset = tod_dataset
        self.fit_radius_deg = float(fit_radius_deg)
        self.beam_fwhm_arcmin_30ghz = float(beam_fwhm_arcmin_30ghz)
        self.min_width_factor = float(min_width_factor)
        self.max_width_factor = float(max_width_factor)
        self.min_samples = int(min_samples)
        self.background = background
        self.fit_rotation = bool(fit_rotation)
        self.raster_az_correction_arcsec = float(raster_az_correction_arcsec)
        self.raster_correction_max_obsid = int(raster_correction_max_obsid)
        self.plot = bool(plot)
        self.plot_dir = plot_dir
        self.overwrite = bool(overwrite)

    # ------------------------------------------------------------------------------------------
    @property
    def group_path(self) -> str:
        """Level-2 path of the output group, ``level2/<calibrator_fit_group_name>``."""
        return l2layout.LEVEL2_GROUP.child(getattr(self, "calibrator_fit_group_name", "calibrator_fit"))

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The fit goes to ``level2/<calibrator_fit_group_name>``; ``tod_dataset`` is the TOD fitted."""
        if entry == l2layout.CALIBRATOR_FIT:
            return (l2layout.LEVEL2_GROUP.child(params["calibrator_fit_group_name"]),)
        if entry == l2layout.BINNED_FILTERED_DATA:
            return (str(params["tod_dataset"]),)
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        name = str(params["calibrator_fit_group_name"])
        if not name or "/" in name:
            problems.append(f"calibrator_fit_group_name must be a plain group name, got {name!r}")
        lo, hi = float(params["min_width_factor"]), float(params["max_width_factor"])
        if not 0 < lo < 1 < hi:
            problems.append(f"need 0 < min_width_factor < 1 < max_width_factor, got {lo} and {hi}")
        return problems

    @staticmethod
    def applies_to(file_info: Any) -> bool:
        """True if the observation is a calibrator observation (``source_group == 'Calibrator'``)."""
        return str(getattr(file_info, "source_group", "") or "").lower() == CALIBRATOR_GROUP.lower()

    def already_processed(self, file_info: Any, overwrite: bool = False) -> bool:
        """True for non-calibrator observations; otherwise the default done-check on the group."""
        if not self.applies_to(file_info):
            return True
        return super().already_processed(file_info, overwrite=overwrite)

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        """Fit the calibrator of one observation; see the class docstring."""
        if not self.applies_to(file_info):
            self.logger.debug(
                "source group %r is not a calibrator group; nothing to fit", file_info.source_group
            )
            return
        ctx = self.observation_context(file_info)
        source = str(file_info.source or "")
        try:
            canon = canonical_name(source)
        except KeyError:
            self.logger.warning(
                "calibrator %r is not supported (TauA, CasA, CygA, Jupiter); writing an empty %s",
                source,
                self.group_path,
            )
            self._write_skipped(file_info.level2_path, source, f"unsupported calibrator {source!r}")
            ctx.db.replace_calibration_flux(ctx.obsid, [])
            return

        with RetryH5PY(file_info.level2_path, "a") as l2:
            inputs = self._read_inputs(l2)
            inputs["obsid"] = int(ctx.obsid)
            feeds, scans, mjd = inputs["feeds"], inputs["scans"], inputs["mjd"]
            n_feed, n_band, n_bin = inputs["central_freqs"].shape
            n_scan = len(scans)
            mid = np.array([0.5 * (mjd[a] + mjd[b - 1]) for a, b in scans])
            track = source_track(canon, float(mjd[scans[:, 0].min()]), float(mjd[scans[:, 1].max() - 1]))
            fits = _Fits((n_feed, n_band, n_bin, n_scan))
            for ifeed in range(n_feed):
                for s, (start, stop) in enumerate(scans):
                    kept = self._fit_block(l2, inputs, track, fits, ifeed, s, int(start), int(stop))
                    if self.plot:  # one feed × scan at a time: memory stays bounded
                        self._plot(ctx.obsid, int(feeds[ifeed]), s, kept)
            self._azel_offsets(fits, track, mid)
            weights = np.asarray(scans[:, 1] - scans[:, 0], dtype=np.float64)
            mjd_mid = float(np.sum(weights * mid) / np.sum(weights))
            combined = self._combine(fits, inputs["central_freqs"], mid, mjd_mid, canon)
            ra0, dec0 = track(np.array([mjd_mid]))
            self._write(l2, fits, combined, canon, float(ra0[0]), float(dec0[0]), mjd_mid, mid)

        self._record(ctx, feeds, combined, canon)

    # ------------------------------------------------------------------------------------------
    def _read_inputs(self, l2: Any) -> dict[str, Any]:
        def need(path: str, hint: str) -> Any:
            if path not in l2:
                raise BadCOMAPFile(f"level-2 file has no {path} ({hint})")
            return l2[path]

        feeds = np.asarray(need(l2layout.FEEDS, "run CreateLevel2File first")[...], dtype=int)
        mjd = np.asarray(need(l2layout.MJD, "run CreateLevel2File first")[...], dtype=np.float64)
        scans = np.asarray(need(l2layout.SCAN_EDGES, "run FindScans first")[...], dtype=np.int64).reshape(
            -1, 2
        )
        if len(scans) == 0:
            raise BadCOMAPFile("calibrator observation has no scans")
        tod = need(self.tod_dataset, "run GainFilterAndBin first")
        cf = np.asarray(need(l2layout.CENTRAL_FREQS, "run GainFilterAndBin first")[...], dtype=np.float64)
        pp = l2layout.PIXEL_POINTING
        ra = need(l2layout.PIXEL_RA, "run CreateLevel2File first")
        dec = need(l2layout.PIXEL_DEC, "run CreateLevel2File first")
        n_feed, n_tod = len(feeds), len(mjd)
        if tod.ndim != 4 or tod.shape[0] != n_feed or tod.shape[3] != n_tod:
            raise BadCOMAPFile(
                f"{self.tod_dataset} has shape {tod.shape} but {l2layout.FEEDS} has {n_feed} entries "
                f"and {l2layout.MJD} {n_tod} samples"
            )
        if cf.shape != tod.shape[:3]:
            raise BadCOMAPFile(
                f"{l2layout.CENTRAL_FREQS} has shape {cf.shape} but {self.tod_dataset} has {tod.shape}"
            )
        if ra.shape != (n_feed, n_tod) or dec.shape != (n_feed, n_tod):
            raise BadCOMAPFile(f"{pp}/pixel_ra has shape {ra.shape}, expected {(n_feed, n_tod)}")
        if np.any(scans[:, 0] < 0) or np.any(scans[:, 1] > n_tod) or np.any(scans[:, 1] <= scans[:, 0]):
            raise BadCOMAPFile(f"{l2layout.SCAN_EDGES} has invalid [start, stop) entries for {n_tod} samples")
        return {
            "feeds": feeds,
            "mjd": mjd,
            "scans": scans,
            "tod": tod,
            "central_freqs": cf,
            "ra": ra,
            "dec": dec,
        }

    def _legacy_correction(self, obsid: int) -> bool:
        return obsid < self.raster_correction_max_obsid and self.raster_az_correction_arcsec != 0.0

    def _fit_block(
        self,
        l2: Any,
        inputs: dict[str, Any],
        track: Any,
        fits: _Fits,
        ifeed: int,
        s: int,
        start: int,
        stop: int,
    ) -> list:
        """Fit every band and bin of one feed × scan; return what the quicklook needs."""
        sl = slice(start, stop)
        mjd = inputs["mjd"][sl]
        if self._legacy_correction(inputs["obsid"]):
            ra, dec = raster_az_corrected_radec(
                l2[l2layout.PIXEL_AZ][ifeed, sl],
                l2[l2layout.PIXEL_EL][ifeed, sl],
                mjd,
                self.raster_az_correction_arcsec,
            )
        else:
            ra = np.asarray(inputs["ra"][ifeed, sl], dtype=np.float64)
            dec = np.asarray(inputs["dec"][ifeed, sl], dtype=np.float64)
        ra0, dec0 = track(mjd)
        x, y = tangent_plane_offsets_deg(ra, dec, ra0, dec0)
        r = np.hypot(x, y)
        tod = np.asarray(inputs["tod"][ifeed, :, :, sl], dtype=np.float32)  # (B, K, n): one feed × scan
        tod[..., l2layout.excluded_samples(l2layout.read_sample_flags(l2, ifeed, sl))] = np.nan
        cf = inputs["central_freqs"][ifeed]
        kept: list = []
        v = fits.values
        for b in range(tod.shape[0]):
            for j in range(tod.shape[1]):
                nu = float(cf[b, j])
                if not (np.isfinite(nu) and nu > 0):
                    continue
                sig_b = float(beam_fwhm_arcmin(nu, self.beam_fwhm_arcmin_30ghz)) / 60.0 * FWHM_TO_SIGMA
                d = tod[b, j]
                noise = off_source_noise_k(d, r, sig_b, self.fit_radius_deg)
                fit = fit_gaussian_source(
                    x,
                    y,
                    d,
                    noise,
                    sig_b,
                    fit_radius_deg=self.fit_radius_deg,
                    min_width_factor=self.min_width_factor,
                    max_width_factor=self.max_width_factor,
                    min_samples=self.min_samples,
                    background=self.background,
                    fit_rotation=self.fit_rotation,
                )
                idx = (ifeed, b, j, s)
                v["noise_k"][idx] = noise
                fits.n_samples[idx] = fit.n_samples
                if self.plot:
                    kept.append((b, j, fit))
                flux, flux_err = fit.flux_jy(nu)
                if not (fit.fit_ok and np.isfinite(flux) and np.isfinite(flux_err)):
                    self.logger.debug(
                        "feed index %d band %d bin %d scan %d: fit rejected: %s", ifeed, b, j, s, fit.reason
                    )
                    continue
                v["amplitude"][idx], v["amplitude_error"][idx] = fit.amplitude_k, fit.amplitude_error_k
                v["x_offset"][idx], v["x_offset_error"][idx] = fit.x0_deg, fit.x0_error_deg
                v["y_offset"][idx], v["y_offset_error"][idx] = fit.y0_deg, fit.y0_error_deg
                v["sigma_x"][idx], v["sigma_x_error"][idx] = fit.sigma_x_deg, fit.sigma_x_error_deg
                v["sigma_y"][idx], v["sigma_y_error"][idx] = fit.sigma_y_deg, fit.sigma_y_error_deg
                v["position_angle"][idx] = fit.position_angle_deg
                v["chi2_reduced"][idx] = fit.chi2_reduced
                v["flux"][idx], v["flux_error"][idx] = flux, flux_err
                fits.centre_cov[idx] = fit.covariance[1:3, 1:3]
                fits.fit_ok[idx] = True
        if self.plot:
            kept = [(b, j, fit, x, y, tod[b, j]) for b, j, fit in kept]
        return kept

    def _azel_offsets(self, fits: _Fits, track: Any, mid: NDArray) -> None:
        """Pointing offsets in az/el at each scan's mid-time (docs/level2.md#calibratorfitting step 8), one
        batched transform."""
        idx = np.nonzero(fits.fit_ok)
        m = idx[0].size
        if m == 0:
            return
        x0 = fits.values["x_offset"][idx]
        y0 = fits.values["y_offset"][idx]
        t = mid[idx[3]]
        ra0, dec0 = track(t)
        h = AZEL_STEP_DEG
        xs = np.concatenate([x0, x0 + h, x0, np.zeros(m)])
        ys = np.concatenate([y0, y0, y0 + h, np.zeros(m)])
        ra, dec = tangent_plane_to_icrs_deg(xs, ys, np.tile(ra0, 4), np.tile(dec0, 4))
        az, el = icrs_to_azel(ra, dec, np.tile(t, 4))
        az = az.reshape(4, m)
        el = el.reshape(4, m)
        az_src, el_src = az[3], el[3]
        cos_el = np.cos(np.radians(el_src))
        dxel = (((az[:3] - az_src) + 180.0) % 360.0 - 180.0) * cos_el  # (3, m)
        delv = el[:3] - el_src
        jac = np.empty((m, 2, 2))
        jac[:, 0, 0] = (dxel[1] - dxel[0]) / h
        jac[:, 0, 1] = (dxel[2] - dxel[0]) / h
        jac[:, 1, 0] = (delv[1] - delv[0]) / h
        jac[:, 1, 1] = (delv[2] - delv[0]) / h
        cov = jac @ fits.centre_cov[idx] @ np.swapaxes(jac, 1, 2)
        fits.values["az_offset"][idx] = dxel[0]
        fits.values["el_offset"][idx] = delv[0]
        fits.values["az_offset_error"][idx] = np.sqrt(cov[:, 0, 0])
        fits.values["el_offset_error"][idx] = np.sqrt(cov[:, 1, 1])

    def _combine(
        self, fits: _Fits, central_freqs: NDArray, mid: NDArray, mjd_mid: float, source: str
    ) -> dict[str, NDArray]:
        """Inverse-variance combination over scans with ``fit_ok`` (docs/level2.md#calibratorfitting step
        9)."""
        v, ok = fits.values, fits.fit_ok
        out: dict[str, NDArray] = {}
        for name in WEIGHTED_FIELDS:
            out[name], out[f"{name}_error"] = inverse_variance_mean(v[name], v[f"{name}_error"], ok)
        out["position_angle"] = masked_mean(v["position_angle"], ok)
        out["chi2_reduced"] = masked_mean(v["chi2_reduced"], ok)
        out["flux_scatter"] = masked_std(v["flux"], ok)
        n_used = ok.sum(axis=-1).astype(np.int32)
        fit_ok = n_used > 0
        # The fit's mid-time: the scan mid-times weighted as the flux was.
        w_mjd, _ = inverse_variance_mean(np.broadcast_to(mid, ok.shape), v["flux_error"], ok)
        mjd = np.where(fit_ok, w_mjd, mjd_mid)
        for name in out:
            out[name] = np.where(fit_ok, out[name], np.nan)
        freq = np.where(np.isfinite(central_freqs) & (central_freqs > 0), central_freqs, np.nan)
        out["frequency_ghz"] = freq
        model = np.full(freq.shape, np.nan)
        good = np.isfinite(freq)
        if good.any():
            model[good] = flux_jy(source, freq[good], mjd[good])
        out["model_flux"] = model
        out["fit_ok"] = fit_ok
        out["n_scans_used"] = n_used
        out["mjd"] = mjd
        return out

    # ------------------------------------------------------------------------------------------
    def _open_group(self, l2: Any) -> Any:
        path = self.group_path
        if path in l2:
            provenance.mark_incomplete(l2[path])
            del l2[path]
        return l2.require_group(l2layout.LEVEL2_GROUP).create_group(path.split("/", 1)[1])

    def _write_skipped(self, level2_path: str, source: str, reason: str) -> None:
        with RetryH5PY(level2_path, "a") as l2:
            grp = self._open_group(l2)
            grp.attrs["source"] = source
            grp.attrs["skipped_reason"] = reason
            self.mark_complete(grp)

    def _write(
        self,
        l2: Any,
        fits: _Fits,
        combined: dict[str, NDArray],
        source: str,
        ra_deg: float,
        dec_deg: float,
        mjd_mid: float,
        mid: NDArray,
    ) -> None:
        grp = self._open_group(l2)
        grp.attrs["status"] = "incomplete"
        per = grp.create_group("per_scan")

        def put(g: Any, name: str, data: NDArray, unit: str | None, dtype: Any = np.float32) -> None:
            ds = g.create_dataset(name, data=np.asarray(data).astype(dtype), track_times=False)
            if unit is not None:
                ds.attrs["unit"] = unit
            self.mark_complete(ds)

        for name, unit in PER_SCAN_FIELDS.items():
            put(per, name, fits.values[name], unit)
        put(per, "fit_ok", fits.fit_ok, None, bool)
        put(per, "n_samples", fits.n_samples, "samples", np.int32)
        put(per, "mjd", mid, "MJD", np.float64)
        self.mark_complete(per)
        for name, unit in COMBINED_UNITS.items():
            put(grp, name, combined[name], unit)
        put(grp, "fit_ok", combined["fit_ok"], None, bool)
        put(grp, "n_scans_used", combined["n_scans_used"], None, np.int32)
        grp.attrs["source"] = source
        grp.attrs["ra_deg"] = ra_deg
        grp.attrs["dec_deg"] = dec_deg
        grp.attrs["mjd_mid"] = mjd_mid
        grp.attrs["tod_dataset"] = self.tod_dataset
        grp.attrs["amplitude_unit"] = "vane K (data unit of tod_dataset)"
        self.mark_complete(grp)

    def _record(self, ctx: Any, feeds: NDArray, combined: dict[str, NDArray], source: str) -> None:
        """``calibration_flux`` rows and the summary medians over successful fits
        (docs/level2.md#calibratorfitting "DB")."""
        ok = combined["fit_ok"]
        rows = []
        for ifeed, b, j in zip(*np.nonzero(ok), strict=True):
            k = (ifeed, b, j)
            rows.append(
                {
                    "feed": int(feeds[ifeed]),
                    "band": int(b),
                    "channel": int(j),
                    "mjd": float(combined["mjd"][k]),
                    "source": source,
                    "frequency_ghz": float(combined["frequency_ghz"][k]),
                    "measured_flux": float(combined["flux"][k]),
                    "flux_error": float(combined["flux_error"][k]),
                    "amplitude": float(combined["amplitude"][k]),
                    "amplitude_error": float(combined["amplitude_error"][k]),
                    "chi2": float(combined["chi2_reduced"][k]),
                    "x_offset_deg": float(combined["x_offset"][k]),
                    "y_offset_deg": float(combined["y_offset"][k]),
                }
            )
        ctx.db.replace_calibration_flux(ctx.obsid, rows)
        columns = {
            "calibrator_flux": "flux",
            "calibrator_flux_error": "flux_error",
            "calibrator_chi2": "chi2_reduced",
            "pointing_offset_az": "az_offset",
            "pointing_offset_el": "el_offset",
            "pointing_offset_ra": "x_offset",
            "pointing_offset_dec": "y_offset",
        }
        for col, name in columns.items():
            values = combined[name][ok]
            values = values[np.isfinite(values)]
            ctx.summary[col] = float(np.median(values)) if values.size else None
        n_ok, n_all = int(ok.sum()), int(np.isfinite(combined["frequency_ghz"]).sum())
        if n_ok == 0:
            self.logger.warning(
                "no calibrator fit succeeded for %s (%d feed/band/bin elements)", source, n_all
            )
        else:
            self.logger.info(
                "%s: %d of %d feed/band/bin fits succeeded; median flux %.4g Jy",
                source,
                n_ok,
                n_all,
                ctx.summary["calibrator_flux"],
            )

    # ------------------------------------------------------------------------------------------
    def _plot(self, obsid: int, feed: int, s: int, kept: list) -> None:
        """Data, model and residual in the tangent plane for every band and bin of one feed × scan."""
        from utils.plotting import new_figure, save_figure

        if not kept:
            return
        fig, axes = new_figure(len(kept), 3, figsize=(11.0, 3.0 * len(kept)), squeeze=False)
        for row, (b, j, fit, x, y, d) in enumerate(kept):
            with np.errstate(invalid="ignore"):
                sel = np.isfinite(d) & (np.hypot(x, y) < self.fit_radius_deg)
            xs, ys, ds = x[sel] * 60.0, y[sel] * 60.0, d[sel]
            if fit.fit_ok:
                model = (
                    gaussian_source_model(
                        fit.params,
                        x[sel],
                        y[sel],
                        background=self.background,
                        fit_rotation=self.fit_rotation,
                    )
                    + fit.median_k
                )
            else:
                model = np.full(ds.shape, np.nan)
            label = f"band {b} bin {j}" + ("" if fit.fit_ok else f" (rejected: {fit.reason})")
            for col, (values, title) in enumerate(((ds, "data"), (model, "model"), (ds - model, "residual"))):
                ax = axes[row, col]
                if values.size and np.isfinite(values).any():
                    im = ax.scatter(xs, ys, c=values, s=2, cmap="viridis")
                    fig.colorbar(im, ax=ax, label="K")
                ax.set_title(f"{title}: {label}", fontsize=8)
                ax.set_xlabel("x offset [arcmin]")
                ax.set_ylabel("y offset [arcmin]")
                ax.set_aspect("equal")
        fig.suptitle(f"obsid {obsid} feed {feed} scan {s}: calibrator fit")
        save_figure(
            fig, os.path.join(self.plot_dir, f"calibrator_fit_{obsid:07d}_feed{feed:02d}_scan{s:02d}.png")
        )
