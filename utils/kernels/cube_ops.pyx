# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Velocity regridding and accumulation of RRL spectra (docs/mapmaking.md#velocity-regridding-and-accumulation), one segment at a time.

Do not call this module directly: use :mod:`modules.MapMaking.read_line_data`.

Every input channel k of a segment deposits its sample ``y[t, k]`` (weight ``w_k``) into output
velocity channels ``j_lo[k]`` (fraction ``f_lo[k]``) and ``j_lo[k] + 1`` (fraction
``1 − f_lo[k]``); deposits outside ``0 … n_v − 1`` are dropped, as are NaN samples and channels
with ``w_k <= 0``. With ``f = f_jk``::

    sum[p, j]  += f w_k y_k(t)        (= w_out,j · y_out,j)
    wsum[p, j] += f w_k               (= w_out,j)
    qsum[p, j] += f² w_k              (= q_j, so var(y_out,j) = q_j / w_out,j²)

``bin_cube`` accumulates by (compressed) pixel ``p = pixels[t]``; ``regrid_samples`` accumulates
per sample (``p = t``) for the per-channel destriper. ``touched[t]`` is set to 1 when sample t
deposited any weight, so that hits are counted once per sample however many lines are stacked.
The accumulators are (pixel or sample, velocity) so one sample's writes share a cache line.
Serial: threads over samples would race on pixels, and one segment is cheap next to its read.
"""

from libc.math cimport isnan


cdef inline void _deposit(const float[:, ::1] y, Py_ssize_t t, Py_ssize_t row,
                          const double[::1] w_chan, const int[::1] j_lo, const double[::1] f_lo,
                          double[:, ::1] acc_sum, double[:, ::1] acc_w, double[:, ::1] acc_q,
                          unsigned char[::1] touched) noexcept nogil:
    cdef Py_ssize_t n_win = y.shape[1], n_v = acc_sum.shape[1], k, j
    cdef double w, v, f, fw
    for k in range(n_win):
        w = w_chan[k]
        if w <= 0.0:
            continue
        v = y[t, k]
        if isnan(v):
            continue
        j = j_lo[k]
        f = f_lo[k]
        if 0 <= j < n_v and f > 0.0:
            fw = f * w
            acc_sum[row, j] += fw * v
            acc_w[row, j] += fw
            acc_q[row, j] += f * fw
            touched[t] = 1
        j = j + 1
        f = 1.0 - f
        if 0 <= j < n_v and f > 0.0:
            fw = f * w
            acc_sum[row, j] += fw * v
            acc_w[row, j] += fw
            acc_q[row, j] += f * fw
            touched[t] = 1


def bin_cube(const float[:, ::1] y, const int[::1] pixels, const double[::1] w_chan,
             const int[::1] j_lo, const double[::1] f_lo, double[:, ::1] acc_sum,
             double[:, ::1] acc_w, double[:, ::1] acc_q, unsigned char[::1] touched):
    """Accumulate one segment into per-pixel velocity spectra.

    Parameters
    ----------
    y : float32, shape (n, n_win)
        Calibrated, continuum-subtracted samples (K), sample-major.
    pixels : int32, shape (n,)
        Compressed pixel index of each sample; < 0 skips the sample.
    w_chan : float64, shape (n_win,)
        Channel weights 1/σ_k² (K⁻²); <= 0 excludes the channel.
    j_lo : int32, shape (n_win,)
        Lower output channel ⌊u_k⌋ of each input channel.
    f_lo : float64, shape (n_win,)
        Fraction deposited into ``j_lo`` (``1 − (u_k − ⌊u_k⌋)``).
    acc_sum, acc_w, acc_q : float64, shape (n_pixels, n_v)
        Accumulators, updated in place.
    touched : uint8, shape (n,)
        Set to 1 for samples that deposited weight (not cleared).
    """
    cdef Py_ssize_t n = y.shape[0], t, p
    if pixels.shape[0] != n or touched.shape[0] != n:
        raise ValueError("pixels and touched must have one entry per sample")
    if w_chan.shape[0] != y.shape[1] or j_lo.shape[0] != y.shape[1] or f_lo.shape[0] != y.shape[1]:
        raise ValueError("w_chan, j_lo and f_lo must have one entry per input channel")
    if acc_w.shape[0] != acc_sum.shape[0] or acc_q.shape[0] != acc_sum.shape[0] or \
            acc_w.shape[1] != acc_sum.shape[1] or acc_q.shape[1] != acc_sum.shape[1]:
        raise ValueError("accumulators must have the same shape")
    with nogil:
        for t in range(n):
            p = pixels[t]
            if p < 0:
                continue
            if p >= acc_sum.shape[0]:
                with gil:
                    raise IndexError(f"pixel index {p} >= {acc_sum.shape[0]}")
            _deposit(y, t, p, w_chan, j_lo, f_lo, acc_sum, acc_w, acc_q, touched)


def regrid_samples(const float[:, ::1] y, const double[::1] w_chan, const int[::1] j_lo,
                   const double[::1] f_lo, double[:, ::1] out_sum, double[:, ::1] out_w,
                   double[:, ::1] out_q, unsigned char[::1] touched):
    """Regrid one segment per sample: ``out_*[t, j]`` as ``bin_cube`` with one pixel per sample.

    ``out_sum``, ``out_w`` and ``out_q`` have shape (n, n_v) and are updated in place (stacked
    lines add into the same arrays); ``y_out,j(t) = out_sum / out_w``.
    """
    cdef Py_ssize_t n = y.shape[0], t
    if out_sum.shape[0] != n or out_w.shape[0] != n or out_q.shape[0] != n or touched.shape[0] != n:
        raise ValueError("outputs must have one row per sample")
    if w_chan.shape[0] != y.shape[1] or j_lo.shape[0] != y.shape[1] or f_lo.shape[0] != y.shape[1]:
        raise ValueError("w_chan, j_lo and f_lo must have one entry per input channel")
    with nogil:
        for t in range(n):
            _deposit(y, t, t, w_chan, j_lo, f_lo, out_sum, out_w, out_q, touched)
