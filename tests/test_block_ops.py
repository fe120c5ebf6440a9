"""Fused per-block kernels (utils.block_ops) against plain NumPy references."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from utils.block_ops import (
    airmass_fit,
    decimated_nanmedian,
    filter_and_bin,
    inverse_gain,
    masked_nanmean,
    masked_nanmeans,
    pair_difference_rms_and_nans,
)
from utils.noise import pair_difference_rms


@pytest.fixture()
def block():
    rng = np.random.default_rng(4)
    raw = rng.normal(1.0e6, 1.0e3, size=(3, 8, 3001)).astype(np.float32)
    raw[0, 1, ::5] = np.nan
    raw[2, 7, :] = np.nan
    raw[1, 2, 100:140] += 5.0e4  # a transient
    return raw


@pytest.mark.parametrize("estimator", ["std", "clipped_std", "mad"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_pair_difference_matches_reference(block, estimator, n_threads):
    rms, nan = pair_difference_rms_and_nans(block, estimator=estimator, n_threads=n_threads)
    np.testing.assert_allclose(
        rms, pair_difference_rms(block, estimator=estimator), rtol=1e-9, equal_nan=True
    )
    np.testing.assert_array_equal(nan, np.isnan(block).sum(axis=-1))
    assert np.isnan(rms[2, 7])


@pytest.mark.parametrize("stride", [1, 7, 10])
def test_decimated_median_matches_nanmedian(block, stride):
    rng = np.random.default_rng(5)
    scale, offset, tau = (rng.uniform(0.5, 2, (3, 8)) for _ in range(3))
    x = rng.uniform(1.0, 2.0, block.shape[-1])
    got = decimated_nanmedian(block, scale, stride, offset=offset, tau=tau, airmass=x)
    sub = (
        block[..., ::stride].astype(np.float64) * scale[..., None]
        - offset[..., None]
        - tau[..., None] * x[::stride]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(sub, axis=-1)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("n", [2000, 2001])
def test_windowed_median_is_the_exact_median_on_awkward_rows(n):
    """Rows long enough for the windowed selection (docs/level2.md#streaming): ties, steps, sorted
    rows, NaN, and a row whose evenly spaced sample misses the middle ranks (the plain selection
    must take over). The median is an order statistic, so the result must be exactly numpy's."""
    rng = np.random.default_rng(8)
    t = np.arange(n)
    rows = [
        rng.integers(0, 4, n).astype(np.float32),  # heavy ties
        np.where(t < 0.6 * n, 0.0, 1.0e6).astype(np.float32),  # a step: the median sits on the edge
        np.sort(rng.normal(size=n)).astype(np.float32),
        np.sort(rng.normal(size=n))[::-1].astype(np.float32),
        np.where(rng.random(n) < 0.3, np.nan, rng.normal(size=n)).astype(np.float32),
    ]
    decoy = np.zeros(n, dtype=np.float32)  # every sampled position holds a large value
    decoy[(2 * np.arange(128) + 1) * n // 256] = 1.0e6
    rows.append(decoy)
    raw = np.stack(rows)
    got = decimated_nanmedian(raw, np.ones(len(rows)), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(raw.astype(np.float64), axis=-1)
    np.testing.assert_array_equal(got, ref)


def test_airmass_fit_matches_polyfit(block):
    rng = np.random.default_rng(6)
    el = np.linspace(35.0, 65.0, block.shape[-1])
    x = 1.0 / np.sin(np.radians(el))
    scale = inverse_gain(rng.uniform(5e5, 2e6, (3, 8)))
    fit = airmass_fit(block, scale, x)
    for b, c in [(0, 0), (0, 1), (1, 3)]:
        y = block[b, c].astype(np.float64) * scale[b, c]
        ok = np.isfinite(y)
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        assert fit.tau[b, c] == pytest.approx(slope, rel=1e-8)
        assert fit.offset[b, c] == pytest.approx(intercept, rel=1e-8)
    assert not fit.ok[2, 7] and np.isnan(fit.tau[2, 7])
    flat = airmass_fit(block, scale, np.full(block.shape[-1], 1.3))
    assert not flat.ok.any()


@pytest.mark.parametrize("fitted", [True, False])
def test_filter_and_bin_matches_numpy(block, fitted):
    """Against NumPy, with an airmass fit and without one (tau = level = 0 takes the kernel's
    shorter loop; one row keeps a level so that both loops run in one call)."""
    rng = np.random.default_rng(7)
    n_bands, n_chan, n = block.shape
    inv_gain = inverse_gain(rng.uniform(5e5, 2e6, (n_bands, n_chan)))
    offset, tau, level = (rng.normal(0, 1, (n_bands, n_chan)) for _ in range(3))
    if not fitted:
        tau[:] = 0.0
        level[:] = 0.0
        level[1, 2] = 0.5
    m = rng.uniform(30, 60, (n_bands, n_chan))
    x = rng.uniform(1.0, 1.5, n)
    wr = rng.normal(0, 1, (n_bands, n_chan))
    wb = rng.uniform(0, 2, (n_bands, n_chan))
    wb[0, 3] = 0.0
    wr[1, 4] = 0.0
    n_bin = 2
    group = (np.arange(n_bands)[:, None] * n_bin + np.arange(n_chan)[None, :] // (n_chan // n_bin)).astype(
        np.int32
    )
    group[2, 0] = -1
    sums = filter_and_bin(block, inv_gain, offset, tau, x, level, wr, wb, m, group, n_bands * n_bin)

    d = (
        block.astype(np.float64) * inv_gain[..., None]
        - offset[..., None]
        - tau[..., None] * x
        - level[..., None]
    )
    finite = np.isfinite(d)
    d0 = np.where(finite, d, 0.0)
    np.testing.assert_allclose(sums.r_sum, np.einsum("bc,bct->t", wr, d0), rtol=1e-9, atol=1e-6)
    np.testing.assert_array_equal(sums.nan_count, np.isnan(block).sum(axis=(0, 1)))
    for g in range(n_bands * n_bin):
        sel = (group == g) & (wb > 0)
        w = np.where(sel, wb, 0.0)[..., None] * finite
        np.testing.assert_allclose(sums.den[g], w.sum(axis=(0, 1)), rtol=1e-12)
        np.testing.assert_allclose(sums.num[g], (w * d0).sum(axis=(0, 1)), rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(sums.wm[g], (w * m[..., None]).sum(axis=(0, 1)), rtol=1e-12)
    binned = sums.binned()
    gain = rng.normal(0, 1e-3, n)
    np.testing.assert_allclose(
        sums.binned_residual(gain), binned - gain * sums.wm / sums.den, rtol=1e-9, atol=1e-9
    )


def _random_filter_args(block, seed: int) -> tuple:
    """Random per-channel terms for ``filter_and_bin(block, *args)``: gain, offset, tau, airmass,
    level, weights, normalisation, two groups per band."""
    rng = np.random.default_rng(seed)
    n_bands, n_chan, n = block.shape
    return (
        inverse_gain(rng.uniform(5e5, 2e6, (n_bands, n_chan))),
        rng.normal(0, 1, (n_bands, n_chan)),
        rng.normal(0, 1, (n_bands, n_chan)),
        rng.uniform(1.0, 1.5, n),
        rng.normal(0, 1, (n_bands, n_chan)),
        rng.normal(0, 1, (n_bands, n_chan)),
        rng.uniform(0, 2, (n_bands, n_chan)),
        rng.uniform(30, 60, (n_bands, n_chan)),
        (np.arange(n_bands)[:, None] * 2 + np.arange(n_chan)[None, :] // (n_chan // 2)).astype(np.int32),
        n_bands * 2,
    )


def test_filter_and_bin_independent_of_threads(block):
    """Each sample's sums are formed by one thread adding the rows in storage order, so one, two
    and three threads give the same bits (the level-2 output does not depend on the machine's
    core count)."""
    args = _random_filter_args(block, seed=8)
    runs = [filter_and_bin(block, *args, n_threads=k) for k in (1, 2, 3)]
    for sums in runs[1:]:
        for name in ("r_sum", "num", "den", "wm", "nan_count", "r_nan"):
            np.testing.assert_array_equal(getattr(sums, name), getattr(runs[0], name))


def test_filter_and_bin_with_known_nan_counts_gives_the_same_bits(block):
    """Given each channel's NaN count (NoiseStatsLevel1's ``nan_count``), channels without NaN
    skip the look for NaN: the sums must be the same bits as without the counts, with NaN channels
    (one every 5th sample, one all NaN) among them. A count that hid a NaN channel would poison
    its samples' sums with NaN, which the comparison catches."""
    args = _random_filter_args(block, seed=9)
    nan_count = np.isnan(block).sum(axis=-1)
    assert (nan_count > 0).sum() == 2 and (nan_count == 0).sum() > 20
    plain = filter_and_bin(block, *args)
    known = filter_and_bin(block, *args, nan_count=nan_count)
    for name in ("r_sum", "num", "den", "wm", "nan_count", "r_nan"):
        np.testing.assert_array_equal(getattr(known, name), getattr(plain, name))
    assert np.isfinite(known.r_sum).all()


def test_all_nan_sample_of_a_group_is_nan():
    raw = np.full((1, 4, 50), 3.0, dtype=np.float32)
    raw[0, :2, 10] = np.nan  # both channels of group 0 at sample 10
    w = np.array([[0.1, 0.7, 0.3, 0.9]])
    zero = np.zeros((1, 4))
    sums = filter_and_bin(
        raw,
        np.ones((1, 4)),
        zero,
        zero,
        np.ones(50),
        zero,
        zero,
        w,
        np.ones((1, 4)),
        np.array([[0, 0, 1, 1]], dtype=np.int32),
        2,
    )
    binned = sums.binned()
    assert np.isnan(binned[0, 10]) and np.isfinite(binned[1, 10])
    assert np.allclose(binned[:, :10], 3.0)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_masked_nanmean_matches_numpy(block, n_threads):
    """The kernel's mean over selected finite samples equals NumPy's to float64 summation rounding
    (3001 values of 1e6 summed in two orders differ by ~1e-13 relative; rtol 1e-12)."""
    raw = block.copy()
    raw[1, 3, 10] = np.inf
    raw[0, 4, :] = np.nan
    raw[0, 4, 0:20] = 7.0  # 20 finite samples, the 10 even ones selected below
    mask = np.zeros(raw.shape[-1], dtype=bool)
    mask[0:1500:2] = True
    mask[2000:2400] = True
    sub = raw[..., mask]
    finite = np.isfinite(sub)
    count = finite.sum(axis=-1)
    expected = np.where(finite, sub, 0).sum(axis=-1, dtype=np.float64) / np.maximum(count, 1)
    expected[count < 11] = np.nan
    got = masked_nanmean(raw, mask, min_count=11, n_threads=n_threads)
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[0, 4]) and np.isnan(got[2, 7]) and np.isfinite(got[1, 3])
    np.testing.assert_allclose(masked_nanmean(raw, mask, min_count=10)[0, 4], 7.0)
    # two selections in one pass give each selection's own mean
    other = np.zeros_like(mask)
    other[2500:3001:3] = True
    first, second = masked_nanmeans(raw, mask, other, min_count=11, n_threads=n_threads)
    np.testing.assert_array_equal(first, got)
    np.testing.assert_allclose(second, masked_nanmean(raw, other, min_count=11), rtol=1e-12, equal_nan=True)
    sub = raw[..., other].astype(np.float64)
    np.testing.assert_allclose(
        second[1], np.nanmean(np.where(np.isfinite(sub[1]), sub[1], np.nan), axis=-1), rtol=1e-12
    )


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_kernel_threads_sleep_unless_the_user_chose_a_wait_policy(preset):
    """Importing the kernels sets OMP_WAIT_POLICY=PASSIVE before libgomp loads, and keeps the
    user's choice (docs/level2.md#streaming)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os\nfrom utils import block_ops\nprint(os.environ.get('OMP_WAIT_POLICY'))"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env, PYTHONPATH=str(repo)),
        capture_output=True,
        text=True,
        check=True,
        cwd=repo,
    ).stdout.strip()
    assert out == (preset or "PASSIVE")


@pytest.mark.parametrize("estimator", ["std", "clipped_std", "mad"])
@pytest.mark.parametrize(("n", "stride"), [(3001, 10), (3000, 7), (3001, 1), (1, 10)])
def test_pair_difference_pass_also_copies_the_decimated_samples(block, estimator, n, stride):
    """The decimated copy taken in the pair-difference read of each row (docs/level2.md#streaming)
    is exactly ``x[..., ::stride]``, and taking it changes neither the rms nor the NaN count."""
    x = np.ascontiguousarray(block[..., :n])
    out = np.full((*x.shape[:-1], -(-n // stride)), -7.0, dtype=np.float32)
    rms, nan = pair_difference_rms_and_nans(x, estimator=estimator, stride=stride, decimated_out=out)
    np.testing.assert_array_equal(out, x[..., ::stride])
    plain_rms, plain_nan = pair_difference_rms_and_nans(x, estimator=estimator)
    np.testing.assert_array_equal(rms, plain_rms)
    np.testing.assert_array_equal(nan, plain_nan)
    with pytest.raises(ValueError, match="decimated_out"):
        pair_difference_rms_and_nans(x, stride=stride, decimated_out=out.astype(np.float64))


def test_decimated_median_of_the_compact_copy_is_identical(block):
    """The medians read a compact copy of every stride-th sample instead of the block: the same
    values in the same order, so the same order statistic, bit for bit."""
    rng = np.random.default_rng(9)
    scale, offset, tau = (rng.uniform(0.5, 2, (3, 8)) for _ in range(3))
    x = rng.uniform(1.0, 2.0, block.shape[-1])
    for stride in (1, 10, 13):
        compact = np.ascontiguousarray(block[..., ::stride])
        np.testing.assert_array_equal(
            decimated_nanmedian(compact, scale, 1, offset=offset, tau=tau, airmass=x[::stride]),
            decimated_nanmedian(block, scale, stride, offset=offset, tau=tau, airmass=x),
        )


def test_airmass_fit_with_a_non_finite_airmass_leaves_that_sample_out(block):
    """A non-finite airmass sample takes every row through the per-sample loop (no shared x sums)."""
    rng = np.random.default_rng(10)
    x = 1.0 / np.sin(np.radians(np.linspace(35.0, 65.0, block.shape[-1])))
    x[17] = np.nan
    x[400] = np.inf
    scale = inverse_gain(rng.uniform(5e5, 2e6, (3, 8)))
    fit = airmass_fit(block, scale, x)
    for b, c in [(0, 0), (0, 1), (1, 3)]:
        y = block[b, c].astype(np.float64) * scale[b, c]
        ok = np.isfinite(y) & np.isfinite(x)
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        assert fit.tau[b, c] == pytest.approx(slope, rel=1e-8)
        assert fit.offset[b, c] == pytest.approx(intercept, rel=1e-8)
        assert fit.n[b, c] == ok.sum()
