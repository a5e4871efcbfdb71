"""The one write flow: how each write operation runs inside a Writer's transaction, for
both backends, over the small :class:`Transaction` protocol each implements on its connection.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from gm.errors import GMError, ModelSwitched
from gm.memory import Scope
from gm.model_identity import IDENTITY, IDENTITY_OF, LABEL, META_KEYS, MODEL, recorded_model
from gm.storage.add_flow import AddFlow
from gm.storage.ops import (
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
    WriteOp,
    WriteResult,
    model_mismatch,
    unknown_id,
    updated,
)
from gm.storage.reembed_flow import ReembedFlow
from gm.storage.sql import Params, event_time_sql, live_by_id, memory_from_row, scope_sql
from gm.storage.transaction import Transaction

HISTORY_SQL = "INSERT INTO history (memory_id, namespace, op, at, text, metadata) VALUES ({marks})"
RECORDED_MODEL_SQL = f"SELECT key, value FROM meta WHERE key IN ({', '.join(repr(k) for k in META_KEYS)})"
META_SQL = (
    "INSERT INTO meta (key, value) VALUES ({key}, {value}) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


async def apply_batch(tx: Transaction, ops: Sequence[WriteOp], stamp: int) -> list[WriteResult | GMError]:
    """Apply each write in its own savepoint: a refused write fails alone, the others stand.
    A failure of the database itself propagates (the frame rolls the batch back)."""
    flow = WriteFlow(tx, stamp)
    outcomes: list[WriteResult | GMError] = []
    for op in ops:
        try:
            async with tx.savepoint():
                result = await flow.apply(op)
                await flow.stamp_models(result.changes)
                outcomes.append(result)
        except Exception as exc:
            refused = tx.refusal(exc)
            if refused is None:
                raise
            flow.known_model, flow.known_reembed, flow.known_old = None, False, None  # (it was rolled back)
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
        self.known_reembed: ReembedInfo | None | bool = False  # False: not read yet in this transaction
        self.known_model: str | None = None
        self.known_old: bool | None = None

    async def apply(self, op: WriteOp) -> WriteResult:
        if isinstance(op, AddMemories):
            return await AddFlow(self).add(op)
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
        if isinstance(op, StoreNextVectors):
            return await ReembedFlow(self).store(op)
        if isinstance(op, BeginReembed):
            return await ReembedFlow(self).begin(op)
        if isinstance(op, SwitchVectors):
            return await ReembedFlow(self).switch(op)
        if isinstance(op, EndReembed):
            return await ReembedFlow(self).end(op)
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

    async def meta(self, key: str) -> str | None:
        p = self.tx.params()
        rows = await self.tx.fetch(f"SELECT value FROM meta WHERE key = {p(key)}", p.values)
        return str(rows[0][0]) if rows else None

    async def reembed(self) -> ReembedInfo | None:
        """The re-embed under way (gm.reembed), read once per transaction."""
        if self.known_reembed is False:
            value = await self.meta("reembed")
            self.known_reembed = ReembedInfo.from_json(value) if value is not None else None
        assert not isinstance(self.known_reembed, bool)
        return self.known_reembed

    async def switched_model(self, identity: str, label: str, model_dir: str) -> None:
        """Record that the vectors are the model ``identity``'s now (a re-embed switched from
        the folder ``model_dir``, where the other instances find it). ``model``, the row a
        release before content identities reads, names no model it could be configured with:
        it refuses the database (its columns moved) instead of writing beside them."""
        refusal = f"re-embedded to {label} ({identity}): needs a release with gmem reembed"
        for key, value in {MODEL: refusal, IDENTITY: identity, IDENTITY_OF: refusal, LABEL: label,
                           "vectors_model_dir": model_dir}.items():
            await self.set_meta(key, value)
        self.known_model = identity

    async def has_old_vectors(self) -> bool:
        """Whether the vectors the last switch left behind are still there (gm.reembed)."""
        if self.known_old is None:
            self.known_old = await self.meta("old_vectors") is not None
        return self.known_old

    async def current_model(self) -> str:
        """The identity of the model of the current vectors, read once per transaction."""
        if self.known_model is None:
            self.known_model = await self.meta(IDENTITY) or ""
        return self.known_model

    async def stamp_models(self, changes: list[IndexChange]) -> None:
        """Name the model of each change's vector, so the index of that model follows it (a
        removal from the next index only names the next model)."""
        for change in changes:
            if change.next:
                info = await self.reembed()
                change.model = info.identity if info is not None else "-"
            elif change.vector is not None:
                change.model = await self.current_model()

    async def check_model(self, model: str, next_model: str, next_vectors: list[bytes]) -> bool:
        """Whether a write's vectors, made by ``model`` (and ``next_vectors`` by ``next_model``),
        suit the stored ones: False if its next vectors are the current ones now (a switch came
        between the embedding and this commit); ModelSwitched if it has none of the current model."""
        if not model:
            return True  # (a write with no vectors of its own)
        current = await self.current_model()
        if not current or current == model:
            return True
        if next_model and next_model == current and all(next_vectors):
            return False
        raise ModelSwitched(f"the vectors moved to model {current!r} while this write was embedded; retry it")

    async def refresh(self, moved: list[Position]) -> list[IndexChange]:
        """Session context follows the write (see gm.context), and the next model's search
        vectors too while a re-embed is under way."""
        if not self.tx.context or not moved:
            return []
        return await refresh(TxSessionRows(self.tx), moved) + await self.refresh_next(moved)

    async def refresh_next(self, moved: list[Position]) -> list[IndexChange]:
        if not moved or await self.reembed() is None:
            return []
        return await refresh(TxSessionRows(self.tx, next=True), moved)

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
        # An unchanged text keeps its vectors (its search vector mixes its neighbours': gm.context).
        vector, next_vector, info = (op.vector if memory.text != old.text else None), None, None
        if vector is not None:
            swap = not await self.check_model(op.model, op.next_model, [op.next_vector or b""])
            info = await self.reembed()
            vector = op.next_vector if swap else vector
            if info is not None and not swap and op.next_model == info.identity:
                next_vector = op.next_vector or None
            values |= self.tx.embedding_columns(vector or b"")
            if info is not None:  # a text the next model has not embedded is embedded again (gm.reembed)
                values |= self.tx.next_vector_columns(next_vector)
        p = self.tx.params()
        assignments = ", ".join(f"{name} = {_mark(p, name, v)}" for name, v in values.items())
        await self.tx.execute(f"UPDATE memories SET {assignments} WHERE rowid = {p(rowid)}", p.values)
        await self.history("update", [(op.id, old.namespace, self.stamp, memory.text, meta)])
        scope = Scope(old.namespace, old.user_id, old.agent_id, old.session_id)
        changes = [IndexChange(rowid, vector=vector, scope=scope, expires_at=memory.expires_at)]
        if info is not None:
            changes.append(IndexChange(rowid, remove=next_vector is None, vector=next_vector, scope=scope,
                                       expires_at=memory.expires_at, next=True))
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
        model = op.model  # (the meta rows, and why `model` keeps the old scheme: gm.model_identity)
        rows = await self.tx.fetch(RECORDED_MODEL_SQL, [])
        stored = recorded_model({row[0]: row[1] for row in rows})
        found = None if stored is None else stored.rows_for(model)
        if stored is not None and found is None and await self.tx.fetch("SELECT 1 FROM memories LIMIT 1", []):
            raise model_mismatch(stored.shown, model.identity, stored_label=stored.label,
                                 configured_label=model.label, configured_dir=model.directory)
        writes = model.meta() if found is None else found  # (a database without memories takes the configured model)
        for key, value in writes.items():
            await self.set_meta(key, value)
        self.known_model = None
        if found == {} and stored is not None and stored.identity:
            return WriteResult(stored.identity)  # (a reindex's vectors: the model's, another generation; gm.reembed)
        return WriteResult(model.identity)


class TxSessionRows(SessionRows):
    """A Writer's transaction as gm.context sees it (with ``next``, the next model's vectors)."""

    def __init__(self, tx: Transaction, next: bool = False) -> None:
        self.tx = tx
        self.next = next

    async def around(self, at: Position, before: int, after: int) -> list[Turn]:
        earlier, later = self.tx.params(), self.tx.params()
        first = await self.tx.fetch(window_sql(at, True, before, earlier, self.next), earlier.values)
        rest = await self.tx.fetch(window_sql(at, False, after, later, self.next), later.values)
        return [turn_from_row(r) for r in reversed(first)] + [turn_from_row(r) for r in rest]

    async def store(self, turn: Turn, context: str | None, search_embedding: bytes | None) -> None:
        p = self.tx.params()
        own = turn.embedding or b""
        if self.next:
            columns: dict[str, Any] = self.tx.next_search_columns(search_embedding, own)
        else:
            columns = {"context": context, **self.tx.search_columns(search_embedding, own)}
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
