"""Validated reader of level-1 COMAP files (docs/formats/level1.md).

This reader, with its layout (:mod:`utils.level1_layout`) and checks (:mod:`utils.level1_checks`),
is the **only** code that knows the raw level-1 layout. Everything else asks :class:`Level1File`
for typed arrays:

>>> with Level1File(path) as l1:                                   # doctest: +SKIP
...     l1.validate()                                              # checks C1–C13
(docs/formats/level1.md#validity-checks) ...     i = l1.l1_index(l1.science_feeds()[0]) ...     raw =
l1.tod_block(i, slice(None), slice(None), slice(1000, 6000))   # (bands, chans, 5000) ...     angle =
l1.hk_on_spectrometer("hk/antenna0/vane/angle", "linear", scale=0.01)

Every dimension (feeds, bands, channels, samples, sample rate) comes from the file
(docs/formats/level1.md#dimensions). Housekeeping lives on its own clocks, which run ``hk_time_offset_s`` late
(docs/formats/level1.md#housekeeping-time-alignment).
"""

from __future__ import annotations

import operator
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, NoReturn

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import GROUND_FEED, HK_TIME_OFFSET_S, obsid_from_level1_name
from utils.errors import Level1FormatError
from utils.h5io import H5OpenError, RetryH5PY, TransientIOError, one_line, retry_transient, to_python, to_str
from utils.level1_checks import Level1Checks
from utils.level1_hdf5 import (
    CountingFile,
    DirectReader,
    Index,
    Sel,
    check_position,
    next_prime,
    normalise_selection,
    read_hyperslab,
    readonly,
)
from utils.level1_layout import (
    BANDS,
    FEATURES,
    FEEDS,
    FREQUENCY,
    HK_SCALES,
    HK_VANE,
    MJD,
    PIXEL_AZ,
    PIXEL_EL,
    SECONDS_PER_DAY,
    TOD,
    decode_features,
)

__all__ = [
    "DEFAULT_RDCC_NBYTES",
    "HK_SCALES",
    "Level1File",
    "decode_features",
    "runs",
    "sample_rate_from_mjd",
]

DEFAULT_RDCC_NBYTES = 64 * 2**20
"""Default HDF5 chunk cache of ``spectrometer/tod`` (bytes)."""


# --------------------------------------------------------------------------------------------------
# Module functions
# --------------------------------------------------------------------------------------------------
def sample_rate_from_mjd(mjd: ArrayLike) -> float:
    """Sample rate (Hz) from sample times, robust to time gaps and to MJD rounding.

    The inverse of the **mean** spacing of the regular steps (those below 1.5 × the median step).
    docs/formats/level1.md#dimensions defines the rate as ``1/(86400·median(diff(MJD)))``; a float64 MJD near
    6e4 resolves only ~1 µs, so the median of single steps is uncertain at the 1e-5 level — enough to turn a
    1200 s scan into "longer than 2 × 600 s". The mean over the regular steps has the same expectation without
    that rounding noise.

    Parameters
    ----------
    mjd : array_like, shape (n,)
        Sample times, MJD; at least 2.

    Returns
    -------
    float
    """
    d = np.diff(np.asarray(mjd, dtype=np.float64))
    if d.size == 0:
        raise ValueError("need at least 2 sample times to compute a sample rate")
    med = float(np.median(d))
    regular = d[d < 1.5 * med]
    step = float(np.mean(regular)) if regular.size else med
    return 1.0 / (SECONDS_PER_DAY * step)


def runs(mask: ArrayLike) -> NDArray[np.int64]:
    """Return the maximal runs of True in a 1-D mask as half-open ``[start, stop)`` intervals.

    Parameters
    ----------
    mask : array_like of bool, shape (n,)

    Returns
    -------
    ndarray of int64, shape (n_runs, 2)
        ``[start, stop)`` sample indices of each run, in increasing order.

    Examples
    --------
    >>> runs([0, 1, 1, 0, 1]).tolist()
    [[1, 3], [4, 5]]
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 1:
        raise ValueError(f"runs() needs a 1-D mask, got shape {m.shape}")
    if m.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    edges = np.diff(m.astype(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    stops = np.flatnonzero(edges == -1)
    return np.stack([starts, stops], axis=1).astype(np.int64, copy=False)


def _norm_hk(path: str) -> str:
    p = path.strip("/")
    return p if p == "hk" or p.startswith("hk/") else f"hk/{p}"


# --------------------------------------------------------------------------------------------------
# Level1File
# --------------------------------------------------------------------------------------------------
class Level1File(Level1Checks):
    """Validated, typed reader of one level-1 file (docs/formats/level1.md).

    The file is opened lazily (first use, ``open()`` or ``with``) read-only, without HDF5 file locking,
    through :class:`utils.h5io.RetryH5PY`. ``validate()`` runs checks C1–C13 of
    docs/formats/level1.md#validity-checks.

    Parameters
    ----------
    path : str or os.PathLike
        Level-1 file, normally named ``comap-<obsid:07d>-<YYYY-MM-DD>-<HHMMSS>.hd5``.
    hk_time_offset_s : float
        Housekeeping stamps run this many seconds late w.r.t. the spectrometer clock
        (docs/formats/level1.md#housekeeping-time-alignment).
    count_bytes : bool
        Open through a counting Python file object (h5py ``driver='fileobj'``) so that
        ``bytes_read_total`` and ``bytes_read_tod`` report the bytes HDF5 really read
        (docs/operations.md#measurement-details B2). Slower; meant for benchmarks.
    rdcc_nbytes : int
        HDF5 chunk cache in bytes (file default and the ``spectrometer/tod`` dataset cache).
    direct_reads : bool
        Read boxes of ``spectrometer/tod`` straight from the file when it is stored unfiltered
        (:class:`utils.level1_hdf5.DirectReader`, docs/formats/level1.md#direct-tod-reads); False
        always reads through HDF5. The values are the same either way.
    retry : dict, optional
        Extra keywords for ``RetryH5PY`` (``max_retries``, ``retry_delay_s``, …).

    Notes
    -----
    Arrays returned by ``mjd()``, ``feeds()``, ``frequency_ghz()``, ``features()`` and
    ``decoded_features()`` are cached and **read-only**; copy them before modifying.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        hk_time_offset_s: float = HK_TIME_OFFSET_S,
        count_bytes: bool = False,
        *,
        rdcc_nbytes: int = DEFAULT_RDCC_NBYTES,
        retry: dict[str, Any] | None = None,
        direct_reads: bool = True,
    ) -> None:
        self.path: str = os.fspath(path)
        self.name: str = os.path.basename(self.path)
        self.hk_time_offset_s = float(hk_time_offset_s)
        self.count_bytes = bool(count_bytes)
        self.rdcc_nbytes = int(rdcc_nbytes)
        self._retry = dict(retry or {})
        self._f: h5py.File | None = None
        self._fobj: CountingFile | None = None
        self._tod: h5py.Dataset | None = None
        self.direct_reads = bool(direct_reads)
        self._direct: DirectReader | None | bool = None  # None: not looked at yet; False: not possible
        self._arrays: dict[str, NDArray] = {}
        self._attrs: dict[str, Any] | None = None
        self._feed_pos: dict[int, int] | None = None
        self._rate_hz: float | None = None
        self._bytes_tod = 0
        self._bytes_closed = 0
        # TOD reads may come from several threads; counting bytes (benchmarks) serialises them
        self._lock = threading.RLock()
        self.validated = False

    # ---------------------------------------------------------------------------------------- open
    def open(self) -> Level1File:
        """Open the file (C1, C2 of docs/formats/level1.md#validity-checks) if it is not open yet; return
        ``self``."""
        if self._f is not None:
            return self
        if not os.path.isfile(self.path):
            self._fail(f"level-1 file not found: {self.path}")
        kwargs: dict[str, Any] = {"locking": False, "rdcc_nbytes": self.rdcc_nbytes, "rdcc_nslots": 10007}
        target: Any = self.path
        if self.count_bytes:
            try:
                self._fobj = CountingFile(self.path)
            except OSError as exc:
                self._fail(f"cannot open level-1 file {self.path}: {one_line(exc)}")
            target = self._fobj
        try:
            self._f = RetryH5PY(target, "r", **self._retry, **kwargs).open()
        except H5OpenError as exc:
            self._close_fobj()
            cause = exc.cause if exc.attempts <= 1 else f"after {exc.attempts} attempts: {exc.cause}"
            raise Level1FormatError(
                f"cannot open level-1 file {self.path}: {cause}", obsid=self._error_obsid()
            ) from exc
        return self

    def close(self) -> None:
        """Close the HDF5 file (and the counting file object). Cached arrays stay usable."""
        self._tod = None
        if isinstance(self._direct, DirectReader):
            if self.count_bytes:
                self._bytes_closed += self._direct.bytes_read
            self._direct.close()
        self._direct = None
        if self._f is not None:
            try:
                self._f.close()
            finally:
                self._f = None
        self._close_fobj()

    def _close_fobj(self) -> None:
        if self._fobj is not None:
            self._bytes_closed += self._fobj.bytes_read
            self._fobj.close()
            self._fobj = None

    def __enter__(self) -> Level1File:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._f is not None else "closed"
        return f"Level1File({self.path!r}, {state})"

    @property
    def file(self) -> h5py.File:
        """The underlying read-only ``h5py.File`` (opened on first use)."""
        if self._f is None:
            self.open()
        assert self._f is not None
        return self._f

    # -------------------------------------------------------------------------------------- errors
    def _error_obsid(self) -> int:
        if self._f is not None:
            try:
                grp = self._f.get("comap")
                if grp is not None and "obsid" in grp.attrs:
                    v = grp.attrs["obsid"]
                    if isinstance(v, np.ndarray) and v.size == 1:
                        v = v.reshape(()).item()
                    if isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_):
                        return int(v)
            except Exception:  # best effort while already reporting an error
                pass
        named = obsid_from_level1_name(self.name)
        return -1 if named is None else named

    def _fail(self, message: str) -> NoReturn:
        raise Level1FormatError(message, obsid=self._error_obsid())

    # ------------------------------------------------------------------------------- byte counting
    @contextmanager
    def _count_tod(self) -> Iterator[None]:
        fobj = self._fobj
        if fobj is None:  # not counting: reads from several threads may overlap
            yield
            return
        with self._lock:  # the counters are shared, so counted reads take turns
            before = fobj.bytes_read
            direct_before = self._direct_bytes()
            try:
                yield
            finally:
                self._bytes_tod += fobj.bytes_read - before + self._direct_bytes() - direct_before

    def _direct_bytes(self) -> int:
        return self._direct.bytes_read if isinstance(self._direct, DirectReader) else 0

    @property
    def bytes_read_total(self) -> int:
        """Bytes HDF5 read from the file so far (all datasets and metadata); 0 unless ``count_bytes``."""
        if self._fobj is None:
            return self._bytes_closed
        return self._bytes_closed + self._fobj.bytes_read + self._direct_bytes()

    @property
    def bytes_read_tod(self) -> int:
        """Bytes read while reading ``spectrometer/tod`` (``tod_block`` and the C13 probe, including
        chunk over-reads and chunk-index metadata); 0 unless ``count_bytes``."""
        return self._bytes_tod

    def tod_storage_size(self) -> int:
        """Bytes of ``spectrometer/tod`` on disk (``dset.id.get_storage_size()``)."""
        return int(self._tod_dataset().id.get_storage_size())

    # ----------------------------------------------------------------------------------- accessors
    def _dset(self, path: str) -> h5py.Dataset:
        if not self._is_dataset(path):
            self._fail(f"missing dataset {path}")
        return self.file[path]

    def _array(self, path: str, dtype: Any = None) -> NDArray:
        """Whole (small) dataset, cached read-only."""
        arr = self._arrays.get(path)
        if arr is None:
            ds = self._dset(path)
            arr = np.asarray(self._read(path, lambda: ds[...]), dtype=dtype)
            arr = readonly(arr)
            self._arrays[path] = arr
        return arr

    def has_group(self, path: str) -> bool:
        """True if ``path`` (e.g. :data:`utils.level1_layout.HK_TRACKER`) is a group in the file."""
        try:
            return self.file.get(path.strip("/") or "/", getclass=True) is h5py.Group
        except (KeyError, OSError, RuntimeError):
            return False

    def has_dataset(self, path: str) -> bool:
        """True if ``path`` is a dataset in the file."""
        return self._is_dataset(path.strip("/"))

    def _is_dataset(self, path: str) -> bool:
        try:
            return self.file.get(path, getclass=True) is h5py.Dataset
        except (KeyError, OSError, RuntimeError):
            return False

    def hk_groups(self) -> list[str]:
        """Return every hk group that holds a ``utc`` dataset (sorted paths, e.g. ``hk/array/frame``)."""
        if not self.has_group("hk"):
            return []
        found: list[str] = []

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and obj.get("utc", getclass=True) is h5py.Dataset:
                found.append(f"hk/{name}")

        self.file["hk"].visititems(visit)
        return sorted(found)

    def attrs(self) -> dict[str, Any]:
        """Return the ``/comap`` attributes as Python types (strings decoded to ``str``)."""
        if self._attrs is None:
            grp = self.file.get("comap")
            if not isinstance(grp, h5py.Group):
                self._fail("missing attribute /comap.obsid")
            self._attrs = {k: to_python(v) for k, v in grp.attrs.items()}
        return dict(self._attrs)

    @property
    def obsid(self) -> int:
        """``/comap.obsid``."""
        a = self.attrs()
        if "obsid" not in a:
            self._fail("missing attribute /comap.obsid")
        return int(a["obsid"])

    def feeds(self) -> NDArray[np.int64]:
        """Feed number at each level-1 feed position, file order; shape (n_feeds,)."""
        return self._array(FEEDS, np.int64)

    def science_feeds(self) -> NDArray[np.int64]:
        """Feed numbers without ``GROUND_FEED``, in file order; shape (n_science,)."""
        f = self.feeds()
        return readonly(f[f != GROUND_FEED])

    def l1_index(self, feed: int) -> int:
        """Level-1 position of feed number ``feed``; ``ValueError`` if the file does not have it."""
        if self._feed_pos is None:
            self._feed_pos = {int(f): i for i, f in enumerate(self.feeds())}
        try:
            return self._feed_pos[int(feed)]
        except KeyError:
            raise ValueError(f"feed {feed} not in spectrometer/feeds {self.feeds().tolist()}") from None

    @property
    def n_feeds(self) -> int:
        """Number of feed positions (including the ground feed if present)."""
        return int(self._dset(FEEDS).shape[0])

    @property
    def n_bands(self) -> int:
        """Number of spectrometer bands (``frequency.shape[0]``)."""
        return int(self._dset(FREQUENCY).shape[0])

    @property
    def n_channels(self) -> int:
        """Native channels per band (``frequency.shape[1]``)."""
        return int(self._dset(FREQUENCY).shape[1])

    @property
    def n_tod(self) -> int:
        """Number of spectrometer samples (``len(MJD)``)."""
        return int(self._dset(MJD).shape[0])

    @property
    def tod_shape(self) -> tuple[int, int, int, int]:
        """Shape of ``spectrometer/tod``: (n_feeds, n_bands, n_channels, n_tod)."""
        s = self._tod_dataset().shape
        return (int(s[0]), int(s[1]), int(s[2]), int(s[3]))

    @property
    def tod_chunks(self) -> tuple[int, ...] | None:
        """HDF5 chunk shape of ``spectrometer/tod`` (None for contiguous storage)."""
        return self._tod_dataset().chunks

    def mjd(self) -> NDArray[np.float64]:
        """Spectrometer sample times, MJD (UTC); shape (n_tod,), read-only."""
        return self._array(MJD, np.float64)

    def sample_rate_hz(self) -> float:
        """Sample rate in Hz, ``1 / (86400 · median(diff(MJD)))``."""
        if self._rate_hz is None:
            self._rate_hz = float(1.0 / (SECONDS_PER_DAY * np.median(np.diff(self.mjd()))))
        return self._rate_hz

    def frequency_ghz(self) -> NDArray[np.float64]:
        """Channel centre frequencies in GHz, storage order; shape (n_bands, n_channels), read-only."""
        return self._array(FREQUENCY, np.float64)

    def channel_width_hz(self) -> float:
        """Channel width ``|Δν|`` in Hz: median absolute spacing of the stored frequencies."""
        return float(np.median(np.abs(np.diff(self.frequency_ghz(), axis=1))) * 1e9)

    def band_names(self) -> list[str]:
        """Band names from ``spectrometer/bands`` (informational)."""
        ds = self._dset(BANDS)
        return [to_str(b) for b in self._read(BANDS, lambda: ds[...]).ravel().tolist()]

    def features(self) -> NDArray[np.uint32]:
        """Feature word per sample (docs/formats/level1.md#the-features-bit-word); shape (n_tod,), uint32,
        read-only.

        Words stored in another integer dtype are converted (negative values become 0; both decode
        to −1).
        """
        key = f"{FEATURES}#uint32"
        arr = self._arrays.get(key)
        if arr is None:
            raw = self._array(FEATURES)
            if raw.dtype != np.uint32:
                raw = np.clip(raw, 0, np.iinfo(np.uint32).max).astype(np.uint32)
            arr = self._arrays[key] = readonly(raw)
        return arr

    def decoded_features(self) -> NDArray[np.int16]:
        """``decode_features`` of the stored words; shape (n_tod,), int16, read-only."""
        key = f"{FEATURES}#decoded"
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = readonly(decode_features(self._array(FEATURES)))
        return arr

    # ---------------------------------------------------------------------------------------- TOD
    def _tod_dataset(self) -> h5py.Dataset:
        if self._tod is None:
            ds = self._dset(TOD)
            if ds.chunks is not None:  # give the TOD its own chunk cache with a sensible hash size
                chunk_bytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
                n_fit = max(1, self.rdcc_nbytes // max(chunk_bytes, 1))
                nslots = next_prime(min(max(10 * n_fit, 521), 2_000_000))
                dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                dapl.set_chunk_cache(nslots, self.rdcc_nbytes, 1.0)
                ds = h5py.Dataset(h5py.h5d.open(self.file.id, TOD.encode(), dapl=dapl))
            self._tod = ds
        return self._tod

    def tod_block(
        self,
        ifeed: Index,
        band_slice: Sel = None,
        chan_slice: Sel = None,
        sample_slice: Sel = None,
        *,
        out: NDArray[np.float32] | None = None,
    ) -> NDArray[np.float32]:
        """Read ``tod[ifeed, band_slice, chan_slice, sample_slice]`` as float32.

        Parameters
        ----------
        ifeed : int
            Level-1 feed **position** (see ``l1_index``), not the feed number.
        band_slice, chan_slice, sample_slice : slice, int or None
            Selections on the band, channel and sample axes (None = all). Slices may have a
            positive step; an int drops that axis, as in NumPy.
        out : ndarray of float32, optional
            C-contiguous buffer of exactly the result shape to read into (reuse memory across blocks,
            e.g. ``buf[:size].reshape(shape)``). A non-contiguous ``out`` is filled through a copy.

        Returns
        -------
        ndarray of float32, shape (n_bands_sel, n_channels_sel, n_samples_sel)
            Raw spectrometer counts (axes selected by an int are dropped). NaN marks dropped values.
            This is ``out`` when given.
        """
        tod = self._tod_dataset()
        shape = tod.shape
        starts, counts, steps, keep = [operator.index(check_position(ifeed, shape[0]))], [1], [1], []
        for axis, sel in enumerate((band_slice, chan_slice, sample_slice), start=1):
            s, c, st, kept = normalise_selection(sel, shape[axis], axis)
            starts.append(s)
            counts.append(c)
            steps.append(st)
            if kept:
                keep.append(c)
        out_shape = tuple(keep)
        if out is None:
            out = np.empty(out_shape, dtype=np.float32)
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != out_shape:
                got = (getattr(out, "shape", None), getattr(out, "dtype", None))
                raise ValueError(
                    f"out must be float32 with shape {out_shape}, got shape {got[0]} dtype {got[1]}"
                )
            if not out.flags.writeable:
                raise ValueError("out is read-only")
        if 0 in counts:
            return out

        def read() -> None:
            direct = self._direct_reader() if all(st == 1 for st in steps) else None
            if direct is None or not out.flags.c_contiguous or not direct.read(starts, counts, out):
                read_hyperslab(tod, starts, counts, steps, out)

        with self._count_tod():
            self._read(TOD, read, before_retry=self._reopen_direct)
        return out

    def _read(
        self, dataset: str, read: Callable[[], Any], before_retry: Callable[[], Any] | None = None
    ) -> Any:
        """``read()`` of ``dataset``, retried on a transient error
        (docs/reliability.md#transient-io-errors-and-full-disks)."""
        try:
            return retry_transient(
                read, f"reading {dataset} of {self.path}", before_retry=before_retry, **self._retry
            )
        except TransientIOError as exc:
            exc.obsid = self._error_obsid()
            raise

    def _reopen_direct(self) -> None:
        """Before a read is retried: a new descriptor for the direct reads (HDF5 keeps its own)."""
        if isinstance(self._direct, DirectReader):
            self._direct.reopen()

    def _direct_reader(self) -> DirectReader | None:
        """The reader of docs/formats/level1.md#direct-tod-reads for the TOD, or None (HDF5 reads)."""
        if not self.direct_reads:
            return None
        if self._direct is None:
            with self._lock:
                if self._direct is None:
                    self._direct = DirectReader.for_dataset(self._tod_dataset(), self.path) or False
        return self._direct or None

    def pointing(
        self, ifeed: Index, sample_slice: Sel = None
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Azimuth and elevation of one feed's beam centre.

        Parameters
        ----------
        ifeed : int
            Level-1 feed position.
        sample_slice : slice or None
            Samples to read (None = all).

        Returns
        -------
        az_deg, el_deg : ndarray of float64, shape (n_samples_sel,)
            Degrees; azimuth from North through East, elevation without refraction correction.
        """
        result = []
        for path in (PIXEL_AZ, PIXEL_EL):
            ds = self._dset(path)
            i = operator.index(check_position(ifeed, ds.shape[0]))
            if isinstance(sample_slice, int | np.integer):
                raise TypeError("pointing() takes a slice of samples, not an int")
            s, c, st, _ = normalise_selection(sample_slice, ds.shape[1], 1)
            arr = np.empty(c, dtype=np.float64)
            if c:
                self._read(path, partial(read_hyperslab, ds, [i, s], [1, c], [1, st], arr))
            result.append(arr)
        return result[0], result[1]

    # ----------------------------------------------------------------------------------------- hk
    def hk_utc(self, group: str) -> NDArray[np.float64]:
        """Raw ``utc`` stamps (MJD, hk clock) of an hk group; shape (n_hk,), read-only."""
        return self._array(f"{_norm_hk(group)}/utc", np.float64)

    def hk_mjd(self, group: str) -> NDArray[np.float64]:
        """hk sample times on the spectrometer clock: ``utc − hk_time_offset_s / 86400``
        (docs/formats/level1.md#housekeeping-time-alignment).

        Parameters
        ----------
        group : str
            hk group, e.g. :data:`utils.level1_layout.HK_VANE` (the ``hk/`` prefix is optional).

        Returns
        -------
        ndarray of float64, shape (n_hk,)
            MJD (UTC, spectrometer clock).
        """
        return self.hk_utc(group) - self.hk_time_offset_s / SECONDS_PER_DAY

    def hk_dataset(self, path: str, scale: float | None = None) -> NDArray:
        """Read a whole hk dataset, optionally scaled to physical units.

        Parameters
        ----------
        path : str
            e.g. ``'hk/antenna0/vane/angle'`` (the ``hk/`` prefix is optional).
        scale : float, optional
            If given, return ``raw.astype(float64) * scale`` (never scaled in the integer dtype).

        Returns
        -------
        ndarray, shape (n_hk,)
            Stored dtype when ``scale`` is None, else float64.
        """
        ds = self._dset(_norm_hk(path))
        raw = self._read(_norm_hk(path), lambda: ds[...])
        if scale is None:
            return raw
        return raw.astype(np.float64) * float(scale)

    def hk_on_spectrometer(
        self,
        path: str,
        kind: Literal["linear", "previous"] = "linear",
        scale: float | None = None,
        fill: float | None = None,
    ) -> NDArray:
        """Map an hk quantity onto ``spectrometer/MJD`` using its own group's clock
        (docs/formats/level1.md#housekeeping-time-alignment).

        Parameters
        ----------
        path : str
            hk dataset, e.g. ``'hk/antenna0/vane/angle'``.
        kind : {'linear', 'previous'}
            ``'linear'`` for continuous quantities (NaN outside the hk time range);
            ``'previous'`` (zero-order hold) for categorical codes (feature words, status).
        scale : float, optional
            Raw-to-physical factor, applied in float64 (e.g. ``HK_SCALES[path]``).
        fill : float, optional
            Value for spectrometer samples outside the hk range (linear) or before the first hk
            sample (previous). Default NaN for linear; for previous −1 for a dataset named
            ``features`` and 0 otherwise.

        Returns
        -------
        ndarray, shape (n_tod,)
            float64 for linear or scaled values; int64 for unscaled integer codes with ``previous``.
        """
        p = _norm_hk(path)
        group, _, name = p.rpartition("/")
        t_hk = self.hk_mjd(group)
        values = self.hk_dataset(p, scale)
        if values.shape != t_hk.shape:
            self._fail(f"{group}: {name} has length {values.shape[0]} but utc has {t_hk.shape[0]}")
        mjd = self.mjd()
        if kind == "linear":
            f = np.nan if fill is None else float(fill)
            if t_hk.size == 0:
                return np.full(mjd.shape, f)
            return np.interp(mjd, t_hk, values.astype(np.float64, copy=False), left=f, right=f)
        if kind == "previous":
            if fill is None:
                fill = -1 if name == "features" else 0
            if values.dtype.kind in "iub":
                values = values.astype(np.int64)
            idx = np.searchsorted(t_hk, mjd, side="right") - 1
            out = values[np.clip(idx, 0, None)] if values.size else np.empty(mjd.shape, values.dtype)
            out[idx < 0] = fill
            return out
        raise ValueError(f"kind must be 'linear' or 'previous', got {kind!r}")

    def vane_mjd(self) -> NDArray[np.float64]:
        """Vane hk sample times on the spectrometer clock (MJD); shape (n_vane_hk,)."""
        return self.hk_mjd(HK_VANE)

    def vane_angle_deg(self) -> NDArray[np.float64]:
        """Vane angle in degrees on the vane hk clock; shape (n_vane_hk,)."""
        return self.hk_dataset(f"{HK_VANE}/angle", HK_SCALES[f"{HK_VANE}/angle"])

    def tshroud_c(self) -> NDArray[np.float64]:
        """Shroud (hot-load) temperature in °C on the vane hk clock; shape (n_vane_hk,)."""
        return self.hk_dataset(f"{HK_VANE}/Tshroud", HK_SCALES[f"{HK_VANE}/Tshroud"])
