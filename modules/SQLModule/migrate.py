"""Schema migration: ``python -m modules.SQLModule.migrate DB [--dry-run]`` (docs/database.md#migration).

Migration is an explicit step; :meth:`SQLModule.connect` never migrates. The only upgrade defined
today is **legacy → version 1**.

The legacy schema
-----------------
The legacy pipeline's database has no ``schema_info`` table. Its tables, as this migrator reads
them (columns it does not know are reported as "not carried")::

    comap_data            obsid INTEGER PK, level1_path, level2_path, source, source_group,
                          utc_start ('%Y-%m-%d-%H:%M:%S'), comment, telescope, instrument,
                          platform, pixels, version, bof, bw, tsamp, coeff_iq, features,
                          fft_shift, iqcalid, level, nbit, nchan, nint          (no mjd_start)
    observation_summary   obsid INTEGER PK, processing_status, median_tsys, mean_tau,
                          calibrator_flux, calibrator_flux_error, calibrator_chi2,
                          pointing_offset_az/el/ra/dec, n_scans, last_updated
    quality_flags         id, obsid, pixel (1–19), frequency_band (flat band 0–7), is_good,
                          comment, filtered_* / unfiltered_* noise statistics, n_spikes,
                          n_nan_values, mean_atm_temp
    calibration_flux      id, obsid, pixel, frequency_band, mjd, source, measured_flux,
                          flux_error, amplitude, amplitude_error, chi2, x_offset, y_offset
    calibration_model_fit id, pixel, frequency_band, model_type, poly_coeffs (JSON text),
                          mjd_ref, nearest_mjds, nearest_gains (JSON text), fit_rms,
                          n_observations, mjd_min, mjd_max                       (no source)
    old_path_data         obsid, old_level1_path, old_level2_path

Legacy → version 1
------------------
1. Back up the database: SQLite is copied (consistently, with the SQLite backup API) to
   ``<db>.bak-<YYYYmmddTHHMMSS>``. On PostgreSQL the legacy tables are kept instead of dropped,
   moved into the schema ``comap_legacy_<YYYYmmddTHHMMSS>`` by the migration transaction itself.
   Other back-ends need ``--skip-backup`` after a manual dump.
2. In **one transaction**: rename the legacy tables to ``_legacy_<name>`` (dropping their
   indexes), create the version-1 tables, and copy:

   - ``comap_data``: every row; ``mjd_start`` is filled from ``utc_start``; ``source`` and
     ``source_group`` are re-derived with :func:`~modules.SQLModule.source_groups.classify`
     (the legacy substring rules misfiled e.g. "Cosmos" as CO).
   - ``observation_summary``: the common columns; unknown ``processing_status`` values become
     ``pending``.
   - ``quality_flags``: only rows holding at least one statistic, mapped from (pixel 1–19, flat
     band 0–7) to ``feed = pixel``, ``band = fb // 2``, ``channel = fb % 2``, with all flags
     True. Statistic-free default rows are dropped. Observer-flag rows are **not** carried (legacy
     observer rows used bands 0–3 in the same column, so they cannot be told apart from flat
     bands): ObserverFlags must be re-run.
   - ``calibration_flux``: mapped the same way; ``frequency_ghz`` is read from the row's level-2
     ``level2/central_freqs`` when the file is readable, else left NULL with a warning.
   - ``calibration_model_fit``: mapped the same way, with ``source`` = ``--model-source``
     (default TauA; the legacy table had no source column).
   - ``old_path_data`` is dropped, as are the ``_legacy_*`` tables (kept on PostgreSQL, see 1.);
     ``schema_version = 1`` is written and the database is stamped at the head Alembic revision
     (docs/database.md#schema-migrations). No ``processing_jobs`` rows are created: legacy
     level-2 files predate level-2 format version 1 and are reprocessed.
3. Print a report of rows copied, mapped and dropped per table. ``--dry-run`` reads the database
   read-only, computes the same report and writes nothing (no backup either).

Exit status: 0 on success (also when there is nothing to do), 2 on usage errors, 3 on database
errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from modules.SQLModule.engine import _resolve_target, make_engine
from modules.SQLModule.models import (
    MODEL_TYPES,
    QUALITY_STAT_COLUMNS,
    SCHEMA_VERSION,
    SUMMARY_STATUSES,
    Base,
    CalibrationFlux,
    CalibrationModelFit,
    COMAPData,
    ObservationSummary,
    QualityFlag,
    SchemaInfo,
    good_flag_values,
)
from modules.SQLModule.schema import alembic_config, lock_schema
from modules.SQLModule.source_groups import classify
from modules.SQLModule.values import _clean, mjd_from_utc_start, utcnow
from utils.constants import GROUND_FEED
from utils.errors import DatabaseError
from utils.level2 import CENTRAL_FREQS, FEEDS

__all__ = ["LEGACY_TABLES", "MigrationReport", "TableReport", "main", "migrate"]

log = logging.getLogger("comap.db")

LEGACY_TABLES: tuple[str, ...] = (
    "comap_data",
    "observation_summary",
    "quality_flags",
    "calibration_flux",
    "calibration_model_fit",
    "old_path_data",
)
"""Tables of the legacy schema, in copy order."""

_BATCH = 2000
_OBSERVER_FLAGS_CMD = "python -m modules.DataAcquisition.ObserverFlags.ObserverFlags CSV --db {target}"


# ==================================================================================================
# Report
# ==================================================================================================
@dataclass
class TableReport:
    """Row counts of one table.

    Attributes
    ----------
    legacy_rows : int
        Rows read from the legacy table.
    written : int
        Rows written to the version-1 table (or that would be, in a dry run).
    mapped : int
        Written rows whose (pixel, flat band) was mapped to (feed, band, channel).
    dropped : collections.Counter
        Dropped rows by reason.
    notes : list of str
        Further remarks (columns not carried, values derived, ...).
    """

    legacy_rows: int = 0
    written: int = 0
    mapped: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


@dataclass
class MigrationReport:
    """What :func:`migrate` did (or would do, in a dry run)."""

    target: str
    dry_run: bool
    state: str = "legacy"
    """``legacy`` (migrated), ``current`` (already version 1) or ``empty``."""
    backup: str | None = None
    tables: dict[str, TableReport] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str) -> TableReport:
        """Return (creating) the report of table ``name``."""
        return self.tables.setdefault(name, TableReport())

    def format(self) -> str:
        """Return the plain-text report."""
        head = "DRY RUN (nothing written): " if self.dry_run else ""
        lines = [f"{head}migration of {self.target}"]
        if self.state == "current":
            lines.append(f"database already has schema version {SCHEMA_VERSION}; nothing to do")
            return "\n".join(lines)
        if self.state == "empty":
            lines.append("database is empty; nothing to migrate (connecting creates the schema)")
            return "\n".join(lines)
        lines.append(f"legacy -> schema version {SCHEMA_VERSION}")
        if self.backup:
            lines.append(f"backup: {self.backup}")
        lines.append(f"{'table':<24}{'legacy':>9}{'written':>9}{'mapped':>9}{'dropped':>9}")
        for name, t in self.tables.items():
            lines.append(
                f"{name:<24}{t.legacy_rows:>9}{t.written:>9}{t.mapped:>9}{sum(t.dropped.values()):>9}"
            )
        for name, t in self.tables.items():
            for reason, n in sorted(t.dropped.items()):
                lines.append(f"  {name}: dropped {n} row(s): {reason}")
            for note in t.notes:
                lines.append(f"  {name}: {note}")
        lines.extend(f"WARNING: {w}" for w in self.warnings)
        lines.extend(f"NOTE: {n}" for n in self.notes)
        return "\n".join(lines)


# ==================================================================================================
# Helpers
# ==================================================================================================
def _json_list(value: Any) -> list | None:
    """Parse a legacy JSON-text list (or pass a list through); None if empty or unparseable."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        if not value.strip():
            return None
        value = json.loads(value)
    if isinstance(value, int | float):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"not a list: {value!r}")
    return [None if isinstance(v, float) and math.isnan(v) else v for v in value]


def _map_element(row: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """Map legacy (pixel 1–19, flat band 0–7) to (feed, band, channel); None if out of range."""
    try:
        pixel = int(row["pixel"])
        fb = int(row["frequency_band"])
    except (TypeError, ValueError):
        return None
    if not (1 <= pixel < GROUND_FEED) or not (0 <= fb <= 7):
        return None
    return pixel, fb // 2, fb % 2


def _has_statistic(row: Mapping[str, Any]) -> bool:
    for col in QUALITY_STAT_COLUMNS:
        value = _clean(row.get(col))
        if value is not None:
            return True
    return False


def _rows(conn: Connection, table: str, order_by: str) -> Iterator[Mapping[str, Any]]:
    result = conn.execute(text(f'SELECT * FROM "{table}" ORDER BY {order_by}'))
    yield from result.mappings()


def _columns(conn: Connection, table: str) -> list[str]:
    return [c["name"] for c in inspect(conn).get_columns(table)]


def _elements(
    conn: Connection,
    src: str,
    legacy_cols: list[str],
    t: TableReport,
    obsids: Collection[int],
    drop: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> Iterator[tuple[Mapping[str, Any], int, tuple[int, int, int]]]:
    """Yield the legacy per-element rows of ``src`` that map to one new (obsid, feed, band, channel).

    Rows are read in obsid order and counted in ``t``; a row is dropped (with its reason counted)
    when ``drop`` gives a reason, its obsid is not in ``obsids``, its pixel or flat band is out of
    range, or its element was already seen for that obsid.

    Yields
    ------
    row : mapping
        The legacy row.
    obsid : int
    element : tuple of int
        ``(feed, band, channel)``.
    """
    current, seen = None, set()
    for row in _rows(conn, src, "obsid, " + ("id" if "id" in legacy_cols else "rowid")):
        t.legacy_rows += 1
        reason = drop(row) if drop is not None else None
        if reason is not None:
            t.dropped[reason] += 1
            continue
        obsid = _clean(row["obsid"])
        if obsid not in obsids:
            t.dropped["obsid not in comap_data"] += 1
            continue
        element = _map_element(row)
        if element is None:
            t.dropped["pixel or flat band out of range"] += 1
            continue
        if obsid != current:
            current, seen = obsid, set()
        if element in seen:
            t.dropped["duplicate (obsid, pixel, frequency_band)"] += 1
            continue
        seen.add(element)
        yield row, obsid, element


class _Frequencies:
    """Read ``level2/central_freqs`` of one level-2 file at a time (rows arrive sorted by obsid)."""

    def __init__(self, report: MigrationReport) -> None:
        self.report = report
        self.obsid: int | None = None
        self.freqs = None
        self.feeds: list[int] | None = None
        self.missing_rows = Counter()
        self.reasons: dict[int, str] = {}

    def load(self, obsid: int, path: str | None) -> None:
        if obsid == self.obsid:
            return
        self.obsid, self.freqs, self.feeds = obsid, None, None
        if not path:
            self.reasons[obsid] = "no level-2 path"
            return
        if not os.path.isfile(path):
            self.reasons[obsid] = f"level-2 file not found: {path}"
            return
        try:
            import h5py

            with h5py.File(path, "r") as f:
                self.freqs = f[CENTRAL_FREQS][...]
                if FEEDS in f:
                    self.feeds = [int(x) for x in f[FEEDS][...]]
        except (OSError, KeyError, ValueError) as exc:
            self.reasons[obsid] = f"cannot read {CENTRAL_FREQS} from {path}: {' '.join(str(exc).split())}"
            self.freqs = None

    def lookup(self, obsid: int, feed: int, band: int, channel: int, fb: int) -> float | None:
        freqs = self.freqs
        value = None
        try:
            if freqs is None:
                pass
            elif freqs.ndim == 3:
                ifeed = self.feeds.index(feed) if self.feeds is not None else feed - 1
                value = float(freqs[ifeed, band, channel])
            elif freqs.ndim == 2:
                value = float(freqs[band, channel])
            elif freqs.ndim == 1:
                value = float(freqs[fb])
        except (IndexError, ValueError):
            self.reasons.setdefault(obsid, f"central_freqs has shape {freqs.shape}")
            value = None
        if value is not None and not math.isfinite(value):
            value = None
        if value is None:
            self.missing_rows[obsid] += 1
        return value

    def finish(self) -> None:
        for obsid, n in sorted(self.missing_rows.items()):
            reason = self.reasons.get(obsid, "no finite central frequency")
            msg = f"calibration_flux: obsid {obsid}: frequency_ghz left NULL for {n} row(s): {reason}"
            self.report.warnings.append(msg)
            log.warning(msg)


class _Writer:
    """Batch inserts into a version-1 table (no-op in a dry run)."""

    def __init__(self, conn: Connection, table, dry_run: bool) -> None:
        self.conn, self.table, self.dry_run = conn, table, dry_run
        self.columns = [c.name for c in table.columns if c.name != "id"]  # ids are renumbered
        self.batch: list[dict[str, Any]] = []

    def add(self, row: Mapping[str, Any]) -> None:
        if self.dry_run:
            return
        self.batch.append({c: row.get(c) for c in self.columns})
        if len(self.batch) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            self.conn.execute(self.table.insert(), self.batch)
            self.batch = []


# ==================================================================================================
# Per-table copies
# ==================================================================================================
def _copy_comap_data(conn, src: str, dry_run: bool, report: MigrationReport) -> dict[int, str | None]:
    t = report.table("comap_data")
    new_cols = set(COMAPData.column_names())
    legacy_cols = _columns(conn, src)
    if "obsid" not in legacy_cols:
        raise DatabaseError(f"legacy table {src} has no obsid column")
    not_carried = sorted(set(legacy_cols) - new_cols)
    if not_carried:
        t.notes.append(f"legacy columns not carried: {', '.join(not_carried)}")
    writer = _Writer(conn, COMAPData.__table__, dry_run)
    now = utcnow()
    level2: dict[int, str | None] = {}
    filled = bad_utc = regrouped = 0
    for row in _rows(conn, src, "obsid"):
        t.legacy_rows += 1
        values = {c: _clean(row[c]) for c in legacy_cols if c in new_cols}
        try:
            obsid = int(values["obsid"])
        except (TypeError, ValueError):
            t.dropped["obsid is not an integer"] += 1
            continue
        values["obsid"] = obsid
        if values.get("utc_start"):
            try:
                values["mjd_start"] = mjd_from_utc_start(values["utc_start"])
                filled += 1
            except ValueError:
                values["mjd_start"] = None
                bad_utc += 1
        source, group = classify(values.get("source"), values.get("comment"))
        if group != values.get("source_group") or source != values.get("source"):
            regrouped += 1
        values["source"], values["source_group"] = source, group
        values["registered_utc"] = None
        values["updated_utc"] = now
        level2[obsid] = values.get("level2_path")
        writer.add(values)
        t.written += 1
    writer.flush()
    t.notes.append(f"mjd_start filled from utc_start for {filled} row(s)")
    if bad_utc:
        t.notes.append(f"utc_start unparseable in {bad_utc} row(s); mjd_start left NULL")
    if regrouped:
        t.notes.append(f"source/source_group re-derived by the version-1 rules changed {regrouped} row(s)")
    return level2


def _copy_summary(conn, src: str, dry_run: bool, report: MigrationReport, obsids: set[int]) -> None:
    t = report.table("observation_summary")
    new_cols = set(ObservationSummary.column_names())
    legacy_cols = _columns(conn, src)
    not_carried = sorted(set(legacy_cols) - new_cols)
    if not_carried:
        t.notes.append(f"legacy columns not carried: {', '.join(not_carried)}")
    writer = _Writer(conn, ObservationSummary.__table__, dry_run)
    now = utcnow()
    remapped = 0
    seen: set[int] = set()
    for row in _rows(conn, src, "obsid"):
        t.legacy_rows += 1
        values = {c: _clean(row[c]) for c in legacy_cols if c in new_cols}
        obsid = values.get("obsid")
        if obsid not in obsids:
            t.dropped["obsid not in comap_data"] += 1
            continue
        if obsid in seen:
            t.dropped["duplicate obsid"] += 1
            continue
        seen.add(obsid)
        status = values.get("processing_status")
        if status not in SUMMARY_STATUSES:
            values["processing_status"] = "pending"
            remapped += 1
        values["updated_utc"] = now
        writer.add(values)
        t.written += 1
    writer.flush()
    if remapped:
        t.notes.append(f"processing_status not in {SUMMARY_STATUSES} set to 'pending' in {remapped} row(s)")


def _copy_quality_flags(conn, src: str, dry_run: bool, report: MigrationReport, obsids: set[int]) -> None:
    t = report.table("quality_flags")
    legacy_cols = _columns(conn, src)
    for needed in ("obsid", "pixel", "frequency_band"):
        if needed not in legacy_cols:
            raise DatabaseError(f"legacy table {src} has no {needed} column")
    writer = _Writer(conn, QualityFlag.__table__, dry_run)
    now = utcnow()
    stats = [c for c in QUALITY_STAT_COLUMNS if c in legacy_cols]

    def no_statistic(row: Mapping[str, Any]) -> str | None:
        return None if _has_statistic(row) else "no statistic (default or observer-flag row)"

    for row, obsid, (feed, band, channel) in _elements(conn, src, legacy_cols, t, obsids, no_statistic):
        values = {c: _clean(row[c]) for c in stats}
        values.update(good_flag_values(obsid, feed, band, channel, now), comment=None)
        writer.add(values)
        t.written += 1
        t.mapped += 1
    writer.flush()
    t.notes.append("legacy is_good and comment not carried; every migrated row starts good")
    report.notes.append(
        "observer flags were NOT carried over (legacy observer rows cannot be told apart from flat "
        "bands); re-run ObserverFlags: " + _OBSERVER_FLAGS_CMD.format(target=report.target)
    )


def _copy_calibration_flux(
    conn, src: str, dry_run: bool, report: MigrationReport, level2: dict[int, str | None]
) -> None:
    t = report.table("calibration_flux")
    legacy_cols = _columns(conn, src)
    renames = {"x_offset": "x_offset_deg", "y_offset": "y_offset_deg"}
    new_cols = set(CalibrationFlux.column_names())
    writer = _Writer(conn, CalibrationFlux.__table__, dry_run)
    freqs = _Frequencies(report)
    for row, obsid, (feed, band, channel) in _elements(conn, src, legacy_cols, t, level2.keys()):
        values: dict[str, Any] = {}
        for c in legacy_cols:
            name = renames.get(c, c)
            if name in new_cols and name not in ("id", "feed", "band", "channel"):
                values[name] = _clean(row[c])
        freqs.load(obsid, level2.get(obsid))
        values.update(
            obsid=obsid,
            feed=feed,
            band=band,
            channel=channel,
            frequency_ghz=freqs.lookup(obsid, feed, band, channel, int(row["frequency_band"])),
        )
        writer.add(values)
        t.written += 1
        t.mapped += 1
    writer.flush()
    freqs.finish()
    n_null = sum(freqs.missing_rows.values())
    t.notes.append(f"frequency_ghz read from level-2 central_freqs for {t.written - n_null} row(s)")


def _copy_models(conn, src: str, dry_run: bool, report: MigrationReport, model_source: str) -> None:
    t = report.table("calibration_model_fit")
    legacy_cols = _columns(conn, src)
    new_cols = set(CalibrationModelFit.column_names())
    writer = _Writer(conn, CalibrationModelFit.__table__, dry_run)
    now = utcnow()
    seen: set[tuple[int, int, int]] = set()
    for row in _rows(conn, src, "id" if "id" in legacy_cols else "rowid"):
        t.legacy_rows += 1
        element = _map_element(row)
        if element is None:
            t.dropped["pixel or flat band out of range"] += 1
            continue
        if element in seen:
            t.dropped["duplicate (pixel, frequency_band)"] += 1
            continue
        values = {
            c: _clean(row[c])
            for c in legacy_cols
            if c in new_cols and c not in ("id", "source", "feed", "band", "channel")
        }
        try:
            for c in ("poly_coeffs", "nearest_mjds", "nearest_gains"):
                if c in values:
                    values[c] = _json_list(values[c])
        except (ValueError, TypeError):
            t.dropped["unparseable JSON coefficients"] += 1
            continue
        if values.get("model_type") not in MODEL_TYPES:
            t.dropped["unknown model_type"] += 1
            continue
        seen.add(element)
        feed, band, channel = element
        if values.get("mjd_ref") is None:
            values["mjd_ref"] = 59000.0
        values.update(source=model_source, feed=feed, band=band, channel=channel, updated_utc=now)
        writer.add(values)
        t.written += 1
        t.mapped += 1
    writer.flush()
    if t.written:
        t.notes.append(f"source set to {model_source!r} (the legacy table had no source)")


# ==================================================================================================
# Driver
# ==================================================================================================
def _detect(engine: Engine) -> tuple[str, str | None]:
    with engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
        if not names:
            return "empty", None
        if "schema_info" not in names:
            return "legacy", None
        value = conn.execute(
            select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")
        ).scalar_one_or_none()
    if value == str(SCHEMA_VERSION):
        return "current", value
    return "unknown", value


def _backup(path: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        n += 1
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(str(dest))
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    shutil.copystat(path, dest)
    return dest


def _run(
    conn: Connection, report: MigrationReport, *, dry_run: bool, model_source: str, keep_in: str | None = None
) -> None:
    present = set(inspect(conn).get_table_names())
    if "comap_data" not in present:
        raise DatabaseError(f"database {report.target} has no comap_data table; not a legacy COMAP database")
    names = {t: t for t in LEGACY_TABLES if t in present}
    others = sorted(present - set(LEGACY_TABLES))
    if others:
        report.notes.append(f"tables left untouched: {', '.join(others)}")
    if not dry_run:
        for t in names:
            for index in inspect(conn).get_indexes(t):
                if index.get("name") and not index.get("duplicates_constraint"):
                    conn.exec_driver_sql(f'DROP INDEX "{index["name"]}"')
            conn.exec_driver_sql(f'ALTER TABLE "{t}" RENAME TO "_legacy_{t}"')
            names[t] = f"_legacy_{t}"
        Base.metadata.create_all(conn, checkfirst=True)

    level2 = _copy_comap_data(conn, names["comap_data"], dry_run, report)
    obsids = set(level2)
    if "observation_summary" in names:
        _copy_summary(conn, names["observation_summary"], dry_run, report, obsids)
    # Observations without a legacy summary row get one, as upsert_observation would create.
    t = report.table("observation_summary")
    if not dry_run:
        have = set(conn.execute(select(ObservationSummary.obsid)).scalars())
        missing = sorted(obsids - have)
        if missing:
            now = utcnow()
            conn.execute(
                ObservationSummary.__table__.insert(),
                [{"obsid": o, "processing_status": "pending", "updated_utc": now} for o in missing],
            )
    if len(obsids) > t.written:
        t.notes.append(f"{len(obsids) - t.written} observation(s) without a legacy summary got a new row")
    if "quality_flags" in names:
        _copy_quality_flags(conn, names["quality_flags"], dry_run, report, obsids)
    if "calibration_flux" in names:
        _copy_calibration_flux(conn, names["calibration_flux"], dry_run, report, level2)
    if "calibration_model_fit" in names:
        _copy_models(conn, names["calibration_model_fit"], dry_run, report, model_source)
    if "old_path_data" in names:
        t = report.table("old_path_data")
        t.legacy_rows = conn.execute(text(f'SELECT COUNT(*) FROM "{names["old_path_data"]}"')).scalar_one()
        t.dropped["table dropped"] = t.legacy_rows
        if not t.legacy_rows:
            t.notes.append("empty table dropped")
    report.notes.append(
        "no processing_jobs rows were created: legacy level-2 files are reprocessed (or registered "
        "by DataAssess if they are level-2 format version 1)"
    )
    if dry_run:
        return
    if keep_in is not None:  # PostgreSQL backup: the legacy tables move, under their own names
        conn.exec_driver_sql(f'CREATE SCHEMA "{keep_in}"')
        for t in names:
            conn.exec_driver_sql(f'ALTER TABLE "{names[t]}" SET SCHEMA "{keep_in}"')
            conn.exec_driver_sql(f'ALTER TABLE "{keep_in}"."{names[t]}" RENAME TO "{t}"')
    else:
        for t in reversed(LEGACY_TABLES):  # children first
            if t in names:
                conn.exec_driver_sql(f'DROP TABLE "{names[t]}"')
    conn.execute(SchemaInfo.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))


def migrate(
    target: str | os.PathLike,
    *,
    dry_run: bool = False,
    backup: bool = True,
    model_source: str = "TauA",
) -> MigrationReport:
    """Migrate a database to the current schema version (docs/database.md#migration).

    Parameters
    ----------
    target : str or path-like
        Database path or SQLAlchemy URL.
    dry_run : bool
        Open read-only, compute the report, write nothing (no backup).
    backup : bool
        Back up first (SQLite: ``<db>.bak-<timestamp>``; PostgreSQL: the legacy tables are kept
        in the schema ``comap_legacy_<timestamp>``). Must be False for other back-ends, after a
        manual dump.
    model_source : str
        Calibrator assigned to legacy ``calibration_model_fit`` rows.

    Returns
    -------
    MigrationReport

    Raises
    ------
    DatabaseError
        Missing database, unknown schema version, not a COMAP database, or a database error (the
        migration transaction is then rolled back; the backup stays).
    ValueError
        ``backup=True`` for a database that is neither SQLite nor PostgreSQL.
    """
    url, display, path = _resolve_target(target)
    report = MigrationReport(target=display, dry_run=dry_run)
    if url.get_backend_name() == "sqlite":
        if path is None or not path.is_file():
            raise DatabaseError(f"database {display} does not exist")
    elif backup and not dry_run and url.get_backend_name() != "postgresql":
        raise ValueError(
            f"cannot back up {display} automatically; dump it with the database's own tools "
            "and re-run with --skip-backup"
        )
    engine = make_engine(url, read_only=dry_run, sqlite_path=path, foreign_keys=False)
    try:
        try:
            state, version = _detect(engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"database {display}: {' '.join(str(getattr(exc, 'orig', exc)).split())}"
            ) from None
        report.state = state
        if state in ("empty", "current"):
            return report
        if state == "unknown":
            raise DatabaseError(
                f"database {display} has schema version {version!r}; this code can only migrate legacy "
                f"databases to version {SCHEMA_VERSION}"
            )
        keep_in = None
        if backup and not dry_run and path is not None:
            report.backup = str(_backup(path))
            log.info("backed up %s to %s", display, report.backup)
        elif backup and not dry_run:
            keep_in = f"comap_legacy_{datetime.now().strftime('%Y%m%dT%H%M%S')}"
            report.backup = f"legacy tables kept in schema {keep_in}"
        try:
            if dry_run:
                with engine.connect() as conn:
                    _run(conn, report, dry_run=True, model_source=model_source)
            else:
                with engine.execution_options(comap_write=True).begin() as conn:
                    lock_schema(conn)
                    _run(conn, report, dry_run=False, model_source=model_source, keep_in=keep_in)
                    command.stamp(alembic_config(connection=conn), "head")  # tables made from the models
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"database {display}: migration failed and was rolled back: "
                f"{' '.join(str(getattr(exc, 'orig', exc)).split())}"
            ) from None
    finally:
        engine.dispose()
    return report


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m modules.SQLModule.migrate",
        description="Migrate a comap-reduce database to the current schema version.",
    )
    parser.add_argument("db", help="database path or SQLAlchemy URL")
    parser.add_argument("--dry-run", action="store_true", help="print the report without writing")
    parser.add_argument(
        "--model-source",
        default="TauA",
        help="calibrator of the legacy calibration_model_fit rows (default: TauA)",
    )
    parser.add_argument(
        "--skip-backup",
        action="store_true",
        help="do not back up first (required for back-ends other than SQLite and PostgreSQL, "
        "after a manual dump)",
    )
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    if not logging.getLogger().handlers:
        # Warnings are part of the printed report; only errors go to the console on their own.
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = migrate(
            args.db, dry_run=args.dry_run, backup=not args.skip_backup, model_source=args.model_source
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DatabaseError as exc:
        print(f"DatabaseError: {exc}", file=sys.stderr)
        return 3
    print(report.format())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
