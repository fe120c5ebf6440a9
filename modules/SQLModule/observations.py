"""Writes on observations of the database facade (docs/database.md#api): registration, summaries, level-2
paths and deletion."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, inspect, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from modules.SQLModule.deferred import DeferredWrites, write_op
from modules.SQLModule.models import (
    OBSERVATION_COLUMNS,
    QUALITY_STAT_COLUMNS,
    SUMMARY_COLUMNS,
    CalibrationFlux,
    COMAPData,
    ObservationSummary,
    ProcessingJob,
    QualityFlag,
)
from modules.SQLModule.source_groups import classify
from modules.SQLModule.values import _clean, _first_line, _int, _nonempty, mjd_from_utc_start, utcnow

log = logging.getLogger("comap.db")


def _insert_if_missing(s: Session, model: Any, row: dict[str, Any]) -> bool:
    """PostgreSQL: ``INSERT ... ON CONFLICT DO NOTHING`` of ``row`` into ``model``'s table; True if this
    transaction inserted it. Two runs registering the same observation at once then meet at the row
    (the second waits for the first to commit and leaves the row alone) instead of the second failing
    with a duplicate key (docs/reliability.md#concurrent-runs)."""
    table = model.__table__
    stmt = postgresql.insert(table).values(**row).on_conflict_do_nothing(index_elements=["obsid"])
    return s.execute(stmt.returning(table.c.obsid)).first() is not None


class ObservationWrites(DeferredWrites):
    """Write methods on ``comap_data`` and ``observation_summary`` rows."""

    def upsert_observation(self, data: Mapping[str, Any] | COMAPData) -> bool | None:
        """Insert or update one observation and make sure its summary row exists.

        Parameters
        ----------
        data : dict or COMAPData
            Column values; must contain ``obsid``. Keys that are not ``comap_data`` columns are
            ignored with a DEBUG line (so the ``/comap`` attribute dict can be passed as is).
            ``mjd_start`` is derived from ``utc_start`` unless given. If ``source`` is given
            without ``source_group``, both are set by :func:`~modules.SQLModule.source_groups.classify`
            (``source`` becomes the first token). Paths are made absolute.

        Returns
        -------
        bool or None
            True if the observation was created, False if updated; None in deferred mode.
        """
        return self._write(self._upsert_observation_impl, self._observation_values(data))

    @staticmethod
    def _observation_values(data: Mapping[str, Any] | COMAPData) -> dict[str, Any]:
        if isinstance(data, COMAPData):
            state = inspect(data).dict
            return {k: v for k, v in state.items() if k in OBSERVATION_COLUMNS}
        if not isinstance(data, Mapping):
            raise TypeError(f"upsert_observation: expected a dict or COMAPData, got {type(data).__name__}")
        if "obsid" not in data:
            raise ValueError("upsert_observation: data has no 'obsid'")
        return dict(data)

    @write_op("upsert_observation")
    def _upsert_observation_impl(self, s: Session, data: Mapping[str, Any]) -> bool:
        data = self._observation_values(data)
        values: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in OBSERVATION_COLUMNS:
                values[key] = _clean(value)
            else:
                unknown.append(key)
        obsid = _int(values.pop("obsid"), "obsid")
        if unknown:
            log.debug("upsert_observation %d: ignoring unknown keys %s", obsid, sorted(unknown))
        for key in ("registered_utc", "updated_utc"):
            values.pop(key, None)
        for key in ("level1_path", "level2_path"):
            if values.get(key):
                values[key] = os.path.abspath(values[key])
        if values.get("utc_start") and "mjd_start" not in data:
            try:
                values["mjd_start"] = mjd_from_utc_start(values["utc_start"])
            except ValueError:
                log.warning(
                    "obsid %d: cannot parse utc_start %r; mjd_start left empty", obsid, values["utc_start"]
                )
                values["mjd_start"] = None
        now = utcnow()
        created = None
        if s.get_bind().dialect.name == "postgresql":  # SQLite's BEGIN IMMEDIATE already excludes the race
            created = _insert_if_missing(s, COMAPData, {"obsid": obsid, "registered_utc": now})
            obs = s.get(COMAPData, obsid, populate_existing=True, with_for_update=True)
        else:
            obs = s.get(COMAPData, obsid)
        if "source" in values and "source_group" not in values:
            comment = values.get("comment", obs.comment if obs is not None and not created else "")
            values["source"], values["source_group"] = classify(values["source"], comment)
        if created is None:
            created = obs is None
            if created:
                obs = COMAPData(obsid=obsid, registered_utc=now)
                s.add(obs)
        for key, value in values.items():
            setattr(obs, key, value)
        obs.updated_utc = now
        s.flush()
        if s.get(ObservationSummary, obsid) is None:
            job = s.scalar(
                select(ProcessingJob).where(ProcessingJob.obsid == obsid, ProcessingJob.stage == "level2")
            )
            status = "pending" if job is None else ("complete" if job.status == "done" else job.status)
            row = dict(
                obsid=obsid,
                processing_status=status,
                processing_error=None if job is None else job.error,
                updated_utc=now,
            )
            if s.get_bind().dialect.name == "postgresql":
                _insert_if_missing(s, ObservationSummary, row)
            else:
                s.add(ObservationSummary(**row))
        return created

    def update_observation_summary(self, obsid: int, **cols: Any) -> None:
        """Set ``observation_summary`` columns of a registered observation (creates the row).

        Raises
        ------
        ValueError
            A keyword is not a summary column.
        DatabaseError
            The obsid is not registered.
        """
        self._check_summary_cols(cols)
        return self._write(self._update_observation_summary_impl, _int(obsid, "obsid"), **cols)

    @staticmethod
    def _check_summary_cols(cols: Mapping[str, Any]) -> None:
        bad = sorted(set(cols) - SUMMARY_COLUMNS)
        if bad:
            raise ValueError(f"update_observation_summary: unknown column(s) {bad}")

    @write_op("update_observation_summary")
    def _update_observation_summary_impl(self, s: Session, obsid: int, **cols: Any) -> None:
        self._check_summary_cols(cols)
        obsid = _int(obsid, "obsid")
        self._require_observation(s, obsid, "update_observation_summary")
        summ = s.get(ObservationSummary, obsid)
        if summ is None:
            summ = ObservationSummary(obsid=obsid, processing_status="pending")
            s.add(summ)
        for key, value in cols.items():
            if key == "processing_error":
                value = _first_line(value)
            setattr(summ, key, _clean(value))
        if "updated_utc" not in cols:
            summ.updated_utc = utcnow()

    def set_level2_path(self, obsid: int, path: str | os.PathLike) -> None:
        """Record the published level-2 file of a registered observation (stored absolute)."""
        return self._write(self._set_level2_path_impl, _int(obsid, "obsid"), os.path.abspath(os.fspath(path)))

    @write_op("set_level2_path")
    def _set_level2_path_impl(self, s: Session, obsid: int, path: str) -> None:
        obs = self._require_observation(s, _int(obsid, "obsid"), "set_level2_path")
        obs.level2_path = os.path.abspath(os.fspath(path))
        obs.updated_utc = utcnow()

    def clear_level2_info(self, obsid: int, clear_statistics: bool = False) -> None:
        """Forget an observation's level-2 file.

        Clears ``level2_path`` and ``observation_summary.level2_created_utc``. With
        ``clear_statistics`` also the level-2 summary values (Tsys, tau, calibrator, pointing,
        n_scans), the statistic columns of its quality rows (flags are kept) and its
        ``calibration_flux`` rows. Job states are not changed. Unknown obsids are ignored.
        """
        return self._write(
            self._clear_level2_info_impl, _int(obsid, "obsid"), clear_statistics=bool(clear_statistics)
        )

    @write_op("clear_level2_info")
    def _clear_level2_info_impl(self, s: Session, obsid: int, clear_statistics: bool = False) -> None:
        obsid = _int(obsid, "obsid")
        now = utcnow()
        obs = s.get(COMAPData, obsid)
        if obs is None:
            return
        obs.level2_path = None
        obs.updated_utc = now
        summ = s.get(ObservationSummary, obsid)
        if summ is not None:
            summ.level2_created_utc = None
            summ.updated_utc = now
            if clear_statistics:
                for col in SUMMARY_COLUMNS - {"processing_status", "processing_error", "updated_utc"}:
                    setattr(summ, col, None)
        if clear_statistics:
            s.execute(
                update(QualityFlag)
                .where(QualityFlag.obsid == obsid)
                .values(**dict.fromkeys(QUALITY_STAT_COLUMNS), updated_utc=now)
            )
            s.execute(delete(CalibrationFlux).where(CalibrationFlux.obsid == obsid))

    def scrub_missing_level2_paths(self, clear_statistics: bool = False) -> int | None:
        """Clear ``level2_path`` values whose file no longer exists.

        The filesystem is checked before the write transaction; each row is re-checked inside it.

        Returns
        -------
        int or None
            Number of observations cleared (None in deferred mode).
        """
        if self._deferred:
            return self._write(self._scrub_missing_level2_paths_impl, clear_statistics=bool(clear_statistics))

        def q(s: Session) -> list[tuple[int, str]]:
            rows = s.execute(
                select(COMAPData.obsid, COMAPData.level2_path).where(_nonempty(COMAPData.level2_path, True))
            )
            return [(o, p) for o, p in rows]

        candidates = [
            (o, p) for o, p in self._run_read("scrub_missing_level2_paths", q) if not os.path.exists(p)
        ]
        if not candidates:
            return 0
        return self._run_write(
            "scrub_missing_level2_paths",
            lambda s: self._scrub_missing_level2_paths_impl(s, bool(clear_statistics), candidates),
        )

    @write_op("scrub_missing_level2_paths")
    def _scrub_missing_level2_paths_impl(
        self, s: Session, clear_statistics: bool = False, candidates: list[tuple[int, str]] | None = None
    ) -> int:
        if candidates is None:
            rows = s.execute(
                select(COMAPData.obsid, COMAPData.level2_path).where(_nonempty(COMAPData.level2_path, True))
            )
            candidates = [(o, p) for o, p in rows if not os.path.exists(p)]
        n = 0
        for obsid, path in candidates:
            obs = s.get(COMAPData, obsid)
            if obs is None or obs.level2_path != path or os.path.exists(path):
                continue
            log.info("obsid %d: level-2 file missing, clearing path %s", obsid, path)
            self._clear_level2_info_impl(s, obsid, clear_statistics=clear_statistics)
            n += 1
        return n

    def remap_level2_paths(
        self,
        old_prefix: str,
        new_prefix: str,
        dry_run: bool = True,
        require_new_path_exists: bool = False,
    ) -> dict[str, Any] | None:
        """Rewrite ``level2_path`` values under ``old_prefix`` to ``new_prefix``.

        Prefixes match whole path components: ``/data/l2`` matches ``/data/l2/x.hd5`` but not
        ``/data/l2old/x.hd5``.

        Parameters
        ----------
        old_prefix, new_prefix : str
            Directory prefixes (a trailing ``/`` is ignored).
        dry_run : bool
            Only count (default). A dry run reads and works on a read-only connection.
        require_new_path_exists : bool
            Change only rows whose new path exists.

        Returns
        -------
        dict or None
            ``matched`` (paths under the old prefix), ``changed`` (rewritten, or that would be in a
            dry run), ``skipped_missing`` (new path missing), ``dry_run`` and ``sample`` (up to 10
            ``(obsid, old, new)`` tuples). None in deferred mode (non-dry runs only).
        """
        args = (str(old_prefix), str(new_prefix))
        kwargs = {"dry_run": bool(dry_run), "require_new_path_exists": bool(require_new_path_exists)}
        if dry_run:
            return self._run_read(
                "remap_level2_paths", lambda s: self._remap_level2_paths_impl(s, *args, **kwargs)
            )
        return self._write(self._remap_level2_paths_impl, *args, **kwargs)

    @write_op("remap_level2_paths")
    def _remap_level2_paths_impl(
        self,
        s: Session,
        old_prefix: str,
        new_prefix: str,
        dry_run: bool = True,
        require_new_path_exists: bool = False,
    ) -> dict[str, Any]:
        old = str(old_prefix).rstrip("/")
        new = str(new_prefix).rstrip("/")
        result: dict[str, Any] = {
            "matched": 0,
            "changed": 0,
            "skipped_missing": 0,
            "dry_run": bool(dry_run),
            "sample": [],
        }
        updates: list[dict[str, Any]] = []
        rows = s.execute(
            select(COMAPData.obsid, COMAPData.level2_path)
            .where(_nonempty(COMAPData.level2_path, True))
            .order_by(COMAPData.obsid)
        ).all()
        for obsid, path in rows:
            if not (path == old or path.startswith(old + "/")):
                continue
            result["matched"] += 1
            new_path = new + path[len(old) :]
            if new_path == path:
                continue
            if require_new_path_exists and not os.path.exists(new_path):
                result["skipped_missing"] += 1
                continue
            result["changed"] += 1
            if len(result["sample"]) < 10:
                result["sample"].append((obsid, path, new_path))
            updates.append({"obsid": obsid, "level2_path": new_path, "updated_utc": utcnow()})
        if updates and not dry_run:
            s.execute(update(COMAPData), updates)
        return result

    def delete_observation(self, obsid: int, delete_files: bool = False) -> bool | None:
        """Delete an observation with its summary, flags, calibration rows and jobs.

        Parameters
        ----------
        obsid : int
        delete_files : bool
            Also delete its level-1 and level-2 files, after the transaction commits.

        Returns
        -------
        bool or None
            True if the observation existed (None in deferred mode).
        """
        return self._write(
            self._delete_observation_impl, _int(obsid, "obsid"), delete_files=bool(delete_files)
        )

    @write_op("delete_observation")
    def _delete_observation_impl(self, s: Session, obsid: int, delete_files: bool = False) -> bool:
        obsid = _int(obsid, "obsid")
        obs = s.get(COMAPData, obsid)
        paths = [p for p in (obs.level1_path, obs.level2_path) if p] if obs is not None else []
        for model in (QualityFlag, CalibrationFlux, ObservationSummary, ProcessingJob):
            s.execute(delete(model).where(model.obsid == obsid))
        if obs is not None:
            s.execute(delete(COMAPData).where(COMAPData.obsid == obsid))
            s.expunge(obs)
        if delete_files and paths:

            def remove() -> None:
                for p in paths:
                    try:
                        os.remove(p)
                        log.info("obsid %d: deleted %s", obsid, p)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        log.warning("obsid %d: cannot delete %s: %s", obsid, p, exc)

            self._post_commit(s, remove)
        return obs is not None
