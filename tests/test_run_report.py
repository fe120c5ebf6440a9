"""The run report without a browser (docs/operations.md#run-report): a fabricated season database of
5000 observations (no level-1 or level-2 files) gives a bounded, paged report in which every
observation appears exactly once, failures first; the runner's hook never changes the exit status.
The rendering in a real browser is tests/test_run_report_browser.py."""

from __future__ import annotations

import logging
import os
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import insert

from modules.pipeline_control import runner
from modules.pipeline_control.base import StageResult
from modules.pipeline_control.report import ReportInputs, report_dir, write_run_report
from modules.pipeline_control.report.render import MAX_FAILURES_ON_INDEX, PAGE_SIZE, page_name
from modules.SQLModule.SQLModule import (
    CalibrationFlux,
    CalibrationModelFit,
    COMAPData,
    ObservationSummary,
    ProcessingJob,
    QualityFlag,
    SQLModule,
)

N_OBS = 5000
FAIL_EVERY = 37  # 136 failed observations
CAL_EVERY = 50  # a TauA observation every 50th obsid
REASONS = ("no vane event (feature 13)", "no scans found", "<script>alert(1)</script>")
MAX_REPORT_BYTES = 4_000_000
"""Bound on the whole season report: 25 observation pages of ≤ PAGE_SIZE rows (each row a few hundred
bytes, ≤ 150 kB a page), the index page and at most four figures of ≤ 200 kB at 80 dpi."""
MAX_PAGE_BYTES = 150_000


def _season_db(path: Path) -> SQLModule:
    """A database of ``N_OBS`` observations with summaries, download and level-2 jobs, noise statistics of
    3 feeds × 4 bands × 1 channel, calibrator fits and a linear calibration model."""
    db = SQLModule()
    db.connect(str(path), create=True)
    rng = np.random.default_rng(1)
    obs, summ, jobs, flags, cal, models = [], [], [], [], [], []
    for i in range(N_OBS):
        obsid = 10000 + i
        mjd = 61000.0 + i / 10
        source = "TauA" if i % CAL_EVERY == 0 else "GField30"
        failed = i % FAIL_EVERY == 5
        obs.append({"obsid": obsid, "source": source, "mjd_start": mjd, "utc_start": "2026-01-01-00:00:00"})
        obs[-1]["level2_path"] = None if failed else f"/nonexistent/Level2_{obsid}.hd5"
        summ.append({"obsid": obsid, "processing_status": "failed" if failed else "complete"})
        summ[-1]["median_tsys"] = None if failed else float(40 + rng.normal())
        jobs.append({"obsid": obsid, "stage": "download", "status": "done", "attempts": 1, "run_id": "r"})
        jobs.append(
            {
                "obsid": obsid,
                "stage": "level2",
                "status": "failed" if failed else "done",
                "error": REASONS[i % 3] if failed else None,
                "last_module": "SystemTemperature" if failed else None,
                "attempts": 1,
                "run_id": "r",
            }
        )
        if failed:
            continue
        for feed in (1, 2, 3):
            for band in range(4):
                flags.append(
                    {
                        "obsid": obsid,
                        "feed": feed,
                        "band": band,
                        "channel": 0,
                        "filtered_white_noise": 0.01 * feed,
                        "filtered_fknee": 1.0,
                        "filtered_noise_index": -1.5,
                    }
                )
                if source == "TauA":
                    cal.append(
                        {
                            "obsid": obsid,
                            "feed": feed,
                            "band": band,
                            "channel": 0,
                            "mjd": mjd,
                            "source": "TauA",
                            "frequency_ghz": 27.0 + 2 * band,
                            "measured_flux": 350.0 * (1 + 0.01 * rng.normal()),
                            "flux_error": 1.0,
                        }
                    )
    for feed in (1, 2, 3):
        for band in range(4):
            models.append(
                {
                    "source": "TauA",
                    "feed": feed,
                    "band": band,
                    "channel": 0,
                    "model_type": "polynomial",
                    "poly_coeffs": [1.0, 0.01],
                    "mjd_ref": 61000.0,
                    "mjd_min": 61000.0,
                    "mjd_max": 61500.0,
                }
            )
    with db.session() as s:
        for table, rows in (
            (COMAPData, obs),
            (ObservationSummary, summ),
            (ProcessingJob, jobs),
            (QualityFlag, flags),
            (CalibrationFlux, cal),
            (CalibrationModelFit, models),
        ):
            s.execute(insert(table), rows)
    return db


class _Rows(HTMLParser):
    """Collects ``data-obsid`` of ``tr.obs-row``, rows of ``tr.failure-row``, hrefs and img srcs."""

    def __init__(self) -> None:
        super().__init__()
        self.obsids: list[int] = []
        self.failed: list[int] = []
        self.failure_rows = 0
        self.hrefs: list[str] = []
        self.imgs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "tr" and "obs-row" in classes:
            self.obsids.append(int(a["data-obsid"]))
            if "failed" in classes:
                self.failed.append(int(a["data-obsid"]))
        if tag == "tr" and "failure-row" in classes:
            self.failure_rows += 1
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a["src"])
        if tag in ("script", "link", "iframe"):
            self.scripts += 1


def _parse(path: Path) -> _Rows:
    p = _Rows()
    p.feed(path.read_text(encoding="utf-8"))
    return p


@pytest.fixture(scope="module")
def season_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("season")
    db = _season_db(root / "season.sqlite")
    log_file = root / "logs" / "2026-03-01_12-00-00_season.log"
    log_file.parent.mkdir()
    log_file.write_text("")
    dump = log_file.with_name("2026-03-01_12-00-00_season.resolved.toml")
    dump.write_text("[main]\nfile = 'season.toml'\n")
    inputs = ReportInputs(
        run_id="2026-03-01_12-00-00-abcdef12",
        timestamp="2026-03-01_12-00-00",
        config_file=root / "season.toml",
        log_file=log_file,
        code_version="test",
        results=[StageResult(stage="Level2Pipeline", done=N_OBS - 136, failed=136)],
        resolved={"main": {"pipeline": []}},
        dump_path=dump,
        database=str(root / "season.sqlite"),
        exit_status=1,
    )
    t0 = time.monotonic()
    index = write_run_report(inputs, db)
    seconds = time.monotonic() - t0
    expected = {
        "obsids": set(db.query_all_obsids()),
        "failed": {int(j.obsid) for j in db.job_table(None, status="failed")},
    }
    db.disconnect()
    return index, seconds, expected


def test_season_report_is_paged_and_bounded(season_report):
    index, seconds, expected = season_report
    folder = index.parent
    assert folder == report_dir(folder.parent / "2026-03-01_12-00-00_season.log")
    files = sorted(folder.iterdir())
    total = sum(f.stat().st_size for f in files)
    print(f"season report: {len(files)} files, {total / 1e6:.2f} MB, written in {seconds:.1f} s")
    assert total <= MAX_REPORT_BYTES
    n_pages = -(-N_OBS // PAGE_SIZE)
    pages = [folder / page_name(i) for i in range(1, n_pages + 1)]
    assert sorted(f for f in files if f.name.startswith("observations_")) == pages
    assert len([f for f in files if f.suffix == ".png"]) <= 4
    front = _parse(index)
    assert front.obsids == []  # the index holds counts and failures, the table is paged
    assert front.failure_rows == min(MAX_FAILURES_ON_INDEX, len(expected["failed"]))
    assert front.scripts == 0 and not [h for h in front.hrefs if "://" in h]  # nothing from the network
    for i in range(1, n_pages + 1):
        assert page_name(i) in front.hrefs
    seen: list[int] = []
    failed: list[int] = []
    for i, page in enumerate(pages, start=1):
        assert page.stat().st_size <= MAX_PAGE_BYTES
        p = _parse(page)
        assert len(p.obsids) == (PAGE_SIZE if i < n_pages else N_OBS - (n_pages - 1) * PAGE_SIZE)
        assert (page_name(i - 1) in p.hrefs) == (i > 1) and (page_name(i + 1) in p.hrefs) == (i < n_pages)
        seen += p.obsids
        failed += p.failed
        assert "<script>alert" not in page.read_text()  # failure reasons are escaped
    assert len(seen) == len(set(seen)) == N_OBS and set(seen) == expected["obsids"]
    assert set(failed) == expected["failed"] and seen[: len(failed)] == sorted(failed)  # failures first


def test_report_figures_aggregate_the_season(season_report):
    index, _seconds, _expected = season_report
    imgs = _parse(index).imgs
    assert sorted(imgs) == ["calibrator_flux.png", "noise.png", "tsys_time.png"]  # no level-2 files
    for name in imgs:
        assert (index.parent / name).stat().st_size < 200_000


def test_a_failed_report_is_a_warning_and_keeps_the_exit_status(tmp_path, monkeypatch, caplog):
    import modules.pipeline_control.report as report

    def broken(inputs, db):
        raise OSError("disk full")

    monkeypatch.setattr(report, "write_run_report", broken)
    run_logging = SimpleNamespace(log_file=tmp_path / "run.log", handlers=[])
    run_config = SimpleNamespace(resolved_dict=lambda: {}, main=SimpleNamespace(master={}))
    request = SimpleNamespace(run_id="r-1", timestamp="t", config_file=tmp_path / "c.toml")
    with caplog.at_level(logging.WARNING, logger="comap.runner"):
        runner._write_report(run_config, run_logging, request, [], tmp_path / "d.toml", 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "run report not written: OSError: disk full" in warnings[0].getMessage()
    assert not list(tmp_path.iterdir())


def test_a_report_folder_is_replaced_whole(season_report, tmp_path):
    """Writing again replaces the folder by rename; no hidden partial or old folder is left, and the
    partial folder of a dead process is removed (that of a live one is not)."""
    db = SQLModule()
    db.connect(str(tmp_path / "small.sqlite"), create=True)
    log_file = tmp_path / "x.log"
    inputs = ReportInputs("r", "t", tmp_path / "c.toml", log_file, "test")
    stale = report_dir(log_file)
    stale.mkdir()
    (stale / "stale.txt").write_text("old")
    dead = tmp_path / ".y_report.partial-999999999"  # a run killed while writing its report
    alive = tmp_path / f".z_report.partial-{os.getpid()}"  # a report being written now
    for d in (dead, alive):
        d.mkdir()
        (d / "index.html").write_text("")
    index = write_run_report(inputs, db)
    db.disconnect()
    assert index.is_file() and not (index.parent / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [alive.name]
    assert "No observation failed." in index.read_text()


def test_an_interrupted_run_exits_without_a_report(tmp_path, monkeypatch):
    import modules.pipeline_control.report as report

    calls = []
    monkeypatch.setattr(report, "write_run_report", lambda inputs, db: calls.append(inputs))
    run_logging = SimpleNamespace(log_file=tmp_path / "run.log", handlers=[])
    run_config = SimpleNamespace(resolved_dict=lambda: {}, main=SimpleNamespace(master={}))
    request = SimpleNamespace(run_id="r-1", timestamp="t", config_file=tmp_path / "c.toml")
    interrupted = [StageResult(stage="Level2Pipeline", interrupted=True)]
    runner._write_report(run_config, run_logging, request, interrupted, tmp_path / "d.toml", 130)
    assert calls == []
    runner._write_report(run_config, run_logging, request, [StageResult(stage="A")], tmp_path / "d.toml", 0)
    assert len(calls) == 1 and calls[0].run_id == "r-1"
