"""Map making: destriped continuum maps (MapMaking) and RRL cubes (LineMapMaking); see docs/mapmaking.md."""
