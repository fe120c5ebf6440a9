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

TRANSIENT_ERRNOS: frozenset[int] = frozenset({errno.EAGAIN, errno.EBUSY, errno.ESTALE, errno.ETIMEDOUT})
"""``errno`` values of an ``OSError`` that are worth retrying
(docs/formats/level1.md#opening-files-robustly)."""

_TRANSIENT_TEXT = "unable to lock file"


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
        max_retries: int = 5,
        retry_delay_s: float = 1.0,
        backoff_factor: float = 2.0,
        jitter: float = 0.3,
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
                self.file = h5py.File(self.path, self.mode, **self.h5py_kwargs)
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

    def __enter__(self) -> h5py.File:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        if self.file is not None:
            try:
                self.file.close()
            finally:
                self.file = None


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
