"""What every backend provides: its life cycle, writes through its Writer (with a timeout)
and their health, the reads written once in gm.storage.reads, and the searches it runs itself.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, overload

from gm.actor import Overdue
from gm.errors import ReembedInProgress, StorageUnavailable
from gm.filters import Filter
from gm.memory import Memory, Scope, TimeRange, format_time
from gm.migrator import Migrator
from gm.progress import OnProgress
from gm.storage.batch_writer import BatchWriter, WriteHealth
from gm.storage.ops import (
    UNSET,
    AddMemories,
    BeginReembed,
    BuildContext,
    CheckWrites,
    DeleteMemory,
    DeleteWhere,
    EndReembed,
    IndexChange,
    PurgeExpired,
    RebuildStep,
    RecordModel,
    ReembedInfo,
    StoreNextVectors,
    SwitchVectors,
    UpdateMemory,
    VectorRow,
    WriteOp,
    WriteResult,
    unknown_id,
)
from gm.storage.reads import Reads

__all__ = [  # the operations are the backends' vocabulary: importable from here, where they are used
    "UNSET", "AddMemories", "Backend", "BeginReembed", "BuildContext", "CheckWrites", "DeleteMemory", "DeleteWhere",
    "EndReembed", "IndexChange", "PurgeExpired", "RebuildStep", "RecordModel", "ReembedInfo", "StoreNextVectors",
    "SwitchVectors", "UpdateMemory", "VectorRow", "WriteOp", "WriteResult", "unknown_id",
]


def _time_or_none(ms: int | None) -> str | None:
    return format_time(ms) if ms is not None else None


class Backend(Reads):
    """One database: migrations, one Writer, concurrent readers (the queries of gm.storage.reads)."""

    name: str
    migrator: Migrator
    writer: BatchWriter | None = None
    write_timeout: float  # seconds a write may wait for its commit before it fails (503)

    @property
    def phase(self) -> str:
        """starting | migrating | ready | failed (the Migrator's)."""
        return self.migrator.phase

    shared = False  # other processes write it too (Postgres): they may switch the vectors' model
    index_beside: Path | None = None  # a database file the in-process index is saved beside (gm.index_file)

    @property
    def native_vectors(self) -> bool:
        """True: vector_search answers; False: the store keeps an in-process index."""
        return False

    @asynccontextmanager
    async def reembed_lock(self) -> AsyncIterator[None]:
        """Held while a re-embed runs (gm.reembed): one at a time, ReembedInProgress for
        a second (Postgres: across every instance)."""
        if getattr(self, "_reembedding", False):
            raise ReembedInProgress("a re-embed or reindex is already running on this store")
        self._reembedding = True
        try:
            yield
        finally:
            self._reembedding = False

    @abc.abstractmethod
    async def open(
        self,
        on_commit: Callable[[list[IndexChange]], Awaitable[None]],
        on_reset: Callable[[], None] | None = None,
        on_native: Callable[[], None] | None = None,
    ) -> None:
        """Migrate, then start the Writer; ``on_commit`` sees each batch's index changes
        after it is durable and before any caller hears back (on a shared database also
        other instances' changes); ``on_reset`` asks for the index to be loaded afresh;
        ``on_native`` says the database searches vectors itself from now on."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @overload
    async def write(self, op: AddMemories) -> builtins.list[tuple[Memory, bool]]: ...
    @overload
    async def write(self, op: UpdateMemory) -> Memory: ...
    @overload
    async def write(self, op: DeleteMemory | DeleteWhere | PurgeExpired | BuildContext) -> int: ...
    @overload
    async def write(self, op: RecordModel) -> str: ...
    @overload
    async def write(self, op: CheckWrites) -> None: ...
    @overload
    async def write(self, op: BeginReembed) -> ReembedInfo: ...
    @overload
    async def write(self, op: SwitchVectors) -> int | None: ...
    @overload
    async def write(self, op: StoreNextVectors) -> int: ...
    @overload
    async def write(self, op: EndReembed) -> bool: ...
    @overload
    async def write(self, op: RebuildStep) -> Any: ...

    async def write(self, op: WriteOp) -> Any:
        """Hand ``op`` to the Writer; its reply once committed. A write not answered within
        ``write_timeout`` fails with StorageUnavailable instead of hanging: withdrawn
        unapplied if the Writer had not taken it up yet (it was queued behind a stuck
        batch), else of unknown outcome (its batch was under way)."""
        if self.writer is None:
            raise StorageUnavailable("the database is not open yet")
        try:
            return await self.writer.ask(op, timeout=self.write_timeout)
        except Overdue as late:
            if late.taken:
                raise StorageUnavailable(
                    f"the database did not commit the write within {self.write_timeout:g}s "
                    "(GM_WRITE_TIMEOUT_SECONDS); it may still be applied: read it back before retrying"
                ) from None
            raise StorageUnavailable(
                f"the write waited {self.write_timeout:g}s (GM_WRITE_TIMEOUT_SECONDS) behind a write the "
                "database has not finished, and was not applied; retry later"
            ) from None

    def write_health(self) -> dict[str, Any]:
        """The Writer's health as readyz and ``/v1/stats`` show it: ``status`` is ``ok``,
        ``failing`` (the last batch failed) or ``blocked`` (a write has waited past the timeout)."""
        health = self.writer.health if self.writer is not None else WriteHealth()
        waited = self.writer.oldest_wait() if self.writer is not None else 0.0
        status = "blocked" if waited > self.write_timeout else "failing" if health.consecutive_failures else "ok"
        return {
            "status": status,
            "last_commit_at": _time_or_none(health.last_commit_at),
            "last_failure_at": _time_or_none(health.last_failure_at),
            "last_error": health.last_error,
            "consecutive_failures": health.consecutive_failures,
            "oldest_pending_seconds": round(waited, 3),
            "timeout_seconds": self.write_timeout,
        }

    @abc.abstractmethod
    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]: ...

    @abc.abstractmethod
    async def rebuild_keyword(self, progress: OnProgress | None = None) -> None:
        """Rebuild the keyword index online, as this release defines it: searches keep using the
        old index and writes keep being accepted until one transaction switches to the new one.
        Resumable: a run killed part-way continues where it stopped when run again. ``progress``
        hears each step (phase, done, total, rate, ETA). SQLite builds a new FTS5 table beside
        the live one in short steps on the Writer; Postgres recomputes stale ``search_tsv``
        values in batches and reindexes the GIN indexes concurrently, one instance at a time
        (another caller meanwhile gets Conflict)."""

    async def rebuild_vector_index(self, progress: OnProgress | None = None) -> None:
        """Rebuild the database's approximate vector index (pgvector's HNSW) online, if it has
        one; a backend whose vectors are searched by the in-process index has nothing to rebuild
        (that index is built afresh from the database at every open)."""
        return None

    async def vector_search(
        self, vector: bytes, scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None, model: str = "",
    ) -> builtins.list[tuple[int, float]]:
        raise NotImplementedError("this backend searches vectors with the in-process index")

    async def cosines(self, vector: bytes, rowids: builtins.list[int]) -> dict[int, float]:
        """The cosine of ``vector`` with each of ``rowids`` (native vector backends only)."""
        raise NotImplementedError("this backend searches vectors with the in-process index")

    async def check(self) -> None:
        """Raise StorageUnavailable if the database does not answer now (for readyz); a
        local file that opened keeps answering, so by default there is nothing to ask."""
        return None

    def size_bytes(self) -> int | None:
        return None

    async def database_size(self) -> int | None:
        return self.size_bytes()
