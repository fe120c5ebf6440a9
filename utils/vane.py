"""Vane calibration of the TOD: the vane results of SystemTemperature (``level2/vane``),
interpolated in time between vane events (docs/level2.md#calibration-per-scan). The streaming stages calibrate
every feed × scan block with :func:`vane_calibration`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from utils import level1_layout as L1
from utils.errors import BadCOMAPFile
from utils.level2 import (
    FEEDS,
    FREQUENCY,
    LEVEL1_FEED_INDEX,
    MJD,
    PIXEL_AZ,
    PIXEL_EL,
    SCAN_EDGES,
    VANE,
    VANE_GAIN,
    VANE_MJD,
)

TSYS_CONVENTION_ATTR = "tsys_convention"
"""Attribute of ``level2/vane`` naming what ``system_temperature`` holds (docs/level2.md#tsys-conventions)."""
TSYS_CONVENTION = "noise_equivalent"
"""``system_temperature`` is ``V_cold/G = (T_hot − T_c)/(Y − 1)``. Files without the attribute were written
by the older code and hold the legacy ``(T_hot − Y T_c)/(Y − 1) = V_cold/G − T_c``."""
TSYS_DEFINITION = "noise-equivalent V_cold/G = (T_hot - T_c)/(Y - 1)"
LEGACY_T_COLD_K = 2.73
"""Cold-load temperature assumed for a legacy group that does not record ``t_cold_k``."""

#: What a vane-calibrated streaming pass reads for every block (``streaming.read_block``).
BLOCK_READS = (FEEDS, LEVEL1_FEED_INDEX, MJD, FREQUENCY, PIXEL_AZ, PIXEL_EL, SCAN_EDGES, VANE, L1.TOD)


def interpolate_vane_events(event_mjd: np.ndarray, values: np.ndarray, t: float) -> np.ndarray:
    """Linear interpolation in time of per-event arrays at ``t``; the nearest event outside them.

    Parameters
    ----------
    event_mjd : ndarray, shape (E,)
        Mid-time of each vane event, MJD, increasing.
    values : ndarray, shape (E, ...)
        Per-event values (gain in counts/K, Tsys in K, ...).
    t : float
        Time, MJD.

    Returns
    -------
    ndarray, shape (...)
        float64.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(event_mjd)
    if n == 0:
        raise BadCOMAPFile("no vane events to calibrate with")
    if n == 1 or t <= event_mjd[0]:
        return values[0].copy()
    if t >= event_mjd[-1]:
        return values[-1].copy()
    k = int(np.searchsorted(event_mjd, t)) - 1
    w = (t - event_mjd[k]) / (event_mjd[k + 1] - event_mjd[k])
    return (1.0 - w) * values[k] + w * values[k + 1]


def noise_equivalent_tsys(vane_group: Any) -> np.ndarray:
    """The noise-equivalent Tsys ``V_cold/G`` (K) of an open ``level2/vane`` group, shape (E, F, B, C).

    Groups written before the convention was recorded hold the legacy ``V_cold/G − T_c``; their
    ``t_cold_k`` (2.73 K if absent) is added back (docs/level2.md#tsys-conventions).
    """
    tsys = vane_group["system_temperature"][...]
    if vane_group.attrs.get(TSYS_CONVENTION_ATTR) == TSYS_CONVENTION:
        return tsys
    t_cold = float(vane_group.attrs.get("t_cold_k", LEGACY_T_COLD_K))
    return (tsys.astype(np.float64) + t_cold).astype(tsys.dtype)


def read_vane(l2: Any) -> dict[str, np.ndarray]:
    """``level2/vane`` contents of an open level-2 file: ``mjd (E,)``, ``gain (E, F, B, C)`` and the
    noise-equivalent ``tsys (E, F, B, C)`` (:func:`noise_equivalent_tsys`)."""
    if VANE_GAIN not in l2:
        raise BadCOMAPFile(f"level-2 file has no {VANE_GAIN} (run SystemTemperature first)")
    return {"mjd": l2[VANE_MJD][...], "gain": l2[VANE_GAIN][...], "tsys": noise_equivalent_tsys(l2[VANE])}


def vane_calibration(ctx: Any, feed: int, scan: int) -> tuple[np.ndarray, np.ndarray]:
    """Vane gain (counts/K) and noise-equivalent Tsys (K) for ``feed`` during ``scan``, each ``(B, C)``
    float64.

    Interpolated linearly in time between the vane events that bracket the scan's mid-time;
    the nearest event outside them (docs/level2.md#calibration-per-scan). The vane results are read once per
    observation.
    """
    vane = ctx.cached("vane", read_vane)
    ifeed = ctx.ifeed(feed)
    start, stop = ctx.scans[scan]
    t = 0.5 * (ctx.mjd[start] + ctx.mjd[stop - 1])
    return (
        interpolate_vane_events(vane["mjd"], vane["gain"][:, ifeed], t),
        interpolate_vane_events(vane["mjd"], vane["tsys"][:, ifeed], t),
    )
