"""Validated reader of level-1 COMAP files (01).

This module is the **only** code that knows the raw level-1 layout. Everything else asks
:class:`Level1File` for typed arrays:

>>> with Level1File(path) as l1:                                   # doctest: +SKIP
...     l1.validate()                                              # checks C1–C13 (01 §9)
...     i = l1.l1_index(l1.science_feeds()[0])
...     raw = l1.tod_block(i, slice(None), slice(None), slice(1000, 6000))   # (bands, chans, 5000)
...     angle = l1.hk_on_spectrometer("hk/antenna0/vane/angle", "linear", scale=0.01)

Every dimension (feeds, bands, channels, samples, sample rate) comes from the file (01 §2).
Housekeeping lives on its own clocks, which run ``hk_time_offset_s`` late (01 §6).
"""

from __future__ import annotations

import logging
import operator
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal, NoReturn

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import (
    FEATURE_CES,
    FEATURE_LISSAJOUS,
    FEATURE_RASTER,
    FEATURE_STARE,
    GROUND_FEED,
    HK_TIME_OFFSET_S,
    LEVEL1_NAME_RE,
    MAX_FEED,
    MIN_FEED,
    UTC_START_FORMAT,
)
from utils.errors import Level1FormatError
from utils.h5io import H5OpenError, RetryH5PY, one_line, to_python, to_str

log = logging.getLogger("comap.level1")

__all__ = [
    "DEFAULT_RDCC_NBYTES",
    "HK_SCALES",
    "Level1File",
    "decode_features",
    "runs",
]

# --------------------------------------------------------------------------------------------------
# Layout (01 §3)
# --------------------------------------------------------------------------------------------------
TOD = "spectrometer/tod"
MJD = "spectrometer/MJD"
FEEDS = "spectrometer/feeds"
BANDS = "spectrometer/bands"
FREQUENCY = "spectrometer/frequency"
FEATURES = "spectrometer/features"
POINTING = "spectrometer/pixel_pointing"
PIXEL_AZ = f"{POINTING}/pixel_az"
PIXEL_EL = f"{POINTING}/pixel_el"
POINTING_DATASETS: tuple[str, ...] = tuple(
    f"{POINTING}/{n}"
    for n in ("pixel_az", "pixel_el", "pixel_ra", "pixel_dec", "pixel_xoffset", "pixel_yoffset")
)

VANE_GROUP = "hk/antenna0/vane"
FRAME_GROUP = "hk/array/frame"
WEATHER_GROUP = "hk/array/weather"
TRACKER_GROUP = "hk/antenna0/deTracker"

REQUIRED_HK: dict[str, tuple[str, ...]] = {
    VANE_GROUP: ("angle", "Tshroud", "Tvane", "Tambient", "utc"),
    FRAME_GROUP: ("features", "utc"),
}
OPTIONAL_HK: dict[str, tuple[str, ...]] = {
    WEATHER_GROUP: ("airTemperature", "dewPointTemp", "pressure", "windSpeed", "windDirection", "utc"),
    TRACKER_GROUP: ("lissajous_status", "utc"),
}
"""Optional hk groups; when a group is present, all of its datasets are required."""

REQUIRED_DATASETS: tuple[str, ...] = (
    (TOD, MJD, FEEDS, BANDS, FREQUENCY, FEATURES)
    + POINTING_DATASETS
    + tuple(f"{g}/{d}" for g, names in REQUIRED_HK.items() for d in names)
)
"""Datasets checked by C4, in the order they are checked."""

HK_SCALES: dict[str, float] = {
    f"{VANE_GROUP}/angle": 0.01,
    f"{VANE_GROUP}/Tshroud": 0.01,
    f"{VANE_GROUP}/Tvane": 0.01,
    f"{VANE_GROUP}/Tambient": 0.01,
    f"{WEATHER_GROUP}/airTemperature": 0.01,
    f"{WEATHER_GROUP}/dewPointTemp": 0.01,
    f"{WEATHER_GROUP}/pressure": 0.01,
    f"{WEATHER_GROUP}/windSpeed": 0.01,
    f"{WEATHER_GROUP}/windDirection": 0.01,
}
"""Raw-to-physical scale of the integer hk datasets (01 §3.3): deg, °C, hPa, m/s."""

REQUIRED_COMAP_ATTRS: tuple[str, ...] = ("obsid", "source", "comment", "utc_start")
KNOWN_COMAP_ATTRS: frozenset[str] = frozenset(REQUIRED_COMAP_ATTRS) | {
    "level", "nchan", "tsamp", "features", "telescope", "instrument", "platform", "version", "bof",
    "pixels", "bw", "nbit", "nint", "fft_shift", "coeff_iq", "iqcalid",
}  # fmt: skip

SCAN_FEATURE_CODES: tuple[int, ...] = (FEATURE_CES, FEATURE_RASTER, FEATURE_LISSAJOUS, FEATURE_STARE)
"""Decoded feature values that mark scanning (used only to classify pointing NaNs in warnings)."""

FREQ_MIN_GHZ = 20.0
FREQ_MAX_GHZ = 40.0
TSAMP_TOLERANCE = 0.01
GAP_FACTOR = 1.5
DEFAULT_RDCC_NBYTES = 64 * 2**20
"""Default HDF5 chunk cache of ``spectrometer/tod`` (bytes)."""

_SECONDS_PER_DAY = 86400.0

Index = int | np.integer
Sel = slice | int | np.integer | None


# --------------------------------------------------------------------------------------------------
# Module functions
# --------------------------------------------------------------------------------------------------
def decode_features(words: ArrayLike) -> NDArray[np.int16]:
    """Decode feature words: the index of the highest set bit, −1 for ``w <= 0`` (01 §4).

    Parameters
    ----------
    words : array_like of int, any shape
        Feature words (any integer dtype; signed negative values decode to −1).

    Returns
    -------
    ndarray of int16, same shape as ``words``
        ``w.bit_length() - 1`` for ``w > 0``, else −1. Lower set bits are ignored.

    Examples
    --------
    >>> decode_features([8192, 256, 8192 | 256, 0, 1]).tolist()
    [13, 8, 13, -1, 0]
    """
    w = np.asarray(words)
    if w.dtype == np.bool_:
        w = w.astype(np.uint8)
    if w.dtype.kind not in "iu":
        if w.size == 0 and w.dtype.kind == "f":  # np.asarray([]) is float64
            w = w.astype(np.int64)
        else:
            raise TypeError(f"feature words must be integers, got dtype {w.dtype}")
    out = np.full(w.shape, -1, dtype=np.int16)
    positive = w > 0
    if not positive.any():
        return out
    x = w[positive].astype(np.uint64)
    bits = np.zeros(x.shape, dtype=np.int16)
    for shift in (32, 16, 8, 4, 2, 1):  # exact binary search for the highest set bit
        high = x >= (np.uint64(1) << np.uint64(shift))
        bits[high] += shift
        x[high] >>= np.uint64(shift)
    out[positive] = bits
    return out


def sample_rate_from_mjd(mjd: ArrayLike) -> float:
    """Sample rate (Hz) from sample times, robust to time gaps and to MJD rounding.

    The inverse of the **mean** spacing of the regular steps (those below 1.5 × the median step).
    01 §2 defines the rate as ``1/(86400·median(diff(MJD)))``; a float64 MJD near 6e4 resolves only
    ~1 µs, so the median of single steps is uncertain at the 1e-5 level — enough to turn a 1200 s
    scan into "longer than 2 × 600 s". The mean over the regular steps has the same expectation
    without that rounding noise.

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
    return 1.0 / (_SECONDS_PER_DAY * step)


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


# --------------------------------------------------------------------------------------------------
# Byte counting (07 §4.1 B2)
# --------------------------------------------------------------------------------------------------
class _CountingFile:
    """Unbuffered binary file that counts the bytes HDF5 reads through h5py's ``fileobj`` driver.

    ``readinto`` loops until the request is filled or EOF (h5py's driver does not retry short reads).
    """

    def __init__(self, path: str) -> None:
        self._raw = open(path, "rb", buffering=0)  # closed by close()
        self.name = path
        self.bytes_read = 0
        self.n_reads = 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = len(view)
        total = 0
        while total < size:
            n = self._raw.readinto(view[total:])
            if not n:
                break
            total += n
        self.bytes_read += total
        self.n_reads += 1
        return total

    def read(self, size: int = -1) -> bytes:
        data = self._raw.readall() if size is None or size < 0 else self._raw.read(size) or b""
        self.bytes_read += len(data)
        self.n_reads += 1
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        pass

    def truncate(self, size: int | None = None) -> int:
        raise OSError("level-1 files are opened read-only")

    def write(self, data: Any) -> int:
        raise OSError("level-1 files are opened read-only")

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed


def _next_prime(n: int) -> int:
    n = max(int(n), 2)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def _shape_str(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _norm_hk(path: str) -> str:
    p = path.strip("/")
    return p if p == "hk" or p.startswith("hk/") else f"hk/{p}"


# --------------------------------------------------------------------------------------------------
# Level1File
# --------------------------------------------------------------------------------------------------
class Level1File:
    """Validated, typed reader of one level-1 file (01).

    The file is opened lazily (first use, ``open()`` or ``with``) read-only, without HDF5 file locking,
    through :class:`utils.h5io.RetryH5PY`. ``validate()`` runs checks C1–C13 of 01 §9.

    Parameters
    ----------
    path : str or os.PathLike
        Level-1 file, normally named ``comap-<obsid:07d>-<YYYY-MM-DD>-<HHMMSS>.hd5``.
    hk_time_offset_s : float
        Housekeeping stamps run this many seconds late w.r.t. the spectrometer clock (01 §6).
    count_bytes : bool
        Open through a counting Python file object (h5py ``driver='fileobj'``) so that
        ``bytes_read_total`` and ``bytes_read_tod`` report the bytes HDF5 really read (07 §4.1 B2).
        Slower; meant for benchmarks.
    rdcc_nbytes : int
        HDF5 chunk cache in bytes (file default and the ``spectrometer/tod`` dataset cache).
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
    ) -> None:
        self.path: str = os.fspath(path)
        self.name: str = os.path.basename(self.path)
        self.hk_time_offset_s = float(hk_time_offset_s)
        self.count_bytes = bool(count_bytes)
        self.rdcc_nbytes = int(rdcc_nbytes)
        self._retry = dict(retry or {})
        self._f: h5py.File | None = None
        self._fobj: _CountingFile | None = None
        self._tod: h5py.Dataset | None = None
        self._arrays: dict[str, NDArray] = {}
        self._attrs: dict[str, Any] | None = None
        self._feed_pos: dict[int, int] | None = None
        self._rate_hz: float | None = None
        self._bytes_tod = 0
        self._bytes_closed = 0
        self.validated = False

    # ---------------------------------------------------------------------------------------- open
    def open(self) -> Level1File:
        """Open the file (C1, C2 of 01 §9) if it is not open yet; return ``self``."""
        if self._f is not None:
            return self
        if not os.path.isfile(self.path):
            self._fail(f"level-1 file not found: {self.path}")
        kwargs: dict[str, Any] = {"locking": False, "rdcc_nbytes": self.rdcc_nbytes, "rdcc_nslots": 10007}
        target: Any = self.path
        if self.count_bytes:
            try:
                self._fobj = _CountingFile(self.path)
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
        m = LEVEL1_NAME_RE.match(self.name)
        return int(m.group(1)) if m else -1

    def _fail(self, message: str) -> NoReturn:
        raise Level1FormatError(message, obsid=self._error_obsid())

    # ---------------------------------------------------------------------------------- validation
    def validate(self, probe_tod: bool = True, *, check_pointing: bool = True) -> None:
        """Check the file against 01 §9 (C1–C13, in order); raise on the first failure.

        Parameters
        ----------
        probe_tod : bool
            Run C13: read ``tod[i, b, 0, 0]`` and ``tod[i, b, 0, -1]`` for every feed position and
            band (detects truncated or corrupt files without reading whole columns).
        check_pointing : bool
            Read ``pixel_az``/``pixel_el`` (one feed at a time) to warn about NaNs.

        Raises
        ------
        Level1FormatError
            With the one-line message of the first failing check (01 §9).

        Notes
        -----
        Warnings (logger ``comap.level1``): unknown ``/comap`` attributes, a ``/truth`` group, time
        gaps > 1.5 sample intervals, NaN pointing, NaN in the probed TOD elements, an unreadable
        ``nchan``.
        """
        self.open()  # C1, C2
        try:
            self._check_comap()  # C3
            self._check_datasets()  # C4
            self._check_tod_dims()  # C5, C6 (+ nchan)
            self._check_feeds()  # C7
            self._check_mjd()  # C8
            self._check_frequency()  # C9
            self._check_features()  # C10
            self._check_pointing_shapes()  # C11
            self._check_hk()  # C12
            if "truth" in self.file:
                log.warning("%s: /truth group present (simulator file); the pipeline ignores it", self.name)
            if check_pointing:
                self._warn_pointing_nans()
        except Level1FormatError:
            raise
        except (OSError, KeyError, RuntimeError) as exc:
            self._fail(f"cannot read level-1 file {self.path}: {one_line(exc)}")
        if probe_tod:
            self._probe_tod()  # C13
        self.validated = True

    def _check_comap(self) -> None:
        grp = self.file.get("comap")
        attrs = grp.attrs if isinstance(grp, h5py.Group) else {}
        for name in REQUIRED_COMAP_ATTRS:
            if name not in attrs:
                self._fail(f"missing attribute /comap.{name}")
        obsid = to_python(attrs["obsid"])
        if isinstance(obsid, list) and len(obsid) == 1:
            obsid = obsid[0]
        if not isinstance(obsid, int) or isinstance(obsid, bool):
            self._fail(f"bad attribute /comap.obsid {obsid!r} (expected an integer)")
        utc_start = to_str(attrs["utc_start"])
        try:
            datetime.strptime(utc_start, UTC_START_FORMAT)
        except ValueError:
            self._fail(f"bad utc_start '{utc_start}' (expected {UTC_START_FORMAT})")
        m = LEVEL1_NAME_RE.match(self.name)
        if m and int(m.group(1)) != obsid:
            self._fail(f"obsid mismatch: file name says {int(m.group(1))}, /comap.obsid says {obsid}")
        unknown = sorted(set(attrs) - KNOWN_COMAP_ATTRS)
        if unknown:
            log.warning("%s: unknown /comap attributes: %s", self.name, ", ".join(unknown))

    def _is_dataset(self, path: str) -> bool:
        try:
            return self.file.get(path, getclass=True) is h5py.Dataset
        except (KeyError, OSError, RuntimeError):
            return False

    def _check_datasets(self) -> None:
        for path in REQUIRED_DATASETS:
            if not self._is_dataset(path):
                self._fail(f"missing dataset {path}")
        for group, names in OPTIONAL_HK.items():
            if self.has_group(group):
                for n in names:
                    if not self._is_dataset(f"{group}/{n}"):
                        self._fail(f"missing dataset {group}/{n}")

    def _check_tod_dims(self) -> None:
        f = self.file
        tod = f[TOD]
        if tod.ndim != 4 or tod.dtype.kind != "f" or tod.dtype.itemsize not in (4, 8):
            self._fail(
                "spectrometer/tod must be 4-D float (feeds, bands, channels, samples), "
                f"got shape {_shape_str(tod.shape)} dtype {tod.dtype}"
            )
        expected = tuple(f[FEEDS].shape) + tuple(f[FREQUENCY].shape) + tuple(f[MJD].shape)
        if tuple(tod.shape) != expected:
            self._fail(
                f"spectrometer/tod has shape {_shape_str(tod.shape)} but feeds/frequency/MJD imply "
                f"{_shape_str(expected)}"
            )
        _, n_bands, n_channels, n_tod = tod.shape
        if n_tod < 2 or n_channels < 2 or n_bands < 1:
            self._fail(
                f"spectrometer/tod has shape {_shape_str(tod.shape)} but feeds/frequency/MJD imply "
                f"{_shape_str(expected)}; need n_tod >= 2, n_channels >= 2 and n_bands >= 1"
            )
        attrs = f["comap"].attrs
        if "nchan" in attrs:
            nchan = to_python(attrs["nchan"])
            try:
                nchan_i = operator.index(nchan)
            except TypeError:
                log.warning("%s: /comap.nchan %r is not an integer; ignored", self.name, nchan)
                return
            if nchan_i != n_channels:
                self._fail(f"/comap.nchan is {nchan_i} but spectrometer/frequency has {n_channels} channels")

    def _check_feeds(self) -> None:
        ds = self.file[FEEDS]
        if ds.dtype.kind not in "iu":
            self._fail(f"spectrometer/feeds: dtype {ds.dtype} is not an integer type")
        feeds = ds[...].astype(np.int64)
        out = sorted({int(x) for x in feeds if not MIN_FEED <= x <= MAX_FEED})
        if out:
            self._fail(f"spectrometer/feeds: feed numbers outside {MIN_FEED}-{MAX_FEED}: {out}")
        uniq, counts = np.unique(feeds, return_counts=True)
        if (counts > 1).any():
            self._fail(f"spectrometer/feeds: duplicate feed numbers {uniq[counts > 1].tolist()}")
        if not (feeds != GROUND_FEED).any():
            self._fail(f"spectrometer/feeds: no science feed in {feeds.tolist()}")

    def _check_mjd(self) -> None:
        mjd = self.mjd()
        bad = ~np.isfinite(mjd)
        bad[1:] |= ~(np.diff(mjd) > 0)
        if bad.any():
            self._fail(f"spectrometer/MJD not strictly increasing at sample {int(np.argmax(bad))}")
        diffs = np.diff(mjd)
        med = float(np.median(diffs))
        dt = med * _SECONDS_PER_DAY
        attrs = self.file["comap"].attrs
        if "tsamp" in attrs:
            tsamp = to_python(attrs["tsamp"])
            try:
                ok = abs(dt - float(tsamp)) <= TSAMP_TOLERANCE * abs(float(tsamp))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                ts = f"{tsamp:.6g}" if isinstance(tsamp, int | float) else repr(tsamp)
                self._fail(f"sample spacing {dt:.4g} s disagrees with tsamp {ts} s")
        gaps = np.flatnonzero(diffs > GAP_FACTOR * med)
        if gaps.size:
            k = int(gaps[np.argmax(diffs[gaps])])
            log.warning(
                "%s: spectrometer/MJD has %d time gap(s) longer than %.1f sample intervals "
                "(largest %.3f s after sample %d)",
                self.name, gaps.size, GAP_FACTOR, diffs[k] * _SECONDS_PER_DAY, k,
            )  # fmt: skip

    def _check_frequency(self) -> None:
        freq = self.frequency_ghz()
        ranges: list[tuple[float, float]] = []
        for b, row in enumerate(freq):
            head = f"spectrometer/frequency band {b}:"
            nonfinite = np.flatnonzero(~np.isfinite(row))
            if nonfinite.size:
                self._fail(f"{head} non-finite value at channel {int(nonfinite[0])}")
            outside = np.flatnonzero((row < FREQ_MIN_GHZ) | (row > FREQ_MAX_GHZ))
            if outside.size:
                c = int(outside[0])
                self._fail(
                    f"{head} {row[c]:.6g} GHz at channel {c} is outside "
                    f"[{FREQ_MIN_GHZ:g}, {FREQ_MAX_GHZ:g}] GHz"
                )
            d = np.diff(row)
            sign = np.sign(d[0])
            wrong = np.flatnonzero(np.sign(d) != sign) if sign != 0 else np.array([0])
            if wrong.size:
                self._fail(f"{head} not strictly monotonic at channel {int(wrong[0]) + 1}")
            ranges.append((float(row.min()), float(row.max())))
        for b, (lo, hi) in enumerate(ranges):
            for a in range(b):
                lo_a, hi_a = ranges[a]
                if lo < hi_a and lo_a < hi:
                    self._fail(
                        f"spectrometer/frequency band {b}: range [{lo:.6g}, {hi:.6g}] GHz overlaps band {a} "
                        f"[{lo_a:.6g}, {hi_a:.6g}] GHz"
                    )

    def _check_features(self) -> None:
        ds = self.file[FEATURES]
        n_tod = self.n_tod
        if ds.ndim != 1:
            self._fail(f"spectrometer/features has shape {_shape_str(ds.shape)}, expected ({n_tod},)")
        if ds.shape[0] != n_tod:
            self._fail(f"spectrometer/features has length {ds.shape[0]}, expected {n_tod}")
        if ds.dtype.kind not in "iu":
            self._fail(f"spectrometer/features has dtype {ds.dtype}, expected an integer dtype")

    def _check_pointing_shapes(self) -> None:
        n_feeds, n_tod = self.n_feeds, self.n_tod
        for path in POINTING_DATASETS:
            shape = self.file[path].shape
            if tuple(shape) != (n_feeds, n_tod):
                self._fail(f"{path} has shape {_shape_str(shape)}, expected ({n_feeds}, {n_tod})")

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

    def _check_hk(self) -> None:
        for group in self.hk_groups():
            grp = self.file[group]
            utc_ds = grp["utc"]
            m = utc_ds.shape[0] if utc_ds.ndim else 0
            for name in sorted(grp):
                if name == "utc" or grp.get(name, getclass=True) is not h5py.Dataset:
                    continue
                ds = grp[name]
                n = ds.shape[0] if ds.ndim else 0
                if n != m or ds.ndim == 0:
                    self._fail(f"{group}: {name} has length {n} but utc has {m}")
            utc = utc_ds[...]
            if utc.ndim != 1 or not np.isfinite(utc).all() or (np.diff(utc) < 0).any():
                self._fail(f"{group}/utc not monotonic")
            self._arrays[f"{group}/utc"] = _readonly(np.asarray(utc, dtype=np.float64))

    def _warn_pointing_nans(self) -> None:
        in_scan = np.isin(self.decoded_features(), SCAN_FEATURE_CODES)
        for path in (PIXEL_AZ, PIXEL_EL):
            ds = self.file[path]
            buf = np.empty(self.n_tod, dtype=np.float64)
            n_out = n_in = 0
            for i in range(self.n_feeds):
                ds.read_direct(buf, np.s_[i, :])
                nan = np.isnan(buf)
                if nan.any():
                    n_in += int(np.count_nonzero(nan & in_scan))
                    n_out += int(np.count_nonzero(nan & ~in_scan))
            if n_out or n_in:
                log.warning(
                    "%s: %s has %d NaN value(s) outside scans and %d inside scans",
                    self.name, path, n_out, n_in,
                )  # fmt: skip

    def _probe_tod(self) -> None:
        tod = self._tod_dataset()
        feeds = self.feeds()
        n_feeds, n_bands, _, n_tod = tod.shape
        buf = np.empty(1, dtype=np.float32)
        mspace = h5py.h5s.create_simple((1,))
        n_nan = 0
        with self._count_tod():
            for i in range(n_feeds):
                for b in range(n_bands):
                    for s in (0, n_tod - 1):
                        try:
                            fspace = tod.id.get_space()
                            fspace.select_hyperslab((i, b, 0, s), (1, 1, 1, 1))
                            tod.id.read(mspace, fspace, buf)
                        except Exception as exc:
                            self._fail(
                                f"spectrometer/tod unreadable at feed {int(feeds[i])}: "
                                f"{one_line(exc) or type(exc).__name__}"
                            )
                        n_nan += int(np.isnan(buf[0]))
        if n_nan:
            log.warning(
                "%s: spectrometer/tod has NaN in %d of %d probed elements (handled downstream)",
                self.name, n_nan, 2 * n_feeds * n_bands,
            )  # fmt: skip

    # ------------------------------------------------------------------------------- byte counting
    @contextmanager
    def _count_tod(self) -> Iterator[None]:
        fobj = self._fobj
        before = fobj.bytes_read if fobj is not None else 0
        try:
            yield
        finally:
            if fobj is not None:
                self._bytes_tod += fobj.bytes_read - before

    @property
    def bytes_read_total(self) -> int:
        """Bytes HDF5 read from the file so far (all datasets and metadata); 0 unless ``count_bytes``."""
        return self._bytes_closed + (self._fobj.bytes_read if self._fobj is not None else 0)

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
            arr = np.asarray(self._dset(path)[...], dtype=dtype)
            arr = _readonly(arr)
            self._arrays[path] = arr
        return arr

    def has_group(self, path: str) -> bool:
        """True if ``path`` (e.g. ``'hk/antenna0/deTracker'``) is a group in the file."""
        try:
            return self.file.get(path.strip("/") or "/", getclass=True) is h5py.Group
        except (KeyError, OSError, RuntimeError):
            return False

    def has_dataset(self, path: str) -> bool:
        """True if ``path`` is a dataset in the file."""
        return self._is_dataset(path.strip("/"))

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
        return _readonly(f[f != GROUND_FEED])

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
            self._rate_hz = float(1.0 / (_SECONDS_PER_DAY * np.median(np.diff(self.mjd()))))
        return self._rate_hz

    def frequency_ghz(self) -> NDArray[np.float64]:
        """Channel centre frequencies in GHz, storage order; shape (n_bands, n_channels), read-only."""
        return self._array(FREQUENCY, np.float64)

    def channel_width_hz(self) -> float:
        """Channel width ``|Δν|`` in Hz: median absolute spacing of the stored frequencies."""
        return float(np.median(np.abs(np.diff(self.frequency_ghz(), axis=1))) * 1e9)

    def band_names(self) -> list[str]:
        """Band names from ``spectrometer/bands`` (informational)."""
        return [to_str(b) for b in self._dset(BANDS)[...].ravel().tolist()]

    def features(self) -> NDArray[np.uint32]:
        """Feature word per sample (01 §4); shape (n_tod,), uint32, read-only.

        Words stored in another integer dtype are converted (negative values become 0; both decode
        to −1).
        """
        key = f"{FEATURES}#uint32"
        arr = self._arrays.get(key)
        if arr is None:
            raw = self._array(FEATURES)
            if raw.dtype != np.uint32:
                raw = np.clip(raw, 0, np.iinfo(np.uint32).max).astype(np.uint32)
            arr = self._arrays[key] = _readonly(raw)
        return arr

    def decoded_features(self) -> NDArray[np.int16]:
        """``decode_features`` of the stored words; shape (n_tod,), int16, read-only."""
        key = f"{FEATURES}#decoded"
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = _readonly(decode_features(self._array(FEATURES)))
        return arr

    # ---------------------------------------------------------------------------------------- TOD
    def _tod_dataset(self) -> h5py.Dataset:
        if self._tod is None:
            ds = self._dset(TOD)
            if ds.chunks is not None:  # give the TOD its own chunk cache with a sensible hash size
                chunk_bytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
                n_fit = max(1, self.rdcc_nbytes // max(chunk_bytes, 1))
                nslots = _next_prime(min(max(10 * n_fit, 521), 2_000_000))
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
        starts, counts, steps, keep = [operator.index(_check_int(ifeed, shape[0]))], [1], [1], []
        for axis, sel in enumerate((band_slice, chan_slice, sample_slice), start=1):
            s, c, st, kept = _normalise(sel, shape[axis], axis)
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
        with self._count_tod():
            _read_hyperslab(tod, starts, counts, steps, out)
        return out

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
            i = operator.index(_check_int(ifeed, ds.shape[0]))
            if isinstance(sample_slice, int | np.integer):
                raise TypeError("pointing() takes a slice of samples, not an int")
            s, c, st, _ = _normalise(sample_slice, ds.shape[1], 1)
            arr = np.empty(c, dtype=np.float64)
            if c:
                _read_hyperslab(ds, [i, s], [1, c], [1, st], arr)
            result.append(arr)
        return result[0], result[1]

    # ----------------------------------------------------------------------------------------- hk
    def hk_utc(self, group: str) -> NDArray[np.float64]:
        """Raw ``utc`` stamps (MJD, hk clock) of an hk group; shape (n_hk,), read-only."""
        return self._array(f"{_norm_hk(group)}/utc", np.float64)

    def hk_mjd(self, group: str) -> NDArray[np.float64]:
        """hk sample times on the spectrometer clock: ``utc − hk_time_offset_s / 86400`` (01 §6).

        Parameters
        ----------
        group : str
            hk group, e.g. ``'hk/antenna0/vane'`` (the ``hk/`` prefix is optional).

        Returns
        -------
        ndarray of float64, shape (n_hk,)
            MJD (UTC, spectrometer clock).
        """
        return self.hk_utc(group) - self.hk_time_offset_s / _SECONDS_PER_DAY

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
        raw = self._dset(_norm_hk(path))[...]
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
        """Map an hk quantity onto ``spectrometer/MJD`` using its own group's clock (01 §6).

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
        return self.hk_mjd(VANE_GROUP)

    def vane_angle_deg(self) -> NDArray[np.float64]:
        """Vane angle in degrees on the vane hk clock; shape (n_vane_hk,)."""
        return self.hk_dataset(f"{VANE_GROUP}/angle", HK_SCALES[f"{VANE_GROUP}/angle"])

    def tshroud_c(self) -> NDArray[np.float64]:
        """Shroud (hot-load) temperature in °C on the vane hk clock; shape (n_vane_hk,)."""
        return self.hk_dataset(f"{VANE_GROUP}/Tshroud", HK_SCALES[f"{VANE_GROUP}/Tshroud"])


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _readonly(a: NDArray) -> NDArray:
    a.flags.writeable = False
    return a


def _check_int(i: Any, n: int) -> int:
    try:
        k = operator.index(i)
    except TypeError:
        raise TypeError(f"feed position must be an int, got {type(i).__name__}") from None
    if not -n <= k < n:
        raise IndexError(f"feed position {k} out of range for {n} feeds")
    return k + n if k < 0 else k


def _normalise(sel: Sel, n: int, axis: int) -> tuple[int, int, int, bool]:
    """Return (start, count, step, keep_axis) for an int, slice or None on an axis of length n."""
    if sel is None:
        return 0, n, 1, True
    if isinstance(sel, slice):
        start, stop, step = sel.indices(n)
        if step <= 0:
            raise ValueError(f"axis {axis}: only positive slice steps are supported, got {sel}")
        return start, len(range(start, stop, step)), step, True
    try:
        k = operator.index(sel)
    except TypeError:
        raise TypeError(f"axis {axis}: expected a slice, int or None, got {type(sel).__name__}") from None
    if not -n <= k < n:
        raise IndexError(f"axis {axis}: index {k} out of range for length {n}")
    return (k + n if k < 0 else k), 1, 1, False


def _read_hyperslab(
    ds: h5py.Dataset, starts: Sequence[int], counts: Sequence[int], steps: Sequence[int], out: NDArray
) -> None:
    """Read a strided hyperslab of ``ds`` into ``out`` (same number of elements) with HDF5 directly."""
    fspace = ds.id.get_space()
    stride = tuple(steps) if any(s != 1 for s in steps) else None
    fspace.select_hyperslab(tuple(starts), tuple(counts), stride)
    if out.flags.c_contiguous and out.flags.writeable:
        mspace = h5py.h5s.create_simple(out.shape if out.ndim else (1,))
        ds.id.read(mspace, fspace, out)
    else:
        tmp = np.empty(out.shape, dtype=out.dtype)
        ds.id.read(h5py.h5s.create_simple(tmp.shape if tmp.ndim else (1,)), fspace, tmp)
        out[...] = tmp
