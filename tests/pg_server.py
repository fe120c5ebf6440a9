"""A throw-away PostgreSQL server for the database tests (docs/developer.md#postgresql-in-the-tests).

One server per test session: ``initdb`` into a temporary directory, ``postgres`` listening on
127.0.0.1 at a free port with its socket in that directory, durability switched off (the data are
thrown away). Each test gets a fresh database (:meth:`PostgresServer.new_database`). As root
(CI), ``initdb`` and ``postgres`` refuse to run, so both are started through
``runuser -u postgres --`` and the directory is handed to that user.

The server binaries are looked up in ``COMAP_PG_BINDIR``, then ``/usr/lib/postgresql/<version>/bin``
(Debian's ``postgresql`` package; newest version first), then ``PATH``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Settings of a disposable server: no fsync, few connections, small memory.
_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "60",
    "shared_buffers": "16MB",
    "deadlock_timeout": "100ms",
    "log_min_messages": "warning",
}


class ServerUnavailable(RuntimeError):
    """The PostgreSQL binaries, the driver or the ``postgres`` user are missing."""


def find_bindir() -> Path:
    """Directory holding ``initdb`` and ``postgres``; raises :class:`ServerUnavailable`."""
    env = os.environ.get("COMAP_PG_BINDIR")
    candidates = [Path(env)] if env else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            return d
    raise ServerUnavailable("no initdb/postgres (install Debian's postgresql or set COMAP_PG_BINDIR)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One running ``postgres`` process and its data directory.

    Attributes
    ----------
    port : int
        TCP port on 127.0.0.1.
    root : pathlib.Path
        Temporary directory (data directory ``root/data``, socket directory ``root``).
    """

    def __init__(self) -> None:
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise ServerUnavailable(
                f"psycopg is not installed ({exc}); pip install -e '.[postgres]'"
            ) from None
        self.bindir = find_bindir()
        self._as_user: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="comap-pg-"))
        if os.geteuid() == 0:
            try:
                import pwd

                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                raise ServerUnavailable("running as root but there is no 'postgres' user") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._counter = 0

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout_s: float = 30.0) -> PostgresServer:
        """Run ``initdb`` and start the server; return when it accepts connections."""
        try:
            subprocess.run(
                [
                    *self._as_user,
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise RuntimeError(f"initdb failed: {exc.stderr.strip()}") from None
        self.port = _free_port()
        cmd = [*self._as_user, str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.root)]
        cmd += ["-h", "127.0.0.1", "-p", str(self.port)]
        for key, value in _SERVER_SETTINGS.items():
            cmd += ["-c", f"{key}={value}"]
        self._log = open(self.root / "server.log", "wb")  # closed in stop()
        # Own process group: stop() can end runuser and postgres together, and a Ctrl-C of the
        # test run does not reach the server before stop() does.
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.connect_admin():
                    return self
            except Exception as exc:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start ({exc}):\n{log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then SIGKILL) and delete its directory."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # postgres: fast shutdown
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ databases
    def connect_admin(self, dbname: str = "postgres", **kw):
        """A psycopg connection as the superuser (autocommit)."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, autocommit=True, **kw
        )

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL of database ``dbname``."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self, prefix: str = "test") -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        with self.connect_admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by :meth:`new_database`, ending its remaining connections."""
        name = url.rsplit("/", 1)[1]
        with self.connect_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
