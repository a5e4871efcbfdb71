"""The one write flow: how each write operation runs inside a Writer's transaction, for
both backends, over the small :class:`Transaction` protocol each implements on its connection.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson

from gm.context import (
    MISSING_SQL,
    Position,
    SessionRows,
    Turn,
    build_missing,
    context_moves,
    date_words,
    deleted_positions,
    refresh,
    turn_from_row,
    window_sql,
)
from gm.errors import GMError, StorageUnavailable
from gm.memory import Memory, NewMemory, Scope
from gm.storage.ops import (
    AddMemories,
    BuildContext,
    CheckWrites,
    DeleteMemory,
    DeleteWhere,
    IndexChange,
    PurgeExpired,
    RebuildStep,
    RecordModel,
    UpdateMemory,
    WriteOp,
    WriteResult,
    added_times,
    id_conflict,
    model_mismatch,
    unknown_id,
    updated,
)
from gm.storage.sql import CONTEXT_VERSION, Params, columns_for, event_time_sql, live_by_id, memory_from_row, scope_sql

HISTORY_SQL = "INSERT INTO history (memory_id, namespace, op, at, text, metadata) VALUES ({marks})"
META_SQL = (
    "INSERT INTO meta (key, value) VALUES ({key}, {value}) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class Transaction(abc.ABC):
    """A Writer's open transaction, as the write flow uses it: statements, a savepoint per
    write, which failures refuse only that write, and the backend's own columns."""

    def __init__(self, version: int) -> None:
        self.version = version  # the schema's
        self.columns = columns_for(version)
        self.context = version >= CONTEXT_VERSION  # it has event time and session context

    @abc.abstractmethod
    def params(self) -> Params: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, values: list[Any]) -> list[Any]: ...

    @abc.abstractmethod
    async def execute(self, sql: str, values: list[Any]) -> None: ...

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...

    @abc.abstractmethod
    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """Undo the statements inside it if it raises a refusal (see :meth:`refusal`)."""

    @abc.abstractmethod
    def refusal(self, exc: Exception) -> GMError | None:
        """What a write that raised ``exc`` answers, if only it failed; None if the database
        itself failed (the whole batch fails)."""

    def embedding_columns(self, vector: bytes) -> dict[str, bytes]:
        """The columns a memory's own embedding is written to."""
        return {"embedding": vector}

    def search_columns(self, search: bytes | None, own: bytes) -> dict[str, bytes | None]:
        """The columns a memory's search embedding (gm.context) is written to."""
        return {"search_embedding": search}

    async def vectors_added(self, dimensions: int) -> None:
        """After vectors of ``dimensions`` were inserted (Postgres: the HNSW index may be due)."""
        return None

    async def purged(self, now: int) -> None:
        """After expired memories were purged (Postgres: prune the change feed)."""
        return None


async def apply_batch(tx: Transaction, ops: Sequence[WriteOp], stamp: int) -> list[WriteResult | GMError]:
    """Apply each write in its own savepoint: a refused write fails alone, the others stand.
    A failure of the database itself propagates (the frame rolls the batch back)."""
    flow = WriteFlow(tx, stamp)
    outcomes: list[WriteResult | GMError] = []
    for op in ops:
        try:
            async with tx.savepoint():
                outcomes.append(await flow.apply(op))
        except Exception as exc:
            refused = tx.refusal(exc)
            if refused is None:
                raise
            outcomes.append(refused)
    return outcomes


def _mark(p: Params, column: str, value: Any) -> str:
    return p.json(value) if column == "metadata" else p(value)


class WriteFlow:
    """The write operations on one transaction, their history rows stamped ``stamp``."""

    def __init__(self, tx: Transaction, stamp: int) -> None:
        self.tx = tx
        self.stamp = stamp
        self.columns = tx.columns

    async def apply(self, op: WriteOp) -> WriteResult:
        if isinstance(op, AddMemories):
            return await self.add(op)
        if isinstance(op, UpdateMemory):
            return await self.update(op)
        if isinstance(op, DeleteMemory):
            p = self.tx.params()
            return await self.delete_where(live_by_id(op.id, op.now, op.namespace, p), p, missing=op.id)
        if isinstance(op, DeleteWhere):
            p = self.tx.params()
            return await self.delete_where(scope_sql(op.scope, op.filter, op.now, p), p)
        if isinstance(op, PurgeExpired):
            p = self.tx.params()
            result = await self.delete_where(f"expires_at <= {p(op.now)}", p)
            await self.tx.purged(op.now)
            return result
        if isinstance(op, RecordModel):
            return await self.record_model(op)
        if isinstance(op, BuildContext):
            if not self.tx.context:
                return WriteResult(0)
            count, changes = await build_missing(TxSessionRows(self.tx), op.limit)
            return WriteResult(count, changes)
        if isinstance(op, CheckWrites):
            await self.set_meta("write_check", str(op.now))
            return WriteResult(None)
        if isinstance(op, RebuildStep):
            return WriteResult(await op.run(self.tx))
        raise TypeError(f"unknown write {op!r}")

    async def history(self, op: str, rows: list[tuple[str, str, int, str, str]]) -> None:
        """Record ``op`` for each (memory id, namespace, time, text, metadata JSON)."""
        if rows:
            await self.tx.executemany(
                HISTORY_SQL.format(marks=self.tx.params().marks(6)),
                [(memory_id, namespace, op, at, text, meta) for memory_id, namespace, at, text, meta in rows],
            )

    async def set_meta(self, key: str, value: str) -> None:
        p = self.tx.params()
        await self.tx.execute(META_SQL.format(key=p(key), value=p(value)), p.values)

    async def refresh(self, moved: list[Position]) -> list[IndexChange]:
        """Session context follows the write (see gm.context)."""
        return await refresh(TxSessionRows(self.tx), moved) if self.tx.context and moved else []

    async def add(self, op: AddMemories) -> WriteResult:
        out: list[tuple[Memory, bool]] = []
        changes: list[IndexChange] = []
        moved: list[Position] = []
        for item in op.items:
            if item.client_id:  # an expired memory frees its id: purge it as purge_expired would (history, index)
                p = self.tx.params()
                purged = await self.delete_where(f"id = {p(item.id)} AND expires_at <= {p(op.now)}", p)
                changes.extend(purged.changes)
            added = await self.insert(item)
            if added is None:
                out.append((await self.existing(item), False))
                continue
            rowid, memory = added
            out.append((memory, True))
            changes.append(IndexChange(rowid, vector=item.vector, scope=item.scope, expires_at=memory.expires_at))
            if item.scope.session_id is not None:
                moved.append(Position(item.scope.namespace, item.scope.session_id, memory.occurred_at, rowid))
        if changes:
            await self.tx.vectors_added(len(op.items[0].vector) // 4)
        return WriteResult(out, changes + await self.refresh(moved))

    async def insert(self, item: NewMemory) -> tuple[int, Memory] | None:
        """Insert ``item`` and record its history; None if its id is taken."""
        s = item.scope
        meta = orjson.dumps(item.metadata).decode()
        created, updated_at, expires_at, occurred = added_times(item, self.stamp)
        values: dict[str, Any] = {
            "id": item.id, "namespace": s.namespace, "user_id": s.user_id, "agent_id": s.agent_id,
            "session_id": s.session_id, "text": item.text, "metadata": meta, "created_at": created,
            "updated_at": updated_at, "expires_at": expires_at, **self.tx.embedding_columns(item.vector),
        }
        if self.tx.context:
            values |= {"occurred_at": occurred, "context": date_words(occurred)}
        p = self.tx.params()
        marks = ", ".join(_mark(p, name, v) for name, v in values.items())
        rows = await self.tx.fetch(
            f"INSERT INTO memories ({', '.join(values)}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING RETURNING rowid",
            p.values,
        )
        if not rows:
            return None
        await self.history("add", [(item.id, s.namespace, created, item.text, meta)])
        memory = Memory(item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text,
                        item.metadata, created, updated_at, expires_at, occurred)
        return rows[0][0], memory

    async def existing(self, item: NewMemory) -> Memory:
        """The memory stored under ``item``'s id: a retry of the same add, or a conflict."""
        p = self.tx.params()
        rows = await self.tx.fetch(f"SELECT {self.columns} FROM memories WHERE id = {p(item.id)}", p.values)
        if not rows:  # (Postgres) another instance deleted it in between: its id is free
            raise StorageUnavailable(f"memory {item.id!r} was deleted while being added; retry")
        memory = memory_from_row(rows[0])
        if not item.same_content(memory):
            raise id_conflict(item.id)
        return memory

    async def update(self, op: UpdateMemory) -> WriteResult:
        p = self.tx.params()
        where = live_by_id(op.id, op.now, op.namespace, p)
        rows = await self.tx.fetch(f"SELECT {self.columns} FROM memories WHERE {where}{p.lock_row}", p.values)
        if not rows:
            raise unknown_id(op.id)
        rowid, old = rows[0][0], memory_from_row(rows[0])
        memory = updated(old, op, self.stamp)
        meta = orjson.dumps(memory.metadata).decode()
        values: dict[str, Any] = {"text": memory.text, "metadata": meta, "expires_at": memory.expires_at,
                                  "updated_at": memory.updated_at}
        if self.tx.context:
            values["occurred_at"] = memory.occurred_at
            if old.session_id is None:  # alone, its context is its date
                values["context"] = date_words(memory.occurred_at)
        if op.vector is not None:
            values |= self.tx.embedding_columns(op.vector)
        p = self.tx.params()
        assignments = ", ".join(f"{name} = {_mark(p, name, v)}" for name, v in values.items())
        await self.tx.execute(f"UPDATE memories SET {assignments} WHERE rowid = {p(rowid)}", p.values)
        await self.history("update", [(op.id, old.namespace, self.stamp, memory.text, meta)])
        scope = Scope(old.namespace, old.user_id, old.agent_id, old.session_id)
        changes = [IndexChange(rowid, vector=op.vector, scope=scope, expires_at=memory.expires_at)]
        return WriteResult(memory, changes + await self.refresh(context_moves(old, memory, rowid)))

    async def delete_where(self, where: str, p: Params, missing: str | None = None) -> WriteResult:
        """Delete the memories ``where`` selects (its values in ``p``); with ``missing``, that
        none did is NotFound for that id."""
        rows = await self.tx.fetch(
            f"DELETE FROM memories WHERE {where} RETURNING rowid, id, text, metadata, namespace, session_id, "
            f"{event_time_sql(self.tx.version)}",
            p.values,
        )
        if missing is not None and not rows:
            raise unknown_id(missing)
        await self.history("delete", [(r[1], r[4], self.stamp, r[2], r[3]) for r in rows])
        removed = [IndexChange(r[0], remove=True) for r in rows]
        return WriteResult(len(rows), removed + await self.refresh(deleted_positions(rows)))

    async def record_model(self, op: RecordModel) -> WriteResult:
        rows = await self.tx.fetch("SELECT value FROM meta WHERE key = 'model'", [])
        stored = rows[0][0] if rows else None
        if stored is not None and stored != op.identity:
            if await self.tx.fetch("SELECT 1 FROM memories LIMIT 1", []):
                raise model_mismatch(stored, op.identity)
        if stored != op.identity:
            await self.set_meta("model", op.identity)
        return WriteResult(op.identity)


class TxSessionRows(SessionRows):
    """A Writer's transaction as gm.context sees it."""

    def __init__(self, tx: Transaction) -> None:
        self.tx = tx

    async def around(self, at: Position, before: int, after: int) -> list[Turn]:
        earlier, later = self.tx.params(), self.tx.params()
        first = await self.tx.fetch(window_sql(at, True, before, earlier), earlier.values)
        rest = await self.tx.fetch(window_sql(at, False, after, later), later.values)
        return [turn_from_row(r) for r in reversed(first)] + [turn_from_row(r) for r in rest]

    async def store(self, turn: Turn, context: str, search_embedding: bytes | None) -> None:
        p = self.tx.params()
        columns = {"context": context, **self.tx.search_columns(search_embedding, turn.embedding)}
        assignments = ", ".join(f"{name} = {p(value)}" for name, value in columns.items())
        await self.tx.execute(f"UPDATE memories SET {assignments} WHERE rowid = {p(turn.rowid)}", p.values)

    async def missing(self, limit: int) -> list[tuple[int, str, str | None, int]]:
        p = self.tx.params()
        return [tuple(r) for r in await self.tx.fetch(MISSING_SQL.format(limit=p(limit)), p.values)]

    async def store_alone(self, contexts: list[tuple[int, str]]) -> None:
        if contexts:
            p = self.tx.params()
            await self.tx.executemany(
                f"UPDATE memories SET context = {p.mark(1)} WHERE rowid = {p.mark(2)}",
                [(context, rowid) for rowid, context in contexts],
            )
