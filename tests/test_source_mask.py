"""The bright-source mask (docs/level2.md#source-mask) and the sample flags as the map reader sees them
(docs/level2.md#sample-flags, docs/mapmaking.md#per-segment-processing).

* SourceMask on known positions: a fixed calibrator, Jupiter at its ephemeris position, a catalogue
  (CSV and TOML, ICRS and Galactic) and a bright map.
* CreateLevel2File at its defaults writes no flag 16 on a field, and flags a configured catalogue
  source; the calibrator case is tested with CalibratorFitting (tests/test_calibrator_fitting.py).
* The continuum map reader on a field reduced to level 2 (test-tiny): a burst flagged 4 does not reach
  the binned map, the same burst unflagged does; flag 16 keeps the samples in the map and only lowers
  their destriper weight.
"""

from __future__ import annotations

import shutil
from collections import Counter
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from conftest import default_level2_modules, reduce_in_process

from utils.calibrators import calibrator_position
from utils.coordinates import angular_separation_deg, galactic_to_icrs
from utils.level2 import FLAG_BRIGHT_SOURCE, FLAG_LEVEL1_NAN, SAMPLE_FLAGS_EXCLUDE, excluded_samples
from utils.source_mask import DEFAULT_MASK_RADIUS_ARCMIN, SourceMask, load_source_catalogue

TAUA = (83.633083, 22.014500)
MJD0 = 61100.3


def ring(ra0: float, dec0: float, radii_arcmin, n: int = 8):
    """Points at the given distances (arcmin) from (ra0, dec0), ``n`` position angles each."""
    pa = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = np.radians(np.repeat(np.asarray(radii_arcmin, dtype=float) / 60.0, n))
    p = np.tile(pa, len(radii_arcmin))
    d0, a0 = np.radians(dec0), np.radians(ra0)
    dec = np.arcsin(np.sin(d0) * np.cos(r) + np.cos(d0) * np.sin(r) * np.cos(p))
    ra = a0 + np.arctan2(np.sin(p) * np.sin(r) * np.cos(d0), np.cos(r) - np.sin(d0) * np.sin(dec))
    return np.degrees(ra) % 360.0, np.degrees(dec), np.repeat(np.asarray(radii_arcmin, dtype=float), n)


def test_default_radius_is_two_and_a_half_beams():
    assert DEFAULT_MASK_RADIUS_ARCMIN == pytest.approx(2.5 * 4.5)


def test_fixed_calibrator_is_masked_within_the_radius():
    ra, dec, r = ring(*TAUA, [1.0, 5.0, 11.0, 11.5, 30.0, 300.0])
    got = SourceMask(calibrator="taua").mask(ra, dec, np.full(ra.size, MJD0))
    np.testing.assert_array_equal(got, r <= DEFAULT_MASK_RADIUS_ARCMIN)
    assert not SourceMask(calibrator="TauA").mask(np.array([np.nan]), np.array([22.0]), np.array([MJD0]))[0]
    assert SourceMask.for_observation("GField30").empty
    assert SourceMask.for_observation("TauA", mask_calibrator=False).empty


def test_jupiter_is_masked_where_it_is_at_each_sample():
    """Jupiter moves up to ≈ 15′ a day against the stars (less near its stationary points): its
    position at one time is masked then, and not 40 days later (the ephemeris is evaluated per sample
    time)."""
    mjd = MJD0 + np.array([0.0, 0.01])
    ra_j, dec_j = calibrator_position("Jupiter", mjd)
    later = mjd + 40.0
    mask = SourceMask(calibrator="Jupiter")
    assert mask.mask(ra_j, dec_j, mjd).all()
    ra_l, dec_l = calibrator_position("Jupiter", later)
    assert float(angular_separation_deg(ra_j[0], dec_j[0], ra_l[0], dec_l[0])) * 60 > 30
    assert not mask.mask(ra_j, dec_j, later).any()
    assert mask.mask(ra_l, dec_l, later).all()


def test_catalogue_csv_and_toml(tmp_path):
    """Two catalogue sources, one in Galactic coordinates with its own radius, one in ICRS with the
    default radius; CSV and TOML give the same mask."""
    gra, gdec = galactic_to_icrs(30.0, 0.0)
    csv = tmp_path / "cat.csv"
    csv.write_text(
        "# bright sources\nname,frame,lon,lat,radius_arcmin\nW43,galactic,30.0,0.0,20\nS1,icrs,10.0,60.0,\n"
    )
    toml = tmp_path / "cat.toml"
    toml.write_text(
        '[[source]]\nname = "W43"\nframe = "galactic"\nlon = 30.0\nlat = 0.0\nradius_arcmin = 20\n'
        '[[source]]\nname = "S1"\nframe = "icrs"\nlon = 10.0\nlat = 60.0\n'
    )
    a_ra, a_dec, a_r = ring(float(gra), float(gdec), [5.0, 19.0, 21.0, 60.0])
    b_ra, b_dec, b_r = ring(10.0, 60.0, [5.0, 11.0, 11.5, 60.0])
    ra, dec = np.concatenate([a_ra, b_ra]), np.concatenate([a_dec, b_dec])
    want = np.concatenate([a_r <= 20.0, b_r <= DEFAULT_MASK_RADIUS_ARCMIN])
    for path in (csv, toml):
        cat = load_source_catalogue(str(path))
        assert [s.name for s in cat] == ["W43", "S1"]
        np.testing.assert_array_equal(SourceMask(sources=cat).mask(ra, dec, np.full(ra.size, MJD0)), want)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,frame,lon,lat\nX,fk4,1,2\n")
    with pytest.raises(ValueError, match="frame must be one of"):
        load_source_catalogue(str(bad))


def test_bright_map_cut(tmp_path):
    """A Galactic CAR map that is 1 K within |l − 30°| < 0.1°: samples there are masked at a 0.5 K cut,
    none at a 2 K cut."""
    from astropy.io import fits
    from astropy.wcs import WCS

    from utils.bright_map import load_bright_map

    nx, ny = 300, 120
    w = WCS(naxis=2)
    w.wcs.ctype = ["GLON-CAR", "GLAT-CAR"]
    w.wcs.crval = [30.0, 0.0]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    w.wcs.cdelt = [-1 / 60, 1 / 60]
    gl = 30.0 + (np.arange(nx) + 1 - (nx + 1) / 2) * (-1 / 60)
    data = np.where(np.abs(gl - 30.0) < 0.1, 1.0, 0.0)[None, :].repeat(ny, axis=0)
    path = tmp_path / "bright.fits"
    fits.PrimaryHDU(data.astype(np.float32), header=w.to_header()).writeto(path)
    lon = np.array([29.5, 29.95, 30.0, 30.05, 30.5])
    ra, dec = galactic_to_icrs(lon, np.zeros(lon.size))
    bmap = load_bright_map(str(path))
    np.testing.assert_array_equal(
        SourceMask(bright_map=bmap, bright_cut_k=0.5).mask(ra, dec, np.full(lon.size, MJD0)),
        np.abs(lon - 30.0) < 0.1,
    )
    assert not SourceMask(bright_map=bmap, bright_cut_k=2.0).mask(ra, dec, np.full(lon.size, MJD0)).any()


# --------------------------------------------------------------------------------------------------
# Level 2 of a field, and the map reader
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field(tmp_path_factory, tiny_archive):
    """test-tiny (GField30 CES) reduced to level 2 in process at the default settings, through
    PostBinCleaning and NoiseStatsLevel2."""
    from modules.ProcessLevel2.NoiseStatsLevel2.NoiseStatsLevel2 import NoiseStatsLevel2
    from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning

    out = tmp_path_factory.mktemp("field")
    l1 = tiny_archive.paths[0]
    modules = [
        *default_level2_modules(GainFilterAndBin={"n_freq_bin": 2}),
        PostBinCleaning(),
        NoiseStatsLevel2(),
    ]
    path, _ctx, _ops = reduce_in_process(l1, out, modules)
    return {"l2": path, "l1": l1, "out": out}


def test_field_gets_no_bright_flag_at_defaults(field):
    with h5py.File(field["l2"], "r") as l2:
        flags = l2["level2/sample_flags"][...]
        assert l2["level2/sample_flags"].attrs["bright_source_mask"] == "nothing"
    assert not np.any(flags & FLAG_BRIGHT_SOURCE)
    assert SAMPLE_FLAGS_EXCLUDE & FLAG_BRIGHT_SOURCE == 0


def test_catalogue_source_is_flagged_in_a_field(field, tmp_path):
    """With a catalogue entry at the field's median pointing, CreateLevel2File flags the samples within
    its radius (distance computed here independently) and nothing else."""
    from modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists import CheckLevel1FileExists
    from modules.ProcessLevel2.CreateLevel2File.CreateLevel2File import CreateLevel2File

    with h5py.File(field["l2"], "r") as l2:
        ra = l2["spectrometer/pixel_pointing/pixel_ra"][...]
        dec = l2["spectrometer/pixel_pointing/pixel_dec"][...]
    ra0, dec0 = float(np.median(ra[0])), float(np.median(dec[0]))
    cat = tmp_path / "cat.csv"
    cat.write_text(f"name,frame,lon,lat,radius_arcmin\nX,icrs,{ra0},{dec0},6\n")
    modules = [CheckLevel1FileExists(), CreateLevel2File(output_dir=str(tmp_path), source_catalogue=str(cat))]
    path, _ctx, _ops = reduce_in_process(field["l1"], tmp_path / "cat", modules)
    with h5py.File(path, "r") as l2:
        flags = l2["level2/sample_flags"][...]
    r = 60.0 * angular_separation_deg(ra, dec, ra0, dec0)
    sure = np.abs(r - 6.0) > 0.01
    flagged = (flags & FLAG_BRIGHT_SOURCE) != 0
    np.testing.assert_array_equal(flagged[sure], (r <= 6.0)[sure])
    assert flagged.any() and not flagged.all()


def _reader_output(path, obsid):
    """The continuum reader's output for band 0, channel 0 of one file at CreateMap's defaults
    (calibration off: no calibrator model here), on a fixed dynamic geometry."""
    from modules.MapMaking.geometry import job_geometry
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap
    from modules.MapMaking.read_data import frame_coordinates, prepass_file, read_segments

    job = CreateMap(calibration="none")
    settings = job.reader_settings(0, 0)
    plans = prepass_file(SimpleNamespace(obsid=obsid, level2_path=str(path)), settings, None, None, Counter())
    assert plans
    with h5py.File(path, "r") as l2:
        lon, lat = frame_coordinates(
            l2["spectrometer/pixel_pointing/pixel_ra"][...].ravel(),
            l2["spectrometer/pixel_pointing/pixel_dec"][...].ravel(),
            "galactic",
        )
    geometry = job_geometry("dynamic", job.wcs_def_file, lon, lat, cdelt_deg=job.dynamic_wcs_cdelt)
    return read_segments(plans, settings, geometry), plans


def _binned_map(out) -> np.ndarray:
    n = int(out.pixels.max()) + 1
    use = (out.pixels >= 0) & (out.map_weights > 0)
    w = np.bincount(out.pixels[use], out.map_weights[use], minlength=n)
    s = np.bincount(out.pixels[use], (out.map_weights * out.tod)[use], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w > 0, s / w, np.nan)


def _edit(src, dst, *, burst, add_k=0.0, flag=0):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as l2:
        d = l2["level2/binned_cleaned_data"]
        block = d[0]
        block[..., burst] += np.float32(add_k)
        d[0] = block
        f = l2["level2/sample_flags"]
        row = f[0]
        row[burst] |= np.uint8(flag)
        f[0] = row
    return dst


def test_map_reader_drops_excluded_samples(field, tmp_path):
    """A 200-sample burst of +100 K on feed 1 flagged 4: the binned map equals that of the file with
    the same samples flagged and no burst (bit for bit), and its pixels stay within the range of the
    untouched file's samples in each pixel (the mean of the samples left; the sky inside a pixel makes
    that range wider than the noise). Unflagged, the burst reaches the map at > 1 K, so the test can
    fail."""
    with h5py.File(field["l2"], "r") as l2:
        obsid = int(l2.attrs["obsid"])
        flags = l2["level2/sample_flags"][0]
        edges = l2["level2/scan_edges"][...]
    a = int(edges[0, 0]) + 1000
    burst = np.zeros(flags.size, dtype=bool)
    burst[a : a + 200] = True
    assert not excluded_samples(flags[burst]).any()
    ref, plans = _reader_output(field["l2"], obsid)
    flagged, _ = _reader_output(
        _edit(field["l2"], tmp_path / "a.hd5", burst=burst, add_k=100.0, flag=FLAG_LEVEL1_NAN), obsid
    )
    flagged_clean, _ = _reader_output(
        _edit(field["l2"], tmp_path / "b.hd5", burst=burst, flag=FLAG_LEVEL1_NAN), obsid
    )
    spiked, _ = _reader_output(_edit(field["l2"], tmp_path / "c.hd5", burst=burst, add_k=100.0), obsid)
    m_ref, m_flag, m_flag_clean, m_spike = (_binned_map(o) for o in (ref, flagged, flagged_clean, spiked))
    np.testing.assert_array_equal(m_flag, m_flag_clean)
    # a pixel's mean over the samples left lies within the range of its samples in the untouched file
    # (sky inside the pixel plus noise): a burst that reached the map would leave it
    use = (ref.pixels >= 0) & (ref.map_weights > 0)
    n = int(ref.pixels.max()) + 1
    hi = np.full(n, -np.inf)
    lo = np.full(n, np.inf)
    np.maximum.at(hi, ref.pixels[use], ref.tod[use])
    np.minimum.at(lo, ref.pixels[use], ref.tod[use])
    both = np.isfinite(m_ref) & np.isfinite(m_flag)
    assert np.all(m_flag[both] >= lo[both] - 1e-6) and np.all(m_flag[both] <= hi[both] + 1e-6)
    assert np.nanmax(np.abs(m_spike - m_ref)) > 1.0
    assert np.count_nonzero(flagged.weights == 0) >= np.count_nonzero(ref.weights == 0) + 200


def test_map_reader_keeps_bright_source_samples_with_less_solver_weight(field, tmp_path):
    """Flag 16 on a burst of samples: they stay in the map (map weight unchanged) and their destriper
    weight is multiplied by CreateMap's bright_downweight (0.1)."""
    with h5py.File(field["l2"], "r") as l2:
        obsid = int(l2.attrs["obsid"])
        n_tod = l2["level2/sample_flags"].shape[1]
        edges = l2["level2/scan_edges"][...]
    a = int(edges[0, 0]) + 1000
    burst = np.zeros(n_tod, dtype=bool)
    burst[a : a + 200] = True
    ref, plans = _reader_output(field["l2"], obsid)
    bright, _ = _reader_output(
        _edit(field["l2"], tmp_path / "d.hd5", burst=burst, flag=FLAG_BRIGHT_SOURCE), obsid
    )
    np.testing.assert_array_equal(bright.map_weights, ref.map_weights)
    changed = bright.weights != ref.weights
    assert changed.sum() == 200
    np.testing.assert_allclose(bright.weights[changed], 0.1 * ref.weights[changed], rtol=1e-6)
    assert np.all(bright.map_weights[changed] > 0)
