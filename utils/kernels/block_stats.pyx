# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: language = c++
"""Per-channel statistics of one feed × scan block, one pass each, rows in parallel (docs/level2.md#noisestatslevel1, docs/level2.md#atmosphereinobservation).

Do not call this module directly: use :mod:`utils.block_ops`.

``pair_diff_rms``
    White-noise rms per sample from pair differences ``d_j = x[2j+1] - x[2j]`` of finite pairs,
    with the ``std`` or ``clipped_std`` estimator of docs/level2.md#noisestatslevel1 (the same definition as
    :func:`utils.noise.pair_difference_rms`), and the NaN count of each row; optionally a copy of
    every ``stride``-th sample, taken while the row is in cache, for the decimated medians.
``decimated_median``
    Median of every ``stride``-th sample of ``raw*scale − offset − tau*x`` per row (finite values
    only; the mean of the two middle values for an even count, as numpy), by selection within a
    window bracketed by order statistics of a sample of the row (``_median``).
``nanmedian_rows``
    numpy's median of the finite values of each row, by the same windowed selection.
``airmass_sums``
    float64 sums ``n, Σx, Σy, Σxx, Σxy`` over finite ``y = raw * scale`` per row, for the
    closed-form fit ``y = offset + tau * x``.
``masked_sums``
    Sums and counts of the finite samples of each row over two sample selections, in one pass.

Each row (a channel's samples of one scan) is small enough to stay in cache, so the passes over a
row cost little beyond the one read from memory.
"""

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport NAN, fabs, sqrt
from libc.stdlib cimport free, malloc
from libcpp.algorithm cimport nth_element

import numpy as np

ctypedef fused real:
    float
    double


cdef inline void _mean_std(const double* d, Py_ssize_t count, double centre, double lim,
                           double* mean, double* std, Py_ssize_t* kept) noexcept nogil:
    """Mean and ddof=1 std of the finite ``d[:count]`` with |d − centre| <= lim, in one branch-free
    pass over sums of ``d − centre`` and its square (the shift keeps the variance well conditioned;
    NaN differences fail the comparison and are skipped). The loop has no branch and this module is
    built with reassociation allowed (setup.py), so the compiler vectorises the three sums."""
    cdef Py_ssize_t j
    cdef double v, k, s1 = 0.0, s2 = 0.0, c = 0.0
    for j in range(count):
        v = d[j] - centre
        k = 1.0 if fabs(v) <= lim else 0.0
        v = v if fabs(v) <= lim else 0.0
        s1 += v
        s2 += v * v
        c += k
    _mean_std_from_sums(s1, s2, c, centre, mean, std, kept)


cdef inline void _mean_std_from_sums(double s1, double s2, double c, double centre, double* mean,
                                     double* std, Py_ssize_t* kept) noexcept nogil:
    """Mean and ddof=1 std from the sums of ``d − centre``, its square and the count."""
    cdef double m, var
    kept[0] = <Py_ssize_t>c
    if c == 0:
        mean[0] = NAN
        std[0] = NAN
        return
    m = s1 / c
    mean[0] = centre + m
    if c >= 2:
        var = (s2 - s1 * m) / (c - 1.0)
        std[0] = sqrt(var) if var > 0.0 else 0.0
    else:
        std[0] = NAN


cdef inline void _row_pair_rms(const real* row, Py_ssize_t n, int estimator, double clip,
                               Py_ssize_t min_pairs, double* dbuf, double* rms,
                               long long* n_nan, Py_ssize_t stride, real* dec) noexcept nogil:
    """One read of the row: the pair differences into ``dbuf`` (float64, NaN kept), the NaN count
    and the sums of the unclipped statistics; the clipping passes then run over ``dbuf``, which
    stays in cache, and stop at the first that cuts nothing (most rows need only one). With
    ``stride > 0``, every ``stride``-th sample is also copied to ``dec`` while the row is in cache."""
    cdef Py_ssize_t j, k, npairs = n // 2, n_valid, c, kept
    cdef double a, b, v, w, f, mean, s, s1 = 0.0, s2 = 0.0, cnt = 0.0
    cdef long long nn = 0
    for j in range(npairs):
        a = row[2 * j]
        b = row[2 * j + 1]
        v = b - a
        dbuf[j] = v
        # as _mean_std with centre 0 and no limit: NaN and ±inf differences are left out
        f = 1.0 if fabs(v) <= 1e300 else 0.0
        w = v if fabs(v) <= 1e300 else 0.0
        s1 += w
        s2 += w * w
        cnt += f
    if cnt < npairs:  # a NaN sample makes its pair's difference NaN: count them only then
        for j in range(2 * npairs):
            nn += row[j] != row[j]
    if n % 2 == 1 and row[n - 1] != row[n - 1]:
        nn += 1
    n_nan[0] = nn
    _mean_std_from_sums(s1, s2, cnt, 0.0, &mean, &s, &n_valid)
    if estimator == 1:
        kept = n_valid
        for k in range(2):
            if not (s == s):
                break
            _mean_std(dbuf, npairs, mean, clip * s, &mean, &s, &c)
            if c == kept:
                break  # nothing was cut: another pass would keep the same differences
            kept = c
    if n_valid >= min_pairs and n_valid >= 1:
        rms[0] = s / sqrt(2.0)
    else:
        rms[0] = NAN
    if stride > 0:
        for k in range((n + stride - 1) // stride):
            dec[k] = row[k * stride]


def pair_diff_rms(const real[:, ::1] x, int estimator, double clip_sigma, Py_ssize_t min_pairs,
                  double[::1] out, long long[::1] n_nan, int n_threads, Py_ssize_t stride,
                  real[:, ::1] dec):
    """Rows of ``x`` (rows, n) → ``out[row]`` rms per sample, ``n_nan[row]`` NaN count.

    ``estimator``: 0 = std, 1 = clipped_std. With ``stride > 0``, ``dec`` (rows, ⌈n/stride⌉)
    receives ``x[:, ::stride]``; with ``stride == 0`` it is not touched.
    """
    cdef Py_ssize_t i, j, rows = x.shape[0], n = x.shape[1]
    cdef double* dbuf
    if rows == 0:
        return
    if n < 2:
        out[:] = NAN
        n_nan[:] = 0
        if stride > 0 and n == 1:
            dec[:, 0] = x[:, 0]
        return
    with nogil, parallel(num_threads=n_threads):
        dbuf = <double*>malloc((n // 2 + 1) * sizeof(double))
        if dbuf != NULL:
            for i in prange(rows, schedule="static"):
                _row_pair_rms(&x[i, 0], n, estimator, clip_sigma, min_pairs, dbuf, &out[i], &n_nan[i],
                              stride, &dec[i, 0] if stride > 0 else NULL)
            free(dbuf)
        else:
            for i in prange(rows, schedule="static"):
                out[i] = NAN
                if stride > 0:
                    for j in range((n + stride - 1) // stride):
                        dec[i, j] = x[i, j * stride]


cdef inline void _airmass_row_slow(const real* row, Py_ssize_t n, double sc, const double* x,
                                   double* out) noexcept nogil:
    """``(n, Σx, Σy, Σxx, Σxy)`` over the samples where ``y = row*sc`` and ``x`` are finite."""
    cdef Py_ssize_t t
    cdef double y, xv, c = 0.0, sx = 0.0, sy = 0.0, sxx = 0.0, sxy = 0.0
    cdef bint ok
    for t in range(n):
        # branch-free (vectorised): a sample with a non-finite y or x adds zeros
        y = row[t] * sc
        xv = x[t]
        ok = (fabs(y) < 1e300) & (fabs(xv) < 1e300)
        y = y if ok else 0.0
        xv = xv if ok else 0.0
        c = c + (1.0 if ok else 0.0)
        sx = sx + xv
        sy = sy + y
        sxx = sxx + xv * xv
        sxy = sxy + xv * y
    out[0] = c
    out[1] = sx
    out[2] = sy
    out[3] = sxx
    out[4] = sxy


def airmass_sums(const real[:, ::1] raw, const double[::1] scale, const double[::1] x,
                 double[:, ::1] out, int n_threads):
    """Per row: ``out[row] = (n, Σx, Σy, Σxx, Σxy)`` over samples where ``y = raw*scale`` and ``x``
    are finite.

    When every ``x`` is finite and a row has no NaN or infinity (nearly every row), ``n``, ``Σx``
    and ``Σxx`` are the same for all rows: they are summed once, and the row loop sums only ``y``
    and ``x·y``, a third of the work. A row whose sums come out non-finite takes the per-sample
    loop again (it is in cache), so the result follows the per-sample definition either way."""
    cdef Py_ssize_t i, t, rows = raw.shape[0], n = raw.shape[1]
    cdef double y, sc, sy, sxy, x_n = 0.0, x_s = 0.0, x_ss = 0.0
    cdef bint x_finite = True
    if rows == 0:
        return
    for t in range(n):
        if not fabs(x[t]) < 1e300:
            x_finite = False
            break
        x_n += 1.0
        x_s += x[t]
        x_ss += x[t] * x[t]
    for i in prange(rows, nogil=True, num_threads=n_threads, schedule="static"):
        sc = scale[i]
        # |sc| < 1e260 keeps |y| below the 1e300 limit for every finite float value
        if x_finite and n > 0 and fabs(sc) < 1e260:
            sy = 0.0
            sxy = 0.0
            for t in range(n):
                y = raw[i, t] * sc
                sy = sy + y
                sxy = sxy + x[t] * y
            if fabs(sy) < 1e300 and fabs(sxy) < 1e300:
                out[i, 0] = x_n
                out[i, 1] = x_s
                out[i, 2] = sy
                out[i, 3] = x_ss
                out[i, 4] = sxy
            else:
                _airmass_row_slow(&raw[i, 0], n, sc, &x[0], &out[i, 0])
        else:
            _airmass_row_slow(&raw[i, 0], n, sc, &x[0], &out[i, 0])


cdef enum:
    MEDIAN_SAMPLE = 128  # sample whose order statistics bracket the median (_median)
    MEDIAN_HALF_WINDOW = 12  # sample ranks either side of the middle: the window is ±12/128 in rank
    MEDIAN_MIN_WINDOWED = 512  # below this count a plain selection is as fast


cdef inline double _select_median(double* buf, Py_ssize_t m) noexcept nogil:
    """numpy's median of ``buf[:m]`` (m ≥ 1) by a plain selection; reorders ``buf``."""
    cdef Py_ssize_t k = m // 2, t
    cdef double lo
    nth_element(buf, buf + k, buf + m)
    if m % 2 == 1:
        return buf[k]
    lo = buf[0]
    for t in range(1, k):
        if buf[t] > lo:
            lo = buf[t]
    return 0.5 * (lo + buf[k])


cdef inline double _median(double* buf, Py_ssize_t m, double* win) noexcept nogil:
    """numpy's median of the finite ``buf[:m]`` (m ≥ 1), exactly; ``win`` is scratch of m doubles.

    A plain selection costs about 12 ns per value here, most of the decimated-median time. Instead,
    two order statistics of a sample of 128 evenly spaced values bracket the middle ranks; one
    branch-free pass counts the values below the lower pivot and copies those between the pivots
    into ``win``; the selection then runs on that window, about a fifth of the values. If the window
    misses a middle rank (a few per cent of rows), the plain selection runs instead. Either way the
    result is the same order statistic, so the value is identical to a full selection's."""
    cdef double samp[MEDIAN_SAMPLE]
    cdef Py_ssize_t j, t, k = m // 2, below = 0, w = 0, q, r_lo, r_hi
    cdef double v, p_lo, p_hi, lo
    cdef bint inside
    if m < MEDIAN_MIN_WINDOWED:
        return _select_median(buf, m)
    for j in range(MEDIAN_SAMPLE):
        samp[j] = buf[(2 * j + 1) * m // (2 * MEDIAN_SAMPLE)]
    # the two pivots are order statistics of the sample: two selections cost half a sort
    q = MEDIAN_SAMPLE // 2
    nth_element(samp, samp + q - MEDIAN_HALF_WINDOW, samp + MEDIAN_SAMPLE)
    nth_element(samp + q - MEDIAN_HALF_WINDOW + 1, samp + q + MEDIAN_HALF_WINDOW - 1, samp + MEDIAN_SAMPLE)
    p_lo = samp[q - MEDIAN_HALF_WINDOW]
    p_hi = samp[q + MEDIAN_HALF_WINDOW - 1]
    for t in range(m):
        v = buf[t]
        win[w] = v
        inside = (v >= p_lo) & (v <= p_hi)
        w = w + (1 if inside else 0)
        below = below + (1 if v < p_lo else 0)
    # the middle ranks are k (odd m) or k-1 and k (even m): both must fall inside the window
    r_lo = (k if m % 2 == 1 else k - 1) - below
    r_hi = k - below
    if r_lo < 0 or r_hi >= w:
        return _select_median(buf, m)
    nth_element(win, win + r_hi, win + w)
    if m % 2 == 1:
        return win[r_hi]
    lo = win[0]  # r_hi >= 1 here: r_lo = r_hi - 1 >= 0

    for t in range(1, r_hi):
        if win[t] > lo:
            lo = win[t]
    return 0.5 * (lo + win[r_hi])


def decimated_median(const real[:, ::1] raw, const double[::1] scale, const double[::1] offset,
                     const double[::1] tau, const double[::1] x, Py_ssize_t stride, double[::1] out,
                     int n_threads):
    """Per row: median over t = 0, stride, 2·stride, … of finite ``raw*scale − offset − tau*x[t]``
    (NaN where there is none)."""
    cdef Py_ssize_t i, t, k, m, rows = raw.shape[0], n = raw.shape[1]
    cdef Py_ssize_t n_dec = (n + stride - 1) // stride if stride > 0 else 0
    cdef double v
    cdef double* buf
    if rows == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        buf = <double*>malloc(2 * (n_dec + 1) * sizeof(double))
        if buf != NULL:
            for i in prange(rows, schedule="static"):
                m = 0
                for k in range(n_dec):
                    t = k * stride
                    v = raw[i, t] * scale[i] - offset[i] - tau[i] * x[t]
                    if v == v and fabs(v) < 1e308:
                        buf[m] = v
                        m = m + 1
                if m == 0:
                    out[i] = NAN
                else:
                    out[i] = _median(buf, m, buf + n_dec + 1)
            free(buf)
        else:
            for i in prange(rows, schedule="static"):
                out[i] = NAN


def nanmedian_rows(const double[:, ::1] x, double[::1] out, int n_threads):
    """Per row: numpy's median of the finite values of ``x`` (NaN where there is none), by the
    windowed selection of ``_median``; rows in parallel, each thread with its own scratch."""
    cdef Py_ssize_t i, t, m, rows = x.shape[0], n = x.shape[1]
    cdef Py_ssize_t width = 2 * (n + 1)
    cdef int threads = max(1, n_threads)
    cdef double v
    cdef double* buf
    if rows == 0:
        return
    scratch_array = np.empty((threads, width), dtype=np.float64)
    cdef double[:, ::1] scratch = scratch_array
    with nogil, parallel(num_threads=threads):
        buf = &scratch[threadid(), 0]
        for i in prange(rows, schedule="static"):
            m = 0
            for t in range(n):
                v = x[i, t]
                buf[m] = v
                m = m + (1 if fabs(v) <= 1.7976931348623157e308 else 0)
            out[i] = NAN if m == 0 else _median(buf, m, buf + n + 1)


def masked_sums(const real[:, ::1] raw, const double[::1] w0, const double[::1] w1,
                double[:, ::1] out, int n_threads):
    """Per row, sums over two sample selections in one pass: ``out[row] = (Σ w0·v, Σ w0, Σ w1·v,
    Σ w1)`` over the finite ``v = raw[row, t]``, with 0/1 weights ``w0[t]``, ``w1[t]`` (one
    branch-free, vectorised pass; no copy of the selected samples). Both selections together cost
    about what one did with a byte mask, whose mixed widths kept the loop scalar."""
    cdef Py_ssize_t i, t, rows = raw.shape[0], n = raw.shape[1]
    cdef double v, f, s0, c0, s1, c1
    for i in prange(rows, nogil=True, num_threads=n_threads, schedule="static"):
        s0 = 0.0
        c0 = 0.0
        s1 = 0.0
        c1 = 0.0
        for t in range(n):
            v = raw[i, t]
            f = 1.0 if fabs(v) <= 1.7976931348623157e308 else 0.0
            v = v if fabs(v) <= 1.7976931348623157e308 else 0.0
            s0 = s0 + w0[t] * v
            c0 = c0 + w0[t] * f
            s1 = s1 + w1[t] * v
            c1 = c1 + w1[t] * f
        out[i, 0] = s0
        out[i, 1] = c0
        out[i, 2] = s1
        out[i, 3] = c1
