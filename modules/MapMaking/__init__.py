"""Map making: destriped continuum maps (MapMaking) and RRL cubes (LineMapMaking), spec 04."""
