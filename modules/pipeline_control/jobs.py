"""Staging files, atomic publish and the per-observation result record
(docs/level2.md#processing-one-observation, docs/operations.md#error-model rule 5).

A level-2 file is built in a hidden staging file beside its final name,
``.<final name>.partial-<host>-<pid>``, and published with ``os.replace`` after an ``fsync``, so
nothing half-written is ever visible under a final name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from modules.pipeline_control import signals
from utils import faults
from utils.processes import pid_alive

log = logging.getLogger("comap.jobs")

HOST = socket.gethostname()


def staging_path(final: str | Path, *, host: str = HOST, pid: int | None = None) -> Path:
    """The staging name for ``final`` owned by this process."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial-{host}-{os.getpid() if pid is None else pid}")


def staging_files(final: str | Path) -> list[Path]:
    """Every staging file (any owner) for ``final`` in its directory."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    prefix = f".{final.name}.partial-"
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix))


def _unlink(paths) -> list[Path]:
    """Delete ``paths``; return those this call removed (one already gone is skipped)."""
    removed = []
    for p in paths:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def remove_staging_files(final: str | Path) -> list[Path]:
    """Delete older staging files of ``final`` (left by a crash or a killed worker)."""
    removed = _unlink(staging_files(final))
    if removed:
        log.info("removed %d stale staging file(s) for %s", len(removed), Path(final).name)
    return removed


def remove_orphaned_partials(final: str | Path) -> list[Path]:
    """Delete ``.<name>.partial-[<host>-]<pid>`` files of ``final`` whose writer, a process of this
    host, is dead: what a killed run leaves (docs/reliability.md#killed-at-any-point). A partial file of a
    live process, or of another host, is kept."""
    prefix = f".{Path(final).name}.partial-"

    def orphaned(p: Path) -> bool:
        host, _, pid = p.name[len(prefix) :].rpartition("-")
        return pid.isdigit() and host in ("", HOST) and not pid_alive(int(pid))

    removed = _unlink(p for p in staging_files(final) if orphaned(p))
    if removed:
        log.info("removed %d partial file(s) of %s left by dead processes", len(removed), Path(final).name)
    return removed


def prepare_staging(final: str | Path, *, start_from_published: bool) -> Path:
    """Create this process's staging file for ``final``.

    Older staging files for the same file are removed first. If ``start_from_published`` and the
    published file exists, it is copied to the staging name (so modules that are already done
    stay done); otherwise the staging file does not exist yet and the first module creates it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_staging_files(final)
    staging = staging_path(final)
    signals.own(staging)  # removed if this worker is stopped (docs/reliability.md#signals)
    if start_from_published and final.exists():
        tmp = staging.with_name(staging.name + ".copy")
        signals.own(tmp)
        shutil.copyfile(final, tmp)
        os.replace(tmp, staging)
        signals.disown(tmp)
    return staging


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(staging: str | Path, final: str | Path) -> Path:
    """``fsync`` the staging file, ``os.replace`` it onto ``final`` and ``fsync`` the directory."""
    staging, final = Path(staging), Path(final)
    fsync_file(staging)
    faults.checkpoint("level2.publish")
    os.replace(staging, final)
    signals.disown(staging)
    fsync_dir(final.parent)
    faults.checkpoint("level2.published")
    return final


def discard(staging: str | Path | None) -> None:
    """Remove a staging file if it exists (failure path)."""
    if staging is None:
        return
    for p in (Path(staging), Path(str(staging) + ".copy")):
        signals.disown(p)
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - nothing more we can do
            log.warning("could not remove staging file %s: %s", p, exc)


@dataclass
class ObservationResult:
    """What a worker returns for one observation (docs/level2.md#level2pipeline step 5)."""

    obsid: int
    status: str  # "done" or "failed"
    error: str | None = None
    last_module: str | None = None
    level2_path: str | None = None
    db_ops: list[Any] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    modules_run: list[str] = field(default_factory=list)
    bytes_read_tod: int = 0
    bytes_read_total: int = 0
    peak_rss_mb: float | None = None
    host: str = HOST
    pid: int = field(default_factory=os.getpid)


# Deferred DB operations recorded in the published file, so that a level-2 file whose DB
# transaction never happened (crash after os.replace) can be registered with its full DB outcome.


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return obj


def ops_to_json(ops: list[Any]) -> str:
    """Serialise deferred DB operations (NaN kept as NaN) so a published file can replay them."""
    return json.dumps(
        [
            {"name": op.name, "args": _jsonable(list(op.args)), "kwargs": _jsonable(dict(op.kwargs))}
            for op in ops
        ],
        allow_nan=True,
    )


def ops_from_json(text: str) -> list[Any]:
    """Inverse of :func:`ops_to_json`; ``*_utc`` keyword values become datetimes again."""
    import datetime as _dt

    from modules.SQLModule.SQLModule import DbOp

    ops = []
    for d in json.loads(text):
        kwargs = dict(d["kwargs"])
        for key, value in kwargs.items():
            if key.endswith("_utc") and isinstance(value, str):
                kwargs[key] = _dt.datetime.fromisoformat(value)
        ops.append(DbOp(d["name"], tuple(d["args"]), kwargs))
    return ops


def stored_db_ops(path: str | Path) -> list[Any] | None:
    """The DB operations recorded in a published level-2 file (None if absent or unreadable)."""
    try:
        with h5py.File(path, "r", locking=False) as l2:
            text = l2.attrs.get("db_ops_json")
    except OSError:
        return None
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode()
    try:
        return ops_from_json(text)
    except (ValueError, KeyError, TypeError):
        return None
