"""Optional system components the tests need (MPI, a PostgreSQL server) and what to do without them.

A component that is missing makes its tests skip, unless it is named in ``COMAP_REQUIRE``
(comma-separated, e.g. ``COMAP_REQUIRE=mpi,postgres`` as ``.ci/run`` sets it): then the test fails,
so that CI cannot pass by silently skipping them (docs/install.md#optional-components).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


def required(component: str) -> bool:
    """True when ``component`` is listed in ``COMAP_REQUIRE``."""
    names = {n.strip().lower() for n in os.environ.get("COMAP_REQUIRE", "").split(",")}
    return component.lower() in names


def missing(component: str, reason: str) -> None:
    """Skip the calling test because ``component`` is unavailable, or fail it if it is required."""
    if required(component):
        pytest.fail(f"{component} is required (COMAP_REQUIRE) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"{component} not available: {reason}")


def mpiexec_path() -> str:
    """``mpiexec`` of the running interpreter's environment (the ``mpich`` wheel puts it next to
    ``sys.executable``), after checking that ``mpi4py`` finds an MPI library; skips or fails otherwise."""
    try:
        from mpi4py import MPI  # noqa: F401  (the import that needs the library, not just the package)
    except Exception as exc:  # ImportError, or RuntimeError when no libmpi is found
        missing("mpi", f"from mpi4py import MPI failed: {exc}")
    exe = Path(sys.executable).with_name("mpiexec")
    if not exe.exists():
        missing("mpi", f"no mpiexec next to {sys.executable} (pip install -e '.[mpi]')")
    return str(exe)


def mpi_environment(**extra: str) -> dict[str, str]:
    """Environment for an ``mpiexec`` child: one OpenMP thread per rank, no launcher variables of an
    outer MPI job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env
