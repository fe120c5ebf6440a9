"""Robust HDF5 opening (docs/formats/level1.md#opening-files-robustly) and small shared HDF5 helpers.

``RetryH5PY`` is the only way comap-reduce opens an HDF5 file. It retries *transient* errors
(a file briefly locked or busy, a stale NFS handle, a timeout) with jittered exponential back-off and
turns every other failure into a one-line :class:`~utils.errors.BadCOMAPFile` at once.

Tests replace the waiting: pass ``sleep=`` / ``rng=`` to ``RetryH5PY`` or monkeypatch the module
hooks :data:`sleep` and :data:`rng`.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

import h5py
import numpy as np

from utils.errors import BadCOMAPFile

log = logging.getLogger("comap.h5io")

DEFAULT_MAX_RETRIES = 5
"""Retries after the first attempt of an open or a read
(docs/reliability.md#transient-io-errors-and-full-disks)."""
DEFAULT_RETRY_DELAY_S = 1.0
"""Wait before the first retry, s; it grows by ``DEFAULT_BACKOFF_FACTOR`` each time
(1 + 2 + 4 + 8 + 16 = 31 s with the defaults)."""
DEFAULT_BACKOFF_FACTOR = 2.0
DEFAULT_JITTER = 0.3
"""Relative jitter of each wait."""

TRANSIENT_ERRNOS: frozenset[int] = frozenset({errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT})
"""``errno`` values of an ``OSError`` that are worth retrying
(docs/formats/level1.md#opening-files-robustly)."""

_TRANSIENT_TEXT = "unable to lock file"
_WRITE_MODES = ("a", "r+", "w", "w-", "x")


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


sleep: Callable[[float], None] = time.sleep
"""Module hook: the function used to wait between attempts (tests replace it)."""

rng: _Uniform = random.Random()
"""Module hook: the source of the jitter factor; anything with ``uniform(a, b)``."""


class H5OpenError(BadCOMAPFile):
    """``RetryH5PY`` could not open a file.

    Attributes
    ----------
    path : str
        The file (as given).
    cause : str
        One-line text of the last underlying error.
    attempts : int
        Number of open attempts made (1 for a non-transient error).
    """

    def __init__(self, message: str, *, path: str, cause: str, attempts: int, obsid: int | None = None):
        super().__init__(message, obsid=obsid)
        self.path = path
        self.cause = cause
        self.attempts = attempts

    def __reduce__(self):
        return (_rebuild_open_error, (self.message, self.path, self.cause, self.attempts, self.obsid))


def _rebuild_open_error(message, path, cause, attempts, obsid):
    return H5OpenError(message, path=path, cause=cause, attempts=attempts, obsid=obsid)


def one_line(text: object) -> str:
    """Collapse ``str(text)`` onto one line (messages are one line by contract,
    docs/operations.md#error-model)."""
    return " ".join(str(text).split())


def is_transient(exc: BaseException) -> bool:
    """Return True if ``exc`` is an open error worth retrying (docs/formats/level1.md#opening-files-robustly).

    Transient: ``BlockingIOError``; ``OSError`` with errno EAGAIN, EBUSY, ESTALE or ETIMEDOUT; any
    ``OSError`` whose message contains "unable to lock file" (HDF5's locking failure).
    """
    if isinstance(exc, BlockingIOError):
        return True
    if isinstance(exc, OSError):
        if exc.errno in TRANSIENT_ERRNOS:
            return True
        return _TRANSIENT_TEXT in str(exc).lower()
    return False


class TransientIOError(BadCOMAPFile):
    """A read kept failing with a transient error after every retry of :func:`retry_transient`.

    Attributes
    ----------
    what : str
        The operation, e.g. ``"reading spectrometer/tod of /data/comap-0012345-….hd5"``.
    cause : str
        ``[Errno N] <strerror>`` of the last failure (or its one-line text without an errno).
    attempts : int
        Attempts made.
    """

    def __init__(self, message: str, *, what: str, cause: str, attempts: int, obsid: int | None = None):
        super().__init__(message, obsid=obsid)
        self.what = what
        self.cause = cause
        self.attempts = attempts

    def __reduce__(self):
        return (_rebuild_transient_error, (self.message, self.what, self.cause, self.attempts, self.obsid))


def _rebuild_transient_error(message, what, cause, attempts, obsid):
    return TransientIOError(message, what=what, cause=cause, attempts=attempts, obsid=obsid)


def errno_text(exc: BaseException) -> str:
    """``[Errno N] <strerror>`` of an ``OSError`` with an errno, else its one-line text.

    h5py puts the whole HDF5 error stack (time, descriptor, buffer address, …) in the message of
    the ``OSError`` it raises for a failed read or write; the errno says all a user needs."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return f"[Errno {code}] {os.strerror(code)}"
    return one_line(exc) or type(exc).__name__


def _hooks() -> tuple[Callable[[float], None], _Uniform]:
    """The module hooks :data:`sleep` and :data:`rng` as they are now (tests replace them)."""
    return sleep, rng


def retry_transient(
    operation: Callable[[], Any],
    what: str,
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
    backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
    jitter: float = DEFAULT_JITTER,
    before_retry: Callable[[], Any] | None = None,
    sleep: Callable[[float], None] | None = None,
    rng: _Uniform | None = None,
) -> Any:
    """Call ``operation()`` and return its value, retrying transient errors
    (docs/reliability.md#transient-io-errors-and-full-disks).

    The reads of an open file get the same policy as :class:`RetryH5PY` gives the opens: an error
    for which :func:`is_transient` is true is retried after ``retry_delay_s · backoff_factor**k``
    seconds (jittered by a factor in ``[1 - jitter, 1 + jitter]``), with one WARNING per retry
    naming ``what`` and the errno; any other exception propagates at once, unchanged.

    Parameters
    ----------
    operation : callable
        Takes no argument. It must be safe to call again after a failure (a read into the same
        buffer is).
    what : str
        The operation in words, with the file, for the log and the error.
    max_retries, retry_delay_s, backoff_factor, jitter
        As for :class:`RetryH5PY`.
    before_retry : callable, optional
        Called before each retry (e.g. to reopen a file descriptor); its errors count as the
        attempt's (a transient one is retried, any other propagates).
    sleep, rng : optional
        Replace the module hooks :data:`sleep` and :data:`rng`.

    Raises
    ------
    TransientIOError
        ``{what}: failed {n} times: [Errno N] <strerror>`` when every attempt failed with a
        transient error.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    wait = sleep if sleep is not None else _hooks()[0]
    gen = rng if rng is not None else _hooks()[1]
    n_attempts = int(max_retries) + 1
    last: BaseException | None = None
    for k in range(n_attempts):
        try:
            if k and before_retry is not None:
                before_retry()
            return operation()
        except Exception as exc:  # classified below: transient → retry, else propagate unchanged
            if not is_transient(exc):
                raise
            last = exc
            if k + 1 < n_attempts:
                factor = gen.uniform(1.0 - jitter, 1.0 + jitter) if jitter else 1.0
                d = retry_delay_s * backoff_factor**k * factor
                log.warning(
                    "transient error %s (attempt %d of %d): %s; retrying in %.2f s",
                    what,
                    k + 1,
                    n_attempts,
                    errno_text(exc),
                    d,
                )
                wait(d)
    assert last is not None
    cause = errno_text(last)
    raise TransientIOError(
        f"{what}: failed {n_attempts} times: {cause}", what=what, cause=cause, attempts=n_attempts
    ) from last


def _display_name(path: Any) -> str:
    if isinstance(path, str | bytes | os.PathLike):
        name = os.fsdecode(os.fspath(path))
        return name
    return str(getattr(path, "name", repr(path)))


class RetryH5PY:
    """Context manager that opens an HDF5 file, retrying transient errors
    (docs/formats/level1.md#opening-files-robustly).

    Parameters
    ----------
    path : str, os.PathLike or binary file object
        The file. A file object is opened with h5py's ``driver='fileobj'``.
    mode : str
        h5py mode (``'r'``, ``'a'``, ``'w'``, …).
    max_retries : int
        Retries after the first attempt; at most ``max_retries + 1`` attempts are made. With the
        defaults the nominal total wait is 1 + 2 + 4 + 8 + 16 = 31 s.
    retry_delay_s : float
        Base delay in seconds; retry ``k`` (0-based) waits ``retry_delay_s * backoff_factor**k``
        multiplied by a factor drawn uniformly from ``[1 - jitter, 1 + jitter]``.
    backoff_factor : float
        Growth factor of the delay.
    jitter : float
        Relative jitter of each delay, in [0, 1].
    sleep : callable, optional
        Replaces the module hook :data:`sleep` (``time.sleep``) for this instance.
    rng : object with ``uniform(a, b)``, optional
        Replaces the module hook :data:`rng` for this instance.
    **h5py_kwargs
        Passed to ``h5py.File`` (e.g. ``locking=False``, ``rdcc_nbytes=...``).

    Raises
    ------
    H5OpenError (a BadCOMAPFile)
        ``cannot open {path}: {error}`` at once for a non-transient error;
        ``cannot open {path} after {n} attempts: {last error}`` when the retries are used up.

    Examples
    --------
    >>> with RetryH5PY(path, "r", locking=False) as f:   # doctest: +SKIP
    ...     mjd = f[MJD][...]   # an entry of utils.level1_layout or utils.level2
    """

    def __init__(
        self,
        path: str | os.PathLike | Any,
        mode: str = "r",
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
        backoff_factor: float = DEFAULT_BACKOFF_FACTOR,
        jitter: float = DEFAULT_JITTER,
        *,
        sleep: Callable[[float], None] | None = None,
        rng: _Uniform | None = None,
        **h5py_kwargs: Any,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")
        self.path = path
        self.mode = mode
        self.max_retries = int(max_retries)
        self.retry_delay_s = float(retry_delay_s)
        self.backoff_factor = float(backoff_factor)
        self.jitter = float(jitter)
        self.h5py_kwargs = h5py_kwargs
        self._sleep = sleep
        self._rng = rng
        self.file: h5py.File | None = None
        self._guard: FullDiskGuard | None = None
        self.attempts = 0
        self.delays: list[float] = []

    def delay(self, k: int) -> float:
        """Return the (jittered) wait in seconds before retry ``k`` (0-based)."""
        gen = self._rng if self._rng is not None else rng
        factor = gen.uniform(1.0 - self.jitter, 1.0 + self.jitter) if self.jitter else 1.0
        return self.retry_delay_s * self.backoff_factor**k * factor

    def open(self) -> h5py.File:
        """Open and return the ``h5py.File`` (the caller closes it); see the class docstring."""
        name = _display_name(self.path)
        wait = self._sleep if self._sleep is not None else sleep
        n_attempts = self.max_retries + 1
        last: BaseException | None = None
        for k in range(n_attempts):
            self.attempts = k + 1
            try:
                self.file = self._open_once()
                return self.file
            except Exception as exc:  # classified below: transient → retry, else fail at once
                if not is_transient(exc):
                    cause = one_line(exc) or type(exc).__name__
                    raise H5OpenError(
                        f"cannot open {name}: {cause}", path=name, cause=cause, attempts=k + 1
                    ) from exc
                last = exc
                if k + 1 < n_attempts:
                    d = self.delay(k)
                    self.delays.append(d)
                    log.warning(
                        "transient error opening %s (attempt %d of %d): %s; retrying in %.2f s",
                        name,
                        k + 1,
                        n_attempts,
                        one_line(exc),
                        d,
                    )
                    wait(d)
        cause = one_line(last) or type(last).__name__
        raise H5OpenError(
            f"cannot open {name} after {n_attempts} attempts: {cause}",
            path=name,
            cause=cause,
            attempts=n_attempts,
        ) from last

    def _open_once(self) -> h5py.File:
        """One attempt. A file opened by name for writing goes through a :class:`FullDiskGuard`."""
        if self.mode not in _WRITE_MODES or not isinstance(self.path, str | bytes | os.PathLike):
            return h5py.File(self.path, self.mode, **self.h5py_kwargs)
        guard = FullDiskGuard(self.path, self.mode)
        try:
            f = h5py.File(guard, guard.h5py_mode, **self.h5py_kwargs)
        except BaseException:
            guard.close()
            raise
        self._guard = guard
        return f

    def __enter__(self) -> h5py.File:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        guard, self._guard = getattr(self, "_guard", None), None
        try:
            if self.file is not None:
                try:
                    self.file.close()
                finally:
                    self.file = None
        finally:
            if guard is not None:
                guard.close()
        if guard is not None and guard.failed is not None:
            code = guard.failed.errno or errno.ENOSPC
            raise OSError(code, f"{os.strerror(code)} (writing {guard.name})", guard.name) from guard.failed


class FullDiskGuard:
    """Binary file object through which HDF5 writes a file (h5py ``driver='fileobj'``) so that a full
    disk cannot crash the process (docs/reliability.md#transient-io-errors-and-full-disks).

    With HDF5 2.0 (h5py 3.16), once a write of raw data has failed with ENOSPC every later close of
    that file, and the library's own clean-up at exit, ends in a segmentation fault: a full disk
    killed the whole run. So HDF5 must never see the failure. The first write that fails with
    ENOSPC or EDQUOT is recorded in :attr:`failed` and reported as written; later writes are dropped.
    :class:`RetryH5PY` closes the file at the end of its block and then raises
    ``OSError(ENOSPC, ...)``; the file is incomplete and the caller removes it (a level-2 staging file
    is discarded). Any other error is raised as usual.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    mode : {'a', 'r+', 'w', 'w-', 'x'}
        h5py mode; :attr:`h5py_mode` is the mode to give h5py with this object.
    """

    def __init__(self, path: str | bytes | os.PathLike, mode: str) -> None:
        self.name = os.fsdecode(os.fspath(path))
        if mode == "a":
            exists = os.path.exists(self.name) and os.path.getsize(self.name) > 0
            flags, self.h5py_mode = (os.O_RDWR, "r+") if exists else (os.O_RDWR | os.O_CREAT, "w")
        elif mode == "r+":
            flags, self.h5py_mode = os.O_RDWR, "r+"
        elif mode == "w":
            flags, self.h5py_mode = os.O_RDWR | os.O_CREAT | os.O_TRUNC, "w"
        elif mode in ("w-", "x"):
            flags, self.h5py_mode = os.O_RDWR | os.O_CREAT | os.O_EXCL, "w"
        else:
            raise ValueError(f"invalid mode {mode!r} for writing an HDF5 file")
        self._fd = os.open(self.name, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._pos = 0
        self.failed: OSError | None = None

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        total = 0
        while total < len(view):
            n = os.preadv(self._fd, [view[total:]], self._pos + total)
            if not n:
                break
            total += n
        self._pos += total
        return total

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(os.fstat(self._fd).st_size - self._pos, 0)
        data = os.pread(self._fd, size, self._pos)
        self._pos += len(data)
        return data

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.failed is None:
            done = 0
            try:
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._pos + done)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.failed = exc
                log.debug("%s: %s; the file is abandoned", self.name, exc)
        self._pos += len(view)
        return len(view)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._pos = offset
        elif whence == os.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else int(size)
        if self.failed is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                self.failed = exc
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def to_str(value: Any) -> str:
    """Return ``value`` as ``str``: bytes are decoded as UTF-8, numpy string scalars unwrapped."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def to_python(value: Any) -> Any:
    """Convert an HDF5 attribute value to plain Python types.

    bytes → str, numpy scalars → ``int``/``float``/``bool``/``str``, arrays → lists (strings
    decoded), 0-d arrays → their scalar.
    """
    if isinstance(value, np.ndarray):
        if value.shape == ():
            return to_python(value[()])
        if value.dtype.kind in "SO" or value.dtype.kind == "U":
            return [to_python(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, bytes | np.bytes_):
        return to_str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_str_attr(obj: h5py.HLObject, name: str, default: str | None = None) -> str | None:
    """Return attribute ``name`` of ``obj`` as ``str`` (fixed-length bytes or variable-length UTF-8).

    Returns ``default`` if the attribute is absent.
    """
    if name not in obj.attrs:
        return default
    return to_str(obj.attrs[name])
