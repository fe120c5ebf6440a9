"""FindScans (docs/level2.md#findscans): scan edges against the simulator truth, sample flags, regression
cases.

Truth: ``truth/scans/edges`` holds the nominal feature runs (for Lissajous the status-1 runs), so
feature-, stare- and sky-dip-defined scans must equal it exactly (trims are 0 by default). Lissajous
scans come from the deTracker status on its own 10 Hz clock with previous-value interpolation, so each
edge lags the truth by 0 … 1 hk interval (f_s / hk_rate samples, derived from the file).
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from modules.pipeline_control.provenance import is_complete
from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File
from modules.ProcessLevel2.FindScans.FindScans import FindScans, scan_edges_from_mask
from modules.SQLModule.SQLModule import COMAPData
from utils.errors import BadCOMAPFile
from utils.level1 import Level1File
from utils.level2 import FLAG_BRIGHT_SOURCE, FLAG_LEVEL1_NAN, FLAG_OUTSIDE_SCAN, FLAG_VANE
from utils.simulator import ObservationSpec, ScanSpec, SkySpec, simulate_observation

SOURCE_GROUPS = {"TauA": "Calibrator", "SkyDip": "SkyDip", "GField30": "Galactic"}
LISSAJOUS_TRIMS_S = (20.0, 2.0)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def file_info_for(level1_path, level2_path, source_group: str) -> COMAPData:
    with Level1File(level1_path) as l1:
        attrs = l1.attrs()
    fi = COMAPData(
        obsid=int(attrs["obsid"]),
        level1_path=str(level1_path),
        source=str(attrs["source"]).split(",")[0],
        source_group=source_group,
        utc_start=str(attrs["utc_start"]),
    )
    fi.level2_path = str(level2_path)
    return fi


def create_level2(level1_path, tmp_path, source_group: str) -> COMAPData:
    """CreateLevel2File in-process (standalone, as a user script would)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fi = file_info_for(level1_path, tmp_path / "level2.hd5", source_group)
    CreateLevel2File(output_dir=str(tmp_path), compute_radec=False).run(fi)
    return fi


def scans_of(fi) -> tuple[np.ndarray, str, np.ndarray]:
    with h5py.File(fi.level2_path, "r") as l2:
        assert is_complete(l2, "level2/scan_edges")
        return (
            l2["level2/scan_edges"][...],
            str(l2["level2/scan_edges"].attrs["scan_mode"]),
            # bit 16 (the bright-source mask on calibrators) is CreateLevel2File's, not FindScans'
            l2["level2/sample_flags"][...] & np.uint8(0xFF & ~FLAG_BRIGHT_SOURCE),
        )


def truth_of(level1_path) -> dict:
    with h5py.File(level1_path, "r") as f:
        t = f["truth"]
        return {
            "scans": t["scans/edges"][...],
            "kinds": [k.decode() for k in t["scans/kind"][...]],
            "vane": t["vane/event_edges"][...],
            "n_tod": f["spectrometer/MJD"].shape[0],
        }


def expected_flags(n_tod: int, scans: np.ndarray, vane: np.ndarray) -> np.ndarray:
    bits = np.full(n_tod, FLAG_OUTSIDE_SCAN, dtype=np.uint8)
    for a, b in scans:
        bits[a:b] = 0
    for a, b in vane:
        bits[a:b] |= FLAG_VANE
    return bits


def hk_interval_samples(level1_path, group: str = "hk/antenna0/deTracker") -> int:
    """One hk sample interval expressed in spectrometer samples (from the file's own clocks)."""
    with h5py.File(level1_path, "r") as f:
        dt_hk = np.median(np.diff(f[f"{group}/utc"][...]))
        dt_sp = np.median(np.diff(f["spectrometer/MJD"][...]))
    return int(np.ceil(dt_hk / dt_sp - 1e-6))


def simulate(tmp_path_factory, name: str, **kwargs) -> str:
    out = tmp_path_factory.mktemp(name)
    spec = ObservationSpec(**kwargs)
    return str(simulate_observation(spec, out, seed=3))


# ------------------------------------------------------------------------------------------------
# custom simulations (module scope: each is made once)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raster_file(tmp_path_factory):
    return simulate(
        tmp_path_factory, "raster", obsid=92001, source="TauA", hour_angle_h=-1.0, feeds=[1, 20],
        n_channels=8, scan=ScanSpec(kind="raster", duration_s=30.0), sky=SkySpec(kind="taua"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def long_stare_file(tmp_path_factory):
    """A 20-minute stare without any vane event (60 000 samples; 1 feed, 8 channels)."""
    return simulate(
        tmp_path_factory, "stare", obsid=92002, source="TauA", hour_angle_h=-1.0, feeds=[1],
        n_channels=8, scan=ScanSpec(kind="stare", duration_s=1200.0), sky=SkySpec(kind="taua"),
        vane_at_start=False, vane_at_end=False, gain_fluctuations=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_lissajous_file(tmp_path_factory):
    """Two Lissajous blocks of 40 s separated by a 30 s repoint (deTracker status 0 in between)."""
    return simulate(
        tmp_path_factory, "liss2", obsid=92003, source="TauA", hour_angle_h=-1.0, feeds=[2, 20, 1],
        n_channels=8, scan=ScanSpec(kind="lissajous", n_segments=2, duration_s=40.0, repoint_s=30.0),
        sky=SkySpec(kind="taua"),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# truth tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source,mode", [("GField30", "ces"), ("SkyDip", "skydip")])
def test_ces_and_skydip_scans_equal_truth(small_archive, tmp_path, source, mode):
    src = small_archive[source]
    fi = create_level2(src, tmp_path, SOURCE_GROUPS[source])
    with h5py.File(fi.level2_path, "r") as l2:
        flags_before = l2["level2/sample_flags"][...]
    FindScans().run(fi)
    truth = truth_of(src)
    scans, scan_mode, flags = scans_of(fi)
    assert scan_mode == mode
    np.testing.assert_array_equal(scans, truth["scans"])
    assert scans.dtype == np.int64
    bits = expected_flags(truth["n_tod"], truth["scans"], truth["vane"])
    for ifeed in range(flags.shape[0]):  # the same flags for every feed, other bits untouched
        np.testing.assert_array_equal(flags[ifeed], flags_before[ifeed] | bits)
    assert FindScans().already_processed(fi)


def test_raster_scans_equal_truth(raster_file, tmp_path):
    fi = create_level2(raster_file, tmp_path, "Calibrator")
    FindScans().run(fi)
    truth = truth_of(raster_file)
    scans, scan_mode, flags = scans_of(fi)
    assert truth["kinds"] == ["raster"]
    assert scan_mode == "raster"
    np.testing.assert_array_equal(scans, truth["scans"])
    np.testing.assert_array_equal(flags[0], expected_flags(truth["n_tod"], truth["scans"], truth["vane"]))


def test_lissajous_edges_within_one_hk_sample(small_archive, tmp_path):
    """Zero-order hold on the 10 Hz status: each edge lags truth + trims by 0 … 1 hk interval."""
    src = small_archive["TauA"]
    fi = create_level2(src, tmp_path, "Calibrator")
    FindScans().run(fi)
    truth = truth_of(src)
    scans, scan_mode, flags = scans_of(fi)
    assert scan_mode == "lissajous"
    with Level1File(src) as l1:
        fs = l1.sample_rate_hz()
    n_hk = hk_interval_samples(src)
    assert n_hk == 5  # 10 Hz status on 50 Hz spectrometer samples
    nominal = truth["scans"] + np.array([round(LISSAJOUS_TRIMS_S[0] * fs), -round(LISSAJOUS_TRIMS_S[1] * fs)])
    assert scans.shape == nominal.shape
    lag = scans - nominal
    assert np.all((lag >= 0) & (lag <= n_hk)), lag
    bits = expected_flags(truth["n_tod"], scans, truth["vane"])
    np.testing.assert_array_equal(flags, np.broadcast_to(bits, flags.shape))


def test_two_lissajous_blocks_are_two_scans_without_the_gap(two_lissajous_file, tmp_path):
    fi = create_level2(two_lissajous_file, tmp_path, "Calibrator")
    FindScans().run(fi)
    truth = truth_of(two_lissajous_file)
    scans, scan_mode, flags = scans_of(fi)
    assert scan_mode == "lissajous"
    assert truth["scans"].shape == (2, 2)
    fs = 50.0
    with Level1File(two_lissajous_file) as l1:
        fs = l1.sample_rate_hz()
    n_hk = hk_interval_samples(two_lissajous_file)
    nominal = truth["scans"] + np.array([round(LISSAJOUS_TRIMS_S[0] * fs), -round(LISSAJOUS_TRIMS_S[1] * fs)])
    assert scans.shape == (2, 2)
    lag = scans - nominal
    assert np.all((lag >= 0) & (lag <= n_hk)), lag
    gap = slice(int(truth["scans"][0, 1]) + n_hk, int(truth["scans"][1, 0]))  # the 30 s repoint
    assert gap.stop - gap.start > 25 * fs
    assert scans[0, 1] <= gap.start and scans[1, 0] >= gap.stop
    assert np.all(flags[:, gap] & FLAG_OUTSIDE_SCAN)


def test_long_stare_without_vane(long_stare_file, tmp_path):
    """No vane (no crash, no vane flag); a 20-minute stare is split into 2 equal scans at 600 s."""
    fi = create_level2(long_stare_file, tmp_path, "Calibrator")
    FindScans().run(fi)
    truth = truth_of(long_stare_file)
    assert truth["vane"].shape == (0, 2) and truth["kinds"] == ["stare"]
    (start, stop), n = truth["scans"][0], truth["n_tod"]
    assert (stop - start) == 60_000  # 1200 s at 50 Hz
    scans, scan_mode, flags = scans_of(fi)
    assert scan_mode == "stare"
    half = start + (stop - start) // 2
    np.testing.assert_array_equal(scans, [[start, half], [half, stop]])
    assert not np.any(flags & FLAG_VANE)
    np.testing.assert_array_equal(flags[0], expected_flags(n, truth["scans"], truth["vane"]))

    FindScans(max_scan_length_s=1500.0, overwrite=True).run(fi)  # without the split: exactly truth
    scans, scan_mode, _ = scans_of(fi)
    np.testing.assert_array_equal(scans, truth["scans"])


def test_time_gap_splits_a_scan(small_archive, tmp_path):
    """Shift every sample after j by +1 s: the scan containing j becomes [s, j) and [j, e)."""
    src = tmp_path / "gap" / "comap-0090103-gap.hd5"
    src.parent.mkdir()
    shutil.copyfile(small_archive["GField30"], src)
    truth = truth_of(src)
    (s0, e0), (s1, e1) = truth["scans"]
    j = (s0 + e0) // 2
    k = (s1 + e1) // 2
    with h5py.File(src, "a") as f:
        mjd = f["spectrometer/MJD"][...]
        mjd[j:] += 1.0 / 86400.0  # a 1 s gap before sample j (splits: > max_gap_s = 0.1 s)
        mjd[k:] += 0.05 / 86400.0  # a 0.07 s step before sample k (kept: < max_gap_s)
        f["spectrometer/MJD"][...] = mjd
    fi = create_level2(src, tmp_path / "out", "Galactic")
    FindScans().run(fi)
    scans, _, flags = scans_of(fi)
    np.testing.assert_array_equal(scans, [[s0, j], [j, e0], [s1, e1]])
    assert not np.any(flags[:, s0:e0] & FLAG_OUTSIDE_SCAN)


def test_categorical_status_is_never_interpolated_linearly(small_archive, tmp_path):
    """Legacy bug: a 0 → 2 status step interpolated linearly passes through the 'scanning' code 1.

    A deTracker group is added to the CES file with its clock on every 4th spectrometer sample, so
    linear interpolation would give exactly 1 at the sample between a 0 and a 2: Lissajous mode with
    one-sample scans. Previous-value interpolation never produces 1, so the file stays a CES file.
    """
    src = tmp_path / "cat" / "comap-0090103-cat.hd5"
    src.parent.mkdir()
    shutil.copyfile(small_archive["GField30"], src)
    with h5py.File(src, "a") as f:
        mjd = f["spectrometer/MJD"][...]
        t_hk = mjd[::4]
        status = np.where(np.arange(t_hk.size) % 20 < 10, 0, 2).astype(np.int32)
        grp = f.require_group("hk/antenna0").create_group("deTracker")
        grp.create_dataset("utc", data=t_hk + 0.6 / 86400.0)
        grp.create_dataset("lissajous_status", data=status)
    linear = np.interp(mjd, t_hk, status.astype(float))
    assert np.any(linear == 1.0)  # the trap is real
    fi = create_level2(src, tmp_path / "out", "Galactic")
    FindScans().run(fi)
    scans, scan_mode, _ = scans_of(fi)
    assert scan_mode == "ces"
    np.testing.assert_array_equal(scans, truth_of(src)["scans"])


def test_hk_axes_of_different_lengths(small_archive, tmp_path):
    """The frame and vane hk groups on very different axes do not matter to FindScans."""
    src = tmp_path / "hk" / "comap-0090101-hk.hd5"
    src.parent.mkdir()
    shutil.copyfile(small_archive["TauA"], src)
    with h5py.File(src, "a") as f:
        frame = f["hk/array/frame"]
        n = frame["utc"].shape[0] // 3
        for name in ("utc", "features"):
            data = frame[name][:n]
            del frame[name]
            frame.create_dataset(name, data=data)
    fi = create_level2(src, tmp_path / "out", "Calibrator")
    FindScans().run(fi)
    ref = create_level2(small_archive["TauA"], tmp_path / "ref", "Calibrator")
    FindScans().run(ref)
    np.testing.assert_array_equal(scans_of(fi)[0], scans_of(ref)[0])


# ------------------------------------------------------------------------------------------------
# flags, reruns, failures, config, plots
# ------------------------------------------------------------------------------------------------
def test_flags_are_or_ed_and_recomputed_on_overwrite(small_archive, tmp_path):
    src = small_archive["GField30"]
    fi = create_level2(src, tmp_path, "Galactic")
    truth = truth_of(src)
    with h5py.File(fi.level2_path, "a") as l2:
        flags = l2["level2/sample_flags"]
        row = flags[0]
        row[::7] |= FLAG_LEVEL1_NAN
        flags[0] = row
        marked = row.copy()
    FindScans().run(fi)
    FindScans(trim_start_s=10.0, overwrite=True).run(fi)
    scans, _, flags = scans_of(fi)
    shifted = truth["scans"] + np.array([500, 0])
    np.testing.assert_array_equal(scans, shifted)
    bits = expected_flags(truth["n_tod"], shifted, truth["vane"])
    np.testing.assert_array_equal(flags[0], marked | bits)  # bit 4 kept, bit 1 not stale
    np.testing.assert_array_equal(flags[1], bits)
    assert FindScans(trim_start_s=10.0).already_processed(fi)


def test_no_scans_is_one_clear_error(small_archive, tmp_path):
    src = tmp_path / "noscan" / "comap-0090103-noscan.hd5"
    src.parent.mkdir()
    shutil.copyfile(small_archive["GField30"], src)
    with h5py.File(src, "a") as f:
        words = f["spectrometer/features"][...]
        words[words != 8192] = 0
        f["spectrometer/features"][...] = words
    fi = create_level2(src, tmp_path / "out", "Galactic")
    with pytest.raises(BadCOMAPFile) as err:
        FindScans().run(fi)
    assert (
        err.value.message
        == "no scans found: decoded features present {-1, 13}, lissajous status present False"
    )
    with h5py.File(fi.level2_path, "r") as l2:
        assert "level2/scan_edges" not in l2


def test_scan_edges_from_mask_rules():
    """Run → scan with the last sample kept, trims, equal-part split, minimum length (pure function)."""
    fs = 50.0
    mjd = 60000.0 + np.arange(4000) / fs / 86400.0
    cand = np.zeros(4000, dtype=bool)
    cand[100:1100] = True  # 20 s
    cand[1500:1550] = True  # 1 s: dropped
    cand[2000:3999] = True  # 39.98 s ending one sample before the end
    edges = scan_edges_from_mask(
        cand, mjd, fs, max_scan_length_s=15.0, min_scan_length_s=2.0, trim_end_s=0.02
    )
    np.testing.assert_array_equal(edges, [[100, 600], [600, 1099], [2000, 2666], [2666, 3332], [3332, 3998]])


def test_validate_config_reports_bad_values():
    assert FindScans.validate_config({}) == []
    problems = FindScans.validate_config(
        {"scan_feature_priority": [8, 13], "max_gap_s": 0, "min_scan_length_s": 5.0, "max_scan_length_s": 1.0}
    )
    text = "\n".join(problems)
    assert "vane feature 13" in text and "max_gap_s must be > 0" in text and "max_scan_length_s" in text
    assert FindScans.validate_config({"scan_feature_priority": []})
    assert FindScans.validate_config({"trim_start_s": -1.0})


def test_plot_writes_png(small_archive, tmp_path):
    fi = create_level2(small_archive["TauA"], tmp_path, "Calibrator")
    FindScans(plot=True, plot_dir=str(tmp_path / "plots")).run(fi)
    png = tmp_path / "plots" / f"{fi.obsid:07d}_scans.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# inside python run.py
# ------------------------------------------------------------------------------------------------
def test_through_run_py_with_system_temperature(workspace_factory, small_archive):
    ws = workspace_factory(small_archive.paths)
    ws.write_configs(
        [
            "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
            "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
            "modules.ProcessLevel2.SystemTemperature.SystemTemperature.SystemTemperature()",
            "modules.ProcessLevel2.FindScans.FindScans.FindScans()",
        ],
        nprocess=2,
    )
    res = ws.run()
    assert res.returncode == 0, res.stdout + res.stderr
    files = ws.level2_files()
    assert len(files) == 3
    n_scans = {}
    for f in files:
        with h5py.File(f, "r") as l2:
            assert is_complete(l2, "level2/vane") and is_complete(l2, "level2/scan_edges")
            n_scans[int(l2.attrs["obsid"])] = l2["level2/scan_edges"].shape[0]
            assert np.isfinite(l2["level2/vane/system_temperature"][...]).all()
    assert n_scans == {90101: 1, 90102: 1, 90103: 2}
    db = ws.db()
    try:
        rows = {s["obsid"]: s for s in db.query_observation_summaries()}
        assert {j.status for j in db.job_table("level2")} == {"done"}
    finally:
        db.disconnect()
    for obsid, n in n_scans.items():
        assert rows[obsid]["n_scans"] == n
        # simulated Tsys is 35–60 K (docs/simulator.md#receiver-temperature)
        assert 30.0 < rows[obsid]["median_tsys"] < 70.0


def test_bad_parameters_stop_the_run_before_any_work(workspace_factory, small_archive):
    ws = workspace_factory([small_archive["GField30"]])
    ws.write_configs(
        [
            "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
            "modules.ProcessLevel2.FindScans.FindScans.FindScans(max_gap_s=0, scan_feature_priority=[13])",
        ]
    )
    res = ws.run()
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert "ConfigError" in out and "max_gap_s must be > 0" in out and "vane feature 13" in out
    assert ws.level2_files() == []
