"""CreateHitMap, the worked example of a map product: hits and integration time per pixel."""

from __future__ import annotations

import h5py
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from conftest import LEVEL2_THROUGH_NOISE_STATS

from utils.coordinates import icrs_to_galactic
from utils.level2 import FEEDS, MJD, NOISE_STATS, PIXEL_DEC, PIXEL_EL, PIXEL_RA, SCAN_EDGES

HIT_MAP = "modules.MapMaking.MapMakingModules.CreateHitMap.CreateHitMap"
CREATE_MAP = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"


def expected_hits(level2_path, band: int, channel: int, wcs: WCS, shape) -> tuple[np.ndarray, float]:
    """Valid samples per pixel counted directly from the level-2 file, and its sample time (s)."""
    hits = np.zeros(shape, dtype=np.int64)
    with h5py.File(level2_path, "r") as l2:
        tod = l2["level2/binned_cleaned_data"]
        auto_rms = l2[NOISE_STATS.resolve(dataset="binned_cleaned_data")]["auto_rms"]
        dt = float(np.median(np.diff(l2[MJD][...]))) * 86400.0
        for ifeed, _feed in enumerate(l2[FEEDS][...]):
            for s, (a, b) in enumerate(l2[SCAN_EDGES][...]):
                rms = auto_rms[ifeed, band, channel, s]
                el = l2[PIXEL_EL][ifeed, a:b]
                if not (np.isfinite(rms) and 0 < rms <= 0.1) or not np.all((el > 0) & (el < 90)):
                    continue
                x = tod[ifeed, band, channel, a:b]
                lon, lat = icrs_to_galactic(l2[PIXEL_RA][ifeed, a:b], l2[PIXEL_DEC][ifeed, a:b])
                px, py = wcs.world_to_pixel_values(lon, lat)
                ix, iy = np.floor(px + 0.5).astype(int), np.floor(py + 0.5).astype(int)
                ok = np.isfinite(x) & (ix >= 0) & (ix < shape[1]) & (iy >= 0) & (iy < shape[0])
                np.add.at(hits, (iy[ok], ix[ok]), 1)
    return hits, dt


def test_hit_map_counts_the_valid_samples_of_each_pixel(workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs(
        LEVEL2_THROUGH_NOISE_STATS,
        extra_stages=["modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')"],
    )
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{HIT_MAP}(map_name='H', source='GField30', band=1, channel=0, sigma_red_cutoff_k=1e9)\",\n"
        f"  \"{HIT_MAP}(map_name='F', source='GField30', band=1, channel=0, sigma_red_cutoff_k=1e9, "
        'per_feed=True, quicklook=False)",\n'
        "]\n"
        f"[{HIT_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\n"
    )
    res = ws.run()
    assert res.returncode == 0, res.stderr
    (level2,) = ws.level2_files()
    path = ws.root / "maps" / "H_band1_ch0_feed01to02_hits.fits"
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["HITS", "TIME"]
        hits = hdul["HITS"].data
        seconds = hdul["TIME"].data
        wcs = WCS(hdul[0].header).celestial
        assert hdul[0].header["NSAMPLE"] == int(hits.sum())
    want, dt = expected_hits(level2, 1, 0, wcs, hits.shape)
    assert want.sum() > 1000
    assert np.array_equal(hits, want)
    assert np.array_equal(seconds, (hits * dt).astype(np.float32))
    assert path.with_suffix(".png").exists()
    # one map per feed; together they hold every hit
    per_feed = sorted((ws.root / "maps").glob("F_*_hits.fits"))
    assert [p.name for p in per_feed] == ["F_band1_ch0_feed01_hits.fits", "F_band1_ch0_feed02_hits.fits"]
    total = sum(fits.getdata(p, "HITS").astype(np.int64) for p in per_feed)
    assert np.array_equal(total, hits)


def test_a_job_of_another_product_is_a_config_error(workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs(
        extra_stages=["modules.MapMaking.MapMaking.LineMapMaking(config_file='cubes.toml')"],
    )
    (ws.root / "cubes.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        f"  \"{CREATE_MAP}(map_name='M', source='GField30', calibration='none')\",\n"
        f"  \"{HIT_MAP}(map_name='H', source='GField30', calibration='none')\",\n"
        "]\n"
    )
    res = ws.run()
    assert res.returncode == 2
    assert "CreateMap" in res.stderr and "LineMapMaking makes cubes only" in res.stderr
    assert "CreateHitMap" in res.stderr
