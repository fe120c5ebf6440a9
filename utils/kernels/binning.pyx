# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Fused per-block kernel of GainFilterAndBin (docs/level2.md#gainfilterandbin): calibrate, remove atmosphere and level,
form the gain-filter channel sum and bin into wide channels, in one pass over the raw counts.

Do not call this module directly: use :mod:`utils.block_ops`.

For every sample t and channel i with a finite raw value::

    d_i(t)   = raw_i(t) * inv_gain_i − offset_i − tau_i * x(t) − level_i      (vane K)
    R(t)    += wr_i * d_i(t)                                                 (gain-filter sum)
    num_g(t) += wb_i * d_i(t)                                                (g = group of i)

while ``den_g(t) = Σ wb_i`` and ``wm_g(t) = Σ wb_i·m_i`` over the rows finite at t start from the
group totals and lose each NaN sample

and ``nan_count(t)`` counts the rows whose raw value is NaN, ``r_nan(t)`` those among the gain-filter
rows (``wr != 0``). A (row, sample range) without NaN — nearly all of them — takes a loop without
branches, which the compiler vectorises (a row whose NaN count over the block is known to be 0 is
not even searched); the arithmetic per value is the same in both loops. A row
with ``tau = level = 0`` (a scan without an airmass fit) takes a shorter loop without those terms,
whose values are identical as long as every ``x`` is finite. ``d`` is never stored: the binned
residual of the gain filter follows as ``num/den − ĝ(t) · wm/den``. Threads own disjoint ranges
of samples, so the accumulators need no locks; each thread walks the rows in storage order.
"""

from cython.parallel cimport prange
from libc.math cimport fabs

ctypedef fused real:
    float
    double

cdef enum:
    SAMPLE_CHUNK = 1024


def filter_bin(const real[:, ::1] raw, const double[::1] inv_gain, const double[::1] offset,
               const double[::1] tau, const double[::1] x, const double[::1] level,
               const double[::1] wr, const double[::1] wb, const double[::1] m, const int[::1] group,
               double[::1] r_sum, double[:, ::1] num, double[:, ::1] den, double[:, ::1] wm,
               int[::1] nan_count, int[::1] r_nan, int n_threads, const long long[::1] row_nan=None):
    """Accumulate the channel sums of one block.

    ``r_sum``, ``num`` and ``nan_count`` must be zero-initialised. ``den`` and ``wm`` must hold, for
    every sample, the group totals Σ wb and Σ wb·m over the group's rows with wb > 0: NaN samples
    are subtracted from them here, which is cheaper than adding every finite one (NaN is rare).

    Parameters
    ----------
    raw : (rows, n) float32/float64 counts
    inv_gain, offset, tau, level, wr, wb, m : (rows,) float64
    x : (n,) float64 airmass 1/sin(el)
    group : (rows,) int32 output group of each row, or -1 for none
    r_sum : (n,) float64; num, den, wm : (n_groups, n) float64; nan_count : (n,) int32
    r_nan : (n,) int32, the NaN values among the rows with ``wr != 0`` (the gain-filter channels)
    row_nan : (rows,) int64 or None, NaN samples of each row over all of ``raw``: a row with none
        skips the look for NaN in each sample range (None: every row is looked at)
    """
    cdef Py_ssize_t rows = raw.shape[0], n = raw.shape[1]
    cdef Py_ssize_t n_chunks = (n + SAMPLE_CHUNK - 1) // SAMPLE_CHUNK
    cdef Py_ssize_t c, i, t, t0, t1, n_nan
    cdef double v, d, ig, off, ta, lv, wri, wbi, wmi
    cdef int g
    cdef bint binned, x_finite = True, known = row_nan is not None
    if rows == 0 or n == 0:
        return
    if known and row_nan.shape[0] != rows:
        raise ValueError("row_nan must have one count per row")
    for t in range(n):
        if not fabs(x[t]) <= 1.7976931348623157e308:
            x_finite = False
            break
    for c in prange(n_chunks, nogil=True, num_threads=n_threads, schedule="static"):
        t0 = c * SAMPLE_CHUNK
        t1 = t0 + SAMPLE_CHUNK
        if t1 > n:
            t1 = n
        for i in range(rows):
            ig = inv_gain[i]
            off = offset[i]
            ta = tau[i]
            lv = level[i]
            wri = wr[i]
            wbi = wb[i]
            wmi = wbi * m[i]
            g = group[i]
            binned = g >= 0 and wbi > 0.0
            n_nan = 0
            if not known or row_nan[i] != 0:  # a row known to have no NaN needs no look
                for t in range(t0, t1):
                    n_nan = n_nan + (1 if raw[i, t] != raw[i, t] else 0)
            if n_nan == 0 and ta == 0.0 and lv == 0.0 and x_finite:
                # no atmosphere term and no level (a scan without an airmass fit): subtracting
                # 0·x(t) and 0 changes nothing, so leaving them out gives the same d
                if binned and wri != 0.0:
                    for t in range(t0, t1):
                        d = raw[i, t] * ig - off
                        r_sum[t] += wri * d
                        num[g, t] += wbi * d
                elif binned:
                    for t in range(t0, t1):
                        num[g, t] += wbi * (raw[i, t] * ig - off)
                elif wri != 0.0:
                    for t in range(t0, t1):
                        r_sum[t] += wri * (raw[i, t] * ig - off)
            elif n_nan == 0:
                if binned and wri != 0.0:
                    for t in range(t0, t1):
                        d = raw[i, t] * ig - off - ta * x[t] - lv
                        r_sum[t] += wri * d
                        num[g, t] += wbi * d
                elif binned:
                    for t in range(t0, t1):
                        num[g, t] += wbi * (raw[i, t] * ig - off - ta * x[t] - lv)
                elif wri != 0.0:
                    for t in range(t0, t1):
                        r_sum[t] += wri * (raw[i, t] * ig - off - ta * x[t] - lv)
            elif binned and wri != 0.0:
                for t in range(t0, t1):
                    v = raw[i, t]
                    if v != v:
                        nan_count[t] += 1
                        r_nan[t] += 1
                        den[g, t] -= wbi
                        wm[g, t] -= wmi
                    else:
                        d = v * ig - off - ta * x[t] - lv
                        r_sum[t] += wri * d
                        num[g, t] += wbi * d
            elif binned:
                for t in range(t0, t1):
                    v = raw[i, t]
                    if v != v:
                        nan_count[t] += 1
                        den[g, t] -= wbi
                        wm[g, t] -= wmi
                    else:
                        num[g, t] += wbi * (v * ig - off - ta * x[t] - lv)
            elif wri != 0.0:
                for t in range(t0, t1):
                    v = raw[i, t]
                    if v != v:
                        nan_count[t] += 1
                        r_nan[t] += 1
                    else:
                        r_sum[t] += wri * (v * ig - off - ta * x[t] - lv)
            else:
                for t in range(t0, t1):
                    if raw[i, t] != raw[i, t]:
                        nan_count[t] += 1
