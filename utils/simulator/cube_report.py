"""RRL cubes against the simulator's truth (docs/mapmaking.md#truth-tests): used by the report and the tests.

The truth is rebuilt from ``/truth/sky/components`` of a level-1 file: each HII region's line peak
at a position is ``R · T_i (ν/30)^β · θ²/(θ² + FWHM(ν)²) · exp(−4 ln 2 · r²/(θ² + FWHM(ν)²))``
(docs/simulator.md#galactic-field), with a Gaussian profile of FWHM ``Δv_i`` at LSRK velocity ``v_i``. A
stacked cube is compared with the weighted mean of its lines' truths, weighted by the cube's ``LINE Wk``
cards.

Zeroth moments are compared absolutely, with no free zero level (docs/mapmaking.md#truth-tests):

* ``m0_on/truth``: the mean zeroth moment within one beam FWHM of the region, over its truth;
* ``scale_abs``: the weighted fit ``M0(p) = a · T0(p)`` over every unmasked pixel, and ``m0_chi2``,
  the mean of ``(M0 − T0)²/σ²`` over them, with σ from :func:`utils.rrl.moment0_sigma_kkms` (the
  RMS cube and the channel correlations of the header).

``scale_a``, a fit ``M0(p) = a · T0(p) + c`` with a free zero level ``c``, is kept as an extra
column: the difference between ``a`` and ``scale_abs`` shows how much of the line the cube's
channel levels (docs/mapmaking.md#channel-levels) have taken out.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from utils.rrl import SPEED_OF_LIGHT_KMS, moment0_sigma_kkms

FWHM_TO_SIGMA = 1.0 / math.sqrt(8.0 * math.log(2.0))
GAUSS_AREA = math.sqrt(math.pi / (4.0 * math.log(2.0)))  # ∫ Gaussian of unit peak and unit FWHM


@dataclass(frozen=True)
class HIIRegionTruth:
    """One HII region of the simulated Galactic field (absolute position, deg)."""

    l_deg: float
    b_deg: float
    theta_arcmin: float
    t_peak_30ghz_k: float
    beta: float
    line_ratio: float
    v_lsr_kms: float
    line_fwhm_kms: float

    def line_peak_k(
        self, freq_ghz: float, lon_deg: NDArray, lat_deg: NDArray, beam_fwhm_30_arcmin: float
    ) -> NDArray[np.float64]:
        """Beam-convolved line peak (K) at the given positions for a line at ``freq_ghz``."""
        from utils.coordinates import angular_separation_deg

        fwhm2 = (beam_fwhm_30_arcmin * 30.0 / freq_ghz) ** 2
        theta2 = self.theta_arcmin**2
        peak = (
            self.line_ratio * self.t_peak_30ghz_k * (freq_ghz / 30.0) ** self.beta * theta2 / (theta2 + fwhm2)
        )
        r_arcmin = angular_separation_deg(lon_deg, lat_deg, self.l_deg, self.b_deg) * 60.0
        return peak * np.exp(-4.0 * math.log(2.0) * r_arcmin**2 / (theta2 + fwhm2))


def read_hii_truth(level1_path: str | os.PathLike) -> tuple[list[HIIRegionTruth], float]:
    """HII regions and the beam FWHM at 30 GHz (arcmin) from a simulated file's ``/truth/sky``."""
    with h5py.File(level1_path, "r", locking=False) as f:
        g = f["truth/sky"]
        comps = g["components"][...]
        l0, b0 = float(g.attrs["l0_deg"]), float(g.attrs["b0_deg"])
        beam = float(g.attrs.get("beam_fwhm_arcmin_30ghz", 4.5))
    regions = [
        HIIRegionTruth(
            (l0 + float(c["dl_deg"])) % 360.0,
            b0 + float(c["db_deg"]),
            float(c["fwhm_arcmin"]),
            float(c["t_peak_30ghz_k"]),
            float(c["beta"]),
            float(c["line_ratio"]),
            float(c["v_lsr_kms"]),
            float(c["line_fwhm_kms"]),
        )
        for c in comps
        if bytes(c["kind"]).rstrip(b"\0") == b"hii"
    ]
    return regions, beam


@dataclass
class CubeData:
    """A cube read back from FITS: values on (n_v, ny, nx), pixel centres (Galactic, deg) and axes."""

    line: NDArray[np.float64]
    rms: NDArray[np.float64]
    hits: NDArray[np.int64]
    mask: NDArray[np.uint8]
    velocities_kms: NDArray[np.float64]
    lon_deg: NDArray[np.float64]
    lat_deg: NDArray[np.float64]
    line_freqs_ghz: list[float]
    line_weights: list[float]
    mask_kms: tuple[float, float]
    header: dict
    correlation: tuple[float, float] = (0.0, 0.0)  # (LINE CORR1, LINE CORRB)


def read_cube(path: str | os.PathLike) -> CubeData:
    """Read an RRL cube and its axes through astropy.wcs."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from utils.coordinates import icrs_to_galactic

    with fits.open(path, memmap=False) as hdul:
        h = hdul[0].header
        line = hdul[0].data.astype(np.float64)
        rms = hdul["RMS"].data.astype(np.float64)
        hits = hdul["HITS"].data.astype(np.int64)
        mask = hdul["MASK"].data.astype(np.uint8)
        wcs = WCS(h)
    n_v, ny, nx = line.shape
    spectral = wcs.spectral.pixel_to_world_values(np.arange(n_v, dtype=np.float64))
    if str(h["CTYPE3"]).startswith("VRAD"):
        vel = np.asarray(spectral) / 1e3
    else:
        vel = SPEED_OF_LIGHT_KMS * (1.0 - np.asarray(spectral) / float(h["RESTFRQ"]))
    yy, xx = np.mgrid[0:ny, 0:nx]
    lon, lat = wcs.celestial.pixel_to_world_values(xx, yy)
    if str(h["CTYPE1"]).startswith("RA"):
        lon, lat = icrs_to_galactic(lon, lat)
    freqs, weights = [], []
    k = 1
    while f"RESTF{k}" in h or f"RFREQ{k}" in h:  # RFREQk in cubes written before RESTFk
        freqs.append(float(h.get(f"RESTF{k}", h.get(f"RFREQ{k}"))) / 1e9)
        weights.append(float(h.get(f"LINE W{k}", 1.0)))
        k += 1
    return CubeData(
        line,
        rms,
        hits,
        mask,
        np.asarray(vel, dtype=np.float64),
        np.asarray(lon, dtype=np.float64) % 360.0,
        np.asarray(lat, dtype=np.float64),
        freqs,
        weights,
        (float(h["LINE MASKLO"]), float(h["LINE MASKHI"])),
        dict(h),
        (float(h.get("LINE CORR1", 0.0)), float(h.get("LINE CORRB", 0.0))),
    )


def _gauss_fraction(lo: float, hi: float, v: float, fwhm: float) -> float:
    s = fwhm * FWHM_TO_SIGMA * math.sqrt(2.0)
    return 0.5 * (math.erf((hi - v) / s) - math.erf((lo - v) / s))


def cube_validation(
    cube_path: str | os.PathLike,
    truth_level1_path: str | os.PathLike,
    *,
    region: int = 0,
    window_kms: tuple[float, float] | None = None,
    on_radius_fwhm: float = 1.0,
) -> dict[str, object]:
    """Moments of a cube against the truth (docs/mapmaking.md#truth-tests); σ's are propagated from the RMS
    cube.

    Parameters
    ----------
    region : int
        HII region whose line is measured (0 = region 1).
    window_kms : (lo, hi), optional
        Channels (by centre) of the zeroth moments; default the cube's line mask.
    on_radius_fwhm : float
        ON pixels lie within this many beam FWHM (at the first line) of the region.
    """
    cube = read_cube(cube_path)
    regions, beam30 = read_hii_truth(truth_level1_path)
    v = cube.velocities_kms
    dv = float(np.median(np.abs(np.diff(v)))) if v.size > 1 else float("nan")
    weights = np.asarray(cube.line_weights, dtype=np.float64)
    weights = weights / weights.sum()
    window = cube.mask_kms if window_kms is None else window_kms
    sel = (v >= window[0]) & (v <= window[1])
    # pixels with every channel of the window measured (a masked native channel can empty others)
    good = (cube.mask == 0) & np.isfinite(cube.line[sel]).all(axis=0) & np.isfinite(cube.rms[sel]).all(axis=0)
    lon, lat = cube.lon_deg[good], cube.lat_deg[good]
    if lon.size < 3:
        return {
            "cube": Path(cube_path).name,
            "n_lines": len(cube.line_freqs_ghz),
            "note": "no measured pixels",
        }

    # a stack smoothed to a common beam (BEAMSRC = 'common') has every line at the widest true beam
    common = cube.header.get("BEAMSRC") == "common"
    f_low = min(cube.line_freqs_ghz)

    def amp(reg: HIIRegionTruth) -> NDArray[np.float64]:
        return sum(
            w * reg.line_peak_k(f, lon, lat, beam30 * f / f_low if common else beam30)
            for w, f in zip(weights, cube.line_freqs_ghz)
        )

    edge_lo, edge_hi = float(v[sel].min()) - 0.5 * dv, float(v[sel].max()) + 0.5 * dv
    m0 = cube.line[sel][:, good].sum(axis=0) * dv
    m0_var = moment0_sigma_kkms(cube.rms[:, good].T, v, window, *cube.correlation) ** 2
    truth_m0 = np.zeros(lon.size)
    for reg in regions:
        frac = _gauss_fraction(edge_lo, edge_hi, reg.v_lsr_kms, reg.line_fwhm_kms)
        truth_m0 += amp(reg) * reg.line_fwhm_kms * GAUSS_AREA * frac
    out: dict[str, object] = {
        "cube": Path(cube_path).name,
        "n_lines": len(cube.line_freqs_ghz),
        "dv_kms": dv,
    }
    # absolute: scale through the origin and χ² against the truth
    w = 1.0 / m0_var
    out.update(
        {
            "scale_abs": float(np.sum(w * m0 * truth_m0) / np.sum(w * truth_m0**2)),
            "scale_abs_sigma": float(1.0 / np.sqrt(np.sum(w * truth_m0**2))),
            "m0_chi2": float(np.mean(w * (m0 - truth_m0) ** 2)),
        }
    )
    # scale of the integrated intensity with a free zero level (extra column)
    design = np.stack([truth_m0, np.ones(lon.size)], axis=1)
    normal = design.T @ (w[:, None] * design)
    cov = np.linalg.inv(normal)
    coef = cov @ (design.T @ (w * m0))
    resid = m0 - design @ coef
    out.update(
        {
            "scale_a": float(coef[0]),
            "scale_a_sigma": float(np.sqrt(cov[0, 0])),
            "zero_level_kkms": float(coef[1]),
            "chi2_dof": float(np.sum(w * resid**2) / max(1, lon.size - 2)),
            "n_pixels": int(lon.size),
        }
    )
    # the region's ON pixels: absolute zeroth moment and the line shape
    reg = regions[region]
    from utils.coordinates import angular_separation_deg

    beam = beam30 * 30.0 / cube.line_freqs_ghz[0]
    r = angular_separation_deg(lon, lat, reg.l_deg, reg.b_deg) * 60.0
    on = r <= on_radius_fwhm * beam
    out["n_on"] = int(on.sum())
    if on.sum() == 0:
        return {**out, "note": "region not in the cube"}
    out["m0_on"] = float(m0[on].mean())
    out["m0_on_sigma"] = float(np.sqrt(m0_var[on].sum()) / on.sum())  # pixels taken as independent
    out["m0_on_truth"] = float(truth_m0[on].mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # channels not measured anywhere stay NaN
        spectrum = np.nanmean(cube.line[:, good][:, on], axis=1)
    s_rms = np.sqrt(np.nansum(cube.rms[:, good][:, on] ** 2, axis=1)) / on.sum()
    out["peak_channel_contains_v"] = bool(abs(v[int(np.nanargmax(spectrum))] - reg.v_lsr_kms) <= 0.5 * dv)
    near = (np.abs(v - reg.v_lsr_kms) <= 3.0 * reg.line_fwhm_kms * FWHM_TO_SIGMA + dv) & np.isfinite(spectrum)
    s, vv, e = spectrum[near], v[near], s_rms[near]
    total = float(s.sum())
    m1 = float((vv * s).sum() / total)
    m2 = float(((vv - m1) ** 2 * s).sum() / total)
    # the channel box adds Δv²/12 to the second moment (exact when the output channels are the
    # native ones; linear interpolation between grids adds up to Δv²/4 more)
    fwhm_corr = math.sqrt(max(8.0 * math.log(2.0) * (m2 - dv**2 / 12.0), 0.0))
    m1_sigma = float(np.sqrt((((vv - m1) / total) ** 2 * e**2).sum()))
    m2_sigma = float(np.sqrt(((((vv - m1) ** 2 - m2) / total) ** 2 * e**2).sum()))
    fwhm_sigma = 4.0 * math.log(2.0) * m2_sigma / fwhm_corr if fwhm_corr > 0 else float("nan")
    out.update(
        {
            "v_truth_kms": reg.v_lsr_kms,
            "m1_kms": m1,
            "m1_sigma": m1_sigma,
            "fwhm_truth_kms": reg.line_fwhm_kms,
            "fwhm_kms": fwhm_corr,
            "fwhm_sigma": fwhm_sigma,
        }
    )
    return out


def cube_rows(root: str | os.PathLike, level1_paths: list[Path]) -> list[dict[str, object]]:
    """One row per RRL cube under ``root`` whose field has simulated HII regions."""
    from astropy.io import fits

    truth = None
    for p in level1_paths:
        with h5py.File(p, "r", locking=False) as f:
            if "truth/sky/components" in f:
                truth = p
                break
    if truth is None:
        return []
    rows = []
    for path in sorted(Path(root).rglob("*.fits")):
        try:
            with fits.open(path, memmap=False) as hdul:
                if hdul[0].header.get("EXTNAME") != "LINE":
                    continue
        except OSError:
            continue
        res = cube_validation(path, truth)
        if "note" in res and "scale_a" not in res:
            rows.append({"cube": res["cube"], "lines": res["n_lines"], "note": res["note"]})
            continue
        rows.append(
            {
                "cube": res["cube"],
                "lines": res["n_lines"],
                "dv_kms": res["dv_kms"],
                "m0_on/truth": res["m0_on"] / res["m0_on_truth"] if "m0_on" in res else float("nan"),
                "±": res["m0_on_sigma"] / res["m0_on_truth"] if "m0_on" in res else float("nan"),
                "m0_scale_abs": res["scale_abs"],
                "m0_chi2/N": res["m0_chi2"],
                "m0_scale_a (free zero)": res.get("scale_a"),
                "peak_channel_has_v1": res.get("peak_channel_contains_v"),
                "m1-v1_kms": res["m1_kms"] - res["v_truth_kms"] if "m1_kms" in res else float("nan"),
            }
        )
    return rows


__all__ = ["CubeData", "HIIRegionTruth", "cube_rows", "cube_validation", "read_cube", "read_hii_truth"]
