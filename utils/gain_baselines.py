"""Gain baselines with the scan's sky marginalised (docs/level2.md#gain-baselines).

The per-sample gain estimate ``y(t) = R(t)/z`` of one feed and scan contains, besides the gain
fluctuation g(t) and white estimator noise, a *sky leak*: any sky whose spectrum is not in the
sky templates (a curved spectrum, a chromatic beam wing) projects onto the gain template. The
leak is a function of where the feed points; the gain is not. This module solves the destriping
problem

    y(t) = a_{b(t)} + s_{p(t)} + n(t),        n white, variance σ_y²

for gain baselines ``a``, knots every ``L`` samples joined linearly, with the leak map ``s`` (one value
per sky pixel ``p``) marginalised, and a Gaussian prior on the baselines (a random walk, i.e. a
1/f² gain, plus a level): the normal equations are

    [FᵀWZF/σ_y² + Dᵀ D/σ_Δ² + I/σ_0²] a = FᵀWZ y/σ_y²,     Z = I − P(PᵀWP)⁻¹PᵀW,

solved by conjugate gradients. ``σ_y`` comes from pair differences of ``y``; ``σ_Δ`` and ``σ_0``
are the step and level variances of the knot averages of ``Zy`` left after subtracting those of
pure noise with the same weights and pointing (empirical Bayes). Unless that excess is significant
(:data:`DETECTION_SIGMA`), no gain is removed; where the data constrain the gain less well than
the prior, the estimate shrinks towards zero. Sky is never traded for noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

MAD_TO_SIGMA = 1.4826
NOISE_REALISATIONS = 2
"""Pure-noise solutions whose baseline variances are subtracted from the data's."""
DETECTION_SIGMA = 5.0
"""Gain is removed only if the baselines' level or step variance exceeds the pure-noise value by this
many standard errors of a variance estimate: white data then lose nothing to estimator noise."""


@dataclass
class BaselineSolution:
    """Result of :func:`gain_baselines` for one feed and scan.

    Attributes
    ----------
    gain : ndarray, shape (n,)
        ĝ(t), the baseline of each sample (fractional gain).
    sigma_y : float
        White-noise rms of ``y`` per sample (fractional gain).
    sigma_step, sigma_level : float
        Prior rms of a baseline step and of a baseline level (0 = no gain detected).
    n_baselines, n_pixels, iterations : int
    """

    gain: NDArray[np.float64]
    sigma_y: float
    sigma_step: float
    sigma_level: float
    n_baselines: int
    n_pixels: int
    iterations: int


def sky_pixels(ra_deg: NDArray, dec_deg: NDArray, pixel_arcmin: float) -> NDArray[np.int64]:
    """Pixel index of every sample on a local tangent grid of ``pixel_arcmin`` (−1 for NaN pointing).

    Parameters
    ----------
    ra_deg, dec_deg : ndarray, shape (n,)
        ICRS pointing of the feed (deg).
    pixel_arcmin : float

    Returns
    -------
    ndarray of int64, shape (n,)
        Compact indices 0..n_pixels−1.
    """
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec)
    out = np.full(ra.shape, -1, dtype=np.int64)
    if not ok.any():
        return out
    dec_c = float(np.median(dec[ok]))
    ra_c = float(np.median(ra[ok]))
    step = pixel_arcmin / 60.0
    x = ((ra[ok] - ra_c + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec_c))
    ix = np.floor(x / step).astype(np.int64)
    iy = np.floor((dec[ok] - dec_c) / step).astype(np.int64)
    key = (ix - ix.min()) * (int(iy.max() - iy.min()) + 1) + (iy - iy.min())
    out[ok] = np.unique(key, return_inverse=True)[1]
    return out


class _System:
    """The operator ``FᵀWZF`` of one scan (applied with bincount, never formed).

    ``F`` interpolates linearly between knots every ``L`` samples: sample t lies between knots
    ``k = t // L`` and ``k + 1`` at fraction ``f = (t mod L)/L``.
    """

    def __init__(self, weight: NDArray, pixel: NDArray, length: int, n_knots: int) -> None:
        use = (weight > 0) & (pixel >= 0)
        self.w = np.where(use, weight, 0.0)
        self.pix = np.where(use, pixel, 0)
        t = np.arange(weight.size)
        self.k0 = t // length
        self.k1 = np.minimum(self.k0 + 1, n_knots - 1)
        self.f = (t % length) / float(length)
        self.n_base = n_knots
        n_pix = int(self.pix.max()) + 1 if use.any() else 1
        self.n_pix = n_pix
        wp = np.bincount(self.pix, weights=self.w, minlength=n_pix)
        self.inv_wp = np.where(wp > 0, 1.0 / np.where(wp > 0, wp, 1.0), 0.0)

    def project(self, v: NDArray) -> NDArray:
        """``W Z v``: weighted samples with their pixel means removed."""
        mean = np.bincount(self.pix, weights=self.w * v, minlength=self.n_pix) * self.inv_wp
        return self.w * (v - mean[self.pix])

    def expand(self, a: NDArray) -> NDArray:
        """``F a``: the gain at every sample."""
        return a[self.k0] * (1.0 - self.f) + a[self.k1] * self.f

    def transpose(self, v: NDArray) -> NDArray:
        """``Fᵀ v``."""
        return np.bincount(self.k0, weights=v * (1.0 - self.f), minlength=self.n_base) + np.bincount(
            self.k1, weights=v * self.f, minlength=self.n_base
        )

    def hits(self) -> NDArray:
        """``diag(FᵀWF)`` (the Jacobi preconditioner; 0 = knot without data)."""
        w0 = self.w * (1.0 - self.f) ** 2
        w1 = self.w * self.f**2
        return np.bincount(self.k0, weights=w0, minlength=self.n_base) + np.bincount(
            self.k1, weights=w1, minlength=self.n_base
        )

    def rhs(self, y: NDArray) -> NDArray:
        return self.transpose(self.project(y))

    def apply(self, a: NDArray) -> NDArray:
        return self.transpose(self.project(self.expand(a)))


def _prior_apply(a: NDArray, step_prec: float, level_prec: float) -> NDArray:
    out = level_prec * a
    if step_prec > 0 and a.size > 1:
        d = np.diff(a)
        out[:-1] -= step_prec * d
        out[1:] += step_prec * d
    return out


def _cg(system: _System, b: NDArray, step_prec: float, level_prec: float, tol: float, maxiter: int):
    diag = system.hits() + level_prec + 2.0 * step_prec
    inv_m = 1.0 / np.where(diag > 0, diag, 1.0)

    def op(v):
        return system.apply(v) + _prior_apply(v, step_prec, level_prec)

    x = np.zeros_like(b)
    r = b.copy()
    bnorm = float(np.sqrt(b @ b))
    if bnorm == 0.0:
        return x, 0
    z = inv_m * r
    p = z.copy()
    rz = float(r @ z)
    it = 0
    while it < maxiter:
        it += 1
        q = op(p)
        pq = float(p @ q)
        if pq <= 0:
            break
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        if float(np.sqrt(r @ r)) < tol * bnorm:
            break
        z = inv_m * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, it


def white_rms(y: NDArray, weight: NDArray) -> float:
    """Robust white-noise rms per sample from pair differences of consecutive usable samples."""
    ok = (weight[:-1] > 0) & (weight[1:] > 0) & np.isfinite(y[:-1]) & np.isfinite(y[1:])
    d = (y[1:] - y[:-1])[ok]
    if d.size < 10:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def gain_baselines(
    y: NDArray,
    weight: NDArray,
    pixel: NDArray,
    baseline_samples: int,
    *,
    seed: int = 0,
    tol: float = 1e-6,
    maxiter: int = 300,
) -> BaselineSolution:
    """Solve for the gain baselines of one scan with its sky marginalised (module docstring).

    Parameters
    ----------
    y : ndarray, shape (n,)
        Per-sample gain estimate ``R/z`` (fractional gain); non-finite values are ignored.
    weight : ndarray, shape (n,)
        1 for usable samples, 0 for samples to ignore (flagged, NaN channels, bright sources).
    pixel : ndarray of int, shape (n,)
        Sky pixel of each sample (:func:`sky_pixels`), −1 = no pointing.
    baseline_samples : int
        Baseline length ``L`` (samples).
    seed : int
        Seed of the pure-noise reference solution (deterministic per feed and scan).

    Returns
    -------
    BaselineSolution
    """
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    w = np.where(np.isfinite(y), np.asarray(weight, dtype=np.float64), 0.0)
    y = np.where(w > 0, y, 0.0)
    pix = np.asarray(pixel, dtype=np.int64)
    length = max(int(baseline_samples), 1)
    n_base = (n - 1) // length + 2 if n > 0 else 1
    none = BaselineSolution(np.zeros(n), float("nan"), 0.0, 0.0, n_base, 0, 0)
    if n_base < 3 or not (w > 0).any():
        return none
    sigma_y = white_rms(y, w)
    if not (np.isfinite(sigma_y) and sigma_y > 0):
        return none
    system = _System(w, pix, length, n_base)
    hits = system.hits()
    constrained = hits > 0
    n_c = int(constrained.sum())
    if n_c < 3:
        return BaselineSolution(np.zeros(n), sigma_y, 0.0, 0.0, n_base, system.n_pix, 0)
    # knot averages of the sky-marginalised data, Fᵀ W Z y / diag(FᵀWF): no solve is needed to see
    # whether they vary more than pure noise with the same weights and pointing does
    inv_hits = np.where(constrained, 1.0 / np.where(constrained, hits, 1.0), 0.0)
    u = (system.rhs(y) * inv_hits)[constrained]
    rng = np.random.default_rng(seed)
    u_noise = [
        (system.rhs(rng.standard_normal(n) * sigma_y) * inv_hits)[constrained]
        for _ in range(NOISE_REALISATIONS)
    ]
    noise_level = float(np.mean([np.var(v) for v in u_noise]))
    noise_step = float(np.mean([np.var(np.diff(v)) for v in u_noise]))
    # neighbouring knots share samples, so about half of them are independent
    threshold = DETECTION_SIGMA * np.sqrt(2.0 / max(n_c / 2.0, 1.0))
    level_ok = np.var(u) > noise_level * (1.0 + threshold)
    step_ok = np.var(np.diff(u)) > noise_step * (1.0 + threshold)
    if not (level_ok or step_ok):
        return BaselineSolution(np.zeros(n), sigma_y, 0.0, 0.0, n_base, system.n_pix, 0)
    var_step = float(np.var(np.diff(u)) - noise_step)
    var_level = float(np.var(u) - noise_level)
    var_step = max(var_step, 1e-6 * max(var_level, 0.0), 1e-30)
    var_level = max(var_level, var_step)
    # precisions in units of the data term (weights are 1/σ_y² per unit weight)
    step_prec = sigma_y**2 / var_step
    level_prec = sigma_y**2 / var_level
    a_map, iterations = _cg(system, system.rhs(y), step_prec, level_prec, tol, maxiter)
    return BaselineSolution(
        system.expand(a_map),
        sigma_y,
        float(np.sqrt(var_step)),
        float(np.sqrt(var_level)),
        n_base,
        system.n_pix,
        iterations,
    )
