"""CreateMapPerFeed: CreateMap with one map per feed (docs/mapmaking.md#createmap-and-its-variants)."""

from __future__ import annotations

from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap


class CreateMapPerFeed(CreateMap):
    """CreateMap with one map per feed (``_feedNN``): ``split_mode='per_feed'`` is the default.

    Parameters are those of CreateMap.
    """

    default_split_mode = "per_feed"
