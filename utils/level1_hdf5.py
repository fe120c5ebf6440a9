"""Low-level HDF5 access of the level-1 reader: byte counting and strided hyperslab reads.

Used by :class:`utils.level1.Level1File`; nothing here knows the level-1 layout.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

Index = int | np.integer
Sel = slice | int | np.integer | None


# --------------------------------------------------------------------------------------------------
# Byte counting (docs/operations.md#measurement-details B2)
# --------------------------------------------------------------------------------------------------
class CountingFile:
    """Unbuffered binary file that counts the bytes HDF5 reads through h5py's ``fileobj`` driver.

    ``readinto`` loops until the request is filled or EOF (h5py's driver does not retry short reads).
    """

    def __init__(self, path: str) -> None:
        self._raw = open(path, "rb", buffering=0)  # closed by close()
        self.name = path
        self.bytes_read = 0
        self.n_reads = 0

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        size = len(view)
        total = 0
        while total < size:
            n = self._raw.readinto(view[total:])
            if not n:
                break
            total += n
        self.bytes_read += total
        self.n_reads += 1
        return total

    def read(self, size: int = -1) -> bytes:
        data = self._raw.readall() if size is None or size < 0 else self._raw.read(size) or b""
        self.bytes_read += len(data)
        self.n_reads += 1
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        pass

    def truncate(self, size: int | None = None) -> int:
        raise OSError("level-1 files are opened read-only")

    def write(self, data: Any) -> int:
        raise OSError("level-1 files are opened read-only")

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed


# --------------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------------
def next_prime(n: int) -> int:
    """Smallest prime >= ``max(n, 2)`` (HDF5 chunk-cache hash size)."""
    n = max(int(n), 2)
    while any(n % p == 0 for p in range(2, int(n**0.5) + 1)):
        n += 1
    return n


def readonly(a: NDArray) -> NDArray:
    """Mark ``a`` read-only in place (cached arrays) and return it."""
    a.flags.writeable = False
    return a


def check_position(i: Any, n: int) -> int:
    """Non-negative feed position for ``i`` (negative counts from the end) among ``n`` feeds."""
    try:
        k = operator.index(i)
    except TypeError:
        raise TypeError(f"feed position must be an int, got {type(i).__name__}") from None
    if not -n <= k < n:
        raise IndexError(f"feed position {k} out of range for {n} feeds")
    return k + n if k < 0 else k


def normalise_selection(sel: Sel, n: int, axis: int) -> tuple[int, int, int, bool]:
    """Return (start, count, step, keep_axis) for an int, slice or None on an axis of length n."""
    if sel is None:
        return 0, n, 1, True
    if isinstance(sel, slice):
        start, stop, step = sel.indices(n)
        if step <= 0:
            raise ValueError(f"axis {axis}: only positive slice steps are supported, got {sel}")
        return start, len(range(start, stop, step)), step, True
    try:
        k = operator.index(sel)
    except TypeError:
        raise TypeError(f"axis {axis}: expected a slice, int or None, got {type(sel).__name__}") from None
    if not -n <= k < n:
        raise IndexError(f"axis {axis}: index {k} out of range for length {n}")
    return (k + n if k < 0 else k), 1, 1, False


def read_hyperslab(
    ds: h5py.Dataset, starts: Sequence[int], counts: Sequence[int], steps: Sequence[int], out: NDArray
) -> None:
    """Read a strided hyperslab of ``ds`` into ``out`` (same number of elements) with HDF5 directly."""
    fspace = ds.id.get_space()
    stride = tuple(steps) if any(s != 1 for s in steps) else None
    fspace.select_hyperslab(tuple(starts), tuple(counts), stride)
    if out.flags.c_contiguous and out.flags.writeable:
        mspace = h5py.h5s.create_simple(out.shape if out.ndim else (1,))
        ds.id.read(mspace, fspace, out)
    else:
        tmp = np.empty(out.shape, dtype=out.dtype)
        ds.id.read(h5py.h5s.create_simple(tmp.shape if tmp.ndim else (1,)), fspace, tmp)
        out[...] = tmp
