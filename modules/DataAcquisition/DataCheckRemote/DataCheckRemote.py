"""DataCheckRemote: list the remote archive and report what is new; downloads nothing
(docs/acquisition.md#datacheckremote)."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.DataAcquisition.filters import Selection
from modules.DataAcquisition.remote_parameters import RemoteSelectionParameters
from modules.DataAcquisition.rsync import RemoteError, find_rsync, parse_remote
from modules.pipeline_control.Pipeline import PipelineStage, StageResult

log = logging.getLogger("comap.DataCheckRemote")


def report_dict(remote: str, local_dir: str, sel: Selection, *, timestamp: str) -> dict[str, Any]:
    """The JSON report of a remote check (docs/acquisition.md#datacheckremote step 2)."""
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


@dataclass(eq=False, repr=False)
class DataCheckRemote(RemoteSelectionParameters, PipelineStage):
    """List the remote archive and report what is new; downloads nothing.

    The remote and its filters (``remote`` … ``listing_timeout_s``) come first, in this order, and are
    described in :class:`~modules.DataAcquisition.remote_parameters.RemoteSelectionParameters`.

    Parameters
    ----------
    local_dir : str
        Where DataAcquisition would download the files; read only, for the "already present" check
        (nothing is written there).
    report_dir : str
        Directory of ``remote_check_<timestamp>.json``.
    """

    report_dir: str = "logs/acquisition"

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = super().parameter_rules(params)
        if not str(params["report_dir"] or "").strip():
            problems.append("report_dir must be a directory path")
        return problems

    def _list(self) -> Selection:
        remote = parse_remote(self.remote)
        rsync = find_rsync()
        if rsync is None and remote.is_local:
            log.warning("rsync not found on PATH; listing %s in Python", remote.text)
        return self._select(remote, rsync)

    def plan(self) -> list[str]:
        try:
            sel = self._list()
        except RemoteError as exc:
            return [f"DataCheckRemote: {exc}"]
        return [
            f"DataCheckRemote: {summary_line(self.remote, sel)}",
            f"DataCheckRemote: would write {self.report_dir}/remote_check_<timestamp>.json",
        ]

    def run(self) -> StageResult:
        result = StageResult(stage="DataCheckRemote")
        try:
            sel = self._list()
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
