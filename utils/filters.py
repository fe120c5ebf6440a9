"""Running median and running mean filters along one axis of N-D arrays
(docs/operations.md#measurement-details).

Public API
----------
``running_median(x, window)``
    Exact running median, bit-identical to ``scipy.ndimage.median_filter(row, size=window,
    mode='nearest')`` on every 1-D row, for odd and even windows and any ``window >= 1``
    (including windows longer than the row). NaN is rejected.
``running_median_nan(x, window)``
    Median of the non-NaN values of each window (``numpy.nanmedian`` of the clamped window); NaN
    where the window holds no value.
``running_mean(x, window)`` / ``running_mean_nan(x, window)``
    Mean of each window, equal to ``scipy.ndimage.uniform_filter1d(x, window, mode='nearest')``
    to rounding; the NaN-aware form averages the non-NaN values only.

Window convention (shared by all four)
--------------------------------------
With ``h = window // 2``, output ``i`` is computed over ``x[clip(i - h + j, 0, n - 1)]`` for
``j = 0 … window - 1``: the window ``[i - h, i - h + window)`` with indices outside the row clamped
to the nearest end ("nearest" padding). For odd windows it is centred; for even windows it holds
one more sample before ``i`` than after, as in SciPy. The plain median is the element of rank ``h``
(0-based) of the sorted window, i.e. the upper of the two middle values for even windows. The
NaN-aware median of m values is the middle value for odd m and the mean of the two middle values
(in the array's dtype) for even m, exactly as ``numpy.nanmedian``. ±inf are ordinary values.

Types, axes, threads
--------------------
float32 and float64 are filtered natively and keep their dtype; integers and booleans are
converted to float64 and float16 to float32. Any axis of an N-D array can be filtered (``axis``);
rows -- and pieces of a row when there are fewer rows than threads -- run in parallel in the
Cython kernels (``utils.kernels.median_filter``, ``utils.kernels.mean_filter``) without the GIL.
``n_threads=None`` uses the current OpenMP limit, which honours ``OMP_NUM_THREADS`` and
``threadpoolctl.threadpool_limits``; an explicit ``n_threads`` overrides it.

Algorithms (details in the kernel docstrings): sorted-block linked lists (Suomela 2014) with a
radix sort for W <= n, a Fenwick tree over the row's ranks for W > n, a sorted array for W <= 8;
block prefix/suffix float64 sums for the mean (no drift, per-window NaN/inf semantics).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.array_utils import normalize_axis_index
from numpy.typing import ArrayLike

from utils.kernels import mean_filter as _mean_kernel
from utils.kernels import median_filter as _median_kernel

__all__ = ["running_mean", "running_mean_nan", "running_median", "running_median_nan"]

_ST_OK, _ST_NAN, _ST_NOMEM = 0, 1, 2
_MAX_INDEX = np.iinfo(np.intp).max


def _check_window(window: object, name: str) -> int:
    if isinstance(window, bool | np.bool_) or not isinstance(window, int | np.integer):
        raise ValueError(f"{name}: window must be an integer >= 1, got {window!r}")
    w = int(window)
    if w < 1:
        raise ValueError(f"{name}: window must be >= 1, got {w}")
    if w > _MAX_INDEX // 2:
        raise ValueError(f"{name}: window {w} is too large")
    return w


def _check_threads(n_threads: object, name: str) -> int:
    if n_threads is None:
        return max(1, int(_median_kernel.max_threads()))
    if isinstance(n_threads, bool | np.bool_) or not isinstance(n_threads, int | np.integer):
        raise ValueError(f"{name}: n_threads must be None or an integer >= 1, got {n_threads!r}")
    if n_threads < 1:
        raise ValueError(f"{name}: n_threads must be >= 1, got {n_threads}")
    return int(n_threads)


def _as_float_array(x: ArrayLike, name: str, nan_aware: bool) -> np.ndarray:
    """``x`` as a float32/float64 array; masked values become NaN (NaN-aware filters only)."""
    if isinstance(x, np.ma.MaskedArray):
        if np.ma.getmaskarray(x).any():
            if not nan_aware:
                raise ValueError(f"{name}: x has masked values; use the NaN-aware variant")
            data = _as_float_array(np.ma.getdata(x), name, nan_aware)
            return np.where(np.ma.getmaskarray(x), np.array(np.nan, dtype=data.dtype), data)
        x = np.ma.getdata(x)
    a = np.asarray(x)
    kind, size = a.dtype.kind, a.dtype.itemsize
    if kind == "f" and size in (4, 8):
        native = np.dtype(f"f{size}")
        return a if a.dtype == native else a.astype(native)  # e.g. big-endian data from a file
    if kind == "f" and size == 2:
        return a.astype(np.float32)
    if kind in "biu":
        return a.astype(np.float64)
    raise ValueError(
        f"{name}: x must hold real numbers (float32/float64, or integers/float16 which are "
        f"converted), got dtype {a.dtype}"
    )


def _filter(
    kind: str,
    x: ArrayLike,
    window: int,
    axis: int,
    out: np.ndarray | None,
    n_threads: int | None,
    nan_aware: bool,
    name: str,
) -> np.ndarray:
    w = _check_window(window, name)
    nt = _check_threads(n_threads, name)
    a = _as_float_array(x, name, nan_aware)
    if a.ndim == 0:
        raise ValueError(f"{name}: x must have at least one dimension")
    ax = normalize_axis_index(axis, a.ndim)  # AxisError is a ValueError
    if out is not None:
        if not isinstance(out, np.ndarray):
            raise ValueError(f"{name}: out must be a numpy array")
        if out.shape != a.shape or out.dtype != a.dtype:
            raise ValueError(
                f"{name}: out must have shape {a.shape} and dtype {a.dtype}, got {out.shape} and {out.dtype}"
            )
        if not out.flags.writeable:
            raise ValueError(f"{name}: out is read-only")
    if a.size == 0:
        return out if out is not None else np.empty(a.shape, dtype=a.dtype)

    n = a.shape[ax]
    x2 = np.moveaxis(a, ax, -1).reshape(-1, n)  # a view whenever numpy can make one
    # The kernels read their input while writing, so the destination must not overlap it.
    dest = out if out is not None and not np.may_share_memory(out, a) else None
    if dest is None:
        dest = np.empty(a.shape, dtype=a.dtype)
    dest_rows = np.moveaxis(dest, ax, -1)
    try:
        o2 = np.reshape(dest_rows, (-1, n), copy=False)
        direct = True
    except ValueError:  # dest cannot be viewed as (rows, n): filter into a scratch array
        o2 = np.empty(x2.shape, dtype=a.dtype)
        direct = False

    if kind == "median":
        status = _median_kernel.median_filter_rows(x2, o2, w, nan_aware, nt)
    else:
        status = _mean_kernel.mean_filter_rows(x2, o2, w, nan_aware, nt)
    if status == _ST_NAN:
        raise ValueError(f"{name}: x contains NaN; use running_median_nan for data with gaps")
    if status == _ST_NOMEM:
        raise MemoryError(f"{name}: cannot allocate the per-thread workspace (window {w})")

    if not direct:
        dest_rows[...] = o2.reshape(dest_rows.shape)
    if out is not None and dest is not out:
        out[...] = dest
        return out
    return dest


def running_median(
    x: ArrayLike,
    window: int,
    *,
    axis: int = -1,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Running median with "nearest" padding, identical to SciPy's ``median_filter``.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples, any units; real dtype. Must not contain NaN (use :func:`running_median_nan`);
        ±inf are allowed.
    window : int
        Window length W >= 1, in samples. Any W, odd or even, also W > n.
    axis : int, optional
        Axis along which to filter (default: the last).
    out : ndarray, optional
        Destination with the shape and (float) dtype of the result. May be ``x`` itself.
    n_threads : int, optional
        Number of threads; default: the current OpenMP limit (``OMP_NUM_THREADS``,
        ``threadpoolctl``).

    Returns
    -------
    ndarray, shape of x, dtype float32 or float64 (x's dtype; integers give float64)
        Element i along ``axis`` is the element of rank ``W // 2`` (0-based) of the sorted
        window ``x[clip(i - W//2 + j, 0, n-1)]``, j = 0 … W-1, in the units of x. Each 1-D row
        equals ``scipy.ndimage.median_filter(row, size=W, mode='nearest')`` bit for bit (when
        +0.0 and -0.0 tie at the median rank, either zero may be returned).

    Raises
    ------
    ValueError
        Bad window, axis, dtype, thread count or ``out``; NaN in ``x`` (``out``, if given, is
        then partly written).
    MemoryError
        The per-thread workspace (about 72·W bytes + 48 kB, or 52·n bytes when W > n) cannot be
        allocated.
    """
    return _filter("median", x, window, axis, out, n_threads, False, "running_median")


def running_median_nan(
    x: ArrayLike,
    window: int,
    *,
    axis: int = -1,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Running median of the non-NaN values of each window ("nearest" padding).

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples, any units; NaN marks missing samples (masked values of a
        ``numpy.ma.MaskedArray`` count as NaN). ±inf are ordinary values.
    window : int
        Window length W >= 1, in samples.
    axis, out, n_threads
        As for :func:`running_median`.

    Returns
    -------
    ndarray, shape of x, dtype float32 or float64
        Element i along ``axis`` is ``numpy.nanmedian(x[clip(i - W//2 + j, 0, n-1)])`` over
        j = 0 … W-1 (the clamped window includes the end samples repeated, even if they are
        NaN): the middle value of the m non-NaN values for odd m, the mean of the two middle
        values, computed in x's dtype, for even m, and NaN for m = 0 -- without a warning.
    """
    return _filter("median", x, window, axis, out, n_threads, True, "running_median_nan")


def running_mean(
    x: ArrayLike,
    window: int,
    *,
    axis: int = -1,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Running mean with "nearest" padding, as ``scipy.ndimage.uniform_filter1d(mode='nearest')``.

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples, any units; real dtype.
    window : int
        Window length W >= 1, in samples.
    axis, out, n_threads
        As for :func:`running_median`.

    Returns
    -------
    ndarray, shape of x, dtype float32 or float64
        Element i along ``axis`` is the mean of ``x[clip(i - W//2 + j, 0, n-1)]``, j = 0 … W-1,
        accumulated in float64 without drift (relative error ~W·eps). A NaN (or +inf with -inf)
        makes exactly the outputs whose window holds it NaN.
    """
    return _filter("mean", x, window, axis, out, n_threads, False, "running_mean")


def running_mean_nan(
    x: ArrayLike,
    window: int,
    *,
    axis: int = -1,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
) -> np.ndarray:
    """Running mean of the non-NaN values of each window ("nearest" padding).

    Parameters
    ----------
    x : array_like, shape (..., n, ...)
        Samples, any units; NaN (or a masked value) marks missing samples.
    window : int
        Window length W >= 1, in samples.
    axis, out, n_threads
        As for :func:`running_median`.

    Returns
    -------
    ndarray, shape of x, dtype float32 or float64
        ``numpy.nanmean`` of each clamped window, NaN where the window holds no value.
    """
    return _filter("mean", x, window, axis, out, n_threads, True, "running_mean_nan")
