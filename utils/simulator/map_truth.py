"""Continuum maps against the simulated sky, and jackknife statistics
(docs/mapmaking.md#end-to-end-map-validation).

* :func:`binned_truth`: the true sky as the map sees it. The simulator's truth map (``/truth/sky/map``)
  is already convolved with the beam; it is sampled at every in-scan sample position of the map's
  feeds (cubic spline, no loss at the peaks of a 4′ beam on 1′ truth pixels) and averaged per map
  pixel like the data.
* :func:`compare_with_truth`: fitted scale a and offset b, χ²/N off the compact sources, and the
  HII-region peak ratios.
* :func:`null_statistics`: χ²/N of a jackknife difference map and its effective number of
  independent pixels N_eff, from the pixel–pixel correlation of (diff/RMS).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from utils import level2 as L2
from utils.coordinates import icrs_to_galactic

BEAM_FWHM_30GHZ_ARCMIN = 4.5
"""Nominal beam FWHM at 30 GHz; scales as 1/ν (docs/simulator.md#sky-models)."""


def read_map(path: str | os.PathLike) -> dict[str, object]:
    """Primary header and the DESTRIPED (or primary), RMS, HITS and MASK planes of a continuum FITS map."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        out: dict[str, object] = {"header": hdul[0].header.copy(), "sky": hdul[0].data.astype(np.float64)}
        for name in ("RMS", "RMS_WHITE", "HITS", "MASK"):
            if name in names:
                out[name.lower()] = np.asarray(hdul[name].data)
    return out


def truth_grid(level1: str | os.PathLike, freq_ghz: float) -> tuple[NDArray, dict] | None:
    """(truth map at the reference frequency nearest ``freq_ghz``, its WCS keywords) of one level-1
    file; None without a truth map."""
    with h5py.File(level1, "r", locking=False) as f:
        if "truth/sky/map" not in f:
            return None
        g = f["truth/sky"]
        freqs = g["frequency_ghz"][...]
        k = int(np.argmin(np.abs(freqs - freq_ghz)))
        header = {k2: (v.decode() if isinstance(v, bytes) else v) for k2, v in g.attrs.items()}
        return g["map"][k].astype(np.float64), header


def _truth_at(grid: tuple[NDArray, dict], lon: NDArray, lat: NDArray) -> NDArray:
    """Cubic-spline interpolation of a truth grid at Galactic (lon, lat) (deg); NaN outside."""
    from astropy.wcs import WCS
    from scipy.ndimage import map_coordinates

    data, h = grid
    w = WCS(naxis=2)
    w.wcs.ctype = [h["CTYPE1"], h["CTYPE2"]]
    w.wcs.crpix = [h["CRPIX1"], h["CRPIX2"]]
    w.wcs.cdelt = [h["CDELT1"], h["CDELT2"]]
    w.wcs.crval = [h["CRVAL1"], h["CRVAL2"]]
    x, y = w.world_to_pixel_values(lon, lat)
    return map_coordinates(data, [y, x], order=3, mode="constant", cval=np.nan)


def binned_truth(
    map_path: str | os.PathLike, pairs: Iterable[tuple[str | os.PathLike, str | os.PathLike]]
) -> NDArray[np.float64]:
    """The beam-convolved true sky binned like the data of one continuum map.

    Parameters
    ----------
    map_path : path
        The continuum FITS map (its WCS, FREQ and FEEDS are used).
    pairs : iterable of (level-1 path, level-2 path)
        The observations of the map: every in-scan sample of the map's feeds not excluded by the
        level-2 sample flags is sampled in its own observation's truth map.

    Returns
    -------
    ndarray, shape (ny, nx)
        Mean truth (K_RJ) over the samples falling in each pixel (nearest-pixel rule of
        docs/mapmaking.md#pixelisation); NaN where no sample falls. Samples are weighted equally:
        the map's weights differ between feeds and scans, which changes only how the positions are
        spread inside a pixel.
    """
    from utils.wcs import WCS_KEYS, MapGeometry, world_to_pixel_index

    m = read_map(map_path)
    header = m["header"]
    geo = MapGeometry({k: header[k] for k in WCS_KEYS if k in header})
    freq = float(header["FREQ"]) / 1e9
    feeds = {int(f) for f in str(header.get("FEEDS", "")).split(",") if f.strip()}
    total = np.zeros(geo.n_pixels)
    count = np.zeros(geo.n_pixels)
    for level1, level2 in pairs:
        grid = truth_grid(level1, freq)
        if grid is None:
            continue
        with h5py.File(level2, "r", locking=False) as l2:
            l2_feeds = l2[L2.FEEDS][...]
            flags = l2[L2.SAMPLE_FLAGS][...]
            edges = l2[L2.SCAN_EDGES][...]
            in_scan = np.zeros(flags.shape[1], dtype=bool)
            for a, b in edges:
                in_scan[a:b] = True
            for j, feed in enumerate(l2_feeds):
                if feeds and int(feed) not in feeds:
                    continue
                good = in_scan & ((flags[j] & L2.SAMPLE_FLAGS_EXCLUDE) == 0)
                ra = l2[L2.PIXEL_RA][j][good]
                dec = l2[L2.PIXEL_DEC][j][good]
                if geo.frame == "galactic":
                    lon, lat = icrs_to_galactic(ra, dec)
                else:
                    lon, lat = ra, dec
                pix = world_to_pixel_index(geo, lon, lat)
                gl, gb = icrs_to_galactic(ra, dec)
                value = _truth_at(grid, np.asarray(gl), np.asarray(gb))
                ok = (pix >= 0) & np.isfinite(value)
                total += np.bincount(pix[ok], weights=value[ok], minlength=geo.n_pixels)
                count += np.bincount(pix[ok], minlength=geo.n_pixels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).reshape(geo.shape)


def _distance_arcmin(header, lon: NDArray, lat: NDArray, l_deg: float, b_deg: float) -> NDArray:
    dl = ((lon - l_deg + 180.0) % 360.0 - 180.0) * np.cos(np.radians(lat))
    return np.hypot(dl, lat - b_deg) * 60.0


def hii_positions(level1: str | os.PathLike) -> list[tuple[float, float]]:
    """Galactic (l, b) (deg) of the compact HII regions of a simulated field, brightest first."""
    with h5py.File(level1, "r", locking=False) as f:
        if "truth/sky/components" not in f:
            return []
        g = f["truth/sky"]
        l0, b0 = float(g.attrs.get("l0_deg", 0.0)), float(g.attrs.get("b0_deg", 0.0))
        comps = g["components"][...]
    rows = [c for c in comps if (c["kind"].decode() if isinstance(c["kind"], bytes) else c["kind"]) == "hii"]
    rows.sort(key=lambda c: -float(c["t_peak_30ghz_k"]))
    return [((l0 + float(c["dl_deg"])) % 360.0, b0 + float(c["db_deg"])) for c in rows]


def compare_with_truth(
    map_path: str | os.PathLike,
    truth: NDArray[np.float64],
    hii: Sequence[tuple[float, float]],
    *,
    rms_hdu: str = "RMS",
    beams: float = 2.0,
) -> dict[str, object]:
    """The map against its binned truth (docs/mapmaking.md#end-to-end-map-validation).

    Pixels used for the fit: unmasked (MASK = 0), finite map, RMS and truth, and farther than
    ``beams`` beam FWHM from every compact HII region. A weighted least-squares fit of
    ``map = a·truth + b`` gives the scale a and the zero level b (the destriper leaves the map's
    zero level free); χ²/N is that of the residual with weights 1/RMS² on the same pixels.
    The peak ratio of HII region k is Σ(map − b)/Σ truth over the unmasked pixels within half a
    beam FWHM of its centre.

    Returns
    -------
    dict
        ``scale_a``, ``offset_b`` (K), ``chi2_per_pixel``, ``n_pixels``, ``hii<k>_peak/truth``.
    """
    from utils.wcs import WCS_KEYS, MapGeometry, pixel_centres

    m = read_map(map_path)
    header = m["header"]
    sky, rms = m["sky"], m[rms_hdu.lower()].astype(np.float64)
    mask = m["mask"] if "mask" in m else np.zeros(sky.shape, dtype=np.int16)
    geo = MapGeometry({k: header[k] for k in WCS_KEYS if k in header})
    lon, lat = pixel_centres(geo)
    freq = float(header["FREQ"]) / 1e9
    fwhm = BEAM_FWHM_30GHZ_ARCMIN * 30.0 / freq
    good = (mask == 0) & np.isfinite(sky) & np.isfinite(rms) & (rms > 0) & np.isfinite(truth)
    far = np.ones_like(good)
    for l_deg, b_deg in hii:
        far &= _distance_arcmin(header, lon, lat, l_deg, b_deg) > beams * fwhm
    use = good & far
    out: dict[str, object] = {"map": Path(map_path).name, "freq_ghz": freq}
    if use.sum() < 10:
        return {**out, "note": "too few pixels for the comparison"}
    w = 1.0 / rms[use] ** 2
    design = np.stack([truth[use], np.ones(int(use.sum()))], axis=1)
    coef = np.linalg.lstsq(design * np.sqrt(w)[:, None], sky[use] * np.sqrt(w), rcond=None)[0]
    chi2 = float(np.sum(w * (sky[use] - design @ coef) ** 2) / use.sum())
    out.update(
        {
            "scale_a": float(coef[0]),
            "offset_b": float(coef[1]),
            "chi2_per_pixel": chi2,
            "n_pixels": int(use.sum()),
        }
    )
    if rms_hdu.lower() != "rms_white" and "rms_white" in m:
        w_white = 1.0 / m["rms_white"][use].astype(np.float64) ** 2
        out["chi2_per_pixel_white"] = float(np.sum(w_white * (sky[use] - design @ coef) ** 2) / use.sum())
    for k, (l_deg, b_deg) in enumerate(hii, start=1):
        core = good & (_distance_arcmin(header, lon, lat, l_deg, b_deg) <= 0.5 * fwhm)
        if core.sum() == 0:
            continue
        out[f"hii{k}_peak/truth"] = float(np.sum(sky[core] - coef[1]) / np.sum(truth[core]))
    return out


def null_statistics(
    diff: NDArray, rms: NDArray, use: NDArray[np.bool_], *, max_lag: int = 20
) -> dict[str, float | int]:
    """χ²/N of a difference map and its effective number of independent pixels.

    With z = diff/RMS on the N pixels of ``use``, χ²/N = mean(z²). For Gaussian z with correlation
    ρ_ij, Var(Σ z²) = 2 Σ_ij ρ_ij², so χ²/N scatters by sqrt(2/N_eff) with
    N_eff = N² / Σ_ij ρ_ij² (N_eff = N for independent pixels). With S = Σ_ij ρ_ij² / N, the map's own
    autocorrelation gives T = Σ_lag n(lag)·ρ̂(lag)² over the L non-zero lags within ``max_lag`` pixels
    on either axis that have at least 10 pixel pairs n(lag). Each ρ̂ scatters by sqrt(S/n(lag))
    (Bartlett), so E[T] ≈ (N·S − N) + L·S and S = (N + T)/(N + L); N_eff = N/S. Correlations beyond
    ``max_lag`` are left out, so N_eff is an upper bound when the noise is correlated over longer
    distances.

    Returns
    -------
    dict
        ``chi2_per_pixel``, ``n_pixels`` (N), ``n_eff``.
    """
    from scipy.signal import fftconvolve

    use = np.asarray(use, dtype=bool)
    n = int(use.sum())
    if n == 0:
        return {"chi2_per_pixel": float("nan"), "n_pixels": 0, "n_eff": 0.0}
    z = np.where(use, diff / np.where(use, rms, 1.0), 0.0)
    chi2 = float(np.sum(z**2) / n)
    zc = np.where(use, z - z[use].mean(), 0.0)
    var = float(np.sum(zc**2) / n)
    m = use.astype(np.float64)
    corr = fftconvolve(zc, zc[::-1, ::-1], mode="full")
    pairs = np.rint(fftconvolve(m, m[::-1, ::-1], mode="full"))
    cy, cx = np.array(corr.shape) // 2
    sl = (slice(max(cy - max_lag, 0), cy + max_lag + 1), slice(max(cx - max_lag, 0), cx + max_lag + 1))
    c, p = corr[sl], pairs[sl]
    ok = p >= 10
    ok[cy - sl[0].start, cx - sl[1].start] = False  # lag 0 is n exactly
    rho = c[ok] / p[ok] / var
    t_sum = float(np.sum(p[ok] * rho**2))
    n_lags = int(ok.sum())
    s_mean = max((n + t_sum) / (n + n_lags), 1.0)
    return {"chi2_per_pixel": chi2, "n_pixels": n, "n_eff": n / s_mean}


def jackknife_row(diff_path: str | os.PathLike) -> dict[str, object]:
    """χ²/N, N, N_eff and the 3σ scatter 3·sqrt(2/N_eff) of a ``_diff`` map against its RMS HDU (and,
    when the map has one, χ²/N against the white-noise RMS_WHITE HDU).

    Pixels: MASK = 0 with finite difference and RMS. The destriper leaves each half's zero level
    free, so the difference's weighted mean (weights 1/RMS²) is removed first: one degree of
    freedom of N.
    """
    m = read_map(diff_path)
    diff = m["sky"]
    mask = m["mask"] if "mask" in m else np.zeros(diff.shape, dtype=np.int16)
    rms = m["rms"].astype(np.float64)
    use = (mask == 0) & np.isfinite(diff) & np.isfinite(rms) & (rms > 0)
    out: dict[str, object] = {"map": Path(diff_path).name}
    if use.sum() < 10:
        return {**out, "note": "too few pixels"}
    w = 1.0 / rms[use] ** 2
    diff = diff - float(np.sum(w * diff[use]) / np.sum(w))
    stats = null_statistics(diff, rms, use)
    out.update({"chi2_per_pixel": stats["chi2_per_pixel"], "n_pixels": stats["n_pixels"]})
    out["n_eff"] = round(float(stats["n_eff"]))
    out["3sigma"] = 3.0 * float(np.sqrt(2.0 / stats["n_eff"])) if stats["n_eff"] > 0 else float("nan")
    if "rms_white" in m:
        white = m["rms_white"].astype(np.float64)
        ok = use & np.isfinite(white) & (white > 0)
        out["chi2_per_pixel_white"] = float(np.mean((diff[ok] / white[ok]) ** 2))
    return out
