"""What the Postgres backend promises beyond the shared contract (which the parametrized
suite checks on both backends): a reply means committed, the writer's own searches see
its write at once, two stores on one database follow each other's writes, a refused
write spoils no other write of its batch, and a killed connection is survived.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

import gm
from gm.errors import InvalidFilter, StorageUnavailable
from gm.storage.postgres import FEED_LOCK, redact
from gm.storage.postgres_migrations import MIGRATION_LOCK

N = 200


async def test_each_add_is_committed_when_it_is_answered(pg_url: str) -> None:
    reader = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)  # sees only committed rows
    unseen: list[str] = []
    try:
        async with gm.open(pg_url) as store:

            async def add_one(i: int) -> gm.Memory:
                memory = await store.add(f"concurrent memory number {i}", user_id=f"u{i % 7}", metadata={"i": i})
                if await reader.fetchval("SELECT count(*) FROM memories WHERE id = $1", memory.id) != 1:
                    unseen.append(memory.id)
                return memory

            memories = await asyncio.gather(*(add_one(i) for i in range(N)))
            assert unseen == []
            assert [m.metadata["i"] for m in memories] == list(range(N))
            counts = await reader.fetchrow("SELECT count(*), count(DISTINCT id) FROM memories")
            assert tuple(counts) == (N, N)
            assert await reader.fetchval("SELECT count(*) FROM history WHERE op = 'add'") == N
            assert (await store.stats()).memories == N
    finally:
        await reader.close()


async def test_a_write_is_in_the_writers_own_vector_search_when_answered(pg_url: str) -> None:
    async with gm.open(pg_url) as store:
        await store.wait_index()
        for text in ("Keeps bees on the roof.", "Sails a small boat on weekends.", "Bakes sourdough bread."):
            memory = await store.add(text, user_id="u1")
            hits = await store.search(text, user_id="u1", mode="vector", limit=1)
            assert hits[0].memory == memory
        deleted = memory
        await store.delete(deleted.id)
        assert deleted.id not in [h.memory.id for h in await store.search(deleted.text, mode="vector")]


async def test_two_stores_on_one_database_follow_each_others_writes(pg_url: str) -> None:
    async with gm.open(pg_url) as first, gm.open(pg_url) as second:
        await asyncio.gather(first.search("warm up the model"), second.search("warm up the model"))
        delays = []
        for i in range(10):
            memory = await first.add(f"Visited lighthouse number {i} on the coast.", user_id="u1")
            started = time.perf_counter()
            while memory.id not in [h.memory.id for h in await second.search(memory.text, user_id="u1",
                                                                               mode="vector", limit=3)]:
                assert time.perf_counter() - started < 1.0, "the other store did not see the write within 1 s"
                await asyncio.sleep(0.01)
            delays.append(time.perf_counter() - started)
        updated = await second.update(memory.id, text="Climbed a volcano in Iceland.")
        started = time.perf_counter()
        while (await first.search("volcano Iceland", user_id="u1", mode="vector", limit=1))[0].memory != updated:
            assert time.perf_counter() - started < 1.0
            await asyncio.sleep(0.01)
        await first.delete(memory.id)
        started = time.perf_counter()
        while memory.id in [h.memory.id for h in await second.search("volcano", mode="vector")]:
            assert time.perf_counter() - started < 1.0
            await asyncio.sleep(0.01)
        assert (await first.stats()).memories == (await second.stats()).memories == 9
        print(f"cross-store visibility: max {max(delays) * 1000:.1f} ms over {len(delays)} writes")


async def test_a_refused_write_fails_alone_and_the_rest_of_its_batch_commits(pg_url: str) -> None:
    async with gm.open(pg_url) as store:
        await store.add("Lives in Oslo.", user_id="u1", metadata={"n": 1})
        deep: dict[str, object] = {"n": 1}
        for _ in range(16):
            deep = {"$not": deep}
        with pytest.raises(InvalidFilter):
            await store.delete_many(user_id="u1", filter={"$not": deep})
        results = await asyncio.gather(
            store.add("Works as a nurse.", user_id="u1"),
            store.delete_many(user_id="u1", filter={"n": {"$gt": 2**62}}),
            store.add("Has two cats.", user_id="u1"),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == ["Memory", "int", "Memory"]
        assert (await store.stats()).memories == 3


async def test_a_killed_connection_fails_fast_and_the_store_recovers(pg_url: str) -> None:
    admin = await asyncpg.connect(pg_url)
    try:
        async with gm.open(pg_url) as store:
            kept = await store.add("Plays chess on Tuesdays.", user_id="u1")
            await store.wait_index()
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            started = time.perf_counter()
            try:  # a read on a dead pooled connection is retried once on a fresh one
                assert await store.get(kept.id) == kept
            except StorageUnavailable:
                pass
            added = await store.add("Learning Portuguese.", user_id="u1")
            assert time.perf_counter() - started < 5
            assert {m.id for m in (await store.list(user_id="u1")).memories} == {kept.id, added.id}
            deadline = time.perf_counter() + 5
            while added.id not in [h.memory.id for h in await store.search("Portuguese", mode="vector", limit=2)]:
                assert time.perf_counter() < deadline
                await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def test_pgvector_a_store_that_never_wrote_finds_the_others_vectors(pgvector_url: str) -> None:
    async with gm.open(pgvector_url) as reader, gm.open(pgvector_url) as writer:
        assert reader.backend.native_vectors and writer.backend.native_vectors
        assert await reader.search("anything", mode="vector") == []  # nothing written yet
        memory = await writer.add("Collects vintage fountain pens.", user_id="u1")
        hits = await reader.search("fountain pens", user_id="u1", mode="vector", limit=1)
        assert [h.memory for h in hits] == [memory]


async def test_pgvector_rows_of_an_older_release_are_searchable_while_and_after_they_are_backfilled(
    pgvector_url: str,
) -> None:
    # An older release (schema v1: no pgvector column) wrote these memories.
    async with gm.open(pgvector_url, target_version=1) as old:
        assert not old.backend.pgvector
        written = await old.add_many([{"text": f"Old release memory about topic {i}: kayaking in fjords"}
                                      for i in range(30)])
    async with gm.open(pgvector_url) as new:  # migrates to v2, which adds `vec`, empty for those rows
        assert new.backend.pgvector
        hits = await new.search("kayaking in fjords", mode="vector", limit=30)
        assert {h.memory.id for h in hits} == {m.id for m in written}  # found now, whichever index answers
        deadline = time.perf_counter() + 10
        while not new.backend.native_vectors:  # the backfill fills `vec`, then searches switch to HNSW
            assert time.perf_counter() < deadline, "the backfill never completed"
            await asyncio.sleep(0.1)
        hits = await new.search("kayaking in fjords", mode="vector", limit=30)
        assert {h.memory.id for h in hits} == {m.id for m in written}
        conn = await asyncpg.connect(pgvector_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM memories WHERE vec IS NULL") == 0
            # An older release's update of the text leaves `vec` stale: the trigger clears it for the backfill.
            await conn.execute("UPDATE memories SET embedding = $1 WHERE id = $2", b"\0" * 1536, written[0].id)
            assert await conn.fetchval("SELECT vec IS NULL FROM memories WHERE id = $1", written[0].id)
        finally:
            await conn.close()


async def test_a_feed_that_fell_behind_the_kept_changes_reloads_the_index(pg_url: str) -> None:
    async with gm.open(pg_url) as first, gm.open(pg_url) as second:
        await asyncio.gather(first.search("warm up the model"), second.search("warm up the model"))
        kept = await first.add("Writes poetry in the mornings.", user_id="u1")
        await wait_until_found(second, kept)
        await second.backend.feed.stop()  # `second` goes away for longer than the changes are kept
        conn = await asyncpg.connect(pg_url)
        try:
            gone = await first.add("Moved to Lisbon last spring.", user_id="u1")
            pruned = await conn.fetchval("WITH gone AS (DELETE FROM changes RETURNING seq) SELECT max(seq) FROM gone")
            await conn.execute("INSERT INTO meta (key, value) VALUES ('changes_pruned_through', $1)", str(pruned))
        finally:
            await conn.close()
        await second.backend.feed.start(second.backend.feed.last_seq)
        newer = await first.add("Started learning the cello.", user_id="u1")
        for memory in (gone, newer, kept):  # the reload brought back what the pruned changes said
            await wait_until_found(second, memory)


async def wait_until_found(store: gm.Store, memory: gm.Memory, seconds: float = 5.0) -> None:
    deadline = time.perf_counter() + seconds
    while memory.id not in [h.memory.id for h in await store.search(memory.text, user_id=memory.user_id,
                                                                     mode="vector", limit=3)]:
        assert time.perf_counter() < deadline, f"{memory.text!r} never reached the other store's index"
        await asyncio.sleep(0.05)


async def test_a_write_blocked_by_a_stalled_session_fails_instead_of_hanging(pg_url: str) -> None:
    async with gm.open(pg_url) as store:
        staller = await asyncpg.connect(pg_url)  # holds the lock every writer numbers its changes under
        try:
            await staller.execute("SELECT pg_advisory_lock($1)", FEED_LOCK)
            started = time.perf_counter()
            with pytest.raises(StorageUnavailable):
                await store.add("Blocked behind a stalled session.")
            assert time.perf_counter() - started < 15  # 5 s lock timeout, retried once
        finally:
            await staller.close()  # the lock goes with the session
        assert (await store.add("Written once the lock is free.")).text == "Written once the lock is free."
        assert (await store.stats()).memories == 1


async def test_closing_while_waiting_for_another_instances_migration_does_not_hang(pg_url: str) -> None:
    holder = await asyncpg.connect(pg_url)  # another instance, migrating
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        store = gm.open(pg_url).build()
        opening = asyncio.ensure_future(store.open())
        deadline = time.perf_counter() + 10
        while store.backend.phase != "migrating":
            assert time.perf_counter() < deadline
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        await store.close()
        assert time.perf_counter() - started < 3
        with pytest.raises(StorageUnavailable):
            await opening
    finally:
        await holder.close()


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://gm:s3cret@db:5432/mem", "postgresql://gm:***@db:5432/mem"),
    ("postgresql://gm:p@ss@db/mem", "postgresql://gm:***@db/mem"),
    ("postgresql://gm@db/mem?password=s3cret&sslmode=require", "postgresql://gm@db/mem?password=***&sslmode=require"),
    ("postgresql://postgres@/mem?host=/run/pg", "postgresql://postgres@/mem?host=/run/pg"),
])
def test_urls_in_logs_and_messages_never_show_a_password(url: str, shown: str) -> None:
    assert redact(url) == shown
