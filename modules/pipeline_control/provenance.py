"""Provenance: code version, canonical parameter hashes, HDF5 attributes and FITS cards
(docs/operations.md#provenance)."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import math
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

ALGORITHM_VERSION_ATTR = "algorithm_version"
"""Attribute holding the writer's algorithm version on every output it marks complete
(docs/operations.md#algorithm-versions)."""

LEGACY_ALGORITHM_VERSION = 1
"""The version an output without :data:`ALGORITHM_VERSION_ATTR` counts as (written before
algorithm versions were recorded), and the version every module starts at."""


@functools.cache
def code_version() -> str:
    """Return the code version: ``git describe --always --dirty --tags`` in a checkout,
    else the installed package version, else ``"unknown"`` (computed once per process)."""
    if (REPO_ROOT / ".git").exists():
        try:
            res = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--tags"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if res.returncode == 0 and res.stdout.strip():
                return res.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        return importlib.metadata.version("comap-reduce")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def utc_now() -> _dt.datetime:
    """Timezone-aware current UTC time."""
    return _dt.datetime.now(_dt.UTC)


def utc_now_iso() -> str:
    """Current UTC time as ISO-8601 with a ``Z`` suffix, second precision."""
    return utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


def canonical_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, no whitespace, tuples as lists) used for hashing."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)


def sha256_of(obj: Any) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def group_provenance(
    module_path: str, params: Mapping[str, Any], algorithm_version: int = LEGACY_ALGORITHM_VERSION
) -> dict[str, Any]:
    """Provenance attributes every module writes on its groups (docs/operations.md#provenance), ``status``
    last."""
    return {
        "module": module_path,
        "parameters_json": canonical_json(params),
        "parameters_sha256": sha256_of(params),
        ALGORITHM_VERSION_ATTR: int(algorithm_version),
        "comap_reduce_version": code_version(),
        "written_utc": utc_now_iso(),
        "status": "complete",
    }


def mark_complete(
    h5obj, module_path: str, params: Mapping[str, Any], algorithm_version: int = LEGACY_ALGORITHM_VERSION
) -> None:
    """Write the provenance attributes on an h5py group or dataset; ``status`` is set last."""
    attrs = group_provenance(module_path, params, algorithm_version)
    status = attrs.pop("status")
    for key, value in attrs.items():
        h5obj.attrs[key] = value
    h5obj.attrs["status"] = status


def mark_incomplete(h5obj) -> None:
    """Flag a group/dataset as being written (so a crash never leaves it looking complete)."""
    h5obj.attrs["status"] = "incomplete"


def is_complete(h5file, path: str) -> bool:
    """True if ``path`` exists in the open HDF5 file and carries ``status == "complete"``."""
    if path not in h5file:
        return False
    status = h5file[path].attrs.get("status")
    if isinstance(status, bytes):
        status = status.decode()
    return status == "complete"


def recorded_algorithm_version(h5obj) -> int:
    """The algorithm version recorded on a group or dataset: :data:`LEGACY_ALGORITHM_VERSION` when
    none is, 0 (matches no code) when the value is not an integer
    (docs/operations.md#algorithm-versions)."""
    value = h5obj.attrs.get(ALGORITHM_VERSION_ATTR)
    if value is None:
        return LEGACY_ALGORITHM_VERSION
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def fits_history_cards(params: Mapping[str, Any], width: int = 70) -> list[str]:
    """``key = value`` strings for FITS HISTORY cards, wrapped to ``width`` characters."""
    lines: list[str] = []
    for key in sorted(params):
        text = f"{key} = {canonical_json(params[key])}"
        while len(text) > width:
            lines.append(text[:width])
            text = "  " + text[width:]
        lines.append(text)
    return lines
