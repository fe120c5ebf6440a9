"""Read methods of the database facade (docs/database.md#api).

Each query is one short read transaction; ORM rows come back detached (column attributes loaded,
relationships not).
"""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from modules.SQLModule.connection import Connection
from modules.SQLModule.models import (
    QUALITY_COLUMNS,
    CalibrationFlux,
    CalibrationModelFit,
    COMAPData,
    ObservationSummary,
    ProcessingJob,
    QualityFlag,
    SchemaInfo,
)
from modules.SQLModule.values import _chunks, _int, _int_list, _nonempty, _pattern_condition, _str_list
from utils.errors import ConfigError

# Columns of ``calibration_model_fit`` that ``CalibrationTable.from_rows`` reads.
_MODEL_TABLE_KEYS = (
    "feed",
    "band",
    "channel",
    "model_type",
    "poly_coeffs",
    "mjd_ref",
    "nearest_mjds",
    "nearest_gains",
    "mjd_min",
    "mjd_max",
    "fit_rms",
    "n_observations",
)


class Queries(Connection):
    """The read methods of the facade."""

    def schema_version(self) -> int:
        """Return the schema version stored in ``schema_info``."""

        def q(s: Session) -> int:
            value = s.scalar(select(SchemaInfo.value).where(SchemaInfo.key == "schema_version"))
            return int(value) if value is not None else 0

        return self._run_read("schema_version", q)

    def query_data(self, obsid: int) -> COMAPData | None:
        """Return one observation (detached), or None if it is not registered."""
        obsid = _int(obsid, "obsid")
        return self._run_read("query_data", lambda s: s.get(COMAPData, obsid))

    def obsid_exists(self, obsid: int) -> bool:
        """Return True if ``obsid`` is registered in ``comap_data``."""
        obsid = _int(obsid, "obsid")
        return self._run_read(
            "obsid_exists",
            lambda s: s.scalar(select(COMAPData.obsid).where(COMAPData.obsid == obsid)) is not None,
        )

    def query_all_obsids(self) -> list[int]:
        """Return every registered obsid, ascending."""
        return self._run_read(
            "query_all_obsids", lambda s: list(s.scalars(select(COMAPData.obsid).order_by(COMAPData.obsid)))
        )

    def query_observations(
        self,
        *,
        source: str | Iterable[str] | None = None,
        source_group: str | Iterable[str] | None = None,
        min_obsid: int | None = None,
        max_obsid: int | None = None,
        obsids: Iterable[int] | None = None,
        has_level1: bool | None = None,
        has_level2: bool | None = None,
        job_stage: str | None = None,
        job_status: str | Iterable[str] | None = None,
    ) -> list[COMAPData]:
        """Select observations (the general selector), ordered by obsid.

        Parameters
        ----------
        source, source_group : str, list of str or None
            Patterns with wildcards ``*`` and ``?`` (``%`` and ``_`` match literally), matched
            case-insensitively; a list matches any of its patterns. None = any.
        min_obsid, max_obsid : int or None
            Inclusive obsid range.
        obsids : iterable of int or None
            Restrict to these obsids (an empty iterable selects nothing).
        has_level1, has_level2 : bool or None
            Require a non-empty (True) or empty (False) ``level1_path``/``level2_path``.
        job_stage : str or None
            Stage of the job filter (default ``'level2'`` when ``job_status`` is given). With only
            ``job_stage``, observations that have a job row for that stage.
        job_status : str, list of str or None
            Job state(s) of ``(obsid, job_stage)``. An observation without a job row counts as
            ``pending``.

        Returns
        -------
        list of COMAPData
            Detached rows.
        """
        conds: list[Any] = []
        if source is not None:
            conds.append(_pattern_condition(COMAPData.source, source))
        if source_group is not None:
            conds.append(_pattern_condition(COMAPData.source_group, source_group))
        if min_obsid is not None:
            conds.append(COMAPData.obsid >= _int(min_obsid, "min_obsid"))
        if max_obsid is not None:
            conds.append(COMAPData.obsid <= _int(max_obsid, "max_obsid"))
        if has_level1 is not None:
            conds.append(_nonempty(COMAPData.level1_path, bool(has_level1)))
        if has_level2 is not None:
            conds.append(_nonempty(COMAPData.level2_path, bool(has_level2)))
        stmt = select(COMAPData)
        if job_stage is not None or job_status is not None:
            stage = job_stage or "level2"
            stmt = stmt.outerjoin(
                ProcessingJob, and_(ProcessingJob.obsid == COMAPData.obsid, ProcessingJob.stage == stage)
            )
            if job_status is None:
                conds.append(ProcessingJob.id.is_not(None))
            else:
                statuses = _str_list(job_status)
                cond = ProcessingJob.status.in_(statuses)
                if "pending" in statuses:
                    cond = or_(cond, ProcessingJob.id.is_(None))
                conds.append(cond)
        stmt = stmt.where(*conds).order_by(COMAPData.obsid)
        return self._select_by_obsids("query_observations", stmt, COMAPData.obsid, obsids)

    def _select_by_obsids(self, what: str, stmt, column, obsids: Iterable[int] | None) -> list:
        """Run an ORM select, restricted to ``obsids`` in chunks when given."""
        if obsids is None:
            return self._run_read(what, lambda s: list(s.scalars(stmt)))
        ids = sorted(set(_int_list(obsids, "obsid")))

        def q(s: Session) -> list:
            out: list = []
            for chunk in _chunks(ids):
                out.extend(s.scalars(stmt.where(column.in_(chunk))))
            return out

        return self._run_read(what, q) if ids else []

    def load_obsid_list(self, spec: str | os.PathLike | Iterable[int] | int | None) -> list[int]:
        """Return a list of obsids from a list or from a text file.

        Parameters
        ----------
        spec : iterable of int, int, path or None
            A list (or single int) of obsids, or the path of a text file with one obsid per line;
            ``#`` starts a comment and blank lines are allowed. None gives ``[]``.

        Returns
        -------
        list of int
            In the given order; nothing is dropped or de-duplicated. Unknown obsids are reported
            by the caller.

        Raises
        ------
        ConfigError
            The file is missing or a line/item is not an obsid (names the file and line).
        """
        if spec is None:
            return []
        if isinstance(spec, str | os.PathLike):
            path = Path(os.fspath(spec))
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(
                    f"cannot read obsid list file: {exc.strerror or exc}", file=str(path)
                ) from None
            out: list[int] = []
            for lineno, raw in enumerate(text.splitlines(), start=1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                if not re.fullmatch(r"\d+", line):
                    raise ConfigError(
                        "not an obsid (expected one non-negative integer per line)",
                        file=str(path),
                        where=f"line {lineno}",
                        text=raw.strip(),
                    )
                out.append(int(line))
            return out
        items = [spec] if isinstance(spec, numbers.Integral) else list(spec)
        out = []
        for i, item in enumerate(items):
            try:
                value = _int(item, "obsid")
            except ValueError:
                raise ConfigError(
                    "obsid list item is not an integer", where=f"item {i}", text=repr(item)
                ) from None
            if value < 0:
                raise ConfigError("obsid list item is negative", where=f"item {i}", text=repr(item))
            out.append(value)
        return out

    def get_files(
        self,
        source_group: str | Iterable[str] | None = None,
        source: str | Iterable[str] | None = None,
        min_obsid: int | None = 0,
    ) -> list[COMAPData]:
        """Compatibility alias: ``query_observations(..., has_level1=True)``."""
        return self.query_observations(
            source=source, source_group=source_group, min_obsid=min_obsid, has_level1=True
        )

    def get_unprocessed_files(
        self, stage: str = "level2", include_failed: bool = False, **filters: Any
    ) -> list[COMAPData]:
        """Observations whose ``stage`` job is not ``done`` (and not ``failed`` unless asked).

        ``filters`` are passed to :meth:`query_observations`; ``has_level1`` defaults to True
        (pass ``has_level1=None`` to drop it). Running jobs count as not done.
        """
        filters.setdefault("has_level1", True)
        statuses = ["pending", "running"] + (["failed"] if include_failed else [])
        return self.query_observations(job_stage=stage, job_status=statuses, **filters)

    def get_quality_flags(self, obsid: int) -> dict[tuple[int, int, int], QualityFlag]:
        """Return the existing quality rows of ``obsid`` keyed by ``(feed, band, channel)``.

        Missing keys mean good, with no statistics.
        """
        obsid = _int(obsid, "obsid")

        def q(s: Session) -> dict[tuple[int, int, int], QualityFlag]:
            rows = s.scalars(select(QualityFlag).where(QualityFlag.obsid == obsid))
            return {(r.feed, r.band, r.channel): r for r in rows}

        return self._run_read("get_quality_flags", q)

    def is_good(self, obsid: int, feed: int, band: int, channel: int) -> bool:
        """Return ``is_good`` for one element; a missing row gives True."""
        key = (_int(obsid, "obsid"), _int(feed, "feed"), _int(band, "band"), _int(channel, "channel"))

        def q(s: Session) -> bool:
            value = s.scalar(
                select(QualityFlag.is_good).where(
                    QualityFlag.obsid == key[0],
                    QualityFlag.feed == key[1],
                    QualityFlag.band == key[2],
                    QualityFlag.channel == key[3],
                )
            )
            return True if value is None else bool(value)

        return self._run_read("is_good", q)

    def query_statistics(self, columns: str | Iterable[str], **filters: Any) -> list[dict[str, Any]]:
        """Return quality statistics joined with their observation.

        Parameters
        ----------
        columns : str or list of str
            ``quality_flags`` columns to return (e.g. ``'filtered_white_noise'``).
        **filters
            ``source``, ``source_group`` (wildcards as in :meth:`query_observations`),
            ``min_obsid``, ``max_obsid``, ``obsids``, ``feed``/``feeds``, ``band``/``bands``,
            ``channel``/``channels`` (int or list) and ``is_good`` (bool).

        Returns
        -------
        list of dict
            Keys ``obsid, source, source_group, mjd_start, feed, band, channel`` plus ``columns``,
            ordered by obsid, feed, band, channel.
        """
        cols = _str_list(columns)
        bad = [c for c in cols if c not in QUALITY_COLUMNS]
        if bad:
            raise ValueError(f"query_statistics: unknown quality_flags column(s) {bad}")
        allowed = {
            "source",
            "source_group",
            "min_obsid",
            "max_obsid",
            "obsids",
            "feed",
            "feeds",
            "band",
            "bands",
            "channel",
            "channels",
            "is_good",
        }
        unknown = set(filters) - allowed
        if unknown:
            raise TypeError(f"query_statistics: unknown filter(s) {sorted(unknown)}")
        base = ["obsid", "source", "source_group", "mjd_start", "feed", "band", "channel"]
        out_cols = base + [c for c in cols if c not in base]
        conds: list[Any] = []
        if filters.get("source") is not None:
            conds.append(_pattern_condition(COMAPData.source, filters["source"]))
        if filters.get("source_group") is not None:
            conds.append(_pattern_condition(COMAPData.source_group, filters["source_group"]))
        if filters.get("min_obsid") is not None:
            conds.append(QualityFlag.obsid >= _int(filters["min_obsid"], "min_obsid"))
        if filters.get("max_obsid") is not None:
            conds.append(QualityFlag.obsid <= _int(filters["max_obsid"], "max_obsid"))
        for name in ("feed", "band", "channel"):
            for key in (name, name + "s"):
                if filters.get(key) is not None:
                    conds.append(getattr(QualityFlag, name).in_(_int_list(filters[key], key)))
        if filters.get("is_good") is not None:
            conds.append(QualityFlag.is_good.is_(bool(filters["is_good"])))
        selected = [
            COMAPData.obsid,
            COMAPData.source,
            COMAPData.source_group,
            COMAPData.mjd_start,
            QualityFlag.feed,
            QualityFlag.band,
            QualityFlag.channel,
        ] + [getattr(QualityFlag, c) for c in cols if c not in base]
        stmt = (
            select(*selected)
            .join(COMAPData, COMAPData.obsid == QualityFlag.obsid)
            .where(*conds)
            .order_by(QualityFlag.obsid, QualityFlag.feed, QualityFlag.band, QualityFlag.channel)
        )
        return self._rows_by_obsids(
            "query_statistics", stmt, QualityFlag.obsid, filters.get("obsids"), out_cols
        )

    def _rows_by_obsids(self, what: str, stmt, column, obsids, names: list[str]) -> list[dict[str, Any]]:
        def q(s: Session) -> list[dict[str, Any]]:
            if obsids is None:
                return [dict(zip(names, row)) for row in s.execute(stmt)]
            ids = sorted(set(_int_list(obsids, "obsid")))
            out: list[dict[str, Any]] = []
            for chunk in _chunks(ids):
                out.extend(dict(zip(names, row)) for row in s.execute(stmt.where(column.in_(chunk))))
            return out

        return self._run_read(what, q)

    def query_observation_summaries(
        self,
        *,
        min_obsid: int | None = None,
        max_obsid: int | None = None,
        source: str | Iterable[str] | None = None,
        source_group: str | Iterable[str] | None = None,
        processing_status: str | Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Return observation summaries joined with their observation, ordered by obsid.

        Each dict has ``obsid, source, source_group, utc_start, mjd_start, level1_path,
        level2_path`` and every ``observation_summary`` column (None where no summary row exists).
        """
        obs_cols = ["obsid", "source", "source_group", "utc_start", "mjd_start", "level1_path", "level2_path"]
        sum_cols = [c for c in ObservationSummary.column_names() if c != "obsid"]
        conds: list[Any] = []
        if min_obsid is not None:
            conds.append(COMAPData.obsid >= _int(min_obsid, "min_obsid"))
        if max_obsid is not None:
            conds.append(COMAPData.obsid <= _int(max_obsid, "max_obsid"))
        if source is not None:
            conds.append(_pattern_condition(COMAPData.source, source))
        if source_group is not None:
            conds.append(_pattern_condition(COMAPData.source_group, source_group))
        if processing_status is not None:
            conds.append(ObservationSummary.processing_status.in_(_str_list(processing_status)))
        stmt = (
            select(
                *(getattr(COMAPData, c) for c in obs_cols),
                *(getattr(ObservationSummary, c) for c in sum_cols),
            )
            .outerjoin(ObservationSummary, ObservationSummary.obsid == COMAPData.obsid)
            .where(*conds)
            .order_by(COMAPData.obsid)
        )
        return self._rows_by_obsids(
            "query_observation_summaries", stmt, COMAPData.obsid, None, obs_cols + sum_cols
        )

    def get_observation_snapshot(self, obsid: int) -> dict[str, Any]:
        """Return everything about one obsid as plain data.

        Returns
        -------
        dict
            ``obsid``; ``observation`` and ``summary`` (dict or None); ``quality_flags``,
            ``jobs`` and ``calibration_flux`` (lists of dicts, sorted).
        """
        obsid = _int(obsid, "obsid")

        def q(s: Session) -> dict[str, Any]:
            obs = s.get(COMAPData, obsid)
            summ = s.get(ObservationSummary, obsid)
            flags = s.scalars(
                select(QualityFlag)
                .where(QualityFlag.obsid == obsid)
                .order_by(QualityFlag.feed, QualityFlag.band, QualityFlag.channel)
            )
            jobs = s.scalars(
                select(ProcessingJob).where(ProcessingJob.obsid == obsid).order_by(ProcessingJob.stage)
            )
            cal = s.scalars(
                select(CalibrationFlux)
                .where(CalibrationFlux.obsid == obsid)
                .order_by(CalibrationFlux.feed, CalibrationFlux.band, CalibrationFlux.channel)
            )
            return {
                "obsid": obsid,
                "observation": obs.to_dict() if obs is not None else None,
                "summary": summ.to_dict() if summ is not None else None,
                "quality_flags": [r.to_dict() for r in flags],
                "jobs": [r.to_dict() for r in jobs],
                "calibration_flux": [r.to_dict() for r in cal],
            }

        return self._run_read("get_observation_snapshot", q)

    def query_calibration_flux(
        self,
        source: str | Iterable[str] | None,
        min_obsid: int | None = None,
        max_obsid: int | None = None,
        feeds: Iterable[int] | int | None = None,
    ) -> list[CalibrationFlux]:
        """Return calibrator flux rows (detached), ordered by obsid, feed, band, channel.

        Parameters
        ----------
        source : str, list of str or None
            Calibrator name pattern(s), wildcards and case-insensitive as in
            :meth:`query_observations`; None = any.
        min_obsid, max_obsid : int or None
            Inclusive obsid range.
        feeds : int, iterable of int or None
            Feed numbers.
        """
        conds: list[Any] = []
        if source is not None:
            conds.append(_pattern_condition(CalibrationFlux.source, source))
        if min_obsid is not None:
            conds.append(CalibrationFlux.obsid >= _int(min_obsid, "min_obsid"))
        if max_obsid is not None:
            conds.append(CalibrationFlux.obsid <= _int(max_obsid, "max_obsid"))
        if feeds is not None:
            conds.append(CalibrationFlux.feed.in_(_int_list(feeds, "feed")))
        stmt = (
            select(CalibrationFlux)
            .where(*conds)
            .order_by(
                CalibrationFlux.obsid, CalibrationFlux.feed, CalibrationFlux.band, CalibrationFlux.channel
            )
        )
        return self._run_read("query_calibration_flux", lambda s: list(s.scalars(stmt)))

    def query_calibration_models(self, source: str | None = None) -> list[CalibrationModelFit]:
        """Return ``calibration_model_fit`` rows (detached) for ``source`` (case-insensitive) or all."""
        stmt = select(CalibrationModelFit)
        if source is not None:
            stmt = stmt.where(func.lower(CalibrationModelFit.source) == str(source).lower())
        stmt = stmt.order_by(
            CalibrationModelFit.source,
            CalibrationModelFit.feed,
            CalibrationModelFit.band,
            CalibrationModelFit.channel,
        )
        return self._run_read("query_calibration_models", lambda s: list(s.scalars(stmt)))

    def load_calibration_table(self, source: str):
        """Return the calibration table of ``source`` (docs/level2.md#calibrationmodel).

        Parameters
        ----------
        source : str
            Calibrator whose models define the table (matched case-insensitively).

        Returns
        -------
        utils.calibrators.CalibrationTable
            Built with ``CalibrationTable.from_rows(source, rows)``; offers
            ``.factor(feed, band, channel, mjd)``.
        """
        from utils.calibrators import CalibrationTable  # lazy: keeps the import graph light

        rows = [{k: getattr(m, k) for k in _MODEL_TABLE_KEYS} for m in self.query_calibration_models(source)]
        return CalibrationTable.from_rows(source, rows)

    def job_table(
        self,
        stage: str | None,
        status: str | Iterable[str] | None = None,
        obsids: Iterable[int] | None = None,
    ) -> list[ProcessingJob]:
        """Return job rows (detached) of ``stage`` (None = every stage), ordered by obsid and stage."""
        conds: list[Any] = []
        if stage is not None:
            conds.append(ProcessingJob.stage == stage)
        if status is not None:
            conds.append(ProcessingJob.status.in_(_str_list(status)))
        stmt = select(ProcessingJob).where(*conds).order_by(ProcessingJob.obsid, ProcessingJob.stage)
        return self._select_by_obsids("job_table", stmt, ProcessingJob.obsid, obsids)
