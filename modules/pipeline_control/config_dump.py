"""The resolved configuration as TOML (docs/configuration.md#the-resolved-config-dump): ``None`` values are
dropped and listed in ``_none_keys``; files are written atomically."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

__all__ = ["drop_none", "dump_toml", "tomlable"]


def drop_none(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    none_keys: list[str] = []
    for k, v in d.items():
        if v is None:
            none_keys.append(k)
        elif isinstance(v, Mapping):
            out[k] = drop_none(v)
        elif isinstance(v, tuple | list):
            out[k] = [(drop_none(x) if isinstance(x, Mapping) else x) for x in v if x is not None]
        else:
            out[k] = v
    if none_keys:
        out["_none_keys"] = none_keys
    return out


def dump_toml(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as TOML atomically (temporary name, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            tomli_w.dump(tomlable(data), fh)
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def tomlable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): tomlable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [tomlable(v) for v in obj if v is not None]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, _dt.datetime):
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj
