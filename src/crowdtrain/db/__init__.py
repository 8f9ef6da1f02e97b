"""The database: SQLAlchemy models and the engine (SQLite in the data directory by default)."""

from crowdtrain.db.database import Database, DatabaseError
from crowdtrain.db.models import (
    Base,
    Completion,
    Dataset,
    Epoch,
    Evaluation,
    Lease,
    Shard,
    Source,
    Split,
    Tokenization,
)

__all__ = [
    "Base",
    "Completion",
    "Database",
    "DatabaseError",
    "Dataset",
    "Epoch",
    "Evaluation",
    "Lease",
    "Shard",
    "Source",
    "Split",
    "Tokenization",
]
