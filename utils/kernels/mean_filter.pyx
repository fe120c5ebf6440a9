# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Running mean and NaN-aware running mean along the last axis of 2-D arrays (docs/operations.md#measurement-details).

Do not call this module directly: use :mod:`utils.filters`.

Semantics
---------
Same window as the running median: with h = W // 2, output i averages
``x[clip(i - h + j, 0, n-1)]`` for j = 0 … W-1 ("nearest" padding), which is
``scipy.ndimage.uniform_filter1d(x, W, mode='nearest')`` for odd and even W. The NaN-aware variant
averages the non-NaN values of the window and gives NaN where there are none. The plain variant
follows IEEE arithmetic per window: a NaN (or +inf and -inf together) makes exactly the outputs
whose window holds it NaN -- unlike a running add/subtract sum, which stays NaN for ever after.

Algorithm
---------
No running add/subtract sum (which drifts and never forgets a NaN or an inf). The padded row is cut
into blocks of W samples; for window t of block q, ``sum = suffix_q[t] + prefix_{q+1}[t]``, where
the suffix sums of block q are computed once, backwards, and the prefix sum of block q+1 grows by
one sample per step. Both are float64 sums of at most W terms, restarted at every block, so the
rounding error is bounded by ~W·eps·sum|x| whatever the row length: no drift. Two additions and one
division per sample. Runs of clamped padding samples are summed as count * value, so scratch
memory is O(min(W, n)) even for W >> n. Rows -- or chunks of one row when rows are few -- run in parallel (OpenMP,
no GIL).
"""

from cython.parallel cimport parallel, prange
from libc.math cimport NAN
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import numpy as np

ctypedef fused real:
    float
    double

cdef enum:
    ST_OK = 0
    ST_NOMEM = 2
    MIN_CHUNK_WINDOWS = 16


cdef inline Py_ssize_t _clamp(Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    if j < 0:
        return 0
    if j >= n:
        return n - 1
    return j


cdef inline void _clamped_sum(const real* xrow, Py_ssize_t sx, Py_ssize_t n, Py_ssize_t j0,
                              Py_ssize_t j1, bint nan_aware, double* total,
                              int64_t* count) noexcept nogil:
    """Sum (and count) of x[clip(j)] for j0 <= j < j1, the clamped runs as count * value."""
    cdef Py_ssize_t j, lo, hi, c
    cdef double v, acc = 0.0
    cdef int64_t cnt = 0
    if j1 <= j0:
        total[0] = 0.0
        count[0] = 0
        return
    c = (j1 if j1 < 0 else 0) - j0                  # j < 0: copies of x[0]
    if c > 0:
        v = xrow[0]
        if not nan_aware or v == v:
            acc += c * v
            cnt += c
    lo = j0 if j0 > 0 else 0
    hi = j1 if j1 < n else n
    for j in range(lo, hi):
        v = (<const real*>(<const char*>xrow + j * sx))[0]
        if not nan_aware or v == v:
            acc += v
            cnt += 1
    c = j1 - (j0 if j0 > n else n)                   # j >= n: copies of x[n-1]
    if c > 0:
        v = (<const real*>(<const char*>xrow + (n - 1) * sx))[0]
        if not nan_aware or v == v:
            acc += c * v
            cnt += c
    total[0] = acc
    count[0] = cnt


cdef void _mean_chunk(const real* xrow, Py_ssize_t sx, char* orow, Py_ssize_t so, Py_ssize_t n,
                      Py_ssize_t W, Py_ssize_t s, Py_ssize_t e, bint nan_aware,
                      double* suf, int64_t* sufc) noexcept nogil:
    """Outputs s <= i < e of one row. suf, sufc: min(W, e - s) + 1 scratch values each."""
    cdef Py_ssize_t h = W // 2, base = s, t, i, top
    cdef double pre, v, total
    cdef int64_t prec, cnt
    while base < e:
        # Block A = padded samples base … base+W-1, i.e. x[clip(base - h + t)]; only its first
        # `top` windows are output, so its samples from `top` on are summed as one term (runs of
        # clamped samples as count * value: O(n) work and memory even when W >> n).
        top = e - base
        if top > W:
            top = W
        _clamped_sum(xrow, sx, n, base - h + top, base - h + W, nan_aware,
                           &suf[top], &sufc[top])
        for t in range(top - 1, -1, -1):
            v = (<const real*>(<const char*>xrow + _clamp(base - h + t, n) * sx))[0]
            if nan_aware:
                if v == v:
                    suf[t] = suf[t + 1] + v
                    sufc[t] = sufc[t + 1] + 1
                else:
                    suf[t] = suf[t + 1]
                    sufc[t] = sufc[t + 1]
            else:
                suf[t] = suf[t + 1] + v
        pre = 0.0
        prec = 0
        for t in range(top):
            i = base + t
            total = suf[t] + pre
            if nan_aware:
                cnt = sufc[t] + prec
                if cnt > 0:
                    (<real*>(orow + i * so))[0] = <real>(total / cnt)
                else:
                    (<real*>(orow + i * so))[0] = <real>NAN
            else:
                (<real*>(orow + i * so))[0] = <real>(total / W)
            # Block B sample t (padded index base + W + t) joins the next window.
            v = (<const real*>(<const char*>xrow + _clamp(base + W + t - h, n) * sx))[0]
            if nan_aware:
                if v == v:
                    pre += v
                    prec += 1
            else:
                pre += v
        base += W


def plan_chunks(Py_ssize_t n_rows, Py_ssize_t n, Py_ssize_t W, int n_threads):
    """Number of chunks each row is split into (1 unless rows are fewer than 4 per thread)."""
    cdef Py_ssize_t per_row, cap
    if n_threads <= 1 or n_rows >= 4 * n_threads:
        return 1
    per_row = (4 * n_threads + n_rows - 1) // n_rows
    cap = n // (MIN_CHUNK_WINDOWS * W)
    if cap < 1:
        cap = 1
    return min(per_row, cap)


def mean_filter_rows(const real[:, :] x, real[:, :] out, Py_ssize_t window, bint nan_aware,
                     int n_threads):
    """Running mean of every row of ``x`` into ``out`` (same shape), in parallel.

    Parameters
    ----------
    x, out : 2-D float32 or float64 memoryviews, shape (rows, n); any strides; must not overlap.
    window : int >= 1.
    nan_aware : True to average the non-NaN values only.
    n_threads : int >= 1, thread cap of the OpenMP region.

    Returns
    -------
    int : 0 on success, 2 if out of memory.
    """
    cdef Py_ssize_t n_rows = x.shape[0], n = x.shape[1], W = window
    cdef Py_ssize_t per_row, n_items, item, row, c, s, e, L
    cdef Py_ssize_t sx0, sx1, so0, so1
    cdef int nt, st
    cdef const char* xb
    cdef char* ob
    cdef double* suf
    cdef int64_t* sufc
    cdef int[::1] status

    if W < 1:
        raise ValueError("window must be >= 1")
    if out.shape[0] != n_rows or out.shape[1] != n:
        raise ValueError("out must have the shape of x")
    if n_rows == 0 or n == 0:
        return ST_OK
    nt = n_threads if n_threads >= 1 else 1
    per_row = plan_chunks(n_rows, n, W, nt)
    n_items = n_rows * per_row
    if nt > n_items:
        nt = <int>n_items
    status = np.zeros(n_items, dtype=np.int32)
    xb = <const char*>&x[0, 0]
    ob = <char*>&out[0, 0]
    sx0 = x.strides[0]
    sx1 = x.strides[1]
    so0 = out.strides[0]
    so1 = out.strides[1]

    L = (n + per_row - 1) // per_row + 1            # longest chunk
    if L > W:
        L = W
    suf = NULL  # thread-private below; initialised to keep the compiler quiet
    sufc = NULL
    with nogil, parallel(num_threads=nt):
        suf = <double*>malloc((L + 1) * sizeof(double))
        sufc = <int64_t*>malloc((L + 1) * sizeof(int64_t))
        for item in prange(n_items, schedule='dynamic'):
            if suf == NULL or sufc == NULL:
                status[item] = ST_NOMEM
            else:
                row = item // per_row
                c = item - row * per_row
                s = (c * n) // per_row
                e = ((c + 1) * n) // per_row
                _mean_chunk(<const real*>(xb + row * sx0), sx1, ob + row * so0, so1, n, W, s, e, nan_aware,
                                  suf, sufc)
        free(suf)
        free(sufc)

    for item in range(n_items):
        st = status[item]
        if st != ST_OK:
            return st
    return ST_OK
