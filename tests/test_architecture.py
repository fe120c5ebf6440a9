"""The dependency direction of docs/developer.md#dependency-direction: imports point downwards only (checked
on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Absolute names of every module imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in ("modules", "utils", "run", "tests", "benchmarks")}


def shipped_files():
    for root in ("utils", "modules"):
        yield from sorted((REPO / root).rglob("*.py"))
    yield REPO / "run.py"


STAGE_PACKAGES = ("modules.DataAcquisition", "modules.ProcessLevel2", "modules.MapMaking")
SIMULATOR_MUST_NOT_SHARE = ("utils.calibrators",)
"""Pipeline code the simulator checks and so must not share (docs/calibrators.md#two-implementations)."""


def violations(files=None) -> list[str]:
    """Rule violations of ``files`` (pairs of module name and path; default: every shipped file)."""
    problems = []
    stage_packages = STAGE_PACKAGES
    pairs = files if files is not None else [(module_name(p), p) for p in shipped_files()]
    for name, path in pairs:
        for imp in imports_of(path, name):
            top2 = ".".join(imp.split(".")[:2])
            bad = None
            if imp.startswith(("tests", "benchmarks")):
                bad = "shipped code must not import tests or benchmarks"
            elif name.startswith("utils.") and not imp.startswith("utils"):
                bad = "utils is the ground floor: it never imports modules or run.py"
            elif imp.startswith("utils.simulator") and not name.startswith("utils.simulator"):
                bad = "nothing outside utils.simulator imports the simulator"
            elif name.startswith("utils.simulator") and imp.startswith(SIMULATOR_MUST_NOT_SHARE):
                bad = (
                    "the simulator keeps its own calibrator truth (utils/simulator/calibrator_truth.py, "
                    "docs/calibrators.md#two-implementations), never the pipeline's models"
                )
            elif (
                name.startswith("modules.SQLModule")
                and imp.startswith("modules")
                and not imp.startswith("modules.SQLModule")
            ):
                bad = "SQLModule imports utils only"
            elif (
                name.startswith("modules.pipeline_control")
                and imp.startswith("modules")
                and top2 not in ("modules.pipeline_control", "modules.SQLModule")
            ):
                bad = "pipeline_control imports utils and SQLModule only"
            elif (
                name == "run"
                and imp.startswith(("modules", "utils"))
                and not imp.startswith("modules.pipeline_control")
            ):
                bad = "run.py imports modules.pipeline_control only"
            elif name.startswith(stage_packages):
                own = ".".join(name.split(".")[:2])
                if imp.startswith(stage_packages) and not imp.startswith(own):
                    bad = "stage packages do not import each other"
                elif name.startswith("modules.ProcessLevel2.") and imp.startswith("modules.ProcessLevel2."):
                    own_stage = name.split(".")[2]
                    other = imp.split(".")[2]
                    in_folder = (REPO / "modules" / "ProcessLevel2" / own_stage).is_dir()
                    other_folder = (REPO / "modules" / "ProcessLevel2" / other).is_dir()
                    if other_folder and other != own_stage:
                        bad = "a ProcessLevel2 stage never imports another stage"
                    elif in_folder and not other_folder:
                        bad = "a ProcessLevel2 stage does not import the coordinator"
            if bad:
                problems.append(f"{name} imports {imp}: {bad}")
    return problems


def test_dependency_direction():
    assert violations() == []


def test_simulator_does_not_import_the_pipeline_calibrators():
    """The simulator's calibrator truth is its own implementation (utils/simulator/calibrator_truth.py)."""
    sim_files = sorted((REPO / "utils" / "simulator").rglob("*.py"))
    assert sim_files
    shared = [
        f"{module_name(p)} imports {imp}"
        for p in sim_files
        for imp in imports_of(p)
        if imp.startswith(SIMULATOR_MUST_NOT_SHARE)
    ]
    assert shared == []


def test_checker_catches_violations(tmp_path):
    """The checker itself can fail: each rule reports a planted violation."""
    cases = {
        "utils.probe": "from modules.SQLModule.SQLModule import db\n",
        "modules.SQLModule.probe": "from modules.pipeline_control import config\n",
        "modules.pipeline_control.probe": "import modules.ProcessLevel2.ProcessLevel2\n",
        "modules.MapMaking.probe": "from modules.ProcessLevel2.observation import x\n",
        "modules.ProcessLevel2.CreateLevel2File.probe": "import modules.ProcessLevel2.FindScans.FindScans\n",
        "modules.ProcessLevel2.probe": "import utils.simulator\n",
        "utils.simulator.probe": "from utils.calibrators import flux_jy\n",
        "utils.simulator.probe2": "def f():\n    import utils.calibrators\n",
        "run": "import modules.ProcessLevel2\n",
    }
    for name, text in cases.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(text)
        assert violations([(name, path)]), name


# ------------------------------------------------------------------------------------------------
# File size and import cycles (docs/developer.md#dependency-direction)
# ------------------------------------------------------------------------------------------------

MAX_LINES = 1000


def oversized(files=None) -> list[str]:
    """Shipped source files with more than MAX_LINES lines."""
    paths = files if files is not None else [*shipped_files(), *sorted((REPO / "utils").rglob("*.pyx"))]
    out = []
    for p in paths:
        n = len(p.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}: {n} lines")
    return out


def import_cycles(pairs=None) -> list[list[str]]:
    """Groups of shipped modules that import each other in a loop, counting imports inside functions
    and under ``if TYPE_CHECKING:`` (a loop of type-only imports still ties the files together).

    An import of ``pkg.mod.Name`` counts as an import of the file module ``pkg.mod``; a package's
    ``__init__`` counts only when it is imported by its own name.
    """
    pairs = pairs if pairs is not None else [(module_name(p), p) for p in shipped_files()]
    names = {n for n, _ in pairs}
    graph: dict[str, set[str]] = {}
    for name, path in pairs:
        deps = set()
        for imp in imports_of(path, name):
            parts = imp.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in names:
                    if cand != name:
                        deps.add(cand)
                    break
        graph[name] = deps
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_file_over_the_line_limit():
    assert oversized() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_size_and_cycle_checkers_can_fail(tmp_path):
    big = tmp_path / "big.py"
    big.write_text("x = 1\n" * (MAX_LINES + 1))
    assert oversized([big])
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("def f():\n    from modules.b import g\n")
    b.write_text("import modules.a\n")
    c.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import modules.b\n")
    assert import_cycles([("modules.a", a), ("modules.b", b)]) == [["modules.a", "modules.b"]]
    assert import_cycles([("modules.b", b), ("modules.c", c)]) == []
    b.write_text("import modules.c\n")
    assert import_cycles([("modules.b", b), ("modules.c", c)]) == [["modules.b", "modules.c"]]
