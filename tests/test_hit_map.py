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


def expected_hits(
    level2_path, band: int, channel: int, wcs: WCS, shape, sigma_red_cutoff_k: float = 0.4
) -> tuple[np.ndarray, float]:
    """Valid samples per pixel counted directly from the level-2 file, and its sample time (s).

    The segment cuts are the documented defaults of every map product: white noise per sample in
    (0, 0.1 K], red noise at most ``sigma_red_cutoff_k`` (K; a segment without a fit is kept), and a
    finite elevation inside (0, 90) deg.
    """
    hits = np.zeros(shape, dtype=np.int64)
    with h5py.File(level2_path, "r") as l2:
        tod = l2["level2/binned_cleaned_data"]
        stats = l2[NOISE_STATS.resolve(dataset="binned_cleaned_data")]
        auto_rms, sigma_red = stats["auto_rms"], stats["sigma_red"]
        dt = float(np.median(np.diff(l2[MJD][...]))) * 86400.0
        for ifeed, _feed in enumerate(l2[FEEDS][...]):
            for s, (a, b) in enumerate(l2[SCAN_EDGES][...]):
                rms = auto_rms[ifeed, band, channel, s]
                red = sigma_red[ifeed, band, channel, s]
                el = l2[PIXEL_EL][ifeed, a:b]
                if not (np.isfinite(rms) and 0 < rms <= 0.1) or not np.all((el > 0) & (el < 90)):
                    continue
                if np.isfinite(red) and red > sigma_red_cutoff_k:
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
        f"  \"{HIT_MAP}(map_name='H', source='GField30', band=1, channel=0)\",\n"
        f"  \"{HIT_MAP}(map_name='F', source='GField30', band=1, channel=0, per_feed=True, "
        'quicklook=False)",\n'
        "]\n"
        f"[{HIT_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\n"
    )
    res = ws.run()
    assert res.returncode == 0, res.stderr
    (level2,) = ws.level2_files()
    path = ws.root / "maps" / "H_band1_ch0_feed01to02_hits.fits"
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["HITS", "TIME", "OBSLIST"]
        segments = hdul["OBSLIST"].data
        assert len(segments) == hdul[0].header["NSEGMENT"]
        assert hdul[0].header["MJD-OBS"] == segments["MJDSTART"].min()
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


def test_bad_input_is_one_failure_and_leaves_no_file(workspace_factory, tiny_archive):
    """A dataset the level-2 file lacks, or a TOD with no finite sample: one clear line per map, the
    other job still runs, and no FITS file (final or partial) is left behind."""
    ws = workspace_factory(tiny_archive.paths)
    ws.write_configs(
        LEVEL2_THROUGH_NOISE_STATS,
        extra_stages=["modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')"],
    )
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{HIT_MAP}(map_name='X', source='GField30', tod_data_name='level2/not_there')\",\n"
        f"  \"{HIT_MAP}(map_name='H', source='GField30', band=1, channel=0)\",\n"
        "]\n"
        f"[{HIT_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\nquicklook = false\n"
    )
    res = ws.run()
    assert res.returncode == 1
    assert "no data for map X: lacks level2/not_there: 1" in res.stderr
    assert sorted(p.name for p in (ws.root / "maps").iterdir()) == ["H_band1_ch0_feed01to02_hits.fits"]
    # Every sample of the TOD NaN: the job fails with a reason, and the good map is not rewritten.
    (level2,) = ws.level2_files()
    with h5py.File(level2, "a") as l2:
        l2["level2/binned_cleaned_data"][...] = np.nan
    (ws.root / "maps" / "H_band1_ch0_feed01to02_hits.fits").unlink()
    res = ws.run()
    assert res.returncode == 1
    assert "no data for map H" in res.stderr
    assert not any((ws.root / "maps").iterdir())
