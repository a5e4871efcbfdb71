"""The Postgres backend, for several instances on one database: an asyncpg pool, a
Writer actor with the SQLite Writer's shape (a batch of writes in one transaction, each
in its own savepoint; the reply comes once it is committed), concurrent reads, keyword
search on a ``tsvector`` GIN index, and vector search either by pgvector (HNSW, cosine)
or, where the extension is missing, by the in-process index, which the change feed
(``postgres_feed``) keeps in step with every instance's committed writes.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import numpy as np
import orjson

from gm import loops
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
from gm.errors import GMError, InvalidInput, ModelMismatch, StorageUnavailable
from gm.filters import Filter, PgParams, to_postgres
from gm.memory import HistoryEntry, Memory, Page, Scope, TimeRange
from gm.migrator import Migrator
from gm.search import STOPWORDS
from gm.storage import postgres_migrations
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
    id_conflict,
    live_by_id,
    model_mismatch,
    unknown_id,
    updated,
)
from gm.storage.postgres_feed import CHANNEL, POLL_SECONDS, ChangeFeed
from gm.storage.sqlite import (
    CONTEXT_VERSION,
    LEGACY_COLUMNS,
    columns_for,
    decode_cursor,
    event_time_sql,
    history_from_row,
    memory_from_row,
    page_from_rows,
    search_vector,
    time_range_sql,
    vector_row,
)

log = logging.getLogger(__name__)

FEED_LOCK = 0x676D6368616E67  # "gmchang": writers number their changes under this transaction lock
HNSW_LOCK = 0x676D686E7377  # "gmhnsw": creating the HNSW index once
BACKFILL_LOCK = 0x676D6266  # "gmbf": one instance at a time fills in missing pgvector values
CHANGES_KEPT_MS = 24 * 3600 * 1000  # an instance away longer than this reloads its index
CONNECT_TIMEOUT = 5.0
CHECK_TIMEOUT = 2.0  # readyz's probe of the database
LOCK_TIMEOUT = "5s"  # a write waiting longer for a lock fails (503) rather than hangs
IDLE_IN_TRANSACTION_TIMEOUT = "60s"  # the server ends a writer stalled mid-transaction, freeing its locks
COMMAND_TIMEOUT = 30.0
POOL_SIZE = 8
HNSW_EF_SEARCH = 100
# SQLSTATE classes that mean a value the caller gave was refused, not that the database
# failed: data exceptions, integrity violations, program limits (a filter too complex).
_STATEMENT_CLASSES = ("22", "23", "54")


def redact(url: str) -> str:
    """The URL without its password (in the user part or a ``password`` parameter), for
    messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)], safe="/:*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def scope_sql(
    scope: Scope, filter: Filter | None, now: int, params: PgParams, prefix: str = "",
    time_range: TimeRange | None = None, version: int = CONTEXT_VERSION,
) -> str:
    """A WHERE clause for live memories in ``scope`` matching ``filter`` whose event time
    lies in ``time_range`` (on a schema at ``version``)."""
    clauses = [
        f"{prefix}namespace = {params(scope.namespace)}",
        f"({prefix}expires_at IS NULL OR {prefix}expires_at > {params(now)})",
    ]
    for column in ("user_id", "agent_id", "session_id"):
        value = getattr(scope, column)
        if value is not None:
            clauses.append(f"{prefix}{column} = {params(value)}")
    if filter is not None:
        clauses.append(to_postgres(filter, params, f"{prefix}metadata"))
    if time_range is not None:
        clauses.extend(time_range_sql(time_range, event_time_sql(version, prefix), params))
    return " AND ".join(clauses)


def statement_error(exc: BaseException) -> bool:
    """True if Postgres refused the statement itself (bad value, constraint, limit)."""
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _STATEMENT_CLASSES


def unavailable(exc: BaseException, doing: str) -> StorageUnavailable:
    if _connection_lost(exc):
        return StorageUnavailable(f"{doing} failed: Postgres is unreachable or dropped the connection ({exc})")
    return StorageUnavailable(f"{doing} failed: Postgres refused it ({type(exc).__name__}: {exc})")


# InternalClientError: asyncpg's state after the server ended the connection while it was idle.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)


# -- pgvector's binary format: uint16 dimensions, uint16 unused, big-endian float4s ----


def _encode_vector(raw: bytes) -> bytes:
    values = np.frombuffer(raw, dtype="<f4")
    return len(values).to_bytes(2, "big") + b"\0\0" + values.astype(">f4").tobytes()


def _decode_vector(data: bytes) -> bytes:
    return np.frombuffer(data[4:], dtype=">f4").astype("<f4").tobytes()


class PgWriter(BatchWriter):
    """Drains its mailbox into one transaction on a pooled connection (a savepoint per
    message, so one refused write does not spoil the others), numbers the changed rows in
    the change feed, commits, lets the index follow, then replies: a reply is durable.

    A batch that fails before COMMIT is sent is retried once on a fresh connection (it
    cannot have committed); one that fails during COMMIT is reported as unavailable.
    """

    name = "pg-writer"

    def __init__(self, backend: PostgresBackend) -> None:
        super().__init__()
        self.backend = backend

    async def handle(self, batch: list[Envelope[WriteOp, object]]) -> None:
        for attempt in (1, 2):
            committing = False
            try:
                async with self.backend.acquire("writing", write=True) as conn:
                    transaction = conn.transaction()
                    try:
                        await transaction.start()
                        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                        self.next_stamp()  # this instance's batches commit one after another, in stamp order
                        outcomes, last_seq = await self._apply_all(conn, batch)
                    except BaseException:
                        await _rollback(transaction)
                        raise
                    committing = True
                    await transaction.commit()
                break
            except (StorageUnavailable, *DB_ERRORS) as exc:
                error = exc if isinstance(exc, StorageUnavailable) else unavailable(exc, "committing")
                if attempt == 1 and not committing:
                    log.warning("write batch of %d failed before commit, retrying: %s", len(batch), error.message)
                    continue
                self.health.failed(error)
                for envelope in batch:
                    envelope.fail(error)
                return
        self.health.committed()
        try:
            await self.backend.committed(last_seq)
        except Exception:  # the writes are committed: their callers hear so; the feed's poll catches up
            log.exception("following a commit failed")
        for envelope, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, WriteResult):
                envelope.answer(outcome.value)
            else:
                envelope.fail(outcome)

    async def _apply_all(
        self, conn: asyncpg.Connection, batch: list[Envelope[WriteOp, object]]
    ) -> tuple[list[WriteResult | BaseException], int | None]:
        outcomes: list[WriteResult | BaseException] = []
        try:
            if self.backend.context:
                # Session context reads its neighbours: two instances writing one session at once
                # would each miss the other's uncommitted turn. Batches take the feed lock first
                # (held to commit, and always the first lock, so no deadlock), so each sees the
                # other's committed rows; writes across instances commit one batch at a time.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
            for envelope in batch:
                try:
                    async with conn.transaction():  # a savepoint
                        outcomes.append(await self.apply(conn, envelope.msg))
                except Exception as exc:
                    if isinstance(exc, GMError):
                        outcomes.append(exc)
                    elif statement_error(exc):
                        outcomes.append(InvalidInput(f"the database refused it: {exc}"))
                    else:
                        raise
            rowids = sorted({c.rowid for o in outcomes if isinstance(o, WriteResult) for c in o.changes})
            last_seq = None
            if rowids:
                # Numbered under a lock held to commit, so seq order is commit order across instances.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
                last_seq = await conn.fetchval(
                    "WITH added AS (INSERT INTO changes (rowid, at) SELECT unnest($1::bigint[]), $2 RETURNING seq) "
                    "SELECT max(seq) FROM added",
                    rowids, int(time.time() * 1000),
                )
                await conn.execute(f"NOTIFY {CHANNEL}")
            return outcomes, last_seq
        except DB_ERRORS as exc:
            raise unavailable(exc, "writing") from None

    async def apply(self, conn: asyncpg.Connection, op: WriteOp) -> WriteResult:
        if isinstance(op, AddMemories):
            return await self._add(conn, op)
        if isinstance(op, UpdateMemory):
            return await self._update(conn, op)
        if isinstance(op, DeleteMemory):
            params = PgParams()
            where = live_by_id(op.id, op.now, op.namespace, params)
            return await self._delete_where(conn, where, params.values, missing=op.id)
        if isinstance(op, DeleteWhere):
            params = PgParams()
            where = scope_sql(op.scope, op.filter, op.now, params)
            return await self._delete_where(conn, where, params.values)
        if isinstance(op, PurgeExpired):
            result = await self._delete_where(conn, "expires_at <= $1", [op.now])
            await self._prune_changes(conn, op.now)
            return result
        if isinstance(op, RecordModel):
            return await self._record_model(conn, op)
        if isinstance(op, BuildContext):
            return await self._build_context(conn, op)
        if isinstance(op, CheckWrites):
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('write_check', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(op.now),
            )
            return WriteResult(None)
        raise TypeError(f"unknown write {op!r}")

    async def _history(self, conn: asyncpg.Connection, op: str, rows: list[tuple[str, str, int, str, str]]) -> None:
        """Record ``op`` for each (memory id, namespace, time, text, metadata JSON)."""
        if rows:
            await conn.executemany(
                "INSERT INTO history (memory_id, namespace, op, at, text, metadata) VALUES ($1, $2, $3, $4, $5, $6)",
                [(memory_id, namespace, op, at, text, meta) for memory_id, namespace, at, text, meta in rows],
            )

    async def _build_context(self, conn: asyncpg.Connection, op: BuildContext) -> WriteResult:
        if not self.backend.context:
            return WriteResult(0)
        count, changes = await build_missing(PgSessionRows(conn, self.backend.pgvector), op.limit)
        return WriteResult(count, changes)

    async def _refresh(self, conn: asyncpg.Connection, moved: list[Position]) -> list[IndexChange]:
        """Session context follows the write (see gm.context)."""
        if not (self.backend.context and moved):
            return []
        return await refresh(PgSessionRows(conn, self.backend.pgvector), moved)

    async def _add(self, conn: asyncpg.Connection, op: AddMemories) -> WriteResult:
        out: list[tuple[Memory, bool]] = []
        changes: list[IndexChange] = []
        moved: list[Position] = []
        vec = self.backend.pgvector
        for item in op.items:
            if item.client_id:  # an expired memory frees its id: purge it as purge_expired would (history, index)
                purged = await self._delete_where(conn, "id = $1 AND expires_at <= $2", [item.id, op.now])
                changes.extend(purged.changes)
            meta = orjson.dumps(item.metadata).decode()
            s = item.scope
            created, updated, expires_at, occurred = added_times(item, self.stamp)
            values = [item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text, meta,
                      created, updated, expires_at, item.vector]
            extra: dict[str, Any] = {"vec": item.vector} if vec else {}
            if self.backend.context:
                extra["occurred_at"], extra["context"] = occurred, date_words(occurred)
            names = "".join(f", {name}" for name in extra)
            marks = "".join(f", ${len(values) + i}" for i in range(1, len(extra) + 1))
            rowid = await conn.fetchval(
                "INSERT INTO memories (id, namespace, user_id, agent_id, session_id, text, metadata, "
                f"created_at, updated_at, expires_at, embedding{names}) "
                f"VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb,$8,$9,$10,$11{marks}) "
                "ON CONFLICT (id) DO NOTHING RETURNING rowid",
                *values, *extra.values(),
            )
            if rowid is None:
                existing = await conn.fetchrow(f"SELECT {self.backend.columns} FROM memories WHERE id = $1", item.id)
                if existing is None:  # another instance deleted it in between: its id is free
                    raise StorageUnavailable(f"memory {item.id!r} was deleted while being added; retry")
                memory = memory_from_row(existing)
                if not item.same_content(memory):
                    raise id_conflict(item.id)
                out.append((memory, False))
                continue
            await self._history(conn, "add", [(item.id, s.namespace, created, item.text, meta)])
            memory = Memory(item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text,
                            item.metadata, created, updated, expires_at, occurred)
            out.append((memory, True))
            changes.append(IndexChange(rowid, vector=item.vector, scope=s, expires_at=expires_at))
            if s.session_id is not None:
                moved.append(Position(s.namespace, s.session_id, occurred, rowid))
        if vec and changes:
            await self.backend.ensure_hnsw(conn, len(op.items[0].vector or b"") // 4)
        return WriteResult(out, changes + await self._refresh(conn, moved))

    async def _update(self, conn: asyncpg.Connection, op: UpdateMemory) -> WriteResult:
        by_id = PgParams()
        where = live_by_id(op.id, op.now, op.namespace, by_id)
        row = await conn.fetchrow(
            f"SELECT {self.backend.columns} FROM memories WHERE {where} FOR UPDATE", *by_id.values
        )
        if row is None:
            raise unknown_id(op.id)
        rowid, old = row[0], memory_from_row(row)
        memory = updated(old, op, self.stamp)
        meta = orjson.dumps(memory.metadata).decode()
        assignments = "text = $2, metadata = $3::jsonb, expires_at = $4, updated_at = $5"
        params: list[Any] = [rowid, memory.text, meta, memory.expires_at, memory.updated_at]
        if self.backend.context:
            params.append(memory.occurred_at)
            assignments += f", occurred_at = ${len(params)}"
        if op.vector is not None:
            params.append(op.vector)
            assignments += f", embedding = ${len(params)}"
            if self.backend.pgvector:
                params.append(op.vector)
                assignments += f", vec = ${len(params)}"
        if self.backend.context and old.session_id is None:  # alone, its context is its date
            params.append(date_words(memory.occurred_at))
            assignments += f", context = ${len(params)}"
        await conn.execute(f"UPDATE memories SET {assignments} WHERE rowid = $1", *params)
        await self._history(conn, "update", [(op.id, old.namespace, self.stamp, memory.text, meta)])
        scope = Scope(old.namespace, old.user_id, old.agent_id, old.session_id)
        changes = [IndexChange(rowid, vector=op.vector, scope=scope, expires_at=memory.expires_at)]
        return WriteResult(memory, changes + await self._refresh(conn, context_moves(old, memory, rowid)))

    async def _delete_where(
        self, conn: asyncpg.Connection, where: str, params: list[Any], missing: str | None = None
    ) -> WriteResult:
        rows = await conn.fetch(
            f"DELETE FROM memories WHERE {where} RETURNING rowid, id, text, metadata, namespace, session_id, "
            f"{event_time_sql(self.backend.schema_version)}",
            *params,
        )
        if missing is not None and not rows:
            raise unknown_id(missing)
        await self._history(conn, "delete", [(r[1], r[4], self.stamp, r[2], r[3]) for r in rows])
        removed = [IndexChange(r[0], remove=True) for r in rows]
        return WriteResult(len(rows), removed + await self._refresh(conn, deleted_positions(rows)))

    async def _prune_changes(self, conn: asyncpg.Connection, now: int) -> None:
        pruned = await conn.fetchval(
            "WITH gone AS (DELETE FROM changes WHERE at < $1 RETURNING seq) SELECT max(seq) FROM gone",
            now - CHANGES_KEPT_MS,
        )
        if pruned is not None:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('changes_pruned_through', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value::bigint, excluded.value::bigint)::text",
                str(pruned),
            )

    async def _record_model(self, conn: asyncpg.Connection, op: RecordModel) -> WriteResult:
        stored = await conn.fetchval("SELECT value FROM meta WHERE key = 'model'")
        if stored is not None and stored != op.identity:
            if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM memories)"):
                raise model_mismatch(stored, op.identity)
        if stored != op.identity:
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ('model', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                op.identity,
            )
        return WriteResult(op.identity)


class PgSessionRows(SessionRows):
    """The Writer's transaction as gm.context sees it; with pgvector, ``vec`` follows the
    search embedding (it is what HNSW searches)."""

    def __init__(self, conn: asyncpg.Connection, pgvector: bool) -> None:
        self.conn = conn
        self.pgvector = pgvector

    async def around(self, at: Position, before: int, after: int) -> list[Turn]:
        earlier, later = PgParams(), PgParams()
        first = await self.conn.fetch(window_sql(at, True, before, earlier), *earlier.values)
        rest = await self.conn.fetch(window_sql(at, False, after, later), *later.values)
        return [turn_from_row(r) for r in reversed(first)] + [turn_from_row(r) for r in rest]

    async def store(self, turn: Turn, context: str, search_embedding: bytes | None) -> None:
        if self.pgvector:
            await self.conn.execute(
                "UPDATE memories SET context = $2, search_embedding = $3, vec = $4 WHERE rowid = $1",
                turn.rowid, context, search_embedding, search_embedding or turn.embedding,
            )
        else:
            await self.conn.execute(
                "UPDATE memories SET context = $2, search_embedding = $3 WHERE rowid = $1",
                turn.rowid, context, search_embedding,
            )

    async def missing(self, limit: int) -> list[tuple[int, str, str | None, int]]:
        return [tuple(r) for r in await self.conn.fetch(MISSING_SQL.format(limit="$1"), limit)]

    async def store_alone(self, contexts: list[tuple[int, str]]) -> None:
        await self.conn.executemany("UPDATE memories SET context = $2 WHERE rowid = $1", contexts)


async def _rollback(transaction: Any) -> None:
    try:
        await transaction.rollback()
    except DB_ERRORS:
        pass  # the connection is gone, and the transaction with it


class PostgresBackend(Backend):
    """A Postgres database shared by any number of instances."""

    name = "postgres"

    def __init__(
        self,
        url: str,
        *,
        steps: tuple[postgres_migrations.Step, ...] = postgres_migrations.STEPS,
        target_version: int | None = None,
        pool_size: int = POOL_SIZE,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.write_timeout = write_timeout
        self.where = redact(url)
        self.steps = steps
        self.target_version = target_version
        self.pool_size = pool_size
        self.schema_version = 0
        self.columns = LEGACY_COLUMNS
        self.context = False
        self.pgvector = False  # the schema has the pgvector column `vec`: this instance writes it
        self.backfilled = False  # every row has its `vec`: searches may use pgvector
        self.hnsw_dim: int | None = None  # once known committed
        self.iterative_scan = False  # pgvector >= 0.8 keeps walking the graph until the page fills
        self.migrator = Migrator(self._migrate)
        self.pool: asyncpg.Pool | None = None  # reads
        # The Writer, the change feed, the vector backfill and readyz: never queued behind reads.
        self.write_pool: asyncpg.Pool | None = None
        self.writer: PgWriter | None = None
        self.feed: ChangeFeed | None = None
        self._on_reset: Callable[[], None] = lambda: None
        self._backfill: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    @property
    def phase(self) -> str:  # type: ignore[override]
        return self.migrator.phase

    @property
    def native_vectors(self) -> bool:  # type: ignore[override]
        return self.pgvector and self.backfilled

    async def connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT, server_settings=SERVER_SETTINGS)
            await _init_connection(conn)
            return conn
        except DB_ERRORS as exc:
            if conn is not None:
                conn.terminate()
            raise StorageUnavailable(f"cannot connect to {self.where}: {exc}") from None

    async def _migrate(self, on_phase: Callable[[str], None]) -> int:
        from gm import __version__

        try:
            return await postgres_migrations.migrate(
                self.connect, self.where, __version__, self.steps, self.target_version, on_phase, self._closing
            )
        except (TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
            raise unavailable(exc, f"migrating {self.where}") from None

    async def open(
        self, on_commit: Callable[[list[IndexChange]], Awaitable[None]], on_reset: Callable[[], None] | None = None
    ) -> None:
        self._on_reset = on_reset or (lambda: None)
        self.schema_version = await self.migrator.run()
        self.columns = columns_for(self.schema_version)
        self.context = self.schema_version >= CONTEXT_VERSION  # event time and session context
        try:
            self.pool = await self._create_pool(self.pool_size)
            self.write_pool = await self._create_pool(
                3, {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT}
            )
            self.pgvector = bool(await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'memories' AND column_name = 'vec')"
            ))
            start_seq = await self.pool.fetchval(
                "SELECT GREATEST(coalesce(max(seq), 0), coalesce((SELECT value::bigint FROM meta "
                "WHERE key = 'changes_pruned_through'), 0)) FROM changes"
            )
            if self.pgvector:
                self.hnsw_dim = await self._hnsw_dim()
                version = await self.pool.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                self.iterative_scan = tuple(int(p) for p in re.findall(r"\d+", version or "0")[:2]) >= (0, 8)
                self.backfilled = not await self.pool.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM memories WHERE vec IS NULL)"
                )
        except DB_ERRORS as exc:
            await self.close()
            raise unavailable(exc, f"opening {self.where}") from None
        if not self.native_vectors:  # the in-process index answers until every row has its `vec`
            self.feed = ChangeFeed(self, on_commit)
            await self.feed.start(start_seq)
        if self.pgvector:
            self._backfill = asyncio.get_running_loop().create_task(self._backfill_forever(), name="gm-vec-backfill")
        self.writer = PgWriter(self)
        self.writer.start()

    async def _create_pool(self, size: int, settings: dict[str, str] | None = None) -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=size, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
            init=_init_connection, server_settings={**SERVER_SETTINGS, **(settings or {})},
        )
        return pool

    async def close(self) -> None:
        self._closing.set()  # an instance still waiting for another's migration gives up
        await self.migrator.stop()
        if self.writer is not None:
            await self.writer.stop()
        await loops.stop(self._backfill)
        if self.feed is not None:
            await self.feed.stop()
        for pool in (self.pool, self.write_pool):
            if pool is not None:
                try:
                    async with asyncio.timeout(10):
                        await pool.close()
                except DB_ERRORS:
                    pool.terminate()
        self.pool = self.write_pool = None

    async def committed(self, last_seq: int | None) -> None:
        """After a commit of this instance: the in-process index (if any) follows the feed
        up to the commit, so the writer's own searches see the write when it is answered
        (with pgvector, searches read the database, which has it already)."""
        if self.feed is not None and last_seq is not None:
            await self.feed.reach(last_seq)

    def request_reload(self) -> None:
        self._on_reset()

    # -- reads --------------------------------------------------------------------

    def acquire(self, doing: str, *, write: bool = False) -> Any:
        pool = self.write_pool if write else self.pool
        if pool is None:
            raise StorageUnavailable("the database is not open")
        return _Acquire(pool, doing)

    async def fetch(self, sql: str, *params: Any) -> list[Any]:
        """Run a read; a connection that died under it is retried once on a fresh one."""
        for attempt in (1, 2):
            try:
                async with self.acquire("reading") as conn:
                    return list(await conn.fetch(sql, *params))
            except DB_ERRORS as exc:
                if statement_error(exc):
                    raise InvalidInput(f"the database refused the query: {exc}") from None
                if attempt == 2 or not _connection_lost(exc):
                    raise unavailable(exc, "reading") from None
        raise AssertionError("unreachable")

    async def fetch_own(self, sql: str, *params: Any) -> list[Any]:
        """A read of the backend's own (feed, readyz) on the write pool, never queued behind requests' reads."""
        try:
            async with self.acquire("reading", write=True) as conn:
                return list(await conn.fetch(sql, *params))
        except DB_ERRORS as exc:
            raise unavailable(exc, "reading") from None

    async def fetchval(self, sql: str, *params: Any) -> Any:
        rows = await self.fetch(sql, *params)
        return rows[0][0] if rows else None

    async def get(self, memory_id: str, now: int, namespace: str | None = None) -> Memory | None:
        params = PgParams()
        where = live_by_id(memory_id, now, namespace, params)
        rows = await self.fetch(f"SELECT {self.columns} FROM memories WHERE {where}", *params.values)
        return memory_from_row(rows[0]) if rows else None

    async def get_by_ids(self, ids: builtins.list[str], now: int) -> dict[str, Memory]:
        if not ids:
            return {}
        rows = await self.fetch(
            f"SELECT {self.columns} FROM memories WHERE id = ANY($1::text[]) "
            "AND (expires_at IS NULL OR expires_at > $2)",
            ids, now,
        )
        return {row[1]: memory_from_row(row) for row in rows}

    async def get_many(self, rowids: builtins.list[int], now: int) -> dict[int, Memory]:
        if not rowids:
            return {}
        rows = await self.fetch(
            f"SELECT {self.columns} FROM memories WHERE rowid = ANY($1::bigint[]) "
            "AND (expires_at IS NULL OR expires_at > $2)",
            rowids, now,
        )
        return {row[0]: memory_from_row(row) for row in rows}

    async def list(
        self, scope: Scope, filter: Filter | None, limit: int, cursor: str | None, now: int,
        *, order_by: str = "created_at", time_range: TimeRange | None = None,
    ) -> Page:
        params = PgParams()
        where = scope_sql(scope, filter, now, params, time_range=time_range, version=self.schema_version)
        key = event_time_sql(self.schema_version) if order_by == "occurred_at" else "created_at"
        if cursor is not None:
            last, rowid = decode_cursor(cursor, order_by)
            where += f" AND ({key}, rowid) < ({params(last)}, {params(rowid)})"
        rows = await self.fetch(
            f"SELECT {self.columns} FROM memories WHERE {where} ORDER BY {key} DESC, rowid DESC "
            f"LIMIT {params(limit + 1)}",
            *params.values,
        )
        return page_from_rows(rows, limit, order_by)

    async def history(self, memory_id: str, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        in_namespace = "" if namespace is None else " AND namespace = $2"
        rows = await self.fetch(
            f"SELECT op, at, text, metadata, namespace FROM history WHERE memory_id = $1{in_namespace} ORDER BY seq",
            *([memory_id] if namespace is None else [memory_id, namespace]),
        )
        return [history_from_row(r) for r in rows]

    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]:
        if not terms:
            return []
        params = PgParams()
        query = " | ".join("'" + t.replace("'", "''") + "'" for t in terms)
        if all(t in STOPWORDS for t in terms):  # English stemming drops them all: match the words as they are
            q = f"to_tsquery('simple', {params(query)})"
            match, rank = f"to_tsvector('simple', m.text) @@ {q}", f"ts_rank(to_tsvector('simple', m.text), {q})"
        elif self.context:
            # The text weighs A and its session context B (gm.context). A row the context backfill
            # has not reached yet has no search_tsv: its text alone (tsv, weight D) is ranked as A.
            q = f"to_tsquery('english', {params(query)})"
            match = f"(m.search_tsv @@ {q} OR (m.search_tsv IS NULL AND m.tsv @@ {q}))"
            rank = (f"CASE WHEN m.search_tsv IS NULL THEN ts_rank('{{1, 1, 1, 1}}', m.tsv, {q}) "
                    f"ELSE ts_rank('{{0.1, 0.2, {CONTEXT_WEIGHT}, 1}}', m.search_tsv, {q}) END")
        else:
            q = f"to_tsquery('english', {params(query)})"
            match, rank = f"m.tsv @@ {q}", f"ts_rank(m.tsv, {q})"
        where = scope_sql(scope, filter, now, params, "m.", time_range, self.schema_version)
        rows = await self.fetch(
            f"SELECT m.rowid, {rank} AS rank FROM memories m "
            f"WHERE {match} AND {where} ORDER BY rank DESC, m.rowid DESC LIMIT {params(limit)}",
            *params.values,
        )
        return [(r[0], float(r[1])) for r in rows]

    async def matching_rowids(
        self, scope: Scope, filter: Filter | None, now: int, *, time_range: TimeRange | None = None
    ) -> builtins.list[int]:
        params = PgParams()
        where = scope_sql(scope, filter, now, params, time_range=time_range, version=self.schema_version)
        return [r[0] for r in await self.fetch(f"SELECT rowid FROM memories WHERE {where}", *params.values)]

    async def vector_search(
        self, vector: bytes, scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]:
        """pgvector: the ``limit`` nearest by cosine distance among live memories of the scope
        (HNSW with iterative scans, so a narrow scope or filter still fills the page)."""
        dim = len(vector) // 4
        if self.hnsw_dim is None:
            self.hnsw_dim = await self._hnsw_dim()  # another instance may have written the first vectors
            if self.hnsw_dim is None:
                return []  # no vector was ever written
        if dim != self.hnsw_dim:
            raise InvalidInput(f"the query vector has {dim} dimensions but the stored ones have {self.hnsw_dim}")
        params = PgParams()
        target = params(vector, f"vector({dim})")
        where = scope_sql(scope, filter, now, params, time_range=time_range, version=self.schema_version)
        distance = f"vec::vector({dim}) <=> {target}"
        query = (f"SELECT rowid, {distance} AS distance FROM memories WHERE vec IS NOT NULL AND {where} "
                 f"ORDER BY ORDERING LIMIT {params(limit)}")
        rows = await self._vector_rows(query.replace("ORDERING", "distance"), params.values, limit)
        if len(rows) < limit:
            # HNSW filters after the graph walk: a narrow scope or filter can leave the page short
            # (pgvector < 0.8 has no iterative scan). An order the index cannot serve makes it exact.
            rows = await self._vector_rows(query.replace("ORDERING", f"({distance}) + 0"), params.values, limit)
        return [(r[0], 1.0 - float(r[1])) for r in rows]

    async def cosines(self, vector: bytes, rowids: builtins.list[int]) -> dict[int, float]:
        dim = len(vector) // 4
        rows = await self.fetch(
            f"SELECT rowid, 1 - (vec::vector({dim}) <=> $1::vector({dim})) FROM memories "
            "WHERE rowid = ANY($2::bigint[]) AND vec IS NOT NULL",
            vector, rowids,
        )
        return {r[0]: float(r[1]) for r in rows}

    async def _vector_rows(self, sql: str, params: builtins.list[Any], limit: int) -> builtins.list[Any]:
        for attempt in (1, 2):
            try:
                async with self.acquire("searching") as conn, conn.transaction():
                    await conn.execute(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, limit)}")
                    if self.iterative_scan:
                        await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                    return list(await conn.fetch(sql, *params))
            except DB_ERRORS as exc:
                if attempt == 2 or not _connection_lost(exc):
                    raise unavailable(exc, "searching") from None
        raise AssertionError("unreachable")

    async def _hnsw_dim(self) -> int | None:
        value = await self.fetchval("SELECT value FROM meta WHERE key = 'hnsw_dimensions'")
        return int(value) if value is not None else None

    async def ensure_hnsw(self, conn: asyncpg.Connection, dim: int) -> None:
        """Create the HNSW index for vectors of ``dim`` dimensions the first time any are
        written (the dimension belongs to the model, which the schema does not know)."""
        if self.hnsw_dim == dim or dim == 0:
            return
        await conn.execute("SELECT pg_advisory_xact_lock($1)", HNSW_LOCK)
        stored = await conn.fetchval("SELECT value FROM meta WHERE key = 'hnsw_dimensions'")
        if stored is None:  # this transaction creates it; known to all once committed
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS memories_vec_hnsw ON memories "
                f"USING hnsw ((vec::vector({dim})) vector_cosine_ops)"
            )
            await conn.execute("INSERT INTO meta (key, value) VALUES ('hnsw_dimensions', $1)", str(dim))
        elif int(stored) != dim:
            raise ModelMismatch(f"this database's vectors have {stored} dimensions; the model gives {dim}")
        else:
            self.hnsw_dim = dim

    async def _backfill_forever(self) -> None:
        """Fill ``vec`` where it is missing: rows written by a release that predates the
        pgvector column (during a rolling deploy), or written before the column existed.
        Once none is left, searches switch from the in-process index to pgvector."""
        while True:
            try:
                while await self._backfill_some():
                    pass
                if not self.backfilled and not await self.fetch_own(
                    "SELECT 1 FROM memories WHERE vec IS NULL LIMIT 1"
                ):
                    self.backfilled = True
                    log.info("every memory has its pgvector value: vector search uses HNSW now")
                    if self.feed is not None:
                        await self.feed.stop()
                        self.feed = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("vector backfill: %s; will retry", getattr(exc, "message", exc))
            await loops.pause(POLL_SECONDS)

    async def _backfill_some(self, size: int = 1000) -> bool:
        """One batch, by one instance at a time; True if there may be more."""
        async with self.acquire("backfilling vectors", write=True) as conn, conn.transaction():
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", BACKFILL_LOCK):
                return False  # another instance is at it
            rows = await conn.fetch(
                f"SELECT rowid, embedding, {search_vector(self.context)} FROM memories WHERE vec IS NULL "
                "ORDER BY rowid LIMIT $1", size
            )
            if not rows:
                return False
            await self.ensure_hnsw(conn, len(rows[0][1]) // 4)
            await conn.executemany(
                "UPDATE memories SET vec = $2 WHERE rowid = $1 AND embedding = $3 AND vec IS NULL",
                [(r[0], r[2], r[1]) for r in rows],
            )
        log.info("vector backfill: %d more memories searchable by pgvector", len(rows))
        return len(rows) == size

    async def vectors(self) -> AsyncIterator[builtins.list[VectorRow]]:
        last = 0
        while True:
            rows = await self.fetch(
                f"SELECT rowid, namespace, user_id, agent_id, session_id, expires_at, {search_vector(self.context)} "
                "FROM memories WHERE rowid > $1 ORDER BY rowid LIMIT 20000",
                last,
            )
            if not rows:
                return
            yield [vector_row(r) for r in rows]
            last = rows[-1][0]

    async def without_context(self) -> int:
        if not self.context:
            return 0
        return int(await self.fetchval("SELECT count(*) FROM memories WHERE context IS NULL"))

    async def counts(self, now: int) -> dict[str, int]:
        rows = await self.fetch(
            "SELECT namespace, count(*) FROM memories WHERE expires_at IS NULL OR expires_at > $1 "
            "GROUP BY namespace ORDER BY namespace",
            now,
        )
        return {r[0]: r[1] for r in rows}

    async def check(self) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self.fetch_own("SELECT 1")
        except TimeoutError:
            raise StorageUnavailable(f"{self.where} did not answer within {CHECK_TIMEOUT:.0f}s") from None

    async def database_size(self) -> int | None:
        value = await self.fetchval("SELECT pg_database_size(current_database())")
        return int(value) if value is not None else None


class _Acquire:
    """``async with backend.acquire(...)``: a pooled connection; failures to get one are
    StorageUnavailable."""

    def __init__(self, pool: asyncpg.Pool, doing: str) -> None:
        self.pool = pool
        self.doing = doing
        self.conn: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            self.conn = await self.pool.acquire(timeout=CONNECT_TIMEOUT)
        except DB_ERRORS as exc:
            raise unavailable(exc, self.doing) from None
        conn: asyncpg.Connection = self.conn
        return conn

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and _connection_lost(exc):
            self.conn.terminate()  # never hand a broken connection to the next caller; the pool replaces it
        try:
            await self.pool.release(self.conn)
        except DB_ERRORS:
            pass


def _connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                            OSError, asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError))


SERVER_SETTINGS = {"application_name": f"greatmemory {socket.gethostname()}:{os.getpid()}"}


async def _init_connection(conn: asyncpg.Connection) -> None:
    """pgvector's ``vector`` travels in binary as our little-endian float32 bytes."""
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = 'vector'"
    )
    if schema is not None:
        await conn.set_type_codec(
            "vector", schema=schema, encoder=_encode_vector, decoder=_decode_vector, format="binary"
        )
