"""What every backend provides: the write operations (messages for its Writer), the
index changes a committed write produces, and the read queries the store needs.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, overload

from gm.actor import Actor, Overdue
from gm.errors import Conflict, GMError, ModelMismatch, NotFound, StorageUnavailable
from gm.filters import Filter
from gm.memory import HistoryEntry, Memory, NewMemory, Page, Scope, TimeRange, format_time, now_ms

UNSET: Any = object()


@dataclass(slots=True)
class AddMemories:
    """Insert all items or none; a client id seen before with the same content is returned as is."""

    items: list[NewMemory]
    now: int


@dataclass(slots=True)
class UpdateMemory:
    """Change the live memory ``id``; with ``namespace``, only if it lies in that namespace
    (checked in the transaction that writes, so a memory that another tenant added under the
    same id meanwhile is never touched)."""

    id: str
    now: int
    text: str | None = None
    vector: bytes | None = None
    metadata: dict[str, Any] | None = None
    expires_at: Any = UNSET  # int, None (clear) or UNSET (keep)
    namespace: str | None = None
    occurred_at: int | None = None  # None: keep


@dataclass(slots=True)
class DeleteMemory:
    """Delete the live memory ``id``; with ``namespace``, only if it lies in that namespace."""

    id: str
    now: int
    namespace: str | None = None


@dataclass(slots=True)
class DeleteWhere:
    scope: Scope
    filter: Filter | None
    now: int


@dataclass(slots=True)
class PurgeExpired:
    now: int


@dataclass(slots=True)
class RecordModel:
    """Record the model identity of the vectors, or fail with ModelMismatch if another one holds data."""

    identity: str


@dataclass(slots=True)
class CheckWrites:
    """Commit a one-row write (``meta.write_check``): readyz's probe of whether writes work
    again after they failed, so an instance out of rotation comes back without traffic."""

    now: int


@dataclass(slots=True)
class BuildContext:
    """Build the session context (gm.context) of up to ``limit`` memories that have none yet
    (written before schema v3, or by an older release meanwhile); replies how many it built."""

    limit: int


WriteOp = (
    AddMemories | UpdateMemory | DeleteMemory | DeleteWhere | PurgeExpired | RecordModel | CheckWrites | BuildContext
)


def updated(old: Memory, op: UpdateMemory, stamp: int) -> Memory:
    """``old`` with the update's fields applied at commit time ``stamp`` (what the Writers
    store and return)."""
    return Memory(
        old.id, old.namespace, old.user_id, old.agent_id, old.session_id,
        op.text if op.text is not None else old.text,
        op.metadata if op.metadata is not None else old.metadata,
        old.created_at, stamp,
        old.expires_at if op.expires_at is UNSET else op.expires_at,
        old.occurred_at if op.occurred_at is None else op.occurred_at,
    )


def added_times(item: NewMemory, stamp: int) -> tuple[int, int, int | None, int]:
    """An added memory's created_at, updated_at, expires_at and occurred_at: an import keeps
    its own times; any other add is created at the commit ``stamp``, and a TTL counts from
    then; it occurred when the client says, else when it was created."""
    created = item.created_at if item.created_at is not None else stamp  # (0 is 1970, a time like any other)
    expires = stamp + item.ttl_ms if item.ttl_ms is not None else item.expires_at
    occurred = item.occurred_at if item.occurred_at is not None else created
    return created, item.updated_at if item.updated_at is not None else created, expires, occurred


class WriteHealth:
    """How a Writer's commits are going, for readyz and ``/v1/stats``: touched only by the
    Writer's task. A batch refused as a whole by the database (disk full, read-only, I/O
    error, a lock or write timeout, a missing table) is a failure; a single write refused
    for its own values (422, 404, 409) is not."""

    def __init__(self) -> None:
        self.last_commit_at: int | None = None
        self.last_failure_at: int | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0

    def committed(self) -> None:
        self.last_commit_at = now_ms()
        self.consecutive_failures = 0

    def failed(self, error: GMError) -> None:
        self.last_failure_at = now_ms()
        self.last_error = error.message
        self.consecutive_failures += 1


class BatchWriter(Actor[WriteOp, object]):
    """What the two Writers share around their own transaction frames: a mailbox drained in
    batches of up to 512 writes, the health of their commits, and the commit stamp of the
    batch under way.

    A batch's history rows, ``updated_at`` and (for adds) ``created_at`` carry its stamp,
    taken once the batch holds the database's write lock (SQLite; on Postgres, once its
    transaction begins: commit order per instance), so history is in commit order. The
    stamp never goes back, even if the clock does."""

    def __init__(self) -> None:
        super().__init__(max_batch=512)
        self.stamp = 0
        self.health = WriteHealth()

    def next_stamp(self) -> int:
        self.stamp = max(now_ms(), self.stamp)
        return self.stamp


def live_by_id(memory_id: str, now: int, namespace: str | None, param: Callable[[Any], str]) -> str:
    """The WHERE clause for the live memory ``memory_id`` (in ``namespace``, if given), its
    values passed through ``param``, which returns each one's placeholder. The Writers put it
    in the statement that locks or deletes the row: the namespace check and the write are one."""
    clause = f"id = {param(memory_id)} AND (expires_at IS NULL OR expires_at > {param(now)})"
    if namespace is not None:
        clause += f" AND namespace = {param(namespace)}"
    return clause


def unknown_id(memory_id: str) -> NotFound:
    """The one answer for an id that names no live memory, or one in a namespace the caller
    may not see: the two are indistinguishable."""
    return NotFound(f"no memory with id {memory_id!r}")


def id_conflict(memory_id: str) -> Conflict:
    return Conflict(
        f"id {memory_id!r} already names a memory with other content; choose another id or update that memory"
    )


def model_mismatch(stored: str, configured: str) -> ModelMismatch:
    return ModelMismatch(
        f"this database's vectors were made by model {stored!r} but the configured "
        f"model is {configured!r}; set GM_MODEL_DIR to the model the database was built "
        "with, or export and re-import its memories into a new database"
    )


def _time_or_none(ms: int | None) -> str | None:
    return format_time(ms) if ms is not None else None


@dataclass(slots=True)
class IndexChange:
    """One committed change the in-process vector index must follow.

    ``vector`` None with ``remove`` False means only ``expires_at`` changed.
    """

    rowid: int
    remove: bool = False
    vector: bytes | None = None
    scope: Scope | None = None
    expires_at: int | None = None


def final_changes(changes: list[IndexChange]) -> list[IndexChange]:
    """A batch's index changes with one per row, its final state: an add into a session
    first carries the memory's own vector, then the mixed one (gm.context); the index then
    writes one slot, not two. An expiry-only change keeps the vector before it."""
    final: dict[int, IndexChange] = {}
    for change in changes:
        before = final.get(change.rowid)
        if before is not None and not change.remove and change.vector is None and not before.remove:
            before.expires_at = change.expires_at
        else:
            final.pop(change.rowid, None)  # (re-inserted: the dict keeps the order of final states)
            final[change.rowid] = change
    return list(final.values())


@dataclass(slots=True)
class WriteResult:
    value: Any
    changes: list[IndexChange] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VectorRow:
    rowid: int
    scope: Scope
    expires_at: int | None
    vector: bytes


class Backend(abc.ABC):
    """One database: migrations, one Writer, concurrent readers."""

    name: str
    schema_version: int
    phase: str  # starting | migrating | ready | unavailable | failed
    writer: BatchWriter | None = None
    write_timeout: float  # seconds a write may wait for its commit before it fails (503)

    native_vectors = False  # True: vector_search answers; False: the store keeps an in-process index
    context = False  # the schema holds event time and session context (v3 on): set once migrated

    @abc.abstractmethod
    async def open(
        self, on_commit: Callable[[list[IndexChange]], Awaitable[None]], on_reset: Callable[[], None] | None = None
    ) -> None:
        """Migrate, then start the Writer; ``on_commit`` sees each batch's index changes
        after it is durable and before any caller hears back (on a shared database also
        other instances' changes); ``on_reset`` asks for the index to be loaded afresh."""

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
    async def get(self, memory_id: str, now: int, namespace: str | None = None) -> Memory | None:
        """The live memory ``memory_id`` (only if it lies in ``namespace``, when given)."""

    @abc.abstractmethod
    async def get_by_ids(self, ids: list[str], now: int) -> dict[str, Memory]: ...

    @abc.abstractmethod
    async def get_many(self, rowids: list[int], now: int) -> dict[int, Memory]: ...

    @abc.abstractmethod
    async def list(
        self, scope: Scope, filter: Filter | None, limit: int, cursor: str | None, now: int,
        *, order_by: str = "created_at", time_range: TimeRange | None = None,
    ) -> Page:
        """A page of live memories, newest first by ``order_by`` (created_at or occurred_at),
        those in ``time_range`` only (when given); ``cursor`` must come from the same order."""

    @abc.abstractmethod
    async def history(self, memory_id: str, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        """The changes of ``memory_id`` in commit order (only those in ``namespace``, when given:
        an id freed by a delete may have been taken in another namespace since)."""

    @abc.abstractmethod
    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]: ...

    @abc.abstractmethod
    async def matching_rowids(
        self, scope: Scope, filter: Filter | None, now: int, *, time_range: TimeRange | None = None
    ) -> builtins.list[int]:
        """The rowids of the live memories in ``scope`` matching ``filter`` and ``time_range``
        (what the in-process vector index is restricted to)."""

    @abc.abstractmethod
    def vectors(self) -> AsyncIterator[builtins.list[VectorRow]]: ...

    @abc.abstractmethod
    async def counts(self, now: int) -> dict[str, int]: ...

    @abc.abstractmethod
    async def without_context(self) -> int:
        """How many memories still wait for their session context to be built."""

    async def vector_search(
        self, vector: bytes, scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
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
