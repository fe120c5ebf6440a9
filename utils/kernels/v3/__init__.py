"""The x86-64-v3 (AVX2 and FMA) build of every kernel in ``utils.kernels``, from the same sources.

Not imported directly: ``utils.kernels`` chooses this build on a CPU that has AVX2 and FMA
(docs/install.md#compiled-kernels).
"""
