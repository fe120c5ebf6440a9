"""The installed console commands of the query scripts (``[project.scripts]`` of pyproject.toml;
docs/database.md#query-scripts)."""

from __future__ import annotations

import os
import sys

__all__ = ["command_name", "prog"]


def command_name(script: str) -> str:
    """The console command ``pip install`` makes for ``modules.scripts.<script>``: ``comap-`` and the
    module name with dashes (``query_target`` → ``comap-query-target``)."""
    return "comap-" + script.replace("_", "-")


def prog(script: str) -> str:
    """The program name of usage lines: the installed command when started as one, else
    ``python -m modules.scripts.<script>``."""
    command = command_name(script)
    if os.path.basename(sys.argv[0] or "") == command:
        return command
    return f"python -m modules.scripts.{script}"
