"""Staging files and atomic publish (docs/level2.md#processing-one-observation, docs/operations.md#error-model
rule 5)."""

from __future__ import annotations

import os
import sys

import psutil

from modules.pipeline_control import jobs


def test_staging_name_is_hidden_and_owned(tmp_path):
    final = tmp_path / "Level2_comap-0060001-2026-03-01-000000.hd5"
    st = jobs.staging_path(final, host="h", pid=12)
    assert st.parent == tmp_path
    assert st.name == ".Level2_comap-0060001-2026-03-01-000000.hd5.partial-h-12"


def test_prepare_removes_old_staging_and_copies_published(tmp_path):
    final = tmp_path / "sub" / "Level2_x.hd5"
    final.parent.mkdir()
    final.write_bytes(b"published")
    stale = jobs.staging_path(final, host="other", pid=1)
    stale.write_bytes(b"half-written")
    st = jobs.prepare_staging(final, start_from_published=True)
    assert not stale.exists()
    assert st.read_bytes() == b"published"
    assert final.read_bytes() == b"published"


def test_prepare_from_scratch_leaves_no_file(tmp_path):
    final = tmp_path / "Level2_x.hd5"
    final.write_bytes(b"published")
    st = jobs.prepare_staging(final, start_from_published=False)
    assert not st.exists()


def test_publish_replaces_atomically(tmp_path):
    final = tmp_path / "Level2_x.hd5"
    final.write_bytes(b"old")
    st = jobs.staging_path(final)
    st.write_bytes(b"new")
    inode_new = os.stat(st).st_ino
    jobs.publish(st, final)
    assert final.read_bytes() == b"new" and not st.exists()
    assert os.stat(final).st_ino == inode_new
    assert jobs.staging_files(final) == []


def test_discard_is_safe(tmp_path):
    st = tmp_path / ".x.partial-h-1"
    st.write_bytes(b"x")
    jobs.discard(st)
    jobs.discard(st)
    jobs.discard(None)
    assert not st.exists()


def test_pid_alive_counts_a_zombie_as_dead():
    """A killed owner whose parent died with it lingers as a zombie until init reaps it (which some
    container inits never do): its jobs and partial files must still be taken over."""
    import subprocess
    import time

    from utils.processes import pid_alive

    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
