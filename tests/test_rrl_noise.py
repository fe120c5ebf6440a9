"""Noise of RRL cubes without the pipeline (docs/mapmaking.md#noise-of-the-cube, #channel-levels):
the quiet channel levels are unbiased by the noise that chooses them, the propagated per-sample
covariance of a window matches Monte-Carlo white noise through levels, baseline and deposit, and
the moment-0 σ with the header's channel correlations matches the scatter of simulated moments.

Every tolerance is three times the Monte-Carlo error of the quantity it bounds (stated at each
assertion), and each test also shows the quantity the old treatment got wrong, so it can fail.
"""

from __future__ import annotations

import math

import numpy as np

from modules.MapMaking.read_line_data import (
    VelocityGrid,
    baseline_fit,
    channel_levels,
    line_free_channels,
    subtract_baseline,
    window_noise,
)
from utils.rrl import moment0_sigma_kkms


def test_quiet_levels_are_not_biased_by_the_noise_that_chooses_them():
    """White noise only (σ = 0.2 K, 40 channels, 20 000 samples): choosing the quietest quarter with
    a proxy of the same samples biases every level by −1.27 σ/√40 = −40 mK; the split choice (pairs:
    one sample chooses, the other is averaged) is unbiased. The mean level over 40 channels has σ
    ≈ 0.2 sqrt(π/(2 · 0.25 · 20 000)) / √40 = 0.56 mK; the tolerance is 3σ."""
    rng = np.random.default_rng(3)
    sigma, n_win, n = 0.2, 40, 20_000
    y = (sigma * rng.standard_normal((n_win, n))).astype(np.float32)
    proxy = np.ones(n_win, dtype=bool)
    split = channel_levels(y, proxy, quiet_fraction=0.25)
    sigma_mean = sigma * math.sqrt(math.pi / (2 * 0.25 * n)) / math.sqrt(n_win)
    assert abs(split.mean()) <= 3 * sigma_mean, (split.mean(), sigma_mean)
    # the same-sample choice (what quiet_fraction did before): the bias the split removes
    p = y.mean(axis=0)
    same = np.median(y[:, p <= np.quantile(p, 0.25)], axis=1)
    assert same.mean() < -0.03, same.mean()
    # q = 1 is the plain median over the scan
    np.testing.assert_allclose(channel_levels(y, proxy, quiet_fraction=1.0), np.median(y, axis=1), atol=1e-6)


def _window(n_win=40, dv=18.75, offset=0.4):
    """A window of native channels offset by ``offset`` output channels from a 45-channel grid."""
    grid = VelocityGrid.build(0.0, 400.0, dv)
    v = (np.arange(n_win) - n_win / 2 + offset) * dv
    return grid, v


def test_window_noise_matches_monte_carlo():
    """σ_k = 0.2 K with a 2:1 spread, order-1 baseline outside ±150 km/s, deposit offset 0.4
    channel: the per-sample covariance of the regridded sums ``Σ f w y`` from :func:`window_noise`
    against 20 000 Monte-Carlo samples: the relative error of a variance is √(2/20 000) = 1 %, of a
    correlation 1/√20 000 = 0.7 %; the tolerances are 4σ for the largest of 41 variances and 5σ
    for the largest of 820 correlations (a chance failure below 0.3 % each). Without the baseline
    term the variance of line-free channels is 5–10 % too high and that of the masked ones too low."""
    rng = np.random.default_rng(5)
    grid, v = _window()
    n_win, n = v.size, 20_000
    sigma = 0.2 * (1.0 + 0.5 * np.sin(np.arange(n_win)))
    w = 1.0 / sigma**2
    free = line_free_channels(v, np.full(n_win, grid.step_kms), (-150.0, 150.0))
    fit = baseline_fit(v, w, free, 0.0, 400.0, 1)
    j_lo, f_lo = grid.deposit(v)
    noise = window_noise(w, fit, j_lo, f_lo, grid.n_v, 0.0, np.ones(n))
    y = (sigma[:, None] * rng.standard_normal((n_win, n))).astype(np.float32)
    subtract_baseline(y, fit, w)
    g = np.zeros((grid.n_v, n_win))
    for j, f in ((j_lo, f_lo), (j_lo + 1, 1.0 - f_lo)):
        ok = (j >= 0) & (j < grid.n_v)
        g[j[ok], np.flatnonzero(ok)] = f[ok] * w[ok]
    sums = g @ y.astype(np.float64)  # (n_v, n)
    measured = np.cov(sums)
    d = np.diag(measured)
    used = d > 0
    rel = np.diag(noise.cov)[used] / d[used] - 1.0
    assert np.all(np.abs(rel) <= 4 * math.sqrt(2 / n)), rel
    # neighbours: the correlation of the deposit (and the baseline) is reproduced
    corr_pred = noise.cov[used][:, used] / np.sqrt(np.outer(noise.diag[used], noise.diag[used]))
    corr_meas = measured[used][:, used] / np.sqrt(np.outer(d[used], d[used]))
    assert np.max(np.abs(corr_pred - corr_meas)) <= 5 / math.sqrt(n), np.max(np.abs(corr_pred - corr_meas))
    # the old q_j = Σ f² w leaves out the baseline: off by more than the tolerance
    old = (g**2 / w[None, :]).sum(axis=1)[used]
    assert np.max(np.abs(old / d[used] - 1.0)) > 5 * math.sqrt(2 / n)


def test_moment0_sigma_with_channel_correlations_matches_the_scatter():
    """Moments over 8 channels of 40 000 simulated spectra whose channels are correlated as a
    half-channel linear deposit correlates them (ρ1 = 0.5) plus a common term (ρB = 0.05): the σ
    from :func:`moment0_sigma_kkms` with (ρ1, ρB) matches the scatter within 3 × √(1/(2n)) = 1.1 %;
    ignoring the correlations underestimates it by far more (≈ √2)."""
    rng = np.random.default_rng(7)
    n_v, n, dv = 20, 40_000, 10.0
    v = (np.arange(n_v) - n_v / 2) * dv
    white = rng.standard_normal((n, n_v + 1))
    y = (white[:, 1:] + white[:, :-1]) / math.sqrt(2.0)  # ρ1 = 0.5, unit variance
    common = rng.standard_normal((n, 1))
    rho_b = 0.05
    y = math.sqrt(1 - rho_b) * y + math.sqrt(rho_b) * common
    rho1 = 0.5 * (1 - rho_b) + rho_b
    window = (-35.0, 35.0)
    sel = (v >= window[0]) & (v <= window[1])
    m0 = y[:, sel].sum(axis=1) * dv
    rms = np.ones((1, n_v))
    predicted = float(moment0_sigma_kkms(rms, v, window, rho1, rho_b)[0])
    measured = float(m0.std())
    assert abs(predicted / measured - 1.0) <= 3 * math.sqrt(1 / (2 * n)), (predicted, measured)
    naive = float(moment0_sigma_kkms(rms, v, window)[0])
    assert naive / measured < 0.8, (naive, measured)
