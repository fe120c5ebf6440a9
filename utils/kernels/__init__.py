"""Cython kernels (built by ``pip install -e .``). Import them through the wrappers in ``utils``."""
