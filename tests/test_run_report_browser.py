"""The run report in a real browser (docs/operations.md#run-report): a demo-like run on the ``test-small``
archive plus one level-1 file that fails acquisition, then headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) opens the report from a ``file://`` URL.

Checked in the rendered DOM: one row per observation of the database (registered observations and
obsids with a job, the failed one included), every image decoded (``naturalWidth > 0``), every link
to a file outside the report resolving to an existing file (the FITS products and level-2 files among
them), and no console error. A full-page screenshot is left in ``tests/artifacts/`` (git-ignored).
Without chromium the test skips, or fails when ``browser`` is in ``COMAP_REQUIRE`` (tests/components.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import h5py
import pytest
from components import missing
from conftest import write_demo_like_configs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "tests" / "artifacts" / "run_report.png"
BAD_OBSID = 90104


def _add_bad_file(remote: Path) -> None:
    """A copy of the GField30 file as obsid 90104 without its vane angle: acquisition refuses it."""
    (good,) = sorted(remote.rglob("comap-0090103-*.hd5"))
    bad = good.with_name(f"comap-{BAD_OBSID:07d}-2026-03-01-160000.hd5")
    shutil.copyfile(good, bad)
    with h5py.File(bad, "r+") as f:
        f["comap"].attrs["obsid"] = BAD_OBSID
        del f["hk/antenna0/vane/angle"]
    rel = bad.relative_to(remote).as_posix()
    with open(remote / "obs_index.csv", "a") as fh:
        fh.write(f"{BAD_OBSID},{rel},GField30,,2026-03-01-16:00:00,{bad.stat().st_size}\n")


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory, small_archive):
    """The report of one demo-like run: (workspace, index.html path, the run's stdout)."""
    root = tmp_path_factory.mktemp("report-run")
    remote = root / "remote"
    shutil.copytree(small_archive.root, remote)
    _add_bad_file(remote)
    write_demo_like_configs(root, remote, main_master="log_file = 'logs/{timestamp}_main.log'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "main.toml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]  # the bad file is a failure
    lines = res.stdout.strip().splitlines()
    m = re.fullmatch(r"run report: (.+)", lines[-1])
    assert m, lines[-5:]
    index = root / m.group(1)
    assert index.is_file() and index.parent.name.endswith("_main_report")
    return root, index, res.stdout


def _database_obsids(db_path: Path) -> set[int]:
    from modules.SQLModule.SQLModule import SQLModule

    db = SQLModule()
    db.connect(str(db_path), read_only=True)
    try:
        return set(db.query_all_obsids()) | {int(j.obsid) for j in db.job_table(None)}
    finally:
        db.disconnect()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing(
            "browser", f"{CHROMIUM} or {CHROMEDRIVER} not found (apt-get install chromium chromium-driver)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        missing("browser", f"selenium is not installed: {exc}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download a browser or driver
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _visit(driver, url: str) -> dict:
    """Load ``url`` and return its observation rows, images and links as the browser sees them."""
    driver.get(url)
    return driver.execute_script(
        """
        const imgs = Array.from(document.images).map(
            i => [i.getAttribute('src'), i.complete, i.naturalWidth]);
        const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
        const rows = Array.from(document.querySelectorAll('tr.obs-row')).map(
            r => [Number(r.dataset.obsid), r.classList.contains('failed'), r.innerText]);
        return {imgs: imgs, links: links, rows: rows, title: document.title};
        """
    )


def test_report_renders_in_chromium(demo_report, browser):
    root, index, _stdout = demo_report
    pages = [index.as_uri()]
    seen: list[int] = []
    failed_rows: dict[int, str] = {}
    images = links = 0
    visited = set()
    while pages:
        url = pages.pop(0)
        if url in visited:
            continue
        visited.add(url)
        dom = _visit(browser, url)
        assert dom["title"].startswith("comap-reduce run ")
        for src, complete, width in dom["imgs"]:
            assert complete and width > 0, f"image {src} of {url} did not load"
            images += 1
        for obsid, failed, text in dom["rows"]:
            seen.append(obsid)
            if failed:
                failed_rows[obsid] = text
        for href in dom["links"]:
            target = Path(unquote(urlparse(href).path))
            assert urlparse(href).scheme == "file", href  # nothing from the network
            assert target.exists(), f"{url}: link {href} points at nothing"
            if target.suffix == ".html" and target.parent == index.parent:
                pages.append(target.as_uri())
            links += 1
        logs = browser.get_log("browser")
        assert [e for e in logs if e["level"] == "SEVERE"] == [], logs

    assert sorted(seen) == sorted(_database_obsids(root / "db.sqlite"))  # each observation exactly once
    assert BAD_OBSID in failed_rows and "vane/angle" in failed_rows[BAD_OBSID], failed_rows
    assert images >= 6  # Tsys/gain, Tsys per observation, noise, calibrator, the map and the cube
    hrefs = [Path(unquote(urlparse(h).path)) for h in _visit(browser, index.as_uri())["links"]]
    products = sorted((root / "maps").glob("*.fits")) + sorted((root / "cubes").glob("*.fits"))
    assert products and all(p.resolve() in {h.resolve() for h in hrefs} for p in products)
    level2 = sorted((root / "level2").rglob("Level2_*"))
    assert level2 and all(p.resolve() in {h.resolve() for h in hrefs} for p in level2)

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height) + 300, 10000))
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_report_path_is_the_last_line_and_in_the_log(demo_report):
    root, index, stdout = demo_report
    assert stdout.strip().splitlines()[-1] == f"run report: {index.relative_to(root)}"
    (log,) = sorted((root / "logs").glob("*_main.log"))
    assert index.parent == log.with_name(f"{log.stem}_report")
    assert f"run report: {index.relative_to(root)}" in log.read_text()
    assert not [p for p in index.parent.parent.iterdir() if p.name.startswith(".")]  # no partial folder
