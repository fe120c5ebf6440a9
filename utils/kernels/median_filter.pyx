# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Running median and NaN-aware running median along the last axis of 2-D arrays (docs/operations.md#measurement-details).

Do not call this module directly: use :mod:`utils.filters`, which validates the arguments, moves the
filtered axis last and gives every N-D array the ``(rows, n)`` view these kernels expect.

Semantics
---------
For a row ``x`` of length n and a window W, let h = W // 2 and let ``y[p] = x[clip(p - h, 0, n-1)]``
("nearest" padding). Output i is the element of rank k (0-based) of the multiset
``y[i : i + W]`` -- i.e. of ``x[clip(i - h + j, 0, n-1)]`` for j = 0 … W-1 -- with

* plain median: k = h, which is ``scipy.ndimage.median_filter(x, size=W, mode='nearest')``;
* NaN-aware median: the NaNs of the window are dropped; with m values left, the result is the
  value of rank (m-1)/2 for odd m, the mean of ranks m/2-1 and m/2 (computed in the array dtype,
  like ``numpy.nanmedian``) for even m, and NaN for m = 0.

Algorithms
----------
``block`` (used when 8 < W <= n)
    The sorted-block linked-list algorithm of J. Suomela, *Median filtering is equivalent to
    sorting* (arXiv:1406.1717). The padded row is cut into blocks of W samples. Each block is
    sorted once -- O(W log W), i.e. O(log W) per sample; in practice an LSD radix sort of an
    order-preserving 64-bit key, or ranking by counting for small blocks -- and threaded into a
    doubly linked list in sorted order. The window at offset t of block q is the tail ``A[t:]``
    of block q plus the head ``B[:t]`` of block q+1, so one step deletes A[t] from A's list and
    re-inserts B[t] into B's list ("dancing links": B's list was emptied by deleting its
    elements in reverse order, so re-inserting them in forward order restores every link in
    O(1)). The rank-k element of A ∪ B is tracked by one cursor in each list and the number of
    elements before the cursors; a step moves the cursors by O(1). Per sample: one share of a
    sort plus a few cache-resident pointer moves.
``fenwick`` (used when W > n)
    Blocks would be longer than the row. The row is sorted once, the window is held as counts
    per rank in a Fenwick tree, and the rank-k element is found by binary descent: O(log n) per
    sample and O(n) memory whatever W is.
``sorted window`` (used when W <= 8)
    The window's values in a sorted array; a step is a binary search plus a short shift.

Why this choice (measured on the 2-core AMD EPYC dev machine, float64, 10^6 samples, 1 thread,
against SciPy 1.17's 1-D median filter, itself an O(log W) double heap): at W = 3000 the block
algorithm takes ~31 ns per sample against SciPy's ~75 ns (std::sort instead of the radix sort:
~70 ns, i.e. no better than the heap); at W = 300, 35 vs 52 ns; for 8 <= W <= 100 both take
25-45 ns (within +-15 %, SciPy's best case); for W <= 5 the sorted window takes 10-20 ns against
14-24 ns. Every output is one of the window's own values (or the mean of two for the NaN-aware
median), so results are exact; only when +0.0 and -0.0 tie at the median rank may the sign of
the zero returned differ from SciPy's.

Rows -- and, when there are fewer than 4 rows per thread, contiguous chunks of one row -- are
processed in parallel with OpenMP, without the GIL. Each thread allocates its buffers once.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport NAN
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libcpp.pair cimport pair

import numpy as np

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int cr_omp_max_threads(void) { return omp_get_max_threads(); }
    static int cr_have_openmp(void) { return 1; }
    #else
    static int cr_omp_max_threads(void) { return 1; }
    static int cr_have_openmp(void) { return 0; }
    #endif
    """
    int cr_omp_max_threads() noexcept nogil
    int cr_have_openmp() noexcept nogil

# Sorting dominates the block algorithm. Measured on the dev machine (AMD EPYC Zen 4, g++ -O3),
# per element in isolation: std::sort of (double, int) pairs costs 11 ns at n = 8, 30 ns at
# n = 64 and 53 ns at n = 3000; an LSD radix sort of the order-preserving 64-bit key costs 25 ns
# (8-bit digits) at n = 64, 15 ns at n = 1024 and 13 ns (11-bit digits) at n = 3000; ranking by
# counting (O(n^2), vectorised) costs 3 ns at n = 8. The crossovers below were then measured
# inside the whole block algorithm on 10^6 samples. The radix sort alone makes B1 2.3x faster
# than with std::sort.
cdef extern from *:
    """
    #include <algorithm>
    #include <cstring>
    #include <cstdint>
    #include <utility>
    typedef std::pair<uint64_t, int> cr_rec;

    /* Order-preserving map of a non-NaN double to uint64 (-0.0 sorts just before +0.0). */
    static inline uint64_t cr_key(double d) {
        uint64_t u; std::memcpy(&u, &d, 8);
        return (u >> 63) ? ~u : (u | 0x8000000000000000ULL);
    }
    static inline double cr_unkey(uint64_t k) {
        uint64_t u = (k >> 63) ? (k & 0x7FFFFFFFFFFFFFFFULL) : ~k;
        double d; std::memcpy(&d, &u, 8); return d;
    }

    /* Stable LSD radix sort on .first with B-bit digits; digits that are equal for every record
       are skipped (e.g. the zero low mantissa bits of float32 values). cnt: P * 2^B ints. */
    template <int B>
    static void cr_radix(cr_rec* a, cr_rec* tmp, Py_ssize_t n, int* cnt) {
        const int P = (64 + B - 1) / B;
        const int NB = 1 << B;
        const uint64_t mask = (uint64_t)NB - 1;
        std::memset(cnt, 0, sizeof(int) * P * NB);
        for (Py_ssize_t j = 0; j < n; ++j) {
            uint64_t k = a[j].first;
            for (int p = 0; p < P; ++p) cnt[p * NB + ((k >> (p * B)) & mask)]++;
        }
        cr_rec* src = a; cr_rec* dst = tmp;
        for (int p = 0; p < P; ++p) {
            int* c = cnt + p * NB;
            if (c[(src[0].first >> (p * B)) & mask] == n) continue;
            int s = 0;
            for (int b = 0; b < NB; ++b) { int t = c[b]; c[b] = s; s += t; }
            for (Py_ssize_t j = 0; j < n; ++j) {
                cr_rec e = src[j];
                dst[c[(e.first >> (p * B)) & mask]++] = e;
            }
            std::swap(src, dst);
        }
        if (src != a) std::copy(src, src + n, a);
    }

    /* rank[i] = number of v[j] before v[i] in (value, index) order, by counting: O(n^2) but
       branch-free and vectorised, the fastest way to sort blocks of a few dozen values. */
    template <typename T>
    static void cr_rank_small(const T* __restrict v, Py_ssize_t n, int* __restrict rank) {
        for (Py_ssize_t i = 0; i < n; ++i) {
            const T vi = v[i];
            Py_ssize_t r = 0;
            for (Py_ssize_t j = 0; j < i; ++j) r += (v[j] <= vi);
            for (Py_ssize_t j = i + 1; j < n; ++j) r += (v[j] < vi);
            rank[i] = (int)r;
        }
    }

    #define CR_SORT_CNT_INTS (6 * 2048)

    static void cr_sort_records(cr_rec* a, cr_rec* tmp, Py_ssize_t n, int* cnt) {
        if (n < 96) std::sort(a, a + n);
        else if (n < 2048) cr_radix<8>(a, tmp, n, cnt);
        else cr_radix<11>(a, tmp, n, cnt);
    }
    """
    ctypedef pair[uint64_t, int] cr_rec
    uint64_t cr_key(double d) noexcept nogil
    double cr_unkey(uint64_t k) noexcept nogil
    void cr_sort_records(cr_rec* a, cr_rec* tmp, Py_ssize_t n, int* cnt) noexcept nogil
    void cr_rank_small[T](const T* v, Py_ssize_t n, int* rank) noexcept nogil
    int CR_SORT_CNT_INTS

ctypedef fused real:
    float
    double

# Status codes returned per work item (and by the def functions).
cdef enum:
    ST_OK = 0
    ST_NAN = 1
    ST_NOMEM = 2

# Minimum chunk length, in windows, when one row is split between threads: every chunk sorts one
# extra block, so chunks of >= 16 W cost at most ~6 % extra work.
cdef enum:
    MIN_CHUNK_WINDOWS = 16

# Largest blocks ranked by counting (cr_rank_small) rather than sorted; SSE2 compares 4 floats but
# only 2 doubles at a time, hence the different crossovers (measured in the block algorithm).
cdef enum:
    RANK_SMALL_MAX_F32 = 64
    RANK_SMALL_MAX_F64 = 16

# Largest window handled by the sorted-window algorithm (crossover measured against the block
# algorithm, see _median_sorted).
cdef enum:
    SMALL_WINDOW = 8


def max_threads():
    """Number of threads an OpenMP region would use now (honours OMP_NUM_THREADS, threadpoolctl)."""
    return cr_omp_max_threads()


def have_openmp():
    """True when the kernels were compiled with OpenMP."""
    return bool(cr_have_openmp())


cdef inline Py_ssize_t _clamp(Py_ssize_t j, Py_ssize_t n) noexcept nogil:
    if j < 0:
        return 0
    if j >= n:
        return n - 1
    return j


# --------------------------------------------------------------------------------------------------
# Block (Suomela) algorithm
# --------------------------------------------------------------------------------------------------
cdef struct SortWork:
    cr_rec* rec        # records being sorted (capacity L)
    cr_rec* tmp        # scatter buffer of the radix sort (capacity L)
    int* cnt           # radix histograms (CR_SORT_CNT_INTS)


cdef Py_ssize_t _build_block(const char* xrow, Py_ssize_t sx, Py_ssize_t n, Py_ssize_t j0,
                             Py_ssize_t length, bint nan_aware, SortWork* sw,
                             real* sv, int* rk, int* nx, int* pv, int S) noexcept nogil:
    """Gather ``x[clip(j0 + t)]`` for t < length, sort it and link the full list.

    Fills sv[r] (sorted values), rk[t] (rank of position t, -1 for NaN), and the circular list
    nx/pv over ranks 0..nf-1 with sentinel S. Returns nf, or -1 if a NaN is met and not nan_aware.
    """
    cdef Py_ssize_t t, cnt = 0
    cdef int r
    cdef real v
    cdef cr_rec* rec = sw.rec
    cdef real* vals
    cdef int* pos
    cdef int* rank
    cdef Py_ssize_t rank_max
    if real is float:
        rank_max = RANK_SMALL_MAX_F32
    else:
        rank_max = RANK_SMALL_MAX_F64
    if length <= rank_max:
        vals = <real*>sw.tmp
        pos = <int*>sw.rec
        rank = pos + length
        for t in range(length):
            v = (<const real*>(xrow + _clamp(j0 + t, n) * sx))[0]
            if v != v:
                if not nan_aware:
                    return -1
                rk[t] = -1
            else:
                vals[cnt] = v
                pos[cnt] = <int>t
                cnt += 1
        cr_rank_small(vals, cnt, rank)
        for t in range(cnt):
            r = rank[t]
            sv[r] = vals[t]
            rk[pos[t]] = r
    else:
        for t in range(length):
            v = (<const real*>(xrow + _clamp(j0 + t, n) * sx))[0]
            if v != v:
                if not nan_aware:
                    return -1
                rk[t] = -1
            else:
                rec[cnt].first = cr_key(v)
                rec[cnt].second = <int>t
                cnt += 1
        cr_sort_records(rec, sw.tmp, cnt, sw.cnt)
        for r in range(<int>cnt):
            sv[r] = <real>cr_unkey(rec[r].first)
            rk[rec[r].second] = r
    for r in range(<int>cnt):
        nx[r] = r + 1
        pv[r] = r - 1
    if cnt > 0:
        nx[cnt - 1] = S
        pv[0] = S
        nx[S] = 0
        pv[S] = <int>(cnt - 1)
    else:
        nx[S] = S
        pv[S] = S
    return cnt


cdef inline void _unwind(const int* rk, int* nx, int* pv, Py_ssize_t length) noexcept nogil:
    """Delete every element in reverse position order (so forward re-insertion restores links)."""
    cdef Py_ssize_t t
    cdef int r
    for t in range(length - 1, -1, -1):
        r = rk[t]
        if r >= 0:
            nx[pv[r]] = nx[r]
            pv[nx[r]] = pv[r]


cdef int _median_block(const char* xrow, Py_ssize_t sx, char* orow, Py_ssize_t so, Py_ssize_t n,
                       Py_ssize_t W, Py_ssize_t s, Py_ssize_t e, bint nan_aware,
                       SortWork* sw, real* svA, int* rkA, int* nxA, int* pvA,
                       real* svB, int* rkB, int* nxB, int* pvB) noexcept nogil:
    """Outputs s <= i < e of one row with the block algorithm. Returns a status code."""
    cdef Py_ssize_t h = W // 2
    cdef int S = <int>W                       # sentinel node of every list
    cdef Py_ssize_t yend = e + W - 1          # exclusive end of the padded samples needed
    cdef Py_ssize_t base = s, startB, lenB, t, i, m, k, small, nfA, nfB
    cdef int a, b, rx, ry, pa, pb, nxt
    cdef bint ysmall, c_in_a
    cdef real cv, c2
    cdef real* svT
    cdef int* iT

    nfA = _build_block(xrow, sx, n, s - h, W, nan_aware, sw, svA, rkA, nxA, pvA, S)
    if nfA < 0:
        return ST_NAN
    while True:
        startB = base + W
        lenB = yend - startB
        if lenB > W:
            lenB = W
        if lenB < 0:
            lenB = 0
        nfB = _build_block(xrow, sx, n, startB - h, lenB, nan_aware, sw, svB, rkB, nxB, pvB, S)
        if nfB < 0:
            return ST_NAN
        _unwind(rkB, nxB, pvB, lenB)

        # Window t = 0 is block A alone, whose list is full: the rank-k node is node k.
        m = nfA
        if nan_aware:
            k = (m - 1) // 2 if m > 0 else 0
        else:
            k = h
        a = <int>k if m > 0 else S
        b = S
        small = k

        for t in range(W):
            i = base + t
            # ---- output: the cut element c = min(a, b) in the merged order (A first on ties)
            if m == 0:
                (<real*>(orow + i * so))[0] = <real>NAN
            else:
                c_in_a = a != S and (b == S or svA[a] <= svB[b])
                if c_in_a:
                    cv = svA[a]
                else:
                    cv = svB[b]
                if nan_aware and (m % 2) == 0:
                    if c_in_a:
                        nxt = nxA[a]
                        if nxt != S and (b == S or svA[nxt] <= svB[b]):
                            c2 = svA[nxt]
                        else:
                            c2 = svB[b]
                    else:
                        nxt = nxB[b]
                        if a != S and (nxt == S or svA[a] <= svB[nxt]):
                            c2 = svA[a]
                        else:
                            c2 = svB[nxt]
                    cv = (cv + c2) / 2
                (<real*>(orow + i * so))[0] = cv
            if i + 1 >= e:
                return ST_OK

            # ---- delete A[t]
            rx = rkA[t]
            if rx >= 0:
                if rx < a:
                    small -= 1
                elif rx == a:
                    a = nxA[a]
                nxA[pvA[rx]] = nxA[rx]
                pvA[nxA[rx]] = pvA[rx]
                m -= 1
            # ---- re-insert B[t]
            ry = rkB[t]
            if ry >= 0:
                nxB[pvB[ry]] = ry
                pvB[nxB[ry]] = ry
                m += 1
                if a != S and (b == S or svA[a] <= svB[b]):
                    ysmall = svB[ry] < svA[a]      # cut is a (in A): B loses ties
                else:
                    ysmall = ry < b                # cut is b (or +inf when b == S)
                if ysmall:
                    small += 1
                elif ry < b:
                    b = ry                         # y lies between the small set and b
            # ---- rebalance the cut to rank k
            if nan_aware:
                k = (m - 1) // 2 if m > 0 else 0
            while small < k:
                if a != S and (b == S or svA[a] <= svB[b]):
                    a = nxA[a]
                else:
                    b = nxB[b]
                small += 1
            while small > k:
                pa = pvA[a]
                pb = pvB[b]
                if pa == S:
                    b = pb
                elif pb == S:
                    a = pa
                elif svA[pa] <= svB[pb]:
                    b = pb
                else:
                    a = pa
                small -= 1

        # B is now full and becomes A.
        svT = svA; svA = svB; svB = svT
        iT = rkA; rkA = rkB; rkB = iT
        iT = nxA; nxA = nxB; nxB = iT
        iT = pvA; pvA = pvB; pvB = iT
        nfA = nfB
        base += W


# --------------------------------------------------------------------------------------------------
# Sorted-window algorithm (small W)
# --------------------------------------------------------------------------------------------------
cdef inline Py_ssize_t _lower_bound(const real* a, Py_ssize_t m, real v) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = m, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int _median_sorted(const char* xrow, Py_ssize_t sx, char* orow, Py_ssize_t so, Py_ssize_t n,
                        Py_ssize_t W, Py_ssize_t s, Py_ssize_t e, bint nan_aware,
                        real* win) noexcept nogil:
    """Outputs s <= i < e of one row, keeping the window's non-NaN values in a sorted array.

    One step finds the leaving value by binary search and slides the entering value into place:
    O(log W + distance moved); faster than the block algorithm and SciPy for W <= 8 only.
    """
    cdef Py_ssize_t h = W // 2, m = 0, i, j, p
    cdef real v, vo, vn
    cdef bint ok_o, ok_n
    for j in range(W):                              # insertion-sort the first window
        v = (<const real*>(xrow + _clamp(s - h + j, n) * sx))[0]
        if v != v:
            if not nan_aware:
                return ST_NAN
        else:
            p = m
            while p > 0 and win[p - 1] > v:
                win[p] = win[p - 1]
                p -= 1
            win[p] = v
            m += 1
    i = s
    while True:
        if m == 0:
            v = <real>NAN
        elif m % 2 == 1:
            v = win[(m - 1) // 2]
        elif nan_aware:
            v = (win[m // 2 - 1] + win[m // 2]) / 2
        else:
            v = win[m // 2]                         # W even: rank W // 2
        (<real*>(orow + i * so))[0] = v
        if i + 1 >= e:
            return ST_OK
        vo = (<const real*>(xrow + _clamp(i - h, n) * sx))[0]
        vn = (<const real*>(xrow + _clamp(i - h + W, n) * sx))[0]
        ok_o = vo == vo
        ok_n = vn == vn
        if not ok_n and not nan_aware:
            return ST_NAN
        if ok_o:
            p = _lower_bound(win, m, vo)            # win[p] == vo (a copy of the leaving value)
            if ok_n:
                if vn > win[p]:
                    while p + 1 < m and win[p + 1] < vn:
                        win[p] = win[p + 1]
                        p += 1
                else:
                    while p > 0 and win[p - 1] > vn:
                        win[p] = win[p - 1]
                        p -= 1
                win[p] = vn
            else:
                for j in range(p, m - 1):
                    win[j] = win[j + 1]
                m -= 1
        elif ok_n:
            p = m
            while p > 0 and win[p - 1] > vn:
                win[p] = win[p - 1]
                p -= 1
            win[p] = vn
            m += 1
        i += 1


# --------------------------------------------------------------------------------------------------
# Fenwick-tree algorithm (W > n)
# --------------------------------------------------------------------------------------------------
cdef inline void _bit_add(int64_t* tree, Py_ssize_t nf, Py_ssize_t i, int64_t d) noexcept nogil:
    while i <= nf:
        tree[i] += d
        i += i & (-i)


cdef inline Py_ssize_t _bit_select(const int64_t* tree, Py_ssize_t nf, Py_ssize_t top,
                                   int64_t k) noexcept nogil:
    """0-based rank of the element with k elements before it (k < total count)."""
    cdef Py_ssize_t pos = 0, step = top
    while step > 0:
        if pos + step <= nf and tree[pos + step] <= k:
            pos += step
            k -= tree[pos]
        step >>= 1
    return pos


cdef int _median_fenwick(const char* xrow, Py_ssize_t sx, char* orow, Py_ssize_t so,
                         Py_ssize_t n, Py_ssize_t W, bint nan_aware, SortWork* sw,
                         real* sv, int* rk, int64_t* tree) noexcept nogil:
    """All n outputs of one row with a Fenwick tree over the ranks of the row's values."""
    cdef Py_ssize_t h = W // 2
    cdef Py_ssize_t j, i, r, nf = 0, top, hi
    cdef int64_t c, m = 0, k
    cdef real v
    cdef cr_rec* rec = sw.rec
    for j in range(n):
        v = (<const real*>(xrow + j * sx))[0]
        if v != v:
            if not nan_aware:
                return ST_NAN
            rk[j] = -1
        else:
            rec[nf].first = cr_key(v)
            rec[nf].second = <int>j
            nf += 1
    cr_sort_records(rec, sw.tmp, nf, sw.cnt)
    for r in range(nf):
        sv[r] = <real>cr_unkey(rec[r].first)
        rk[rec[r].second] = <int>r
    for r in range(nf + 1):
        tree[r] = 0
    # Multiplicity of x[j] in window 0, which covers x indices p in [-h, W-1-h] (clipped).
    hi = W - 1 - h
    for j in range(n):
        if n == 1:
            c = W
        elif j == 0:
            c = h + 1
        elif j == n - 1:
            c = hi - (n - 1) + 1 if hi >= n - 1 else 0
        else:
            c = 1 if j <= hi else 0
        if c > 0 and rk[j] >= 0:
            tree[rk[j] + 1] += c
            m += c
    for i in range(1, nf + 1):           # O(nf) Fenwick construction
        j = i + (i & (-i))
        if j <= nf:
            tree[j] += tree[i]
    top = 1
    while top * 2 <= nf:
        top *= 2

    for i in range(n):
        if m == 0:
            (<real*>(orow + i * so))[0] = <real>NAN
        elif nan_aware:
            k = (m - 1) // 2
            v = sv[_bit_select(tree, nf, top, k)]
            if m % 2 == 0:
                v = (v + sv[_bit_select(tree, nf, top, k + 1)]) / 2
            (<real*>(orow + i * so))[0] = v
        else:
            (<real*>(orow + i * so))[0] = sv[_bit_select(tree, nf, top, h)]
        if i + 1 >= n:
            break
        r = rk[_clamp(i - h, n)]
        if r >= 0:
            _bit_add(tree, nf, r + 1, -1)
            m -= 1
        r = rk[_clamp(i - h + W, n)]
        if r >= 0:
            _bit_add(tree, nf, r + 1, 1)
            m += 1
    return ST_OK


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def plan_chunks(Py_ssize_t n_rows, Py_ssize_t n, Py_ssize_t W, int n_threads):
    """Number of chunks each row is split into for the block algorithm (1 unless rows are few)."""
    cdef Py_ssize_t per_row, cap
    if n_threads <= 1 or n_rows >= 4 * n_threads:
        return 1
    per_row = (4 * n_threads + n_rows - 1) // n_rows
    cap = n // (MIN_CHUNK_WINDOWS * W)
    if cap < 1:
        cap = 1
    return min(per_row, cap)


cdef inline size_t _rnd(size_t nbytes) noexcept nogil:
    return (nbytes + 63) & ~(<size_t>63)


def median_filter_rows(const real[:, :] x, real[:, :] out, Py_ssize_t window, bint nan_aware,
                       int n_threads, int method=0):
    """Running median of every row of ``x`` into ``out`` (same shape), in parallel.

    Parameters
    ----------
    x, out : 2-D float32 or float64 memoryviews, shape (rows, n); any strides; must not overlap.
    window : int >= 1.
    nan_aware : False for the plain median (a NaN aborts with status 1), True to skip NaNs.
    n_threads : int >= 1, thread cap of the OpenMP region.
    method : 0 auto, 1 block, 2 Fenwick, 3 sorted window (forcing one is for tests). Auto: the
        sorted window for window <= SMALL_WINDOW, else block if window <= n, else Fenwick.

    Returns
    -------
    int : 0 on success, 1 if a NaN was met with ``nan_aware=False``, 2 if out of memory.
    """
    cdef Py_ssize_t n_rows = x.shape[0], n = x.shape[1], W = window
    cdef Py_ssize_t sx0, sx1, so0, so1, n_items, per_row, item, row, c, s, e, L
    cdef Py_ssize_t Wp1 = W + 1
    cdef bint use_block, use_sorted
    cdef int nt, st, worst = ST_OK
    cdef const char* xb
    cdef char* ob
    cdef char* buf
    cdef char* p
    cdef SortWork* sw
    cdef real* svA
    cdef real* svB
    cdef int* iA
    cdef int* iB
    cdef int64_t* tree
    cdef size_t nbytes, o_rec, o_tmp, o_cnt, o_sv, o_svB = 0, o_iA, o_iB = 0, o_tree = 0
    cdef int[::1] status

    if W < 1:
        raise ValueError("window must be >= 1")
    if out.shape[0] != n_rows or out.shape[1] != n:
        raise ValueError("out must have the shape of x")
    if n_rows == 0 or n == 0:
        return ST_OK
    if method == 0:
        if W <= SMALL_WINDOW:
            method = 3
        elif W <= n:
            method = 1
        else:
            method = 2
    use_block = method == 1
    use_sorted = method == 3
    if use_block and W >= 2**31 - 2:
        raise ValueError("window too large for the block algorithm")
    if n >= 2**31 - 2:
        raise ValueError("rows longer than 2**31 - 3 samples are not supported")
    nt = n_threads if n_threads >= 1 else 1

    per_row = plan_chunks(n_rows, n, W, nt) if (use_block or use_sorted) else 1
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
    # Per-thread workspace: byte offsets of each piece (64-byte aligned) in one allocation.
    L = W if (use_block or use_sorted) else n
    o_rec = _rnd(sizeof(SortWork))
    o_tmp = o_rec + _rnd(L * sizeof(cr_rec))
    o_cnt = o_tmp + _rnd(L * sizeof(cr_rec))
    o_sv = o_cnt + _rnd(CR_SORT_CNT_INTS * sizeof(int))
    if use_block or use_sorted:
        o_svB = o_sv + _rnd(W * sizeof(real))
        o_iA = o_svB + _rnd(W * sizeof(real))           # rkA (W), nxA (W+1), pvA (W+1)
        o_iB = o_iA + _rnd((W + 2 * Wp1) * sizeof(int))   # rkB, nxB, pvB
        nbytes = o_iB + _rnd((W + 2 * Wp1) * sizeof(int))
    else:
        o_iA = o_sv + _rnd(n * sizeof(real))              # rk (n)
        o_tree = o_iA + _rnd(n * sizeof(int))             # Fenwick tree (n+1)
        nbytes = o_tree + _rnd((n + 1) * sizeof(int64_t))
    nbytes += 64

    # Thread-private in the parallel block; initialised here only to keep the compiler quiet.
    buf = p = NULL
    sw = NULL
    svA = svB = NULL
    iA = iB = NULL
    tree = NULL
    with nogil, parallel(num_threads=nt):
        buf = <char*>malloc(nbytes)
        p = <char*>_rnd(<size_t>buf)
        sw = <SortWork*>p
        if buf != NULL:
            sw.rec = <cr_rec*>(p + o_rec)
            sw.tmp = <cr_rec*>(p + o_tmp)
            sw.cnt = <int*>(p + o_cnt)
        svA = <real*>(p + o_sv)
        iA = <int*>(p + o_iA)
        if use_block or use_sorted:
            svB = <real*>(p + o_svB)
            iB = <int*>(p + o_iB)
        else:
            tree = <int64_t*>(p + o_tree)
        for item in prange(n_items, schedule='dynamic'):
            if buf == NULL:
                status[item] = ST_NOMEM
            else:
                row = item // per_row
                c = item - row * per_row
                s = (c * n) // per_row
                e = ((c + 1) * n) // per_row
                if use_sorted:
                    status[item] = _median_sorted(
                        xb + row * sx0, sx1, ob + row * so0, so1, n, W, s, e, nan_aware, svA)
                elif use_block:
                    status[item] = _median_block(
                        xb + row * sx0, sx1, ob + row * so0, so1, n, W, s, e, nan_aware, sw,
                        svA, iA, iA + W, iA + W + Wp1, svB, iB, iB + W, iB + W + Wp1)
                else:
                    status[item] = _median_fenwick(
                        xb + row * sx0, sx1, ob + row * so0, so1, n, W, nan_aware, sw,
                        svA, iA, tree)
        free(buf)

    for item in range(n_items):
        st = status[item]
        if st == ST_NOMEM:
            return ST_NOMEM
        if st > worst:
            worst = st
    return worst
