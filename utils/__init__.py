"""Shared physics, formats and kernels of comap-reduce (the ground floor: never imports ``modules``)."""
