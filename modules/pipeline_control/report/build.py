"""Assemble the run report folder and publish it atomically (docs/operations.md#run-report).

The folder is built under a hidden temporary name beside its final place and renamed when it is
whole (docs/reliability.md#killed-at-any-point), so a reader never sees a half-written report.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import modules.pipeline_control.report.figures as figures
import modules.pipeline_control.report.gather as gather
import modules.pipeline_control.report.render as render
from utils.processes import pid_alive

log = logging.getLogger("comap.report")


@dataclass
class ReportInputs:
    """What the runner knows about a finished run.

    Parameters
    ----------
    run_id, timestamp : str
        The run's id and start time (``YYYY-mm-dd_HH-MM-SS`` UTC).
    config_file : pathlib.Path
        The main configuration file.
    log_file : pathlib.Path
        The run's log file; the report is ``<log dir>/<log stem>_report/index.html``.
    code_version : str
        ``git describe`` or the package version.
    results : sequence of StageResult
        The per-stage outcome.
    resolved : mapping
        The resolved configuration (``RunConfig.resolved_dict()``).
    dump_path : pathlib.Path or None
        The resolved-configuration dump written by the runner.
    database : str
        The database as configured (``[Master] sql_database``).
    exit_status : int
        The run's exit status.
    """

    run_id: str
    timestamp: str
    config_file: Path
    log_file: Path
    code_version: str
    results: Sequence[Any] = field(default_factory=list)
    resolved: Mapping[str, Any] = field(default_factory=dict)
    dump_path: Path | None = None
    database: str = ""
    exit_status: int = 0


def report_dir(log_file: Path) -> Path:
    """``<log dir>/<log stem>_report``."""
    log_file = Path(log_file)
    return log_file.with_name(f"{log_file.stem}_report")


def write_run_report(inputs: ReportInputs, db: Any) -> Path:
    """Write the report of a run and return the path of its ``index.html``.

    Parameters
    ----------
    inputs : ReportInputs
        The run.
    db : modules.SQLModule.SQLModule.SQLModule
        The connected database facade (read only here).
    """
    t0 = time.monotonic()
    final = report_dir(inputs.log_file)
    remove_orphans(final.parent)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build(inputs, db, tmp, final)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("run report written in %.2f s", time.monotonic() - t0)
    return final / "index.html"


def remove_orphans(log_dir: Path) -> list[Path]:
    """Remove the temporary report folders (``.<name>_report.partial-<pid>`` or ``.old-<pid>``) of
    processes that are gone, e.g. a run killed while writing its report; return what was removed."""
    removed = []
    for p in Path(log_dir).glob(".*_report.*-*"):
        kind, _, pid = p.name.rpartition("-")
        if p.is_dir() and kind.endswith((".partial", ".old")) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _build(inputs: ReportInputs, db: Any, out: Path, final: Path) -> None:
    title = f"comap-reduce run {inputs.run_id}"
    rows = gather.observation_rows(db, inputs.run_id)
    level2_links = {
        r.obsid: render.Link(Path(r.level2_path).name, render.relative_href(Path(r.level2_path), final))
        for r in rows
        if r.level2_path and Path(r.level2_path).is_file()
    }
    spectra = gather.tsys_gain_spectra(rows)
    noise = gather.noise_table(db, rows)
    cal = gather.calibrator_points(db)
    products, n_products = gather.map_products(inputs.resolved)
    model_files = gather.calibration_model_files(inputs.resolved)

    def fig(fn, data, name: str) -> str | None:
        path = fn(data, out / name)
        return None if path is None else path.name

    tsys_png = fig(figures.tsys_gain_figure, spectra, "tsys_gain.png")
    tsys_time_png = fig(figures.tsys_time_figure, rows, "tsys_time.png")
    noise_png = fig(figures.noise_figure, noise, "noise.png")
    cal_png = fig(figures.calibrator_figure, cal, "calibrator_flux.png")

    thumbs = []
    for i, p in enumerate(products):
        src = full = None
        if p.png is not None:
            src = f"map_{i:03d}_{p.png.name}"
            figures.thumbnail(p.png, out / src)
            full = render.Link("PNG", render.relative_href(p.png, final))
        fits = render.Link(p.fits.name, render.relative_href(p.fits, final))
        thumbs.append((src, fits, full, p.module))

    body = [f"<h1>{escape(title)}</h1>"]
    body += _provenance(inputs, final, model_files)
    body += [
        '<h2 id="stages">Stages</h2>',
        render.stage_table(inputs.results),
        render.stage_failures(inputs.results),
    ]
    section, pages = render.observation_pages(rows, level2_links, title)
    body += [
        '<h2 id="summary">Observations at a glance</h2>',
        render.count_tables(rows),
        '<h2 id="failures">Failures</h2>',
        render.failures_list(rows),
        '<h2 id="observations">Observations</h2>',
        section,
        '<h2 id="tsys">Tsys and gain</h2>',
        f'<p class="note">Spectra: median over vane events of {len(spectra.files)} of {spectra.n_candidates} '
        "level-2 file(s) (spread over the run): "
        + ", ".join(render.link(render.Link(p.name, render.relative_href(p, final))) for p in spectra.files)
        + "</p>",
        render.figure(tsys_png, "Tsys and gain spectra per feed"),
        render.figure(tsys_time_png, "median Tsys per observation"),
        '<h2 id="noise">Noise</h2>',
        render.noise_table_html(noise),
        render.figure(noise_png, "noise per feed and band"),
        '<h2 id="calibrators">Calibrators</h2>',
        render.figure(cal_png, "calibrator flux against time"),
        '<h2 id="maps">Maps and cubes</h2>',
    ]
    if products:
        more = f" (the first {len(products)} of {n_products})" if n_products > len(products) else ""
        body += [f'<p class="note">Each image links to its FITS file{more}.</p>', render.gallery(thumbs)]
    else:
        body.append("<p>No map or cube products.</p>")
    _write_text(out / "index.html", render.document(title, body))
    for page in pages:
        _write_text(out / page.name, render.document(page.title, page.body))


def _provenance(inputs: ReportInputs, final: Path, model_files: list[Path]) -> list[str]:
    def file_link(path: Path | None) -> str:
        if path is None:
            return ""
        return render.link(render.Link(str(path), render.relative_href(path, final)))

    pairs = [
        ("run id", escape(inputs.run_id)),
        ("started (UTC)", escape(inputs.timestamp)),
        ("code version", escape(inputs.code_version)),
        ("exit status", str(inputs.exit_status)),
        ("configuration", file_link(inputs.config_file)),
        ("resolved configuration", file_link(inputs.dump_path)),
        ("log file", file_link(inputs.log_file)),
        ("database", escape(inputs.database)),
        ("calibration model", " ".join(file_link(p) for p in model_files) or "none"),
    ]
    out = ['<h2 id="provenance">Run and provenance</h2>', render.key_values(pairs)]
    if inputs.dump_path is not None and Path(inputs.dump_path).is_file():
        text = Path(inputs.dump_path).read_text(encoding="utf-8", errors="replace")
        cut = len(text) > render.MAX_DUMP_CHARS
        out.append(
            "<details><summary>resolved configuration (parameters of every module)</summary><pre>"
            + escape(text[: render.MAX_DUMP_CHARS])
            + ("\n… (truncated; see the file)" if cut else "")
            + "</pre></details>"
        )
    return out
