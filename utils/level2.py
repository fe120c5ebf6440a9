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

from utils.constants import LEVEL2_FORMAT_VERSION, SUPPORTED_LEVEL2_FORMAT_VERSIONS, UTC_START_FORMAT
from utils.layout import Layout

FORMAT_VERSION = LEVEL2_FORMAT_VERSION
SUPPORTED_FORMAT_VERSIONS = SUPPORTED_LEVEL2_FORMAT_VERSIONS

# Sample-flag bits of level2/sample_flags (docs/formats/level2.md#level-2-file-layout).
FLAG_OUTSIDE_SCAN = 1
FLAG_VANE = 2
FLAG_LEVEL1_NAN = 4
FLAG_POINTING = 8

DEFAULT_SAVE_DIR_STRUCTURE = "{date:%Y-%m}/{source}/level2/"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_PLACEHOLDER = re.compile(r"\{([^{}:]+)(?::([^{}]*))?\}")


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

# spectrometer/ — copied or recomputed from level 1 by CreateLevel2File
SPECTROMETER = _r("spectrometer", kind="group", description="axes and pointing copied from level 1")
FEEDS = _r(
    "spectrometer/feeds",
    axes=("F",),
    dtype="int32",
    description="science feed numbers (the level-2 feed axis)",
)
LEVEL1_FEED_INDEX = _r(
    "spectrometer/level1_feed_index",
    axes=("F",),
    dtype="int32",
    description="position of each level-2 feed on the level-1 feed axis",
)
MJD = _r("spectrometer/MJD", axes=("N",), dtype="float64", unit="MJD (UTC)", description="sample times")
BANDS = _r("spectrometer/bands", axes=("B",), dtype="S8", description="band names")
FREQUENCY = _r(
    "spectrometer/frequency",
    axes=("B", "C"),
    dtype="float64",
    unit="GHz",
    description="channel centres, storage order",
)
FEATURES = _r("spectrometer/features", axes=("N",), dtype="uint32", description="observing-mode feature bits")
PIXEL_POINTING = _r("spectrometer/pixel_pointing", kind="group", description="per-feed pointing")
PIXEL_AZ = _r(
    "spectrometer/pixel_pointing/pixel_az",
    axes=("F", "N"),
    dtype="float64",
    unit="deg",
    description="azimuth, copied and re-indexed to the level-2 feed axis",
)
PIXEL_EL = _r(
    "spectrometer/pixel_pointing/pixel_el",
    axes=("F", "N"),
    dtype="float64",
    unit="deg",
    description="elevation, copied and re-indexed to the level-2 feed axis",
)
PIXEL_RA = _r(
    "spectrometer/pixel_pointing/pixel_ra",
    axes=("F", "N"),
    dtype="float64",
    unit="deg",
    description="ICRS right ascension recomputed per sample from az/el (attributes frame, refraction, site)",
)
PIXEL_DEC = _r(
    "spectrometer/pixel_pointing/pixel_dec",
    axes=("F", "N"),
    dtype="float64",
    unit="deg",
    description="ICRS declination recomputed per sample from az/el",
)

# hk/ — scaled housekeeping copies (CreateLevel2File)
HK = _r(
    "hk", kind="group", description="housekeeping copied from level 1, scaled, each with a unit attribute"
)
HK_VANE = _r(
    "hk/antenna0/vane",
    kind="group",
    description="vane angle (deg), Tshroud, Tvane, Tambient (degC) and utc (MJD, housekeeping clock)",
)
HK_FRAME = _r("hk/array/frame", kind="group", description="frame features and utc (MJD)")
HK_WEATHER = _r(
    "hk/array/weather",
    kind="group",
    optional=True,
    description="airTemperature, dewPointTemp (degC), pressure (hPa), windSpeed (m/s), "
    "windDirection (deg), utc",
)
HK_TRACKER = _r(
    "hk/antenna0/deTracker", kind="group", optional=True, description="lissajous_status and utc (MJD)"
)

# level2/ — results of the per-observation stages
LEVEL2_GROUP = _r("level2", kind="group", description="results of the per-observation stages")
SAMPLE_FLAGS = _r(
    "level2/sample_flags",
    axes=("F", "N"),
    dtype="uint8",
    description="bits: 1 outside any scan, 2 vane event, 4 level-1 NaN in >10 % of channels, "
    "8 pointing not finite",
)
VANE = _r("level2/vane", kind="group", description="vane calibration per event (SystemTemperature)")
VANE_TSYS = _r(
    "level2/vane/system_temperature",
    axes=("E", "F", "B", "C"),
    dtype="float32",
    unit="K",
    description="system temperature per vane event; NaN where invalid",
)
VANE_GAIN = _r(
    "level2/vane/gain", axes=("E", "F", "B", "C"), dtype="float32", unit="counts/K", description="vane gain"
)
VANE_EVENT_EDGES = _r(
    "level2/vane/event_edges",
    axes=("E", "2"),
    dtype="int64",
    unit="samples",
    description="[start, stop) of each vane event",
)
VANE_MJD = _r(
    "level2/vane/mjd", axes=("E",), dtype="float64", unit="MJD", description="mid-time of each event"
)
VANE_T_HOT = _r(
    "level2/vane/t_hot_k", axes=("E",), dtype="float64", unit="K", description="hot-load temperature"
)
VANE_N_HOT = _r(
    "level2/vane/n_hot", axes=("E",), dtype="int32", unit="samples", description="hot samples used"
)
VANE_N_COLD = _r(
    "level2/vane/n_cold", axes=("E",), dtype="int32", unit="samples", description="cold samples used"
)
SCAN_EDGES = _r(
    "level2/scan_edges",
    axes=("S", "2"),
    dtype="int64",
    unit="samples",
    description="[start, stop) of each scan; attribute scan_mode (ces, raster, lissajous, skydip, stare)",
)
LEVEL1_NOISE_STATS = _r(
    "level1_noise_stats", kind="group", description="white noise of the level-1 TOD (NoiseStatsLevel1)"
)
AUTO_RMS = _r(
    "level1_noise_stats/auto_rms",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="K",
    description="white-noise rms per sample and scan",
)
AUTO_RMS_RAW = _r(
    "level1_noise_stats/auto_rms_raw",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="counts",
    description="the same in raw units",
)
N_NAN = _r(
    "level1_noise_stats/n_nan",
    axes=("F", "B", "C"),
    dtype="int64",
    unit="samples",
    description="NaN count in scans",
)
N_NAN_SCAN = _r(
    "level1_noise_stats/n_nan_scan",
    axes=("F", "B", "C", "S"),
    dtype="int32",
    unit="samples",
    description="NaN count per scan",
)
ATMOSPHERE = _r(
    "level2/atmosphere", kind="group", description="airmass fit per scan (AtmosphereInObservation)"
)
ATM_OFFSETS = _r(
    "level2/atmosphere/offsets",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="K",
    description="offset term",
)
ATM_TAU = _r(
    "level2/atmosphere/tau",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="K",
    description="zenith atmospheric brightness, tau0 * T_atm",
)
ATM_FITTED = _r(
    "level2/atmosphere/fitted", axes=("F", "S"), dtype="bool", description="whether the airmass fit was made"
)
ATM_MEDIAN = _r(
    "level2/atmosphere/median_k",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="K",
    description="per-scan median power (the gain filter's normalisation)",
)
BINNED_DATA = _r(
    "level2/binned_data",
    axes=("F", "B", "K", "N"),
    dtype="float32",
    unit="K",
    description="calibrated, atmosphere- and median-subtracted, frequency-binned TOD; NaN outside scans",
)
BINNED_FILTERED_DATA = _r(
    "level2/binned_filtered_data",
    axes=("F", "B", "K", "N"),
    dtype="float32",
    unit="K",
    description="as binned_data, after the gain filter",
)
BINNED_CLEANED_DATA = _r(
    "level2/binned_cleaned_data",
    axes=("F", "B", "K", "N"),
    dtype="float32",
    unit="K",
    description="cleaned copy of the post-bin-cleaning input",
)
CENTRAL_FREQS = _r(
    "level2/central_freqs",
    axes=("F", "B", "K"),
    dtype="float64",
    unit="GHz",
    description="weight-averaged frequency of each bin",
)
BANDWIDTHS = _r(
    "level2/bandwidths",
    axes=("F", "B", "K"),
    dtype="float64",
    unit="GHz",
    description="summed width of the channels used in each bin",
)
CHANNEL_MASK = _r(
    "level2/channel_mask", axes=("F", "B", "C"), dtype="bool", description="channel used in at least one scan"
)
BINNING_WEIGHTS = _r(
    "level2/binning_weights",
    axes=("F", "B", "C", "S"),
    dtype="float32",
    unit="K^-2",
    description="channel weights per scan; 0 = masked",
)
GAIN_FILTER = _r("level2/gain_filter", kind="group", description="gain-filter diagnostics (GainFilterAndBin)")
GAIN_FILTER_GAIN = _r(
    "level2/gain_filter/gain",
    axes=("F", "N"),
    dtype="float32",
    description="estimated relative gain fluctuation; NaN outside scans",
)
GAIN_FILTER_PRIOR = _r(
    "level2/gain_filter/prior",
    axes=("F", "S", "3"),
    dtype="float32",
    description="(sigma_red, alpha, f_ref [Hz]) of the gain prior; NaN for GainFilterBase",
)
GAIN_FILTER_Z = _r(
    "level2/gain_filter/z",
    axes=("F", "S"),
    dtype="float64",
    description="z / sum(omega), the degeneracy of the gain template with the sky model",
)
POST_BIN_CLEANING = _r("level2/post_bin_cleaning", kind="group", description="PostBinCleaning diagnostics")
PBC_N_OUTLIERS = _r(
    "level2/post_bin_cleaning/n_outliers",
    axes=("F", "B", "K", "S"),
    dtype="int32",
    unit="samples",
    description="samples excluded from the refit",
)
PBC_ATMOSPHERE = _r(
    "level2/post_bin_cleaning/atmosphere_k",
    axes=("F", "B", "K", "S"),
    dtype="float32",
    unit="K",
    description="refitted airmass coefficient (NaN if not fitted)",
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
