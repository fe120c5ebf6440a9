"""Tests of ``utils.h5io``: RetryH5PY (docs/formats/level1.md#opening-files-robustly) and the small HDF5
helpers."""

from __future__ import annotations

import errno
import logging
import os
import pickle

import h5py
import numpy as np
import pytest

from utils import h5io
from utils.errors import BadCOMAPFile
from utils.h5io import H5OpenError, RetryH5PY, is_transient, read_str_attr, to_python, to_str

LOGGER = "comap.h5io"


class FixedRNG:
    """Stands in for ``random.Random``: returns the given fractions of [a, b] in turn."""

    def __init__(self, *fractions: float) -> None:
        self.fractions = list(fractions)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        frac = self.fractions[(len(self.calls) - 1) % len(self.fractions)]
        return a + frac * (b - a)


@pytest.fixture
def h5file(tmp_path) -> str:
    path = os.fspath(tmp_path / "small.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(5)
        f.attrs["fixed"] = np.bytes_(b"TauA")
        f.attrs["vlen"] = "GField30"
        f.attrs["number"] = np.int32(7)
    return path


@pytest.fixture
def flaky(monkeypatch):
    """Make ``h5py.File`` raise the given errors first, then open for real; record the calls."""
    real = h5py.File
    state: dict = {"errors": [], "calls": 0}

    def fake(*args, **kwargs):
        state["calls"] += 1
        if state["errors"]:
            raise state["errors"].pop(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(h5py, "File", fake)
    return state


@pytest.fixture
def no_sleep(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(h5io, "sleep", slept.append)
    return slept


def test_opens_normally(h5file, no_sleep):
    with RetryH5PY(h5file, "r", locking=False) as f:
        assert f["x"][...].tolist() == [0, 1, 2, 3, 4]
        handle = f
    assert not handle.id.valid  # closed on exit
    assert no_sleep == []


def test_write_mode_and_kwargs(tmp_path):
    path = tmp_path / "new.h5"
    with RetryH5PY(path, "w", rdcc_nbytes=2**20) as f:
        f["y"] = [1.0]
    with RetryH5PY(path, "a") as f:
        f["y"][0] = 2.0
    with RetryH5PY(path) as f:
        assert f["y"][0] == 2.0


def test_transient_errors_are_retried_with_backoff(h5file, flaky, no_sleep, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    flaky["errors"] = [OSError(errno.EAGAIN, "Resource temporarily unavailable")] * 2
    rng = FixedRNG(0.0, 1.0)  # factor 1 - jitter, then 1 + jitter
    mgr = RetryH5PY(h5file, "r", retry_delay_s=0.5, backoff_factor=3.0, jitter=0.2, rng=rng)
    with mgr as f:
        assert f["x"].shape == (5,)
    assert flaky["calls"] == 3 and mgr.attempts == 3
    assert no_sleep == pytest.approx([0.5 * 0.8, 0.5 * 3.0 * 1.2])
    assert mgr.delays == no_sleep
    assert rng.calls == [(0.8, 1.2), (0.8, 1.2)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 2
    assert h5file in warnings[0].getMessage() and "attempt 1 of 6" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "exc",
    [
        BlockingIOError(errno.EAGAIN, "locked"),
        OSError(errno.EBUSY, "busy"),
        OSError(errno.ESTALE, "stale NFS file handle"),
        OSError(errno.ETIMEDOUT, "timed out"),
        OSError("Unable to synchronously open file (unable to lock file, errno = 11)"),
    ],
    ids=["blocking", "ebusy", "estale", "etimedout", "lock-text"],
)
def test_each_transient_kind(h5file, flaky, no_sleep, exc):
    assert is_transient(exc)
    flaky["errors"] = [exc]
    with RetryH5PY(h5file, "r") as f:
        assert "x" in f
    assert flaky["calls"] == 2 and len(no_sleep) == 1


def test_default_delays_cap_near_31_seconds(h5file, flaky, no_sleep):
    flaky["errors"] = [BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")] * 100
    with pytest.raises(H5OpenError) as info:
        RetryH5PY(h5file, rng=FixedRNG(0.5)).open()
    assert no_sleep == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0])  # jitter factor 1 at the midpoint
    assert sum(no_sleep) == pytest.approx(31.0)
    assert flaky["calls"] == 6
    assert str(info.value) == (
        f"cannot open {h5file} after 6 attempts: [Errno 11] Resource temporarily unavailable"
    )
    assert isinstance(info.value, BadCOMAPFile) and info.value.attempts == 6


def test_jitter_stays_in_range(h5file, flaky, no_sleep):
    flaky["errors"] = [OSError(errno.EBUSY, "busy")] * 10
    with pytest.raises(BadCOMAPFile):
        RetryH5PY(h5file, max_retries=4, retry_delay_s=1.0, backoff_factor=2.0, jitter=0.3).open()
    for k, d in enumerate(no_sleep):
        assert 0.7 * 2**k <= d <= 1.3 * 2**k


def test_gives_up_after_max_retries(h5file, flaky, no_sleep):
    flaky["errors"] = [OSError(errno.EAGAIN, "try again")] * 10
    with pytest.raises(BadCOMAPFile) as info:
        with RetryH5PY(h5file, "r", max_retries=2):
            pass
    assert info.value.message == f"cannot open {h5file} after 3 attempts: [Errno 11] try again"
    assert flaky["calls"] == 3 and len(no_sleep) == 2


def test_max_retries_zero(h5file, flaky, no_sleep):
    flaky["errors"] = [OSError(errno.EAGAIN, "try again")]
    with pytest.raises(BadCOMAPFile, match="after 1 attempts"):
        RetryH5PY(h5file, max_retries=0).open()
    assert no_sleep == []


def test_non_transient_error_fails_at_once(h5file, flaky, no_sleep):
    flaky["errors"] = [OSError("Unable to synchronously open file (file signature not found)")]
    with pytest.raises(H5OpenError) as info:
        RetryH5PY(h5file).open()
    assert flaky["calls"] == 1 and no_sleep == []
    assert info.value.message == (
        f"cannot open {h5file}: Unable to synchronously open file (file signature not found)"
    )
    assert info.value.attempts == 1 and info.value.path == h5file


def test_real_missing_and_bad_files(tmp_path, no_sleep):
    missing = os.fspath(tmp_path / "missing.h5")
    with pytest.raises(BadCOMAPFile) as info:
        RetryH5PY(missing).open()
    assert info.value.message.startswith(f"cannot open {missing}: [Errno 2] ")
    assert "\n" not in info.value.message

    text = tmp_path / "text.h5"
    text.write_text("not hdf5\nat all\n")
    with pytest.raises(BadCOMAPFile, match=r"file signature not found"):
        RetryH5PY(text).open()
    assert no_sleep == []


def test_non_oserror_is_not_retried(h5file, flaky, no_sleep):
    flaky["errors"] = [ValueError("Invalid mode; must be one of r, r+, w, w-, x, a")]
    with pytest.raises(BadCOMAPFile, match="Invalid mode"):
        RetryH5PY(h5file, "q").open()
    assert no_sleep == []


def test_instance_sleep_overrides_module_hook(h5file, flaky, no_sleep):
    mine: list[float] = []
    flaky["errors"] = [OSError(errno.EAGAIN, "again")]
    with RetryH5PY(h5file, sleep=mine.append, jitter=0.0):
        pass
    assert mine == [1.0] and no_sleep == []


def test_error_pickles(h5file, flaky, no_sleep):
    flaky["errors"] = [OSError("nope")]
    with pytest.raises(H5OpenError) as info:
        RetryH5PY(h5file).open()
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is H5OpenError and back.message == info.value.message and back.attempts == 1


def test_argument_checks():
    with pytest.raises(ValueError):
        RetryH5PY("x", max_retries=-1)
    with pytest.raises(ValueError):
        RetryH5PY("x", jitter=1.5)


def test_file_object(h5file):
    with open(h5file, "rb") as fh, RetryH5PY(fh, "r") as f:
        assert f["x"][2] == 2


def test_string_helpers(h5file):
    with RetryH5PY(h5file, locking=False) as f:
        assert read_str_attr(f, "fixed") == "TauA"
        assert read_str_attr(f, "vlen") == "GField30"
        assert read_str_attr(f, "absent") is None
        assert read_str_attr(f, "absent", "") == ""
        assert read_str_attr(f, "number") == "7"
    assert to_str(b"ab") == "ab" and to_str(np.bytes_(b"cd")) == "cd" and to_str("ef") == "ef"
    assert to_str(np.array(b"gh")) == "gh"
    assert to_python(np.int32(3)) == 3 and type(to_python(np.int32(3))) is int
    assert type(to_python(np.float64(0.5))) is float
    assert to_python(np.array([b"A:LSB", b"A:USB"], dtype="S8")) == ["A:LSB", "A:USB"]
    assert to_python(np.array([1, 2])) == [1, 2]
    assert to_python(np.array(4)) == 4


# --------------------------------------------------------------------------------------------------
# Reads retried (docs/reliability.md#transient-io-errors-and-full-disks)
# --------------------------------------------------------------------------------------------------
def test_retry_transient_retries_then_returns(no_sleep, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    calls, reopened = [], []

    def read():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.ESTALE, "Can't synchronously read data (file read failed: errno = 116, …)")
        return "data"

    got = h5io.retry_transient(
        read, "reading x of f.h5", before_retry=lambda: reopened.append(1), rng=FixedRNG(0.5)
    )
    assert got == "data" and len(calls) == 3 and len(reopened) == 2
    assert no_sleep == pytest.approx([1.0, 2.0])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    stale = "[Errno 116] Stale file handle"
    assert warnings == [
        f"transient error reading x of f.h5 (attempt 1 of 6): {stale}; retrying in 1.00 s",
        f"transient error reading x of f.h5 (attempt 2 of 6): {stale}; retrying in 2.00 s",
    ]


def test_retry_transient_gives_up_with_one_line_and_lets_other_errors_through(no_sleep):
    def stale():
        raise OSError(errno.ESTALE, "stale")

    with pytest.raises(h5io.TransientIOError) as info:
        h5io.retry_transient(stale, "reading x of f.h5", max_retries=2)
    assert str(info.value) == "reading x of f.h5: failed 3 times: [Errno 116] Stale file handle"
    assert info.value.attempts == 3 and len(no_sleep) == 2
    assert isinstance(info.value, BadCOMAPFile) and pickle.loads(pickle.dumps(info.value)).attempts == 3
    eio = OSError(errno.EIO, "Input/output error")

    def broken():
        raise eio

    with pytest.raises(OSError) as info2:
        h5io.retry_transient(broken, "reading x of f.h5")
    assert info2.value is eio and len(no_sleep) == 2  # not retried, unchanged


# --------------------------------------------------------------------------------------------------
# Full disks (docs/reliability.md#transient-io-errors-and-full-disks)
# --------------------------------------------------------------------------------------------------
def test_full_disk_while_writing_raises_enospc_at_the_end_of_the_block(tmp_path, monkeypatch):
    """ENOSPC after the first 64 kB written: HDF5 never sees it (it would crash on close), the block
    ends with OSError(ENOSPC) naming the file. The real full file system is in
    tests/reliability/test_transient_io.py."""
    real_pwrite, written = os.pwrite, [0]

    def pwrite(fd, data, offset):
        if written[0] + len(data) > 65536:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written[0] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "l2.h5"
    with pytest.raises(OSError) as info:
        with RetryH5PY(path, "a") as f:
            for i in range(20):
                f.create_dataset(f"d{i}", data=np.zeros(4096))
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    monkeypatch.undo()
    path.unlink()  # the caller removes the incomplete file (a level-2 staging file is discarded)
    with RetryH5PY(path, "a") as f:
        f["x"] = [1]
    with RetryH5PY(tmp_path / "ok.h5", "w") as f:
        f["y"] = np.arange(3)
    with RetryH5PY(tmp_path / "ok.h5", "a") as f:
        assert f["y"][2] == 2
        f["y"][0] = 5
    with RetryH5PY(tmp_path / "ok.h5") as f:
        assert f["y"][...].tolist() == [5, 1, 2]
