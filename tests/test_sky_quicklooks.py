"""Quicklooks on the sky (docs/map_products.md#quicklooks): map, cube and hit-map PNGs drawn on WCSAxes in
the map's frame with a grid, a colour scale that hot pixels cannot set, NaN pixels inside the coverage in
their own colour, the unobserved area in grey and the beam in a corner.

The maps and cubes are those of ``test_fits_products.products`` (one small raster through the default
level-2 chain, mapped at default settings); an equatorial map (``dynamic_frame='icrs'``, the setting a user
picks for an RA/Dec map) and a hit map are made from the same level-2 data.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import test_fits_products
from astropy.io import fits
from astropy.visualization.wcsaxes import WCSAxes
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from scipy import ndimage

from modules.MapMaking.line_cube import Cube, cube_quicklook_figure
from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import quicklook_figure, quicklook_png
from utils.sky_plot import (
    NAN_IN_COVERAGE_COLOUR,
    OUTSIDE_COVERAGE_COLOUR,
    beam_ellipses,
    colour_norm,
    robust_limits,
)
from utils.wcs import MapGeometry

products = test_fits_products.products  # the module-scoped workspace of maps and cubes
MAP_JOB = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"
HIT_JOB = "modules.MapMaking.MapMakingModules.CreateHitMap.CreateHitMap"
GALACTIC_MAP = "maps/fld_band0_ch0_feed01.fits"
EQUATORIAL_MAP = "maps_icrs/eq_band0_ch0_feed01.fits"
HIT_MAP = "hits/cov_band0_ch0_feed01_hits.fits"
CUBE = "cubes/fld_stackH58a-H62a.fits"
COLOUR_TOL = 3  # 8-bit RGB: Agg rounds colours, nothing else changes a flat-filled pixel centre


@pytest.fixture(scope="module")
def more_maps(products):
    """An equatorial continuum map and a Galactic hit map of the same data (default settings otherwise)."""
    ws = products
    (ws.root / "more.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{MAP_JOB}(map_name='eq', source='GField30', band=0, channel=0, dynamic_frame='icrs', "
        "output_dir='maps_icrs')\",\n"
        f"  \"{HIT_JOB}(map_name='cov', source='GField30', band=0, channel=0, output_dir='hits')\",\n]\n"
    )
    (ws.root / "more_run.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        "  \"modules.MapMaking.MapMaking.MapMaking(config_file='more.toml')\",\n]\n"
    )
    res = ws.run(config="more_run.toml")
    assert res.returncode == 0, res.stderr[-3000:]
    return ws


def render(fig) -> np.ndarray:
    """The figure drawn by Agg: RGB array (rows from the top), 0-255."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def colour_at(fig, rgb, ax, ix: int, iy: int) -> np.ndarray:
    """Median rendered colour of a 5×5 block at the centre of map pixel (ix, iy) (a grid line crossing
    the centre does not change the median)."""
    x, y = ax.transData.transform((ix, iy))
    row, col = int(round(rgb.shape[0] - y)), int(round(x))
    return np.median(rgb[row - 2 : row + 3, col - 2 : col + 3].reshape(-1, 3), axis=0)


def tick_labels(ax) -> tuple[list[str], list[str]]:
    """The drawn tick label strings of both coordinates (astropy has no public accessor: the
    ``ticklabels`` attribute is deprecated in astropy 8)."""
    return tuple(sum(ax.coords[i]._ticklabels.text.values(), []) for i in (0, 1))


def assert_sky_axes(ax, ctype: str, labels: tuple[str, str]) -> None:
    """WCSAxes of ``ctype`` with the frame's axis labels and a grid (after the figure was drawn)."""
    assert isinstance(ax, WCSAxes)
    assert ax.wcs.wcs.ctype[0] == ctype
    assert (ax.coords[0].get_axislabel(), ax.coords[1].get_axislabel()) == labels
    for i in (0, 1):
        assert ax.coords[i]._grid_lines_kwargs["visible"]  # ax.coords.grid() (private: no getter)
        assert ax.coords[i]._grid_lines, "no grid line drawn"


def assert_beam(ax, header) -> None:
    """One beam ellipse whose axes (pixels × pixel scale) are the header's BMAJ and BMIN (deg)."""
    (ellipse,) = beam_ellipses(ax)
    scale = float(np.sqrt(np.prod(proj_plane_pixel_scales(ax.wcs))))
    assert ellipse.height * scale == pytest.approx(float(header["BMAJ"]), rel=1e-9)
    assert ellipse.width * scale == pytest.approx(float(header["BMIN"]), rel=1e-9)


def test_robust_limits_ignore_a_few_hot_pixels():
    """Three hot pixels among 150 set the 99.5th percentile of the values but not the colour limits."""
    values = np.random.default_rng(1).normal(size=150)
    values[:3] = 1e6
    assert np.percentile(values, 99.5) > 1e3  # what a plain percentile scale would show
    vmin, vmax = robust_limits(values)
    assert -5.0 < vmin < 0.0 < vmax < 5.0  # noise of unit sigma: 150 draws stay within ±4σ


def test_bright_source_gets_an_asinh_stretch_and_noise_a_linear_one():
    """Noise alone: linear. Noise of unit sigma with a 1000σ source over 2 % of the pixels: asinh, and
    the noise up to +3σ then spans a visible part of the colours (a linear scale gives it < 1 %)."""
    rng = np.random.default_rng(2)
    noise = rng.normal(size=2000)
    norm, stretch = colour_norm(noise, *robust_limits(noise))
    assert stretch == "linear"
    bright = noise.copy()
    bright[:40] += 1000.0
    vmin, vmax = robust_limits(bright)
    norm, stretch = colour_norm(bright, vmin, vmax)
    assert stretch == "asinh" and vmax > 900.0
    assert (3.0 - vmin) / (vmax - vmin) < 0.01  # what a linear scale would give +3σ
    assert float(norm(3.0)) > 0.1
    assert float(norm(vmin)) == pytest.approx(0.0, abs=1e-12) and float(norm(vmax)) == pytest.approx(1.0)


def test_galactic_map_quicklook(products, tmp_path):
    """The default continuum map with a NaN and a 1e6 K pixel planted in its interior."""
    src = products.root / GALACTIC_MAP
    assert src.with_suffix(".png").exists()  # the pipeline's PNG, beside the FITS file, same stem
    path = tmp_path / src.name
    shutil.copy(src, path)
    with fits.open(path, mode="update") as hdul:
        data, hits = hdul[0].data, hdul["HITS"].data
        header = hdul[0].header
        original_max = float(np.nanmax(data))
        nan_before = int(((hits > 0) & ~np.isfinite(data)).sum())
        interior = np.argwhere((hits >= np.percentile(hits[hits > 0], 50)) & np.isfinite(data))
        (nan_y, nan_x), (hot_y, hot_x) = interior[len(interior) // 2], interior[len(interior) // 2 + 1]
        data[nan_y, nan_x] = np.nan
        data[hot_y, hot_x] = 1e6
        outside = np.argwhere(ndimage.binary_dilation(hits > 0, iterations=2) & (hits == 0))  # in view
        valid = np.argwhere((hits > 0) & np.isfinite(data) & (data < original_max))
    assert quicklook_png(path) == path.with_suffix(".png") and path.with_suffix(".png").stat().st_size > 0

    fig, ax, drawn = quicklook_figure(path)
    rgb = render(fig)
    assert_sky_axes(ax, "GLON-CAR", ("Galactic longitude l", "Galactic latitude b"))
    assert header["OBJECT"] in ax.get_title() and "band 0 ch 0" in ax.get_title() and "GHz" in ax.get_title()
    assert drawn.stretch == "linear"  # extended emission a few noise sigmas bright
    assert drawn.colorbar.ax.get_ylabel() == "K (Rayleigh-Jeans)"
    assert drawn.vmax <= original_max  # the 1e6 K pixel does not set the scale
    assert drawn.n_nan_in_coverage == nan_before + 1
    lon, lat = tick_labels(ax)
    world = WCS(header).celestial.pixel_to_world_values(
        *np.meshgrid(*(np.arange(n) for n in data.shape[::-1]))
    )
    for labels, values in ((lon, world[0]), (lat, world[1])):
        assert labels and all(t.endswith("°") for t in labels), labels  # degrees, not pixel numbers
        numbers = [float(t.rstrip("°").replace("−", "-")) for t in labels]
        assert all(values.min() - 0.5 <= v <= values.max() + 0.5 for v in numbers), numbers
    assert_beam(ax, header)

    nan_colour = colour_at(fig, rgb, ax, nan_x, nan_y)
    grey = colour_at(fig, rgb, ax, *outside[0][::-1])
    data_colour = colour_at(fig, rgb, ax, *valid[len(valid) // 3][::-1])
    cmap = np.round(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255)
    assert np.abs(nan_colour - np.array(to_rgb(NAN_IN_COVERAGE_COLOUR)) * 255).max() <= COLOUR_TOL
    assert np.abs(grey - np.array(to_rgb(OUTSIDE_COVERAGE_COLOUR)) * 255).max() <= COLOUR_TOL
    assert np.abs(cmap - data_colour).max(axis=1).min() <= COLOUR_TOL  # a data pixel: a colour-map colour
    assert np.linalg.norm(nan_colour - grey) > 100
    assert np.linalg.norm(cmap - nan_colour, axis=1).min() > 100  # far from every colour-map colour


def test_equatorial_map_quicklook(more_maps):
    path = more_maps.root / EQUATORIAL_MAP
    assert path.with_suffix(".png").exists()
    header = fits.getheader(path)
    assert header["CTYPE1"] == "RA---CAR"
    fig, ax, drawn = quicklook_figure(path)
    render(fig)
    assert_sky_axes(ax, "RA---CAR", ("RA (ICRS)", "Dec (ICRS)"))
    ra, dec = tick_labels(ax)
    # sexagesimal hours; WCSAxes leaves out the fields a label shares with its neighbour ('20^s')
    assert ra and all(re.search(r"\^[hms]", t) for t in ra) and any("^h" in t for t in ra), ra
    assert dec and all(re.search("[°']", t) for t in dec) and any("°" in t for t in dec), dec
    assert_beam(ax, header)
    assert drawn.n_valid > 0 and drawn.vmin < drawn.vmax


def _cube_inputs(path):
    """The arguments of ``cube_quicklook_figure`` rebuilt from a cube's FITS file: (LINE header,
    geometry, hit pixels, Cube with the header's channel correlations, velocities in km/s, mask)."""
    with fits.open(path) as hdul:
        h = hdul["LINE"].header
        n_v = h["NAXIS3"]
        hit = np.flatnonzero(hdul["HITS"].data.ravel() > 0)
        line = hdul["LINE"].data.reshape(n_v, -1)[:, hit].T.astype(np.float64)
        rms = hdul["RMS"].data.reshape(n_v, -1)[:, hit].T.astype(np.float64)
        masked = hdul["MASK"].data.ravel()[hit] != 0
    geometry = MapGeometry(
        {f"{k}{i}": h[f"{k}{i}"] for k in ("CTYPE", "CRPIX", "CDELT", "CRVAL", "NAXIS") for i in (1, 2)}
    )
    velocities = WCS(h).spectral.pixel_to_world_values(np.arange(n_v)) / 1e3
    cube = Cube(line, rms, np.zeros(len(hit)), {k: h[k] for k in ("BMAJ", "BMIN", "BPA")})
    cube.correlation = (h["HIERARCH LINE CORR1"], h["HIERARCH LINE CORRB"])
    return h, geometry, hit, cube, velocities, masked


def test_cube_quicklook(products):
    """The moment-0 panel of the stacked cube, rebuilt from its FITS file, with the cube's common beam."""
    path = products.root / CUBE
    assert path.with_suffix(".png").exists()
    h, geometry, hit, cube, velocities, masked = _cube_inputs(path)
    line = cube.line
    mask_kms = (h["HIERARCH LINE MASKLO"], h["HIERARCH LINE MASKHI"])
    fig, ax0, ax1, drawn = cube_quicklook_figure(
        geometry, hit, cube, velocities, mask_kms, masked, "fld stack"
    )
    render(fig)
    assert_sky_axes(ax0, "GLON-CAR", ("Galactic longitude l", "Galactic latitude b"))
    assert "moment 0" in ax0.get_title() and "fld stack" in ax0.get_title()
    assert drawn.colorbar.ax.get_ylabel() == "K km/s"
    assert drawn.n_nan_in_coverage == int(masked.sum() + (~masked & ~np.isfinite(line).any(axis=1)).sum())
    assert drawn.n_valid + drawn.n_nan_in_coverage == len(hit)
    assert ax1.get_xlabel() == "LSRK radio velocity (km/s)" and "spectrum at l = " in ax1.get_title()
    assert all(t.endswith("°") for t in tick_labels(ax0)[0])
    assert_beam(ax0, h)


def test_cube_quicklook_says_why_no_spectrum(products):
    """A line mask narrower than the channel spacing holds no channel centre: the spectrum panel
    says so instead of staying blank."""
    path = products.root / CUBE
    _h, geometry, hit, cube, velocities, masked = _cube_inputs(path)
    between = 0.5 * (velocities[0] + velocities[1])
    window = (between - 1e-3 * abs(velocities[1] - velocities[0]), between)
    fig, ax0, ax1, drawn = cube_quicklook_figure(geometry, hit, cube, velocities, window, masked, "fld")
    render(fig)
    texts = [t.get_text() for t in ax1.texts]
    assert any(t.startswith("no channel centre inside the line mask") for t in texts), texts
    assert not ax1.lines and "none to show" in ax1.get_title()
    # the moment map is not a map of zeros: an empty sum is no measurement
    assert drawn.n_valid == 0 and "no channel in" in ax0.get_title()


def test_hit_map_quicklook(more_maps):
    path = more_maps.root / HIT_MAP
    png = path.with_suffix(".png")
    assert png.exists() and png.stat().st_size > 0
    assert fits.getheader(path)["CTYPE1"] == "GLON-CAR"


def test_difference_map_quicklook(products, tmp_path):
    """A jackknife difference (A − B)/2: a diverging colour map with limits symmetric about zero and a
    linear stretch, although the map it comes from is drawn with an asymmetric scale."""
    from modules.MapMaking.fits_output import write_difference_map

    src = products.root / GALACTIC_MAP
    a, b = tmp_path / "a.fits", tmp_path / "b.fits"
    shutil.copy(src, a)
    shutil.copy(src, b)
    with fits.open(b, mode="update") as hdul:  # B = A − 2·noise: the difference is +noise
        data = hdul[0].data
        noise = np.random.default_rng(3).normal(scale=0.01, size=data.shape).astype(data.dtype)
        data -= 2 * noise
    diff = write_difference_map(a, b, tmp_path / "ab_diff.fits")
    _fig, _ax, plain = quicklook_figure(a)
    fig, ax, drawn = quicklook_figure(diff)
    render(fig)
    assert plain.image.get_cmap().name == "inferno" and plain.vmin != -plain.vmax
    assert drawn.image.get_cmap().name == "RdBu_r"
    assert drawn.vmin == -drawn.vmax and drawn.stretch == "linear"
    assert 0.01 < drawn.vmax < 0.04  # the noise's 99.5th percentile (σ = 0.01) sets it, not the sky
    assert "(A-B)/2" in ax.get_title()
