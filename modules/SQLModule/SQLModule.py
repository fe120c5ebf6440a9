"""ORM models and the ``db`` facade of comap-reduce (05 §1–§2).

One relational database tracks the archive: observations, processing jobs, statistics, quality
flags and calibration. The default back-end is SQLite (``databases/COMAP_manchester.db``); any
SQLAlchemy URL also works.

Usage::

    from modules.SQLModule.SQLModule import COMAPData, db

    db.connect("databases/COMAP_manchester.db")
    obs = db.query_observations(source="GField*", has_level1=True)

Numbering is the same everywhere (00 §13): ``feed`` is the feed number (science feeds 1–19),
``band`` is 0–3 and ``channel`` is the binned channel. Times are UTC, timezone-aware.

Single writer (05 §2.4)
-----------------------
Only the coordinator writes. Worker processes call ``db.set_deferred(True)``: every write method
then records a picklable :class:`DbOp` instead of executing; the worker returns
``db.take_deferred()`` and the coordinator runs ``db.apply(ops, job=...)``, which executes the
operations and the job transition in one transaction. Each write method ``name`` is implemented by
``_name_impl(session, ...)``, used both for direct calls and by :meth:`SQLModule.apply`.

Transactions
------------
Every facade call is one short transaction. ``with db.session() as s:`` opens a longer one: facade
writes made inside the block join it, so several calls commit or roll back together. On SQLite,
write transactions start with ``BEGIN IMMEDIATE`` (the busy timeout then covers writer contention)
and reads with a deferred ``BEGIN`` (WAL readers never block the writer). A write that still meets
``database is locked`` is retried 5 times with exponential backoff from 0.5 s, then raises
:class:`~utils.errors.DatabaseError`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    false,
    func,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from modules.SQLModule.source_groups import classify
from utils.constants import DEFAULT_SCIENCE_FEEDS, GROUND_FEED, UTC_START_FORMAT
from utils.errors import ConfigError, DatabaseError

__all__ = [
    "SCHEMA_VERSION",
    "Base",
    "COMAPData",
    "CalibrationFlux",
    "CalibrationModelFit",
    "ClaimResult",
    "DbOp",
    "ObservationSummary",
    "ProcessingJob",
    "QualityFlag",
    "SQLModule",
    "SchemaInfo",
    "db",
    "mjd_from_utc_start",
]

log = logging.getLogger("comap.db")

SCHEMA_VERSION: int = 1
"""Schema version written to ``schema_info`` by this code (05 §1)."""

JOB_STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed")
SUMMARY_STATUSES: tuple[str, ...] = ("pending", "running", "complete", "failed")
MODEL_TYPES: tuple[str, ...] = ("polynomial", "mean", "nearest")
LOCK_RETRIES: int = 5
LOCK_BACKOFF_S: float = 0.5
_SQLITE_JOURNAL_MODES = ("DELETE", "TRUNCATE", "PERSIST", "MEMORY", "WAL", "OFF")
_CHUNK = 500  # obsids per IN (...) clause, well below SQLite's bound-parameter limit
_MJD_EPOCH = datetime(1858, 11, 17, tzinfo=UTC)

# Indirection so tests can observe the backoff without sleeping.
_sleep = time.sleep
# Every facade instance, so forked children can drop inherited pooled connections.
_INSTANCES: weakref.WeakSet = weakref.WeakSet()

T = TypeVar("T")


# ==================================================================================================
# Small helpers
# ==================================================================================================
def utcnow() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


def mjd_from_utc_start(utc_start: str) -> float:
    """Convert a level-1 ``utc_start`` string (``%Y-%m-%d-%H:%M:%S``, UTC) to MJD.

    Parameters
    ----------
    utc_start : str
        Start time, e.g. ``"2026-03-01-04:15:00"``.

    Returns
    -------
    float
        Modified Julian Date (days).

    Raises
    ------
    ValueError
        If the string does not have the expected format.
    """
    dt = datetime.strptime(str(utc_start).strip(), UTC_START_FORMAT).replace(tzinfo=UTC)
    return (dt - _MJD_EPOCH).total_seconds() / 86400.0


def _first_line(text: object) -> str | None:
    """Return the first non-empty line of ``text`` (stripped), or None."""
    if text is None:
        return None
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _clean(value: Any) -> Any:
    """Convert a value to a plain Python type the DB-API accepts.

    numpy scalars become Python scalars, NaN becomes None ("no value", 03 §3), bytes are decoded,
    path-like objects become strings and arrays become (nested) lists.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return None if math.isnan(f) else f
    if isinstance(value, bytes | bytearray | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _int(value: Any, what: str) -> int:
    """Return ``value`` as an int; reject bools, non-integral floats and garbage with ValueError."""
    if isinstance(value, bool | np.bool_):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _int_list(values: Any, what: str) -> list[int]:
    """Return ``values`` (an int or an iterable of ints) as a list of ints, order preserved."""
    if values is None:
        return []
    if isinstance(values, numbers.Integral | str) and not isinstance(values, bool):
        return [_int(values, what)]
    return [_int(v, what) for v in values]


def _unique(values: Iterable[int]) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def _str_list(values: str | Iterable[str]) -> list[str]:
    if isinstance(values, str):
        return [values]
    return [str(v) for v in values]


def _chunks(seq: Sequence[T], n: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _like_pattern(pattern: str) -> str:
    """Translate a ``*``/``?`` wildcard pattern into a LIKE pattern with escape character ``\\``."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _pattern_condition(column: Any, patterns: str | Iterable[str]):
    """Case-insensitive wildcard match of ``column`` against one or several patterns (OR)."""
    items = _str_list(patterns)
    if not items:
        return false()
    return or_(*(column.ilike(_like_pattern(p), escape="\\") for p in items))


def _nonempty(column: Any, flag: bool):
    has = and_(column.is_not(None), column != "")
    return has if flag else ~has


def _pid_alive(pid: int) -> bool:
    """Return True if a process with this pid exists on this host (unknown counts as alive)."""
    if pid is None or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def _is_locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", None) or exc).lower()
    return isinstance(exc, OperationalError) and ("locked" in text or "busy" in text or "deadlock" in text)


def _parse_pixels(pixels: object) -> list[int] | None:
    """Parse a ``/comap.pixels`` string ("1,2,...,20") into feed numbers, or None if unusable."""
    if pixels is None:
        return None
    text = pixels.decode() if isinstance(pixels, bytes) else str(pixels)
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens:
        return None
    try:
        feeds = sorted({int(t) for t in tokens})
    except ValueError:
        return None
    return feeds


# ==================================================================================================
# Column types and models (05 §1)
# ==================================================================================================
class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that always returns timezone-aware UTC datetimes.

    SQLite has no time-zone support: values are stored as naive UTC and tagged as UTC on the way
    out. Naive datetimes passed in are taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every comap-reduce table."""

    metadata = MetaData(naming_convention=_NAMING)

    def to_dict(self) -> dict[str, Any]:
        """Return the column values as a plain dict (relationships are not included)."""
        return {attr.key: getattr(self, attr.key) for attr in self.__mapper__.column_attrs}

    @classmethod
    def column_names(cls) -> tuple[str, ...]:
        """Return the names of the table's columns, in table order."""
        return tuple(c.name for c in cls.__table__.columns)

    def __repr__(self) -> str:
        pk = ", ".join(f"{c.name}={getattr(self, c.key, None)!r}" for c in self.__table__.primary_key)
        return f"{type(self).__name__}({pk})"


class COMAPData(Base):
    """One observation (``comap_data``, 05 §1.1).

    Query methods return detached instances: column attributes are loaded, relationships are not
    (use :meth:`SQLModule.get_observation_snapshot` for everything about one obsid). Instances
    pickle, and :meth:`to_dict`/:meth:`from_dict` give a plain dict for worker processes.
    """

    __tablename__ = "comap_data"

    obsid: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    level1_path: Mapped[str | None] = mapped_column(String(1024))
    level2_path: Mapped[str | None] = mapped_column(String(1024))
    source: Mapped[str | None] = mapped_column(String(64), index=True)
    source_group: Mapped[str | None] = mapped_column(String(32), index=True)
    utc_start: Mapped[str | None] = mapped_column(String(19))
    mjd_start: Mapped[float | None] = mapped_column(Float, index=True)
    comment: Mapped[str | None] = mapped_column(Text)
    telescope: Mapped[str | None] = mapped_column(String(128))
    instrument: Mapped[str | None] = mapped_column(String(128))
    platform: Mapped[str | None] = mapped_column(String(128))
    pixels: Mapped[str | None] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(128))
    bof: Mapped[str | None] = mapped_column(String(128))
    bw: Mapped[float | None] = mapped_column(Float)
    tsamp: Mapped[float | None] = mapped_column(Float)
    coeff_iq: Mapped[int | None] = mapped_column(Integer)
    features: Mapped[int | None] = mapped_column(Integer)
    fft_shift: Mapped[int | None] = mapped_column(Integer)
    iqcalid: Mapped[int | None] = mapped_column(Integer)
    level: Mapped[int | None] = mapped_column(Integer)
    nbit: Mapped[int | None] = mapped_column(Integer)
    nchan: Mapped[int | None] = mapped_column(Integer)
    nint: Mapped[int | None] = mapped_column(Integer)
    n_feeds: Mapped[int | None] = mapped_column(Integer)
    level1_size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    registered_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)

    summary: Mapped[ObservationSummary | None] = relationship(
        back_populates="observation", uselist=False, cascade="all, delete-orphan", passive_deletes=True
    )
    quality_flags: Mapped[list[QualityFlag]] = relationship(
        back_populates="observation", cascade="all, delete-orphan", passive_deletes=True
    )
    calibration_fluxes: Mapped[list[CalibrationFlux]] = relationship(
        back_populates="observation", cascade="all, delete-orphan", passive_deletes=True
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> COMAPData:
        """Build a transient instance from a dict; keys that are not columns are ignored."""
        cols = set(cls.column_names())
        return cls(**{k: v for k, v in data.items() if k in cols})

    def __repr__(self) -> str:
        return (
            f"COMAPData(obsid={self.obsid!r}, source={self.source!r}, "
            f"source_group={self.source_group!r}, utc_start={self.utc_start!r})"
        )


class ObservationSummary(Base):
    """Per-observation summary values (``observation_summary``, 05 §1.2)."""

    __tablename__ = "observation_summary"

    obsid: Mapped[int] = mapped_column(
        Integer, ForeignKey("comap_data.obsid", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    processing_status: Mapped[str | None] = mapped_column(String(16), default="pending")
    processing_error: Mapped[str | None] = mapped_column(Text)
    median_tsys: Mapped[float | None] = mapped_column(Float)
    mean_tau: Mapped[float | None] = mapped_column(Float)
    calibrator_flux: Mapped[float | None] = mapped_column(Float)
    calibrator_flux_error: Mapped[float | None] = mapped_column(Float)
    calibrator_chi2: Mapped[float | None] = mapped_column(Float)
    pointing_offset_az: Mapped[float | None] = mapped_column(Float)
    pointing_offset_el: Mapped[float | None] = mapped_column(Float)
    pointing_offset_ra: Mapped[float | None] = mapped_column(Float)
    pointing_offset_dec: Mapped[float | None] = mapped_column(Float)
    n_scans: Mapped[int | None] = mapped_column(Integer)
    level2_created_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)

    observation: Mapped[COMAPData] = relationship(back_populates="summary")


class QualityFlag(Base):
    """Flags and statistics per (obsid, feed, band, channel) (``quality_flags``, 05 §1.3).

    Rows are created lazily; a missing row means good, with no statistics. ``is_good`` is always
    ``observer_ok AND pipeline_ok`` and is maintained by the facade.
    """

    __tablename__ = "quality_flags"
    __table_args__ = (
        UniqueConstraint("obsid", "feed", "band", "channel"),
        CheckConstraint("feed >= 1", name="feed_min"),
        CheckConstraint("band >= 0", name="band_min"),
        CheckConstraint("channel >= 0", name="channel_min"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    obsid: Mapped[int] = mapped_column(
        Integer, ForeignKey("comap_data.obsid", ondelete="CASCADE"), index=True, nullable=False
    )
    feed: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    band: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    channel: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    observer_ok: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    pipeline_ok: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    is_good: Mapped[bool] = mapped_column(Boolean, default=True, nullable=False)
    comment: Mapped[str | None] = mapped_column(Text)
    filtered_white_noise: Mapped[float | None] = mapped_column(Float)
    filtered_red_noise: Mapped[float | None] = mapped_column(Float)
    filtered_noise_index: Mapped[float | None] = mapped_column(Float)
    filtered_auto_rms: Mapped[float | None] = mapped_column(Float)
    filtered_fknee: Mapped[float | None] = mapped_column(Float)
    unfiltered_white_noise: Mapped[float | None] = mapped_column(Float)
    unfiltered_red_noise: Mapped[float | None] = mapped_column(Float)
    unfiltered_noise_index: Mapped[float | None] = mapped_column(Float)
    unfiltered_auto_rms: Mapped[float | None] = mapped_column(Float)
    unfiltered_fknee: Mapped[float | None] = mapped_column(Float)
    n_spikes: Mapped[int | None] = mapped_column(Integer)
    n_nan_values: Mapped[int | None] = mapped_column(Integer)
    mean_atm_temp: Mapped[float | None] = mapped_column(Float)
    updated_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)

    observation: Mapped[COMAPData] = relationship(back_populates="quality_flags")

    @property
    def key(self) -> tuple[int, int, int]:
        """``(feed, band, channel)``."""
        return (self.feed, self.band, self.channel)

    def __repr__(self) -> str:
        return (
            f"QualityFlag(obsid={self.obsid}, feed={self.feed}, band={self.band}, "
            f"channel={self.channel}, observer_ok={self.observer_ok}, pipeline_ok={self.pipeline_ok}, "
            f"is_good={self.is_good})"
        )


class CalibrationFlux(Base):
    """One successful calibrator fit per (obsid, feed, band, channel) (05 §1.4)."""

    __tablename__ = "calibration_flux"
    __table_args__ = (UniqueConstraint("obsid", "feed", "band", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    obsid: Mapped[int] = mapped_column(
        Integer, ForeignKey("comap_data.obsid", ondelete="CASCADE"), index=True, nullable=False
    )
    feed: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    band: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    channel: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    mjd: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str | None] = mapped_column(String(32))
    frequency_ghz: Mapped[float | None] = mapped_column(Float)
    measured_flux: Mapped[float | None] = mapped_column(Float)
    flux_error: Mapped[float | None] = mapped_column(Float)
    amplitude: Mapped[float | None] = mapped_column(Float)
    amplitude_error: Mapped[float | None] = mapped_column(Float)
    chi2: Mapped[float | None] = mapped_column(Float)
    x_offset_deg: Mapped[float | None] = mapped_column(Float)
    y_offset_deg: Mapped[float | None] = mapped_column(Float)

    observation: Mapped[COMAPData] = relationship(back_populates="calibration_fluxes")

    def __repr__(self) -> str:
        return (
            f"CalibrationFlux(obsid={self.obsid}, feed={self.feed}, band={self.band}, "
            f"channel={self.channel}, source={self.source!r}, measured_flux={self.measured_flux!r})"
        )


class CalibrationModelFit(Base):
    """Calibration-factor model per (source, feed, band, channel) (05 §1.5, 03 §6)."""

    __tablename__ = "calibration_model_fit"
    __table_args__ = (UniqueConstraint("source", "feed", "band", "channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(32), nullable=False)
    feed: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    band: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    channel: Mapped[int] = mapped_column(SmallInteger, nullable=False)
    model_type: Mapped[str] = mapped_column(String(16), nullable=False, default="polynomial")
    poly_coeffs: Mapped[list[float] | None] = mapped_column(JSON)
    mjd_ref: Mapped[float] = mapped_column(Float, default=59000.0, nullable=False)
    nearest_mjds: Mapped[list[float] | None] = mapped_column(JSON)
    nearest_gains: Mapped[list[float] | None] = mapped_column(JSON)
    fit_rms: Mapped[float | None] = mapped_column(Float)
    n_observations: Mapped[int | None] = mapped_column(Integer)
    mjd_min: Mapped[float | None] = mapped_column(Float)
    mjd_max: Mapped[float | None] = mapped_column(Float)
    updated_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ProcessingJob(Base):
    """Job state per (obsid, stage) (``processing_jobs``, 05 §1.6, 07 §2.1).

    There is no foreign key on ``obsid``: download jobs exist before registration.
    """

    __tablename__ = "processing_jobs"
    __table_args__ = (
        UniqueConstraint("obsid", "stage"),
        Index("ix_processing_jobs_stage_status", "stage", "status"),
        CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    obsid: Mapped[int] = mapped_column(Integer, index=True, nullable=False)
    stage: Mapped[str] = mapped_column(String(32), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    last_module: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, default=0, nullable=False)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(String(64))
    code_version: Mapped[str | None] = mapped_column(String(128))
    config_sha256: Mapped[str | None] = mapped_column(String(64))
    created_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_utc: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return (
            f"ProcessingJob(obsid={self.obsid}, stage={self.stage!r}, status={self.status!r}, "
            f"attempts={self.attempts}, run_id={self.run_id!r})"
        )


class SchemaInfo(Base):
    """Key/value schema metadata; ``schema_version = "1"`` (05 §1.7)."""

    __tablename__ = "schema_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(255))


OBSERVATION_COLUMNS: frozenset[str] = frozenset(COMAPData.column_names())
SUMMARY_COLUMNS: frozenset[str] = frozenset(ObservationSummary.column_names()) - {"obsid"}
QUALITY_STAT_COLUMNS: tuple[str, ...] = (
    "filtered_white_noise",
    "filtered_red_noise",
    "filtered_noise_index",
    "filtered_auto_rms",
    "filtered_fknee",
    "unfiltered_white_noise",
    "unfiltered_red_noise",
    "unfiltered_noise_index",
    "unfiltered_auto_rms",
    "unfiltered_fknee",
    "n_spikes",
    "n_nan_values",
    "mean_atm_temp",
)
"""Statistic columns of ``quality_flags`` written by :meth:`SQLModule.update_quality_statistics`."""
QUALITY_COLUMNS: frozenset[str] = frozenset(QualityFlag.column_names())
CALIBRATION_FLUX_FIELDS: frozenset[str] = frozenset(CalibrationFlux.column_names()) - {"id", "obsid"}
CALIBRATION_MODEL_FIELDS: frozenset[str] = frozenset(CalibrationModelFit.column_names()) - {
    "id",
    "updated_utc",
}
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


# ==================================================================================================
# Facade dataclasses
# ==================================================================================================
@dataclass
class DbOp:
    """One deferred write: the facade method ``name`` called with ``args``/``kwargs`` (05 §2.4).

    Instances are plain data and pickle; :meth:`SQLModule.apply` executes a list of them.
    """

    name: str
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClaimResult:
    """Outcome of :meth:`SQLModule.claim_jobs`, lists of obsids in the order given.

    Attributes
    ----------
    claimed : list of int
        Jobs now ``running`` for this run (including reclaimed stale jobs).
    skipped_done : list of int
        ``done`` jobs left alone (``force=False``).
    skipped_failed : list of int
        ``failed`` jobs left alone (``retry_failed=False`` and ``force=False``).
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


# Write methods that may be deferred and applied (name -> has an ``_<name>_impl``).
WRITE_METHODS: frozenset[str] = frozenset(
    {
        "upsert_observation",
        "update_observation_summary",
        "update_quality_statistics",
        "bulk_update_quality_statistics",
        "set_quality_flags",
        "reset_observer_flags",
        "replace_calibration_flux",
        "upsert_calibration_model",
        "set_level2_path",
        "clear_level2_info",
        "scrub_missing_level2_paths",
        "remap_level2_paths",
        "delete_observation",
        "finish_job",
        "release_jobs",
        "reset_failed",
        "touch_job",
    }
)


# ==================================================================================================
# Engine construction
# ==================================================================================================
def _resolve_target(target: str | os.PathLike | URL) -> tuple[URL, str, Path | None]:
    """Return ``(url, display, sqlite_path)`` for a path or URL target."""
    if isinstance(target, URL):
        url = target
    elif isinstance(target, str) and "://" in target:
        try:
            url = make_url(target)
        except ArgumentError as exc:
            raise DatabaseError(f"database {target}: invalid database URL: {_one_line(exc)}") from None
    else:
        path = Path(os.fspath(target)).expanduser().absolute()
        return URL.create("sqlite", database=str(path)), str(os.fspath(target)), path
    display = url.render_as_string(hide_password=True)
    path = None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_path = url.database
        if db_path.startswith("file:"):
            db_path = db_path[5:]
        path = Path(db_path).expanduser().absolute()
    return url, display, path


def _busy_timeout_s(default: float) -> float:
    env = os.environ.get("COMAP_SQLITE_BUSY_TIMEOUT_S")
    if env is None or not env.strip():
        return float(default)
    try:
        value = float(env)
    except ValueError:
        raise DatabaseError(f"COMAP_SQLITE_BUSY_TIMEOUT_S={env!r} is not a number of seconds") from None
    if value < 0:
        raise DatabaseError(f"COMAP_SQLITE_BUSY_TIMEOUT_S={env!r} must be >= 0")
    return value


def _journal_mode() -> str:
    mode = os.environ.get("COMAP_SQLITE_JOURNAL_MODE", "WAL").strip().upper() or "WAL"
    if mode not in _SQLITE_JOURNAL_MODES:
        raise DatabaseError(
            f"COMAP_SQLITE_JOURNAL_MODE={mode!r} is not one of {', '.join(_SQLITE_JOURNAL_MODES)}"
        )
    return mode


def make_engine(
    url: URL,
    *,
    read_only: bool = False,
    busy_timeout_s: float = 30.0,
    echo: bool = False,
    sqlite_path: Path | None = None,
    foreign_keys: bool = True,
    journal_mode: str | None = None,
) -> Engine:
    """Create an engine with the comap-reduce connection settings (05 §2.2).

    SQLite connections get ``busy_timeout``, ``journal_mode`` (WAL unless overridden; not set on
    read-only connections), ``foreign_keys`` and ``synchronous = NORMAL``. The driver's implicit
    transaction handling is switched off and the engine emits ``BEGIN`` itself: ``BEGIN IMMEDIATE``
    on connections with the execution option ``comap_write=True``, a deferred ``BEGIN`` otherwise.
    Read-only SQLite opens the file through the URI ``file:...?mode=ro``; other back-ends run
    ``SET TRANSACTION READ ONLY`` at the start of each transaction.

    Parameters
    ----------
    url : sqlalchemy.engine.URL
        Database URL.
    read_only : bool
        Open read-only.
    busy_timeout_s : float
        SQLite busy timeout (s).
    echo : bool
        Log SQL statements.
    sqlite_path : pathlib.Path or None
        Absolute path of the SQLite file (required for read-only SQLite).
    foreign_keys : bool
        Enforce foreign keys on SQLite (the migrator switches this off).
    journal_mode : str or None
        SQLite journal mode; None = ``COMAP_SQLITE_JOURNAL_MODE`` or WAL.

    Returns
    -------
    sqlalchemy.engine.Engine
    """
    is_sqlite = url.get_backend_name() == "sqlite"
    if not is_sqlite:
        engine = create_engine(url, echo=echo, pool_pre_ping=True)
        if read_only and engine.dialect.name in ("postgresql", "mysql", "mariadb"):

            @event.listens_for(engine, "begin")
            def _read_only_transaction(conn):  # pragma: no cover - needs a server
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")

        return engine

    timeout_ms = int(round(busy_timeout_s * 1000.0))
    mode = (journal_mode or _journal_mode()).upper()
    if read_only:
        if sqlite_path is None:
            raise DatabaseError(f"database {url}: an in-memory database cannot be opened read-only")
        uri = f"file:{quote(str(sqlite_path), safe='/:')}?mode=ro"

        def _creator():
            return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=busy_timeout_s)

        engine = create_engine(url, echo=echo, creator=_creator)
    else:
        engine = create_engine(url, echo=echo)

    @event.listens_for(engine, "connect")
    def _sqlite_on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # the "begin" listener below emits BEGIN itself
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            if not read_only:
                cur.execute(f"PRAGMA journal_mode = {mode}")
                cur.fetchall()
            cur.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        write = bool(conn.get_execution_options().get("comap_write")) and not read_only
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


# ==================================================================================================
# The facade
# ==================================================================================================
class SQLModule:
    """The database facade (05 §2). Use the module-level singleton :data:`db`.

    Further instances are fine, e.g. a map job that opens another database read-only.
    """

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._write_engine: Engine | None = None
        self._url: URL | None = None
        self._display: str = "<not connected>"
        self._read_only: bool = False
        self._busy_timeout_s: float = 30.0
        self._deferred: bool = False
        self._ops: list[DbOp] = []
        self._local = threading.local()
        _INSTANCES.add(self)

    def _after_fork_in_child(self) -> None:
        """A forked child must not reuse the parent's pooled connections (spawn is the norm)."""
        if self._engine is not None:
            self._engine.dispose(close=False)
        self._local = threading.local()

    # ------------------------------------------------------------------ connection (05 §2.1)
    def connect(
        self,
        target: str | os.PathLike | URL,
        *,
        create: bool = True,
        read_only: bool = False,
        busy_timeout_s: float = 30.0,
        echo: bool = False,
    ) -> SQLModule:
        """Connect to a database; the engine is created immediately.

        Parameters
        ----------
        target : str, path-like or sqlalchemy URL
            A filesystem path (becomes ``sqlite:///<absolute path>``; parent directories are
            created) or any SQLAlchemy URL (detected by ``://``).
        create : bool
            Create the schema in an empty database. With ``create=False`` a missing file or an
            empty database raises.
        read_only : bool
            Open read-only (SQLite: URI ``file:...?mode=ro``; the file must exist). Write methods
            then raise :class:`DatabaseError`.
        busy_timeout_s : float
            SQLite busy timeout in seconds; ``COMAP_SQLITE_BUSY_TIMEOUT_S`` overrides it.
        echo : bool
            Log every SQL statement.

        Returns
        -------
        SQLModule
            ``self``, so ``db.connect(...).query_all_obsids()`` works.

        Raises
        ------
        DatabaseError
            The database is unreachable, missing (read-only or ``create=False``), empty without
            ``create``, or has another schema version (legacy databases must be migrated:
            ``python -m modules.SQLModule.migrate <target>``).
        """
        self.disconnect()
        url, display, path = _resolve_target(target)
        timeout = _busy_timeout_s(busy_timeout_s)
        if path is not None:
            if read_only and not path.is_file():
                raise DatabaseError(f"database {display} does not exist (cannot open it read-only)")
            if not create and not path.is_file():
                raise DatabaseError(f"database {display} does not exist (create=False)")
            if not read_only:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise DatabaseError(f"database {display}: cannot create its directory: {exc}") from None
        try:
            engine = make_engine(
                url, read_only=read_only, busy_timeout_s=timeout, echo=echo, sqlite_path=path
            )
        except SQLAlchemyError as exc:
            raise DatabaseError(
                f"database {display}: {_one_line(getattr(exc, 'orig', None) or exc)}"
            ) from None
        except (ImportError, ArgumentError) as exc:
            raise DatabaseError(f"database {display}: cannot create engine: {_one_line(exc)}") from None
        try:
            self._check_schema(engine, display, create=create and not read_only, read_only=read_only)
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine
        self._write_engine = engine.execution_options(comap_write=True)
        self._url = url
        self._display = display
        self._read_only = read_only
        self._busy_timeout_s = timeout
        log.debug("connected to %s%s", display, " (read-only)" if read_only else "")
        return self

    def _check_schema(self, engine: Engine, display: str, *, create: bool, read_only: bool) -> None:
        delay = LOCK_BACKOFF_S
        for attempt in range(LOCK_RETRIES + 1):
            try:
                self._check_schema_once(engine, display, create=create, read_only=read_only)
                return
            except OperationalError as exc:
                if _is_locked(exc) and attempt < LOCK_RETRIES:
                    log.warning("database %s is locked while connecting; retrying in %.1f s", display, delay)
                    _sleep(delay)
                    delay *= 2
                    continue
                raise DatabaseError(
                    f"database {display}: cannot connect: {_one_line(getattr(exc, 'orig', None) or exc)}"
                ) from None
            except SQLAlchemyError as exc:
                raise DatabaseError(
                    f"database {display}: cannot connect: {_one_line(getattr(exc, 'orig', None) or exc)}"
                ) from None

    @staticmethod
    def _check_schema_once(engine: Engine, display: str, *, create: bool, read_only: bool) -> None:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            version_value: str | None = None
            if "schema_info" in names:
                version_value = conn.execute(
                    select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")
                ).scalar_one_or_none()
        if not names:
            if not create:
                why = "opened read-only" if read_only else "create=False"
                raise DatabaseError(f"database {display} is empty (no tables; {why})")
            with engine.execution_options(comap_write=True).begin() as conn:
                Base.metadata.create_all(conn, checkfirst=True)
                have = conn.execute(
                    select(SchemaInfo.value).where(SchemaInfo.key == "schema_version")
                ).scalar_one_or_none()
                if have is None:
                    conn.execute(SchemaInfo.__table__.insert().values(key="schema_version", value="1"))
            log.info("created database %s (schema version %d)", display, SCHEMA_VERSION)
            return
        try:
            version = int(version_value) if version_value is not None else None
        except ValueError:
            version = None
        if version is None or version < SCHEMA_VERSION:
            raise DatabaseError(
                f"database {display} has schema version {version_value or 'legacy'}, "
                f"expected {SCHEMA_VERSION}; "
                f"run: python -m modules.SQLModule.migrate {display}"
            )
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"database {display} has schema version {version}, newer than this code supports "
                f"({SCHEMA_VERSION}); upgrade comap-reduce"
            )
        if create and not set(Base.metadata.tables) <= names:
            with engine.execution_options(comap_write=True).begin() as conn:
                Base.metadata.create_all(conn, checkfirst=True)

    def disconnect(self) -> None:
        """Dispose of the engine (no-op if not connected). Deferred mode is unaffected."""
        if self._engine is not None:
            self._engine.dispose()
        self._engine = None
        self._write_engine = None
        self._url = None
        self._display = "<not connected>"
        self._read_only = False

    @property
    def connected(self) -> bool:
        """True while an engine exists."""
        return self._engine is not None

    @property
    def read_only(self) -> bool:
        """True if connected read-only."""
        return self._read_only

    @property
    def target(self) -> str:
        """The connected target as shown in messages (passwords hidden)."""
        return self._display

    @property
    def url(self) -> URL | None:
        """The SQLAlchemy URL of the connected database, or None."""
        return self._url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine; raises :class:`DatabaseError` if not connected."""
        return self._require()

    def __repr__(self) -> str:
        mode = " read-only" if self._read_only else ""
        deferred = " deferred" if self._deferred else ""
        return f"<SQLModule {self._display}{mode}{deferred}>"

    def _require(self) -> Engine:
        if self._engine is None:
            raise DatabaseError("database not connected; call db.connect(PATH_OR_URL) first")
        return self._engine

    def _error(self, exc: BaseException, what: str) -> DatabaseError:
        cause = _one_line(getattr(exc, "orig", None) or exc)
        return DatabaseError(f"database {self._display}: {what}: {cause}")

    def _fail(self, what: str, message: str) -> DatabaseError:
        return DatabaseError(f"database {self._display}: {what}: {message}")

    # ------------------------------------------------------------------ sessions and transactions
    @contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """Yield a :class:`~sqlalchemy.orm.Session`; commit on success, roll back on exception.

        Facade write methods called inside the block join this transaction, so they commit or
        roll back together. Keep it short: never hold a session across module runs.

        Parameters
        ----------
        write : bool
            Open a write transaction (SQLite ``BEGIN IMMEDIATE``). With ``write=False`` the
            session is read-only by convention and facade writes do not join it.
        """
        active = getattr(self._local, "session", None)
        if active is not None:
            yield active
            return
        if write:
            self._check_writable("session")
        engine = self._write_engine if write else self._require()
        s = self._begin_session(engine, "session")
        if write:
            self._local.session = s
        try:
            try:
                yield s
                s.commit()
            except SQLAlchemyError as exc:
                raise self._error(exc, "session") from exc
            finally:
                if write:
                    self._local.session = None
            self._run_post_commit(s)
        finally:
            s.close()

    def _begin_session(self, engine: Engine, what: str) -> Session:
        """Create a session and start its transaction, retrying while the database is locked."""
        delay = LOCK_BACKOFF_S
        for attempt in range(LOCK_RETRIES + 1):
            s = Session(bind=engine, expire_on_commit=False)
            try:
                s.connection()  # emits BEGIN [IMMEDIATE] now
                return s
            except OperationalError as exc:
                s.close()
                if _is_locked(exc) and attempt < LOCK_RETRIES:
                    self._log_retry(what, attempt, delay)
                    _sleep(delay)
                    delay *= 2
                    continue
                raise self._locked_or_error(exc, what) from exc
            except SQLAlchemyError as exc:
                s.close()
                raise self._error(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _log_retry(self, what: str, attempt: int, delay: float) -> None:
        log.warning(
            "database %s is locked (%s); retry %d/%d in %.1f s",
            self._display,
            what,
            attempt + 1,
            LOCK_RETRIES,
            delay,
        )

    def _locked_or_error(self, exc: BaseException, what: str) -> DatabaseError:
        if _is_locked(exc):
            return self._fail(
                what,
                f"database is locked after {LOCK_RETRIES} retries "
                f"(busy timeout {self._busy_timeout_s:g} s): {_one_line(getattr(exc, 'orig', None) or exc)}",
            )
        return self._error(exc, what)

    def _check_writable(self, what: str) -> None:
        self._require()
        if self._read_only:
            raise DatabaseError(f"database {self._display} is open read-only; cannot {what}")

    def _run_write(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in one write transaction, retrying while the database is locked."""
        self._check_writable(what)
        active: Session | None = getattr(self._local, "session", None)
        if active is not None:
            try:
                return fn(active)
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc
        delay = LOCK_BACKOFF_S
        for attempt in range(LOCK_RETRIES + 1):
            s = Session(bind=self._write_engine, expire_on_commit=False)
            try:
                result = fn(s)
                s.commit()
            except OperationalError as exc:
                s.close()
                if _is_locked(exc) and attempt < LOCK_RETRIES:
                    self._log_retry(what, attempt, delay)
                    _sleep(delay)
                    delay *= 2
                    continue
                raise self._locked_or_error(exc, what) from exc
            except SQLAlchemyError as exc:
                s.close()
                raise self._error(exc, what) from exc
            except BaseException:
                s.close()
                raise
            try:
                self._run_post_commit(s)
            finally:
                s.close()
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_read(self, what: str, fn: Callable[[Session], T]) -> T:
        """Run ``fn(session)`` in a short read transaction; ORM objects come back detached."""
        engine = self._require()
        active: Session | None = getattr(self._local, "session", None)
        if active is not None:
            # Read our own uncommitted writes: a separate identity map on the same connection.
            try:
                active.flush()
                with Session(bind=active.connection(), expire_on_commit=False) as s:
                    return fn(s)
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc
        delay = LOCK_BACKOFF_S
        for attempt in range(LOCK_RETRIES + 1):
            s = Session(bind=engine, expire_on_commit=False, autoflush=False)
            try:
                return fn(s)
            except OperationalError as exc:
                if _is_locked(exc) and attempt < LOCK_RETRIES:
                    s.close()
                    self._log_retry(what, attempt, delay)
                    _sleep(delay)
                    delay *= 2
                    continue
                raise self._locked_or_error(exc, what) from exc
            except SQLAlchemyError as exc:
                raise self._error(exc, what) from exc
            finally:
                s.close()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _post_commit(s: Session, action: Callable[[], None]) -> None:
        s.info.setdefault("comap_post_commit", []).append(action)

    @staticmethod
    def _run_post_commit(s: Session) -> None:
        for action in s.info.pop("comap_post_commit", []):
            action()

    # ------------------------------------------------------------------ deferred writes (05 §2.4)
    def set_deferred(self, deferred: bool = True) -> bool:
        """Switch deferred-write mode on or off for this process.

        Parameters
        ----------
        deferred : bool
            When True, every write method records a :class:`DbOp` instead of executing and
            returns None. ``claim_jobs`` is not deferrable and raises.

        Returns
        -------
        bool
            The previous setting, so callers can restore it.
        """
        previous = self._deferred
        self._deferred = bool(deferred)
        return previous

    @property
    def deferred(self) -> bool:
        """True while writes are recorded instead of executed."""
        return self._deferred

    @contextmanager
    def deferring(self) -> Iterator[list[DbOp]]:
        """Record writes made inside the block into the yielded list (restores the mode after).

        Useful for the in-process serial executor: ``with db.deferring() as ops: ...``.
        """
        previous_mode, previous_ops = self._deferred, self._ops
        ops: list[DbOp] = []
        self._deferred, self._ops = True, ops
        try:
            yield ops
        finally:
            self._deferred, self._ops = previous_mode, previous_ops

    def peek_deferred(self) -> list[DbOp]:
        """A copy of the operations recorded so far, without clearing them (e.g. for snapshots)."""
        return list(self._ops)

    def take_deferred(self) -> list[DbOp]:
        """Return the recorded operations and clear the list."""
        ops, self._ops = self._ops, []
        return ops

    def _write(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._deferred:
            self._ops.append(DbOp(name, tuple(args), dict(kwargs)))
            return None
        impl = getattr(self, f"_{name}_impl")
        return self._run_write(name, lambda s: impl(s, *args, **kwargs))

    def apply(self, ops: Iterable[DbOp], *, job: Mapping[str, Any] | None = None) -> list[Any]:
        """Execute deferred operations, and optionally a job transition, in ONE transaction.

        Parameters
        ----------
        ops : iterable of DbOp
            Operations recorded by :meth:`take_deferred` (or built by hand).
        job : mapping or None
            Keyword arguments of :meth:`finish_job` applied in the same transaction, e.g.
            ``dict(obsid=60012, stage='level2', status='done', error=None, last_module='X')``.

        Returns
        -------
        list
            The return value of each operation (the job transition is not included). In deferred
            mode the operations (and the job as a ``finish_job`` op) are recorded and ``[]`` is
            returned.

        Raises
        ------
        ValueError
            An operation names an unknown method. Nothing is executed.
        DatabaseError
            A database error; the whole transaction is rolled back. Exceptions raised by an
            operation's validation (e.g. ValueError) also roll back everything.
        """
        ops = list(ops)
        for op in ops:
            if not isinstance(op, DbOp) or op.name not in WRITE_METHODS:
                raise ValueError(f"apply: not a deferrable write operation: {op!r}")
        if self._deferred:
            self._ops.extend(ops)
            if job is not None:
                self._ops.append(DbOp("finish_job", (), dict(job)))
            return []

        def run(s: Session) -> list[Any]:
            results = [getattr(self, f"_{op.name}_impl")(s, *op.args, **op.kwargs) for op in ops]
            if job is not None:
                self._finish_job_impl(s, **dict(job))
            return results

        return self._run_write("apply", run)

    # ================================================================== queries (05 §2.3)
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
        """Return the calibration table of ``source`` (03 §6).

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

    # ================================================================== writes (05 §2.3)
    # ------------------------------------------------------------------ observations
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
        return self._write("upsert_observation", self._observation_values(data))

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
        obs = s.get(COMAPData, obsid)
        if "source" in values and "source_group" not in values:
            comment = values.get("comment", obs.comment if obs is not None else "")
            values["source"], values["source_group"] = classify(values["source"], comment)
        now = utcnow()
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
            s.add(
                ObservationSummary(
                    obsid=obsid,
                    processing_status=status,
                    processing_error=None if job is None else job.error,
                    updated_utc=now,
                )
            )
        return created

    def _require_observation(self, s: Session, obsid: int, what: str) -> COMAPData:
        obs = s.get(COMAPData, obsid)
        if obs is None:
            raise self._fail(what, f"obsid {obsid} is not registered")
        return obs

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
        return self._write("update_observation_summary", _int(obsid, "obsid"), **cols)

    @staticmethod
    def _check_summary_cols(cols: Mapping[str, Any]) -> None:
        bad = sorted(set(cols) - SUMMARY_COLUMNS)
        if bad:
            raise ValueError(f"update_observation_summary: unknown column(s) {bad}")

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
        return self._write("set_level2_path", _int(obsid, "obsid"), os.path.abspath(os.fspath(path)))

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
        return self._write("clear_level2_info", _int(obsid, "obsid"), clear_statistics=bool(clear_statistics))

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
            return self._write("scrub_missing_level2_paths", clear_statistics=bool(clear_statistics))

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
        return self._write("remap_level2_paths", *args, **kwargs)

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
        return self._write("delete_observation", _int(obsid, "obsid"), delete_files=bool(delete_files))

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

    # ------------------------------------------------------------------ quality statistics and flags
    @staticmethod
    def _element(obsid: Any, feed: Any, band: Any, channel: Any) -> tuple[int, int, int, int]:
        key = (_int(obsid, "obsid"), _int(feed, "feed"), _int(band, "band"), _int(channel, "channel"))
        if key[1] < 1 or key[2] < 0 or key[3] < 0:
            raise ValueError(f"invalid element obsid={key[0]} feed={key[1]} band={key[2]} channel={key[3]}")
        return key

    @classmethod
    def _stats_rows(cls, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            bad = sorted(set(row) - set(QUALITY_STAT_COLUMNS) - {"obsid", "feed", "band", "channel"})
            if bad:
                raise ValueError(
                    f"quality statistics: unknown column(s) {bad}; allowed {list(QUALITY_STAT_COLUMNS)}"
                )
            try:
                key = cls._element(row.pop("obsid"), row.pop("feed"), row.pop("band"), row.pop("channel"))
            except KeyError as exc:
                raise ValueError(f"quality statistics row is missing {exc}") from None
            out.append({"obsid": key[0], "feed": key[1], "band": key[2], "channel": key[3], **row})
        return out

    def update_quality_statistics(
        self, obsid: int, feed: int, band: int, channel: int, stats: Mapping[str, Any]
    ) -> int | None:
        """Upsert statistics of one (obsid, feed, band, channel) element.

        Parameters
        ----------
        obsid, feed, band, channel : int
            Element (feed number 1–19, band 0–3, binned channel).
        stats : mapping
            Statistic columns (``filtered_white_noise`` …, ``n_spikes``, ``n_nan_values``,
            ``mean_atm_temp``); NaN is stored as NULL. Flags are not touched.

        Raises
        ------
        ValueError
            Unknown statistic name or invalid element.
        """
        row = self._stats_rows(
            [{**dict(stats), "obsid": obsid, "feed": feed, "band": band, "channel": channel}]
        )[0]
        key = (row.pop("obsid"), row.pop("feed"), row.pop("band"), row.pop("channel"))
        return self._write("update_quality_statistics", *key, row)

    def _update_quality_statistics_impl(
        self, s: Session, obsid: int, feed: int, band: int, channel: int, stats: Mapping[str, Any]
    ) -> int:
        return self._bulk_update_quality_statistics_impl(
            s, [{**dict(stats), "obsid": obsid, "feed": feed, "band": band, "channel": channel}]
        )

    def bulk_update_quality_statistics(self, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Upsert statistics of many elements in one transaction.

        Parameters
        ----------
        rows : iterable of mapping
            Each with ``obsid, feed, band, channel`` and statistic columns.

        Returns
        -------
        int or None
            Number of rows written (None in deferred mode).
        """
        return self._write("bulk_update_quality_statistics", self._stats_rows(rows))

    def _bulk_update_quality_statistics_impl(self, s: Session, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = self._stats_rows(rows)
        if not rows:
            return 0
        obsids = sorted({r["obsid"] for r in rows})
        existing = self._load_flags(s, obsids)
        registered = set()
        for chunk in _chunks(obsids):
            registered.update(s.scalars(select(COMAPData.obsid).where(COMAPData.obsid.in_(chunk))))
        missing = sorted(set(obsids) - registered)
        if missing:
            raise self._fail("update_quality_statistics", f"obsid(s) not registered: {missing[:10]}")
        now = utcnow()
        for row in rows:
            key = (row["obsid"], row["feed"], row["band"], row["channel"])
            flag = existing.get(key)
            if flag is None:
                flag = self._new_flag(*key, now)
                s.add(flag)
                existing[key] = flag
            for col in QUALITY_STAT_COLUMNS:
                if col in row:
                    setattr(flag, col, _clean(row[col]))
            flag.updated_utc = now
        return len(rows)

    @staticmethod
    def _new_flag(obsid: int, feed: int, band: int, channel: int, now: datetime) -> QualityFlag:
        return QualityFlag(
            obsid=obsid,
            feed=feed,
            band=band,
            channel=channel,
            observer_ok=True,
            pipeline_ok=True,
            is_good=True,
            updated_utc=now,
        )

    @staticmethod
    def _load_flags(s: Session, obsids: Sequence[int]) -> dict[tuple[int, int, int, int], QualityFlag]:
        out: dict[tuple[int, int, int, int], QualityFlag] = {}
        for chunk in _chunks(list(obsids)):
            for f in s.scalars(select(QualityFlag).where(QualityFlag.obsid.in_(chunk))):
                out[(f.obsid, f.feed, f.band, f.channel)] = f
        return out

    def set_quality_flags(
        self,
        obsid: int,
        *,
        feeds: Iterable[int] | int | None = None,
        bands: Iterable[int] | int | None = None,
        channels: Iterable[int] | int | None = None,
        default_channels: Iterable[int] | None = None,
        observer_ok: bool | None = None,
        pipeline_ok: bool | None = None,
        comment: str | None = None,
    ) -> int | None:
        """Set flags on a block of elements of one observation, creating missing rows.

        Parameters
        ----------
        obsid : int
            A registered observation.
        feeds : int, iterable of int or None
            Feed numbers. None = all feeds: those of the observation's ``pixels`` attribute,
            else ``DEFAULT_SCIENCE_FEEDS``; never ``GROUND_FEED``.
        bands : int, iterable of int or None
            Bands; None = 0–3.
        channels : int, iterable of int or None
            Binned channels; None = the channels already present for the obsid, else
            ``default_channels``, else ``range(2)``.
        default_channels : iterable of int or None
            See ``channels``.
        observer_ok, pipeline_ok : bool or None
            New values; None leaves the flag unchanged (new rows start True).
        comment : str or None
            New comment; None leaves it unchanged.

        Returns
        -------
        int or None
            Number of rows set (None in deferred mode). ``is_good`` is recomputed as
            ``observer_ok AND pipeline_ok`` on every row touched.
        """
        kwargs = dict(
            feeds=None if feeds is None else _int_list(feeds, "feed"),
            bands=None if bands is None else _int_list(bands, "band"),
            channels=None if channels is None else _int_list(channels, "channel"),
            default_channels=None if default_channels is None else _int_list(default_channels, "channel"),
            observer_ok=None if observer_ok is None else bool(observer_ok),
            pipeline_ok=None if pipeline_ok is None else bool(pipeline_ok),
            comment=None if comment is None else str(comment),
        )
        return self._write("set_quality_flags", _int(obsid, "obsid"), **kwargs)

    def _set_quality_flags_impl(
        self,
        s: Session,
        obsid: int,
        *,
        feeds: Iterable[int] | None = None,
        bands: Iterable[int] | None = None,
        channels: Iterable[int] | None = None,
        default_channels: Iterable[int] | None = None,
        observer_ok: bool | None = None,
        pipeline_ok: bool | None = None,
        comment: str | None = None,
    ) -> int:
        obsid = _int(obsid, "obsid")
        obs = self._require_observation(s, obsid, "set_quality_flags")
        existing = self._load_flags(s, [obsid])
        if feeds is None:
            parsed = _parse_pixels(obs.pixels)
            all_feeds = [f for f in (parsed or []) if f != GROUND_FEED and f >= 1]
            feed_list = all_feeds or [f for f in DEFAULT_SCIENCE_FEEDS if f != GROUND_FEED]
        else:
            feed_list = sorted(set(_int_list(feeds, "feed")))
        band_list = list(range(4)) if bands is None else sorted(set(_int_list(bands, "band")))
        if channels is not None:
            chan_list = sorted(set(_int_list(channels, "channel")))
        else:
            present = sorted({k[3] for k in existing})
            if present:
                chan_list = present
            elif default_channels is not None:
                chan_list = sorted(set(_int_list(default_channels, "channel")))
            else:
                chan_list = [0, 1]
        now = utcnow()
        n = 0
        for feed in feed_list:
            for band in band_list:
                for channel in chan_list:
                    key = self._element(obsid, feed, band, channel)
                    flag = existing.get(key)
                    if flag is None:
                        flag = self._new_flag(*key, now)
                        s.add(flag)
                        existing[key] = flag
                    if observer_ok is not None:
                        flag.observer_ok = bool(observer_ok)
                    if pipeline_ok is not None:
                        flag.pipeline_ok = bool(pipeline_ok)
                    if comment is not None:
                        flag.comment = str(comment)
                    flag.is_good = bool(flag.observer_ok) and bool(flag.pipeline_ok)
                    flag.updated_utc = now
                    n += 1
        return n

    def reset_observer_flags(
        self, obsids: Iterable[int] | None = None, *, clear_comment_prefix: str | None = "Observer Flag:"
    ) -> int | None:
        """Set ``observer_ok = True`` and recompute ``is_good``; ``pipeline_ok`` is untouched.

        Parameters
        ----------
        obsids : iterable of int or None
            Restrict to these observations; None = all.
        clear_comment_prefix : str or None
            Comments starting with this prefix (the ObserverFlags comments) are cleared too;
            None keeps every comment.

        Returns
        -------
        int or None
            Number of rows changed (None in deferred mode).
        """
        ids = None if obsids is None else _int_list(obsids, "obsid")
        return self._write("reset_observer_flags", ids, clear_comment_prefix=clear_comment_prefix)

    def _reset_observer_flags_impl(
        self,
        s: Session,
        obsids: Iterable[int] | None = None,
        *,
        clear_comment_prefix: str | None = "Observer Flag:",
    ) -> int:
        now = utcnow()
        n = 0
        chunks: list[Sequence[int] | None] = (
            [None] if obsids is None else list(_chunks(_int_list(obsids, "obsid")))
        )
        for chunk in chunks:
            stmt = select(QualityFlag)
            cond = QualityFlag.observer_ok.is_(False)
            if clear_comment_prefix:
                prefix = clear_comment_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                cond = or_(cond, QualityFlag.comment.like(prefix + "%", escape="\\"))
            stmt = stmt.where(cond)
            if chunk is not None:
                stmt = stmt.where(QualityFlag.obsid.in_(chunk))
            for flag in s.scalars(stmt):
                flag.observer_ok = True
                flag.is_good = bool(flag.pipeline_ok)
                if clear_comment_prefix and flag.comment and flag.comment.startswith(clear_comment_prefix):
                    flag.comment = None
                flag.updated_utc = now
                n += 1
        return n

    # ------------------------------------------------------------------ calibration
    @staticmethod
    def _flux_rows(obsid: int, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            if "obsid" in row and _int(row.pop("obsid"), "obsid") != obsid:
                raise ValueError(f"replace_calibration_flux: row for another obsid in the rows of {obsid}")
            bad = sorted(set(row) - CALIBRATION_FLUX_FIELDS)
            if bad:
                raise ValueError(f"replace_calibration_flux: unknown column(s) {bad}")
            key = SQLModule._element(obsid, row.get("feed"), row.get("band"), row.get("channel"))
            row.update(feed=key[1], band=key[2], channel=key[3])
            out.append({k: _clean(v) for k, v in row.items()})
        return out

    def replace_calibration_flux(self, obsid: int, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Replace every ``calibration_flux`` row of ``obsid`` with ``rows`` (one transaction).

        Parameters
        ----------
        obsid : int
            A registered observation.
        rows : iterable of mapping
            Successful fits, each with ``feed, band, channel`` and the columns of 05 §1.4
            (``mjd, source, frequency_ghz, measured_flux, flux_error, amplitude,
            amplitude_error, chi2, x_offset_deg, y_offset_deg``).

        Returns
        -------
        int or None
            Number of rows inserted (None in deferred mode).
        """
        obsid = _int(obsid, "obsid")
        return self._write("replace_calibration_flux", obsid, self._flux_rows(obsid, rows))

    def _replace_calibration_flux_impl(
        self, s: Session, obsid: int, rows: Iterable[Mapping[str, Any]]
    ) -> int:
        obsid = _int(obsid, "obsid")
        rows = self._flux_rows(obsid, rows)
        self._require_observation(s, obsid, "replace_calibration_flux")
        s.execute(delete(CalibrationFlux).where(CalibrationFlux.obsid == obsid))
        s.add_all(CalibrationFlux(obsid=obsid, **row) for row in rows)
        return len(rows)

    @staticmethod
    def _model_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for row in rows:
            row = dict(row)
            bad = sorted(set(row) - CALIBRATION_MODEL_FIELDS)
            if bad:
                raise ValueError(f"upsert_calibration_model: unknown column(s) {bad}")
            if not row.get("source"):
                raise ValueError("upsert_calibration_model: row has no source")
            key = SQLModule._element(0, row.get("feed"), row.get("band"), row.get("channel"))
            row.update(feed=key[1], band=key[2], channel=key[3], source=str(row["source"]))
            model_type = row.get("model_type", "polynomial")
            if model_type not in MODEL_TYPES:
                raise ValueError(f"upsert_calibration_model: model_type {model_type!r} not in {MODEL_TYPES}")
            out.append({k: _clean(v) for k, v in row.items()})
        return out

    def upsert_calibration_model(self, rows: Iterable[Mapping[str, Any]]) -> int | None:
        """Insert or update ``calibration_model_fit`` rows keyed by (source, feed, band, channel).

        Parameters
        ----------
        rows : iterable of mapping
            Columns of 05 §1.5; ``poly_coeffs``, ``nearest_mjds`` and ``nearest_gains`` may be
            lists or arrays.

        Returns
        -------
        int or None
            Number of rows written (None in deferred mode).
        """
        return self._write("upsert_calibration_model", self._model_rows(rows))

    def _upsert_calibration_model_impl(self, s: Session, rows: Iterable[Mapping[str, Any]]) -> int:
        rows = self._model_rows(rows)
        now = utcnow()
        for row in rows:
            model = s.scalar(
                select(CalibrationModelFit).where(
                    CalibrationModelFit.source == row["source"],
                    CalibrationModelFit.feed == row["feed"],
                    CalibrationModelFit.band == row["band"],
                    CalibrationModelFit.channel == row["channel"],
                )
            )
            if model is None:
                model = CalibrationModelFit(**row)
                s.add(model)
            else:
                for key, value in row.items():
                    setattr(model, key, value)
            model.updated_utc = now
            s.flush()
        return len(rows)

    # ================================================================== jobs (05 §2.3, 07 §2)
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
    ) -> ClaimResult:
        """Claim jobs for this run in ONE transaction (07 §2.1).

        Missing job rows are created. Each obsid is classified:

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
        ``processing_status`` becomes ``running``.

        The coordinator decides itself whether a ``done`` observation needs work (its level-2
        file passes every module's done-check, 03 §2.1). It therefore calls ``claim_jobs`` only
        for the obsids it has decided to process, with ``force=True`` for those that are ``done``
        but need work (a newly added module, or ``--force``); with ``force=False`` a ``done`` job
        is never claimed.

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
        kwargs = dict(
            run_id=str(run_id),
            host=str(host),
            pid=_int(pid, "pid"),
            code_version=code_version,
            config_sha256=config_sha256,
            retry_failed=bool(retry_failed),
            force=bool(force),
            stale_after_s=float(stale_after_s),
        )
        return self._run_write("claim_jobs", lambda s: self._claim_jobs_impl(s, ids, str(stage), **kwargs))

    def _claim_jobs_impl(
        self,
        s: Session,
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
    ) -> ClaimResult:
        ids = _unique(_int_list(obsids, "obsid"))
        now = utcnow()
        existing: dict[int, ProcessingJob] = {}
        for chunk in _chunks(ids):
            stmt = select(ProcessingJob).where(ProcessingJob.stage == stage, ProcessingJob.obsid.in_(chunk))
            if s.get_bind().dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            for job in s.scalars(stmt):
                existing[job.obsid] = job
        result = ClaimResult()
        for obsid in ids:
            job = existing.get(obsid)
            if job is None:
                job = ProcessingJob(obsid=obsid, stage=stage, status="pending", attempts=0, created_utc=now)
                s.add(job)
                existing[obsid] = job
            if job.status == "running":
                if job.run_id == run_id:
                    result.claimed.append(obsid)
                    job.updated_utc = now
                    continue
                reason = self._stale_reason(job, host, now, stale_after_s)
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
            elif job.status == "failed" and not (retry_failed or force):
                result.skipped_failed.append(obsid)
                continue
            job.status = "running"
            job.run_id = run_id
            job.host = host
            job.pid = pid
            job.code_version = code_version
            job.config_sha256 = config_sha256
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
        if job.host == host and job.pid is not None and not _pid_alive(job.pid):
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
            "finish_job",
            _int(obsid, "obsid"),
            str(stage),
            status,
            error=_first_line(error),
            last_module=last_module,
            code_version=code_version,
            config_sha256=config_sha256,
        )

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
        return self._write("touch_job", _int(obsid, "obsid"), str(stage), str(run_id))

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
        """Return this run's ``running`` jobs to ``pending`` (interrupt handling, 07 §2.1).

        Returns
        -------
        int or None
            Number of jobs released (None in deferred mode).
        """
        return self._write("release_jobs", str(run_id))

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
        return self._write("reset_failed", str(stage), ids)

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


def _reset_after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)

db = SQLModule()
"""The process-wide database facade (05 §2)."""
