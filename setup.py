"""Build the Cython kernels in ``utils/kernels`` (``pip install -e .`` runs this).

Every ``utils/kernels/*.pyx`` becomes ``utils.kernels.<name>``; compiled with -O3 and OpenMP when
the compiler accepts ``-fopenmp`` (checked by compiling a tiny program, so a compiler without
OpenMP still builds serial kernels). The per-sample kernels of the streaming level-2 stages
(``REASSOCIATE``) may also reorder floating-point sums, so the compiler vectorises their float64
reductions; NaN and infinity keep their IEEE meaning (no ``-ffast-math``), and the sums differ from
the sequential ones only by float64 rounding (docs/level2.md#streaming).

On x86-64, every kernel is built a second time for x86-64-v3 (AVX2 and FMA) as
``utils.kernels.v3.<name>``; ``utils.kernels`` picks that build on a CPU that has both (the way NumPy
dispatches its own loops), so one installation runs on any x86-64 node of a cluster. Fused
multiply-adds are not formed (``-ffp-contract=off``), so element-wise kernels give the same bits in
both builds and reductions differ only by float64 rounding (docs/install.md#compiled-kernels).
``COMAP_NO_V3=1`` skips the second build.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from glob import glob
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent
#: kernels built with reassociation allowed (vectorised reductions), and the flags that allow it
REASSOCIATE = {"block_stats"}
REASSOCIATE_ARGS = ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
#: the second build of every kernel, for CPUs with AVX2 and FMA (utils/kernels/__init__.py chooses)
V3_ARGS = ["-mavx2", "-mfma", "-ffp-contract=off"]
V3_SOURCES = HERE / "build" / "kernels_v3"


def _compiler_supports_openmp() -> bool:
    if os.environ.get("COMAP_NO_OPENMP"):
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        c_file = Path(tmp) / "t.c"
        c_file.write_text(src)
        try:
            res = subprocess.run(
                [cc, "-fopenmp", str(c_file), "-o", str(Path(tmp) / "t")],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def _compiler_supports_v3() -> bool:
    if os.environ.get("COMAP_NO_V3") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        c_file = Path(tmp) / "t.c"
        c_file.write_text("int main(void){return 0;}\n")
        try:
            res = subprocess.run(
                [cc, *V3_ARGS, str(c_file), "-o", str(Path(tmp) / "t")], capture_output=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return res.returncode == 0


def _v3_source(pyx: Path) -> str:
    """A copy of ``pyx`` for the v3 build (Cython writes its C file beside the source, so the two
    builds of one kernel need two sources); rewritten only when the original changed."""
    V3_SOURCES.mkdir(parents=True, exist_ok=True)
    copy = V3_SOURCES / pyx.name
    text = pyx.read_text()
    if not copy.exists() or copy.read_text() != text:
        copy.write_text(text)
    return os.path.relpath(copy, HERE)


def _extensions() -> list[Extension]:
    openmp = _compiler_supports_openmp()
    compile_args = ["-O3"]
    link_args: list[str] = []
    if openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        print("setup.py: compiler has no OpenMP; kernels are built single-threaded", file=sys.stderr)
    builds = [("utils.kernels.", [], None)]
    if _compiler_supports_v3():
        builds.append(("utils.kernels.v3.", V3_ARGS, _v3_source))
    else:
        print("setup.py: no x86-64-v3 build of the kernels (not x86-64, or COMAP_NO_V3)", file=sys.stderr)
    exts = []
    for prefix, extra, source in builds:
        for pyx in sorted(glob(str(HERE / "utils" / "kernels" / "*.pyx"))):
            stem = Path(pyx).stem
            args = compile_args + extra + (REASSOCIATE_ARGS if stem in REASSOCIATE else [])
            exts.append(
                Extension(
                    prefix + stem,
                    [source(Path(pyx)) if source else os.path.relpath(pyx, HERE)],
                    include_dirs=[numpy.get_include()],
                    extra_compile_args=args,
                    extra_link_args=link_args,
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                )
            )
    return cythonize(
        exts,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=_extensions())
