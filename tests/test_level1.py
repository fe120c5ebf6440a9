"""Tests of ``utils.level1`` (docs/formats/level1.md): validation C1–C13, warnings, accessors, hk alignment,
byte counting.

Every file is built here by an independent level-1 writer (``write_level1``); bad files are mutated
copies of a valid one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable
from datetime import datetime

import h5py
import numpy as np
import pytest

from utils.constants import GROUND_FEED
from utils.errors import BadCOMAPFile, Level1FormatError
from utils.level1 import Level1File, decode_features, runs

OBSID = 60012
UTC_START = "2026-03-01-04:15:00"
NAME = "comap-0060012-2026-03-01-041500.hd5"
FEEDS = (3, GROUND_FEED, 1, 7)  # shuffled, ground feed not last
N_BANDS, N_CHANNELS, N_TOD = 4, 16, 600
DT_S = 0.02
MJD0 = (datetime(2026, 3, 1, 4, 15) - datetime(1858, 11, 17)).total_seconds() / 86400.0
HK_OFFSET_S = 0.6
VANE, FRAME, WEATHER, TRACKER = (
    "hk/antenna0/vane",
    "hk/array/frame",
    "hk/array/weather",
    "hk/antenna0/deTracker",
)
LOGGER = "comap.level1"

SPEC_REQUIRED = [
    "spectrometer/tod",
    "spectrometer/MJD",
    "spectrometer/feeds",
    "spectrometer/bands",
    "spectrometer/frequency",
    "spectrometer/features",
    "spectrometer/pixel_pointing/pixel_az",
    "spectrometer/pixel_pointing/pixel_el",
    "spectrometer/pixel_pointing/pixel_ra",
    "spectrometer/pixel_pointing/pixel_dec",
    "spectrometer/pixel_pointing/pixel_xoffset",
    "spectrometer/pixel_pointing/pixel_yoffset",
    f"{VANE}/angle",
    f"{VANE}/Tshroud",
    f"{VANE}/Tvane",
    f"{VANE}/Tambient",
    f"{VANE}/utc",
    f"{FRAME}/features",
    f"{FRAME}/utc",
]


# --------------------------------------------------------------------------------------------------
# An independent level-1 writer (docs/formats/level1.md#layout)
# --------------------------------------------------------------------------------------------------
def tod_values(feeds, n_bands, n_channels, n_tod) -> np.ndarray:
    """Deterministic TOD: every element distinct, so any mis-indexing shows."""
    f = np.asarray(feeds, dtype=np.float64)[:, None, None, None]
    b = np.arange(n_bands)[None, :, None, None]
    c = np.arange(n_channels)[None, None, :, None]
    t = np.arange(n_tod)[None, None, None, :]
    return (1000.0 * f + 100.0 * b + c + t * 1e-3).astype(np.float32)


def frequencies(n_bands: int, n_channels: int) -> np.ndarray:
    """Band b covers [26 + 2b, 28 + 2b] GHz; centres half a channel in; even bands descending."""
    width = 2.0 / n_channels
    freq = np.empty((n_bands, n_channels))
    for b in range(n_bands):
        row = 26.0 + 2.0 * b + width * (np.arange(n_channels) + 0.5)
        freq[b] = row[::-1] if b % 2 == 0 else row
    return freq


def feature_words(n_tod: int) -> np.ndarray:
    """Vane (8192) at both ends, CES (256) in the middle, slews (0) in between."""
    w = np.zeros(n_tod, dtype=np.uint32)
    i = np.arange(n_tod)
    w[i < n_tod // 6] = 8192
    w[(i >= n_tod // 5) & (i < 4 * n_tod // 5)] = 256
    w[i >= 5 * n_tod // 6] = 8192
    return w


def hk_utc(t0_s: float, rate_hz: float, n: int) -> np.ndarray:
    """hk stamps (MJD) for true times t0_s + k/rate (s after MJD0); stamps run 0.6 s late."""
    t_true = t0_s + np.arange(n) / rate_hz
    return MJD0 + (t_true + HK_OFFSET_S) / 86400.0


def write_level1(
    path,
    *,
    feeds=FEEDS,
    n_bands: int = N_BANDS,
    n_channels: int = N_CHANNELS,
    n_tod: int = N_TOD,
    chunks="default",
    tod_dtype=np.float32,
    strings: str = "vlen",
    fletcher32: bool = False,
    compression=None,
    weather: bool = True,
    tracker: bool = True,
) -> str:
    """Write a valid level-1 file; return its path."""
    path = os.fspath(path)
    n_feeds = len(feeds)

    def s(text: str):
        return np.bytes_(text.encode()) if strings == "fixed" else text

    mjd = MJD0 + np.arange(n_tod) * DT_S / 86400.0
    words = feature_words(n_tod)
    if chunks == "default":
        chunks = (1, 1, min(n_channels, 128), min(1024, n_tod))
    with h5py.File(path, "w") as f:
        c = f.create_group("comap")
        c.attrs["obsid"] = np.int64(OBSID)
        c.attrs["source"] = s("GField30,TauA")
        c.attrs["comment"] = s("")
        c.attrs["utc_start"] = s(UTC_START)
        c.attrs["level"] = 1
        c.attrs["nchan"] = n_channels
        c.attrs["tsamp"] = DT_S
        c.attrs["features"] = int(np.bitwise_or.reduce(words)) if n_tod else 0
        c.attrs["telescope"] = s("COMAP")
        c.attrs["pixels"] = s(",".join(str(x) for x in feeds))
        c.attrs["bw"] = 2.0
        c.attrs["nint"] = 3125

        sp = f.create_group("spectrometer")
        sp.create_dataset(
            "tod",
            data=tod_values(feeds, n_bands, n_channels, n_tod).astype(tod_dtype),
            chunks=chunks,
            fletcher32=fletcher32,
            compression=compression,
        )
        sp["MJD"] = mjd
        sp["feeds"] = np.asarray(feeds, dtype=np.int32)
        sp["bands"] = np.array([b"A:LSB", b"A:USB", b"B:LSB", b"B:USB", b"C:LSB", b"C:USB"][:n_bands], "S8")
        sp["frequency"] = frequencies(n_bands, n_channels)
        sp["features"] = words
        pp = sp.create_group("pixel_pointing")
        t = np.arange(n_tod) * DT_S
        ifeed = np.arange(n_feeds)[:, None]
        pp["pixel_az"] = (120.0 + 5.0 * np.sin(t / 3.0) + 0.01 * ifeed) % 360.0
        pp["pixel_el"] = 45.0 + 0.01 * ifeed + 0.0 * t
        pp["pixel_ra"] = 80.0 + 0.1 * ifeed + 0.001 * t
        pp["pixel_dec"] = 22.0 + 0.1 * ifeed + 0.0 * t
        pp["pixel_xoffset"] = (0.01 * ifeed + 0.0 * t).astype(np.float32)
        pp["pixel_yoffset"] = (-0.01 * ifeed + 0.0 * t).astype(np.float32)

        duration = n_tod * DT_S
        n_v = int(duration * 10) + 20  # 10 Hz, from 1 s before to 1 s after
        v = f.create_group(VANE)
        v["utc"] = hk_utc(-1.0, 10.0, n_v)
        tv = -1.0 + np.arange(n_v) / 10.0
        v["angle"] = np.where((tv < 1.5) | (tv > duration - 1.5), 500, 20000).astype(np.int32)
        v["Tshroud"] = np.full(n_v, 2012, dtype=np.int32)
        v["Tvane"] = np.full(n_v, 1890, dtype=np.int32)
        v["Tambient"] = np.full(n_v, 1500, dtype=np.int32)

        n_fr = int(duration * 10) + 5  # 10 Hz, different start and length
        fr = f.create_group(FRAME)
        fr["utc"] = hk_utc(-0.25, 10.0, n_fr)
        t_fr = -0.25 + np.arange(n_fr) / 10.0
        idx = np.clip(np.round(t_fr / DT_S).astype(int), 0, max(n_tod - 1, 0))
        fr["features"] = words[idx] if n_tod else np.zeros(n_fr, np.uint32)

        if weather:
            n_wx = int(duration) + 3  # 1 Hz
            wx = f.create_group(WEATHER)
            wx["utc"] = hk_utc(-1.0, 1.0, n_wx)
            wx["airTemperature"] = np.full(n_wx, 1234, dtype=np.int32)
            wx["dewPointTemp"] = np.full(n_wx, -250, dtype=np.int32)
            wx["pressure"] = np.full(n_wx, 87654, dtype=np.int32)
            wx["windSpeed"] = np.full(n_wx, 321, dtype=np.int32)
            wx["windDirection"] = np.full(n_wx, 18000, dtype=np.int32)
        if tracker:
            n_trk = int(duration * 5) + 7  # 5 Hz
            trk = f.create_group(TRACKER)
            trk["utc"] = hk_utc(-0.5, 5.0, n_trk)
            trk["lissajous_status"] = np.zeros(n_trk, dtype=np.int32)
    return path


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> str:
    return write_level1(tmp_path_factory.mktemp("l1base") / NAME)


@pytest.fixture
def l1copy(base_file, tmp_path) -> Callable[..., str]:
    """Return a function that copies the valid file (optionally renamed) and applies a mutation."""

    def make(mutate: Callable[[h5py.File], None] | None = None, name: str = NAME) -> str:
        path = os.fspath(tmp_path / name)
        shutil.copyfile(base_file, path)
        if mutate is not None:
            with h5py.File(path, "r+") as f:
                mutate(f)
        return path

    return make


def replace(f: h5py.File, path: str, data, **kwargs) -> None:
    del f[path]
    f.create_dataset(path, data=data, **kwargs)


def edit(path: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> Callable[[h5py.File], None]:
    """Mutation: read dataset ``path``, apply ``fn`` (in place or returning a new array), write back."""

    def mutate(f: h5py.File) -> None:
        a = f[path][...]
        b = fn(a)
        replace(f, path, a if b is None else b)

    return mutate


def set_attr(name: str, value) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        f["comap"].attrs[name] = value

    return mutate


def del_attr(name: str) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        del f["comap"].attrs[name]

    return mutate


def delete(path: str) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        del f[path]

    return mutate


def both(*mutations: Callable[[h5py.File], None]) -> Callable[[h5py.File], None]:
    def mutate(f: h5py.File) -> None:
        for m in mutations:
            m(f)

    return mutate


def _set(a: np.ndarray, index, value) -> np.ndarray:
    a[index] = value
    return a


def _swap_channels(a: np.ndarray) -> np.ndarray:
    a[3, [7, 8]] = a[3, [8, 7]]
    return a


def _overlap_band1(a: np.ndarray) -> np.ndarray:
    a[1] -= 1.0
    return a


FREQ = frequencies(N_BANDS, N_CHANNELS)
_b1 = FREQ[1] - 1.0
_OVERLAP_MSG = (
    f"spectrometer/frequency band 1: range [{_b1.min():.6g}, {_b1.max():.6g}] GHz overlaps band 0 "
    f"[{FREQ[0].min():.6g}, {FREQ[0].max():.6g}] GHz"
)
_N_VANE = int(N_TOD * DT_S * 10) + 20
_C5 = "spectrometer/tod must be 4-D float (feeds, bands, channels, samples),"

# (id, mutation, exact message) — one case for every documented failure of C3–C12
BAD_CASES = [
    # C3
    *[
        (f"C3-missing-{a}", del_attr(a), f"missing attribute /comap.{a}")
        for a in ("obsid", "source", "comment", "utc_start")
    ],
    ("C3-missing-group", delete("comap"), "missing attribute /comap.obsid"),
    (
        "C3-bad-utc_start",
        set_attr("utc_start", "2026-03-01T04:15:00"),
        "bad utc_start '2026-03-01T04:15:00' (expected %Y-%m-%d-%H:%M:%S)",
    ),
    (
        "C3-bad-utc_start-bytes",
        set_attr("utc_start", np.bytes_(b"yesterday")),
        "bad utc_start 'yesterday' (expected %Y-%m-%d-%H:%M:%S)",
    ),
    (
        "C3-obsid-mismatch",
        set_attr("obsid", 60013),
        "obsid mismatch: file name says 60012, /comap.obsid says 60013",
    ),
    # C4
    *[(f"C4-{p}", delete(p), f"missing dataset {p}") for p in SPEC_REQUIRED],
    (
        "C4-group-not-dataset",
        both(delete("spectrometer/bands"), lambda f: f.create_group("spectrometer/bands")),
        "missing dataset spectrometer/bands",
    ),
    ("C4-weather-partial", delete(f"{WEATHER}/windSpeed"), f"missing dataset {WEATHER}/windSpeed"),
    (
        "C4-tracker-partial",
        delete(f"{TRACKER}/lissajous_status"),
        f"missing dataset {TRACKER}/lissajous_status",
    ),
    # C5
    (
        "C5-3d",
        edit("spectrometer/tod", lambda a: a[0]),
        f"{_C5} got shape (4, 16, 600) dtype float32",
    ),
    (
        "C5-int",
        edit("spectrometer/tod", lambda a: a.astype(np.int16)),
        f"{_C5} got shape (4, 4, 16, 600) dtype int16",
    ),
    # C6
    (
        "C6-feeds",
        edit("spectrometer/feeds", lambda a: np.append(a, 5)),
        "spectrometer/tod has shape (4, 4, 16, 600) but feeds/frequency/MJD imply (5, 4, 16, 600)",
    ),
    (
        "C6-frequency",
        edit("spectrometer/frequency", lambda a: a[:, :15]),
        "spectrometer/tod has shape (4, 4, 16, 600) but feeds/frequency/MJD imply (4, 4, 15, 600)",
    ),
    (
        "C6-mjd",
        edit("spectrometer/MJD", lambda a: a[:599]),
        "spectrometer/tod has shape (4, 4, 16, 600) but feeds/frequency/MJD imply (4, 4, 16, 599)",
    ),
    (
        "C6-frequency-1d",
        edit("spectrometer/frequency", lambda a: a[0]),
        "spectrometer/tod has shape (4, 4, 16, 600) but feeds/frequency/MJD imply (4, 16, 600)",
    ),
    ("C6-nchan", set_attr("nchan", 1024), "/comap.nchan is 1024 but spectrometer/frequency has 16 channels"),
    # C7
    (
        "C7-float",
        edit("spectrometer/feeds", lambda a: a.astype(np.float64)),
        "spectrometer/feeds: dtype float64 is not an integer type",
    ),
    (
        "C7-duplicate",
        edit("spectrometer/feeds", lambda a: _set(a, 2, 3)),
        "spectrometer/feeds: duplicate feed numbers [3]",
    ),
    (
        "C7-range",
        edit("spectrometer/feeds", lambda a: np.array([3, 20, 0, 21], np.int32)),
        "spectrometer/feeds: feed numbers outside 1-20: [0, 21]",
    ),
    # C8
    (
        "C8-repeat",
        edit("spectrometer/MJD", lambda a: _set(a, 300, a[299])),
        "spectrometer/MJD not strictly increasing at sample 300",
    ),
    (
        "C8-backwards",
        edit("spectrometer/MJD", lambda a: _set(a, 17, a[10])),
        "spectrometer/MJD not strictly increasing at sample 17",
    ),
    (
        "C8-nan-first",
        edit("spectrometer/MJD", lambda a: _set(a, 0, np.nan)),
        "spectrometer/MJD not strictly increasing at sample 0",
    ),
    ("C8-tsamp", set_attr("tsamp", 0.025), "sample spacing 0.02 s disagrees with tsamp 0.025 s"),
    ("C8-tsamp-ms", set_attr("tsamp", 20.0), "sample spacing 0.02 s disagrees with tsamp 20 s"),
    # C9
    (
        "C9-nan",
        edit("spectrometer/frequency", lambda a: _set(a, (2, 5), np.nan)),
        "spectrometer/frequency band 2: non-finite value at channel 5",
    ),
    (
        "C9-range",
        edit("spectrometer/frequency", lambda a: _set(a, (1, 0), 45.0)),
        "spectrometer/frequency band 1: 45 GHz at channel 0 is outside [20, 40] GHz",
    ),
    (
        "C9-hz",
        edit("spectrometer/frequency", lambda a: a * 1e9),
        "spectrometer/frequency band 0: 2.79375e+10 GHz at channel 0 is outside [20, 40] GHz",
    ),
    (
        "C9-monotonic",
        edit("spectrometer/frequency", _swap_channels),
        "spectrometer/frequency band 3: not strictly monotonic at channel 8",
    ),
    (
        "C9-flat",
        edit("spectrometer/frequency", lambda a: _set(a, (1, 1), a[1, 0])),
        "spectrometer/frequency band 1: not strictly monotonic at channel 1",
    ),
    ("C9-overlap", edit("spectrometer/frequency", _overlap_band1), _OVERLAP_MSG),
    # C10
    (
        "C10-length",
        edit("spectrometer/features", lambda a: a[:599]),
        "spectrometer/features has length 599, expected 600",
    ),
    (
        "C10-dtype",
        edit("spectrometer/features", lambda a: a.astype(np.float32)),
        "spectrometer/features has dtype float32, expected an integer dtype",
    ),
    # C11
    (
        "C11-el",
        edit("spectrometer/pixel_pointing/pixel_el", lambda a: a[:, :599]),
        "spectrometer/pixel_pointing/pixel_el has shape (4, 599), expected (4, 600)",
    ),
    (
        "C11-yoffset",
        edit("spectrometer/pixel_pointing/pixel_yoffset", lambda a: a[:3]),
        "spectrometer/pixel_pointing/pixel_yoffset has shape (3, 600), expected (4, 600)",
    ),
    # C12
    (
        "C12-length",
        edit(f"{VANE}/Tshroud", lambda a: a[:-1]),
        f"{VANE}: Tshroud has length {_N_VANE - 1} but utc has {_N_VANE}",
    ),
    ("C12-frame-utc", edit(f"{FRAME}/utc", lambda a: _set(a, 40, a[10])), f"{FRAME}/utc not monotonic"),
    ("C12-weather-nan", edit(f"{WEATHER}/utc", lambda a: _set(a, 3, np.nan)), f"{WEATHER}/utc not monotonic"),
    (
        "C12-extra-dataset",
        lambda f: f[TRACKER].create_dataset("extra", data=np.zeros(3)),
        f"{TRACKER}: extra has length 3 but utc has {int(N_TOD * DT_S * 5) + 7}",
    ),
]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def test_valid_file_passes_without_warnings(base_file, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    with Level1File(base_file) as l1:
        l1.validate()
        assert l1.validated
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_each_check_gives_its_exact_message(l1copy, mutate, message):
    path = l1copy(mutate)
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == message
    assert isinstance(info.value, BadCOMAPFile)
    expected_obsid = 60013 if "obsid mismatch" in message else OBSID
    assert info.value.obsid == expected_obsid
    assert str(info.value) == f"ObsID {expected_obsid}: {message}"
    assert "\n" not in str(info.value)


def test_C1_missing_file(tmp_path):
    path = os.fspath(tmp_path / NAME)
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == f"level-1 file not found: {path}"
    assert info.value.obsid == OBSID  # from the file name


def test_C1_directory_and_unknown_obsid(tmp_path):
    with pytest.raises(Level1FormatError) as info:
        Level1File(tmp_path).validate()
    assert info.value.message == f"level-1 file not found: {tmp_path}"
    assert info.value.obsid == -1


def test_C2_not_hdf5(tmp_path):
    path = os.fspath(tmp_path / NAME)
    with open(path, "w") as fh:
        fh.write("this is not an HDF5 file\n" * 10)
    with pytest.raises(OSError) as raw:
        h5py.File(path, "r")
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == f"cannot open level-1 file {path}: {raw.value}"
    assert info.value.obsid == OBSID


@pytest.mark.parametrize("count_bytes", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file(l1copy, keep, count_bytes):
    path = l1copy()
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    with pytest.raises(Level1FormatError) as info:
        Level1File(path, count_bytes=count_bytes).validate()
    msg = info.value.message
    assert msg.startswith(f"cannot open level-1 file {path}: ") or msg.startswith(
        "spectrometer/tod unreadable at feed "
    ), msg


def test_C13_corrupt_chunk(tmp_path):
    """A checksum error in the last chunk of one feed/band is caught by the probe, not before."""
    path = write_level1(tmp_path / NAME, chunks=(1, 1, 16, 128), fletcher32=True)
    with h5py.File(path, "r") as f:
        info = f["spectrometer/tod"].id.get_chunk_info_by_coord((2, 1, 0, 512))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 100)
        fh.write(b"\xff" * 64)
    l1 = Level1File(path)
    l1.validate(probe_tod=False)  # metadata is fine
    with pytest.raises(Level1FormatError) as exc:
        l1.validate()
    assert exc.value.message.startswith(f"spectrometer/tod unreadable at feed {FEEDS[2]}: ")
    assert exc.value.obsid == OBSID
    l1.close()


def test_C7_only_ground_feed(tmp_path):
    path = write_level1(tmp_path / NAME, feeds=(GROUND_FEED,))
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == "spectrometer/feeds: no science feed in [20]"


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [({"n_tod": 1}, "(4, 4, 16, 1)"), ({"n_channels": 1}, "(4, 4, 1, 600)")],
)
def test_C6_too_small(tmp_path, kwargs, shape):
    path = write_level1(tmp_path / NAME, **kwargs)
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == (
        f"spectrometer/tod has shape {shape} but feeds/frequency/MJD imply {shape}; "
        "need n_tod >= 2, n_channels >= 2 and n_bands >= 1"
    )


def test_C3_obsid_not_integer(l1copy):
    path = l1copy(set_attr("obsid", 60012.5))
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.message == "bad attribute /comap.obsid 60012.5 (expected an integer)"
    assert info.value.obsid == OBSID  # falls back to the file name


def test_obsid_fallbacks(l1copy):
    path = l1copy(both(del_attr("obsid"), delete("spectrometer/MJD")), name="renamed.hd5")
    with pytest.raises(Level1FormatError) as info:
        Level1File(path).validate()
    assert info.value.obsid == -1
    assert str(info.value) == "ObsID -1: missing attribute /comap.obsid"
    # with /comap.obsid readable, a later failure carries it even when the name does not match
    path2 = l1copy(delete("spectrometer/MJD"), name="other.hd5")
    with pytest.raises(Level1FormatError) as info:
        Level1File(path2).validate()
    assert (info.value.obsid, info.value.message) == (OBSID, "missing dataset spectrometer/MJD")


def test_obsid_check_only_when_name_matches(l1copy):
    Level1File(l1copy(set_attr("obsid", 123), name="anything.hd5")).validate()


@pytest.mark.parametrize(
    ("mutations", "message"),
    [
        ((delete("spectrometer/MJD"), del_attr("source")), "missing attribute /comap.source"),
        (
            (edit("spectrometer/frequency", _swap_channels), delete(f"{FRAME}/utc")),
            f"missing dataset {FRAME}/utc",
        ),
        (
            (edit("spectrometer/frequency", _swap_channels), set_attr("tsamp", 1.0)),
            "sample spacing 0.02 s disagrees with tsamp 1 s",
        ),
        (
            (edit(f"{VANE}/utc", lambda a: a[::-1]), edit("spectrometer/features", lambda a: a[:10])),
            "spectrometer/features has length 10, expected 600",
        ),
    ],
)
def test_checks_run_in_order(l1copy, mutations, message):
    with pytest.raises(Level1FormatError) as info:
        Level1File(l1copy(both(*mutations))).validate()
    assert info.value.message == message


def test_optional_groups_may_be_absent(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = write_level1(tmp_path / NAME, weather=False, tracker=False)
    with Level1File(path) as l1:
        l1.validate()
        assert not l1.has_group(TRACKER)
        assert l1.hk_groups() == [VANE, FRAME]
    assert not caplog.records


# --------------------------------------------------------------------------------------------------
# Warnings (logged, not raised)
# --------------------------------------------------------------------------------------------------
def _nan_probe(f: h5py.File) -> None:
    f["spectrometer/tod"][1, 2, 0, N_TOD - 1] = np.nan


def _nan_pointing(f: h5py.File) -> None:
    az = f["spectrometer/pixel_pointing/pixel_az"]
    az[0, 110] = np.nan  # slew (feature 0)
    az[2, 111] = np.nan
    az[3, 300] = np.nan  # CES


def _gap(a: np.ndarray) -> np.ndarray:
    a[300:] += 1.0 / 86400.0
    return a


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (set_attr("favourite_colour", "blue"), "unknown /comap attributes: favourite_colour"),
        (lambda f: f.create_group("truth/vane"), "/truth group present"),
        (_nan_probe, "NaN in 1 of 32 probed elements"),
        (_nan_pointing, "pixel_az has 2 NaN value(s) outside scans and 1 inside scans"),
        (
            edit("spectrometer/MJD", _gap),
            "1 time gap(s) longer than 1.5 sample intervals (largest 1.020 s after sample 299)",
        ),
        (set_attr("nchan", "sixteen"), "/comap.nchan 'sixteen' is not an integer"),
    ],
    ids=["unknown-attr", "truth", "tod-nan", "pointing-nan", "gap", "nchan-unreadable"],
)
def test_warnings(l1copy, caplog, mutate, fragment):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    Level1File(l1copy(mutate)).validate()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1, warnings
    assert fragment in warnings[0]
    assert NAME in warnings[0]


def test_nchan_absent_is_fine(l1copy, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    Level1File(l1copy(del_attr("nchan"))).validate()
    assert not caplog.records


# --------------------------------------------------------------------------------------------------
# Accessors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strings", ["vlen", "fixed"])
def test_accessors(tmp_path, strings):
    path = write_level1(tmp_path / NAME, strings=strings)
    with Level1File(path) as l1:
        assert l1.obsid == OBSID and isinstance(l1.obsid, int)
        a = l1.attrs()
        assert a["source"] == "GField30,TauA" and type(a["source"]) is str
        assert a["comment"] == "" and type(a["comment"]) is str
        assert a["utc_start"] == UTC_START
        assert a["pixels"] == "3,20,1,7"
        assert type(a["nchan"]) is int and type(a["tsamp"]) is float
        assert l1.band_names() == ["A:LSB", "A:USB", "B:LSB", "B:USB"]
        assert l1.feeds().tolist() == list(FEEDS)
        assert l1.science_feeds().tolist() == [3, 1, 7]
        assert [l1.l1_index(f) for f in (3, 20, 1, 7)] == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="feed 2 not in spectrometer/feeds"):
            l1.l1_index(2)
        assert (l1.n_feeds, l1.n_bands, l1.n_channels, l1.n_tod) == (4, N_BANDS, N_CHANNELS, N_TOD)
        assert l1.tod_shape == (4, N_BANDS, N_CHANNELS, N_TOD)
        assert l1.sample_rate_hz() == pytest.approx(1 / DT_S, rel=1e-4)  # MJD float64 resolution ~1 µs
        np.testing.assert_array_equal(l1.frequency_ghz(), FREQ)
        assert l1.frequency_ghz()[0, 0] > l1.frequency_ghz()[0, -1]  # storage order kept
        assert l1.channel_width_hz() == pytest.approx(2e9 / N_CHANNELS)
        assert l1.features().dtype == np.uint32
        np.testing.assert_array_equal(l1.features(), feature_words(N_TOD))
        dec = l1.decoded_features()
        assert dec.dtype == np.int16 and set(dec.tolist()) == {13, 8, -1}
        assert l1.mjd()[0] == pytest.approx(MJD0, abs=1e-12)
        with pytest.raises(ValueError):
            l1.mjd()[0] = 0.0  # cached arrays are read-only
        az, el = l1.pointing(2, slice(10, 20))
        with h5py.File(path, "r", locking=False) as f:
            np.testing.assert_array_equal(az, f["spectrometer/pixel_pointing/pixel_az"][2, 10:20])
            np.testing.assert_array_equal(el, f["spectrometer/pixel_pointing/pixel_el"][2, 10:20])
        az_all, _ = l1.pointing(1)
        assert az_all.shape == (N_TOD,) and az_all.dtype == np.float64
        assert l1.has_group("hk/antenna0/vane") and not l1.has_group("spectrometer/tod")
        assert l1.has_dataset("spectrometer/tod") and not l1.has_dataset("truth")


def test_lazy_open_and_close(base_file):
    l1 = Level1File(base_file)
    assert "closed" in repr(l1)
    assert l1.n_tod == N_TOD  # opens on first use
    l1.close()
    l1.close()  # idempotent
    assert l1.feeds().tolist() == list(FEEDS)  # cached data survive; file reopens when needed
    l1.close()


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------
def test_decode_features_table():
    words = np.array([8192, 256, 512, 1024, 65536, 0, 8192 | 256, 1, 3, 2**31, 2**32 - 1], dtype=np.uint32)
    expected = [13, 8, 9, 10, 16, -1, 13, 0, 1, 31, 31]
    out = decode_features(words)
    assert out.dtype == np.int16 and out.tolist() == expected


def test_decode_features_dtypes_and_edges():
    assert decode_features(np.array([-5, -1, 0, 1, 2], np.int32)).tolist() == [-1, -1, -1, 0, 1]
    big = np.array([2**53, 2**53 + 1, 2**63, 2**64 - 1], dtype=np.uint64)
    assert decode_features(big).tolist() == [53, 53, 63, 63]
    assert decode_features([[256, 0], [512, 8192]]).tolist() == [[8, -1], [9, 13]]
    assert decode_features(np.array(1024)).shape == ()
    assert decode_features([]).shape == (0,)
    rng = np.random.default_rng(1)
    w = rng.integers(-(2**40), 2**40, size=2000)
    np.testing.assert_array_equal(decode_features(w), [int(x).bit_length() - 1 if x > 0 else -1 for x in w])
    with pytest.raises(TypeError):
        decode_features(np.array([1.0, 2.0]))


def test_runs():
    assert runs([]).shape == (0, 2)
    assert runs([0, 0]).tolist() == []
    assert runs([1, 1, 0, 1, 0, 0, 1, 1, 1]).tolist() == [[0, 2], [3, 4], [6, 9]]
    r = runs(decode_features(feature_words(N_TOD)) == 13)
    assert r.dtype == np.int64 and r.tolist() == [[0, 100], [500, 600]]
    with pytest.raises(ValueError):
        runs(np.zeros((2, 2)))


# --------------------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------------------
def _write_alignment_hk(f: h5py.File) -> None:
    """Replace vane/frame/tracker hk with analytic signals on different clocks."""
    for g in (VANE, FRAME, TRACKER):
        del f[g]
    # vane: 10 Hz from true t = 1.0 s to 9.0 s; angle(t) = 50 + 2 t deg, stored in 0.01 deg (int32)
    n_v = 81
    t_v = 1.0 + np.arange(n_v) / 10.0
    v = f.create_group(VANE)
    v["utc"] = hk_utc(1.0, 10.0, n_v)
    v["angle"] = np.round((50.0 + 2.0 * t_v) * 100).astype(np.int32)
    v["Tshroud"] = np.full(n_v, 2012, dtype=np.int32)
    v["Tvane"] = np.zeros(n_v, dtype=np.int32)
    v["Tambient"] = np.zeros(n_v, dtype=np.int32)
    # frame: 10 Hz from true t = 0.55 s, 70 samples; feature 256 from t = 3.05 s on
    n_fr = 70
    t_fr = 0.55 + np.arange(n_fr) / 10.0
    fr = f.create_group(FRAME)
    fr["utc"] = hk_utc(0.55, 10.0, n_fr)
    fr["features"] = np.where(t_fr >= 3.05 - 1e-9, 256, 0).astype(np.uint32)
    # tracker: 5 Hz from t = 2.01 s, status 1 from t = 4.01 s
    n_t = 20
    t_t = 2.01 + np.arange(n_t) / 5.0
    trk = f.create_group(TRACKER)
    trk["utc"] = hk_utc(2.01, 5.0, n_t)
    trk["lissajous_status"] = (t_t >= 4.01 - 1e-9).astype(np.int32)


def test_hk_alignment(l1copy):
    path = l1copy(_write_alignment_hk)
    t = np.arange(N_TOD) * DT_S  # spectrometer time, s after MJD0
    with Level1File(path) as l1:
        l1.validate()
        # hk_mjd: utc - 0.6 s, each group on its own clock; the hk/ prefix is optional
        with h5py.File(path, "r", locking=False) as f:  # a second open must match Level1File's locking
            np.testing.assert_allclose(
                l1.hk_mjd(VANE), f[f"{VANE}/utc"][...] - 0.6 / 86400, rtol=0, atol=1e-12
            )
        np.testing.assert_array_equal(l1.hk_mjd("antenna0/vane"), l1.hk_mjd(VANE))
        np.testing.assert_array_equal(l1.vane_mjd(), l1.hk_mjd(VANE))
        assert l1.hk_mjd(FRAME).shape != l1.hk_mjd(VANE).shape

        # continuous: linear, NaN outside the hk range
        angle = l1.hk_on_spectrometer(f"{VANE}/angle", "linear", scale=0.01)
        inside = (t > 1.0 + 1e-3) & (t < 9.0 - 1e-3)
        np.testing.assert_allclose(angle[inside], 50.0 + 2.0 * t[inside], atol=1e-4)
        assert np.isnan(angle[t < 1.0 - 1e-3]).all() and np.isnan(angle[t > 9.0 + 1e-3]).all()
        assert np.isfinite(angle[inside]).all()
        assert angle.dtype == np.float64

        # categorical features: previous-value on the frame clock, -1 before the first hk sample
        feat = l1.hk_on_spectrometer(f"{FRAME}/features", "previous")
        expected = np.where(t < 0.55, -1, np.where(t < 3.05, 0, 256))
        np.testing.assert_array_equal(feat, expected)
        assert set(np.unique(feat).tolist()) == {-1, 0, 256}  # never an interpolated code

        # categorical status: 0 before the first hk sample
        status = l1.hk_on_spectrometer(f"{TRACKER}/lissajous_status", "previous")
        np.testing.assert_array_equal(status, np.where(t < 4.01, 0, 1))

        # explicit fill, and bad kind
        feat99 = l1.hk_on_spectrometer(f"{FRAME}/features", "previous", fill=99)
        assert (feat99[t < 0.55] == 99).all()
        with pytest.raises(ValueError):
            l1.hk_on_spectrometer(f"{FRAME}/features", "nearest")

    # the offset matters: without it the hk value at t is the one taken 0.6 s earlier (2 deg/s × 0.6 s)
    with Level1File(path, hk_time_offset_s=0.0) as l0:
        a0 = l0.hk_on_spectrometer(f"{VANE}/angle", "linear", scale=0.01)
        both_in = inside & np.isfinite(a0)
        assert both_in.sum() > 300
        np.testing.assert_allclose(a0[both_in] - angle[both_in], -1.2, atol=1e-4)


def test_hk_integer_scaling(l1copy):
    def mutate(f: h5py.File) -> None:
        n = f[f"{VANE}/utc"].shape[0]
        f[f"{VANE}/angle"][...] = np.full(n, 12345, dtype=np.int32)
        replace(f, f"{WEATHER}/pressure", np.full(f[f"{WEATHER}/utc"].shape[0], 10132, dtype=np.int16))

    with Level1File(l1copy(mutate)) as l1:
        l1.validate()
        raw = l1.hk_dataset(f"{VANE}/angle")
        assert raw.dtype == np.int32 and raw[0] == 12345
        ang = l1.vane_angle_deg()
        assert ang.dtype == np.float64
        np.testing.assert_allclose(ang, 123.45)
        np.testing.assert_allclose(l1.hk_dataset(f"{WEATHER}/pressure", 0.01), 101.32)
        np.testing.assert_allclose(l1.tshroud_c(), 20.12)
        mapped = l1.hk_on_spectrometer("antenna0/vane/angle", scale=0.01)
        np.testing.assert_allclose(mapped[np.isfinite(mapped)], 123.45)
        with pytest.raises(Level1FormatError, match="missing dataset hk/antenna0/vane/nothing"):
            l1.hk_dataset("antenna0/vane/nothing")


# --------------------------------------------------------------------------------------------------
# TOD reads
# --------------------------------------------------------------------------------------------------
SELECTIONS = [
    (1, None, None, None),
    (2, slice(None), slice(None), slice(100, 350)),
    (0, slice(1, 3), slice(4, 12), slice(590, 600)),
    (3, slice(0, 4, 2), slice(1, None, 3), slice(5, 590, 7)),
    (-1, 2, slice(None), slice(-50, None)),
    (1, slice(None), 7, 599),
    (2, slice(None), slice(None), slice(10, 10)),
]


@pytest.mark.parametrize(
    "layout",
    [
        {"chunks": None},
        {"chunks": (1, 1, 16, 128)},
        {"chunks": (2, 3, 5, 77)},
        {"chunks": (1, 1, 16, 600), "compression": "gzip"},
        {"chunks": None, "tod_dtype": np.float64},
    ],
    ids=["contiguous", "telescope-like", "odd", "gzip", "float64"],
)
def test_tod_block_any_layout(tmp_path, layout):
    path = write_level1(tmp_path / NAME, **layout)
    ref = tod_values(FEEDS, N_BANDS, N_CHANNELS, N_TOD)
    with Level1File(path) as l1:
        l1.validate()
        assert l1.tod_chunks == layout["chunks"]
        for ifeed, bsel, csel, ssel in SELECTIONS:
            key = tuple(slice(None) if s is None else s for s in (bsel, csel, ssel))
            expected = ref[ifeed][key]
            got = l1.tod_block(ifeed, bsel, csel, ssel)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)


def test_tod_block_out_buffer(base_file):
    ref = tod_values(FEEDS, N_BANDS, N_CHANNELS, N_TOD)
    with Level1File(base_file) as l1:
        buf = np.empty(N_BANDS * N_CHANNELS * 400, dtype=np.float32)
        for start, stop in [(0, 400), (100, 150), (300, 600)]:
            out = buf[: N_BANDS * N_CHANNELS * (stop - start)].reshape(N_BANDS, N_CHANNELS, stop - start)
            res = l1.tod_block(1, slice(None), slice(None), slice(start, stop), out=out)
            assert res is out and np.shares_memory(res, buf)
            np.testing.assert_array_equal(res, ref[1, :, :, start:stop])
        # a non-contiguous out is filled through a copy
        big = np.zeros((N_BANDS, N_CHANNELS, 100), dtype=np.float32)
        view = big[:, :, ::2]
        l1.tod_block(0, None, None, slice(0, 50), out=view)
        np.testing.assert_array_equal(big[:, :, ::2], ref[0, :, :, :50])
        assert (big[:, :, 1::2] == 0).all()
        with pytest.raises(ValueError, match="out must be float32 with shape"):
            l1.tod_block(0, None, None, slice(0, 50), out=np.empty((N_BANDS, N_CHANNELS, 51), np.float32))
        with pytest.raises(ValueError, match="out must be float32"):
            l1.tod_block(0, None, None, slice(0, 50), out=np.empty((N_BANDS, N_CHANNELS, 50), np.float64))
        with pytest.raises(ValueError, match="positive slice steps"):
            l1.tod_block(0, None, None, slice(None, None, -1))
        with pytest.raises(IndexError):
            l1.tod_block(4)
        with pytest.raises(IndexError):
            l1.tod_block(0, 4)
        with pytest.raises(TypeError):
            l1.tod_block(0, [0, 1])


# --------------------------------------------------------------------------------------------------
# Byte counting (docs/operations.md#measurement-details B2)
# --------------------------------------------------------------------------------------------------
def test_byte_counting(tmp_path):
    n_tod = 1024
    path = write_level1(tmp_path / NAME, n_tod=n_tod, chunks=(1, 1, 16, 128))
    storage = 4 * N_BANDS * N_CHANNELS * n_tod * 4
    chunk_bytes = 16 * 128 * 4
    with h5py.File(path) as f:
        assert f["spectrometer/tod"].id.get_storage_size() == storage

    with Level1File(path) as plain:
        plain.tod_block(0)
        assert plain.bytes_read_total == 0 and plain.bytes_read_tod == 0
        assert plain.tod_storage_size() == storage

    # one feed's whole TOD costs about its share of the storage (HDF5 path; direct: test_level1_direct_reads)
    with Level1File(path, count_bytes=True, direct_reads=False) as l1:
        assert l1.tod_storage_size() == storage
        assert l1.bytes_read_tod == 0
        block = l1.tod_block(l1.l1_index(7))
        feed_bytes = l1.bytes_read_tod
        assert 0.95 * storage / 4 <= feed_bytes <= 1.2 * storage / 4, feed_bytes
        np.testing.assert_array_equal(block, tod_values(FEEDS, N_BANDS, N_CHANNELS, n_tod)[3])
        assert l1.bytes_read_total > feed_bytes  # plus superblock, object headers, …
        # non-TOD reads count toward the total only
        total = l1.bytes_read_total
        l1.hk_dataset(f"{VANE}/angle")
        l1.pointing(0)
        assert l1.bytes_read_total > total and l1.bytes_read_tod == feed_bytes
        # a narrow channel window touches only its own chunk
        l1.tod_block(0, 1, slice(0, 4), slice(0, 128))
        assert 0 < l1.bytes_read_tod - feed_bytes <= 1.2 * chunk_bytes
        # rereading cached chunks costs nothing
        before = l1.bytes_read_tod
        l1.tod_block(0, 1, slice(4, 8), slice(0, 100))
        assert l1.bytes_read_tod == before
    assert l1.bytes_read_total >= l1.bytes_read_tod > 0  # the totals survive close()

    # the C13 probe reads at most one chunk per probed element
    with Level1File(path, count_bytes=True) as l1:
        l1.validate(check_pointing=False)
        assert 0 < l1.bytes_read_tod <= 2 * 4 * N_BANDS * chunk_bytes * 1.1
        assert l1.bytes_read_total > l1.bytes_read_tod


def test_counting_reads_same_values(base_file):
    with Level1File(base_file, count_bytes=True) as a, Level1File(base_file) as b:
        a.validate()
        np.testing.assert_array_equal(
            a.tod_block(2, None, None, slice(50, 450)), b.tod_block(2, None, None, slice(50, 450))
        )
        np.testing.assert_array_equal(
            a.hk_on_spectrometer(f"{FRAME}/features", "previous"),
            b.hk_on_spectrometer(f"{FRAME}/features", "previous"),
        )


def test_transient_open_errors_are_retried(base_file, monkeypatch, caplog):
    from utils import h5io

    real = h5py.File
    calls = []

    def flaky(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) <= 2:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        return real(*args, **kwargs)

    sleeps: list[float] = []
    monkeypatch.setattr(h5py, "File", flaky)
    monkeypatch.setattr(h5io, "sleep", sleeps.append)
    caplog.set_level(logging.WARNING, logger="comap.h5io")
    with Level1File(base_file) as l1:
        assert l1.n_tod == N_TOD
    assert len(calls) == 3 and len(sleeps) == 2
    assert all(c["locking"] is False and c["rdcc_nbytes"] >= 64 * 2**20 for c in calls)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_open_gives_up_after_retries(base_file, monkeypatch):
    from utils import h5io

    def always(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, "Unable to synchronously open file (unable to lock file)")

    monkeypatch.setattr(h5py, "File", always)
    monkeypatch.setattr(h5io, "sleep", lambda s: None)
    with pytest.raises(Level1FormatError) as info:
        Level1File(base_file, retry={"max_retries": 2}).validate()
    assert info.value.message == (
        f"cannot open level-1 file {base_file}: after 3 attempts: "
        "[Errno 11] Unable to synchronously open file (unable to lock file)"
    )
