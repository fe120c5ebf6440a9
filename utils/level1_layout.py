"""The level-1 file layout (docs/formats/level1.md#layout): dataset and group paths, required attributes, hk
scales.

The only place that spells the raw level-1 paths (the ``LEVEL1`` registry):
:class:`utils.level1.Level1File` reads them, :class:`utils.level1_checks.Level1Checks` validates
them, and stages name them in their ``reads`` (a level-1 entry is always provided by the level-1
file, so the config loader's chain check follows only level-2 entries).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import FEATURE_CES, FEATURE_LISSAJOUS, FEATURE_RASTER, FEATURE_STARE
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
PIXEL_AZ, PIXEL_EL, PIXEL_RA, PIXEL_DEC = LEVEL1.register_many(
    PIXEL_POINTING,
    (
        ("pixel_az", "deg", "azimuth of each feed's beam centre"),
        ("pixel_el", "deg", "elevation of each feed's beam centre, no refraction correction"),
        ("pixel_ra", "deg", "ICRS right ascension (informational; recomputed by the pipeline)"),
        ("pixel_dec", "deg", "ICRS declination (informational)"),
    ),
    axes=("F1", "N"),
    dtype="float64",
)
POINTING_DATASETS: tuple[str, ...] = tuple(
    f"{PIXEL_POINTING}/{n}"
    for n in ("pixel_az", "pixel_el", "pixel_ra", "pixel_dec", "pixel_xoffset", "pixel_yoffset")
)

# hk/ — housekeeping, each group on its own clock
HK_VANE = _r(
    "hk/antenna0/vane",
    kind="group",
    description="vane angle (0.01 deg), Tshroud, Tvane, Tambient (0.01 degC) and utc (MJD)",
)
HK_VANE_ANGLE = _r(f"{HK_VANE}/angle", axes=("H",), dtype="int32", unit="0.01 deg", description="vane angle")
HK_VANE_TSHROUD = _r(
    f"{HK_VANE}/Tshroud",
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
    f"{HK_TRACKER}/lissajous_status",
    axes=("H",),
    dtype="int32",
    optional=True,
    description="1 while a Lissajous pattern is executing",
)

REQUIRED_HK: dict[str, tuple[str, ...]] = {
    HK_VANE: ("angle", "Tshroud", "Tvane", "Tambient", "utc"),
    HK_FRAME: ("features", "utc"),
}
OPTIONAL_HK: dict[str, tuple[str, ...]] = {
    HK_WEATHER: ("airTemperature", "dewPointTemp", "pressure", "windSpeed", "windDirection", "utc"),
    HK_TRACKER: ("lissajous_status", "utc"),
}
"""Optional hk groups; when a group is present, all of its datasets are required."""

REQUIRED_DATASETS: tuple[str, ...] = (
    (TOD, MJD, FEEDS, BANDS, FREQUENCY, FEATURES)
    + POINTING_DATASETS
    + tuple(f"{g}/{d}" for g, names in REQUIRED_HK.items() for d in names)
)
"""Datasets checked by C4, in the order they are checked."""

HK_SCALES: dict[str, float] = {
    f"{HK_VANE}/angle": 0.01,
    f"{HK_VANE}/Tshroud": 0.01,
    f"{HK_VANE}/Tvane": 0.01,
    f"{HK_VANE}/Tambient": 0.01,
    f"{HK_WEATHER}/airTemperature": 0.01,
    f"{HK_WEATHER}/dewPointTemp": 0.01,
    f"{HK_WEATHER}/pressure": 0.01,
    f"{HK_WEATHER}/windSpeed": 0.01,
    f"{HK_WEATHER}/windDirection": 0.01,
}
"""Raw-to-physical scale of the integer hk datasets (docs/formats/level1.md#hk): deg, °C, hPa, m/s."""

REQUIRED_COMAP_ATTRS: tuple[str, ...] = ("obsid", "source", "comment", "utc_start")
KNOWN_COMAP_ATTRS: frozenset[str] = frozenset(REQUIRED_COMAP_ATTRS) | {
    "level", "nchan", "tsamp", "features", "telescope", "instrument", "platform", "version", "bof",
    "pixels", "bw", "nbit", "nint", "fft_shift", "coeff_iq", "iqcalid",
}  # fmt: skip

SCAN_FEATURE_CODES: tuple[int, ...] = (FEATURE_CES, FEATURE_RASTER, FEATURE_LISSAJOUS, FEATURE_STARE)
"""Decoded feature values that mark scanning (used only to classify pointing NaNs in warnings)."""

FREQ_MIN_GHZ = 20.0
FREQ_MAX_GHZ = 40.0
TSAMP_TOLERANCE = 0.01
GAP_FACTOR = 1.5

SECONDS_PER_DAY = 86400.0


def decode_features(words: ArrayLike) -> NDArray[np.int16]:
    """Decode feature words: the index of the highest set bit, −1 for ``w <= 0``
    (docs/formats/level1.md#the-features-bit-word).

    Parameters
    ----------
    words : array_like of int, any shape
        Feature words (any integer dtype; signed negative values decode to −1).

    Returns
    -------
    ndarray of int16, same shape as ``words``
        ``w.bit_length() - 1`` for ``w > 0``, else −1. Lower set bits are ignored.

    Examples
    --------
    >>> decode_features([8192, 256, 8192 | 256, 0, 1]).tolist()
    [13, 8, 13, -1, 0]
    """
    w = np.asarray(words)
    if w.dtype == np.bool_:
        w = w.astype(np.uint8)
    if w.dtype.kind not in "iu":
        if w.size == 0 and w.dtype.kind == "f":  # np.asarray([]) is float64
            w = w.astype(np.int64)
        else:
            raise TypeError(f"feature words must be integers, got dtype {w.dtype}")
    out = np.full(w.shape, -1, dtype=np.int16)
    positive = w > 0
    if not positive.any():
        return out
    x = w[positive].astype(np.uint64)
    bits = np.zeros(x.shape, dtype=np.int16)
    for shift in (32, 16, 8, 4, 2, 1):  # exact binary search for the highest set bit
        high = x >= (np.uint64(1) << np.uint64(shift))
        bits[high] += shift
        x[high] >>= np.uint64(shift)
    out[positive] = bits
    return out
