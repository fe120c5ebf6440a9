"""FindScans: the scan segments of an observation (docs/level2.md#findscans).

The mode decides which per-sample predicate defines the scans:

* **lissajous** — the deTracker ``lissajous_status``, mapped onto spectrometer time with
  previous-value (zero-order hold) interpolation on its own clock, equals the "scanning" code;
* **skydip** — ``source_group == 'SkyDip'``: decoded feature == ``skydip_feature`` (the ramps);
* **feature** — decoded feature == the first code of ``scan_feature_priority`` present in the file.

Vane samples (decoded feature 13) are always excluded. Every maximal run of the predicate is one scan
``[first, last + 1)``; then the mode's trims are applied, scans are split at time gaps, long scans
are split into equal parts, and short ones dropped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from numpy.typing import NDArray

from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from modules.pipeline_control.provenance import mark_incomplete
from utils import level1_layout as L1
from utils import level2 as l2layout
from utils.constants import FEATURE_CES, FEATURE_LISSAJOUS, FEATURE_RASTER, FEATURE_STARE, FEATURE_VANE
from utils.errors import BadCOMAPFile
from utils.level1 import runs, sample_rate_from_mjd
from utils.level2 import FLAG_OUTSIDE_SCAN, FLAG_VANE

TRACKER_STATUS = L1.HK_TRACKER_STATUS
SCAN_EDGES_PATH = l2layout.SCAN_EDGES
SAMPLE_FLAGS_PATH = l2layout.SAMPLE_FLAGS
Seconds = Annotated[float, Range(ge=0)]
SECONDS_PER_DAY = 86400.0
MODE_NAMES: dict[int, str] = {
    FEATURE_CES: "ces",
    FEATURE_RASTER: "raster",
    FEATURE_LISSAJOUS: "lissajous",
    FEATURE_STARE: "stare",
}
"""``scan_mode`` attribute of feature-defined scans; other codes give ``feature<code>``."""
DEFAULT_SCAN_FEATURE_PRIORITY: tuple[int, ...] = (
    FEATURE_CES,
    FEATURE_RASTER,
    FEATURE_LISSAJOUS,
    FEATURE_STARE,
)

__all__ = ["FindScans", "sample_rate_hz", "scan_edges_from_mask", "scan_mode_name"]


def sample_rate_hz(mjd: NDArray[np.float64]) -> float:
    """Sample rate from the spectrometer clock (``utils.level1.sample_rate_from_mjd``)."""
    if np.asarray(mjd).size < 2:
        raise BadCOMAPFile(f"{L1.MJD} has fewer than 2 samples")
    return sample_rate_from_mjd(mjd)


def scan_mode_name(code: int) -> str:
    """``scan_mode`` of scans defined by decoded feature ``code`` (``ces``, ``raster``, …)."""
    return MODE_NAMES.get(int(code), f"feature{int(code)}")


def scan_edges_from_mask(
    candidate: NDArray[np.bool_],
    mjd: NDArray[np.float64],
    sample_rate_hz: float,
    *,
    trim_start_s: float = 0.0,
    trim_end_s: float = 0.0,
    max_gap_s: float = 0.1,
    max_scan_length_s: float = 600.0,
    min_scan_length_s: float = 2.0,
) -> NDArray[np.int64]:
    """Scan edges from a per-sample candidate mask (docs/level2.md#findscans steps 3–4).

    Parameters
    ----------
    candidate : ndarray of bool, shape (n_tod,)
        Samples satisfying the mode's predicate, vane samples already excluded.
    mjd : ndarray of float64, shape (n_tod,)
        Spectrometer sample times (MJD), for the time gaps.
    sample_rate_hz : float
        Converts the times below to samples.
    trim_start_s, trim_end_s : float
        Removed from the start and the end of each run, s.
    max_gap_s : float
        A time step larger than this between consecutive samples splits a scan, s.
    max_scan_length_s : float
        Scans longer than this are split into ``ceil(length / max)`` equal parts, s.
    min_scan_length_s : float
        Scans shorter than this (after trims and splits) are dropped, s.

    Returns
    -------
    ndarray of int64, shape (n_scans, 2)
        ``[start, stop)`` sample indices in time order.
    """
    fs = float(sample_rate_hz)
    cand = runs(candidate)
    n_trim_start = int(round(trim_start_s * fs))
    n_trim_end = int(round(trim_end_s * fs))
    starts = cand[:, 0] + n_trim_start
    stops = cand[:, 1] - n_trim_end
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]

    # Time gaps: a new piece starts at sample j when MJD[j] − MJD[j−1] > max_gap_s.
    gap_starts = np.flatnonzero(np.diff(np.asarray(mjd, dtype=np.float64)) * SECONDS_PER_DAY > max_gap_s) + 1
    pieces: list[tuple[int, int]] = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        lo, hi = np.searchsorted(gap_starts, [a, b], side="right")
        cuts = [a, *gap_starts[lo:hi].tolist(), b]
        cuts = sorted(set(c for c in cuts if a <= c <= b))
        pieces.extend((c0, c1) for c0, c1 in zip(cuts[:-1], cuts[1:]) if c1 > c0)

    max_n = max_scan_length_s * fs
    out: list[tuple[int, int]] = []
    for a, b in pieces:
        n = b - a
        # "Longer than the maximum" by more than half a sample (robust to rounding of f_s).
        k = max(1, math.ceil((n - 0.5) / max_n)) if max_n > 0 else 1
        bounds = [a + int(round(i * n / k)) for i in range(k + 1)]
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            if (c1 - c0) / fs >= min_scan_length_s and c1 > c0:
                out.append((c0, c1))
    return np.asarray(out, dtype=np.int64).reshape(-1, 2)


class FindScans(BaseCOMAPModule):
    """Find the scans of an observation and flag out-of-scan and vane samples (docs/level2.md#findscans).

    Writes ``level2/scan_edges`` ``(S, 2)`` int64 ``[start, stop)`` with attribute ``scan_mode``
    (``ces``, ``raster``, ``lissajous``, ``skydip`` or ``stare``), ORs bit 1 (outside any scan) and
    bit 2 (vane sample) into ``level2/sample_flags`` of every feed, and sets ``n_scans`` in the
    observation summary.

    Parameters
    ----------
    scan_feature_priority : list of int
        Decoded feature codes tried in order in feature mode; the first present defines the scans.
        The default adds stare (16) after CES, raster and Lissajous.
    lissajous_status_code : int
        deTracker ``lissajous_status`` value meaning "scanning".
    lissajous_trim_start_s : float
        Time removed from the start of each Lissajous scan, s.
    lissajous_trim_end_s : float
        Time removed from the end of each Lissajous scan, s.
    trim_start_s : float
        Time removed from the start of each feature-defined (and sky-dip) scan, s.
    trim_end_s : float
        Time removed from the end of each feature-defined (and sky-dip) scan, s.
    skydip_feature : int
        Decoded feature of the sky-dip elevation ramps.
    min_scan_length_s : float
        Shorter scans are dropped after trimming and splitting, s.
    max_scan_length_s : float
        Longer scans are split into equal parts (bounds memory), s.
    max_gap_s : float
        A time gap larger than this splits a scan, s.
    plot : bool
        Write a quicklook PNG of the features and elevation with the scan edges.
    plot_dir : str
        Directory of the PNG.
    overwrite : bool
        Recompute even if ``level2/scan_edges`` is complete.
    """

    reads = (L1.FEATURES, L1.MJD, L1.HK_TRACKER, l2layout.FEEDS, SAMPLE_FLAGS_PATH)
    writes = (SCAN_EDGES_PATH,)

    def __init__(
        self,
        scan_feature_priority: list[int] | tuple[int, ...] = DEFAULT_SCAN_FEATURE_PRIORITY,
        lissajous_status_code: int = 1,
        lissajous_trim_start_s: Seconds = 20.0,
        lissajous_trim_end_s: Seconds = 2.0,
        trim_start_s: Seconds = 0.0,
        trim_end_s: Seconds = 0.0,
        skydip_feature: int = FEATURE_CES,
        min_scan_length_s: Seconds = 2.0,
        max_scan_length_s: Annotated[float, Range(gt=0)] = 600.0,
        max_gap_s: Annotated[float, Range(gt=0)] = 0.1,
        plot: bool = False,
        plot_dir: str = "outputs/FindScans",
        overwrite: bool = False,
    ) -> None:
        self.scan_feature_priority = [int(c) for c in scan_feature_priority]
        self.lissajous_status_code = int(lissajous_status_code)
        self.lissajous_trim_start_s = float(lissajous_trim_start_s)
        self.lissajous_trim_end_s = float(lissajous_trim_end_s)
        self.trim_start_s = float(trim_start_s)
        self.trim_end_s = float(trim_end_s)
        self.skydip_feature = int(skydip_feature)
        self.min_scan_length_s = float(min_scan_length_s)
        self.max_scan_length_s = float(max_scan_length_s)
        self.max_gap_s = float(max_gap_s)
        self.plot = bool(plot)
        self.plot_dir = plot_dir
        self.overwrite = bool(overwrite)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems: list[str] = []
        prio = params["scan_feature_priority"]
        if not prio:
            problems.append(f"scan_feature_priority must be a non-empty list of integers, got {prio!r}")
        elif FEATURE_VANE in prio:
            problems.append(f"scan_feature_priority must not contain the vane feature {FEATURE_VANE}")
        if params["skydip_feature"] == FEATURE_VANE:
            problems.append(f"skydip_feature must not be the vane feature {FEATURE_VANE}")
        lo, hi = params["min_scan_length_s"], params["max_scan_length_s"]
        if hi < lo:
            problems.append(f"max_scan_length_s ({float(hi)}) must be >= min_scan_length_s ({float(lo)})")
        return problems

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        """Find the scans of one observation; write ``level2/scan_edges`` and the sample flags."""
        ctx = self.observation_context(file_info)
        l1 = ctx.l1
        n_feeds = len(ctx.feeds)
        decoded = np.asarray(l1.decoded_features())
        mjd = l1.mjd()
        fs = sample_rate_hz(mjd)
        vane = decoded == FEATURE_VANE

        status_on = None
        if l1.has_group(L1.HK_TRACKER) and l1.has_dataset(TRACKER_STATUS):
            status = l1.hk_on_spectrometer(TRACKER_STATUS, kind="previous")
            status_on = status == self.lissajous_status_code
        lissajous_present = bool(status_on is not None and status_on.any())
        is_skydip = str(getattr(file_info, "source_group", "") or "").lower() == "skydip"

        if lissajous_present:
            mode, predicate = "lissajous", status_on
            trims = (self.lissajous_trim_start_s, self.lissajous_trim_end_s)
        elif is_skydip:
            mode, predicate = "skydip", decoded == self.skydip_feature
            trims = (self.trim_start_s, self.trim_end_s)
        else:
            present = set(np.unique(decoded).tolist())
            code = next((c for c in self.scan_feature_priority if c in present), None)
            mode = scan_mode_name(code) if code is not None else "none"
            predicate = decoded == code if code is not None else np.zeros(decoded.shape, dtype=bool)
            trims = (self.trim_start_s, self.trim_end_s)

        edges = scan_edges_from_mask(
            np.asarray(predicate, dtype=bool) & ~vane,
            mjd,
            fs,
            trim_start_s=trims[0],
            trim_end_s=trims[1],
            max_gap_s=self.max_gap_s,
            max_scan_length_s=self.max_scan_length_s,
            min_scan_length_s=self.min_scan_length_s,
        )
        if edges.shape[0] == 0:
            present = sorted(int(v) for v in np.unique(decoded))
            raise BadCOMAPFile(
                f"no scans found: decoded features present {{{', '.join(map(str, present))}}}, "
                f"lissajous status present {lissajous_present}"
            )

        in_scan = np.zeros(decoded.shape, dtype=bool)
        for a, b in edges:
            in_scan[a:b] = True
        bits = np.where(in_scan, 0, FLAG_OUTSIDE_SCAN).astype(np.uint8)
        bits[vane] |= np.uint8(FLAG_VANE)
        clear = np.uint8(0xFF & ~(FLAG_OUTSIDE_SCAN | FLAG_VANE))

        with RetryH5PY(file_info.level2_path, "a") as l2:
            if SAMPLE_FLAGS_PATH not in l2:
                raise BadCOMAPFile(f"level-2 file has no {SAMPLE_FLAGS_PATH} (run CreateLevel2File first)")
            parent = l2.require_group(l2layout.LEVEL2_GROUP)
            if "scan_edges" in parent:
                mark_incomplete(parent["scan_edges"])
                del parent["scan_edges"]
            flags = l2[SAMPLE_FLAGS_PATH]
            if flags.shape != (n_feeds, decoded.size):
                expected = (n_feeds, decoded.size)
                raise BadCOMAPFile(f"{SAMPLE_FLAGS_PATH} has shape {tuple(flags.shape)}, expected {expected}")
            for ifeed in range(n_feeds):
                row = flags[ifeed]
                flags[ifeed] = (row & clear) | bits
            ds = parent.create_dataset("scan_edges", data=edges, track_times=False)
            ds.attrs["scan_mode"] = mode
            ds.attrs["unit"] = "samples"
            ds.attrs["axes"] = "scan, [start, stop)"
            self.mark_complete(ds)

        ctx.summary["n_scans"] = int(edges.shape[0])
        lengths = (edges[:, 1] - edges[:, 0]) / fs
        self.logger.info(
            "%d %s scan(s), %.1f s in total (%.1f–%.1f s each)",
            edges.shape[0], mode, lengths.sum(), lengths.min(), lengths.max(),
        )  # fmt: skip
        if self.plot:
            self._plot(ctx, decoded, mjd, edges, mode, status_on)

    # ------------------------------------------------------------------------------------------
    def _plot(
        self, ctx: Any, decoded: NDArray, mjd: NDArray, edges: NDArray, mode: str, status_on: NDArray | None
    ) -> None:
        from utils.plotting import new_figure, save_figure

        t_s = (mjd - mjd[0]) * SECONDS_PER_DAY
        feed = int(ctx.feeds[0])
        _, el = ctx.pointing(feed, slice(None))
        fig, (ax_f, ax_e) = new_figure(2, 1, figsize=(10.0, 6.0), sharex=True)
        ax_f.step(t_s, decoded, where="post", color="k", lw=1, label="decoded feature")
        if status_on is not None:
            on = np.where(status_on, FEATURE_LISSAJOUS + 1, np.nan)
            ax_f.step(t_s, on, where="post", color="tab:green", lw=2, label="Lissajous status on")
        ax_f.set_ylabel("decoded feature")
        ax_e.plot(t_s, el, color="tab:blue", lw=1)
        ax_e.set_ylabel(f"feed {feed} elevation [deg]")
        ax_e.set_xlabel(f"time since {mjd[0]:.5f} MJD [s]")
        for k, (a, b) in enumerate(edges):
            for ax in (ax_f, ax_e):
                ax.axvspan(t_s[a], t_s[b - 1], color="tab:orange", alpha=0.25, lw=0)
            ax_f.text(0.5 * (t_s[a] + t_s[b - 1]), 0.0, str(k), ha="center", va="bottom", fontsize="small")
        ax_f.set_title(f"obsid {ctx.obsid}: {len(edges)} {mode} scan(s) (shaded)")
        ax_f.legend(loc="best", fontsize="small")
        save_figure(fig, os.path.join(self.plot_dir, f"{ctx.obsid:07d}_scans.png"))
