"""Algorithm versions (docs/operations.md#algorithm-versions): a level-2 file written by an older version of a
stage is out of date for that stage and the stages after it; ``--dry-run`` lists it and a run reprocesses
it (and remakes the maps made from it); a file written before versions were recorded counts as version 1."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import pytest
from conftest import LEVEL2_THROUGH_NOISE_STATS

from modules.pipeline_control import cli
from modules.pipeline_control.base import BaseCOMAPModule, describe_stale, stale_stages
from modules.pipeline_control.provenance import ALGORITHM_VERSION_ATTR, recorded_algorithm_version, sha256_of
from modules.ProcessLevel2.GainFilterAndBin.GainFilterAndBin import GainFilterAndBin
from modules.ProcessLevel2.PostBinCleaning.PostBinCleaning import PostBinCleaning
from modules.SQLModule.SQLModule import COMAPData

CREATE_MAP = "modules.MapMaking.MapMakingModules.CreateMap.CreateMap"
GAIN_OUTPUTS = ("level2/binned_data", "level2/binned_filtered_data", "level2/gain_filter")
SENTINEL = "1999-01-01T00:00:00Z"


# --------------------------------------------------------------------------------------------------
# The rule on a small file, without the pipeline
# --------------------------------------------------------------------------------------------------


class _First(BaseCOMAPModule):
    writes = ("first",)

    def run(self, file_info):  # pragma: no cover - never run here
        raise NotImplementedError


class _Second(BaseCOMAPModule):
    writes = ("second",)

    def run(self, file_info):  # pragma: no cover - never run here
        raise NotImplementedError


class _Third(BaseCOMAPModule):
    writes = ("third",)
    runs_with_others = True

    def run(self, file_info):  # pragma: no cover - never run here
        raise NotImplementedError


def _file_info(path: Path) -> COMAPData:
    fi = COMAPData(obsid=1)
    fi.level2_path = str(path)
    return fi


def _write(path: Path, modules, *, legacy: bool = False) -> None:
    with h5py.File(path, "w") as l2:
        for mod in modules:
            for name in mod.writes:
                ds = l2.create_dataset(name, data=[1.0])
                mod.mark_complete(ds)
                if legacy:
                    del ds.attrs[ALGORITHM_VERSION_ATTR]


def test_recorded_version_is_compared_and_propagates(tmp_path, monkeypatch):
    path = tmp_path / "l2.h5"
    mods = [_First(), _Second(), _Third()]
    _write(path, mods)
    fi = _file_info(path)
    with h5py.File(path, "r") as l2:
        assert recorded_algorithm_version(l2["first"]) == 1
    assert stale_stages(mods, fi) == []
    assert all(m.already_processed(fi) for m in mods)

    monkeypatch.setattr(_First, "algorithm_version", 2)
    stale = stale_stages(mods, fi)
    # the later stage is stale too; the runs-with-others stage only for a reason of its own
    assert [(type(m).__name__, r) for m, r in stale] == [
        ("_First", "algorithm version 1 → 2"),
        ("_Second", "after _First"),
    ]
    assert describe_stale(stale) == "_First: algorithm version 1 → 2 (and 1 stage after it)"
    assert not mods[0].already_processed(fi) and mods[1].already_processed(fi)

    monkeypatch.setattr(_First, "algorithm_version", 1)
    monkeypatch.setattr(_Second, "algorithm_version", 3)
    assert describe_stale(stale_stages(mods, fi)) == "_Second: algorithm version 1 → 3"


def test_legacy_outputs_count_as_version_one(tmp_path, monkeypatch):
    path = tmp_path / "l2.h5"
    mods = [_First(), _Second()]
    _write(path, mods, legacy=True)
    fi = _file_info(path)
    assert stale_stages(mods, fi) == []  # every version 1: current
    monkeypatch.setattr(_Second, "algorithm_version", 2)
    assert describe_stale(stale_stages(mods, fi)) == "_Second: algorithm version 1 → 2"
    assert mods[0].already_processed(fi) and not mods[1].already_processed(fi)


def test_parameter_change_is_stale_only_when_recomputing(tmp_path, monkeypatch):
    path = tmp_path / "l2.h5"
    mods = [_First(), _Second()]
    _write(path, mods)
    fi = _file_info(path)
    monkeypatch.setattr(_First, "parameters", property(lambda self: {"changed": True}))
    assert stale_stages(mods, fi) == []  # on_parameter_change='warn' keeps the stored result
    mods[0]._comap_on_parameter_change = "recompute"
    assert describe_stale(stale_stages(mods, fi)) == "_First: parameters changed (and 1 stage after it)"


# --------------------------------------------------------------------------------------------------
# Through run.py: --dry-run lists, a run reprocesses, maps follow
# --------------------------------------------------------------------------------------------------


def _set_attr(path: Path, names, key: str, value) -> None:
    with h5py.File(path, "a") as l2:
        for name in names:
            l2[name].attrs[key] = value


def _attr(path: Path, name: str, key: str):
    with h5py.File(path, "r") as l2:
        value = l2[name].attrs.get(key)
    return value.decode() if isinstance(value, bytes) else value


def _strip_versions(path: Path) -> None:
    """Make ``path`` look like a file written before algorithm versions were recorded."""
    with h5py.File(path, "a") as l2:
        objs = [l2]
        l2.visititems(lambda _name, obj: objs.append(obj))
        for obj in objs:
            if ALGORITHM_VERSION_ATTR in obj.attrs:
                del obj.attrs[ALGORITHM_VERSION_ATTR]


def _file_of(ws, source: str) -> Path:
    return next(f for f in ws.level2_files() if source in f.name)


@pytest.fixture()
def reduced(workspace_factory, small_archive):
    """TauA and GField30 reduced through NoiseStatsLevel2 with the current code, and a TauA map."""
    ws = workspace_factory([small_archive["TauA"], small_archive["GField30"]])
    ws.write_configs(
        LEVEL2_THROUGH_NOISE_STATS,
        extra_stages=["modules.MapMaking.MapMaking.MapMaking(config_file='maps.toml')"],
    )
    (ws.root / "maps.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\nnprocess = 1\npipeline = [\n"
        f"  \"{CREATE_MAP}(map_name='TauA', source='TauA', band=1, channel=[0])\",\n]\n"
        f"[{CREATE_MAP}]\noutput_dir = 'maps'\ncalibration = 'none'\n"
    )
    res = ws.run()
    assert res.returncode == 0, res.stderr
    assert len(ws.level2_files()) == 2
    return ws


def test_older_stage_version_is_listed_reprocessed_and_remakes_the_map(reduced):
    ws = reduced
    taua, gfield = _file_of(ws, "0090101"), _file_of(ws, "0090103")
    for f in (taua, gfield):
        assert _attr(f, "level2/binned_data", ALGORITHM_VERSION_ATTR) == 2
        assert _attr(f, "level2/vane", ALGORITHM_VERSION_ATTR) == 1

    dry = ws.run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "stale:" not in dry.stdout
    assert "0 to process (0 retries, 0 stale), 2 already done" in dry.stdout, dry.stdout

    # TauA as written by version 1 of GainFilterAndBin; markers show which stages run again
    _set_attr(taua, GAIN_OUTPUTS, ALGORITHM_VERSION_ATTR, 1)
    _set_attr(taua, ["level2/vane", "level2/binned_cleaned_data"], "written_utc", SENTINEL)
    gfield_stamp = (gfield.stat().st_ino, gfield.stat().st_mtime_ns)
    map_path = ws.root / "maps" / "TauA_band1_ch0_feed01to03.fits"
    map_stamp = map_path.stat().st_mtime_ns

    dry = ws.run("--dry-run")
    assert dry.returncode == 0, dry.stderr
    stale_lines = [line.strip() for line in dry.stdout.splitlines() if "stale:" in line]
    assert stale_lines == [
        f"stale: 90101 {taua}: GainFilterAndBin: algorithm version 1 → 2 (and 2 stages after it)"
    ], dry.stdout
    assert "1 to process (0 retries, 1 stale), 1 already done" in dry.stdout, dry.stdout
    assert _attr(taua, "level2/binned_data", ALGORITHM_VERSION_ATTR) == 1  # the dry run wrote nothing

    res = ws.run()
    assert res.returncode == 0, res.stderr
    assert re.search(r"Level2Pipeline\s+1\s+1\s+0\s+0", res.stdout), res.stdout
    assert "1 level-2 file(s) are out of date and will be reprocessed: 1 × GainFilterAndBin" in res.stderr
    for name in GAIN_OUTPUTS:
        assert _attr(taua, name, ALGORITHM_VERSION_ATTR) == 2
    assert _attr(taua, "level2/binned_cleaned_data", "written_utc") != SENTINEL  # after it: redone
    assert _attr(taua, "level2/vane", "written_utc") == SENTINEL  # before it: kept
    assert (gfield.stat().st_ino, gfield.stat().st_mtime_ns) == gfield_stamp  # current: skipped
    # the map read the reprocessed file, so it is remade
    assert re.search(r"MapMaking\s+1\s+0\s+0", res.stdout), res.stdout
    assert map_path.stat().st_mtime_ns != map_stamp

    again = ws.run("--dry-run")
    assert "0 to process (0 retries, 0 stale), 2 already done" in again.stdout, again.stdout


def test_legacy_file_is_stale_only_for_stages_above_version_one(reduced, monkeypatch, capsys):
    ws = reduced
    ws.write_configs(LEVEL2_THROUGH_NOISE_STATS)  # level 2 only: --obsid selects no map data
    monkeypatch.chdir(ws.root)
    gfield = _file_of(ws, "0090103")
    for f in ws.level2_files():
        _strip_versions(f)
    _set_attr(gfield, ["level2/vane"], "written_utc", SENTINEL)

    # with every stage at version 1 the legacy file is current
    monkeypatch.setattr(GainFilterAndBin, "algorithm_version", 1)
    monkeypatch.setattr(PostBinCleaning, "algorithm_version", 1)
    assert cli.main(["main.toml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stale:" not in out and "0 to process (0 retries, 0 stale), 2 already done" in out, out

    # GainFilterAndBin at version 2: stale for it (and what follows), not for the stages before it
    monkeypatch.setattr(GainFilterAndBin, "algorithm_version", 2)
    assert cli.main(["main.toml", "--dry-run", "--obsid", "90103"]) == 0
    out = capsys.readouterr().out
    assert [line.strip() for line in out.splitlines() if "stale:" in line] == [
        f"stale: 90103 {gfield}: GainFilterAndBin: algorithm version 1 → 2 (and 2 stages after it)"
    ], out
    assert "1 to process (0 retries, 1 stale), 0 already done" in out, out

    assert cli.main(["main.toml", "--obsid", "90103"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Level2Pipeline\s+1\s+0\s+0\s+0", out), out
    assert _attr(gfield, "level2/binned_data", ALGORITHM_VERSION_ATTR) == 2
    assert _attr(gfield, "level2/vane", "written_utc") == SENTINEL  # SystemTemperature not redone


def test_map_product_version_enters_its_hash_only_above_one(monkeypatch):
    from modules.MapMaking.MapMakingModules.CreateMap.CreateMap import CreateMap

    job = CreateMap(map_name="TauA", source="TauA", band=1, channel=[0])
    obs = [COMAPData(obsid=90101)]
    output = job.expand(obs, [1, 2, 3])[0]
    updated = {90101: "2026-03-01T02:00:00Z"}
    at_one = job.job_config_hash(output, obs, updated)
    # version 1 adds nothing: the hash of maps made before versions existed is unchanged
    legacy = sha256_of(
        {
            "params": job.parameters,
            **job.output_identity(output),
            "obsids": [90101],
            "level2_updated_utc": ["2026-03-01T02:00:00Z"],
        }
    )
    assert at_one == legacy
    monkeypatch.setattr(CreateMap, "algorithm_version", 2)
    assert job.job_config_hash(output, obs, updated) != at_one
    # a reprocessed level-2 file (new updated_utc) changes it too
    monkeypatch.setattr(CreateMap, "algorithm_version", 1)
    assert job.job_config_hash(output, obs, {90101: "2026-03-02T00:00:00Z"}) != at_one
