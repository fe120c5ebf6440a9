"""The names pipeline modules import: base classes, errors and ``RetryH5PY``.

User modules (seed README) do::

    from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
    from modules.SQLModule.SQLModule import COMAPData

The classes live in :mod:`modules.pipeline_control.base`; this module only gathers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.pipeline_control.base import (
    BaseCOMAPModule,
    MapJob,
    PipelineStage,
    RunContext,
    StageResult,
    StreamingStage,
)
from utils.errors import BadCOMAPFile, ConfigError, ConfigErrors, DatabaseError, Level1FormatError
from utils.h5io import RetryH5PY

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


def run_pipeline(config_path: str | Path, **options: Any) -> int:
    """Run a config programmatically, exactly as ``python run.py CONFIG`` does; returns the exit status."""
    from modules.pipeline_control.runner import run_pipeline as _run

    return _run(config_path, **options)
