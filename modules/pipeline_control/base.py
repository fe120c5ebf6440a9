"""Base classes every pipeline module derives from (re-exported by ``Pipeline.py``).

Kinds of module (docs/developer.md#kinds-of-modules):

* :class:`PipelineStage` — a top-level stage named in ``main_run.toml`` (``run()``, ``plan()``);
* :class:`BaseCOMAPModule` — a per-observation module (``run(file_info)``,
  ``already_processed(file_info, overwrite)``);
* :class:`StreamingStage` — a per-observation module that joins the single pass over the level-1
  TOD (docs/level2.md#streaming);
* :class:`MapJob` — a map job (``run(files)``), base of ``CreateMap``.

``BaseCOMAPModule`` never relies on its own ``__init__`` having run: subclasses may define their
own ``__init__`` without calling ``super().__init__()`` (docs/developer.md#writing-a-module contract 2).
Everything it offers is a class attribute, a class method or a lazy property.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modules.pipeline_control import provenance
from modules.pipeline_control.parameters import parameter_problems, resolve_defaults
from modules.pipeline_control.streaming import (
    Calibration,
    FeedScanBlock,
    ObservationContext,
    context_for,
    run_streaming_group,
)
from utils.errors import BadCOMAPFile
from utils.h5io import RetryH5PY
from utils.layout import DatasetPath

if TYPE_CHECKING:  # pragma: no cover
    from modules.pipeline_control.config_model import LoadedConfig, RunConfig
    from modules.pipeline_control.logging_setup import RunLogging

__all__ = [
    "BaseCOMAPModule",
    "MapJob",
    "PipelineStage",
    "RunContext",
    "StageResult",
    "StreamingStage",
    "describe_stale",
    "stale_stages",
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
    """Lazy logger, resolved parameters and provenance shared by every kind of module.

    Attributes
    ----------
    algorithm_version : int
        Version of what the module computes (docs/operations.md#algorithm-versions), 1 unless the
        class says otherwise. It is recorded with the provenance of every output the module marks
        complete, and a stored output whose recorded version differs from the class's (an output
        without one counts as version 1) is out of date: the module and every module after it in
        the level-2 list are run again. **Bump it** (by one, in the class body) whenever a change
        of the code changes the values the module writes for the same inputs and parameters: a new
        algorithm, a fixed bug that alters results, a changed default that is not a parameter,
        a changed dataset layout. Do not bump it for refactoring, speed-ups that give the same
        numbers, logging or plots.
    """

    _comap_spec: Any = None
    algorithm_version: ClassVar[int] = provenance.LEGACY_ALGORITHM_VERSION

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
        """The resolved parameters this instance was built with
        (docs/configuration.md#defaults-and-precedence)."""
        spec = self._comap_spec
        if spec is not None:
            return dict(spec.params)
        return _introspect_parameters(self)

    @property
    def parameters_sha256(self) -> str:
        return provenance.sha256_of(self.parameters)

    def mark_complete(self, h5obj) -> None:
        """Write the provenance attributes (docs/operations.md#provenance) on a group or dataset, ``status``
        last."""
        provenance.mark_complete(h5obj, self.module_path, self.parameters, type(self).algorithm_version)

    @classmethod
    def validate_config(cls, params: Mapping[str, Any]) -> list[str]:
        """Every problem with ``params``, one message per problem (docs/configuration.md#validation item 6).

        A partial ``params`` is completed with the ``__init__`` defaults. The class's
        :meth:`parameter_rules` come first, then one message per parameter whose value does not
        fit its annotation (types, ``Literal``, ``Annotated[..., Range(...)]``; see
        :mod:`modules.pipeline_control.parameters`). Modules override :meth:`parameter_rules`.
        """
        resolved = resolve_defaults(cls, params)
        return [*cls.parameter_rules(resolved), *parameter_problems(cls, resolved)]

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        """Checks that tie several parameters together (or need more than an annotation, such as a
        file that must exist); one message per problem. ``params`` holds every parameter, defaults
        filled in. A bound or a set of choices of one parameter belongs in its annotation."""
        return []


# ------------------------------------------------------------------------------------------------
# Per-observation modules
# ------------------------------------------------------------------------------------------------


class _Declared:
    """``reads``/``writes`` of a module class: the entries on the class, concrete paths on an instance.

    A non-data descriptor, so a legacy module that sets ``self.writes`` in ``__init__`` keeps
    its own value.
    """

    def __init__(self, which: str, entries: tuple[DatasetPath, ...]) -> None:
        self.which = which
        self.entries = entries

    def __get__(self, obj: Any, owner: type) -> tuple[Any, ...]:
        if obj is None:
            return self.entries
        params = resolve_defaults(owner, {})
        params.update({name: getattr(obj, name) for name in params if hasattr(obj, name)})
        params.update(obj.parameters)
        return tuple(p for e in self.entries for p in owner.entry_paths(e, params))


class BaseCOMAPModule(_ModuleMixin):
    """A per-observation module: ``run(file_info)`` writes into ``file_info.level2_path``.

    ``reads`` and ``writes`` are the only place a module declares its datasets. Before any work,
    the config loader checks the chain of a level-2 list: every level-2 entry a module reads must
    be written by an earlier module, else the config is rejected (ConfigError naming the module
    and the dataset). A module that leaves both at None (the default: it declares nothing) still
    runs; the loader logs a one-line warning that the chain check cannot follow it. A module that
    reads or writes nothing declares ``()``.

    Parameters choose concrete paths in two ways, both resolved by :meth:`entry_paths` with the
    module's own parameters (for the done-check with :attr:`parameters`, for the chain check with
    the resolved config):

    * a template entry (``level2_noise_stats/{dataset}``) has its ``{placeholders}`` filled from
      the parameter of the same name; a list value gives one path per item, None or ``''`` none;
    * a module whose parameter names the dataset used for an entry (``input_dataset`` of
      PostBinCleaning) overrides :meth:`entry_paths` for that entry and defers to ``super()`` for
      the others.

    User modules add their own entries to the registry and name them here::

        from utils.level2 import BINNED_DATA, LEVEL2

        MY_RESULT = LEVEL2.register(
            "my_stage/result", axes=("F", "S"), dtype="float32", unit="K", description="what it holds"
        )

        class MyStage(BaseCOMAPModule):
            reads = (BINNED_DATA,)
            writes = (MY_RESULT,)

    Attributes
    ----------
    reads : tuple of DatasetPath or None
        Layout entries the module reads: level-2 entries (:data:`utils.level2.LEVEL2`) and
        level-1 entries (:data:`utils.level1_layout.LEVEL1`, always provided by the level-1 file).
    writes : tuple of DatasetPath or None
        Level-2 entries the module writes and marks complete. The default
        :meth:`already_processed` is True only when each exists with ``status == "complete"``
        (docs/level2.md#done-checks-and-provenance); a group entry also provides everything
        inside it. Read on the class, ``reads`` and ``writes`` are the declared entries; read on
        an instance, they are the concrete paths under the instance's :attr:`parameters`.
    runs_with_others : bool
        Left out of the "is there work?" check; runs whenever another module of the observation
        runs (CheckLevel1FileExists, FinalizeLevel2Metadata).
    algorithm_version : int
        Version of what the module computes, recorded on every output it marks complete; a stored
        output with another version (none counts as 1) is redone with the modules after it. Bump it
        by one whenever a code change alters the values written for the same inputs and
        parameters (docs/operations.md#algorithm-versions; the rule is spelled out on the base
        class ``_ModuleMixin``).
    """

    reads: ClassVar[tuple[DatasetPath, ...] | None] = None
    writes: ClassVar[tuple[DatasetPath, ...] | None] = None
    runs_with_others: ClassVar[bool] = False
    overwrite: bool = False
    plot: bool = False

    _comap_on_parameter_change: str = "warn"
    _warned_parameter_change: ClassVar[set[str]] = set()

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Concrete paths of one declared entry under ``params`` (see the class docstring)."""
        if not isinstance(entry, DatasetPath) or not entry.is_template:
            return (str(entry),)  # a plain string is a fixed level-2 path
        choices: list[list[Any]] = []
        for name in entry.fields:
            value = params.get(name)
            values = list(value) if isinstance(value, list | tuple) else [value]
            values = [v for v in values if v is not None and v != ""]
            if not values:
                return ()
            choices.append(values)
        return tuple(
            entry.resolve(dict(zip(entry.fields, combo, strict=True)))
            for combo in itertools.product(*choices)
        )

    @classmethod
    def declared_paths(cls, which: str, params: Mapping[str, Any]) -> list[tuple[DatasetPath, str]]:
        """``(entry, concrete path)`` for every entry of ``reads`` or ``writes`` (``which``);
        ``params`` is completed with the defaults of every ``__init__`` of the class hierarchy."""
        entries = getattr(cls, which) or ()
        params = resolve_defaults(cls, params)
        return [(entry, path) for entry in entries for path in cls.entry_paths(entry, params)]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for which in ("reads", "writes"):
            value = cls.__dict__.get(which)
            if isinstance(value, tuple):
                setattr(cls, which, _Declared(which, value))

    def already_processed(self, file_info: Any, overwrite: bool = False) -> bool:
        """True if this module's outputs are complete in the level-2 file
        (docs/level2.md#done-checks-and-provenance).

        False if ``overwrite`` (or ``self.overwrite``) is set, if the level-2 file is missing, or if
        the class declares no ``writes``. A stored ``parameters_sha256`` different from the current
        one logs one WARNING per module per run (``on_parameter_change='warn'``) or makes the
        module count as not done (``'recompute'``).
        """
        if overwrite or getattr(self, "overwrite", False):
            return False
        path = getattr(file_info, "level2_path", None)
        outputs = tuple(self.writes or ())
        if not path or not os.path.exists(path) or not outputs:
            return False
        with RetryH5PY(path, "r") as l2:
            for w in outputs:
                if not provenance.is_complete(l2, w):
                    return False
            if self._version_change(l2, outputs) is not None:
                return False
            return self._parameters_unchanged(l2, outputs)

    def stale_reason(self, file_info: Any) -> str | None:
        """Why this module's complete outputs are out of date, or None
        (docs/operations.md#algorithm-versions).

        An output is out of date when its recorded algorithm version differs from
        :attr:`algorithm_version` (``"algorithm version 1 → 2"``), or, with
        ``on_parameter_change='recompute'``, when it was written with other parameters
        (``"parameters changed"``). Outputs that are missing or incomplete are not *stale*, they are
        simply not done; so are the outputs of a module that declares no ``writes``.
        """
        path = getattr(file_info, "level2_path", None)
        outputs = tuple(self.writes or ())
        if not path or not os.path.exists(path) or not outputs:
            return None
        with RetryH5PY(path, "r") as l2:
            if not all(provenance.is_complete(l2, w) for w in outputs):
                return None
            change = self._version_change(l2, outputs)
            if change is not None:
                return "algorithm version {} → {}".format(*change)
            if self._comap_on_parameter_change == "recompute":
                current = self.parameters_sha256
                for w in outputs:
                    stored = l2[w].attrs.get("parameters_sha256")
                    stored = stored.decode() if isinstance(stored, bytes) else stored
                    if stored is not None and stored != current:
                        return "parameters changed"
        return None

    def _version_change(self, l2, outputs: tuple[str, ...]) -> tuple[int, int] | None:
        """``(recorded, code)`` algorithm versions of the first output whose recorded version is not
        the class's, or None."""
        code = int(type(self).algorithm_version)
        for w in outputs:
            recorded = provenance.recorded_algorithm_version(l2[w])
            if recorded != code:
                return recorded, code
        return None

    def _parameters_unchanged(self, l2, outputs: tuple[str, ...]) -> bool:
        current = self.parameters_sha256
        for w in outputs:
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
        return context_for(file_info)


def stale_stages(modules: list[Any], file_info: Any) -> list[tuple[Any, str]]:
    """The modules of a level-2 list whose stored outputs in ``file_info.level2_path`` are out of date,
    in list order, each with its reason (docs/operations.md#algorithm-versions).

    A module is out of date when its own :meth:`BaseCOMAPModule.stale_reason` says so, or when its
    outputs are complete but an earlier module of the list is out of date (reason ``"after
    <earlier module>"``): its outputs were computed from results that are about to change. Modules
    that run with the others (``runs_with_others``) are listed only for their own reason. Empty when
    the file is missing or nothing is out of date.
    """
    out: list[tuple[Any, str]] = []
    first: str | None = None
    for mod in modules:
        check = getattr(mod, "stale_reason", None)
        own = check(file_info) if callable(check) else None
        if own is not None:
            out.append((mod, own))
            first = first or type(mod).__name__
        elif first is not None and not getattr(mod, "runs_with_others", False):
            if _has_outputs(mod, file_info):
                out.append((mod, f"after {first}"))
    return out


def _has_outputs(mod: Any, file_info: Any) -> bool:
    """True if ``mod`` declares ``writes`` and each of them is complete in the level-2 file."""
    path = getattr(file_info, "level2_path", None)
    outputs = tuple(getattr(mod, "writes", None) or ())
    if not path or not os.path.exists(path) or not outputs:
        return False
    with RetryH5PY(path, "r") as l2:
        return all(provenance.is_complete(l2, w) for w in outputs)


def describe_stale(stale: list[tuple[Any, str]]) -> str:
    """One phrase for :func:`stale_stages`' result: the first module's reason and how many follow it
    (``"GainFilterAndBin: algorithm version 1 → 2 (and 2 stages after it)"``)."""
    if not stale:
        return ""
    mod, reason = stale[0]
    text = f"{type(mod).__name__}: {reason}"
    own = [f"{type(m).__name__}: {r}" for m, r in stale[1:] if not r.startswith("after ")]
    n_after = len(stale) - 1 - len(own)
    if own:
        text += "; " + "; ".join(own)
    if n_after:
        text += f" (and {n_after} stage{'s' if n_after > 1 else ''} after it)"
    return text


class StreamingStage(BaseCOMAPModule):
    """A per-observation module that joins the shared pass over ``spectrometer/tod``
    (docs/level2.md#streaming).

    Subclasses implement :meth:`begin`, :meth:`process_block`, optionally :meth:`end_feed`, and
    :meth:`finish`; :meth:`replay_block` puts stored results into ``block.products`` when the
    stage is already done but a later active stage needs its products.

    Attributes
    ----------
    provides, requires : tuple of str
        Names of in-memory block products (``block.products``) the stage puts in or needs.
    calibration : callable or None
        ``calibration(ctx, feed, scan) -> (gain, tsys)``, each ``(B, C)`` float64: how the pass
        calibrates a block (``block.gain``, ``block.tsys``, ``block.tod_k``). The stage that
        writes the calibration supplies this function; the stages of one pass share it.
    decimation_stride : int
        Stride of the decimated copy of the raw block the stage reads (``block.decimated``), or 0.
        The driver has the copy made in the first read of each row (docs/level2.md#streaming).
    """

    provides: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    calibration: ClassVar[Calibration | None] = None
    decimation_stride: int = 0

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
        if self.already_processed(file_info):
            return
        run_standalone(self, file_info)


def _providers_for(stage: StreamingStage) -> list[StreamingStage]:
    """Default-constructed stages that provide ``stage.requires`` (for standalone runs)."""

    def all_subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from all_subclasses(sub)

    chosen: list[StreamingStage] = []
    for name in stage.requires:
        if any(name in p.provides for p in chosen):
            continue
        for cls in all_subclasses(StreamingStage):
            if name in cls.provides and cls is not type(stage):
                chosen.append(cls())
                break
        else:
            raise BadCOMAPFile(
                f"{type(stage).__name__} needs block product '{name}' but no stage provides it"
            )
    return chosen


def run_standalone(stage: StreamingStage, file_info: Any) -> None:
    """Run one streaming stage on its own, replaying required products from level 2."""
    ctx = context_for(file_info)
    providers = _providers_for(stage)
    for p in providers:
        if not p.already_processed(file_info):
            raise BadCOMAPFile(
                f"{type(stage).__name__} needs the stored results of {type(p).__name__}; run it first"
            )
    run_streaming_group(ctx, [*providers, stage], [False] * len(providers) + [True])


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
    mpi: Any = None  # the MPIWorld of an MPI run (docs/operations.md#running-under-mpi)
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
    ``creates_database`` marks the stages that register observations (DataAcquisition, DataAssess):
    only a run with one of them (or ``--create-db``) may create a missing database
    (docs/database.md#connection).
    """

    sub_config_kind: ClassVar[str | None] = None
    creates_database: ClassVar[bool] = False
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
