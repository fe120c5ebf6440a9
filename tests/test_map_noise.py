"""Map noise (docs/mapmaking.md#map-noise): sky-free segment noise, the red-noise cuts on it, and an RMS HDU
from noise-only simulations through the destriper that matches the scatter of destriped noise."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from modules.MapMaking.destriper import destripe
from modules.MapMaking.map_noise import monte_carlo_rms, residual_segment_noise, segment_verdicts

FS_HZ = 50.0
NX = NY = 32
SEG_SAMPLES = 3000
SIGMA_W = 0.01  # K per sample


def _triangle(t: np.ndarray, period: float, span: float) -> np.ndarray:
    phase = (t / period) % 1.0
    return span * np.where(phase < 0.5, 2 * phase, 2 - 2 * phase)


def _scan_pattern() -> tuple[np.ndarray, np.ndarray]:
    """Pixel index and segment starts of 24 segments of 60 s: 12 sweep x over the whole grid while
    drifting through all rows, 12 sweep y while drifting over the left half only, so that the right half
    is seen from one scan direction (each pixel by several segments of that direction)."""
    t = np.arange(SEG_SAMPLES, dtype=np.float64)
    pix, starts = [], []
    for k in range(12):
        x = _triangle(t + 37 * k, 400.0, NX - 1e-6)
        y = (NY * t / SEG_SAMPLES + k * NY / 12) % NY
        starts.append(sum(p.size for p in pix))
        pix.append(np.floor(y).astype(np.int64) * NX + np.floor(x).astype(np.int64))
    for k in range(12):
        y = _triangle(t + 53 * k, 400.0, NY - 1e-6)
        x = (NX / 2 * t / SEG_SAMPLES + k * NX / 24) % (NX / 2)
        starts.append(sum(p.size for p in pix))
        pix.append(np.floor(y).astype(np.int64) * NX + np.floor(x).astype(np.int64))
    return np.concatenate(pix).astype(np.int32), np.asarray(starts, dtype=np.int64)


def _one_over_f(rng, n_seg: int, n: int, fknee_hz: float, alpha: float, sigma: float) -> np.ndarray:
    """White + 1/f Gaussian noise, PSD σ²(1 + |f/f_knee|^α), one independent stream per segment."""
    f = np.fft.rfftfreq(n, 1 / FS_HZ)
    f[0] = f[1]
    amp = np.sqrt(n * sigma**2 * (1 + (f / fknee_hz) ** alpha) / 2)
    amp[0] = 0.0
    spec = amp * (rng.standard_normal((n_seg, f.size)) + 1j * rng.standard_normal((n_seg, f.size)))
    return np.fft.irfft(spec, n=n, axis=-1).ravel()


def _sky() -> np.ndarray:
    """Bright diffuse emission (K) on the grid: a broad ridge and two blobs, ≫ the noise per sample."""
    yy, xx = np.mgrid[0:NY, 0:NX]
    sky = 2.0 * np.exp(-0.5 * ((yy - 14) / 5.0) ** 2)
    sky += 5.0 * np.exp(-0.5 * (((xx - 8) / 3.0) ** 2 + ((yy - 20) / 3.0) ** 2))
    sky += 3.0 * np.exp(-0.5 * (((xx - 25) / 4.0) ** 2 + ((yy - 8) / 2.5) ** 2))
    return sky.ravel()


def _destripe(tod, pixels, weights, starts, n_pix):
    return destripe(tod.astype(np.float32), pixels, weights, 100, n_pix, segment_starts=starts)


def _default_realisations() -> int:
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap

    return int(inspect.signature(CreateMap).parameters["noise_realizations"].default)


@pytest.mark.parametrize("fknee_hz", [0.0, 1.0])
def test_rms_matches_scatter_of_destriped_noise(fknee_hz):
    """The Monte Carlo RMS (default number of realisations) from ONE sky-rich data set matches the scatter
    of 40 independent destriped noise maps, in the crossed half and in the half seen from one scan
    direction only; the white RMS (1/sqrt Σw) does not with 1/f noise.

    χ²/N = mean over pixels and the 40 maps of m²/RMS². Tolerance: the RMS is a Gaussian average over
    SMOOTH_SIGMA_PIX = 2 pixels (≈ 4π·2² ≈ 50 pixels) of n = 16 realisations: its variance ratio has a
    relative error ≥ sqrt(2/(16·50)) ≈ 5 %, more because neighbouring pixels share offsets, and the
    reference scatter of 40 maps another sqrt(2/40)/sqrt(N_eff): 15 % on χ²/N covers both at ~3σ."""
    rng = np.random.default_rng(11)
    pixels, starts = _scan_pattern()
    n = pixels.size
    n_pix = NX * NY
    alpha = -1.5
    sigma = SIGMA_W

    def noise(r):
        if fknee_hz == 0.0:
            return sigma * r.standard_normal(n)
        return _one_over_f(r, starts.size, SEG_SAMPLES, fknee_hz, alpha, sigma)

    weights = np.full(n, 1.0 / sigma**2, dtype=np.float32)
    data = _sky()[pixels] + noise(rng)
    res = _destripe(data, pixels, weights, starts, n_pix)
    seg = residual_segment_noise(data.astype(np.float32), pixels, weights, weights, starts, res, 100, FS_HZ)
    # the sky (up to 5 K, 500 σ) is gone from the white-noise estimate: one segment's 1500 pairs give a
    # relative error of ~1/sqrt(2·1500) ≈ 2 %, so each within 8 % (4σ) and their mean within 1.5 %
    ratio = seg.sigma_white / sigma
    assert np.all(np.abs(ratio - 1) < 0.08) and abs(ratio.mean() - 1) < 0.015, ratio
    grid = np.arange(n_pix)
    mc = monte_carlo_rms(
        seg,
        pixels=pixels,
        weights=weights,
        map_weights=weights,
        segment_starts=starts,
        white_rms=res.rms,
        hit=grid,
        shape=(NY, NX),
        n_realisations=_default_realisations(),
        seed=(1,),
        destriper={
            "offset_length": 100,
            "tol": 1e-6,
            "max_iter": 1000,
            "lambda_ridge": 0.0,
            "good_fraction": 0.5,
        },
    )
    maps = np.array([_destripe(noise(rng), pixels, weights, starts, n_pix).map for _ in range(40)])
    xx = np.arange(n_pix) % NX
    for name, region in (("crossed", xx < NX // 2), ("one direction", xx >= NX // 2)):
        chi2 = float(np.mean(maps[:, region] ** 2 / mc.rms[region] ** 2))
        chi2_white = float(np.mean(maps[:, region] ** 2 / res.rms[region] ** 2))
        print(f"fknee {fknee_hz} Hz, {name}: chi2/N {chi2:.3f} (RMS), {chi2_white:.3f} (RMS_WHITE)")
        assert abs(chi2 - 1.0) < 0.15, (name, chi2)
        if fknee_hz > 0:
            assert chi2_white > 1.5, (name, chi2_white)


def test_sky_does_not_reject_segments_but_red_noise_does():
    """With the default sigma_red_cutoff_k, segments over diffuse emission (0.1–0.25 K, 10–25 σ per sample)
    and without extra noise are kept (the sky is removed before the noise fit), while segments with strong
    1/f noise are dropped. (Brighter sky, up to 5 K, is removed as well: see the σ_white check of
    test_rms_matches_scatter_of_destriped_noise.)

    The 1/f-heavy segments have σ_red = σ_w (f_ref/f_knee)^(α/2) = 0.01·(0.1/50)^(−0.75) ≈ 1.1 K at
    f_ref = 0.1 Hz (f_knee = 50 Hz, α = −1.5), well above the 0.4 K cutoff; white-noise segments have
    σ_red ≈ 0 whatever the sky. The same statistics taken on the data with their sky (as level 2 does)
    reject most sky-rich segments: that is the defect this guards against."""
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap

    cutoff = float(inspect.signature(CreateMap).parameters["sigma_red_cutoff_k"].default)
    fknee_max = inspect.signature(CreateMap).parameters["fknee_max_hz"].default
    rng = np.random.default_rng(5)
    pixels, starts = _scan_pattern()
    n = pixels.size
    quiet = SIGMA_W * rng.standard_normal(n)
    heavy = np.zeros(starts.size, dtype=bool)
    heavy[[3, 17]] = True
    red = _one_over_f(rng, starts.size, SEG_SAMPLES, 50.0, -1.5, SIGMA_W)
    seg_of = np.repeat(np.arange(starts.size), SEG_SAMPLES)
    data = 0.05 * _sky()[pixels] + np.where(heavy[seg_of], red, quiet)
    weights = np.full(n, 1.0 / SIGMA_W**2, dtype=np.float32)
    res = _destripe(data, pixels, weights, starts, NX * NY)
    noise = residual_segment_noise(data.astype(np.float32), pixels, weights, weights, starts, res, 100, FS_HZ)
    reasons = segment_verdicts(noise, np.ones(starts.size), cutoff, fknee_max)
    dropped = np.array([r is not None for r in reasons])
    assert np.array_equal(dropped, heavy), (reasons, noise.sigma_red)
    assert all(reasons[k] == "sigma_red above cutoff" for k in np.flatnonzero(heavy))
    # with the sky in (level-2 statistics), the sky-rich white-noise segments would be rejected
    from utils.noise import segment_noise_stats

    with_sky = segment_noise_stats(data.reshape(starts.size, SEG_SAMPLES), FS_HZ)
    assert np.mean(with_sky.sigma_red[~heavy] > cutoff) > 0.25, with_sky.sigma_red
