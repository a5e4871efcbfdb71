"""The online rebuild of a Postgres database's derived search state, by one instance at a time:
stale ``search_tsv`` values recomputed in rowid batches, then ``REINDEX INDEX CONCURRENTLY`` of
the GIN keyword indexes (or pgvector's HNSW index), its progress read from
``pg_stat_progress_create_index``.

Postgres swaps a concurrently rebuilt index in atomically; a build that was interrupted leaves
an INVALID ``<index>_ccnew`` (or ``_ccold``) behind, which the next run drops before it builds
again: that is how a rebuild resumes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncpg

from gm.errors import Conflict, StorageUnavailable
from gm.progress import Meter, OnProgress
from gm.storage.postgres_feed import FEED_LOCK
from gm.storage.postgres_pool import DB_ERRORS, unavailable

if TYPE_CHECKING:
    from gm.storage.postgres import PostgresBackend

log = logging.getLogger(__name__)

REINDEX_LOCK = 0x676D7265696478  # "gmreidx": one rebuild of a database's indexes at a time
# GIN over search_tsv (v3 on), tsv, and both with the scope's lexemes (v4 on)
KEYWORD_INDEXES = ("memories_search_keywords", "memories_keywords", "memories_scoped_keywords")
VECTOR_INDEXES = ("memories_vec_hnsw",)
POLL_SECONDS = 0.5  # how often a build's progress is read
BATCH = 2000  # rows a search_tsv step looks at
CURSOR = "search_tsv_cursor"  # meta: the last rowid the search_tsv pass has made current
# What gm_search_tsv() (schema v3's trigger) computes. The pass rewrites only rows whose value
# differs, so it costs no writes unless a release changed the text search configuration (it then
# changes the trigger and this together), or rows predate the column (their value is NULL).
SEARCH_TSV = ("setweight(to_tsvector('english', text), 'A') "
              "|| setweight(to_tsvector('english', coalesce(context, '')), 'B')")
LEFTOVERS = (  # what interrupted concurrent builds of these indexes left: invalid copies
    "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE i.indrelid = 'memories'::regclass AND NOT i.indisvalid AND c.relname ~ $1"
)
PROGRESS = ("SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total "
            "FROM pg_stat_progress_create_index WHERE pid = $1")


async def rebuild_keyword(backend: PostgresBackend, progress: OnProgress | None, batch: int = BATCH) -> None:
    async with _exclusive(backend, "rebuilding the keyword index") as conn:
        if backend.context:
            await _refresh_search_tsv(conn, progress, batch)
        await _reindex(backend, conn, KEYWORD_INDEXES, progress)


async def rebuild_vector_index(backend: PostgresBackend, progress: OnProgress | None) -> None:
    async with _exclusive(backend, "rebuilding the vector index") as conn:
        await _reindex(backend, conn, VECTOR_INDEXES, progress)


@contextlib.asynccontextmanager
async def _exclusive(backend: PostgresBackend, doing: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own holding the rebuild lock; Conflict if another holds it."""
    conn = await backend.pools.connect()
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", REINDEX_LOCK):
            raise Conflict(
                f"another instance is rebuilding indexes of {backend.where} (gmem reindex); "
                "wait for it to finish, then run this again if you still need to"
            )
        await conn.execute("SET statement_timeout = 0")  # (a build takes as long as it takes)
        with contextlib.suppress(asyncpg.PostgresError):  # (Postgres 14 on) a build stops soon after we die
            await conn.execute("SET client_connection_check_interval = '1s'")
        yield conn
    except DB_ERRORS as exc:
        raise unavailable(exc, doing) from None
    finally:
        with contextlib.suppress(*DB_ERRORS):
            await conn.close(timeout=5)  # (ends the session, and with it the lock)
        if not conn.is_closed():
            conn.terminate()


async def _refresh_search_tsv(conn: asyncpg.Connection, progress: OnProgress | None, batch: int) -> None:
    """Make every row's ``search_tsv`` what the trigger would compute now, ``batch`` rows a
    step; the cursor in ``meta`` lets a killed run continue. A step that rewrites rows takes
    the writers' feed lock first, as their batches do, so it cannot deadlock with them; one
    that finds nothing stale writes only its cursor."""
    after = int(await conn.fetchval("SELECT coalesce((SELECT value FROM meta WHERE key = $1), '0')", CURSOR))
    total = int(await conn.fetchval("SELECT count(*) FROM memories"))
    done = int(await conn.fetchval("SELECT count(*) FROM memories WHERE rowid <= $1", after))
    meter = Meter("keyword columns", total, done)
    rewritten = 0
    while True:
        count, last = await conn.fetchrow(
            "SELECT count(*), max(rowid) FROM (SELECT rowid FROM memories WHERE rowid > $1 ORDER BY rowid LIMIT $2) b",
            after, batch,
        )
        if not count:
            break
        stale = [r[0] for r in await conn.fetch(
            "SELECT rowid FROM memories WHERE rowid > $1 AND rowid <= $2 "
            f"AND search_tsv IS DISTINCT FROM ({SEARCH_TSV})",
            after, last,
        )]
        async with conn.transaction():
            if stale:
                await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
                status = await conn.execute(
                    f"UPDATE memories SET search_tsv = ({SEARCH_TSV}) "
                    f"WHERE rowid = ANY($1::bigint[]) AND search_tsv IS DISTINCT FROM ({SEARCH_TSV})",
                    stale,
                )
                rewritten += int(status.split()[-1])
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                CURSOR, str(last),
            )
        done, after = done + count, last
        if progress is not None and count == batch:  # (the last step's report is the final one below)
            progress(meter.at(done, max(meter.total, done)))
    await conn.execute("DELETE FROM meta WHERE key = $1", CURSOR)
    if rewritten:
        log.info("keyword columns: %d memories' search_tsv recomputed", rewritten)
    if progress is not None:
        progress(meter.at(done, done))


async def _reindex(
    backend: PostgresBackend, conn: asyncpg.Connection, names: tuple[str, ...], progress: OnProgress | None
) -> None:
    """Drop what interrupted builds of ``names`` left, then rebuild each that exists, concurrently."""
    pattern = "^(" + "|".join(names) + ")_cc(new|old)[0-9]*$"
    for leftover in [r[0] for r in await conn.fetch(LEFTOVERS, pattern)]:
        log.warning("dropping %s, left invalid by an interrupted index build", leftover)
        await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{leftover}"')
    present = {r[0] for r in await conn.fetch(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = 'memories'::regclass AND c.relname = ANY($1::text[])", list(names),
    )}
    for name in (n for n in names if n in present):
        await _reindex_one(backend, conn, name, progress)


async def _reindex_one(
    backend: PostgresBackend, conn: asyncpg.Connection, name: str, progress: OnProgress | None
) -> None:
    phase = f"reindex {name}"
    blocks = int(await conn.fetchval("SELECT pg_relation_size('memories') / current_setting('block_size')::int"))
    whole = Meter(phase, max(blocks, 1))
    watcher = None
    if progress is not None:
        watcher = asyncio.get_running_loop().create_task(
            _watch(backend, conn.get_server_pid(), phase, progress), name=f"gm-{phase}")
    try:
        await conn.execute(f'REINDEX INDEX CONCURRENTLY "{name}"')
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, *DB_ERRORS):
                await watcher
    log.info("%s: done", phase)
    if progress is not None:
        progress(whole.at(whole.total))


async def _watch(backend: PostgresBackend, pid: int, phase: str, progress: OnProgress) -> None:
    """Report the build's progress as Postgres counts it (blocks, else tuples), a meter per stage."""
    meters: dict[str, Meter] = {}
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            rows = await backend.pools.fetch(PROGRESS, [pid], own=True, doing="reading an index build's progress")
        except StorageUnavailable:
            continue  # (the build goes on; its progress is looked at again next time)
        if not rows:
            continue
        stage, blocks_done, blocks_total, tuples_done, tuples_total = rows[0]
        done, total = (blocks_done, blocks_total) if blocks_total else (tuples_done, tuples_total)
        if total:
            progress(meters.setdefault(stage, Meter(f"{phase}: {stage}", total)).at(done, total))
