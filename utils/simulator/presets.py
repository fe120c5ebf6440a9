"""Archive presets (docs/simulator.md#presets-and-sizes).

=============  ==============  ==========  ========================================================
preset         feeds           channels    observations (obsids)
=============  ==============  ==========  ========================================================
test-tiny      1, 2 (+20)      16          GField30 CES 1×60 s, HA −1.5 h (90001)
test-small     1, 2, 3 (+20)   32          TauA Lissajous 150 s (90101), sky dip (90102),
                                           GField30 CES 2×60 s (90103)
demo           1, 2, 3 (+20)   128         TauA ×2 (60001–2), sky dip (60003), GField30 ×4 (60004–7)
rrl-fullres    1 (+20)         1024        raster on GField30 HII region 1, HA 0 h (80001)
bench-full     1–19 (+20)      1024        GField30 CES 1×300 s, HA −1.5 h (70001)
=============  ==============  ==========  ========================================================

The variety presets (``cal-raster``, ``cal-lissajous``, ``cal-ces``, ``nan-bursts``,
``field-crossing``, ``variety``; 3 science feeds, 64 channels) are built by :mod:`.variety`, whose
factories take the channel count.

All presets observe on 2026-03-01. Obsids are in time order within a preset, and sky dips are
followed by an observation with vane events (obsid + 1), as the pipeline's borrowing rule expects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from utils.constants import GROUND_FEED

from .spec import ArchiveSpec, ObservationSpec, ScanSpec, SkySpec
from .variety import VARIETY_PRESETS

DEFAULT_DATE: str = "2026-03-01"


def _taua(obsid: int, ha: float, feeds, n_ch: int) -> ObservationSpec:
    return ObservationSpec(
        obsid=obsid,
        source="TauA",
        hour_angle_h=ha,
        feeds=list(feeds),
        n_channels=n_ch,
        date=DEFAULT_DATE,
        scan=ScanSpec(kind="lissajous"),
        sky=SkySpec(kind="taua"),
    )


def _gfield(obsid: int, ha: float, feeds, n_ch: int, n_segments: int, segment_s: float) -> ObservationSpec:
    return ObservationSpec(
        obsid=obsid,
        source="GField30",
        hour_angle_h=ha,
        feeds=list(feeds),
        n_channels=n_ch,
        date=DEFAULT_DATE,
        scan=ScanSpec(kind="ces", n_segments=n_segments, segment_s=segment_s),
        sky=SkySpec(kind="galactic"),
    )


def _skydip(obsid: int, start_utc: str, feeds, n_ch: int) -> ObservationSpec:
    return ObservationSpec(
        obsid=obsid,
        source="SkyDip",
        comment="sky nod",
        start_utc=start_utc,
        feeds=list(feeds),
        n_channels=n_ch,
        date=DEFAULT_DATE,
        scan=ScanSpec(kind="skydip"),
        sky=SkySpec(kind="none"),
    )


def preset_test_tiny() -> ArchiveSpec:
    feeds = [1, 2, GROUND_FEED]
    return ArchiveSpec("test-tiny", [_gfield(90001, -1.5, feeds, 16, 1, 60.0)])


def preset_test_small() -> ArchiveSpec:
    feeds = [1, 2, 3, GROUND_FEED]
    return ArchiveSpec(
        "test-small",
        [
            _taua(90101, -1.0, feeds, 32),
            _skydip(90102, f"{DEFAULT_DATE}T13:00:00", feeds, 32),
            _gfield(90103, -1.5, feeds, 32, 2, 60.0),
        ],
    )


def preset_demo() -> ArchiveSpec:
    feeds = [1, 2, 3, GROUND_FEED]
    n_ch = 128
    return ArchiveSpec(
        "demo",
        [
            _taua(60001, -1.0, feeds, n_ch),
            _taua(60002, +1.0, feeds, n_ch),
            _skydip(60003, f"{DEFAULT_DATE}T13:00:00", feeds, n_ch),
            _gfield(60004, -2.5, feeds, n_ch, 2, 120.0),
            _gfield(60005, -1.5, feeds, n_ch, 2, 120.0),
            _gfield(60006, +1.5, feeds, n_ch, 2, 120.0),
            _gfield(60007, +2.5, feeds, n_ch, 2, 120.0),
        ],
    )


def preset_rrl_fullres() -> ArchiveSpec:
    obs = ObservationSpec(
        obsid=80001,
        source="GField30",
        hour_angle_h=0.0,
        feeds=[1, GROUND_FEED],
        n_channels=1024,
        date=DEFAULT_DATE,
        scan=ScanSpec(
            kind="raster", duration_s=240.0, n_rows=13, step_arcmin=1.0, half_width_deg=0.1, speed_deg_s=0.1
        ),
        sky=SkySpec(kind="galactic"),
    )
    return ArchiveSpec("rrl-fullres", [obs])


def preset_bench_full() -> ArchiveSpec:
    feeds = [*range(1, GROUND_FEED), GROUND_FEED]
    return ArchiveSpec("bench-full", [_gfield(70001, -1.5, feeds, 1024, 1, 300.0)])


class _Presets(Mapping[str, ArchiveSpec]):
    """Name → fresh :class:`ArchiveSpec` (a new object on every lookup, safe to modify)."""

    def __init__(self, factories: dict[str, Callable[[], ArchiveSpec]]) -> None:
        self._factories = factories

    def __getitem__(self, name: str) -> ArchiveSpec:
        try:
            return self._factories[name]()
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(self._factories)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)


PRESETS: Mapping[str, ArchiveSpec] = _Presets(
    {
        "test-tiny": preset_test_tiny,
        "test-small": preset_test_small,
        "demo": preset_demo,
        "rrl-fullres": preset_rrl_fullres,
        "bench-full": preset_bench_full,
        **VARIETY_PRESETS,
    }
)
