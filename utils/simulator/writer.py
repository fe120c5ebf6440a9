"""Write one simulated level-1 file (level-1 format, simulator signal model), streaming per feed and time
chunk.

Memory: besides the per-chunk arrays ``(n_bands, n_channels, time_chunk)``, only full-length
vectors of one feed (δg and its pointing) and the common boresight/timeline vectors are held.
The file is written to ``<name>.partial`` and renamed when complete
(docs/simulator.md#determinism-and-bounded-memory).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import h5py
import numpy as np

from utils import level1_layout as L1
from utils.constants import BAND_NAMES, BAND_WIDTH_GHZ, GROUND_FEED, level1_file_name
from utils.coordinates import icrs_to_galactic
from utils.rrl import lsrk_correction_kms

from .bursts import apply_nan_bursts, plan_nan_bursts, write_burst_truth
from .components import ComponentSky, with_components
from .instrument import (
    STREAM_GAIN_FLUCTUATION,
    STREAM_WHITE_NOISE,
    atmosphere_zenith_k,
    channel_width_hz,
    feed_instrument,
    focal_plane_offsets_arcmin,
    frequency_grid_ghz,
    gain_fluctuations,
    half_band_mean_frequencies_ghz,
    observation_rng,
)
from .pointing import SECONDS_PER_DAY, altaz_to_icrs_feeds, feed_azel
from .scans import Timeline, build_timeline
from .sky import FeedChunk, GalacticSky, make_sky
from .spec import ObservationSpec
from .truth import TruthAccumulator, vane_selection, write_truth

log = logging.getLogger("comap.simulator")

SIMULATOR_VERSION: str = "1.0"
POINTING_BLOCK: int = 16384
"""Samples per astropy AltAz→ICRS call (all feeds share one astrometry context per block)."""
TRUTH_MAP_STRIDE: int = 10
"""Every 10th in-scan pointing sample defines the truth-map extent."""


def _ds(group: h5py.Group, name: str, data=None, **kwargs) -> h5py.Dataset:
    return group.create_dataset(name, data=data, track_times=False, **kwargs)


def simulate_observation(
    spec: ObservationSpec,
    out_dir: str | os.PathLike,
    seed: int = 1,
    *,
    preset: str = "",
    timings: dict[str, float] | None = None,
    month_subdir: bool = False,
) -> Path:
    """Simulate one observation and write its level-1 file into ``out_dir``.

    Parameters
    ----------
    spec : ObservationSpec
        What to simulate.
    out_dir : path
        Directory of the output file (created if missing). The name is
        ``comap-<obsid:07d>-<YYYY-MM-DD>-<HHMMSS>.hd5`` from the scheduled start.
    seed : int
        Seed of the noise streams (and of the instrument unless ``spec.instrument_seed`` is set).
    preset : str
        Recorded in ``/truth`` attributes.
    timings : dict, optional
        Filled with wall-clock seconds per phase (timeline, pointing, tod, truth, total).
    month_subdir : bool
        Write into ``out_dir/<YYYY-MM>/`` (archive layout) instead of ``out_dir``.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    SimulatorError
        Invalid specification, or a scan outside the elevation limits.
    """
    spec.validate()
    clock = _Clock(timings)
    timeline = build_timeline(spec)
    clock.lap("timeline")
    freq = frequency_grid_ghz(spec.n_channels)
    feeds = [int(f) for f in spec.feeds]
    inst_seed = int(seed if spec.instrument_seed is None else spec.instrument_seed)
    instruments = [
        feed_instrument(
            f,
            freq,
            inst_seed,
            gain_scale=spec.gain_scale,
            t_rx_base_k=spec.t_rx_base_k,
            t_rx_slope_k_per_ghz=spec.t_rx_slope_k_per_ghz,
            t_rx_edge_k=spec.t_rx_edge_k,
            edge_width_ghz=spec.edge_width_ghz,
            t_rx_ripple_k=spec.t_rx_ripple_k,
            ripple_period_ghz=spec.ripple_period_ghz,
            t_rx_band_offsets_k=spec.t_rx_band_offsets_k,
        )
        for f in feeds
    ]
    out_dir = Path(out_dir)
    if month_subdir:
        out_dir = out_dir / timeline.utc_start[:7]
    out_dir.mkdir(parents=True, exist_ok=True)
    name = level1_file_name(spec.obsid, timeline.utc_start)
    final = out_dir / name
    partial = out_dir / (name + ".partial")
    try:
        with h5py.File(partial, "w") as h5:
            _write_header(h5, spec, timeline, freq, feeds)
            _write_hk(h5, timeline)
            boresight_radec = _write_pointing(
                h5, spec, timeline, feeds, want_boresight=spec.sky.kind == "galactic"
            )
            clock.lap("pointing")
            _simulate_tod(h5, spec, timeline, freq, feeds, instruments, seed, boresight_radec, preset, clock)
        os.replace(partial, final)
    except BaseException:
        if partial.exists():
            partial.unlink()
        raise
    clock.lap("truth")
    clock.total()
    return final


class _Clock:
    def __init__(self, out: dict | None) -> None:
        self.out = out if out is not None else {}
        self.t0 = self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.out[name] = self.out.get(name, 0.0) + now - self.t
        self.t = now

    def total(self) -> None:
        self.out["total"] = self.out.get("total", 0.0) + time.perf_counter() - self.t0


# --------------------------------------------------------------------------------------------------
def _write_header(h5: h5py.File, spec: ObservationSpec, tl: Timeline, freq, feeds) -> None:
    comap = h5.create_group("comap")
    attrs = {
        "obsid": np.int64(spec.obsid),
        "source": spec.resolved_source(),
        "comment": spec.resolved_comment(),
        "utc_start": tl.utc_start,
        "level": np.int64(1),
        "nchan": np.int64(spec.n_channels),
        "tsamp": float(1.0 / spec.sample_rate_hz),
        "features": np.int64(np.bitwise_or.reduce(tl.features)),
        "telescope": "COMAP",
        "instrument": "COMAP 26-34 GHz spectrometer (simulated)",
        "platform": "comap-reduce simulator",
        "version": SIMULATOR_VERSION,
        "pixels": ",".join(str(f) for f in feeds),
        "bw": float(BAND_WIDTH_GHZ),
    }
    for key, value in attrs.items():
        comap.attrs[key] = value
    sp = h5.create_group("spectrometer")
    _ds(sp, "MJD", tl.mjd)
    _ds(sp, "feeds", np.asarray(feeds, dtype=np.int32))
    _ds(sp, "bands", np.array(BAND_NAMES[: freq.shape[0]], dtype="S8"))
    _ds(sp, "frequency", freq)
    _ds(sp, "features", tl.features.astype(np.uint32))


def _write_hk(h5: h5py.File, tl: Timeline) -> None:
    paths = {
        "vane": L1.HK_VANE,
        "frame": L1.HK_FRAME,
        "deTracker": L1.HK_TRACKER,
        "weather": L1.HK_WEATHER,
    }
    for key, group_path in paths.items():
        if key not in tl.hk:
            continue
        grp = h5.require_group(group_path)
        g = tl.hk[key]
        for name, data in g.data.items():
            _ds(grp, name, data)
        _ds(grp, "utc", g.utc(tl.t0_mjd))


def _write_pointing(h5, spec: ObservationSpec, tl: Timeline, feeds, want_boresight: bool):
    """Feed az/el (exact inverse gnomonic) and RA/Dec (astropy per sample), written per time block."""
    n_feeds, n_tod = len(feeds), tl.n_tod
    pp = h5.require_group(L1.PIXEL_POINTING)
    dsets = {
        name: _ds(pp, name, shape=(n_feeds, n_tod), dtype=np.float64)
        for name in ("pixel_az", "pixel_el", "pixel_ra", "pixel_dec")
    }
    for name in ("pixel_xoffset", "pixel_yoffset"):
        dsets[name] = _ds(pp, name, shape=(n_feeds, n_tod), dtype=np.float32)
    offsets = focal_plane_offsets_arcmin(feeds, spec.feed_spacing_arcmin)
    x_rad = np.radians(offsets[:, 0] / 60.0)
    y_rad = np.radians(offsets[:, 1] / 60.0)
    mjd = tl.mjd
    bore = (np.empty(n_tod), np.empty(n_tod)) if want_boresight else None
    for b0 in range(0, n_tod, POINTING_BLOCK):
        b1 = min(b0 + POINTING_BLOCK, n_tod)
        az_b, el_b = tl.az_deg[b0:b1], tl.el_deg[b0:b1]
        azel = [feed_azel(az_b, el_b, float(x), float(y)) for x, y in zip(x_rad, y_rad)]
        if bore is not None:
            azel.append((az_b, el_b))
        radec = altaz_to_icrs_feeds([a for a, _ in azel], [e for _, e in azel], mjd[b0:b1])
        for i, (ra, dec) in enumerate(radec):
            if i < n_feeds:
                dsets["pixel_az"][i, b0:b1] = azel[i][0]
                dsets["pixel_el"][i, b0:b1] = azel[i][1]
                dsets["pixel_ra"][i, b0:b1] = ra
                dsets["pixel_dec"][i, b0:b1] = dec
                dsets["pixel_xoffset"][i, b0:b1] = np.float32(offsets[i, 0] / 60.0)
                dsets["pixel_yoffset"][i, b0:b1] = np.float32(offsets[i, 1] / 60.0)
            else:
                bore[0][b0:b1], bore[1][b0:b1] = ra, dec
    return bore


def _scan_doppler(tl: Timeline, boresight_radec) -> tuple[list[float], np.ndarray]:
    """LSRK correction per scan (mid-time, median boresight pointing) and the scan index each sample
    uses (the nearest scan)."""
    scans = tl.scans
    mjd = tl.mjd
    v_corr = []
    for s in scans:
        ra = boresight_radec[0][s.start : s.stop]
        dec = boresight_radec[1][s.start : s.stop]
        ra_med = (ra[0] + np.median((ra - ra[0] + 180.0) % 360.0 - 180.0)) % 360.0
        mid = 0.5 * (mjd[s.start] + mjd[s.stop - 1])
        v_corr.append(float(lsrk_correction_kms(ra_med, float(np.median(dec)), mid)))
    index = np.zeros(tl.n_tod, dtype=np.int64)
    for k in range(1, len(scans)):
        boundary = (scans[k - 1].stop + scans[k].start) // 2
        index[boundary:] = k
    return v_corr, index


def _simulate_tod(
    h5, spec: ObservationSpec, tl: Timeline, freq, feeds, instruments, seed, boresight_radec, preset, clock
) -> None:
    n_feeds, n_tod = len(feeds), tl.n_tod
    n_bands, n_ch = freq.shape
    f_s = spec.sample_rate_hz
    tc = int(spec.time_chunk)
    white_fraction = 1.0 / math.sqrt(channel_width_hz(n_ch) / f_s)
    mjd = tl.mjd
    scans = tl.scans
    span = (tl.t0_mjd, tl.t0_mjd + tl.duration_s / SECONDS_PER_DAY)
    if spec.sky.kind == "galactic":
        v_corr, doppler_index = _scan_doppler(tl, boresight_radec)
    else:
        v_corr, doppler_index = [], None
    sky = with_components(make_sky(spec, freq, tl.mjd_mid, span, v_corr), spec, freq, tl.target, tl.mjd_mid)
    t_atm = atmosphere_zenith_k(freq, spec.atm_zenith_k, spec.atm_slope_per_ghz)

    vane_hk = tl.hk["vane"]
    sel = vane_selection(
        mjd,
        [(s.start, s.stop) for s in tl.vane_events],
        vane_hk.utc(tl.t0_mjd),
        vane_hk.data["angle"],
        vane_hk.data["Tshroud"],
    )
    acc = TruthAccumulator(n_feeds, (n_bands, n_ch), sel, tl.in_scan())

    tod = _ds(
        h5["spectrometer"],
        "tod",
        shape=(n_feeds, n_bands, n_ch, n_tod),
        dtype=np.float32,
        chunks=(1, 1, min(n_ch, 128), min(tc, n_tod)),
    )
    truth_noise = h5.require_group("truth/noise")
    dg_ds = _ds(truth_noise, "dg", shape=(n_feeds, n_tod), dtype=np.float64)
    params = {name: spec.per_feed(name) for name in ("sigma_g", "alpha", "f0_hz")}
    pp = h5[L1.PIXEL_POINTING]
    bursts = plan_nan_bursts(tl, feeds, pp, sky, seed, (n_bands, n_ch))
    in_scan = tl.in_scan()
    map_l, map_b = [], []

    for ifeed, feed in enumerate(feeds):
        inst = instruments[ifeed]
        if spec.gain_fluctuations:
            rng_g = observation_rng(seed, spec.obsid, ifeed, STREAM_GAIN_FLUCTUATION)
            dg = gain_fluctuations(
                n_tod, f_s, params["sigma_g"][ifeed], params["alpha"][ifeed], params["f0_hz"][ifeed], rng_g
            )
        else:
            dg = np.zeros(n_tod)
        dg_ds[ifeed] = dg if feed != GROUND_FEED else np.full(n_tod, np.nan)
        rng_w = observation_rng(seed, spec.obsid, ifeed, STREAM_WHITE_NOISE)
        if feed == GROUND_FEED:
            _ground_feed_tod(tod, ifeed, inst, dg, spec, white_fraction, rng_w)
            apply_nan_bursts(tod, bursts, ifeed)
            continue
        pointing = {name: pp[f"pixel_{name}"][ifeed] for name in ("ra", "dec", "az", "el")}
        if in_scan.any():
            pick = np.nonzero(in_scan)[0][::TRUTH_MAP_STRIDE]
            lb = icrs_to_galactic(pointing["ra"][pick], pointing["dec"][pick])
            map_l.append(lb[0])
            map_b.append(lb[1])
        acc.start_feed(ifeed)
        _science_feed_tod(
            tod, ifeed, inst, dg, pointing, tl, sky, t_atm, doppler_index, acc, white_fraction, rng_w
        )
        acc.finish_feed()
        apply_nan_bursts(tod, bursts, ifeed)
    clock.lap("tod")

    ref_freqs = half_band_mean_frequencies_ghz(freq)
    map_points = (np.concatenate(map_l), np.concatenate(map_b)) if map_l else None
    attrs = {
        "simulator_version": SIMULATOR_VERSION,
        "seed": np.int64(seed),
        "instrument_seed": np.int64(seed if spec.instrument_seed is None else spec.instrument_seed),
        "preset": preset,
        "config_toml": spec.to_toml(),
        "mjd_start": tl.t0_mjd,
        "sample_rate_hz": f_s,
    }
    write_truth(
        h5,
        attrs=attrs,
        feeds=feeds,
        instruments=instruments,
        offsets_arcmin=focal_plane_offsets_arcmin(feeds, spec.feed_spacing_arcmin),
        white_fraction=white_fraction,
        noise_params=params,
        acc=acc,
        scans=[(s.start, s.stop, s.kind) for s in scans],
        t_atm_k=t_atm,
        sky=sky,
        ref_freqs_ghz=ref_freqs,
        map_points=map_points,
        v_corr_kms=v_corr,
    )
    if isinstance(sky, ComponentSky):
        sky.write_truth(h5["truth"])
    write_burst_truth(h5["truth"], bursts)
    base = sky.base if isinstance(sky, ComponentSky) else sky
    if isinstance(base, GalacticSky) and not base.lines:
        log.info("obsid %d: no recombination line of the configured series lies in any band", spec.obsid)


def _ground_feed_tod(tod, ifeed, inst, dg, spec, white_fraction, rng_w) -> None:
    """Feed 20: ``V = G (1 + δg) (T_rx + ground_load_k) + n``; no vane, sky or atmosphere."""
    tc = int(spec.time_chunk)
    n_tod = dg.size
    v_const = (inst.gain * (inst.t_rx_k + spec.ground_load_k))[:, :, None]
    for c0 in range(0, n_tod, tc):
        c1 = min(c0 + tc, n_tod)
        v = v_const * (1.0 + dg[c0:c1])
        _add_white_noise(v, spec.white_noise, white_fraction, rng_w)
        tod[ifeed, :, :, c0:c1] = v.astype(np.float32)


def _science_feed_tod(
    tod, ifeed, inst, dg, pointing, tl: Timeline, sky, t_atm, doppler_index, acc, white_fraction, rng_w
) -> None:
    """One science feed, chunk by chunk (docs/simulator.md#signal-model):

    ``T_in = T_rx + β T_hot + (1 − β)[T_atm / sin(el) + T_cmb + T_sky]``,
    ``V = G (1 + δg) T_in (1 + w n)`` with ``w = 1/sqrt(|Δν| τ)``.
    """
    spec = tl.spec
    tc = int(spec.time_chunk)
    n_bands, n_ch = inst.gain.shape
    n_tod = tl.n_tod
    mjd = tl.mjd
    gain = inst.gain[:, :, None]
    t_rx = inst.t_rx_k[:, :, None]
    t_atm3 = t_atm[:, :, None]
    ra, dec, az, el = pointing["ra"], pointing["dec"], pointing["az"], pointing["el"]
    for c0 in range(0, n_tod, tc):
        c1 = min(c0 + tc, n_tod)
        beta = tl.beta[c0:c1]
        chunk = FeedChunk(
            mjd[c0:c1],
            ra[c0:c1],
            dec[c0:c1],
            az[c0:c1],
            el[c0:c1],
            None if doppler_index is None else doppler_index[c0:c1],
        )
        t_in = sky.brightness_k(chunk)
        if t_in is None:
            t_in = np.zeros((n_bands, n_ch, c1 - c0))
        t_in *= 1.0 - beta
        t_in += t_atm3 * ((1.0 - beta) / np.sin(np.radians(el[c0:c1])))
        t_in += t_rx
        t_in += (1.0 - beta) * spec.t_cmb_k + beta * tl.t_hot_k[c0:c1]
        acc.add_chunk(c0, t_in)  # noise-free, δg-free truth accumulators
        v = t_in
        v *= gain
        v *= 1.0 + dg[c0:c1]
        _add_white_noise(v, spec.white_noise, white_fraction, rng_w)
        tod[ifeed, :, :, c0:c1] = v.astype(np.float32)


def _add_white_noise(v: np.ndarray, enabled: bool, white_fraction: float, rng: np.random.Generator) -> None:
    """In place: ``v ← v (1 + w n)`` with n ~ N(0, 1) drawn in (band, channel, time) C order."""
    if not enabled:
        return
    noise = rng.standard_normal(v.shape)
    noise *= white_fraction
    noise += 1.0
    v *= noise


__all__ = ["SIMULATOR_VERSION", "simulate_observation"]
