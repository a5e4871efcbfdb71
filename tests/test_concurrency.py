"""Many writers at once: concurrent adds are each stored exactly once, and a reply means
the memory is committed, visible to any other connection on the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import gm
from gm.memory import now_ms
from gm.storage.base import AddMemories
from gm.validation import new_memory

N = 500


async def test_concurrent_adds_are_all_stored_once_and_durable_on_reply(sqlite_store: gm.Store, db_path: Path) -> None:
    store = sqlite_store  # looks inside the SQLite file
    reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)  # a separate, plain connection
    unseen: list[str] = []

    async def add_one(i: int) -> gm.Memory:
        memory = await store.add(f"concurrent memory number {i}", user_id=f"u{i % 7}", metadata={"i": i})
        # Right after the reply, before yielding to the loop again: the row must be committed.
        if reader.execute("SELECT count(*) FROM memories WHERE id = ?", [memory.id]).fetchone()[0] != 1:
            unseen.append(memory.id)
        return memory

    try:
        memories = await asyncio.gather(*(asyncio.create_task(add_one(i)) for i in range(N)))

        assert unseen == []
        assert len({m.id for m in memories}) == N
        assert [m.metadata["i"] for m in memories] == list(range(N))
        assert [m.text for m in memories] == [f"concurrent memory number {i}" for i in range(N)]

        rows = reader.execute("SELECT count(*), count(DISTINCT id), count(DISTINCT text) FROM memories").fetchone()
        assert rows == (N, N, N)
        adds = reader.execute("SELECT count(*), count(DISTINCT memory_id) FROM history WHERE op = 'add'").fetchone()
        assert adds == (N, N)
    finally:
        reader.close()

    assert (await store.stats()).memories == N
    seen: set[str] = set()
    cursor = None
    while True:
        page = await store.list(limit=1000, cursor=cursor)
        seen.update(m.id for m in page.memories)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == {m.id for m in memories}
    [top] = await store.search("concurrent memory number 123", mode="keyword", limit=1)
    assert top.memory.metadata == {"i": 123}
    assert len(await store.search("concurrent memory", mode="vector", limit=100)) == 100


async def test_a_write_sqlite_cannot_hold_fails_alone(store: gm.Store) -> None:
    """Writes queued together share one transaction; one that fails must not take the
    others down, nor leave the transaction open for the writes after it."""
    now = now_ms()
    vector = np.full(384, 384**-0.5, dtype=np.float32).tobytes()
    items = [new_memory({"text": f"good {i}"}, now) for i in range(3)]
    bad = new_memory({"text": "bad"}, now)
    bad.expires_at = 2**70  # no SQLite integer holds this
    for item in [*items, bad]:
        item.vector = vector

    results = await asyncio.gather(
        store.backend.write(AddMemories([items[0]], now)),
        store.backend.write(AddMemories([bad], now)),
        store.backend.write(AddMemories([items[1], items[2]], now)),
        return_exceptions=True,
    )
    assert isinstance(results[1], gm.errors.InvalidInput)  # a typed error, not a raw OverflowError
    assert [m.text for m, created in results[0] + results[2]] == ["good 0", "good 1", "good 2"]  # type: ignore[operator]

    after = await store.add("written after the failure")
    assert await store.get(after.id) == after
    assert {m.text for m in (await store.list()).memories} == {"good 0", "good 1", "good 2", after.text}
    with pytest.raises(gm.errors.NotFound):
        await store.get(bad.id)


async def test_reads_do_not_wait_behind_a_write_in_progress(sqlite_store: gm.Store, db_path: Path) -> None:
    store = sqlite_store  # looks inside the SQLite file
    memory = await store.add("Lives in Oslo.", user_id="u1")
    await store.wait_index()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
    try:
        blocked_add = asyncio.create_task(store.add("Moved to Bergen.", user_id="u1"))
        reads = asyncio.gather(
            store.get(memory.id), store.list(user_id="u1"), store.search("Oslo", user_id="u1"), store.stats()
        )
        got, page, hits, stats = await asyncio.wait_for(reads, 5)
        assert got == memory and page.memories == [memory] and hits[0].memory == memory and stats.memories == 1
        assert not blocked_add.done()  # the write is still waiting for the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await blocked_add).text == "Moved to Bergen."
