"""CreateLevel2File (docs/level2.md#createlevel2file): hk copies and scaling, the level-2 feed axis,
recomputed RA/Dec."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists import CheckLevel1FileExists
from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File
from modules.SQLModule.SQLModule import COMAPData
from utils.constants import GROUND_FEED
from utils.coordinates import angular_separation_deg
from utils.errors import BadCOMAPFile
from utils.level1 import Level1File

PER_FEED = [
    "spectrometer/tod",
    "spectrometer/pixel_pointing/pixel_az",
    "spectrometer/pixel_pointing/pixel_el",
    "spectrometer/pixel_pointing/pixel_ra",
    "spectrometer/pixel_pointing/pixel_dec",
    "spectrometer/pixel_pointing/pixel_xoffset",
    "spectrometer/pixel_pointing/pixel_yoffset",
]


def file_info_for(level1_path, level2_path) -> COMAPData:
    with Level1File(level1_path) as l1:
        attrs = l1.attrs()
    fi = COMAPData(
        obsid=int(attrs["obsid"]),
        level1_path=str(level1_path),
        source=str(attrs["source"]),
        source_group="Galactic",
        utc_start=str(attrs["utc_start"]),
    )
    fi.level2_path = str(level2_path)
    return fi


def create(level1_path, tmp_path, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    l2 = tmp_path / "out.hd5"
    fi = file_info_for(level1_path, l2)
    CreateLevel2File(output_dir=str(tmp_path), **kwargs).run(fi)
    return l2, fi


def shuffled_copy(src, dst, order):
    """Copy a level-1 file with its feed axis permuted (order = new position → old position)."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        feeds = f["spectrometer/feeds"][...]
        f["spectrometer/feeds"][...] = feeds[order]
        for path in PER_FEED:
            data = f[path][...]
            f[path][...] = data[order]
    return dst


def test_hk_integer_scaling_and_copies(small_archive, tmp_path):
    src = small_archive["GField30"]
    l2, _ = create(src, tmp_path)
    with h5py.File(src, "r") as raw, h5py.File(l2, "r") as out:
        for name in ("angle", "Tshroud", "Tvane", "Tambient"):
            stored = raw[f"hk/antenna0/vane/{name}"][...]
            assert np.issubdtype(stored.dtype, np.integer)
            copied = out[f"hk/antenna0/vane/{name}"][...]
            assert copied.dtype == np.float64
            np.testing.assert_array_equal(copied, stored.astype(np.float64) * 0.01)
            assert np.all(np.abs(copied[stored != 0]) > 0)  # the legacy bug made these 0
        assert out["hk/antenna0/vane/angle"].attrs["unit"] == "deg"
        np.testing.assert_array_equal(
            out["hk/array/frame/features"][...], raw["hk/array/frame/features"][...]
        )
        np.testing.assert_array_equal(out["spectrometer/MJD"][...], raw["spectrometer/MJD"][...])
        np.testing.assert_array_equal(out["spectrometer/frequency"][...], raw["spectrometer/frequency"][...])
        assert out["hk/array/weather/pressure"].dtype == np.float64
        assert dict(out["comap"].attrs)["obsid"] == raw["comap"].attrs["obsid"]
        assert out.attrs["level2_format_version"] == 1
        assert out.attrs["level1_size_bytes"] == src.stat().st_size


def test_feed_axis_excludes_ground_feed_and_keeps_level1_order(small_archive, tmp_path):
    src = small_archive["TauA"]
    with h5py.File(src, "r") as f:
        n = len(f["spectrometer/feeds"])
    order = np.roll(np.arange(n), 2)[::-1]
    shuffled = shuffled_copy(src, tmp_path / src.name, order)
    l2_plain, _ = create(src, tmp_path / "a")
    l2_shuf, _ = create(shuffled, tmp_path / "b")
    with h5py.File(shuffled, "r") as raw, h5py.File(l2_shuf, "r") as out, h5py.File(l2_plain, "r") as ref:
        l1_feeds = raw["spectrometer/feeds"][...]
        feeds = out["spectrometer/feeds"][...]
        assert GROUND_FEED not in feeds
        assert list(feeds) == [f for f in l1_feeds if f != GROUND_FEED]
        assert list(l1_feeds[out["spectrometer/level1_feed_index"][...]]) == list(feeds)
        ref_feeds = list(ref["spectrometer/feeds"][...])
        for i, feed in enumerate(feeds):
            j = ref_feeds.index(feed)
            for name in ("pixel_az", "pixel_el", "pixel_ra", "pixel_dec"):
                np.testing.assert_array_equal(
                    out[f"spectrometer/pixel_pointing/{name}"][i],
                    ref[f"spectrometer/pixel_pointing/{name}"][j],
                )


@pytest.mark.parametrize("source", ["TauA", "GField30"])
def test_radec_recomputed_within_0p1_arcsec_of_astropy(small_archive, tmp_path, source):
    """The simulator wrote pixel_ra/dec with astropy's full per-sample AltAz→ICRS transform; the level-2
    copy is recomputed from az/el by the pipeline's own code and must agree at every sample."""
    src = small_archive[source]
    l2, _ = create(src, tmp_path)
    with h5py.File(src, "r") as raw, h5py.File(l2, "r") as out:
        idx = out["spectrometer/level1_feed_index"][...]
        for i, pos in enumerate(idx):
            ra0 = raw["spectrometer/pixel_pointing/pixel_ra"][pos]
            dec0 = raw["spectrometer/pixel_pointing/pixel_dec"][pos]
            ra = out["spectrometer/pixel_pointing/pixel_ra"][i]
            dec = out["spectrometer/pixel_pointing/pixel_dec"][i]
            sep = angular_separation_deg(ra0, dec0, ra, dec) * 3600.0
            assert np.nanmax(sep) <= 0.1
        assert out["spectrometer/pixel_pointing/pixel_dec"].attrs["frame"] == "icrs"
        assert not out["spectrometer/pixel_pointing/pixel_dec"].attrs["refraction"]


def test_nonfinite_pointing_flagged(tiny_archive, tmp_path):
    src = tmp_path / tiny_archive.paths[0].name
    shutil.copyfile(tiny_archive.paths[0], src)
    with h5py.File(src, "a") as f:
        f["spectrometer/pixel_pointing/pixel_az"][0, 100:110] = np.nan
    l2, _ = create(src, tmp_path / "o")
    with h5py.File(l2, "r") as out:
        flags = out["level2/sample_flags"][...]
        idx = list(out["spectrometer/level1_feed_index"][...])
        i = idx.index(0)
        assert np.all(flags[i, 100:110] & 8)
        assert not np.any(flags[i, :100] & 8) and not np.any(flags[i, 110:] & 8)
        assert np.all(np.isnan(out["spectrometer/pixel_pointing/pixel_ra"][i, 100:110]))


def test_missing_required_dataset_and_optional_ones(tiny_archive, tmp_path):
    src = tmp_path / tiny_archive.paths[0].name
    shutil.copyfile(tiny_archive.paths[0], src)
    with h5py.File(src, "a") as f:
        del f["hk/array/weather"]
    l2, _ = create(src, tmp_path / "o")  # weather is optional
    with h5py.File(l2, "r") as out:
        assert "hk/array/weather" not in out
    custom = [["spectrometer/MJD", 1.0], ["hk/antenna0/vane/NoSuchThing", 0.01]]
    with pytest.raises(BadCOMAPFile, match="missing dataset hk/antenna0/vane/NoSuchThing"):
        create(src, tmp_path / "p", level1_datasets=custom)


def test_provenance_and_done_check(tiny_archive, tmp_path):
    l2, fi = create(tiny_archive.paths[0], tmp_path)
    mod = CreateLevel2File(output_dir=str(tmp_path))
    assert mod.already_processed(fi)
    assert not mod.already_processed(fi, overwrite=True)
    with h5py.File(l2, "r") as out:
        attrs = out["spectrometer/pixel_pointing/pixel_dec"].attrs
        for key in ("module", "parameters_json", "parameters_sha256", "comap_reduce_version", "written_utc"):
            assert attrs[key]
        assert attrs["status"] == "complete"
        assert attrs["module"].endswith("CreateLevel2File.CreateLevel2File")


def test_level2_path_template(tiny_archive, tmp_path):
    fi = file_info_for(tiny_archive.paths[0], tmp_path / "x.hd5")
    mod = CreateLevel2File(output_dir=str(tmp_path / "root"), save_dir_structure="{source_group}/{obsid}/")
    path = mod.level2_path_for(fi)
    assert path == str(
        tmp_path / "root" / "Galactic" / f"{fi.obsid:07d}" / f"Level2_{tiny_archive.paths[0].name}"
    )
    assert CreateLevel2File.validate_config({"save_dir_structure": "{nonsense}/"})
    assert CreateLevel2File.validate_config({"level1_datasets": [["x", "one"]]})


def test_check_level1_records_size(tiny_archive, tmp_path):
    from modules.SQLModule.SQLModule import db

    fi = file_info_for(tiny_archive.paths[0], tmp_path / "x.hd5")
    db.connect(str(tmp_path / "db.sqlite"))
    try:
        db.upsert_observation({"obsid": fi.obsid, "source": fi.source})
        with db.deferring() as ops:
            CheckLevel1FileExists().run(fi)
        assert [op.name for op in ops] == ["upsert_observation"]
        assert ops[0].args[0]["level1_size_bytes"] == tiny_archive.paths[0].stat().st_size
        assert CheckLevel1FileExists().already_processed(fi)
    finally:
        db.disconnect()


def test_radec_in_feed_groups_equals_all_feeds_at_once(small_archive, tmp_path, monkeypatch):
    """RA/Dec are converted for groups of feeds (bounded temporaries); one feed per group must give
    what one call for all feeds gives (docs/mapmaking.md#coordinates)."""
    import importlib

    module = importlib.import_module("modules.ProcessLevel2.CreateLevel2File.CreateLevel2File")
    src = small_archive["GField30"]
    l2_all, _ = create(src, tmp_path / "all")
    monkeypatch.setattr(module, "_RADEC_SAMPLES_PER_CALL", 1)
    l2_one, _ = create(src, tmp_path / "one")
    with h5py.File(l2_all, "r") as a, h5py.File(l2_one, "r") as b:
        for name in ("pixel_ra", "pixel_dec"):
            x = a[f"spectrometer/pixel_pointing/{name}"][...]
            y = b[f"spectrometer/pixel_pointing/{name}"][...]
            assert x.shape[0] > 1
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-9 / 3600.0)  # float64 rounding only
