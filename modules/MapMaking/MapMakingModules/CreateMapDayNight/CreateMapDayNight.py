"""CreateMapDayNight: CreateMap split by the Sun's altitude at each scan's mid-time
(docs/mapmaking.md#createmap-and-its-variants)."""

from __future__ import annotations

from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap


class CreateMapDayNight(CreateMap):
    """CreateMap split into day and night maps (``_day``, ``_night``) by the Sun's altitude.

    ``split_mode='day_night'`` is the default: each scan goes by the Sun's altitude at its mid-time
    relative to ``sun_elevation_threshold_deg``.

    Parameters are those of CreateMap.
    """

    default_split_mode = "day_night"
