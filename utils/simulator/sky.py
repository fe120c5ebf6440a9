"""Sky models (docs/simulator.md#sky-models): calibrators as beam-convolved point sources, the Galactic field
with RRLs, none.

Each model returns the astronomical brightness ``T_sky`` (K_RJ) seen by one feed for a chunk of
samples, shape ``(n_bands, n_channels, n_samples)``, or None where it is zero. The truth map
(docs/simulator.md#truth) is evaluated with the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.special import erf

from utils.constants import BAND_EDGES_GHZ
from utils.coordinates import angular_separation_deg, galactic_to_icrs, icrs_to_galactic
from utils.rrl import SPEED_OF_LIGHT_KMS, RecombinationLine, lines_in_range

from .calibrator_truth import (
    FWHM_TO_SIGMA,
    beam_fwhm_arcmin,
    calibrator_position,
    flux_jy,
    jupiter_azel,
    point_source_peak_k,
)
from .instrument import channel_width_hz
from .pointing import Target
from .spec import ObservationSpec, SkySpec

POINT_SOURCE_CUTOFF_SIGMA: float = 10.0
"""Point-source profiles are evaluated only within this many beam σ (exp(−50) beyond)."""


@dataclass
class FeedChunk:
    """Pointing of one feed over a chunk of samples (all arrays shape (n,))."""

    mjd: NDArray[np.float64]
    ra_deg: NDArray[np.float64]
    dec_deg: NDArray[np.float64]
    az_deg: NDArray[np.float64]
    el_deg: NDArray[np.float64]
    doppler_index: NDArray[np.int64] | None = None


class SkyModel:
    """Base class: no emission."""

    kind: str = "none"

    def brightness_k(self, chunk: FeedChunk) -> NDArray[np.float64] | None:
        """Sky brightness (K_RJ), shape (n_bands, n_channels, n), or None if zero everywhere."""
        return None

    def map_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64] | None:
        """Beam-convolved continuum (K_RJ) at Galactic positions, shape (n_freq,) + l.shape."""
        return None


# --------------------------------------------------------------------------------------------------
# Point sources
# --------------------------------------------------------------------------------------------------
class PointSourceSky(SkyModel):
    """A calibrator (TauA, CasA, CygA, Jupiter) with its model flux at the observation mid-time."""

    def __init__(
        self, spec: ObservationSpec, freq_ghz: NDArray, mjd_mid: float, mjd_span: tuple[float, float]
    ) -> None:
        self.kind = spec.sky.kind
        self.name = spec.sky.calibrator_name
        self.freq_ghz = freq_ghz
        self.mjd_mid = float(mjd_mid)
        self.fwhm_30 = spec.beam_fwhm_arcmin_30ghz
        self.source_fwhm_arcmin = spec.sky.source_fwhm_arcmin
        self.moving = self.name == "Jupiter"
        if self.moving:
            self.distance_au = float(jupiter_azel(np.array([self.mjd_mid]))[2][0])
            self.track = Target("Jupiter", moving=True)
            self.track.prepare_track(*mjd_span)
        else:
            self.distance_au = float("nan")
            self.track = None
        ra, dec = calibrator_position(self.name, np.array([self.mjd_mid]))
        self.ra_deg, self.dec_deg = float(ra[0]), float(dec[0])
        self.flux_jy = self.flux_at(freq_ghz)
        self.beam_fwhm_arcmin = beam_fwhm_arcmin(freq_ghz, self.fwhm_30)
        self.t_peak_k = self.peak_at(freq_ghz)
        self.sigma_deg = self.sigma_at(freq_ghz)

    def flux_at(self, freq_ghz: NDArray) -> NDArray[np.float64]:
        """Model flux (Jy) at the mid-time."""
        if self.moving:
            return flux_jy(self.name, freq_ghz, self.mjd_mid, distance_au=self.distance_au)
        return flux_jy(self.name, freq_ghz, self.mjd_mid)

    def peak_at(self, freq_ghz: NDArray) -> NDArray[np.float64]:
        return point_source_peak_k(
            self.flux_at(freq_ghz),
            freq_ghz,
            beam_fwhm_arcmin(freq_ghz, self.fwhm_30),
            source_fwhm_arcmin=self.source_fwhm_arcmin,
        )

    def sigma_at(self, freq_ghz: NDArray) -> NDArray[np.float64]:
        fwhm = np.hypot(beam_fwhm_arcmin(freq_ghz, self.fwhm_30), self.source_fwhm_arcmin)
        return fwhm / 60.0 * FWHM_TO_SIGMA

    def distance_deg(self, chunk: FeedChunk) -> NDArray[np.float64]:
        """Angular distance of the feed from the source; Jupiter's is computed in AltAz
        (docs/simulator.md#pointing)."""
        if self.moving:
            az_j, el_j = self.track.azel(chunk.mjd)
            return angular_separation_deg(chunk.az_deg, chunk.el_deg, az_j, el_j)
        return angular_separation_deg(chunk.ra_deg, chunk.dec_deg, self.ra_deg, self.dec_deg)

    def brightness_k(self, chunk: FeedChunk) -> NDArray[np.float64] | None:
        r = self.distance_deg(chunk)
        near = r < POINT_SOURCE_CUTOFF_SIGMA * float(self.sigma_deg.max())
        if not near.any():
            return None
        out = np.zeros(self.freq_ghz.shape + r.shape)
        rr = r[near]
        out[:, :, near] = self.t_peak_k[:, :, None] * np.exp(-0.5 * (rr / self.sigma_deg[:, :, None]) ** 2)
        return out

    def map_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64] | None:
        if self.moving:
            return None
        ra, dec = galactic_to_icrs(l_deg, b_deg)
        r = angular_separation_deg(ra, dec, self.ra_deg, self.dec_deg)
        f = np.asarray(freqs_ghz, dtype=np.float64)
        peak = self.peak_at(f)
        sigma = self.sigma_at(f)
        shape = (f.size,) + (1,) * np.ndim(r)
        return peak.reshape(shape) * np.exp(-0.5 * (r[None] / sigma.reshape(shape)) ** 2)


# --------------------------------------------------------------------------------------------------
# Galactic field
# --------------------------------------------------------------------------------------------------
def interpolation_matrix(x_new: NDArray, x_ref: NDArray) -> NDArray[np.float64]:
    """Dense matrix W with ``W @ y_ref == np.interp(x_new, x_ref, y_ref)`` (x_ref increasing)."""
    x_new = np.asarray(x_new, dtype=np.float64).ravel()
    j = np.clip(np.searchsorted(x_ref, x_new, side="right") - 1, 0, len(x_ref) - 2)
    w = np.clip((x_new - x_ref[j]) / (x_ref[j + 1] - x_ref[j]), 0.0, 1.0)
    out = np.zeros((x_new.size, len(x_ref)))
    rows = np.arange(x_new.size)
    out[rows, j] = 1.0 - w
    out[rows, j + 1] += w
    return out


class GalacticSky(SkyModel):
    """Diffuse ridge + compact HII regions with Hnα recombination lines (docs/simulator.md#galactic-field).

    The continuum is evaluated exactly at ``n_beam_freqs`` frequencies evenly spaced over the
    receiver band and interpolated linearly to the channels (and to truth-map frequencies). Line
    amplitudes use the exact beam at each line frequency; each channel integrates the Gaussian line
    profile over its frequency box with ``erf``.
    """

    kind = "galactic"

    def __init__(self, spec: ObservationSpec, freq_ghz: NDArray, v_corr_kms: list[float]) -> None:
        sky: SkySpec = spec.sky
        self.sky = sky
        self.freq_ghz = freq_ghz
        self.fwhm_30 = spec.beam_fwhm_arcmin_30ghz
        lo = min(e[0] for e in BAND_EDGES_GHZ)
        hi = max(e[1] for e in BAND_EDGES_GHZ)
        self.beam_freqs_ghz = np.linspace(lo, hi, spec.n_beam_freqs)
        self.w_channels = interpolation_matrix(freq_ghz.ravel(), self.beam_freqs_ghz)
        self.channel_width_ghz = channel_width_hz(freq_ghz.shape[1]) / 1.0e9
        self.v_corr_kms = [float(v) for v in v_corr_kms]
        lines: list[RecombinationLine] = []
        for n_lo, n_hi in BAND_EDGES_GHZ:
            for line in lines_in_range(n_lo, n_hi, sky.rrl_species, sky.rrl_dn):
                if sky.rrl_n_min <= line.n <= sky.rrl_n_max and line not in lines:
                    lines.append(line)
        self.lines = sorted(lines, key=lambda ln: ln.n)
        self.line_freqs_ghz = np.array([ln.rest_freq_ghz for ln in self.lines])
        self.has_lines = bool(self.lines) and any(r.line_ratio != 0.0 for r in sky.hii_regions)
        self._profiles: dict[int, tuple[NDArray, NDArray]] = {}

    # continuum --------------------------------------------------------------------------------
    def ridge_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64]:
        """Beam-convolved (in b) diffuse ridge, shape (n_freq,) + l.shape."""
        sky = self.sky
        f = np.asarray(freqs_ghz, dtype=np.float64).reshape((-1,) + (1,) * np.ndim(l_deg))
        s = sky.ridge_fwhm_deg * FWHM_TO_SIGMA
        sig_b = beam_fwhm_arcmin(f, self.fwhm_30) / 60.0 * FWHM_TO_SIGMA
        s_eff2 = s**2 + sig_b**2
        db = np.asarray(b_deg) - sky.b0_deg - sky.ridge_b_off_deg
        dl = (np.asarray(l_deg) - sky.l0_deg + 180.0) % 360.0 - 180.0
        profile = np.exp(-0.5 * db**2 / s_eff2) * (s / np.sqrt(s_eff2))
        modulation = 1.0 + sky.ridge_modulation * np.sin(2.0 * np.pi * dl / sky.ridge_lambda_deg)
        return sky.t_ridge_k * profile * modulation * (f / 30.0) ** sky.ridge_beta

    def region_distance_deg(self, i: int, l_deg: NDArray, b_deg: NDArray) -> NDArray[np.float64]:
        reg = self.sky.hii_regions[i]
        return angular_separation_deg(
            l_deg, b_deg, self.sky.l0_deg + reg.dl_deg, self.sky.b0_deg + reg.db_deg
        )

    def region_k(self, i: int, r_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64]:
        """Observed continuum of HII region ``i`` at distance ``r_deg``, shape (n_freq,) + r.shape."""
        reg = self.sky.hii_regions[i]
        f = np.asarray(freqs_ghz, dtype=np.float64).reshape((-1,) + (1,) * np.ndim(r_deg))
        fwhm2 = beam_fwhm_arcmin(f, self.fwhm_30) ** 2
        theta2 = reg.fwhm_arcmin**2
        peak = reg.t_peak_30ghz_k * (f / 30.0) ** reg.beta * theta2 / (theta2 + fwhm2)
        sigma_deg = np.sqrt(theta2 + fwhm2) / 60.0 * FWHM_TO_SIGMA
        return peak * np.exp(-0.5 * (np.asarray(r_deg)[None] / sigma_deg) ** 2)

    def continuum_exact_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64]:
        """Exact beam-convolved continuum at ``freqs_ghz``, shape (n_freq,) + l.shape."""
        out = self.ridge_k(l_deg, b_deg, freqs_ghz)
        for i in range(len(self.sky.hii_regions)):
            out += self.region_k(i, self.region_distance_deg(i, l_deg, b_deg), freqs_ghz)
        return out

    def map_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64]:
        """Continuum through the same n_beam_freqs interpolation as the TOD."""
        ref = self.continuum_exact_k(l_deg, b_deg, self.beam_freqs_ghz)
        w = interpolation_matrix(np.asarray(freqs_ghz), self.beam_freqs_ghz)
        return np.tensordot(w, ref, axes=1)

    # lines ------------------------------------------------------------------------------------
    def line_profile_matrix(self, v_corr_kms: float) -> NDArray[np.float64]:
        """Channel-box-averaged line profiles, shape (n_bands·n_channels, n_regions·n_lines)."""
        nu = self.freq_ghz.ravel()[:, None]
        half = 0.5 * self.channel_width_ghz
        cols = []
        for reg in self.sky.hii_regions:
            sigma_v = reg.line_fwhm_kms * FWHM_TO_SIGMA
            for nu0 in self.line_freqs_ghz:
                v_hi = SPEED_OF_LIGHT_KMS * (nu0 - (nu - half)) / nu0 + v_corr_kms
                v_lo = SPEED_OF_LIGHT_KMS * (nu0 - (nu + half)) / nu0 + v_corr_kms
                s2 = math.sqrt(2.0) * sigma_v
                integral = (
                    sigma_v
                    * math.sqrt(math.pi / 2.0)
                    * (erf((v_hi - reg.v_lsr_kms) / s2) - erf((v_lo - reg.v_lsr_kms) / s2))
                )
                cols.append(integral / (v_hi - v_lo))
        return np.concatenate(cols, axis=1)

    def line_amplitudes_k(self, l_deg: NDArray, b_deg: NDArray) -> NDArray[np.float64]:
        """Line peak ``R_i · T_C,i(ν_line)`` per (region, line), shape (n_regions·n_lines, n)."""
        rows = []
        for i, reg in enumerate(self.sky.hii_regions):
            r = self.region_distance_deg(i, l_deg, b_deg)
            rows.append(reg.line_ratio * self.region_k(i, r, self.line_freqs_ghz))
        return np.concatenate(rows, axis=0)

    def brightness_k(self, chunk: FeedChunk) -> NDArray[np.float64]:
        l_deg, b_deg = icrs_to_galactic(chunk.ra_deg, chunk.dec_deg)
        ref = self.continuum_exact_k(l_deg, b_deg, self.beam_freqs_ghz)
        out = self.w_channels @ ref
        if self.has_lines:
            amps = self.line_amplitudes_k(l_deg, b_deg)
            dop = np.asarray(chunk.doppler_index)
            # the scan index is piecewise constant in time: handle each run as a slice
            cuts = np.concatenate([[0], np.nonzero(np.diff(dop))[0] + 1, [dop.size]])
            for a, b in zip(cuts[:-1], cuts[1:]):
                rows, profile = self._profile(int(dop[a]))
                out[rows, a:b] += profile @ amps[:, a:b]
        return out.reshape(self.freq_ghz.shape + (l_deg.size,))

    def _profile(self, scan_index: int) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Rows (channels) with a non-zero line response and their profile rows, cached per scan.

        Rows that are exactly zero are skipped; adding them would change nothing.
        """
        if scan_index not in self._profiles:
            full = self.line_profile_matrix(self.v_corr_kms[scan_index])
            rows = np.nonzero(np.any(full != 0.0, axis=1))[0]
            self._profiles[scan_index] = (rows, np.ascontiguousarray(full[rows]))
        return self._profiles[scan_index]


def make_sky(
    spec: ObservationSpec,
    freq_ghz: NDArray,
    mjd_mid: float,
    mjd_span: tuple[float, float],
    v_corr_kms: list[float],
) -> SkyModel:
    """The sky model of ``spec``."""
    kind = spec.sky.kind
    if kind == "none":
        return SkyModel()
    if kind == "galactic":
        return GalacticSky(spec, freq_ghz, v_corr_kms)
    return PointSourceSky(spec, freq_ghz, mjd_mid, mjd_span)
