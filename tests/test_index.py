"""The in-process vector index: int8 scores rank as float32 does, scopes and expiry mask rows,
the HNSW graph finds what exact search finds (recall@10 >= .97) for a whole namespace, a scope
or filter too narrow for it is scored exactly, rows it does not hold yet are still found, and a
search running while the index grows never misses a row."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gm import index as index_module
from gm import vector_plan
from gm.index import VectorIndex
from gm.memory import Scope
from gm.search import rescore_depth
from gm.storage.base import IndexChange, VectorRow

DIM = 16


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors around a few hundred centres, as embeddings of related texts lie."""
    centres = rng.standard_normal((300, dim)).astype(np.float32)
    v = centres[rng.integers(0, 300, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def exact_top(vectors: np.ndarray, rowids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return [int(rowids[i]) for i in np.argsort(-(vectors @ query), kind="stable")[:k]]


def test_bulk_load_and_single_adds_keep_scope_and_expiry_and_rank_as_float32() -> None:
    rng = np.random.default_rng(1)
    vectors = clustered(rng, 3000)
    rows = [
        VectorRow(i + 1, Scope("ns", f"u{(i + 1) % 3}"), 5_000 if (i + 1) % 10 == 0 else None, vectors[i].tobytes())
        for i in range(3000)
    ]
    bulk, single = VectorIndex(DIM), VectorIndex(DIM)
    bulk.load(rows[:1500])
    bulk.load(rows[1500:])
    for row in rows:
        single.add(row.rowid, row.vector, row.scope, row.expires_at)
    query = unit(rng)
    for index in (bulk, single):
        everyone = {rowid for rowid, _ in index.search(query, Scope("ns"), 0, 5000)}
        assert everyone == set(range(1, 3001))
        hits = index.search(query, Scope("ns", "u1"), 10_000, 5000)
        assert {rowid for rowid, _ in hits} == {r for r in range(1, 3001) if r % 3 == 1 and r % 10 != 0}
        assert index.search(query, Scope("other"), 0, 10) == []
        assert index.search(query, Scope("ns", "nobody"), 0, 10) == []
        # The int8 scores are within a hundredth of the cosine, and their best 30 hold the exact best 10.
        top = index.search(query, Scope("ns"), 0, 30)
        cosines = {i + 1: float(vectors[i] @ query) for i in range(3000)}
        assert max(abs(score - cosines[rowid]) for rowid, score in top) < 0.01
        assert set(exact_top(vectors, np.arange(1, 3001), query, 10)) <= {rowid for rowid, _ in top}
    assert len(bulk) == len(single) == 3000


def test_allowed_rowids_and_removals_restrict_the_hits() -> None:
    rng = np.random.default_rng(3)
    vectors = clustered(rng, 500)
    index = VectorIndex(DIM)
    index.load([VectorRow(i + 1, Scope("ns"), None, vectors[i].tobytes()) for i in range(500)])
    index.apply([IndexChange(7, remove=True), IndexChange(8, expires_at=1)])
    hits = index.search(vectors[6], Scope("ns"), 100, 500)
    assert {rowid for rowid, _ in hits} == set(range(1, 501)) - {7, 8}
    assert {rowid for rowid, _ in index.search(vectors[0], Scope("ns"), 0, 10, allowed=[3, 5, 7, 900])} == {3, 5}
    assert index.search(vectors[0], Scope("ns"), 0, 10, allowed=[]) == []


@pytest.fixture
def small_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph from 2,000 rows on (instead of 20,000), so a test builds one in a second."""
    monkeypatch.setattr(index_module, "GRAPH_MIN_ROWS", 2_000)
    monkeypatch.setattr(vector_plan, "EXACT_MAX_ROWS", 2_000)


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry for every search the graph answered."""
    walked: list[int] = []
    graph_search = VectorIndex._graph_search

    def counted(self: VectorIndex, *args: object) -> list[tuple[int, float]]:
        walked.append(1)
        return graph_search(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(VectorIndex, "_graph_search", counted)
    return walked


def graph_index(vectors: np.ndarray, users: int) -> VectorIndex:
    index = VectorIndex(DIM)
    index.load([VectorRow(i + 1, Scope("ns", f"u{i % users}"), None, v.tobytes()) for i, v in enumerate(vectors)])
    while index.graph_backlog():
        index.grow_graph(threads=2)
    return index


def test_the_graph_answers_a_whole_namespace_with_the_exact_hits(small_graph: None, walks: list[int]) -> None:
    rng = np.random.default_rng(4)
    vectors = clustered(rng, 20_000)
    index = graph_index(vectors, users=100)
    assert index.graphed == 20_000
    queries = clustered(rng, 50)

    def rescored(q: np.ndarray, scope: Scope = Scope("ns")) -> list[int]:  # as the Searcher does it
        found = [r for r, _ in index.search(q, scope, 0, rescore_depth(10))]  # the int8 best, rescored in float32
        return sorted(found, key=lambda r: -float(vectors[r - 1] @ q))[:10]

    exact = [set(exact_top(vectors, np.arange(1, 20_001), q, 10)) for q in queries]
    recall = np.mean([len(set(rescored(q)) & best) / 10 for q, best in zip(queries, exact, strict=True)])
    assert recall >= 0.97
    assert len(walks) == len(queries)  # the graph answered every one
    # One user (1%): exact over that user's rows, so nothing is missed.
    mine = np.arange(20_000) % 100 == 42
    for q in queries[:10]:
        assert rescored(q, Scope("ns", "u42")) == exact_top(vectors[mine], np.arange(1, 20_001)[mine], q, 10)
    assert len(walks) == len(queries)  # (not the graph)


def test_rows_the_graph_does_not_hold_yet_and_removed_ones(small_graph: None) -> None:
    rng = np.random.default_rng(5)
    vectors = clustered(rng, 5_000)
    index = graph_index(vectors, users=1)
    query = unit(rng)
    index.add(99_999, query.tobytes(), Scope("ns", "u0"), None)  # after the graph: scored exactly
    assert index.graph_backlog() == 1
    assert index.search(query, Scope("ns"), 0, 10)[0][0] == 99_999
    best = index.search(vectors[10], Scope("ns"), 0, 1)[0][0]
    index.apply([IndexChange(best, remove=True)])  # still in the graph, never a hit
    assert best not in {r for r, _ in index.search(vectors[10], Scope("ns"), 0, 50)}
    # A filter that allows half the rows, but none near the query: the graph is asked deeper
    # until the page fills.
    allowed = [i + 1 for i in range(5_000) if float(vectors[i] @ vectors[10]) < 0]
    assert len(allowed) > 2_000
    hits = index.search(vectors[10], Scope("ns"), 0, 10, allowed=allowed)
    assert len(hits) == 10 and {r for r, _ in hits} <= set(allowed)


def test_a_long_backlog_is_scored_beside_the_graph_not_instead_of_it(small_graph: None, walks: list[int]) -> None:
    """An import holds the graph back: past EXACT_MAX_ROWS waiting rows, a search still walks the
    graph (while it covers most rows) and scores the rows it lacks exactly beside."""
    rng = np.random.default_rng(6)
    vectors = clustered(rng, 5_000)
    index = graph_index(vectors, users=1)
    later = clustered(rng, 3_000)  # 3,000 waiting > EXACT_MAX_ROWS (2,000), fewer than the graph's 5,000
    index.load([VectorRow(10_001 + i, Scope("ns", "u0"), None, v.tobytes()) for i, v in enumerate(later)])
    assert index.graph_backlog() == 3_000
    for i in (0, 1_500, 2_999):
        assert index.search(later[i], Scope("ns"), 0, 10)[0][0] == 10_001 + i
    assert index.search(vectors[7], Scope("ns"), 0, 10)[0][0] == 8
    assert len(walks) == 4
    more = clustered(rng, 3_000)
    index.load([VectorRow(20_001 + i, Scope("ns", "u0"), None, v.tobytes()) for i, v in enumerate(more)])
    index.search(vectors[7], Scope("ns"), 0, 10)  # 6,000 waiting, more than the graph holds: exact
    assert len(walks) == 4


def test_search_never_misses_rows_while_the_index_and_its_graph_grow(small_graph: None) -> None:
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

    def grower() -> None:
        while not stop.is_set():
            if not index.grow_graph():
                stop.wait(0.001)

    threads = [threading.Thread(target=searcher), threading.Thread(target=grower)]
    for thread in threads:
        thread.start()
    try:
        for rowid in range(40, 8_000):  # grows past 64, 128, ... 8192, and the graph follows
            index.add(rowid, unit(rng).tobytes(), Scope("ns"), None)
            if rowid % 3 == 0:
                index.apply([IndexChange(rowid - 1, remove=True)])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert index.graphed > 0
    assert len(index) == 1 + 38 + len(range(40, 8_000)) - len(range(42, 8_000, 3))


def test_an_index_of_mostly_dead_slots_says_so() -> None:
    index = VectorIndex(DIM)
    rng = np.random.default_rng(6)
    v = unit(rng).tobytes()
    for _ in range(3):
        for rowid in range(index_module.GRAPH_MIN_ROWS // 2):
            index.add(rowid, v, Scope("ns"), None)  # each replacement takes a new slot
    assert not index.wasted
    for rowid in range(index_module.GRAPH_MIN_ROWS // 2):
        index.add(rowid, v, Scope("ns"), None)
        index.add(rowid, v, Scope("ns"), None)
    assert index.wasted and len(index) == index_module.GRAPH_MIN_ROWS // 2


def test_every_row_keeps_its_one_current_vector_through_loads_replacements_removals_and_a_reopen() -> None:
    """The rowid -> slot map: rows in rowid order (loads, new adds) and rows added again out of
    order (a new vector for an old rowid) resolve to their newest vector, removed ones to none,
    and so does an index made from the state of one (its rowids no longer in slot order)."""
    rng = np.random.default_rng(7)
    vectors = clustered(rng, 400)
    index = VectorIndex(DIM)
    index.load([VectorRow(r, Scope("ns"), None, vectors[r].tobytes()) for r in range(0, 200, 2)])
    for r in range(1, 200, 2):  # older rowids than the last: not in rowid order after the load
        index.add(r, vectors[r], Scope("ns"), None)
    index.load([VectorRow(r, Scope("ns"), None, vectors[r].tobytes()) for r in range(200, 300)])
    newest = {r: vectors[r] for r in range(300)}
    for r in range(0, 300, 7):  # replaced: each takes a new slot
        newest[r] = vectors[300 + r // 7]
        index.add(r, newest[r], Scope("ns"), None)
    index.apply([IndexChange(r, remove=True) for r in range(5, 300, 11)])
    for r in range(5, 300, 11):
        del newest[r]
    index.add(5, vectors[399], Scope("ns"), None)  # a removed row comes back
    newest[5] = vectors[399]
    query = unit(rng)
    for candidate in (index, VectorIndex.from_state(index.state())):  # (the second shares the first's arrays)
        assert len(candidate) == len(newest)
        cosines = candidate.cosines(query, [*range(-3, 310), 5, 5])
        assert set(cosines) == set(newest)
        for r, vector in newest.items():
            assert abs(cosines[r] - float(vector @ query)) < 0.01
        assert {rowid for rowid, _ in candidate.search(query, Scope("ns"), 0, 1000)} == set(newest)
    reopened = VectorIndex.from_state(index.state())
    reopened.remove(0)
    reopened.remove(5)
    assert reopened.cosines(query, [0, 5]) == {} and len(reopened) == len(newest) - 2
