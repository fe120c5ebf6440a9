"""Level-2 layout: path building, feed ↔ index helpers and format constants
(docs/formats/level2.md#level-2-file-layout).

Every per-feed level-2 array uses the level-2 feed axis ``spectrometer/feeds`` (science feeds in
level-1 order, without the ground feed). :func:`feed_index` and :func:`feed_number` are the only
converters between a feed number and a position on that axis.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np

from utils import level1_layout as L1
from utils.constants import LEVEL2_FORMAT_VERSION, SUPPORTED_LEVEL2_FORMAT_VERSIONS, UTC_START_FORMAT
from utils.errors import BadCOMAPFile
from utils.layout import DatasetPath, Layout

FORMAT_VERSION = LEVEL2_FORMAT_VERSION
SUPPORTED_FORMAT_VERSIONS = SUPPORTED_LEVEL2_FORMAT_VERSIONS

# Sample-flag bits of level2/sample_flags (docs/formats/level2.md#level-2-file-layout).
FLAG_OUTSIDE_SCAN = 1
FLAG_VANE = 2
FLAG_LEVEL1_NAN = 4
FLAG_POINTING = 8
FLAG_BRIGHT_SOURCE = 16
"""Informational: the sample lies on a masked bright source (docs/level2.md#source-mask). It does
NOT exclude the sample — maps keep it, it is the sky — but noise fits, the destriper's offsets and
the gain filter's estimate give it no (or reduced) weight."""

SAMPLE_FLAGS_EXCLUDE = FLAG_OUTSIDE_SCAN | FLAG_VANE | FLAG_LEVEL1_NAN | FLAG_POINTING
"""The bits that exclude a sample from every reader of binned data (docs/level2.md#sample-flags)."""

DEFAULT_SAVE_DIR_STRUCTURE = "{date:%Y-%m}/{source}/level2/"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


def excluded_samples(flags: Any) -> np.ndarray:
    """True where ``flags`` (uint8 sample flags, any shape) has a bit of :data:`SAMPLE_FLAGS_EXCLUDE`
    (docs/level2.md#sample-flags)."""
    return (np.asarray(flags, dtype=np.uint8) & np.uint8(SAMPLE_FLAGS_EXCLUDE)) != 0


def bright_source_samples(flags: Any) -> np.ndarray:
    """True where ``flags`` has :data:`FLAG_BRIGHT_SOURCE` (docs/level2.md#source-mask)."""
    return (np.asarray(flags, dtype=np.uint8) & np.uint8(FLAG_BRIGHT_SOURCE)) != 0


def read_sample_flags(l2: Any, ifeed: Any = slice(None), samples: Any = slice(None)) -> np.ndarray:
    """``level2/sample_flags[ifeed, samples]`` of an open level-2 file as uint8.

    Raises
    ------
    BadCOMAPFile
        If the file has no sample flags (it was not made by CreateLevel2File).
    """
    if SAMPLE_FLAGS not in l2:
        raise BadCOMAPFile(f"level-2 file has no {SAMPLE_FLAGS} (run CreateLevel2File first)")
    return np.asarray(l2[SAMPLE_FLAGS][ifeed, samples], dtype=np.uint8)


def sanitise(text: str) -> str:
    """Replace every character outside ``[A-Za-z0-9._+-]`` by ``_`` (for path components)."""
    return _SAFE.sub("_", str(text)) or "_"


def level2_name(level1_name: str) -> str:
    """``Level2_<level-1 base name>``."""
    return f"Level2_{Path(level1_name).name}"


def expand_save_dir(
    template: str, *, utc_start: str, source: str, source_group: str | None, obsid: int
) -> str:
    """Expand ``{date:<strftime>}``, ``{source}``, ``{source_group}`` and ``{obsid}`` in ``template``.

    Raises
    ------
    ValueError
        For an unknown placeholder or an unparseable ``utc_start``.
    """
    date = _dt.datetime.strptime(utc_start, UTC_START_FORMAT) if utc_start else None

    def repl(m: re.Match) -> str:
        name, fmt = m.group(1), m.group(2)
        if name == "date":
            if date is None:
                raise ValueError("{date} needs the observation's utc_start")
            return date.strftime(fmt or "%Y-%m-%d")
        if name == "source":
            return sanitise(source or "Unknown")
        if name == "source_group":
            return sanitise(source_group or "Unknown")
        if name == "obsid":
            return format(int(obsid), fmt or "07d")
        raise ValueError(f"unknown placeholder {{{name}}} (known: date, source, source_group, obsid)")

    return _PLACEHOLDER.sub(repl, template)


def validate_save_dir(template: str) -> str | None:
    """None if ``template`` only uses known placeholders, else a message."""
    try:
        expand_save_dir(template, utc_start="2026-01-01-00:00:00", source="S", source_group="G", obsid=1)
    except (ValueError, KeyError) as exc:
        return str(exc)
    return None


def level2_path(
    output_dir: str | Path,
    save_dir_structure: str,
    *,
    level1_path: str,
    utc_start: str,
    source: str,
    source_group: str | None,
    obsid: int,
) -> Path:
    """Absolute final level-2 path of an observation."""
    sub = expand_save_dir(
        save_dir_structure, utc_start=utc_start, source=source, source_group=source_group, obsid=obsid
    )
    return (Path(output_dir) / sub / level2_name(level1_path)).resolve()


def replace_dataset(
    group: Any, name: str, shape: tuple[int, ...], dtype: Any, *, fillvalue: Any = None, chunks: Any = True
) -> Any:
    """(Re)create ``group[name]`` at full size; unwritten regions read as ``fillvalue`` (NaN for
    float "no value" arrays) without using storage."""
    if name in group:
        del group[name]
    kwargs: dict[str, Any] = {"track_times": False}
    if fillvalue is not None:
        kwargs["fillvalue"] = fillvalue
    if chunks is not None and all(int(s) > 0 for s in shape):
        kwargs["chunks"] = chunks
    return group.create_dataset(name, shape=shape, dtype=dtype, **kwargs)


def feeds(l2: Any) -> np.ndarray:
    """Science feed numbers on the level-2 feed axis of an open level-2 file."""
    return np.asarray(l2["spectrometer/feeds"][...], dtype=int)


def feed_index(l2: Any, feed: int) -> int:
    """Position of feed number ``feed`` on the level-2 feed axis.

    Raises
    ------
    KeyError
        If the feed is not in the file.
    """
    f = feeds(l2)
    hits = np.flatnonzero(f == int(feed))
    if hits.size == 0:
        raise KeyError(f"feed {feed} is not in this level-2 file (feeds {f.tolist()})")
    return int(hits[0])


def feed_number(l2: Any, ifeed: int) -> int:
    """Feed number at position ``ifeed`` of the level-2 feed axis."""
    return int(feeds(l2)[int(ifeed)])


def format_version(l2: Any) -> int | None:
    """The root ``level2_format_version`` attribute of an open level-2 file, or None."""
    v = l2.attrs.get("level2_format_version")
    return None if v is None else int(v)


# ------------------------------------------------------------------------------------------------
# The level-2 layout (format version 1): every dataset a stage, reader, the report or the simulator
# touches is named here once. Axis letters: utils.layout.AXIS_NAMES.
# ------------------------------------------------------------------------------------------------

LEVEL2 = Layout("level2", "Level-2 file layout")
_r = LEVEL2.register


def _d(path: str, axes: str, dtype: str, unit: str, description: str) -> DatasetPath:
    """A dataset entry with its axis letters written as one space-separated string."""
    return _r(path, axes=tuple(axes.split()), dtype=dtype, unit=unit, description=description)


#: Attributes of the root group (written by CreateLevel2File and when a file is published).
ROOT_ATTRIBUTES = (
    "obsid",
    "level2_format_version",
    "comap_reduce_version",
    "created_utc",
    "updated_utc",
    "config_sha256",
    "config_toml",
    "level1_path",
    "level1_size_bytes",
    "level1_mtime_utc",
    "hk_time_offset_s",
)
COMAP_ATTRIBUTES = _r("comap", kind="attributes", description="copy of the level-1 /comap attributes")

# spectrometer/: copied or recomputed from level 1 by CreateLevel2File
SPECTROMETER = _r("spectrometer", kind="group", description="axes and pointing copied from level 1")
FEEDS, LEVEL1_FEED_INDEX = LEVEL2.register_many(
    "spectrometer",
    (
        ("feeds", "", "science feed numbers (the level-2 feed axis)"),
        ("level1_feed_index", "", "position of each level-2 feed on the level-1 feed axis"),
    ),
    axes=("F",),
    dtype="int32",
)
MJD, BANDS, FREQUENCY, FEATURES = (
    LEVEL2.adopt(entry) for entry in (L1.MJD, L1.BANDS, L1.FREQUENCY, L1.FEATURES)
)
PIXEL_POINTING = _r("spectrometer/pixel_pointing", kind="group", description="per-feed pointing")
PIXEL_AZ, PIXEL_EL, PIXEL_RA, PIXEL_DEC = LEVEL2.register_many(
    PIXEL_POINTING,
    (
        ("pixel_az", "deg", "azimuth, copied and re-indexed to the level-2 feed axis"),
        ("pixel_el", "deg", "elevation, copied and re-indexed to the level-2 feed axis"),
        (
            "pixel_ra",
            "deg",
            "ICRS right ascension recomputed per sample from az/el (attributes frame, refraction, site)",
        ),
        ("pixel_dec", "deg", "ICRS declination recomputed per sample from az/el"),
    ),
    axes=("F", "N"),
    dtype="float64",
)

# hk/: scaled housekeeping copies (CreateLevel2File)
HK = _r(
    "hk", kind="group", description="housekeeping copied from level 1, scaled, each with a unit attribute"
)
HK_VANE = LEVEL2.adopt(
    L1.HK_VANE, description="vane angle (deg), Tshroud, Tvane, Tambient (degC) and utc (MJD, hk clock)"
)
HK_FRAME, HK_TRACKER = (LEVEL2.adopt(g) for g in (L1.HK_FRAME, L1.HK_TRACKER))
HK_WEATHER = LEVEL2.adopt(
    L1.HK_WEATHER,
    description="airTemperature, dewPointTemp (degC), pressure (hPa), windSpeed (m/s), windDirection (deg)",
)

# level2/: results of the per-observation stages
LEVEL2_GROUP = _r("level2", kind="group", description="results of the per-observation stages")
SAMPLE_FLAGS = _d(
    "level2/sample_flags",
    "F N",
    "uint8",
    "",
    "bits: 1 outside any scan, 2 vane event, 4 level-1 NaN in >10 % of channels, 8 pointing not finite, "
    "16 on a masked bright source (informational)",
)
SCAN_EDGES = _d(
    "level2/scan_edges",
    "S 2",
    "int64",
    "samples",
    "[start, stop) of each scan; attribute scan_mode (ces, raster, lissajous, skydip, stare)",
)

VANE = _r("level2/vane", kind="group", description="vane calibration per event (SystemTemperature)")
VANE_TSYS, VANE_GAIN = LEVEL2.register_many(
    VANE,
    (
        ("system_temperature", "K", "noise-equivalent Tsys V_cold/G per vane event; NaN where invalid"),
        ("gain", "counts/K", "vane gain"),
    ),
    axes=("E", "F", "B", "C"),
    dtype="float32",
)
VANE_EVENT_EDGES = _d(f"{VANE}/event_edges", "E 2", "int64", "samples", "[start, stop) of each event")
VANE_MJD, VANE_T_HOT = LEVEL2.register_many(
    VANE,
    (("mjd", "MJD", "mid-time of each event"), ("t_hot_k", "K", "hot-load temperature")),
    axes=("E",),
    dtype="float64",
)
VANE_N_HOT, VANE_N_COLD = LEVEL2.register_many(
    VANE,
    (("n_hot", "samples", "hot samples used"), ("n_cold", "samples", "cold samples used")),
    axes=("E",),
    dtype="int32",
)

LEVEL1_NOISE_STATS = _r(
    "level1_noise_stats", kind="group", description="white noise of the level-1 TOD (NoiseStatsLevel1)"
)
AUTO_RMS, AUTO_RMS_RAW = LEVEL2.register_many(
    LEVEL1_NOISE_STATS,
    (
        ("auto_rms", "K", "white-noise rms per sample and scan"),
        ("auto_rms_raw", "counts", "the same in raw units"),
    ),
    axes=("F", "B", "C", "S"),
    dtype="float32",
)
N_NAN = _d(f"{LEVEL1_NOISE_STATS}/n_nan", "F B C", "int64", "samples", "NaN count in scans")
N_NAN_SCAN = _d(f"{LEVEL1_NOISE_STATS}/n_nan_scan", "F B C S", "int32", "samples", "NaN count per scan")

ATMOSPHERE = _r(
    "level2/atmosphere", kind="group", description="airmass fit per scan (AtmosphereInObservation)"
)
ATM_OFFSETS, ATM_TAU, ATM_MEDIAN = LEVEL2.register_many(
    ATMOSPHERE,
    (
        ("offsets", "K", "offset term"),
        ("tau", "K", "zenith atmospheric brightness, tau0 * T_atm"),
        ("median_k", "K", "per-scan median power (the gain filter's normalisation)"),
    ),
    axes=("F", "B", "C", "S"),
    dtype="float32",
)
ATM_FITTED = _r(
    f"{ATMOSPHERE}/fitted", axes=("F", "S"), dtype="bool", description="whether the airmass fit was made"
)

BINNED_DATA, BINNED_FILTERED_DATA, BINNED_CLEANED_DATA = LEVEL2.register_many(
    "level2",
    (
        (
            "binned_data",
            "K",
            "calibrated, atmosphere- and median-subtracted, frequency-binned TOD; NaN outside scans",
        ),
        ("binned_filtered_data", "K", "as binned_data, after the gain filter"),
        ("binned_cleaned_data", "K", "cleaned copy of the post-bin-cleaning input"),
    ),
    axes=("F", "B", "K", "N"),
    dtype="float32",
)
CENTRAL_FREQS, BANDWIDTHS = LEVEL2.register_many(
    "level2",
    (
        ("central_freqs", "GHz", "weight-averaged frequency of each bin"),
        ("bandwidths", "GHz", "summed width of the channels used in each bin"),
    ),
    axes=("F", "B", "K"),
    dtype="float64",
)
CHANNEL_MASK = _r(
    "level2/channel_mask", axes=("F", "B", "C"), dtype="bool", description="channel used in at least one scan"
)
BINNING_WEIGHTS = _d(
    "level2/binning_weights", "F B C S", "float32", "K^-2", "channel weights per scan; 0 = masked"
)

GAIN_FILTER = _r("level2/gain_filter", kind="group", description="gain-filter diagnostics (GainFilterAndBin)")
GAIN_FILTER_GAIN, GAIN_FILTER_PRIOR, GAIN_FILTER_Z, GAIN_FILTER_Z_RATIO, GAIN_FILTER_BASELINES = (
    LEVEL2.register_many(
        GAIN_FILTER,
        (
            ("gain", "", "estimated relative gain fluctuation; NaN outside scans"),
            (
                "prior",
                "",
                "(sigma_red, alpha, f_ref [Hz]) of the gain prior; NaN for GainFilterBase",
                {"axes": ("F", "S", "3")},
            ),
            (
                "z",
                "",
                "z = 1ᵀΩ(I−Π)1: the per-sample noise variance of R/z is 1/z",
                {"axes": ("F", "S"), "dtype": "float64"},
            ),
            (
                "z_ratio",
                "",
                "z / sum(omega): how far the gain template is from degenerate with the sky templates",
                {"axes": ("F", "S"), "dtype": "float64"},
            ),
            (
                "baselines",
                "",
                "(sigma_y, sigma_step, sigma_level) of GainFilterDestriped; NaN for the other filters",
                {"axes": ("F", "S", "3")},
            ),
        ),
        axes=("F", "N"),
        dtype="float32",
    )
)

POST_BIN_CLEANING = _r("level2/post_bin_cleaning", kind="group", description="PostBinCleaning diagnostics")
PBC_N_OUTLIERS, PBC_ATMOSPHERE = LEVEL2.register_many(
    POST_BIN_CLEANING,
    (
        ("n_outliers", "samples", "samples excluded from the refit", {"dtype": "int32"}),
        ("atmosphere_k", "K", "refitted airmass coefficient (NaN if not fitted)"),
    ),
    axes=("F", "B", "K", "S"),
    dtype="float32",
)

NOISE_STATS = _r(
    "level2_noise_stats/{dataset}",
    kind="group",
    description="1/f fit per segment of one binned dataset (NoiseStatsLevel2): sigma_white, sigma_red (K), "
    "alpha, fknee_hz (Hz), auto_rms (K), good_fraction, fit_ok; axes (F, B, K, S)",
)
CALIBRATOR_FIT = _r(
    "level2/calibrator_fit",
    kind="group",
    description="Gaussian-beam fit of a calibrator, combined over scans (F, B, K); per_scan/* adds S",
)
SQL_SNAPSHOT = _r(
    "level2/sql_snapshot", kind="group", description="snapshot of the observation's database rows"
)

#: What places each binned-TOD sample on the sky and in a scan: feed axis, time, scans, pointing.
SKY_SAMPLES = (FEEDS, MJD, SCAN_EDGES, PIXEL_POINTING)
