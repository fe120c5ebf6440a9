"""Gain-filter transfer function: what the level-2 chain keeps of known sky
(docs/level2.md#gain-filter-transfer-function).

For each scan kind (CES, raster, Lissajous) and each injected spectrum, twin level-1 observations
that differ only in their sky (same pointing, vane, white noise, gain fluctuations and NaNs; see
``utils.simulator.variety.sky_free_twin``) are reduced with the default level-2 chain. The
difference of the twins is the sky as the chain saw it, without noise:

* ``tod`` — regression of the twin difference of ``binned_filtered_data`` (after the gain filter)
  on that of ``binned_data`` (before it), per band, over the samples where the sky is above 10 % of
  its peak;
* ``chain`` — the same for ``binned_cleaned_data`` (after PostBinCleaning too);
* ``map`` — the same regression between the two twin-difference maps binned on a 1.5′ grid.

On calibrator observations (with NaN bursts on source crossings, :func:`calibrator_bursts`) the
flux that ``CalibratorFitting`` fits to the filtered TOD is compared with its fit to the TOD before
the filter. ``white`` is the pair-difference white noise of the
filtered TOD of the sky-free twin over the radiometer σ of the bin (from the simulator's truth).

Run: ``python -m benchmarks.transfer_function [--channels 1024] [--scans ces raster] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from utils.simulator.component_spec import NaNBurst, SkyComponent
from utils.simulator.spec import ObservationSpec
from utils.simulator.variety import CALIBRATOR_SCANS, calibrator_observation, field_observation, sky_free_twin
from utils.simulator.writer import simulate_observation

SCAN_KINDS: tuple[str, ...] = ("ces", "raster", "lissajous")
RECEIVERS: dict[str, dict[str, Any]] = {
    "default": {},
    "weakly-curved": {"t_rx_band_offsets_k": [0.0, 0.5, -0.5, 0.3], "t_rx_ripple_k": 0.2, "t_rx_edge_k": 3.0},
    "linear": {"t_rx_band_offsets_k": [0.0, 0.0, 0.0, 0.0], "t_rx_ripple_k": 0.0, "t_rx_edge_k": 0.0},
}
"""Receiver temperature shapes: the simulator's (band steps, ripple and edges; z/Σω ≈ 2×10⁻³ at 64
channels), a weakly curved one (z/Σω ≈ 8×10⁻⁵) and one linear in frequency (z/Σω ≈ 10⁻⁷)."""
SIGNAL_FRACTION = 0.1
"""Samples (or pixels) whose twin-difference sky exceeds this fraction of its peak enter a regression."""
MAP_PIXEL_ARCMIN = 1.5


def spectra() -> dict[str, SkyComponent]:
    """The injected skies, one per twin pair, all near the scan centre (offsets in deg)."""
    return {
        "point a=-0.3": SkyComponent(
            shape="point", unit="Jy", amplitude=20.0, index=-0.3, lon_deg=0.05, lat_deg=0.03
        ),
        "point a=+2.0": SkyComponent(
            shape="point", unit="Jy", amplitude=20.0, index=2.0, lon_deg=0.05, lat_deg=0.03
        ),
        "free-free 4'": SkyComponent(
            shape="gaussian", amplitude=1.0, index=-2.1, fwhm_arcmin=4.0, lon_deg=-0.05, lat_deg=0.02
        ),
        "AME 10'": SkyComponent(
            shape="gaussian",
            spectrum="logparabola",
            amplitude=0.5,
            nu0_ghz=28.0,
            nu_peak_ghz=28.0,
            width=0.35,
            fwhm_arcmin=10.0,
            lon_deg=0.0,
            lat_deg=-0.04,
        ),
        "extended 20' b=-2.7": SkyComponent(
            shape="gaussian", amplitude=0.3, index=-2.7, fwhm_arcmin=20.0, lon_deg=0.02, lat_deg=0.0
        ),
    }


def calibrator_bursts() -> list[NaNBurst]:
    """NaN bursts of the calibrator observations, placed where a filter is most easily hurt: 30 % of
    every feed's channels for 2 s on the first crossing of the calibrator, all of feed 1's channels
    for 1 s on its last crossing, and 10 % of every feed's channels for 1 s at 5 s into the scan."""
    return [
        NaNBurst(at_source=True, crossing=0, duration_s=2.0, fraction=0.3),
        NaNBurst(at_source=True, crossing=-1, duration_s=1.0, feeds=[1], fraction=1.0),
        NaNBurst(start_s=5.0, duration_s=1.0, fraction=0.1),
    ]


def field_spec(
    scan: str, component: SkyComponent, *, obsid: int, n_channels: int, **spec_kw: Any
) -> ObservationSpec:
    """A blank field (GField30's pointing, no ridge) with one component, observed with ``scan``."""
    spec = field_observation(
        obsid,
        -1.5,
        n_channels=n_channels,
        galactic=False,
        components=[component],
        n_segments=2,
        segment_s=60.0,
    )
    if scan != "ces":
        spec = spec.replace(scan=dataclasses.replace(CALIBRATOR_SCANS[scan]))
    return spec.replace(**spec_kw) if spec_kw else spec


def level2_modules(*, gain_filter: str | None = None, calibrator: bool = False) -> list[Any]:
    """The default level-2 chain (parameter_files/level2_processing.toml) up to PostBinCleaning, at
    default settings; with ``calibrator`` also CalibratorFitting on the TOD before and after the filter."""
    from modules.ProcessLevel2.AtmosphereInObservation.AtmosphereInObservation import AtmosphereInObservation
    from modules.ProcessLevel2.CalibratorFitting.CalibratorFitting import CalibratorFitting
    from modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists import CheckLevel1FileExists
    from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File
    from modules.ProcessLevel2.FindScans.FindScans import FindScans
    from modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin import GainFilterAndBin
    from modules.ProcessLevel2.NoiseStatsLevel1.NoiseStatsLevel1 import NoiseStatsLevel1
    from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning
    from modules.ProcessLevel2.SystemTemperature.SystemTemperature import SystemTemperature

    gf = {} if gain_filter is None else {"gain_filter_name": gain_filter}
    mods = [
        CheckLevel1FileExists(),
        CreateLevel2File(),
        SystemTemperature(),
        FindScans(),
        NoiseStatsLevel1(),
        AtmosphereInObservation(),
        GainFilterAndBin(**gf),
        PostBinCleaning(),
    ]
    if calibrator:
        mods += [
            CalibratorFitting(),
            CalibratorFitting(
                calibrator_fit_group_name="calibrator_fit_unfiltered", tod_dataset="level2/binned_data"
            ),
        ]
    return mods


def reduce(level1: Path, out: Path, **kw: Any) -> Path:
    """Level 2 of one file with :func:`level2_modules` (``kw``: its keywords)."""
    from modules.ProcessLevel2.observation import reduce_in_process

    l2, _ctx, _ops = reduce_in_process(level1, out, level2_modules(**kw))
    return l2


def _regress(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size == 0:
        return float("nan")
    sel = np.abs(x) > SIGNAL_FRACTION * np.max(np.abs(x))
    den = float(np.sum(x[sel] ** 2))
    return float(np.sum(x[sel] * y[sel]) / den) if den > 0 else float("nan")


def _binned_map(tod: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Mean of ``tod (F, n)`` per 1.5′ pixel of the feeds' pointing (all feeds in one map)."""
    ok = np.isfinite(tod) & np.isfinite(ra) & np.isfinite(dec)
    dec0 = float(np.nanmedian(dec))
    x = np.floor(ra[ok] * np.cos(np.radians(dec0)) * 60.0 / MAP_PIXEL_ARCMIN).astype(np.int64)
    y = np.floor(dec[ok] * 60.0 / MAP_PIXEL_ARCMIN).astype(np.int64)
    key = (x - x.min()) * (int(y.max() - y.min()) + 1) + (y - y.min())
    _, inv = np.unique(key, return_inverse=True)
    hits = np.bincount(inv)
    return np.bincount(inv, weights=tod[ok]) / hits


def injected_sky(level1_sky: Path, level1_free: Path, l2: Path) -> np.ndarray:
    """The injected sky as the chain's binning sees it, ``(F, B, K, N)`` vane K: the level-1 twin
    difference over the vane gain (mean of the events), binned with the level-2 binning weights;
    NaN outside scans."""
    with h5py.File(l2, "r") as f:
        idx = f["spectrometer/level1_feed_index"][...]
        gain = np.nanmean(f["level2/vane/gain"][...], axis=0)  # (F, B, C)
        weights = f["level2/binning_weights"][...]  # (F, B, C, S)
        edges = f["level2/scan_edges"][...]
        n_bin = f["level2/binned_data"].shape[2]
        n_tod = f["level2/binned_data"].shape[3]
    out = np.full((idx.size, gain.shape[1], n_bin, n_tod), np.nan)
    with h5py.File(level1_sky, "r") as a, h5py.File(level1_free, "r") as b:
        for i, pos in enumerate(idx):
            for s_i, (lo, hi) in enumerate(edges):
                d = (
                    a["spectrometer/tod"][pos, :, :, lo:hi] - b["spectrometer/tod"][pos, :, :, lo:hi]
                ).astype(np.float64)
                t = d / gain[i][:, :, None]
                w = weights[i, :, :, s_i].astype(np.float64)
                n_b, n_c = w.shape
                w = w.reshape(n_b, n_bin, n_c // n_bin)
                t = t.reshape(n_b, n_bin, n_c // n_bin, hi - lo)
                ok = np.isfinite(t) & (w[..., None] > 0)
                num = np.where(ok, t * w[..., None], 0.0).sum(axis=2)
                den = np.where(ok, w[..., None], 0.0).sum(axis=2)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[i, :, :, lo:hi] = np.where(den > 0, num / den, np.nan)
    return out


def _regress_offsets(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> float:
    """Slope of ``y`` on ``x`` (both ``(F, K, N)`` of one band) with a free offset per feed, bin and
    scan (the chain removes each scan's level), over the samples above 10 % of the peak of ``x``."""
    xs, ys = [], []
    for lo, hi in edges:
        xx, yy = x[..., lo:hi], y[..., lo:hi]
        ok = np.isfinite(xx) & np.isfinite(yy)
        mx = np.nanmean(np.where(ok, xx, np.nan), axis=-1, keepdims=True)
        my = np.nanmean(np.where(ok, yy, np.nan), axis=-1, keepdims=True)
        xs.append(np.where(ok, xx - mx, np.nan).ravel())
        ys.append(np.where(ok, yy - my, np.nan).ravel())
    return _regress(np.concatenate(xs), np.concatenate(ys))


def measure_pair(l2_sky: Path, l2_free: Path, level1_free: Path, level1_sky: Path) -> dict[str, Any]:
    """Per-band transfer of one twin pair (module docstring)."""
    with h5py.File(l2_sky, "r") as a, h5py.File(l2_free, "r") as b:
        before = a["level2/binned_data"][...] - b["level2/binned_data"][...]
        after = a["level2/binned_filtered_data"][...] - b["level2/binned_filtered_data"][...]
        cleaned = a["level2/binned_cleaned_data"][...] - b["level2/binned_cleaned_data"][...]
        ra = a["spectrometer/pixel_pointing/pixel_ra"][...]
        dec = a["spectrometer/pixel_pointing/pixel_dec"][...]
        z_ratio = a["level2/gain_filter/z_ratio"][...]
        noise = {"white": b["level2/binned_filtered_data"][...], "white_before": b["level2/binned_data"][...]}
        mask = b["level2/channel_mask"][...]
        feeds = b["spectrometer/feeds"][...]
        gain_hat = b["level2/gain_filter/gain"][...]
        edges = b["level2/scan_edges"][...]
    with h5py.File(level1_free, "r") as f1:
        l1_feeds = list(f1["spectrometer/feeds"][...])
        radiometer = f1["truth/noise/radiometer_sigma_k"][...]
        dg = f1["truth/noise/dg"][...]
    injected = injected_sky(level1_sky, level1_free, l2_free)
    n_feed, n_band, n_bin, _ = before.shape
    out: dict[str, Any] = {
        "tod": [],
        "map": [],
        "truth_binned": [],
        "truth_filtered": [],
        "chain": [],
        "white": [],
        "white_before": [],
    }
    for band in range(n_band):
        out["tod"].append(_regress(before[:, band].ravel(), after[:, band].ravel()))
        out["truth_binned"].append(_regress_offsets(injected[:, band], before[:, band], edges))
        out["truth_filtered"].append(_regress_offsets(injected[:, band], after[:, band], edges))
        out["chain"].append(_regress_offsets(injected[:, band], cleaned[:, band], edges))
        m_before = _binned_map(before[:, band, 0], ra, dec)
        m_after = _binned_map(after[:, band, 0], ra, dec)
        out["map"].append(_regress(m_before, m_after))
        for key, tod in noise.items():
            out[key].append(_white_ratio(tod[:, band], mask[:, band], radiometer[:, band], feeds, l1_feeds))
    in_scan = np.concatenate([np.arange(a, b) for a, b in edges])
    removed = []
    for i, feed in enumerate(feeds):
        g = dg[l1_feeds.index(int(feed)), in_scan]
        e = gain_hat[i, in_scan]
        ok = np.isfinite(g) & np.isfinite(e)
        if ok.sum() > 10:
            g, e = g[ok] - g[ok].mean(), e[ok] - e[ok].mean()
            removed.append(1.0 - float(np.var(g - e) / np.var(g)))
    out["gain_removed"] = float(np.median(removed)) if removed else float("nan")
    out["z_ratio"] = float(np.nanmedian(z_ratio))
    return out


def _white_ratio(tod: np.ndarray, use: np.ndarray, sigma: np.ndarray, feeds, l1_feeds) -> float:
    """Median over feeds and bins of the pair-difference white noise of ``tod (F, K, n)`` over the
    radiometer σ of the bin, ``(Σ σᵢ⁻²)^-½`` over its used channels (inverse-variance binning)."""
    n_bin = tod.shape[1]
    ratios = []
    for i, feed in enumerate(feeds):
        sig = sigma[l1_feeds.index(int(feed))]
        per = use.shape[-1] // n_bin
        for k in range(n_bin):
            s = sig[k * per : (k + 1) * per][use[i, k * per : (k + 1) * per]]
            d = np.diff(tod[i, k])
            d = d[np.isfinite(d)]
            if s.size and d.size > 10:
                ratios.append(float(np.std(d) / np.sqrt(2.0) * np.sqrt(np.sum(1.0 / s**2))))
    return float(np.median(ratios)) if ratios else float("nan")


def calibrator_flux_ratio(l2: Path) -> list[float]:
    """Median of (flux fitted after the filter)/(flux before it) per band, over the (feed, bin) fits
    whose flux before the filter is within 30 % of the calibrator's model flux: a feed whose scan
    missed the source gives a meaningless fit either way."""
    with h5py.File(l2, "r") as f:
        after = f["level2/calibrator_fit/flux"][...]
        before = f["level2/calibrator_fit_unfiltered/flux"][...]
        model = f["level2/calibrator_fit_unfiltered/model_flux"][...]
    out = []
    for b in range(before.shape[1]):
        seen = np.isfinite(after[:, b]) & (np.abs(before[:, b] / model[:, b] - 1.0) < 0.3)
        out.append(float(np.median(after[:, b][seen] / before[:, b][seen])) if seen.any() else float("nan"))
    return out


def run(
    workdir: Path,
    *,
    scans: Sequence[str] = SCAN_KINDS,
    n_channels: int = 64,
    gain_filter: str | None = None,
    spec_kw: dict[str, Any] | None = None,
    cases: Sequence[str] | None = None,
    calibrator: bool = True,
    seed: int = 1,
) -> dict[str, Any]:
    """Measure every (scan, spectrum) pair and the calibrator flux ratio; returns a nested dict."""
    spec_kw = dict(spec_kw or {})
    results: dict[str, Any] = {"n_channels": n_channels, "gain_filter": gain_filter or "default", "rows": []}
    comps = spectra()
    names = list(cases) if cases is not None else list(comps)
    for s_i, scan in enumerate(scans):
        obsid = 93000 + 100 * s_i
        if names:
            base = field_spec(scan, comps[names[0]], obsid=obsid, n_channels=n_channels, **spec_kw)
            free_dir = workdir / scan / "free"
            free_l1 = simulate_observation(sky_free_twin(base), free_dir, seed=seed)
            free_l2 = reduce(free_l1, free_dir / "l2", gain_filter=gain_filter)
        for name in names:
            spec = base.replace(sky={"components": [dataclasses.replace(comps[name])]})
            sky_dir = workdir / scan / name.replace(" ", "_").replace("'", "")
            l1 = simulate_observation(spec, sky_dir, seed=seed)
            l2 = reduce(l1, sky_dir / "l2", gain_filter=gain_filter)
            row = {"scan": scan, "sky": name, **measure_pair(l2, free_l2, free_l1, l1)}
            results["rows"].append(row)
            shutil.rmtree(sky_dir, ignore_errors=True)
        if calibrator:
            cal = calibrator_observation(
                scan, obsid=obsid + 50, n_channels=n_channels, nan_bursts=calibrator_bursts()
            ).replace(**spec_kw)
            cal_dir = workdir / scan / "calibrator"
            cal_l1 = simulate_observation(cal, cal_dir, seed=seed)
            cal_free_l1 = simulate_observation(sky_free_twin(cal), cal_dir / "free", seed=seed)
            cal_l2 = reduce(cal_l1, cal_dir / "l2", gain_filter=gain_filter, calibrator=True)
            cal_free_l2 = reduce(cal_free_l1, cal_dir / "free" / "l2", gain_filter=gain_filter)
            row = {"scan": scan, "sky": "TauA", **measure_pair(cal_l2, cal_free_l2, cal_free_l1, cal_l1)}
            row["calibrator"] = calibrator_flux_ratio(cal_l2)
            results["rows"].append(row)
    return results


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per (scan, sky), per-band TOD/map transfer, chain, white-noise ratio."""
    lines = [
        f"channels per band: {results['n_channels']}, gain filter: {results['gain_filter']}, "
        f"receiver: {results.get('receiver', 'default')}, sigma_g: {results.get('sigma_g') or 'default'}",
        "",
        "| scan | sky | gain filter: TOD, bands 0–3 | gain filter: map | vs injected: binned "
        "| vs injected: filtered | vs injected: cleaned | white/radiometer after (before) the filter "
        "| gain removed | z/Σω |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v: Sequence[float]) -> str:
        return " ".join(f"{x:.3f}" for x in v)

    for row in results["rows"]:
        lines.append(
            f"| {row['scan']} | {row['sky']} | {fmt(row['tod'])} | {fmt(row['map'])} "
            f"| {fmt(row['truth_binned'])} "
            f"| {fmt(row['truth_filtered'])} | {fmt(row['chain'])} "
            f"| {fmt(row['white'])} ({fmt(row['white_before'])}) | {row['gain_removed']:.2f} "
            f"| {row['z_ratio']:.1e} |"
        )
    flux = [row for row in results["rows"] if "calibrator" in row]
    if flux:
        lines += ["", "| scan | TauA flux fitted after / before the filter, bands 0–3 |", "|---|---|"]
        lines += [f"| {row['scan']} | {fmt(row['calibrator'])} |" for row in flux]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer_function", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--channels", type=int, default=64, help="channels per band (the degeneracy depends on it)"
    )
    parser.add_argument("--scans", nargs="+", default=list(SCAN_KINDS), choices=SCAN_KINDS)
    parser.add_argument(
        "--gain-filter", default=None, help="gain_filter_name (default: the pipeline default)"
    )
    parser.add_argument("--receiver", choices=list(RECEIVERS), default="default", help="shape of Trx(ν)")
    parser.add_argument(
        "--sigma-g", type=float, default=None, help="gain-fluctuation amplitude of the simulation"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="keep the files here (default: a temporary dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    spec_kw: dict[str, Any] = dict(RECEIVERS[args.receiver])
    if args.sigma_g is not None:
        spec_kw["sigma_g"] = args.sigma_g
    workdir = args.out or Path(tempfile.mkdtemp(prefix="transfer-"))
    t0 = time.perf_counter()
    try:
        results = run(
            workdir, scans=args.scans, n_channels=args.channels, gain_filter=args.gain_filter, spec_kw=spec_kw
        )
    finally:
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["receiver"] = args.receiver
    results["sigma_g"] = args.sigma_g
    print(format_table(results))
    print(f"\n({results['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
