"""Radio recombination lines: rest frequencies, radio velocities and the LSRK correction
(docs/mapmaking.md#line-frequencies).

Line frequencies::

    ν(n + Δn → n) = R_X c · (1/n² − 1/(n + Δn)²)
    R_X c = R_∞ c / (1 + m_e / M_core)          R_∞ c = 3.2898419602e15 Hz

Line names are ``<species><n><order>`` with species ``H``, ``He`` or ``C`` and order ``a``/``alpha``
(Δn = 1), ``b``/``beta`` (2), ``g``/``gamma`` (3), ``d``/``delta`` (4) or ``e``/``epsilon`` (5),
e.g. ``H59a``, ``H59alpha``, ``H72b``, ``He59a``, ``C59a``.

Cube statistics shared by the cube writer and the truth report: the σ of a zeroth moment from an
RMS cube and the header's channel correlations (:func:`moment0_sigma_kkms`).

Velocities use the radio convention, ``v = c (ν0 − ν)/ν0``, in km/s. The LSRK radio velocity of a
topocentric frequency ν is ``c (ν0 − ν)/ν0 + v_corr`` with ``v_corr = lsrk_correction_kms(...)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from utils.constants import SPEED_OF_LIGHT_M_S

RYDBERG_C_HZ: float = 3.2898419602e15
"""R_∞ c (Hz)."""
ELECTRON_PROTON_MASS_RATIO: float = 5.446170214901e-4
"""m_e / m_p."""
ELECTRON_MASS_U: float = 5.48579909065e-4
"""m_e in unified atomic mass units (CODATA 2018)."""
ALPHA_PARTICLE_MASS_U: float = 4.001506179127
"""⁴He nucleus mass, u (CODATA 2018)."""
CARBON12_NUCLEUS_MASS_U: float = 12.0 - 6.0 * ELECTRON_MASS_U
"""¹²C nucleus mass, u (atomic mass 12 u minus six electrons; electron binding energy neglected)."""

ELECTRON_TO_CORE_MASS: dict[str, float] = {
    "H": ELECTRON_PROTON_MASS_RATIO,
    "He": ELECTRON_MASS_U / ALPHA_PARTICLE_MASS_U,
    "C": ELECTRON_MASS_U / CARBON12_NUCLEUS_MASS_U,
}
"""m_e / M_core per species."""

SPEED_OF_LIGHT_KMS: float = SPEED_OF_LIGHT_M_S / 1000.0

_ORDER_NAMES: dict[str, int] = {
    "a": 1,
    "alpha": 1,
    "b": 2,
    "beta": 2,
    "g": 3,
    "gamma": 3,
    "d": 4,
    "delta": 4,
    "e": 5,
    "epsilon": 5,
}
_ORDER_LETTERS: dict[int, str] = {1: "a", 2: "b", 3: "g", 4: "d", 5: "e"}
_NAME_RE = re.compile(r"^\s*(he|h|c)\s*(\d+)\s*([a-z]+)\s*$", re.IGNORECASE)
_SPECIES_CANON: dict[str, str] = {"h": "H", "he": "He", "c": "C"}


@dataclass(frozen=True)
class RecombinationLine:
    """One recombination line ``n + dn → n`` of ``species``."""

    species: str
    n: int
    dn: int
    rest_freq_ghz: float

    @property
    def name(self) -> str:
        """Canonical short name, e.g. ``H59a``."""
        return line_name(self.species, self.n, self.dn)


def _species(species: str) -> str:
    key = str(species).strip().lower()
    if key not in _SPECIES_CANON:
        raise ValueError(f"unknown RRL species {species!r}; expected H, He or C")
    return _SPECIES_CANON[key]


def rydberg_hz(species: str = "H") -> float:
    """Reduced-mass Rydberg frequency ``R_X c = R_∞ c / (1 + m_e/M)`` (Hz) for ``species``."""
    return RYDBERG_C_HZ / (1.0 + ELECTRON_TO_CORE_MASS[_species(species)])


def rrl_frequency_ghz(n: ArrayLike, dn: int = 1, species: str = "H") -> NDArray[np.float64]:
    """Rest frequency (GHz) of the ``n + dn → n`` line of ``species`` (vectorised over ``n``)."""
    nn = np.asarray(n, dtype=np.float64)
    if np.any(nn < 1) or int(dn) < 1:
        raise ValueError(f"RRL quantum numbers must be >= 1, got n={n}, dn={dn}")
    return rydberg_hz(species) * (1.0 / nn**2 - 1.0 / (nn + int(dn)) ** 2) / 1.0e9


def parse_line_name(name: str) -> tuple[str, int, int]:
    """Parse ``'H59a'``, ``'H59alpha'``, ``'He72b'``, ``'C59a'`` into ``(species, n, dn)``.

    Raises
    ------
    ValueError
        If the name does not follow the pattern.
    """
    m = _NAME_RE.match(str(name))
    if not m or m.group(3).lower() not in _ORDER_NAMES:
        raise ValueError(
            f"bad recombination-line name {name!r}; expected e.g. H59a, H59alpha, H72b, He59a, C59a"
        )
    return _SPECIES_CANON[m.group(1).lower()], int(m.group(2)), _ORDER_NAMES[m.group(3).lower()]


def line_name(species: str, n: int, dn: int = 1) -> str:
    """Canonical short name ``<species><n><a|b|g|d|e>``."""
    if int(dn) not in _ORDER_LETTERS:
        raise ValueError(f"line order dn={dn} has no short name (supported 1–5)")
    return f"{_species(species)}{int(n)}{_ORDER_LETTERS[int(dn)]}"


def line_frequency_ghz(name: str) -> float:
    """Rest frequency (GHz) of the named line, e.g. ``line_frequency_ghz('H59a') ≈ 31.2233``."""
    species, n, dn = parse_line_name(name)
    return float(rrl_frequency_ghz(n, dn, species))


def recombination_line(name: str) -> RecombinationLine:
    """The :class:`RecombinationLine` for a name."""
    species, n, dn = parse_line_name(name)
    return RecombinationLine(species, n, dn, float(rrl_frequency_ghz(n, dn, species)))


def lines_in_range(
    f_lo_ghz: float, f_hi_ghz: float, species: str = "H", dn: int = 1
) -> list[RecombinationLine]:
    """All ``species`` lines of order ``dn`` with rest frequency in ``[f_lo_ghz, f_hi_ghz]``.

    Returned in order of increasing n (decreasing frequency).
    """
    lo, hi = sorted((float(f_lo_ghz), float(f_hi_ghz)))
    if hi <= 0.0:
        return []
    sp = _species(species)
    r = rydberg_hz(sp) / 1.0e9
    # ν(n) ≈ 2 R dn / n³ for n ≫ dn: bracket n, then test exactly.
    n_min = max(1, int(np.floor((2.0 * r * dn / hi) ** (1.0 / 3.0))) - 2 * dn - 2)
    n_max = int(np.ceil((2.0 * r * dn / max(lo, 1e-12)) ** (1.0 / 3.0))) + 2 if lo > 0 else n_min + 10000
    ns = np.arange(n_min, n_max + 1)
    freqs = rrl_frequency_ghz(ns, dn, sp)
    keep = (freqs >= lo) & (freqs <= hi)
    return [RecombinationLine(sp, int(n), int(dn), float(f)) for n, f in zip(ns[keep], freqs[keep])]


# --------------------------------------------------------------------------------------------------
# Radio velocity
# --------------------------------------------------------------------------------------------------
def radio_velocity_kms(freq_ghz: ArrayLike, rest_freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Radio-convention velocity ``c (ν0 − ν)/ν0`` (km/s)."""
    nu = np.asarray(freq_ghz, dtype=np.float64)
    nu0 = np.asarray(rest_freq_ghz, dtype=np.float64)
    return SPEED_OF_LIGHT_KMS * (nu0 - nu) / nu0


def radio_frequency_ghz(velocity_kms: ArrayLike, rest_freq_ghz: ArrayLike) -> NDArray[np.float64]:
    """Frequency (GHz) of radio velocity ``v``: ``ν0 (1 − v/c)``."""
    v = np.asarray(velocity_kms, dtype=np.float64)
    return np.asarray(rest_freq_ghz, dtype=np.float64) * (1.0 - v / SPEED_OF_LIGHT_KMS)


def channel_velocity_width_kms(channel_width_ghz: ArrayLike, rest_freq_ghz: ArrayLike) -> NDArray:
    """Velocity width ``c |Δν| / ν0`` (km/s) of a channel of width ``channel_width_ghz``."""
    return (
        SPEED_OF_LIGHT_KMS
        * np.abs(np.asarray(channel_width_ghz, dtype=np.float64))
        / np.asarray(rest_freq_ghz, dtype=np.float64)
    )


# --------------------------------------------------------------------------------------------------
# LSRK correction
# --------------------------------------------------------------------------------------------------
_V_SUN_LSRK_KMS: NDArray[np.float64] | None = None


def _sun_velocity_wrt_lsrk_kms() -> NDArray[np.float64]:
    """Barycentre velocity relative to LSRK, ICRS Cartesian axes (km/s), from astropy's LSRK frame."""
    global _V_SUN_LSRK_KMS
    if _V_SUN_LSRK_KMS is None:
        from astropy import units as u
        from astropy.coordinates import ICRS, LSRK, CartesianDifferential, CartesianRepresentation

        origin = ICRS(
            CartesianRepresentation(
                [0.0, 0.0, 0.0] * u.km, differentials=CartesianDifferential([0.0, 0.0, 0.0] * u.km / u.s)
            )
        )
        vel = origin.transform_to(LSRK()).velocity
        _V_SUN_LSRK_KMS = np.array(
            [vel.d_x.to_value(u.km / u.s), vel.d_y.to_value(u.km / u.s), vel.d_z.to_value(u.km / u.s)]
        )
    return _V_SUN_LSRK_KMS


def lsrk_correction_kms(ra_deg: ArrayLike, dec_deg: ArrayLike, mjd: ArrayLike, *, site=None):
    """Line-of-sight velocity (km/s) of the observer relative to LSRK, toward (ra, dec).

    ``v_corr`` is the observer's barycentric velocity projected on the line of sight (astropy
    ``SkyCoord.radial_velocity_correction('barycentric')``, built-in ephemeris, bundled IERS) plus the
    barycentre's velocity relative to LSRK (astropy ``LSRK`` frame: 20 km/s toward RA 270°,
    Dec 30° B1900) projected on the same direction. The LSRK radio velocity of topocentric frequency
    ν is then ``c (ν0 − ν)/ν0 + v_corr``.

    Parameters
    ----------
    ra_deg, dec_deg : array_like
        ICRS direction, degrees.
    mjd : array_like
        Time, MJD (UTC). Broadcast with the direction.
    site : (lon_deg, lat_deg, height_m), optional
        Observatory; default OVRO.

    Returns
    -------
    float or ndarray
        ``v_corr`` in km/s (float for scalar inputs).
    """
    from astropy import units as u
    from astropy.coordinates import SkyCoord, solar_system_ephemeris
    from astropy.time import Time

    from utils.coordinates import OVRO, configure_iers, earth_location

    configure_iers()
    ra, dec, m = np.broadcast_arrays(
        np.asarray(ra_deg, dtype=np.float64),
        np.asarray(dec_deg, dtype=np.float64),
        np.asarray(mjd, dtype=np.float64),
    )
    scalar = ra.ndim == 0
    ra1, dec1, m1 = (np.atleast_1d(a).ravel() for a in (ra, dec, m))
    coord = SkyCoord(ra=ra1 * u.deg, dec=dec1 * u.deg, frame="icrs")
    with solar_system_ephemeris.set("builtin"):
        v_bary = coord.radial_velocity_correction(
            kind="barycentric",
            obstime=Time(m1, format="mjd", scale="utc"),
            location=earth_location(OVRO if site is None else site),
        ).to_value(u.km / u.s)
    rr, dd = np.radians(ra1), np.radians(dec1)
    n_hat = np.stack([np.cos(dd) * np.cos(rr), np.cos(dd) * np.sin(rr), np.sin(dd)], axis=-1)
    v = np.asarray(v_bary, dtype=np.float64) + n_hat @ _sun_velocity_wrt_lsrk_kms()
    return float(v[0]) if scalar else v.reshape(ra.shape)


def topocentric_to_lsrk_velocity_kms(
    freq_ghz: ArrayLike, rest_freq_ghz: float, v_corr_kms: ArrayLike
) -> NDArray[np.float64]:
    """LSRK radio velocity (km/s) of topocentric frequencies: ``c (ν0 − ν)/ν0 + v_corr``."""
    return radio_velocity_kms(freq_ghz, rest_freq_ghz) + np.asarray(v_corr_kms, dtype=np.float64)


def channels_in_window(velocities_kms: NDArray, window_kms: tuple[float, float]) -> NDArray[np.bool_]:
    """The channels whose centre velocities (km/s) lie in ``window_kms`` (inclusive): the channels a
    zeroth moment over that window sums."""
    v = np.asarray(velocities_kms, dtype=np.float64)
    return (v >= window_kms[0]) & (v <= window_kms[1])


def moment0_sigma_kkms(
    rms: NDArray,
    velocities_kms: NDArray,
    window_kms: tuple[float, float],
    rho1: float = 0.0,
    rhob: float = 0.0,
) -> NDArray:
    """σ (K km/s) of the zeroth moment ``Δv Σ_j T_j`` over the channels whose centres lie in
    ``window_kms``, from the RMS cube ``rms (..., n_v)`` (K) and the channel correlations of the
    cube header, ``rho1`` (``LINE CORR1``) and ``rhob`` (``LINE CORRB``)
    (docs/mapmaking.md#noise-of-the-cube)::

        σ = Δv sqrt(Σ σ_j² + 2 ρ1 Σ σ_j σ_{j+1} + ρB Σ_{|j−j'|≥2} σ_j σ_j')

    Channels are taken as contiguous; NaN σ count as 0."""
    step = float(np.median(np.diff(velocities_kms))) if velocities_kms.size > 1 else 1.0
    sel = channels_in_window(velocities_kms, window_kms)
    s = np.nan_to_num(np.asarray(rms, dtype=np.float64)[..., sel])
    total, square = s.sum(axis=-1), (s**2).sum(axis=-1)
    lag1 = (s[..., 1:] * s[..., :-1]).sum(axis=-1)
    far = total**2 - square - 2.0 * lag1
    return step * np.sqrt(np.maximum(square + 2.0 * rho1 * lag1 + rhob * far, 0.0))


__all__ = [
    "ELECTRON_TO_CORE_MASS",
    "RYDBERG_C_HZ",
    "SPEED_OF_LIGHT_KMS",
    "RecombinationLine",
    "channel_velocity_width_kms",
    "channels_in_window",
    "line_frequency_ghz",
    "line_name",
    "lines_in_range",
    "lsrk_correction_kms",
    "moment0_sigma_kkms",
    "parse_line_name",
    "radio_frequency_ghz",
    "radio_velocity_kms",
    "recombination_line",
    "rrl_frequency_ghz",
    "rydberg_hz",
    "topocentric_to_lsrk_velocity_kms",
]
