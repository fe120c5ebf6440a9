"""Destriper: offsets + binned maps by preconditioned conjugate gradients (docs/mapmaking.md#destriper).

Model and equations
-------------------
The time-ordered data are modelled as ``d = P m + F a + n`` (docs/mapmaking.md#model-and-equations):

* ``P`` (sample → pixel) is given by ``pixels``; −1 means "off the map";
* ``F`` spreads offset amplitudes ``a`` over runs of L = ``offset_length`` samples that restart at
  every segment start (one scan of one feed) and never straddle segments; the last offset of a
  segment may be shorter than L;
* ``n`` is white noise with per-sample solver weight ``w`` (``weights``).

A sample is *good* when ``w > 0`` and its pixel is valid; only good samples enter the solve
(an off-map sample has no sky model, so it cannot constrain an offset). An offset is *free* when
its fraction of good samples exceeds ``good_fraction``; other offsets are fixed at 0 but their
good samples still constrain the sky (they enter ``M``) and all their samples enter the maps.
With ``W = diag(w)``, ``M = PᵀWP`` and ``Z = I − P M⁻¹ PᵀW``, the free offsets solve::

    (Fᵀ W Z F + λ I) a = Fᵀ W Z d

by preconditioned conjugate gradients (Jacobi, or the exact diagonal). The maps are binned with the
*map* weights ``w_m`` (``map_weights``, default ``weights``)::

    destriped  m   = M_m⁻¹ Pᵀ W_m (d − F a)
    naive      m₀  = M_m⁻¹ Pᵀ W_m d
    hits_p     = #{t : p(t) = p, w_m,t > 0},  weights_p = Σ_{t∈p} w_m,t,  rms_p = 1/sqrt(weights_p)

Gauge: when λ = 0 and every good sample belongs to a free offset, the constant vector over the
free offsets spans the null space; the right-hand side is projected orthogonal to it and, after
the solve, the unweighted mean of the free offsets is subtracted (the map monopole is not
constrained by destriping; by convention the mean offset is zero).

Cost and memory
---------------
One iteration is two passes over the samples (docs/mapmaking.md#operator-application), done by the Cython
kernels of :mod:`utils.kernels.destriper_ops`: pass 1 bins ``w a_j(t)`` into a map (thread-private
accumulators, then one ``Allreduce``), pass 2 reads the map back per sample. Besides the inputs (16 bytes per
sample: float32 TOD, solver and map weights, int32 pixels) the destriper allocates only map- and offset-sized
float64 vectors (and ``n_threads`` map-sized accumulator rows); nothing per sample.

MPI
---
With ``comm`` (an mpi4py communicator), each rank holds whole segments and its own offsets;
map-domain sums are combined with ``Allreduce(SUM)`` (``M`` once, ``Σ w a`` once per iteration,
the final maps once). Scalar reductions (dot products, counts) are combined with ``allgather`` and
summed in rank order, so they are bit-identical on every rank and every rank takes the same
stopping decision at the same iteration. A rank with no samples still takes part in every
collective.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from utils.kernels import destriper_ops as _ops

__all__ = ["CG", "DestriperResult", "STATUSES", "destripe"]

log = logging.getLogger("comap.destriper")

STATUSES: tuple[str, ...] = ("converged", "max_iter", "stalled", "breakdown")
"""Possible values of :attr:`DestriperResult.status`."""

PRECONDITIONERS: tuple[str, ...] = ("jacobi", "exact_diag")
RESIDUAL_REFRESH = 50
"""Every this many iterations the residual is recomputed as ``b − A x`` (docs/mapmaking.md#solver)."""
LOG_EVERY = 10
"""An INFO line every this many iterations (docs/mapmaking.md#solver)."""
JACOBI_FLOOR = 1e-12


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DestriperResult:
    """Output of :func:`destripe` (docs/mapmaking.md#python-entry-point).

    Attributes
    ----------
    map, naive_map : ndarray of float64, shape (n_pixels,)
        Destriped and naive (binned) maps in K; NaN where the map weight is zero.
    hits : ndarray of int64, shape (n_pixels,)
        Samples with map weight > 0 per pixel.
    weights : ndarray of float64, shape (n_pixels,)
        Σ of the map weights per pixel (K⁻²).
    rms : ndarray of float64, shape (n_pixels,)
        ``1/sqrt(weights)`` in K; NaN where ``weights = 0``.
    offsets : ndarray of float64, shape (n_offsets,)
        Offset amplitudes in K, one per offset of this rank; fixed offsets are 0.
    free_offsets : ndarray of bool, shape (n_offsets,)
        True for offsets that were solved for.
    n_iter : int
        CG iterations run.
    residuals : ndarray of float64, shape (n_iter + 1,)
        Relative residual ``‖b − A a_k‖/‖b‖`` per iteration (the CG recursion's value, replaced
        by the true one every 50 iterations and before convergence is declared); element 0 is
        1.0 when ``x0`` is None (a single 0.0 when ``b = 0``). The returned offsets are the best
        iterate, whose residual is ``residuals.min()``: quote that (not ``residuals[-1]``) for a
        run that did not converge.
    converged : bool
        True when ``status == 'converged'``.
    status : str
        ``'converged'``, ``'max_iter'``, ``'stalled'`` or ``'breakdown'``.
    wall_time_s : float
        Wall time of the whole :func:`destripe` call (setup, solve and binning), s.
    """

    map: NDArray[np.float64]
    naive_map: NDArray[np.float64]
    hits: NDArray[np.int64]
    weights: NDArray[np.float64]
    rms: NDArray[np.float64]
    offsets: NDArray[np.float64]
    free_offsets: NDArray[np.bool_]
    n_iter: int
    residuals: NDArray[np.float64]
    converged: bool
    status: str
    wall_time_s: float


# --------------------------------------------------------------------------------------------------
# Communicator wrapper: the serial path is the same code with no-op reductions
# --------------------------------------------------------------------------------------------------


class _SerialComm:
    """Stand-in for a communicator of one rank: every reduction is the identity."""

    rank = 0
    size = 1

    def sum_array(self, arr: NDArray[Any]) -> NDArray[Any]:
        """Element-wise sum over ranks, in place (``Allreduce(SUM)``)."""
        return arr

    def sum_scalars(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        """Sum of a few scalars over ranks, bit-identical on every rank."""
        return values

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank."""
        return bool(flag)


class _MPIComm:
    """Thin wrapper of an mpi4py communicator with the reductions the destriper needs."""

    def __init__(self, comm: Any) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = comm
        self.rank = int(comm.Get_rank())
        self.size = int(comm.Get_size())

    def sum_array(self, arr: NDArray[Any]) -> NDArray[Any]:
        self.comm.Allreduce(self._MPI.IN_PLACE, arr, op=self._MPI.SUM)
        return arr

    def sum_scalars(self, values: NDArray[np.float64]) -> NDArray[np.float64]:
        # allgather + fixed-order sum: identical bits on every rank, so every stopping decision
        # taken from these numbers agrees across ranks (no deadlock from a last-bit difference).
        parts = self.comm.allgather(np.asarray(values, dtype=np.float64))
        out = np.zeros_like(parts[0])
        for part in parts:
            out += part
        return out

    def any(self, flag: bool) -> bool:
        return bool(self.comm.allreduce(int(bool(flag)), op=self._MPI.MAX))


def _wrap_comm(comm: Any) -> _SerialComm | _MPIComm:
    if comm is None:
        return _SerialComm()
    if isinstance(comm, _SerialComm | _MPIComm):
        return comm
    if comm.Get_size() == 1:
        return _SerialComm()
    return _MPIComm(comm)


# --------------------------------------------------------------------------------------------------
# Preconditioned conjugate gradients (pixell-style)
# --------------------------------------------------------------------------------------------------


class CG:
    """Preconditioned conjugate-gradient solver of ``A x = b``, one :meth:`step` at a time.

    In the style of pixell's ``CG``: the caller drives the iteration and decides when to stop.
    Vectors are float64 arrays of one shape; under MPI each rank holds its part and ``dots``
    returns global values.

    Parameters
    ----------
    A : callable ``(x, out) -> None``
        Writes ``A x`` into ``out``. A must be symmetric positive (semi-)definite.
    b : ndarray of float64
        Right-hand side.
    x0 : ndarray of float64, optional
        Starting point (default 0).
    M : callable ``(r, out) -> None``, optional
        Writes the preconditioned residual ``M⁻¹ r`` into ``out`` (default: identity).
    dots : callable ``(pairs) -> ndarray``, optional
        Global dot products of a list of vector pairs (default: local ``numpy.dot``).

    Attributes
    ----------
    x, r : ndarray
        Current iterate and residual.
    i : int
        Iterations done.
    rr, bb : float
        ``‖r‖²`` and ``‖b‖²``.
    broken : bool
        True after a step met ``pᵀAp ≤ 0`` or a non-finite value (``x`` and ``r`` may then be
        invalid; keep a copy of the best iterate, as :func:`destripe` does).
    """

    def __init__(
        self,
        A: Callable[[NDArray[np.float64], NDArray[np.float64]], None],
        b: NDArray[np.float64],
        x0: NDArray[np.float64] | None = None,
        M: Callable[[NDArray[np.float64], NDArray[np.float64]], None] | None = None,
        dots: Callable[[list[tuple[NDArray[np.float64], NDArray[np.float64]]]], NDArray[np.float64]]
        | None = None,
    ) -> None:
        self.A = A
        self.M = M if M is not None else _copy_into
        self.dots = dots if dots is not None else _local_dots
        self.b = b
        self.x = np.zeros_like(b) if x0 is None else np.array(x0, dtype=np.float64)
        self.Ap = np.empty_like(b)
        self.r = np.empty_like(b)
        self.z = np.empty_like(b)
        self.broken = False
        self.i = 0
        self._x_is_zero = x0 is None
        self._residual_from_scratch()
        self.bb = float(self.dots([(b, b)])[0])
        self.p = self.z.copy()

    def refresh_residual(self) -> None:
        """Replace the recursive residual by ``b − A x`` (the search direction is kept)."""
        self._residual_from_scratch()

    def _residual_from_scratch(self) -> None:
        """``r = b − A x``, ``z = M⁻¹ r`` and the dot products."""
        # Decided from x0 only (not from the values of x), so every MPI rank makes the same call.
        if not self._x_is_zero:
            self.A(self.x, self.Ap)
            np.subtract(self.b, self.Ap, out=self.r)
        else:
            self.r[...] = self.b
        self.M(self.r, self.z)
        self.rr, self.rz = (float(v) for v in self.dots([(self.r, self.r), (self.r, self.z)]))

    def step(self, recompute_residual: bool = False) -> bool:
        """One CG iteration. Returns False (and sets :attr:`broken`) on breakdown.

        Parameters
        ----------
        recompute_residual : bool
            Replace the recursive residual by ``b − A x`` after this step (one extra ``A``
            application), to stop the recursion from drifting.
        """
        self.A(self.p, self.Ap)
        pap = float(self.dots([(self.p, self.Ap)])[0])
        if not (math.isfinite(pap) and pap > 0.0 and math.isfinite(self.rz)):
            self.broken = True
            return False
        alpha = self.rz / pap
        if not math.isfinite(alpha):
            self.broken = True
            return False
        self._x_is_zero = False
        rz_old = self.rz
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(self.p, alpha, out=self.z)  # z is free until M(r) below
            self.x += self.z
            np.multiply(self.Ap, alpha, out=self.z)
            self.r -= self.z
            if recompute_residual:
                self._residual_from_scratch()
            else:
                self.M(self.r, self.z)
                self.rr, self.rz = (float(v) for v in self.dots([(self.r, self.r), (self.r, self.z)]))
        self.i += 1
        if not (math.isfinite(self.rr) and math.isfinite(self.rz)):
            self.broken = True
            return False
        beta = self.rz / rz_old
        self.p *= beta
        self.p += self.z
        return True


def _copy_into(r: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    out[...] = r


def _local_dots(pairs: list[tuple[NDArray[np.float64], NDArray[np.float64]]]) -> NDArray[np.float64]:
    return np.array([_ops.dot(u, v) for u, v in pairs])


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _as_1d(name: str, arr: object, dtypes: tuple[type, ...], n: int | None) -> NDArray[Any]:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"destripe: {name} must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"destripe: {name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.type not in dtypes:
        wanted = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"destripe: {name} must be {wanted}, got {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"destripe: {name} has {arr.shape[0]} samples, tod has {n}")
    if not arr.flags.c_contiguous:
        log.debug("destripe: %s is not contiguous; copying it", name)
        arr = np.ascontiguousarray(arr)
    return arr


def _check_parameters(
    offset_length: object,
    n_pixels: object,
    tol: object,
    max_iter: object,
    lambda_ridge: object,
    good_fraction: object,
    min_iter: object,
    stall_window: object,
    stall_factor: object,
    preconditioner: object,
) -> None:
    if not _is_int(offset_length) or int(offset_length) < 1:
        raise ValueError(f"destripe: offset_length must be an integer >= 1, got {offset_length!r}")
    if not _is_int(n_pixels) or int(n_pixels) < 1:
        raise ValueError(f"destripe: n_pixels must be an integer >= 1, got {n_pixels!r}")
    if not isinstance(tol, int | float | np.floating) or not (0 < float(tol) < 1):
        raise ValueError(f"destripe: tol must be a number in (0, 1), got {tol!r}")
    for name, value, low in (
        ("max_iter", max_iter, 0),
        ("min_iter", min_iter, 0),
        ("stall_window", stall_window, 1),
    ):
        if not _is_int(value) or int(value) < low:
            raise ValueError(f"destripe: {name} must be an integer >= {low}, got {value!r}")
    if not isinstance(lambda_ridge, int | float | np.floating) or not (
        math.isfinite(float(lambda_ridge)) and float(lambda_ridge) >= 0
    ):
        raise ValueError(f"destripe: lambda_ridge must be a finite number >= 0, got {lambda_ridge!r}")
    if not isinstance(good_fraction, int | float | np.floating) or not (0 <= float(good_fraction) < 1):
        raise ValueError(f"destripe: good_fraction must be in [0, 1), got {good_fraction!r}")
    if not isinstance(stall_factor, int | float | np.floating) or not (0 < float(stall_factor) <= 1):
        raise ValueError(f"destripe: stall_factor must be in (0, 1], got {stall_factor!r}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"destripe: preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}")


def _check_segments(segment_starts: object, n: int) -> NDArray[np.int64]:
    if segment_starts is None:
        return np.zeros(1, dtype=np.int64)
    seg = np.asarray(segment_starts)
    if seg.ndim != 1 or seg.size == 0:
        raise ValueError(f"destripe: segment_starts must be a non-empty 1-D array, got shape {seg.shape}")
    if not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(f"destripe: segment_starts must be integers, got {seg.dtype}")
    seg = seg.astype(np.int64)
    if seg[0] != 0:
        raise ValueError(f"destripe: segment_starts must begin at 0, got {seg[0]}")
    if np.any(np.diff(seg) < 0):
        raise ValueError("destripe: segment_starts must be sorted (non-decreasing)")
    if seg[-1] > n:
        raise ValueError(f"destripe: segment_starts[-1] = {seg[-1]} exceeds the number of samples {n}")
    return seg


def _offset_starts(segment_starts: NDArray[np.int64], n: int, length: int) -> NDArray[np.int64]:
    """Start of every offset plus a final ``n``: offsets of ``length`` samples restarting at each
    segment start, the last one of a segment possibly shorter; empty segments have none."""
    seg_end = np.append(segment_starts[1:], n)
    counts = -(-(seg_end - segment_starts) // length)  # ceil
    n_off = int(counts.sum())
    first = np.repeat(segment_starts, counts)
    rank_in_seg = np.arange(n_off, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.append(first + rank_in_seg * length, np.int64(n)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------------------------------


class _Operator:
    """``A = Fᵀ W Z F + λ I`` on the free offsets of one rank, and the matching right-hand side."""

    def __init__(
        self,
        pixels: NDArray[np.integer],
        weights: NDArray[np.float32],
        offset_starts: NDArray[np.int64],
        n_pixels: int,
        good_fraction: float,
        lambda_ridge: float,
        cw: _SerialComm | _MPIComm,
        n_threads: int,
    ) -> None:
        self.pixels = pixels
        self.weights = weights
        self.offset_starts = offset_starts
        self.lam = float(lambda_ridge)
        self.cw = cw
        self.nt = n_threads
        n_off = offset_starts.size - 1
        self.priv = np.zeros((n_threads, n_pixels))
        self.hit_weight = np.empty(n_pixels)  # M_p, global
        self.wsum_off = np.empty(n_off)
        self.ngood_off = np.empty(n_off, dtype=np.int64)
        _ops.offset_stats(pixels, weights, offset_starts, self.priv, self.wsum_off, self.ngood_off, n_threads)
        _ops.reduce_rows(self.priv, self.hit_weight, n_threads)
        cw.sum_array(self.hit_weight)
        self.inv_m = np.zeros(n_pixels)
        np.divide(1.0, self.hit_weight, out=self.inv_m, where=self.hit_weight > 0)
        lengths = np.diff(offset_starts)
        self.free = self.ngood_off > good_fraction * lengths
        self.free_u8 = self.free.view(np.uint8)
        self.map_buf = np.empty(n_pixels)
        self.n_applications = 0

    def bin_to_map(self, a: NDArray[np.float64]) -> NDArray[np.float64]:
        """Pass 1: ``s = (Σ_{t∈p} w_t a_j(t)) / M_p`` (0 where ``M_p = 0``), summed over ranks."""
        _ops.bin_offsets(self.pixels, self.weights, self.offset_starts, a, self.free_u8, self.priv, self.nt)
        return self._reduce_and_scale()

    def _reduce_and_scale(self) -> NDArray[np.float64]:
        """Sum the thread-private rows (and the ranks), then divide by ``M``."""
        if self.cw.size == 1:
            _ops.reduce_rows(self.priv, self.map_buf, self.nt, self.inv_m)
        else:
            _ops.reduce_rows(self.priv, self.map_buf, self.nt)
            self.cw.sum_array(self.map_buf)
            self.map_buf *= self.inv_m
        return self.map_buf

    def __call__(self, a: NDArray[np.float64], out: NDArray[np.float64]) -> None:
        """``out = A a`` (two passes over the samples)."""
        s = self.bin_to_map(a)
        _ops.apply_offsets(
            self.pixels,
            self.weights,
            self.offset_starts,
            a,
            s,
            self.wsum_off,
            self.free_u8,
            self.lam,
            out,
            self.nt,
        )
        self.n_applications += 1

    def rhs(self, tod: NDArray[np.float32]) -> NDArray[np.float64]:
        """``b = Fᵀ W Z d`` (two passes over the samples)."""
        _ops.bin_tod(tod, self.pixels, self.weights, self.offset_starts, self.priv, self.nt)
        self._reduce_and_scale()
        b = np.empty(self.wsum_off.size)
        _ops.rhs_offsets(
            tod, self.pixels, self.weights, self.offset_starts, self.map_buf, self.free_u8, b, self.nt
        )
        return b

    def jacobi_diag(self) -> NDArray[np.float64]:
        """``D_j = max(Σ_{t∈j} w_t + λ, 1e-12)`` (1 for fixed offsets)."""
        diag = np.maximum(self.wsum_off + self.lam, JACOBI_FLOOR)
        diag[~self.free] = 1.0
        return diag

    def exact_diag(self) -> NDArray[np.float64]:
        """The true diagonal of ``Fᵀ W Z F + λ I``, floored at 1e-12 (1 for fixed offsets)."""
        diag = np.empty(self.wsum_off.size)
        _ops.exact_diag(
            self.pixels,
            self.weights,
            self.offset_starts,
            self.inv_m,
            self.free_u8,
            self.lam,
            self.priv,
            diag,
            self.nt,
        )
        np.maximum(diag, JACOBI_FLOOR, out=diag)
        return diag


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def destripe(
    tod: NDArray[np.float32],
    pixels: NDArray[np.int32] | NDArray[np.int64],
    weights: NDArray[np.float32],
    offset_length: int,
    n_pixels: int,
    tol: float = 1e-6,
    max_iter: int = 1000,
    *,
    segment_starts: NDArray[np.integer] | None = None,
    map_weights: NDArray[np.float32] | None = None,
    lambda_ridge: float = 0.0,
    good_fraction: float = 0.5,
    min_iter: int = 3,
    stall_window: int = 50,
    stall_factor: float = 0.9,
    preconditioner: str = "jacobi",
    x0: NDArray[np.float64] | None = None,
    comm: Any = None,
) -> DestriperResult:
    """Destripe time-ordered data into a map (docs/mapmaking.md#destriper).

    Parameters
    ----------
    tod : ndarray of float32, shape (n,)
        Data in K. Values where neither weight is positive (or the pixel is −1) are never read,
        so they may be NaN.
    pixels : ndarray of int32 or int64, shape (n,)
        Pixel index in [0, n_pixels), or −1 for samples off the map (ignored by the solve and the
        maps).
    weights : ndarray of float32, shape (n,)
        Solver weights ``w_s >= 0`` (K⁻²).
    offset_length : int
        Samples per offset, L >= 1.
    n_pixels : int
        Number of map pixels (normally the compressed hit set, docs/mapmaking.md#per-segment-processing).
    tol : float
        Stop when ``‖r_k‖/‖b‖ < tol`` and ``k >= min_iter``.
    max_iter : int
        Largest number of CG iterations.
    segment_starts : array of int, shape (n_seg,), optional
        Sorted segment start indices beginning at 0 (default ``[0]``). Offsets restart at each.
    map_weights : ndarray of float32, shape (n,), optional
        Weights of the final binning (K⁻²); default ``weights``.
    lambda_ridge : float
        Ridge λ >= 0 added to the diagonal of the system (K⁻²).
    good_fraction : float
        An offset is free when its fraction of samples with ``w > 0`` and a valid pixel exceeds
        this; other offsets are fixed at 0.
    min_iter : int
        Fewest iterations before convergence may be declared.
    stall_window, stall_factor : int, float
        Stop with status ``'stalled'`` when the best relative residual of the last
        ``stall_window`` iterations is not below ``stall_factor`` × the best one before them.
    preconditioner : {'jacobi', 'exact_diag'}
        ``'jacobi'``: ``D_j = max(Σ_{t∈j} w_t + λ, 1e-12)``; ``'exact_diag'``: the true diagonal of
        ``FᵀWZF + λI``, computed once in O(n).
    x0 : ndarray of float64, shape (n_offsets,), optional
        Starting offsets, e.g. ``offsets`` of an earlier result with the same segmentation; fixed
        entries are ignored (set to 0).
    comm : mpi4py communicator, optional
        Distributed mode (docs/mapmaking.md#mpi): each rank passes whole segments of its own; the maps are
        global (identical on every rank), the offsets rank-local.

    Returns
    -------
    DestriperResult

    Raises
    ------
    ValueError
        For inputs of the wrong shape or dtype, pixel indices outside [−1, n_pixels), negative or
        non-finite weights, non-finite data where a weight is positive, bad ``segment_starts`` or
        out-of-range parameters. Under MPI, every rank raises when any rank's input is invalid.
    """
    t_start = time.perf_counter()
    cw = _wrap_comm(comm)

    # ---- validation (collective flag so that no rank is left waiting in a later collective)
    error: ValueError | None = None
    try:
        tod, pixels, weights, map_weights, seg, x0 = _validate(
            tod, pixels, weights, offset_length, n_pixels, tol, max_iter, segment_starts, map_weights,
            lambda_ridge, good_fraction, min_iter, stall_window, stall_factor, preconditioner, x0,
        )  # fmt: skip
    except ValueError as exc:
        error = exc
    if cw.any(error is not None):
        if error is not None:
            raise error
        raise ValueError("destripe: invalid input on another MPI rank")

    n = tod.shape[0]
    n_threads = max(1, int(_ops.max_threads()))
    offset_starts = _offset_starts(seg, n, int(offset_length))
    n_off = offset_starts.size - 1
    if x0 is not None and x0.shape != (n_off,):
        # Checked here because n_off needs the segmentation; all ranks agree via the flag below.
        error = ValueError(f"destripe: x0 must have shape ({n_off},) (one per offset), got {x0.shape}")
    if cw.any(error is not None):
        if error is not None:
            raise error
        raise ValueError("destripe: invalid input on another MPI rank")

    # ---- setup: M_p, offset statistics, free offsets, gauge, right-hand side
    op = _Operator(
        pixels,
        weights,
        offset_starts,
        int(n_pixels),
        float(good_fraction),
        float(lambda_ridge),
        cw,
        n_threads,
    )
    free = op.free
    n_free_local = int(np.count_nonzero(free))
    n_good_fixed_local = int(op.ngood_off[~free].sum())
    n_free, n_good_fixed = (
        int(v) for v in cw.sum_scalars(np.array([n_free_local, n_good_fixed_local], float))
    )
    gauge = float(lambda_ridge) == 0.0 and n_good_fixed == 0 and n_free > 0

    def project_gauge(v: NDArray[np.float64]) -> None:
        """Remove the unweighted mean over the free offsets (global)."""
        if gauge:
            mean = float(cw.sum_scalars(np.array([v[free].sum()]))[0]) / n_free
            v[free] -= mean

    b = op.rhs(tod)
    project_gauge(b)
    diag = op.exact_diag() if preconditioner == "exact_diag" else op.jacobi_diag()
    inv_diag = 1.0 / diag

    def precondition(r: NDArray[np.float64], out: NDArray[np.float64]) -> None:
        np.multiply(r, inv_diag, out=out)

    def dots(pairs: list[tuple[NDArray[np.float64], NDArray[np.float64]]]) -> NDArray[np.float64]:
        return cw.sum_scalars(_local_dots(pairs))

    if cw.any(x0 is not None):  # every rank starts from x0 (zeros where a rank passed none)
        x0 = np.zeros(n_off) if x0 is None else np.where(free, x0, 0.0)

    # ---- solve
    a, residuals, status = _solve(
        op, b, x0, precondition, dots, project_gauge, tol=float(tol), max_iter=int(max_iter),
        min_iter=int(min_iter), stall_window=int(stall_window), stall_factor=float(stall_factor),
        rank=cw.rank,
    )  # fmt: skip
    project_gauge(a)
    a[~free] = 0.0

    # ---- maps with the map weights
    sums = np.zeros((3, int(n_pixels)))
    hits = np.zeros(int(n_pixels), dtype=np.int64)
    priv_a = np.zeros_like(op.priv)
    priv_w = np.zeros_like(op.priv)
    priv_h = np.zeros(op.priv.shape, dtype=np.int64)
    _ops.bin_maps(tod, pixels, map_weights, offset_starts, a, op.priv, priv_a, priv_w, priv_h, n_threads)
    for k, priv in enumerate((op.priv, priv_a, priv_w)):
        _ops.reduce_rows(priv, sums[k], n_threads)
    _ops.reduce_rows_int(priv_h, hits, n_threads)
    del priv_a, priv_w, priv_h
    cw.sum_array(sums)
    cw.sum_array(hits)
    sum_d, sum_a, wsum = sums
    seen = wsum > 0
    naive = np.full(int(n_pixels), np.nan)
    dmap = np.full(int(n_pixels), np.nan)
    rms = np.full(int(n_pixels), np.nan)
    np.divide(sum_d, wsum, out=naive, where=seen)
    np.divide(sum_d - sum_a, wsum, out=dmap, where=seen)
    np.divide(1.0, np.sqrt(wsum), out=rms, where=seen)

    n_iter = residuals.size - 1
    wall = time.perf_counter() - t_start
    if cw.rank == 0:
        msg = (
            "destripe: %s after %d iterations, relative residual %.3e (best %.3e, tol %.1e); "
            "%d samples, %d offsets (%d free), %d pixels, %.2f s"
        )
        args = (status, n_iter, residuals[-1], residuals.min(), tol, n, n_off, n_free, int(n_pixels), wall)
        if status == "converged":
            log.info(msg, *args)
        else:
            log.warning(msg, *args)
    return DestriperResult(
        map=dmap,
        naive_map=naive,
        hits=hits,
        weights=wsum.copy(),
        rms=rms,
        offsets=a,
        free_offsets=free.copy(),
        n_iter=int(n_iter),
        residuals=residuals,
        converged=status == "converged",
        status=status,
        wall_time_s=float(wall),
    )


def _validate(
    tod: Any,
    pixels: Any,
    weights: Any,
    offset_length: Any,
    n_pixels: Any,
    tol: Any,
    max_iter: Any,
    segment_starts: Any,
    map_weights: Any,
    lambda_ridge: Any,
    good_fraction: Any,
    min_iter: Any,
    stall_window: Any,
    stall_factor: Any,
    preconditioner: Any,
    x0: Any,
) -> tuple[
    NDArray[np.float32],
    NDArray[np.integer],
    NDArray[np.float32],
    NDArray[np.float32],
    NDArray[np.int64],
    NDArray[np.float64] | None,
]:
    _check_parameters(
        offset_length, n_pixels, tol, max_iter, lambda_ridge, good_fraction, min_iter, stall_window,
        stall_factor, preconditioner,
    )  # fmt: skip
    tod = _as_1d("tod", tod, (np.float32,), None)
    n = tod.shape[0]
    pixels = _as_1d("pixels", pixels, (np.int32, np.int64), n)
    weights = _as_1d("weights", weights, (np.float32,), n)
    map_weights = weights if map_weights is None else _as_1d("map_weights", map_weights, (np.float32,), n)
    seg = _check_segments(segment_starts, n)
    if x0 is not None:
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.ndim != 1 or not np.all(np.isfinite(x0)):
            raise ValueError("destripe: x0 must be a finite 1-D array (one value per offset)")
    pmin, pmax, bad_w, bad_wm, bad_d = _ops.scan_inputs(
        tod, pixels, weights, map_weights, max(1, int(_ops.max_threads()))
    )
    if pmin < -1 or pmax >= int(n_pixels):
        raise ValueError(
            f"destripe: pixels must lie in [0, n_pixels = {int(n_pixels)}) or be -1; "
            f"found range [{pmin}, {pmax}]"
        )
    if bad_w:
        raise ValueError(f"destripe: weights has {bad_w} negative or non-finite values")
    if bad_wm:
        raise ValueError(f"destripe: map_weights has {bad_wm} negative or non-finite values")
    if bad_d:
        raise ValueError(f"destripe: tod has {bad_d} non-finite values on samples with a positive weight")
    return tod, pixels, weights, map_weights, seg, x0


def _solve(
    op: _Operator,
    b: NDArray[np.float64],
    x0: NDArray[np.float64] | None,
    precondition: Callable[[NDArray[np.float64], NDArray[np.float64]], None],
    dots: Callable[[list[tuple[NDArray[np.float64], NDArray[np.float64]]]], NDArray[np.float64]],
    project_gauge: Callable[[NDArray[np.float64]], None],
    *,
    tol: float,
    max_iter: int,
    min_iter: int,
    stall_window: int,
    stall_factor: float,
    rank: int,
) -> tuple[NDArray[np.float64], NDArray[np.float64], str]:
    """PCG with the stopping rules of docs/mapmaking.md#solver; returns (best iterate, residual history,
    status)."""
    bb = float(dots([(b, b)])[0])
    if bb == 0.0:
        # Nothing to fit: a = 0 whatever x0 is. The solution is exact, so its residual is 0.
        return np.zeros_like(b), np.zeros(1), "converged"
    bnorm = math.sqrt(bb)

    def apply_projected(x: NDArray[np.float64], out: NDArray[np.float64]) -> None:
        op(x, out)
        project_gauge(out)  # no-op unless the gauge applies; kills round-off along the null space

    cg = CG(apply_projected, b, x0=x0, M=precondition, dots=dots)
    residuals = [math.sqrt(max(cg.rr, 0.0)) / bnorm]
    best_res, best_x, best_k = residuals[0], cg.x.copy(), 0
    status = "max_iter"
    show_bar = rank == 0 and sys.stderr.isatty()
    with tqdm(total=max_iter, desc="destripe", unit="it", disable=not show_bar, leave=False) as bar:
        last_is_true = True  # residuals[-1] is ‖b − A x‖, not the recursive estimate
        while True:
            k = len(residuals) - 1
            if residuals[-1] < tol and k >= min_iter:
                if not last_is_true:
                    # Confirm with the true residual: the recursive one keeps falling past the
                    # floating-point floor of ‖b − A x‖, so it alone would accept an unreachable tol.
                    cg.refresh_residual()
                    residuals[-1] = math.sqrt(max(cg.rr, 0.0)) / bnorm
                    last_is_true = True
                    if best_k == k:  # the best iterate is this one: keep its true residual
                        best_res = residuals[-1]
                    continue
                status = "converged"
                break
            if k >= max_iter:
                status = "max_iter"
                break
            if k > stall_window:
                recent = min(residuals[k - stall_window + 1 :])
                before = min(residuals[: k - stall_window + 1])
                if not recent < stall_factor * before:
                    status = "stalled"
                    break
            refresh = (k + 1) % RESIDUAL_REFRESH == 0
            last_is_true = refresh
            if not cg.step(recompute_residual=refresh):
                # pᵀAp ≤ 0 or a non-finite value. At (or below) the tolerance this is the exact
                # arithmetic end of CG rather than a failure.
                status = "converged" if best_res < tol else "breakdown"
                break
            rel = math.sqrt(max(cg.rr, 0.0)) / bnorm
            residuals.append(rel)
            if rel < best_res:
                best_res, best_k = rel, k + 1
                best_x[...] = cg.x
            bar.update(1)
            if (k + 1) % LOG_EVERY == 0:
                bar.set_postfix_str(f"res {rel:.2e}", refresh=False)
                if rank == 0:
                    log.info(
                        "destripe iteration %d: relative residual %.3e (best %.3e)", k + 1, rel, best_res
                    )
    return best_x, np.asarray(residuals, dtype=np.float64), status
