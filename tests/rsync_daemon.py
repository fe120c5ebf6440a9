"""A loopback ``rsync --daemon`` for the acquisition tests (docs/acquisition.md#tests), and wrapper-``rsync``
helpers.

``start_rsync_daemon(path, work_dir)`` writes an ``rsyncd.conf`` with module ``[comap]``
(``path = <path>``, ``read only = yes``, ``use chroot = no``, ``uid``/``gid`` = the current user —
CI runs as root and the default ``nobody`` could not read a temporary directory), picks a free port
by binding port 0 on 127.0.0.1, starts ``rsync --daemon --no-detach --address=127.0.0.1
--port=PORT --config=FILE``, waits at most 10 s until the port accepts connections, and at exit
terminates **that pid**.

``write_wrapper(bin_dir, body)`` puts an executable ``rsync`` shell script on a private ``PATH``
directory; ``$REAL_RSYNC`` in ``body`` is the real executable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REAL_RSYNC = shutil.which("rsync")
SKIP_REASON = "rsync is not installed (CI installs it: apt-get install rsync)"
needs_rsync = pytest.mark.skipif(REAL_RSYNC is None, reason=SKIP_REASON)


@dataclass
class RsyncDaemon:
    """A running daemon: ``url`` is ``rsync://127.0.0.1:PORT/comap/``."""

    port: int
    pid: int
    config: Path
    url: str


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rsync daemon exited with status {proc.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"rsync daemon did not accept connections on port {port} within {timeout_s:g} s")


@contextlib.contextmanager
def start_rsync_daemon(path: str | os.PathLike, work_dir: str | os.PathLike) -> Iterator[RsyncDaemon]:
    """Serve ``path`` read-only as module ``comap`` on 127.0.0.1; skip the test if rsync is absent."""
    if REAL_RSYNC is None:
        pytest.skip(SKIP_REASON)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "rsyncd.conf"
    config.write_text(
        f"pid file = {work / 'rsyncd.pid'}\n"
        f"log file = {work / 'rsyncd.log'}\n"
        "[comap]\n"
        f"    path = {Path(path).resolve()}\n"
        "    read only = yes\n"
        "    use chroot = no\n"
        f"    uid = {os.getuid()}\n"
        f"    gid = {os.getgid()}\n"
    )
    last_error: Exception | None = None
    for _ in range(3):  # the port could be taken between probing and binding
        port = free_port()
        proc = subprocess.Popen(
            [
                REAL_RSYNC,
                "--daemon",
                "--no-detach",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--config={config}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_for_port(port, proc)
        except RuntimeError as exc:
            last_error = exc
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=10)
            continue
        try:
            yield RsyncDaemon(port=port, pid=proc.pid, config=config, url=f"rsync://127.0.0.1:{port}/comap/")
        finally:
            proc.terminate()  # that pid only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait(timeout=10)
        return
    raise RuntimeError(f"cannot start the rsync daemon: {last_error}")


def write_wrapper(bin_dir: str | os.PathLike, body: str) -> Path:
    """Write an executable ``rsync`` script into ``bin_dir``; ``$REAL_RSYNC`` is the real one."""
    d = Path(bin_dir)
    d.mkdir(parents=True, exist_ok=True)
    script = d / "rsync"
    script.write_text(f'#!/bin/sh\nREAL_RSYNC="{REAL_RSYNC}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script
