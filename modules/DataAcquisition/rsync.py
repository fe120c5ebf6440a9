"""rsync plumbing shared by the acquisition stages (docs/acquisition.md#remote-specification,
docs/acquisition.md#remote-listing, docs/acquisition.md#download, docs/acquisition.md#security-rules).

Everything that touches a remote-derived string lives here:

* :func:`parse_remote` / :func:`validate_remote` — the three remote forms (local directory,
  ``[user@]host:path`` over ssh, ``rsync://host[:port]/module[/path]``), validated at config load;
* :func:`validate_ssh_command` — the ``-e`` argument, tokenised by rsync itself;
* :func:`listing_command`, :func:`transfer_command`, :func:`fetch_command` — argument lists for
  ``subprocess`` with ``shell=False`` and ``--`` before the positional paths;
* :func:`parse_listing` and :func:`validate_relpath` — the ``--list-only`` parser;
* :func:`list_remote` — one listing invocation (or an ``os.scandir`` walk of a local directory
  when rsync is absent);
* :func:`fetch_index`, :func:`parse_index`, :func:`join_index` — the optional remote index;
* :func:`run_transfer` — one rsync transfer process, streaming ``--out-format=%n`` lines;
* :func:`python_copy_file` — the verified Python copy used when rsync is absent (docs/acquisition.md#download
  item 5).

Nothing here deletes anything on the remote side, stores credentials or uses a shell.
"""

from __future__ import annotations

import csv
import datetime as _dt
import fnmatch
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modules.SQLModule.source_groups import classify
from utils.constants import obsid_from_level1_name

log = logging.getLogger("comap.rsync")

__all__ = [
    "CONNECTION_EXIT_CODES",
    "DEFAULT_SSH_COMMAND",
    "INCLUDE_ARGS",
    "INSTALL_HINT",
    "LISTING_RE",
    "PARTIAL_EXIT_CODES",
    "IndexRow",
    "Listing",
    "Remote",
    "RemoteError",
    "RemoteFile",
    "TransferOutcome",
    "fetch_command",
    "fetch_index",
    "find_rsync",
    "join_index",
    "last_line",
    "list_local_python",
    "list_remote",
    "listing_command",
    "parse_index",
    "parse_listing",
    "parse_remote",
    "python_copy_file",
    "run_transfer",
    "rsync_env",
    "transfer_command",
    "validate_index_relpath",
    "validate_relpath",
    "validate_remote",
    "validate_ssh_command",
]

DEFAULT_SSH_COMMAND: str = "ssh -o BatchMode=yes -o ConnectTimeout=20"
"""``ssh_command`` default: the user's agent or keys, never a password prompt
(docs/acquisition.md#security-rules rule 5)."""

INSTALL_HINT: str = (
    "rsync not found on PATH; install it (apt-get install rsync, conda install rsync or brew install rsync)"
)

INCLUDE_ARGS: tuple[str, ...] = ("--include=*/", "--include=comap-*.hd5", "--exclude=*")
"""Filter rules of the listing: every directory, level-1 names, nothing else."""

LEVEL1_GLOB: str = "comap-*.hd5"

LISTING_RE = re.compile(
    r"^([-dlcbps][-rwxsStT]{9})\s+([\d,]+)\s+(\d{4}/\d{2}/\d{2})\s+(\d{2}:\d{2}:\d{2})\s+(.+)$"
)
"""One ``rsync --list-only`` line: mode, size (digit groups allowed), date, time, path
(docs/acquisition.md#remote-listing)."""

_COMPONENT_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
_SSH_HOST_RE = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9.-]+$")
_DAEMON_RE = re.compile(
    r"^rsync://(?P<host>[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?/(?P<module>[^/]+)(?P<path>/.*)?$"
)
_FORBIDDEN = frozenset(";|&$`<>\n")

CONNECTION_EXIT_CODES: frozenset[int] = frozenset({5, 10, 12, 30, 35})
"""rsync exit codes for connection, protocol-startup, data-stream and timeout errors."""
PARTIAL_EXIT_CODES: frozenset[int] = frozenset({23, 24})
"""Partial transfer (23) and vanished source files (24): verify what arrived, retry the rest once."""


class RemoteError(Exception):
    """A one-line failure talking to the remote (listing, index fetch, missing rsync)."""


# ------------------------------------------------------------------------------------------------
# Remote specification (docs/acquisition.md#remote-specification)
# ------------------------------------------------------------------------------------------------


def _bad_character(text: str) -> str | None:
    """Describe the first control or shell-special character of ``text``, or None."""
    for ch in text:
        if ch in _FORBIDDEN or ord(ch) < 32 or ord(ch) == 127:
            return repr(ch)
    return None


@dataclass(frozen=True)
class Remote:
    """A validated remote.

    Attributes
    ----------
    text : str
        The remote as configured (used in messages).
    kind : {'local', 'ssh', 'daemon'}
    root : str
        The transfer root as passed to rsync, always ending in ``/``: an absolute directory for a
        local remote, ``[user@]host:path/`` or ``rsync://host[:port]/module[/path]/``.
    local_path : pathlib.Path or None
        Absolute directory of a local remote.
    host : str or None
        ``[user@]host`` (ssh) or ``host[:port]`` (daemon).
    """

    text: str
    kind: str
    root: str
    local_path: Path | None = None
    host: str | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"


def _classify_remote(text: str) -> str:
    if text.startswith("rsync://"):
        return "daemon"
    head = text.split("/", 1)[0]
    if ":" in head:
        return "ssh"
    return "local"


def parse_remote(text: str, *, check_exists: bool = True) -> Remote:
    """Validate ``text`` as one of the three remote forms and return a :class:`Remote`.

    Parameters
    ----------
    text : str
        ``demo/remote/`` (local directory, relative or absolute), ``[user@]host:path`` (ssh) or
        ``rsync://host[:port]/module[/path]`` (rsync daemon).
    check_exists : bool
        Require a local directory to exist.

    Raises
    ------
    ValueError
        One-line reason naming the remote (docs/acquisition.md#remote-specification).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("remote is empty")
    bad = _bad_character(text)
    if bad is not None:
        raise ValueError(f"remote {text!r} contains the forbidden character {bad}")
    kind = _classify_remote(text)
    if kind == "daemon":
        m = _DAEMON_RE.match(text)
        if m is None:
            raise ValueError(f"remote {text!r} is not of the form rsync://host[:port]/module[/path]")
        port = m.group("port")
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"remote {text!r} has an invalid port {port}")
        host = m.group("host") + (f":{port}" if port else "")
        path = (m.group("path") or "").strip("/")
        root = f"rsync://{host}/{m.group('module')}/" + (f"{path}/" if path else "")
        return Remote(text=text, kind="daemon", root=root, host=host)
    if kind == "ssh":
        host, _, path = text.partition(":")
        if path.startswith(":"):
            raise ValueError(f"remote {text!r} uses the host::module form; write rsync://host/module/path")
        if host.startswith("-") or not _SSH_HOST_RE.match(host):
            raise ValueError(
                f"remote {text!r}: ssh host {host!r} must match [user@]host and not start with '-'"
            )
        path = path.rstrip("/")
        root = f"{host}:{path}/" if path else f"{host}:./"
        return Remote(text=text, kind="ssh", root=root, host=host)
    local = Path(text).expanduser()
    if check_exists and not local.is_dir():
        raise ValueError(f"remote directory {text} does not exist")
    absolute = Path(os.path.abspath(local))
    return Remote(text=text, kind="local", root=str(absolute).rstrip("/") + "/", local_path=absolute)


def validate_remote(text: Any, *, check_exists: bool = True) -> list[str]:
    """Problems with ``text`` as a remote (empty list if valid); see :func:`parse_remote`."""
    try:
        parse_remote(text, check_exists=check_exists)
    except ValueError as exc:
        return [str(exc)]
    return []


def validate_ssh_command(command: Any) -> list[str]:
    """Problems with ``ssh_command`` (it is passed to rsync as the single ``-e`` argument)."""
    if not isinstance(command, str) or not command.strip():
        return ["ssh_command must be a non-empty string"]
    try:
        tokens = shlex.split(command)
    except ValueError as exc:
        return [f"ssh_command {command!r} cannot be split into tokens: {exc}"]
    problems = []
    for tok in tokens:
        bad = _bad_character(tok)
        if bad is not None:
            problems.append(f"ssh_command token {tok!r} contains the forbidden character {bad}")
    return problems


# ------------------------------------------------------------------------------------------------
# Relative paths and the listing (docs/acquisition.md#remote-listing)
# ------------------------------------------------------------------------------------------------


def validate_index_relpath(p: str) -> str | None:
    """Reason why ``p`` is not a safe relative path (components only), or None."""
    if not p:
        return "empty path"
    if p.startswith("/"):
        return "absolute path"
    for comp in p.split("/"):
        if comp in ("", ".", ".."):
            return "empty, '.' or '..' component"
        if comp.startswith("-"):
            return "component starting with '-'"
        if not _COMPONENT_RE.match(comp):
            return "component with characters outside [A-Za-z0-9._+-]"
    return None


def validate_relpath(p: str) -> str | None:
    """Reason why a listed path must be rejected, or None if it is acceptable
    (docs/acquisition.md#remote-listing).

    A path is rejected if it is absolute; if it has an empty, ``.`` or ``..`` component; if a
    component does not match ``^[A-Za-z0-9._+-]+$`` or starts with ``-``; or if its base name is
    not a level-1 name (``comap-<7 digits>-<YYYY-MM-DD>-<HHMMSS>.hd5``).

    Returns
    -------
    str or None
        A short reason, also used as the rejection category in reports.
    """
    reason = validate_index_relpath(p)
    if reason is not None:
        return reason
    if obsid_from_level1_name(p.rsplit("/", 1)[-1]) is None:
        return "not a level-1 file name"
    return None


@dataclass(frozen=True)
class RemoteFile:
    """One level-1 file of the remote listing.

    Attributes
    ----------
    relpath : str
        Path relative to the remote root (``/``-separated, validated).
    size_bytes : int
        Listed size, bytes.
    mtime_utc : datetime or None
        Listed modification time (UTC).
    obsid : int
        From the file name.
    source, comment, source_group : str or None
        From the remote index, when one is configured.
    """

    relpath: str
    size_bytes: int
    mtime_utc: _dt.datetime | None
    obsid: int
    source: str | None = None
    comment: str | None = None
    source_group: str | None = None

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


@dataclass
class Listing:
    """Result of a remote listing.

    Attributes
    ----------
    files : list of RemoteFile
        Accepted regular files, sorted by relative path.
    rejected : list of (str, str)
        ``(listed path, reason)`` of entries refused by :func:`validate_relpath`.
    ignored : int
        Symlinks, devices and other non-regular entries (directories are not counted).
    """

    files: list[RemoteFile] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0


def _add_entry(listing: Listing, path: str, size: int, mtime: _dt.datetime | None) -> None:
    reason = validate_relpath(path)
    if reason is not None:
        listing.rejected.append((path, reason))
        return
    obsid = obsid_from_level1_name(path.rsplit("/", 1)[-1])
    assert obsid is not None
    listing.files.append(RemoteFile(relpath=path, size_bytes=size, mtime_utc=mtime, obsid=obsid))


def parse_listing(text: str) -> Listing:
    """Parse ``rsync --list-only`` output (docs/acquisition.md#remote-listing).

    Only regular files (mode starting with ``-``) are kept; symlinks, devices and other entries are
    ignored with a DEBUG line. Sizes may contain digit-grouping commas. Times are read as UTC (the
    listing runs with ``TZ=UTC``). Each kept path goes through :func:`validate_relpath`.
    """
    listing = Listing()
    for raw in text.splitlines():
        line = raw.rstrip("\r\n")
        m = LISTING_RE.match(line)
        if m is None:
            if line.strip():
                log.debug("listing: unparsed line %r", line)
            continue
        mode, size_text, date, time, path = m.groups()
        if mode[0] != "-":
            if mode[0] != "d":
                listing.ignored += 1
                log.debug("listing: ignoring non-regular entry %r (mode %s)", path, mode)
            continue
        try:
            mtime = _dt.datetime.strptime(f"{date} {time}", "%Y/%m/%d %H:%M:%S").replace(tzinfo=_dt.UTC)
        except ValueError:
            mtime = None
        _add_entry(listing, path, int(size_text.replace(",", "")), mtime)
    listing.files.sort(key=lambda f: f.relpath)
    return listing


def list_local_python(root: str | os.PathLike) -> Listing:
    """List a local directory in Python (rsync absent): regular files named ``comap-*.hd5``.

    The walk uses ``os.scandir``, does not follow symbolic links and applies the same include
    patterns and path validation as the rsync listing.
    """
    base = Path(root)
    listing = Listing()
    stack: list[tuple[Path, str]] = [(base, "")]
    while stack:
        directory, prefix = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            raise RemoteError(f"cannot list {directory}: {exc.strerror or exc}") from None
        for e in entries:
            rel = f"{prefix}{e.name}"
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append((Path(e.path), rel + "/"))
                    continue
                if not fnmatch.fnmatchcase(e.name, LEVEL1_GLOB):
                    continue
                if not e.is_file(follow_symlinks=False):
                    listing.ignored += 1
                    log.debug("listing: ignoring non-regular entry %r", rel)
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError as exc:
                log.debug("listing: cannot stat %s: %s", rel, exc)
                continue
            mtime = _dt.datetime.fromtimestamp(int(st.st_mtime), tz=_dt.UTC)
            _add_entry(listing, rel, int(st.st_size), mtime)
    listing.files.sort(key=lambda f: f.relpath)
    return listing


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def find_rsync() -> str | None:
    """The rsync executable on ``PATH``, or None."""
    return shutil.which("rsync")


def rsync_env() -> dict[str, str]:
    """Environment of rsync processes: ``TZ=UTC`` (listing times in UTC) and the C locale (``,``
    digit grouping, untranslated messages)."""
    env = dict(os.environ)
    env["TZ"] = "UTC"
    env["LC_ALL"] = "C"
    env.pop("RSYNC_RSH", None)  # the transport is only ever what -e says
    return env


def _ssh_args(remote: Remote, ssh_command: str) -> list[str]:
    return ["-e", ssh_command] if remote.kind == "ssh" else []


def listing_command(rsync: str, remote: Remote, ssh_command: str = DEFAULT_SSH_COMMAND) -> list[str]:
    """Arguments of the single listing invocation (docs/acquisition.md#remote-listing)."""
    return [
        rsync,
        "--list-only",
        "--recursive",
        "--protect-args",
        "--no-human-readable",
        *INCLUDE_ARGS,
        *_ssh_args(remote, ssh_command),
        "--",
        remote.root,
    ]


def transfer_command(
    rsync: str,
    *,
    files_from: str | os.PathLike,
    remote: Remote,
    local_dir: str | os.PathLike,
    partial_dir: str = ".rsync-partial",
    timeout_s: int = 300,
    file_mode: str = "F664,D775",
    bwlimit_kbps: int | None = None,
    dry_run: bool = False,
    ssh_command: str = DEFAULT_SSH_COMMAND,
) -> list[str]:
    """Arguments of one batch transfer (docs/acquisition.md#download item 2).

    ``--bwlimit`` is present exactly when ``bwlimit_kbps`` is set, ``--dry-run`` exactly when
    ``dry_run``, and ``-e SSH_COMMAND`` (one argument) exactly for ssh remotes. ``-L`` and
    owner/group preservation are never used.
    """
    args = [
        rsync,
        f"--files-from={os.fspath(files_from)}",
        "--times",
        "--perms",
        "--protect-args",
        "--no-human-readable",
        f"--partial-dir={partial_dir}",
        f"--timeout={int(timeout_s)}",
        f"--chmod={file_mode}",
    ]
    if bwlimit_kbps is not None:
        args.append(f"--bwlimit={int(bwlimit_kbps)}")
    if dry_run:
        args.append("--dry-run")
    args.append("--out-format=%n")
    args += _ssh_args(remote, ssh_command)
    args += ["--", remote.root, os.path.abspath(os.fspath(local_dir)).rstrip("/") + "/"]
    return args


def fetch_command(
    rsync: str,
    remote: Remote,
    relpath: str,
    dest_dir: str | os.PathLike,
    *,
    timeout_s: int = 300,
    ssh_command: str = DEFAULT_SSH_COMMAND,
) -> list[str]:
    """Arguments fetching one file (the remote index) into ``dest_dir``."""
    return [
        rsync,
        "--protect-args",
        "--no-human-readable",
        f"--timeout={int(timeout_s)}",
        *_ssh_args(remote, ssh_command),
        "--",
        remote.root + relpath,
        os.fspath(dest_dir).rstrip("/") + "/",
    ]


def last_line(text: str | bytes | None) -> str:
    """The last non-empty line of ``text`` (stderr), stripped; ``''`` if none."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


Runner = Callable[..., subprocess.CompletedProcess]


def _run_captured(runner: Runner, cmd: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run a short rsync command (listing, index fetch) with text output captured and no stdin."""
    return runner(
        cmd,
        shell=False,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        env=rsync_env(),
        stdin=subprocess.DEVNULL,
    )


def list_remote(
    remote: Remote,
    *,
    ssh_command: str = DEFAULT_SSH_COMMAND,
    timeout_s: float = 600.0,
    rsync: str | None = None,
    runner: Runner = subprocess.run,
) -> Listing:
    """List the remote archive (one rsync invocation, or a Python walk of a local directory).

    Parameters
    ----------
    remote : Remote
    ssh_command : str
        ``-e`` argument for ssh remotes.
    timeout_s : float
        Subprocess timeout of the listing, s.
    rsync : str or None
        The rsync executable; None lists a local remote in Python and raises for ssh/daemon.
    runner : callable
        ``subprocess.run`` (injectable for tests).

    Raises
    ------
    RemoteError
        ``cannot list <remote>: rsync exit <code>: <last stderr line>`` (or the install hint).
    """
    if rsync is None:
        if not remote.is_local:
            raise RemoteError(INSTALL_HINT)
        assert remote.local_path is not None
        return list_local_python(remote.local_path)
    cmd = listing_command(rsync, remote, ssh_command)
    log.debug("listing: %s", cmd)
    try:
        proc = _run_captured(runner, cmd, timeout_s)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"cannot list {remote.text}: rsync timed out after {timeout_s:g} s") from None
    except OSError as exc:
        raise RemoteError(f"cannot list {remote.text}: cannot run {rsync}: {exc.strerror or exc}") from None
    if proc.returncode != 0:
        raise RemoteError(
            f"cannot list {remote.text}: rsync exit {proc.returncode}: {last_line(proc.stderr)}"
        )
    return parse_listing(proc.stdout)


# ------------------------------------------------------------------------------------------------
# Remote index (docs/acquisition.md#remote-listing)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexRow:
    """One row of the remote index (``obs_index.csv``, docs/simulator.md#interfaces)."""

    obsid: int
    relative_path: str
    source: str
    comment: str
    utc_start: str
    size_bytes: int | None


INDEX_COLUMNS: tuple[str, ...] = ("obsid", "relative_path", "source", "comment", "utc_start", "size_bytes")


def fetch_index(
    remote: Remote,
    relpath: str,
    *,
    rsync: str | None,
    ssh_command: str = DEFAULT_SSH_COMMAND,
    timeout_s: float = 600.0,
    runner: Runner = subprocess.run,
) -> str:
    """Fetch the remote index into a temporary directory and return its text.

    A local remote without rsync is read directly (after a realpath containment check).

    Raises
    ------
    RemoteError
        The index cannot be fetched or read (one line).
    """
    reason = validate_index_relpath(relpath)
    if reason is not None:
        raise RemoteError(f"remote_index {relpath!r} is not a safe relative path: {reason}")
    name = relpath.rsplit("/", 1)[-1]
    if rsync is None:
        if not remote.is_local:
            raise RemoteError(INSTALL_HINT)
        assert remote.local_path is not None
        root = os.path.realpath(remote.local_path)
        path = os.path.realpath(os.path.join(root, relpath))
        if not path.startswith(root + os.sep):
            raise RemoteError(f"remote_index {relpath} resolves outside {remote.text}")
        try:
            return Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise RemoteError(
                f"cannot read remote index {remote.text}{relpath}: {exc.strerror or exc}"
            ) from None
    with tempfile.TemporaryDirectory(prefix="comap-index-") as tmp:
        cmd = fetch_command(rsync, remote, relpath, tmp, timeout_s=int(timeout_s), ssh_command=ssh_command)
        try:
            proc = _run_captured(runner, cmd, timeout_s)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"cannot fetch remote index {relpath}: rsync timed out") from None
        if proc.returncode != 0:
            raise RemoteError(
                f"cannot fetch remote index {remote.root}{relpath}: rsync exit {proc.returncode}: "
                f"{last_line(proc.stderr)}"
            )
        try:
            return (Path(tmp) / name).read_text(encoding="utf-8")
        except OSError as exc:
            raise RemoteError(f"cannot read fetched remote index {relpath}: {exc.strerror or exc}") from None


def parse_index(text: str, name: str = "remote index") -> tuple[dict[int, IndexRow], list[str]]:
    """Parse the index CSV; return rows by obsid and one problem line per bad row.

    The header must contain at least ``obsid`` and ``source``; other columns of
    ``obsid,relative_path,source,comment,utc_start,size_bytes`` are optional.
    """
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    missing = [c for c in ("obsid", "source") if c not in header]
    if missing:
        raise RemoteError(f"{name}: header lacks column(s) {', '.join(missing)}")
    reader.fieldnames = header
    rows: dict[int, IndexRow] = {}
    problems: list[str] = []
    for lineno, rec in enumerate(reader, start=2):
        try:
            obsid = int(str(rec.get("obsid") or "").strip())
        except ValueError:
            problems.append(f"{name}:{lineno}: obsid {rec.get('obsid')!r} is not an integer")
            continue
        size_text = str(rec.get("size_bytes") or "").strip().replace(",", "")
        rows[obsid] = IndexRow(
            obsid=obsid,
            relative_path=str(rec.get("relative_path") or "").strip(),
            source=str(rec.get("source") or "").strip(),
            comment=str(rec.get("comment") or "").strip(),
            utc_start=str(rec.get("utc_start") or "").strip(),
            size_bytes=int(size_text) if size_text.isdigit() else None,
        )
    return rows, problems


def join_index(files: Iterable[RemoteFile], index: Mapping[int, IndexRow]) -> list[RemoteFile]:
    """Attach ``source``, ``comment`` and ``source_group`` (docs/database.md#source-group-classification) from
    the index, by obsid."""
    out = []
    for f in files:
        row = index.get(f.obsid)
        if row is None:
            out.append(f)
            continue
        source, group = classify(row.source, row.comment)
        out.append(replace(f, source=source, comment=row.comment, source_group=group))
    return out


# ------------------------------------------------------------------------------------------------
# Transfers
# ------------------------------------------------------------------------------------------------


@dataclass
class TransferOutcome:
    """Result of one rsync transfer process.

    Attributes
    ----------
    returncode : int
    stderr_last : str
        Last non-empty stderr line.
    transferred : list of str
        Relative paths rsync reported (``--out-format=%n``), directories excluded.
    """

    returncode: int
    stderr_last: str
    transferred: list[str]


class ProcessRegistry:
    """Live child processes, so an interrupt can terminate them (rsync keeps its partial data)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.add(proc)

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(proc)

    def terminate_all(self) -> int:
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            try:
                p.terminate()
            except OSError:
                pass
        return len(procs)


def run_transfer(
    cmd: list[str],
    *,
    on_file: Callable[[str], None] | None = None,
    registry: ProcessRegistry | None = None,
) -> TransferOutcome:
    """Run one rsync transfer (``shell=False``), calling ``on_file(relpath)`` per reported file."""
    log.debug("transfer: %s", cmd)
    transferred: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as err:
        try:
            proc = subprocess.Popen(
                cmd,
                shell=False,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=rsync_env(),
            )
        except OSError as exc:
            return TransferOutcome(127, f"cannot run {cmd[0]}: {exc.strerror or exc}", [])
        with proc:
            if registry is not None:
                registry.add(proc)
            try:
                assert proc.stdout is not None
                for raw in proc.stdout:
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    if not line or line.endswith("/"):
                        continue
                    transferred.append(line)
                    if on_file is not None:
                        on_file(line)
                rc = proc.wait()
            finally:
                if registry is not None:
                    registry.discard(proc)
                if proc.poll() is None:  # pragma: no cover - interrupted while reading
                    proc.terminate()
                    proc.wait()
        err.seek(0)
        stderr_last = last_line(err.read())
    return TransferOutcome(rc, stderr_last, transferred)


def python_copy_file(
    src_root: str | os.PathLike,
    rf: RemoteFile,
    local_dir: str | os.PathLike,
    *,
    on_bytes: Callable[[int], None] | None = None,
    chunk_bytes: int = 4 << 20,
) -> bool:
    """Copy one file of a local remote without rsync (docs/acquisition.md#download item 5).

    The file is copied to a hidden temporary name in its destination directory, its size is
    checked against the listing, its mtime and mode (``0o664``) are set, and it is moved into
    place with ``os.replace``: a partial file never appears under its final name. A destination
    that already has the listed size and mtime is left alone (rsync's quick check).

    Returns
    -------
    bool
        True if data were copied, False if the destination was already up to date.

    Raises
    ------
    OSError
        The copy failed; the temporary file is removed.
    """
    root = os.path.realpath(src_root)
    src = os.path.realpath(os.path.join(root, rf.relpath))
    if not src.startswith(root + os.sep):
        raise OSError(f"source {rf.relpath} resolves outside the remote directory")
    dest_root = os.path.realpath(local_dir)
    final = os.path.join(dest_root, rf.relpath)
    if not os.path.realpath(final).startswith(dest_root + os.sep):
        raise OSError(f"destination {rf.relpath} resolves outside {local_dir}")
    mtime = rf.mtime_utc.timestamp() if rf.mtime_utc is not None else os.stat(src).st_mtime
    try:
        st = os.stat(final)
        if st.st_size == rf.size_bytes and int(st.st_mtime) == int(mtime):
            return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(final)
    os.makedirs(directory, mode=0o775, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(final)}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while True:
                buf = fin.read(chunk_bytes)
                if not buf:
                    break
                fout.write(buf)
                if on_bytes is not None:
                    on_bytes(len(buf))
        size = os.path.getsize(tmp)
        if size != rf.size_bytes:
            raise OSError(f"copied {size} bytes of {rf.relpath}, the listing says {rf.size_bytes}")
        os.chmod(tmp, 0o664)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return True
