"""Every operation of the embedded library on a real SQLite file with the real model:
add, batches, get, list, update, delete, history, stats, scopes, expiry, bad input, life cycle.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import gm
from gm.embedding import ModelSpec
from gm.errors import (
    Conflict,
    InvalidInput,
    ModelNotFound,
    NotFound,
    StorageUnavailable,
    StoreClosed,
)
from gm.memory import MAX_BATCH, MAX_TEXT_CHARS, format_time, now_ms
from gm.storage import is_postgres_url, postgres_migrations, sqlite_migrations
from gm.storage.base import DeleteMemory, UpdateMemory
from tests.conftest import WriteGate, pg_fetch


def rfc3339(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat().replace("+00:00", "Z")


def ids(memories: list[gm.Memory]) -> list[str]:
    return [m.id for m in memories]


async def count(store: gm.Store) -> int:
    return (await store.stats()).memories


# -- add ----------------------------------------------------------------------------


async def test_add_fills_in_the_defaults(store: gm.Store) -> None:
    memory = await store.add("Prefers window seats on long flights.")

    assert memory.text == "Prefers window seats on long flights."
    assert memory.namespace == "default"
    assert (memory.user_id, memory.agent_id, memory.session_id) == (None, None, None)
    assert memory.metadata == {}
    assert memory.expires_at is None
    assert memory.created_at == memory.updated_at
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", memory.id)
    assert await store.get(memory.id) == memory


async def test_server_ids_sort_by_creation(store: gm.Store) -> None:
    made = [await store.add(f"memory number {i}") for i in range(20)]
    assert ids(made) == sorted(ids(made))
    assert len(set(ids(made))) == 20


async def test_add_keeps_metadata_and_scopes(store: gm.Store) -> None:
    metadata = {"topic": "travel", "priority": 2, "ratio": 0.5, "ok": True, "none": None,
                "trip": {"city": "Oslo", "legs": [1, 2]}}
    memory = await store.add(
        "Flies to Oslo in May.", namespace="work", user_id="u1", agent_id="planner", session_id="s9",
        metadata=metadata,
    )
    assert (memory.namespace, memory.user_id, memory.agent_id, memory.session_id) == ("work", "u1", "planner", "s9")
    assert memory.metadata == metadata
    stored = await store.get(memory.id)
    assert stored == memory
    assert stored.to_dict()["created_at"] == format_time(memory.created_at)


async def test_client_id_retry_returns_the_stored_memory(store: gm.Store) -> None:
    item = {"id": "import:42", "text": "Allergic to peanuts.", "user_id": "u1", "metadata": {"topic": "health"}}
    [(first, created)] = await store.add_inputs([item])
    assert created is True and first.id == "import:42"

    [(again, created)] = await store.add_inputs([dict(item)])
    assert created is False
    assert again == first
    assert await store.add(**item) == first  # the plain add is idempotent too
    assert await count(store) == 1
    assert [e.op for e in await store.history("import:42")] == ["add"]


@pytest.mark.parametrize(
    "change",
    [{"text": "Allergic to cats."}, {"metadata": {"topic": "food"}}, {"user_id": "u2"}, {"namespace": "work"}],
)
async def test_client_id_with_other_content_conflicts(store: gm.Store, change: dict[str, Any]) -> None:
    item = {"id": "import:42", "text": "Allergic to peanuts.", "user_id": "u1", "metadata": {"topic": "health"}}
    original = await store.add(**item)

    with pytest.raises(Conflict, match="import:42"):
        await store.add_inputs([{**item, **change}])

    assert await store.get("import:42") == original
    assert await count(store) == 1


async def test_a_client_id_can_be_reused_once_its_memory_expired(store: gm.Store) -> None:
    await store.add("Old hotel booking.", id="booking", ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    [(memory, created)] = await store.add_inputs([{"id": "booking", "text": "New hotel booking."}])
    assert created is True
    assert (await store.get("booking")).text == "New hotel booking."
    history = await store.history("booking")
    assert [(e.op, e.text) for e in history] == [
        ("add", "Old hotel booking."), ("delete", "Old hotel booking."), ("add", "New hotel booking."),
    ]
    assert [h.memory for h in await store.search("hotel booking", mode="vector")] == [memory]


# -- add_many -------------------------------------------------------------------------


async def test_add_many_stores_a_batch_in_input_order(store: gm.Store) -> None:
    inputs = [{"text": f"fact {i}", "user_id": f"u{i % 2}", "metadata": {"i": i}} for i in range(5)]
    memories = await store.add_many(inputs)
    assert [m.text for m in memories] == [f"fact {i}" for i in range(5)]
    assert [m.metadata for m in memories] == [{"i": i} for i in range(5)]
    assert [m.user_id for m in memories] == ["u0", "u1", "u0", "u1", "u0"]
    for memory in memories:
        assert await store.get(memory.id) == memory
    assert await count(store) == 5


async def test_add_many_with_an_invalid_item_stores_nothing(store: gm.Store) -> None:
    inputs: list[Any] = [{"text": "fine"}, {"text": "also fine"}, {"text": "   "}]
    with pytest.raises(InvalidInput) as caught:
        await store.add_many(inputs)
    assert caught.value.path == "memories[2].text"
    assert await count(store) == 0
    assert (await store.list()).memories == []


async def test_add_many_with_a_conflicting_id_stores_nothing(store: gm.Store) -> None:
    original = await store.add("The original.", id="taken")
    with pytest.raises(Conflict):
        await store.add_many([{"text": "new one"}, {"text": "new two"}, {"id": "taken", "text": "Not the original."}])
    assert ids((await store.list()).memories) == ["taken"]
    assert await store.get("taken") == original
    assert await count(store) == 1
    assert await store.search("new", mode="keyword") == []


async def test_add_many_with_the_same_id_twice_and_other_content_stores_nothing(store: gm.Store) -> None:
    with pytest.raises(Conflict):
        await store.add_many([{"text": "one", "id": "dup"}, {"text": "two", "id": "dup"}])
    assert await count(store) == 0
    with pytest.raises(NotFound):
        await store.history("dup")


@pytest.mark.parametrize(
    ("inputs", "path"),
    [
        ([], "memories"),
        ("not a list", "memories"),
        (["just text"], "memories[0]"),
        ([{"text": "ok"}, {"metadata": {}}], "memories[1].text"),
        ([{"text": "ok", "colour": "red"}], "memories[0].colour"),
        ([{"text": "ok"}] * (MAX_BATCH + 1), "memories"),
    ],
)
async def test_add_many_rejects_bad_batches(store: gm.Store, inputs: Any, path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.add_many(inputs)
    assert caught.value.path == path
    assert await count(store) == 0


# -- get and list -----------------------------------------------------------------------


async def test_get_unknown_id_is_not_found(store: gm.Store) -> None:
    with pytest.raises(NotFound):
        await store.get("no-such-memory")


async def test_list_is_newest_first(store: gm.Store) -> None:
    made = [await store.add(f"note {i}") for i in range(5)]
    page = await store.list()
    assert ids(page.memories) == ids(made)[::-1]
    assert page.next_cursor is None


async def test_list_filters_by_scope(store: gm.Store) -> None:
    await store.add_many([
        {"text": "a", "user_id": "u1"},
        {"text": "b", "user_id": "u1", "agent_id": "bot"},
        {"text": "c", "user_id": "u1", "agent_id": "bot", "session_id": "s1"},
        {"text": "d", "user_id": "u2", "agent_id": "bot"},
        {"text": "e", "namespace": "work", "user_id": "u1"},
    ])

    async def listed(**scope: str) -> set[str]:
        return {m.text for m in (await store.list(**scope)).memories}

    assert await listed() == {"a", "b", "c", "d"}
    assert await listed(user_id="u1") == {"a", "b", "c"}
    assert await listed(agent_id="bot") == {"b", "c", "d"}
    assert await listed(user_id="u1", agent_id="bot") == {"b", "c"}
    assert await listed(session_id="s1") == {"c"}
    assert await listed(namespace="work") == {"e"}
    assert await listed(namespace="work", user_id="u2") == set()
    assert await listed(namespace="nowhere") == set()


async def test_list_pages_with_a_cursor_without_duplicates_or_gaps(store: gm.Store) -> None:
    made = [await store.add(f"entry {i}", user_id="u1") for i in range(23)]
    await store.add("someone else's", user_id="u2")
    seen: list[str] = []
    cursor = None
    sizes = []
    while True:
        page = await store.list(user_id="u1", limit=10, cursor=cursor)
        sizes.append(len(page.memories))
        seen.extend(ids(page.memories))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sizes == [10, 10, 3]
    assert seen == ids(made)[::-1]  # every memory once, newest first across pages


async def test_a_cursor_keeps_its_place_while_new_memories_arrive(store: gm.Store) -> None:
    made = await store.add_many([{"text": f"batch {i}"} for i in range(6)])
    first = await store.list(limit=4)
    newer = await store.add("arrived between pages")
    second = await store.list(limit=4, cursor=first.next_cursor)
    assert ids(first.memories) + ids(second.memories) == ids(made)[::-1]
    assert second.next_cursor is None
    assert ids((await store.list(limit=1)).memories) == [newer.id]


async def test_list_applies_a_filter(store: gm.Store) -> None:
    await store.add_many([
        {"text": "window seat", "metadata": {"topic": "travel"}},
        {"text": "peanuts", "metadata": {"topic": "health"}},
        {"text": "aisle seat", "metadata": {"topic": "travel"}},
    ])
    page = await store.list(filter={"topic": "travel"})
    assert [m.text for m in page.memories] == ["aisle seat", "window seat"]


# -- update -----------------------------------------------------------------------------


async def test_update_text_re_embeds_and_re_indexes(store: gm.Store) -> None:
    memory = await store.add("Has a golden retriever named Biscuit.", metadata={"topic": "pets"})
    await store.add("Plays the violin in a community orchestra.")

    updated = await store.update(memory.id, text="The quarterly tax return is due in April.")
    assert updated.text == "The quarterly tax return is due in April."
    assert updated.metadata == {"topic": "pets"}  # untouched
    assert updated.created_at == memory.created_at and updated.updated_at >= memory.updated_at
    assert await store.get(memory.id) == updated

    [top, *_] = await store.search("when must I file my taxes", mode="vector")
    assert top.memory.id == memory.id and top.score > 0.4
    dog_hits = await store.search("what kind of dog do they own", mode="vector")
    assert {h.memory.id: h.score for h in dog_hits}[memory.id] < 0.2  # the old vector is gone

    assert ids([h.memory for h in await store.search("quarterly", mode="keyword")]) == [memory.id]
    assert await store.search("retriever", mode="keyword") == []


async def test_update_replaces_metadata_whole(store: gm.Store) -> None:
    memory = await store.add("Likes tea.", metadata={"topic": "food", "strength": 3})
    updated = await store.update(memory.id, metadata={"confirmed": True})
    assert updated.metadata == {"confirmed": True}
    assert updated.text == "Likes tea."
    assert (await store.get(memory.id)).metadata == {"confirmed": True}
    assert (await store.update(memory.id, metadata={})).metadata == {}


async def test_update_sets_and_clears_expiry(store: gm.Store) -> None:
    memory = await store.add("Staying at the Grand Hotel this week.")
    later = datetime.now(UTC) + timedelta(days=7)
    updated = await store.update(memory.id, expires_at=later.isoformat())
    assert updated.expires_at == int(later.timestamp() * 1000)
    assert (await store.get(memory.id)).expires_at == updated.expires_at

    cleared = await store.update(memory.id, expires_at=None)
    assert cleared.expires_at is None
    assert (await store.get(memory.id)).expires_at is None

    with pytest.raises(InvalidInput):  # a time already past is refused, not stored
        await store.update(memory.id, expires_at=rfc3339(timedelta(seconds=-1)))
    await store.update(memory.id, expires_at=rfc3339(timedelta(milliseconds=50)))
    await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await store.get(memory.id)
    assert await store.search("hotel this week") == []
    with pytest.raises(NotFound):  # an expired memory cannot be revived by an update either
        await store.update(memory.id, expires_at=None)


async def test_update_errors_change_nothing(store: gm.Store) -> None:
    memory = await store.add("Likes tea.", metadata={"topic": "food"})
    with pytest.raises(NotFound):
        await store.update("missing", text="x")
    with pytest.raises(InvalidInput):
        await store.update(memory.id)
    with pytest.raises(InvalidInput) as caught:
        await store.update(memory.id, text="  ")
    assert caught.value.path == "text"
    with pytest.raises(InvalidInput) as caught:
        await store.update(memory.id, metadata=["not", "an", "object"])  # type: ignore[arg-type]
    assert caught.value.path == "metadata"
    with pytest.raises(InvalidInput) as caught:
        await store.update(memory.id, expires_at="next tuesday")
    assert caught.value.path == "expires_at"
    assert await store.get(memory.id) == memory
    assert [e.op for e in await store.history(memory.id)] == ["add"]


# -- delete -----------------------------------------------------------------------------


async def test_delete_removes_one_memory_everywhere(store: gm.Store) -> None:
    gone = await store.add("Has a golden retriever named Biscuit.")
    kept = await store.add("Plays the violin in a community orchestra.")

    assert await store.delete(gone.id) is None
    with pytest.raises(NotFound):
        await store.get(gone.id)
    assert ids((await store.list()).memories) == [kept.id]
    for mode in ("vector", "keyword", "hybrid"):
        assert gone.id not in ids([h.memory for h in await store.search("golden retriever dog", mode=mode)])
    with pytest.raises(NotFound):
        await store.delete(gone.id)
    assert await count(store) == 1


async def test_delete_many_by_scope_and_filter(store: gm.Store) -> None:
    made = await store.add_many([
        {"text": "u1 travel 1", "user_id": "u1", "metadata": {"topic": "travel"}},
        {"text": "u1 travel 2", "user_id": "u1", "metadata": {"topic": "travel"}},
        {"text": "u1 health", "user_id": "u1", "metadata": {"topic": "health"}},
        {"text": "u2 travel", "user_id": "u2", "metadata": {"topic": "travel"}},
        {"text": "work travel", "namespace": "work", "user_id": "u1", "metadata": {"topic": "travel"}},
    ])
    assert await store.delete_many(user_id="u1", filter={"topic": "travel"}) == 2
    assert {m.text for m in (await store.list()).memories} == {"u1 health", "u2 travel"}
    assert [e.op for e in await store.history(made[0].id)] == ["add", "delete"]
    assert [m.text for m in (await store.list(namespace="work")).memories] == ["work travel"]
    assert await store.delete_many(user_id="u1", filter={"topic": "travel"}) == 0
    assert await store.delete_many(namespace="work") == 1
    assert (await store.stats()).namespaces == {"default": 2}


async def test_a_namespace_constraint_makes_a_memory_elsewhere_an_unknown_id(store: gm.Store) -> None:
    theirs = await store.add("Theirs.", namespace="b", id="held-1", metadata={"k": "b"})
    for call in (
        store.get("held-1", namespace="a"),
        store.history("held-1", namespace="a"),
        store.update("held-1", metadata={"k": "a"}, namespace="a"),
        store.update("held-1", text="Mine.", namespace="a"),
        store.delete("held-1", namespace="a"),
    ):
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.message == "no memory with id 'held-1'"  # as for an id never used
    assert await store.get("held-1", namespace="b") == theirs == await store.get("held-1")
    assert [e.op for e in await store.history("held-1", namespace="b")] == ["add"]
    changed = await store.update("held-1", metadata={"k": "b2"}, namespace="b")
    assert changed.metadata == {"k": "b2"}
    await store.delete("held-1", namespace="b")
    with pytest.raises(InvalidInput):
        await store.get("held-1", namespace="")


async def test_the_writer_checks_the_namespace_in_the_transaction_that_writes(store: gm.Store) -> None:
    """The race a check before the write loses, driven through the store's steps: the update
    is made (vector and all) for tenant a's memory, which is then replaced by tenant b's."""
    await store.add("A's note.", namespace="a", id="swap-1")
    vector = (await store.embedder.embed("A overwrites.")).tobytes()
    update = UpdateMemory("swap-1", now_ms(), text="A overwrites.", vector=vector, namespace="a")
    delete = DeleteMemory("swap-1", now_ms(), namespace="a")
    await store.delete("swap-1")
    await store.add("B's secret.", namespace="b", id="swap-1")
    for op in (update, delete):
        with pytest.raises(NotFound):
            await store.backend.write(op)
    memory = await store.get("swap-1")
    assert (memory.namespace, memory.text) == ("b", "B's secret.")
    assert [(h.op, h.namespace) for h in await store.history("swap-1")] == [("add", "a"), ("delete", "a"), ("add", "b")]


async def test_a_write_to_a_dropped_table_is_storage_unavailable_not_bad_input(store: gm.Store, target: str) -> None:
    """Someone dropped ``memories``: the database cannot serve (503), the caller's input was fine (not 422)."""
    memory = await store.add("Kept until the table goes.")
    if is_postgres_url(target):
        await pg_fetch(target, "DROP TABLE memories CASCADE")
    else:
        with sqlite3.connect(target) as conn:
            conn.execute("DROP TABLE memories")
    for call in (store.add("Never stored."), store.update(memory.id, metadata={"k": 1}), store.delete(memory.id)):
        with pytest.raises(StorageUnavailable):
            await call


# -- history and stats ------------------------------------------------------------------


async def test_history_records_add_update_delete_oldest_first(store: gm.Store) -> None:
    memory = await store.add("Likes tea.", metadata={"topic": "food"})
    await store.update(memory.id, text="Likes green tea.")
    await store.update(memory.id, metadata={"topic": "drinks"})
    await store.delete(memory.id)

    history = await store.history(memory.id)
    assert [(e.op, e.text, e.metadata) for e in history] == [
        ("add", "Likes tea.", {"topic": "food"}),
        ("update", "Likes green tea.", {"topic": "food"}),
        ("update", "Likes green tea.", {"topic": "drinks"}),
        ("delete", "Likes green tea.", {"topic": "drinks"}),
    ]
    times = [e.at for e in history]
    assert times == sorted(times) and times[0] == memory.created_at
    with pytest.raises(NotFound):
        await store.history("never-existed")


async def test_history_is_in_commit_order_and_stamped_at_commit(store: gm.Store) -> None:
    """An update that arrived first but commits last is stamped last: times follow commit order."""
    memory = await store.add("Likes tea.")
    gate = WriteGate(store.backend, UpdateMemory)
    first = asyncio.create_task(store.update(memory.id, metadata={"n": 1}))
    await asyncio.wait_for(gate.reached.wait(), 60)
    await asyncio.sleep(0.02)  # the second update arrives well after the first
    second = await store.update(memory.id, metadata={"n": 2})
    gate.released.set()
    last = await asyncio.wait_for(first, 60)
    history = await store.history(memory.id)
    assert [e.metadata for e in history] == [{}, {"n": 2}, {"n": 1}]  # commit order
    times = [e.at for e in history]
    assert times == sorted(times) and times[0] == memory.created_at
    assert [second.updated_at, last.updated_at] == times[1:]  # a memory's updated_at is its history's time
    assert (await store.get(memory.id)).updated_at == last.updated_at


async def test_a_ttl_counts_from_the_commit(store: gm.Store) -> None:
    memory = await store.add("Brief.", ttl_seconds=30)
    assert memory.expires_at == memory.created_at + 30_000 and memory.updated_at == memory.created_at
    assert await store.get(memory.id) == memory


async def test_stats_counts_per_namespace(store: gm.Store, target: str) -> None:
    await store.add_many(
        [{"text": f"d{i}"} for i in range(2)] + [{"text": f"w{i}", "namespace": "work"} for i in range(3)]
    )
    await store.add("expired", namespace="old", ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    stats = await store.stats()
    assert stats.memories == 5
    assert stats.namespaces == {"default": 2, "work": 3}
    postgres = is_postgres_url(target)
    assert stats.backend == ("postgres" if postgres else "sqlite")
    assert stats.schema_version == (postgres_migrations.LATEST if postgres else sqlite_migrations.LATEST)
    assert stats.model == ModelSpec.default().identity
    assert stats.database_bytes is not None and stats.database_bytes > 0
    assert stats.to_dict()["memories"] == 5


# -- scope isolation ----------------------------------------------------------------------


async def test_one_user_never_sees_another_users_memories(store: gm.Store) -> None:
    alice = await store.add_many([
        {"text": "Prefers window seats on long flights.", "user_id": "alice", "metadata": {"topic": "travel"}},
        {"text": "Allergic to peanuts.", "user_id": "alice", "metadata": {"topic": "health"}},
    ])
    bob = await store.add_many([
        {"text": "Prefers window seats on long flights.", "user_id": "bob", "metadata": {"topic": "travel"}},
        {"text": "Allergic to shellfish.", "user_id": "bob", "metadata": {"topic": "health"}},
    ])
    alice_ids, bob_ids = set(ids(alice)), set(ids(bob))

    assert set(ids((await store.list(user_id="alice")).memories)) == alice_ids
    for mode in ("hybrid", "vector", "keyword"):
        hits = await store.search("window seats allergic", user_id="alice", mode=mode, limit=100)
        assert hits and {h.memory.id for h in hits} <= alice_ids
        hits = await store.search("window seats allergic", user_id="alice", filter={"topic": "travel"}, mode=mode)
        assert {h.memory.id for h in hits} == {alice[0].id}

    assert await store.delete_many(user_id="alice") == 2
    assert set(ids((await store.list(user_id="bob")).memories)) == bob_ids
    assert (await store.list(user_id="alice")).memories == []
    assert {h.memory.id for h in await store.search("window seats", user_id="bob", mode="vector")} == bob_ids


# -- expiry -------------------------------------------------------------------------------


async def test_a_memory_past_its_ttl_is_never_returned_and_is_purged(store: gm.Store) -> None:
    kept = await store.add("Lives in Lisbon.")
    brief = await store.add("Is in a meeting until noon.", ttl_seconds=0.5)
    assert brief.expires_at == brief.created_at + 500
    assert (await store.get(brief.id)).id == brief.id
    assert {h.memory.id for h in await store.search("meeting until noon", mode="keyword")} == {brief.id}

    await asyncio.sleep(0.6)
    with pytest.raises(NotFound):
        await store.get(brief.id)
    assert ids((await store.list()).memories) == [kept.id]
    for mode in ("hybrid", "vector", "keyword"):
        assert brief.id not in ids([h.memory for h in await store.search("meeting until noon", mode=mode)])
    assert await count(store) == 1
    assert await store.delete_many() == 1  # only the live one: the expired one is already gone
    assert [e.op for e in await store.history(brief.id)] == ["add"]


async def test_purge_expired_removes_rows_and_records_the_delete(sqlite_store: gm.Store, db_path: Path) -> None:
    store = sqlite_store  # looks inside the SQLite file
    kept = await store.add("Lives in Lisbon.")
    with pytest.raises(InvalidInput) as refused:  # an expiry in the past is refused outright
        await store.add("Never stored.", expires_at=rfc3339(timedelta(minutes=-5)))
    assert refused.value.path == "expires_at"
    past = await store.add("Was in Paris last week.", ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    with pytest.raises(NotFound):
        await store.get(past.id)
    assert ids((await store.list()).memories) == [kept.id]
    assert await store.search("Paris last week", mode="keyword") == []
    assert await count(store) == 1

    assert await store.purge_expired() == 1
    assert await store.purge_expired() == 0
    conn = sqlite3.connect(db_path)
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM memories")] == [kept.id]
    finally:
        conn.close()
    assert [e.op for e in await store.history(past.id)] == ["add", "delete"]
    assert (await store.get(kept.id)) == kept


# -- bad input ------------------------------------------------------------------------------

BAD_ADDS: list[tuple[dict[str, Any], str]] = [
    ({"text": ""}, "text"),
    ({"text": "  \n\t "}, "text"),
    ({"text": "x" * (MAX_TEXT_CHARS + 1)}, "text"),
    ({"text": 42}, "text"),
    ({"text": "ok", "metadata": ["a", "list"]}, "metadata"),
    ({"text": "ok", "metadata": "topic=travel"}, "metadata"),
    ({"text": "ok", "metadata": {"when": object()}}, "metadata"),
    ({"text": "ok", "metadata": {"big": "x" * 70_000}}, "metadata"),
    ({"text": "ok", "metadata": {"a": {"b": [1, 2**64]}}}, "metadata.a.b[1]"),  # not rounded to a float
    ({"text": "ok", "metadata": {"n": 2**63}}, "metadata.n"),  # past what SQLite's JSON keeps exact
    ({"text": "ok", "metadata": {"n": -(2**63) - 1}}, "metadata.n"),
    ({"text": "a NUL \x00 in the text"}, "text"),  # neither backend's text type stores it the same way
    ({"text": "ok", "metadata": {"k": ["x\x00y"]}}, "metadata"),
    ({"text": "ok", "metadata": {"k\x00": 1}}, "metadata"),
    ({"text": "ok", "user_id": "u\x001"}, "user_id"),
    ({"text": "ok", "id": "has space"}, "id"),
    ({"text": "ok", "id": "x" * 129}, "id"),
    ({"text": "ok", "id": "ünïcode"}, "id"),
    ({"text": "ok", "id": 7}, "id"),
    ({"text": "ok", "user_id": ""}, "user_id"),
    ({"text": "ok", "namespace": ""}, "namespace"),
    ({"text": "ok", "session_id": "s" * 257}, "session_id"),
    ({"text": "ok", "ttl_seconds": 0}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": -5}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": 0.0001}, "ttl_seconds"),  # expired on arrival, like a past expires_at
    ({"text": "ok", "ttl_seconds": 0.0009}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": "60"}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": True}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": 1e20}, "ttl_seconds"),  # past year 9999, and past SQLite's 64-bit integers
    ({"text": "ok", "ttl_seconds": float("inf")}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": float("nan")}, "ttl_seconds"),
    ({"text": "ok", "ttl_seconds": 60, "expires_at": "2030-01-01T00:00:00Z"}, "ttl_seconds"),
    ({"text": "ok", "expires_at": "next tuesday"}, "expires_at"),
    ({"text": "ok", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),  # no time zone
]


@pytest.mark.parametrize(("fields", "path"), BAD_ADDS)
async def test_add_rejects_bad_input_and_stores_nothing(store: gm.Store, fields: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.add(**fields)
    assert type(caught.value) is InvalidInput
    assert caught.value.path == path
    assert caught.value.message
    with pytest.raises(InvalidInput) as caught:
        await store.add_many([{"text": "fine"}, fields])
    assert caught.value.path == f"memories[1].{path}"
    assert await count(store) == 0


async def test_text_at_the_size_limit_is_accepted(store: gm.Store) -> None:
    memory = await store.add("y" * MAX_TEXT_CHARS)
    assert len((await store.get(memory.id)).text) == MAX_TEXT_CHARS


async def test_unknown_field_is_rejected(store: gm.Store) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.add_inputs([{"text": "ok", "colour": "red"}], batch=False)
    assert caught.value.path == "colour"
    assert await count(store) == 0


BAD_READS: list[tuple[str, dict[str, Any], str]] = [
    ("get", {"id": "bad id"}, "id"),
    ("get", {"id": ""}, "id"),
    ("delete", {"id": "x" * 129}, "id"),
    ("history", {"id": "no/slashes"}, "id"),
    ("update", {"id": "bad id", "text": "ok"}, "id"),
    ("list", {"limit": 0}, "limit"),
    ("list", {"limit": -1}, "limit"),
    ("list", {"limit": 1001}, "limit"),
    ("list", {"limit": True}, "limit"),
    ("list", {"limit": "10"}, "limit"),
    ("list", {"cursor": "garbage"}, "cursor"),
    ("list", {"cursor": "1.2.3"}, "cursor"),
    ("list", {"cursor": 5}, "cursor"),
    ("list", {"user_id": ""}, "user_id"),
    ("search", {"query": "q", "limit": 101}, "limit"),
    ("search", {"query": "q", "limit": 0}, "limit"),
    ("search", {"query": "q", "mode": "fuzzy"}, "mode"),
    ("search", {"query": ""}, "query"),
    ("search", {"query": "   "}, "query"),
    ("delete_many", {"agent_id": 5}, "agent_id"),
]


@pytest.mark.parametrize(("method", "kwargs", "path"), BAD_READS)
async def test_bad_arguments_raise_invalid_input_naming_them(
    store: gm.Store, method: str, kwargs: dict[str, Any], path: str
) -> None:
    kwargs = dict(kwargs)  # the parameter is shared by both backends' runs
    args = [kwargs.pop("id")] if "id" in kwargs else [kwargs.pop("query")] if "query" in kwargs else []
    with pytest.raises(InvalidInput) as caught:
        await getattr(store, method)(*args, **kwargs)
    assert caught.value.path == path
    assert caught.value.to_dict()["details"] == {"path": path}


# -- life cycle -------------------------------------------------------------------------------


async def test_a_closed_store_refuses_every_call(target: str) -> None:
    store = await gm.open(target)
    memory = await store.add("Still here after closing.")
    await store.close()
    await store.close()  # closing twice is fine
    assert not store.ready

    calls = [
        store.add("x"), store.add_many([{"text": "x"}]), store.add_inputs([{"text": "x"}]), store.get(memory.id),
        store.list(), store.update(memory.id, text="y"), store.delete(memory.id), store.delete_many(),
        store.history(memory.id), store.search("x"), store.stats(), store.purge_expired(),
    ]
    for call in calls:
        with pytest.raises(StoreClosed):
            await call

    async with gm.open(target) as again:
        assert await again.get(memory.id) == memory


async def test_memories_and_their_vectors_survive_a_reopen(target: str) -> None:
    async with gm.open(target) as store:
        dog = await store.add("Has a golden retriever named Biscuit.", user_id="u1")
        violin = await store.add("Plays the violin in a community orchestra.", user_id="u1")
        violin = await store.update(violin.id, text="Grows tomatoes in a small garden.")
    async with gm.open(target) as store:
        assert (await store.list(user_id="u1")).memories == [violin, dog]
        await store.wait_index()
        assert [h.memory for h in await store.search("what kind of dog", user_id="u1", mode="vector")][0] == dog
        assert [h.memory for h in await store.search("vegetable gardening", user_id="u1", mode="vector")][0] == violin
        assert [h.memory for h in await store.search("tomatoes", mode="keyword")] == [violin]


async def test_after_close_the_database_file_alone_holds_every_memory(db_path: Path, tmp_path: Path) -> None:
    async with gm.open(db_path) as store:
        await store.add_many([{"text": f"durable {i}"} for i in range(3)])
    copy = tmp_path / "copy.db"
    shutil.copyfile(db_path, copy)  # a backup of just the file, as users make of a stopped service
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 3
    finally:
        conn.close()


async def test_missing_model_files_fail_at_open(db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="model.onnx"):
        await gm.open(db_path, model_dir=empty)
    monkeypatch.setenv("GM_MODEL_DIR", str(empty))
    with pytest.raises(ModelNotFound):
        async with gm.open(db_path):
            pass
    assert not db_path.exists()
