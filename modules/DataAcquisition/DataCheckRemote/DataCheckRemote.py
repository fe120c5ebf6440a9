"""DataCheckRemote: list the remote archive and report what is new; downloads nothing (06 §4)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from modules.DataAcquisition.filters import (
    FilterSettings,
    Selection,
    select_remote_files,
    validate_remote_stage_params,
)
from modules.DataAcquisition.rsync import DEFAULT_SSH_COMMAND, RemoteError, find_rsync, parse_remote
from modules.pipeline_control.Pipeline import PipelineStage, StageResult

log = logging.getLogger("comap.DataCheckRemote")


def report_dict(remote: str, local_dir: str, sel: Selection, *, timestamp: str) -> dict[str, Any]:
    """The JSON report of a remote check (06 §4 step 2)."""
    rejected: dict[str, int] = {k: v for k, v in sorted(sel.counts.items()) if k != "already registered"}
    return {
        "remote": remote,
        "local_dir": str(local_dir),
        "timestamp_utc": timestamp,
        "counts": {
            "remote_total": sel.remote_total,
            "new": len(sel.new),
            "registered": len(sel.registered),
            "size_mismatch": len(sel.size_mismatch),
            "present_locally_unregistered": len(sel.present),
            "new_bytes": sum(f.size_bytes for f in sel.selected),
            "rejected": rejected,
        },
        "new_files": [{"relpath": f.relpath, "size_bytes": f.size_bytes, "obsid": f.obsid} for f in sel.new],
        "size_mismatch_files": [
            {"relpath": f.relpath, "size_bytes": f.size_bytes, "obsid": f.obsid} for f in sel.size_mismatch
        ],
        "rejected_files": [{"relpath": p, "reason": r} for p, r in sel.rejected if r != "already registered"],
    }


def summary_line(remote: str, sel: Selection) -> str:
    """One-line summary of a selection."""
    rejected = {k: v for k, v in sel.counts.items() if k != "already registered"}
    gb = sum(f.size_bytes for f in sel.selected) / 1e9
    text = (
        f"{remote}: {sel.remote_total} listed, {len(sel.new)} new, {len(sel.registered)} registered, "
        f"{len(sel.size_mismatch)} size mismatch ({gb:.3f} GB to fetch)"
    )
    if rejected:
        text += "; rejected: " + ", ".join(f"{v} {k}" for k, v in sorted(rejected.items()))
    return text


class DataCheckRemote(PipelineStage):
    """List the remote archive and report what is new; downloads nothing.

    Parameters
    ----------
    remote : str
        Local directory (``demo/remote/``), ``[user@]host:path`` (ssh) or
        ``rsync://host[:port]/module[/path]`` (06 §1).
    local_dir : str
        Where files would be placed (used for the "already present" check).
    ssh_command : str
        Passed to rsync as the single ``-e`` argument for ssh remotes.
    remote_index : str or None
        Relative path of an index CSV on the remote (e.g. ``obs_index.csv``); needed by the source
        filters.
    min_obsid_download, max_obsid_download : int, int or None
        Inclusive obsid range.
    skip_registered : bool
        Skip files whose registered level-1 copy exists with the listed size.
    include_sources, exclude_sources, include_source_groups, exclude_source_groups : list or None
        Glob patterns, case-insensitive (need ``remote_index``).
    listing_timeout_s : float
        Subprocess timeout of the listing, s.
    report_dir : str
        Directory of ``remote_check_<timestamp>.json``.
    """

    def __init__(
        self,
        remote: str,
        local_dir: str,
        ssh_command: str = DEFAULT_SSH_COMMAND,
        remote_index: str | None = None,
        min_obsid_download: int = 0,
        max_obsid_download: int | None = None,
        skip_registered: bool = True,
        include_sources: list | tuple | None = None,
        exclude_sources: list | tuple | None = None,
        include_source_groups: list | tuple | None = None,
        exclude_source_groups: list | tuple | None = ("CO",),
        listing_timeout_s: float = 600.0,
        report_dir: str = "logs/acquisition",
    ) -> None:
        self.remote = remote
        self.local_dir = local_dir
        self.ssh_command = ssh_command
        self.remote_index = remote_index
        self.min_obsid_download = min_obsid_download
        self.max_obsid_download = max_obsid_download
        self.skip_registered = skip_registered
        self.include_sources = include_sources
        self.exclude_sources = exclude_sources
        self.include_source_groups = include_source_groups
        self.exclude_source_groups = exclude_source_groups
        self.listing_timeout_s = listing_timeout_s
        self.report_dir = report_dir

    @classmethod
    def validate_config(cls, params: dict[str, Any]) -> list[str]:
        problems = validate_remote_stage_params(params)
        if not str(params.get("report_dir") or "").strip():
            problems.append("report_dir must be a directory path")
        return problems

    def _select(self) -> Selection:
        remote = parse_remote(self.remote)
        rsync = find_rsync()
        if rsync is None and remote.is_local:
            log.warning("rsync not found on PATH; listing %s in Python", remote.text)
        return select_remote_files(
            remote,
            FilterSettings.from_object(self),
            rsync=rsync,
            ssh_command=self.ssh_command,
            remote_index=self.remote_index,
            listing_timeout_s=self.listing_timeout_s,
            local_dir=self.local_dir,
            cli_obsids=self.context.obsids,
            logger=log,
        )

    def plan(self) -> list[str]:
        try:
            sel = self._select()
        except RemoteError as exc:
            return [f"DataCheckRemote: {exc}"]
        return [
            f"DataCheckRemote: {summary_line(self.remote, sel)}",
            f"DataCheckRemote: would write {self.report_dir}/remote_check_<timestamp>.json",
        ]

    def run(self) -> StageResult:
        result = StageResult(stage="DataCheckRemote")
        try:
            sel = self._select()
        except RemoteError as exc:
            log.error("%s", exc)
            result.record_failure(self.remote, str(exc))
            return result
        timestamp = self.context.timestamp or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d_%H-%M-%S")
        report = report_dict(self.remote, self.local_dir, sel, timestamp=timestamp)
        path = Path(self.report_dir) / f"remote_check_{timestamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s; report %s", summary_line(self.remote, sel), path)
        result.done = 1
        result.notes.append(str(path))
        return result
