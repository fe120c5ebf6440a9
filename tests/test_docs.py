"""Docs registry (00 §12 item 6): every loadable module appears in the README with its parameters."""

from __future__ import annotations

import re
from pathlib import Path

from modules.pipeline_control.cli import list_modules

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_listed_module_is_documented_with_its_parameters():
    text = README.read_text()
    listings, errors = list_modules(["modules."])
    assert errors == []
    assert listings, "no modules found"
    missing = []
    for item in listings:
        rows = [line for line in text.splitlines() if f"`{item.path}`" in line and line.startswith("|")]
        if not rows:
            missing.append(f"{item.path}: not in the README module table")
            continue
        row = rows[0]
        for name, _default in item.parameters:
            if not re.search(rf"`{re.escape(name)}(=|`)", row):
                missing.append(f"{item.path}: parameter {name} not documented")
    assert missing == []


def test_quick_start_is_two_commands():
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.strip().splitlines() if ln.split("#")[0].strip()]
    assert commands == ["make demo", "make test"]
