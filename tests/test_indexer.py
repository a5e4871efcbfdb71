"""The Indexer: while a load fails, waiting for readiness raises why at once (no polling),
the load is retried, and the changes committed meanwhile are in the index it publishes; a
reload publishes its fresh index only once it is loaded. The database's failure is a
fault a test cannot cause on cue, so the vectors come from a source that fails on demand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from gm import indexer as indexer_module
from gm.errors import StorageUnavailable, StoreClosed
from gm.indexer import Indexer
from gm.memory import Scope
from gm.storage.base import IndexChange, VectorRow

DIM = 16
SCOPE = Scope("ns")


def vector(seed: int) -> bytes:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return (v / np.linalg.norm(v)).tobytes()


class Source:
    """A backend's ``vectors()``: fails while ``failing``, else yields ``rows`` once ``gate`` opens."""

    def __init__(self, rows: list[VectorRow]) -> None:
        self.rows = rows
        self.failing = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.calls = 0

    async def __call__(self) -> AsyncIterator[list[VectorRow]]:
        self.calls += 1
        if self.failing:
            raise StorageUnavailable("the database went away")
        await self.gate.wait()
        yield self.rows


def found(indexer: Indexer, rowid: int) -> bool:
    query = np.frombuffer(vector(rowid), dtype=np.float32)
    return any(hit == rowid for hit, _ in indexer.index.search(query, SCOPE, 0, 5))


async def test_a_failed_load_is_raised_at_once_retried_and_keeps_the_changes_made_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(indexer_module, "FIRST_RETRY_SECONDS", 0.05)
    source = Source([VectorRow(1, SCOPE, None, vector(1))])
    source.failing = True
    indexer = Indexer(source)
    try:
        await indexer.open(load=True)
        with pytest.raises(StorageUnavailable, match="could not be loaded: the database went away"):
            await asyncio.wait_for(indexer.wait_ready(), 5)  # fails as the load does, without waiting for a retry
        assert indexer.state == "failed"
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(indexer.wait_ready(), 0.01)  # and at once while the error stands
        await indexer.apply([IndexChange(2, vector=vector(2), scope=SCOPE)])  # answered while loading
        source.failing = False
        await asyncio.wait_for(indexer.wait_loaded(), 5)  # (wait_ready would raise until the retry loads)
        assert (indexer.state, indexer.error, source.calls > 1) == ("ready", None, True)
        assert found(indexer, 1) and found(indexer, 2)
        await indexer.apply([IndexChange(1, remove=True)])  # once loaded, applied in place
        assert not found(indexer, 1)
    finally:
        await indexer.stop()


async def test_a_reload_publishes_its_index_only_once_loaded() -> None:
    source = Source([VectorRow(1, SCOPE, None, vector(1))])
    indexer = Indexer(source)
    try:
        await indexer.open(load=True)
        await asyncio.wait_for(indexer.wait_ready(), 5)
        first = indexer.index
        source.gate.clear()
        source.rows = [VectorRow(3, SCOPE, None, vector(3))]
        indexer.reload()
        await indexer.apply([IndexChange(4, vector=vector(4), scope=SCOPE)])  # (handled after the reload)
        waiting = asyncio.create_task(indexer.wait_ready())
        await asyncio.sleep(0.05)
        assert not waiting.done() and indexer.state == "loading" and indexer.index is first
        source.gate.set()
        await asyncio.wait_for(waiting, 5)
        assert indexer.index is not first
        assert found(indexer, 3) and found(indexer, 4) and not found(indexer, 1)
    finally:
        await indexer.stop()


async def test_nothing_to_load_when_the_database_searches_vectors_itself() -> None:
    source = Source([])
    indexer = Indexer(source)
    try:
        await indexer.open(load=False)
        await asyncio.wait_for(indexer.wait_ready(), 1)
        assert (indexer.state, source.calls) == ("ready", 0)
    finally:
        await indexer.stop()


async def test_a_search_waiting_for_a_load_is_released_when_the_database_starts_searching_itself() -> None:
    # pgvector's backfill completes while the in-process index is still loading: the waiters
    # must not wait for (or fail with) a load nobody needs any more.
    source = Source([VectorRow(1, SCOPE, None, vector(1))])
    source.gate.clear()  # the load hangs
    indexer = Indexer(source)
    try:
        await indexer.open(load=True)
        waiting = asyncio.create_task(indexer.wait_ready())
        await asyncio.sleep(0.05)
        assert not waiting.done() and indexer.state == "loading"
        indexer.native()
        await asyncio.wait_for(waiting, 5)
        assert indexer.state == "ready"
    finally:
        await indexer.stop()


async def test_waiting_for_the_index_of_a_stopped_indexer_fails_at_once() -> None:
    source = Source([])
    source.gate.clear()
    indexer = Indexer(source)
    await indexer.open(load=True)
    waiting = asyncio.create_task(indexer.wait_ready())
    await asyncio.sleep(0.01)
    await indexer.stop()
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(waiting, 5)  # one who waited when it stopped
    with pytest.raises(StoreClosed):
        await asyncio.wait_for(indexer.wait_ready(), 1)  # and one who comes later
