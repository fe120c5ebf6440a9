"""What the config loader produces: validated entries, loaded files and the whole run's configs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.pipeline_control.callstrings import CallSpec
from modules.pipeline_control.config_dump import drop_none
from modules.pipeline_control.provenance import sha256_of
from utils.errors import ConfigError, ConfigErrors

__all__ = ["ErrorCollector", "LoadedConfig", "ModuleSpec", "RunConfig"]


@dataclass
class ModuleSpec:
    """A validated pipeline entry: the class, its kind and its fully resolved parameters."""

    call: CallSpec
    cls: type
    kind: str
    params: dict[str, Any]
    section_key: str | None = None

    @property
    def class_path(self) -> str:
        """Canonical dotted path ``cls.__module__ + '.' + cls.__qualname__``."""
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    @property
    def name(self) -> str:
        return self.cls.__name__

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``cls(**kwargs)``."""
        return dict(self.params)

    def instantiate(self) -> Any:
        """Instantiate the class with the resolved parameters and attach the spec to it."""
        obj = self.cls(**self.init_kwargs())
        try:
            obj._comap_spec = self
        except AttributeError:  # __slots__ classes: provenance falls back to introspection
            pass
        return obj


@dataclass
class LoadedConfig:
    """One TOML file after parsing and validation."""

    path: Path
    kind: str
    raw: dict[str, Any]
    master: dict[str, Any]
    entries: list[ModuleSpec] = field(default_factory=list)
    parent: LoadedConfig | None = None

    @property
    def sha256(self) -> str:
        """Hash of the resolved pipeline (class paths and parameters), used as ``config_sha256``."""
        return sha256_of([{"class": e.class_path, "params": e.params} for e in self.entries])

    def resolved_dict(self) -> dict[str, Any]:
        """Master and entries as plain data, ``None`` values listed in ``_none_keys``
        (docs/configuration.md#the-resolved-config-dump)."""
        return {
            "file": str(self.path),
            "kind": self.kind,
            "Master": drop_none(self.master),
            "pipeline": [
                {"class": e.class_path, "call": e.call.text, "params": drop_none(e.params)}
                for e in self.entries
            ],
        }


@dataclass
class RunConfig:
    """The main config and every sub-config reachable from it, validated together."""

    main: LoadedConfig
    sub_configs: dict[str, LoadedConfig] = field(default_factory=dict)
    implicit_level2: bool = False
    #: One line per setting that is overridden without being an error (docs/configuration.md#warnings);
    #: the runner logs them once, after its logging is set up.
    warnings: list[str] = field(default_factory=list)

    def resolved_dict(self) -> dict[str, Any]:
        out = {"main": self.main.resolved_dict()}
        if self.sub_configs:
            out["sub_configs"] = {key: cfg.resolved_dict() for key, cfg in self.sub_configs.items()}
        return out


class ErrorCollector:
    """Collects ConfigErrors so that every problem is reported at once, and warnings (each once)."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        """Record a warning line; the same line is recorded once (docs/configuration.md#warnings)."""
        if message not in self.warnings:
            self.warnings.append(message)

    def add(
        self, message: str, file: str | Path | None = None, where: str | None = None, text: str | None = None
    ) -> None:
        self.errors.append(ConfigError(message, None if file is None else str(file), where, text))

    def extend(self, errors: Iterable[ConfigError]) -> None:
        self.errors.extend(errors)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)

    def __bool__(self) -> bool:
        return bool(self.errors)
