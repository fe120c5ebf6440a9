"""DataAssess: discover level-1 and level-2 files on disk and register them
(docs/acquisition.md#dataassess)."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

from modules.DataAcquisition.registration import (
    DEMO_HINT,
    LEVEL1_JOB,
    directory_expected,
    observation_row,
    read_level1_row,
)
from modules.pipeline_control import jobs
from modules.pipeline_control.logging_setup import obsid_context
from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from modules.SQLModule.SQLModule import db
from utils.constants import (
    LEVEL1_NAME_RE,
    LEVEL2_NAME_RE,
    SUPPORTED_LEVEL2_FORMAT_VERSIONS,
    obsid_from_level1_name,
)
from utils.errors import BadCOMAPFile

log = logging.getLogger("comap.DataAssess")

__all__ = ["DEMO_HINT", "LEVEL1_JOB", "DataAssess", "level2_complete", "observation_row", "walk_files"]


def walk_files(root: Path, pattern, *, follow_symlinks: bool = False) -> Iterator[Path]:
    """Entries under ``root`` whose base name matches ``pattern``; hidden directories and files
    (``.quarantine``, ``.rsync-partial``, staging files) are skipped.

    A directory whose name matches is yielded, not searched: the caller reports it as an unusable
    file. Any other directory named ``*.hd5`` is searched with a warning."""
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", d, exc)
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir(follow_symlinks=follow_symlinks):
                    if pattern.match(e.name):
                        yield Path(e.path)
                        continue
                    if e.name.endswith(".hd5"):
                        log.warning("%s is a directory named like an HDF5 file; searching it", e.path)
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=follow_symlinks) and pattern.match(e.name):
                    yield Path(e.path)
            except OSError:
                continue


def level2_complete(path: Path) -> tuple[bool, int | None, str | None, str]:
    """Read a level-2 file's obsid and format version and whether every module output is complete.

    Returns (usable, obsid, code_version, reason).
    """
    with h5py.File(path, "r", locking=False) as l2:
        obsid = l2.attrs.get("obsid")
        version = l2.attrs.get("level2_format_version")
        code = l2.attrs.get("comap_reduce_version")
        if isinstance(code, bytes):
            code = code.decode()
        if obsid is None:
            return False, None, code, "no root attribute obsid"
        if version is None or int(version) not in SUPPORTED_LEVEL2_FORMAT_VERSIONS:
            return False, int(obsid), code, f"unsupported level2_format_version {version}"
        incomplete: list[str] = []

        def visit(name: str, obj: Any) -> None:
            status = obj.attrs.get("status")
            if isinstance(status, bytes):
                status = status.decode()
            if status is not None and status != "complete":
                incomplete.append(name)

        l2.visititems(visit)
        if incomplete:
            return False, int(obsid), code, f"incomplete outputs: {', '.join(incomplete[:3])}"
        return True, int(obsid), code, ""


class DataAssess(PipelineStage):
    """Discover level-1 and level-2 files on disk and register or refresh them in the database.

    Parameters
    ----------
    level1_data_paths : list of str
        Roots searched recursively for level-1 names (``comap-<obsid>-<date>-<time>.hd5``).
    level2_data_paths : list of str
        Roots searched for ``Level2_comap-*.hd5``; complete files are registered as done.
    overwrite_existing : bool
        Re-read and update observations that are already registered.
    validate_level2_paths : bool
        Null out registered level-2 paths whose file is missing.
    clear_quality_stats_on_missing : bool
        Also clear the statistics of such observations.
    verify_level1 : bool
        Run the full level-1 validator (C1–C13), not just the attribute read.
    follow_symlinks : bool
        Follow symbolic links while walking.
    """

    creates_database = True  # registers observations (docs/database.md#connection)

    def __init__(
        self,
        level1_data_paths: list[str] | None = None,
        level2_data_paths: list[str] | None = None,
        overwrite_existing: bool = False,
        validate_level2_paths: bool = True,
        clear_quality_stats_on_missing: bool = False,
        verify_level1: bool = False,
        follow_symlinks: bool = False,
    ) -> None:
        self.level1_data_paths = list(level1_data_paths or [])
        self.level2_data_paths = list(level2_data_paths or [])
        self.overwrite_existing = overwrite_existing
        self.validate_level2_paths = validate_level2_paths
        self.clear_quality_stats_on_missing = clear_quality_stats_on_missing
        self.verify_level1 = verify_level1
        self.follow_symlinks = follow_symlinks
        self._failed_before: dict[int, _dt.datetime | None] = {}  # obsid → time of its level1 failure
        self._skipped_failed: list[int] = []  # obsids skipped because they failed earlier

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = []
        for p in params["level1_data_paths"] or []:
            if Path(p).is_dir() or directory_expected(p):
                continue  # a DataAcquisition earlier in the pipeline creates its local_dir
            if Path(p).exists():
                problems.append(f"level1_data_paths: {p} is not a directory")
                continue
            hint = f"; {DEMO_HINT}" if Path(p).parts[:1] == ("demo",) else ""
            problems.append(f"level1_data_paths: directory {p} does not exist{hint}")
        return problems

    def plan(self) -> list[str]:
        n1 = sum(
            1
            for root in self.level1_data_paths
            if Path(root).is_dir()
            for _ in walk_files(Path(root), LEVEL1_NAME_RE, follow_symlinks=self.follow_symlinks)
        )
        n2 = sum(
            1
            for root in self.level2_data_paths
            if Path(root).is_dir()
            for _ in walk_files(Path(root), LEVEL2_NAME_RE, follow_symlinks=self.follow_symlinks)
        )
        known = set(db.query_all_obsids())
        return [
            f"DataAssess: {n1} level-1 file(s) under {self.level1_data_paths} "
            f"({len(known)} observation(s) registered), {n2} level-2 file(s) under {self.level2_data_paths}"
        ]

    def run(self) -> StageResult:
        result = StageResult(stage="DataAssess")
        if self.validate_level2_paths:
            n = db.scrub_missing_level2_paths(clear_statistics=self.clear_quality_stats_on_missing)
            if n:
                log.info("cleared %d level-2 path(s) whose file is missing", n)
        registered = {o.obsid: o for o in db.query_observations()}
        self._failed_before = {j.obsid: j.finished_utc for j in db.job_table(LEVEL1_JOB, status="failed")}
        self._skipped_failed = []
        seen_level1: dict[int, Path] = {}
        counts = {
            "level1 new": 0,
            "level1 updated": 0,
            "level1 unchanged": 0,
            "level1 unusable earlier": 0,
            "level2 registered": 0,
            "level2 unchanged": 0,
            "level2 needs reprocessing": 0,
        }
        for root in self.level1_data_paths:
            if not Path(root).is_dir():
                reason = f"level-1 root {root} does not exist"
                log.warning("%s; nothing registered from it", reason)
                result.record_failure(root, reason)
                continue
            for path in walk_files(Path(root), LEVEL1_NAME_RE, follow_symlinks=self.follow_symlinks):
                self._assess_level1(path, registered, seen_level1, counts, result)
        if self._skipped_failed:
            log.info(
                "%d unusable level-1 file(s) not changed since they failed; skipped (use --retry-failed): %s",
                len(self._skipped_failed),
                ", ".join(str(o) for o in self._skipped_failed[:10]),
            )
        for root in self.level2_data_paths:
            if not Path(root).is_dir():
                log.info("level-2 root %s does not exist yet; nothing to register there", root)
                continue
            for path in walk_files(Path(root), LEVEL2_NAME_RE, follow_symlinks=self.follow_symlinks):
                self._assess_level2(path, counts, result)
        result.done = counts["level1 new"] + counts["level1 updated"] + counts["level2 registered"]
        result.skipped = (
            counts["level1 unchanged"] + counts["level1 unusable earlier"] + counts["level2 unchanged"]
        )
        log.info(
            "DataAssess: %s; %d unreadable", ", ".join(f"{v} {k}" for k, v in counts.items()), result.failed
        )
        return result

    def _assess_level1(
        self,
        path: Path,
        registered: dict[int, Any],
        seen: dict[int, Path],
        counts: dict[str, int],
        result: StageResult,
    ) -> None:
        obsid_from_name = obsid_from_level1_name(path.name)
        if obsid_from_name in seen:
            log.warning(
                "obsid %d has two level-1 files: %s and %s; keeping the first",
                obsid_from_name,
                seen[obsid_from_name],
                path,
            )
            return
        seen[obsid_from_name] = path
        failed_at = self._failed_before.get(obsid_from_name, False)
        if failed_at is not False and not self._retry(path, failed_at):
            counts["level1 unusable earlier"] += 1
            self._skipped_failed.append(obsid_from_name)
            return
        if path.is_dir():
            self._unusable(obsid_from_name, path, "is a directory, not a level-1 file", result)
            return
        existing = registered.get(obsid_from_name)
        abspath = str(path.resolve())
        if (
            existing is not None
            and failed_at is False
            and not self.overwrite_existing
            and existing.level1_path == abspath
            and existing.level1_size_bytes == path.stat().st_size
        ):
            counts["level1 unchanged"] += 1
            return
        try:
            row = read_level1_row(path, validate=self.verify_level1)
        except BadCOMAPFile as exc:
            self._unusable(obsid_from_name, path, exc.message, result)
            return
        db.upsert_observation(row)
        if failed_at is not False:
            db.finish_job(obsid_from_name, LEVEL1_JOB, "done", last_module="DataAssess")
            with obsid_context(obsid_from_name):
                log.info("%s is usable again; its failure record is cleared", path)
        counts["level1 updated" if existing is not None else "level1 new"] += 1

    def _retry(self, path: Path, failed_at: _dt.datetime | None) -> bool:
        """Read a file that failed before only with --retry-failed or --force, or if it changed since
        (modification or status-change time later than the failure)."""
        if self.context.retry_failed or self.context.force or failed_at is None:
            return True
        try:
            st = path.stat()
        except OSError:
            return True
        return max(st.st_mtime, st.st_ctime) > failed_at.timestamp()

    @staticmethod
    def _unusable(obsid: int, path: Path, reason: str, result: StageResult) -> None:
        """One warning line, a failure of the stage and a failed ``level1`` job with the reason
        (docs/acquisition.md#unusable-level-1-files)."""
        text = reason if path.name in reason else f"{path}: {reason}"
        with obsid_context(obsid):
            log.warning("unusable level-1 file, not registered: %s", text)
        result.record_failure(path.name, text)
        stored = text.replace(str(path), str(path.absolute()), 1)  # the database keeps absolute paths
        db.finish_job(obsid, LEVEL1_JOB, "failed", error=stored, last_module="DataAssess")

    def _assess_level2(self, path: Path, counts: dict[str, int], result: StageResult) -> None:
        try:
            usable, obsid, code, reason = level2_complete(path)
        except OSError as exc:
            log.warning("cannot read level-2 file %s: %s", path, exc)
            result.record_failure(path.name, f"unreadable level-2 file: {exc}")
            return
        if not usable or obsid is None:
            log.info("%s needs reprocessing: %s", path.name, reason)
            counts["level2 needs reprocessing"] += 1
            return
        abspath = str(path.resolve())
        current = db.query_data(obsid)
        if current is None:
            with h5py.File(path, "r", locking=False) as l2:
                attrs = (
                    {k: (v.decode() if isinstance(v, bytes) else v) for k, v in l2["comap"].attrs.items()}
                    if "comap" in l2
                    else {"obsid": obsid}
                )
            attrs["obsid"] = obsid
            db.upsert_observation(observation_row(attrs, level1_path=None, size_bytes=None, n_feeds=None))
        job_rows = db.job_table("level2", obsids=[obsid])
        if (
            current is not None
            and current.level2_path == abspath
            and job_rows
            and job_rows[0].status == "done"
        ):
            counts["level2 unchanged"] += 1
            return
        # Replay the observation's DB outcome recorded in the file, then point at this copy.
        from modules.SQLModule.SQLModule import DbOp

        ops = [*(jobs.stored_db_ops(path) or []), DbOp("set_level2_path", (obsid, abspath), {})]
        db.apply(
            ops,
            job={
                "obsid": obsid,
                "stage": "level2",
                "status": "done",
                "error": None,
                "last_module": "DataAssess",
                "code_version": code,
            },
        )
        log.info(
            "registered %s (written by comap-reduce %s; %d DB operations replayed)",
            path.name,
            code,
            len(ops) - 1,
        )
        counts["level2 registered"] += 1
