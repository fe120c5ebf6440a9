"""The chain check of a per-observation list: what each module reads is provided before it runs.

Every module declares ``reads`` and ``writes`` (layout entries, see
:class:`modules.pipeline_control.base.BaseCOMAPModule`). Level-1 entries are provided by the level-1
file; a level-2 entry must be written by an earlier module of the list. A module that declares
nothing is skipped with a one-line warning.
"""

from __future__ import annotations

import logging

from modules.pipeline_control.config_model import LoadedConfig, ModuleSpec
from utils.errors import ConfigError

__all__ = ["check_layout_chain"]

log = logging.getLogger("comap.config")


def _provides(written: str, path: str) -> bool:
    """True if writing ``written`` provides ``path``: the same path, or ``path`` lies inside it."""
    written, path = written.strip("/"), path.strip("/")
    return path == written or path.startswith(written + "/")


def _declares(spec: ModuleSpec) -> bool:
    cls = spec.cls
    declared = getattr(cls, "reads", None) is not None or getattr(cls, "writes", None) is not None
    return declared and callable(getattr(cls, "declared_paths", None))


def check_layout_chain(cfg: LoadedConfig) -> list[ConfigError]:
    """One ConfigError per level-2 path a module reads that no earlier module of ``cfg`` writes."""
    problems: list[ConfigError] = []
    written: list[str] = []
    for spec in cfg.entries:
        if not _declares(spec):
            log.warning(
                "%s: %s: %s declares no reads or writes; the dataset chain check cannot follow it",
                cfg.path,
                spec.call.where,
                spec.name,
            )
            continue
        for entry, path in spec.cls.declared_paths("reads", spec.params):
            if getattr(entry, "file", "level2") != "level2":
                continue
            if not any(_provides(w, path) for w in written):
                problems.append(
                    ConfigError(
                        f"{spec.name} reads {path}, which neither the level-1 file nor an earlier "
                        "module of this list provides (list the module that writes it before "
                        f"{spec.name})",
                        str(cfg.path),
                        spec.call.where,
                        spec.call.text,
                    )
                )
        written.extend(path for _, path in spec.cls.declared_paths("writes", spec.params))
    return problems
