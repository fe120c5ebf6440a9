"""Build the Cython kernels in ``utils/kernels`` (``pip install -e .`` runs this).

Every ``utils/kernels/*.pyx`` becomes ``utils.kernels.<name>``; compiled with -O3 and OpenMP when
the compiler accepts ``-fopenmp`` (checked by compiling a tiny program, so a compiler without
OpenMP still builds serial kernels). The per-sample kernels of the streaming level-2 stages
(``REASSOCIATE``) may also reorder floating-point sums, so the compiler vectorises their float64
reductions; NaN and infinity keep their IEEE meaning (no ``-ffast-math``), and the sums differ from
the sequential ones only by float64 rounding (docs/level2.md#streaming).
"""

from __future__ import annotations

import os
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


def _extensions() -> list[Extension]:
    openmp = _compiler_supports_openmp()
    compile_args = ["-O3"]
    link_args: list[str] = []
    if openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    else:
        print("setup.py: compiler has no OpenMP; kernels are built single-threaded", file=sys.stderr)
    exts = []
    for pyx in sorted(glob(str(HERE / "utils" / "kernels" / "*.pyx"))):
        name = "utils.kernels." + Path(pyx).stem
        exts.append(
            Extension(
                name,
                [os.path.relpath(pyx, HERE)],
                include_dirs=[numpy.get_include()],
                extra_compile_args=compile_args + (REASSOCIATE_ARGS if Path(pyx).stem in REASSOCIATE else []),
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
