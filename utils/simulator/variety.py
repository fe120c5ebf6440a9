"""Small observations for scan, sky and data-loss variety (docs/simulator.md#variety-presets).

Factories return :class:`ObservationSpec`/:class:`ArchiveSpec` objects that tests and tools can
change; the channel count, feeds and seconds of scan are parameters, so the same case can be run
at 64 channels in a test and at 1024 channels for a study. :func:`sky_free_twin` gives the
observation with the same pointing, vane, noise, gain fluctuations and NaN bursts but no sky.

=================  =========  ================================================================
preset             obsids     observations (TauA on 2026-03-01 unless stated)
=================  =========  ================================================================
cal-raster         91001      raster, HA −1.5 h
cal-lissajous      91002      Lissajous, HA −0.5 h
cal-ces            91003      two CES segments through the source, HA +0.5 h
nan-bursts         91004      raster, HA +1.5 h, added point source, NaN bursts on crossings
field-crossing     91011–12   GField30 CES rising (HA −2.5 h) and setting (HA +2.5 h) with a
                              point source, an AME-like Gaussian and a gradient
variety            all above  one archive with every case
=================  =========  ================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from utils.constants import GROUND_FEED

from .component_spec import NaNBurst, SkyComponent
from .spec import ArchiveSpec, ObservationSpec, ScanSpec, SkySpec

VARIETY_DATE: str = "2026-03-01"
CALIBRATOR_SCANS: dict[str, ScanSpec] = {
    "raster": ScanSpec(kind="raster", duration_s=120.0, n_rows=9, step_arcmin=3.0, half_width_deg=0.3),
    "lissajous": ScanSpec(kind="lissajous", duration_s=120.0, amplitude_deg=0.3),
    "ces": ScanSpec(kind="ces", n_segments=2, segment_s=60.0, throw_deg=0.5, speed_deg_s=0.5),
}
"""Scan of each calibrator case: about 2 minutes of scan within 0.3–0.5 deg of the source."""


def _feeds(feeds: Sequence[int], ground_feed: bool) -> list[int]:
    out = [int(f) for f in feeds if int(f) != GROUND_FEED]
    return [*out, GROUND_FEED] if ground_feed else out


def calibrator_observation(
    scan: str = "raster",
    *,
    obsid: int = 91001,
    calibrator: str = "taua",
    hour_angle_h: float = -1.5,
    n_channels: int = 64,
    feeds: Sequence[int] = (1, 2, 3),
    ground_feed: bool = True,
    scan_s: float | None = None,
    components: Sequence[SkyComponent] = (),
    nan_bursts: Sequence[NaNBurst] = (),
) -> ObservationSpec:
    """A calibrator observed with a ``raster``, ``lissajous`` or ``ces`` scan.

    Parameters
    ----------
    scan : {"raster", "lissajous", "ces"}
        Scan kind; the pattern is :data:`CALIBRATOR_SCANS`.
    obsid, calibrator, hour_angle_h
        Observation id, sky kind (``taua``, ``casa``, ``cyga``, ``jupiter``) and scheduling.
    n_channels : int
        Channels per band.
    feeds : sequence of int
        Science feeds; ``ground_feed`` adds feed 20.
    scan_s : float, optional
        Seconds of scan (per segment for CES); the pattern's default otherwise.
    components, nan_bursts
        Added sky components and NaN bursts.
    """
    if scan not in CALIBRATOR_SCANS:
        raise ValueError(f"unknown calibrator scan {scan!r}; expected one of {', '.join(CALIBRATOR_SCANS)}")
    pattern = dataclasses.replace(CALIBRATOR_SCANS[scan])
    if scan_s is not None:
        if scan == "ces":
            pattern.segment_s = float(scan_s)
        else:
            pattern.duration_s = float(scan_s)
    return ObservationSpec(
        obsid=obsid,
        hour_angle_h=hour_angle_h,
        feeds=_feeds(feeds, ground_feed),
        n_channels=n_channels,
        date=VARIETY_DATE,
        scan=pattern,
        sky=SkySpec(kind=calibrator, components=[dataclasses.replace(c) for c in components]),
        nan_bursts=[dataclasses.replace(b) for b in nan_bursts],
    )


def field_components() -> list[SkyComponent]:
    """One component of each shape and spectrum, placed inside the GField30 CES coverage:

    * a 20 Jy point source with a flat (α = −0.1) flux spectrum at (Δl, Δb) = (+0.12°, +0.06°);
    * a 20′ AME-like Gaussian, log-parabola peaking at 28 GHz with 0.2 K at the peak, at (−0.12°, −0.08°);
    * a free-free-like 12′ Gaussian, β = −2.1, 1 K intrinsic at 30 GHz, at (+0.06°, −0.12°);
    * a synchrotron-like gradient, β = −2.7, 50 mK at the centre rising 50 mK/deg towards +30°.
    """
    return [
        SkyComponent(
            name="point-ff", shape="point", unit="Jy", amplitude=20.0, index=-0.1, lon_deg=0.12, lat_deg=0.06
        ),
        SkyComponent(
            name="ame",
            shape="gaussian",
            spectrum="logparabola",
            amplitude=0.2,
            nu0_ghz=28.0,
            nu_peak_ghz=28.0,
            width=0.35,
            fwhm_arcmin=20.0,
            lon_deg=-0.12,
            lat_deg=-0.08,
        ),
        SkyComponent(
            name="hii-ff",
            shape="gaussian",
            amplitude=1.0,
            index=-2.1,
            fwhm_arcmin=12.0,
            lon_deg=0.06,
            lat_deg=-0.12,
        ),
        SkyComponent(
            name="synchrotron",
            shape="gradient",
            amplitude=0.05,
            index=-2.7,
            gradient_k_per_deg=0.05,
            angle_deg=30.0,
        ),
    ]


def field_observation(
    obsid: int = 91011,
    hour_angle_h: float = -2.5,
    *,
    n_channels: int = 64,
    feeds: Sequence[int] = (1, 2, 3),
    ground_feed: bool = True,
    n_segments: int = 2,
    segment_s: float = 60.0,
    galactic: bool = True,
    components: Sequence[SkyComponent] | None = None,
    nan_bursts: Sequence[NaNBurst] = (),
) -> ObservationSpec:
    """GField30 observed by CES at ``hour_angle_h`` (negative: rising, positive: setting).

    ``galactic=False`` keeps the field's pointing but removes its ridge and HII regions
    (``sky.base_scale = 0``), leaving only ``components`` (default :func:`field_components`).
    """
    comps = field_components() if components is None else [dataclasses.replace(c) for c in components]
    return ObservationSpec(
        obsid=obsid,
        source="GField30",
        hour_angle_h=hour_angle_h,
        feeds=_feeds(feeds, ground_feed),
        n_channels=n_channels,
        date=VARIETY_DATE,
        scan=ScanSpec(kind="ces", n_segments=n_segments, segment_s=segment_s),
        sky=SkySpec(kind="galactic", base_scale=1.0 if galactic else 0.0, components=comps),
        nan_bursts=[dataclasses.replace(b) for b in nan_bursts],
    )


def crossing_bursts() -> list[NaNBurst]:
    """NaN bursts of the ``nan-bursts`` preset: 5 % of feed 1's channels for 2 s on its first
    crossing of the calibrator, 30 % of feeds 1–2 for 3 s on the third, all of band 1 of feed 1
    for 1 s on the last, 100 % of feed 2 for 2 s on its first crossing of the added point source,
    and 30 % of every science feed 10 s after the scan starts, for 1 s."""
    return [
        NaNBurst(at_source=True, crossing=0, duration_s=2.0, feeds=[1], fraction=0.05),
        NaNBurst(at_source=True, crossing=2, duration_s=3.0, feeds=[1, 2], fraction=0.3),
        NaNBurst(at_source=True, crossing=-1, duration_s=1.0, feeds=[1], fraction=1.0, bands=[1]),
        NaNBurst(at_component=0, crossing=0, duration_s=2.0, feeds=[2], fraction=1.0),
        NaNBurst(start_s=10.0, duration_s=1.0, fraction=0.3),
    ]


def nan_burst_observation(*, obsid: int = 91004, n_channels: int = 64, **kwargs) -> ObservationSpec:
    """A TauA raster with a 5 Jy point source 10′ north of it and :func:`crossing_bursts`."""
    point = SkyComponent(
        name="point", shape="point", unit="Jy", amplitude=5.0, index=-0.7, frame="icrs", lat_deg=10.0 / 60.0
    )
    kwargs.setdefault("hour_angle_h", 1.5)
    return calibrator_observation(
        "raster",
        obsid=obsid,
        n_channels=n_channels,
        components=[point],
        nan_bursts=crossing_bursts(),
        **kwargs,
    )


def scaled_sky(spec: ObservationSpec, factor: float) -> ObservationSpec:
    """Copy of ``spec`` whose sky emission is ``factor`` times that of ``spec``: the Galactic base sky
    (``base_scale``) and every component's amplitude and gradient (docs/simulator.md#noise-twins).
    Pointing, vane placement, noise, gain fluctuations and NaN bursts are those of ``spec``."""
    f = float(factor)
    comps = [
        dataclasses.replace(c, amplitude=c.amplitude * f, gradient_k_per_deg=c.gradient_k_per_deg * f)
        for c in spec.sky.components
    ]
    return spec.replace(sky={"base_scale": spec.sky.base_scale * f, "components": comps})


def sky_free_twin(spec: ObservationSpec) -> ObservationSpec:
    """Copy of ``spec`` without sky emission (:func:`scaled_sky` with factor 0)."""
    return scaled_sky(spec, 0.0)


# --------------------------------------------------------------------------------------------------
# Archives (registered in PRESETS with their defaults)
# --------------------------------------------------------------------------------------------------
def preset_cal_raster(n_channels: int = 64) -> ArchiveSpec:
    return ArchiveSpec("cal-raster", [calibrator_observation("raster", obsid=91001, n_channels=n_channels)])


def preset_cal_lissajous(n_channels: int = 64) -> ArchiveSpec:
    obs = calibrator_observation("lissajous", obsid=91002, hour_angle_h=-0.5, n_channels=n_channels)
    return ArchiveSpec("cal-lissajous", [obs])


def preset_cal_ces(n_channels: int = 64) -> ArchiveSpec:
    obs = calibrator_observation("ces", obsid=91003, hour_angle_h=0.5, n_channels=n_channels)
    return ArchiveSpec("cal-ces", [obs])


def preset_nan_bursts(n_channels: int = 64) -> ArchiveSpec:
    return ArchiveSpec("nan-bursts", [nan_burst_observation(n_channels=n_channels)])


def preset_field_crossing(n_channels: int = 64, galactic: bool = True) -> ArchiveSpec:
    return ArchiveSpec(
        "field-crossing",
        [
            field_observation(91011, -2.5, n_channels=n_channels, galactic=galactic),
            field_observation(91012, +2.5, n_channels=n_channels, galactic=galactic),
        ],
    )


def preset_variety(n_channels: int = 64) -> ArchiveSpec:
    obs = [
        *preset_cal_raster(n_channels).observations,
        *preset_cal_lissajous(n_channels).observations,
        *preset_cal_ces(n_channels).observations,
        *preset_nan_bursts(n_channels).observations,
        *preset_field_crossing(n_channels).observations,
    ]
    return ArchiveSpec("variety", obs)


VARIETY_PRESETS = {
    "cal-raster": preset_cal_raster,
    "cal-lissajous": preset_cal_lissajous,
    "cal-ces": preset_cal_ces,
    "nan-bursts": preset_nan_bursts,
    "field-crossing": preset_field_crossing,
    "variety": preset_variety,
}
"""Name → factory taking ``n_channels`` (and, for ``field-crossing``, ``galactic``)."""
