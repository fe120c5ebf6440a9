"""FinalizeLevel2Metadata: the observation's database rows as a snapshot in its level-2 file
(docs/level2.md#finalizelevel2metadata)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from modules.pipeline_control import provenance
from modules.pipeline_control.Pipeline import BaseCOMAPModule, RetryH5PY
from modules.SQLModule.SQLModule import (
    QUALITY_STAT_COLUMNS,
    COMAPData,
    DbOp,
    ObservationSummary,
    QualityFlag,
    SQLModule,
)
from utils import level2 as l2layout
from utils.errors import DatabaseError
from utils.layout import DatasetPath

INTEGER_STATS: tuple[str, ...] = ("n_spikes", "n_nan_values")
"""Integer statistics: stored as int32 with −1 for "no value"."""
FLOAT_STATS: tuple[str, ...] = tuple(c for c in QUALITY_STAT_COLUMNS if c not in INTEGER_STATS)
"""Float statistics: stored as float64 with NaN for "no value"."""
FLAG_COLUMNS: tuple[str, ...] = ("observer_ok", "pipeline_ok", "is_good")

# Deferred operations that change what the snapshot shows (the others are left out).
_SNAPSHOT_OPS = frozenset(
    {
        "upsert_observation",
        "update_observation_summary",
        "update_quality_statistics",
        "bulk_update_quality_statistics",
        "set_quality_flags",
        "reset_observer_flags",
        "set_level2_path",
        "clear_level2_info",
    }
)


class FinalizeLevel2Metadata(BaseCOMAPModule):
    """Write the observation's database state into the level-2 file (``level2/sql_snapshot``).

    The level-2 file then describes itself without the database (docs/level2.md#finalizelevel2metadata):

    * group attributes: the scalar ``comap_data`` columns (NULL columns are listed in the JSON
      attribute ``null_columns``), and ``summary_json``, the ``observation_summary`` row as it
      will be once this observation is recorded (DB row, then the pending deferred operations,
      then ``ctx.summary``; ``processing_status = 'complete'`` because the file is published only
      on success);
    * datasets of length n, one entry per (feed, band, channel) ``quality_flags`` row known at this
      point (DB rows merged with pending operations), sorted by feed, band, channel: ``feed``,
      ``band``, ``channel`` (int16); ``observer_ok``, ``pipeline_ok``, ``is_good`` (bool);
      ``comment`` (UTF-8); the float statistics of docs/database.md#quality_flags (float64, NaN if null);
      ``n_spikes`` and ``n_nan_values`` (int32, −1 if null).

    The database is only read. Pending operations are taken with ``db.peek_deferred()`` (not
    consumed) and replayed on a private in-memory copy of the observation's rows, so the snapshot
    follows exactly the facade's semantics (e.g. the default channels of ``set_quality_flags``).

    It runs whenever another module of the observation ran (``runs_with_others``) and never by
    itself makes an observation count as not done.

    Parameters
    ----------
    group_name : str
        Level-2 group of the snapshot.
    overwrite : bool
        Accepted for uniformity; the snapshot is always rewritten when the module runs.
    plot : bool
        Accepted for uniformity with the other level-2 modules; this module draws no plots.
    plot_dir : str
        Accepted for uniformity with the other level-2 modules; no file is written there.
    """

    runs_with_others = True
    reads = ()
    writes = (l2layout.SQL_SNAPSHOT,)

    def __init__(
        self,
        group_name: str = str(l2layout.SQL_SNAPSHOT),
        overwrite: bool = False,
        plot: bool = False,
        plot_dir: str = "outputs/FinalizeLevel2Metadata",
    ) -> None:
        self.group_name = group_name
        self.overwrite = bool(overwrite)
        self.plot = bool(plot)
        self.plot_dir = plot_dir

    @classmethod
    def entry_paths(cls, entry: DatasetPath, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The snapshot goes to ``group_name``."""
        if entry == l2layout.SQL_SNAPSHOT:
            return (str(params["group_name"]),)
        return super().entry_paths(entry, params)

    @classmethod
    def parameter_rules(cls, params: Mapping[str, Any]) -> list[str]:
        if not str(params["group_name"]).strip("/"):
            return [f"group_name must name a level-2 group, e.g. {l2layout.SQL_SNAPSHOT!r}"]
        return []

    # ------------------------------------------------------------------------------------------
    def run(self, file_info: Any) -> None:
        """Build the snapshot of this observation and (re)write ``group_name``."""
        ctx = self.observation_context(file_info)
        snap = self.snapshot(ctx)
        with RetryH5PY(file_info.level2_path, "a") as l2:
            self._write(l2, snap)
        self.logger.debug("wrote %s with %d quality rows", self.group_name, len(snap["quality_flags"]))

    # ------------------------------------------------------------------------------------------
    def snapshot(self, ctx: Any) -> dict[str, Any]:
        """The observation's rows as they will be once this observation is recorded.

        Returns
        -------
        dict
            ``observation`` (comap_data columns), ``summary`` (observation_summary columns) and
            ``quality_flags`` (list of row dicts sorted by feed, band, channel).
        """
        obsid = int(ctx.obsid)
        file_info = ctx.file_info
        base = self._database_rows(ctx.db, obsid)
        observation = base.get("observation") or {
            c: getattr(file_info, c, None) for c in COMAPData.column_names()
        }
        observation = dict(observation)
        observation["obsid"] = obsid
        final_path = getattr(file_info, "final_level2_path", None)
        if final_path:
            observation["level2_path"] = str(final_path)
        elif not observation.get("level2_path"):
            observation["level2_path"] = getattr(file_info, "level2_path", None)
        ops = self._pending_ops(ctx.db, obsid)
        summary_extra = {k: v for k, v in dict(ctx.summary).items() if k in ObservationSummary.column_names()}
        unknown = sorted(set(ctx.summary) - set(summary_extra))
        if unknown:
            self.logger.warning("ctx.summary has keys that are not observation_summary columns: %s", unknown)
        merged = self._replay(
            obsid, observation, base.get("summary"), base.get("quality_flags") or [], ops, summary_extra
        )
        summary = dict(merged["summary"] or {"obsid": obsid})
        # The file is published only if the observation succeeds, and then the job is recorded as
        # done (mirrored into observation_summary as 'complete').
        summary["processing_status"] = "complete"
        summary["processing_error"] = None
        observation = merged["observation"] or observation
        if final_path:
            observation["level2_path"] = str(final_path)
        return {"observation": observation, "summary": summary, "quality_flags": merged["quality_flags"]}

    def _database_rows(self, database: Any, obsid: int) -> dict[str, Any]:
        if not getattr(database, "connected", False):
            self.logger.debug("no database connection; the snapshot holds this run's values only")
            return {}
        try:
            return database.get_observation_snapshot(obsid)
        except DatabaseError as exc:
            self.logger.warning("cannot read the database rows of this observation: %s", exc)
            return {}

    @staticmethod
    def _pending_ops(database: Any, obsid: int) -> list[DbOp]:
        """Recorded (not yet applied) write operations that concern ``obsid``."""
        peek = getattr(database, "peek_deferred", None)
        if peek is None or not getattr(database, "deferred", False):
            return []
        out: list[DbOp] = []
        for op in peek():
            if op.name not in _SNAPSHOT_OPS:
                continue
            if op.name == "bulk_update_quality_statistics":
                rows = [
                    r
                    for r in (op.args[0] if op.args else op.kwargs.get("rows", []))
                    if int(r["obsid"]) == obsid
                ]
                if rows:
                    out.append(DbOp(op.name, (rows,), {}))
            elif op.name == "reset_observer_flags":
                ids = op.args[0] if op.args else op.kwargs.get("obsids")
                if ids is None or obsid in {int(i) for i in ids}:
                    kwargs = {k: v for k, v in op.kwargs.items() if k != "obsids"}
                    out.append(DbOp(op.name, ([obsid],), kwargs))
            elif op.name == "upsert_observation":
                data = op.args[0] if op.args else op.kwargs.get("data")
                value = data.get("obsid") if isinstance(data, dict) else getattr(data, "obsid", None)
                if value is not None and int(value) == obsid:
                    out.append(op)
            else:
                first = op.args[0] if op.args else op.kwargs.get("obsid")
                if first is not None and int(first) == obsid:
                    out.append(op)
        return out

    def _replay(
        self,
        obsid: int,
        observation: dict[str, Any],
        summary: dict[str, Any] | None,
        flags: list[dict[str, Any]],
        ops: list[DbOp],
        summary_extra: dict[str, Any],
    ) -> dict[str, Any]:
        """Apply ``ops`` and ``summary_extra`` to a private in-memory copy of the rows."""
        with _quiet(logging.getLogger("comap.db")):
            mem = SQLModule()
            mem.connect("sqlite://", create=True)
        try:
            with mem.session() as s:
                s.add(COMAPData(**{k: v for k, v in observation.items() if k in COMAPData.column_names()}))
                if summary:
                    s.add(
                        ObservationSummary(
                            **{k: v for k, v in summary.items() if k in ObservationSummary.column_names()}
                        )
                    )
                for row in flags:
                    s.add(
                        QualityFlag(
                            **{k: v for k, v in row.items() if k != "id" and k in QualityFlag.column_names()}
                        )
                    )
            try:
                mem.apply(ops)
            except (ValueError, DatabaseError) as exc:
                self.logger.warning("cannot merge the pending database operations into the snapshot: %s", exc)
            if summary_extra:
                try:
                    mem.update_observation_summary(obsid, **summary_extra)
                except (ValueError, DatabaseError) as exc:
                    self.logger.warning("cannot merge ctx.summary into the snapshot: %s", exc)
            return mem.get_observation_snapshot(obsid)
        finally:
            mem.disconnect()

    # ------------------------------------------------------------------------------------------
    def _write(self, l2: Any, snap: dict[str, Any]) -> None:
        path = self.group_name.strip("/")
        if path in l2:
            provenance.mark_incomplete(l2[path])
            del l2[path]
        grp = l2.create_group(path)
        grp.attrs["status"] = "incomplete"
        nulls = []
        for col in COMAPData.column_names():
            value = _plain(snap["observation"].get(col))
            if value is None:
                nulls.append(col)
            else:
                grp.attrs[col] = value
        grp.attrs["null_columns"] = json.dumps(nulls)
        grp.attrs["summary_json"] = json.dumps(
            {k: _plain(v) for k, v in sorted(snap["summary"].items())}, sort_keys=True, allow_nan=False
        )
        grp.attrs["snapshot_utc"] = provenance.utc_now_iso()

        rows = sorted(snap["quality_flags"], key=lambda r: (r["feed"], r["band"], r["channel"]))

        def column(name: str) -> list[Any]:
            return [r.get(name) for r in rows]

        def put(name: str, data: np.ndarray, unit: str | None = None) -> None:
            ds = grp.create_dataset(name, data=data, track_times=False)
            if unit:
                ds.attrs["unit"] = unit
            self.mark_complete(ds)

        for name in ("feed", "band", "channel"):
            put(name, np.asarray(column(name), dtype=np.int16).reshape(-1))
        for name in FLAG_COLUMNS:
            put(
                name,
                np.asarray([bool(v) if v is not None else True for v in column(name)], dtype=bool).reshape(
                    -1
                ),
            )
        put(
            "comment",
            np.asarray(
                ["" if v is None else str(v) for v in column("comment")], dtype=h5py.string_dtype("utf-8")
            ),
        )
        for name in FLOAT_STATS:
            put(
                name,
                np.asarray([math.nan if v is None else float(v) for v in column(name)], dtype=np.float64),
            )
        for name in INTEGER_STATS:
            put(name, np.asarray([-1 if v is None else int(v) for v in column(name)], dtype=np.int32))
        self.mark_complete(grp)


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Raise ``logger`` to WARNING for the block (the in-memory copy's creation is not news)."""
    previous = logger.level
    logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)


def _plain(value: Any) -> Any:
    """A value HDF5 attributes and JSON accept: datetimes as ISO-8601 UTC, NaN as None."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(_dt.UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
