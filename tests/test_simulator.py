"""Tests of the level-1 simulator (docs/simulator.md#tests-of-the-simulator-itself).

Expectations are derived from the specification and from ``/truth`` (inputs, and noise levels
derived from the radiometer equation), never from numbers produced by running the simulator.
Custom observations are kept tiny (8–32 channels, seconds of data) so the module runs quickly.
"""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest

from utils.constants import GROUND_FEED, LEVEL1_NAME_RE
from utils.errors import SimulatorError
from utils.simulator import PRESETS, ObservationSpec, simulate_observation
from utils.simulator.spec import HIIRegion, ScanSpec, SkySpec

C_M_S = 299792458.0
K_B = 1.380649e-23
ARCSEC_DEG = 1.0 / 3600.0
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# helpers (independent of the simulator's implementation)
# --------------------------------------------------------------------------------------------------
def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of True."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


def decode(words: np.ndarray) -> np.ndarray:
    w = np.asarray(words, dtype=np.int64)
    out = np.full(w.shape, -1, dtype=np.int64)
    pos = w > 0
    out[pos] = np.floor(np.log2(w[pos])).astype(np.int64)
    return out


def layout_arcmin(feed: int, s: float = 12.0) -> tuple[float, float]:
    """Focal-plane layout of docs/simulator.md#pointing, written out independently."""
    if feed == 1:
        return 0.0, 0.0
    if feed == 20:
        return 0.0, -36.0
    if 2 <= feed <= 7:
        r, ang = s, 60.0 * (feed - 2)
    elif feed % 2 == 0:
        r, ang = 2 * s, 60.0 * (feed - 8) / 2
    else:
        r, ang = s * math.sqrt(3), 30.0 + 60.0 * (feed - 9) / 2
    return r * math.cos(math.radians(ang)), r * math.sin(math.radians(ang))


def enu(az_deg, el_deg) -> np.ndarray:
    az, el = np.radians(az_deg), np.radians(el_deg)
    return np.stack([np.cos(el) * np.sin(az), np.cos(el) * np.cos(az), np.sin(el)], axis=-1)


def small_spec(**changes) -> ObservationSpec:
    """A tiny stare on a blank field (8 channels, feeds 1 and 20, no vanes)."""
    base = ObservationSpec(
        obsid=99001,
        feeds=[1, GROUND_FEED],
        n_channels=8,
        hour_angle_h=0.0,
        target_ra_deg=60.0,
        target_dec_deg=10.0,
        vane_at_start=False,
        vane_at_end=False,
        slew_s=1.0,
        scan=ScanSpec(kind="stare", duration_s=10.0),
        sky=SkySpec(kind="none"),
    )
    return base.replace(**changes)


def read_all(path: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[...]
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = v

        f.visititems(visit)
    return out


# --------------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------------
def _check_format(path: Path) -> None:
    from utils.level1 import Level1File  # written concurrently by the level-1 reader's author

    Level1File(path).validate(probe_tod=True)
    with h5py.File(path, "r") as f:
        m = LEVEL1_NAME_RE.match(path.name)
        assert m and int(m.group(1)) == int(f["comap"].attrs["obsid"])
        assert path.parent.name == m.group(2)[:7] or path.parent.name != m.group(2)[:4]
        mjd = f["spectrometer/MJD"][...]
        feats = f["spectrometer/features"][...]
        truth_edges = [tuple(e) for e in f["truth/scans/edges"][...].tolist()]
        kinds = [k.decode() for k in f["truth/scans/kind"][...]]
        code = {"ces": 8, "skydip": 8, "raster": 9, "lissajous": 10, "stare": 16}[kinds[0]]
        assert runs(decode(feats) == code) == truth_edges
        # vane events are the feature-13 runs
        assert runs(decode(feats) == 13) == [tuple(e) for e in f["truth/vane/event_edges"][...].tolist()]
        # hk clocks: own axes, different lengths, stamped 0.6 s late; frame 0.05 s after vane
        lengths = {g: f[f"{g}/utc"].shape[0] for g in ("hk/antenna0/vane", "hk/array/frame")}
        assert len(set(lengths.values())) == 2
        v_utc = f["hk/antenna0/vane/utc"][...]
        fr_utc = f["hk/array/frame/utc"][...]
        assert abs((fr_utc[0] - v_utc[0]) * 86400.0 - 0.05) < 1e-5
        hk_dt = np.median(np.diff(v_utc)) * 86400.0
        corrected = fr_utc - 0.6 / 86400.0
        hk13 = runs(decode(f["hk/array/frame/features"][...]) == 13)
        assert len(hk13) == len(f["truth/vane/event_edges"])
        for (s, e), (hs, he) in zip(f["truth/vane/event_edges"][...], hk13):
            assert abs(corrected[hs] - mjd[s]) * 86400.0 <= hk_dt + 1e-6
            assert abs(corrected[he - 1] - mjd[e - 1]) * 86400.0 <= hk_dt + 1e-6
        # raw hk is int32 in 0.01 units
        for name in ("angle", "Tshroud", "Tvane", "Tambient"):
            assert f[f"hk/antenna0/vane/{name}"].dtype == np.int32
        assert f["spectrometer/tod"].dtype == np.float32
        assert f["spectrometer/tod"].chunks == (1, 1, min(f["spectrometer/frequency"].shape[1], 128), 1024)
        if kinds[0] == "lissajous":
            st_utc = f["hk/antenna0/deTracker/utc"][...] - 0.6 / 86400.0
            status = f["hk/antenna0/deTracker/lissajous_status"][...]
            idx = np.searchsorted(st_utc, mjd, side="right") - 1
            mapped = np.where(idx >= 0, status[np.clip(idx, 0, None)], 0)
            liss = runs(mapped == 1)
            assert len(liss) == len(truth_edges)
            for (a, b), (c, d) in zip(liss, truth_edges):
                assert abs(a - c) <= 5 and abs(b - d) <= 5  # within one hk sample at 10 Hz


def test_format_tiny_and_small(tiny_archive, small_archive):
    for archive in (tiny_archive, small_archive):
        assert (archive.root / "obs_index.csv").exists()
        assert not list(archive.root.rglob("*.partial"))
        with open(archive.root / "obs_index.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["obsid", "relative_path", "source", "comment", "utc_start", "size_bytes"]
        assert [archive.root / r["relative_path"] for r in rows] == archive.paths
        for r, p in zip(rows, archive.paths):
            assert int(r["size_bytes"]) == p.stat().st_size
            assert p.parent.name == r["utc_start"][:7]
        for p in archive.paths:
            _check_format(p)
    assert set(small_archive.by_source) == {"TauA", "SkyDip", "GField30"}


def test_small_archive_contents(small_archive):
    with h5py.File(small_archive["SkyDip"], "r") as f:
        assert f["comap"].attrs["comment"] == "sky nod"
        ((s, e),) = f["truth/scans/edges"][...]
        el = f["spectrometer/pixel_pointing/pixel_el"][0, s:e]
        az = f["spectrometer/pixel_pointing/pixel_az"][0, s:e]
        assert el.max() == pytest.approx(65.0, abs=0.02) and el.min() == pytest.approx(35.0, abs=0.02)
        assert np.ptp(az) < 1e-9
        assert "hk/antenna0/deTracker" not in f
    with h5py.File(small_archive["TauA"], "r") as f:
        assert "hk/antenna0/deTracker/lissajous_status" in f
        assert f["truth/calibrator"].attrs["name"] == "TauA"
        assert f["spectrometer/frequency"].shape == (4, 32)
    with h5py.File(small_archive["GField30"], "r") as f:
        assert f["truth/scans/edges"].shape == (2, 2)
        assert f["truth/rrl/v_corr_kms"].shape == (2,)
        assert f["truth/sky/map"].shape[0] == 8


@pytest.mark.parametrize("preset", ["demo", "rrl-fullres", "bench-full"])
def test_format_other_presets_shrunk(preset, tmp_path):
    """Each observation kind of the big presets, shrunk to seconds and 8 channels, is valid level 1."""
    seen = set()
    for obs in PRESETS[preset].observations:
        key = (obs.scan.kind, obs.sky.kind)
        if key in seen:
            continue
        seen.add(key)
        science = [f for f in obs.feeds if f != GROUND_FEED][:2]
        scan = {"segment_s": 10.0, "duration_s": 10.0, "n_segments": min(obs.scan.resolved().n_segments, 2)}
        if obs.scan.kind == "skydip":
            scan = {"el_low_deg": 60.0}
        small = obs.replace(n_channels=8, feeds=[*science, GROUND_FEED], scan=scan)
        _check_format(simulate_observation(small, tmp_path))


# --------------------------------------------------------------------------------------------------
# radiometer equation
# --------------------------------------------------------------------------------------------------
def test_radiometer_noise(tmp_path):
    spec = small_spec(n_channels=16, gain_fluctuations=False, scan=ScanSpec(kind="stare", duration_s=60.0))
    path = simulate_observation(spec, tmp_path)
    with h5py.File(path, "r") as f:
        ((s, e),) = f["truth/scans/edges"][...]
        wf = f["truth/noise"].attrs["white_fraction"]
        assert wf == pytest.approx(1.0 / math.sqrt((2e9 / 16) * 0.02), rel=1e-12)
        for ifeed in range(2):
            x = f["spectrometer/tod"][ifeed, :, :, s:e].astype(np.float64)
            d = np.diff(x, axis=-1)
            ratio = (d.std(axis=-1) / math.sqrt(2.0) / x.mean(axis=-1) / wf).ravel()
            sigma = math.sqrt(3.0 / (4.0 * d.shape[-1]))
            assert abs(np.median(ratio) - 1.0) < 0.01
            assert np.all(np.abs(ratio - 1.0) < 5.0 * sigma)


# --------------------------------------------------------------------------------------------------
# gain fluctuations
# --------------------------------------------------------------------------------------------------
def test_gain_fluctuation_psd():
    from scipy.optimize import least_squares

    from utils.simulator.instrument import STREAM_GAIN_FLUCTUATION, gain_fluctuations, observation_rng

    fs, n = 50.0, 60 * 60 * 50
    sigma_g, alpha, f0 = 5.0e-5, -1.5, 1.0
    dg = gain_fluctuations(n, fs, sigma_g, alpha, f0, observation_rng(1, 60001, 0, STREAM_GAIN_FLUCTUATION))
    assert dg.shape == (n,) and abs(dg.mean()) < 1e-12
    f = np.fft.rfftfreq(n, 1.0 / fs)[1:]
    p = (2.0 * np.abs(np.fft.rfft(dg)) ** 2 / (n * fs))[1:]
    edges = np.logspace(np.log10(f[0]), np.log10(f[-1]) + 1e-9, 61)
    which = np.digitize(f, edges) - 1
    fb, pb, nb = [], [], []
    for k in range(len(edges) - 1):
        sel = which == k
        if sel.sum() >= 1:
            fb.append(f[sel])
            pb.append(p[sel].mean())
            nb.append(sel.sum())
    pb, nb = np.array(pb), np.array(nb)

    def resid(theta):
        log_s2, a = theta
        model = np.array([np.mean(np.exp(log_s2) * (fk / f0) ** a) for fk in fb])
        return np.sqrt(nb) * (np.log(pb) - np.log(model))

    fit = least_squares(resid, x0=[np.log(1e-9), -1.0])
    s_fit, a_fit = math.sqrt(math.exp(fit.x[0])), fit.x[1]
    assert abs(a_fit - alpha) < 0.1
    assert abs(s_fit / sigma_g - 1.0) < 0.1


def test_gain_fluctuation_recipe_expectation():
    """E[2|rfft(δg)_k|²/(N f_s)] = P(f_k): average over realisations, per frequency."""
    from utils.simulator.instrument import gain_fluctuations

    fs, n, reps = 50.0, 4096, 200
    sigma_g, alpha, f0 = 5.0e-5, -1.5, 1.0
    rng = np.random.default_rng(7)
    acc = np.zeros(n // 2 + 1)
    for _ in range(reps):
        acc += 2.0 * np.abs(np.fft.rfft(gain_fluctuations(n, fs, sigma_g, alpha, f0, rng))) ** 2 / (n * fs)
    f = np.fft.rfftfreq(n, 1.0 / fs)
    expected = sigma_g**2 * (f[1:] / f0) ** alpha
    ratio = acc[1:] / reps / expected
    assert acc[0] < 1e-12 * acc[1]  # no DC power (round-off only)
    assert abs(ratio.mean() - 1.0) < 5.0 / math.sqrt(reps * ratio.size)
    assert np.all(np.abs(ratio - 1.0) < 6.0 / math.sqrt(reps))


# --------------------------------------------------------------------------------------------------
# pointing
# --------------------------------------------------------------------------------------------------
def test_pointing_layout_and_astropy(small_archive):
    from astropy import units as u
    from astropy.coordinates import ICRS, AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    iers.conf.auto_download = False
    for path in (small_archive["TauA"], small_archive["GField30"]):
        with h5py.File(path, "r") as f:
            feeds = f["spectrometer/feeds"][...].tolist()
            az = f["spectrometer/pixel_pointing/pixel_az"][...]
            el = f["spectrometer/pixel_pointing/pixel_el"][...]
            ra = f["spectrometer/pixel_pointing/pixel_ra"][...]
            dec = f["spectrometer/pixel_pointing/pixel_dec"][...]
            mjd = f["spectrometer/MJD"][...]
            i1 = feeds.index(1)
            b = enu(az[i1], el[i1])
            e_az = np.stack([np.cos(np.radians(az[i1])), -np.sin(np.radians(az[i1])), 0 * az[i1]], axis=-1)
            e_el = np.cross(e_az, b)  # local 'up along the meridian' unit vector
            for i, feed in enumerate(feeds):
                x0, y0 = layout_arcmin(feed)
                p = enu(az[i], el[i])
                sep = np.degrees(np.arccos(np.clip(np.sum(p * b, axis=-1), -1, 1)))
                assert np.max(np.abs(sep - math.hypot(x0, y0) / 60.0)) < 0.1 * ARCSEC_DEG
                # gnomonic projection of the feed direction recovers the layout
                pb = np.sum(p * b, axis=-1)
                x = np.degrees(np.sum(p * e_az, axis=-1) / pb) * 60.0
                y = np.degrees(np.sum(p * e_el, axis=-1) / pb) * 60.0
                assert np.max(np.abs(x - x0)) < 0.1 / 60.0 and np.max(np.abs(y - y0)) < 0.1 / 60.0
            rng = np.random.default_rng(3)
            i_feed = rng.integers(0, len(feeds), 100)
            i_t = rng.integers(0, mjd.size, 100)
            loc = EarthLocation.from_geodetic(-118.2822222 * u.deg, 37.2338889 * u.deg, 1222.0 * u.m)
            frame = AltAz(obstime=Time(mjd[i_t], format="mjd", scale="utc"), location=loc, pressure=0 * u.hPa)
            c = SkyCoord(az=az[i_feed, i_t] * u.deg, alt=el[i_feed, i_t] * u.deg, frame=frame).transform_to(
                ICRS()
            )
            dra = (c.ra.deg - ra[i_feed, i_t] + 180.0) % 360.0 - 180.0
            assert np.max(np.abs(dra)) < 1e-9
            assert np.max(np.abs(c.dec.deg - dec[i_feed, i_t])) < 1e-9


def test_elevation_limits(tmp_path):
    spec = ObservationSpec(
        obsid=99002,
        feeds=[1, GROUND_FEED],
        n_channels=8,
        hour_angle_h=-5.0,
        scan=ScanSpec(kind="ces", n_segments=1, segment_s=10.0),
    )
    with pytest.raises(SimulatorError, match="outside 25–80 deg"):
        simulate_observation(spec, tmp_path)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# calibrator increment
# --------------------------------------------------------------------------------------------------
def _taua_flux_jy(freq_ghz, mjd):
    """Weiland et al. 2011: epoch 2005.0 (MJD 53371), 0.22 %/yr (docs/calibrators.md#flux-models)."""
    x = np.log10(freq_ghz / 40.0)
    return 10 ** (2.506 - 0.302 * x) * (1.0 - 0.0022 * (mjd - 53371.0) / 365.25)


@pytest.mark.parametrize("kind", ["taua", "jupiter"])
def test_calibrator_increment(kind, tmp_path):
    scan = ScanSpec(kind="lissajous", amplitude_deg=0.08, duration_s=15.0)
    spec = small_spec(
        feeds=[1, 2, GROUND_FEED],
        n_channels=16,
        white_noise=False,
        target_ra_deg=None,
        target_dec_deg=None,
        hour_angle_h=-1.0 if kind == "taua" else 0.5,
        scan=scan,
        sky=SkySpec(kind=kind),
    )
    twin = spec.replace(sky=SkySpec(kind="none"), target="TauA" if kind == "taua" else "Jupiter")
    p_src = simulate_observation(spec, tmp_path / "src")
    p_twin = simulate_observation(twin, tmp_path / "twin")
    with h5py.File(p_src, "r") as f, h5py.File(p_twin, "r") as g:
        freq = f["spectrometer/frequency"][...]
        cal = f["truth/calibrator"]
        mjd_mid = cal.attrs["mjd_mid"]
        if kind == "taua":
            flux = _taua_flux_jy(freq, mjd_mid)
        else:
            d = cal.attrs["distance_au"]
            assert 3.9 < d < 6.5
            tb = 10 ** (0.282419 * np.log10(freq / 30.0) + 2.161409)
            x = 6.62607015e-34 * freq * 1e9 / (K_B * 2.72548)
            increment = tb - 2.72548 * x / np.expm1(x)  # the disc hides the CMB (docs/calibrators.md#jupiter)
            omega = 2.481e-8 * (5.2 / d) ** 2
            flux = 1e26 * 2 * K_B * (freq * 1e9) ** 2 / C_M_S**2 * increment * omega
        # the simulator refits the Karim et al. band values itself: its power law matches the rounded
        # coefficients above to ~4e-6
        np.testing.assert_allclose(cal["flux_jy"][...], flux, rtol=1e-12 if kind == "taua" else 2e-5)
        fwhm_deg = 4.5 * 30.0 / freq / 60.0
        sigma_rad = np.radians(fwhm_deg) / math.sqrt(8 * math.log(2))
        t_peak = 1e-26 * flux * C_M_S**2 / (2 * K_B * (freq * 1e9) ** 2 * 2 * math.pi * sigma_rad**2)
        ((s, e),) = f["truth/scans/edges"][...]
        mjd = f["spectrometer/MJD"][s:e]
        for i in range(2):
            gain = f["truth/instrument/gain"][i]
            dg = f["truth/noise/dg"][i, s:e]
            v_src = f["spectrometer/tod"][i, :, :, s:e].astype(np.float64)
            v_twin = g["spectrometer/tod"][i, :, :, s:e].astype(np.float64)
            np.testing.assert_array_equal(
                g["spectrometer/pixel_pointing/pixel_ra"][i], f["spectrometer/pixel_pointing/pixel_ra"][i]
            )
            if kind == "taua":
                from astropy import units as u
                from astropy.coordinates import SkyCoord

                pos = SkyCoord(
                    f["spectrometer/pixel_pointing/pixel_ra"][i, s:e] * u.deg,
                    f["spectrometer/pixel_pointing/pixel_dec"][i, s:e] * u.deg,
                )
                cited = SkyCoord("05h34m31.94s", "+22d00m52.2s")  # docs/calibrators.md#positions
                r_deg = pos.separation(cited).deg
            else:
                from astropy import units as u
                from astropy.coordinates import AltAz, EarthLocation, SkyCoord, get_body
                from astropy.time import Time

                loc = EarthLocation.from_geodetic(-118.2822222 * u.deg, 37.2338889 * u.deg, 1222.0 * u.m)
                t = Time(mjd, format="mjd", scale="utc")
                jup = get_body("jupiter", t, location=loc).transform_to(
                    AltAz(obstime=t, location=loc, pressure=0 * u.hPa)
                )
                pos = SkyCoord(
                    az=f["spectrometer/pixel_pointing/pixel_az"][i, s:e] * u.deg,
                    alt=f["spectrometer/pixel_pointing/pixel_el"][i, s:e] * u.deg,
                    frame=AltAz(obstime=t, location=loc, pressure=0 * u.hPa),
                )
                r_deg = pos.separation(jup).deg
            expected = (
                gain[:, :, None]
                * (1 + dg)
                * t_peak[:, :, None]
                * np.exp(-0.5 * (np.radians(r_deg) / sigma_rad[:, :, None]) ** 2)
            )
            atol = np.spacing(np.abs(v_src).astype(np.float32)).astype(np.float64) + np.spacing(
                np.abs(v_twin).astype(np.float32)
            ).astype(np.float64)
            scale = gain[:, :, None] * (1 + dg) * t_peak[:, :, None]
            tol = 1e-6 * scale + atol  # 1e-6 of the peak plus the float32 spacing of both TODs
            near = r_deg < 2.0 * np.degrees(sigma_rad.min())
            if i == 0:
                assert near.sum() > 10 and r_deg.min() < 0.02
                k = int(np.argmin(r_deg))
                assert np.all(np.abs(v_src[:, :, k] - v_twin[:, :, k] - expected[:, :, k]) <= tol[:, :, k])
            diff = np.abs(v_src - v_twin - expected)
            assert np.all(diff[:, :, near] <= tol[:, :, near])
            assert np.all(diff <= tol + 1e-6 * scale)


# --------------------------------------------------------------------------------------------------
# radio recombination lines
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_channels", [1024, 128])
def test_rrl_integrated_intensity(n_channels, tmp_path):
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    region = HIIRegion(0.0, 0.0, 4.0, 6.0, -2.1, 0.15, 95.0, 25.0)
    sky = SkySpec(kind="galactic", t_ridge_k=0.0, hii_regions=[region])
    spec = small_spec(
        feeds=[1],
        n_channels=n_channels,
        white_noise=False,
        gain_fluctuations=False,
        target_ra_deg=None,
        target_dec_deg=None,
        hour_angle_h=0.0,
        scan=ScanSpec(kind="stare", duration_s=1.0),
        sky=sky,
    )
    twin_sky = SkySpec(kind="galactic", t_ridge_k=0.0, hii_regions=[HIIRegion(0.0, 0.0, 4.0, 6.0, -2.1, 0.0)])
    p_line = simulate_observation(spec, tmp_path / "line")
    p_cont = simulate_observation(spec.replace(sky=twin_sky), tmp_path / "cont")
    with h5py.File(p_line, "r") as f, h5py.File(p_cont, "r") as g:
        freq = f["spectrometer/frequency"][...]
        ((s, e),) = f["truth/scans/edges"][...]
        v_corr = f["truth/rrl/v_corr_kms"][0]
        lines = f["truth/rrl/lines"][...]
        assert [x.decode() for x in lines["name"]] == ["H58a", "H59a", "H60a", "H61a", "H62a"]
        gain = f["truth/instrument/gain"][0]
        dt = (
            f["spectrometer/tod"][0, :, :, s:e].astype(np.float64)
            - g["spectrometer/tod"][0, :, :, s:e].astype(np.float64)
        ) / gain[:, :, None]
        pos = SkyCoord(
            f["spectrometer/pixel_pointing/pixel_ra"][0, s:e] * u.deg,
            f["spectrometer/pixel_pointing/pixel_dec"][0, s:e] * u.deg,
        ).galactic
        r_arcmin = pos.separation(SkyCoord(l=30.0 * u.deg, b=0.0 * u.deg, frame="galactic")).arcmin
    dnu = 2.0 / n_channels
    for row in lines:
        nu0 = row["rest_freq_ghz"]
        v = 299792.458 * (nu0 - freq) / nu0 + v_corr
        window = np.abs(v - region.v_lsr_kms) < 400.0
        dv = 299792.458 * dnu / nu0
        measured = dt[window].sum(axis=0) * dv
        fwhm = 4.5 * 30.0 / nu0
        t_c = (
            region.t_peak_30ghz_k
            * (nu0 / 30.0) ** region.beta
            * region.fwhm_arcmin**2
            / (region.fwhm_arcmin**2 + fwhm**2)
            * np.exp(-0.5 * r_arcmin**2 / ((region.fwhm_arcmin**2 + fwhm**2) / (8 * math.log(2))))
        )
        expected = region.line_ratio * t_c * region.line_fwhm_kms * math.sqrt(math.pi / (4 * math.log(2)))
        np.testing.assert_allclose(measured, expected, rtol=0.005)


def test_truth_map_matches_tod_sky(tmp_path):
    """Noise-free CES: the sky in the TOD (half-band average) equals the truth map at the feed
    positions, to the 1′-pixel interpolation and half-band-averaging error (≤ 0.3 % of the peak)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS
    from scipy.interpolate import RegularGridInterpolator

    spec = _ces_spec(
        n_channels=16, white_noise=False, gain_fluctuations=False, atm_zenith_k=0.0, feeds=[1, 2, GROUND_FEED]
    )
    path = simulate_observation(spec, tmp_path)
    with h5py.File(path, "r") as f:
        sky = f["truth/sky"]
        w = WCS(naxis=2)
        w.wcs.ctype = [sky.attrs["CTYPE1"], sky.attrs["CTYPE2"]]
        w.wcs.crpix = [sky.attrs["CRPIX1"], sky.attrs["CRPIX2"]]
        w.wcs.crval = [sky.attrs["CRVAL1"], sky.attrs["CRVAL2"]]
        w.wcs.cdelt = [sky.attrs["CDELT1"], sky.attrs["CDELT2"]]
        assert sky.attrs["CTYPE1"] == "GLON-CAR" and abs(sky.attrs["CDELT2"] - 1 / 60) < 1e-12
        maps = sky["map"][...].astype(np.float64)
        ny, nx = maps.shape[1:]
        assert (ny, nx) == (sky.attrs["NAXIS2"], sky.attrs["NAXIS1"])
        freq = f["spectrometer/frequency"][...]
        np.testing.assert_allclose(
            sky["frequency_ghz"][...], [h.mean() for b in freq for h in (b[:8], b[8:])], rtol=1e-15
        )
        ((s, e),) = f["truth/scans/edges"][...]
        for i in range(2):
            t_sky = (
                f["spectrometer/tod"][i, :, :, s:e].astype(np.float64)
                / f["truth/instrument/gain"][i][:, :, None]
                - f["truth/instrument/t_rx_k"][i][:, :, None]
                - spec.t_cmb_k
            )
            pos = SkyCoord(
                f["spectrometer/pixel_pointing/pixel_ra"][i, s:e] * u.deg,
                f["spectrometer/pixel_pointing/pixel_dec"][i, s:e] * u.deg,
            ).galactic
            x, y = w.world_to_pixel_values(pos.l.deg, pos.b.deg)
            assert x.min() > 28 and x.max() < nx - 29 and y.min() > 28 and y.max() < ny - 29  # ~0.5° pad
            for k in range(maps.shape[0]):
                b, h = divmod(k, 2)
                tod_sky = t_sky[b, 8 * h : 8 * h + 8].mean(axis=0)
                interp = RegularGridInterpolator((np.arange(ny), np.arange(nx)), maps[k], method="cubic")
                on_map = interp(np.stack([y, x], axis=-1))
                assert np.max(np.abs(tod_sky - on_map)) < 0.003 * maps[k].max()


# --------------------------------------------------------------------------------------------------
# ground feed, vane truth, determinism
# --------------------------------------------------------------------------------------------------
def _ces_spec(**changes) -> ObservationSpec:
    spec = ObservationSpec(
        obsid=99003,
        feeds=[1, GROUND_FEED],
        n_channels=8,
        hour_angle_h=-1.5,
        scan=ScanSpec(kind="ces", n_segments=1, segment_s=10.0),
        sky=SkySpec(kind="galactic"),
    )
    return spec.replace(**changes)


def test_ground_feed_has_no_vane_or_sky(tmp_path):
    path = simulate_observation(_ces_spec(white_noise=False, gain_fluctuations=False), tmp_path)
    with h5py.File(path, "r") as f:
        feeds = f["spectrometer/feeds"][...].tolist()
        g = f["spectrometer/tod"][feeds.index(GROUND_FEED)]
        sci = f["spectrometer/tod"][feeds.index(1)].astype(np.float64)
        edges = f["truth/vane/event_edges"][...]
        assert np.all(np.ptp(g, axis=-1) == 0.0)  # constant: no vane step, no sky, no atmosphere
        # the science feed does see the vane (hot/cold step) and the sky
        s, e = edges[0]
        assert np.all(sci[:, :, s:e].max(axis=-1) > 4.0 * sci[:, :, s:e].min(axis=-1))
        ((a, b),) = f["truth/scans/edges"][...]
        assert np.all(np.ptp(sci[:, :, a:b], axis=-1) > 0.0)
        assert np.all(np.isnan(f["truth/vane/tsys_physical_k"][:, feeds.index(GROUND_FEED)]))


def test_vane_truth_matches_pipeline_rules(small_archive):
    for path in small_archive.paths:
        with h5py.File(path, "r") as f:
            mjd = f["spectrometer/MJD"][...]
            utc = f["hk/antenna0/vane/utc"][...] - 0.6 / 86400.0
            angle = np.interp(mjd, utc, f["hk/antenna0/vane/angle"][...].astype(np.float64) * 0.01)
            tshroud = f["hk/antenna0/vane/Tshroud"][...].astype(np.float64) * 0.01
            feeds = f["spectrometer/feeds"][...].tolist()
            edges = f["truth/vane/event_edges"][...]
            assert len(edges) == 2
            for k, (s, e) in enumerate(edges):
                inside = (utc >= mjd[s]) & (utc <= mjd[e - 1])
                end = mjd[e] if e < mjd.size else mjd[-1] + np.median(np.diff(mjd))
                also = (utc >= mjd[s]) & (utc < end)  # the other reading of "inside the event"
                assert np.array_equal(inside, also)
                assert f["truth/vane/t_hot_k"][k] == pytest.approx(tshroud[inside].mean() + 273.15, abs=1e-9)
                a = angle[s:e]
                hot = a < a.min() + 4.0
                cold = a > 180.0
                assert f["truth/vane/n_hot"][k] == hot.sum() and 240 <= hot.sum() <= 280
                assert f["truth/vane/n_cold"][k] == cold.sum() and 2 * 240 <= cold.sum() <= 2 * 280
                t_hot = f["truth/vane/t_hot_k"][k]
                for i, feed in enumerate(feeds):
                    if feed == GROUND_FEED:
                        continue
                    raw = f["spectrometer/tod"][i, :, :, s:e].astype(np.float64)
                    v_hot, v_cold = raw[:, :, hot].mean(-1), raw[:, :, cold].mean(-1)
                    gain = (v_hot - v_cold) / (t_hot - 2.73)
                    relg = np.abs(gain / f["truth/vane/gain_expected"][k, i] - 1)
                    assert np.median(relg) < 0.01 and np.percentile(relg, 99) < 0.03
                    # the cold power is the physical Tsys (T_rx + atmosphere + CMB) times the true gain
                    phys = f["truth/vane/tsys_physical_k"][k, i]
                    g_true = f["truth/instrument/gain"][i]
                    rel = np.abs(v_cold / (g_true * phys) - 1)
                    assert np.median(rel) < 0.01 and np.percentile(rel, 99) < 0.03
                    assert np.all(phys > f["truth/instrument/t_rx_k"][i] + 2.0)


def test_determinism(tmp_path):
    spec = _ces_spec()
    a = read_all(simulate_observation(spec, tmp_path / "a", seed=1))
    b = read_all(simulate_observation(spec, tmp_path / "b", seed=1))
    c = read_all(simulate_observation(spec, tmp_path / "c", seed=2))
    d = read_all(simulate_observation(spec.replace(instrument_seed=1), tmp_path / "d", seed=2))
    assert a.keys() == b.keys()
    for key in a:
        assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key
    assert not np.array_equal(a["spectrometer/tod"], c["spectrometer/tod"])
    assert not np.array_equal(a["truth/noise/dg"][0], c["truth/noise/dg"][0])
    assert not np.array_equal(a["truth/instrument/gain"][0], c["truth/instrument/gain"][0])
    np.testing.assert_array_equal(a["truth/instrument/gain"], d["truth/instrument/gain"])
    np.testing.assert_array_equal(a["truth/instrument/t_rx_k"], d["truth/instrument/t_rx_k"])
    assert not np.array_equal(a["spectrometer/tod"], d["spectrometer/tod"])


# --------------------------------------------------------------------------------------------------
# specification I/O, CLI and report
# --------------------------------------------------------------------------------------------------
def test_spec_toml_round_trip():
    for archive in PRESETS.values():
        for obs in archive.observations:
            again = ObservationSpec.from_dict(tomllib.loads(obs.to_toml()))
            assert again == obs
    with pytest.raises(SimulatorError, match="unknown scan parameter"):
        ObservationSpec.from_dict({"scan": {"knd": "ces"}})
    with pytest.raises(SimulatorError, match="n_channels"):
        small_spec(n_channels=7).validate()


def test_cli_observation_and_report(tmp_path, tiny_archive):
    cfg = tmp_path / "obs.toml"
    cfg.write_text(small_spec(scan=ScanSpec(kind="stare", duration_s=2.0)).to_toml())
    out = tmp_path / "out"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "utils.simulator",
            "observation",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--seed",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    (path,) = out.glob("comap-0099001-*.hd5")
    with h5py.File(path, "r") as f:
        assert int(f["truth"].attrs["seed"]) == 3
    # a fake level-2 file whose Tsys is 2 % above the truth
    l1 = tiny_archive.paths[0]
    l2dir = tmp_path / "reduced" / "level2"
    l2dir.mkdir(parents=True)
    with h5py.File(l1, "r") as f, h5py.File(l2dir / f"Level2_{l1.name}", "w") as g:
        feeds = f["spectrometer/feeds"][...]
        science = [i for i, x in enumerate(feeds) if x != GROUND_FEED][::-1]  # shuffled order
        g["spectrometer/feeds"] = feeds[science]
        # the noise-equivalent Tsys in vane K is the physical Tsys times the vane's gain bias g/G
        phys = f["truth/vane/tsys_physical_k"][...]
        bias = f["truth/instrument/gain"][...][None] / f["truth/vane/gain_expected"][...]
        g["level2/vane/system_temperature"] = 1.02 * (phys * bias)[:, science]
        g["level2/vane/event_edges"] = f["truth/vane/event_edges"][...]
    res = subprocess.run(
        [sys.executable, "-m", "utils.simulator", "report", str(tiny_archive.root)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "level-2 file absent" in res.stdout
    from utils.simulator.report import build_report, find_observations

    (tmp_path / "reduced" / "remote").mkdir()
    shutil.copy(l1, tmp_path / "reduced" / "remote" / l1.name)
    obs = find_observations(tmp_path / "reduced")
    assert len(obs) == 1 and obs[0].level2 is not None
    text = build_report(tmp_path / "reduced")
    assert "1.0200" in text
