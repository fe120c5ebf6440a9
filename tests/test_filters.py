"""Tests of utils.filters: running median / NaN-aware median / running mean
(docs/operations.md#measurement-details).

References are independent of the code under test:
* plain median: ``scipy.ndimage.median_filter(row, size=W, mode='nearest')`` per 1-D row, compared
  bit for bit (test data hold no -0.0, the one case where the choice between equal values shows);
* NaN-aware median / mean: brute force ``numpy.nanmedian`` / ``numpy.nanmean`` over the explicitly
  clamped window ``x[clip(i - W//2 + j, 0, n-1)]``;
* running mean: ``scipy.ndimage.uniform_filter1d(mode='nearest')`` to 1e-6 relative.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from utils import filters
from utils.filters import running_mean, running_mean_nan, running_median, running_median_nan
from utils.kernels import median_filter as median_kernel

RNG_SEED = 20260325


# --------------------------------------------------------------------------------------------------
# References and helpers
# --------------------------------------------------------------------------------------------------
def scipy_median_rows(x: np.ndarray, window: int, axis: int = -1) -> np.ndarray:
    """SciPy's fast 1-D median filter applied to every 1-D row along ``axis``."""
    moved = np.moveaxis(np.asarray(x), axis, -1)
    out = np.empty_like(moved)
    for idx in np.ndindex(moved.shape[:-1]):
        out[idx] = ndimage.median_filter(moved[idx], size=window, mode="nearest")
    return np.moveaxis(out, -1, axis)


def clamped_windows(row: np.ndarray, window: int) -> np.ndarray:
    """(n, W) array of the clamped windows x[clip(i - W//2 + j, 0, n-1)]."""
    n = row.shape[0]
    idx = np.arange(n)[:, None] - window // 2 + np.arange(window)[None, :]
    return row[np.clip(idx, 0, n - 1)]


def brute_nanmedian(row: np.ndarray, window: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows
        return np.nanmedian(clamped_windows(row, window), axis=1).astype(row.dtype)


def brute_nanmean(row: np.ndarray, window: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(clamped_windows(row.astype(np.float64), window), axis=1)


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    uint = np.dtype(f"u{actual.dtype.itemsize}")
    same = np.ascontiguousarray(actual).view(uint) == np.ascontiguousarray(expected).view(uint)
    if not same.all():
        bad = np.argwhere(~same)[:5]
        raise AssertionError(
            f"{(~same).sum()} elements differ, first at {bad.tolist()}: "
            f"{actual[tuple(bad[0])]!r} != {expected[tuple(bad[0])]!r}"
        )


def random_row(rng: np.random.Generator, n: int, dtype, kind: str) -> np.ndarray:
    if kind == "gauss":
        x = rng.standard_normal(n)
    elif kind == "ties":  # few distinct values: many ties (no zero sign issues: +0.0 only)
        x = rng.integers(-2, 3, n).astype(np.float64)
    elif kind == "inf":
        x = rng.standard_normal(n)
        x[rng.random(n) < 0.2] = np.inf
        x[rng.random(n) < 0.2] = -np.inf
    else:  # "const"
        x = np.full(n, 1.5)
    return x.astype(dtype)


# --------------------------------------------------------------------------------------------------
# Plain running median: bit identity with SciPy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_matches_scipy_random_cases(dtype):
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(400):
        n = int(rng.choice([1, 2, 3, int(rng.integers(1, 40)), int(rng.integers(40, 400))]))
        window = int(rng.choice([1, 2, 3, 4, int(rng.integers(1, 30)), int(rng.integers(1, 2 * n + 3))]))
        kind = str(rng.choice(["gauss", "ties", "inf", "const"]))
        x = random_row(rng, n, dtype, kind)
        assert_bits_equal(running_median(x, window), scipy_median_rows(x, window))


@pytest.mark.parametrize("method", [1, 2, 3], ids=["block", "fenwick", "sorted-window"])
@pytest.mark.parametrize("nan_aware", [False, True])
def test_every_kernel_path_matches_reference(method, nan_aware):
    """Each algorithm (forced, whatever W and n) gives the reference result; 1, 2 and 3 threads."""
    rng = np.random.default_rng(RNG_SEED + method)
    for _ in range(150):
        n = int(rng.integers(1, 70))
        window = int(rng.integers(1, 90))
        dtype = rng.choice([np.float32, np.float64])
        x = random_row(rng, n, dtype, str(rng.choice(["gauss", "ties", "inf"])))
        if nan_aware:
            x[rng.random(n) < rng.random()] = np.nan
            expected = brute_nanmedian(x, window)
        else:
            expected = ndimage.median_filter(x, size=window, mode="nearest")
        out = np.empty((1, n), dtype=dtype)
        status = median_kernel.median_filter_rows(
            x[None, :], out, window, nan_aware, int(rng.integers(1, 4)), method
        )
        assert status == 0
        assert_bits_equal(out[0], expected)


@pytest.mark.parametrize("window", [1, 2, 5, 8, 9, 64, 301, 1000])
def test_one_row_split_between_threads(window):
    """A single long row is cut into chunks for the threads; the seams must not show."""
    rng = np.random.default_rng(window)
    x = rng.integers(-50, 50, 40_000).astype(np.float64) + 0.25
    assert median_kernel.plan_chunks(1, x.size, window, 3) > 1
    assert_bits_equal(running_median(x, window, n_threads=3), scipy_median_rows(x, window))
    expected = brute_nanmedian(x, window) if window <= 64 else None
    if expected is not None:
        assert_bits_equal(running_median_nan(x, window, n_threads=3), expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_nd_arrays_and_axes(dtype):
    rng = np.random.default_rng(RNG_SEED + 7)
    x3 = rng.standard_normal((3, 4, 57)).astype(dtype)
    for axis in (0, 1, 2, -1, -2):
        for window in (1, 2, 3, 6, 11, 200):
            assert_bits_equal(running_median(x3, window, axis=axis), scipy_median_rows(x3, window, axis=axis))
    x2 = rng.integers(0, 5, (6, 300)).astype(dtype)
    assert_bits_equal(running_median(x2, 31), scipy_median_rows(x2, 31))
    assert_bits_equal(running_median(x2, 40, axis=0), scipy_median_rows(x2, 40, axis=0))


def test_median_non_contiguous_and_read_only_input():
    rng = np.random.default_rng(RNG_SEED + 8)
    base = rng.standard_normal((5, 400))
    base.flags.writeable = False
    for view in (base[:, ::3], base[::2, ::-1], base.T, base[1:4, 7:300:2]):
        assert not view.flags.c_contiguous
        for window in (4, 25, 101):
            assert_bits_equal(running_median(view, window), scipy_median_rows(view, window))
            assert_bits_equal(running_median(view, window, axis=0), scipy_median_rows(view, window, axis=0))


def test_first_half_window_regression():
    """Legacy bug: the median filter corrupted its first half-window.

    For a ramp x[i] = i and nearest padding, the clamped window of sample i holds (W//2 - i + 1)
    copies of 0 followed by 1, 2, …, so its element of rank W//2 is exactly i: the filtered ramp
    equals the ramp, first half-window included, for odd and even W <= n.
    """
    n = 500
    ramp = np.arange(n, dtype=np.float64)
    for window in (2, 3, 50, 51, 250, 499, 500):
        got = running_median(ramp, window)
        np.testing.assert_array_equal(got[: window // 2 + 1], ramp[: window // 2 + 1])
        np.testing.assert_array_equal(got, ramp)
        np.testing.assert_array_equal(running_median_nan(ramp, window | 1), ramp)
    # A step at the very start: the first outputs see the step's nearest-padding weight.
    x = np.zeros(100)
    x[:3] = 7.0
    got = running_median(x, 9)  # window of i=0: x[0] five times + x[1..4] -> seven 7s of 9
    np.testing.assert_array_equal(got[:3], [7.0, 7.0, 7.0])  # i=2: clip(-2..6) holds five 7s
    np.testing.assert_array_equal(got[3:], 0.0)  # i=3: clip(-1..7) holds four 7s of 9


def test_median_rejects_nan_and_masked_values():
    x = np.arange(20.0)
    x[13] = np.nan
    with pytest.raises(ValueError, match="running_median_nan"):
        running_median(x, 5)
    with pytest.raises(ValueError, match="running_median_nan"):
        running_median(x, 50)  # Fenwick path (W > n)
    with pytest.raises(ValueError, match="running_median_nan"):
        running_median(x, 3)  # sorted-window path
    masked = np.ma.masked_array(np.arange(10.0), mask=np.arange(10) == 4)
    with pytest.raises(ValueError, match="masked"):
        running_median(masked, 3)


# --------------------------------------------------------------------------------------------------
# NaN-aware running median
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_median_nan_matches_brute_force(dtype):
    rng = np.random.default_rng(RNG_SEED + 11)
    for _ in range(300):
        n = int(rng.integers(1, 80))
        window = int(rng.choice([1, 2, 3, 4, int(rng.integers(1, 40)), int(rng.integers(1, 2 * n + 3))]))
        x = random_row(rng, n, dtype, str(rng.choice(["gauss", "ties", "inf"])))
        pattern = rng.integers(0, 4)
        if pattern == 0:  # random gaps
            x[rng.random(n) < rng.random()] = np.nan
        elif pattern == 1:  # a long gap: all-NaN windows inside
            start = int(rng.integers(0, n))
            x[start : start + int(rng.integers(1, n + 1))] = np.nan
        elif pattern == 2:  # NaN at both ends (repeated by the nearest padding)
            x[0] = x[-1] = np.nan
        assert_bits_equal(running_median_nan(x, window), brute_nanmedian(x, window))


def test_median_nan_all_nan_rows_and_windows():
    x = np.full((3, 30), np.nan)
    x[1, 10] = 4.0
    x[2, ::2] = np.arange(15.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "All-NaN slice" warning from our code
        got = running_median_nan(x, 5)
    assert np.isnan(got[0]).all()
    np.testing.assert_array_equal(got[1, 8:13], 4.0)
    assert np.isnan(got[1, :8]).all() and np.isnan(got[1, 13:]).all()
    assert_bits_equal(got[2], brute_nanmedian(x[2], 5))


def test_median_nan_even_count_is_mean_of_middle_values():
    # Window of 4 with one NaN gives 3 values (middle one); with two NaNs, the mean of two.
    x = np.array([1.0, np.nan, 10.0, np.nan, 4.0, 8.0, 2.0, 6.0])
    got = running_median_nan(x, 4)
    expected = brute_nanmedian(x, 4)
    assert_bits_equal(got, expected)
    assert got[3] == 7.0  # window x[1:5] = nan, 10, nan, 4 -> (4 + 10) / 2


def test_median_nan_masked_array_counts_as_nan():
    data = np.arange(12.0)
    mask = np.zeros(12, bool)
    mask[[2, 3, 9]] = True
    expected = brute_nanmedian(np.where(mask, np.nan, data), 5)
    assert_bits_equal(running_median_nan(np.ma.masked_array(data, mask=mask), 5), expected)


def test_median_nan_without_nan_equals_plain_median_for_odd_windows():
    rng = np.random.default_rng(RNG_SEED + 12)
    x = rng.standard_normal((4, 3000)).astype(np.float32)
    for window in (3, 51, 301, 2999, 3001, 7001):
        assert_bits_equal(running_median_nan(x, window), scipy_median_rows(x, window))


# --------------------------------------------------------------------------------------------------
# Running mean
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_matches_uniform_filter1d(dtype):
    rng = np.random.default_rng(RNG_SEED + 21)
    for _ in range(200):
        n = int(rng.choice([1, 2, int(rng.integers(1, 50)), int(rng.integers(50, 3000))]))
        window = int(rng.choice([1, 2, 3, 4, int(rng.integers(1, 60)), int(rng.integers(1, 2 * n + 3))]))
        offset = float(rng.choice([0.0, 30.0]))
        x = (rng.standard_normal(n) + offset).astype(dtype)
        expected = ndimage.uniform_filter1d(x, window, mode="nearest")
        got = running_mean(x, window)
        assert got.dtype == dtype
        # 1e-6 relative to the data scale: near-zero means of zero-mean data cancel, so a pure
        # relative tolerance on the output would be meaningless there.
        scale = float(np.abs(x).max())
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * scale)


def test_mean_long_row_does_not_drift():
    """Block sums restart every W samples: the error does not grow along a 10^6-sample row.

    Reference: each window summed on its own (numpy pairwise summation, relative error
    ~log2(W)·eps), so an add/subtract running sum's accumulated error would show at the end.
    """
    rng = np.random.default_rng(RNG_SEED + 22)
    window = 301
    x = 1.0e4 + rng.standard_normal(1_000_000)
    padded = np.pad(x, (window // 2, window - 1 - window // 2), mode="edge")
    reference = np.lib.stride_tricks.sliding_window_view(padded, window).sum(axis=1) / window
    got = running_mean(x, window)
    np.testing.assert_allclose(got, reference, rtol=1e-13)


def test_mean_nd_axis_and_threads():
    rng = np.random.default_rng(RNG_SEED + 23)
    x = rng.standard_normal((3, 200, 5))
    expected = ndimage.uniform_filter1d(x, 17, axis=1, mode="nearest")
    for n_threads in (1, 2, 3):
        np.testing.assert_allclose(
            running_mean(x, 17, axis=1, n_threads=n_threads), expected, rtol=1e-6, atol=1e-12
        )
    row = rng.standard_normal(100_000)
    np.testing.assert_allclose(
        running_mean(row, 1000, n_threads=3),
        ndimage.uniform_filter1d(row, 1000, mode="nearest"),
        rtol=1e-6,
        atol=1e-12,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_nan_matches_brute_force(dtype):
    rng = np.random.default_rng(RNG_SEED + 24)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        window = int(rng.integers(1, 2 * n + 5))
        x = rng.standard_normal(n).astype(dtype)
        x[rng.random(n) < rng.random()] = np.nan
        expected = brute_nanmean(x, window)
        np.testing.assert_allclose(running_mean_nan(x, window), expected, rtol=1e-6, atol=1e-7)


def test_mean_nan_and_inf_affect_only_their_windows():
    x = np.arange(40.0)
    x[10] = np.nan
    x[25] = np.inf
    got = running_mean(x, 5)
    with np.errstate(invalid="ignore"):
        expected = clamped_windows(x, 5).mean(axis=1)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12)
    assert np.isfinite(got[:8]).all() and np.isfinite(got[13:23]).all() and np.isfinite(got[28:]).all()


# --------------------------------------------------------------------------------------------------
# API: types, out, validation, threads
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("func", [running_median, running_median_nan, running_mean, running_mean_nan])
def test_dtypes_out_and_empty(func):
    ints = np.arange(30, dtype=np.int16)
    res = func(ints, 4)
    assert res.dtype == np.float64
    assert func(np.ones(10, np.float16), 3).dtype == np.float32
    big_endian = np.arange(20.0).astype(">f8")
    np.testing.assert_array_equal(func(big_endian, 5), func(np.arange(20.0), 5))
    assert func([1.0, 2.0, 3.0], 2).dtype == np.float64
    assert func(np.empty((0, 5)), 3).shape == (0, 5)
    assert func(np.empty((3, 0), np.float32), 3).dtype == np.float32

    x = np.random.default_rng(1).standard_normal((4, 50)).astype(np.float32)
    expected = func(x, 7, axis=0)
    out = np.empty_like(x)
    assert func(x, 7, axis=0, out=out) is out
    assert_bits_equal(out, expected)
    out_f = np.empty(x.shape, dtype=np.float32, order="F")
    assert func(x, 7, axis=0, out=out_f) is out_f
    assert_bits_equal(out_f, expected)
    in_place = x.copy()
    assert func(in_place, 7, axis=0, out=in_place) is in_place
    assert_bits_equal(in_place, expected)


@pytest.mark.parametrize("func", [running_median, running_median_nan, running_mean, running_mean_nan])
def test_validation_errors(func):
    x = np.arange(10.0)
    for bad_window in (0, -3, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="window"):
            func(x, bad_window)
    with pytest.raises(ValueError, match="dtype"):
        func(np.ones(5, np.complex128), 3)
    with pytest.raises(ValueError, match="dtype"):
        func(np.array(["a", "b"]), 3)
    with pytest.raises(ValueError, match="dtype"):
        func(np.ones(4, dtype=object), 3)
    with pytest.raises(ValueError, match="dimension"):
        func(np.float64(3.0), 3)
    with pytest.raises(ValueError):
        func(np.ones((2, 3)), 3, axis=2)
    with pytest.raises(ValueError, match="out"):
        func(x, 3, out=np.empty(9))
    with pytest.raises(ValueError, match="out"):
        func(x, 3, out=np.empty(10, np.float32))
    with pytest.raises(ValueError, match="n_threads"):
        func(x, 3, n_threads=0)


def test_thread_count_does_not_change_results_and_honours_limits():
    rng = np.random.default_rng(RNG_SEED + 31)
    x = rng.standard_normal((3, 20_000))
    x[rng.random(x.shape) < 0.02] = np.nan
    one = running_median_nan(x, 301, n_threads=1)
    for n_threads in (2, 3, 5):
        assert_bits_equal(running_median_nan(x, 301, n_threads=n_threads), one)
    if not median_kernel.have_openmp():
        pytest.skip("kernels built without OpenMP")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        assert median_kernel.max_threads() == 1
        assert filters._check_threads(None, "t") == 1
        assert_bits_equal(running_median_nan(x, 301), one)
