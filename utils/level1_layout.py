"""Level-1 layout: the level-1 datasets, groups and attributes the pipeline reads.

Stages name these entries in their ``reads``; a level-1 entry is always provided (by the level-1
file), so the config loader's chain check only follows level-2 entries. Axis letters:
:data:`utils.layout.AXIS_NAMES`. The file format itself is described in 01 §3.
"""

from __future__ import annotations

from utils.layout import Layout

LEVEL1 = Layout("level1", "Level-1 file layout")
_r = LEVEL1.register

COMAP_ATTRIBUTES = _r(
    "comap", kind="attributes", description="observation attributes (obsid, source, utc_start, ...)"
)

# spectrometer/
TOD = _r(
    "spectrometer/tod",
    axes=("F1", "B", "C", "N"),
    dtype="float32",
    unit="counts",
    description="raw total power per feed, band, channel and sample; NaN marks a dropped value",
)
MJD = _r("spectrometer/MJD", axes=("N",), dtype="float64", unit="MJD (UTC)", description="sample times")
FEEDS = _r(
    "spectrometer/feeds", axes=("F1",), dtype="int32", description="feed number at each feed-axis position"
)
BANDS = _r("spectrometer/bands", axes=("B",), dtype="S8", description="band names")
FREQUENCY = _r(
    "spectrometer/frequency",
    axes=("B", "C"),
    dtype="float64",
    unit="GHz",
    description="channel centres, storage order (bands 0 and 2 descending)",
)
FEATURES = _r("spectrometer/features", axes=("N",), dtype="uint32", description="observing-mode feature bits")
PIXEL_POINTING = _r("spectrometer/pixel_pointing", kind="group", description="per-feed pointing")
PIXEL_AZ = _r(
    "spectrometer/pixel_pointing/pixel_az",
    axes=("F1", "N"),
    dtype="float64",
    unit="deg",
    description="azimuth of each feed's beam centre",
)
PIXEL_EL = _r(
    "spectrometer/pixel_pointing/pixel_el",
    axes=("F1", "N"),
    dtype="float64",
    unit="deg",
    description="elevation of each feed's beam centre, no refraction correction",
)
PIXEL_RA = _r(
    "spectrometer/pixel_pointing/pixel_ra",
    axes=("F1", "N"),
    dtype="float64",
    unit="deg",
    description="ICRS right ascension (informational; recomputed by the pipeline)",
)
PIXEL_DEC = _r(
    "spectrometer/pixel_pointing/pixel_dec",
    axes=("F1", "N"),
    dtype="float64",
    unit="deg",
    description="ICRS declination (informational)",
)

# hk/ — housekeeping, each group on its own clock
HK_VANE = _r(
    "hk/antenna0/vane",
    kind="group",
    description="vane angle (0.01 deg), Tshroud, Tvane, Tambient (0.01 degC) and utc (MJD)",
)
HK_VANE_ANGLE = _r(
    "hk/antenna0/vane/angle", axes=("H",), dtype="int32", unit="0.01 deg", description="vane angle"
)
HK_VANE_TSHROUD = _r(
    "hk/antenna0/vane/Tshroud",
    axes=("H",),
    dtype="int32",
    unit="0.01 degC",
    description="temperature of the vane absorber (the hot load)",
)
HK_FRAME = _r("hk/array/frame", kind="group", description="feature word and utc on the housekeeping clock")
HK_WEATHER = _r("hk/array/weather", kind="group", optional=True, description="weather station housekeeping")
HK_TRACKER = _r(
    "hk/antenna0/deTracker",
    kind="group",
    optional=True,
    description="tracker housekeeping; absent if the observation is not a Lissajous",
)
HK_TRACKER_STATUS = _r(
    "hk/antenna0/deTracker/lissajous_status",
    axes=("H",),
    dtype="int32",
    optional=True,
    description="1 while a Lissajous pattern is executing",
)
