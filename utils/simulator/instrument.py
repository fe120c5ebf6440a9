"""Instrument model (docs/simulator.md#instrument-model, docs/simulator.md#pointing focal plane,
docs/simulator.md#determinism-and-bounded-memory random streams).

* channel frequencies in the level-1 storage order
  (docs/formats/level1.md#bands-channels-and-frequency-order);
* receiver temperature ``T_rx,f(ν)`` and gain ``G_f(ν)`` per feed, from the instrument stream;
* common-mode gain fluctuations ``δg_f(t)`` by the irfft recipe of docs/simulator.md#gain-fluctuations;
* the focal-plane layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import BAND_EDGES_GHZ, BAND_NAMES, BAND_WIDTH_GHZ, GROUND_FEED

STREAM_WHITE_NOISE: int = 0
STREAM_GAIN_FLUCTUATION: int = 1
STREAM_INSTRUMENT: int = 2


# --------------------------------------------------------------------------------------------------
# Random streams (docs/simulator.md#determinism-and-bounded-memory)
# --------------------------------------------------------------------------------------------------
def observation_rng(seed: int, obsid: int, feed_position: int, stream: int) -> np.random.Generator:
    """``Generator(PCG64(SeedSequence(seed, spawn_key=(obsid, feed_position, stream))))``."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(obsid), int(feed_position), int(stream)))
    return np.random.Generator(np.random.PCG64(ss))


def instrument_rng(instrument_seed: int, feed_number: int) -> np.random.Generator:
    """Instrument stream of a feed: ``SeedSequence(instrument_seed, spawn_key=(feed_number, 2))``."""
    ss = np.random.SeedSequence(int(instrument_seed), spawn_key=(int(feed_number), STREAM_INSTRUMENT))
    return np.random.Generator(np.random.PCG64(ss))


# --------------------------------------------------------------------------------------------------
# Frequencies
# --------------------------------------------------------------------------------------------------
def band_is_descending(band_name: str) -> bool:
    """Lower-sideband bands (``A:LSB``, ``B:LSB``) are stored in descending frequency
    (docs/formats/level1.md#bands-channels-and-frequency-order)."""
    return "LSB" in band_name.upper()


def frequency_grid_ghz(
    n_channels: int,
    band_edges_ghz: Sequence[tuple[float, float]] = BAND_EDGES_GHZ,
    band_names: Sequence[str] = BAND_NAMES,
) -> NDArray[np.float64]:
    """Channel centre frequencies in storage order, shape ``(n_bands, n_channels)``, GHz.

    Centres are offset by half a channel from the band edges; LSB bands are descending.
    """
    out = np.empty((len(band_edges_ghz), int(n_channels)))
    for b, ((lo, hi), name) in enumerate(zip(band_edges_ghz, band_names)):
        width = (hi - lo) / n_channels
        centres = lo + (np.arange(n_channels) + 0.5) * width
        out[b] = centres[::-1] if band_is_descending(name) else centres
    return out


def channel_width_hz(n_channels: int, band_width_ghz: float = BAND_WIDTH_GHZ) -> float:
    """``|Δν| = band width / n_channels`` in Hz."""
    return band_width_ghz * 1.0e9 / n_channels


def edge_distance_ghz(freq_ghz: NDArray, band_edges_ghz: Sequence[tuple[float, float]] = BAND_EDGES_GHZ):
    """Distance (GHz) of each channel of ``freq_ghz`` (n_bands, n_ch) to the nearest edge of its band."""
    edges = np.asarray(band_edges_ghz, dtype=np.float64)
    return np.minimum(freq_ghz - edges[:, :1], edges[:, 1:] - freq_ghz)


def half_band_mean_frequencies_ghz(freq_ghz: NDArray) -> NDArray[np.float64]:
    """Unweighted mean channel frequency of each half band, in storage order (n_bands·2,)."""
    n_ch = freq_ghz.shape[1]
    half = n_ch // 2
    return np.array([[band[:half].mean(), band[half:].mean()] for band in freq_ghz]).ravel()


def atmosphere_zenith_k(freq_ghz: ArrayLike, atm_zenith_k: float, atm_slope_per_ghz: float) -> NDArray:
    """Zenith atmospheric brightness ``T_atm(ν) = atm_zenith_k · [1 + slope · (ν − 30)]`` (K)."""
    return atm_zenith_k * (1.0 + atm_slope_per_ghz * (np.asarray(freq_ghz, dtype=np.float64) - 30.0))


# --------------------------------------------------------------------------------------------------
# Receiver and gain (docs/simulator.md)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedInstrument:
    """Instrument parameters of one feed.

    Attributes
    ----------
    feed : int
        Feed number.
    t_rx_scale, ripple_phase, gain_factor : float
        ``s_f``, ``φ_f`` (rad) and ``a_f`` of docs/simulator.md#instrument-model.
    t_rx_k : ndarray, shape (n_bands, n_channels)
        Receiver temperature, K.
    gain : ndarray, shape (n_bands, n_channels)
        Gain, counts/K.
    """

    feed: int
    t_rx_scale: float
    ripple_phase: float
    gain_factor: float
    t_rx_k: NDArray[np.float64]
    gain: NDArray[np.float64]


def feed_instrument(
    feed: int,
    freq_ghz: NDArray,
    instrument_seed: int,
    *,
    gain_scale: float = 1.0e6,
    t_rx_base_k: float = 22.0,
    t_rx_slope_k_per_ghz: float = 1.5,
    t_rx_edge_k: float = 15.0,
    edge_width_ghz: float = 0.05,
    t_rx_ripple_k: float = 1.0,
    ripple_period_ghz: float = 0.25,
    band_edges_ghz: Sequence[tuple[float, float]] = BAND_EDGES_GHZ,
    t_rx_band_offsets_k: Sequence[float] = (0.0, 3.0, -2.0, 2.0),
) -> FeedInstrument:
    """Draw the instrument of ``feed`` from its instrument stream and evaluate T_rx and G.

    Draw order: ``s_f ~ U(0.9, 1.1)``, ``φ_f ~ U(0, 2π)``, ``a_f ~ U(0.5, 1.5)``, then
    ``ε ~ N(0, 1)`` of shape (n_bands, n_channels), clipped to ±3. ``t_rx_band_offsets_k`` (one per
    band row of ``freq_ghz``, missing entries 0) is added inside the ``s_f`` factor.
    """
    rng = instrument_rng(instrument_seed, feed)
    s_f = float(rng.uniform(0.9, 1.1))
    phi = float(rng.uniform(0.0, 2.0 * math.pi))
    a_f = float(rng.uniform(0.5, 1.5))
    eps = np.clip(rng.standard_normal(freq_ghz.shape), -3.0, 3.0)
    d = edge_distance_ghz(freq_ghz, band_edges_ghz)
    edge = np.exp(-d / edge_width_ghz)
    offsets = np.zeros(freq_ghz.shape[0])
    n = min(len(t_rx_band_offsets_k), offsets.size)
    offsets[:n] = np.asarray(t_rx_band_offsets_k, dtype=np.float64)[:n]
    t_rx = s_f * (
        offsets[:, None]
        + t_rx_base_k
        + t_rx_slope_k_per_ghz * (freq_ghz - 26.0)
        + t_rx_edge_k * edge
        + t_rx_ripple_k * np.sin(2.0 * math.pi * freq_ghz / ripple_period_ghz + phi)
    )
    gain = gain_scale * a_f * (1.0 - 0.5 * edge) * (1.0 + 0.05 * eps)
    return FeedInstrument(int(feed), s_f, phi, a_f, t_rx, gain)


# --------------------------------------------------------------------------------------------------
# Gain fluctuations (docs/simulator.md#gain-fluctuations)
# --------------------------------------------------------------------------------------------------
def gain_fluctuation_psd(freq_hz: ArrayLike, sigma_g: float, alpha: float, f0_hz: float) -> NDArray:
    """One-sided PSD ``σ_g² (f/f0)^α`` (Hz⁻¹); 0 at f = 0."""
    f = np.asarray(freq_hz, dtype=np.float64)
    out = np.zeros_like(f)
    pos = f > 0
    out[pos] = sigma_g**2 * (f[pos] / f0_hz) ** alpha
    return out


def gain_fluctuations(
    n_samples: int,
    sample_rate_hz: float,
    sigma_g: float,
    alpha: float,
    f0_hz: float,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Realise δg(t), shape (n_samples,), with one-sided PSD ``σ_g² (f/f0)^α``.

    ``X_k = sqrt(N f_s P(f_k)/2) (a_k + i b_k)/√2`` for 0 < k < N/2, ``sqrt(N f_s P/2) a_k`` at
    Nyquist (even N), ``X_0 = 0``; ``δg = irfft(X, n=N)``. a and b are drawn as two vectors of
    length N//2 + 1 (a first).
    """
    n = int(n_samples)
    n_freq = n // 2 + 1
    a = rng.standard_normal(n_freq)
    b = rng.standard_normal(n_freq)
    f_k = np.arange(n_freq) * sample_rate_hz / n
    amp = np.sqrt(n * sample_rate_hz * gain_fluctuation_psd(f_k, sigma_g, alpha, f0_hz) / 2.0)
    x = amp * (a + 1j * b) / math.sqrt(2.0)
    x[0] = 0.0
    if n % 2 == 0:
        x[-1] = amp[-1] * a[-1]
    return np.fft.irfft(x, n=n)


# --------------------------------------------------------------------------------------------------
# Focal plane (docs/simulator.md#pointing)
# --------------------------------------------------------------------------------------------------
def focal_plane_offset_arcmin(feed: int, spacing_arcmin: float = 12.0) -> tuple[float, float]:
    """(x = cross-elevation, y = elevation) offset of ``feed`` in arcmin (docs/simulator.md#pointing
    layout)."""
    f = int(feed)
    if f == 1:
        return 0.0, 0.0
    if f == GROUND_FEED:
        return 0.0, -3.0 * spacing_arcmin
    if 2 <= f <= 7:
        radius, angle = spacing_arcmin, 60.0 * (f - 2)
    elif 8 <= f <= 18 and f % 2 == 0:
        radius, angle = 2.0 * spacing_arcmin, 60.0 * (f - 8) / 2
    elif 9 <= f <= 19:
        radius, angle = spacing_arcmin * math.sqrt(3.0), 30.0 + 60.0 * (f - 9) / 2
    else:
        raise ValueError(f"no focal-plane position for feed {feed}")
    a = math.radians(angle)
    return radius * math.cos(a), radius * math.sin(a)


def focal_plane_offsets_arcmin(feeds: Sequence[int], spacing_arcmin: float = 12.0) -> NDArray[np.float64]:
    """Offsets of ``feeds``, shape (n_feeds, 2), arcmin."""
    return np.array([focal_plane_offset_arcmin(f, spacing_arcmin) for f in feeds], dtype=np.float64)
