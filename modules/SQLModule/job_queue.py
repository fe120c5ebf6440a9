"""Job queue of the database facade (docs/database.md#api, docs/operations.md#resumability): claim, heartbeat,
finish and release jobs.

One ``processing_jobs`` row per (obsid, stage) holds its state (``pending``, ``running``, ``done``,
``failed``). For stage ``level2`` the observation's ``observation_summary.processing_status``
mirrors the job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from modules.SQLModule.deferred import DeferredWrites, write_op
from modules.SQLModule.models import COMAPData, ObservationSummary, ProcessingJob
from modules.SQLModule.values import _chunks, _first_line, _int, _int_list, _unique, utcnow
from utils.errors import DatabaseError
from utils.processes import pid_alive

log = logging.getLogger("comap.db")


@dataclass
class ClaimResult:
    """Outcome of :meth:`SQLModule.claim_jobs`, lists of obsids in the order given.

    Attributes
    ----------
    claimed : list of int
        Jobs now ``running`` for this run (including reclaimed stale jobs).
    skipped_done : list of int
        ``done`` jobs left alone (``force=False``, or finished by another run since ``seen``).
    skipped_failed : list of int
        ``failed`` jobs left alone (``retry_failed=False`` and ``force=False``, or changed since
        ``seen``).
    busy : list of int
        ``running`` jobs of another live run.
    reclaimed_stale : list of int
        The subset of ``claimed`` that was taken over from a stale owner.
    """

    claimed: list[int] = field(default_factory=list)
    skipped_done: list[int] = field(default_factory=list)
    skipped_failed: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)
    reclaimed_stale: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Return the number of obsids in each list."""
        return {
            "claimed": len(self.claimed),
            "skipped_done": len(self.skipped_done),
            "skipped_failed": len(self.skipped_failed),
            "busy": len(self.busy),
            "reclaimed_stale": len(self.reclaimed_stale),
        }


@dataclass(frozen=True)
class _Claim:
    """Owner and provenance recorded on rows claimed by one :meth:`JobQueue.claim_jobs` call, and
    which states it may take over."""

    run_id: str
    host: str
    pid: int
    code_version: str | None
    config_sha256: str | None
    retry_failed: bool
    force: bool
    stale_after_s: float


Seen = tuple[str | None, datetime | None]
"""A job as the caller saw it before claiming: ``(status, updated_utc)``, ``(None, None)`` = no row."""


def _lock_job_rows(s: Session, ids: list[int], stage: str, now: datetime) -> dict[int, ProcessingJob]:
    """Create the missing job rows and return every row of ``ids``, locked for this transaction
    (docs/database.md#concurrent-runs).

    Rows are inserted with ``INSERT ... ON CONFLICT DO NOTHING``: a row another run inserts at the
    same moment is not an error, the insert waits for that run's transaction and then leaves the
    row alone. On PostgreSQL the rows are then locked with ``SELECT ... FOR UPDATE`` in obsid order
    (two runs lock overlapping sets in the same order, so they queue instead of deadlocking) and
    read after the lock is granted, i.e. as the previous owner committed them. On SQLite the
    transaction began with ``BEGIN IMMEDIATE`` and already excludes every other writer.
    """
    dialect = s.get_bind().dialect.name
    order = sorted(ids)
    table = ProcessingJob.__table__
    for chunk in _chunks(order):
        rows = [dict(obsid=o, stage=stage, status="pending", attempts=0, created_utc=now) for o in chunk]
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            s.execute(insert(table).on_conflict_do_nothing(index_elements=["obsid", "stage"]), rows)
        else:  # other back-ends: rows that exist are skipped (no row lock before the insert)
            stmt = select(table.c.obsid).where(table.c.stage == stage, table.c.obsid.in_(chunk))
            have = set(s.scalars(stmt))
            new = [r for r in rows if r["obsid"] not in have]
            if new:
                s.execute(table.insert(), new)
    existing: dict[int, ProcessingJob] = {}
    for chunk in _chunks(order):
        stmt = (
            select(ProcessingJob)
            .where(ProcessingJob.stage == stage, ProcessingJob.obsid.in_(chunk))
            .order_by(ProcessingJob.obsid)
            .execution_options(populate_existing=True)
        )
        if dialect != "sqlite":
            stmt = stmt.with_for_update()
        for job in s.scalars(stmt):
            existing[job.obsid] = job
    return existing


class JobQueue(DeferredWrites):
    """Job methods of the facade; ``claim_jobs`` needs the live database, the others defer."""

    def claim_jobs(
        self,
        obsids: Iterable[int],
        stage: str,
        *,
        run_id: str,
        host: str,
        pid: int,
        code_version: str | None,
        config_sha256: str | None,
        retry_failed: bool = False,
        force: bool = False,
        stale_after_s: float = 21600,
        seen: Mapping[int, Seen] | None = None,
    ) -> ClaimResult:
        """Claim jobs for this run in ONE transaction (docs/operations.md#job-states).

        Missing job rows are created (``INSERT ... ON CONFLICT DO NOTHING``), then every row is
        locked and classified inside the same transaction, so two runs claiming the same obsids at
        the same instant never both get one (docs/database.md#concurrent-runs). Each obsid is
        classified:

        - ``pending`` (or new) → **claimed**;
        - ``done`` → **skipped_done**, unless ``force``;
        - ``failed`` → **skipped_failed**, unless ``retry_failed`` or ``force``;
        - ``running`` of this ``run_id`` → claimed again (already ours; ``attempts`` unchanged);
        - ``running`` and **stale** — ``host`` equals this ``host`` and its ``pid`` is not alive,
          or ``updated_utc`` is older than ``stale_after_s`` — → claimed, listed in
          ``reclaimed_stale`` and logged at WARNING;
        - other ``running`` → **busy**, even with ``force``.

        Claimed rows become ``running`` with the owner fields, ``started_utc``, a cleared
        ``error``/``last_module``, and ``attempts += 1``. For stage ``level2`` the summary's
        ``processing_status`` becomes ``running``. Lock conflicts (SQLite ``database is locked``,
        PostgreSQL deadlocks and serialisation failures) roll the transaction back and retry it
        with backoff; after the last retry one :class:`DatabaseError` is raised.

        The coordinator decides itself whether a ``done`` observation needs work (its level-2
        file passes every module's done-check, docs/level2.md#level2pipeline). It therefore calls
        ``claim_jobs`` only for the obsids it has decided to process, with ``force=True`` and the
        job states it based that decision on (``seen``): a ``done`` or ``failed`` job is then taken
        over only if it is still exactly as seen; a job another run finished in the meantime is
        classified as if ``force`` were False. With ``force=False`` a ``done`` job is never claimed.

        Parameters
        ----------
        obsids : iterable of int
            Obsids to claim (duplicates are ignored; order is kept in the result).
        stage : str
            ``'level2'`` or ``'download'``.
        run_id, host, pid, code_version, config_sha256
            Owner and provenance recorded on claimed rows; ``host`` and ``pid`` identify this
            coordinator (``socket.gethostname()``, ``os.getpid()``).
        retry_failed : bool
            Claim ``failed`` jobs (``--retry-failed``).
        force : bool
            Claim ``done`` and ``failed`` jobs too (``--force``, or a module added).
        stale_after_s : float
            Age of ``updated_utc`` after which a running job is stale (``stale_job_timeout_s``).
        seen : mapping of int to (str or None, datetime or None), or None
            ``obsid → (status, updated_utc)`` of the job rows as the caller read them
            (``(None, None)``: no row; obsids not in the mapping count as no row). ``force`` then
            applies only to jobs that still match. None: ``force`` applies unconditionally.

        Returns
        -------
        ClaimResult

        Raises
        ------
        DatabaseError
            Read-only or deferred mode (claiming needs the live database), or a database error.
        """
        if self._deferred:
            raise DatabaseError("claim_jobs needs the live database; it cannot run in deferred mode")
        ids = _unique(_int_list(obsids, "obsid"))
        claim = _Claim(
            run_id=str(run_id),
            host=str(host),
            pid=_int(pid, "pid"),
            code_version=code_version,
            config_sha256=config_sha256,
            retry_failed=bool(retry_failed),
            force=bool(force),
            stale_after_s=float(stale_after_s),
        )
        if seen is not None:
            seen = {_int(k, "obsid"): (v[0], v[1]) for k, v in seen.items()}
        return self._run_write("claim_jobs", lambda s: self._claim_jobs(s, ids, str(stage), claim, seen))

    def _claim_jobs(
        self, s: Session, ids: list[int], stage: str, claim: _Claim, seen: Mapping[int, Seen] | None
    ) -> ClaimResult:
        now = utcnow()
        existing = _lock_job_rows(s, ids, stage, now)
        result = ClaimResult()
        for obsid in ids:
            job = existing[obsid]
            # ``force`` takes over a done/failed job only if nobody touched it since the caller looked.
            unchanged = seen is None or seen.get(obsid, (None, None)) == (job.status, job.updated_utc)
            force = claim.force and unchanged
            if job.status == "running":
                if job.run_id == claim.run_id:
                    result.claimed.append(obsid)
                    job.updated_utc = now
                    continue
                reason = self._stale_reason(job, claim.host, now, claim.stale_after_s)
                if reason is None:
                    result.busy.append(obsid)
                    continue
                log.warning(
                    "reclaiming stale %s job of obsid %d (run %s, host %s, pid %s): %s",
                    stage,
                    obsid,
                    job.run_id,
                    job.host,
                    job.pid,
                    reason,
                )
                result.reclaimed_stale.append(obsid)
            elif job.status == "done" and not force:
                result.skipped_done.append(obsid)
                continue
            elif job.status == "failed" and not (claim.retry_failed or force):
                result.skipped_failed.append(obsid)
                continue
            job.status = "running"
            job.run_id = claim.run_id
            job.host = claim.host
            job.pid = claim.pid
            job.code_version = claim.code_version
            job.config_sha256 = claim.config_sha256
            job.error = None
            job.last_module = None
            job.attempts = (job.attempts or 0) + 1
            job.started_utc = now
            job.finished_utc = None
            job.updated_utc = now
            result.claimed.append(obsid)
        if stage == "level2" and result.claimed:
            s.flush()
            self._mirror_summary(s, result.claimed, "running", None, now)
        return result

    @staticmethod
    def _stale_reason(job: ProcessingJob, host: str, now: datetime, stale_after_s: float) -> str | None:
        if job.host == host and job.pid is not None and not pid_alive(job.pid):
            return f"owner pid {job.pid} is not alive on this host"
        if job.updated_utc is None:
            return "no heartbeat recorded"
        age = (now - job.updated_utc).total_seconds()
        if age > stale_after_s:
            return f"last update {age:.0f} s ago (> {stale_after_s:g} s)"
        return None

    def _mirror_summary(
        self, s: Session, obsids: Sequence[int], status: str, error: str | None, now: datetime
    ) -> None:
        """Mirror a level-2 job state into ``observation_summary`` of registered observations."""
        summary_status = "complete" if status == "done" else status
        for chunk in _chunks(list(obsids)):
            registered = set(s.scalars(select(COMAPData.obsid).where(COMAPData.obsid.in_(chunk))))
            if not registered:
                continue
            summaries = {
                r.obsid: r
                for r in s.scalars(
                    select(ObservationSummary).where(ObservationSummary.obsid.in_(list(registered)))
                )
            }
            for obsid in registered:
                summ = summaries.get(obsid)
                if summ is None:
                    summ = ObservationSummary(obsid=obsid)
                    s.add(summ)
                summ.processing_status = summary_status
                summ.processing_error = error
                summ.updated_utc = now

    def finish_job(
        self,
        obsid: int,
        stage: str,
        status: str,
        *,
        error: str | None = None,
        last_module: str | None = None,
        code_version: str | None = None,
        config_sha256: str | None = None,
    ) -> None:
        """Record the outcome of a job (creating the row if needed).

        Parameters
        ----------
        obsid : int
        stage : str
        status : {'done', 'failed', 'pending'}
            New state. ``done``/``failed`` set ``finished_utc``; ``done`` clears ``error``.
        error : str or None
            Reason of a failure; only its first line is stored.
        last_module : str or None
            Module that failed or last completed.
        code_version, config_sha256 : str or None
            Provenance to record (e.g. DataAssess taking it from a level-2 file); None keeps the
            claimed values.

        Notes
        -----
        For stage ``level2`` the observation's ``processing_status`` mirrors the job (``done`` is
        written as ``complete``) and ``processing_error`` the error.
        """
        if status not in ("done", "failed", "pending"):
            raise ValueError(f"finish_job: status must be 'done', 'failed' or 'pending', not {status!r}")
        return self._write(
            self._finish_job_impl,
            _int(obsid, "obsid"),
            str(stage),
            status,
            error=_first_line(error),
            last_module=last_module,
            code_version=code_version,
            config_sha256=config_sha256,
        )

    @write_op("finish_job")
    def _finish_job_impl(
        self,
        s: Session,
        obsid: int,
        stage: str,
        status: str,
        *,
        error: str | None = None,
        last_module: str | None = None,
        code_version: str | None = None,
        config_sha256: str | None = None,
    ) -> None:
        if status not in ("done", "failed", "pending"):
            raise ValueError(f"finish_job: status must be 'done', 'failed' or 'pending', not {status!r}")
        obsid = _int(obsid, "obsid")
        now = utcnow()
        job = s.scalar(
            select(ProcessingJob).where(ProcessingJob.obsid == obsid, ProcessingJob.stage == stage)
        )
        if job is None:
            job = ProcessingJob(obsid=obsid, stage=stage, attempts=0, created_utc=now)
            s.add(job)
        job.status = status
        job.error = None if status == "done" else _first_line(error)
        if last_module is not None:
            job.last_module = last_module
        if code_version is not None:
            job.code_version = code_version
        if config_sha256 is not None:
            job.config_sha256 = config_sha256
        job.finished_utc = now if status in ("done", "failed") else None
        job.updated_utc = now
        if stage == "level2":
            s.flush()
            self._mirror_summary(s, [obsid], status, job.error, now)

    def touch_job(self, obsid: int, stage: str, run_id: str) -> bool | None:
        """Heartbeat: refresh ``updated_utc`` of a job ``running`` for ``run_id``.

        Returns
        -------
        bool or None
            True if the row was refreshed (None in deferred mode).
        """
        return self._write(self._touch_job_impl, _int(obsid, "obsid"), str(stage), str(run_id))

    @write_op("touch_job")
    def _touch_job_impl(self, s: Session, obsid: int, stage: str, run_id: str) -> bool:
        res = s.execute(
            update(ProcessingJob)
            .where(
                ProcessingJob.obsid == obsid,
                ProcessingJob.stage == stage,
                ProcessingJob.status == "running",
                ProcessingJob.run_id == run_id,
            )
            .values(updated_utc=utcnow())
            .execution_options(synchronize_session=False)
        )
        return bool(res.rowcount)

    def release_jobs(self, run_id: str) -> int | None:
        """Return this run's ``running`` jobs to ``pending`` (interrupt handling,
        docs/operations.md#job-states).

        Returns
        -------
        int or None
            Number of jobs released (None in deferred mode).
        """
        return self._write(self._release_jobs_impl, str(run_id))

    @write_op("release_jobs")
    def _release_jobs_impl(self, s: Session, run_id: str) -> int:
        now = utcnow()
        jobs = list(
            s.scalars(
                select(ProcessingJob).where(ProcessingJob.status == "running", ProcessingJob.run_id == run_id)
            )
        )
        for job in jobs:
            job.status = "pending"
            job.updated_utc = now
        level2 = [j.obsid for j in jobs if j.stage == "level2"]
        if level2:
            s.flush()
            self._mirror_summary(s, level2, "pending", None, now)
        return len(jobs)

    def reset_failed(self, stage: str, obsids: Iterable[int] | None = None) -> int | None:
        """Set ``failed`` jobs of ``stage`` (optionally only ``obsids``) back to ``pending``.

        The error is cleared. Returns the number of jobs reset (None in deferred mode).
        """
        ids = None if obsids is None else _int_list(obsids, "obsid")
        return self._write(self._reset_failed_impl, str(stage), ids)

    @write_op("reset_failed")
    def _reset_failed_impl(self, s: Session, stage: str, obsids: Iterable[int] | None = None) -> int:
        now = utcnow()
        base = select(ProcessingJob).where(ProcessingJob.stage == stage, ProcessingJob.status == "failed")
        if obsids is None:
            jobs = list(s.scalars(base))
        else:
            jobs = []
            for chunk in _chunks(_unique(_int_list(obsids, "obsid"))):
                jobs.extend(s.scalars(base.where(ProcessingJob.obsid.in_(chunk))))
        for job in jobs:
            job.status = "pending"
            job.error = None
            job.finished_utc = None
            job.updated_utc = now
        if stage == "level2" and jobs:
            s.flush()
            self._mirror_summary(s, [j.obsid for j in jobs], "pending", None, now)
        return len(jobs)
