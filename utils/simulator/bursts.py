"""NaN bursts (docs/simulator.md#nan-bursts): spans of samples in which a fraction of the channels of some
feeds are NaN in the level-1 TOD, placed at a time or on a crossing of a source.

The channels of each (burst, feed) come from their own random stream, keyed by (seed, obsid, feed
number, burst index), so they do not depend on the sky, the noise streams or the other bursts.
Bursts are applied to the written TOD after each feed is generated; the noise-free truth is not
affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np
from numpy.typing import NDArray

from utils.constants import GROUND_FEED
from utils.errors import SimulatorError

from .component_spec import NaNBurst
from .components import ComponentSky, component_sigma_deg
from .scans import Timeline
from .sky import FeedChunk, PointSourceSky, SkyModel

STREAM_NAN_BURST: int = 3
"""Stream number of the NaN-burst channel draws (docs/simulator.md#determinism-and-bounded-memory)."""


@dataclass
class BurstPlan:
    """Where one burst hits one feed: samples ``[start, stop)`` and a channel mask (n_bands, n_channels)."""

    burst: int
    feed: int
    feed_index: int
    start: int
    stop: int
    channels: NDArray[np.bool_]


def burst_rng(seed: int, obsid: int, feed: int, burst: int) -> np.random.Generator:
    """``Generator(PCG64(SeedSequence(seed, spawn_key=(obsid, feed, 3, burst))))``."""
    ss = np.random.SeedSequence(int(seed), spawn_key=(int(obsid), int(feed), STREAM_NAN_BURST, int(burst)))
    return np.random.Generator(np.random.PCG64(ss))


def burst_channels(
    rng: np.random.Generator, n_bands: int, n_channels: int, fraction: float, bands: list[int]
) -> NDArray[np.bool_]:
    """Mask of ``round(fraction · n_channels)`` (at least 1) random channels in each band of ``bands``
    (all bands if empty). A permutation is drawn for every band, so the choice in one band does not
    depend on which other bands are affected."""
    n_nan = max(1, int(round(fraction * n_channels)))
    mask = np.zeros((n_bands, n_channels), dtype=bool)
    chosen = set(int(b) for b in bands) if bands else set(range(n_bands))
    for b in range(n_bands):
        order = rng.permutation(n_channels)
        if b in chosen:
            mask[b, order[:n_nan]] = True
    return mask


def crossings(distance_deg: NDArray, usable: NDArray, radius_deg: float) -> list[int]:
    """Sample of closest approach of every run of ``usable`` samples within ``radius_deg``, in time order."""
    inside = np.asarray(usable, dtype=bool) & (np.asarray(distance_deg) < radius_deg)
    padded = np.concatenate([[False], inside, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, stops = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    return [int(a + np.argmin(distance_deg[a:b])) for a, b in zip(starts, stops)]


def _reference_distance(
    burst: NaNBurst, sky: SkyModel, pointing: dict[str, NDArray], mjd: NDArray, fwhm_30: float
) -> tuple[NDArray, float, str]:
    """(distance of the reference feed from the burst's source, crossing radius, label), deg."""
    if burst.at_component is not None:
        k = int(burst.at_component)
        if not isinstance(sky, ComponentSky):
            raise SimulatorError(f"at_component = {k} but the observation has no added components")
        rc = sky.components[k]
        radius = float(component_sigma_deg(rc.spec, 30.0, fwhm_30)) / (1.0 / math.sqrt(8.0 * math.log(2.0)))
        return rc.distance_deg(pointing["ra"], pointing["dec"]), radius, f"component {k}"
    base = sky.base if isinstance(sky, ComponentSky) else sky
    if not isinstance(base, PointSourceSky):
        raise SimulatorError("at_source needs a calibrator sky")
    chunk = FeedChunk(mjd, pointing["ra"], pointing["dec"], pointing["az"], pointing["el"])
    radius = math.hypot(fwhm_30, base.source_fwhm_arcmin) / 60.0
    return base.distance_deg(chunk), radius, base.name


def plan_nan_bursts(
    tl: Timeline,
    feeds: list[int],
    pixel_pointing: h5py.Group,
    sky: SkyModel,
    seed: int,
    shape: tuple[int, int],
) -> list[BurstPlan]:
    """Resolve ``tl.spec.nan_bursts`` into per-feed sample spans and channel masks.

    A crossing is a run of in-scan samples in which the burst's first feed lies within one FWHM
    (at 30 GHz; beam and intrinsic size combined) of the source; the burst is centred on the
    sample of closest approach plus ``start_s``.

    Raises
    ------
    SimulatorError
        The requested crossing does not exist, or the burst lies outside the observation.
    """
    spec = tl.spec
    f_s = spec.sample_rate_hz
    n_bands, n_channels = shape
    plans: list[BurstPlan] = []
    science = [f for f in feeds if f != GROUND_FEED]
    for j, burst in enumerate(spec.nan_bursts):
        affected = [int(f) for f in burst.feeds] or science
        n_samples = max(1, int(round(burst.duration_s * f_s)))
        shift = int(round(burst.start_s * f_s))
        if burst.at_component is not None or burst.at_source:
            i = feeds.index(affected[0])
            pointing = {name: pixel_pointing[f"pixel_{name}"][i] for name in ("ra", "dec", "az", "el")}
            dist, radius, label = _reference_distance(
                burst, sky, pointing, tl.mjd, spec.beam_fwhm_arcmin_30ghz
            )
            found = crossings(dist, tl.in_scan(), radius)
            if not -len(found) <= burst.crossing < len(found):
                raise SimulatorError(
                    f"obsid {spec.obsid}: nan_bursts[{j}] asks for crossing {burst.crossing} of {label}, "
                    f"but feed {affected[0]} crosses it {len(found)} time(s)"
                )
            start = found[burst.crossing] + shift - n_samples // 2
        else:
            start = tl.scans[0].start + shift
        start, stop = max(0, start), min(tl.n_tod, start + n_samples)
        if stop <= start:
            raise SimulatorError(f"obsid {spec.obsid}: nan_bursts[{j}] lies outside the observation")
        for feed in affected:
            rng = burst_rng(seed, spec.obsid, feed, j)
            mask = burst_channels(rng, n_bands, n_channels, burst.fraction, list(burst.bands))
            plans.append(BurstPlan(j, feed, feeds.index(feed), start, stop, mask))
    return plans


def apply_nan_bursts(tod: h5py.Dataset, plans: list[BurstPlan], feed_index: int) -> None:
    """Set the planned channels of feed ``feed_index`` to NaN in the written TOD (feed, band, channel,
    time)."""
    for plan in plans:
        if plan.feed_index != feed_index:
            continue
        for band in range(plan.channels.shape[0]):
            chans = np.nonzero(plan.channels[band])[0]
            if chans.size == 0:
                continue
            block = tod[feed_index, band, :, plan.start : plan.stop]
            block[chans] = np.nan
            tod[feed_index, band, :, plan.start : plan.stop] = block


def write_burst_truth(truth: h5py.Group, plans: list[BurstPlan]) -> None:
    """``/truth/nan_bursts``: one row per (burst, feed) and its channel mask."""
    if not plans:
        return
    g = truth.create_group("nan_bursts")
    dt = np.dtype([("burst", "i4"), ("feed", "i4"), ("start", "i8"), ("stop", "i8")])
    rows = np.array([(p.burst, p.feed, p.start, p.stop) for p in plans], dtype=dt)
    g.create_dataset("spans", data=rows, track_times=False)
    g.create_dataset("channels", data=np.stack([p.channels for p in plans]), track_times=False)
