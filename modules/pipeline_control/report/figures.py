"""The run report's figures (docs/operations.md#run-report): one PNG per topic, aggregated over the
run so that their number and size do not grow with the number of observations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from modules.pipeline_control.report.gather import (
    NOISE_COLUMNS,
    CalibratorPoints,
    NoiseTable,
    ObservationRow,
    Spectra,
)
from utils.plotting import new_figure, save_figure

DPI = 80
"""Resolution of the report's PNGs (kept low: the report is looked at in a browser)."""

NOISE_LABELS = {
    "filtered_white_noise": "white noise (K)",
    "filtered_fknee": "knee frequency (Hz)",
    "filtered_noise_index": "spectral slope α",
}


def tsys_gain_figure(spectra: Spectra, path: Path) -> Path | None:
    """Tsys (K) and gain (counts/K) against frequency, one line per feed; None without data."""
    if spectra.frequency_ghz is None or not spectra.tsys_k:
        return None
    fig, (ax_t, ax_g) = new_figure(2, 1, figsize=(8.0, 6.0), sharex=True)
    freq = spectra.frequency_ghz
    for feed in sorted(spectra.tsys_k):
        for band in range(freq.shape[0]):
            order = np.argsort(freq[band])
            label = f"feed {feed}" if band == 0 else None
            color = f"C{(feed - 1) % 10}"
            ax_t.plot(freq[band][order], spectra.tsys_k[feed][band][order], color=color, lw=1, label=label)
            ax_g.plot(freq[band][order], spectra.gain[feed][band][order], color=color, lw=1)
    ax_t.set_ylabel("Tsys (K)")
    ax_g.set_ylabel("gain (counts/K)")
    ax_g.set_xlabel("frequency (GHz)")
    ax_t.set_title(f"median over vane events and {len(spectra.files)} level-2 file(s)")
    ax_t.legend(fontsize="small", ncol=4)
    for ax in (ax_t, ax_g):
        ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=DPI)


def tsys_time_figure(rows: list[ObservationRow], path: Path) -> Path | None:
    """Each observation's median Tsys against obsid, one colour per source; None without data."""
    pts = [(r.obsid, r.median_tsys, r.source) for r in rows if r.median_tsys is not None]
    if not pts:
        return None
    fig, ax = new_figure(figsize=(8.0, 3.2))
    for i, source in enumerate(sorted({p[2] for p in pts})):
        sel = [(o, t) for o, t, s in pts if s == source]
        ax.plot(*zip(*sel, strict=True), "o", ms=3, color=f"C{i % 10}", label=source or "?")
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("obsid")
    ax.set_ylabel("median Tsys (K)")
    ax.legend(fontsize="small", ncol=4)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi=DPI)


def noise_figure(noise: NoiseTable, path: Path) -> Path | None:
    """White level, knee frequency and slope against feed, one marker colour per band."""
    if not noise.medians:
        return None
    fig, axes = new_figure(1, len(NOISE_COLUMNS), figsize=(9.0, 3.0))
    bands = sorted({b for _f, b in noise.medians})
    for ax, col in zip(axes, NOISE_COLUMNS, strict=True):
        for band in bands:
            keys = sorted(k for k in noise.medians if k[1] == band)
            ax.plot(
                [k[0] for k in keys],
                [noise.medians[k][col] for k in keys],
                "o",
                ms=4,
                color=f"C{band}",
                label=f"band {band}",
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("feed")
        ax.set_title(NOISE_LABELS[col], fontsize="medium")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    return save_figure(fig, path, dpi=DPI)


def calibrator_figure(cal: CalibratorPoints, path: Path) -> Path | None:
    """Measured calibrator flux against time per (source, band), and measured / catalogue flux with
    the calibration model's factor; None without calibrator fits."""
    from utils.calibrators import flux_jy

    if not cal.points:
        return None
    fig, (ax_f, ax_r) = new_figure(2, 1, figsize=(8.0, 5.5), sharex=True)
    for i, ((source, band), pts) in enumerate(sorted(cal.points.items())):
        color = f"C{i % 10}"
        _obsid, mjd, flux, err, freq = (np.asarray(v, dtype=np.float64) for v in zip(*pts, strict=True))
        label = f"{source} band {band}"
        ax_f.errorbar(mjd, flux, yerr=err, fmt="o", ms=4, color=color, label=label)
        try:
            catalogue = flux_jy(source, freq, mjd)
        except (KeyError, ValueError):  # not a calibrator with a flux model
            continue
        ax_r.errorbar(mjd, flux / catalogue, yerr=err / catalogue, fmt="o", ms=4, color=color)
        if (source, band) in cal.model:
            grid, factor = cal.model[(source, band)]
            ax_r.plot(grid, factor, "-", color=color, lw=1)
            nu = float(np.nanmedian(freq))
            ax_f.plot(grid, factor * flux_jy(source, np.full(grid.shape, nu), grid), "-", color=color, lw=1)
    ax_r.xaxis.set_major_locator(MaxNLocator(5))
    ax_f.set_ylabel("flux (Jy)")
    ax_r.set_ylabel("measured / catalogue")
    ax_r.set_xlabel("MJD")
    ax_f.set_title("points: fits per observation (median over feeds, channels); lines: calibration model")
    ax_f.legend(fontsize="small", ncol=4)
    for ax in (ax_f, ax_r):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", useOffset=False)
    return save_figure(fig, path, dpi=DPI)


THUMBNAIL_PX = 480
"""Largest side (pixels) of the map and cube thumbnails."""


def thumbnail(src: Path, dst: Path) -> Path:
    """A copy of the quicklook ``src`` scaled to at most :data:`THUMBNAIL_PX` pixels a side, with a
    palette of 256 colours (a third of the size; Pillow comes with matplotlib)."""
    from PIL import Image

    with Image.open(src) as im:
        im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        im.convert("RGB").quantize(256).save(dst, format="PNG")
    return dst
