"""The Postgres backend, for several instances on one database: its life cycle, keyword
search on ``tsvector``, and vector search by pgvector (gm.storage.postgres_vectors) or, where
the extension is missing, by the in-process index, which the change feed keeps in step.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from gm import loops
from gm.config import DEFAULT_WRITE_TIMEOUT_SECONDS
from gm.errors import ModelSwitched, ReembedInProgress, StorageUnavailable
from gm.filters import Filter
from gm.memory import Scope, TimeRange
from gm.migrator import Migrator
from gm.progress import OnProgress
from gm.storage import postgres_keywords, postgres_migrations, postgres_reindex
from gm.storage.base import Backend
from gm.storage.ops import IndexChange
from gm.storage.postgres_feed import FEED_LOCK, LAST_SEQ, ChangeFeed
from gm.storage.postgres_pool import DB_ERRORS, POOL_SIZE, Pools, redact, unavailable
from gm.storage.postgres_vectors import PgVectors, register_codec
from gm.storage.postgres_writer import PgWriter
from gm.storage.sql import Numbered, Params, scope_sql

__all__ = ["FEED_LOCK", "PostgresBackend", "redact"]

CHECK_TIMEOUT = 2.0  # readyz's probe of the database

REEMBED_LOCK = 0x676D7265656D62  # "gmreemb": one re-embed at a time, across instances


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
        self.pools = Pools(url, register_codec, pool_size)
        self.pg_vectors = PgVectors(self.pools)
        self.migrator = Migrator(self._migrate)
        self.writer: PgWriter | None = None
        self.feed: ChangeFeed | None = None
        self._on_reset: Callable[[], None] = lambda: None
        self._on_native: Callable[[], None] = lambda: None
        self._backfill: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    shared = True

    @property
    def native_vectors(self) -> bool:
        return self.pg_vectors.searchable

    @asynccontextmanager
    async def reembed_lock(self) -> AsyncIterator[None]:
        """One re-embed at a time across every instance: a session lock on a connection of
        its own, held to the end (a killed process's connection closes and frees it)."""
        async with super().reembed_lock():
            conn = await self.pools.connect()
            try:
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REEMBED_LOCK):
                    raise ReembedInProgress(
                        "another instance is running a re-embed or reindex of this database; let it finish"
                    )
                yield
            finally:
                await conn.close()

    @property
    def pgvector(self) -> bool:
        """The schema has the pgvector column ``vec``: this instance writes it."""
        return self.pg_vectors.present

    async def connect(self) -> asyncpg.Connection:
        return await self.pools.connect()

    async def _migrate(self, on_phase: Callable[[str], None]) -> int:
        from gm import __version__

        try:
            return await postgres_migrations.migrate(
                self.pools.connect, self.where, __version__, self.steps, self.target_version, on_phase, self._closing
            )
        except (TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
            raise unavailable(exc, f"migrating {self.where}") from None

    async def open(
        self,
        on_commit: Callable[[list[IndexChange]], Awaitable[None]],
        on_reset: Callable[[], None] | None = None,
        on_native: Callable[[], None] | None = None,
    ) -> None:
        self._on_reset = on_reset or (lambda: None)
        self._on_native = on_native or (lambda: None)
        self.schema_read(await self.migrator.run())
        try:
            await self.pools.open()
            assert self.pools.reads is not None
            await self.pg_vectors.inspect(self.pools.reads, self.context)
            start_seq = await self.pools.reads.fetchval(LAST_SEQ)
        except DB_ERRORS as exc:
            await self.close()
            raise unavailable(exc, f"opening {self.where}") from None
        if not self.native_vectors:  # the in-process index answers until every row has its `vec`
            self.feed = ChangeFeed(self._own_fetch, self.pools.connect, on_commit, self._on_reset, self.context)
            await self.feed.start(start_seq)
        if self.pg_vectors.present:
            backfill = self.pg_vectors.backfill_forever(self._became_native)
            self._backfill = asyncio.get_running_loop().create_task(backfill, name="gm-vec-backfill")
        self.writer = PgWriter(self.pools, self.pg_vectors, self.schema_version, self.committed)
        self.writer.start()

    async def close(self) -> None:
        self._closing.set()  # an instance still waiting for another's migration gives up
        await self.migrator.stop()
        if self.writer is not None:
            await self.writer.stop()
        await loops.stop(self._backfill)
        await self._stop_feed()
        await self.pools.close()

    async def _became_native(self) -> None:
        """Every row has its ``vec``: pgvector answers searches from now on."""
        await self._stop_feed()
        self._on_native()

    async def _stop_feed(self) -> None:
        """No in-process index to keep in step (any more)."""
        if self.feed is not None:
            await self.feed.stop()
            self.feed = None

    async def committed(self, last_seq: int | None) -> None:
        """After a commit of this instance: the in-process index (if any) follows the feed
        up to the commit, so the writer's own searches see the write when it is answered
        (with pgvector, searches read the database, which has it already)."""
        if self.feed is not None and last_seq is not None:
            await self.feed.reach(last_seq)

    def params(self) -> Params:
        return Numbered()

    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        return await self.pools.fetch(sql, values)

    async def _own_fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        return await self.pools.fetch(sql, values, own=True)

    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]:
        if not terms:
            return []
        return await postgres_keywords.search(
            self.fetch, terms, scope, filter, limit, now, time_range, self.schema_version, self.context)

    async def rebuild_keyword(self, progress: OnProgress | None = None, *, batch: int = postgres_reindex.BATCH) -> None:
        """Stale ``search_tsv`` values recomputed ``batch`` rows a step, then the GIN indexes
        reindexed concurrently (gm.storage.postgres_reindex)."""
        await postgres_reindex.rebuild_keyword(self, progress, batch)

    async def rebuild_vector_index(self, progress: OnProgress | None = None) -> None:
        """pgvector's HNSW index reindexed concurrently, if the database has one."""
        await postgres_reindex.rebuild_vector_index(self, progress)

    async def vector_search(
        self, vector: bytes, scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None, model: str = "",
    ) -> builtins.list[tuple[int, float]]:
        """pgvector: the ``limit`` nearest by cosine distance among live memories of the scope;
        with ``model``, only while the vectors are that model's (ModelSwitched once they are not:
        another instance's switch, seen in the same statement)."""
        p = Numbered()
        where = scope_sql(scope, filter, now, p, time_range=time_range, version=self.schema_version)
        if model:
            where += f" AND (SELECT value FROM meta WHERE key = 'model_identity') = {p(model)}"
        hits = await self.pg_vectors.search(vector, where, p, limit)
        if model and not hits and await self.meta_value("model_identity") not in (model, None):
            raise ModelSwitched("the vectors switched to another model; embed the query again")
        return hits

    async def cosines(self, vector: bytes, rowids: builtins.list[int]) -> dict[int, float]:
        return await self.pg_vectors.cosines(vector, rowids)

    async def check(self) -> None:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await self._own_fetch("SELECT 1", [])
        except TimeoutError:
            raise StorageUnavailable(f"{self.where} did not answer within {CHECK_TIMEOUT:.0f}s") from None

    async def database_size(self) -> int | None:
        rows = await self.fetch("SELECT pg_database_size(current_database())", [])
        return int(rows[0][0]) if rows and rows[0][0] is not None else None
