"""CreateMap's options and split modes, each shown by its effect on the segments, samples or maps
(docs/mapmaking.md#createmap-and-its-variants, docs/mapmaking.md#pre-pass-and-segment-selection,
docs/mapmaking.md#per-segment-processing, docs/mapmaking.md#name-and-hdus).

One module-scoped set of level-2 files serves every test: four blank-sky CES observations of
GField30's position (two scans of 60 s each, feeds 1 and 2, 16 channels; two rising, two setting),
reduced in process by the default level-2 modules. The maps are made in process through the
product's own steps (``expand`` then ``make``), with the default ``calibration='model'`` fed by a
calibration model of factor 1 for every (feed, band, channel). Every job uses the defaults except
the option under test.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from astropy.io import fits
from conftest import default_level2_modules, reduce_in_process

from modules.MapMaking.dispatch import Dispatcher, JobInputs
from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap
from modules.MapMaking.read_data import Level2DataReader, scan_direction_samples
from modules.MapMaking.segments import segment_hour_angle_deg
from modules.pipeline_control.Pipeline import StageResult
from utils.constants import GROUND_FEED
from utils.coordinates import galactic_to_icrs
from utils.level2 import BINNED_CLEANED_DATA, FLAG_BRIGHT_SOURCE, PIXEL_AZ, SAMPLE_FLAGS, SCAN_EDGES

HOUR_ANGLES_H = (-2.0, -1.0, 1.0, 2.0)
OBSIDS = [95001, 95002, 95003, 95004]
SCIENCE_FEEDS = [1, 2]
LOG = "comap.MapMaking"


def _spec(obsid: int, ha: float):
    from utils.simulator.presets import _gfield
    from utils.simulator.spec import SkySpec

    ra, dec = galactic_to_icrs(30.0, 0.0)
    spec = _gfield(obsid, ha, [*SCIENCE_FEEDS, GROUND_FEED], 16, 2, 60.0)
    return spec.replace(sky=SkySpec(kind="none"), target_ra_deg=float(ra), target_dec_deg=float(dec))


def _level2_modules(**create_level2):
    from modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2 import NoiseStatsLevel2
    from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning

    mods = default_level2_modules(CreateLevel2File=create_level2)
    return [*mods, PostBinCleaning(), NoiseStatsLevel2()]


def _observation(obsid: int, path: Path) -> SimpleNamespace:
    """What the dispatcher knows of an observation: obsid, level-2 path and start time."""
    from utils.level2 import MJD

    with h5py.File(path, "r") as l2:
        mjd_start = float(l2[MJD][0])
    return SimpleNamespace(obsid=obsid, level2_path=str(path), mjd_start=mjd_start, source="GField30")


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """The four level-1 files, their level-2 files and observation rows."""
    from utils.simulator import simulate_observation

    root = tmp_path_factory.mktemp("options")
    level1 = [
        simulate_observation(_spec(obsid, ha), root / "level1", seed=7)
        for obsid, ha in zip(OBSIDS, HOUR_ANGLES_H)
    ]
    level2 = [reduce_in_process(p, root / "level2", _level2_modules())[0] for p in level1]
    return SimpleNamespace(
        root=root,
        level1=level1,
        level2=level2,
        observations=[_observation(o, p) for o, p in zip(OBSIDS, level2)],
    )


def _table():
    from utils.calibrators import CalibrationTable

    rows = [
        {"feed": f, "band": b, "channel": c, "model_type": "mean", "poly_coeffs": [1.0]}
        for f in SCIENCE_FEEDS
        for b in range(4)
        for c in range(2)
    ]
    return CalibrationTable.from_rows("TauA", rows)


def make_maps(job: CreateMap, observations, *, flags: dict | None = None) -> dict[str, Path]:
    """Every output of ``job`` made as the dispatcher makes them (suffix → FITS path); the two-way
    splits' differences with ``write_difference``."""
    updated, feeds = Dispatcher.level2_facts(observations)
    inputs = JobInputs(observations, updated, feeds, _table(), flags or {}, logging.getLogger(LOG))
    outputs = job.expand(observations, feeds)
    made = {}
    for out in outputs:
        made[out.suffix] = job.make(out, inputs, job.job_config_hash(out, observations, updated))
    if job.write_difference:
        result = StageResult(stage="MapMaking")
        Dispatcher("MapMaking", "map")._write_differences(job, outputs, set(made.values()), result)
        assert result.failed == 0
        diff = outputs[0].output_path.with_name(
            outputs[0].output_path.name.replace(outputs[0].suffix, "_diff")
        )
        if diff.exists():
            made["_diff"] = diff
            assert diff.with_suffix(".png").exists() == job.quicklook
    return made


def _job(tmp_path, **params) -> CreateMap:
    return CreateMap(map_name="Opt", output_dir=str(tmp_path), quicklook=False, **params)


def _reason_counts(text: str) -> Counter:
    """The reason counts of the last map's log: the pre-pass line ('N segment(s) from ...; reason: n')
    or, when the map got that far, the line after the sky-free noise cuts ('... segment(s) kept
    (reason: n; ...)'), which holds the pre-pass reasons too (docs/mapmaking.md#map-noise)."""
    lines = [ln for ln in text.splitlines() if "segment(s) from" in ln or "segment(s) kept (" in ln]
    line = lines[-1]
    body = line.split(" kept (", 1)[1].split(")", 1)[0] if " kept (" in line else line.split("; ", 1)[1]
    return Counter({k.strip(): int(v) for k, v in re.findall(r"([^;:]+): (\d+)", body)})


def red_noise(
    n: int, amplitude_k: float, alpha: float, seed: int, *, f_ref_hz: float = 0.1, fs_hz: float = 50.0
):
    """Gaussian noise of periodogram ``amplitude_k² (f/f_ref)^alpha`` (the units in which white noise
    of rms σ has the flat level σ², docs/level2.md#noisestatslevel2), no mean, ``n`` samples."""
    rng = np.random.default_rng(seed)
    f = np.fft.rfftfreq(n, 1.0 / fs_hz)
    shape = np.zeros(f.size)
    shape[1:] = amplitude_k * (f[1:] / f_ref_hz) ** (alpha / 2)
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n)


#: Red noise added to two segments of the first observation (feed, scan, amplitude at 0.1 Hz in K,
#: spectral index): X far above the default sigma_red cutoff (0.4 K), Y below it but with a knee
#: (≈ 0.1 Hz × 0.3/0.01 = 3 Hz at the 0.01 K white level) well above the clean segments' (≈ 1 Hz).
RED_X = (1, 0, 1.0, -3.0)
RED_Y = (2, 1, 0.3, -2.0)


def _with_red_noise(field, name: str, segments) -> SimpleNamespace:
    """The first observation reduced again into ``name`` with red NOISE added to ``segments`` (feed,
    scan, amplitude at 0.1 Hz in K, spectral index) of its binned, cleaned TOD before NoiseStatsLevel2
    measures it (no sky: the statistics see only noise)."""
    from modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2 import NoiseStatsLevel2

    out = field.root / name
    path = reduce_in_process(field.level1[0], out, _level2_modules()[:-1])[0]
    with h5py.File(path, "a") as l2:
        feeds = list(l2["spectrometer/feeds"][...])
        edges = l2[SCAN_EDGES][...]
        data = l2[BINNED_CLEANED_DATA]
        for k, (feed, scan, amp, alpha) in enumerate(segments):
            a, b = edges[scan]
            block = data[feeds.index(feed), :, :, a:b]
            block += red_noise(b - a, amp, alpha, seed=11 + k).astype(np.float32)
            data[feeds.index(feed), :, :, a:b] = block
    reduce_in_process(field.level1[0], out, [NoiseStatsLevel2()])
    return _observation(OBSIDS[0], path)


@pytest.fixture(scope="module")
def noisy(field):
    """The first observation with segments X and Y carrying strong red noise."""
    return _with_red_noise(field, "noisy", (RED_X, RED_Y))


def _header(path: Path) -> fits.Header:
    with fits.open(path) as hdul:
        return hdul[0].header


def _hdu(path: Path, name: str) -> np.ndarray:
    with fits.open(path) as hdul:
        return np.asarray(hdul[name].data)


def _obsids(path: Path) -> list[int]:
    """The obsids a map was made from, read back from its side-car configuration."""
    import tomllib

    return [int(o) for o in tomllib.loads(path.with_name(path.stem + ".config.toml").read_text())["obsids"]]


def _feeds(path: Path) -> list[int]:
    return [int(f) for f in str(_header(path)["FEEDS"]).split(",")]


def _stats(path: Path, name: str) -> np.ndarray:
    """``name`` of the binned, cleaned TOD's noise statistics, band 0, channel 0: shape (feed, scan)."""
    with h5py.File(path, "r") as l2:
        return np.asarray(l2[f"level2_noise_stats/binned_cleaned_data/{name}"][:, 0, 0, :])


# --------------------------------------------------------------------------------------------------
# Segment cuts (docs/mapmaking.md#pre-pass-and-segment-selection)
# --------------------------------------------------------------------------------------------------
def test_auto_rms_cap_drops_the_segments_above_it(field, tmp_path, caplog):
    """At the default cap (0.1 K; white noise here ≈ 0.01 K) every segment is mapped; a cap at the
    median white-noise rms drops exactly the segments above it (read from the files), the log counts
    them and the map has fewer segments and hits."""
    rms = np.concatenate([_stats(p, "auto_rms").ravel() for p in field.level2])
    cap = float(np.median(rms))
    above = int(np.sum(rms > cap))
    assert 0 < above < rms.size
    with caplog.at_level(logging.INFO, logger=LOG):
        full = make_maps(_job(tmp_path / "a"), field.observations)[""]
        capped = make_maps(_job(tmp_path / "b", auto_rms_cap_k=cap), field.observations)[""]
    counts = _reason_counts(caplog.text)
    assert counts["auto_rms not finite, <= 0 or above cap"] == above
    assert _header(full)["NSEGMENT"] == rms.size
    assert _header(capped)["NSEGMENT"] == rms.size - above
    assert _hdu(capped, "HITS").sum() < _hdu(full, "HITS").sum()


def _hits_of(path: Path) -> int:
    return int(_hdu(path, "HITS").sum())


def test_sigma_red_cutoff_drops_the_segment_with_strong_red_noise(field, noisy, tmp_path, caplog):
    """Segment X carries red NOISE of 1 K at 0.1 Hz (α = −3): the default cutoff (0.4 K) drops it and
    only it (logged once), while a cutoff above its amplitude keeps it; the map then gains X's samples
    (3000, less those flagged in level 2)."""
    observations = [noisy, *field.observations[1:]]
    with caplog.at_level(logging.INFO, logger=LOG):
        default = make_maps(_job(tmp_path / "a"), observations)[""]
        default_counts = _reason_counts(caplog.text)
        caplog.clear()
        loose = make_maps(_job(tmp_path / "b", sigma_red_cutoff_k=5.0), observations)[""]
        loose_counts = _reason_counts(caplog.text)
    assert default_counts["sigma_red above cutoff"] == 1
    assert loose_counts["sigma_red above cutoff"] == 0
    assert _header(loose)["NSEGMENT"] == _header(default)["NSEGMENT"] + 1
    gained = _hits_of(loose) - _hits_of(default)
    assert 0.9 * 3000 <= gained <= 3000


def test_sigma_red_cutoff_drops_red_noise_with_power_at_high_frequencies(field, tmp_path, caplog):
    """Red noise of 1.5 K at 0.1 Hz with α = −2 (knee ≈ 15 Hz) on one segment: far above the default
    cutoff, so the segment is dropped. NoiseStatsLevel2 cannot fit it (19 % of its samples are outliers
    of a 1 s running median, so its level-2 statistics are NaN and used to pass every cut); the map
    maker's own fit on the sky-free residual does (docs/mapmaking.md#map-noise)."""
    observations = [_with_red_noise(field, "noisy_flat", [(1, 0, 1.5, -2.0)]), *field.observations[1:]]
    with caplog.at_level(logging.INFO, logger=LOG):
        make_maps(_job(tmp_path), observations)
    assert _reason_counts(caplog.text)["sigma_red above cutoff"] == 1


def test_fknee_max_drops_the_segment_with_a_high_knee(field, noisy, tmp_path, caplog):
    """Segment Y has red noise below the sigma_red cutoff but a knee above every clean segment's. Without
    a limit (default) it is mapped; a limit between its knee and the clean segments' highest drops it
    and only it. The knees are the map maker's own, measured on the sky-free residual and listed in the
    SEGNOISE HDU (docs/mapmaking.md#map-noise)."""
    observations = [noisy, *field.observations[1:]]
    with caplog.at_level(logging.INFO, logger=LOG):
        default = make_maps(_job(tmp_path / "a"), observations)[""]
        default_counts = _reason_counts(caplog.text)
    with fits.open(default) as hdul:
        seg = hdul["SEGNOISE"].data
        obsid, feed, scan, knee = (np.asarray(seg[c]) for c in ("OBSID", "FEED", "SCAN", "FKNEE_HZ"))
    is_y = (obsid == OBSIDS[0]) & (feed == RED_Y[0]) & (scan == RED_Y[1])
    is_x = (obsid == OBSIDS[0]) & (feed == RED_X[0]) & (scan == RED_X[1])
    clean = knee[~is_x & ~is_y]
    assert is_y.sum() == 1 and np.isfinite(clean).all()
    knee_y = float(knee[is_y][0])
    assert knee_y > clean.max(), (knee_y, clean.max())
    limit = float(np.sqrt(knee_y * clean.max()))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG):
        limited = make_maps(_job(tmp_path / "b", fknee_max_hz=limit), observations)[""]
        limited_counts = _reason_counts(caplog.text)
    assert default_counts["fknee above limit"] == 0
    assert limited_counts["fknee above limit"] == 1
    assert _header(limited)["NSEGMENT"] == _header(default)["NSEGMENT"] - 1
    assert _hits_of(limited) < _hits_of(default)


def test_quality_flags_drop_the_flagged_feed_unless_disabled(field, tmp_path, caplog):
    """A database flag 'bad' on (feed 2, band 0, channel 0) of the first observation drops that feed's
    two scans by default; with use_quality_flags = False the flag is ignored."""
    flags = {OBSIDS[0]: {(2, 0, 0): False, (1, 0, 0): True}}
    with caplog.at_level(logging.INFO, logger=LOG):
        used = make_maps(_job(tmp_path / "a"), field.observations, flags=flags)[""]
        used_counts = _reason_counts(caplog.text)
        caplog.clear()
        ignored = make_maps(_job(tmp_path / "b", use_quality_flags=False), field.observations, flags=flags)[
            ""
        ]
        ignored_counts = _reason_counts(caplog.text)
    assert used_counts["quality flag bad"] == 2 and ignored_counts["quality flag bad"] == 0
    assert _header(ignored)["NSEGMENT"] == _header(used)["NSEGMENT"] + 2
    assert _hits_of(ignored) > _hits_of(used)


# --------------------------------------------------------------------------------------------------
# Splits (docs/mapmaking.md#createmap-and-its-variants)
# --------------------------------------------------------------------------------------------------
def test_per_feed_split_makes_one_map_per_feed(field, tmp_path):
    maps = make_maps(_job(tmp_path, split_mode="per_feed"), field.observations)
    assert sorted(maps) == ["_feed01", "_feed02"]
    assert maps["_feed01"].name == "Opt_band0_ch0_feed01_feed01.fits"
    for suffix, feed in (("_feed01", 1), ("_feed02", 2)):
        assert _feeds(maps[suffix]) == [feed]
        assert _obsids(maps[suffix]) == OBSIDS
        assert _header(maps[suffix])["NSEGMENT"] == 2 * len(OBSIDS)


@pytest.mark.parametrize(
    "mode, first, second",
    [
        ("first_second_half", OBSIDS[:2], OBSIDS[2:]),  # split at the median start time
        ("alternate_obs", OBSIDS[0::2], OBSIDS[1::2]),  # alternate obsids
    ],
)
def test_observation_splits(field, tmp_path, mode, first, second):
    maps = make_maps(_job(tmp_path, split_mode=mode), field.observations)
    assert sorted(maps) == ["_jkA", "_jkB"]
    assert _obsids(maps["_jkA"]) == first and _obsids(maps["_jkB"]) == second
    for path, ids in ((maps["_jkA"], first), (maps["_jkB"], second)):
        h = _header(path)
        assert (h["NOBS"], h["OBSIDMIN"], h["OBSIDMAX"]) == (len(ids), min(ids), max(ids))
        assert _feeds(path) == SCIENCE_FEEDS


def test_custom_split_maps_each_labelled_group(field, tmp_path):
    groups = {"early": [OBSIDS[0]], "late": [OBSIDS[2], OBSIDS[3]]}
    maps = make_maps(_job(tmp_path, split_mode="custom", split_groups=groups), field.observations)
    assert sorted(maps) == ["_early", "_late"]
    assert _obsids(maps["_early"]) == groups["early"] and _obsids(maps["_late"]) == groups["late"]
    assert _header(maps["_early"])["NSEGMENT"] == 2 * len(SCIENCE_FEEDS)


def test_feed_halves_split_alternate_feeds_under_one_label(field, tmp_path):
    """Feeds at even / odd positions of the sorted selection; both files carry the selection's label,
    so the pair differs only by its suffix (what write_difference needs)."""
    job = _job(tmp_path, split_mode="feed_halves", feeds=[1, 2, 3, 5, 8])
    specs = job.expand(field.observations, [1, 2, 3, 5, 8])
    assert [(s.suffix, s.feeds, s.output_path.name, s.pair) for s in specs] == [
        ("_jkA", [1, 3, 8], "Opt_band0_ch0_feed01to03_05_08_jkA.fits", ("_jkA", "_jkB")),
        ("_jkB", [2, 5], "Opt_band0_ch0_feed01to03_05_08_jkB.fits", ("_jkA", "_jkB")),
    ]
    maps = make_maps(_job(tmp_path, split_mode="feed_halves"), field.observations)
    assert _feeds(maps["_jkA"]) == [1] and _feeds(maps["_jkB"]) == [2]
    assert maps["_jkA"].name.replace("_jkA", "_jkB") == maps["_jkB"].name


def _triangle_az(n: int, period: int, amplitude: float = 3.0) -> np.ndarray:
    """Azimuth of a constant-speed sweep back and forth (deg), starting upwards at 180°."""
    phase = (np.arange(n) % period) / period
    return 180.0 + amplitude * (2 * np.abs(2 * ((phase + 0.25) % 1.0) - 1) - 1)


def test_scan_direction_samples_split_by_the_sign_of_the_azimuth_velocity():
    """Increasing and decreasing sweeps go to +1 and −1; the turnarounds (slower than a tenth of the
    median speed) and non-finite azimuths to neither; a segment that does not move to neither."""
    clean = _triangle_az(2000, 400)
    velocity = np.gradient(clean)
    az = clean.copy()
    az[1000:1010] = np.nan
    up, down = scan_direction_samples(az, 1), scan_direction_samples(az, -1)
    assert not (up & down).any()
    assert np.all(velocity[up] > 0) and np.all(velocity[down] < 0)
    assert not up[1000:1010].any() and not down[1000:1010].any()
    # with a 5-sample smoothing of a sharp turn, at most ~3 samples per turnaround are lost
    assert (up | down).sum() >= 2000 - 10 - 3 * 10 - 10
    assert abs(int(up.sum()) - int(down.sum())) <= 20
    # the azimuth wraps through 0/360 without a false direction change
    wrapped = (clean - 180.0) % 360.0
    for direction in (1, -1):
        np.testing.assert_array_equal(
            scan_direction_samples(wrapped, direction), scan_direction_samples(clean, direction)
        )
    assert not scan_direction_samples(np.full(100, 120.0), 1).any()


def test_scan_direction_split_shares_segments_but_no_sample(field, tmp_path):
    """Both maps take every segment; their weighted samples are disjoint, each sweeps one way in
    azimuth (read from the files), and together they hold all but the turnarounds."""
    maps = make_maps(_job(tmp_path, split_mode="scan_direction", write_difference=True), field.observations)
    assert sorted(maps) == ["_diff", "_jkA", "_jkB"]
    np.testing.assert_allclose(
        _hdu(maps["_diff"], "DESTRIPED"),
        0.5 * (_hdu(maps["_jkA"], "DESTRIPED") - _hdu(maps["_jkB"], "DESTRIPED")),
        rtol=1e-5,
        atol=1e-7,
    )
    n_seg = 2 * len(SCIENCE_FEEDS) * len(OBSIDS)
    assert _header(maps["_jkA"])["NSEGMENT"] == _header(maps["_jkB"])["NSEGMENT"] == n_seg
    # sample level: one file through the reader with each direction
    job = _job(tmp_path)
    obs = field.observations[:1]
    reader = Level2DataReader(job.reader_settings(0, 0), _table())
    plans = reader.prepass(obs)
    geometry = job._geometry(JobInputs(obs, {}, SCIENCE_FEEDS, _table(), {}, logging.getLogger(LOG)))
    both = reader.read(plans, geometry)
    out = {
        d: Level2DataReader(job.reader_settings(0, 0, scan_direction=d), _table()).read(plans, geometry)
        for d in (1, -1)
    }
    used = {d: out[d].map_weights > 0 for d in out}
    assert not (used[1] & used[-1]).any()
    assert (used[1] | used[-1]).sum() >= 0.95 * (both.map_weights > 0).sum()
    with h5py.File(obs[0].level2_path, "r") as l2:
        az = np.concatenate([l2[PIXEL_AZ][p.ifeed, p.start : p.stop] for p in plans])
    velocity = np.concatenate([np.gradient(a) for a in np.split(az, np.cumsum([p.n for p in plans])[:-1])])
    assert np.all(velocity[used[1]] > 0) and np.all(velocity[used[-1]] < 0)


def test_rising_setting_split_by_the_hour_angle_of_each_segment(field, tmp_path):
    """The hour angle of each segment's mean pointing matches the simulated one (within the ±2.5 min
    of the observation, ≈ 1°), and the rising/setting maps take the observations east/west of the
    meridian."""
    job = _job(tmp_path, split_mode="rising_setting")
    plans = Level2DataReader(job.reader_settings(0, 0), _table()).prepass(field.observations)
    ha = segment_hour_angle_deg(plans)
    expected = {o: 15.0 * h for o, h in zip(OBSIDS, HOUR_ANGLES_H)}
    assert np.all(np.abs(ha - np.array([expected[p.obsid] for p in plans])) < 2.0)
    maps = make_maps(job, field.observations)
    assert _obsids(maps["_jkA"]) == OBSIDS[:2] and _obsids(maps["_jkB"]) == OBSIDS[2:]


# --------------------------------------------------------------------------------------------------
# Per-segment processing (docs/mapmaking.md#per-segment-processing)
# --------------------------------------------------------------------------------------------------
#: The observation whose first segment (feed 1, scan 0) is edited below: 60 % of its samples lie at
#: |b| > 0.75°, outside the default Legendre fit mask (detrend_mask_abs_b_deg), so that fit has data.
EDITED = 2


def _edited_copy(field, tmp_path, edit) -> tuple[SimpleNamespace, slice]:
    """A copy of observation ``EDITED`` with ``edit(x, flags)`` applied in place to feed 1, scan 0 of
    the binned, cleaned TOD (every band and channel) and its sample flags; returns the observation
    row and that segment's sample range."""
    path = tmp_path / field.level2[EDITED].name
    shutil.copyfile(field.level2[EDITED], path)
    with h5py.File(path, "a") as l2:
        a, b = (int(v) for v in l2[SCAN_EDGES][0])
        data = l2[BINNED_CLEANED_DATA]
        flags = l2[SAMPLE_FLAGS]
        x, f = data[0, :, :, a:b], flags[0, a:b]
        edit(x, f)
        data[0, :, :, a:b] = x
        flags[0, a:b] = f
    return _observation(OBSIDS[EDITED], path), slice(a, b)


def _read(job: CreateMap, obs, **given):
    """The reader's output for band 0, channel 0 of ``obs`` on the job's geometry, and its plans."""
    inputs = JobInputs(obs, {}, SCIENCE_FEEDS, _table(), {}, logging.getLogger(LOG))
    reader = Level2DataReader(job.reader_settings(0, 0, **given), _table())
    plans = reader.prepass(obs)
    return reader.read(plans, job._geometry(inputs)), plans


def _legendre_coefficients(y: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of P0, P1, P2 (in time across the segment) of ``y[good]``."""
    u = np.linspace(-1.0, 1.0, y.size)
    design = np.polynomial.legendre.legvander(u, 2)
    return np.linalg.lstsq(design[good], y[good].astype(np.float64), rcond=None)[0]


DRIFT = np.array([0.5, 0.2, 0.2])  # K: the constant, P1 and P2 added to the edited segment


@pytest.mark.parametrize(
    "detrend, removed",
    [("none", []), ("median", [0]), ("linear", [0, 1]), ("legendre", [0, 1, 2])],
)
def test_detrend_removes_what_it_fits(field, tmp_path, detrend, removed):
    """A drift 0.5 + 0.2 P1(t) + 0.2 P2(t) K added to one segment: what the detrended segment keeps of
    it (its difference from the same segment read without the drift) is the drift less the terms the
    mode fits — nothing removed by 'none', the level by 'median' (the median of the segment is then 0),
    level and slope by 'linear', all three by 'legendre' (fitted on |b| > 0.75° only, robustly, hence
    the 0.01 K tolerance, 5 % of a term; the terms kept must come back to 1e-3 K)."""
    u = None

    def add_drift(x, _flags):
        nonlocal u
        u = np.linspace(-1.0, 1.0, x.shape[-1])
        x += np.polynomial.legendre.legval(u, DRIFT).astype(np.float32)

    obs, _ = _edited_copy(field, tmp_path, add_drift)
    job = _job(tmp_path, detrend=detrend)
    drifted, plans = _read(job, [obs])
    clean, _ = _read(job, [_observation(OBSIDS[EDITED], field.level2[EDITED])])
    n = plans[0].n  # the first plan is feed 1, scan 0
    good = drifted.map_weights[:n] > 0
    kept = _legendre_coefficients(drifted.tod[:n] - clean.tod[:n], good)
    if detrend == "median":
        assert abs(float(np.median(drifted.tod[:n][good]))) < 1e-6
    for k in range(3):
        if k in removed:
            if not (detrend == "median" and k == 0):  # the median level differs from the mean by noise
                assert abs(kept[k]) < 0.01, (k, kept)
        else:
            assert abs(kept[k] - DRIFT[k]) < 1e-3, (k, kept)


def test_spike_sigma_zero_weights_the_spike_and_its_neighbours(field, tmp_path):
    """Three samples +1 K (100× the white noise) in the middle of one segment keep their weight by
    default (spike_sigma = None); spike_sigma = 5 gives them and spike_dilate (201) samples around
    them zero weight, and flags nothing in the other segments."""
    mid = 1500

    def spike(x, _flags):
        x[..., mid : mid + 3] += np.float32(1.0)

    obs, _ = _edited_copy(field, tmp_path, spike)
    default, plans = _read(_job(tmp_path), [obs])
    flagged, _ = _read(_job(tmp_path, spike_sigma=5.0), [obs])
    assert np.all(default.map_weights[mid : mid + 3] > 0)
    dropped = (default.map_weights > 0) & (flagged.map_weights == 0)
    expected = np.zeros(dropped.size, dtype=bool)
    expected[mid - 100 : mid + 3 + 100] = True
    np.testing.assert_array_equal(dropped, expected & (default.map_weights > 0))


# --------------------------------------------------------------------------------------------------
# Bright-source samples (docs/level2.md#source-mask)
# --------------------------------------------------------------------------------------------------
def test_bright_mask_map_is_a_level2_option(tmp_path):
    """bright_mask_map given to CreateMap: one ConfigError line naming where it moved."""
    from modules.pipeline_control.config import load_config
    from modules.pipeline_control.config_model import ErrorCollector

    cfg = tmp_path / "maps.toml"
    cfg.write_text(
        "[Master]\nsql_database = 'x.db'\npipeline = [\n"
        "  \"modules.MapMaking.MapMakingModules.CreateMap.CreateMap(bright_mask_map='planck.fits')\",\n]\n"
    )
    errors = ErrorCollector()
    load_config(cfg, "map", errors)
    (err,) = errors.errors
    assert "\n" not in err.message.strip()
    assert "bright_mask_map" in err.message and "is no longer a parameter" in err.message
    assert "CreateLevel2File" in err.message and "docs/level2.md#source-mask" in err.message


def test_bright_source_flag_from_level2_lowers_the_solver_weight(field, tmp_path):
    """A catalogue source at the field centre, given to CreateLevel2File, sets sample flag 16 within
    its 6′ radius; CreateMap keeps those samples in the map (HITS as with bright_downweight = 1,
    NAIVE within a tenth of the noise) and gives them bright_downweight (default 0.1) of their
    destriper weight, which changes the destriped map."""
    with h5py.File(field.level2[EDITED], "r") as l2:
        ra0 = float(np.median(l2["spectrometer/pixel_pointing/pixel_ra"][0]))
        dec0 = float(np.median(l2["spectrometer/pixel_pointing/pixel_dec"][0]))
    cat = tmp_path / "cat.csv"
    cat.write_text(f"name,frame,lon,lat,radius_arcmin\nX,icrs,{ra0},{dec0},6\n")
    path = reduce_in_process(
        field.level1[EDITED], tmp_path / "masked", _level2_modules(source_catalogue=str(cat))
    )[0]
    obs = [_observation(OBSIDS[EDITED], path)]
    out, plans = _read(_job(tmp_path), obs)
    with h5py.File(path, "r") as l2:
        flags = np.concatenate([l2[SAMPLE_FLAGS][p.ifeed, p.start : p.stop] for p in plans])
    bright = (flags & FLAG_BRIGHT_SOURCE) != 0
    used = out.map_weights > 0
    assert (bright & used).sum() > 100
    np.testing.assert_allclose(out.weights[bright & used], 0.1 * out.map_weights[bright & used], rtol=1e-6)
    np.testing.assert_array_equal(out.weights[~bright], out.map_weights[~bright])
    low = make_maps(_job(tmp_path / "low"), obs)[""]
    full = make_maps(_job(tmp_path / "full", bright_downweight=1.0), obs)[""]
    np.testing.assert_array_equal(_hdu(low, "HITS"), _hdu(full, "HITS"))
    # NAIVE is binned with the map weights, which bright_downweight does not touch; they are re-estimated
    # from the residual of the first destriping (docs/mapmaking.md#map-noise), which does depend on it,
    # so NAIVE moves by a small fraction of the noise while DESTRIPED moves by more
    # The noise scale is the white rms of each pixel (RMS_WHITE, exact), not the Monte Carlo RMS: the latter's
    # median over this one-observation map moves by ~5 % between sets of random draws.
    rms_white = _hdu(full, "RMS_WHITE")
    naive_shift = float(np.nanmax(np.abs(_hdu(low, "NAIVE") - _hdu(full, "NAIVE")) / rms_white))
    destriped_shift = float(np.nanmax(np.abs(_hdu(low, "DESTRIPED") - _hdu(full, "DESTRIPED")) / rms_white))
    assert naive_shift <= 0.1, naive_shift
    assert destriped_shift > 3 * naive_shift, (destriped_shift, naive_shift)


# --------------------------------------------------------------------------------------------------
# Masking (docs/mapmaking.md#name-and-hdus)
# --------------------------------------------------------------------------------------------------
def test_edge_clip_and_its_percentiles(field, tmp_path):
    """Off by default: no pixel has MASK bit 4. With edge_clip the pixels within edge_clip_width (2)
    of the hit boundary whose value lies outside clip_percentiles of the interior are masked (checked
    against the map); narrower percentiles clip more."""
    from scipy import ndimage

    obs = field.observations
    plain = make_maps(_job(tmp_path / "a"), obs)[""]
    clipped = make_maps(_job(tmp_path / "b", edge_clip=True), obs)[""]
    narrow = make_maps(_job(tmp_path / "c", edge_clip=True, clip_percentiles=[10.0, 90.0]), obs)[""]
    assert not np.any(_hdu(plain, "MASK") & 4)
    n_clipped = {}
    for path, (lo, hi) in ((clipped, (0.5, 99.5)), (narrow, (10.0, 90.0))):
        mask = _hdu(path, "MASK")
        base = mask & ~np.uint8(4)
        np.testing.assert_array_equal(base, _hdu(plain, "MASK"))
        sky = _hdu(plain, "DESTRIPED")
        good = base == 0
        interior = ndimage.binary_erosion(good, iterations=2)
        edge = good & ~interior
        p_lo, p_hi = np.percentile(sky[interior & np.isfinite(sky)], [lo, hi])
        expected = edge & ((sky < p_lo) | (sky > p_hi))
        np.testing.assert_array_equal((mask & 4) != 0, expected)
        n_clipped[hi] = int(expected.sum())
        assert f"{n_clipped[hi]} pixels clipped" in _header(path).comments["HIERARCH MASK EDGECLIP"]
    assert 0 < n_clipped[99.5] < n_clipped[90.0]


@pytest.mark.parametrize(
    "call, fragment",
    [
        ("clip_percentiles=[10.0, 90.0]", "clip_percentiles acts only with edge_clip=True"),
        ("edge_clip=True, clip_percentiles=[90.0, 10.0]", "clip_percentiles must be [low, high]"),
        ("edge_clip=True, clip_percentiles=[5.0]", "clip_percentiles must be [low, high]"),
    ],
)
def test_clip_percentiles_without_edge_clip_is_a_config_error(tmp_path, call, fragment):
    """clip_percentiles only parametrise edge_clip: alone, or not an increasing pair within [0, 100],
    they are refused when the config is loaded rather than silently doing nothing."""
    from modules.pipeline_control.config import load_config
    from modules.pipeline_control.config_model import ErrorCollector

    cfg = tmp_path / "maps.toml"
    cfg.write_text(
        "[Master]\nsql_database = 'x.db'\npipeline = [\n"
        f'  "modules.MapMaking.MapMakingModules.CreateMap.CreateMap({call})",\n]\n'
    )
    errors = ErrorCollector()
    load_config(cfg, "map", errors)
    assert [fragment in e.message for e in errors.errors] == [True]
