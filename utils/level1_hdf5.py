"""Low-level HDF5 access of the level-1 reader: byte counting and strided hyperslab reads.

Used by :class:`utils.level1.Level1File`; nothing here knows the level-1 layout.
"""

from __future__ import annotations

import operator
import os
import sys
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


# --------------------------------------------------------------------------------------------------
# Direct reads of an unfiltered dataset (docs/formats/level1.md#direct-tod-reads)
# --------------------------------------------------------------------------------------------------
class DirectReader:
    """Boxes of an unfiltered little-endian float32 dataset read with ``os.preadv``, without HDF5.

    h5py serialises every HDF5 call through one global lock, so a TOD block read by HDF5 in a
    prefetch thread stalls every level-2 write of the main thread until it ends. Reading the bytes
    straight from the file needs the lock only once, to list where the chunks are. Each run of the
    box along the last axis is a contiguous range of the file; runs that follow each other in the
    file (all rows of a chunk the box covers in full), or lie at most :attr:`max_gap` bytes apart
    (the rows of a chunk the box cuts through along time), are read by one ``preadv`` scattering
    them straight into the output, the gaps into scratch, so nothing is copied twice. The reads
    run in the Cython kernel ``utils.kernels.direct_io`` without the GIL. ``bytes_read`` counts
    every byte read, gaps included.

    Use :meth:`for_dataset`, which returns None for a layout this class does not read (filters,
    external storage, another dtype or byte order).
    """

    ITEMSIZE = 4
    #: Runs at most this many bytes apart are read by one call, the gap into scratch: a call costs
    #: more than copying a few kB (docs/formats/level1.md#direct-tod-reads).
    max_gap = 8192

    def __init__(self, path: str, shape: tuple[int, ...], chunks: tuple[int, ...] | None, offsets: Any):
        self.shape = tuple(int(n) for n in shape)
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)
        self._offsets = offsets  # int (contiguous) or {chunk origin: byte offset}
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0

    @classmethod
    def for_dataset(cls, ds: h5py.Dataset, path: str) -> DirectReader | None:
        """A reader for ``ds`` of the file ``path``, or None when its storage is not plain bytes."""
        try:
            if ds.dtype != np.dtype("<f4") or sys.byteorder != "little" or ds.ndim < 1:
                return None
            dcpl = ds.id.get_create_plist()
            if dcpl.get_nfilters() != 0 or dcpl.get_external_count() != 0:
                return None
            layout = dcpl.get_layout()
            if layout == h5py.h5d.CONTIGUOUS:
                offset = ds.id.get_offset()
                return None if offset is None else cls(path, ds.shape, None, int(offset))
            if layout != h5py.h5d.CHUNKED:
                return None
            offsets: dict[tuple[int, ...], int] = {}

            def add(info: Any) -> None:
                if info.byte_offset is not None and info.filter_mask == 0:
                    offsets[tuple(int(c) for c in info.chunk_offset)] = int(info.byte_offset)

            ds.id.chunk_iter(add)
            return cls(path, ds.shape, ds.chunks, offsets)
        except (AttributeError, OSError, RuntimeError, ValueError, TypeError):
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def reopen(self) -> None:
        """Open the file again under a new descriptor (before retrying a read that failed with a
        transient error: a stale NFS handle stays stale on the old descriptor)."""
        self.close()
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, starts: Sequence[int], counts: Sequence[int], out: NDArray) -> bool:
        """Read the box ``[starts, starts + counts)`` into the C-contiguous ``out`` (as many elements,
        any shape). False, with ``out`` untouched, when a chunk of the box has no storage (HDF5 then
        supplies the fill value). OSError when the file is shorter than its index says (no errno),
        or with the ``errno`` of a failed ``preadv`` (EAGAIN, ESTALE, … are retried by the caller,
        docs/reliability.md#transient-io-errors-and-full-disks)."""
        from utils.kernels.direct_io import read_runs

        box = [(int(s), int(s) + int(c)) for s, c in zip(starts, counts)]
        if any(hi <= lo for lo, hi in box):
            return True
        extent = self.chunks or self.shape
        # chunk grid of the box: per axis, the chunk indices it touches
        grid = [np.arange(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(box, extent)]
        if self.chunks is None:
            chunk_offset = np.full((1,) * len(box), self._offsets, dtype=np.int64)
        else:
            chunk_offset = np.empty([len(g) for g in grid], dtype=np.int64)
            for idx in np.ndindex(chunk_offset.shape):
                origin = tuple(int(g[i]) * c for g, i, c in zip(grid, idx, extent))
                offset = self._offsets.get(origin)
                if offset is None:
                    return False
                chunk_offset[idx] = offset
        elem_in_chunk = np.cumprod((1, *extent[:0:-1]))[::-1].astype(np.int64)  # element strides
        elem_in_dest = np.cumprod((1, *[hi - lo for lo, hi in box][:0:-1]))[::-1].astype(np.int64)
        # every index of the leading axes, and the pieces of the last axis cut at chunk edges
        lo_l, hi_l = box[-1]
        cuts = np.unique(np.clip(np.concatenate([[lo_l, hi_l], grid[-1] * extent[-1]]), lo_l, hi_l))
        piece_a, piece_b = cuts[:-1], cuts[1:]
        file_elem = np.zeros(1, dtype=np.int64)
        dest_elem = np.zeros(1, dtype=np.int64)
        chunk_flat = np.zeros(1, dtype=np.int64)
        chunk_grid_strides = np.cumprod((1, *chunk_offset.shape[:0:-1]))[::-1]
        for d, (lo, hi) in enumerate(box[:-1]):
            i = np.arange(lo, hi, dtype=np.int64)
            file_elem = (file_elem[:, None] + ((i % extent[d]) * elem_in_chunk[d])[None, :]).reshape(-1)
            dest_elem = (dest_elem[:, None] + ((i - lo) * elem_in_dest[d])[None, :]).reshape(-1)
            rel = i // extent[d] - grid[d][0]
            chunk_flat = (chunk_flat[:, None] + (rel * chunk_grid_strides[d])[None, :]).reshape(-1)
        rel_l = piece_a // extent[-1] - grid[-1][0]
        file_elem = file_elem[:, None] + ((piece_a % extent[-1]) * elem_in_chunk[-1])[None, :]
        dest_elem = dest_elem[:, None] + ((piece_a - lo_l) * elem_in_dest[-1])[None, :]
        chunk_flat = chunk_flat[:, None] + (rel_l * chunk_grid_strides[-1])[None, :]
        file_pos = (chunk_offset.reshape(-1)[chunk_flat] + self.ITEMSIZE * file_elem).reshape(-1)
        dest_pos = (self.ITEMSIZE * dest_elem).reshape(-1)
        length = np.broadcast_to(self.ITEMSIZE * (piece_b - piece_a), chunk_flat.shape).reshape(-1)
        order = np.argsort(file_pos, kind="stable")
        file_pos, dest_pos, length = (np.ascontiguousarray(a[order]) for a in (file_pos, dest_pos, length))
        flat = out.reshape(-1).view(np.uint8)
        err = np.zeros(1, dtype=np.intc)
        got = read_runs(self._fd, flat, file_pos, dest_pos, length, err, self.max_gap)
        if got < 0:
            at = int(file_pos[-1 - got])
            if err[0]:
                code = int(err[0])
                raise OSError(code, f"{os.strerror(code)} (reading {self.path} at byte {at})", self.path)
            raise OSError(f"short read of {self.path} at byte {at}")
        self.bytes_read += int(got)
        return True
