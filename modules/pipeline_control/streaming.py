"""One read of the level-1 TOD shared by several stages (docs/level2.md#streaming).

``ObservationContext`` is built once per observation: it holds the open ``Level1File``, the staging
level-2 file during a streaming pass, the observation summary and a per-observation cache of
level-2 metadata (feeds, scans; stages add their own through :meth:`ObservationContext.cached`).
``run_streaming_group`` is the driver: for every science feed and every scan it reads the block
``tod[l1_index(feed), :, :, start:stop]`` exactly once and hands it to every stage of the group,
in list order. Out-of-scan samples are never read here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from utils.block_ops import decimated_length
from utils.errors import BadCOMAPFile
from utils.h5io import RetryH5PY
from utils.level2 import FEEDS, FREQUENCY, LEVEL1_FEED_INDEX, MJD, PIXEL_AZ, PIXEL_EL, SCAN_EDGES
from utils.vane import interpolate_vane_events

if TYPE_CHECKING:  # pragma: no cover
    from utils.level1 import Level1File

#: ``calibration(ctx, feed, scan) -> (gain, tsys)``, each ``(B, C)`` float64 (StreamingStage.calibration).
Calibration = Callable[["ObservationContext", int, int], tuple[np.ndarray, np.ndarray]]

__all__ = [
    "Calibration",
    "FeedScanBlock",
    "ObservationContext",
    "check_products",
    "context_for",
    "interpolate_vane_events",
    "observation",
    "read_block",
    "run_streaming_group",
]

log = logging.getLogger("comap.streaming")

_CURRENT: contextvars.ContextVar[ObservationContext | None] = contextvars.ContextVar(
    "comap_observation", default=None
)


class ObservationContext:
    """Per-observation state shared by the modules of one level-2 run.

    Attributes
    ----------
    file_info : COMAPData
        The observation (``level2_path`` is the staging file during a run).
    obsid : int
    summary : dict
        ``observation_summary`` fields set by modules (e.g. ``median_tsys``); written to the DB
        when the observation succeeds.
    timings : dict
        Wall time per module (s).
    scratch : dict
        Per-observation working state of streaming stages (accumulators between blocks), keyed by
        stage; modules never keep per-observation state on ``self``.
    calibration_source : callable or None
        How blocks are calibrated (:data:`Calibration`); set by :func:`run_streaming_group` from
        the stages of the pass.
    buffers : dict
        Block-sized buffers of the pass (:func:`read_block`); a worker passes one dict for all its
        observations so that they are allocated once, a standalone context keeps its own.
    """

    def __init__(
        self,
        file_info: Any,
        *,
        hk_time_offset_s: float = 0.6,
        count_bytes: bool = False,
        buffers: dict[str, Any] | None = None,
    ) -> None:
        self.file_info = file_info
        self.obsid = int(file_info.obsid)
        self.hk_time_offset_s = float(hk_time_offset_s)
        self.count_bytes = bool(count_bytes)
        self.summary: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.scratch: dict[str, Any] = {}
        self.l2: Any = None
        self._l1: Level1File | None = None
        self.bytes_read_tod = 0
        self.bytes_read_total = 0
        self.tod_storage_size: int | None = None
        self.calibration_source: Calibration | None = None
        self.buffers: dict[str, Any] = {} if buffers is None else buffers
        self._cache: dict[str, Any] = {}

    # --- files ------------------------------------------------------------------------------
    @property
    def l1(self) -> Level1File:
        """The level-1 file, opened once (read-only, no locking)."""
        if self._l1 is None:
            from utils.level1 import Level1File

            path = getattr(self.file_info, "level1_path", None)
            if not path:
                raise BadCOMAPFile("observation has no level1_path in the database", obsid=self.obsid)
            self._l1 = Level1File(path, hk_time_offset_s=self.hk_time_offset_s, count_bytes=self.count_bytes)
        return self._l1

    @property
    def db(self):
        """The database facade (deferred inside workers,
        docs/database.md#single-writer-and-deferred-writes)."""
        from modules.SQLModule.SQLModule import db

        return db

    @contextlib.contextmanager
    def open_l2(self, mode: str = "a") -> Iterator[Any]:
        """Open the staging level-2 file as ``self.l2`` for the duration of the block."""
        if self.l2 is not None:
            yield self.l2
            return
        with RetryH5PY(self.file_info.level2_path, mode) as fh:
            self.l2 = fh
            try:
                yield fh
            finally:
                self.l2 = None

    def invalidate(self) -> None:
        """Forget cached level-2 metadata (call after a module changed it)."""
        self._cache.clear()

    def close(self) -> None:
        """Close the level-1 file, keeping its byte counters in ``bytes_read_tod``/``bytes_read_total``."""
        if self._l1 is not None:
            self.tod_storage_size = self._l1.tod_storage_size() if self.count_bytes else None
            self._l1.close()
            self.bytes_read_tod = int(self._l1.bytes_read_tod)
            self.bytes_read_total = int(self._l1.bytes_read_total)
            self._l1 = None

    # --- level-2 metadata ---------------------------------------------------------------------
    def cached(self, key: str, reader: Callable[[Any], Any]) -> Any:
        """``reader(open level-2 file)``, computed once per observation (until :meth:`invalidate`)."""
        if key not in self._cache:
            if self.l2 is not None:
                self._cache[key] = reader(self.l2)
            else:
                with RetryH5PY(self.file_info.level2_path, "r") as fh:
                    self._cache[key] = reader(fh)
        return self._cache[key]

    @staticmethod
    def require(fh, path: str) -> Any:
        """The contents of ``fh[path]``; BadCOMAPFile naming the path if it is missing."""
        if path not in fh:
            raise BadCOMAPFile(f"level-2 file has no {path} (is the module that writes it in the list?)")
        return fh[path][...]

    @property
    def feeds(self) -> np.ndarray:
        """Science feed numbers on the level-2 feed axis, int array ``(F,)``."""
        return self.cached("feeds", lambda fh: np.asarray(self.require(fh, FEEDS), dtype=int))

    @property
    def level1_feed_index(self) -> np.ndarray:
        return self.cached("l1idx", lambda fh: np.asarray(self.require(fh, LEVEL1_FEED_INDEX), dtype=int))

    def ifeed(self, feed: int) -> int:
        """Position of ``feed`` on the level-2 feed axis."""
        hits = np.flatnonzero(self.feeds == int(feed))
        if hits.size == 0:
            raise KeyError(f"feed {feed} is not in this level-2 file (feeds {self.feeds.tolist()})")
        return int(hits[0])

    def l1_index(self, feed: int) -> int:
        """Position of ``feed`` on the level-1 feed axis."""
        return int(self.level1_feed_index[self.ifeed(feed)])

    @property
    def scans(self) -> np.ndarray:
        """Scan edges ``(n_scans, 2)`` int64 ``[start, stop)``."""
        return self.cached("scans", lambda fh: np.asarray(self.require(fh, SCAN_EDGES), dtype=np.int64))

    @property
    def mjd(self) -> np.ndarray:
        return self.cached("mjd", lambda fh: self.require(fh, MJD))

    @property
    def sample_rate_hz(self) -> float:
        """Sample rate (Hz) from ``spectrometer/MJD`` (``utils.level1.sample_rate_from_mjd``)."""
        from utils.level1 import sample_rate_from_mjd

        return self.cached("fs", lambda fh: sample_rate_from_mjd(self.mjd))

    @property
    def frequency_ghz(self) -> np.ndarray:
        """Channel centre frequencies ``(B, C)`` in storage order, GHz."""
        return self.cached("freq", lambda fh: self.require(fh, FREQUENCY))

    def channel_scan_shape(self) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        """Shape ``(F, B, C, S)`` of a per-channel, per-scan level-2 array and its chunks (one feed)."""
        n_feeds, n_scans = len(self.feeds), len(self.scans)
        n_bands, n_chan = self.frequency_ghz.shape
        return (n_feeds, n_bands, n_chan, n_scans), (1, n_bands, n_chan, max(n_scans, 1))

    @property
    def channel_width_hz(self) -> np.ndarray:
        """Channel widths ``(B, C)`` in Hz, from the spacing of the stored frequencies."""

        def width(_fh):
            freq = self.frequency_ghz
            if freq.shape[1] < 2:
                return np.full(freq.shape, np.nan)
            d = np.abs(np.gradient(freq, axis=1)) * 1e9
            return d

        return self.cached("chanwidth", width)

    def calibration(self, feed: int, scan: int) -> tuple[np.ndarray, np.ndarray]:
        """Gain (counts/K) and Tsys (K) of ``feed`` during ``scan``, each ``(B, C)`` float64.

        Computed by :attr:`calibration_source`, the calibration function of the streaming stages.
        """
        if self.calibration_source is None:
            raise BadCOMAPFile("no calibration for the pass: no streaming stage declares a calibration")
        return self.calibration_source(self, feed, scan)

    def pointing(self, feed: int, sl: slice) -> tuple[np.ndarray, np.ndarray]:
        """Azimuth and elevation (deg) of ``feed`` over samples ``sl``, from level 2."""
        ifeed = self.ifeed(feed)
        if self.l2 is not None:
            return self.l2[PIXEL_AZ][ifeed, sl], self.l2[PIXEL_EL][ifeed, sl]
        with RetryH5PY(self.file_info.level2_path, "r") as fh:
            return fh[PIXEL_AZ][ifeed, sl], fh[PIXEL_EL][ifeed, sl]


@dataclass
class FeedScanBlock:
    """One feed × one scan of level-1 data, shared by the stages of a streaming pass.

    ``raw`` is float32 ``(B, C, n)`` counts and read-only; ``tod_k`` is ``raw / gain`` (vane K),
    computed once on first use, NaN where the gain is not finite or ≤ 0. ``decimated(stride)`` is
    ``raw[..., ::stride]`` as a compact copy, made once per block: the driver plans the stride the
    stages of the pass ask for (:meth:`plan_decimation`), and the first stage that reads every row
    anyway fills that copy in the same read (:meth:`decimation_request`).
    """

    feed: int
    ifeed: int
    scan: int
    start: int
    stop: int
    raw: np.ndarray
    mjd: np.ndarray
    az_deg: np.ndarray
    el_deg: np.ndarray
    gain: np.ndarray
    tsys: np.ndarray
    products: dict[str, Any] = field(default_factory=dict)
    decimation_stride: int = 0
    _tod_k: np.ndarray | None = None
    _decimation_buffer: np.ndarray | None = None
    _decimated: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.stop - self.start

    @property
    def tod_k(self) -> np.ndarray:
        if self._tod_k is None:
            g = np.asarray(self.gain, dtype=np.float64)
            inv = np.where(np.isfinite(g) & (g > 0), 1.0 / np.where(g > 0, g, 1.0), np.nan).astype(np.float32)
            out = self.raw * inv[:, :, None]
            out.setflags(write=False)
            self._tod_k = out
        return self._tod_k

    def decimated(self, stride: int) -> np.ndarray:
        """``raw[..., ::stride]`` as a C-contiguous read-only float32 array ``(B, C, ⌈n/stride⌉)``.

        Filled by an earlier stage of the pass when ``stride`` is :attr:`decimation_stride`,
        otherwise copied from ``raw`` on first use; either way made once per block.
        """
        stride = max(1, int(stride))
        dec = self._decimated.get(stride)
        if dec is None:
            dec = np.ascontiguousarray(self.raw[..., ::stride])
            dec.setflags(write=False)
            self._decimated[stride] = dec
        return dec

    def plan_decimation(self, stride: int, buffer: np.ndarray | None = None) -> None:
        """Ask for ``decimated(stride)`` to be taken in the first read of each row (the driver
        calls this), in ``buffer`` (flat float32, reused from block to block) if it is large enough."""
        self.decimation_stride = int(stride)
        self._decimation_buffer = buffer

    def decimation_request(self) -> tuple[int, np.ndarray] | None:
        """``(stride, buffer)`` for a stage that reads every row anyway: it may fill ``buffer``
        (float32, ``(B, C, ⌈n/stride⌉)``) with ``raw[..., ::stride]`` and then call
        :meth:`keep_decimated`. None when no stage of the pass asks for a decimated copy, or it
        is already there."""
        stride = int(self.decimation_stride)
        if stride <= 0 or stride in self._decimated:
            return None
        shape = (*self.raw.shape[:-1], decimated_length(self.n, stride))
        size = math.prod(shape)
        buf = self._decimation_buffer
        if buf is None or buf.size < size:
            buf = np.empty(size, dtype=np.float32)
        return stride, buf[:size].reshape(shape)

    def keep_decimated(self, stride: int, values: np.ndarray) -> None:
        """Record ``values`` (filled from a :meth:`decimation_request`) as ``decimated(stride)``."""
        values = values.view()
        values.setflags(write=False)
        self._decimated[int(stride)] = values


def _buffer(ctx: ObservationContext, key: str, size: int) -> np.ndarray:
    """A flat float32 buffer of at least ``size`` values from ``ctx.buffers``."""
    buf = ctx.buffers.get(key)
    if buf is None or buf.size < size:
        ctx.buffers.pop(key, None)  # free the old one before the new one is touched
        buf = ctx.buffers[key] = np.empty(size, dtype=np.float32)
    return buf


def read_block(ctx: ObservationContext, feed: int, scan: int, *, buffer: int = 0) -> FeedScanBlock:
    """Read one feed × scan block from level 1 (the only read of those bytes in a pass).

    The block is read into one of two buffers reused for the whole pass, and by a worker for all its
    observations (``ctx.buffers``, sized for the longest scan): a fresh block-sized array costs a
    page fault per 4 KiB on first touch, which takes longer than the read itself. ``block.raw`` is
    therefore only valid until that buffer is read into again.
    """
    start, stop = (int(x) for x in ctx.scans[scan])
    n_bands, n_chan = ctx.frequency_ghz.shape
    longest = int(np.max(np.diff(ctx.scans, axis=1))) if len(ctx.scans) else 0
    size = n_bands * n_chan * (stop - start)
    buf = _buffer(ctx, f"_tod_buffer{buffer}", n_bands * n_chan * longest)
    raw = buf[:size].reshape(n_bands, n_chan, stop - start)
    ctx.l1.tod_block(ctx.l1_index(feed), slice(None), slice(None), slice(start, stop), out=raw)
    raw = raw.view()
    raw.setflags(write=False)
    az, el = ctx.pointing(feed, slice(start, stop))
    gain, tsys = ctx.calibration(feed, scan)
    return FeedScanBlock(
        feed=int(feed),
        ifeed=ctx.ifeed(feed),
        scan=int(scan),
        start=start,
        stop=stop,
        raw=raw,
        mjd=ctx.mjd[start:stop],
        az_deg=np.asarray(az),
        el_deg=np.asarray(el),
        gain=gain,
        tsys=tsys,
    )


class BlockStage(Protocol):
    """What one pass over the TOD needs of a stage; :class:`modules.pipeline_control.base.StreamingStage`
    implements it."""

    provides: ClassVar[tuple[str, ...]]
    requires: ClassVar[tuple[str, ...]]
    calibration: Calibration | None
    decimation_stride: int

    def begin(self, ctx: ObservationContext) -> None: ...

    def process_block(self, ctx: ObservationContext, block: FeedScanBlock) -> None: ...

    def replay_block(self, ctx: ObservationContext, block: FeedScanBlock) -> None: ...

    def end_feed(self, ctx: ObservationContext, feed: int) -> None: ...

    def finish(self, ctx: ObservationContext) -> None: ...


def run_streaming_group(
    ctx: ObservationContext, stages: Sequence[BlockStage], active: Sequence[bool]
) -> None:
    """Drive one pass over the level-1 TOD for a group of adjacent streaming stages
    (docs/level2.md#streaming).

    Parameters
    ----------
    stages : sequence of BlockStage
        The group, in pipeline order.
    active : sequence of bool
        Which stages run; a done stage is replayed when an active one requires its products.
    """
    if not any(active):
        return
    ctx.calibration_source = next((s.calibration for s in stages if s.calibration is not None), None)
    required = {name for s, a in zip(stages, active) if a for name in s.requires}
    replaying = [not a and bool(set(s.provides) & required) for s, a in zip(stages, active)]
    users = [i for i in range(len(stages)) if active[i] or replaying[i]]
    # the decimated copy the first active stage asking for one will read (FeedScanBlock.decimated)
    strides = [int(getattr(stages[i], "decimation_stride", 0)) for i in users if active[i]]
    stride = next((s for s in strides if s > 0), 0)
    with ctx.open_l2("a"):
        ctx.invalidate()
        for i in users:
            if active[i]:
                t0 = time.perf_counter()
                stages[i].begin(ctx)
                _add_time(ctx, stages[i], t0)
        order = [(int(feed), scan) for feed in ctx.feeds for scan in range(len(ctx.scans))]
        ctx.l1.open()  # before the prefetch thread uses it
        # The next block is read in a background thread while the stages work on the current one:
        # HDF5 reads and the Cython kernels both run without the GIL.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="comap-prefetch") as prefetch:
            pending = prefetch.submit(_timed_read, ctx, *order[0], 0) if order else None
            for k, (feed, _scan) in enumerate(order):
                t_wait = time.perf_counter()
                block = pending.result()
                ctx.timings["wait_level1"] = (
                    ctx.timings.get("wait_level1", 0.0) + time.perf_counter() - t_wait
                )
                pending = (
                    prefetch.submit(_timed_read, ctx, *order[k + 1], (k + 1) % 2)
                    if k + 1 < len(order)
                    else None
                )
                if stride:
                    size = block.raw[..., 0].size * decimated_length(block.n, stride)
                    block.plan_decimation(stride, _buffer(ctx, "_decimated", size))
                for i in users:
                    t0 = time.perf_counter()
                    if active[i]:
                        stages[i].process_block(ctx, block)
                    else:
                        stages[i].replay_block(ctx, block)
                    _add_time(ctx, stages[i], t0)
                del block
                if k + 1 == len(order) or order[k + 1][0] != feed:
                    for i in users:
                        if active[i]:
                            t0 = time.perf_counter()
                            stages[i].end_feed(ctx, feed)
                            _add_time(ctx, stages[i], t0)
        for i in users:
            if active[i]:
                t0 = time.perf_counter()
                stages[i].finish(ctx)
                _add_time(ctx, stages[i], t0)
        ctx.l2.flush()


def _timed_read(ctx: ObservationContext, feed: int, scan: int, buffer: int) -> FeedScanBlock:
    t0 = time.perf_counter()
    block = read_block(ctx, feed, scan, buffer=buffer)
    ctx.timings["read_level1"] = ctx.timings.get("read_level1", 0.0) + time.perf_counter() - t0
    return block


def _add_time(ctx: ObservationContext, stage: Any, t0: float) -> None:
    name = type(stage).__name__
    ctx.timings[name] = ctx.timings.get(name, 0.0) + time.perf_counter() - t0


def check_products(stages: Sequence[Any]) -> list[str]:
    """Messages for every ``requires`` name not provided by an earlier stage of the same group."""
    problems: list[str] = []
    provided: set[str] = set()
    for s in stages:
        for name in getattr(s, "requires", ()):
            if name not in provided:
                problems.append(
                    f"{getattr(s, '__name__', type(s).__name__)} requires block product '{name}', which no "
                    "earlier streaming stage in the same pass provides (check the pipeline order)"
                )
        provided.update(getattr(s, "provides", ()))
    return problems


def context_for(file_info: Any) -> ObservationContext:
    """The running context for ``file_info`` (inside Level2Pipeline), or a new standalone one."""
    ctx = _CURRENT.get()
    if ctx is not None and ctx.obsid == int(file_info.obsid):
        return ctx
    return ObservationContext(file_info)


@contextlib.contextmanager
def observation(ctx: ObservationContext) -> Iterator[ObservationContext]:
    """Make ``ctx`` the current observation for modules called inside the block."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        ctx.close()
