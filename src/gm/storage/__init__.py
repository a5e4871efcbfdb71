"""Storage backends. The store talks to a :class:`Backend`; writes travel to the
backend's Writer actor as the operation messages defined here.
"""

from __future__ import annotations

from gm.storage.base import (
    AddMemories,
    Backend,
    DeleteMemory,
    DeleteWhere,
    IndexChange,
    PurgeExpired,
    RecordModel,
    UpdateMemory,
    WriteOp,
)


def is_postgres_url(target: str) -> bool:
    """True for ``postgres://`` and ``postgresql://`` URLs (the Postgres backend)."""
    return target.startswith(("postgres://", "postgresql://"))


__all__ = [
    "AddMemories",
    "Backend",
    "DeleteMemory",
    "DeleteWhere",
    "IndexChange",
    "PurgeExpired",
    "RecordModel",
    "UpdateMemory",
    "WriteOp",
    "is_postgres_url",
]
