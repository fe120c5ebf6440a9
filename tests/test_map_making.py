"""MapMaking (docs/mapmaking.md): selection, FITS output, point-source position, splits and jackknifes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import LEVEL2_THROUGH_NOISE_STATS, MAP_HDUS

from utils.coordinates import galactic_to_icrs, icrs_to_galactic
from utils.simulator import PRESETS, simulate_observation

LEVEL2 = LEVEL2_THROUGH_NOISE_STATS
CREATE_MAP = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"


def with_maps(ws, jobs: list[str], section: str = "", gain_filter: str | None = None) -> None:
    """Level-2 pipeline then MapMaking with ``jobs`` (calibration off: no calibrator model here)."""
    level2 = (
        LEVEL2
        if gain_filter is None
        else [
            m.replace(
                "GainFilterAndBin(n_freq_bin=2)",
                f"GainFilterAndBin(n_freq_bin=2, gain_filter_name={gain_filter!r})",
            )
            for m in LEVEL2
        ]
    )
    ws.write_configs(
        level2, nprocess=2, extra_stages=["modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')"]
    )
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        + "".join(f"  {j!r},\n" for j in jobs)
        + "]\n"
        f"[{CREATE_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\n{section}\n"
    )


def test_tau_a_map_and_its_fits_file(workspace_factory, small_archive):
    ws = workspace_factory([small_archive["TauA"]])
    with_maps(
        ws,
        [
            f"{CREATE_MAP}(map_name='TauA', source='TauA', band=1, channel=[0, 1])",
            f"{CREATE_MAP}(map_name='Nothing', source='NoSuchField')",
        ],
    )
    res = ws.run()
    assert res.returncode == 1, res.stderr  # the empty selection fails, the other job does not
    assert "WARNING [-] MapMaking: no data for map Nothing" in res.stderr
    files = sorted((ws.root / "maps").glob("*.fits"))
    assert [f.name for f in files] == ["TauA_band1_ch0_feed01to03.fits", "TauA_band1_ch1_feed01to03.fits"]
    path = files[0]
    assert path.with_suffix(".png").exists() and path.with_name(path.stem + ".config.toml").exists()
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == list(MAP_HDUS)
        h = hdul[0].header
        for key in (
            "BUNIT",
            "TELESCOP",
            "OBJECT",
            "DATE-OBS",
            "MJD-OBS",
            "FREQ",
            "BANDWID",
            "FEEDS",
            "NOBS",
            "NSEGMENT",
            "NSAMPLE",
            "COMAP CONFIGSHA",
            "COMAP VERSION",
            "DESTRIPER DSTATUS",
            "MASK HITTHR",
            "CALIB MODE",
            "COMAP TEMPTYPE",
            "NOISE METHOD",
            "NOISE NREAL",
            "NOISE RATIO",
        ):
            assert key in h, key
        assert h["BUNIT"] == "K" and h["COMAP TEMPTYPE"] == "K_RJ" and h["DESTRIPER DSTATUS"] == "converged"
        assert any("offset_length = 100" in str(c) for c in h["HISTORY"])
        sky = hdul["DESTRIPED"].data
        hits = hdul["HITS"].data
        rms = hdul["RMS"].data
        mask = hdul["MASK"].data
        assert np.all(np.isnan(sky[mask != 0])) and np.all(hits[mask & 1 == 1] == 0)
        good = mask == 0
        assert np.all(np.isfinite(rms[good]))
        # the source lands in the right pixel: peak position read back through astropy.wcs
        wcs = WCS(h).celestial
        iy, ix = np.unravel_index(np.nanargmax(np.where(good, sky, -np.inf)), sky.shape)
        # centroid of the bright core, then compare with Tau A's position in pixels
        yy, xx = np.mgrid[iy - 3 : iy + 4, ix - 3 : ix + 4]
        core = np.nan_to_num(sky[iy - 3 : iy + 4, ix - 3 : ix + 4])
        cy, cx = (core * yy).sum() / core.sum(), (core * xx).sum() / core.sum()
        gl, gb = icrs_to_galactic(83.633083, 22.0145)
        px, py = wcs.world_to_pixel_values(float(gl), float(gb))
        assert abs(cx - px) <= 0.5 and abs(cy - py) <= 0.5
        lon, lat = wcs.pixel_to_world_values(cx, cy)
        assert abs(((lon - gl + 180) % 360) - 180) * 60 < 0.5 and abs(lat - gb) * 60 < 0.5

    # nothing changed: the map is up to date and not rewritten
    stamp = path.stat().st_mtime_ns
    again = ws.run()
    assert re.search(r"MapMaking\s+0\s+2\s+1", again.stdout), again.stdout
    assert path.stat().st_mtime_ns == stamp


def test_missing_dataset_and_unknown_wcs(workspace_factory, tiny_archive):
    ws = workspace_factory(tiny_archive.paths)
    with_maps(ws, [f"{CREATE_MAP}(map_name='X', source='GField30', tod_data_name='level2/not_there')"])
    res = ws.run()
    assert res.returncode == 1
    assert "no data for map X: lacks level2/not_there: 1" in res.stderr
    with_maps(ws, [f"{CREATE_MAP}(map_name='X', source='GField30', wcs_def='Nowhere')"])
    res = ws.run()
    assert res.returncode == 2
    assert "unknown WCS definition 'Nowhere'; known: California" in res.stderr


@pytest.fixture(scope="module")
def two_fields(tmp_path_factory):
    """Four blank-sky CES observations at GField30's position (two rising, two setting) without gain
    fluctuations, and two with: differences of split maps then hold only noise."""
    from utils.simulator.spec import SkySpec

    ra, dec = galactic_to_icrs(30.0, 0.0)
    spec = next(o for o in PRESETS["test-small"].observations if o.source == "GField30")
    spec = spec.replace(sky=SkySpec(kind="none"), target_ra_deg=float(ra), target_dec_deg=float(dec))
    out = tmp_path_factory.mktemp("fields")
    white = [
        simulate_observation(
            spec.replace(obsid=91001 + k, hour_angle_h=ha, gain_fluctuations=False, n_channels=16),
            out,
            seed=3,
        )
        for k, ha in enumerate((-2.5, -1.5, 1.5, 2.5))
    ]
    red = [
        simulate_observation(spec.replace(obsid=91011 + k, hour_angle_h=ha, n_channels=16), out, seed=4)
        for k, ha in enumerate((-1.5, 1.5))
    ]
    return white, red


@pytest.mark.parametrize("kind", ["white", "red"])
def test_jackknife_difference_is_noise(workspace_factory, two_fields, kind):
    """(A − B)/2 of odd/even scans at DEFAULT settings (default gain filter, offset length and noise
    realisations) with RMS_diff = ½√(RMS_A² + RMS_B²) has χ²/N ≈ 1, for white and for 1/f noise
    (docs/mapmaking.md#map-noise).

    The RMS HDU holds the map noise from noise-only simulations through the same destriper: the noise of
    the fitted offsets and the 1/f left after destriping are in it. Tolerance: χ²/N of N independent
    pixels scatters by sqrt(2/N); neighbouring pixels share offsets, so N_eff is taken as N/4, and the
    test allows 3 sqrt(2/N_eff) plus 5 % for the finite number of realisations behind the RMS. Measured
    with the white RMS (before the map-noise change): χ²/N 1.15 (white) and 2.59 (1/f); with the new
    RMS 0.94 and 1.10 (the χ²/N against RMS_WHITE is printed beside it)."""
    files = two_fields[0] if kind == "white" else two_fields[1]
    ws = workspace_factory(files)
    with_maps(
        ws,
        [
            f"{CREATE_MAP}(map_name='JK', source='GField30', band=1, channel=0, "
            "split_mode='odd_even_scans', write_difference=True, hit_percentile=0.0, min_hits=20, "
            "dynamic_wcs_cdelt=0.05)"
        ],
    )
    res = ws.run()
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (ws.root / "maps").glob("*.fits"))
    assert names == [
        "JK_band1_ch0_feed01to03_diff.fits",
        "JK_band1_ch0_feed01to03_jkA.fits",
        "JK_band1_ch0_feed01to03_jkB.fits",
    ]
    # the difference map has its quicklook like the two halves (default quicklook=True)
    assert sorted(p.name for p in (ws.root / "maps").glob("*.png")) == [n[:-5] + ".png" for n in names]
    with fits.open(ws.root / "maps" / names[0]) as hdul:
        diff = hdul[0].data.astype(np.float64)
        rms = hdul["RMS"].data.astype(np.float64)
        white = hdul["RMS_WHITE"].data.astype(np.float64)
        ok = np.isfinite(diff) & np.isfinite(rms) & (hdul["HITS"].data >= 20)
        chi2 = float(np.mean((diff[ok] / rms[ok]) ** 2))
        chi2_white = float(np.mean((diff[ok] / white[ok]) ** 2))
    n = int(ok.sum())
    assert n > 200
    tolerance = 3.0 * np.sqrt(2.0 / (n / 4.0)) + 0.05
    print(
        f"jackknife {kind}: chi2/N {chi2:.3f} (RMS_WHITE: {chi2_white:.3f}), {n} pixels, tol {tolerance:.3f}"
    )
    assert abs(chi2 - 1.0) <= tolerance, (chi2, n, tolerance)
    assert chi2 < chi2_white  # the offsets' and the 1/f noise are added to the white RMS


def test_feed_labels():
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import feed_label

    assert feed_label(list(range(1, 20))) == "feed01to19"
    assert feed_label([1, 2, 3, 7]) == "feed01to03_07"
    assert feed_label([5]) == "feed05"


def test_day_night_split_by_sun_altitude():
    from types import SimpleNamespace

    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap as MapMaking
    from utils.coordinates import sun_altitude_deg

    mjds = np.array([61100 + 8 / 24, 61100 + 20 / 24, 61100 + 14 / 24])
    plans = [SimpleNamespace(mjd_mid=m, obsid=1, scan=k) for k, m in enumerate(mjds)]
    day = MapMaking._filter_segments(plans, SimpleNamespace(segment_filter="day"), 0.0)
    night = MapMaking._filter_segments(plans, SimpleNamespace(segment_filter="night"), 0.0)
    alt = sun_altitude_deg(mjds)
    assert [p.mjd_mid for p in day] == list(mjds[alt >= 0]) and [p.mjd_mid for p in night] == list(
        mjds[alt < 0]
    )
