"""Direct reads of spectrometer/tod (utils.level1_hdf5.DirectReader,
docs/formats/level1.md#direct-tod-reads) against HDF5's own reads of the same boxes."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from tests.test_level1 import FEEDS, N_BANDS, N_CHANNELS, NAME, write_level1
from utils.level1 import Level1File
from utils.level1_hdf5 import DirectReader

N_TOD = 1000

# boxes as tod_block arguments: whole feed, a scan cut inside chunks, one band and a channel
# window across a chunk edge, an int channel (axis dropped), a single sample, the last samples
SELECTIONS = [
    (0, None, None, None),
    (2, None, None, slice(100, 777)),
    (1, 1, slice(3, 13), slice(120, 390)),
    (3, slice(0, 2), 7, slice(0, 1000)),
    (1, 3, 11, slice(999, 1000)),
    (-1, None, slice(14, 16), slice(900, None)),
]


@pytest.fixture(params=[(1, 1, 4, 128), (1, 2, 8, 1000), None], ids=["chunked", "wide-chunks", "contiguous"])
def level1(request, tmp_path):
    return write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=request.param)


@pytest.mark.parametrize("sel", SELECTIONS)
def test_direct_reads_equal_hdf5(level1, sel):
    with Level1File(level1) as direct, Level1File(level1, direct_reads=False) as hdf5:
        assert direct._direct_reader() is not None and hdf5._direct_reader() is None
        a = direct.tod_block(*sel)
        b = hdf5.tod_block(*sel)
        assert a.shape == b.shape and a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        out = np.full(a.shape, -1.0, dtype=np.float32)  # into a caller's buffer
        assert direct.tod_block(*sel, out=out) is out
        np.testing.assert_array_equal(out, b)


def test_direct_reads_count_exactly_the_box(tmp_path, monkeypatch):
    monkeypatch.setattr(DirectReader, "max_gap", 0)  # every run read on its own: no byte outside the box
    path = write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=(1, 1, 4, 128))
    with Level1File(path, count_bytes=True) as l1:
        l1.tod_block(1, 1, slice(3, 13), slice(120, 390))
        box = 10 * 270 * 4
        assert box <= l1.bytes_read_tod < box + 20_000  # the box, once, plus the chunk index
        index = l1.bytes_read_tod - box
        l1.tod_block(0)
        assert l1.bytes_read_tod == box + index + N_BANDS * N_CHANNELS * N_TOD * 4
        assert l1.bytes_read_total > l1.bytes_read_tod  # plus superblock, object headers, …
        total = l1.bytes_read_total
    assert l1.bytes_read_total == total  # the counts survive close()


def test_runs_separated_by_small_gaps_are_read_in_one_call(tmp_path, monkeypatch):
    """A box that cuts through chunks is one run per row of each chunk, separated by the rest of
    the row. Gaps up to ``DirectReader.max_gap`` bytes are read into scratch by the same ``preadv``
    (one call instead of one per run): the values stay HDF5's, and the extra bytes counted are
    exactly the gaps, never more than the chunks the box touches."""
    path = write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=(1, 1, 4, 128))
    sel = (1, 1, slice(3, 13), slice(120, 390))
    counted = {}
    for gap in (0, DirectReader.max_gap):
        monkeypatch.setattr(DirectReader, "max_gap", gap)
        with Level1File(path, count_bytes=True) as l1, Level1File(path, direct_reads=False) as hdf5:
            np.testing.assert_array_equal(l1.tod_block(*sel), hdf5.tod_block(*sel))
            counted[gap] = l1.bytes_read_tod  # the box (with the chunk index, the same both times)
    extra = counted[DirectReader.max_gap] - counted[0]
    box = 10 * 270 * 4
    # channels 3…12 touch 4 chunks of 4 channels; samples 120…389 touch 4 chunks of 128
    touched = 4 * 4 * (4 * 128 * 4)
    # inside a chunk, the rows of a box piece are 128 - width samples apart: every such gap is read
    assert 0 < extra <= touched - box
    assert DirectReader.max_gap >= 4096  # a partial 1024-sample row of a COMAP chunk is at most 4 kB


def test_strided_and_filtered_reads_go_through_hdf5(tmp_path):
    path = write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=(1, 1, 4, 128), compression="gzip")
    with Level1File(path) as l1, h5py.File(path, "r", locking=False) as f:
        assert l1._direct_reader() is None
        np.testing.assert_array_equal(l1.tod_block(1), f["spectrometer/tod"][1])
    path = write_level1(tmp_path / "b.hd5", n_tod=N_TOD)
    with Level1File(path) as l1, h5py.File(path, "r", locking=False) as f:
        np.testing.assert_array_equal(
            l1.tod_block(2, None, slice(0, 32, 3), slice(5, 900, 7)),
            f["spectrometer/tod"][2, :, 0:32:3, 5:900:7],
        )


def test_unallocated_chunks_read_the_fill_value(tmp_path):
    """A chunk never written has no storage: the box falls back to HDF5, which returns the fill value."""
    path = tmp_path / NAME
    write_level1(path, n_tod=N_TOD, chunks=(1, 1, 4, 128))
    with h5py.File(path, "a") as f:
        data = f["spectrometer/tod"][...]
        del f["spectrometer/tod"]
        ds = f.create_dataset("spectrometer/tod", shape=data.shape, dtype=np.float32, chunks=(1, 1, 4, 128))
        ds.fillvalue  # noqa: B018 (default 0)
        ds[:2] = data[:2]  # feeds 2… are never written
    with Level1File(path) as l1:
        np.testing.assert_array_equal(l1.tod_block(1), data[1])
        np.testing.assert_array_equal(l1.tod_block(3), np.zeros_like(data[3]))
        assert DirectReader.for_dataset(l1._tod_dataset(), str(path)) is not None


def test_bytes_missing_from_the_file_are_an_error(tmp_path):
    """A box whose bytes lie past the end of the file (a file cut while open) raises, naming the byte."""
    path = write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=None)
    with h5py.File(path, "r") as f:
        shape = f["spectrometer/tod"].shape
    size = int(np.prod(shape)) * 4
    # an index pointing to where the TOD would end 200 bytes past the end of the file
    reader = DirectReader(path, shape, None, os.path.getsize(path) - size + 200)
    out = np.empty((1, N_BANDS, N_CHANNELS, N_TOD), dtype=np.float32)
    try:
        assert reader.read((len(FEEDS) - 2, 0, 0, 0), out.shape, out)  # inside the file: no error
        with pytest.raises(OSError, match="short read"):
            reader.read((len(FEEDS) - 1, 0, 0, 0), out.shape, out)
    finally:
        reader.close()


def test_reads_from_threads_equal_serial_reads_and_counts(tmp_path, monkeypatch):
    """TOD reads from several threads (SystemTemperature reads one feed per thread) give the
    values of serial reads; counting bytes makes them take turns, so the count is exact (runs
    read one by one here, so that the count is the boxes')."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(DirectReader, "max_gap", 0)

    path = write_level1(tmp_path / NAME, n_tod=N_TOD, chunks=(1, 1, 4, 128))
    boxes = [(feed, None, None, slice(100 * feed, 100 * feed + 250)) for feed in range(len(FEEDS))] * 3
    with Level1File(path) as l1:
        serial = [l1.tod_block(*box) for box in boxes]
    for count in (False, True):
        with Level1File(path, count_bytes=count) as l1:
            with ThreadPoolExecutor(max_workers=4) as pool:
                threaded = list(pool.map(lambda box: l1.tod_block(*box), boxes))
            for a, b in zip(serial, threaded):
                np.testing.assert_array_equal(a, b)
            if count:
                values = sum(a.size for a in serial) * 4
                assert values <= l1.bytes_read_tod < values + 20_000  # the boxes plus the chunk index
