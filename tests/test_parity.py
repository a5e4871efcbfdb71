"""The library's behaviour, run through both handles: the embedded store and gm.connect to a
real server over the same kind of SQLite file. Every test here holds for both, so code moves
between them by changing one line: adds, batches, get, list and its cursors, filters and
time ranges, update, delete, bulk delete, history, stats, expiry and the typed errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import gm
from gm.embedding import ModelSpec
from gm.errors import Conflict, InvalidInput, NotFound, StoreClosed
from gm.memory import format_time, parse_time
from tests.handles import HANDLES, Memories, open_handle

JAN, FEB, MAR, APR = (f"2024-{m:02d}-15T09:30:00Z" for m in (1, 2, 3, 4))


@pytest.fixture(params=HANDLES)
async def mem(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Memories]:
    async with open_handle(request.param, tmp_path / "mem.db") as handle:
        yield handle


def ids(memories: list[gm.Memory]) -> list[str]:
    return [m.id for m in memories]


async def count(mem: Memories) -> int:
    return (await mem.stats()).memories


# -- add and get ----------------------------------------------------------------------------


async def test_add_fills_in_the_defaults_and_get_returns_the_same_memory(mem: Memories) -> None:
    memory = await mem.add("Prefers window seats on long flights.")
    assert isinstance(memory, gm.Memory)
    assert (memory.text, memory.namespace, memory.metadata, memory.expires_at) == (
        "Prefers window seats on long flights.", "default", {}, None)
    assert (memory.user_id, memory.agent_id, memory.session_id) == (None, None, None)
    assert memory.created_at == memory.updated_at == memory.occurred_at
    assert await mem.get(memory.id) == memory


async def test_add_keeps_metadata_scopes_and_times(mem: Memories) -> None:
    metadata = {"topic": "travel", "priority": 2, "ratio": 0.5, "ok": True, "none": None,
                "trip": {"city": "Oslo", "legs": [1, 2]}, "big": 2**63 - 1}
    later = datetime.now(UTC) + timedelta(days=7)
    memory = await mem.add("Flies to Oslo in May.", namespace="work", user_id="u1", agent_id="planner",
                           session_id="s9", metadata=metadata, expires_at=later,
                           occurred_at=datetime(2023, 6, 1, 14, tzinfo=UTC))
    assert (memory.namespace, memory.user_id, memory.agent_id, memory.session_id) == ("work", "u1", "planner", "s9")
    assert memory.metadata == metadata
    assert memory.expires_at == (later - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert memory.to_dict()["occurred_at"] == "2023-06-01T14:00:00.000Z"
    assert await mem.get(memory.id) == memory
    brief = await mem.add("Brief.", ttl_seconds=30)
    assert brief.expires_at == brief.created_at + 30_000


async def test_a_client_id_again_returns_the_stored_memory(mem: Memories) -> None:
    item = {"id": "import:42", "text": "Allergic to peanuts.", "user_id": "u1", "metadata": {"topic": "health"}}
    first = await mem.add(**item)
    assert first.id == "import:42"
    assert await mem.add(**item) == first
    assert await mem.add_many([item]) == [first]
    assert await count(mem) == 1
    assert [e.op for e in await mem.history("import:42")] == ["add"]


@pytest.mark.parametrize(
    "change",
    [{"text": "Allergic to cats."}, {"metadata": {"topic": "food"}}, {"user_id": "u2"}, {"namespace": "work"},
     {"occurred_at": FEB}],
)
async def test_a_client_id_with_other_content_is_a_conflict(mem: Memories, change: dict[str, Any]) -> None:
    item = {"id": "import:42", "text": "Allergic to peanuts.", "user_id": "u1", "metadata": {"topic": "health"},
            "occurred_at": JAN}
    original = await mem.add(**item)
    with pytest.raises(Conflict, match="import:42") as caught:
        await mem.add(**{**item, **change})
    assert (caught.value.code, caught.value.status) == ("conflict", 409)
    assert await mem.get("import:42") == original
    assert await count(mem) == 1


async def test_add_many_stores_a_batch_in_input_order(mem: Memories) -> None:
    inputs = [{"text": f"fact {i}", "user_id": f"u{i % 2}", "metadata": {"i": i}} for i in range(5)]
    memories = await mem.add_many(inputs)
    assert [(m.text, m.user_id, m.metadata) for m in memories] == [
        (f"fact {i}", f"u{i % 2}", {"i": i}) for i in range(5)]
    assert [await mem.get(m.id) for m in memories] == memories


async def test_a_batch_with_one_bad_or_conflicting_item_stores_nothing(mem: Memories) -> None:
    with pytest.raises(InvalidInput) as caught:
        await mem.add_many([{"text": "fine"}, {"text": "also fine"}, {"text": "   "}])
    assert caught.value.path == "memories[2].text"
    original = await mem.add("The original.", id="taken")
    with pytest.raises(Conflict):
        await mem.add_many([{"text": "new one"}, {"id": "taken", "text": "Not the original."}])
    assert (await mem.list()).memories == [original]


async def test_an_unknown_id_is_not_found_with_the_librarys_message(mem: Memories) -> None:
    for call in (mem.get("no-such-memory"), mem.history("no-such-memory"), mem.delete("no-such-memory"),
                 mem.update("no-such-memory", text="x"), mem.get("search")):
        with pytest.raises(NotFound, match=r"^no memory with id '(no-such-memory|search)'$") as caught:
            await call
        assert (caught.value.code, caught.value.status) == ("not_found", 404)


async def test_ids_are_sent_as_they_are(mem: Memories) -> None:
    """Every character an id may hold reaches the server unchanged; "." and ".." are ids, not path steps."""
    for memory_id in (".", "..", "a.b", "x:1", "-_.:"):
        memory = await mem.add(f"id {memory_id}", id=memory_id)
        assert await mem.get(memory_id) == memory
        assert [e.text for e in await mem.history(memory_id)] == [f"id {memory_id}"]
        assert (await mem.update(memory_id, metadata={"k": 1})).metadata == {"k": 1}
    await mem.delete("..")
    assert sorted(ids((await mem.list()).memories)) == sorted([".", "a.b", "x:1", "-_.:"])


# -- list -----------------------------------------------------------------------------------


async def test_list_is_newest_first_within_its_scope(mem: Memories) -> None:
    await mem.add_many([
        {"text": "a", "user_id": "u1"},
        {"text": "b", "user_id": "u1", "agent_id": "bot"},
        {"text": "c", "user_id": "u1", "agent_id": "bot", "session_id": "s1"},
        {"text": "d", "user_id": "u2", "agent_id": "bot"},
        {"text": "e", "namespace": "work", "user_id": "u1"},
    ])

    async def listed(**scope: str) -> list[str]:
        return [m.text for m in (await mem.list(**scope)).memories]

    assert await listed() == ["d", "c", "b", "a"]
    assert await listed(user_id="u1") == ["c", "b", "a"]
    assert await listed(user_id="u1", agent_id="bot") == ["c", "b"]
    assert await listed(session_id="s1") == ["c"]
    assert await listed(namespace="work") == ["e"]
    assert await listed(namespace="nowhere") == []


async def test_list_pages_with_a_cursor_without_duplicates_or_gaps(mem: Memories) -> None:
    made = await mem.add_many([{"text": f"entry {i}", "user_id": "u1"} for i in range(23)])
    await mem.add("someone else's", user_id="u2")
    seen: list[str] = []
    sizes = []
    cursor = None
    while True:
        page = await mem.list(user_id="u1", limit=10, cursor=cursor)
        assert isinstance(page, gm.Page)
        sizes.append(len(page.memories))
        seen += ids(page.memories)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert sizes == [10, 10, 3]
    assert seen == ids(made)[::-1]


async def test_list_applies_a_filter(mem: Memories) -> None:
    await mem.add_many([
        {"text": "window seat", "metadata": {"topic": "travel", "n": 1}},
        {"text": "peanuts", "metadata": {"topic": "health", "n": 5}},
        {"text": "aisle seat", "metadata": {"topic": "travel", "n": 3}},
    ])
    assert [m.text for m in (await mem.list(filter={"topic": "travel"})).memories] == ["aisle seat", "window seat"]
    assert [m.text for m in (await mem.list(filter={"n": {"$gte": 3}}, limit=1)).memories] == ["aisle seat"]
    with pytest.raises(gm.errors.InvalidFilter) as caught:
        await mem.list(filter={"n": {"$near": 3}})
    assert caught.value.path == "filter.n.$near"


async def test_list_by_event_time_and_within_a_range(mem: Memories) -> None:
    made = await mem.add_many([
        {"text": "February", "occurred_at": FEB}, {"text": "April", "occurred_at": APR},
        {"text": "January", "occurred_at": JAN}, {"text": "March", "occurred_at": MAR},
    ])
    assert [m.text for m in (await mem.list()).memories] == [m.text for m in made][::-1]
    by_event = await mem.list(order_by="occurred_at")
    assert [m.text for m in by_event.memories] == ["April", "March", "February", "January"]

    async def listed(**bounds: Any) -> list[str]:
        return [m.text for m in (await mem.list(order_by="occurred_at", **bounds)).memories]

    assert await listed(occurred_after=FEB) == ["April", "March", "February"]  # inclusive
    assert await listed(occurred_before=MAR) == ["February", "January"]  # exclusive
    assert await listed(occurred_after=FEB, occurred_before=datetime(2024, 4, 15, 9, 30, tzinfo=UTC)) == [
        "March", "February"]
    first = await mem.list(limit=2, order_by="occurred_at")
    rest = await mem.list(limit=2, order_by="occurred_at", cursor=first.next_cursor)
    assert [m.text for m in first.memories + rest.memories] == ["April", "March", "February", "January"]
    with pytest.raises(InvalidInput, match="ordered by occurred_at") as caught:
        await mem.list(limit=2, cursor=first.next_cursor)
    assert caught.value.path == "cursor"
    with pytest.raises(InvalidInput) as caught:
        await mem.list(occurred_after=MAR, occurred_before=FEB)
    assert caught.value.path == "occurred_after"


# -- update ---------------------------------------------------------------------------------


async def test_update_changes_text_metadata_expiry_and_event_time(mem: Memories) -> None:
    memory = await mem.add("Has a golden retriever named Biscuit.", metadata={"topic": "pets"})
    await mem.add("Plays the violin in a community orchestra.")
    updated = await mem.update(memory.id, text="The quarterly tax return is due in April.")
    assert (updated.text, updated.metadata, updated.created_at) == (
        "The quarterly tax return is due in April.", {"topic": "pets"}, memory.created_at)
    assert await mem.get(memory.id) == updated
    [top, *_] = await mem.search("when must I file my taxes", mode="vector")
    assert top.memory == updated  # re-embedded and re-indexed

    assert (await mem.update(memory.id, metadata={"confirmed": True})).metadata == {"confirmed": True}
    later = datetime.now(UTC) + timedelta(days=7)
    assert (await mem.update(memory.id, expires_at=later.isoformat())).expires_at is not None
    assert (await mem.update(memory.id, expires_at=None)).expires_at is None  # None clears it
    moved = await mem.update(memory.id, occurred_at=MAR)
    assert moved.occurred_at == parse_time(MAR, "t") and moved.expires_at is None
    assert await mem.get(memory.id) == moved


async def test_bad_updates_name_the_field_and_change_nothing(mem: Memories) -> None:
    memory = await mem.add("Likes tea.", metadata={"topic": "food"})
    with pytest.raises(InvalidInput, match="give at least one of"):
        await mem.update(memory.id)
    for change, path in (({"text": "  "}, "text"), ({"metadata": ["not", "an", "object"]}, "metadata"),
                         ({"expires_at": "next tuesday"}, "expires_at"), ({"occurred_at": "2024-01-15"}, "occurred_at"),
                         ({"expires_at": (datetime.now(UTC) - timedelta(seconds=1)).isoformat()}, "expires_at")):
        with pytest.raises(InvalidInput) as caught:
            await mem.update(memory.id, **change)
        assert caught.value.path == path
    assert await mem.get(memory.id) == memory
    assert [e.op for e in await mem.history(memory.id)] == ["add"]


# -- delete ---------------------------------------------------------------------------------


async def test_delete_removes_one_memory_everywhere(mem: Memories) -> None:
    gone = await mem.add("Has a golden retriever named Biscuit.")
    kept = await mem.add("Plays the violin in a community orchestra.")
    assert await mem.delete(gone.id) is None
    with pytest.raises(NotFound):
        await mem.get(gone.id)
    assert (await mem.list()).memories == [kept]
    for mode in ("vector", "keyword", "hybrid"):
        assert gone.id not in [h.memory.id for h in await mem.search("golden retriever dog", mode=mode)]
    with pytest.raises(NotFound):
        await mem.delete(gone.id)


async def test_delete_many_by_scope_and_filter(mem: Memories) -> None:
    made = await mem.add_many([
        {"text": "u1 travel 1", "user_id": "u1", "metadata": {"topic": "travel"}},
        {"text": "u1 travel 2", "user_id": "u1", "metadata": {"topic": "travel"}},
        {"text": "u1 health", "user_id": "u1", "metadata": {"topic": "health"}},
        {"text": "u2 travel", "user_id": "u2", "metadata": {"topic": "travel"}},
        {"text": "work travel", "namespace": "work", "user_id": "u1", "metadata": {"topic": "travel"}},
    ])
    assert await mem.delete_many(user_id="u1", filter={"topic": "travel"}) == 2  # in the default namespace
    assert {m.text for m in (await mem.list()).memories} == {"u1 health", "u2 travel"}
    assert [e.op for e in await mem.history(made[0].id)] == ["add", "delete"]
    assert await mem.delete_many(user_id="u1", filter={"topic": "travel"}) == 0
    assert await mem.delete_many(namespace="work") == 1
    assert await mem.delete_many() == 2
    assert (await mem.stats()).namespaces == {}


async def test_a_namespace_constraint_makes_a_memory_elsewhere_an_unknown_id(mem: Memories) -> None:
    theirs = await mem.add("Theirs.", namespace="b", id="held-1", metadata={"k": "b"})
    for call in (mem.get("held-1", namespace="a"), mem.history("held-1", namespace="a"),
                 mem.update("held-1", metadata={"k": "a"}, namespace="a"),
                 mem.update("held-1", text="Mine.", namespace="a"), mem.delete("held-1", namespace="a")):
        with pytest.raises(NotFound) as caught:
            await call
        assert caught.value.message == "no memory with id 'held-1'"
    assert await mem.get("held-1", namespace="b") == theirs == await mem.get("held-1")
    assert (await mem.update("held-1", metadata={"k": "b2"}, namespace="b")).metadata == {"k": "b2"}
    await mem.delete("held-1", namespace="b")
    with pytest.raises(InvalidInput) as refused:
        await mem.get("held-1", namespace="")
    assert refused.value.path == "namespace"


# -- history, stats, expiry -----------------------------------------------------------------


async def test_history_records_every_change_in_commit_order(mem: Memories) -> None:
    memory = await mem.add("Likes tea.", metadata={"topic": "food"}, namespace="home")
    await mem.update(memory.id, text="Likes green tea.")
    await mem.update(memory.id, metadata={"topic": "drinks"})
    await mem.delete(memory.id)
    history = await mem.history(memory.id)
    assert all(isinstance(e, gm.HistoryEntry) for e in history)
    assert [(e.op, e.text, e.metadata, e.namespace) for e in history] == [
        ("add", "Likes tea.", {"topic": "food"}, "home"),
        ("update", "Likes green tea.", {"topic": "food"}, "home"),
        ("update", "Likes green tea.", {"topic": "drinks"}, "home"),
        ("delete", "Likes green tea.", {"topic": "drinks"}, "home"),
    ]
    times = [e.at for e in history]
    assert times == sorted(times) and times[0] == memory.created_at
    assert await mem.history(memory.id, namespace="home") == history
    with pytest.raises(NotFound):
        await mem.history(memory.id, namespace="elsewhere")


async def test_stats_counts_live_memories_per_namespace(mem: Memories) -> None:
    await mem.add_many([{"text": f"d{i}"} for i in range(2)]
                       + [{"text": f"w{i}", "namespace": "work"} for i in range(3)])
    await mem.add("expired", namespace="old", ttl_seconds=0.05)
    await asyncio.sleep(0.1)
    stats = await mem.stats()
    assert isinstance(stats, gm.Stats)
    assert (stats.memories, stats.namespaces, stats.backend) == (5, {"default": 2, "work": 3}, "sqlite")
    assert stats.schema_version >= 3 and stats.model == ModelSpec.default().identity
    assert stats.extra["model_label"] == "all-MiniLM-L6-v2-int8"
    assert stats.database_bytes is not None and stats.database_bytes > 0
    assert stats.extra["writes"]["status"] == "ok" and stats.extra["index_ready"] is True


async def test_a_memory_past_its_ttl_is_never_returned(mem: Memories) -> None:
    kept = await mem.add("Lives in Lisbon.")
    brief = await mem.add("Is in a meeting until noon.", ttl_seconds=0.3)
    assert (await mem.get(brief.id)) == brief
    await asyncio.sleep(0.4)
    with pytest.raises(NotFound):
        await mem.get(brief.id)
    assert (await mem.list()).memories == [kept]
    for mode in ("hybrid", "vector", "keyword"):
        assert brief.id not in [h.memory.id for h in await mem.search("meeting until noon", mode=mode)]
    assert await count(mem) == 1
    with pytest.raises(NotFound):  # nor revived by an update
        await mem.update(brief.id, expires_at=None)


# -- life cycle -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HANDLES)
async def test_a_closed_handle_refuses_every_call(kind: str, tmp_path: Path) -> None:
    async with open_handle(kind, tmp_path / "mem.db") as handle:
        memory = await handle.add("Still here after closing.")
        assert handle.ready
        await handle.close()
        await handle.close()  # closing twice is fine
        assert not handle.ready
        for call in (handle.add("x"), handle.add_many([{"text": "x"}]), handle.get(memory.id), handle.list(),
                     handle.update(memory.id, text="y"), handle.delete(memory.id), handle.delete_many(),
                     handle.history(memory.id), handle.search("x"), handle.stats()):
            with pytest.raises(StoreClosed):
                await call
    async with gm.open(tmp_path / "mem.db") as again:
        assert await again.get(memory.id) == memory


async def test_times_are_milliseconds_and_to_dict_is_the_http_shape(mem: Memories) -> None:
    memory = await mem.add("Moved to Lisbon.", occurred_at="2023-06-01T14:00:00.1234+02:00")
    assert memory.occurred_at == parse_time("2023-06-01T12:00:00.123Z", "t")
    assert memory.to_dict()["created_at"] == format_time(memory.created_at)
    assert gm.Memory.from_dict(memory.to_dict()) == memory


# -- re-embedding --------------------------------------------------------------------------


async def test_reembed_switches_the_model_and_the_old_vectors_go_later(mem: Memories, wide_model_dir: Path) -> None:
    await mem.add_many([{"text": f"note {i}: the {['heron', 'otter'][i % 2]} swims", "user_id": "u1"}
                        for i in range(10)])
    seen: list[gm.Progress] = []
    following = {"poll_seconds": 0.02} if isinstance(mem, gm.RemoteStore) else {}
    report = await mem.reembed(wide_model_dir, progress=seen.append, batch=4, **following)
    wide = ModelSpec.from_dir(wide_model_dir).identity
    assert (report.embedded, report.total, report.resumed) == (10, 10, False) and report.model.startswith(wide)
    assert seen[-1] == gm.Progress("switched", 10, 10, seen[-1].rate, seen[-1].eta_seconds)
    assert (await mem.stats()).model == wide
    assert (await mem.search("the otter swims", user_id="u1", limit=1))[0].memory.text.endswith("otter swims")
    with pytest.raises(InvalidInput, match="gmem reindex"):  # already that model's
        await mem.reembed(wide_model_dir)
    assert await mem.end_reembed(drop_old=True) is True
    assert await mem.end_reembed(drop_old=True) is False
    assert await mem.end_reembed(drop_old=False) is False  # nothing to cancel
