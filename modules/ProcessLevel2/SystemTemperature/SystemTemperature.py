"""SystemTemperature: vane Y-factor system temperature and gain per vane event
(docs/level2.md#systemtemperature).

For every vane event (a run of decoded feature 13, docs/formats/level1.md#the-features-bit-word) the vane
angle is mapped onto spectrometer time on the vane group's own clock
(docs/formats/level1.md#housekeeping-time-alignment), the hot (vane in the beam) and cold (vane parked, sky)
samples are selected by angle (docs/formats/level1.md#vane-conventions), and for every science feed the event
span of the level-1 TOD is read once and averaged over the two states. The Y-factor gives

    Y    = V_hot / V_cold
    G    = (V_hot − V_cold) / (T_hot − T_c)            [counts/K]
    Tsys = V_cold / G = (T_hot − T_c) / (Y − 1)        [K]

with T_hot the shroud (hot-load) temperature and T_c the assumed cold-load (sky) temperature. Tsys is the
noise-equivalent system temperature: the power on the sky in the units of the calibrated data (vane K), the
quantity the radiometer equation needs (docs/level2.md#tsys-conventions). The legacy pipeline stored
``(T_hot − Y·T_c)/(Y − 1) = Tsys − T_c`` (:func:`legacy_tsys_k`), which leaves out the cold load.
A sky dip without a vane borrows the published ``level2/vane`` of obsid + 1.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray

from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from modules.pipeline_control.provenance import is_complete, mark_incomplete
from utils import level1_layout as L1
from utils import level2 as l2layout
from utils.block_ops import masked_nanmean, masked_nanmeans
from utils.constants import FEATURE_VANE, ZERO_CELSIUS_K
from utils.errors import BadCOMAPFile
from utils.kernels import median_filter as _median_kernel
from utils.level1 import HK_SCALES, Level1File, runs
from utils.vane import TSYS_CONVENTION, TSYS_CONVENTION_ATTR, TSYS_DEFINITION, noise_equivalent_tsys

VANE_GROUP = L1.HK_VANE
VANE_PATH = l2layout.VANE
SECONDS_PER_DAY = 86400.0
SkydipBorrow = Literal["next", "none"]
BORROW_CHOICES = get_args(SkydipBorrow)

__all__ = [
    "SystemTemperature",
    "VaneResult",
    "find_vane_events",
    "hot_load_temperature_k",
    "legacy_tsys_k",
    "masked_nanmean",
    "select_vane_states",
    "y_factor",
]


# ------------------------------------------------------------------------------------------------
# Pure helpers (no I/O)
# ------------------------------------------------------------------------------------------------
def find_vane_events(decoded_features: NDArray, min_event_samples: int) -> NDArray[np.int64]:
    """Vane events: maximal runs of decoded feature 13 at least ``min_event_samples`` long.

    Parameters
    ----------
    decoded_features : ndarray of int, shape (n_tod,)
        ``decode_features(spectrometer/features)``.
    min_event_samples : int
        Shorter runs are ignored (samples).

    Returns
    -------
    ndarray of int64, shape (n_events, 2)
        ``[start, stop)`` spectrometer sample indices, in time order.
    """
    ev = runs(np.asarray(decoded_features) == FEATURE_VANE)
    return ev[(ev[:, 1] - ev[:, 0]) >= int(min_event_samples)]


def select_vane_states(
    angle_deg: NDArray, hot_angle_margin_deg: float, cold_angle_min_deg: float
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Hot and cold samples of one vane event from the vane angle (docs/formats/level1.md#vane-conventions).

    Parameters
    ----------
    angle_deg : ndarray of float, shape (n,)
        Vane angle on the spectrometer samples of the event, deg (NaN where hk does not cover).
    hot_angle_margin_deg : float
        Hot samples have ``angle < θ_min + margin`` with θ_min the event's minimum angle, deg.
    cold_angle_min_deg : float
        Cold samples have ``angle > cold_angle_min_deg``, deg.

    Returns
    -------
    hot, cold : ndarray of bool, shape (n,)
        Disjoint selections (NaN angles are in neither).
    """
    a = np.asarray(angle_deg, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        empty = np.zeros(a.shape, dtype=bool)
        return empty, empty.copy()
    theta_min = float(np.min(a[finite]))
    hot = finite & (a < theta_min + float(hot_angle_margin_deg))
    cold = finite & (a > float(cold_angle_min_deg)) & ~hot
    return hot, cold


def hot_load_temperature_k(
    hk_mjd: NDArray, tshroud_c: NDArray, event_mjd_start: float, event_mjd_last: float
) -> float:
    """Hot-load temperature of one event: mean shroud temperature inside the event + 273.15 K.

    Parameters
    ----------
    hk_mjd : ndarray of float64, shape (n_hk,)
        Vane hk sample times already corrected to the spectrometer clock (MJD).
    tshroud_c : ndarray of float64, shape (n_hk,)
        Shroud temperature, °C.
    event_mjd_start, event_mjd_last : float
        MJD of the first and of the last spectrometer sample of the event.

    Returns
    -------
    float
        K. The mean over hk samples with ``start ≤ t ≤ last``; if there are none, the value
        interpolated at the event mid-time; NaN without hk data.
    """
    t = np.asarray(hk_mjd, dtype=np.float64)
    tsh = np.asarray(tshroud_c, dtype=np.float64)
    inside = (t >= event_mjd_start) & (t <= event_mjd_last) & np.isfinite(tsh)
    if inside.any():
        return float(np.mean(tsh[inside])) + ZERO_CELSIUS_K
    good = np.isfinite(t) & np.isfinite(tsh)
    if not good.any():
        return float("nan")
    mid = 0.5 * (event_mjd_start + event_mjd_last)
    return float(np.interp(mid, t[good], tsh[good])) + ZERO_CELSIUS_K


def y_factor(
    v_hot: NDArray, v_cold: NDArray, t_hot_k: float, t_cold_k: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Y-factor noise-equivalent system temperature and gain (docs/level2.md#tsys-conventions).

    Parameters
    ----------
    v_hot, v_cold : ndarray of float64, any shape (e.g. (n_bands, n_channels))
        Mean counts on the hot load and on the sky.
    t_hot_k, t_cold_k : float
        Hot- and cold-load temperatures, K.

    Returns
    -------
    tsys_k : ndarray of float64
        Noise-equivalent system temperature ``V_cold/G = (T_hot − T_c)/(Y − 1)``, K (vane K: the sky power
        in the units of the calibrated data); NaN where Y ≤ 1, V_cold ≤ 0, T_hot ≤ T_c or a value is not
        finite.
    gain : ndarray of float64
        ``(V_hot − V_cold)/(T_hot − T_c)``, counts/K; NaN under the same conditions.
    """
    v_hot = np.asarray(v_hot, dtype=np.float64)
    v_cold = np.asarray(v_cold, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = v_hot / v_cold
        tsys = (t_hot_k - t_cold_k) / (y - 1.0)
        gain = (v_hot - v_cold) / (t_hot_k - t_cold_k)
    ok = np.isfinite(y) & (y > 1.0) & (v_cold > 0.0) & bool(np.isfinite(t_hot_k) and t_hot_k > t_cold_k)
    gain = np.where(ok & np.isfinite(gain), gain, np.nan)
    tsys = np.where(ok & np.isfinite(tsys) & (tsys > 0.0), tsys, np.nan)
    return tsys, gain


def legacy_tsys_k(tsys_k: NDArray, t_cold_k: float) -> NDArray[np.float64]:
    """The legacy pipeline's vane Tsys, ``(T_hot − Y T_c)/(Y − 1) = Tsys − T_c`` (K).

    It excludes the cold-load (sky) temperature and so lies T_c (≈ 2.7 K, 6–7 %) below the noise-equivalent
    ``tsys_k``; kept only for comparison with legacy results (docs/level2.md#tsys-conventions).
    """
    return np.asarray(tsys_k, dtype=np.float64) - float(t_cold_k)


# ------------------------------------------------------------------------------------------------
# Result container
# ------------------------------------------------------------------------------------------------
@dataclass
class VaneResult:
    """Everything written to ``level2/vane`` (shapes use E events, F feeds, B bands, C channels)."""

    event_edges: NDArray[np.int64]  # (E, 2) samples
    mjd: NDArray[np.float64]  # (E,) MJD mid-times
    t_hot_k: NDArray[np.float64]  # (E,) K
    n_hot: NDArray[np.int32]  # (E,)
    n_cold: NDArray[np.int32]  # (E,)
    system_temperature: NDArray[np.float32]  # (E, F, B, C) K, noise-equivalent V_cold/G
    gain: NDArray[np.float32]  # (E, F, B, C) counts/K
    borrowed_from_obsid: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    # quicklook material (not written): per event (t_s, angle_deg, hot, cold)
    angle_traces: list[tuple[NDArray, NDArray, NDArray, NDArray]] = field(default_factory=list)


class SystemTemperature(BaseCOMAPModule):
    """Measure Tsys and gain from every vane event with the Y-factor method
    (docs/level2.md#systemtemperature).

    Writes ``level2/vane`` (system_temperature and gain ``(E, F, B, C)`` float32, event_edges
    ``(E, 2)``, mjd, t_hot_k, n_hot, n_cold) and sets ``median_tsys`` in the observation summary. The
    system temperature is the noise-equivalent ``V_cold/G`` (docs/level2.md#tsys-conventions); the group
    attribute ``tsys_convention`` says so.

    Parameters
    ----------
    t_cold_k : float
        Cold-load (sky) temperature assumed by the Y-factor, K.
    hot_angle_margin_deg : float
        Hot samples have vane angle < θ_min + margin, deg (θ_min = minimum angle in the event).
    cold_angle_min_deg : float
        Cold samples have vane angle > this, deg.
    min_state_samples : int
        Minimum number of hot and of cold samples per event (and of finite ones per channel).
    min_event_samples : int
        Feature-13 runs shorter than this (samples) are not vane events.
    skydip_borrow : {'next', 'none'}
        A sky dip without a vane event uses the published vane of obsid + 1 (``'next'``) or fails.
    plot : bool
        Write quicklook PNGs: vane angle with the hot/cold selections, Tsys and gain spectra per feed.
    plot_vane : bool
        Legacy name of the vane-angle quicklook switch; True turns on every quicklook, as ``plot``.
    plot_tsys : bool
        Legacy name of the Tsys-spectrum quicklook switch; True turns on every quicklook, as ``plot``.
    plot_dir : str
        Directory of the PNGs.
    overwrite : bool
        Recompute even if ``level2/vane`` is complete.
    """

    reads = (
        L1.FEATURES,
        L1.MJD,
        L1.HK_VANE,
        L1.TOD,
        l2layout.FEEDS,
        l2layout.LEVEL1_FEED_INDEX,
        l2layout.FREQUENCY,
    )
    writes = (VANE_PATH,)

    def __init__(
        self,
        t_cold_k: Annotated[float, Range(ge=0)] = 2.73,
        hot_angle_margin_deg: Annotated[float, Range(gt=0)] = 4.0,
        cold_angle_min_deg: Annotated[float, Range(ge=0, lt=360)] = 180.0,
        min_state_samples: Annotated[int, Range(ge=1)] = 25,
        min_event_samples: Annotated[int, Range(ge=1)] = 100,
        skydip_borrow: SkydipBorrow = "next",
        plot: bool = False,
        plot_vane: bool = False,
        plot_tsys: bool = False,
        plot_dir: str = "outputs/plots/SystemTemperature",
        overwrite: bool = False,
    ) -> None:
        self.t_cold_k = float(t_cold_k)
        self.hot_angle_margin_deg = float(hot_angle_margin_deg)
        self.cold_angle_min_deg = float(cold_angle_min_deg)
        self.min_state_samples = int(min_state_samples)
        self.min_event_samples = int(min_event_samples)
        self.skydip_borrow = str(skydip_borrow)
        self.plot = bool(plot)
        self.plot_vane = bool(plot_vane)
        self.plot_tsys = bool(plot_tsys)
        self.plot_dir = plot_dir
        self.overwrite = bool(overwrite)

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        """Measure (or borrow) the vane calibration of one observation and write ``level2/vane``."""
        ctx = self.observation_context(file_info)
        feeds = np.asarray(ctx.feeds, dtype=int)
        events = find_vane_events(ctx.l1.decoded_features(), self.min_event_samples)
        if events.shape[0] == 0:
            is_skydip = str(getattr(file_info, "source_group", "") or "").lower() == "skydip"
            if is_skydip and self.skydip_borrow == "next":
                result = self._borrow(ctx, feeds)
            else:
                raise BadCOMAPFile(f"no vane event (feature 13) in {L1.FEATURES}")
        else:
            result = self._measure(ctx, feeds, events)

        tsys = result.system_temperature
        n_finite = int(np.count_nonzero(np.isfinite(tsys)))
        if n_finite == 0:
            raise BadCOMAPFile("no finite Tsys for any feed")
        for i, feed in enumerate(feeds):
            if not np.isfinite(tsys[:, i]).any():
                self.logger.warning("feed %d has no finite Tsys in any vane event", int(feed))
        if n_finite < tsys.size:
            n_nan = tsys.size - n_finite
            self.logger.info("%d of %d Tsys values are NaN (invalid Y-factor or no data)", n_nan, tsys.size)
        median = float(np.median(tsys[np.isfinite(tsys)]))
        self._write(file_info.level2_path, feeds, result)
        ctx.summary["median_tsys"] = median
        self.logger.info(
            "%d vane event(s)%s; median Tsys %.2f K",
            len(result.mjd),
            f" borrowed from obsid {result.borrowed_from_obsid}" if result.borrowed_from_obsid else "",
            median,
        )
        if self.plot or self.plot_vane or self.plot_tsys:
            self._plot(ctx, feeds, result)

    # ------------------------------------------------------------------------------------------
    def _measure(self, ctx: Any, feeds: NDArray, events: NDArray[np.int64]) -> VaneResult:
        l1 = ctx.l1
        mjd = l1.mjd()
        t_hk = l1.hk_mjd(VANE_GROUP)
        angle_hk = l1.hk_dataset(f"{VANE_GROUP}/angle", HK_SCALES[f"{VANE_GROUP}/angle"])
        tshroud_hk = l1.hk_dataset(f"{VANE_GROUP}/Tshroud", HK_SCALES[f"{VANE_GROUP}/Tshroud"])
        for name, arr in (("angle", angle_hk), ("Tshroud", tshroud_hk)):
            if arr.shape != t_hk.shape:
                raise BadCOMAPFile(
                    f"{VANE_GROUP}: {name} has length {arr.shape[0]} but utc has {t_hk.shape[0]}"
                )
        n_bands, n_channels = l1.n_bands, l1.n_channels

        kept: list[int] = []
        t_hot, n_hot, n_cold, traces, states = [], [], [], [], []
        first_problem: str | None = None
        for k, (start, stop) in enumerate(events):
            start, stop = int(start), int(stop)
            t_ev = mjd[start:stop]
            if t_hk.size:
                angle = np.interp(t_ev, t_hk, angle_hk, left=np.nan, right=np.nan)
            else:
                angle = np.full(t_ev.shape, np.nan)
            hot, cold = select_vane_states(angle, self.hot_angle_margin_deg, self.cold_angle_min_deg)
            nh, nc = int(hot.sum()), int(cold.sum())
            if nh < self.min_state_samples or nc < self.min_state_samples:
                msg = f"vane event {k}: {nh} hot / {nc} cold samples (need >= {self.min_state_samples})"
                first_problem = first_problem or msg
                self.logger.warning("%s; event skipped", msg)
                continue
            kept.append(k)
            t_hot.append(hot_load_temperature_k(t_hk, tshroud_hk, float(mjd[start]), float(mjd[stop - 1])))
            n_hot.append(nh)
            n_cold.append(nc)
            states.append((hot, cold))
            traces.append(((t_ev - t_ev[0]) * SECONDS_PER_DAY, angle, hot, cold))
        if not kept:
            raise BadCOMAPFile(first_problem or f"no vane event (feature 13) in {L1.FEATURES}")

        n_ev, n_feeds = len(kept), len(feeds)
        tsys = np.full((n_ev, n_feeds, n_bands, n_channels), np.nan, dtype=np.float32)
        gain = np.full_like(tsys, np.nan)
        l1_index = [ctx.l1_index(int(feed)) for feed in feeds]

        def measure(e: int, i: int) -> None:
            start, stop = (int(x) for x in events[kept[e]])
            hot, cold = states[e]
            raw = l1.tod_block(l1_index[i], None, None, slice(start, stop))
            v_hot, v_cold = masked_nanmeans(raw, hot, cold, self.min_state_samples, n_threads=1)
            del raw
            tsys[e, i], gain[e, i] = y_factor(v_hot, v_cold, t_hot[e], self.t_cold_k)

        # One feed per thread: reading an event is a copy out of the page cache, bound by one core,
        # and the reads and the kernel release the GIL (docs/level2.md#systemtemperature). The first
        # read runs alone, so that a file that cannot be read fails once rather than once per thread.
        work = [(e, i) for e in range(n_ev) for i in range(n_feeds)]
        if work:
            measure(*work[0])
        pool = ThreadPoolExecutor(max_workers=max(1, int(_median_kernel.max_threads())))
        try:
            for future in [pool.submit(measure, e, i) for e, i in work[1:]]:
                future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        edges = events[kept].astype(np.int64)
        mid = 0.5 * (mjd[edges[:, 0]] + mjd[edges[:, 1] - 1])
        return VaneResult(
            event_edges=edges,
            mjd=np.asarray(mid, dtype=np.float64),
            t_hot_k=np.asarray(t_hot, dtype=np.float64),
            n_hot=np.asarray(n_hot, dtype=np.int32),
            n_cold=np.asarray(n_cold, dtype=np.int32),
            system_temperature=tsys,
            gain=gain,
            angle_traces=traces,
        )

    # ------------------------------------------------------------------------------------------
    def _borrow(self, ctx: Any, feeds: NDArray) -> VaneResult:
        """Copy the published ``level2/vane`` of obsid + 1, re-indexed onto this file's feed axis."""
        nb = ctx.obsid + 1
        prefix = f"sky dip has no vane and obsid {nb}"
        not_yet = f"{prefix} has no level-2 vane data yet; rerun with --retry-failed after it is processed"
        db = ctx.db
        jobs = db.job_table("level2", obsids=[nb])
        job = jobs[0] if jobs else None
        if job is not None and job.status == "failed":
            lines = (job.error or "").strip().splitlines()
            raise BadCOMAPFile(f"{prefix} failed: {lines[0] if lines else 'unknown error'}")
        row = db.query_data(nb)
        path = getattr(row, "level2_path", None) if row is not None else None
        if not path or not os.path.isfile(path):
            if row is not None and self._level1_has_no_vane(getattr(row, "level1_path", None)):
                raise BadCOMAPFile(f"{prefix} has no vane event")
            raise BadCOMAPFile(not_yet)

        n_bands, n_channels = ctx.l1.n_bands, ctx.l1.n_channels
        with RetryH5PY(path, "r") as nl2:
            if not is_complete(nl2, VANE_PATH):
                if self._level1_has_no_vane(getattr(row, "level1_path", None)):
                    raise BadCOMAPFile(f"{prefix} has no vane event")
                raise BadCOMAPFile(not_yet)
            grp = nl2[VANE_PATH]
            if "borrowed_from_obsid" in grp.attrs or grp["mjd"].shape[0] == 0:
                raise BadCOMAPFile(f"{prefix} has no vane event")
            their_tsys = noise_equivalent_tsys(grp)
            if tuple(their_tsys.shape[2:]) != (n_bands, n_channels):
                raise BadCOMAPFile(
                    f"{prefix} has vane data for {their_tsys.shape[2]} bands x {their_tsys.shape[3]} "
                    f"channels, this file has {n_bands} x {n_channels}"
                )
            their_feeds = np.asarray(nl2[l2layout.FEEDS][...], dtype=int)
            n_ev = their_tsys.shape[0]
            tsys = np.full((n_ev, len(feeds), n_bands, n_channels), np.nan, dtype=np.float32)
            gain = np.full_like(tsys, np.nan)
            for i, feed in enumerate(feeds):
                hits = np.flatnonzero(their_feeds == int(feed))
                if hits.size == 0:
                    self.logger.warning("feed %d is not in the vane data of obsid %d; Tsys NaN", feed, nb)
                    continue
                j = int(hits[0])
                tsys[:, i] = their_tsys[:, j]
                gain[:, i] = grp["gain"][:, j]
            their_mjd = np.asarray(grp["mjd"][...], dtype=np.float64)
            result = VaneResult(
                event_edges=np.asarray(grp["event_edges"][...], dtype=np.int64),
                mjd=their_mjd,
                t_hot_k=np.asarray(grp["t_hot_k"][...], dtype=np.float64),
                n_hot=np.asarray(grp["n_hot"][...], dtype=np.int32),
                n_cold=np.asarray(grp["n_cold"][...], dtype=np.int32),
                system_temperature=tsys,
                gain=gain,
                borrowed_from_obsid=nb,
                attrs={"borrowed_from_level2_path": os.path.abspath(path)},
            )
        mjd = ctx.l1.mjd()
        dt_min = float(np.min(np.abs(their_mjd - 0.5 * (mjd[0] + mjd[-1])))) * 24 * 60
        self.logger.info("sky dip has no vane: using the vane of obsid %d (nearest event %.1f min away)",
                         nb, dt_min)  # fmt: skip
        return result

    def _level1_has_no_vane(self, level1_path: str | None) -> bool:
        """True only if the level-1 file can be read and holds no vane event."""
        if not level1_path or not os.path.isfile(level1_path):
            return False
        try:
            with Level1File(level1_path) as l1:
                return find_vane_events(l1.decoded_features(), self.min_event_samples).shape[0] == 0
        except BadCOMAPFile:
            return False

    # ------------------------------------------------------------------------------------------
    def _write(self, level2_path: str, feeds: NDArray, result: VaneResult) -> None:
        with RetryH5PY(level2_path, "a") as l2:
            parent = l2.require_group(l2layout.LEVEL2_GROUP)
            if "vane" in parent:
                mark_incomplete(parent["vane"])
                del parent["vane"]
            grp = parent.create_group("vane")
            mark_incomplete(grp)
            axes = f"event, feed ({l2layout.FEEDS}), band, channel"
            edges = result.event_edges.astype(np.int64).reshape(-1, 2)
            items = [
                ("system_temperature", result.system_temperature.astype(np.float32), "K", axes),
                ("gain", result.gain.astype(np.float32), "counts/K", axes),
                ("event_edges", edges, "samples", "event, [start, stop)"),
                ("mjd", result.mjd.astype(np.float64), "MJD", "event (mid-time)"),
                ("t_hot_k", result.t_hot_k.astype(np.float64), "K", "event"),
                ("n_hot", result.n_hot.astype(np.int32), "samples", "event"),
                ("n_cold", result.n_cold.astype(np.int32), "samples", "event"),
            ]  # fmt: skip
            for name, data, unit, ax in items:
                ds = grp.create_dataset(name, data=data, track_times=False)
                ds.attrs["unit"] = unit
                ds.attrs["axes"] = ax
                if name == "system_temperature":
                    ds.attrs["definition"] = TSYS_DEFINITION
                self.mark_complete(ds)
            grp.attrs["t_cold_k"] = self.t_cold_k
            grp.attrs[TSYS_CONVENTION_ATTR] = TSYS_CONVENTION
            grp.attrs["hot_angle_margin_deg"] = self.hot_angle_margin_deg
            grp.attrs["cold_angle_min_deg"] = self.cold_angle_min_deg
            grp.attrs["feeds"] = np.asarray(feeds, dtype=np.int32)
            if result.borrowed_from_obsid is not None:
                grp.attrs["borrowed_from_obsid"] = int(result.borrowed_from_obsid)
                grp.attrs["event_edges_refer_to"] = f"samples of obsid {result.borrowed_from_obsid}"
            for key, value in result.attrs.items():
                grp.attrs[key] = value
            self.mark_complete(grp)

    # ------------------------------------------------------------------------------------------
    def _plot(self, ctx: Any, feeds: NDArray, result: VaneResult) -> None:
        from utils.plotting import new_figure, save_figure

        obsid = ctx.obsid
        if result.angle_traces:
            n = len(result.angle_traces)
            fig, axes = new_figure(n, 1, figsize=(8.0, 2.8 * n), squeeze=False)
            for e, (t_s, angle, hot, cold) in enumerate(result.angle_traces):
                ax = axes[e, 0]
                ax.plot(t_s, angle, color="0.5", lw=1, label="vane angle")
                ax.plot(t_s[hot], angle[hot], ".", color="tab:red", ms=3, label=f"hot ({hot.sum()})")
                ax.plot(t_s[cold], angle[cold], ".", color="tab:blue", ms=3, label=f"cold ({cold.sum()})")
                start, stop = result.event_edges[e]
                t_hot = result.t_hot_k[e]
                ax.set_title(
                    f"obsid {obsid} vane event {e}: samples [{start}, {stop}), T_hot = {t_hot:.2f} K"
                )
                ax.set_xlabel("time since event start [s]")
                ax.set_ylabel("angle [deg]")
                ax.legend(loc="best", fontsize="small")
            save_figure(fig, os.path.join(self.plot_dir, f"{obsid:07d}_vane.png"))
        freq = ctx.frequency_ghz
        for i, feed in enumerate(feeds):
            fig, (ax_t, ax_g) = new_figure(2, 1, figsize=(8.0, 6.0), sharex=True)
            for e in range(len(result.mjd)):
                for b in range(freq.shape[0]):
                    order = np.argsort(freq[b])
                    label = f"event {e}" if b == 0 else None
                    color = f"C{e % 10}"
                    nu = freq[b, order]
                    ax_t.plot(nu, result.system_temperature[e, i, b, order], color=color, label=label)
                    ax_g.plot(nu, result.gain[e, i, b, order], color=color)
            title = f"obsid {obsid} feed {int(feed)}"
            if result.borrowed_from_obsid is not None:
                title += f" (vane of obsid {result.borrowed_from_obsid})"
            ax_t.set_title(title)
            ax_t.set_ylabel("Tsys [K]")
            ax_g.set_ylabel("gain [counts/K]")
            ax_g.set_xlabel("frequency [GHz]")
            ax_t.legend(loc="best", fontsize="small")
            save_figure(fig, os.path.join(self.plot_dir, f"{obsid:07d}_tsys_feed{int(feed):02d}.png"))
