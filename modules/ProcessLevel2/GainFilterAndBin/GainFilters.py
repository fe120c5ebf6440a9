"""The gain filters under their configurable dotted path (``gain_filter_name``); they live in
:mod:`utils.gain_filters` so that other stages can use them without importing ProcessLevel2."""

from utils.gain_filters import (
    BUILTIN_FILTERS,
    GainEstimate,
    GainFilter,
    GainFilterBase,
    GainFilterWithPrior,
    red_significance,
)

__all__ = [
    "BUILTIN_FILTERS",
    "GainEstimate",
    "GainFilter",
    "GainFilterBase",
    "GainFilterWithPrior",
    "red_significance",
]
