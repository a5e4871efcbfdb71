"""pgvector's search asks the vector planner (gm.vector_plan): from Postgres's estimate of the rows
a scope and filter allow, and of the table's, it scans those rows exactly or walks HNSW deep enough
for the page, and a page HNSW leaves short is answered exactly. Each plan is taken here and
returns the rows numpy ranks first. The break-even is lowered to 50 rows (a parameter of the
backend's) so that a table of 1,100 memories needs no minutes of HNSW inserts. The vectors lie
in clusters, as embeddings do (uniform noise in 384 dimensions is HNSW's worst case, not ours).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from gm.filters import parse
from gm.memory import NewMemory, Scope
from gm.storage.base import AddMemories
from gm.storage.ops import IndexChange
from gm.storage.postgres import PostgresBackend

DIM = 384
NOW = 1_800_000_000_000
USERS = {"big": 1000, "mid": 52, "small": 20, "other": 28}  # mid: 4.7% of the table, under MIN_SELECTIVITY


async def ignore_changes(changes: list[IndexChange]) -> None:
    return None


@pytest.fixture
async def loaded(pgvector_url: str) -> AsyncIterator[tuple[PostgresBackend, np.ndarray, list[str]]]:
    """A pgvector backend with 1,100 unit vectors: (backend, vectors by rowid - 1, user by rowid - 1)."""
    rng = np.random.default_rng(7)
    users = [u for u, n in USERS.items() for _ in range(n)]
    rng.shuffle(users)
    vectors = clustered(rng, len(users))
    backend = PostgresBackend(pgvector_url)
    await backend.open(ignore_changes)
    try:
        items = [NewMemory(f"m{i}", True, Scope("ns", user), f"memory {i}", {"n": i}, None,
                           vector=vectors[i].tobytes()) for i, user in enumerate(users)]
        for start in range(0, len(items), 500):
            await backend.write(AddMemories(items[start:start + 500], NOW - 1))
        assert backend.native_vectors
        await backend.fetch("ANALYZE memories", [])
        backend.pg_vectors.exact_max_rows = 50
        rowids = [r[0] for r in await backend.fetch("SELECT rowid FROM memories ORDER BY rowid", [])]
        assert rowids == list(range(1, len(users) + 1))
        yield backend, vectors, users
    finally:
        await backend.close()


CENTERS = np.random.default_rng(3).standard_normal((40, DIM)).astype("<f4")


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` unit vectors, each one of CENTERS plus noise about as large as the center."""
    out = CENTERS[rng.integers(0, len(CENTERS), n)] + rng.standard_normal((n, DIM)).astype("<f4")
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype("<f4")


def exact(vectors: np.ndarray, allowed: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    order = allowed[np.argsort(-(vectors[allowed] @ query), kind="stable")]
    return [int(i) + 1 for i in order[:k]]


async def search(backend: PostgresBackend, query: np.ndarray, scope: Scope, raw_filter: object = None,
                 k: int = 10) -> tuple[list[int], dict[str, int]]:
    before = dict(backend.pg_vectors.plans)
    hits = await backend.vector_search(query.tobytes(), scope, parse(raw_filter), k, NOW)
    taken = {name: n - before[name] for name, n in backend.pg_vectors.plans.items() if n != before[name]}
    return [rowid for rowid, _ in hits], taken


def queries(n: int = 20) -> np.ndarray:
    return clustered(np.random.default_rng(11), n)


async def test_the_plan_follows_the_scopes_size(loaded: tuple[PostgresBackend, np.ndarray, list[str]]) -> None:
    """20 rows: exact (under the break-even); 52: exact (4.7% of the table: HNSW would have to walk
    430 candidates to keep 10); 1,000 (91%) and the whole namespace: HNSW, ef_search 100."""
    backend, vectors, users = loaded
    by_user = np.array(users)
    for scope, plan, allowed, k in [
        (Scope("ns", "small"), "exact", np.flatnonzero(by_user == "small"), 10),
        (Scope("ns", "mid"), "exact", np.flatnonzero(by_user == "mid"), 10),
        (Scope("ns", "big"), "hnsw", np.flatnonzero(by_user == "big"), 10),
        (Scope("ns"), "hnsw", np.arange(len(users)), 50),
    ]:
        found = 0
        for query in queries():
            hits, taken = await search(backend, query, scope, k=k)
            assert taken == {plan: 1}, scope
            truth = exact(vectors, allowed, query, k)
            if plan == "exact":
                assert hits == truth
            found += len(set(hits) & set(truth))
        assert found / (k * len(queries())) >= 0.97, scope  # (HNSW: recall against the exact order)


async def test_a_page_hnsw_leaves_short_is_answered_exactly(
    loaded: tuple[PostgresBackend, np.ndarray, list[str]]
) -> None:
    """A filter Postgres cannot estimate (a range on metadata: a third of the rows, it guesses)
    lets a handful of rows through: HNSW's 100 candidates hold few of them, the exact scan all."""
    backend, vectors, users = loaded
    allowed = np.flatnonzero((np.arange(len(users)) >= 1095) & (np.array(users) == "big"))
    for query in queries(5):
        hits, taken = await search(backend, query, Scope("ns", "big"), {"n": {"$gte": 1095}})
        assert taken == {"hnsw_short": 1}
        assert hits == exact(vectors, allowed, query, 10)
