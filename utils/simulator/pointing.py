"""Pointing (docs/simulator.md#pointing): feed az/el from the boresight, exact AltAz→ICRS, targets and
scheduling.

* Feed directions use the exact inverse gnomonic projection in the local az/el frame.
* RA/Dec of every sample of every feed goes through astropy:
  ``SkyCoord(AltAz(obstime, location=OVRO, pressure=0)).transform_to(ICRS())``. The time-only part
  of that transform (``erfa.apco``: precession–nutation, Earth ephemeris, ~65 µs per sample) is
  identical for all feeds of a time block, so it is computed once per block and shared through
  astropy's public ``erfa_astrom`` science state. The per-feed work then costs ~2 µs per sample
  and the results are bit-identical to the plain per-feed astropy call.
* Targets are tracked by interpolating their exact topocentric az/el (1 s grid for fixed sources,
  60 s grid for Jupiter, as docs/simulator.md#pointing) with cubic splines.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from utils.coordinates import OVRO, configure_iers, earth_location, galactic_to_icrs, icrs_to_azel
from utils.errors import SimulatorError

from .calibrator_truth import FIXED, canonical_name, jupiter_azel

SECONDS_PER_DAY: float = 86400.0
SIDEREAL_RATE: float = 1.00273790935
"""Hour angle advances this many hours per UT hour."""


# --------------------------------------------------------------------------------------------------
# Focal plane → feed az/el (exact inverse gnomonic)
# --------------------------------------------------------------------------------------------------
def feed_azel(
    az_deg: NDArray, el_deg: NDArray, x_rad: float, y_rad: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Az/el (deg) of a feed at focal-plane offset (x = cross-el, y = el; radians).

    The direction is ``normalise(b̂ + x ê_az + y ê_el)`` with b̂ the boresight unit vector and
    ê_az, ê_el the local unit vectors of increasing azimuth and elevation (ENU components);
    ``el = asin(p_up)``, ``az = atan2(p_east, p_north) mod 360``.
    """
    az = np.radians(az_deg)
    el = np.radians(el_deg)
    if x_rad == 0.0 and y_rad == 0.0:
        return np.asarray(az_deg, dtype=np.float64) % 360.0, np.asarray(el_deg, dtype=np.float64).copy()
    sa, ca, se, ce = np.sin(az), np.cos(az), np.sin(el), np.cos(el)
    east = ce * sa + x_rad * ca - y_rad * se * sa
    north = ce * ca - x_rad * sa - y_rad * se * ca
    up = se + y_rad * ce
    norm = np.sqrt(east**2 + north**2 + up**2)
    el_f = np.degrees(np.arcsin(np.clip(up / norm, -1.0, 1.0)))
    az_f = np.degrees(np.arctan2(east, north)) % 360.0
    return az_f, el_f


def offset_azel(az_deg: NDArray, el_deg: NDArray, x_deg: NDArray, y_deg: NDArray):
    """Simple scan offsets: ``az + x/cos(el + y)``, ``el + y`` (deg; used for scan patterns)."""
    el = np.asarray(el_deg) + y_deg
    return (np.asarray(az_deg) + np.asarray(x_deg) / np.cos(np.radians(el))) % 360.0, el


# --------------------------------------------------------------------------------------------------
# Exact AltAz → ICRS for many feeds sharing one time axis
# --------------------------------------------------------------------------------------------------
def _shared_astrom_provider():
    from astropy.coordinates.erfa_astrom import ErfaAstrom

    class SharedApco(ErfaAstrom):
        """Compute ``apco`` once for one obstime object and reuse it for every feed."""

        def __init__(self) -> None:
            self._obstime = None
            self._astrom = None

        def apco(self, frame_or_coord):
            obstime = frame_or_coord.obstime
            if self._obstime is not None and obstime is self._obstime:
                return self._astrom
            astrom = super().apco(frame_or_coord)
            self._obstime, self._astrom = obstime, astrom
            return astrom

    return SharedApco()


def altaz_to_icrs_feeds(
    az_deg: Sequence[NDArray], el_deg: Sequence[NDArray], mjd: NDArray
) -> Iterator[tuple[NDArray[np.float64], NDArray[np.float64]]]:
    """Yield (ra_deg, dec_deg) of each feed's (az, el) at the shared times ``mjd`` (UTC).

    Every sample goes through astropy's ``AltAz(pressure=0) → ICRS`` transform at OVRO.
    """
    from astropy import units as u
    from astropy.coordinates import ICRS, AltAz, SkyCoord
    from astropy.coordinates.erfa_astrom import erfa_astrom
    from astropy.time import Time

    configure_iers()
    frame = AltAz(
        obstime=Time(np.asarray(mjd, dtype=np.float64), format="mjd", scale="utc"),
        location=earth_location(OVRO),
        pressure=0.0 * u.hPa,
    )
    with erfa_astrom.set(_shared_astrom_provider()):
        for az, el in zip(az_deg, el_deg):
            c = SkyCoord(az=np.asarray(az) * u.deg, alt=np.asarray(el) * u.deg, frame=frame)
            icrs = c.transform_to(ICRS())
            yield (
                np.asarray(icrs.ra.to_value(u.deg), dtype=np.float64) % 360.0,
                np.asarray(icrs.dec.to_value(u.deg), dtype=np.float64),
            )


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------
@dataclass
class Target:
    """A tracked position: a fixed ICRS direction or Jupiter.

    Attributes
    ----------
    name : str
        Label (e.g. ``TauA``, ``GField30``, ``Jupiter``).
    ra_deg, dec_deg : float or None
        Fixed ICRS position; None for Jupiter.
    moving : bool
        True for Jupiter (positions from the built-in ephemeris).
    """

    name: str
    ra_deg: float | None = None
    dec_deg: float | None = None
    moving: bool = False

    def __post_init__(self) -> None:
        self._spline = None
        self._span: tuple[float, float] | None = None

    # exact positions ----------------------------------------------------------------------
    def azel_exact(self, mjd: NDArray) -> tuple[NDArray, NDArray]:
        """Topocentric az/el (deg, no refraction) at ``mjd`` (exact astropy evaluation)."""
        m = np.atleast_1d(np.asarray(mjd, dtype=np.float64))
        if self.moving:
            az, el, _ = jupiter_azel(m)
            return az, el
        return icrs_to_azel(self.ra_deg, self.dec_deg, m)

    def hour_angle_h(self, mjd: NDArray) -> NDArray[np.float64]:
        """Apparent hour angle (hours, in (−12, 12]) at OVRO."""
        from astropy import units as u
        from astropy.coordinates import HADec, SkyCoord, get_body, solar_system_ephemeris
        from astropy.time import Time

        configure_iers()
        m = np.atleast_1d(np.asarray(mjd, dtype=np.float64))
        t = Time(m, format="mjd", scale="utc")
        loc = earth_location(OVRO)
        frame = HADec(obstime=t, location=loc, pressure=0.0 * u.hPa)
        if self.moving:
            with solar_system_ephemeris.set("builtin"):
                c = get_body("jupiter", t, location=loc).transform_to(frame)
        else:
            c = SkyCoord(ra=self.ra_deg * u.deg, dec=self.dec_deg * u.deg, frame="icrs").transform_to(frame)
        ha = np.asarray(c.ha.to_value(u.hourangle), dtype=np.float64)
        return (ha + 12.0) % 24.0 - 12.0

    # tracking (interpolated) -----------------------------------------------------------------
    def prepare_track(self, mjd_start: float, mjd_stop: float) -> None:
        """Tabulate exact az/el over [start − 2 min, stop + 2 min] for spline interpolation."""
        from scipy.interpolate import CubicSpline

        step_s = 60.0 if self.moving else 1.0
        pad = 120.0 / SECONDS_PER_DAY
        n = int(math.ceil((mjd_stop - mjd_start + 2 * pad) * SECONDS_PER_DAY / step_s)) + 1
        grid = mjd_start - pad + np.arange(max(n, 4)) * step_s / SECONDS_PER_DAY
        az, el = self.azel_exact(grid)
        az_unwrapped = np.degrees(np.unwrap(np.radians(az)))
        x = (grid - grid[0]) * SECONDS_PER_DAY
        self._spline = (grid[0], CubicSpline(x, az_unwrapped), CubicSpline(x, el))
        self._span = (grid[0], grid[-1])

    def azel(self, mjd: NDArray) -> tuple[NDArray, NDArray]:
        """Tracked az/el (deg) at ``mjd`` from the prepared spline (call :meth:`prepare_track`)."""
        if self._spline is None:
            raise SimulatorError(f"target {self.name}: prepare_track() was not called")
        m0, s_az, s_el = self._spline
        x = (np.asarray(mjd, dtype=np.float64) - m0) * SECONDS_PER_DAY
        return s_az(x) % 360.0, s_el(x)


def make_target(spec) -> Target | None:
    """The pointing target of an observation spec; None for sky dips (fixed azimuth)."""
    if spec.target_ra_deg is not None:
        return Target(
            spec.target or spec.resolved_source(), float(spec.target_ra_deg), float(spec.target_dec_deg)
        )
    name = spec.target
    if not name and spec.sky.is_calibrator:
        name = spec.sky.calibrator_name
    if name:
        canon = canonical_name(name)
        if canon == "Jupiter":
            return Target("Jupiter", moving=True)
        cal = FIXED[canon]
        return Target(canon, cal.ra_deg, cal.dec_deg)
    if spec.scan.kind == "skydip":
        return None
    if spec.sky.kind == "galactic":
        ra, dec = galactic_to_icrs(spec.sky.l0_deg, spec.sky.b0_deg)
        return Target(spec.resolved_source(), float(ra), float(dec))
    raise SimulatorError(f"obsid {spec.obsid}: no pointing target (set target or target_ra_deg/dec)")


# --------------------------------------------------------------------------------------------------
# Scheduling by hour angle
# --------------------------------------------------------------------------------------------------
def mjd_of_date(date: str) -> float:
    """MJD of ``date`` (YYYY-MM-DD) at 00:00 UTC."""
    from astropy.time import Time

    configure_iers()
    return float(Time(f"{date}T00:00:00", format="isot", scale="utc").mjd)


def mjd_for_hour_angle(target: Target, date: str, hour_angle_h: float) -> float:
    """First MJD on ``date`` (UTC day) at which ``target`` is at ``hour_angle_h`` (hours)."""
    day0 = mjd_of_date(date)
    grid = day0 + np.arange(0.0, 1.0 + 1e-9, 1.0 / 144.0)
    diff = (target.hour_angle_h(grid) - hour_angle_h + 12.0) % 24.0 - 12.0
    crossings = np.nonzero((diff[:-1] <= 0.0) & (diff[1:] > 0.0) & (diff[1:] - diff[:-1] < 1.0))[0]
    if crossings.size == 0:
        raise SimulatorError(f"{target.name} never reaches hour angle {hour_angle_h} h on {date}")
    k = crossings[0]
    t = grid[k] - diff[k] / SIDEREAL_RATE / 24.0
    for _ in range(3):
        d = float((target.hour_angle_h(t)[0] - hour_angle_h + 12.0) % 24.0 - 12.0)
        t -= d / SIDEREAL_RATE / 24.0
    return float(t)
