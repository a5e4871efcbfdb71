"""The in-process vector index: bulk load equals one-by-one adds, scopes and expiry mask
rows, and a search running while the index grows or compacts never misses a row."""

from __future__ import annotations

import threading

import numpy as np

from gm.index import VectorIndex
from gm.memory import Scope
from gm.storage.base import IndexChange, VectorRow

DIM = 16


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_bulk_load_matches_single_adds_and_respects_scope_and_expiry() -> None:
    rng = np.random.default_rng(1)
    rows = [
        VectorRow(i, Scope("ns", f"u{i % 3}"), 5_000 if i % 10 == 0 else None, unit(rng).tobytes())
        for i in range(1, 3001)
    ]
    bulk, single = VectorIndex(DIM), VectorIndex(DIM)
    bulk.load(rows[:1500])
    bulk.load(rows[1500:])
    for row in rows:
        single.add(row.rowid, row.vector, row.scope, row.expires_at)
    query = unit(rng)
    for scope in (Scope("ns"), Scope("ns", "u1"), Scope("other")):
        for now in (0, 10_000):
            assert bulk.search(query, scope, now, 20) == single.search(query, scope, now, 20)
    hits = bulk.search(query, Scope("ns", "u1"), 10_000, 3000)
    assert hits and all(rowid % 3 == 1 and rowid % 10 != 0 for rowid, _ in hits)  # scope, and expired rows out
    assert len(bulk) == 3000


def test_search_never_misses_rows_while_the_index_grows_and_compacts() -> None:
    rng = np.random.default_rng(2)
    index = VectorIndex(DIM, capacity=64)
    query = unit(rng)
    index.add(1, query.tobytes(), Scope("ns"), None)  # always the best hit
    for rowid in range(2, 40):
        index.add(rowid, unit(rng).tobytes(), Scope("ns"), None)
    failures: list[object] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            hits = index.search(query, Scope("ns"), 0, 10)
            if len(hits) != 10 or hits[0][0] != 1:
                failures.append(hits)

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        for rowid in range(40, 20_000):  # grows past 64, 128, ... 16384
            index.add(rowid, unit(rng).tobytes(), Scope("ns"), None)
            if rowid % 3 == 0:
                index.apply([IndexChange(rowid - 1, remove=True)])  # tombstones, so compaction runs too
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert len(index) == 1 + 38 + len([r for r in range(40, 20_000)]) - len(range(42, 20_000, 3))
