"""pgvector on a shared Postgres database: its binary codec, the HNSW index (made once the
model's dimension is known), vector search and cosines, and the backfill of ``vec``.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import numpy as np

from gm import loops, vector_plan
from gm.errors import ModelMismatch, ModelSwitched
from gm.storage.postgres_pool import Pools, connection_lost, once_more
from gm.storage.sql import Numbered, search_vector

log = logging.getLogger(__name__)

HNSW_LOCK = 0x676D686E7377  # "gmhnsw": creating the HNSW index once
BACKFILL_LOCK = 0x676D6266  # "gmbf": one instance at a time fills in missing pgvector values
HNSW_EF_SEARCH = 100  # the least ef_search an HNSW search asks for
# and at least this many candidates a row of the page, and twice the plan's fetch: recall@10 at
# 100k (bench/pgvector_recall.py) was .962 at limit 50 with ef 100 (.982 with 200), .968 for a
# 10% scope with ef 200 (.989 with 400)
HNSW_EF_PER_ROW = 4
HNSW_EF_PER_FETCH = 2
HNSW_EF_MAX = 1000  # pgvector's ceiling for hnsw.ef_search
# pgvector's break-even between scoring a scope's rows exactly and walking HNSW (gm.vector_plan),
# lower than the in-process index's: the exact scan reads each allowed row from the table, 2.3 us
# a row (9,900 rows: 22.7 ms p50), where HNSW took 6.3 ms for a whole namespace (ef 100) and 17 ms
# for a 10% scope (ef 400), at 100k on 2 busy cores (bench/pgvector_recall.py).
EXACT_MAX_ROWS = 4_000
BACKFILL_BATCH = 1000
BACKFILL_PAUSE = 1.0  # seconds between looks for rows without `vec`
HAS_VEC = (  # the schema has the pgvector column `vec` (the extension was there to migrate)
    "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'memories' AND column_name = 'vec')"
)


# -- pgvector's binary format: uint16 dimensions, uint16 unused, big-endian float4s ----


def _encode_vector(raw: bytes) -> bytes:
    values = np.frombuffer(raw, dtype="<f4")
    return len(values).to_bytes(2, "big") + b"\0\0" + values.astype(">f4").tobytes()


def _decode_vector(data: bytes) -> bytes:
    return np.frombuffer(data[4:], dtype=">f4").astype("<f4").tobytes()


async def register_codec(conn: asyncpg.Connection) -> None:
    """pgvector's ``vector`` travels in binary as our little-endian float32 bytes."""
    schema = await conn.fetchval(
        "SELECT n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.typname = 'vector'"
    )
    if schema is not None:
        await conn.set_type_codec(
            "vector", schema=schema, encoder=_encode_vector, decoder=_decode_vector, format="binary"
        )


class PgVectors:
    """What this instance knows of the database's pgvector column and index."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.present = False  # the schema has `vec`: this instance writes it
        self.backfilled = False  # every row has its `vec`: searches may use pgvector
        self.dimensions: int | None = None  # of the HNSW index, once known committed
        self.iterative_scan = False  # pgvector >= 0.8 keeps walking the graph until the page fills
        self.context = False
        self.exact_max_rows = EXACT_MAX_ROWS
        # Searches by the plan they took: exact, HNSW, and HNSW whose page came short and was
        # answered exactly (plain counters, for benchmarks and metrics).
        self.plans = {"exact": 0, "hnsw": 0, "hnsw_short": 0}

    @property
    def searchable(self) -> bool:
        return self.present and self.backfilled

    async def inspect(self, pool: asyncpg.Pool, context: bool) -> None:
        """Read the column's and index's state at open."""
        self.context = context
        self.present = bool(await pool.fetchval(HAS_VEC))
        if self.present:
            value = await pool.fetchval("SELECT value FROM meta WHERE key = 'hnsw_dimensions'")
            self.dimensions = int(value) if value is not None else None
            version = await pool.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            self.iterative_scan = tuple(int(p) for p in re.findall(r"\d+", version or "0")[:2]) >= (0, 8)
            self.backfilled = not await pool.fetchval("SELECT EXISTS (SELECT 1 FROM memories WHERE vec IS NULL)")

    async def ensure_hnsw(self, conn: asyncpg.Connection, dim: int) -> None:
        """Create the HNSW index for vectors of ``dim`` dimensions the first time any are
        written (the dimension belongs to the model, which the schema does not know)."""
        if self.dimensions == dim or dim == 0:
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
            self.dimensions = dim

    async def add_next(self, conn: asyncpg.Connection, dim: int) -> None:
        """A re-embed begins (gm.storage.reembed_flow): ``vec_next`` and its HNSW index, empty."""
        await conn.execute("ALTER TABLE memories ADD COLUMN vec_next vector")
        await conn.execute("ALTER TABLE memories ALTER COLUMN vec_next SET STORAGE PLAIN")
        await conn.execute(
            f"CREATE INDEX memories_vec_next_hnsw ON memories USING hnsw ((vec_next::vector({dim})) vector_cosine_ops)"
        )
        await conn.execute("CREATE INDEX memories_without_vec_next ON memories (rowid) WHERE vec_next IS NULL")

    async def switch(self, conn: asyncpg.Connection, dim: int) -> None:
        """The next vectors become current: columns and indexes take the current names."""
        await conn.execute("ALTER TABLE memories RENAME COLUMN vec TO vec_old")
        await conn.execute("ALTER TABLE memories RENAME COLUMN vec_next TO vec")
        for index in ("memories_vec_hnsw", "memories_without_vec"):
            await conn.execute(f"ALTER INDEX IF EXISTS {index} RENAME TO {index.replace('vec', 'vec_old', 1)}")
            await conn.execute(f"ALTER INDEX {index.replace('vec', 'vec_next', 1)} RENAME TO {index}")
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('hnsw_dimensions', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", str(dim)
        )
        self.dimensions = None  # read again once committed

    async def search(self, vector: bytes, where: str, p: Numbered, limit: int) -> builtins.list[tuple[int, float]]:
        """The ``limit`` nearest by cosine distance among the rows ``where`` selects (its values
        in ``p``). The planner (gm.vector_plan) picks, from Postgres's estimate of how many rows
        the scope and filter allow and of the table's size, an exact scan of those rows or HNSW
        with ``ef_search`` deep enough to fill the page after them; a page HNSW leaves short
        (it filters after its graph walk) is answered by the exact scan."""
        dim = len(vector) // 4
        if self.dimensions is None or dim != self.dimensions:  # another instance wrote the first ones, or switched
            rows = await self.pools.fetch("SELECT value FROM meta WHERE key = 'hnsw_dimensions'", [])
            self.dimensions = int(rows[0][0]) if rows else None
            if self.dimensions is None:
                return []  # no vector was ever written
        if dim != self.dimensions:  # (the query comes from our model: the vectors switched to another since)
            raise ModelSwitched(f"the query vector has {dim} dimensions but the stored ones have {self.dimensions}")
        scoped = f"FROM memories WHERE vec IS NOT NULL AND {where}"
        estimate, estimate_values = f"EXPLAIN (FORMAT JSON) SELECT 1 {scoped}", list(p.values)
        distance = f"vec::vector({dim}) <=> {p(vector, f'vector({dim})')}"
        query = f"SELECT rowid, {distance} AS distance {scoped} ORDER BY ORDERING LIMIT {p(limit)}"
        hnsw, exact = query.replace("ORDERING", "distance"), query.replace("ORDERING", f"({distance}) + 0")

        async def run(conn: asyncpg.Connection) -> builtins.list[Any]:
            # (custom plans: the estimate is of these values, not of a cached generic plan's)
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            allowed = json.loads(await conn.fetchval(estimate, *estimate_values))[0]["Plan"]["Plan Rows"]
            total = await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'memories'::regclass")
            chosen = vector_plan.plan(int(allowed), max(int(total), int(allowed)), limit, self.exact_max_rows)
            if not chosen.exact:
                ef = min(max(HNSW_EF_SEARCH, HNSW_EF_PER_ROW * limit, HNSW_EF_PER_FETCH * chosen.fetch), HNSW_EF_MAX)
                await conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                if self.iterative_scan:
                    await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                found = list(await conn.fetch(hnsw, *p.values))
                if len(found) >= limit:
                    self.plans["hnsw"] += 1
                    return sorted(found, key=lambda r: r[1])  # (relaxed_order: pgvector's may be a little off)
                self.plans["hnsw_short"] += 1
            else:
                self.plans["exact"] += 1
            return list(await conn.fetch(exact, *p.values))  # (an order the index cannot serve: exact)

        return [(r[0], 1.0 - float(r[1])) for r in await self._run(run)]

    async def cosines(self, vector: bytes, rowids: builtins.list[int]) -> dict[int, float]:
        dim = len(vector) // 4
        rows = await self.pools.fetch(
            f"SELECT rowid, 1 - (vec::vector({dim}) <=> $1::vector({dim})) FROM memories "
            "WHERE rowid = ANY($2::bigint[]) AND vec IS NOT NULL",
            [vector, rowids],
        )
        return {r[0]: float(r[1]) for r in rows}

    async def _run(self, search: Callable[[asyncpg.Connection], Awaitable[builtins.list[Any]]]) -> builtins.list[Any]:
        """``search`` on a pooled connection in a transaction of its own (its settings are LOCAL)."""
        async def run() -> builtins.list[Any]:
            async with self.pools.acquire("searching") as conn, conn.transaction():
                try:
                    return await search(conn)
                except asyncpg.DataError as exc:
                    if "dimensions" not in str(exc):
                        raise
                    self.dimensions = None  # a re-embed switched to a model of other dimensions
                    raise ModelSwitched(f"the vectors switched to another model: {exc}") from None

        return await once_more(run, connection_lost, "searching")

    async def backfill_forever(self, on_done: Callable[[], Awaitable[None]]) -> None:
        """Fill ``vec`` where it is missing: rows written by a release that predates the
        pgvector column (during a rolling deploy), or written before the column existed.
        Once none is left, searches switch from the in-process index to pgvector (``on_done``)."""
        while True:
            try:
                while await self.backfill_some():
                    pass
                if not self.backfilled and not await self.pools.fetch(
                    "SELECT 1 FROM memories WHERE vec IS NULL LIMIT 1", [], own=True
                ):
                    self.backfilled = True
                    log.info("every memory has its pgvector value: vector search uses HNSW now")
                    await on_done()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("vector backfill: %s; will retry", getattr(exc, "message", exc))
            await loops.pause(BACKFILL_PAUSE)

    async def backfill_some(self, size: int = BACKFILL_BATCH) -> bool:
        """One batch, by one instance at a time; True if there may be more."""
        async with self.pools.acquire("backfilling vectors", own=True) as conn, conn.transaction():
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
