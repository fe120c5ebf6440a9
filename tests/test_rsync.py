"""rsync plumbing (docs/acquisition.md#remote-specification, docs/acquisition.md#remote-listing,
docs/acquisition.md#download, docs/acquisition.md#security-rules): remote validation, listing parser, path
validation, argument builders, the remote index, and the Python copy used when rsync is absent."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from rsync_daemon import REAL_RSYNC, needs_rsync, start_rsync_daemon

from modules.DataAcquisition.DataAcquisition.DataAcquisition import balanced_batches
from modules.DataAcquisition.rsync import (
    DEFAULT_SSH_COMMAND,
    IndexRow,
    RemoteError,
    RemoteFile,
    join_index,
    list_local_python,
    list_remote,
    listing_command,
    parse_index,
    parse_listing,
    parse_remote,
    python_copy_file,
    transfer_command,
    validate_relpath,
    validate_remote,
    validate_ssh_command,
)

GOOD = "2026-03/comap-0090001-2026-03-01-143158.hd5"


# ------------------------------------------------------------------------------------------------
# Listing parser
# ------------------------------------------------------------------------------------------------

LISTING = """\
drwxr-xr-x          4,096 2026/03/01 12:00:00 .
drwxr-xr-x          4,096 2026/03/01 12:00:00 2026-03
-rw-r--r--      7,056,088 2026/03/01 14:31:58 2026-03/comap-0090001-2026-03-01-143158.hd5
-rw-r--r--        1234567 2026/03/02 01:02:03 2026-03/comap-0090002-2026-03-02-010203.hd5
lrwxrwxrwx             41 2026/03/01 12:00:00 2026-03/comap-0090003-2026-03-01-000000.hd5
crw-rw-rw-           0,0 2026/03/01 12:00:00 2026-03/comap-0090004-2026-03-01-000000.hd5
-rw-r--r--            100 2026/03/01 12:00:00 2026-03/comap-0090005-2026-03-01 000000.hd5
-rw-r--r--            100 2026/03/01 12:00:00 2026-03/comap-0090006-2026-03-01-000000.hd5;rm
-rw-r--r--            100 2026/03/01 12:00:00 2026 03/comap-0090007-2026-03-01-000000.hd5
-rw-r--r--            100 2026/03/01 12:00:00 2026-03/comap-notanobsid.hd5
MOTD: welcome to the archive
"""


def test_listing_parser_keeps_regular_files_with_comma_sizes_and_rejects_bad_names():
    listing = parse_listing(LISTING)
    assert [f.relpath for f in listing.files] == [
        "2026-03/comap-0090001-2026-03-01-143158.hd5",
        "2026-03/comap-0090002-2026-03-02-010203.hd5",
    ]
    first, second = listing.files
    assert first.size_bytes == 7_056_088 and second.size_bytes == 1_234_567
    assert first.obsid == 90001 and second.obsid == 90002
    assert first.mtime_utc == dt.datetime(2026, 3, 1, 14, 31, 58, tzinfo=dt.UTC)
    # the symlink and the device are ignored, not rejected
    assert listing.ignored == 2
    rejected = dict(listing.rejected)
    assert set(rejected) == {
        "2026-03/comap-0090005-2026-03-01 000000.hd5",
        "2026-03/comap-0090006-2026-03-01-000000.hd5;rm",
        "2026 03/comap-0090007-2026-03-01-000000.hd5",
        "2026-03/comap-notanobsid.hd5",
    }
    assert rejected["2026 03/comap-0090007-2026-03-01-000000.hd5"].startswith("component with characters")
    assert rejected["2026-03/comap-notanobsid.hd5"] == "not a level-1 file name"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../x.hd5", "empty, '.' or '..' component"),
        ("a/../../comap-0000001-2026-01-01-000000.hd5", "empty, '.' or '..' component"),
        ("-rf", "component starting with '-'"),
        ("/etc/comap-0000001-2026-01-01-000000.hd5", "absolute path"),
        ("./comap-0000001-2026-01-01-000000.hd5", "empty, '.' or '..' component"),
        ("a//comap-0000001-2026-01-01-000000.hd5", "empty, '.' or '..' component"),
        ("a/-x/comap-0000001-2026-01-01-000000.hd5", "component starting with '-'"),
        ("a b/comap-0000001-2026-01-01-000000.hd5", "component with characters outside [A-Za-z0-9._+-]"),
        ("a/comap-0000001-2026-01-01-000000.hd5.tmp", "not a level-1 file name"),
        ("", "empty path"),
    ],
)
def test_validate_relpath_rejects(path, reason):
    assert validate_relpath(path) == reason


@pytest.mark.parametrize("path", [GOOD, "comap-0000001-2026-01-01-000000.hd5", "a.b/c+d_e/" + GOOD])
def test_validate_relpath_accepts(path):
    assert validate_relpath(path) is None


# ------------------------------------------------------------------------------------------------
# Remote specification
# ------------------------------------------------------------------------------------------------


def test_remote_forms(tmp_path):
    local = parse_remote(str(tmp_path))
    assert local.kind == "local" and local.root == str(tmp_path.resolve()) + "/"
    ssh = parse_remote("comap@archive.example:level1/")
    assert (
        ssh.kind == "ssh"
        and ssh.root == "comap@archive.example:level1/"
        and ssh.host == "comap@archive.example"
    )
    assert parse_remote("archive.example:").root == "archive.example:./"
    daemon = parse_remote("rsync://127.0.0.1:8873/comap/level1")
    assert daemon.kind == "daemon" and daemon.root == "rsync://127.0.0.1:8873/comap/level1/"
    assert parse_remote("rsync://host/comap").root == "rsync://host/comap/"


@pytest.mark.parametrize(
    ("remote", "fragment"),
    [
        ("$(touch pwned)", "forbidden character '$'"),
        ("host:level1;rm -rf ~", "forbidden character ';'"),
        ("host:`id`", "forbidden character '`'"),
        ("a|b", "forbidden character '|'"),
        ("a\nb", "forbidden character '\\n'"),
        ("a\x07b", "forbidden character '\\x07'"),
        ("-oProxyCommand=x:level1", "ssh host"),
        ("bad host:level1", "ssh host"),
        ("host::module/path", "host::module form"),
        ("rsync://host", "rsync://host[:port]/module[/path]"),
        ("rsync://host:99999/comap/", "invalid port"),
        ("rsync://bad_host!/comap/", "rsync://host[:port]/module[/path]"),
        ("no/such/directory/", "does not exist"),
        ("", "empty"),
    ],
)
def test_remote_validation_rejects(remote, fragment):
    problems = validate_remote(remote)
    assert len(problems) == 1 and fragment in problems[0], problems


def test_ssh_command_validation():
    assert validate_ssh_command(DEFAULT_SSH_COMMAND) == []
    assert validate_ssh_command("ssh -i ~/.ssh/comap_key -p 2222") == []
    assert "forbidden character" in validate_ssh_command("ssh -o ProxyCommand=$(evil)")[0]
    assert validate_ssh_command("") == ["ssh_command must be a non-empty string"]
    assert "cannot be split" in validate_ssh_command("ssh 'unterminated")[0]


def test_no_shell_remote_is_rejected_at_config_load(tmp_path, monkeypatch):
    """A remote containing $(touch pwned) is a ConfigError at load, and no file 'pwned' appears."""
    from modules.pipeline_control.config import load_run_config
    from utils.errors import ConfigErrors

    monkeypatch.chdir(tmp_path)
    for stage in ("DataCheckRemote", "DataAcquisition"):
        (tmp_path / "main.toml").write_text(
            "[Master]\nsql_database = 'db.sqlite'\npipeline = [\n"
            f'  "modules.DataAcquisition.{stage}.{stage}.{stage}'
            "(remote='$(touch pwned)', local_dir='l1')\",\n"
            "]\n"
        )
        with pytest.raises(ConfigErrors) as info:
            load_run_config(tmp_path / "main.toml")
        lines = [e.line() for e in info.value.errors]
        assert any("forbidden character '$'" in line for line in lines), lines
    assert not any(p.name == "pwned" for p in tmp_path.rglob("*"))
    assert not Path("pwned").exists()


# ------------------------------------------------------------------------------------------------
# Argument builders
# ------------------------------------------------------------------------------------------------


def test_listing_command_is_exact(tmp_path):
    local = parse_remote(str(tmp_path))
    assert listing_command("rsync", local) == [
        "rsync",
        "--list-only",
        "--recursive",
        "--protect-args",
        "--no-human-readable",
        "--include=*/",
        "--include=comap-*.hd5",
        "--exclude=*",
        "--",
        local.root,
    ]
    ssh = parse_remote("comap@archive.example:level1/")
    cmd = listing_command("rsync", ssh, "ssh -o BatchMode=yes -p 2222")
    assert cmd[-4:] == ["-e", "ssh -o BatchMode=yes -p 2222", "--", "comap@archive.example:level1/"]


def _transfer(remote, **kw):
    return transfer_command("rsync", files_from="/tmp/list.txt", remote=remote, local_dir="/data/l1", **kw)


def test_transfer_command_is_exact_and_bwlimit_only_when_configured():
    daemon = parse_remote("rsync://127.0.0.1:8873/comap/")
    base = _transfer(daemon)
    assert base == [
        "rsync",
        "--files-from=/tmp/list.txt",
        "--times",
        "--perms",
        "--protect-args",
        "--no-human-readable",
        "--partial-dir=.rsync-partial",
        "--timeout=300",
        "--chmod=F664,D775",
        "--out-format=%n",
        "--",
        "rsync://127.0.0.1:8873/comap/",
        "/data/l1/",
    ]
    assert not any(a.startswith("--bwlimit") for a in base)
    limited = _transfer(daemon, bwlimit_kbps=5000)
    assert [a for a in limited if a.startswith("--bwlimit")] == ["--bwlimit=5000"]
    assert limited.index("--bwlimit=5000") < limited.index("--out-format=%n")
    dry = _transfer(daemon, dry_run=True)
    assert "--dry-run" in dry and "--dry-run" not in base
    for cmd in (base, limited, dry):
        assert not {
            "-L",
            "--copy-links",
            "-o",
            "-g",
            "--owner",
            "--group",
            "-a",
            "--remove-source-files",
        } & set(cmd)
        assert cmd[-3] == "--"


def test_transfer_command_passes_ssh_command_as_one_argument():
    ssh = parse_remote("comap@archive.example:level1/")
    cmd = _transfer(ssh, ssh_command="ssh -o BatchMode=yes -o ConnectTimeout=20")
    i = cmd.index("-e")
    assert cmd[i + 1] == "ssh -o BatchMode=yes -o ConnectTimeout=20"
    assert cmd[i + 2 :] == ["--", "comap@archive.example:level1/", "/data/l1/"]
    assert "-e" not in _transfer(parse_remote("rsync://h/comap/"))


def test_balanced_batches_greedy_largest_first():
    def rf(i, size):
        return RemoteFile(f"d/comap-{i:07d}-2026-01-01-000000.hd5", size, None, i)

    files = [rf(1, 10), rf(2, 7), rf(3, 6), rf(4, 5), rf(5, 4), rf(6, 1)]
    batches = balanced_batches(files, 2)
    totals = sorted(sum(f.size_bytes for f in b) for b in batches)
    # greedy: 10→A, 7→B, 6→B(13), 5→A(15), 4→B(17), 1→A(16)
    assert totals == [16, 17]
    assert sorted(f.obsid for b in batches for f in b) == [1, 2, 3, 4, 5, 6]
    assert len(balanced_batches(files[:1], 4)) == 1
    assert len(balanced_batches(files, 10)) == 6


# ------------------------------------------------------------------------------------------------
# Remote index
# ------------------------------------------------------------------------------------------------


def test_index_parse_and_join():
    text = (
        "obsid,relative_path,source,comment,utc_start,size_bytes\n"
        "90001,2026-03/a.hd5,GField30,,2026-03-01-00:00:00,100\n"
        "90002,2026-03/b.hd5,co2,,2026-03-01-00:00:00,100\n"
        "90003,2026-03/c.hd5,TauA,sky nod,2026-03-01-00:00:00,1,000\n"
        "x,bad,row,,,\n"
    )
    rows, problems = parse_index(text, name="obs_index.csv")
    assert sorted(rows) == [90001, 90002, 90003]
    assert problems == ["obs_index.csv:5: obsid 'x' is not an integer"]
    files = [
        RemoteFile(f"d/comap-{o:07d}-2026-03-01-000000.hd5", 1, None, o) for o in (90001, 90002, 90003, 90009)
    ]
    joined = {f.obsid: f for f in join_index(files, rows)}
    assert (joined[90001].source, joined[90001].source_group) == ("GField30", "Galactic")
    assert joined[90002].source_group == "CO"
    assert joined[90003].source_group == "SkyDip" and joined[90003].comment == "sky nod"
    assert joined[90009].source is None
    with pytest.raises(RemoteError, match="lacks column"):
        parse_index("a,b\n1,2\n")
    assert isinstance(rows[90001], IndexRow)


# ------------------------------------------------------------------------------------------------
# Listing a real directory
# ------------------------------------------------------------------------------------------------


def _fake_tree(root: Path) -> None:
    (root / "2026-03").mkdir(parents=True)
    (root / "2026-03" / "comap-0090001-2026-03-01-143158.hd5").write_bytes(b"x" * 1000)
    (root / "2026-03" / "notes.txt").write_text("ignored")
    (root / "2026-03" / "comap-0090002-2026-03-01-143158.hd5").symlink_to(
        "comap-0090001-2026-03-01-143158.hd5"
    )
    (root / "bad dir").mkdir()
    (root / "bad dir" / "comap-0090003-2026-03-01-143158.hd5").write_bytes(b"y" * 10)


def test_python_listing(tmp_path):
    _fake_tree(tmp_path)
    listing = list_local_python(tmp_path)
    assert [(f.relpath, f.size_bytes) for f in listing.files] == [(GOOD, 1000)]
    assert listing.ignored == 1  # the symlink
    assert listing.rejected == [
        ("bad dir/comap-0090003-2026-03-01-143158.hd5", "component with characters outside [A-Za-z0-9._+-]")
    ]
    with pytest.raises(RemoteError, match="install it"):
        list_remote(parse_remote("host:x/"), rsync=None)


@needs_rsync
def test_rsync_listing_matches_python_listing(tmp_path):
    _fake_tree(tmp_path / "r")
    remote = parse_remote(str(tmp_path / "r"))
    by_rsync = list_remote(remote, rsync=REAL_RSYNC)
    by_python = list_local_python(tmp_path / "r")
    assert by_rsync.files == by_python.files
    assert by_rsync.rejected == by_python.rejected


@needs_rsync
def test_listing_failure_is_one_line(tmp_path):
    from rsync_daemon import free_port

    remote = parse_remote(f"rsync://127.0.0.1:{free_port()}/comap/")
    with pytest.raises(RemoteError) as info:
        list_remote(remote, rsync=REAL_RSYNC, timeout_s=30)
    msg = str(info.value)
    assert msg.startswith(f"cannot list {remote.text}: rsync exit 10: ") and "\n" not in msg


@needs_rsync
def test_daemon_listing(tmp_path, tiny_archive):
    with start_rsync_daemon(tiny_archive.root, tmp_path / "daemon") as d:
        listing = list_remote(parse_remote(d.url), rsync=REAL_RSYNC)
    assert [f.obsid for f in listing.files] == [90001]
    assert listing.files[0].size_bytes == tiny_archive.paths[0].stat().st_size


# ------------------------------------------------------------------------------------------------
# Python copy (rsync absent)
# ------------------------------------------------------------------------------------------------


def test_python_copy_is_atomic_and_checks_size(tmp_path):
    src = tmp_path / "remote"
    _fake_tree(src)
    dst = tmp_path / "local"
    (f,) = list_local_python(src).files
    assert python_copy_file(src, f, dst) is True
    final = dst / f.relpath
    assert final.read_bytes() == b"x" * 1000
    assert int(final.stat().st_mtime) == int(f.mtime_utc.timestamp())
    assert oct(final.stat().st_mode & 0o777) == oct(0o664)
    assert python_copy_file(src, f, dst) is False  # quick check: same size and mtime
    # the remote file shrank since the listing: nothing appears under the final name
    final.unlink()
    (src / f.relpath).write_bytes(b"x" * 10)
    with pytest.raises(OSError, match="listing says 1000"):
        python_copy_file(src, f, dst)
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir()] == []


def test_python_copy_refuses_escapes(tmp_path):
    src = tmp_path / "remote"
    _fake_tree(src)
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "local"
    dst.mkdir()
    os.symlink(outside, dst / "2026-03")  # a destination directory that points elsewhere
    (f,) = list_local_python(src).files
    with pytest.raises(OSError, match="resolves outside"):
        python_copy_file(src, f, dst)
    assert list(outside.iterdir()) == []
    shutil.rmtree(dst)
