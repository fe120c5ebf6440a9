"""``python -m utils.simulator report DIR``: recovered-versus-truth summary (docs/install.md#the-demo step 3).

Level-1 files (``comap-*.hd5``, anywhere under DIR, e.g. ``DIR/remote`` and ``DIR/level1``; copies
with the same name are listed once) carry the truth; level-2 files ``Level2_<level-1 name>`` are
looked up anywhere under DIR. Each *row kind* is one function ``row_<kind>(obs) -> dict`` that
returns the columns of one observation (or ``{"note": ...}``); :data:`ROW_KINDS` lists the tables
printed, so further rows (calibrator flux, noise, maps, RRL) are added by appending a function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from utils import level1_layout as L1
from utils import level2 as L2
from utils.constants import LEVEL1_NAME_RE, LEVEL2_NAME_RE


@dataclass
class ObservationFiles:
    """The level-1 file of one observation and its level-2 file, if any."""

    obsid: int
    name: str
    level1: Path
    level2: Path | None


def find_observations(root: str | os.PathLike) -> list[ObservationFiles]:
    """Level-1 files under ``root`` (recursive) paired with ``Level2_<name>`` files, sorted by obsid."""
    root = Path(root)
    level1: dict[str, Path] = {}
    level2: dict[str, Path] = {}
    for path in sorted(root.rglob("*.hd5")):
        if LEVEL1_NAME_RE.match(path.name):
            level1.setdefault(path.name, path)
        elif LEVEL2_NAME_RE.match(path.name):
            level2.setdefault(path.name[len("Level2_") :], path)
    out = [
        ObservationFiles(int(LEVEL1_NAME_RE.match(n).group(1)), n, p, level2.get(n))
        for n, p in level1.items()
    ]
    return sorted(out, key=lambda o: (o.obsid, o.name))


def _feed_positions(l1_feeds: np.ndarray, l2_feeds: np.ndarray) -> list[tuple[int, int]]:
    """(level-2 index, level-1 index) pairs of the feeds present in both files."""
    where = {int(f): i for i, f in enumerate(l1_feeds)}
    return [(j, where[int(f)]) for j, f in enumerate(l2_feeds) if int(f) in where]


# --------------------------------------------------------------------------------------------------
# Row kinds
# --------------------------------------------------------------------------------------------------
def row_truth(obs: ObservationFiles) -> dict[str, object]:
    """Truth summary: source, number of science feeds, median physical Tsys (receiver + sky on the cold
    vane samples)."""
    with h5py.File(obs.level1, "r", locking=False) as l1:
        source = str(l1["comap"].attrs.get("source", ""))
        if "truth" not in l1:
            return {"obsid": obs.obsid, "source": source, "note": "no /truth group (not a simulated file)"}
        truth = l1["truth"]
        tsys = truth["vane/tsys_physical_k"][...] if "vane/tsys_physical_k" in truth else np.array([])
        feeds = l1[L1.FEEDS][...]
        kind = str(truth["sky"].attrs.get("kind", "")) if "sky" in truth else ""
        return {
            "obsid": obs.obsid,
            "source": source,
            "sky": kind,
            "feeds": ",".join(str(int(f)) for f in feeds),
            "events": int(tsys.shape[0]) if tsys.ndim == 4 else 0,
            "tsys_truth_k": float(np.nanmedian(tsys)) if np.isfinite(tsys).any() else float("nan"),
            "level2": "yes" if obs.level2 is not None else "absent",
        }


def row_tsys(obs: ObservationFiles) -> dict[str, object]:
    """Recovered noise-equivalent Tsys against the physical truth, per element, matched by feed and event.

    ``median_ratio`` is recovered / physical Tsys. The recovered value is in vane K, so it also carries the
    vane's gain bias g/G (the vane assumes a 2.73 K sky, docs/level2.md#tsys-conventions);
    ``median_ratio_gain_corrected`` divides that out with the truth gain_expected of the same event.
    """
    base = {"obsid": obs.obsid}
    if obs.level2 is None:
        return {**base, "note": "level-2 file absent"}
    with h5py.File(obs.level1, "r", locking=False) as l1, h5py.File(obs.level2, "r", locking=False) as l2:
        if "truth/vane/tsys_physical_k" not in l1:
            return {**base, "note": "no truth vane Tsys"}
        if L2.VANE_TSYS not in l2:
            return {**base, "note": f"{L2.VANE_TSYS} absent"}
        truth = l1["truth/vane/tsys_physical_k"][...]
        gain_bias = l1["truth/instrument/gain"][...][None] / l1["truth/vane/gain_expected"][...]  # g/G
        t_edges = l1["truth/vane/event_edges"][...]
        rec = l2[L2.VANE_TSYS][...]
        r_edges = l2[L2.VANE_EVENT_EDGES][...] if L2.VANE_EVENT_EDGES in l2 else t_edges[: rec.shape[0]]
        pairs_feed = _feed_positions(l1[L1.FEEDS][...], l2[L2.FEEDS][...])
        t_index = {int(s): k for k, (s, _) in enumerate(t_edges)}
        ratios, corrected = [], []
        for e, (start, _) in enumerate(r_edges):
            k = t_index.get(int(start))
            if k is None:
                continue
            for j, i in pairs_feed:
                ratios.append(np.ravel(rec[e, j] / truth[k, i]))
                corrected.append(np.ravel(rec[e, j] / (truth[k, i] * gain_bias[k, i])))
        if not ratios:
            return {**base, "note": "no matching vane events or feeds"}
        r = np.concatenate(ratios)
        c = np.concatenate(corrected)
        ok = np.isfinite(r) & np.isfinite(c)
        if not ok.any():
            return {**base, "note": "no finite recovered Tsys"}
        return {
            **base,
            "median_ratio": float(np.median(r[ok])),
            "median_ratio_gain_corrected": float(np.median(c[ok])),
            "p99_abs_err_gain_corrected": float(np.percentile(np.abs(c[ok] - 1.0), 99)),
            "n_elements": int(ok.sum()),
        }


def _gain_ratio(l1, idx) -> np.ndarray:
    """True gain / expected vane gain (mean over events), per (level-2 feed, band, channel)."""
    gain = l1["truth/instrument/gain"][...][idx]
    # the level-2 (science) feeds only: the ground feed's all-NaN row would warn
    expected = np.nanmean(l1["truth/vane/gain_expected"][...][:, idx], axis=0)
    return gain / expected


def _bin_mean(values: np.ndarray, weights: np.ndarray, n_bin: int) -> np.ndarray:
    """Weighted mean over the channels of each bin: (F, B, C) → (F, B, K)."""
    f, b, c = values.shape
    v = values.reshape(f, b, n_bin, c // n_bin)
    w = np.where(np.isfinite(v), weights.reshape(f, b, n_bin, c // n_bin), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(v * w, axis=-1) / w.sum(axis=-1)


def row_calibrator(obs: ObservationFiles) -> dict[str, object] | None:
    """Calibrator flux: fitted / truth (model flux averaged over each bin's channels), and the same
    divided by the truth gain ratio gain/gain_expected (the vane underestimates G,
    docs/simulator.md#truth)."""
    with h5py.File(obs.level1, "r", locking=False) as l1:
        if "truth/calibrator/flux_jy" not in l1:
            return None
        if obs.level2 is None:
            return {"obsid": obs.obsid, "note": "level-2 file absent"}
        with h5py.File(obs.level2, "r", locking=False) as l2:
            if L2.CALIBRATOR_FIT.child("flux") not in l2:
                return {"obsid": obs.obsid, "note": f"{L2.CALIBRATOR_FIT} absent"}
            idx = l2[L2.LEVEL1_FEED_INDEX][...]
            flux = l2[L2.CALIBRATOR_FIT.child("flux")][...].astype(np.float64)
            ok = l2[L2.CALIBRATOR_FIT.child("fit_ok")][...]
            used = l2[L2.CHANNEL_MASK][...].astype(np.float64)
            n_bin = flux.shape[-1]
            truth = np.broadcast_to(l1["truth/calibrator/flux_jy"][...], used.shape)
            truth_bin = _bin_mean(truth, used, n_bin)
            ratio_bin = _bin_mean(_gain_ratio(l1, idx), used, n_bin)
    r = (flux / truth_bin)[ok]
    if r.size == 0:
        return {"obsid": obs.obsid, "note": "no successful fits"}
    return {
        "obsid": obs.obsid,
        "flux_jy": float(np.median(flux[ok])),
        "fitted/truth": float(np.median(r)),
        "fitted/(truth*gain_ratio)": float(np.median((flux / (truth_bin * ratio_bin))[ok])),
        "n_fits": int(r.size),
    }


def _noise_truth(l1, l2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth white-noise rms (K, vane K), σ_red at f_ref and knee frequency of binned_data per
    (feed, band, bin, scan), for the binning weights actually used (docs/level2.md#noisestatslevel2
    integration test)."""
    idx = l2[L2.LEVEL1_FEED_INDEX][...]
    sigma_chan = l1["truth/noise/radiometer_sigma_k"][...][idx] * _gain_ratio(l1, idx)  # vane K
    w = l2[L2.BINNING_WEIGHTS][...].astype(np.float64)  # (F, B, C, S)
    m = l2[L2.ATM_MEDIAN][...].astype(np.float64)
    n_bin = l2[L2.BINNED_DATA].shape[2]
    f, b, c, s = w.shape
    wr = w.reshape(f, b, n_bin, c // n_bin, s)
    sig = np.broadcast_to(sigma_chan[..., None], w.shape).reshape(f, b, n_bin, c // n_bin, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        white = np.sqrt((wr**2 * sig**2).sum(axis=3)) / wr.sum(axis=3)
        m_bin = (wr * m.reshape(f, b, n_bin, c // n_bin, s)).sum(axis=3) / wr.sum(axis=3)
    fs = 1.0 / (86400.0 * np.median(np.diff(l2[L2.MJD][...])))
    sigma_g = l1["truth/noise/sigma_g"][...][idx][:, None, None, None]
    alpha = l1["truth/noise/alpha"][...][idx][:, None, None, None]
    f0 = l1["truth/noise/f0_hz"][...][idx][:, None, None, None]
    f_ref = 0.1
    red = m_bin * sigma_g * np.sqrt(fs / 2.0) * (f_ref / f0) ** (alpha / 2.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        knee = f_ref * (white / red) ** (2.0 / alpha)
    return white, red, knee


def row_noise(obs: ObservationFiles) -> dict[str, object] | None:
    """NoiseStatsLevel2 on binned_data: white noise and knee frequency, recovered / truth."""
    if obs.level2 is None:
        return {"obsid": obs.obsid, "note": "level-2 file absent"}
    with h5py.File(obs.level1, "r", locking=False) as l1, h5py.File(obs.level2, "r", locking=False) as l2:
        group = L2.NOISE_STATS.resolve(dataset="binned_data")
        if group not in l2 or "truth/noise/radiometer_sigma_k" not in l1:
            return {"obsid": obs.obsid, "note": f"{group} absent"}
        ok = l2[f"{group}/fit_ok"][...]
        white, _red, knee = _noise_truth(l1, l2)
        sw = l2[f"{group}/sigma_white"][...].astype(np.float64)
        fk = l2[f"{group}/fknee_hz"][...].astype(np.float64)
    if not ok.any():
        return {"obsid": obs.obsid, "note": "no fitted segments"}
    r_white = (sw / white)[ok]
    r_knee = (fk / knee)[ok & np.isfinite(fk)]
    return {
        "obsid": obs.obsid,
        "white_recovered/truth": float(np.nanmedian(r_white)),
        "fknee_hz": float(np.nanmedian(fk[ok])),
        "fknee_truth_hz": float(np.nanmedian(knee[ok])),
        "fknee_recovered/truth": float(np.nanmedian(r_knee)) if r_knee.size else float("nan"),
        "n_segments": int(ok.sum()),
    }


# --------------------------------------------------------------------------------------------------
# Maps against the truth sky and jackknife differences (docs/mapmaking.md#end-to-end-map-validation)
# --------------------------------------------------------------------------------------------------
def _galactic_truth(level1: Path) -> bool:
    with h5py.File(level1, "r", locking=False) as f:
        return "truth/sky/map" in f and str(f["truth/sky"].attrs.get("kind", "")) == "galactic"


def _continuum_maps(root: str | os.PathLike) -> list[tuple[Path, tuple[int, int]]]:
    """(path, (OBSIDMIN, OBSIDMAX)) of the continuum FITS maps (a DESTRIPED primary HDU) under ``root``."""
    from astropy.io import fits

    out = []
    for path in sorted(Path(root).rglob("*.fits")):
        try:
            with fits.open(path, memmap=False) as hdul:
                header = hdul[0].header
                if "DESTRIPED" not in [h.name for h in hdul] and header.get("EXTNAME") != "DESTRIPED":
                    continue
                out.append((path, (int(header.get("OBSIDMIN", -1)), int(header.get("OBSIDMAX", -1)))))
        except OSError:
            continue
    return out


def map_rows(root: str | os.PathLike, observations: list[ObservationFiles]) -> list[dict[str, object]]:
    """One row per continuum map of a simulated Galactic field under ``root`` (not the ``_diff``
    maps): scale a, offset b, χ²/N off the compact HII regions against the beam-convolved truth
    binned like the data, and the HII peak ratios (utils/simulator/map_truth.py). The map's
    observations are those with a level-2 file and a Galactic truth map whose obsid lies in the
    map's OBSIDMIN–OBSIDMAX."""
    from utils.simulator.map_truth import binned_truth, compare_with_truth, hii_positions

    fields = [o for o in observations if o.level2 is not None and _galactic_truth(o.level1)]
    rows = []
    for path, (lo, hi) in _continuum_maps(root):
        if path.name.endswith("_diff.fits"):
            continue
        pairs = [(o.level1, o.level2) for o in fields if lo <= o.obsid <= hi]
        if not pairs:
            continue
        truth = binned_truth(path, pairs)
        rows.append(compare_with_truth(path, truth, hii_positions(pairs[0][0])))
    return rows


def jackknife_rows(root: str | os.PathLike) -> list[dict[str, object]]:
    """One row per jackknife difference map (``*_diff.fits``) under ``root``: χ²/N against the RMS
    HDU (and RMS_WHITE where present), N and N_eff (utils/simulator/map_truth.py ``jackknife_row``)."""
    from utils.simulator.map_truth import jackknife_row

    return [jackknife_row(path) for path, _ in _continuum_maps(root) if path.name.endswith("_diff.fits")]


ROW_KINDS: list[tuple[str, Callable[[ObservationFiles], dict[str, object] | None]]] = [
    ("Observations (truth)", row_truth),
    ("Vane Tsys: recovered (noise-equivalent) / physical truth (tsys_physical_k)", row_tsys),
    ("Calibrator flux: fitted / truth (model at the bin's frequencies)", row_calibrator),
    ("Noise of binned_data (NoiseStatsLevel2): recovered / truth", row_noise),
]


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------
def _fmt(value: object) -> str:
    if isinstance(value, float):
        if not np.isfinite(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def format_table(title: str, rows: list[dict[str, object]]) -> str:
    """Plain-text table; rows with a ``note`` print it after the common columns."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key != "note" and key not in columns:
                columns.append(key)
    if any("note" in r for r in rows):
        columns.append("note")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [title, "-" * len(title)]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def build_report(root: str | os.PathLike) -> str:
    """The full report text for ``root``."""
    observations = find_observations(root)
    if not observations:
        return f"no level-1 files (comap-*.hd5) found under {root}"
    blocks = []
    for title, func in ROW_KINDS:
        rows = []
        for obs in observations:
            try:
                row = func(obs)
            except (OSError, KeyError, ValueError) as exc:
                row = {"obsid": obs.obsid, "note": f"unreadable: {exc}"}
            if row is not None:
                rows.append(row)
        if rows:
            blocks.append(format_table(title, rows))
    rows = map_rows(root, observations)
    if rows:
        blocks.append(
            format_table(
                "Continuum maps vs the beam-convolved truth binned like the data "
                "(fitted scale a and offset b; χ²/N off the compact HII regions)",
                rows,
            )
        )
    rows = jackknife_rows(root)
    if rows:
        blocks.append(
            format_table(
                "Jackknife differences (A − B)/2: χ²/N against the RMS HDU (weighted mean removed), "
                "N pixels and N_eff (χ²/N scatters by sqrt(2/N_eff))",
                rows,
            )
        )
    from utils.simulator.cube_report import cube_rows

    rows = cube_rows(root, [o.level1 for o in observations])
    if rows:
        blocks.append(
            format_table(
                "RRL cubes vs truth (absolute zeroth moment on region 1 and over the map; the scale "
                "with a free zero level as an extra column; docs/mapmaking.md#truth-tests)",
                rows,
            )
        )
    return "\n\n".join(blocks)
