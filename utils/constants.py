"""Physical constants, the OVRO site, feature codes and format constants.

Nothing here is a dimension of a particular file: the number of feeds, bands, channels and the
sample rate always come from the file being read (docs/formats/level1.md#dimensions). The values below are
conventions that every file shares.
"""

from __future__ import annotations

import re

# --- physics (exact SI values) ---------------------------------------------------------------
SPEED_OF_LIGHT_M_S: float = 299_792_458.0
BOLTZMANN_J_K: float = 1.380649e-23
PLANCK_J_S: float = 6.62607015e-34
JY_W_M2_HZ: float = 1.0e-26
T_CMB_K: float = 2.725
ZERO_CELSIUS_K: float = 273.15

# --- site (observed az/el are referred to this location) --------------------------------------
OVRO_LON_DEG: float = -118.2822222
OVRO_LAT_DEG: float = 37.2338889
OVRO_HEIGHT_M: float = 1222.0

# --- feeds and bands ----------------------------------------------------------------------------
GROUND_FEED: int = 20
"""The capped ground feed: present in real files, never carries sky signal, always skipped."""
DEFAULT_SCIENCE_FEEDS: tuple[int, ...] = tuple(range(1, 20))
"""Fallback only, when a file or DB row does not say which feeds it has
(docs/acquisition.md#observerflags)."""
MIN_FEED: int = 1
MAX_FEED: int = 20
BAND_EDGES_GHZ: tuple[tuple[float, float], ...] = ((26.0, 28.0), (28.0, 30.0), (30.0, 32.0), (32.0, 34.0))
"""Nominal telescope band ranges (informational; code uses ``spectrometer/frequency``)."""
BAND_NAMES: tuple[str, ...] = ("A:LSB", "A:USB", "B:LSB", "B:USB")
BAND_WIDTH_GHZ: float = 2.0

# --- housekeeping ---------------------------------------------------------------------------------
HK_TIME_OFFSET_S: float = 0.6
"""Housekeeping time stamps run this late relative to spectrometer time
(docs/formats/level1.md#housekeeping-time-alignment)."""

# --- decoded feature codes (docs/formats/level1.md#the-features-bit-word)
# ----------------------------------------------------------------
FEATURE_NONE: int = -1
FEATURE_CES: int = 8
FEATURE_RASTER: int = 9
FEATURE_LISSAJOUS: int = 10
FEATURE_VANE: int = 13
FEATURE_STARE: int = 16

# --- file naming (docs/formats/level1.md#file-naming, docs/formats/level2.md#level-2-file-layout)
# -------------------------------------------------------------------
LEVEL1_NAME_RE = re.compile(r"^comap-(\d{7})-(\d{4}-\d{2}-\d{2})-(\d{6})\.hd5$")
LEVEL2_NAME_RE = re.compile(r"^Level2_comap-(\d{7})-(\d{4}-\d{2}-\d{2})-(\d{6})\.hd5$")
UTC_START_FORMAT: str = "%Y-%m-%d-%H:%M:%S"
LEVEL2_FORMAT_VERSION: int = 1
SUPPORTED_LEVEL2_FORMAT_VERSIONS: tuple[int, ...] = (1,)


def level1_file_name(obsid: int, utc_start: str) -> str:
    """Return the level-1 base name for ``obsid`` starting at ``utc_start`` (``%Y-%m-%d-%H:%M:%S``).

    >>> level1_file_name(60012, "2026-03-01-04:15:00")
    'comap-0060012-2026-03-01-041500.hd5'
    """
    date, time = utc_start[:10], utc_start[11:].replace(":", "")
    return f"comap-{int(obsid):07d}-{date}-{time}.hd5"


def obsid_from_level1_name(name: str) -> int | None:
    """Return the obsid encoded in a level-1 base name, or None if ``name`` is not a level-1 name.

    A level-2 name (``Level2_comap-…``) gives None: a level-1 file that was renamed so is not
    checked against the obsid in its name.

    >>> obsid_from_level1_name("comap-0060012-2026-03-01-041500.hd5")
    60012
    """
    m = LEVEL1_NAME_RE.match(name)
    return int(m.group(1)) if m else None
