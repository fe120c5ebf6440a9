"""HTML of the run report (docs/operations.md#run-report): static pages with relative links only, inline
CSS, no scripts and nothing fetched from the network."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import quote

from modules.pipeline_control.report.gather import NOISE_COLUMNS, NoiseTable, ObservationRow

PAGE_SIZE = 200
"""Observation rows per page; with more observations the table is split into ``observations_NNN.html``."""
MAX_FAILURES_ON_INDEX = 50
"""Failed observations listed on the index page (all of them are in the observation table)."""
MAX_DUMP_CHARS = 200_000
"""Characters of the resolved configuration embedded in the index page (the file is linked whole)."""

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:80em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right}
tr.failed td{background:#fde8e8}tr.done td.status{color:#176317}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.gallery figure{margin:0;width:22em}
.gallery img{width:100%;border:1px solid #ccc}figcaption{font-size:.8em;overflow-wrap:anywhere}
img.figure{max-width:100%;border:1px solid #ddd}
pre{background:#f7f7f7;padding:.5em;overflow:auto;font-size:.8em}
nav.pages a{margin-right:.4em}.note{color:#555;font-size:.9em}
"""


@dataclass
class Link:
    """A relative link from the report folder to a file outside it (``href`` is URL-quoted)."""

    text: str
    href: str


@dataclass
class Page:
    """One HTML file of the report: its name and body."""

    name: str
    title: str
    body: list[str] = field(default_factory=list)


def relative_href(target: Path, report_dir: Path) -> str:
    """URL-quoted relative path from ``report_dir`` to ``target`` (both made absolute)."""
    rel = os.path.relpath(Path(target).resolve(), Path(report_dir).resolve())
    return quote(Path(rel).as_posix())


def document(title: str, body: Iterable[str]) -> str:
    """A whole HTML document with the report's inline style."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, row_class: str | None = None) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    cls = f' class="{row_class}"' if row_class else ""
    body = "".join(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column table of already-escaped values."""
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def link(item: Link | None) -> str:
    return "" if item is None else f'<a href="{item.href}">{escape(item.text)}</a>'


def stage_table(results: Sequence) -> str:
    """The per-stage summary (the runner's StageResult list)."""
    rows = []
    for r in results:
        state = "FATAL: " + r.fatal if r.fatal else ("interrupted" if r.interrupted else "")
        rows.append(
            [escape(r.stage)]
            + [f'<span class="num">{v}</span>' for v in (r.done, r.skipped, r.failed, r.retried)]
            + [escape(state)]
        )
    return table(["stage", "done", "skipped", "failed", "retried", "state"], rows)


def stage_failures(results: Sequence) -> str:
    """Each distinct failure reason per stage with its count."""
    reasons: Counter[tuple[str, str]] = Counter()
    for r in results:
        for _item, reason in r.failures:
            reasons[(r.stage, reason)] += 1
    if not reasons:
        return ""
    rows = [[escape(s), escape(reason), str(n)] for (s, reason), n in reasons.most_common()]
    return table(["stage", "reason", "count"], rows)


def count_tables(rows: Sequence[ObservationRow]) -> str:
    """Counts of observations per status, per source and status, and of jobs per stage and status."""
    statuses = sorted({r.status for r in rows}, key=lambda s: (s != "failed", s))
    by_status = Counter(r.status for r in rows)
    parts = [table(["status", "observations"], [[escape(s), str(by_status[s])] for s in statuses])]
    by_source: dict[str, Counter[str]] = {}
    for r in rows:
        by_source.setdefault(r.source or "(unregistered)", Counter())[r.status] += 1
    parts.append(
        table(
            ["source", *statuses, "total"],
            [
                [escape(src), *(str(c[s]) for s in statuses), str(sum(c.values()))]
                for src, c in sorted(by_source.items())
            ],
        )
    )
    by_stage: dict[str, Counter[str]] = {}
    for r in rows:
        for item in filter(None, r.stages.split(", ")):
            stage, _, status = item.rpartition(" ")
            by_stage.setdefault(stage, Counter())[status] += 1
    if by_stage:
        job_statuses = sorted({s for c in by_stage.values() for s in c})
        parts.append(
            table(
                ["job stage", *job_statuses],
                [[escape(st), *(str(c[s]) for s in job_statuses)] for st, c in sorted(by_stage.items())],
            )
        )
    return '<div class="gallery">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"


def observation_table(rows: Sequence[ObservationRow], level2_links: dict[int, Link]) -> str:
    """One table row (``class="obs-row"``, ``data-obsid``) per observation."""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("obsid", "source", "UTC start", "status", "reason", "jobs", "median Tsys (K)", "level-2")
    )
    body = []
    for r in rows:
        tsys = "" if r.median_tsys is None else f"{r.median_tsys:.1f}"
        mark = " ★" if r.this_run else ""
        body.append(
            f'<tr class="obs-row {escape(r.status)}" data-obsid="{r.obsid}"><td>{r.obsid}{mark}</td>'
            f"<td>{escape(r.source)}</td><td>{escape(r.utc_start)}</td>"
            f'<td class="status">{escape(r.status)}</td><td>{escape(r.reason)}</td>'
            f'<td>{escape(r.stages)}</td><td class="num">{tsys}</td>'
            f"<td>{link(level2_links.get(r.obsid))}</td></tr>"
        )
    return f'<table class="observations"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def page_name(i: int) -> str:
    """File name of observation page ``i`` (1-based)."""
    return f"observations_{i:03d}.html"


def observation_pages(
    rows: Sequence[ObservationRow], level2_links: dict[int, Link], title: str
) -> tuple[str, list[Page]]:
    """The observation section of the index page and the pages it links (none for ≤ PAGE_SIZE rows)."""
    note = '<p class="note">Failures first, then by obsid; ★ marks observations with a job of this run.</p>'
    if len(rows) <= PAGE_SIZE:
        return note + observation_table(rows, level2_links), []
    n = (len(rows) + PAGE_SIZE - 1) // PAGE_SIZE
    pages = []
    for i in range(1, n + 1):
        chunk = rows[(i - 1) * PAGE_SIZE : i * PAGE_SIZE]
        nav = ['<nav class="pages"><a href="index.html">report</a>']
        if i > 1:
            nav.append(f'<a rel="prev" href="{page_name(i - 1)}">previous</a>')
        if i < n:
            nav.append(f'<a rel="next" href="{page_name(i + 1)}">next</a>')
        nav.append(f"page {i} of {n}</nav>")
        pages.append(
            Page(
                page_name(i),
                f"{title}: observations {i}/{n}",
                [
                    f"<h1>Observations, page {i} of {n}</h1>",
                    "".join(nav),
                    note,
                    observation_table(chunk, level2_links),
                ],
            )
        )
    links = " ".join(
        f'<a href="{page_name(i)}">{(i - 1) * PAGE_SIZE + 1}–{min(i * PAGE_SIZE, len(rows))}</a>'
        for i in range(1, n + 1)
    )
    return (
        f'<p>{len(rows)} observations on {n} pages of {PAGE_SIZE}:</p><nav class="pages">{links}</nav>',
        pages,
    )


def failures_list(rows: Sequence[ObservationRow]) -> str:
    """The first failed observations (``class="failure-row"``), with how many there are in all."""
    failed = [r for r in rows if r.status == "failed"]
    if not failed:
        return "<p>No observation failed.</p>"
    shown = failed[:MAX_FAILURES_ON_INDEX]
    more = f" (the first {len(shown)} are listed)" if len(failed) > len(shown) else ""
    return f"<p>{len(failed)} failed observation(s){more}.</p>" + table(
        ["obsid", "source", "reason"],
        [[str(r.obsid), escape(r.source), escape(r.reason)] for r in shown],
        row_class="failure-row",
    )


def noise_table_html(noise: NoiseTable) -> str:
    """Median white level, knee and slope per (feed, band)."""
    if not noise.medians:
        return "<p>No noise statistics in the database.</p>"
    rows = [
        [str(f), str(b), *(f"{noise.medians[(f, b)][c]:.4g}" for c in NOISE_COLUMNS)]
        for f, b in sorted(noise.medians)
    ]
    return (
        f'<p class="note">Medians over channels and {noise.n_observations} of {noise.n_candidates} '
        "observation(s) with a level-2 file (database quality_flags, after the gain filter).</p>"
        + table(["feed", "band", "white noise (K)", "knee (Hz)", "slope α"], rows)
    )


def figure(name: str | None, alt: str) -> str:
    if name is None:
        return f'<p class="note">No data for: {escape(alt)}.</p>'
    return f'<p><img class="figure" src="{quote(name)}" alt="{escape(alt)}"></p>'


def gallery(items: Sequence[tuple[str | None, Link, Link | None, str]]) -> str:
    """Thumbnails (``src`` inside the report folder, or None) each linked to its product file, with
    the product's name, its full-size quicklook and the module that wrote it as caption."""
    out = []
    for src, target, full, module in items:
        img = f'<img src="{quote(src)}" alt="{escape(target.text)}">' if src else "(no quicklook)"
        extra = f" · {link(full)}" if full is not None else ""
        out.append(
            f'<figure><a class="product" href="{target.href}">{img}</a>'
            f"<figcaption>{link(target)}{extra} ({escape(module)})</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(out) + "</div>"
