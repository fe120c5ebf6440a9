"""Map geometry (docs/mapmaking.md#map-geometry): named definitions, the dynamic WCS across l = 0/360,
rounding to pixels."""

from __future__ import annotations

import numpy as np
import pytest

from modules.MapMaking.geometry import job_geometry, wcs_definitions_path
from utils.wcs import (
    MapGeometry,
    dynamic_geometry,
    load_wcs_definitions,
    named_geometry,
    world_to_pixel_index,
)


def test_shipped_definitions():
    path = wcs_definitions_path("map_making_configs/wcs_definitions.toml")
    assert path is not None
    defs = load_wcs_definitions(path)
    assert {
        "Galactic",
        "GalacticOriginal",
        "GalacticEffelsberg",
        "LDN1111",
        "M31",
        "Perseus",
        "California",
        "TauA",
    } <= set(defs)
    g = named_geometry("Galactic", defs)
    assert (g.nx, g.ny) == (10801, 721) and g.frame == "galactic"
    with pytest.raises(KeyError, match="unknown WCS definition 'Nope'; known: California"):
        named_geometry("Nope", defs)


def test_rounding_to_the_nearest_pixel_centre():
    """Positions within ±0.49 pixel of a centre map to that pixel (legacy code truncated)."""
    geo = MapGeometry(
        {
            "CTYPE1": "GLON-CAR",
            "CTYPE2": "GLAT-CAR",
            "NAXIS1": 11,
            "NAXIS2": 9,
            "CRPIX1": 6.0,
            "CRPIX2": 5.0,
            "CDELT1": -0.1,
            "CDELT2": 0.1,
            "CRVAL1": 30.0,
            "CRVAL2": 0.0,
        }
    )
    wcs = geo.wcs
    for ix, iy in [(0, 0), (5, 4), (10, 8), (3, 7)]:
        for dx, dy in [(0.49, 0.0), (-0.49, 0.0), (0.0, 0.49), (0.0, -0.49), (0.3, -0.3)]:
            lon, lat = wcs.pixel_to_world_values(ix + dx, iy + dy)
            assert world_to_pixel_index(geo, [lon], [lat])[0] == iy * geo.nx + ix
    lon, lat = wcs.pixel_to_world_values(-0.6, 2.0)
    assert world_to_pixel_index(geo, [lon, np.nan], [lat, 0.0]).tolist() == [-1, -1]


def test_dynamic_wcs_across_l_zero():
    """A field straddling l = 0/360 gives a map about 1° + 2·pad wide, not 360° wide."""
    rng = np.random.default_rng(0)
    lon = (rng.uniform(-0.5, 0.5, 5000)) % 360.0
    lat = rng.uniform(-0.3, 0.3, 5000)
    geo = dynamic_geometry(lon, lat, frame="galactic", cdelt_deg=1 / 60, padding_deg=0.5)
    width = geo.nx * abs(geo.header["CDELT1"])
    assert 1.9 <= width <= 2.1 and geo.nx % 2 == 1 and geo.ny % 2 == 1
    assert geo.header["CRVAL2"] == 0.0
    idx = world_to_pixel_index(geo, lon, lat)
    assert np.all(idx >= 0)
    # every position maps back to its own pixel centre within half a pixel
    iy, ix = np.divmod(idx, geo.nx)
    back_lon, back_lat = geo.wcs.pixel_to_world_values(ix, iy)
    dlon = (back_lon - lon + 180) % 360 - 180
    assert np.abs(dlon).max() <= 0.5 / 60 + 1e-9 and np.abs(back_lat - lat).max() <= 0.5 / 60 + 1e-9


def test_dynamic_latitude_centre_off_the_plane():
    lon = np.full(100, 184.5)
    lat = np.linspace(-6.3, -5.3, 100)
    geo = job_geometry("dynamic", "x", lon, lat, frame="galactic", cdelt_deg=1 / 60, padding_deg=0.5)
    idx = world_to_pixel_index(geo, lon, lat)
    assert np.all(idx >= 0)
    centre_y = (geo.header["CRPIX2"] - 1) + (-5.8) / geo.header["CDELT2"]
    assert abs(centre_y - (geo.ny - 1) / 2) < 1.0
