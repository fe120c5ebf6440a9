"""ObserverFlags (docs/acquisition.md#observerflags): CSV parsing and validation at config load, reset + flag
in one transaction, idempotence, pipeline flags untouched, and the command line."""

from __future__ import annotations

import hashlib

import pytest

from modules.DataAcquisition.ObserverFlags.ObserverFlags import (
    ObserverFlags,
    main,
    parse_flags_csv,
    parse_pixels,
    parse_sidebands,
)
from modules.pipeline_control.Pipeline import RunContext
from modules.SQLModule.SQLModule import db

CSV = """ObsID start, ObsID end ,Pixels,Sidebands,Comment
100,,all,all,whole obs bad
102,103,"3, 7",bandA,wind
103,ongoing,12,bandB,receiver fault
200,210,all,"0,2",nothing registered here
"""


def write(tmp_path, text, name="flags.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture()
def flag_db(tmp_path):
    """Observations 100–104 (feeds 1–3, 7, 12 and the ground feed 20); 104 has no pixels attribute."""
    db.connect(str(tmp_path / "db.sqlite"))
    for obsid in (100, 101, 102, 103):
        db.upsert_observation({"obsid": obsid, "source": "GField30", "pixels": "1,2,3,7,12,20"})
    db.upsert_observation({"obsid": 104, "source": "GField30"})
    # existing statistic rows (channels 0–2) and a pipeline flag on 102
    db.update_quality_statistics(102, 3, 0, 2, {"filtered_white_noise": 0.1})
    db.set_quality_flags(
        102, feeds=[1], bands=[0], channels=[0, 1, 2], pipeline_ok=False, comment="dead feed"
    )
    yield db
    db.disconnect()


def flags():
    out = {}
    for obsid in db.query_all_obsids():
        for key, f in db.get_quality_flags(obsid).items():
            out[(obsid, *key)] = (f.observer_ok, f.pipeline_ok, f.is_good, f.comment)
    return out


def run_stage(path, **kwargs):
    stage = ObserverFlags(observer_flags_csv_file=str(path), **kwargs)
    stage.context = RunContext()
    return stage.run()


def test_parsers():
    assert parse_pixels("all") is None and parse_pixels("ALL feeds") is None
    assert parse_pixels("3, 7,12") == (3, 7, 12) and parse_pixels("1-3,5") == (1, 2, 3, 5)
    assert parse_sidebands("all") == (0, 1, 2, 3)
    assert parse_sidebands("bandA") == (0, 1) and parse_sidebands("BandB") == (2, 3)
    assert parse_sidebands("0,2") == (0, 2)
    for bad in ("bandC", "A", "4", "0,5", ""):
        with pytest.raises(ValueError):
            parse_sidebands(bad)
    with pytest.raises(ValueError, match="outside 1–20"):
        parse_pixels("0, 3")


def test_bad_lines_are_all_reported_with_file_and_line(tmp_path):
    path = write(
        tmp_path,
        "ObsID start,ObsID end,Pixels,Sidebands,Comment\n"
        "100,,all,all,ok\n"
        "\n"
        "101,,all,bandC,bad band\n"
        "x,,all,all,bad start\n"
        "105,103,all,all,reversed\n"
        "106,,,all,no pixels\n"
        "107,soon,3,all,bad end\n",
    )
    rows, problems = parse_flags_csv(path)
    assert [r.line for r in rows] == [2]
    assert problems == [
        f"{path}:4: unknown Sidebands value 'bandC' (expected all, bandA, bandB or e.g. 0,2)",
        f"{path}:5: ObsID start 'x' is not an obsid",
        f"{path}:6: ObsID end 103 is before ObsID start 105",
        f"{path}:7: Pixels is empty (write 'all' for every feed)",
        f"{path}:8: ObsID end 'soon' is not an obsid, empty or 'ongoing'",
    ]
    assert (
        ObserverFlags.validate_config({"observer_flags_csv_file": str(path), "default_channels": [0, 1]})
        == problems
    )
    missing = write(tmp_path, "ObsID,Pixels\n1,all\n", "bad_header.csv")
    (problem,) = ObserverFlags.validate_config(
        {"observer_flags_csv_file": str(missing), "default_channels": [0]}
    )
    assert problem.startswith(f"{missing}:1: header lacks required column(s) 'obsid start', 'sidebands'")
    (problem,) = ObserverFlags.validate_config({"observer_flags_csv_file": str(tmp_path / "nope.csv")})
    assert "cannot read the observer-flag CSV" in problem


def test_malformed_csv_is_a_config_error_at_load(tmp_path, monkeypatch):
    from modules.pipeline_control.config import load_run_config
    from utils.errors import ConfigErrors

    monkeypatch.chdir(tmp_path)
    write(
        tmp_path,
        "ObsID start,ObsID end,Pixels,Sidebands,Comment\n" + "100,,all,all,x\n" * 12 + "114,,all,bandC,x\n",
    )
    (tmp_path / "main.toml").write_text(
        "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
        '  "modules.DataAcquisition.ObserverFlags.ObserverFlags.ObserverFlags('
        "observer_flags_csv_file='flags.csv')\",\n]\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_run_config(tmp_path / "main.toml")
    (err,) = info.value.errors
    assert "flags.csv:14: unknown Sidebands value 'bandC'" in err.line()
    assert err.line().startswith("ConfigError: ")
    assert not (tmp_path / "db.sqlite").exists()


def test_flags_ongoing_banda_pixel_list_and_idempotence(tmp_path, flag_db):
    path = write(tmp_path, CSV)
    result = run_stage(path)
    assert result.done == 4  # obsids 100, 102, 103, 104
    got = flags()
    # row 1: obsid 100, every feed of its pixels attribute except the ground feed, bands 0–3,
    # default channels 0–1 (no rows existed)
    bad100 = {k for k, v in got.items() if k[0] == 100 and not v[0]}
    assert bad100 == {(100, f, b, c) for f in (1, 2, 3, 7, 12) for b in range(4) for c in (0, 1)}
    assert got[(100, 1, 0, 0)][3] == "Observer Flag: whole obs bad"
    # row 2: 102–103, feeds 3 and 7, bandA; 102 already has channels 0–2
    bad102 = {k for k, v in got.items() if k[0] == 102 and not v[0]}
    assert bad102 == {(102, f, b, c) for f in (3, 7) for b in (0, 1) for c in (0, 1, 2)}
    # row 3: 103–ongoing (= 104, the largest registered obsid), feed 12, bandB
    bad103 = {k for k, v in got.items() if k[0] == 103 and not v[0]}
    assert bad103 == {(103, f, b, c) for f in (3, 7) for b in (0, 1) for c in (0, 1)} | {
        (103, 12, b, c) for b in (2, 3) for c in (0, 1)
    }
    bad104 = {k for k, v in got.items() if k[0] == 104 and not v[0]}
    assert bad104 == {(104, 12, b, c) for b in (2, 3) for c in (0, 1)}
    assert got[(104, 12, 2, 0)][3] == "Observer Flag: receiver fault"
    assert not any(k[0] == 101 for k in got)
    assert all(v[2] == (v[0] and v[1]) for v in got.values())
    # the pipeline flag survives
    assert got[(102, 1, 0, 0)] == (True, False, False, "dead feed")

    again = run_stage(path)
    assert again.done == 4
    assert flags() == got


def test_reset_keeps_pipeline_flags_and_clears_old_observer_flags(tmp_path, flag_db):
    run_stage(write(tmp_path, CSV))
    smaller = write(tmp_path, "ObsID start,Pixels,Sidebands\n101,1,0\n", "smaller.csv")
    run_stage(smaller)
    got = flags()
    bad = {k for k, v in got.items() if not v[0]}
    assert bad == {(101, 1, 0, 0), (101, 1, 0, 1)}
    assert got[(101, 1, 0, 0)][3] == "Observer Flag:"
    assert got[(102, 1, 0, 0)] == (True, False, False, "dead feed")
    assert got[(100, 1, 0, 0)] == (True, True, True, None)


def test_default_channels_and_unmatched_rows(tmp_path, flag_db, caplog):
    path = write(tmp_path, "ObsID start,ObsID end,Pixels,Sidebands\n104,,1,0\n500,600,all,all\n")
    run_stage(path, default_channels=[0, 1, 2, 3])
    assert {k for k, v in flags().items() if not v[0]} == {(104, 1, 0, c) for c in range(4)}
    assert any(
        "match no registered obsid" in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records
    )


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_command_line(tmp_path, flag_db, capsys):
    db.disconnect()
    db_file = tmp_path / "db.sqlite"
    path = write(tmp_path, CSV)
    before = digest(db_file)
    assert main([str(path), "--db", str(db_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would reset observer flags and flag 4 observation(s)" in out
    assert "lines 5" in out  # 200–210 matches nothing
    assert digest(db_file) == before
    assert main([str(path), "--db", str(db_file)]) == 0
    assert "4 observation(s) flagged" in capsys.readouterr().out
    db.connect(str(db_file), create=False)
    assert not db.is_good(100, 1, 0, 0)
    db.disconnect()
    bad = write(tmp_path, "ObsID start,Pixels,Sidebands\n1,all,bandC\n", "bad.csv")
    assert main([str(bad), "--db", str(db_file)]) == 2
    assert f"ConfigError: {bad}:2: unknown Sidebands value 'bandC'" in capsys.readouterr().err
    assert main([str(path), "--db", str(tmp_path / "missing.db")]) == 3
