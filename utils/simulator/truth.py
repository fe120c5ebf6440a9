"""The ``/truth`` group (docs/simulator.md#truth): exact inputs and noise-free estimator expectations.

The vane expectations replicate the pipeline's selection (docs/formats/level1.md#vane-conventions,
docs/level2.md#systemtemperature) on the stored housekeeping: the vane angle (``raw × 0.01``) is mapped onto
spectrometer time by linear interpolation on the vane group's own clock minus 0.6 s; hot samples have angle <
θ_min + 4°, cold samples > 180°; ``T_hot`` is the mean of the Tshroud hk samples whose corrected time lies
inside the event (``MJD[start] ≤ t ≤ MJD[stop − 1]``) plus 273.15 K.

The system-temperature truth ``vane/tsys_physical_k`` is the physical input temperature the simulator injects
on the cold (sky) samples, averaged over them: receiver + atmosphere + CMB + any sky or spill term in
``T_in`` (docs/simulator.md#truth). It is *not* derived from the pipeline's Y-factor formula. The vane gain
expectation ``vane/gain_expected`` is the response of the noise-free, δg-free power to the hot−cold load
difference, ``g (T_in,hot − T_in,cold)/(T_hot − T_c)`` with T_c = 2.73 K: what a vane that assumes a 2.73 K
sky measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np
from numpy.typing import NDArray

from utils.constants import GROUND_FEED, HK_TIME_OFFSET_S, ZERO_CELSIUS_K

from .components import ComponentSky
from .pointing import SECONDS_PER_DAY
from .sky import GalacticSky, PointSourceSky, SkyModel

T_COLD_K: float = 2.73
HOT_ANGLE_MARGIN_DEG: float = 4.0
COLD_ANGLE_MIN_DEG: float = 180.0
HK_SCALE: float = 0.01
RADIOMETER_MEDIAN_SAMPLES: int = 1024
"""The median in-scan T_in of truth/noise/radiometer_sigma_k uses at most this many evenly strided
in-scan samples (bounded memory at 1024 channels)."""
TRUTH_MAP_CDELT_DEG: float = 1.0 / 60.0
TRUTH_MAP_PAD_DEG: float = 0.5


def _ds(group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    return group.create_dataset(name, data=data, track_times=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# Vane selection, exactly as the pipeline does it
# --------------------------------------------------------------------------------------------------
@dataclass
class VaneSelection:
    """Hot/cold spectrometer samples and T_hot per vane event."""

    edges: NDArray[np.int64]
    hot: list[NDArray[np.int64]]
    cold: list[NDArray[np.int64]]
    t_hot_k: NDArray[np.float64]


def vane_selection(
    mjd: NDArray, edges: list[tuple[int, int]], hk_utc: NDArray, angle_raw: NDArray, tshroud_raw: NDArray
) -> VaneSelection:
    """Apply the docs/formats/level1.md#vane-conventions / docs/level2.md#systemtemperature rules to stored
    housekeeping (``hk_utc`` as written)."""
    corrected = hk_utc - HK_TIME_OFFSET_S / SECONDS_PER_DAY
    angle = np.interp(mjd, corrected, angle_raw.astype(np.float64) * HK_SCALE, left=np.nan, right=np.nan)
    tshroud = tshroud_raw.astype(np.float64) * HK_SCALE
    hot, cold, t_hot = [], [], []
    for start, stop in edges:
        a = angle[start:stop]
        theta_min = np.nanmin(a)
        hot.append(start + np.nonzero(a < theta_min + HOT_ANGLE_MARGIN_DEG)[0])
        cold.append(start + np.nonzero(a > COLD_ANGLE_MIN_DEG)[0])
        inside = (corrected >= mjd[start]) & (corrected <= mjd[stop - 1])
        if inside.any():
            t_hot.append(float(np.mean(tshroud[inside])) + ZERO_CELSIUS_K)
        else:
            t_hot.append(
                float(np.interp(0.5 * (mjd[start] + mjd[stop - 1]), corrected, tshroud)) + ZERO_CELSIUS_K
            )
    return VaneSelection(np.asarray(edges, dtype=np.int64).reshape(-1, 2), hot, cold, np.asarray(t_hot))


# --------------------------------------------------------------------------------------------------
# Accumulators filled while the TOD is generated
# --------------------------------------------------------------------------------------------------
class TruthAccumulator:
    """Per-feed sums of the noise-free, δg-free input temperature over the vane hot/cold samples,
    and strided in-scan samples for the median T_in."""

    def __init__(self, n_feeds: int, shape: tuple[int, int], vane: VaneSelection, in_scan: NDArray) -> None:
        n_ev = len(vane.hot)
        self.vane = vane
        self.hot_mean = np.full((n_ev, n_feeds) + shape, np.nan)
        self.cold_mean = np.full((n_ev, n_feeds) + shape, np.nan)
        self.median_t_in = np.full((n_feeds,) + shape, np.nan)
        idx = np.nonzero(in_scan)[0]
        stride = max(1, math.ceil(idx.size / RADIOMETER_MEDIAN_SAMPLES))
        self.median_idx = idx[::stride]
        self._shape = shape
        self._feed = -1

    def start_feed(self, ifeed: int) -> None:
        n_ev = len(self.vane.hot)
        self._feed = ifeed
        self._hot = np.zeros((n_ev,) + self._shape)
        self._cold = np.zeros((n_ev,) + self._shape)
        self._median = np.empty(self._shape + (self.median_idx.size,))

    def add_chunk(self, start: int, t_in: NDArray) -> None:
        """Add ``t_in`` (n_bands, n_channels, n) covering samples ``[start, start + n)``."""
        stop = start + t_in.shape[-1]
        for k, (hot, cold) in enumerate(zip(self.vane.hot, self.vane.cold)):
            for sel, acc in ((hot, self._hot), (cold, self._cold)):
                s = sel[(sel >= start) & (sel < stop)]
                if s.size:
                    acc[k] += t_in[:, :, s - start].sum(axis=-1)
        lo, hi = np.searchsorted(self.median_idx, [start, stop])
        if hi > lo:
            self._median[:, :, lo:hi] = t_in[:, :, self.median_idx[lo:hi] - start]

    def finish_feed(self) -> None:
        for k, (hot, cold) in enumerate(zip(self.vane.hot, self.vane.cold)):
            if hot.size:
                self.hot_mean[k, self._feed] = self._hot[k] / hot.size
            if cold.size:
                self.cold_mean[k, self._feed] = self._cold[k] / cold.size
        if self.median_idx.size:
            self.median_t_in[self._feed] = np.median(self._median, axis=-1)
        del self._hot, self._cold, self._median


# --------------------------------------------------------------------------------------------------
# Truth map geometry (Galactic CAR, 1' pixels, scanned area + 0.5 deg)
# --------------------------------------------------------------------------------------------------
def truth_map_wcs(
    l_deg: NDArray, b_deg: NDArray, cdelt: float = TRUTH_MAP_CDELT_DEG, pad: float = TRUTH_MAP_PAD_DEG
) -> dict[str, float | int | str]:
    """WCS keywords of a ``GLON-CAR``/``GLAT-CAR`` grid covering the points plus ``pad`` (deg).

    Same construction as the dynamic WCS of docs/mapmaking.md#dynamic-wcs (circular-mean reference longitude,
    odd sizes, ``CRVAL2 = 0`` so the grid stays aligned with latitude).
    """
    lon = np.radians(np.asarray(l_deg, dtype=np.float64))
    l_ref = math.degrees(math.atan2(np.mean(np.sin(lon)), np.mean(np.cos(lon)))) % 360.0
    dl = (np.asarray(l_deg) - l_ref + 180.0) % 360.0 - 180.0
    l_c = (l_ref + 0.5 * (dl.min() + dl.max())) % 360.0
    b_min, b_max = float(np.min(b_deg)), float(np.max(b_deg))
    nx = int(math.ceil((dl.max() - dl.min() + 2 * pad) / cdelt))
    ny = int(math.ceil((b_max - b_min + 2 * pad) / cdelt))
    nx += 1 - nx % 2
    ny += 1 - ny % 2
    b_c = 0.5 * (b_min + b_max)
    return {
        "CTYPE1": "GLON-CAR",
        "CTYPE2": "GLAT-CAR",
        "CUNIT1": "deg",
        "CUNIT2": "deg",
        "NAXIS1": nx,
        "NAXIS2": ny,
        "CRPIX1": (nx + 1) / 2.0,
        "CRPIX2": (ny + 1) / 2.0 - b_c / cdelt,
        "CRVAL1": l_c,
        "CRVAL2": 0.0,
        "CDELT1": -cdelt,
        "CDELT2": cdelt,
    }


def wcs_pixel_centres(header: dict) -> tuple[NDArray, NDArray]:
    """(l, b) of every pixel centre, shape (NAXIS2, NAXIS1), via astropy.wcs."""
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = [header["CTYPE1"], header["CTYPE2"]]
    w.wcs.cunit = [header["CUNIT1"], header["CUNIT2"]]
    w.wcs.crpix = [header["CRPIX1"], header["CRPIX2"]]
    w.wcs.crval = [header["CRVAL1"], header["CRVAL2"]]
    w.wcs.cdelt = [header["CDELT1"], header["CDELT2"]]
    y, x = np.mgrid[0 : header["NAXIS2"], 0 : header["NAXIS1"]]
    lon, lat = w.pixel_to_world_values(x.astype(np.float64), y.astype(np.float64))
    return np.asarray(lon) % 360.0, np.asarray(lat)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def write_truth(
    h5: h5py.File,
    *,
    attrs: dict,
    feeds: list[int],
    instruments: list,
    offsets_arcmin: NDArray,
    white_fraction: float,
    noise_params: dict[str, list[float]],
    acc: TruthAccumulator,
    scans: list[tuple[int, int, str]],
    t_atm_k: NDArray,
    sky: SkyModel,
    ref_freqs_ghz: NDArray,
    map_points: tuple[NDArray, NDArray] | None,
    v_corr_kms: list[float],
) -> None:
    """Write everything under ``/truth`` except ``noise/dg`` (written per feed during generation)."""
    truth = h5.require_group("truth")
    for key, value in attrs.items():
        truth.attrs[key] = value
    science = np.array([f != GROUND_FEED for f in feeds])

    def feed_rows(arr: NDArray) -> NDArray:
        out = np.array(arr, dtype=np.float64, copy=True)
        out[~science] = np.nan
        return out

    inst = truth.create_group("instrument")
    _ds(inst, "gain", feed_rows(np.stack([i.gain for i in instruments])))
    _ds(inst, "t_rx_k", feed_rows(np.stack([i.t_rx_k for i in instruments])))
    _ds(inst, "feed_offsets_arcmin", feed_rows(offsets_arcmin))
    _ds(inst, "feeds", np.asarray(feeds, dtype=np.int32))

    noise = truth.require_group("noise")
    noise.attrs["white_fraction"] = float(white_fraction)
    _ds(noise, "radiometer_sigma_k", feed_rows(acc.median_t_in * white_fraction))
    for name in ("sigma_g", "alpha", "f0_hz"):
        _ds(noise, name, feed_rows(np.asarray(noise_params[name])))

    vane = truth.create_group("vane")
    sel = acc.vane
    _ds(vane, "event_edges", sel.edges)
    _ds(vane, "t_hot_k", sel.t_hot_k)
    _ds(vane, "n_hot", np.array([h.size for h in sel.hot], dtype=np.int32))
    _ds(vane, "n_cold", np.array([c.size for c in sel.cold], dtype=np.int32))
    gain = np.stack([i.gain for i in instruments])
    t_hot = sel.t_hot_k.reshape(-1, 1, 1, 1)
    load_difference_k = acc.hot_mean - acc.cold_mean  # injected T_in, hot minus cold
    with np.errstate(invalid="ignore", divide="ignore"):
        g = gain[None] * load_difference_k / (t_hot - T_COLD_K)
        g = np.where(load_difference_k > 0.0, g, np.nan)
    n_ev = len(sel.hot)
    mask = np.broadcast_to(~science[None, :, None, None], (n_ev,) + g.shape[1:])
    for name, arr in (("gain_expected", g), ("tsys_physical_k", acc.cold_mean)):
        arr = np.array(arr, dtype=np.float64, copy=True)
        arr[mask] = np.nan
        _ds(vane, name, arr)

    sc = truth.create_group("scans")
    _ds(sc, "edges", np.array([[a, b] for a, b, _ in scans], dtype=np.int64).reshape(-1, 2))
    _ds(sc, "kind", np.array([k for _, _, k in scans], dtype="S16"))

    atm = truth.create_group("atmosphere")
    _ds(atm, "t_atm_zenith_k", np.asarray(t_atm_k, dtype=np.float64))

    # the sky model without added components (docs/simulator.md#added-sky-components); the map includes them
    base = sky.base if isinstance(sky, ComponentSky) else sky
    if isinstance(base, PointSourceSky):
        cal = truth.create_group("calibrator")
        cal.attrs["name"] = base.name
        cal.attrs["ra_deg"] = base.ra_deg
        cal.attrs["dec_deg"] = base.dec_deg
        cal.attrs["mjd_mid"] = base.mjd_mid
        cal.attrs["distance_au"] = base.distance_au
        cal.attrs["source_fwhm_arcmin"] = base.source_fwhm_arcmin
        _ds(cal, "flux_jy", base.flux_jy)
        _ds(cal, "beam_fwhm_arcmin", base.beam_fwhm_arcmin)
        _ds(cal, "t_peak_k", base.t_peak_k)

    skyg = truth.create_group("sky")
    skyg.attrs["kind"] = sky.kind
    if isinstance(base, GalacticSky):
        _write_components(skyg, base)
    if map_points is not None:
        header = truth_map_wcs(*map_points)
        lon, lat = wcs_pixel_centres(header)
        sky_map = sky.map_k(lon, lat, ref_freqs_ghz)
        if sky_map is not None:
            for key, value in header.items():
                skyg.attrs[key] = value
            _ds(skyg, "map", sky_map.astype(np.float32))
            _ds(skyg, "frequency_ghz", np.asarray(ref_freqs_ghz, dtype=np.float64))
            skyg["map"].attrs["unit"] = "K_RJ"

    if isinstance(base, GalacticSky):
        rrl = truth.create_group("rrl")
        dt = np.dtype([("name", "S16"), ("n", "i4"), ("dn", "i4"), ("rest_freq_ghz", "f8")])
        lines = np.array([(ln.name.encode(), ln.n, ln.dn, ln.rest_freq_ghz) for ln in base.lines], dtype=dt)
        _ds(rrl, "lines", lines)
        _ds(rrl, "v_corr_kms", np.asarray(v_corr_kms, dtype=np.float64))


def _write_components(group: h5py.Group, sky: GalacticSky) -> None:
    s = sky.sky
    dt = np.dtype(
        [
            ("kind", "S16"),
            ("dl_deg", "f8"),
            ("db_deg", "f8"),
            ("fwhm_arcmin", "f8"),
            ("t_peak_30ghz_k", "f8"),
            ("beta", "f8"),
            ("line_ratio", "f8"),
            ("v_lsr_kms", "f8"),
            ("line_fwhm_kms", "f8"),
        ]
    )
    rows = [
        (
            b"ridge",
            0.0,
            s.ridge_b_off_deg,
            s.ridge_fwhm_deg * 60.0,
            s.t_ridge_k,
            s.ridge_beta,
            0.0,
            np.nan,
            np.nan,
        )
    ]
    rows += [
        (
            b"hii",
            r.dl_deg,
            r.db_deg,
            r.fwhm_arcmin,
            r.t_peak_30ghz_k,
            r.beta,
            r.line_ratio,
            r.v_lsr_kms,
            r.line_fwhm_kms,
        )
        for r in s.hii_regions
    ]
    _ds(group, "components", np.array(rows, dtype=dt))
    group.attrs["l0_deg"] = s.l0_deg
    group.attrs["b0_deg"] = s.b0_deg
    group.attrs["ridge_modulation"] = s.ridge_modulation
    group.attrs["ridge_lambda_deg"] = s.ridge_lambda_deg
    group.attrs["n_beam_freqs"] = len(sky.beam_freqs_ghz)
    group.attrs["beam_fwhm_arcmin_30ghz"] = sky.fwhm_30
