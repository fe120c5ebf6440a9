"""Database layer of comap-reduce (docs/database.md): ORM models, the ``db`` facade, source groups, migration.

``from modules.SQLModule.SQLModule import COMAPData, db`` is the canonical import (the seed README
uses it). The facade class itself is ``modules.SQLModule.SQLModule.SQLModule``; it is deliberately
not re-exported here, so that ``modules.SQLModule.SQLModule`` keeps naming the submodule.
"""

from modules.SQLModule.source_groups import classify
from modules.SQLModule.SQLModule import (
    SCHEMA_VERSION,
    CalibrationFlux,
    CalibrationModelFit,
    ClaimResult,
    COMAPData,
    DbOp,
    ObservationSummary,
    ProcessingJob,
    QualityFlag,
    SchemaInfo,
    db,
)

__all__ = [
    "SCHEMA_VERSION",
    "COMAPData",
    "CalibrationFlux",
    "CalibrationModelFit",
    "ClaimResult",
    "DbOp",
    "ObservationSummary",
    "ProcessingJob",
    "QualityFlag",
    "SchemaInfo",
    "classify",
    "db",
]
