"""Cython kernels (built by ``pip install -e .``). Import them through the wrappers in ``utils``.

Importing this package makes the OpenMP threads of the kernels sleep, rather than spin, while they
wait for work (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose a policy
(docs/level2.md#streaming). libgomp reads the variable when it is loaded, which is when the first
kernel is imported, after this.

It also chooses the build of the kernels (docs/install.md#compiled-kernels): on a CPU with AVX2 and
FMA, ``utils.kernels.<name>`` is the x86-64-v3 build from :mod:`utils.kernels.v3` when it was built,
otherwise the baseline x86-64 build. ``COMAP_KERNELS=baseline`` forces the baseline build.
:data:`BUILD` says which one this process uses.
"""

import importlib
import os
import sys

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

#: every compiled kernel module
KERNELS = ("binning", "block_stats", "cube_ops", "destriper_ops", "direct_io", "mean_filter", "median_filter")


def cpu_has_v3() -> bool:
    """True if this CPU has AVX2 and FMA (NumPy's runtime detection)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return bool(features.get("AVX2")) and bool(features.get("FMA3"))


def _choose() -> str:
    if os.environ.get("COMAP_KERNELS", "").strip().lower() == "baseline" or not cpu_has_v3():
        return "baseline"
    try:
        modules = {name: importlib.import_module(f"{__name__}.v3.{name}") for name in KERNELS}
    except ImportError:
        return "baseline"  # not built here (not x86-64, or COMAP_NO_V3): all or none
    for name, module in modules.items():
        # ``from utils.kernels import name`` and ``import utils.kernels.name`` both find this build
        sys.modules[f"{__name__}.{name}"] = module
        globals()[name] = module
    return "x86-64-v3"


#: the build in use: ``"x86-64-v3"`` or ``"baseline"``
BUILD = _choose()
