# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Operator kernels of the destriper (docs/mapmaking.md#operator-application). Do not call directly: use
:func:`modules.MapMaking.destriper.destripe`.

Conventions shared by every kernel
----------------------------------
* ``tod``, ``weights`` and ``map_weights`` are float32 ``(n,)``; ``pixels`` is int32 or int64
  ``(n,)`` with −1 for "off the map"; offsets, maps and every accumulation are float64.
* Offsets are described by ``offset_starts`` (int64, ``(n_off + 1,)``): offset j covers samples
  ``offset_starts[j] : offset_starts[j + 1]``. The table is built once from ``segment_starts`` and
  the offset length L (L-sample runs restarting at each segment start, the last one of a segment
  possibly shorter); it costs 8/L bytes per sample. No per-sample offset index is stored: every
  kernel walks offsets and, inside each, its samples, so j(t) is implicit in the loop.
* A sample enters the solver only if its solver weight is > 0 **and** its pixel is valid
  ("good" sample). Samples with zero weight are skipped before their value is read, so a NaN
  in ``tod`` with zero weight is harmless.
* Parallelism: OpenMP ``prange`` over offsets, dynamic schedule in chunks of 64 offsets (each
  chunk a contiguous stretch of the TOD). Kernels that scatter into a map write to thread-private rows
  ``priv[tid, :]``; :func:`reduce_rows` then sums the rows into the output and zeroes them for
  the next call (the caller allocates ``priv`` once, shape ``(n_threads, n_pixels)``).
"""

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport fabsf
from libc.stdint cimport int32_t, int64_t, uint8_t

import numpy as np

ctypedef fused index_t:
    int32_t
    int64_t

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int ds_omp_max_threads(void) { return omp_get_max_threads(); }
    static int ds_have_openmp(void) { return 1; }
    #else
    static int ds_omp_max_threads(void) { return 1; }
    static int ds_have_openmp(void) { return 0; }
    #endif
    """
    int ds_omp_max_threads() noexcept nogil
    int ds_have_openmp() noexcept nogil

cdef float FLT_MAX = 3.4028234663852886e38

# Offsets per unit of dynamic scheduling (64 × L = 6400 samples at L = 100): small enough that a
# thread whose core is taken by another process does not hold the others at the barrier (the
# development machine's 2 cores are shared), large enough that scheduling costs nothing.
cdef enum:
    OFFSET_CHUNK = 64
    SCAN_CHUNK = 65536


def max_threads():
    """Number of threads an OpenMP region would use now (honours OMP_NUM_THREADS, threadpoolctl)."""
    return ds_omp_max_threads()


def have_openmp():
    """True when the kernels were compiled with OpenMP."""
    return bool(ds_have_openmp())


def scan_inputs(const float[::1] tod, const index_t[::1] pixels, const float[::1] weights,
                const float[::1] map_weights, int n_threads):
    """One parallel pass of input checks, without per-sample temporaries.

    Returns
    -------
    (pmin, pmax, n_bad_weight, n_bad_map_weight, n_bad_tod) : tuple of int
        Smallest and largest pixel index (0, −1 when n = 0); the number of solver / map weights
        that are negative or not finite; the number of samples with a valid pixel, a positive
        solver or map weight and a non-finite TOD value.
    """
    cdef Py_ssize_t n = tod.shape[0], t, c, t0, t1
    cdef Py_ssize_t n_chunks = (n + SCAN_CHUNK - 1) // SCAN_CHUNK
    cdef int64_t[:, ::1] part = np.zeros((max(n_chunks, 1), 5), dtype=np.int64)
    cdef int64_t p, lo, hi, bw, bwm, bd
    cdef float w, wm
    for c in prange(n_chunks, nogil=True, num_threads=n_threads, schedule="dynamic"):
        t0 = c * SCAN_CHUNK
        t1 = t0 + SCAN_CHUNK
        if t1 > n:
            t1 = n
        lo = pixels[t0]
        hi = pixels[t0]
        bw = 0
        bwm = 0
        bd = 0
        for t in range(t0, t1):
            p = pixels[t]
            if p < lo:
                lo = p
            if p > hi:
                hi = p
            w = weights[t]
            wm = map_weights[t]
            if not (w >= 0 and w <= FLT_MAX):
                bw = bw + 1
            if not (wm >= 0 and wm <= FLT_MAX):
                bwm = bwm + 1
            if p >= 0 and (w > 0 or wm > 0) and not (fabsf(tod[t]) <= FLT_MAX):
                bd = bd + 1
        part[c, 0] = lo
        part[c, 1] = hi
        part[c, 2] = bw
        part[c, 3] = bwm
        part[c, 4] = bd
    if n == 0:
        return 0, -1, 0, 0, 0
    arr = np.asarray(part)
    return (int(arr[:, 0].min()), int(arr[:, 1].max()), int(arr[:, 2].sum()), int(arr[:, 3].sum()),
            int(arr[:, 4].sum()))


def reduce_rows(double[:, ::1] priv, double[::1] out, int n_threads, const double[::1] scale=None):
    """``out[p] = Σ_k priv[k, p]`` (times ``scale[p]`` if given) and ``priv[:] = 0``, in parallel
    over pixels."""
    cdef Py_ssize_t nt = priv.shape[0], npix = priv.shape[1], p, k
    cdef double acc
    cdef bint scaled = scale is not None
    for p in prange(npix, nogil=True, num_threads=n_threads, schedule="static"):
        acc = 0.0
        for k in range(nt):
            acc = acc + priv[k, p]
            priv[k, p] = 0.0
        if scaled:
            acc = acc * scale[p]
        out[p] = acc


def offset_stats(const index_t[::1] pixels, const float[::1] weights, const int64_t[::1] offset_starts,
                 double[:, ::1] priv, double[::1] wsum_off, int64_t[::1] ngood_off, int n_threads):
    """Setup pass: solver hit weights and per-offset statistics.

    Accumulates ``priv[tid, p] += w_t`` over good samples (reduce with :func:`reduce_rows` to get
    ``M_p``), and writes per offset j the good-sample weight sum ``wsum_off[j]`` and count
    ``ngood_off[j]``.
    """
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int tid = 0
    cdef int64_t p, cnt
    cdef double acc
    cdef float w
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for j in prange(n_off, schedule="dynamic", chunksize=OFFSET_CHUNK):
            acc = 0.0
            cnt = 0
            for t in range(offset_starts[j], offset_starts[j + 1]):
                w = weights[t]
                p = pixels[t]
                if w > 0 and p >= 0:
                    priv[tid, p] += w
                    acc = acc + w
                    cnt = cnt + 1
            wsum_off[j] = acc
            ngood_off[j] = cnt


def bin_offsets(const index_t[::1] pixels, const float[::1] weights, const int64_t[::1] offset_starts,
                const double[::1] a, const uint8_t[::1] free, double[:, ::1] priv, int n_threads):
    """Pass 1 of ``A a``: ``priv[tid, p] += w_t a_{j(t)}`` over good samples of free offsets."""
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int tid = 0
    cdef int64_t p
    cdef double aj
    cdef float w
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for j in prange(n_off, schedule="dynamic", chunksize=OFFSET_CHUNK):
            aj = a[j]
            if free[j] == 0 or aj == 0.0:
                continue
            for t in range(offset_starts[j], offset_starts[j + 1]):
                w = weights[t]
                p = pixels[t]
                if w > 0 and p >= 0:
                    priv[tid, p] += w * aj


def apply_offsets(const index_t[::1] pixels, const float[::1] weights, const int64_t[::1] offset_starts,
                  const double[::1] a, const double[::1] s, const double[::1] wsum_off,
                  const uint8_t[::1] free, double lam, double[::1] y, int n_threads):
    """Pass 2 of ``A a``: ``y_j = Σ_{t∈j} w_t (a_j − s_{p(t)}) + λ a_j`` for free j, else 0.

    ``s`` is the binned offset map ``(Σ w a)/M`` of pass 1 (0 where ``M_p = 0``); the first term
    uses the precomputed ``wsum_off[j] = Σ_{t∈j} w_t``.
    """
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int64_t p
    cdef double acc
    cdef float w
    for j in prange(n_off, nogil=True, num_threads=n_threads, schedule="dynamic", chunksize=OFFSET_CHUNK):
        if free[j] == 0:
            y[j] = 0.0
            continue
        acc = 0.0
        for t in range(offset_starts[j], offset_starts[j + 1]):
            w = weights[t]
            p = pixels[t]
            if w > 0 and p >= 0:
                acc = acc + w * s[p]
        y[j] = (wsum_off[j] + lam) * a[j] - acc


def bin_tod(const float[::1] tod, const index_t[::1] pixels, const float[::1] weights,
            const int64_t[::1] offset_starts, double[:, ::1] priv, int n_threads):
    """Pass 1 of the right-hand side: ``priv[tid, p] += w_t d_t`` over good samples."""
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int tid = 0
    cdef int64_t p
    cdef float w
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for j in prange(n_off, schedule="dynamic", chunksize=OFFSET_CHUNK):
            for t in range(offset_starts[j], offset_starts[j + 1]):
                w = weights[t]
                p = pixels[t]
                if w > 0 and p >= 0:
                    priv[tid, p] += w * <double>tod[t]


def rhs_offsets(const float[::1] tod, const index_t[::1] pixels, const float[::1] weights,
                const int64_t[::1] offset_starts, const double[::1] s, const uint8_t[::1] free,
                double[::1] b, int n_threads):
    """Pass 2 of the right-hand side: ``b_j = Σ_{t∈j} w_t (d_t − s_{p(t)})`` for free j, else 0."""
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int64_t p
    cdef double acc
    cdef float w
    for j in prange(n_off, nogil=True, num_threads=n_threads, schedule="dynamic", chunksize=OFFSET_CHUNK):
        if free[j] == 0:
            b[j] = 0.0
            continue
        acc = 0.0
        for t in range(offset_starts[j], offset_starts[j + 1]):
            w = weights[t]
            p = pixels[t]
            if w > 0 and p >= 0:
                acc = acc + w * (<double>tod[t] - s[p])
        b[j] = acc


def exact_diag(const index_t[::1] pixels, const float[::1] weights, const int64_t[::1] offset_starts,
               const double[::1] inv_m, const uint8_t[::1] free, double lam, double[:, ::1] scratch,
               double[::1] diag, int n_threads):
    """True diagonal of ``FᵀWZF + λI``: ``Σ_{t∈j} w_t − Σ_p c_jp² / M_p + λ``, c_jp = Σ_{t∈j, p(t)=p} w_t.

    ``scratch`` is ``(n_threads, n_pixels)`` of zeros and is left zeroed. Fixed offsets get 1.
    """
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int tid = 0
    cdef int64_t p
    cdef double acc, sub, c
    cdef float w
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for j in prange(n_off, schedule="dynamic", chunksize=OFFSET_CHUNK):
            if free[j] == 0:
                diag[j] = 1.0
                continue
            acc = 0.0
            for t in range(offset_starts[j], offset_starts[j + 1]):
                w = weights[t]
                p = pixels[t]
                if w > 0 and p >= 0:
                    scratch[tid, p] += w
                    acc = acc + w
            sub = 0.0
            for t in range(offset_starts[j], offset_starts[j + 1]):
                p = pixels[t]
                if weights[t] > 0 and p >= 0:
                    c = scratch[tid, p]
                    if c != 0.0:
                        sub = sub + c * c * inv_m[p]
                        scratch[tid, p] = 0.0
            diag[j] = acc - sub + lam


def bin_maps(const float[::1] tod, const index_t[::1] pixels, const float[::1] map_weights,
             const int64_t[::1] offset_starts, const double[::1] a, double[:, ::1] priv_d,
             double[:, ::1] priv_a, double[:, ::1] priv_w, int64_t[:, ::1] priv_h, int n_threads):
    """Final binning with the map weights, one pass.

    Over samples with ``w_m > 0`` and a valid pixel: ``priv_d[tid, p] += w_m d``,
    ``priv_a[tid, p] += w_m a_{j(t)}``, ``priv_w[tid, p] += w_m`` and ``priv_h[tid, p] += 1``.
    """
    cdef Py_ssize_t n_off = offset_starts.shape[0] - 1, j, t
    cdef int tid = 0
    cdef int64_t p
    cdef double aj
    cdef float w
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        for j in prange(n_off, schedule="dynamic", chunksize=OFFSET_CHUNK):
            aj = a[j]
            for t in range(offset_starts[j], offset_starts[j + 1]):
                w = map_weights[t]
                p = pixels[t]
                if w > 0 and p >= 0:
                    priv_d[tid, p] += w * <double>tod[t]
                    priv_a[tid, p] += w * aj
                    priv_w[tid, p] += w
                    priv_h[tid, p] += 1


def reduce_rows_int(int64_t[:, ::1] priv, int64_t[::1] out, int n_threads):
    """Integer version of :func:`reduce_rows`."""
    cdef Py_ssize_t nt = priv.shape[0], npix = priv.shape[1], p, k
    cdef int64_t acc
    for p in prange(npix, nogil=True, num_threads=n_threads, schedule="static"):
        acc = 0
        for k in range(nt):
            acc = acc + priv[k, p]
            priv[k, p] = 0
        out[p] = acc


def dot(const double[::1] a, const double[::1] b):
    """``Σ a_i b_i`` in a plain serial loop.

    Used for the CG dot products instead of ``numpy.dot``: BLAS ``ddot`` would wake OpenBLAS's
    worker threads, whose spin-waiting then competes with the OpenMP threads of the next kernel
    (on 2 cores this made every iteration 2–4× slower). Offset vectors are short, so one thread
    is plenty.
    """
    cdef Py_ssize_t i, n = a.shape[0]
    cdef double acc0 = 0.0, acc1 = 0.0, acc2 = 0.0, acc3 = 0.0
    with nogil:
        i = 0
        while i + 4 <= n:
            acc0 += a[i] * b[i]
            acc1 += a[i + 1] * b[i + 1]
            acc2 += a[i + 2] * b[i + 2]
            acc3 += a[i + 3] * b[i + 3]
            i += 4
        while i < n:
            acc0 += a[i] * b[i]
            i += 1
    return (acc0 + acc1) + (acc2 + acc3)
