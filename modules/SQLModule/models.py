"""ORM tables of comap-reduce (docs/database.md#schema): the schema, its version and the column sets the
facade checks.

The schema is created by :meth:`SQLModule.connect` on an empty database; legacy databases are
converted by :mod:`modules.SQLModule.migrate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION: int = 1
"""Schema version written to ``schema_info`` by this code (docs/database.md#schema)."""

JOB_STATUSES: tuple[str, ...] = ("pending", "running", "done", "failed")
SUMMARY_STATUSES: tuple[str, ...] = ("pending", "running", "complete", "failed")
MODEL_TYPES: tuple[str, ...] = ("polynomial", "mean", "nearest")


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
    """One observation (``comap_data``, docs/database.md#comap_data).

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
    """Per-observation summary values (``observation_summary``, docs/database.md#observation_summary)."""

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
    """Flags and statistics per (obsid, feed, band, channel) (``quality_flags``,
    docs/database.md#quality_flags).

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
    """One successful calibrator fit per (obsid, feed, band, channel) (docs/database.md#calibration_flux)."""

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
    """Calibration-factor model per (source, feed, band, channel) (docs/database.md#calibration_model_fit,
    docs/level2.md#calibrationmodel)."""

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
    """Job state per (obsid, stage) (``processing_jobs``, docs/database.md#processing_jobs,
    docs/operations.md#job-states).

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
    """Key/value schema metadata; ``schema_version = "1"`` (docs/database.md#schema_info)."""

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


def good_flag_values(obsid: int, feed: int, band: int, channel: int, now: datetime) -> dict[str, Any]:
    """Column values of a new ``quality_flags`` row: every flag good, no statistics.

    Parameters
    ----------
    obsid, feed, band, channel : int
        Element (feed number 1–19, band 0–3, binned channel).
    now : datetime
        ``updated_utc`` of the row (UTC).
    """
    return {
        "obsid": obsid,
        "feed": feed,
        "band": band,
        "channel": channel,
        "observer_ok": True,
        "pipeline_ok": True,
        "is_good": True,
        "updated_utc": now,
    }
