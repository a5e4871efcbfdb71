"""The Postgres Writer: runs each batch of writes (gm.storage.write_flow) in one transaction on
a pooled connection, has the change feed number the changed rows, commits, retries once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from gm.actor import Envelope
from gm.errors import GMError, InvalidInput, StorageUnavailable
from gm.storage.batch_writer import BatchWriter
from gm.storage.ops import WriteOp, WriteResult
from gm.storage.postgres_feed import CHANNEL, FEED_LOCK, number_changes, prune_changes
from gm.storage.postgres_pool import DB_ERRORS, Pools, once_more, statement_error, unavailable
from gm.storage.postgres_vectors import PgVectors
from gm.storage.sql import Numbered, Params
from gm.storage.transaction import Transaction
from gm.storage.write_flow import apply_batch

log = logging.getLogger(__name__)

MEMORY_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'memories'"
)
LOCK_TIMEOUT = "5s"  # a write waiting longer for a lock fails (503) rather than hangs


class PgTransaction(Transaction):
    """A pooled connection inside the batch's transaction; with pgvector, ``vec`` follows
    the searched embedding (it is what HNSW searches)."""

    def __init__(self, conn: asyncpg.Connection, version: int, vectors: PgVectors) -> None:
        super().__init__(version)
        self.conn = conn
        self.vectors = vectors

    def params(self) -> Params:
        return Numbered()

    async def fetch(self, sql: str, values: list[Any]) -> list[Any]:
        return list(await self.conn.fetch(sql, *values))

    async def execute(self, sql: str, values: list[Any]) -> None:
        await self.conn.execute(sql, *values)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.conn.executemany(sql, rows)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        async with self.conn.transaction():
            yield

    def refusal(self, exc: Exception) -> GMError | None:
        if isinstance(exc, GMError):
            return exc
        return InvalidInput(f"the database refused it: {exc}") if statement_error(exc) else None

    blob_type = "bytea"

    async def memory_columns(self) -> set[str]:
        return {r[0] for r in await self.conn.fetch(MEMORY_COLUMNS)}

    def embedding_columns(self, vector: bytes) -> dict[str, bytes]:
        return {"embedding": vector, "vec": vector} if self.vectors.present else {"embedding": vector}

    def next_vector_columns(self, vector: bytes | None) -> dict[str, bytes | None]:
        return {"embedding_next": vector, "vec_next": vector} if self.vectors.present else {"embedding_next": vector}

    def next_search_columns(self, search: bytes | None, own: bytes) -> dict[str, bytes | None]:
        if self.vectors.present:
            return {"search_embedding_next": search, "vec_next": search or own}
        return {"search_embedding_next": search}

    async def exclusive(self) -> None:
        # Every instance's writes in flight finish first (and so are seen), the next ones wait: a
        # write takes the table's row lock before the feed lock, so the feed lock alone would deadlock.
        await self.conn.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")

    async def next_columns_added(self, dimensions: int) -> None:
        if self.vectors.present:
            await self.vectors.add_next(self.conn, dimensions)

    async def vectors_switched(self, dimensions: int) -> None:
        if self.vectors.present:
            await self.vectors.switch(self.conn, dimensions)
        if self.context:  # a trigger names its columns by number: it would follow `embedding` to `embedding_old`
            await self.conn.execute("DROP TRIGGER memories_context_follow_update ON memories")
            await self.conn.execute(
                "CREATE TRIGGER memories_context_follow_update BEFORE UPDATE OF text, embedding ON memories "
                "FOR EACH ROW EXECUTE FUNCTION gm_context_follow_update()"
            )
        await self.conn.execute(f"NOTIFY {CHANNEL}")  # every instance's feed looks now

    async def vector_columns_dropped(self, suffix: str) -> None:
        await self.conn.execute(f"ALTER TABLE memories DROP COLUMN IF EXISTS vec{suffix}")  # (with its indexes)

    def search_columns(self, search: bytes | None, own: bytes) -> dict[str, bytes | None]:
        if self.vectors.present:
            return {"search_embedding": search, "vec": search or own}
        return {"search_embedding": search}

    async def vectors_added(self, dimensions: int) -> None:
        if self.vectors.present:
            await self.vectors.ensure_hnsw(self.conn, dimensions)

    async def purged(self, now: int) -> None:
        await prune_changes(self.conn, now)


class CommitUncertain(StorageUnavailable):
    """The connection failed while COMMIT was under way: the batch may have committed, so it
    is not retried."""


class PgWriter(BatchWriter):
    """Drains its mailbox into one transaction on a pooled connection (a savepoint per
    message, so one refused write does not spoil the others), numbers the changed rows in
    the change feed, commits, lets the index follow, then replies: a reply is durable.

    A batch that fails before COMMIT is sent is retried once on a fresh connection (it
    cannot have committed); one that fails during COMMIT is reported as unavailable.
    """

    name = "pg-writer"

    def __init__(
        self, pools: Pools, vectors: PgVectors, version: int, after_commit: Callable[[int | None], Awaitable[None]]
    ) -> None:
        super().__init__()
        self.pools = pools
        self.vectors = vectors
        self.version = version
        self.after_commit = after_commit  # with the last change number the batch wrote

    async def handle(self, batch: list[Envelope[WriteOp, object]]) -> None:
        ops, started = [e.msg for e in batch], time.perf_counter()
        try:
            outcomes, last_seq = await once_more(
                lambda: self._attempt(ops), lambda exc: not isinstance(exc, CommitUncertain), "committing",
                on_retry=lambda exc: log.warning(
                    "write batch of %d failed before commit, retrying: %s", len(ops), getattr(exc, "message", exc)),
            )
        except StorageUnavailable as error:
            self.fail_all(batch, error)
            return
        self.health.committed(len(batch), time.perf_counter() - started)
        try:
            await self.after_commit(last_seq)
        except Exception:  # the writes are committed: their callers hear so; the feed's poll catches up
            log.exception("following a commit failed")
        self.reply(batch, outcomes)

    async def _attempt(self, ops: list[WriteOp]) -> tuple[list[WriteResult | GMError], int | None]:
        async with self.pools.acquire("writing", own=True) as conn:
            transaction = conn.transaction()
            try:
                await transaction.start()
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                stamp = self.next_stamp()  # this instance's batches commit one after another, in stamp order
                done = await self._apply_all(conn, ops, stamp)
            except BaseException:
                await _rollback(transaction)
                raise
            try:
                await transaction.commit()
            except DB_ERRORS as exc:
                raise CommitUncertain(unavailable(exc, "committing").message) from None
            return done

    async def _apply_all(
        self, conn: asyncpg.Connection, ops: list[WriteOp], stamp: int
    ) -> tuple[list[WriteResult | GMError], int | None]:
        tx = PgTransaction(conn, self.version, self.vectors)
        try:
            if tx.context:
                # Session context reads its neighbours: two instances writing one session at once
                # would each miss the other's uncommitted turn. Batches take the feed lock first
                # (held to commit, and always the first lock, so no deadlock), so each sees the
                # other's committed rows; writes across instances commit one batch at a time.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
            outcomes = await apply_batch(tx, ops, stamp)
            rowids = sorted({c.rowid for o in outcomes if isinstance(o, WriteResult) for c in o.changes})
            return outcomes, await number_changes(conn, rowids)
        except DB_ERRORS as exc:
            raise unavailable(exc, "writing") from None


async def _rollback(transaction: Any) -> None:
    try:
        await transaction.rollback()
    except DB_ERRORS:
        pass  # the connection is gone, and the transaction with it
