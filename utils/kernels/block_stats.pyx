# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Per-channel statistics of one feed × scan block, one pass each, rows in parallel (03 §4.5, §4.6).

Do not call this module directly: use :mod:`utils.block_ops`.

``pair_diff_rms``
    White-noise rms per sample from pair differences ``d_j = x[2j+1] - x[2j]`` of finite pairs,
    with the ``std`` or ``clipped_std`` estimator of 03 §4.5 (the same definition as
    :func:`utils.noise.pair_difference_rms`), and the NaN count of each row.
``airmass_sums``
    float64 sums ``n, Σx, Σy, Σxx, Σxy`` over finite ``y = raw * scale`` per row, for the
    closed-form fit ``y = offset + tau * x``.

Each row (a channel's samples of one scan) is small enough to stay in cache, so the passes over a
row cost little beyond the one read from memory.
"""

from cython.parallel cimport prange
from libc.math cimport NAN, fabs, sqrt

ctypedef fused real:
    float
    double


cdef inline void _mean_std(const real* row, Py_ssize_t npairs, bint clip, double centre, double lim,
                           double* mean, double* std, Py_ssize_t* count) noexcept nogil:
    """Mean and ddof=1 std of the finite pair differences (optionally only |d - centre| <= lim)."""
    cdef Py_ssize_t j, c = 0
    cdef double d, s1 = 0.0, s2 = 0.0, m
    for j in range(npairs):
        d = <double>row[2 * j + 1] - <double>row[2 * j]
        if d == d and fabs(d) < 1e308 and (not clip or fabs(d - centre) <= lim):
            s1 += d
            c += 1
    count[0] = c
    if c == 0:
        mean[0] = NAN
        std[0] = NAN
        return
    m = s1 / c
    for j in range(npairs):
        d = <double>row[2 * j + 1] - <double>row[2 * j]
        if d == d and fabs(d) < 1e308 and (not clip or fabs(d - centre) <= lim):
            s2 += (d - m) * (d - m)
    mean[0] = m
    std[0] = sqrt(s2 / (c - 1)) if c >= 2 else NAN


cdef inline void _row_pair_rms(const real* row, Py_ssize_t n, int estimator, double clip,
                               Py_ssize_t min_pairs, double* rms, long long* n_nan) noexcept nogil:
    cdef Py_ssize_t j, k, npairs = n // 2, n_valid, c
    cdef double mean, s
    cdef long long nn = 0
    for j in range(n):
        if row[j] != row[j]:
            nn += 1
    n_nan[0] = nn
    _mean_std(row, npairs, False, 0.0, 0.0, &mean, &s, &n_valid)
    if estimator == 1:
        for k in range(2):
            if not (s == s):
                break
            _mean_std(row, npairs, True, mean, clip * s, &mean, &s, &c)
    if n_valid >= min_pairs and n_valid >= 1:
        rms[0] = s / sqrt(2.0)
    else:
        rms[0] = NAN


def pair_diff_rms(const real[:, ::1] x, int estimator, double clip_sigma, Py_ssize_t min_pairs,
                  double[::1] out, long long[::1] n_nan, int n_threads):
    """Rows of ``x`` (rows, n) → ``out[row]`` rms per sample, ``n_nan[row]`` NaN count.

    ``estimator``: 0 = std, 1 = clipped_std.
    """
    cdef Py_ssize_t i, rows = x.shape[0], n = x.shape[1]
    if rows == 0:
        return
    if n < 2:
        out[:] = NAN
        n_nan[:] = 0
        return
    for i in prange(rows, nogil=True, num_threads=n_threads, schedule="static"):
        _row_pair_rms(&x[i, 0], n, estimator, clip_sigma, min_pairs, &out[i], &n_nan[i])


def airmass_sums(const real[:, ::1] raw, const double[::1] scale, const double[::1] x,
                 double[:, ::1] out, int n_threads):
    """Per row: ``out[row] = (n, Σx, Σy, Σxx, Σxy)`` over samples where ``y = raw*scale`` and ``x``
    are finite."""
    cdef Py_ssize_t i, t, rows = raw.shape[0], n = raw.shape[1]
    cdef double y, xv, c, sx, sy, sxx, sxy, sc
    for i in prange(rows, nogil=True, num_threads=n_threads, schedule="static"):
        c = 0.0
        sx = 0.0
        sy = 0.0
        sxx = 0.0
        sxy = 0.0
        sc = scale[i]
        for t in range(n):
            y = raw[i, t] * sc
            xv = x[t]
            if y == y and fabs(y) < 1e300 and xv == xv and fabs(xv) < 1e300:
                c = c + 1.0
                sx = sx + xv
                sy = sy + y
                sxx = sxx + xv * xv
                sxy = sxy + xv * y
        out[i, 0] = c
        out[i, 1] = sx
        out[i, 2] = sy
        out[i, 3] = sxx
        out[i, 4] = sxy
