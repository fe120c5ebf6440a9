"""Specification of added sky components and NaN bursts (docs/simulator.md#added-sky-components,
docs/simulator.md#nan-bursts): dataclasses, spectral shapes and one-line validation problems.

This module is a leaf (numpy only): :mod:`.spec` embeds the dataclasses in ``SkySpec.components``
and ``ObservationSpec.nan_bursts``; :mod:`.components` and :mod:`.bursts` evaluate them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

COMPONENT_SHAPES: tuple[str, ...] = ("point", "gaussian", "gradient")
COMPONENT_SPECTRA: tuple[str, ...] = ("power", "logparabola")
COMPONENT_FRAMES: tuple[str, ...] = ("galactic", "icrs")
COMPONENT_UNITS: tuple[str, ...] = ("K", "Jy")
N_BANDS_MAX: int = 4


@dataclass
class SkyComponent:
    """One added sky component (docs/simulator.md#added-sky-components).

    The brightness (or flux density) is ``amplitude · f(ν)`` with ``f(nu0_ghz) = 1``; ``f`` is
    :func:`spectral_shape`. Positions are ``(lon_deg, lat_deg)`` in ``frame``; with ``offset``
    they are tangent-plane offsets (deg) from the observation's pointing target along that frame's
    longitude and latitude axes.
    """

    shape: str = "point"
    """``point`` (beam only), ``gaussian`` (intrinsic ``fwhm_arcmin``, convolved with the beam) or
    ``gradient`` (a brightness plane filling the scan)."""
    spectrum: str = "power"
    """``power``: ``(ν/ν0)^index``; ``logparabola``: Gaussian in ln ν peaking at ``nu_peak_ghz``."""
    amplitude: float = 1.0
    """Value at ``nu0_ghz`` in ``unit``: K_RJ or Jy (see docs/simulator.md#added-sky-components)."""
    unit: str = "K"
    """``K``: brightness temperature (point: beam-convolved peak; gaussian: intrinsic peak;
    gradient: value at the position). ``Jy``: flux density (point and gaussian only)."""
    nu0_ghz: float = 30.0
    """Reference frequency of ``amplitude``, GHz."""
    index: float = -2.1
    """Power-law index of the quantity given by ``unit`` (``power`` spectrum)."""
    nu_peak_ghz: float = 28.0
    width: float = 0.35
    """Log-parabola peak frequency (GHz) and width in ln ν (``logparabola`` spectrum)."""
    frame: str = "galactic"
    offset: bool = True
    lon_deg: float = 0.0
    lat_deg: float = 0.0
    fwhm_arcmin: float = 10.0
    """Intrinsic FWHM of a ``gaussian`` component, arcmin."""
    gradient_k_per_deg: float = 0.0
    angle_deg: float = 0.0
    """``gradient``: slope (K/deg at ``nu0_ghz``) and its direction, from +lon towards +lat, deg."""
    name: str = ""
    """Label recorded in ``/truth/components``."""


@dataclass
class NaNBurst:
    """A span of samples in which a fraction of the channels of some feeds are NaN
    (docs/simulator.md#nan-bursts)."""

    duration_s: float = 2.0
    start_s: float = 0.0
    """Start, s after the first scan sample; with ``at_component``/``at_source`` the shift of the
    burst centre from the crossing time."""
    at_component: int | None = None
    """Centre the burst on a crossing of this component (index into ``sky.components``)."""
    at_source: bool = False
    """Centre the burst on a crossing of the calibrator of the sky model."""
    crossing: int = 0
    """Which crossing (0 = first, −1 = last), of the burst's first feed."""
    feeds: list[int] = field(default_factory=list)
    """Feeds affected (feed numbers); empty = every science feed."""
    fraction: float = 1.0
    """Fraction of the channels of each affected band set to NaN (channels drawn from the seed)."""
    bands: list[int] = field(default_factory=list)
    """Affected band indices (storage order 0–3); empty = all bands."""


# --------------------------------------------------------------------------------------------------
# Spectral shapes
# --------------------------------------------------------------------------------------------------
def spectral_shape(component: SkyComponent, freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """``f(ν)`` of docs/simulator.md#spectra, normalised to 1 at ``nu0_ghz``; same shape as ``freq_ghz``.

    ``power``: ``f = (ν/ν0)^index``. ``logparabola``:
    ``ln f = −[ln²(ν/ν_peak) − ln²(ν0/ν_peak)] / (2 w²)``.
    """
    nu = np.asarray(freq_ghz, dtype=np.float64)
    if component.spectrum == "power":
        return (nu / component.nu0_ghz) ** component.index
    if component.spectrum == "logparabola":
        x = np.log(nu / component.nu_peak_ghz)
        x0 = math.log(component.nu0_ghz / component.nu_peak_ghz)
        return np.exp(-(x**2 - x0**2) / (2.0 * component.width**2))
    raise ValueError(f"unknown spectrum {component.spectrum!r}")


# --------------------------------------------------------------------------------------------------
# Validation (one line per problem)
# --------------------------------------------------------------------------------------------------
def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def component_problems(components: Sequence[SkyComponent], *, has_target: bool) -> list[str]:
    """Problems of the components list; ``has_target`` is False when offsets cannot be resolved."""
    out: list[str] = []
    for i, c in enumerate(components):
        where = f"sky.components[{i}]"
        if c.shape not in COMPONENT_SHAPES:
            out.append(f"{where}: unknown shape {c.shape!r}; expected one of {', '.join(COMPONENT_SHAPES)}")
        if c.spectrum not in COMPONENT_SPECTRA:
            out.append(
                f"{where}: unknown spectrum {c.spectrum!r}; expected one of {', '.join(COMPONENT_SPECTRA)}"
            )
        if c.frame not in COMPONENT_FRAMES:
            out.append(f"{where}: unknown frame {c.frame!r}; expected one of {', '.join(COMPONENT_FRAMES)}")
        if c.unit not in COMPONENT_UNITS:
            out.append(f"{where}: unknown unit {c.unit!r}; expected one of {', '.join(COMPONENT_UNITS)}")
        elif c.unit == "Jy" and c.shape == "gradient":
            out.append(f"{where}: a gradient has no flux density; give its amplitude in K")
        for name in ("amplitude", "index", "lon_deg", "lat_deg", "gradient_k_per_deg", "angle_deg"):
            if not _finite(getattr(c, name)):
                out.append(f"{where}: {name} must be finite, got {getattr(c, name)!r}")
        for name in ("nu0_ghz", "nu_peak_ghz", "width"):
            if not (_finite(getattr(c, name)) and getattr(c, name) > 0):
                out.append(f"{where}: {name} must be > 0, got {getattr(c, name)!r}")
        if c.shape == "gaussian" and not (_finite(c.fwhm_arcmin) and c.fwhm_arcmin > 0):
            out.append(f"{where}: fwhm_arcmin must be > 0 for a gaussian, got {c.fwhm_arcmin!r}")
        if not c.offset and _finite(c.lat_deg) and abs(c.lat_deg) > 90.0:
            out.append(f"{where}: lat_deg must lie in [-90, 90], got {c.lat_deg}")
        if (
            c.offset
            and _finite(c.lon_deg)
            and _finite(c.lat_deg)
            and math.hypot(c.lon_deg, c.lat_deg) >= 45.0
        ):
            out.append(
                f"{where}: offsets must stay below 45 deg from the target, got ({c.lon_deg}, {c.lat_deg})"
            )
        if c.offset and not has_target:
            out.append(
                f"{where}: offset positions need a pointing target (a sky dip has none); set offset = false"
            )
    return out


def burst_problems(
    bursts: Sequence[NaNBurst],
    *,
    components: Sequence[SkyComponent],
    feeds: Sequence[int],
    has_calibrator: bool,
) -> list[str]:
    """Problems of the NaN-burst list of an observation with ``feeds`` and ``components``."""
    out: list[str] = []
    for j, b in enumerate(bursts):
        where = f"nan_bursts[{j}]"
        if not (_finite(b.duration_s) and b.duration_s > 0):
            out.append(f"{where}: duration_s must be > 0, got {b.duration_s!r}")
        if not _finite(b.start_s):
            out.append(f"{where}: start_s must be finite, got {b.start_s!r}")
        if not (_finite(b.fraction) and 0.0 < b.fraction <= 1.0):
            out.append(f"{where}: fraction must lie in (0, 1], got {b.fraction!r}")
        unknown = [f for f in b.feeds if int(f) not in [int(x) for x in feeds]]
        if unknown:
            out.append(f"{where}: feeds {unknown} are not observed (feeds = {list(feeds)})")
        if len(set(b.feeds)) != len(b.feeds):
            out.append(f"{where}: feeds must be unique, got {list(b.feeds)}")
        if len(set(b.bands)) != len(b.bands) or any(not 0 <= int(k) < N_BANDS_MAX for k in b.bands):
            out.append(f"{where}: bands must be unique indices 0–{N_BANDS_MAX - 1}, got {list(b.bands)}")
        if b.at_component is not None and b.at_source:
            out.append(f"{where}: give at_component or at_source, not both")
        if b.at_component is not None:
            k = int(b.at_component)
            if not 0 <= k < len(components):
                out.append(f"{where}: at_component = {k} but the sky has {len(components)} component(s)")
            elif components[k].shape == "gradient":
                out.append(f"{where}: component {k} is a gradient, which has no crossing")
        if b.at_source and not has_calibrator:
            out.append(f"{where}: at_source needs a calibrator sky (taua, casa, cyga, jupiter)")
    return out
