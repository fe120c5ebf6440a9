"""Docs registry (docs/developer.md#quality-bar item 6): every loadable module appears in the README with its
parameters."""

from __future__ import annotations

import importlib.util
import re
import sys
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


# ------------------------------------------------------------------------------------------------
# The project's documentation in docs/ (built by `make docs`; the Sphinx build itself runs in CI)
# ------------------------------------------------------------------------------------------------

REPO = README.parent
DOCS = REPO / "docs"
# Where code, tests, benchmarks and configs may point into docs/.
LINK_SOURCES = ("modules", "utils", "tests", "benchmarks", "parameter_files")
LINK_SUFFIXES = {".py", ".pyx", ".pxd", ".toml", ".md", ".txt", ".cfg"}
DOCS_LINK = re.compile(r"docs/((?:[\w-]+/)*[\w-]+\.md)#([\w-]+)")


def _comap_tables():
    """The Sphinx-free part of the docs extension (docs/_ext/comap_tables.py)."""
    if "comap_tables" in sys.modules:
        return sys.modules["comap_tables"]
    spec = importlib.util.spec_from_file_location("comap_tables", DOCS / "_ext" / "comap_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def slugify(title: str) -> str:
    """The anchor MyST gives a heading (``myst_heading_anchors``): GitHub style."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def heading_anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.+?)\s*$", line)
        if m:
            anchors.add(slugify(m.group(1)))
    return anchors


def docs_links() -> list[tuple[str, int, str, str]]:
    files = [README] + [
        p for top in LINK_SOURCES for p in sorted((REPO / top).rglob("*")) if p.suffix in LINK_SUFFIXES
    ]
    out = []
    for path in files:
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            for m in DOCS_LINK.finditer(line):
                out.append((str(path.relative_to(REPO)), lineno, m.group(1), m.group(2)))
    return out


def test_slugify_matches_myst():
    assert slugify("Level-2 file layout") == "level-2-file-layout"
    assert slugify("/hk") == "hk"
    assert slugify("comap_data") == "comap_data"
    assert slugify("Bands, channels and frequency order") == "bands-channels-and-frequency-order"


def test_every_docs_link_resolves_to_a_heading():
    links = docs_links()
    cache: dict[str, set[str]] = {}
    broken = []
    for where, lineno, page, anchor in links:
        target = DOCS / page
        if not target.is_file():
            broken.append(f"{where}:{lineno}: docs/{page} does not exist")
            continue
        anchors = cache.setdefault(page, heading_anchors(target))
        if anchor not in anchors:
            broken.append(f"{where}:{lineno}: docs/{page} has no heading with anchor #{anchor}")
    assert broken == []


def test_generated_layout_lists_every_registered_entry():
    tables = _comap_tables()
    tables.discover_modules()  # stages may register their own entries on import
    from utils.level2 import LEVEL2

    paths = {row[0] for row in tables.layout_rows(LEVEL2)}
    assert len(LEVEL2) > 0
    assert {str(entry) for entry in LEVEL2} <= paths
    assert all(len(row) == len(tables.LAYOUT_COLUMNS) for row in tables.layout_rows(LEVEL2))
    letters = {letter for letter, _ in tables.axis_rows()}
    assert {axis for entry in LEVEL2 for axis in entry.axes} <= letters
    # The level-1 registry is optional: the generator gives nothing when it does not exist.
    level1 = tables.load_layout("level1")
    if level1 is not None:
        assert {str(e) for e in level1} <= {row[0] for row in tables.layout_rows(level1)}


def test_every_module_has_a_generated_parameter_table():
    tables = _comap_tables()
    documented, errors = tables.discover_modules()
    assert errors == []
    by_path = {d.path: d for d in documented}
    listings, _ = list_modules(["modules."])
    missing = []
    for item in listings:
        doc = by_path.get(item.path)
        if doc is None:
            missing.append(f"{item.path}: not in the generated module reference")
            continue
        rows = {p.name: p for p in doc.parameters}
        for name, default in item.parameters:
            if name not in rows:
                missing.append(f"{item.path}: parameter {name} has no row")
            elif rows[name].default != default:
                missing.append(f"{item.path}: {name} default {rows[name].default} != {default}")
    assert missing == []
    assert set(by_path) == {item.path for item in listings}


def test_numpydoc_parameters_are_parsed():
    tables = _comap_tables()
    doc = """Summary.

    Parameters
    ----------
    a : int
        First line
        and second.
    b, c : bool
        Shared.

    Returns
    -------
    x : float
        Not a parameter.
    """
    assert tables.parameter_descriptions(doc) == {
        "a": "First line and second.",
        "b": "Shared.",
        "c": "Shared.",
    }
