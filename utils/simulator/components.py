"""Added sky components (docs/simulator.md#added-sky-components): point sources, extended Gaussians and
brightness gradients with power-law or log-parabola spectra, on top of any sky model.

:class:`ComponentSky` wraps the sky model of the observation: its brightness is
``base_scale · T_base + Σ_k T_k`` and it is used for the TOD and the truth map alike. Every
component is evaluated exactly at each channel centre (spectrum and chromatic beam), never
interpolated between a few frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import h5py
import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import BOLTZMANN_J_K, JY_W_M2_HZ, SPEED_OF_LIGHT_M_S
from utils.coordinates import angular_separation_deg, galactic_to_icrs, icrs_to_galactic

from .component_spec import SkyComponent, spectral_shape
from .pointing import Target, altaz_to_icrs_feeds
from .sky import FeedChunk, SkyModel
from .spec import ObservationSpec

FWHM_TO_SIGMA: float = 1.0 / math.sqrt(8.0 * math.log(2.0))
"""σ = FWHM · FWHM_TO_SIGMA for a Gaussian."""
COMPONENT_CUTOFF_SIGMA: float = 10.0
"""Point and Gaussian profiles are evaluated within this many σ of their centre (exp(−50) beyond)."""


# --------------------------------------------------------------------------------------------------
# Beam and unit conversions (the simulator's beam: circular Gaussian, FWHM ∝ 1/ν)
# --------------------------------------------------------------------------------------------------
def beam_fwhm_arcmin(freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float) -> NDArray[np.float64]:
    """Beam FWHM (arcmin) at ``freq_ghz``: ``fwhm_30 · 30 GHz / ν`` (docs/simulator.md#sky-models)."""
    return fwhm_arcmin_30ghz * 30.0 / np.asarray(freq_ghz, dtype=np.float64)


def gaussian_solid_angle_sr(fwhm_arcmin: ArrayLike) -> NDArray[np.float64]:
    """``Ω = 2π σ²`` (sr) of a circular Gaussian of FWHM ``fwhm_arcmin``."""
    sigma = np.radians(np.asarray(fwhm_arcmin, dtype=np.float64) / 60.0) * FWHM_TO_SIGMA
    return 2.0 * np.pi * sigma**2


def kelvin_per_jy(freq_ghz: ArrayLike, solid_angle_sr: ArrayLike) -> NDArray[np.float64]:
    """Rayleigh–Jeans K per Jy spread over ``solid_angle_sr``: ``10⁻²⁶ c² / (2 k ν² Ω)``."""
    nu_hz = np.asarray(freq_ghz, dtype=np.float64) * 1.0e9
    return JY_W_M2_HZ * SPEED_OF_LIGHT_M_S**2 / (2.0 * BOLTZMANN_J_K * nu_hz**2 * np.asarray(solid_angle_sr))


def component_peak_k(c: SkyComponent, freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float) -> NDArray[np.float64]:
    """Beam-convolved brightness (K_RJ) at the component's position, same shape as ``freq_ghz``.

    point, K: ``A f(ν)``; point, Jy: ``A f(ν) · K/Jy(Ω_b)``; gaussian, K:
    ``A f(ν) θ²/(θ² + θ_b²)``; gaussian, Jy: ``A f(ν) · K/Jy(Ω_b + Ω_s)``; gradient: ``A f(ν)``
    (a plane is unchanged by the beam). θ are FWHMs, Ω Gaussian solid angles.
    """
    nu = np.asarray(freq_ghz, dtype=np.float64)
    f = spectral_shape(c, nu)
    if c.shape == "gradient":
        return c.amplitude * f
    beam = beam_fwhm_arcmin(nu, fwhm_arcmin_30ghz)
    theta = c.fwhm_arcmin if c.shape == "gaussian" else 0.0
    if c.unit == "Jy":
        omega = gaussian_solid_angle_sr(beam) + gaussian_solid_angle_sr(theta)
        return c.amplitude * f * kelvin_per_jy(nu, omega)
    if c.shape == "point":
        return c.amplitude * f
    return c.amplitude * f * theta**2 / (theta**2 + beam**2)


def component_sigma_deg(
    c: SkyComponent, freq_ghz: ArrayLike, fwhm_arcmin_30ghz: float
) -> NDArray[np.float64]:
    """σ (deg) of the beam-convolved profile: ``sqrt(θ_b² + θ²)/60 · FWHM_TO_SIGMA`` (θ = 0 for a point)."""
    theta = c.fwhm_arcmin if c.shape == "gaussian" else 0.0
    return np.hypot(beam_fwhm_arcmin(freq_ghz, fwhm_arcmin_30ghz), theta) / 60.0 * FWHM_TO_SIGMA


# --------------------------------------------------------------------------------------------------
# Geometry: unit vectors and tangent planes
# --------------------------------------------------------------------------------------------------
def _vec(lon_deg: ArrayLike, lat_deg: ArrayLike) -> NDArray[np.float64]:
    lon, lat = (
        np.radians(np.asarray(lon_deg, dtype=np.float64)),
        np.radians(np.asarray(lat_deg, dtype=np.float64)),
    )
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])


def _lonlat(v: NDArray) -> tuple[float, float]:
    v = np.asarray(v, dtype=np.float64) / np.linalg.norm(v)
    return float(np.degrees(np.arctan2(v[1], v[0])) % 360.0), float(
        np.degrees(np.arcsin(np.clip(v[2], -1, 1)))
    )


def frame_to_icrs_matrix(frame: str) -> NDArray[np.float64]:
    """Rotation taking unit vectors of ``frame`` (galactic or icrs) to ICRS unit vectors."""
    if frame == "icrs":
        return np.eye(3)
    ra, dec = galactic_to_icrs(np.array([0.0, 90.0, 0.0]), np.array([0.0, 0.0, 90.0]))
    return _vec(ra, dec)  # columns: ICRS images of the galactic x, y, z axes


def tangent_basis(lon_deg: float, lat_deg: float) -> NDArray[np.float64]:
    """Rows p, e_lon, e_lat: the direction and the unit vectors of increasing lon and lat, shape (3, 3)."""
    lon, lat = math.radians(lon_deg), math.radians(lat_deg)
    p = [math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)]
    e_lon = [-math.sin(lon), math.cos(lon), 0.0]
    e_lat = [-math.sin(lat) * math.cos(lon), -math.sin(lat) * math.sin(lon), math.cos(lat)]
    return np.array([p, e_lon, e_lat])


class ResolvedComponent:
    """A component with its absolute position: ICRS ``(ra_deg, dec_deg)``, frame ``(lon_deg, lat_deg)``
    and, for gradients, the ICRS tangent basis of its frame at that position."""

    def __init__(self, c: SkyComponent, centre_radec: tuple[float, float] | None) -> None:
        self.spec = c
        rot = frame_to_icrs_matrix(c.frame)
        if c.offset:
            if centre_radec is None:
                raise ValueError("offset position without a pointing target")
            centre = rot.T @ _vec(*centre_radec)
            basis = tangent_basis(*_lonlat(centre))
            x, y = math.radians(c.lon_deg), math.radians(c.lat_deg)
            self.lon_deg, self.lat_deg = _lonlat(basis[0] + x * basis[1] + y * basis[2])
        else:
            self.lon_deg, self.lat_deg = float(c.lon_deg) % 360.0, float(c.lat_deg)
        self.basis_icrs = tangent_basis(self.lon_deg, self.lat_deg) @ rot.T
        self.ra_deg, self.dec_deg = _lonlat(self.basis_icrs[0])

    def plane_offsets_deg(self, ra_deg: NDArray, dec_deg: NDArray) -> tuple[NDArray, NDArray]:
        """Gnomonic offsets (deg) along the frame's lon and lat axes from the component's position."""
        s = _vec(ra_deg, dec_deg)
        p, e_lon, e_lat = (np.tensordot(row, s, axes=1) for row in self.basis_icrs)
        return np.degrees(e_lon / p), np.degrees(e_lat / p)

    def distance_deg(self, ra_deg: NDArray, dec_deg: NDArray) -> NDArray[np.float64]:
        return angular_separation_deg(ra_deg, dec_deg, self.ra_deg, self.dec_deg)


def target_centre_radec(target: Target | None, mjd_mid: float) -> tuple[float, float] | None:
    """ICRS position (deg) of the pointing target (Jupiter: at the mid-time), or None without a target."""
    if target is None:
        return None
    if not target.moving:
        return float(target.ra_deg), float(target.dec_deg)
    az, el = target.azel(np.array([mjd_mid]))
    ((ra, dec),) = list(altaz_to_icrs_feeds([az], [el], np.array([mjd_mid])))
    return float(ra[0]), float(dec[0])


# --------------------------------------------------------------------------------------------------
# The sky model with components
# --------------------------------------------------------------------------------------------------
class ComponentSky(SkyModel):
    """``base_scale ·`` the base sky model ``+`` the added components
    (docs/simulator.md#added-sky-components).

    Parameters
    ----------
    base : SkyModel
        The observation's sky model (galactic field, calibrator or none).
    components : sequence of SkyComponent
        Added components.
    base_scale : float
        Factor on the base model's emission.
    freq_ghz : ndarray, shape (n_bands, n_channels)
        Channel centre frequencies, GHz.
    centre_radec : (float, float) or None
        ICRS position (deg) of the pointing target, the origin of offset positions.
    fwhm_arcmin_30ghz : float
        Beam FWHM at 30 GHz, arcmin.
    """

    def __init__(
        self,
        base: SkyModel,
        components: Sequence[SkyComponent],
        base_scale: float,
        freq_ghz: NDArray,
        centre_radec: tuple[float, float] | None,
        fwhm_arcmin_30ghz: float,
    ) -> None:
        self.base = base
        self.kind = base.kind
        self.base_scale = float(base_scale)
        self.freq_ghz = np.asarray(freq_ghz, dtype=np.float64)
        self.fwhm_30 = float(fwhm_arcmin_30ghz)
        self.components = [ResolvedComponent(c, centre_radec) for c in components]
        self.peak_k = (
            np.stack([component_peak_k(c, self.freq_ghz, self.fwhm_30) for c in components])
            if components
            else np.zeros((0,) + self.freq_ghz.shape)
        )
        """Beam-convolved brightness at each component's position per channel, K_RJ,
        shape (n_components, n_bands, n_channels)."""
        self.sigma_deg = (
            np.stack([component_sigma_deg(c, self.freq_ghz, self.fwhm_30) for c in components])
            if components
            else np.zeros((0,) + self.freq_ghz.shape)
        )

    def _base(self, value: NDArray | None) -> NDArray | None:
        if value is None or self.base_scale == 1.0:
            return value
        value *= self.base_scale
        return value

    def components_k(
        self, ra_deg: NDArray, dec_deg: NDArray, freqs_ghz: NDArray | None = None
    ) -> NDArray[np.float64] | None:
        """Sum of the components at ICRS positions, shape ``freqs.shape + ra.shape`` (channels by default)."""
        if not self.components:
            return None
        freqs = self.freq_ghz if freqs_ghz is None else np.asarray(freqs_ghz, dtype=np.float64)
        ra = np.asarray(ra_deg, dtype=np.float64)
        dec = np.asarray(dec_deg, dtype=np.float64)
        flat_ra, flat_dec = ra.ravel(), dec.ravel()
        out = np.zeros(freqs.shape + flat_ra.shape)
        fshape = freqs.shape + (1,)
        for k, rc in enumerate(self.components):
            c = rc.spec
            if freqs_ghz is None:
                peak, sigma = self.peak_k[k], self.sigma_deg[k]
            else:
                peak = component_peak_k(c, freqs, self.fwhm_30)
                sigma = component_sigma_deg(c, freqs, self.fwhm_30)
            if c.shape == "gradient":
                x, y = rc.plane_offsets_deg(flat_ra, flat_dec)
                a = math.radians(c.angle_deg)
                level = c.amplitude + c.gradient_k_per_deg * (x * math.cos(a) + y * math.sin(a))
                out += spectral_shape(c, freqs).reshape(fshape) * level
                continue
            r = rc.distance_deg(flat_ra, flat_dec)
            near = r < COMPONENT_CUTOFF_SIGMA * float(np.max(sigma))
            if not near.any():
                continue
            rr = r[near]
            out[..., near] += peak.reshape(fshape) * np.exp(-0.5 * (rr / sigma.reshape(fshape)) ** 2)
        return out.reshape(freqs.shape + ra.shape)

    # SkyModel interface ------------------------------------------------------------------------
    def brightness_k(self, chunk: FeedChunk) -> NDArray[np.float64] | None:
        out = None if self.base_scale == 0.0 else self._base(self.base.brightness_k(chunk))
        comp = self.components_k(chunk.ra_deg, chunk.dec_deg)
        if comp is None:
            return out
        if out is None:
            return comp
        out += comp
        return out

    def map_k(self, l_deg: NDArray, b_deg: NDArray, freqs_ghz: NDArray) -> NDArray[np.float64] | None:
        out = None if self.base_scale == 0.0 else self._base(self.base.map_k(l_deg, b_deg, freqs_ghz))
        if not self.components:
            return out
        ra, dec = galactic_to_icrs(l_deg, b_deg)
        comp = self.components_k(ra, dec, np.asarray(freqs_ghz, dtype=np.float64))
        return comp if out is None else out + comp

    # truth ---------------------------------------------------------------------------------------
    def write_truth(self, truth: h5py.Group) -> None:
        """``/truth/components``: the resolved table and the per-channel peak brightness."""
        if not self.components:
            return
        g = truth.create_group("components")
        g.attrs["base_scale"] = self.base_scale
        g.attrs["base_kind"] = self.kind
        dt = np.dtype(
            [
                ("name", "S32"),
                ("shape", "S16"),
                ("spectrum", "S16"),
                ("unit", "S4"),
                ("amplitude", "f8"),
                ("nu0_ghz", "f8"),
                ("index", "f8"),
                ("nu_peak_ghz", "f8"),
                ("width", "f8"),
                ("frame", "S16"),
                ("lon_deg", "f8"),
                ("lat_deg", "f8"),
                ("ra_deg", "f8"),
                ("dec_deg", "f8"),
                ("l_deg", "f8"),
                ("b_deg", "f8"),
                ("fwhm_arcmin", "f8"),
                ("gradient_k_per_deg", "f8"),
                ("angle_deg", "f8"),
            ]
        )
        rows = []
        for rc in self.components:
            c = rc.spec
            lb = icrs_to_galactic(rc.ra_deg, rc.dec_deg)
            rows.append(
                (
                    c.name.encode(),
                    c.shape.encode(),
                    c.spectrum.encode(),
                    c.unit.encode(),
                    c.amplitude,
                    c.nu0_ghz,
                    c.index,
                    c.nu_peak_ghz,
                    c.width,
                    c.frame.encode(),
                    rc.lon_deg,
                    rc.lat_deg,
                    rc.ra_deg,
                    rc.dec_deg,
                    float(lb[0]),
                    float(lb[1]),
                    c.fwhm_arcmin if c.shape == "gaussian" else 0.0,
                    c.gradient_k_per_deg,
                    c.angle_deg,
                )
            )
        g.create_dataset("table", data=np.array(rows, dtype=dt), track_times=False)
        d = g.create_dataset("peak_k", data=self.peak_k, track_times=False)
        d.attrs["unit"] = "K_RJ"
        g.create_dataset("sigma_deg", data=self.sigma_deg, track_times=False)


def with_components(
    base: SkyModel, spec: ObservationSpec, freq_ghz: NDArray, target: Target | None, mjd_mid: float
) -> SkyModel:
    """``base`` itself when the spec adds nothing, else a :class:`ComponentSky` around it."""
    sky = spec.sky
    if not sky.components and sky.base_scale == 1.0:
        return base
    centre = target_centre_radec(target, mjd_mid) if any(c.offset for c in sky.components) else None
    return ComponentSky(base, sky.components, sky.base_scale, freq_ghz, centre, spec.beam_fwhm_arcmin_30ghz)


__all__ = [
    "ComponentSky",
    "ResolvedComponent",
    "beam_fwhm_arcmin",
    "component_peak_k",
    "component_sigma_deg",
    "kelvin_per_jy",
    "with_components",
]
