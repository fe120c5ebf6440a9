"""The level-1 file layout (01 §3): dataset and group paths, required attributes, hk scales.

The only place that spells the raw level-1 paths; :class:`utils.level1.Level1File` reads them and
:class:`utils.level1_checks.Level1Checks` validates them.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import FEATURE_CES, FEATURE_LISSAJOUS, FEATURE_RASTER, FEATURE_STARE
from utils.layout import Layout

LEVEL1 = Layout("level1", "Level-1 file layout")
_r = LEVEL1.register

COMAP_ATTRIBUTES = _r("comap", kind="attributes", description="observation metadata (obsid, ...)")
TOD = _r(
    "spectrometer/tod",
    axes=("F1", "B", "C", "N"),
    dtype="float32",
    unit="counts",
    description="raw spectrometer power",
)
MJD = _r("spectrometer/MJD", axes=("N",), dtype="float64", unit="MJD (UTC)", description="sample times")
FEEDS = _r("spectrometer/feeds", axes=("F1",), dtype="int32", description="feed numbers incl. ground feed")
BANDS = _r("spectrometer/bands", axes=("B",), dtype="S8", description="band names")
FREQUENCY = _r(
    "spectrometer/frequency", axes=("B", "C"), dtype="float64", unit="GHz", description="channel centres"
)
FEATURES = _r("spectrometer/features", axes=("N",), dtype="uint32", description="observing-mode feature bits")
POINTING = _r("spectrometer/pixel_pointing", kind="group", description="per-feed pointing")
PIXEL_AZ = _r(f"{POINTING}/pixel_az", axes=("F1", "N"), dtype="float64", unit="deg", description="azimuth")
PIXEL_EL = _r(f"{POINTING}/pixel_el", axes=("F1", "N"), dtype="float64", unit="deg", description="elevation")
POINTING_DATASETS: tuple[str, ...] = tuple(
    f"{POINTING}/{n}"
    for n in ("pixel_az", "pixel_el", "pixel_ra", "pixel_dec", "pixel_xoffset", "pixel_yoffset")
)

VANE_GROUP = _r(
    "hk/antenna0/vane",
    kind="group",
    description="vane angle, Tshroud, Tvane, Tambient (integer, scaled by HK_SCALES) and utc (MJD)",
)
FRAME_GROUP = _r("hk/array/frame", kind="group", description="frame features and utc (MJD)")
WEATHER_GROUP = _r("hk/array/weather", kind="group", optional=True, description="weather station")
TRACKER_GROUP = _r("hk/antenna0/deTracker", kind="group", optional=True, description="lissajous_status, utc")

REQUIRED_HK: dict[str, tuple[str, ...]] = {
    VANE_GROUP: ("angle", "Tshroud", "Tvane", "Tambient", "utc"),
    FRAME_GROUP: ("features", "utc"),
}
OPTIONAL_HK: dict[str, tuple[str, ...]] = {
    WEATHER_GROUP: ("airTemperature", "dewPointTemp", "pressure", "windSpeed", "windDirection", "utc"),
    TRACKER_GROUP: ("lissajous_status", "utc"),
}
"""Optional hk groups; when a group is present, all of its datasets are required."""

REQUIRED_DATASETS: tuple[str, ...] = (
    (TOD, MJD, FEEDS, BANDS, FREQUENCY, FEATURES)
    + POINTING_DATASETS
    + tuple(f"{g}/{d}" for g, names in REQUIRED_HK.items() for d in names)
)
"""Datasets checked by C4, in the order they are checked."""

HK_SCALES: dict[str, float] = {
    f"{VANE_GROUP}/angle": 0.01,
    f"{VANE_GROUP}/Tshroud": 0.01,
    f"{VANE_GROUP}/Tvane": 0.01,
    f"{VANE_GROUP}/Tambient": 0.01,
    f"{WEATHER_GROUP}/airTemperature": 0.01,
    f"{WEATHER_GROUP}/dewPointTemp": 0.01,
    f"{WEATHER_GROUP}/pressure": 0.01,
    f"{WEATHER_GROUP}/windSpeed": 0.01,
    f"{WEATHER_GROUP}/windDirection": 0.01,
}
"""Raw-to-physical scale of the integer hk datasets (01 §3.3): deg, °C, hPa, m/s."""

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
    """Decode feature words: the index of the highest set bit, −1 for ``w <= 0`` (01 §4).

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
