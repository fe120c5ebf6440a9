"""Destriper (docs/mapmaking.md#destriper): exact solve, sky recovery, stopping rules, linearity, MPI, map
weights, inputs.

The numbered tests are the validation list of docs/mapmaking.md#validation. Every test compares against an
independent computation (a dense direct solve, a simulated truth, ``numpy.bincount`` binning) so that each can
fail.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla
import scipy.sparse as sp
from components import mpi_environment, mpiexec_path
from threadpoolctl import threadpool_limits

from modules.MapMaking.destriper import (
    CG,
    STATUSES,
    DestriperResult,
    _local_dots,
    _offset_starts,
    _Operator,
    _solve,
    destripe,
)
from modules.MapMaking.destriper import _SerialComm as SerialComm

REPO = Path(__file__).resolve().parents[1]
L = 100
NX = NY = 50


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------


def make_problem(seed: int = 1, partial_flags: bool = True) -> dict:
    """≈2e5 samples, ≈2000 offsets, 2500 pixels, cross-linked raster scans.

    Segments have lengths that are not multiples of L (short last offsets), one segment is shorter
    than L, 3 % of samples have zero weight, 1 % are off the map (some with a positive weight,
    which the destriper must ignore). Some whole offsets have zero weight (fixed, with no good
    sample); with ``partial_flags`` other offsets lose 70 % of their samples (fixed, but with good
    samples that anchor the sky, so the gauge does not apply).
    """
    rng = np.random.default_rng(seed)
    seg_lens = [16537, 17213, 15990, 37, 18351, 16002, 17777, 16443, 15555, 17321, 16888, 15777, 16190]
    n = int(sum(seg_lens))
    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]]).astype(np.int64)
    x = np.empty(n)
    y = np.empty(n)
    for k, (s, ln) in enumerate(zip(starts, seg_lens)):
        t = np.arange(ln)
        tri = np.abs(((t / 60.0 + 0.37 * k) % 2) - 1) * (NX - 1)
        slow = (t / ln) * (NY - 1)
        x[s : s + ln], y[s : s + ln] = (tri, slow) if k % 2 == 0 else (slow, tri)
    x += rng.normal(0, 0.3, n)
    y += rng.normal(0, 0.3, n)
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    on = (ix >= 0) & (ix < NX) & (iy >= 0) & (iy < NY)
    pix = np.where(on, iy * NX + ix, -1).astype(np.int32)
    pix[rng.random(n) < 0.01] = -1
    w = np.repeat(rng.uniform(0.5, 2.0, len(seg_lens)), seg_lens).astype(np.float32)
    w[rng.random(n) < 0.03] = 0
    w[starts[1] + 3 * L : starts[1] + 5 * L] = 0  # two whole offsets without data
    if partial_flags:
        for j0 in (starts[2] + 7 * L, starts[6] + 2 * L, starts[9] + 11 * L):
            w[j0 : j0 + 70] = 0  # 70 % flagged: fixed, 30 good samples each
    sky = rng.normal(0, 1, NX * NY)
    ostarts = _offset_starts(starts, n, L)
    j = np.repeat(np.arange(ostarts.size - 1), np.diff(ostarts))
    drift = np.cumsum(rng.normal(0, 0.3, ostarts.size - 1))
    d = (
        np.where(pix >= 0, sky[np.maximum(pix, 0)], 0)
        + drift[j]
        + rng.normal(0, 1, n) / np.sqrt(np.maximum(w, 0.1))
    )
    return {
        "tod": d.astype(np.float32),
        "pixels": pix,
        "weights": w,
        "segment_starts": starts,
        "offset_index": j,
        "offset_starts": ostarts,
        "n_pixels": NX * NY,
    }


def reference_solve(prob: dict, lam: float, good_fraction: float = 0.5) -> dict:
    """Dense direct solve of (FᵀWF − B M⁻¹ Bᵀ + λI) a = FᵀWZd with scipy.sparse, B = FᵀWP
    (docs/mapmaking.md#validation)."""
    d, pix, w, j = prob["tod"], prob["pixels"], prob["weights"], prob["offset_index"]
    npix = prob["n_pixels"]
    n_off = prob["offset_starts"].size - 1
    good = (w > 0) & (pix >= 0)
    ngood = np.bincount(j, good, minlength=n_off)
    free = ngood > good_fraction * np.diff(prob["offset_starts"])
    col = -np.ones(n_off, dtype=np.int64)
    col[free] = np.arange(free.sum())
    rows = np.nonzero(good)[0]
    ww = w[rows].astype(np.float64)
    dd = d[rows].astype(np.float64)
    nr = rows.size
    P = sp.csr_matrix((np.ones(nr), (np.arange(nr), pix[rows])), shape=(nr, npix))
    in_free = free[j[rows]]
    F = sp.csr_matrix(
        (np.ones(in_free.sum()), (np.nonzero(in_free)[0], col[j[rows][in_free]])), shape=(nr, int(free.sum()))
    )
    W = sp.diags(ww)
    M = (P.T @ W @ P).diagonal()
    Minv = sp.diags(np.where(M > 0, 1.0 / np.where(M > 0, M, 1.0), 0.0))
    B = F.T @ W @ P
    A = (F.T @ W @ F - B @ Minv @ B.T).toarray() + lam * np.eye(int(free.sum()))
    b = F.T @ (ww * dd) - B @ (Minv @ (P.T @ (ww * dd)))
    gauge = lam == 0 and not np.any(good & ~free[j])
    A_solve = A
    if gauge:
        u = np.ones(int(free.sum())) / math.sqrt(free.sum())
        A_solve = A + np.mean(np.diag(A)) * np.outer(u, u)
    a_free = sla.cho_solve(sla.cho_factor(A_solve), b)
    a = np.zeros(n_off)
    a[free] = a_free
    wm = np.where(pix >= 0, w, 0).astype(np.float64)
    p0 = np.maximum(pix, 0)
    num = np.bincount(p0, wm * (d - a[j]), minlength=npix)
    den = np.bincount(p0, wm, minlength=npix)
    m = np.full(npix, np.nan)
    np.divide(num, den, out=m, where=den > 0)
    return {"a": a, "map": m, "free": free, "gauge": gauge, "A": A}


def run(prob: dict, **kw) -> DestriperResult:
    return destripe(
        prob["tod"],
        prob["pixels"],
        prob["weights"],
        L,
        prob["n_pixels"],
        segment_starts=prob["segment_starts"],
        **kw,
    )


def rel(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def prob() -> dict:
    return make_problem(partial_flags=True)


@pytest.fixture(scope="module")
def prob_gauge() -> dict:
    return make_problem(partial_flags=False)


# --------------------------------------------------------------------------------------------------
# 1. Exact direct solve
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "lam", "expect_gauge"),
    [("gauge", 0.0, True), ("partial", 0.0, False), ("partial", 0.01, False)],
)
@pytest.mark.parametrize("preconditioner", ["jacobi", "exact_diag"])
def test_exact_direct_solve(prob, prob_gauge, case, lam, expect_gauge, preconditioner):
    p = prob_gauge if case == "gauge" else prob
    ref = reference_solve(p, lam)
    assert ref["gauge"] == expect_gauge
    assert (~ref["free"]).sum() >= 2  # the problem has fixed offsets
    res = run(p, tol=1e-10, lambda_ridge=lam, preconditioner=preconditioner)
    assert res.status == "converged" and res.converged
    np.testing.assert_array_equal(res.free_offsets, ref["free"])
    assert np.all(res.offsets[~res.free_offsets] == 0)
    hit = np.isfinite(ref["map"])
    np.testing.assert_array_equal(np.isfinite(res.map), hit)
    assert rel(res.map[hit], ref["map"][hit]) <= 1e-4
    assert rel(res.offsets, ref["a"]) <= 1e-4
    if expect_gauge:
        assert abs(res.offsets[res.free_offsets].mean()) < 1e-10 * np.abs(res.offsets).max()
    # the residual history starts at 1 and ends below tol
    assert res.residuals[0] == 1.0 and res.residuals[-1] < 1e-10 and res.residuals.size == res.n_iter + 1


def test_exact_diag_is_true_diagonal(prob):
    ref = reference_solve(prob, 0.01)
    ostarts = _offset_starts(prob["segment_starts"], prob["tod"].size, L)
    op = _Operator(prob["pixels"], prob["weights"], ostarts, prob["n_pixels"], 0.5, 0.01, SerialComm(), 2)
    diag = op.exact_diag()
    np.testing.assert_allclose(diag[op.free], np.diag(ref["A"]), rtol=1e-10)
    jac = op.jacobi_diag()
    assert np.all(jac[op.free] >= diag[op.free])  # Jacobi's Σw + λ bounds the true diagonal


def test_offset_layout():
    starts = _offset_starts(np.array([0, 250, 250, 300, 301]), 401, 100)
    np.testing.assert_array_equal(starts, [0, 100, 200, 250, 300, 301, 401])
    assert _offset_starts(np.array([0]), 0, 100).tolist() == [0]


def test_threads_give_same_answer(prob):
    with threadpool_limits(1, user_api="openmp"):
        one = run(prob, tol=1e-10, lambda_ridge=0.01)
    with threadpool_limits(2, user_api="openmp"):
        two = run(prob, tol=1e-10, lambda_ridge=0.01)
    hit = np.isfinite(one.map)
    assert rel(two.map[hit], one.map[hit]) < 1e-8
    assert rel(two.offsets, one.offsets) < 1e-8


# --------------------------------------------------------------------------------------------------
# 2. Sky recovery with 1/f noise
# --------------------------------------------------------------------------------------------------


def one_over_f(n: int, fs: float, fknee: float, alpha: float, sigma: float, rng) -> np.ndarray:
    """Noise with PSD σ² (f/f_knee)^α (the 1/f part only), by shaping white noise in Fourier space."""
    f = np.fft.rfftfreq(n, 1.0 / fs)
    shape = np.zeros_like(f)
    shape[1:] = (f[1:] / fknee) ** alpha
    return sigma * np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * np.sqrt(shape), n)


def simulate_sky(seed: int = 2026) -> dict:
    """40×40 map; truth = broad Gaussians + compact sources; 20 raster scans of 160 s at 50 Hz,
    alternately along x and y; 1/f (f_knee = 1 Hz, α = −1.5) + white noise σ = 1 mK."""
    rng = np.random.default_rng(seed)
    nx = ny = 40
    fs, sigma, seg_len, n_seg = 50.0, 1e-3, 8000, 20
    yy, xx = np.mgrid[0:ny, 0:nx]
    truth = np.zeros((ny, nx))
    for _ in range(4):
        cx, cy, s, a = rng.uniform(0, nx), rng.uniform(0, ny), rng.uniform(6, 12), rng.uniform(2e-3, 6e-3)
        truth += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    for _ in range(6):
        cx, cy, a = rng.uniform(3, nx - 3), rng.uniform(3, ny - 3), rng.uniform(5e-3, 3e-2)
        truth += a * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.2**2))
    truth = truth.ravel()
    n = seg_len * n_seg
    xs, ys = np.empty(n), np.empty(n)
    t = np.arange(seg_len)
    for k in range(n_seg):
        sl = slice(k * seg_len, (k + 1) * seg_len)
        tri = np.abs(((t / 40.0 + rng.uniform(0, 2)) % 2) - 1) * (nx - 1)
        slow = (t / seg_len) * (ny - 1) + rng.uniform(-0.5, 0.5)
        xs[sl], ys[sl] = (tri, slow) if k % 2 == 0 else (slow, tri)
    xs += rng.normal(0, 0.4, n)
    ys += rng.normal(0, 0.4, n)
    ix = np.floor(xs + 0.5).astype(np.int64)
    iy = np.floor(ys + 0.5).astype(np.int64)
    on = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    pix = np.where(on, iy * nx + ix, -1).astype(np.int32)
    noise = sigma * rng.standard_normal(n) + one_over_f(n, fs, 1.0, -1.5, sigma, rng)
    d = np.where(on, truth[np.maximum(pix, 0)], 0.0) + noise  # sky sampled at pixel centres
    return {
        "tod": d.astype(np.float32),
        "pixels": pix,
        "weights": np.where(on, 1.0 / sigma**2, 0.0).astype(np.float32),
        "segment_starts": np.arange(n_seg) * seg_len,
        "n_pixels": nx * ny,
        "truth": truth,
    }


def chi2_and_slope(m: np.ndarray, res: DestriperResult, truth: np.ndarray) -> tuple[float, float]:
    sel = res.hits >= 10
    resid = (m - truth)[sel]
    w = res.weights[sel]
    resid = resid - np.sum(w * resid) / np.sum(w)
    chi2 = float(np.sum(resid**2 / res.rms[sel] ** 2) / sel.sum())
    slope = float(np.polyfit(truth[sel], resid, 1)[0])
    return chi2, slope


def test_sky_recovery():
    sim = simulate_sky()
    res = run(sim)
    assert res.status == "converged"
    assert np.count_nonzero(res.hits >= 10) > 1000
    chi2, slope = chi2_and_slope(res.map, res, sim["truth"])
    chi2_naive, _ = chi2_and_slope(res.naive_map, res, sim["truth"])
    assert chi2 <= 1.5, chi2
    assert chi2_naive >= 5, chi2_naive
    assert abs(slope) < 0.01, slope


# --------------------------------------------------------------------------------------------------
# 3. Stopping rules
# --------------------------------------------------------------------------------------------------


def test_stalled_problem_stops_before_max_iter(prob):
    """A tolerance below the floating-point floor of the float32-data problem cannot be met: the
    residual stagnates (or the CG recursion drifts off once past the floor) and the run must stop
    as 'stalled', returning its best iterate."""
    converged = run(prob, tol=1e-12, lambda_ridge=0.01)
    res = run(prob, tol=1e-25, lambda_ridge=0.01, max_iter=1000, stall_window=20)
    assert res.status == "stalled" and not res.converged
    assert res.n_iter < 1000
    hit = np.isfinite(converged.map)
    assert rel(res.map[hit], converged.map[hit]) < 1e-6  # the best iterate, not the last one
    assert res.residuals.min() < 1e-12


def test_stall_rule_on_inconsistent_system():
    """A singular system whose right-hand side has a null-space component (inconsistent, at the
    1e-3 level, as if b had been formed in float32 and rounded off the range of A): the residual
    cannot fall below that component, so the loop must end with 'stalled' long before max_iter,
    returning its best iterate."""
    diag = np.concatenate([np.linspace(1.0, 100.0, 200), [0.0]])
    b = np.ones(201)
    b[-1] = 1e-3
    floor = 1e-3 / np.linalg.norm(b)

    def apply(x, out):
        np.multiply(diag, x, out=out)

    def precondition(r, out):  # identity on the range of A, 0 on its null space
        np.multiply(r, diag > 0, out=out)

    x, residuals, status = _solve(
        apply, b, None, precondition, _local_dots, lambda v: None, tol=1e-8, max_iter=1000, min_iter=3,
        stall_window=50, stall_factor=0.9, rank=0,
    )  # fmt: skip
    assert status == "stalled"
    assert residuals.size - 1 < 300
    assert residuals.min() >= 0.99 * floor
    r = b - diag * x
    assert np.linalg.norm(r) / np.linalg.norm(b) == pytest.approx(residuals.min(), rel=1e-6)  # best iterate


def test_breakdown_is_reported_with_best_iterate():
    """With a preconditioner that feeds the null space, CG on the inconsistent system diverges
    (α → ∞): the run must end as 'breakdown' (or 'stalled'), without warnings, with a finite best
    iterate."""
    diag = np.concatenate([np.linspace(1.0, 100.0, 200), [0.0]])
    b = np.ones(201)
    b[-1] = 1e-3

    def apply(x, out):
        np.multiply(diag, x, out=out)

    def precondition(r, out):
        np.divide(r, np.maximum(diag, 1.0), out=out)

    x, residuals, status = _solve(
        apply, b, None, precondition, _local_dots, lambda v: None, tol=1e-8, max_iter=1000, min_iter=3,
        stall_window=50, stall_factor=0.9, rank=0,
    )  # fmt: skip
    assert status in ("breakdown", "stalled")
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(residuals))


def test_cg_class_solves_spd_system():
    rng = np.random.default_rng(5)
    q = rng.normal(size=(60, 60))
    A = q @ q.T + 60 * np.eye(60)
    b = rng.normal(size=60)
    cg = CG(lambda x, out: np.matmul(A, x, out=out), b, M=lambda r, out: np.divide(r, np.diag(A), out=out))
    while cg.rr > 1e-24 * cg.bb:
        assert cg.step()
    np.testing.assert_allclose(cg.x, np.linalg.solve(A, b), rtol=1e-9)
    assert cg.i < 60


def test_b_zero_gives_zero_offsets(prob):
    res = destripe(
        np.zeros_like(prob["tod"]), prob["pixels"], prob["weights"], L, prob["n_pixels"],
        segment_starts=prob["segment_starts"], x0=np.ones(prob["offset_starts"].size - 1),
    )  # fmt: skip
    assert res.status == "converged" and res.n_iter == 0
    assert np.all(res.offsets == 0)
    assert np.nanmax(np.abs(res.map)) == 0


def test_max_iter_and_x0(prob):
    res = run(prob, tol=1e-10, max_iter=3, lambda_ridge=0.01)
    assert res.status == "max_iter" and res.n_iter == 3 and res.residuals.size == 4
    full = run(prob, tol=1e-10, lambda_ridge=0.01)
    warm = run(prob, tol=1e-10, lambda_ridge=0.01, x0=full.offsets)
    assert warm.status == "converged" and warm.n_iter <= 3
    assert warm.residuals[0] < 1e-9
    hit = np.isfinite(full.map)
    assert rel(warm.map[hit], full.map[hit]) < 1e-8


def test_progress_log(prob, caplog):
    with caplog.at_level("INFO", logger="comap.destriper"):
        res = run(prob, tol=1e-10, lambda_ridge=0.01, min_iter=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("destripe iteration")]
    assert len(lines) == res.n_iter // 10
    assert res.status in STATUSES


# --------------------------------------------------------------------------------------------------
# 4. Linearity
# --------------------------------------------------------------------------------------------------


def test_linearity(prob):
    rng = np.random.default_rng(7)
    d1 = prob["tod"]
    drift = rng.normal(0, 3, prob["offset_starts"].size - 1)[prob["offset_index"]]
    d2 = (rng.normal(0, 1, d1.size) + drift).astype(np.float32)
    d12 = (d1 + d2).astype(np.float32)
    kw = {"tol": 1e-12, "lambda_ridge": 0.0}
    r1, r2, r12 = (run({**prob, "tod": d}, **kw) for d in (d1, d2, d12))
    hit = np.isfinite(r12.map)
    assert rel(r12.map[hit], (r1.map + r2.map)[hit]) <= 1e-5
    assert rel(r12.offsets, r1.offsets + r2.offsets) <= 1e-5


# --------------------------------------------------------------------------------------------------
# 5. MPI
# --------------------------------------------------------------------------------------------------

MPI_SCRIPT = """
import json, sys
import numpy as np
from mpi4py import MPI
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_destriper import make_problem, L
from modules.MapMaking.destriper import destripe

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
prob = make_problem(partial_flags={partial})
starts = list(prob["segment_starts"]) + [prob["tod"].size]
mine = [k for k in range(len(starts) - 1) if k % size == rank]
if {empty_rank}:  # rank 1 has no samples but must still take part in every collective
    mine = list(range(len(starts) - 1)) if rank == 0 else []
idx = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in mine]) if mine else np.zeros(0, int)
lens = [starts[k + 1] - starts[k] for k in mine]
seg = np.concatenate([[0], np.cumsum(lens)[:-1]]) if mine else np.zeros(1, int)
kw = dict(tol=1e-10, lambda_ridge={lam}, segment_starts=seg)
res = destripe(prob["tod"][idx], prob["pixels"][idx], prob["weights"][idx], L, prob["n_pixels"],
               comm=comm, **kw)
offsets = comm.gather((mine, res.offsets), root=0)
if rank == 0:
    ser = destripe(prob["tod"], prob["pixels"], prob["weights"], L, prob["n_pixels"],
                   tol=1e-10, lambda_ridge={lam}, segment_starts=prob["segment_starts"])
    ostarts = prob["offset_starts"]
    a = np.zeros_like(ser.offsets)
    for segs, off in offsets:
        pos = 0
        for k in segs:
            j0 = np.searchsorted(ostarts, starts[k]); j1 = np.searchsorted(ostarts, starts[k + 1])
            a[j0:j1] = off[pos:pos + j1 - j0]; pos += j1 - j0
    hit = np.isfinite(ser.map)
    out = dict(
        map=float(np.linalg.norm(res.map[hit] - ser.map[hit]) / np.linalg.norm(ser.map[hit])),
        naive=float(np.linalg.norm(res.naive_map[hit] - ser.naive_map[hit])
                    / np.linalg.norm(ser.naive_map[hit])),
        offsets=float(np.linalg.norm(a - ser.offsets) / np.linalg.norm(ser.offsets)),
        hits=bool(np.array_equal(res.hits, ser.hits)), status=res.status, n_iter=res.n_iter,
        serial_iter=ser.n_iter)
    print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize(("lam", "partial", "empty_rank"), [(0.0, False, False), (0.01, True, True)])
def test_mpi_matches_serial(tmp_path, lam, partial, empty_rank):
    mpiexec = mpiexec_path()
    script = tmp_path / "mpi_destripe.py"
    script.write_text(
        textwrap.dedent(MPI_SCRIPT).format(
            repo=str(REPO), tests=str(REPO / "tests"), lam=lam, partial=partial, empty_rank=empty_rank
        )
    )
    env = mpi_environment()
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["status"] == "converged"
    assert out["hits"]
    assert out["map"] <= 1e-6 and out["naive"] <= 1e-6 and out["offsets"] <= 1e-6, out


# --------------------------------------------------------------------------------------------------
# 6. Map weights
# --------------------------------------------------------------------------------------------------


def test_map_weights_bin_the_maps(prob):
    """Solver weights down-weighted by 10 on a 'bright' region; the maps use the map weights."""
    pix, w = prob["pixels"], prob["weights"]
    bright = (pix >= 0) & ((pix % NX) < 15) & ((pix // NX) < 15)
    w_s = np.where(bright, w * np.float32(0.1), w).astype(np.float32)
    res = destripe(
        prob["tod"], pix, w_s, L, prob["n_pixels"], segment_starts=prob["segment_starts"], map_weights=w,
        tol=1e-10, lambda_ridge=0.01,
    )  # fmt: skip
    wm = np.where(pix >= 0, w, 0).astype(np.float64)
    p0 = np.maximum(pix, 0)
    wsum = np.bincount(p0, wm, minlength=prob["n_pixels"])
    hits = np.bincount(p0, wm > 0, minlength=prob["n_pixels"])
    seen = wsum > 0
    np.testing.assert_allclose(res.weights, wsum, rtol=1e-12)
    np.testing.assert_array_equal(res.hits, hits)
    np.testing.assert_allclose(res.rms[seen], 1 / np.sqrt(wsum[seen]), rtol=1e-12)
    assert np.all(np.isnan(res.rms[~seen]))
    # solver-weight binning would differ by up to sqrt(10) on the bright region
    ws = np.bincount(p0, np.where(pix >= 0, w_s, 0), minlength=prob["n_pixels"])
    assert np.nanmax(1 / np.sqrt(ws[seen]) / res.rms[seen]) > 3
    # naive and destriped maps are binned with the map weights, and the offsets with the solver weights
    d = prob["tod"].astype(np.float64)
    j = prob["offset_index"]
    naive = np.bincount(p0, wm * d, minlength=prob["n_pixels"])[seen] / wsum[seen]
    np.testing.assert_allclose(res.naive_map[seen], naive, rtol=1e-9, atol=1e-9)
    dest = np.bincount(p0, wm * (d - res.offsets[j]), minlength=prob["n_pixels"])[seen] / wsum[seen]
    np.testing.assert_allclose(res.map[seen], dest, rtol=1e-9, atol=1e-9)
    ref = destripe(
        prob["tod"], pix, w_s, L, prob["n_pixels"], segment_starts=prob["segment_starts"], tol=1e-10,
        lambda_ridge=0.01,
    )  # fmt: skip
    np.testing.assert_allclose(ref.offsets, res.offsets, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _small():
    n = 1000
    rng = np.random.default_rng(3)
    return {
        "tod": rng.normal(size=n).astype(np.float32),
        "pixels": rng.integers(0, 20, n).astype(np.int32),
        "weights": np.ones(n, np.float32),
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tod": np.zeros(1000)}, "tod must be float32"),
        ({"tod": np.zeros((10, 100), np.float32)}, "tod must be 1-D"),
        ({"pixels": np.zeros(1000, np.float32)}, "pixels must be int32 or int64"),
        ({"pixels": np.zeros(999, np.int32)}, "pixels has 999 samples"),
        ({"pixels": np.full(1000, 20, np.int32)}, r"pixels must lie in \[0, n_pixels = 20\)"),
        ({"pixels": np.full(1000, -2, np.int64)}, "pixels must lie"),
        ({"weights": -np.ones(1000, np.float32)}, "weights has 1000 negative"),
        ({"weights": np.full(1000, np.nan, np.float32)}, "non-finite"),
        ({"weights": np.ones(1000)}, "weights must be float32"),
        ({"map_weights": np.ones(10, np.float32)}, "map_weights has 10 samples"),
        ({"tod": np.full(1000, np.nan, np.float32)}, "tod has 1000 non-finite"),
        ({"segment_starts": [1, 5]}, "begin at 0"),
        ({"segment_starts": [0, 500, 300]}, "sorted"),
        ({"segment_starts": [0, 5000]}, "exceeds"),
        ({"segment_starts": [0.0, 5.0]}, "integers"),
        ({"offset_length": 0}, "offset_length"),
        ({"offset_length": 2.5}, "offset_length"),
        ({"n_pixels": 0}, "n_pixels"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": -1}, "max_iter"),
        ({"lambda_ridge": -1.0}, "lambda_ridge"),
        ({"good_fraction": 1.0}, "good_fraction"),
        ({"stall_factor": 0.0}, "stall_factor"),
        ({"stall_window": 0}, "stall_window"),
        ({"preconditioner": "ilu"}, "preconditioner"),
        ({"x0": np.zeros(3)}, r"x0 must have shape \(10,\)"),
    ],
)
def test_validation_errors(change, match):
    kw = {**_small(), "offset_length": 100, "n_pixels": 20}
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        destripe(
            kw.pop("tod"),
            kw.pop("pixels"),
            kw.pop("weights"),
            kw.pop("offset_length"),
            kw.pop("n_pixels"),
            **kw,
        )


def test_nan_tod_with_zero_weight_is_ignored():
    kw = _small()
    kw["tod"][:100] = np.nan
    kw["weights"][:100] = 0
    kw["pixels"][100:110] = -1
    kw["tod"][100:110] = np.inf  # off the map: never read
    res = destripe(kw["tod"], kw["pixels"], kw["weights"], 100, 20)
    assert np.all(np.isfinite(res.map)) and res.status == "converged"
    assert res.hits.sum() == 890
