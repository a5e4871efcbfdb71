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
]
