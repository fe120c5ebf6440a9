"""Gain baselines with the scan's sky marginalised (utils/gain_baselines.py, docs/level2.md#gain-baselines)
and the NaN-safe gain filters (utils/gain_filters.py)."""

from __future__ import annotations

import numpy as np
import pytest

from utils.gain_baselines import gain_baselines, sky_pixels
from utils.gain_filters import GainFilterBase, GainFilterDestriped, GainFilterWithPrior, ScanSamples

FS = 50.0


def raster_pointing(n: int, rows: int = 20, step_arcmin: float = 3.0, half_width_deg: float = 0.5):
    """Back-and-forth rows in RA, two passes (each row visited twice), Dec 30°."""
    t = np.arange(n)
    per_row = n // (2 * rows)
    j = t // per_row
    row = np.where((j // rows) % 2 == 0, j % rows, rows - 1 - j % rows)
    frac = (t % per_row) / per_row
    x = np.where(
        j % 2 == 0, -half_width_deg + 2 * half_width_deg * frac, half_width_deg - 2 * half_width_deg * frac
    )
    dec = 30.0 + (row - rows / 2) * step_arcmin / 60.0
    ra = 100.0 + x / np.cos(np.radians(30.0))
    return ra, dec


def random_walk_gain(rng, n: int, step_rms: float) -> np.ndarray:
    g = np.cumsum(rng.standard_normal(n)) * step_rms
    return g - g.mean()


def test_white_noise_alone_removes_nothing():
    """With no gain fluctuation the detection test (5 standard errors) keeps ĝ at exactly 0: in 20
    noise realisations a false detection has probability ≪ 1 %, so one would be a defect."""
    n = 8000
    ra, dec = raster_pointing(n)
    pix = sky_pixels(ra, dec, 1.5)
    for seed in range(20):
        y = np.random.default_rng(seed).standard_normal(n) * 2e-3
        sol = gain_baselines(y, np.ones(n), pix, 50, seed=seed)
        assert not sol.gain.any(), seed


def test_sky_leak_is_not_taken_as_gain_and_gain_is_recovered():
    """y = g + leak(sky position) + noise: the leak map is marginalised, so ĝ has no component along
    the leak (regression coefficient ≈ 0), and ĝ follows the gain. A leak 20× the gain rms is far
    stronger than any real one; tolerances are set by the estimator noise."""
    rng = np.random.default_rng(5)
    n = 12000
    ra, dec = raster_pointing(n)
    g = random_walk_gain(rng, n, 3e-5)
    # a compact 'source' leak: Gaussian of 4.5′ FWHM at the field centre, amplitude 20× rms(g)
    r_arcmin = np.hypot((ra - 100.0) * np.cos(np.radians(30.0)), dec - 30.0) * 60.0
    leak = 20 * np.std(g) * np.exp(-0.5 * (r_arcmin / 1.91) ** 2)
    noise = rng.standard_normal(n) * 1e-3
    y = g + leak + noise
    pix = sky_pixels(ra, dec, 1.5)
    sol = gain_baselines(y, np.ones(n), pix, 50, seed=1)
    resid = sol.gain - g
    on = leak > 0.1 * leak.max()
    # leak coefficient in ĝ: its error from the residual gain is ~ rms(resid)/rms(leak on source)
    coef = float(np.sum(sol.gain[on] * leak[on]) / np.sum(leak[on] ** 2))
    assert abs(coef) < 0.02
    assert np.var(resid) < 0.3 * np.var(g)
    # the base estimate (R/z per sample) would have taken the whole leak
    assert float(np.sum(y[on] * leak[on]) / np.sum(leak[on] ** 2)) == pytest.approx(1.0, abs=0.05)


def test_masked_samples_are_bridged():
    """Zero-weight samples (a masked source crossing, a NaN burst) get the gain interpolated by the
    random-walk prior from the samples around them."""
    rng = np.random.default_rng(7)
    n = 10000
    g = random_walk_gain(rng, n, 4e-5)
    y = g + rng.standard_normal(n) * 1e-3
    y[4000:4100] += 0.5  # a bright source: masked, so it must not appear in ĝ
    w = np.ones(n)
    w[4000:4100] = 0.0
    sol = gain_baselines(y, w, np.zeros(n, dtype=np.int64), 50, seed=2)
    assert (
        np.max(np.abs(sol.gain[4000:4100] - g[4000:4100]))
        < 5 * np.std(g[3900:4200] - g[3900:4200].mean()) + 1e-3
    )
    assert np.max(np.abs(sol.gain)) < 0.05


def _synthetic_feed(rng, n: int, *, sky_k: np.ndarray, curved: bool):
    """d (B, C, n) vane K: m·g + sky·S(ν) + noise with a Tsys that has band steps (z/Σω ≈ 1e-2)."""
    n_bands, n_chan = 4, 64
    freq = np.linspace(26.0, 34.0, n_bands * n_chan).reshape(n_bands, n_chan)
    m = 35.0 + 1.5 * (freq - 30.0) + np.array([0.0, 3.0, -2.0, 2.0])[:, None]
    sigma = m / np.sqrt(2e9 / n_chan / FS)
    g = random_walk_gain(rng, n, 2e-5)
    spectrum = np.exp(-0.5 * (np.log(freq / 28.0) / 0.1) ** 2) if curved else (freq / 30.0) ** -2.1
    d = m[:, :, None] * g + spectrum[:, :, None] * sky_k[None, None, :]
    d = d + rng.standard_normal(d.shape) * sigma[:, :, None]
    return d, m, sigma, freq, g


@pytest.mark.parametrize("filter_cls", [GainFilterBase, GainFilterWithPrior, GainFilterDestriped])
def test_nan_burst_does_not_bias_the_gain(filter_cls):
    """30 % of the channels NaN for 4 s while a curved-spectrum source is crossed: R(t) lacks those
    channels' terms, so R/z there is off by −Σ_NaN wᵢnᵢ/z unless the samples are bridged
    (docs/level2.md#gain-baselines). Bridged, ĝ over the burst stays within 5σ of the per-sample
    estimator noise (plus the gain's own range over the burst) of the true gain; the unbridged
    estimate is shown to miss by more, so the test can fail."""
    rng = np.random.default_rng(11)
    n = 6000
    sky = np.zeros(n)
    sky[2000:2100] = 5.0
    d, m, sigma, freq, g = _synthetic_feed(rng, n, sky_k=sky, curved=True)
    nan_rows = rng.random(m.shape) < 0.3
    d[nan_rows, 1950:2150] = np.nan
    mask = np.ones(m.shape, dtype=bool)
    filt = filter_cls()
    ra = 100.0 + np.arange(n) * 1e-4
    samples = ScanSamples(ra, np.full(n, 30.0), np.ones(n, dtype=bool))
    gain, _, info = filt.fit(d, m, sigma, freq, mask, FS, samples=samples)
    burst = slice(1950, 2150)
    limit = 5.0 / np.sqrt(info["z"]) + np.ptp(g[burst])
    assert np.max(np.abs(gain[burst] - g[burst])) < limit

    w, z = filt.channel_weights(m, sigma, freq, mask)
    unbridged = np.einsum("bc,bct->t", w / m, np.nan_to_num(d)) / z
    assert np.max(np.abs(unbridged[burst] - g[burst])) > limit
