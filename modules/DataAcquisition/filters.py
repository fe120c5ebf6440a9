"""Remote listing, index join and the download filters shared by DataCheckRemote and DataAcquisition
(docs/acquisition.md#remote-listing, docs/acquisition.md#filters).

Filters, in order, each rejection counted by reason:

1. valid relative path and level-1 name (and one file per obsid);
2. ``min_obsid_download <= obsid <= max_obsid_download``;
3. not already registered — a ``comap_data`` row whose ``level1_path`` exists **and** has the
   listed size (``skip_registered``);
4. source filters (need ``remote_index``; otherwise not applied, with one WARNING);
5. the ``--obsid`` restriction of the command line.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.DataAcquisition.registration import DEMO_HINT, expect_directory
from modules.DataAcquisition.rsync import (
    DEFAULT_SSH_COMMAND,
    Listing,
    Remote,
    RemoteError,
    RemoteFile,
    fetch_index,
    join_index,
    list_remote,
    parse_index,
    parse_remote,
    validate_index_relpath,
    validate_ssh_command,
)
from modules.SQLModule.SQLModule import db

__all__ = [
    "FilterSettings",
    "Selection",
    "apply_filters",
    "registered_copies",
    "remote_parameter_rules",
    "select_remote_files",
]

REASON_DUPLICATE = "duplicate obsid"
REASON_BELOW = "obsid below min_obsid_download"
REASON_ABOVE = "obsid above max_obsid_download"
REASON_REGISTERED = "already registered"
REASON_NOT_INDEXED = "not in the remote index"
REASON_INCLUDE_SOURCE = "source not in include_sources"
REASON_EXCLUDE_SOURCE = "source in exclude_sources"
REASON_INCLUDE_GROUP = "source group not in include_source_groups"
REASON_EXCLUDE_GROUP = "source group in exclude_source_groups"
REASON_CLI = "not selected by --obsid"

_PATTERN_PARAMS = ("include_sources", "exclude_sources", "include_source_groups", "exclude_source_groups")


def _patterns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _match_any(value: str | None, patterns: Sequence[str]) -> bool:
    v = (value or "").lower()
    return any(fnmatch.fnmatchcase(v, p.lower()) for p in patterns)


@dataclass(frozen=True)
class FilterSettings:
    """The filter parameters of docs/acquisition.md#filters (glob patterns are matched case-insensitively)."""

    min_obsid_download: int = 0
    max_obsid_download: int | None = None
    skip_registered: bool = True
    include_sources: tuple[str, ...] | None = None
    exclude_sources: tuple[str, ...] | None = None
    include_source_groups: tuple[str, ...] | None = None
    exclude_source_groups: tuple[str, ...] | None = ("CO",)

    @classmethod
    def from_object(cls, obj: Any) -> FilterSettings:
        """Build from a stage (attributes of the same names)."""
        return cls(
            min_obsid_download=int(obj.min_obsid_download or 0),
            max_obsid_download=None if obj.max_obsid_download is None else int(obj.max_obsid_download),
            skip_registered=bool(obj.skip_registered),
            include_sources=_patterns(obj.include_sources),
            exclude_sources=_patterns(obj.exclude_sources),
            include_source_groups=_patterns(obj.include_source_groups),
            exclude_source_groups=_patterns(obj.exclude_source_groups),
        )

    @property
    def source_filters(self) -> dict[str, tuple[str, ...]]:
        """The source filters that are set (non-empty)."""
        return {k: v for k in _PATTERN_PARAMS if (v := getattr(self, k))}


@dataclass
class Selection:
    """Outcome of listing and filtering the remote.

    Attributes
    ----------
    remote_total : int
        Regular level-1-pattern files listed (accepted and rejected).
    selected : list of RemoteFile
        Files passing every filter (new files and size mismatches), in obsid order.
    registered : list of RemoteFile
        Files skipped because a registered local copy has the listed size.
    size_mismatch : list of RemoteFile
        Selected files whose registered local copy has another size.
    present : list of RemoteFile
        Selected files already at ``local_dir/relpath`` with the listed size (not registered).
    rejected : list of (str, str)
        ``(relpath, reason)`` for every file not selected, including the registered ones.
    counts : Counter
        Rejections by reason.
    source_filters_applied : bool
    """

    remote_total: int = 0
    selected: list[RemoteFile] = field(default_factory=list)
    registered: list[RemoteFile] = field(default_factory=list)
    size_mismatch: list[RemoteFile] = field(default_factory=list)
    present: list[RemoteFile] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    source_filters_applied: bool = False

    def reject(self, relpath: str, reason: str) -> None:
        self.rejected.append((relpath, reason))
        self.counts[reason] += 1

    @property
    def new(self) -> list[RemoteFile]:
        """Selected files that are not size mismatches."""
        mismatched = {f.relpath for f in self.size_mismatch}
        return [f for f in self.selected if f.relpath not in mismatched]


def registered_copies(obsids: Iterable[int]) -> dict[int, tuple[str | None, int | None]]:
    """``obsid -> (level1_path, level1_size_bytes)`` of registered observations among ``obsids``."""
    return {o.obsid: (o.level1_path, o.level1_size_bytes) for o in db.query_observations(obsids=list(obsids))}


def _file_size(path: str | None) -> int | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if os.path.isfile(path) else None


def apply_filters(
    listing: Listing,
    settings: FilterSettings,
    *,
    registered: Mapping[int, tuple[str | None, int | None]],
    local_dir: str | os.PathLike | None,
    has_index: bool,
    cli_obsids: Iterable[int] | None,
) -> Selection:
    """Apply the filters of docs/acquisition.md#filters, in order, to an (index-joined) listing.

    Parameters
    ----------
    listing : Listing
        Accepted files (with ``source``/``source_group`` when an index was joined) and the
        entries already refused by path validation (filter 1).
    settings : FilterSettings
    registered : mapping
        ``obsid -> (level1_path, size)`` of registered observations (:func:`registered_copies`).
    local_dir : path or None
        Download directory, for the "already present" report.
    has_index : bool
        Whether a remote index was joined (filter 4 needs it).
    cli_obsids : iterable of int or None
        The ``--obsid`` restriction.
    """
    sel = Selection(remote_total=len(listing.files) + len(listing.rejected))
    for path, reason in listing.rejected:
        sel.reject(path, f"invalid path: {reason}")
    seen: dict[int, str] = {}
    cli = None if cli_obsids is None else set(int(o) for o in cli_obsids)
    source_filters = settings.source_filters if has_index else {}
    sel.source_filters_applied = bool(source_filters)
    for f in sorted(listing.files, key=lambda f: (f.obsid, f.relpath)):
        if f.obsid in seen:  # 1 (one file per observation)
            sel.reject(f.relpath, REASON_DUPLICATE)
            continue
        seen[f.obsid] = f.relpath
        if f.obsid < settings.min_obsid_download:  # 2
            sel.reject(f.relpath, REASON_BELOW)
            continue
        if settings.max_obsid_download is not None and f.obsid > settings.max_obsid_download:
            sel.reject(f.relpath, REASON_ABOVE)
            continue
        mismatch = False
        reg = registered.get(f.obsid)  # 3
        if reg is not None:
            size = _file_size(reg[0])
            if size is not None and size == f.size_bytes:
                if settings.skip_registered:
                    sel.registered.append(f)
                    sel.reject(f.relpath, REASON_REGISTERED)
                    continue
            elif size is not None:
                mismatch = True
        if source_filters:  # 4
            reason = _source_rejection(f, settings)
            if reason is not None:
                sel.reject(f.relpath, reason)
                continue
        if cli is not None and f.obsid not in cli:  # 5
            sel.reject(f.relpath, REASON_CLI)
            continue
        sel.selected.append(f)
        if mismatch:
            sel.size_mismatch.append(f)
        elif local_dir is not None and _file_size(os.path.join(local_dir, f.relpath)) == f.size_bytes:
            sel.present.append(f)
    return sel


def _source_rejection(f: RemoteFile, s: FilterSettings) -> str | None:
    if f.source is None:
        if s.include_sources or s.include_source_groups:
            return REASON_NOT_INDEXED
        return None  # exclusions cannot be decided without the index row; keep the file
    if s.include_sources and not _match_any(f.source, s.include_sources):
        return REASON_INCLUDE_SOURCE
    if s.exclude_sources and _match_any(f.source, s.exclude_sources):
        return REASON_EXCLUDE_SOURCE
    if s.include_source_groups and not _match_any(f.source_group, s.include_source_groups):
        return REASON_INCLUDE_GROUP
    if s.exclude_source_groups and _match_any(f.source_group, s.exclude_source_groups):
        return REASON_EXCLUDE_GROUP
    return None


def select_remote_files(
    remote: Remote,
    settings: FilterSettings,
    *,
    rsync: str | None,
    ssh_command: str = DEFAULT_SSH_COMMAND,
    remote_index: str | None = None,
    listing_timeout_s: float = 600.0,
    local_dir: str | os.PathLike | None = None,
    cli_obsids: Iterable[int] | None = None,
    logger: logging.Logger | None = None,
) -> Selection:
    """List the remote, join the optional index and apply the filters.

    Logs a WARNING listing rejected names (path validation) and one WARNING when source filters
    are set but cannot be applied without ``remote_index``.

    Raises
    ------
    RemoteError
        The listing or the index fetch failed (one line).
    """
    log = logger or logging.getLogger("comap.rsync")
    listing = list_remote(remote, ssh_command=ssh_command, timeout_s=listing_timeout_s, rsync=rsync)
    if listing.rejected:
        shown = "; ".join(f"{p!r} ({r})" for p, r in listing.rejected[:10])
        more = f"; and {len(listing.rejected) - 10} more" if len(listing.rejected) > 10 else ""
        log.warning("%d listed name(s) rejected: %s%s", len(listing.rejected), shown, more)
    has_index = False
    if remote_index:
        text = fetch_index(
            remote, remote_index, rsync=rsync, ssh_command=ssh_command, timeout_s=listing_timeout_s
        )
        index, problems = parse_index(text, name=f"{remote.text.rstrip('/')}/{remote_index}")
        for p in problems[:10]:
            log.warning("%s", p)
        listing.files = join_index(listing.files, index)
        has_index = True
        unindexed = sum(1 for f in listing.files if f.source is None)
        if unindexed and settings.source_filters:
            log.warning(
                "%d listed file(s) have no row in %s; include filters reject them, exclude filters keep them",
                unindexed,
                remote_index,
            )
    elif settings.source_filters:
        shown = ", ".join(f"{k}={list(v)}" for k, v in settings.source_filters.items())
        log.warning(
            "source filters (%s) are not applied: they need remote_index (e.g. remote_index='obs_index.csv')",
            shown,
        )
    obsids = [f.obsid for f in listing.files]
    registered = registered_copies(obsids) if obsids else {}
    return apply_filters(
        listing,
        settings,
        registered=registered,
        local_dir=local_dir,
        has_index=has_index,
        cli_obsids=cli_obsids,
    )


# ------------------------------------------------------------------------------------------------
# Parameter validation shared by DataCheckRemote and DataAcquisition
# ------------------------------------------------------------------------------------------------


def remote_parameter_rules(params: Mapping[str, Any], *, announces_local_dir: bool = False) -> list[str]:
    """Config-load rules of the remote, ``ssh_command``, ``remote_index``, ``local_dir`` and the
    obsid range: what the annotations cannot express (a remote that must exist, a safe relative
    path, directories that must not overlap, ``max_obsid_download >= min_obsid_download``).

    Parameters
    ----------
    params : mapping
        Resolved stage parameters.
    announces_local_dir : bool
        Record ``local_dir`` as a directory this pipeline will create (DataAcquisition), so that a
        later DataAssess accepts it before it exists.
    """
    problems: list[str] = []
    remote_text = params["remote"]
    try:
        remote = parse_remote(remote_text)
    except ValueError as exc:
        msg = str(exc)
        if (
            isinstance(remote_text, str)
            and Path(remote_text).parts[:1] == ("demo",)
            and "does not exist" in msg
        ):
            msg = f"{msg}; {DEMO_HINT}"
        problems.append(msg)
        remote = None
    problems += validate_ssh_command(params["ssh_command"])
    index = params["remote_index"]
    if index is not None:
        reason = validate_index_relpath(str(index))
        if reason is not None:
            problems.append(f"remote_index {index!r} is not a safe relative path: {reason}")
    local_dir = params["local_dir"]
    if not isinstance(local_dir, str) or not local_dir.strip():
        problems.append("local_dir must be a non-empty directory path")
    else:
        if Path(local_dir).exists() and not Path(local_dir).is_dir():
            problems.append(f"local_dir {local_dir} exists and is not a directory")
        if remote is not None and remote.local_path is not None:
            a, b = os.path.realpath(remote.local_path), os.path.realpath(local_dir)
            if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
                problems.append(f"local_dir {local_dir} overlaps the remote directory {remote.text}")
        if announces_local_dir:
            expect_directory(local_dir)
    lo = params["min_obsid_download"]
    hi = params["max_obsid_download"]
    if hi is not None and lo is not None and int(hi) < int(lo):
        problems.append(f"max_obsid_download {hi} is below min_obsid_download {lo}")
    return problems


__all__ += ["RemoteError"]
