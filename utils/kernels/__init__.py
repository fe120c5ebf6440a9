"""Cython kernels (built by ``pip install -e .``). Import them through the wrappers in ``utils``.

Importing this package makes the OpenMP threads of the kernels sleep, rather than spin, while they
wait for work (``OMP_WAIT_POLICY=PASSIVE``), unless the user chose a policy
(docs/level2.md#streaming). libgomp reads the variable when it is loaded, which is when the first
kernel is imported, after this.
"""

import os

if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
