"""Quicklook images on the sky (docs/map_products.md#quicklooks): WCSAxes in the map's own frame
(Galactic l/b or ICRS RA/Dec) with a coordinate grid, a colour scale that a few hot pixels cannot
set, three pixel classes drawn distinctly (data, NaN inside the coverage, not observed) and the
beam in a corner.

Used by the continuum-map, hit-map and cube quicklooks; the figures are built with matplotlib's
object API (no pyplot state) and saved with :func:`utils.plotting.save_figure`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

NAN_IN_COVERAGE_COLOUR = "#00ffff"
"""Cyan: a pixel with hits whose value is NaN (masked or failed); absent from the default colour maps."""
OUTSIDE_COVERAGE_COLOUR = "#bdbdbd"
"""Neutral grey: a pixel no sample landed on."""
GRID_STYLE = {"color": "0.55", "alpha": 0.6, "linestyle": "solid", "linewidth": 0.5}
PERCENTILES = (1.0, 99.5)
"""Default colour limits: these percentiles of the finite pixels inside the coverage."""
MIN_PIXELS_BEYOND = 3
"""At least this many pixels lie beyond each percentile limit, so a handful of hot pixels never
set the scale, even on a small map."""
ASINH_ABOVE_NOISE = 50.0
"""With ``stretch='auto'`` an asinh stretch is used when the upper limit lies more than this many
noise sigmas (MAD) above the median: a bright source would otherwise leave the noise one colour."""
LINEAR_NOISE_SIGMAS = 3.0
"""The asinh stretch is linear up to this many noise sigmas above the median."""

DIVERGING_CMAP = "RdBu_r"
"""Colour map of a difference (jackknife) map: white at zero, red positive, blue negative."""

ZOOM_MARGIN_PIXELS, ZOOM_MARGIN_FRACTION = 5, 0.15
"""The view shows the coverage's bounding box and this margin (the larger of the two) on each side."""


@dataclass
class SkyImage:
    """What :func:`draw_sky_image` drew: the image artists, the colour limits (in the image's unit)
    and the number of pixels of each class."""

    image: Any
    nan_overlay: Any
    colorbar: Any
    vmin: float
    vmax: float
    stretch: str
    n_valid: int
    n_nan_in_coverage: int
    n_outside: int


def celestial_wcs(header: Mapping[str, Any]):
    """The 2-D celestial ``astropy.wcs.WCS`` of a map or cube header (spectral axes dropped)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    if not isinstance(header, fits.Header):
        header = fits.Header(dict(header))
    return WCS(header).celestial


def frame_of(wcs) -> str:
    """``'galactic'`` or ``'icrs'`` from the longitude axis type of ``wcs``."""
    ctype = str(wcs.wcs.ctype[0]).upper()
    if ctype.startswith("GLON"):
        return "galactic"
    if ctype.startswith("RA"):
        return "icrs"
    raise ValueError(f"unsupported longitude axis {ctype!r} (expected GLON-* or RA---*)")


AXIS_LABELS = {
    "galactic": ("Galactic longitude l", "Galactic latitude b"),
    "icrs": ("RA (ICRS)", "Dec (ICRS)"),
}


def label_sky_axes(ax) -> None:
    """Axis labels, tick format and a coordinate grid for the frame of a WCSAxes ``ax``.

    Galactic coordinates in decimal degrees (the custom in Galactic-plane work), RA in hours,
    minutes and seconds and Dec in degrees, arcminutes and arcseconds.
    """
    import astropy.units as u

    frame = frame_of(ax.wcs)
    lon, lat = ax.coords[0], ax.coords[1]
    if frame == "galactic":
        lon.set_format_unit(u.deg, decimal=True)
        lat.set_format_unit(u.deg, decimal=True)
    else:
        lon.set_format_unit(u.hourangle, decimal=False)
        lat.set_format_unit(u.deg, decimal=False)
    xlabel, ylabel = AXIS_LABELS[frame]
    lon.set_axislabel(xlabel)
    lat.set_axislabel(ylabel)
    lon.set_ticks_position("b")
    lat.set_ticks_position("l")
    ax.coords.grid(**GRID_STYLE)


def new_sky_figure(
    header: Mapping[str, Any], *, extra_panels: int = 0, figsize: tuple[float, float] = (7.0, 6.0)
):
    """A figure with one WCSAxes panel in the celestial frame of ``header`` (left) and
    ``extra_panels`` ordinary axes to its right.

    Returns
    -------
    fig : matplotlib.figure.Figure
    sky_ax : astropy.visualization.wcsaxes.WCSAxes
    others : list of matplotlib.axes.Axes, length ``extra_panels``
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    grid = fig.add_gridspec(1, 1 + extra_panels)
    sky_ax = fig.add_subplot(grid[0, 0], projection=celestial_wcs(header))
    label_sky_axes(sky_ax)
    others = [fig.add_subplot(grid[0, k + 1]) for k in range(extra_panels)]
    return fig, sky_ax, others


def robust_limits(
    values: NDArray, percentiles: tuple[float, float] = PERCENTILES, *, min_beyond: int = MIN_PIXELS_BEYOND
) -> tuple[float, float]:
    """Colour limits from ``percentiles`` of the finite ``values`` (astropy's
    ``AsymmetricPercentileInterval``), pulled in so that at least ``min_beyond`` pixels lie beyond
    each limit: a few hot (or cold) pixels never set the scale however small the map is.
    (0, 1) without finite values; an interval of zero width is widened to ±1 around its value."""
    from astropy.visualization import AsymmetricPercentileInterval

    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    n = finite.size
    if n == 0:
        return 0.0, 1.0
    lower, upper = percentiles
    if n > 2 * min_beyond + 1:
        step = 100.0 * min_beyond / (n - 1)  # percentile of the min_beyond-th value from either end
        lower = max(lower, step) if lower > 0 else lower
        upper = min(upper, 100.0 - step) if upper < 100 else upper
    vmin, vmax = (float(v) for v in AsymmetricPercentileInterval(lower, upper).get_limits(finite))
    if not vmax > vmin:
        half = abs(vmin) or 1.0
        vmin, vmax = vmin - half, vmax + half
    return vmin, vmax


def colour_norm(values: NDArray, vmin: float, vmax: float, stretch: str = "auto"):
    """The colour normalisation between ``vmin`` and ``vmax`` and the stretch chosen.

    ``'auto'`` is linear unless the upper limit lies more than :data:`ASINH_ABOVE_NOISE` noise
    sigmas (``astropy.stats.mad_std`` of ``values``) above their median; then asinh
    (``astropy.visualization.AsinhStretch``) with its linear part reaching
    :data:`LINEAR_NOISE_SIGMAS` above the median, so that the noise and the faint emission keep
    their colours while a bright source is not saturated at once.

    Returns
    -------
    norm : astropy.visualization.ImageNormalize
    stretch : {'linear', 'asinh'}
    """
    from astropy.stats import mad_std
    from astropy.visualization import AsinhStretch, ImageNormalize, LinearStretch

    if stretch not in ("auto", "linear", "asinh"):
        raise ValueError(f"stretch must be 'auto', 'linear' or 'asinh', got {stretch!r}")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    median = float(np.median(finite)) if finite.size else 0.0
    sigma = float(mad_std(finite)) if finite.size else 0.0
    if stretch == "auto":
        bright = sigma > 0 and vmax - median > ASINH_ABOVE_NOISE * sigma
        stretch = "asinh" if bright else "linear"
    if stretch == "linear":
        return ImageNormalize(vmin=vmin, vmax=vmax, stretch=LinearStretch(), clip=False), stretch
    knee = (median + LINEAR_NOISE_SIGMAS * sigma - vmin) / (vmax - vmin)
    a = float(np.clip(knee, 1e-3, 1.0))
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=AsinhStretch(a), clip=False), stretch


def unit_label(header: Mapping[str, Any]) -> str:
    """The colour-bar label from ``BUNIT`` (K of a Rayleigh-Jeans temperature scale named so)."""
    unit = str(header.get("BUNIT", "") or "").strip()
    if unit == "K" and (
        str(header.get("HIERARCH COMAP TEMPTYPE", "")).upper() == "K_RJ"
        or "Rayleigh" in str(header.get("TEMPSCAL", ""))
    ):
        return "K (Rayleigh-Jeans)"
    return unit


def _beam_of(header: Mapping[str, Any] | None) -> tuple[float, float, float] | None:
    if header is None or "BMAJ" not in header:
        return None
    bmaj = float(header["BMAJ"])
    bmin = float(header.get("BMIN", bmaj))
    bpa = float(header.get("BPA", 0.0))
    return (bmaj, bmin, bpa) if bmaj > 0 and bmin > 0 else None


def draw_sky_image(
    ax,
    image: NDArray,
    *,
    coverage: NDArray[np.bool_],
    label: str,
    beam_header: Mapping[str, Any] | None = None,
    percentiles: tuple[float, float] = PERCENTILES,
    cmap: str = "inferno",
    stretch: str = "auto",
    symmetric: bool = False,
) -> SkyImage:
    """Draw ``image`` on the WCSAxes ``ax`` with a robust colour scale, the NaN pixels
    inside the coverage in :data:`NAN_IN_COVERAGE_COLOUR`, the pixels outside in
    :data:`OUTSIDE_COVERAGE_COLOUR`, a legend of the two, a colour bar labelled ``label`` and the
    beam (``BMAJ``, ``BMIN``, ``BPA`` in deg from ``beam_header``) in the lower left corner. The
    view is zoomed to the coverage and a margin (:data:`ZOOM_MARGIN_PIXELS`,
    :data:`ZOOM_MARGIN_FRACTION`); the legend counts pixels over the whole grid.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        The map in its unit; NaN where there is no value.
    coverage : bool ndarray, shape (ny, nx)
        Observed pixels (hits > 0). Limits are computed on the finite pixels inside it only.
    percentiles : (float, float)
        Lower and upper percentile of the colour limits (see :func:`robust_limits`).
    stretch : {'auto', 'linear', 'asinh'}
        Colour stretch between the limits (see :func:`colour_norm`).
    symmetric : bool
        Limits ``±max(|vmin|, |vmax|)`` and a linear stretch, so that zero sits at the centre of a
        diverging ``cmap`` (a difference map, whose sign matters).

    Returns
    -------
    SkyImage
        The artists, the colour limits and stretch used and the pixel counts.
    """
    from astropy.visualization.wcsaxes import add_beam
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float64)
    coverage = np.asarray(coverage, dtype=bool)
    if image.shape != coverage.shape:
        raise ValueError(f"image {image.shape} and coverage {coverage.shape} differ")
    finite = np.isfinite(image)
    valid = finite & coverage
    nan_inside = coverage & ~finite
    vmin, vmax = robust_limits(image[valid], percentiles)
    if symmetric:
        vmax = max(abs(vmin), abs(vmax))
        vmin, stretch = -vmax, "linear"
    norm, stretch = colour_norm(image[valid], vmin, vmax, stretch)
    colours = colormaps[cmap].with_extremes(bad=OUTSIDE_COVERAGE_COLOUR)
    shown = np.where(valid, image, np.nan)
    im = ax.imshow(shown, origin="lower", cmap=colours, norm=norm, interpolation="nearest")
    overlay = ax.imshow(
        np.where(nan_inside, 1.0, np.nan),
        origin="lower",
        cmap=ListedColormap([NAN_IN_COVERAGE_COLOUR]),
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    if coverage.any():  # the observed area and a margin, not the empty rest of the grid
        for lim, axis in ((ax.set_xlim, 1), (ax.set_ylim, 0)):
            index = np.flatnonzero(coverage.any(axis=1 - axis))
            pad = max(ZOOM_MARGIN_PIXELS, ZOOM_MARGIN_FRACTION * (index[-1] - index[0] + 1))
            lim(max(-0.5, index[0] - pad), min(image.shape[axis] - 0.5, index[-1] + pad))
    below = bool((image[valid] < vmin).any())
    above = bool((image[valid] > vmax).any())
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max"}.get(
        (below, above), "both"
    )
    label = f"{label}, asinh scale" if stretch == "asinh" else label
    colorbar = ax.figure.colorbar(im, ax=ax, label=label, extend=extend, shrink=0.9)
    n_nan, n_out = int(nan_inside.sum()), int((~coverage).sum())
    ax.legend(
        handles=[
            Patch(facecolor=NAN_IN_COVERAGE_COLOUR, edgecolor="0.3", label=f"NaN in coverage ({n_nan} px)"),
            Patch(facecolor=OUTSIDE_COVERAGE_COLOUR, edgecolor="0.3", label=f"not observed ({n_out} px)"),
        ],
        loc="upper right",
        fontsize="small",
        framealpha=0.85,
    )
    beam = _beam_of(beam_header)
    if beam is not None:
        add_beam(
            ax,
            major=beam[0],
            minor=beam[1],
            angle=beam[2],
            corner="bottom left",
            frame=True,
            facecolor="none",
            edgecolor="black",
            linewidth=1.2,
            hatch="////",
        )
    return SkyImage(im, overlay, colorbar, vmin, vmax, stretch, int(valid.sum()), n_nan, n_out)


def beam_ellipses(ax) -> list[Any]:
    """The beam ellipses :func:`draw_sky_image` added to ``ax`` (width = minor and height = major
    axis, in pixels)."""
    from matplotlib.offsetbox import AnchoredOffsetbox, AuxTransformBox
    from matplotlib.patches import Ellipse

    out = []
    for artist in ax.artists:
        if isinstance(artist, AnchoredOffsetbox) and isinstance(artist.get_child(), AuxTransformBox):
            out.extend(c for c in artist.get_child().get_children() if isinstance(c, Ellipse))
    return out


__all__ = [
    "AXIS_LABELS",
    "NAN_IN_COVERAGE_COLOUR",
    "OUTSIDE_COVERAGE_COLOUR",
    "SkyImage",
    "beam_ellipses",
    "celestial_wcs",
    "colour_norm",
    "draw_sky_image",
    "frame_of",
    "label_sky_axes",
    "new_sky_figure",
    "robust_limits",
    "unit_label",
]
