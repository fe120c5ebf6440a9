"""The reliability campaign (docs/reliability.md): every test under this folder carries
the ``reliability`` marker, so ``pytest -m reliability`` runs the campaign alone and
``pytest -m 'not reliability'`` leaves it out."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.reliability)
