"""Sphinx directives that generate reference tables from the code.

``{comap-modules}``
    Every pipeline module (discovered under ``modules/``): call path, kind, summary, declared
    ``reads`` / ``writes`` and a table of its parameters (name, type, default, description).
``{comap-layout} level2`` (or ``level1``)
    Every entry of a layout registry: path, kind, axes, dtype, unit, description. For a file kind
    whose registry does not exist, the directive produces nothing.
``{comap-axes}``
    The axis letters used in the layout tables.

Import problems while discovering modules are Sphinx warnings, so ``make docs`` (``-W``) fails on
a module that cannot be imported.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comap_tables

log = logging.getLogger(__name__)

# ``x``, `x` and :role:`x` in docstrings become literals; everything else is plain text.
_INLINE = re.compile(r"(?::[\w:.-]+:)?``(.+?)``|(?::[\w:.-]+:)?`([^`]+)`")


def _inline(text: str) -> list[nodes.Node]:
    out: list[nodes.Node] = []
    pos = 0
    for m in _INLINE.finditer(text):
        if m.start() > pos:
            out.append(nodes.Text(text[pos : m.start()]))
        code = m.group(1) or m.group(2)
        out.append(nodes.literal(code, code.lstrip("~")))
        pos = m.end()
    if pos < len(text):
        out.append(nodes.Text(text[pos:]))
    return out


def _cell(content: str | nodes.Node, literal: bool = False) -> nodes.entry:
    entry = nodes.entry()
    if isinstance(content, nodes.Node):
        entry += content
    elif content:
        para = nodes.paragraph()
        para += [nodes.literal(content, content)] if literal else _inline(content)
        entry += para
    return entry


def _table(header: tuple[str, ...], rows: list[tuple], literal_columns: set[int], widths: list[int]):
    table = nodes.table(classes=["comap-generated"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for w in widths:
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    row = nodes.row()
    for h in header:
        row += _cell(h)
    head += row
    group += head
    body = nodes.tbody()
    for values in rows:
        row = nodes.row()
        for i, v in enumerate(values):
            row += _cell(v, literal=i in literal_columns)
        body += row
    group += body
    return table


def _paragraph(*parts: str | nodes.Node) -> nodes.paragraph:
    para = nodes.paragraph()
    for p in parts:
        para += _inline(p) if isinstance(p, str) else p
    return para


@functools.cache
def _modules() -> tuple[list[comap_tables.ModuleDoc], list[str]]:
    # Importing every module also registers the layout entries that stages add themselves.
    return comap_tables.discover_modules()


def _section(document: nodes.document, title: str, ident: str) -> nodes.section:
    section = nodes.section(ids=[ident], names=[nodes.fully_normalize_name(ident)])
    section += nodes.title(title, title)
    document.note_implicit_target(section, section)
    return section


class ModulesDirective(Directive):
    """``{comap-modules} KIND``: the generated reference of every module of one kind.

    KIND is ``stage``, ``per_observation``, ``streaming`` or ``map_job``. The page gives each kind
    its own Markdown heading, so the headings (and their anchors) are written, not generated.
    """

    required_arguments = 1
    has_content = False

    def run(self) -> list[nodes.Node]:
        kind = self.arguments[0].strip()
        if kind not in comap_tables.KIND_TITLES:
            raise self.error(
                f"comap-modules: unknown kind {kind!r}; known: {', '.join(comap_tables.KIND_TITLES)}"
            )
        docs, errors = _modules()
        for err in errors:
            log.warning("comap-modules: import error: %s", err, location=self.state.document.current_source)
        document = self.state.document
        members = [d for d in docs if d.kind == kind]
        if not members:
            return [_paragraph("None at present.")]
        return [self._module_section(document, d) for d in members]

    def _module_section(self, document: nodes.document, d: comap_tables.ModuleDoc) -> nodes.section:
        name = d.path.rsplit(".", 1)[-1]
        section = _section(document, name, nodes.make_id("module-" + d.path))
        section += _paragraph(nodes.literal(d.path, d.path))
        if d.summary:
            section += _paragraph(d.summary)
        for label, paths in (("Reads", d.reads), ("Writes", d.writes)):
            if paths:
                parts: list[str | nodes.Node] = [f"{label}: "]
                for i, p in enumerate(paths):
                    parts += [", "] if i else []
                    parts.append(nodes.literal(p, p))
                section += _paragraph(*parts)
        if d.parameters:
            rows = [(p.name, p.type, p.default, p.description) for p in d.parameters]
            section += _table(("Parameter", "Type", "Default", "Description"), rows, {0, 2}, [18, 18, 16, 48])
        else:
            section += _paragraph("No parameters.")
        return section


class LayoutDirective(Directive):
    """``{comap-layout} level2``: the generated table of a layout registry.

    With the ``:axes:`` flag the axis-letter table is put before it. For a file kind whose registry
    does not exist (yet), the directive produces nothing.
    """

    required_arguments = 1
    has_content = False
    option_spec = {"axes": directives.flag}

    def run(self) -> list[nodes.Node]:
        file = self.arguments[0].strip()
        if file not in comap_tables.LAYOUT_REGISTRIES:
            raise self.error(f"comap-layout: unknown file kind {file!r}")
        _modules()
        layout = comap_tables.load_layout(file)
        if layout is None:
            return []
        modname, attr = comap_tables.LAYOUT_REGISTRIES[file]
        lead = _paragraph(
            "Generated from the registry ",
            nodes.literal(f"{modname}.{attr}", f"{modname}.{attr}"),
            f" ({len(layout)} entries):",
        )
        out: list[nodes.Node] = []
        if "axes" in self.options:
            out.append(_axes_table())
        rows = comap_tables.layout_rows(layout)
        out += [lead, _table(comap_tables.LAYOUT_COLUMNS, rows, {0, 3}, [30, 8, 10, 8, 10, 34])]
        return out


def _axes_table() -> nodes.table:
    return _table(("Axis", "Meaning"), comap_tables.axis_rows(), {0}, [10, 90])


class AxesDirective(Directive):
    """``{comap-axes}``: the axis letters of the layout tables."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        return [_axes_table()]


def setup(app):
    app.add_directive("comap-modules", ModulesDirective)
    app.add_directive("comap-layout", LayoutDirective)
    app.add_directive("comap-axes", AxesDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
