"""The SQLite backend: the Writer actor that owns the only write connection (WAL,
group commit), a pool of read-only connections, and the queries behind every read.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from gm.actor import Envelope
from gm.config import DEFAULT_WRITE_TIMEOUT_SECONDS
from gm.context import (
    CONTEXT_WEIGHT,
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
from gm.errors import GMError, InvalidInput, StorageUnavailable
from gm.filters import Filter, to_sqlite
from gm.memory import HistoryEntry, Memory, Page, Scope, TimeRange
from gm.migrator import Migrator
from gm.storage import sqlite_migrations
from gm.storage.base import (
    AddMemories,
    Backend,
    BatchWriter,
    BuildContext,
    CheckWrites,
    DeleteMemory,
    DeleteWhere,
    IndexChange,
    PurgeExpired,
    RecordModel,
    UpdateMemory,
    VectorRow,
    WriteOp,
    WriteResult,
    added_times,
    final_changes,
    id_conflict,
    live_by_id,
    model_mismatch,
    unknown_id,
    updated,
)
from gm.storage.sqlite_files import DatabaseLock

log = logging.getLogger(__name__)

CONTEXT_VERSION = 3  # the schema version with occurred_at, context and search_embedding (both backends)
# A row written by a release before event times has no occurred_at: it occurred when it was created.
OCCURRED = "coalesce(occurred_at, created_at)"
_BASE = "rowid, id, namespace, user_id, agent_id, session_id, text, metadata, created_at, updated_at, expires_at"
COLUMNS = f"{_BASE}, {OCCURRED}"
LEGACY_COLUMNS = f"{_BASE}, created_at"  # a database capped below CONTEXT_VERSION (tests stand in for old releases)


def search_vector(context: bool, prefix: str = "") -> str:
    """The vector the index searches for a row: its search embedding (gm.context) if it has one."""
    return f"coalesce({prefix}search_embedding, {prefix}embedding)" if context else f"{prefix}embedding"


def columns_for(version: int) -> str:
    """The memory columns a query reads on a schema at ``version``."""
    return COLUMNS if version >= CONTEXT_VERSION else LEGACY_COLUMNS


def event_time_sql(version: int, prefix: str = "") -> str:
    """A memory's event time in SQL on a schema at ``version``: ``OCCURRED`` (the expression
    the indexes memories_by_occurrence and memories_by_session_order hold); before event
    times existed, every memory occurred when it was created."""
    if version >= CONTEXT_VERSION:
        return f"coalesce({prefix}occurred_at, {prefix}created_at)"
    return f"{prefix}created_at"


LIVE = "(expires_at IS NULL OR expires_at > ?)"
READERS = 4
# Reads map the file instead of copying pages through SQLite's own 2 MB page cache: a keyword
# search at 10k memories joins a few thousand FTS matches to their rows, and those page reads
# dominated it (measured: 9.3 -> 2.9 ms p50). The mapping is the OS page cache, shared by all
# connections and given back under memory pressure, not memory of the process's own.
MMAP_BYTES = 256 << 20  # (a larger file is mapped up to this much, read as before beyond it)


def memory_from_row(row: Any) -> Memory:
    return Memory(
        id=row[1],
        namespace=row[2],
        user_id=row[3],
        agent_id=row[4],
        session_id=row[5],
        text=row[6],
        metadata=orjson.loads(row[7]),
        created_at=row[8],
        updated_at=row[9],
        expires_at=row[10],
        occurred_at=row[11],
    )


def page_from_rows(rows: list[Any], limit: int, order_by: str = "created_at") -> Page:
    """A list query's rows (``COLUMNS``, up to ``limit + 1`` of them) as a page and its cursor."""
    memories = [memory_from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(memories, encode_cursor(memories[-1], rows[limit - 1][0], order_by) if more else None)


def history_from_row(row: Any) -> HistoryEntry:
    """A row of (op, at, text, metadata, namespace) from ``history``."""
    return HistoryEntry(row[0], row[1], row[2], orjson.loads(row[3]) if row[3] is not None else None, row[4])


def vector_row(row: Any) -> VectorRow:
    """A row of (rowid, namespace, user_id, agent_id, session_id, expires_at, embedding)."""
    return VectorRow(row[0], Scope(row[1], row[2], row[3], row[4]), row[5], row[6])


def scope_sql(
    scope: Scope, filter: Filter | None, now: int, prefix: str = "",
    time_range: TimeRange | None = None, version: int = CONTEXT_VERSION,
) -> tuple[str, list[Any]]:
    """A WHERE clause for live memories in ``scope`` matching ``filter`` whose event time
    lies in ``time_range`` (on a schema at ``version``)."""
    clauses = [f"{prefix}namespace = ?", f"({prefix}expires_at IS NULL OR {prefix}expires_at > ?)"]
    params: list[Any] = [scope.namespace, now]
    for column in ("user_id", "agent_id", "session_id"):
        value = getattr(scope, column)
        if value is not None:
            clauses.append(f"{prefix}{column} = ?")
            params.append(value)
    if filter is not None:
        sql, filter_params = to_sqlite(filter, f"{prefix}metadata")
        clauses.append(sql)
        params.extend(filter_params)
    if time_range is not None:
        marks = Marks()
        clauses.extend(time_range_sql(time_range, event_time_sql(version, prefix), marks))
        params.extend(marks.values)
    return " AND ".join(clauses), params


def time_range_sql(time_range: TimeRange, event_time: str, param: Callable[[Any], str]) -> list[str]:
    """The clauses for ``event_time`` in ``time_range``: from ``after`` (inclusive) up to
    ``before`` (exclusive), each value passed through ``param`` (both backends)."""
    clauses = []
    if time_range.after is not None:
        clauses.append(f"{event_time} >= {param(time_range.after)}")
    if time_range.before is not None:
        clauses.append(f"{event_time} < {param(time_range.before)}")
    return clauses


class Marks:
    """Collects query parameters for ``?`` placeholders (what PgParams is for ``$n``)."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return "?"


# A cursor is the last memory's sort key and rowid, in ASCII digits (int() takes "+5", "١٢"); one
# of a list ordered by occurred_at starts with "o", so it cannot be taken for the other order's.
CURSOR_PATTERN = r"o?[0-9]{1,18}\.[0-9]{1,18}"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
_CURSOR_PREFIX = {"created_at": "", "occurred_at": "o"}


def encode_cursor(memory: Memory, rowid: int, order_by: str = "created_at") -> str:
    key = memory.occurred_at if order_by == "occurred_at" else memory.created_at
    return f"{_CURSOR_PREFIX[order_by]}{key}.{rowid}"


def decode_cursor(cursor: str, order_by: str = "created_at") -> tuple[int, int]:
    """A cursor's sort key and rowid; refused if it was not given out for a list in ``order_by``."""
    if not _CURSOR_RE.fullmatch(cursor):
        raise InvalidInput("cursor is not one this server gave out; start again without it", path="cursor")
    given = "occurred_at" if cursor.startswith("o") else "created_at"
    if given != order_by:
        raise InvalidInput(
            f"cursor belongs to a list ordered by {given}, not {order_by}; pass order_by={given} with it, "
            "or start again without it", path="cursor")
    key, rowid = cursor.removeprefix("o").split(".")
    return int(key), int(rowid)


# SQLITE_ERROR, TOOBIG, CONSTRAINT, MISMATCH, RANGE: the statement was wrong, not the database.
_STATEMENT_ERRORS = frozenset({1, 18, 19, 20, 25})
# ...except that SQLITE_ERROR also says a table or column is missing: the schema is damaged
# (someone dropped a table), and the database cannot serve until it is restored.
_SCHEMA_MISSING = ("no such table", "no such column")


def _statement_error(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _STATEMENT_ERRORS and not str(exc).startswith(_SCHEMA_MISSING)


class Writer(BatchWriter):
    """Owns the database's only write connection. Drains its mailbox into one
    transaction (group commit; each message in its own savepoint so one failure does not
    spoil the others), commits, lets the index follow, then replies: a reply is durable."""

    name = "writer"

    def __init__(
        self, conn: aiosqlite.Connection, on_commit: Callable[[list[IndexChange]], Awaitable[None]], version: int
    ) -> None:
        super().__init__()
        self.conn = conn
        self.on_commit = on_commit
        self.version = version
        self.context = version >= CONTEXT_VERSION  # the schema has event time and session context
        self.columns = columns_for(version)

    async def handle(self, batch: list[Envelope[WriteOp, object]]) -> None:
        outcomes: list[WriteResult | BaseException] = []
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            self.next_stamp()  # the write lock is held from here to COMMIT: stamps follow commit order
            for envelope in batch:
                await self.conn.execute("SAVEPOINT op")
                try:
                    outcomes.append(await self.apply(envelope.msg))
                    await self.conn.execute("RELEASE op")
                except Exception as exc:
                    if isinstance(exc, sqlite3.Error) and not _statement_error(exc):
                        raise  # the database itself failed (disk, I/O, lock): the whole batch fails below
                    # A rejected write, or one SQLite cannot hold or run (an integer past 64 bits, an
                    # expression too deep): only it fails; the others in the batch still commit.
                    await self.conn.execute("ROLLBACK TO op")
                    await self.conn.execute("RELEASE op")
                    refused = exc if isinstance(exc, GMError) else InvalidInput(f"the database refused it: {exc}")
                    outcomes.append(refused)
            await self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                await self.conn.execute("ROLLBACK")
            error = StorageUnavailable(f"the database refused the write: {exc}")
            self.health.failed(error)
            for envelope in batch:
                envelope.fail(error)
            return
        self.health.committed()
        changes = final_changes([c for o in outcomes if isinstance(o, WriteResult) for c in o.changes])
        if changes:
            await self.on_commit(changes)
        for envelope, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, WriteResult):
                envelope.answer(outcome.value)
            else:
                envelope.fail(outcome)

    async def on_stop(self) -> None:
        await self.conn.close()

    async def apply(self, op: WriteOp) -> WriteResult:
        if isinstance(op, AddMemories):
            return await self._add(op)
        if isinstance(op, UpdateMemory):
            return await self._update(op)
        if isinstance(op, DeleteMemory):
            by_id = Marks()
            where = live_by_id(op.id, op.now, op.namespace, by_id)
            return await self._delete_where(where, by_id.values, missing=op.id)
        if isinstance(op, DeleteWhere):
            where, params = scope_sql(op.scope, op.filter, op.now)
            return await self._delete_where(where, params)
        if isinstance(op, PurgeExpired):
            return await self._delete_where("expires_at <= ?", [op.now])
        if isinstance(op, RecordModel):
            return await self._record_model(op)
        if isinstance(op, BuildContext):
            return await self._build_context(op)
        if isinstance(op, CheckWrites):
            await self.conn.execute(
                "INSERT INTO meta (key, value) VALUES ('write_check', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [str(op.now)],
            )
            return WriteResult(None)
        raise TypeError(f"unknown write {op!r}")

    async def _fetch(self, sql: str, params: list[Any]) -> list[Any]:
        return list(await self.conn.execute_fetchall(sql, params))

    async def _history(self, op: str, rows: list[tuple[str, str, int, str, str]]) -> None:
        """Record ``op`` for each (memory id, namespace, time, text, metadata JSON)."""
        if rows:
            await self.conn.executemany(
                "INSERT INTO history (memory_id, namespace, op, at, text, metadata) VALUES (?, ?, ?, ?, ?, ?)",
                [(memory_id, namespace, op, at, text, meta) for memory_id, namespace, at, text, meta in rows],
            )

    async def _build_context(self, op: BuildContext) -> WriteResult:
        if not self.context:
            return WriteResult(0)
        count, changes = await build_missing(SQLiteSessionRows(self), op.limit)
        return WriteResult(count, changes)

    async def _refresh(self, moved: list[Position]) -> list[IndexChange]:
        """Session context follows the write (see gm.context)."""
        return await refresh(SQLiteSessionRows(self), moved) if self.context and moved else []

    async def _add(self, op: AddMemories) -> WriteResult:
        out: list[tuple[Memory, bool]] = []
        changes: list[IndexChange] = []
        moved: list[Position] = []
        for item in op.items:
            if item.client_id:  # an expired memory frees its id: purge it as purge_expired would (history, index)
                purged = await self._delete_where("id = ? AND expires_at <= ?", [item.id, op.now])
                changes.extend(purged.changes)
            meta = orjson.dumps(item.metadata).decode()
            s = item.scope
            created, updated, expires_at, occurred = added_times(item, self.stamp)
            event = ", occurred_at, context" if self.context else ""
            rows = await self._fetch(
                "INSERT INTO memories (id, namespace, user_id, agent_id, session_id, text, metadata, "
                f"created_at, updated_at, expires_at, embedding{event}) "
                f"VALUES (?,?,?,?,?,?,?,?,?,?,?{',?,?' if event else ''}) ON CONFLICT (id) DO NOTHING RETURNING rowid",
                [item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text, meta,
                 created, updated, expires_at, item.vector, *([occurred, date_words(occurred)] if event else [])],
            )
            if not rows:
                existing = await self._fetch(f"SELECT {self.columns} FROM memories WHERE id = ?", [item.id])
                memory = memory_from_row(existing[0])
                if not item.same_content(memory):
                    raise id_conflict(item.id)
                out.append((memory, False))
                continue
            rowid = rows[0][0]
            await self._history("add", [(item.id, s.namespace, created, item.text, meta)])
            memory = Memory(item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text,
                            item.metadata, created, updated, expires_at, occurred)
            out.append((memory, True))
            changes.append(IndexChange(rowid, vector=item.vector, scope=s, expires_at=expires_at))
            if s.session_id is not None:
                moved.append(Position(s.namespace, s.session_id, occurred, rowid))
        return WriteResult(out, changes + await self._refresh(moved))

    async def _update(self, op: UpdateMemory) -> WriteResult:
        by_id = Marks()
        where = live_by_id(op.id, op.now, op.namespace, by_id)
        rows = await self._fetch(f"SELECT {self.columns} FROM memories WHERE {where}", by_id.values)
        if not rows:
            raise unknown_id(op.id)
        rowid, old = rows[0][0], memory_from_row(rows[0])
        memory = updated(old, op, self.stamp)
        meta = orjson.dumps(memory.metadata).decode()
        assignments = "text = ?, metadata = ?, expires_at = ?, updated_at = ?"
        params: list[Any] = [memory.text, meta, memory.expires_at, memory.updated_at]
        if self.context:
            assignments += ", occurred_at = ?"
            params.append(memory.occurred_at)
            if old.session_id is None:  # alone, its context is its date
                assignments += ", context = ?"
                params.append(date_words(memory.occurred_at))
        if op.vector is not None:
            assignments += ", embedding = ?"
            params.append(op.vector)
        await self.conn.execute(f"UPDATE memories SET {assignments} WHERE rowid = ?", [*params, rowid])
        await self._history("update", [(op.id, old.namespace, self.stamp, memory.text, meta)])
        scope = Scope(old.namespace, old.user_id, old.agent_id, old.session_id)
        changes = [IndexChange(rowid, vector=op.vector, scope=scope, expires_at=memory.expires_at)]
        return WriteResult(memory, changes + await self._refresh(context_moves(old, memory, rowid)))

    async def _delete_where(self, where: str, params: list[Any], missing: str | None = None) -> WriteResult:
        rows = await self._fetch(
            f"DELETE FROM memories WHERE {where} RETURNING rowid, id, text, metadata, namespace, session_id, "
            f"{event_time_sql(self.version)}",
            params,
        )
        if missing is not None and not rows:
            raise unknown_id(missing)
        await self._history("delete", [(r[1], r[4], self.stamp, r[2], r[3]) for r in rows])
        removed = [IndexChange(r[0], remove=True) for r in rows]
        return WriteResult(len(rows), removed + await self._refresh(deleted_positions(rows)))

    async def _record_model(self, op: RecordModel) -> WriteResult:
        rows = await self._fetch("SELECT value FROM meta WHERE key = 'model'", [])
        if rows and rows[0][0] != op.identity:
            if await self._fetch("SELECT 1 FROM memories LIMIT 1", []):
                raise model_mismatch(rows[0][0], op.identity)
        await self.conn.execute(
            "INSERT INTO meta (key, value) VALUES ('model', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [op.identity],
        )
        return WriteResult(op.identity)


class SQLiteSessionRows(SessionRows):
    """The Writer's transaction as gm.context sees it."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer

    async def around(self, at: Position, before: int, after: int) -> list[Turn]:
        marks, later = Marks(), Marks()
        earlier = await self.writer._fetch(window_sql(at, True, before, marks), marks.values)
        rest = await self.writer._fetch(window_sql(at, False, after, later), later.values)
        return [turn_from_row(r) for r in reversed(earlier)] + [turn_from_row(r) for r in rest]

    async def store(self, turn: Turn, context: str, search_embedding: bytes | None) -> None:
        await self.writer.conn.execute(
            "UPDATE memories SET context = ?, search_embedding = ? WHERE rowid = ?",
            [context, search_embedding, turn.rowid],
        )

    async def missing(self, limit: int) -> list[tuple[int, str, str | None, int]]:
        return [tuple(r) for r in await self.writer._fetch(MISSING_SQL.format(limit="?"), [limit])]

    async def store_alone(self, contexts: list[tuple[int, str]]) -> None:
        await self.writer.conn.executemany(
            "UPDATE memories SET context = ? WHERE rowid = ?", [(context, rowid) for rowid, context in contexts]
        )


class SQLiteBackend(Backend):
    """A SQLite file in WAL mode: one Writer, ``READERS`` read-only connections."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        steps: tuple[sqlite_migrations.Step, ...] = sqlite_migrations.STEPS,
        target_version: int | None = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.steps = steps
        self.target_version = target_version
        self.write_timeout = write_timeout
        self.schema_version = 0
        self.columns = LEGACY_COLUMNS
        self.context = False
        self.migrator = Migrator(self._migrate)
        self.writer: Writer | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []
        self._lock = DatabaseLock(self.path)

    @property
    def phase(self) -> str:  # type: ignore[override]
        return self.migrator.phase

    async def _migrate(self, on_phase: Callable[[str], None]) -> int:
        return await asyncio.to_thread(
            sqlite_migrations.migrate, self.path, self.steps, self.target_version, on_phase
        )

    async def open(
        self, on_commit: Callable[[list[IndexChange]], Awaitable[None]], on_reset: Callable[[], None] | None = None
    ) -> None:
        sqlite_migrations.check_path(self.path)
        self._lock.acquire()
        self.schema_version = await self.migrator.run()
        self.columns = columns_for(self.schema_version)
        self.context = self.schema_version >= CONTEXT_VERSION
        try:
            conn = await aiosqlite.connect(self.path, isolation_level=None)
            pragmas = ("journal_mode = WAL", "synchronous = FULL", "busy_timeout = 10000", f"mmap_size = {MMAP_BYTES}")
            for pragma in pragmas:
                await conn.execute(f"PRAGMA {pragma}")
            uri = f"file:{self.path.resolve()}?mode=ro"
            for _ in range(READERS):
                reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
                await reader.execute("PRAGMA busy_timeout = 10000")
                await reader.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
                self._all_readers.append(reader)
                self._readers.put_nowait(reader)
        except sqlite3.Error as exc:
            raise sqlite_migrations.storage_error(exc, self.path) from None
        self.writer = Writer(conn, on_commit, self.schema_version)
        self.writer.start()

    async def close(self) -> None:
        await self.migrator.stop()
        # Readers first: the writer's connection must be the last one to close, so SQLite
        # checkpoints the WAL into the database file (a read-only connection cannot).
        for reader in self._all_readers:
            await reader.close()
        self._all_readers.clear()
        if self.writer is not None:
            await self.writer.stop()
        self._lock.release()

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    async def _fetch(self, sql: str, params: list[Any]) -> list[Any]:
        async with self._reader() as conn:
            try:
                return list(await conn.execute_fetchall(sql, params))
            except sqlite3.Error as exc:
                if _statement_error(exc):  # as on Postgres: a value the query could not take is the caller's
                    raise InvalidInput(f"the database refused the query: {exc}") from None
                raise StorageUnavailable(f"reading {self.path} failed: {exc}") from None

    async def get(self, memory_id: str, now: int, namespace: str | None = None) -> Memory | None:
        params = Marks()
        where = live_by_id(memory_id, now, namespace, params)
        rows = await self._fetch(f"SELECT {self.columns} FROM memories WHERE {where}", params.values)
        return memory_from_row(rows[0]) if rows else None

    async def get_by_ids(self, ids: builtins.list[str], now: int) -> dict[str, Memory]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self._fetch(f"SELECT {self.columns} FROM memories WHERE id IN ({marks}) AND {LIVE}", [*ids, now])
        return {row[1]: memory_from_row(row) for row in rows}

    async def get_many(self, rowids: list[int], now: int) -> dict[int, Memory]:
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = await self._fetch(
            f"SELECT {self.columns} FROM memories WHERE rowid IN ({marks}) AND {LIVE}", [*rowids, now]
        )
        return {row[0]: memory_from_row(row) for row in rows}

    async def list(
        self, scope: Scope, filter: Filter | None, limit: int, cursor: str | None, now: int,
        *, order_by: str = "created_at", time_range: TimeRange | None = None,
    ) -> Page:
        where, params = scope_sql(scope, filter, now, time_range=time_range, version=self.schema_version)
        key = event_time_sql(self.schema_version) if order_by == "occurred_at" else "created_at"
        if cursor is not None:
            last, rowid = decode_cursor(cursor, order_by)
            where += f" AND ({key} < ? OR ({key} = ? AND rowid < ?))"
            params += [last, last, rowid]
        rows = await self._fetch(
            f"SELECT {self.columns} FROM memories WHERE {where} ORDER BY {key} DESC, rowid DESC LIMIT ?",
            [*params, limit + 1],
        )
        return page_from_rows(rows, limit, order_by)

    async def history(self, memory_id: str, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        in_namespace = "" if namespace is None else " AND namespace = ?"
        rows = await self._fetch(
            f"SELECT op, at, text, metadata, namespace FROM history WHERE memory_id = ?{in_namespace} ORDER BY seq",
            [memory_id] if namespace is None else [memory_id, namespace],
        )
        return [history_from_row(r) for r in rows]

    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]:
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        where, params = scope_sql(scope, filter, now, "m.", time_range, self.schema_version)
        # The context column counts CONTEXT_WEIGHT of the text's own words (gm.context).
        table, rank = ("memories_search", f"bm25(memories_search, 1.0, {CONTEXT_WEIGHT})") if self.context else (
            "memories_fts", "bm25(memories_fts)")
        rows = await self._fetch(
            f"SELECT m.rowid, {rank} AS rank FROM {table} "
            f"JOIN memories m ON m.rowid = {table}.rowid "
            f"WHERE {table} MATCH ? AND {where} ORDER BY rank LIMIT ?",
            [match, *params, limit],
        )
        return [(r[0], -float(r[1])) for r in rows]

    async def matching_rowids(
        self, scope: Scope, filter: Filter | None, now: int, *, time_range: TimeRange | None = None
    ) -> builtins.list[int]:
        where, params = scope_sql(scope, filter, now, time_range=time_range, version=self.schema_version)
        return [r[0] for r in await self._fetch(f"SELECT rowid FROM memories WHERE {where}", params)]

    async def vectors(self) -> AsyncIterator[builtins.list[VectorRow]]:
        last = 0
        while True:
            rows = await self._fetch(
                f"SELECT rowid, namespace, user_id, agent_id, session_id, expires_at, {search_vector(self.context)} "
                "FROM memories WHERE rowid > ? ORDER BY rowid LIMIT 20000",
                [last],
            )
            if not rows:
                return
            yield [vector_row(r) for r in rows]
            last = rows[-1][0]

    async def without_context(self) -> int:
        if not self.context:
            return 0
        rows = await self._fetch("SELECT count(*) FROM memories WHERE context IS NULL", [])
        return int(rows[0][0])

    async def counts(self, now: int) -> dict[str, int]:
        rows = await self._fetch(
            f"SELECT namespace, count(*) FROM memories WHERE {LIVE} GROUP BY namespace ORDER BY namespace", [now]
        )
        return {r[0]: r[1] for r in rows}

    def size_bytes(self) -> int | None:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total
