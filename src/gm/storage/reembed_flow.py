"""The write side of a re-embed (gm.reembed), for both backends: the next model's columns
beside the current ones, filled row by row, made current by renaming them in one transaction.

While a re-embed runs, ``memories`` has ``embedding_next`` and ``search_embedding_next``
(and pgvector's ``vec_next``), and ``meta.reembed`` names the model they hold. A memory
whose ``embedding_next`` is NULL still needs the next model's vector: that is all the state
a resume needs, and a write that changes a text without the next vector clears it. The
switch renames the current columns to ``*_old`` and the next ones to the current names, so
every query keeps its columns and the switch costs no copy; the old vectors stay until
``EndReembed(drop_old=True)``, a later step (the additive rule).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from gm.context import ORDER_KEY, Position
from gm.errors import ReembedInProgress
from gm.memory import Scope
from gm.storage.ops import (
    BeginReembed,
    EndReembed,
    IndexChange,
    ReembedInfo,
    StoreNextVectors,
    SwitchVectors,
    WriteResult,
)

if TYPE_CHECKING:
    from gm.storage.write_flow import WriteFlow

CURRENT = ("embedding", "search_embedding")
NEXT = ("embedding_next", "search_embedding_next")
OLD = ("embedding_old", "search_embedding_old")
MISSING_INDEX = "memories_without_next"  # the rows the next model has not embedded yet


def not_running(identity: str) -> ReembedInProgress:
    return ReembedInProgress(
        f"no re-embed to model {identity!r} is under way (it was cancelled, or another one replaced it)"
    )


class ReembedFlow:
    """The re-embed's write operations on one WriteFlow's transaction."""

    def __init__(self, flow: WriteFlow) -> None:
        self.flow = flow
        self.tx = flow.tx

    async def begin(self, op: BeginReembed) -> WriteResult:
        info = await self.flow.reembed()
        if info is not None:
            if info.identity != op.identity:
                raise ReembedInProgress(
                    f"a re-embed to model {info.label or info.identity!r} is under way; let it finish, or cancel it "
                    "with `gmem reembed --cancel` before starting another"
                )
            return WriteResult(info)  # resumed
        columns = await self.tx.memory_columns()
        if OLD[0] in columns:
            await self.drop(OLD)  # the vectors the last switch left: a new re-embed replaces them
            await self.tx.execute("DELETE FROM meta WHERE key = 'old_vectors'", [])
            self.flow.known_old = False
        if NEXT[0] in columns:
            await self.drop(NEXT)  # (left by a re-embed whose record is gone: start afresh)
        blob = self.tx.blob_type
        for column in NEXT:
            await self.tx.execute(f"ALTER TABLE memories ADD COLUMN {column} {blob}", [])
        await self.tx.execute(f"CREATE INDEX {MISSING_INDEX} ON memories (rowid) WHERE {NEXT[0]} IS NULL", [])
        await self.tx.next_columns_added(op.dimensions)
        info = ReembedInfo(op.identity, op.label, op.model_dir, op.dimensions, op.copy, int(time.time() * 1000))
        await self.flow.set_meta("reembed", info.to_json())
        self.flow.known_reembed = info
        return WriteResult(info)

    async def store(self, op: StoreNextVectors) -> WriteResult:
        """Each row's next vector, if its text is unchanged; then the next search vectors of
        its session neighbours (gm.context) follow."""
        info = await self.flow.reembed()
        if info is None or info.identity != op.identity:
            raise not_running(op.identity)
        changes: list[IndexChange] = []
        moved: list[Position] = []
        for rowid, text, vector in op.rows:
            if not vector:
                raise ValueError(f"an empty next vector for row {rowid}")  # (a bug: the sweep has a vector for each)
            p = self.tx.params()
            columns = self.tx.next_vector_columns(vector)
            assignments = ", ".join(f"{name} = {p(value)}" for name, value in columns.items())
            rows = await self.tx.fetch(
                f"UPDATE memories SET {assignments} WHERE rowid = {p(rowid)} AND text = {p(text)} "
                f"RETURNING namespace, user_id, agent_id, session_id, expires_at, {ORDER_KEY}",
                p.values,
            )
            if not rows:
                continue  # deleted, or its text changed meanwhile (that write cleared it: embedded again later)
            ns, user, agent, session, expires, at = rows[0]
            changes.append(IndexChange(rowid, vector=vector, scope=Scope(ns, user, agent, session),
                                       expires_at=expires, next=True))
            if session is not None:
                moved.append(Position(ns, session, at, rowid))
        if info.copy and moved:  # a reindex: the keyword context follows this release's windows too, row by row
            return WriteResult(len(changes), changes + await self.flow.refresh(moved))
        return WriteResult(len(changes), changes + await self.flow.refresh_next(moved))

    async def switch(self, op: SwitchVectors) -> WriteResult:
        await self.tx.exclusive()
        info = await self.flow.reembed()
        if info is None or info.identity != op.identity:
            raise not_running(op.identity)
        if await self.tx.fetch(f"SELECT 1 FROM memories WHERE {NEXT[0]} IS NULL LIMIT 1", []):
            return WriteResult(None)  # written meanwhile without the next vector: embed those first
        old_model = await self.flow.current_model()
        await self.tx.execute(f"DROP INDEX {MISSING_INDEX}", [])
        for current, old, new in zip(CURRENT, OLD, NEXT, strict=True):
            await self.tx.execute(f"ALTER TABLE memories RENAME COLUMN {current} TO {old}", [])
            await self.tx.execute(f"ALTER TABLE memories RENAME COLUMN {new} TO {current}", [])
        await self.tx.vectors_switched(info.dimensions)
        generation = int(await self.flow.meta("vectors_generation") or 0) + 1
        await self.flow.set_meta("vectors_generation", str(generation))
        await self.flow.set_meta("old_vectors", orjson.dumps({"model": old_model}).decode())
        self.flow.known_old = True
        await self.flow.switched_model(info.identity, info.label, info.model_dir)
        await self.tx.execute("DELETE FROM meta WHERE key = 'reembed'", [])
        self.flow.known_reembed = None
        return WriteResult(generation)

    async def end(self, op: EndReembed) -> WriteResult:
        columns = await self.tx.memory_columns()
        if op.drop_old:
            if OLD[0] not in columns:
                return WriteResult(False)
            await self.drop(OLD)
            await self.tx.execute("DELETE FROM meta WHERE key = 'old_vectors'", [])
            self.flow.known_old = False
            return WriteResult(True)
        if await self.flow.reembed() is None and NEXT[0] not in columns:
            return WriteResult(False)
        if NEXT[0] in columns:
            await self.drop(NEXT)
        await self.tx.execute("DELETE FROM meta WHERE key = 'reembed'", [])
        self.flow.known_reembed = None
        return WriteResult(True)

    async def drop(self, columns: tuple[str, str]) -> None:
        """Drop a pair of vector columns (and what indexes them)."""
        if columns == NEXT:
            await self.tx.execute(f"DROP INDEX IF EXISTS {MISSING_INDEX}", [])
        await self.tx.vector_columns_dropped(columns[0].removeprefix("embedding"))
        for column in columns:
            await self.tx.execute(f"ALTER TABLE memories DROP COLUMN {column}", [])

