"""The read queries, written once over a dialect: a backend, and a read-only snapshot of a
whole database (``gmem status``, export), supply ``fetch`` and their placeholders.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import AsyncIterator
from typing import Any

from gm.filters import Filter
from gm.memory import HistoryEntry, Memory, Page, Scope, TimeRange
from gm.storage.ops import VectorRow
from gm.storage.sql import (
    CONTEXT_VERSION,
    EXPIRES_COLUMN,
    LEGACY_COLUMNS,
    VECTOR_COLUMNS,
    Params,
    columns_for,
    decode_cursor,
    event_time_sql,
    history_from_row,
    live,
    live_by_id,
    memory_from_row,
    page_from_rows,
    scope_sql,
    search_vector,
    vector_row,
)

VECTOR_PAGE = 20_000  # rows a load of the vector index reads at a time


class Reads(abc.ABC):
    """Reads of the ``memories``, ``history`` and ``meta`` tables on a schema at
    ``schema_version``; subclasses say how a query runs and which placeholders it takes."""

    schema_version = 0
    columns = LEGACY_COLUMNS  # (set once the schema version is known: see ``schema_read``)
    context = False  # the schema holds event time and session context (v3 on)

    @abc.abstractmethod
    def params(self) -> Params:
        """A new query's placeholders in this database's dialect."""

    @abc.abstractmethod
    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        """Run one read; failures are StorageUnavailable (or InvalidInput for a value refused)."""

    def schema_read(self, version: int) -> None:
        """Read as a schema at ``version`` holds its memories."""
        self.schema_version = version
        self.columns = columns_for(version)
        self.context = version >= CONTEXT_VERSION

    async def get(self, memory_id: str, now: int, namespace: str | None = None) -> Memory | None:
        """The live memory ``memory_id`` (only if it lies in ``namespace``, when given)."""
        p = self.params()
        rows = await self.fetch(
            f"SELECT {self.columns} FROM memories WHERE {live_by_id(memory_id, now, namespace, p)}", p.values
        )
        return memory_from_row(rows[0]) if rows else None

    async def get_by_ids(self, ids: builtins.list[str], now: int) -> dict[str, Memory]:
        """The live memories among ``ids``, by id."""
        return {row[1]: memory_from_row(row) for row in await self._live_among("id", ids, "text", now)}

    async def get_many(self, rowids: builtins.list[int], now: int) -> dict[int, Memory]:
        """The live memories among ``rowids``, by rowid."""
        return {row[0]: memory_from_row(row) for row in await self._live_among("rowid", rowids, "bigint", now)}

    async def _live_among(self, column: str, values: builtins.list[Any], kind: str, now: int) -> builtins.list[Any]:
        if not values:
            return []
        p = self.params()
        where = f"{p.one_of(column, values, kind)} AND {live(p, now)}"
        return await self.fetch(f"SELECT {self.columns} FROM memories WHERE {where}", p.values)

    async def list(
        self, scope: Scope, filter: Filter | None, limit: int, cursor: str | None, now: int,
        *, order_by: str = "created_at", time_range: TimeRange | None = None,
    ) -> Page:
        """A page of live memories, newest first by ``order_by`` (created_at or occurred_at),
        those in ``time_range`` only (when given); ``cursor`` must come from the same order."""
        p = self.params()
        where = scope_sql(scope, filter, now, p, time_range=time_range, version=self.schema_version)
        key = event_time_sql(self.schema_version) if order_by == "occurred_at" else "created_at"
        if cursor is not None:
            last, rowid = decode_cursor(cursor, order_by)
            where += f" AND {p.before(key, last, rowid)}"
        rows = await self.fetch(
            f"SELECT {self.columns} FROM memories WHERE {where} ORDER BY {key} DESC, rowid DESC LIMIT {p(limit + 1)}",
            p.values,
        )
        return page_from_rows(rows, limit, order_by)

    async def history(self, memory_id: str, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        """The changes of ``memory_id`` in commit order (only those in ``namespace``, when given:
        an id freed by a delete may have been taken in another namespace since)."""
        p = self.params()
        where = f"memory_id = {p(memory_id)}" + ("" if namespace is None else f" AND namespace = {p(namespace)}")
        rows = await self.fetch(
            f"SELECT op, at, text, metadata, namespace FROM history WHERE {where} ORDER BY seq", p.values
        )
        return [history_from_row(r) for r in rows]

    async def matching_rowids(
        self, scope: Scope, filter: Filter | None, now: int, *, time_range: TimeRange | None = None
    ) -> builtins.list[int]:
        """The rowids of the live memories in ``scope`` matching ``filter`` and ``time_range``
        (what the in-process vector index is restricted to)."""
        p = self.params()
        where = scope_sql(scope, filter, now, p, time_range=time_range, version=self.schema_version)
        return [r[0] for r in await self.fetch(f"SELECT rowid FROM memories WHERE {where}", p.values)]

    async def vectors(self) -> AsyncIterator[builtins.list[VectorRow]]:
        """Every memory's searched vector, in pages (what the in-process index loads)."""
        async for rows in self._vectors(search_vector(self.context), ""):
            yield rows

    async def next_vectors(self) -> AsyncIterator[builtins.list[VectorRow]]:
        """The next model's searched vector of every memory that has one (a re-embed under
        way, gm.reembed), in pages."""
        async for rows in self._vectors("coalesce(search_embedding_next, embedding_next)",
                                        " AND embedding_next IS NOT NULL"):
            yield rows

    async def _vectors(self, vector: str, where: str) -> AsyncIterator[builtins.list[VectorRow]]:
        last = 0
        while True:
            p = self.params()
            rows = await self.fetch(
                f"SELECT {VECTOR_COLUMNS}, {vector} FROM memories "
                f"WHERE rowid > {p(last)}{where} ORDER BY rowid LIMIT {VECTOR_PAGE}",
                p.values,
            )
            if not rows:
                return
            yield [vector_row(r) for r in rows]
            last = rows[-1][0]

    async def vector_bytes(self) -> int | None:
        """The size of a stored vector (None: none is stored yet)."""
        rows = await self.fetch("SELECT length(embedding) FROM memories WHERE embedding IS NOT NULL LIMIT 1", [])
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def searched_vectors(self, rowids: builtins.list[int]) -> tuple[str | None, dict[int, bytes]]:
        """The searched vector of each of ``rowids`` still stored, and the identity of the model
        that made them, read together (a re-embed's switch may come between two reads)."""
        if not rowids:
            return None, {}
        p = self.params()
        rows = await self.fetch(
            f"SELECT rowid, {search_vector(self.context)}, (SELECT value FROM meta WHERE key = 'model_identity') "
            f"FROM memories WHERE {p.one_of('rowid', rowids, 'bigint')}",
            p.values,
        )
        return (rows[0][2] if rows else None), {r[0]: bytes(r[1]) for r in rows}

    async def searched_rows(
        self, rowids: builtins.list[int], now: int,
    ) -> tuple[str | None, dict[int, tuple[bytes, Any]]]:
        """:meth:`searched_vectors` of those of ``rowids`` live at ``now``, each with its row of
        the memory columns (for :func:`memory_from_row`): a vector search rescores its candidates
        and reads the memories of its page in one statement."""
        if not rowids:
            return None, {}
        p = self.params()
        rows = await self.fetch(
            f"SELECT {self.columns}, {search_vector(self.context)}, "
            f"(SELECT value FROM meta WHERE key = 'model_identity') "
            f"FROM memories WHERE {p.one_of('rowid', rowids, 'bigint')}",
            p.values,
        )
        # (expired ones are left out here, not in the query: their identity still tells a switch)
        width = len(rows[0]) - 2 if rows else 0  # (the memory columns, then the vector and the identity)
        live_rows = {r[0]: (bytes(r[width]), r) for r in rows if r[EXPIRES_COLUMN] is None or r[EXPIRES_COLUMN] > now}
        return (rows[0][width + 1] if rows else None), live_rows

    async def counts(self, now: int) -> dict[str, int]:
        """Live memories per namespace."""
        p = self.params()
        rows = await self.fetch(
            f"SELECT namespace, count(*) FROM memories WHERE {live(p, now)} GROUP BY namespace ORDER BY namespace",
            p.values,
        )
        return {r[0]: r[1] for r in rows}

    async def live_total(self, now: int) -> int:
        """Live memories in all: every row less the expired ones not purged yet. Two index
        scans, where :meth:`counts` reads every row's expiry from the table: at 300k memories
        8-48 vs 520-780 ms on SQLite, 33 vs 200-310 ms on Postgres (what /metrics counts)."""
        p = self.params()
        rows = await self.fetch(
            f"SELECT (SELECT count(*) FROM memories) - (SELECT count(*) FROM memories WHERE expires_at <= {p(now)})",
            p.values,
        )
        return int(rows[0][0])

    async def missing_next(self, after: int, limit: int) -> builtins.list[tuple[int, str, bytes]]:
        """Up to ``limit`` memories past rowid ``after`` the next model has not embedded yet
        (a re-embed under way): (rowid, text, current own embedding), in rowid order."""
        p = self.params()
        rows = await self.fetch(
            f"SELECT rowid, text, embedding FROM memories WHERE embedding_next IS NULL AND rowid > {p(after)} "
            f"ORDER BY rowid LIMIT {p(limit)}",
            p.values,
        )
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    async def next_progress(self) -> tuple[int, int]:
        """A re-embed's progress: how many memories have the next model's vector, of how many."""
        rows = await self.fetch("SELECT count(embedding_next), count(*) FROM memories", [])
        return int(rows[0][0]), int(rows[0][1])

    async def meta_value(self, key: str) -> str | None:
        p = self.params()
        rows = await self.fetch(f"SELECT value FROM meta WHERE key = {p(key)}", p.values)
        return str(rows[0][0]) if rows else None

    async def without_context(self) -> int:
        """How many memories still wait for their session context to be built."""
        if not self.context:
            return 0
        rows = await self.fetch("SELECT count(*) FROM memories WHERE context IS NULL", [])
        return int(rows[0][0])
