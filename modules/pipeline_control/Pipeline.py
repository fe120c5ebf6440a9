"""Base classes every pipeline module derives from, and the names user modules import.

User modules (seed README) do::

    from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
    from modules.SQLModule.SQLModule import COMAPData

Kinds of module (00 §5):

* :class:`PipelineStage` — a top-level stage named in ``main_run.toml`` (``run()``, ``plan()``);
* :class:`BaseCOMAPModule` — a per-observation module (``run(file_info)``,
  ``already_processed(file_info, overwrite)``);
* :class:`StreamingStage` — a per-observation module that joins the single pass over the level-1
  TOD (03 §2.3);
* :class:`MapJob` — a map job (``run(files)``), base of ``CreateMap``.

``BaseCOMAPModule`` never relies on its own ``__init__`` having run: subclasses may define their
own ``__init__`` without calling ``super().__init__()`` (00 §2.3 contract 2). Everything it offers
is a class attribute or a lazy property.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modules.pipeline_control import provenance
from utils.errors import BadCOMAPFile, ConfigError, ConfigErrors, DatabaseError, Level1FormatError
from utils.h5io import RetryH5PY

if TYPE_CHECKING:  # pragma: no cover
    from modules.pipeline_control.config import LoadedConfig, RunConfig
    from modules.pipeline_control.logging_setup import RunLogging
    from modules.pipeline_control.streaming import FeedScanBlock, ObservationContext

__all__ = [
    "BadCOMAPFile",
    "BaseCOMAPModule",
    "ConfigError",
    "ConfigErrors",
    "DatabaseError",
    "Level1FormatError",
    "MapJob",
    "PipelineStage",
    "RetryH5PY",
    "RunContext",
    "StageResult",
    "StreamingStage",
    "run_pipeline",
]


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def _introspect_parameters(obj: Any) -> dict[str, Any]:
    """Parameters of ``type(obj).__init__`` read back from same-named attributes (best effort)."""
    try:
        sig = inspect.signature(type(obj).__init__)
    except (TypeError, ValueError):
        return {}
    out: dict[str, Any] = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if hasattr(obj, name):
            value = getattr(obj, name)
        elif p.default is not inspect.Parameter.empty:
            value = p.default
        else:
            continue
        if isinstance(value, int | float | str | bool | list | tuple | dict | type(None)):
            out[name] = value
    return out


class _ModuleMixin:
    """Lazy logger, resolved parameters and provenance shared by every kind of module."""

    _comap_spec: Any = None

    @property
    def logger(self) -> logging.Logger:
        """Logger ``comap.<ClassName>``."""
        return logging.getLogger(f"comap.{type(self).__name__}")

    @property
    def module_path(self) -> str:
        """Canonical dotted path of the class (``module.ClassName``)."""
        cls = type(self)
        return f"{cls.__module__}.{cls.__qualname__}"

    @property
    def parameters(self) -> dict[str, Any]:
        """The resolved parameters this instance was built with (00 §6.3)."""
        spec = self._comap_spec
        if spec is not None:
            return dict(spec.params)
        return _introspect_parameters(self)

    @property
    def parameters_sha256(self) -> str:
        return provenance.sha256_of(self.parameters)

    def mark_complete(self, h5obj) -> None:
        """Write the provenance attributes (00 §10) on a group or dataset, ``status`` last."""
        provenance.mark_complete(h5obj, self.module_path, self.parameters)

    @classmethod
    def validate_config(cls, params: Mapping[str, Any]) -> list[str]:
        """Class-specific configuration checks; return one message per problem (00 §6.4 item 6)."""
        return []


# ------------------------------------------------------------------------------------------------
# Per-observation modules
# ------------------------------------------------------------------------------------------------


class BaseCOMAPModule(_ModuleMixin):
    """A per-observation module: ``run(file_info)`` writes into ``file_info.level2_path``.

    Class attributes
    ----------------
    writes : tuple of str
        Level-2 paths this module writes. The default :meth:`already_processed` is True only when
        each exists with ``status == "complete"`` (03 §2.5).
    runs_with_others : bool
        Left out of the "is there work?" check; runs whenever another module of the observation
        runs (CheckLevel1FileExists, FinalizeLevel2Metadata).
    """

    writes: ClassVar[tuple[str, ...]] = ()
    runs_with_others: ClassVar[bool] = False
    overwrite: bool = False
    plot: bool = False

    _comap_on_parameter_change: str = "warn"
    _warned_parameter_change: ClassVar[set[str]] = set()

    def already_processed(self, file_info: Any, overwrite: bool = False) -> bool:
        """True if this module's outputs are complete in the level-2 file (03 §2.5).

        False if ``overwrite`` (or ``self.overwrite``) is set, if the level-2 file is missing, or if
        the class declares no ``writes``. A stored ``parameters_sha256`` different from the current
        one logs one WARNING per module per run (``on_parameter_change='warn'``) or makes the
        module count as not done (``'recompute'``).
        """
        if overwrite or getattr(self, "overwrite", False):
            return False
        path = getattr(file_info, "level2_path", None)
        if not path or not os.path.exists(path) or not self.writes:
            return False
        with RetryH5PY(path, "r") as l2:
            for w in self.writes:
                if not provenance.is_complete(l2, w):
                    return False
            return self._parameters_unchanged(l2)

    def _parameters_unchanged(self, l2) -> bool:
        current = self.parameters_sha256
        for w in self.writes:
            stored = l2[w].attrs.get("parameters_sha256")
            if isinstance(stored, bytes):
                stored = stored.decode()
            if stored is None or stored == current:
                continue
            if self._comap_on_parameter_change == "recompute":
                return False
            key = self.module_path
            if key not in self._warned_parameter_change:
                self._warned_parameter_change.add(key)
                self.logger.warning(
                    "%s was written with different parameters; keeping the stored result "
                    "(set on_parameter_change='recompute' or overwrite=true to redo it)",
                    w,
                )
            return True
        return True

    def run(self, file_info: Any) -> None:  # pragma: no cover - abstract
        """Process one observation; write results into ``file_info.level2_path``."""
        raise NotImplementedError(f"{type(self).__name__}.run(file_info) is not implemented")

    def observation_context(self, file_info: Any) -> ObservationContext:
        """The running :class:`ObservationContext` for ``file_info``, or a standalone one."""
        from modules.pipeline_control.streaming import context_for

        return context_for(file_info)


class StreamingStage(BaseCOMAPModule):
    """A per-observation module that joins the shared pass over ``spectrometer/tod`` (03 §2.3).

    Subclasses implement :meth:`begin`, :meth:`process_block`, optionally :meth:`end_feed`, and
    :meth:`finish`; :meth:`replay_block` puts stored results into ``block.products`` when the
    stage is already done but a later active stage needs its products.
    """

    provides: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()

    def begin(self, ctx: ObservationContext) -> None:
        """Allocate outputs in ``ctx.l2`` (datasets pre-created at full size)."""

    def process_block(self, ctx: ObservationContext, block: FeedScanBlock) -> None:  # pragma: no cover
        raise NotImplementedError

    def end_feed(self, ctx: ObservationContext, feed: int) -> None:
        """Called after the last scan of ``feed``."""

    def finish(self, ctx: ObservationContext) -> None:
        """Write remaining outputs and mark them complete."""

    def replay_block(self, ctx: ObservationContext, block: FeedScanBlock) -> None:
        """Put this stage's stored results for ``block`` into ``block.products``."""
        if self.provides:
            raise NotImplementedError(
                f"{type(self).__name__} provides {self.provides} but cannot replay them"
            )

    def run(self, file_info: Any) -> None:
        """Standalone use: drive a one-stage pass (required products are replayed from level 2)."""
        from modules.pipeline_control.streaming import run_standalone

        if self.already_processed(file_info):
            return
        run_standalone(self, file_info)


# ------------------------------------------------------------------------------------------------
# Map jobs
# ------------------------------------------------------------------------------------------------


class MapJob(_ModuleMixin):
    """Base of map jobs (``CreateMap`` and its variants): ``run(files)`` called by a top-level stage."""

    def run(self, files: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------
# Top-level stages
# ------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    """Outcome of one top-level stage, turned into the exit status and the end-of-run summary."""

    stage: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    fatal: str | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def record_failure(self, item: Any, reason: str) -> None:
        self.failed += 1
        self.failures.append((str(item), str(reason).splitlines()[0] if reason else ""))


@dataclass
class RunContext:
    """What a top-level stage knows about the run it belongs to (set by the runner)."""

    run_id: str = "standalone"
    timestamp: str = ""
    config: RunConfig | None = None
    obsids: list[int] | None = None
    nprocess: int | None = None
    force: bool = False
    retry_failed: bool = False
    dry_run: bool = False
    mpi: bool = False
    log_level: int = logging.INFO
    logging: RunLogging | None = None
    log_dir: Path = Path("logs")
    code_version: str = field(default_factory=provenance.code_version)

    def sub_config(self, path: str | Path) -> LoadedConfig | None:
        """The already-validated sub-config loaded from ``path`` (or None)."""
        if self.config is None:
            return None
        return self.config.sub_configs.get(str(path))


class PipelineStage(_ModuleMixin):
    """A top-level stage: ``run()`` does its work, ``plan()`` describes it for ``--dry-run``.

    ``sub_config_kind`` names the kind of file its ``config_file`` parameter points at
    (``'level2'`` or ``'map'``); the runner loads and validates it before any work.
    """

    sub_config_kind: ClassVar[str | None] = None
    _context: RunContext | None = None

    @property
    def context(self) -> RunContext:
        if self._context is None:
            self._context = RunContext()
        return self._context

    @context.setter
    def context(self, value: RunContext) -> None:
        self._context = value

    def plan(self) -> list[str]:
        """Lines describing what ``run()`` would do; must not write anything."""
        return [f"{type(self).__name__}: run"]

    def run(self) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def validate_sub_config(cls, sub: LoadedConfig) -> list[Any]:
        """Checks of the sub-config as a whole (e.g. required modules); messages or ConfigErrors."""
        return []


def run_pipeline(config_path: str | Path, **options: Any) -> int:
    """Run a config programmatically, exactly as ``python run.py CONFIG`` does; returns the exit status."""
    from modules.pipeline_control.runner import run_pipeline as _run

    return _run(config_path, **options)
