"""Adding memories in a Writer's transaction, for both backends: the rows of a write go in
a few multi-row statements, and the session context of a session the write starts is worked
out before its rows are written (gm.context), so each row is written and indexed once.

One statement a row made SQLite's FTS5 flush its pending terms at the end of each, a segment
a row: 23k against 105k rows a second into the keyword index alone, and an import's 20,000
rows with context took 4.3k rows/s one a statement against 9.4k in statements of 500 (measured).
A row of a session that already has stored turns is written with its date as context and
then refreshed with its neighbours as before (gm.context.refresh), the rare case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gm.context import Position, Turn, context_of, date_words, search_embedding_of
from gm.errors import StorageUnavailable
from gm.memory import Memory, NewMemory
from gm.storage.ops import AddMemories, IndexChange, WriteResult, added_times, id_conflict
from gm.storage.sql import memory_from_row

if TYPE_CHECKING:
    from gm.storage.write_flow import WriteFlow

ROW_VALUES = 16_000  # values a multi-row INSERT carries at most (SQLite and asyncpg take 32,766)


@dataclass(slots=True)
class Row:
    """A memory this write inserts: its columns, and what it replies once inserted."""

    item: NewMemory
    values: dict[str, Any]
    memory: Memory
    vector: bytes  # the vector the index gets: its search embedding where it has one
    next_vector: bytes | None
    planned: bool = False  # its context was worked out before the insert
    rowid: int = 0


class AddFlow:
    """:class:`AddMemories` on a :class:`WriteFlow`'s transaction."""

    def __init__(self, flow: WriteFlow) -> None:
        self.flow = flow
        self.tx = flow.tx

    async def add(self, op: AddMemories) -> WriteResult:
        flow, tx = self.flow, self.tx
        swap = not await flow.check_model(op.model, op.next_model, [item.next_vector for item in op.items])
        info = await flow.reembed()
        with_next = info is not None and not swap and op.next_model == info.identity
        changes: list[IndexChange] = []
        taken: set[str] = set()
        client_ids = [item.id for item in op.items if item.client_id]
        if client_ids:  # an expired memory frees its id: purged as purge_expired would (history, index)
            p = tx.params()
            purged = await flow.delete_where(f"{p.one_of('id', client_ids, 'text')} AND expires_at <= {p(op.now)}", p)
            changes.extend(purged.changes)
            p = tx.params()
            found = await tx.fetch(f"SELECT id FROM memories WHERE {p.one_of('id', client_ids, 'text')}", p.values)
            taken = {r[0] for r in found}
        rows: list[Row] = []
        old = await flow.has_old_vectors()
        for item in op.items:
            if item.id not in taken:  # (a repeat of an id within the write is answered as a retry of it)
                taken.add(item.id)
                vector = item.next_vector if swap else item.vector
                next_vector = item.next_vector if with_next and item.next_vector else None
                rows.append(self.row(item, vector, next_vector if info is not None else b"", old))
        if tx.context and info is None:  # (during a re-embed the next model's search vectors follow too: refresh)
            await self.plan_sessions(rows)
        await self.insert(rows)
        inserted = {row.item.id: row for row in rows if row.rowid}
        await flow.history("add", [(r.item.id, r.memory.namespace, r.memory.created_at, r.item.text,
                                    r.values["metadata"]) for r in inserted.values()])
        out: list[tuple[Memory, bool]] = []
        moved = self.unplanned(rows)
        for item in op.items:
            row = inserted.pop(item.id, None)
            if row is None:
                out.append((await self.existing(item), False))
                continue
            out.append((row.memory, True))
            scope, expires = item.scope, row.memory.expires_at
            changes.append(IndexChange(row.rowid, vector=row.vector, scope=scope, expires_at=expires))
            if row.next_vector:
                changes.append(IndexChange(row.rowid, vector=row.next_vector, scope=scope, expires_at=expires,
                                           next=True))
        if changes:
            await tx.vectors_added(len(op.items[0].next_vector if swap else op.items[0].vector) // 4)
        return WriteResult(out, changes + await flow.refresh(moved))

    def row(self, item: NewMemory, vector: bytes, next_vector: bytes | None, old: bool) -> Row:
        """``item``'s columns with its ``vector`` (and ``next_vector``, unless b"": no re-embed
        is under way; ``old``: the last switch's old columns are still there); its context is its
        date until :meth:`plan_sessions` works it out."""
        s, tx = item.scope, self.tx
        meta = orjson.dumps(item.metadata).decode()
        created, updated_at, expires_at, occurred = added_times(item, self.flow.stamp)
        values: dict[str, Any] = {
            "id": item.id, "namespace": s.namespace, "user_id": s.user_id, "agent_id": s.agent_id,
            "session_id": s.session_id, "text": item.text, "metadata": meta, "created_at": created,
            "updated_at": updated_at, "expires_at": expires_at, **tx.embedding_columns(vector),
        }
        if next_vector != b"":
            values |= tx.next_vector_columns(next_vector)
        if old:
            values["embedding_old"] = b""  # (NOT NULL, as `embedding` was on SQLite: the old model has none)
        if tx.context:  # (every row has the same columns: a statement inserts many, in order)
            values |= {"occurred_at": occurred, "context": date_words(occurred), **tx.search_columns(None, vector)}
        memory = Memory(item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text,
                        item.metadata, created, updated_at, expires_at, occurred)
        return Row(item, values, memory, vector, next_vector or None)

    async def plan_sessions(self, rows: list[Row]) -> None:
        """Work out the context and search vector of every row of a session that has no
        stored turns yet, from the write's own turns (a session's order: occurred_at, then
        rowid, which follows the order of insertion)."""
        sessions: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            if row.memory.session_id is not None:
                sessions.setdefault((row.memory.namespace, row.memory.session_id), []).append(row)
        for namespace in {ns for ns, _ in sessions}:
            names = [name for ns, name in sessions if ns == namespace]
            p = self.tx.params()
            stored = await self.tx.fetch(f"SELECT DISTINCT session_id FROM memories WHERE namespace = {p(namespace)} "
                                         f"AND {p.one_of('session_id', names, 'text')}", p.values)
            for (name,) in stored:
                del sessions[namespace, name]
        for turns_of in sessions.values():
            ordered = sorted(turns_of, key=lambda r: r.memory.occurred_at)  # (stable: then the order of insertion)
            turns = [Turn(0, r.item.text, r.memory.occurred_at, r.vector, None, None, r.item.scope,
                          r.memory.expires_at) for r in ordered]
            for i, row in enumerate(ordered):
                search = search_embedding_of(turns, i)
                row.values["context"] = context_of(turns, i)
                row.values |= self.tx.search_columns(search, row.vector)
                row.vector = search if search is not None else row.vector
                row.planned = True

    async def insert(self, rows: list[Row]) -> None:
        """Insert ``rows`` in their order (each taking its rowid) in statements of many rows;
        a row whose id another writer took meanwhile keeps rowid 0."""
        start = 0
        while start < len(rows):
            columns = tuple(rows[start].values)
            end, most = start + 1, start + max(1, ROW_VALUES // len(columns))
            while end < min(len(rows), most) and tuple(rows[end].values) == columns:
                end += 1
            chunk = rows[start:end]
            p = self.tx.params()
            tuples = p.rows([tuple(row.values.values()) for row in chunk],
                            ["jsonb" if column == "metadata" else "" for column in columns])
            found = await self.tx.fetch(f"INSERT INTO memories ({', '.join(columns)}) VALUES {tuples} "
                                        "ON CONFLICT (id) DO NOTHING RETURNING rowid, id", p.values)
            rowids = {memory_id: rowid for rowid, memory_id in found}
            for row in chunk:
                row.rowid = rowids.get(row.item.id, 0)
            start = end

    @staticmethod
    def unplanned(rows: list[Row]) -> list[Position]:
        """The places to refresh: the inserted rows of every session not planned, or planned
        but not written as planned (a row not inserted, or rowids out of the planned order)."""
        places: list[Position] = []
        sessions: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            if row.memory.session_id is not None:
                sessions.setdefault((row.memory.namespace, row.memory.session_id), []).append(row)
        for (namespace, session_id), turns in sessions.items():
            ordered = sorted(turns, key=lambda r: r.memory.occurred_at)
            keys = [(r.memory.occurred_at, r.rowid) for r in ordered]
            if all(r.planned and r.rowid for r in turns) and all(a < b for a, b in zip(keys, keys[1:], strict=False)):
                continue
            places += [Position(namespace, session_id, r.memory.occurred_at, r.rowid) for r in turns if r.rowid]
        return places

    async def existing(self, item: NewMemory) -> Memory:
        """The memory stored under ``item``'s id: a retry of the same add, or a conflict."""
        p = self.tx.params()
        rows = await self.tx.fetch(f"SELECT {self.flow.columns} FROM memories WHERE id = {p(item.id)}", p.values)
        if not rows:  # (Postgres) another instance deleted it in between: its id is free
            raise StorageUnavailable(f"memory {item.id!r} was deleted while being added; retry")
        memory = memory_from_row(rows[0])
        if not item.same_content(memory):
            raise id_conflict(item.id)
        return memory
