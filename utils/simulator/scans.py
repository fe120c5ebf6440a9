"""Observation timeline (docs/simulator.md#vane-events, docs/simulator.md#scan-strategies-and-timeline):
segments, vane events, boresight trajectory, features, hk.

The timeline is ``[vane] slew scan (repoint scan)* slew [vane]``. Every segment has an integer
number of spectrometer samples. Times are seconds since the first sample (``t_s``); MJDs are
``t0_mjd + t_s/86400``.

Housekeeping groups have their own clocks (true times, then stamped ``+0.6 s``):

=============  =================================  ============================================
group          true sample times                  content
=============  =================================  ============================================
vane           ``0.5/f_s + k/hk_rate``            angle, Tshroud, Tvane, Tambient (int32 ×100)
frame          vane clock ``+ 0.05 s``            feature word (zero-order copy)
deTracker      vane clock ``+ 0.03 s``            lissajous_status (Lissajous observations only)
weather        ``0.25 + k/weather_rate``          air/dew-point temperature, pressure, wind
=============  =================================  ============================================

The vane clock sits half a spectrometer sample off the spectrometer grid and vane-event boundaries
are placed so that no vane hk sample falls between two spectrometer samples at an event edge. The
set of hk samples "inside the event" (used for T_hot, docs/level2.md#systemtemperature) is then the same
whether the pipeline tests ``t <= MJD[stop-1]`` or ``t < MJD[stop]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from utils.constants import (
    FEATURE_CES,
    FEATURE_LISSAJOUS,
    FEATURE_RASTER,
    FEATURE_STARE,
    FEATURE_VANE,
    HK_TIME_OFFSET_S,
    OVRO_HEIGHT_M,
    ZERO_CELSIUS_K,
)
from utils.coordinates import standard_pressure_hpa
from utils.errors import SimulatorError

from .pointing import SECONDS_PER_DAY, Target, make_target, mjd_for_hour_angle, offset_azel
from .spec import ObservationSpec, ScanSpec

VANE_WORD: int = 1 << FEATURE_VANE
SCAN_WORDS: dict[str, int] = {
    "ces": 1 << FEATURE_CES,
    "skydip": 1 << FEATURE_CES,
    "raster": 1 << FEATURE_RASTER,
    "lissajous": 1 << FEATURE_LISSAJOUS,
    "stare": 1 << FEATURE_STARE,
}
FRAME_CLOCK_OFFSET_S: float = 0.05
DETRACKER_CLOCK_OFFSET_S: float = 0.03
WEATHER_CLOCK_OFFSET_S: float = 0.25
HK_PAD_S: float = 1.0
"""Housekeeping starts about this long before the first spectrometer sample and ends after the last."""
BLOCKAGE_CLEAR_DEG: float = 170.0
BLOCKAGE_FULL_MARGIN_DEG: float = 6.0


@dataclass
class Segment:
    """``[start, stop)`` samples of one timeline segment with its feature word."""

    kind: str
    start: int
    stop: int
    word: int
    scan_index: int = -1

    @property
    def n(self) -> int:
        return self.stop - self.start


@dataclass
class HKGroup:
    """One housekeeping group: true times (s since t0) and raw datasets."""

    t_s: NDArray[np.float64]
    data: dict[str, NDArray] = field(default_factory=dict)

    def utc(self, t0_mjd: float) -> NDArray[np.float64]:
        """Stamped hk clock: true time plus 0.6 s, as MJD."""
        return t0_mjd + (self.t_s + HK_TIME_OFFSET_S) / SECONDS_PER_DAY


@dataclass
class Timeline:
    """Everything time-dependent that is common to all feeds."""

    spec: ObservationSpec
    scan: ScanSpec
    t0_mjd: float
    n_tod: int
    segments: list[Segment]
    az_deg: NDArray[np.float64]
    el_deg: NDArray[np.float64]
    features: NDArray[np.uint32]
    vane_angle_deg: NDArray[np.float64]
    beta: NDArray[np.float64]
    t_hot_k: NDArray[np.float64]
    hk: dict[str, HKGroup]
    target: Target | None

    @property
    def sample_rate_hz(self) -> float:
        return self.spec.sample_rate_hz

    @property
    def t_s(self) -> NDArray[np.float64]:
        return np.arange(self.n_tod) / self.sample_rate_hz

    @property
    def mjd(self) -> NDArray[np.float64]:
        return self.t0_mjd + self.t_s / SECONDS_PER_DAY

    @property
    def duration_s(self) -> float:
        return self.n_tod / self.sample_rate_hz

    @property
    def mjd_mid(self) -> float:
        return self.t0_mjd + 0.5 * (self.n_tod - 1) / self.sample_rate_hz / SECONDS_PER_DAY

    @property
    def scans(self) -> list[Segment]:
        return [s for s in self.segments if s.scan_index >= 0]

    @property
    def vane_events(self) -> list[Segment]:
        return [s for s in self.segments if s.kind == "vane"]

    @property
    def utc_start(self) -> str:
        from datetime import timedelta

        from astropy.time import Time

        dt = Time(self.t0_mjd, format="mjd", scale="utc").to_datetime()
        dt = (dt + timedelta(microseconds=500_000)).replace(microsecond=0)  # nearest whole second
        return dt.strftime("%Y-%m-%d-%H:%M:%S")

    def in_scan(self) -> NDArray[np.bool_]:
        mask = np.zeros(self.n_tod, dtype=bool)
        for s in self.scans:
            mask[s.start : s.stop] = True
        return mask


# --------------------------------------------------------------------------------------------------
# Vane
# --------------------------------------------------------------------------------------------------
def vane_event_seconds(spec: ObservationSpec) -> float:
    """Nominal length of one vane event: guard, move in, dwell, move out, guard (s)."""
    move = (spec.vane_park_deg - spec.vane_in_deg) / spec.vane_speed_deg_s
    return 2.0 * spec.vane_guard_s + 2.0 * move + spec.vane_dwell_s


def vane_angle_deg(t_s: NDArray, event_starts_s: list[float], spec: ObservationSpec) -> NDArray:
    """True vane angle (deg) at times ``t_s`` (s since t0) for events starting at ``event_starts_s``."""
    move = (spec.vane_park_deg - spec.vane_in_deg) / spec.vane_speed_deg_s
    knots = np.array([0.0, move, move + spec.vane_dwell_s, 2.0 * move + spec.vane_dwell_s])
    angles = np.array([spec.vane_park_deg, spec.vane_in_deg, spec.vane_in_deg, spec.vane_park_deg])
    t = np.asarray(t_s, dtype=np.float64)
    out = np.full(t.shape, spec.vane_park_deg)
    for start in event_starts_s:
        tau = t - (start + spec.vane_guard_s)
        inside = (tau > 0.0) & (tau < knots[-1])
        out[inside] = np.interp(tau[inside], knots, angles)
    return out


def blockage(angle_deg: NDArray, spec: ObservationSpec) -> NDArray[np.float64]:
    """Vane blockage β: 1 at angle ≤ in + 6°, 0 at ≥ 170°, linear in between."""
    full = spec.vane_in_deg + BLOCKAGE_FULL_MARGIN_DEG
    return np.clip((BLOCKAGE_CLEAR_DEG - np.asarray(angle_deg)) / (BLOCKAGE_CLEAR_DEG - full), 0.0, 1.0)


def tshroud_c(t_s: NDArray, duration_s: float, spec: ObservationSpec) -> NDArray[np.float64]:
    """Shroud temperature (°C): mean ``tshroud_c`` with a linear peak-to-peak drift over the observation."""
    return spec.tshroud_c + spec.tshroud_drift_c * (np.asarray(t_s, dtype=np.float64) / duration_s - 0.5)


def _hk_in_gap(boundary: int, offset_samples: float, ratio: float) -> bool:
    """True if a vane hk sample (position ``offset + k·ratio`` in sample units) lies in
    ``[boundary − 1, boundary]`` (within 1e-6 samples), i.e. between two spectrometer samples at an
    event edge."""
    eps = 1e-6
    k = math.floor((boundary - 1 - eps - offset_samples) / ratio) + 1
    return offset_samples + k * ratio < boundary + eps


# --------------------------------------------------------------------------------------------------
# Scan patterns (boresight az/el of one segment)
# --------------------------------------------------------------------------------------------------
def ces_offset_deg(t_s: NDArray, amplitude: float, speed: float, accel: float) -> NDArray[np.float64]:
    """Back-and-forth sweep of half-width ``amplitude`` with constant ``speed`` and constant-``accel``
    turnarounds; starts at the centre moving in the + direction (same units for all)."""
    d = speed**2 / (2.0 * accel)
    if d >= amplitude:
        raise SimulatorError(
            f"CES turnaround needs {d:.3f} deg but the throw is only {amplitude:.3f} deg in azimuth; "
            "lower speed_deg_s or raise accel_deg_s2/throw_deg"
        )
    t_a = speed / accel
    t_c = 2.0 * (amplitude - d) / speed
    half = 2.0 * t_a + t_c
    tau = (np.asarray(t_s, dtype=np.float64) + t_a + 0.5 * t_c) % (2.0 * half)
    sign = np.where(tau < half, 1.0, -1.0)
    tau = np.where(tau < half, tau, tau - half)
    x = np.where(
        tau < t_a,
        -amplitude + 0.5 * accel * tau**2,
        np.where(
            tau < t_a + t_c, -amplitude + d + speed * (tau - t_a), amplitude - 0.5 * accel * (half - tau) ** 2
        ),
    )
    return sign * x


def _scan_azel(seg: Segment, scan: ScanSpec, target: Target | None, t0_mjd: float, f_s: float):
    idx = np.arange(seg.start, seg.stop)
    t = (idx - seg.start) / f_s
    mjd = t0_mjd + idx / f_s / SECONDS_PER_DAY
    kind = scan.kind
    if kind == "skydip":
        ramp = (scan.el_high_deg - scan.el_low_deg) / scan.speed_deg_s
        el = np.where(
            t < ramp, scan.el_high_deg - scan.speed_deg_s * t, scan.el_low_deg + scan.speed_deg_s * (t - ramp)
        )
        el = np.clip(el, scan.el_low_deg, scan.el_high_deg)
        return np.full(t.shape, scan.az_deg % 360.0), el
    assert target is not None
    if kind == "ces":
        mid = t0_mjd + 0.5 * (seg.start + seg.stop - 1) / f_s / SECONDS_PER_DAY
        az_c, el_c = target.azel_exact(np.array([mid]))
        cos_el = math.cos(math.radians(float(el_c[0])))
        x = ces_offset_deg(t, scan.throw_deg / cos_el, scan.speed_deg_s / cos_el, scan.accel_deg_s2)
        return (float(az_c[0]) + x) % 360.0, np.full(t.shape, float(el_c[0]))
    az_s, el_s = target.azel(mjd)
    if kind == "stare":
        return az_s, el_s
    if kind == "lissajous":
        x = scan.amplitude_deg * np.sin(2.0 * np.pi * t / scan.period_x_s)
        y = scan.amplitude_deg * np.sin(2.0 * np.pi * t / scan.period_y_s + np.pi / 2.0)
        return offset_azel(az_s, el_s, x, y)
    if kind == "raster":
        row_s = 2.0 * scan.half_width_deg / scan.speed_deg_s
        j = np.floor(t / row_s).astype(np.int64)
        n = int(scan.n_rows)
        p = j % (2 * n)
        row = np.where(p < n, p, 2 * n - 1 - p)
        direction = np.where(j % 2 == 0, 1.0, -1.0)
        x = direction * (-scan.half_width_deg + scan.speed_deg_s * (t - j * row_s))
        y = (row - (n - 1) / 2.0) * scan.step_arcmin / 60.0
        return offset_azel(az_s, el_s, x, y)
    raise SimulatorError(f"unknown scan kind {kind!r}")


def _smooth_path(az0, el0, az1, el1, n: int):
    u = (np.arange(n) + 0.5) / n
    s = 0.5 * (1.0 - np.cos(np.pi * u))
    daz = (az1 - az0 + 180.0) % 360.0 - 180.0
    return (az0 + s * daz) % 360.0, el0 + s * (el1 - el0)


# --------------------------------------------------------------------------------------------------
# Timeline construction
# --------------------------------------------------------------------------------------------------
def _segment_lengths(spec: ObservationSpec, scan: ScanSpec) -> list[list]:
    f_s = spec.sample_rate_hz

    def ns(seconds: float) -> int:
        return max(1, int(round(seconds * f_s)))

    parts: list[list] = []
    n_event = ns(vane_event_seconds(spec))
    if spec.vane_at_start:
        parts.append(["vane", n_event])
    parts.append(["slew", ns(spec.slew_s)])
    for k in range(int(scan.n_segments)):
        if k:
            parts.append(["repoint", ns(scan.repoint_s)])
        parts.append([scan.kind, ns(scan.duration_s)])
    parts.append(["slew", ns(spec.slew_s)])
    if spec.vane_at_end:
        parts.append(["vane", n_event])
    # Keep vane hk samples out of the spectrometer gaps at event edges (see module docstring).
    offset, ratio = 0.5, f_s / spec.hk_rate_hz
    start = 0
    for i, part in enumerate(parts):
        if part[0] == "vane":
            while start > 0 and _hk_in_gap(start, offset, ratio):
                parts[i - 1][1] += 1
                start += 1
            while _hk_in_gap(start + part[1], offset, ratio):
                part[1] += 1
        start += part[1]
    return parts


def _hk_times(offset_s: float, rate_hz: float, k_first: int, t_last_s: float) -> NDArray[np.float64]:
    k_last = int(math.floor((t_last_s - offset_s) * rate_hz))
    return offset_s + np.arange(k_first, k_last + 1) / rate_hz


def build_timeline(spec: ObservationSpec) -> Timeline:
    """Schedule the observation and compute the boresight, features, vane state and housekeeping."""
    scan = spec.scan.resolved()
    f_s = spec.sample_rate_hz
    parts = _segment_lengths(spec, scan)
    segments: list[Segment] = []
    start = 0
    n_scans = 0
    for kind, n in parts:
        if kind == "vane":
            segments.append(Segment(kind, start, start + n, VANE_WORD))
        elif kind in ("slew", "repoint"):
            segments.append(Segment(kind, start, start + n, 0))
        else:
            segments.append(Segment(kind, start, start + n, SCAN_WORDS[kind], n_scans))
            n_scans += 1
        start += n
    n_tod = start
    duration_s = n_tod / f_s

    # ---- schedule ------------------------------------------------------------------------------
    target = make_target(spec)
    if spec.start_utc == "auto":
        if target is None:
            raise SimulatorError(f"obsid {spec.obsid}: a sky dip needs an explicit start_utc")
        mid = mjd_for_hour_angle(target, spec.date, spec.hour_angle_h)
        t0 = mid - 0.5 * (n_tod - 1) / f_s / SECONDS_PER_DAY
        t0 = round(t0 * SECONDS_PER_DAY) / SECONDS_PER_DAY  # whole UTC second (file name = start)
    else:
        from astropy.time import Time

        t0 = float(Time(spec.start_utc.replace(" ", "T"), format="isot", scale="utc").mjd)
    if target is not None:
        target.prepare_track(t0, t0 + duration_s / SECONDS_PER_DAY)

    # ---- boresight -----------------------------------------------------------------------------
    az = np.full(n_tod, np.nan)
    el = np.full(n_tod, np.nan)
    features = np.zeros(n_tod, dtype=np.uint32)
    for seg in segments:
        features[seg.start : seg.stop] = seg.word
        if seg.scan_index >= 0:
            a, e = _scan_azel(seg, scan, target, t0, f_s)
            az[seg.start : seg.stop], el[seg.start : seg.stop] = a, e
            bad = (e < spec.el_min_deg) | (e > spec.el_max_deg)
            if np.any(bad):
                raise SimulatorError(
                    f"obsid {spec.obsid}: {scan.kind} scan reaches elevation "
                    f"{e.min():.2f}–{e.max():.2f} deg, "
                    f"outside {spec.el_min_deg:g}–{spec.el_max_deg:g} deg; change hour_angle_h or start_utc"
                )
    scans = [s for s in segments if s.scan_index >= 0]
    for seg in segments:
        if seg.kind != "vane":
            continue
        if spec.sky.is_calibrator and target is not None:
            mid = t0 + 0.5 * (seg.start + seg.stop - 1) / f_s / SECONDS_PER_DAY
            a_s, e_s = target.azel(np.array([mid]))
            a_v, e_v = offset_azel(a_s, e_s, spec.vane_offset_deg, 0.0)
            a_v, e_v = float(a_v[0]), float(e_v[0])
        elif seg.start < scans[0].start:
            a_v, e_v = az[scans[0].start], el[scans[0].start]
        else:
            a_v, e_v = az[scans[-1].stop - 1], el[scans[-1].stop - 1]
        az[seg.start : seg.stop], el[seg.start : seg.stop] = a_v, e_v
    for i, seg in enumerate(segments):
        if seg.kind not in ("slew", "repoint"):
            continue
        prev_ok = i > 0
        next_ok = i + 1 < len(segments)
        a0, e0 = (az[seg.start - 1], el[seg.start - 1]) if prev_ok else (az[seg.stop], el[seg.stop])
        a1, e1 = (az[seg.stop], el[seg.stop]) if next_ok else (a0, e0)
        az[seg.start : seg.stop], el[seg.start : seg.stop] = _smooth_path(a0, e0, a1, e1, seg.n)

    # ---- vane state at spectrometer samples ---------------------------------------------------
    event_starts = [seg.start / f_s for seg in segments if seg.kind == "vane"]
    t_s = np.arange(n_tod) / f_s
    angle = vane_angle_deg(t_s, event_starts, spec)
    beta = blockage(angle, spec)
    t_hot = tshroud_c(t_s, duration_s, spec) + ZERO_CELSIUS_K

    # ---- housekeeping --------------------------------------------------------------------------
    hk = _housekeeping(spec, segments, features, event_starts, duration_s, n_tod)
    return Timeline(spec, scan, t0, n_tod, segments, az, el, features, angle, beta, t_hot, hk, target)


def _housekeeping(spec, segments, features, event_starts, duration_s, n_tod) -> dict[str, HKGroup]:
    f_s = spec.sample_rate_hz
    hk_rate = spec.hk_rate_hz
    k0 = -int(math.ceil(HK_PAD_S * hk_rate))
    vane_off = 0.5 / f_s
    end = duration_s
    groups: dict[str, HKGroup] = {}

    t = _hk_times(vane_off, hk_rate, k0, end + HK_PAD_S)
    tsh = tshroud_c(t, duration_s, spec)
    groups["vane"] = HKGroup(
        t,
        {
            "angle": _scaled(vane_angle_deg(t, event_starts, spec)),
            "Tshroud": _scaled(tsh),
            "Tvane": _scaled(tsh + 0.5),
            "Tambient": _scaled(tsh - 2.0),
        },
    )

    t = _hk_times(vane_off + FRAME_CLOCK_OFFSET_S, hk_rate, k0, end + 1.5 * HK_PAD_S)
    idx = np.floor(t * f_s + 1e-9).astype(np.int64)
    recording = (idx >= 0) & (idx < n_tod)
    words = np.where(recording, features[np.clip(idx, 0, n_tod - 1)], 0)  # idle outside the recording
    groups["frame"] = HKGroup(t, {"features": words.astype(np.uint32)})

    liss = [s for s in segments if s.kind == "lissajous"]
    if liss:
        t = _hk_times(vane_off + DETRACKER_CLOCK_OFFSET_S, hk_rate, k0 + 2, end + 0.8 * HK_PAD_S)
        status = np.zeros(t.shape, dtype=np.int32)
        for s in liss:
            status[(t >= s.start / f_s) & (t < s.stop / f_s)] = 1
        groups["deTracker"] = HKGroup(t, {"lissajous_status": status})

    wx = spec.weather_rate_hz
    t = _hk_times(WEATHER_CLOCK_OFFSET_S, wx, -int(math.ceil(2 * HK_PAD_S * wx)), end + 2 * HK_PAD_S)
    phase = 2.0 * np.pi * t / 600.0
    groups["weather"] = HKGroup(
        t,
        {
            "airTemperature": _scaled(spec.tshroud_c - 3.0 + 0.2 * np.sin(phase)),
            "dewPointTemp": _scaled(np.full(t.shape, -5.0)),
            "pressure": _scaled(standard_pressure_hpa(OVRO_HEIGHT_M) + 0.3 * np.sin(0.5 * phase)),
            "windSpeed": _scaled(3.0 + 0.5 * np.sin(phase)),
            "windDirection": _scaled(200.0 + 10.0 * np.cos(phase)),
        },
    )
    lengths = {name: g.t_s.size for name, g in groups.items() if name != "weather"}
    if len(set(lengths.values())) != len(lengths):  # pragma: no cover - guarded by the clock layout
        raise SimulatorError(f"hk groups must have different lengths, got {lengths}")
    return groups


def _scaled(values: NDArray) -> NDArray[np.int32]:
    """Housekeeping storage: ``round(x · 100)`` as int32."""
    return np.round(np.asarray(values, dtype=np.float64) * 100.0).astype(np.int32)
