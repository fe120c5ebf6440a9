"""DataAcquisition: download new level-1 files with parallel rsync, verify and register them
(docs/acquisition.md#dataacquisition).

Flow of :meth:`DataAcquisition.run`:

1. **Plan.** List the remote, join the optional index and filter (docs/acquisition.md#remote-listing,
   docs/acquisition.md#filters); claim ``(obsid, 'download')`` jobs; split the claimed files into ``n_rsyncs``
   batches balanced by bytes (greedy, largest file first).
2. **Execute.** A ``ThreadPoolExecutor(n_rsyncs)``; each thread runs one rsync process at a time
   with ``--files-from`` (arguments: :func:`modules.DataAcquisition.rsync.transfer_command`).
   Exit 0 is success; 23/24 verify what arrived and retry the rest once; any other code retries
   the whole batch after ``retry_delay_s · backoff_factor^k`` (±30 % jitter), at most
   ``max_retries`` times, then every unverified file fails with ``rsync exit {code}: {stderr}``.
3. **Verify** each arrived file: realpath containment in ``local_dir``, regular file, listed size,
   ``Level1File.validate(probe_tod=True)``. A failing file is moved to
   ``local_dir/.quarantine/<relpath>`` and its job becomes ``failed``.
4. **Register** (coordinator thread only): ``upsert_observation`` and the job transition ``done`` in
   one transaction per file.

Without rsync a local-directory remote is copied in Python (temporary name, size check,
``os.replace``); ssh and daemon remotes fail with the install hint.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from modules.DataAcquisition.filters import Selection
from modules.DataAcquisition.registration import LEVEL1_JOB, read_level1_row
from modules.DataAcquisition.remote_parameters import RemoteSelectionParameters
from modules.DataAcquisition.rsync import (
    INSTALL_HINT,
    PARTIAL_EXIT_CODES,
    ProcessRegistry,
    Remote,
    RemoteError,
    RemoteFile,
    TransferOutcome,
    find_rsync,
    parse_remote,
    python_copy_file,
    run_transfer,
    transfer_command,
    validate_index_relpath,
)
from modules.pipeline_control.logging_setup import Progress, obsid_context
from modules.pipeline_control.parameters import Range
from modules.pipeline_control.Pipeline import PipelineStage, StageResult
from modules.SQLModule.SQLModule import DbOp, db
from utils import faults
from utils.disk import free_space_shortfall
from utils.errors import BadCOMAPFile

log = logging.getLogger("comap.DataAcquisition")

_FILE_MODE_CHARS = set("DFugoarwxXstT0123456789,=+-")
SKIP_DONE = "download job done, local copy missing (use --force)"
SKIP_FAILED = "download failed earlier (use --retry-failed)"
SKIP_BUSY = "being downloaded by another run"
FETCH_MARGIN_FRACTION = 0.05
"""The free-space margin is at least this fraction of the bytes to fetch: room for file-system
overhead and for what else writes to the same disk while the download runs."""


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------


def balanced_batches(files: list[RemoteFile], n: int) -> list[list[RemoteFile]]:
    """Split ``files`` into at most ``n`` non-empty batches balanced by bytes.

    Greedy: files in decreasing size (ties by relative path) go to the batch with the fewest
    bytes so far (ties to the lowest index). Each batch is returned in relative-path order.
    """
    n = max(1, min(int(n), len(files)))
    batches: list[list[RemoteFile]] = [[] for _ in range(n)]
    totals = [0] * n
    for f in sorted(files, key=lambda f: (-f.size_bytes, f.relpath)):
        i = min(range(n), key=lambda k: (totals[k], k))
        batches[i].append(f)
        totals[i] += f.size_bytes
    return [sorted(b, key=lambda f: f.relpath) for b in batches if b]


# ------------------------------------------------------------------------------------------------
# Results passed from batch threads to the coordinator
# ------------------------------------------------------------------------------------------------


@dataclass
class FileResult:
    """Final outcome of one file: ``done`` (with its ``comap_data`` row), ``quarantined`` or ``failed``."""

    file: RemoteFile
    status: str
    reason: str = ""
    row: dict[str, Any] | None = None


@dataclass
class BatchStats:
    transferred: list[str] = field(default_factory=list)
    attempts: int = 0


@dataclass(eq=False, repr=False)
class DataAcquisition(RemoteSelectionParameters, PipelineStage):
    """Download new level-1 files with parallel rsync, verify each one and register it in the database.

    The remote and its filters (``remote`` … ``listing_timeout_s``) come first, in this order, and are
    described in :class:`~modules.DataAcquisition.remote_parameters.RemoteSelectionParameters`.

    Parameters
    ----------
    n_rsyncs : int
        Concurrent rsync processes (one batch each).
    max_retries : int
        Retries per batch after the first attempt.
    retry_delay_s : float
        First retry delay, s; multiplied by ``backoff_factor`` each time, with ±30 % jitter.
    backoff_factor : float
        Factor by which the retry delay grows after each failed attempt of a batch (≥ 1).
    bwlimit_kbps : int or None
        ``--bwlimit`` per rsync process, KiB/s (the legacy setting was 5000).
    rsync_timeout_s : int
        rsync ``--timeout`` (I/O inactivity), s; 0 = no I/O timeout.
    partial_dir : str
        ``--partial-dir``, relative to each destination directory.
    file_mode : str
        ``--chmod`` value.
    dry_run : bool
        Add ``--dry-run``; claim no jobs, verify nothing, write nothing to the DB; print the plan.
    verify : bool
        Validate each downloaded file (``Level1File.validate(probe_tod=True)``).
    quarantine_dir : str
        Directory under ``local_dir`` for files that fail verification.
    register : bool
        Upsert verified files into ``comap_data``.
    free_space_margin_gb : float
        Space that must stay free on ``local_dir``'s file system after the download, GB (10⁹ B); the
        margin is the larger of this and 5 % of the bytes to fetch. With less free space the stage
        fetches nothing and stops the run (docs/reliability.md#transient-io-errors-and-full-disks).
    """

    announces_local_dir = True
    creates_database = True  # the first stage of a new archive (docs/database.md#connection)

    n_rsyncs: Annotated[int, Range(ge=1)] = 2
    max_retries: Annotated[int, Range(ge=0)] = 3
    retry_delay_s: Annotated[float, Range(ge=0)] = 10.0
    backoff_factor: Annotated[float, Range(ge=1)] = 2.0
    bwlimit_kbps: Annotated[int, Range(gt=0)] | None = None
    rsync_timeout_s: Annotated[int, Range(ge=0)] = 300
    partial_dir: str = ".rsync-partial"
    file_mode: str = "F664,D775"
    dry_run: bool = False
    verify: bool = True
    quarantine_dir: str = ".quarantine"
    register: bool = True
    free_space_margin_gb: Annotated[float, Range(ge=0)] = 1.0

    def __post_init__(self) -> None:
        # Injectable for tests: the retry sleep and the jitter source.
        self.sleep: Callable[[float], Any] | None = None
        self.rng: random.Random = random.Random()
        self._stop = threading.Event()
        self._finished: set[int] = set()
        self._registry = ProcessRegistry()

    # ------------------------------------------------------------------ validation
    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        problems = super().parameter_rules(params)
        for name in ("partial_dir", "quarantine_dir"):
            value = str(params[name] or "")
            reason = validate_index_relpath(value)
            if reason is not None or not value.startswith("."):
                problems.append(
                    f"{name} {value!r} must be a hidden relative directory (starting with '.') "
                    "so that file discovery skips it"
                )
        mode = str(params["file_mode"] or "")
        if not mode or not set(mode) <= _FILE_MODE_CHARS:
            problems.append(f"file_mode {mode!r} is not an rsync --chmod value such as 'F664,D775'")
        return problems

    # ------------------------------------------------------------------ selection
    def _remote(self) -> Remote:
        return parse_remote(self.remote)

    def _plan_lines(self, sel: Selection, files: list[RemoteFile], note: str = "") -> list[str]:
        batches = balanced_batches(files, self.n_rsyncs) if files else []
        total = sum(f.size_bytes for f in files)
        lines = [
            f"DataAcquisition: {self.remote} -> {self.local_dir}: {sel.remote_total} listed, "
            f"{len(files)} file(s) to download ({total / 1e6:.1f} MB) in {len(batches)} batch(es){note}"
        ]
        for i, b in enumerate(batches):
            lines.append(
                f"  batch {i}: {len(b)} file(s), {sum(f.size_bytes for f in b) / 1e6:.1f} MB: "
                + ", ".join(f.relpath for f in b[:5])
                + (f", … ({len(b) - 5} more)" if len(b) > 5 else "")
            )
        skipped = Counter(sel.counts)
        if skipped:
            lines.append("  skipped: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
        return lines

    def plan(self) -> list[str]:
        remote = self._remote()
        rsync = find_rsync()
        if rsync is None and not remote.is_local:
            return [f"DataAcquisition: {INSTALL_HINT}"]
        try:
            sel = self._select(remote, rsync)
        except RemoteError as exc:
            return [f"DataAcquisition: {exc}"]
        obsids = [f.obsid for f in sel.selected]
        states = {j.obsid: j.status for j in db.job_table("download", obsids=obsids)} if obsids else {}
        ctx = self.context
        todo, extra = [], Counter()
        mismatch = {f.obsid for f in sel.size_mismatch}
        for f in sel.selected:
            state = states.get(f.obsid)
            if f.obsid not in mismatch and state == "done" and not ctx.force:
                extra[SKIP_DONE] += 1
            elif f.obsid not in mismatch and state == "failed" and not (ctx.retry_failed or ctx.force):
                extra[SKIP_FAILED] += 1
            else:
                todo.append(f)
        sel.counts.update(extra)
        return self._plan_lines(sel, todo, note=" (rsync absent: Python copy)" if rsync is None else "")

    # ------------------------------------------------------------------ run
    def run(self) -> StageResult:
        result = StageResult(stage="DataAcquisition")
        ctx = self.context
        self._stop.clear()
        self._finished = set()
        remote = self._remote()
        rsync = find_rsync()
        if rsync is None:
            if not remote.is_local:
                log.error("%s", INSTALL_HINT)
                result.record_failure(remote.text, INSTALL_HINT)
                return result
            log.warning("rsync not found on PATH; copying from %s with a verified Python copy", remote.text)
        # The download jobs as they were when the selection was made: a size-mismatch re-download
        # takes over a done job only if no other run has touched it since (docs/operations.md#job-states).
        seen = {j.obsid: (j.status, j.updated_utc) for j in db.job_table("download")}
        try:
            sel = self._select(remote, rsync)
        except RemoteError as exc:
            log.error("%s", exc)
            result.record_failure(remote.text, str(exc))
            return result
        skipped = Counter(sel.counts)

        if self.dry_run:
            return self._dry_run(remote, rsync, sel, result)

        if not sel.selected:
            result.skipped = sum(skipped.values())
            self._log_summary(0, 0, 0.0, Counter(), Counter(), 0, skipped)
            return result

        # --- claim
        obsids = [f.obsid for f in sel.selected]
        mismatch = {f.obsid for f in sel.size_mismatch}
        failed_before = {j.obsid for j in db.job_table("download", status="failed", obsids=obsids)}
        claim_kwargs = dict(
            run_id=ctx.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            code_version=ctx.code_version,
            config_sha256=self.parameters_sha256,
            retry_failed=ctx.retry_failed,
        )
        claimed: list[int] = []
        normal = [o for o in obsids if o not in mismatch]
        if normal:
            c = db.claim_jobs(normal, "download", force=ctx.force, **claim_kwargs)
            claimed += c.claimed
            skipped[SKIP_DONE] += len(c.skipped_done)
            skipped[SKIP_FAILED] += len(c.skipped_failed)
            skipped[SKIP_BUSY] += len(c.busy)
            if c.skipped_done:
                log.info(
                    "%d file(s) were downloaded before but have no registered local copy; not fetched again "
                    "(use --force)",
                    len(c.skipped_done),
                )
            if c.skipped_failed:
                log.info("%d file(s) failed earlier; use --retry-failed to try again", len(c.skipped_failed))
        if mismatch:
            log.warning(
                "%d registered file(s) differ in size from the remote; downloading them again: %s",
                len(mismatch),
                ", ".join(str(o) for o in sorted(mismatch)[:10]),
            )
            c = db.claim_jobs(
                sorted(mismatch),
                "download",
                force=True,
                seen={o: seen.get(o, (None, None)) for o in mismatch},
                **claim_kwargs,
            )
            skipped[SKIP_DONE] += len(c.skipped_done)
            claimed += c.claimed
            skipped[SKIP_BUSY] += len(c.busy)
        skipped = Counter({k: v for k, v in skipped.items() if v})
        result.skipped = sum(skipped.values())
        result.retried = len(set(claimed) & failed_before)
        claimed_set = set(claimed)
        files = [f for f in sel.selected if f.obsid in claimed_set]
        if not files:
            self._log_summary(0, 0, 0.0, Counter(), Counter(), 0, skipped)
            return result

        shortfall = self._free_space_shortfall(files)
        if shortfall is not None:  # docs/reliability.md#transient-io-errors-and-full-disks
            db.release_jobs(ctx.run_id)
            result.fatal = shortfall
            return result
        Path(self.local_dir).mkdir(parents=True, exist_ok=True)
        self._execute(remote, rsync, files, result, skipped)
        return result

    def _free_space_shortfall(self, files: list[RemoteFile]) -> str | None:
        """None if ``local_dir`` has room for ``files`` plus the margin, else the one-line reason."""
        need = sum(f.size_bytes for f in files)
        margin = max(int(FETCH_MARGIN_FRACTION * need), int(self.free_space_margin_gb * 1e9))
        return free_space_shortfall(self.local_dir, need, margin)

    # ------------------------------------------------------------------ dry run (parameter)
    def _dry_run(self, remote: Remote, rsync: str | None, sel: Selection, result: StageResult) -> StageResult:
        files = sel.selected
        lines = self._plan_lines(sel, files, note=" (dry run: no jobs claimed, nothing written)")
        would: list[str] = []
        if files and rsync is not None and Path(self.local_dir).is_dir():
            for batch in balanced_batches(files, self.n_rsyncs):
                outcome = self._rsync_attempt(remote, rsync, batch, dry_run=True)
                would += outcome.transferred
                if outcome.returncode != 0:
                    lines.append(f"  rsync --dry-run exit {outcome.returncode}: {outcome.stderr_last}")
            lines.append(f"  rsync --dry-run would transfer {len(would)} file(s)")
        elif files:
            lines.append(f"  {self.local_dir} does not exist yet: every listed file would be transferred")
        shortfall = self._free_space_shortfall(files) if files else None
        if shortfall is not None:
            lines.append(f"  a real run would stop here: {shortfall}")
        for line in lines:
            print(line, flush=True)
            log.info("%s", line)
        result.skipped = sum(sel.counts.values())
        return result

    # ------------------------------------------------------------------ execution
    def _execute(
        self,
        remote: Remote,
        rsync: str | None,
        files: list[RemoteFile],
        result: StageResult,
        skipped: Counter,
    ) -> None:
        batches = balanced_batches(files, self.n_rsyncs)
        total_bytes = sum(f.size_bytes for f in files)
        log.info(
            "downloading %d file(s), %.1f MB, from %s in %d batch(es)%s",
            len(files),
            total_bytes / 1e6,
            remote.text,
            len(batches),
            "" if rsync else " (Python copy)",
        )
        results: queue.Queue[FileResult] = queue.Queue()
        stats = [BatchStats() for _ in batches]
        from tqdm import tqdm

        byte_bar = tqdm(
            total=total_bytes,
            desc="download bytes",
            unit="B",
            unit_scale=True,
            leave=False,
            disable=not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()),
        )
        file_progress = Progress(len(files), desc="download files", logger=log, unit="file")
        sizes = {f.relpath: f.size_bytes for f in files}
        counts: Counter = Counter()
        failed_reasons: Counter = Counter()
        arrived: set[str] = set()

        def handle(fr: FileResult) -> None:
            self._record(fr, result, counts, failed_reasons)
            if fr.status in ("done", "quarantined"):
                arrived.add(fr.file.relpath)
            byte_bar.update(fr.file.size_bytes)
            file_progress.update(1)

        t0 = time.monotonic()
        pool = ThreadPoolExecutor(max_workers=len(batches), thread_name_prefix="rsync")
        futures: list[Future] = [
            pool.submit(self._run_batch, i, remote, rsync, b, results, stats[i])
            for i, b in enumerate(batches)
        ]
        try:
            while len(self._finished) < len(files):
                try:
                    handle(results.get(timeout=0.2))
                except queue.Empty:
                    if all(f.done() for f in futures) and results.empty():
                        break
        except KeyboardInterrupt:
            self._stop.set()
            n = self._registry.terminate_all()
            log.error(
                "interrupted; terminated %d rsync process(es); partial data kept in %s", n, self.partial_dir
            )
            pool.shutdown(wait=True, cancel_futures=True)
            while not results.empty():
                handle(results.get_nowait())
            result.interrupted = True
            byte_bar.close()
            file_progress.close()
            return
        except BaseException:  # e.g. DatabaseError while registering: stop the transfers, then raise
            self._stop.set()
            self._registry.terminate_all()
            pool.shutdown(wait=True, cancel_futures=True)
            byte_bar.close()
            file_progress.close()
            raise
        pool.shutdown(wait=True)
        while not results.empty():
            handle(results.get_nowait())
        for i, fut in enumerate(futures):
            exc = fut.exception()
            if exc is not None:
                log.error("batch %d crashed: %s: %s", i, type(exc).__name__, exc, exc_info=exc)
        # Anything without an outcome (a crashed batch) is failed explicitly.
        for f in files:
            if f.obsid not in self._finished:
                handle(
                    FileResult(f, "failed", "DataAcquisition: internal error in the batch thread (see log)")
                )
        byte_bar.close()
        file_progress.close()
        elapsed = time.monotonic() - t0
        # rsync names a file when it starts sending it; count only those that arrived complete.
        transferred = sorted({p for s in stats for p in s.transferred if p in arrived})
        nbytes = sum(sizes[p] for p in transferred)
        self._log_summary(len(transferred), nbytes, elapsed, counts, failed_reasons, len(files), skipped)

    def _record(self, fr: FileResult, result: StageResult, counts: Counter, failed_reasons: Counter) -> None:
        """Coordinator: write the outcome of one file to the DB (one transaction)."""
        obsid = fr.file.obsid
        if obsid in self._finished:
            return
        self._finished.add(obsid)
        with obsid_context(obsid):
            if fr.status == "done":
                faults.checkpoint("acquisition.arrived")
                ops = [DbOp("upsert_observation", (fr.row,), {})] if (self.register and fr.row) else []
                if ops:  # a verified copy ends an earlier "unusable level-1 file" record
                    ops.append(DbOp("reset_failed", (LEVEL1_JOB, [obsid]), {}))
                db.apply(
                    ops,
                    job={
                        "obsid": obsid,
                        "stage": "download",
                        "status": "done",
                        "error": None,
                        "last_module": "DataAcquisition",
                    },
                )
                counts["verified"] += 1
                result.done += 1
                log.debug("registered %s", fr.file.relpath)
            else:
                db.finish_job(obsid, "download", "failed", error=fr.reason, last_module="DataAcquisition")
                counts[fr.status] += 1
                failed_reasons[fr.reason] += 1
                result.record_failure(obsid, fr.reason)
                log.error("%s", fr.reason)

    def _log_summary(
        self,
        n_files: int,
        nbytes: int,
        elapsed: float,
        counts: Counter,
        failed_reasons: Counter,
        n_claimed: int,
        skipped: Counter,
    ) -> None:
        rate = nbytes / 1e6 / elapsed if elapsed > 0 else 0.0
        failed = counts.get("failed", 0)  # not counting the quarantined ones
        text = (
            f"DataAcquisition summary: {n_files} file(s), {nbytes / 1e6:.1f} MB transferred "
            f"in {elapsed:.1f} s "
            f"({rate:.1f} MB/s); {n_claimed} claimed, {counts.get('verified', 0)} verified, "
            f"{counts.get('quarantined', 0)} quarantined, {failed} failed"
        )
        if failed_reasons:
            text += " (" + "; ".join(f"{v} × {k}" for k, v in failed_reasons.most_common(5)) + ")"
        text += f"; {sum(skipped.values())} skipped"
        if skipped:
            text += " (" + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) + ")"
        log.info("%s", text)

    # ------------------------------------------------------------------ one batch (worker thread)
    def _delay(self, k: int) -> float:
        """Backoff delay before retry ``k`` (0-based): ``retry_delay_s · backoff_factor^k · (1 ± 0.3)``."""
        base = float(self.retry_delay_s) * float(self.backoff_factor) ** k
        return base * (1.0 + self.rng.uniform(-0.3, 0.3))

    def _wait(self, seconds: float) -> None:
        if self.sleep is not None:
            self.sleep(seconds)
        else:
            self._stop.wait(seconds)

    def _rsync_attempt(
        self,
        remote: Remote,
        rsync: str,
        files: list[RemoteFile],
        *,
        dry_run: bool = False,
        on_file: Callable[[str], None] | None = None,
    ) -> TransferOutcome:
        fd, list_path = tempfile.mkstemp(prefix="comap-files-from-", suffix=".txt")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                for f in files:
                    fh.write(f.relpath + "\n")
            cmd = transfer_command(
                rsync,
                files_from=list_path,
                remote=remote,
                local_dir=self.local_dir,
                partial_dir=self.partial_dir,
                timeout_s=self.rsync_timeout_s,
                file_mode=self.file_mode,
                bwlimit_kbps=self.bwlimit_kbps,
                dry_run=dry_run,
                ssh_command=self.ssh_command,
            )
            return run_transfer(cmd, on_file=on_file, registry=self._registry)
        finally:
            try:
                os.unlink(list_path)
            except OSError:
                pass

    def _python_attempt(
        self, remote: Remote, files: list[RemoteFile], on_done: Callable[[str], None]
    ) -> TransferOutcome:
        assert remote.local_path is not None
        transferred: list[str] = []
        errors: list[str] = []
        for f in files:
            if self._stop.is_set():
                break
            try:
                if python_copy_file(remote.local_path, f, self.local_dir):
                    transferred.append(f.relpath)
            except OSError as exc:
                errors.append(f"{f.relpath}: {' '.join(str(exc).split())}")
                continue
            on_done(f.relpath)
        return TransferOutcome(23 if errors else 0, errors[-1] if errors else "", transferred)

    def _run_batch(
        self,
        index: int,
        remote: Remote,
        rsync: str | None,
        files: list[RemoteFile],
        results: queue.Queue,
        stats: BatchStats,
    ) -> None:
        pending = {f.relpath: f for f in files}
        retries = 0
        partial_retry_used = False

        def settle(relpath: str, *, complete: bool) -> None:
            f = pending.get(relpath)
            if f is None:
                return
            fr = self._check(f, complete=complete)
            if fr is not None:
                del pending[relpath]
                results.put(fr)

        previous: list[str] = []

        def on_file(relpath: str) -> None:
            # rsync names a file when it starts on it, after the previous one was completed and
            # renamed into place: verify and register the previous file now, not at the batch end.
            if previous:
                settle(previous[0], complete=False)
            previous[:] = [relpath]

        while pending and not self._stop.is_set():
            stats.attempts += 1
            batch = sorted(pending.values(), key=lambda f: f.relpath)
            previous.clear()
            if rsync is None:
                outcome = self._python_attempt(remote, batch, lambda p: settle(p, complete=False))
            else:
                outcome = self._rsync_attempt(remote, rsync, batch, on_file=on_file)
            stats.transferred += outcome.transferred
            rc = outcome.returncode
            for f in batch:
                settle(f.relpath, complete=rc == 0)
            if not pending or self._stop.is_set():
                break
            if rsync is None:
                label = f"copy failed: {outcome.stderr_last}" if rc else "copy finished without the file"
            else:
                label = f"rsync exit {rc}: {outcome.stderr_last}".rstrip(": ")
            if rc == 0:
                for f in pending.values():
                    results.put(FileResult(f, "failed", f"{label}: {f.relpath} did not arrive"))
                pending.clear()
                break
            if rc in PARTIAL_EXIT_CODES and not partial_retry_used:
                partial_retry_used = True
                log.warning("batch %d: %s; retrying the %d missing file(s) once", index, label, len(pending))
                continue
            if rc not in PARTIAL_EXIT_CODES and retries < int(self.max_retries):
                delay = self._delay(retries)
                retries += 1
                log.warning(
                    "batch %d: %s; retry %d/%d in %.1f s", index, label, retries, int(self.max_retries), delay
                )
                self._wait(delay)
                continue
            for f in pending.values():
                results.put(FileResult(f, "failed", label))
            pending.clear()

    # ------------------------------------------------------------------ verification (worker thread)
    def _check(self, f: RemoteFile, *, complete: bool) -> FileResult | None:
        """Verify one file after a transfer attempt (docs/acquisition.md#verification-and-registration); None
        = not arrived yet (retry)."""
        root = os.path.realpath(self.local_dir)
        dest = os.path.realpath(os.path.join(root, f.relpath))
        with obsid_context(f.obsid):
            if not dest.startswith(root + os.sep):
                return FileResult(
                    f, "failed", f"destination of {f.relpath} resolves outside {self.local_dir}"
                )
            if not os.path.lexists(dest):
                return None
            if not os.path.isfile(dest):
                return FileResult(f, "failed", f"{dest} is not a regular file")
            size = os.path.getsize(dest)
            if size != f.size_bytes:
                if not complete:
                    return None  # an older local copy; rsync has not reached it yet
                return self._quarantine(
                    f, dest, f"{f.relpath} has {size} bytes, the remote listing says {f.size_bytes}"
                )
            if not (self.verify or self.register):
                return FileResult(f, "done")
            try:
                row = read_level1_row(dest, validate=bool(self.verify))
            except BadCOMAPFile as exc:
                return self._quarantine(f, dest, exc.message)
            return FileResult(f, "done", row=row)

    def _quarantine(self, f: RemoteFile, dest: str, reason: str) -> FileResult:
        root = os.path.realpath(self.local_dir)
        target = os.path.join(root, self.quarantine_dir, f.relpath)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(dest, target)
            log.warning("quarantined %s as %s", f.relpath, target)
        except OSError as exc:
            log.warning("cannot quarantine %s (%s); removing it", dest, exc)
            try:
                os.unlink(dest)
            except OSError:
                pass
        return FileResult(f, "quarantined", reason)
