"""From merged line accumulators to a cube (docs/mapmaking.md): cube and rms, per-pixel baselines,
per-channel destriping, moments and the quicklook PNG.

All arrays here live on the hit pixels only: shape (n_hit, n_v) for cubes, (n_hit,) for images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from modules.MapMaking.read_line_data import (
    ONE_SIDED_NOTE,
    LineAccumulation,
    LineReaderSettings,
    LineSpec,
    line_free_channels,
)
from utils.rrl import channels_in_window, moment0_sigma_kkms

log = logging.getLogger("comap.LineMapMaking")


@dataclass
class Cube:
    """A cube on the hit pixels: ``line`` and ``rms`` (K, NaN where no weight), the CONTINUUM image
    and the facts the FITS header records."""

    line: NDArray[np.float64]
    rms: NDArray[np.float64]
    continuum: NDArray[np.float64]
    cards: dict[str, Any] = field(default_factory=dict)
    correlation: tuple[float, float] = (0.0, 0.0)  # (ρ1, ρB) of channel_correlation


def cube_from_sums(acc: LineAccumulation) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``cube = Σ f w y / Σ f w`` and ``rms = sqrt(Σ f² w) / Σ f w`` (NaN where Σ f w = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        line = np.where(acc.acc_w > 0, acc.acc_sum / acc.acc_w, np.nan)
        rms = np.where(acc.acc_w > 0, np.sqrt(acc.acc_q) / acc.acc_w, np.nan)
    return line, rms


def pixel_baselines(
    line: NDArray[np.float64], weights: NDArray[np.float64], settings: LineReaderSettings
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``continuum_subtraction='pixel'``: fit each pixel's spectrum outside the line mask, weighted
    by its weight spectrum, and subtract it. Returns (line, constant term at the centre);
    pixels with fewer than ``order + 2`` line-free channels with weight become NaN."""
    grid = settings.grid
    v = grid.velocities_kms
    free = line_free_channels(v, np.full(v.shape, grid.step_kms), settings.mask_kms)
    order = settings.baseline_order
    x = (v - grid.center_kms) / settings.halfwidth_kms
    design = np.vander(x, order + 1, increasing=True)  # (n_v, q+1)
    w = np.where(free[None, :] & np.isfinite(line) & (weights > 0), weights, 0.0)
    y = np.where(w > 0, line, 0.0)
    normal = np.einsum("pj,ja,jb->pab", w, design, design)
    rhs = np.einsum("pj,ja,pj->pa", w, design, y)
    ok = np.count_nonzero(w, axis=1) >= order + 2
    coef = np.full((line.shape[0], order + 1), np.nan)
    if ok.any():
        coef[ok] = np.linalg.solve(normal[ok], rhs[ok][..., None])[..., 0]
    out = line - coef @ design.T
    out[~ok] = np.nan
    return out, coef[:, 0]


def destripe_channels(
    acc: LineAccumulation, settings: LineReaderSettings, *, offset_length: int, tol: float, max_iter: int
) -> tuple[NDArray[np.float64], dict[str, Any]]:
    """Destripe every velocity channel on the regridded TOD ``y_out,j`` with weights ``w_out,j``
    (docs/mapmaking.md#velocity-regridding-and-accumulation); pixels, segments and offsets are shared across
    channels. Returns the cube (n_hit, n_v) and destriper facts for the header."""
    from modules.MapMaking.destriper import destripe

    assert acc.samples is not None and acc.segment_starts is not None
    pixels = np.concatenate([s["pixels"] for s in acc.samples])
    comp = np.full(pixels.shape, -1, dtype=np.int32)
    on = pixels >= 0
    comp[on] = np.searchsorted(acc.hit, pixels[on]).astype(np.int32)
    # a sample off the cube's hit set (possible only for zero-weight samples) is dropped
    comp[on & ~np.isin(pixels, acc.hit)] = -1
    n_v = settings.grid.n_v
    cube = np.full((acc.hit.size, n_v), np.nan)
    n_iter, status = [], []
    for j in range(n_v):
        w = np.concatenate([s["w"][:, j] for s in acc.samples]).astype(np.float32)
        total = np.concatenate([s["sum"][:, j] for s in acc.samples])
        with np.errstate(divide="ignore", invalid="ignore"):
            tod = np.where(w > 0, total / w, 0.0).astype(np.float32)
        if not (w > 0).any():
            continue
        res = destripe(
            tod,
            comp,
            w,
            int(offset_length),
            int(acc.hit.size),
            tol=float(tol),
            max_iter=int(max_iter),
            segment_starts=acc.segment_starts,
        )
        cube[:, j] = np.where(acc.acc_w[:, j] > 0, res.map, np.nan)
        n_iter.append(int(res.n_iter))
        status.append(str(res.status))
    facts = {
        "HIERARCH DESTRIPER OFFLEN": int(offset_length),
        "HIERARCH DESTRIPER TOL": float(tol),
        "HIERARCH DESTRIPER NITERMAX": max(n_iter) if n_iter else 0,
        "HIERARCH DESTRIPER DSTATUS": "converged"
        if all(s == "converged" for s in status)
        else ",".join(sorted(set(status))),
    }
    return cube, facts


def line_cards(
    lines: tuple[LineSpec, ...], settings: LineReaderSettings, acc: LineAccumulation
) -> dict[str, Any]:
    """The cube header's line keywords: the lines' shares of the weights, the continuum
    subtraction, the velocity grid and the level-1 bytes read."""
    grid = settings.grid
    cards: dict[str, Any] = {"STACKED": len(lines) > 1}
    total_weight = float(acc.line_weight.sum()) if acc.line_weight is not None else 0.0
    for k, spec in enumerate(lines, start=1):  # LINEk and RESTFk: fits_metadata.rest_frequency_cards
        if total_weight > 0:
            share = float(acc.line_weight[k - 1]) / total_weight
            cards[f"HIERARCH LINE W{k}"] = (share, f"share of {spec.label} in the weights")
    for k, spec in enumerate(lines, start=1):
        one_sided = any(n.startswith(f"{spec.label}: {ONE_SIDED_NOTE}") for n in acc.notes)
        cards[f"HIERARCH LINE BASE{k}"] = (
            "one-sided" if one_sided else "two-sided",
            f"{spec.label} baseline: line-free channels on both sides of the mask?",
        )
    rho1, rhob = channel_correlation(acc, settings)
    cards.update(
        {
            "HIERARCH LINE CORR1": (rho1, "noise correlation of neighbouring channels in the mask"),
            "HIERARCH LINE CORRB": (rhob, "noise correlation of channels >= 2 apart in the mask"),
            "HIERARCH LINE CONTSUB": settings.continuum_subtraction,
            "HIERARCH LINE BASEORD": int(settings.baseline_order),
            "HIERARCH LINE MASKLO": (settings.mask_kms[0], "km/s LSRK"),
            "HIERARCH LINE MASKHI": (settings.mask_kms[1], "km/s LSRK"),
            "HIERARCH LINE VCENTER": (grid.center_kms, "km/s LSRK"),
            "HIERARCH LINE DV": (grid.step_kms, "km/s"),
            "HIERARCH LINE L1BYTES": (int(acc.bytes_read), "level-1 TOD bytes read"),
        }
    )
    return cards


def channel_correlation(acc: LineAccumulation, settings: LineReaderSettings) -> tuple[float, float]:
    """Mean noise correlation of output channels inside the line mask (docs/mapmaking.md#noise-of-the-cube):
    between neighbours (the linear deposit shares input channels between them, and the baseline
    extrapolated across the mask is common to all) and between channels two or more apart (the
    baseline only). From the accumulated per-sample covariance ``acc.chan_cov``; (0, 0) without it."""
    cov = acc.chan_cov
    if cov is None or not np.any(np.diag(cov) > 0):
        return 0.0, 0.0
    v = settings.grid.velocities_kms
    inside = np.flatnonzero((v >= settings.mask_kms[0]) & (v <= settings.mask_kms[1]) & (np.diag(cov) > 0))
    if inside.size < 2:
        return 0.0, 0.0
    d = np.sqrt(np.diag(cov)[inside])
    corr = cov[np.ix_(inside, inside)] / np.outer(d, d)
    lag = np.abs(inside[:, None] - inside[None, :])
    rho1 = float(corr[lag == 1].mean()) if (lag == 1).any() else 0.0
    rhob = float(corr[lag >= 2].mean()) if (lag >= 2).any() else 0.0
    return rho1, rhob


def moment0_kkms(line: NDArray, velocities_kms: NDArray, window_kms: tuple[float, float]) -> NDArray:
    """Zeroth moment Σ T Δv (K km/s) over the channels whose centres lie in ``window_kms``; NaN when
    no channel centre does (an empty sum is not a measurement of zero)."""
    step = float(np.median(np.diff(velocities_kms))) if velocities_kms.size > 1 else 1.0
    sel = channels_in_window(velocities_kms, window_kms)
    if not sel.any():
        return np.full(np.shape(line)[:-1], np.nan)
    return np.nansum(line[..., sel], axis=-1) * step


def cube_quicklook_figure(
    geometry: Any,
    hit: NDArray[np.int64],
    cube: Cube,
    velocities_kms: NDArray,
    mask_kms: tuple[float, float],
    masked: NDArray[np.bool_],
    title: str,
):
    """The cube quicklook (docs/map_products.md#quicklooks): the moment-0 map over the line mask on
    the sky (coverage: the hit pixels; NaN inside it where the hit mask or an all-NaN spectrum
    leaves no value; beam from ``cube.cards``) and the spectrum (± rms) at its most significant
    pixel (largest moment 0 over its noise, so that a noisy edge pixel is not picked).

    Parameters
    ----------
    hit : int array, shape (n_hit,)
        Flattened full-grid index of every hit pixel.
    cube : Cube
        ``line`` and ``rms`` (K) of shape (n_hit, n_v); ``cards`` may hold BMAJ/BMIN/BPA (deg).
    velocities_kms : ndarray, shape (n_v,)
    masked : bool array, shape (n_hit,)
        Hit pixels masked by the hit threshold.

    Returns
    -------
    fig, sky_ax, spectrum_ax, drawn : Figure, WCSAxes, Axes, utils.sky_plot.SkyImage
    """
    from astropy.io import fits

    from utils.sky_plot import draw_sky_image, frame_of, new_sky_figure

    m0 = moment0_kkms(cube.line, velocities_kms, mask_kms)
    m0 = np.where(masked | ~np.isfinite(cube.line).any(axis=1), np.nan, m0)
    m0_sigma = moment0_sigma_kkms(cube.rms, velocities_kms, mask_kms, *cube.correlation)
    with np.errstate(divide="ignore", invalid="ignore"):
        significance = np.where(m0_sigma > 0, m0 / m0_sigma, np.nan)
    image = np.full(geometry.n_pixels, np.nan)
    image[hit] = m0
    image = image.reshape(geometry.shape)
    coverage = np.zeros(geometry.n_pixels, dtype=bool)
    coverage[hit] = True
    header = fits.Header(geometry.fits_header())
    for key in ("BMAJ", "BMIN", "BPA"):
        if key in cube.cards:
            card = cube.cards[key]
            header[key] = card[0] if isinstance(card, tuple) else card
    fig, ax0, (ax1,) = new_sky_figure(header, extra_panels=1, figsize=(12.0, 5.0))
    drawn = draw_sky_image(
        ax0, image, coverage=coverage.reshape(geometry.shape), label="K km/s", beam_header=header
    )
    window = f"{mask_kms[0]:+.0f}…{mask_kms[1]:+.0f} km/s"
    in_mask = channels_in_window(velocities_kms, mask_kms)
    ax0.set_title(f"{title}: moment 0 ({window})" if in_mask.any() else f"{title}: no channel in {window}")
    if np.isfinite(significance).any():
        k = int(np.nanargmax(significance))
        iy, ix = np.unravel_index(int(hit[k]), geometry.shape)
        ax0.plot([ix], [iy], "+", color="lime", ms=12, mew=1.5)
        ax1.step(velocities_kms, cube.line[k], where="mid", color="k", label="LINE")
        ax1.fill_between(
            velocities_kms,
            cube.line[k] - cube.rms[k],
            cube.line[k] + cube.rms[k],
            step="mid",
            color="0.7",
            label="± RMS",
        )
        ax1.axvspan(*mask_kms, color="tab:orange", alpha=0.15, label="line mask")
        where = ax0.wcs.pixel_to_world(ix, iy)
        if frame_of(ax0.wcs) == "galactic":
            at = f"l = {where.l.deg:.3f}°, b = {where.b.deg:+.3f}°"
        else:
            at = f"RA {where.ra.to_string(unit='hourangle', sep='hms', precision=1)}, "
            at += f"Dec {where.dec.to_string(sep='dms', precision=0, alwayssign=True)}"
        ax1.set_title(f"spectrum at {at}\nmoment 0 = {significance[k]:.1f} σ (most significant pixel)")
        ax1.legend(loc="best")
    else:
        # say why the panel is empty rather than leave blank axes
        v = np.asarray(velocities_kms, dtype=np.float64)
        if not in_mask.any():
            step = float(np.median(np.abs(np.diff(v)))) if v.size > 1 else float("nan")
            why = f"no channel centre inside the line mask\n({v.size} channels {step:.0f} km/s apart)"
        else:
            why = "no pixel with a finite moment-0 σ"
        ax1.text(0.5, 0.5, why, transform=ax1.transAxes, ha="center", va="center", color="0.3")
        ax1.set_title("spectrum: none to show")
    ax1.set_xlabel("LSRK radio velocity (km/s)")
    ax1.set_ylabel("K (Rayleigh-Jeans)")
    return fig, ax0, ax1, drawn


def cube_quicklook_png(
    png_path: Path,
    geometry: Any,
    hit: NDArray[np.int64],
    cube: Cube,
    velocities_kms: NDArray,
    mask_kms: tuple[float, float],
    masked: NDArray[np.bool_],
    title: str,
) -> Path:
    """Save :func:`cube_quicklook_figure` of the same arguments as ``png_path``."""
    from utils.plotting import save_figure

    fig, _ax0, _ax1, _drawn = cube_quicklook_figure(
        geometry, hit, cube, velocities_kms, mask_kms, masked, title
    )
    return save_figure(fig, png_path)


__all__ = [
    "Cube",
    "cube_from_sums",
    "cube_quicklook_figure",
    "cube_quicklook_png",
    "destripe_channels",
    "line_cards",
    "channel_correlation",
    "moment0_kkms",
    "moment0_sigma_kkms",
    "pixel_baselines",
]
