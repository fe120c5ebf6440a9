"""The ``db`` facade of comap-reduce (docs/database.md) and the public names of the database layer.

One relational database tracks the archive: observations, processing jobs, statistics, quality
flags and calibration. The default back-end is SQLite (``databases/COMAP_manchester.db``); any
SQLAlchemy URL also works.

Usage::

    from modules.SQLModule.SQLModule import COMAPData, db

    db.connect("databases/COMAP_manchester.db")
    obs = db.query_observations(source="GField*", has_level1=True)

Numbering is the same everywhere (docs/overview.md#glossary): ``feed`` is the feed number (science feeds
1–19), ``band`` is 0–3 and ``channel`` is the binned channel. Times are UTC, timezone-aware.

The facade is composed of one class per concern, each in its own file of this package:

- :mod:`~modules.SQLModule.engine`: engines and the lock-retry policy;
- :mod:`~modules.SQLModule.connection`: connecting, sessions and transactions;
- :mod:`~modules.SQLModule.models`: the ORM tables (the schema);
- :mod:`~modules.SQLModule.queries`: read methods;
- :mod:`~modules.SQLModule.deferred`: deferred writes and :meth:`SQLModule.apply` (single
  writer, docs/database.md#single-writer-and-deferred-writes);
- :mod:`~modules.SQLModule.observations`, :mod:`~modules.SQLModule.quality` and
  :mod:`~modules.SQLModule.calibration`: write methods;
- :mod:`~modules.SQLModule.job_queue`: claiming and finishing jobs.
"""

from __future__ import annotations

from modules.SQLModule.calibration import CalibrationWrites
from modules.SQLModule.deferred import WRITE_OPS, DbOp
from modules.SQLModule.engine import LOCK_BACKOFF_S as LOCK_BACKOFF_S
from modules.SQLModule.engine import LOCK_RETRIES as LOCK_RETRIES
from modules.SQLModule.engine import make_engine as make_engine
from modules.SQLModule.job_queue import ClaimResult, JobQueue
from modules.SQLModule.models import CALIBRATION_FLUX_FIELDS as CALIBRATION_FLUX_FIELDS
from modules.SQLModule.models import CALIBRATION_MODEL_FIELDS as CALIBRATION_MODEL_FIELDS
from modules.SQLModule.models import JOB_STATUSES as JOB_STATUSES
from modules.SQLModule.models import MODEL_TYPES as MODEL_TYPES
from modules.SQLModule.models import OBSERVATION_COLUMNS as OBSERVATION_COLUMNS
from modules.SQLModule.models import QUALITY_COLUMNS as QUALITY_COLUMNS
from modules.SQLModule.models import QUALITY_STAT_COLUMNS as QUALITY_STAT_COLUMNS
from modules.SQLModule.models import (
    SCHEMA_VERSION,
    Base,
    CalibrationFlux,
    CalibrationModelFit,
    COMAPData,
    ObservationSummary,
    ProcessingJob,
    QualityFlag,
    SchemaInfo,
)
from modules.SQLModule.models import SUMMARY_COLUMNS as SUMMARY_COLUMNS
from modules.SQLModule.models import SUMMARY_STATUSES as SUMMARY_STATUSES
from modules.SQLModule.models import UTCDateTime as UTCDateTime
from modules.SQLModule.observations import ObservationWrites
from modules.SQLModule.quality import QualityWrites
from modules.SQLModule.queries import Queries
from modules.SQLModule.values import mjd_from_utc_start
from modules.SQLModule.values import utcnow as utcnow

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


class SQLModule(Queries, ObservationWrites, QualityWrites, CalibrationWrites, JobQueue):
    """The database facade (docs/database.md#the-db-facade). Use the module-level singleton :data:`db`.

    Further instances are fine, e.g. a map job that opens another database read-only.
    """

    def __repr__(self) -> str:
        mode = " read-only" if self._read_only else ""
        deferred = " deferred" if self._deferred else ""
        return f"<SQLModule {self._display}{mode}{deferred}>"


WRITE_METHODS: frozenset[str] = frozenset(WRITE_OPS)
"""Names of the write methods that may be deferred and applied (:class:`DbOp` names)."""

db = SQLModule()
"""The process-wide database facade (docs/database.md#the-db-facade)."""
