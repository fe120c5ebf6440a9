"""The bad-input corpus (docs/reliability.md#bad-input), run end to end through ``python run.py``.

Every kind of bad input ends in one of two ways: exit status 1, with the other observations done
and the failure recorded in the database (where ``--retry-failed`` and the query scripts see it),
or exit status 2, with nothing run and no database created. Either way the bad item gets exactly
one clear line on stderr naming it and the cause, and no traceback reaches the console.

The data-level kinds share one workspace and one run (one good observation beside every bad
item); each configuration-level kind is one short run that stops at validation.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import PipelineWorkspace

L2_MODULES = [
    "modules.ProcessLevel2.CheckLevel1FileExists.CheckLevel1FileExists.CheckLevel1FileExists()",
    "modules.ProcessLevel2.CreateLevel2File.CreateLevel2File.CreateLevel2File(output_dir='level2')",
    "modules.ProcessLevel2.SystemTemperature.SystemTemperature.SystemTemperature()",
    "modules.ProcessLevel2.FindScans.FindScans.FindScans()",
]
GOOD = 90001  # the tiny archive's observation
FEATURE_VANE_WORD = 1 << 13  # decoded feature 13 is the vane (docs/formats/level1.md#the-features-bit-word)


def level1_name(obsid: int) -> str:
    return f"comap-{obsid:07d}-2026-03-01-143158.hd5"


def copy_as(good: Path, dst_dir: Path, obsid: int, *, attr_obsid: int | None = None) -> Path:
    """A copy of the good file named for ``obsid``, ``/comap.obsid`` set to match (or to ``attr_obsid``)."""
    dst = dst_dir / level1_name(obsid)
    shutil.copyfile(good, dst)
    with h5py.File(dst, "r+") as f:
        f["comap"].attrs["obsid"] = obsid if attr_obsid is None else attr_obsid
    return dst


# --------------------------------------------------------------------------------------------------
# Data-level kinds: each a bad level-1 item beside the good file
# --------------------------------------------------------------------------------------------------


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: int(0.4 * len(data))])


def _delete(name: str):
    def make(p: Path) -> None:
        with h5py.File(p, "r+") as f:
            del f[name]

    return make


def _delete_obsid_attr(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        del f["comap"].attrs["obsid"]


def _nan_feed(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f["spectrometer/tod"][1] = np.nan  # the second feed (feed 2)


def _no_vane(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        w = f["spectrometer/features"][...]
        w[w >= FEATURE_VANE_WORD] = 0
        f["spectrometer/features"][...] = w


def _short_feed_list(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        del f["spectrometer/feeds"]
        f["spectrometer/feeds"] = np.array([1, 2], dtype=np.int32)  # the TOD still has three feeds


def _mjd_backwards(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        f["spectrometer/MJD"][...] = f["spectrometer/MJD"][...][::-1]


def _no_scans(p: Path) -> None:
    with h5py.File(p, "r+") as f:
        w = f["spectrometer/features"][...]
        w[w < FEATURE_VANE_WORD] = 0  # only the vane events keep a feature
        f["spectrometer/features"][...] = w


@dataclass(frozen=True)
class DataKind:
    obsid: int
    make: object  # callable(level1_dir, good_path) -> None
    job: str | None  # the job stage whose failure is recorded; None: the observation is done
    cause: str  # in the console line and in the recorded error


def _file(mutate):
    def make(d: Path, good: Path, obsid: int) -> None:
        mutate(copy_as(good, d, obsid))

    return make


DATA_KINDS = {
    "truncated_40_percent": DataKind(90002, _file(_truncated), "level1", "truncated file"),
    "zero_byte": DataKind(
        90003, lambda d, g, o: (d / level1_name(o)).write_bytes(b""), "level1", "empty file (0 bytes)"
    ),
    "not_hdf5": DataKind(
        90004, lambda d, g, o: (d / level1_name(o)).write_text("not HDF5\n"), "level1", "not an HDF5 file"
    ),
    "directory_named_hd5": DataKind(
        90005, lambda d, g, o: (d / level1_name(o)).mkdir(), "level1", "directory"
    ),
    "missing_dataset_tod": DataKind(
        90006, _file(_delete("spectrometer/tod")), "level2", "missing dataset spectrometer/tod"
    ),
    "missing_dataset_pointing": DataKind(
        90007,
        _file(_delete("spectrometer/pixel_pointing")),
        "level2",
        "missing dataset spectrometer/pixel_pointing",
    ),
    "missing_attribute_obsid": DataKind(
        90008, _file(_delete_obsid_attr), "level1", "missing attribute /comap.obsid"
    ),
    "obsid_name_differs_from_attribute": DataKind(
        90009,
        lambda d, g, o: copy_as(g, d, o, attr_obsid=90099),
        "level1",
        "obsid mismatch: file name says 90009, /comap.obsid says 90099",
    ),
    "all_nan_feed": DataKind(90010, _file(_nan_feed), None, "feed 2 has no finite Tsys"),
    "no_vane_event": DataKind(90011, _file(_no_vane), "level2", "no vane event"),
    "no_scans": DataKind(90012, _file(_no_scans), "level2", "no scans found"),
    "tod_shape_differs_from_feeds": DataKind(
        90013, _file(_short_feed_list), "level2", "spectrometer/tod has shape (3, 4, 16, 5750) but"
    ),
    "mjd_not_increasing": DataKind(90014, _file(_mjd_backwards), "level2", "MJD not strictly increasing"),
    "missing_vane_housekeeping": DataKind(
        90015, _file(_delete("hk/antenna0/vane")), "level2", "missing dataset hk/antenna0/vane"
    ),
}


def _item_lines(stderr: str, obsid: int) -> list[str]:
    """WARNING/ERROR console lines about ``obsid`` (the simulator's own /truth notice left out)."""
    tags = (f"[{obsid:07d}]", level1_name(obsid), f"ObsID {obsid}")
    return [
        line
        for line in stderr.splitlines()
        if line.startswith(("WARNING", "ERROR", "ConfigError"))
        and any(t in line for t in tags)
        and "/truth group present" not in line
    ]


def _jobs(db_path: Path) -> dict[tuple[int, str], tuple[str, str | None]]:
    from modules.SQLModule.SQLModule import db

    db.connect(str(db_path), create=False, read_only=True)
    try:
        return {(j.obsid, j.stage): (j.status, j.error) for j in db.job_table(None)}
    finally:
        db.disconnect()


def _failed_by_script(db_path: Path) -> list[dict]:
    """``python -m modules.scripts.query_statistics failed --format json`` (run in process)."""
    from modules.scripts.query_statistics import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["failed", "--db", str(db_path), "--format", "json"]) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def data_run(tiny_archive, tmp_path_factory):
    """One run of DataAssess + Level2Pipeline over the good file and every data-level bad item."""
    (good,) = tiny_archive.paths
    ws = PipelineWorkspace(tmp_path_factory.mktemp("bad-data"), [])
    copy_as(good, ws.level1, GOOD)
    for kind in DATA_KINDS.values():
        kind.make(ws.level1, good, kind.obsid)
    ws.write_configs(L2_MODULES)
    res = ws.run(timeout=300)
    return ws, res, _jobs(ws.db_path), _failed_by_script(ws.db_path)


def test_data_run_finishes_the_batch(data_run):
    """Exit 1, the good observation (and the all-NaN-feed one) done, no traceback anywhere."""
    ws, res, jobs, _ = data_run
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert jobs[(GOOD, "level2")][0] == "done"
    assert len(ws.level2_files()) == 2  # the good one and the all-NaN-feed one
    assert list((ws.root / "level2" / "resolved_configs").glob("*_level2.toml"))


@pytest.mark.parametrize("kind", list(DATA_KINDS))
def test_bad_level1_item(data_run, kind):
    ws, res, jobs, failed = data_run
    k = DATA_KINDS[kind]
    lines = _item_lines(res.stderr, k.obsid)
    if k.job is None:  # handled by the physics: the observation is done, with a warning
        assert jobs[(k.obsid, "level2")][0] == "done"
        assert any(k.cause in line for line in lines), lines
        assert all(line.startswith("WARNING") for line in lines), lines
        from utils import level2 as l2layout

        (path,) = [p for p in ws.level2_files() if p.name == f"Level2_{level1_name(k.obsid)}"]
        with h5py.File(path, "r") as f:
            feeds = list(f["spectrometer/feeds"][...])
            tsys = f[str(l2layout.VANE_TSYS)][...]  # (event, feed, band, channel), K
        assert feeds == [1, 2]
        assert np.isnan(tsys[:, 1]).all() and np.isfinite(tsys[:, 0]).all()  # feed 2 recorded as NaN
        return
    assert len(lines) == 1, lines
    assert k.cause in lines[0]
    status, error = jobs[(k.obsid, k.job)]
    assert status == "failed" and k.cause in error
    assert (k.obsid, "level2" if k.job == "level1" else "level1") not in jobs
    listed = [r for r in failed if r["obsid"] == k.obsid]
    assert [r["stage"] for r in listed] == [k.job] and k.cause in listed[0]["error"]


def test_unusable_files_are_skipped_retried_and_cleared(data_run, tiny_archive):
    """A second run skips the recorded failures (exit 0); ``--retry-failed`` reads them again
    (exit 1, the same lines); a fixed file is registered and its failure record cleared."""
    ws, _, _, _ = data_run
    level1_failures = [k.obsid for k in DATA_KINDS.values() if k.job == "level1"]

    res = ws.run(timeout=300)
    assert res.returncode == 0, res.stderr
    assert "use --retry-failed" in res.stderr
    assert all(_item_lines(res.stderr, o) == [] for o in level1_failures)

    res = ws.run("--retry-failed", timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    for kind in DATA_KINDS.values():
        if kind.job is not None:
            assert len(_item_lines(res.stderr, kind.obsid)) == 1, kind

    truncated = DATA_KINDS["truncated_40_percent"].obsid
    copy_as(tiny_archive.paths[0], ws.level1, truncated)  # the complete file arrives
    res = ws.run(timeout=300)
    assert res.returncode == 0, res.stderr
    jobs = _jobs(ws.db_path)
    assert jobs[(truncated, "level1")] == ("done", None)
    assert jobs[(truncated, "level2")][0] == "done"
    assert truncated not in [r["obsid"] for r in _failed_by_script(ws.db_path)]


# --------------------------------------------------------------------------------------------------
# Configuration-level kinds: exit 2, nothing run, no database
# --------------------------------------------------------------------------------------------------

MAIN_TEMPLATE = """[Master]
sql_database = {db!r}
{master}
pipeline = [
{stages}]
"""
DATA_ASSESS = "modules.DataAcquisition.DataAssess.DataAssess.DataAssess(level1_data_paths=[{l1!r}])"
LEVEL2 = "modules.ProcessLevel2.ProcessLevel2.Level2Pipeline(config_file='l2.toml')"


def _write(
    ws,
    *,
    db="db.sqlite",
    master="",
    l1="level1",
    l2_extra=(),
    output_dir="level2",
    assess=True,
    l2_db=None,
) -> None:
    stages = ([DATA_ASSESS.format(l1=l1)] if assess else []) + [LEVEL2]
    (ws.root / "main.toml").write_text(
        MAIN_TEMPLATE.format(db=db, master=master, stages="".join(f"  {s!r},\n" for s in stages))
    )
    mods = [*L2_MODULES[:1], L2_MODULES[1].replace("'level2'", repr(output_dir)), *l2_extra]
    (ws.root / "l2.toml").write_text(
        MAIN_TEMPLATE.format(db=l2_db or db, master="", stages="".join(f"  {m!r},\n" for m in mods))
    )


CONFIG_KINDS = {
    # name: (writer(ws), run arguments, text in the one ConfigError line)
    "toml_syntax_error": (
        lambda ws: (_write(ws), (ws.root / "main.toml").write_text("[Master]\npipeline = [\n")),
        ("main.toml",),
        "TOML syntax error",
    ),
    "unknown_module": (
        lambda ws: _write(ws, l2_extra=["modules.ProcessLevel2.NoSuchModule.NoSuchModule()"]),
        ("main.toml",),
        "l2.toml: pipeline[2]: unknown module",
    ),
    "unknown_keyword": (
        lambda ws: _write(
            ws, l2_extra=["modules.ProcessLevel2.FindScans.FindScans.FindScans(max_gapp_s=3.0)"]
        ),
        ("main.toml",),
        "unknown keyword 'max_gapp_s' for FindScans",
    ),
    "wrong_type": (
        lambda ws: _write(
            ws, l2_extra=["modules.ProcessLevel2.FindScans.FindScans.FindScans(max_gap_s='abc')"]
        ),
        ("main.toml",),
        "keyword 'max_gap_s' of FindScans must be float",
    ),
    "unwritable_output_dir": (
        lambda ws: _write(ws, output_dir="a_file/level2"),
        ("main.toml",),
        "output_dir: cannot write level-2 files there",
    ),
    "unwritable_database_location": (
        lambda ws: _write(ws, db="a_file/db.sqlite"),
        ("main.toml",),
        "main.toml: Master.sql_database: cannot write the database a_file/db.sqlite",
    ),
    "unwritable_log_file": (
        lambda ws: _write(ws, master="log_file = 'a_file/run.log'"),
        ("main.toml",),
        "main.toml: Master.log_file: cannot write the log file",
    ),
    "missing_config_file": (lambda ws: None, ("nothing.toml",), "nothing.toml: file: config file not found"),
    "config_path_is_a_directory": (
        lambda ws: (ws.root / "cfg.toml").mkdir(),
        ("cfg.toml",),
        "cfg.toml: file: config path is not a file",
    ),
    "missing_level2_config_file": (
        lambda ws: (_write(ws), (ws.root / "l2.toml").unlink()),
        ("main.toml",),
        "l2.toml: file (config_file of Level2Pipeline in main.toml): config file not found",
    ),
    "level1_path_is_a_file": (
        lambda ws: _write(ws, l1="a_file"),
        ("main.toml",),
        "level1_data_paths: a_file is not a directory",
    ),
    "missing_level1_directory": (
        lambda ws: _write(ws, l1="no_such_dir"),
        ("main.toml",),
        "level1_data_paths: directory no_such_dir does not exist",
    ),
    "mistyped_sql_database": (
        lambda ws: _write(ws, db="db.sqlit", assess=False),
        ("main.toml",),
        "Master.sql_database: database db.sqlit does not exist",
    ),
    "dry_run_mistyped_sql_database": (
        lambda ws: _write(ws, db="db.sqlit", assess=False),
        ("main.toml", "--dry-run"),
        "Master.sql_database: database db.sqlit does not exist",
    ),
}


@pytest.mark.parametrize("kind", list(CONFIG_KINDS))
def test_bad_configuration(workspace_factory, tiny_archive, kind):
    write, args, text = CONFIG_KINDS[kind]
    ws = workspace_factory(tiny_archive.paths, copy=False)
    (ws.root / "a_file").write_text("a regular file where a directory is expected\n")
    write(ws)
    res = ws.run(*args[1:], config=args[0], timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ConfigError: "), lines
    assert text in lines[0], lines
    assert not ws.db_path.exists() and not (ws.root / "db.sqlit").exists()
    assert not (ws.root / "level2").exists()


def test_database_without_schema_is_refused(workspace_factory, tiny_archive, db_url):
    """A level-2-only run refuses a missing SQLite file or an empty PostgreSQL database, naming it
    (exit 2, nothing created); ``--create-db`` creates it and the run goes on (exit 0)."""
    from modules.SQLModule.SQLModule import db

    ws = workspace_factory(tiny_archive.paths, copy=False)
    _write(ws, db=db_url, assess=False)
    res = ws.run(timeout=120)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    (line,) = [x for x in res.stderr.splitlines() if x.startswith("ConfigError")]
    shown = db_url if "://" not in db_url else db_url.rsplit("/", 1)[-1]
    assert "Master.sql_database" in line and shown in line and "--create-db" in line
    if "://" not in db_url:
        assert not Path(db_url).exists()
    else:
        from sqlalchemy import create_engine, inspect

        engine = create_engine(db_url)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
    res = ws.run("--create-db", timeout=120)
    assert res.returncode == 0, res.stderr
    db.connect(db_url, create=False, read_only=True)
    try:
        assert db.query_all_obsids() == []  # created, and nothing registered: no DataAssess in this run
    finally:
        db.disconnect()


def test_query_scripts_refuse_a_missing_database(tmp_path, capsys):
    from modules.scripts.query_statistics import main

    target = tmp_path / "nope.sqlite"
    assert main(["failed", "--db", str(target)]) == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(target) in err[0] and "does not exist" in err[0]
    assert not target.exists()
