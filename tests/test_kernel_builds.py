"""The two builds of the compiled kernels (docs/install.md#compiled-kernels): the x86-64-v3 build
(AVX2, FMA) is chosen on a CPU that has them, and gives the baseline build's results: the same bits
for element-wise kernels and order statistics, float64 rounding for reassociated sums."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import utils.kernels as kernels

REPO = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _baseline(name: str):
    """The baseline build of kernel ``name``, loaded from its file whatever ``utils.kernels`` chose."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    path = REPO / "utils" / "kernels" / f"{name}{suffix}"
    spec = importlib.util.spec_from_file_location(f"comap_baseline_kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_v3_build_is_used_on_a_cpu_that_has_it():
    if not X86 or os.environ.get("COMAP_NO_V3") or os.environ.get("COMAP_KERNELS"):
        pytest.skip("not x86-64, or the build was chosen by the environment")
    expected = "x86-64-v3" if kernels.cpu_has_v3() else "baseline"
    assert kernels.BUILD == expected
    from utils.kernels import block_stats

    assert (".v3." in block_stats.__name__) == (expected == "x86-64-v3")
    assert sys.modules["utils.kernels.block_stats"] is block_stats


def test_the_baseline_build_can_be_forced():
    code = "import utils.kernels as k, utils.kernels.binning as b; print(k.BUILD, b.__name__)"
    env = dict(os.environ, COMAP_KERNELS="baseline", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["baseline", "utils.kernels.binning"]


@pytest.fixture(scope="module")
def builds():
    if kernels.BUILD != "x86-64-v3":
        pytest.skip("only the baseline build is in use here")
    return {name: (_baseline(name), getattr(kernels, name)) for name in ("binning", "block_stats")}


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(11)
    x = rng.normal(1.0e6, 40.0, size=(64, 5003)).astype(np.float32)
    x[3, ::9] = np.nan
    x[7, 200:260] += 3.0e3  # a transient for the clipping
    return x


def test_element_wise_kernels_and_medians_are_bit_identical(builds, raw):
    """No fused multiply-adds in either build: filter_bin's per-sample sums, the decimated medians
    and the row medians (order statistics of identically computed values) agree bit for bit."""
    rows, n = raw.shape
    rng = np.random.default_rng(12)
    inv_gain, offset, tau, level, wr, m = (rng.uniform(0.5, 2.0, rows) for _ in range(6))
    wb = rng.uniform(0.0, 1.0, rows)
    x = rng.uniform(1.0, 2.0, n)
    group = (np.arange(rows) % 3 - 1).astype(np.int32)
    results = []
    for binning, stats in zip(builds["binning"], builds["block_stats"]):
        r_sum, num = np.zeros(n), np.zeros((2, n))
        den, wm = np.full((2, n), 50.0), np.full((2, n), 60.0)
        nan_count, r_nan = np.zeros(n, np.int32), np.zeros(n, np.int32)
        binning.filter_bin(
            raw, inv_gain, offset, tau, x, level, wr, wb, m, group, r_sum, num, den, wm, nan_count, r_nan, 2
        )
        med = np.empty(rows)
        stats.decimated_median(raw, inv_gain, offset, tau, x, 7, med, 2)
        row_med = np.empty(rows)
        stats.nanmedian_rows(raw.astype(np.float64), row_med, 2)
        results.append((r_sum, num, den, wm, nan_count, r_nan, med, row_med))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_reductions_agree_to_float64_rounding(builds, raw):
    rows, n = raw.shape
    scale = np.full(rows, 2.5e-5)
    x = 1.0 / np.sin(np.radians(np.linspace(35.0, 65.0, n)))
    w0 = (np.arange(n) % 4 == 0).astype(np.float64)
    w1 = 1.0 - w0
    results = []
    for stats in (builds["block_stats"][0], builds["block_stats"][1]):
        rms, nan = np.empty(rows), np.zeros(rows, np.int64)
        stats.pair_diff_rms(raw, 1, 5.0, 10, rms, nan, 2, 0, np.empty((rows, 0), np.float32))
        sums = np.zeros((rows, 5))
        stats.airmass_sums(raw, scale, x, sums, 2)
        masked = np.zeros((rows, 4))
        stats.masked_sums(raw, w0, w1, masked, 2)
        results.append((rms, nan, sums, masked))
    (rms_a, nan_a, sums_a, masked_a), (rms_b, nan_b, sums_b, masked_b) = results
    np.testing.assert_array_equal(nan_a, nan_b)
    np.testing.assert_allclose(rms_b, rms_a, rtol=1e-12)
    np.testing.assert_allclose(sums_b, sums_a, rtol=1e-12)
    np.testing.assert_allclose(masked_b, masked_a, rtol=1e-12)
