"""Event time (``occurred_at``) on every backend with the real model: stored on add, batch
add, PATCH and import, kept by export; lists ordered by it and paged in either order;
lists and all three search modes restricted to a time range; bad input refused, nothing stored.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import gm
from gm import transfer
from gm.errors import InvalidInput
from gm.memory import format_time, parse_time
from tests.http_server import RunningServer, start_server, store_factory

JAN = "2024-01-15T09:30:00Z"
FEB = "2024-02-15T09:30:00Z"
MAR = "2024-03-15T09:30:00Z"
APR = "2024-04-15T09:30:00Z"


def ms(text: str) -> int:
    return parse_time(text, "t")


def texts(memories: list[gm.Memory]) -> list[str]:
    return [m.text for m in memories]


async def count(store: gm.Store) -> int:
    return (await store.stats()).memories


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target))
    yield running
    await running.stop()


# -- stored and returned ---------------------------------------------------------------------


async def test_occurred_at_defaults_to_the_add_time(store: gm.Store) -> None:
    memory = await store.add("Booked a table for Friday.")
    assert memory.occurred_at == memory.created_at
    assert await store.get(memory.id) == memory
    assert memory.to_dict()["occurred_at"] == memory.to_dict()["created_at"]


async def test_add_and_batch_add_keep_the_given_event_time(store: gm.Store) -> None:
    one = await store.add("Moved to Lisbon.", occurred_at="2023-06-01T12:00:00+02:00")
    assert one.occurred_at == ms("2023-06-01T10:00:00Z")
    assert one.to_dict()["occurred_at"] == "2023-06-01T10:00:00.000Z"
    assert one.created_at > one.occurred_at
    batch = await store.add_many([{"text": "Started a new job.", "occurred_at": JAN}, {"text": "No time given."}])
    assert [m.occurred_at for m in batch] == [ms(JAN), batch[1].created_at]
    for memory in (one, *batch):
        assert await store.get(memory.id) == memory


async def test_the_first_and_last_representable_times_are_kept(store: gm.Store) -> None:
    first = await store.add("The epoch.", occurred_at="1970-01-01T00:00:00Z")
    last = await store.add("The end of time.", occurred_at="9999-12-31T23:59:59.999Z")
    assert (await store.get(first.id)).occurred_at == 0  # 0 is a time, not "not given"
    assert (await store.get(last.id)).to_dict()["occurred_at"] == "9999-12-31T23:59:59.999Z"


async def test_update_sets_the_event_time_and_keeps_it_otherwise(store: gm.Store) -> None:
    memory = await store.add("Ran a half marathon.", occurred_at=JAN)
    moved = await store.update(memory.id, occurred_at=MAR)
    assert moved.occurred_at == ms(MAR) and moved.text == memory.text
    assert await store.get(memory.id) == moved
    kept = await store.update(memory.id, text="Ran a full marathon.")
    assert kept.occurred_at == ms(MAR)
    assert (await store.get(memory.id)).occurred_at == ms(MAR)


async def test_a_client_id_retry_with_another_event_time_conflicts(store: gm.Store) -> None:
    await store.add("Visited Rome.", id="trip", occurred_at=JAN)
    assert (await store.add("Visited Rome.", id="trip", occurred_at=JAN)).occurred_at == ms(JAN)
    assert (await store.add("Visited Rome.", id="trip")).occurred_at == ms(JAN)  # not given: not compared
    with pytest.raises(gm.errors.Conflict):
        await store.add("Visited Rome.", id="trip", occurred_at=FEB)


# -- list ------------------------------------------------------------------------------------


async def add_months(store: gm.Store) -> list[gm.Memory]:
    """Four memories added in one order (Feb, Apr, Jan, Mar) that happened in another."""
    return await store.add_many([
        {"text": "February: bought a bike.", "occurred_at": FEB, "user_id": "u1"},
        {"text": "April: sold the bike.", "occurred_at": APR, "user_id": "u1"},
        {"text": "January: learned to ride a bike.", "occurred_at": JAN, "user_id": "u1"},
        {"text": "March: crashed the bike.", "occurred_at": MAR, "user_id": "u1"},
    ])


async def test_list_orders_by_creation_or_by_event_time(store: gm.Store) -> None:
    made = await add_months(store)
    by_creation = await store.list(user_id="u1")
    assert texts(by_creation.memories) == texts(made)[::-1]
    assert texts((await store.list(user_id="u1", order_by="created_at")).memories) == texts(made)[::-1]
    by_event = await store.list(user_id="u1", order_by="occurred_at")
    assert [m.to_dict()["occurred_at"][:7] for m in by_event.memories] == ["2024-04", "2024-03", "2024-02", "2024-01"]


@pytest.mark.parametrize("order_by", ["created_at", "occurred_at"])
async def test_list_pages_in_either_order_without_duplicates_or_gaps(store: gm.Store, order_by: str) -> None:
    # Several memories share an event time: the rowid breaks the tie, so no page repeats or skips one.
    inputs = [{"text": f"entry {i}", "occurred_at": f"2024-01-{1 + i % 5:02d}T00:00:00Z"} for i in range(23)]
    await store.add_many(inputs)
    everything = (await store.list(limit=100, order_by=order_by)).memories
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list(limit=4, cursor=cursor, order_by=order_by)
        seen.extend(m.id for m in page.memories)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [m.id for m in everything] and len(set(seen)) == 23
    key = "occurred_at" if order_by == "occurred_at" else "created_at"
    assert [getattr(m, key) for m in everything] == sorted((getattr(m, key) for m in everything), reverse=True)


async def test_a_cursor_of_one_order_is_refused_by_the_other(store: gm.Store) -> None:
    await add_months(store)
    by_creation = await store.list(limit=2)
    by_event = await store.list(limit=2, order_by="occurred_at")
    assert by_creation.next_cursor and by_event.next_cursor
    with pytest.raises(InvalidInput, match="ordered by created_at") as caught:
        await store.list(limit=2, order_by="occurred_at", cursor=by_creation.next_cursor)
    assert caught.value.path == "cursor"
    with pytest.raises(InvalidInput, match="ordered by occurred_at") as caught:
        await store.list(limit=2, cursor=by_event.next_cursor)
    assert caught.value.path == "cursor"


async def test_list_keeps_the_event_times_in_range(store: gm.Store) -> None:
    await add_months(store)
    await store.add("Someone else's bike.", user_id="u2", occurred_at=FEB)

    async def listed(**kwargs: Any) -> list[str]:
        page = await store.list(user_id="u1", order_by="occurred_at", **kwargs)
        return [m.text.split(":")[0] for m in page.memories]

    assert await listed(occurred_after=FEB) == ["April", "March", "February"]  # after is inclusive
    assert await listed(occurred_before=MAR) == ["February", "January"]  # before is exclusive
    assert await listed(occurred_after=FEB, occurred_before=APR) == ["March", "February"]
    assert await listed(occurred_after=FEB, occurred_before=FEB) == []  # an empty range, not an error
    assert await listed(occurred_after="2024-02-15T10:30:00+01:00", occurred_before="2024-02-15T09:30:00.001Z") == [
        "February"]  # offsets are times like any other
    page = await store.list(user_id="u1", occurred_after=FEB, filter={"$not": {"x": 1}}, limit=2)
    assert len(page.memories) == 2 and page.next_cursor  # with the creation order, a filter, and paging
    rest = await store.list(user_id="u1", occurred_after=FEB, limit=2, cursor=page.next_cursor)
    assert sorted(texts(page.memories + rest.memories)) == sorted(
        ["February: bought a bike.", "April: sold the bike.", "March: crashed the bike."])


# -- search ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hybrid", "vector", "keyword"])
async def test_search_keeps_only_the_event_times_in_range(store: gm.Store, mode: str) -> None:
    await add_months(store)
    await store.add("May: bought another bike.", user_id="u1")  # occurred now

    async def found(**kwargs: Any) -> set[str]:
        hits = await store.search("bike", user_id="u1", mode=mode, limit=10, **kwargs)
        return {h.memory.text.split(":")[0] for h in hits}

    assert await found() == {"January", "February", "March", "April", "May"}
    assert await found(occurred_after=FEB, occurred_before=APR) == {"February", "March"}
    assert await found(occurred_after=MAR) == {"March", "April", "May"}
    assert await found(occurred_before=FEB) == {"January"}
    assert await found(occurred_after=APR, occurred_before=APR) == set()
    assert await found(occurred_after=FEB, filter={"missing": {"$exists": False}}, occurred_before=MAR) == {"February"}


async def test_search_in_a_time_range_follows_updates_of_the_event_time(store: gm.Store) -> None:
    memory = await store.add("Adopted a cat named Miso.", occurred_at=JAN)
    for mode in ("vector", "keyword", "hybrid"):
        assert [h.memory.id for h in await store.search("cat", mode=mode, occurred_after=FEB)] == []
    await store.update(memory.id, occurred_at=MAR)
    for mode in ("vector", "keyword", "hybrid"):
        hits = await store.search("cat", mode=mode, occurred_after=FEB)
        assert [h.memory.occurred_at for h in hits] == [ms(MAR)]


# -- bad input -------------------------------------------------------------------------------

BAD_TIMES = [
    ("next tuesday", "not RFC 3339"),
    ("2024-01-15T09:30:00", "no time zone"),
    ("1969-12-31T23:59:59Z", "before 1970"),
    ("9999-12-31T23:59:59+00:00x", "junk"),
    ("9999-12-31T20:00:00-05:00", "past 9999 in UTC"),
    (1700000000000, "a number"),
]


@pytest.mark.parametrize(("value", "why"), BAD_TIMES)
async def test_bad_event_times_are_refused_and_nothing_is_stored(store: gm.Store, value: Any, why: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await store.add("ok", occurred_at=value)
    assert caught.value.path == "occurred_at", why
    with pytest.raises(InvalidInput) as caught:
        await store.add_many([{"text": "fine"}, {"text": "ok", "occurred_at": value}])
    assert caught.value.path == "memories[1].occurred_at"
    assert await count(store) == 0
    memory = await store.add("kept as it was", occurred_at=JAN)
    with pytest.raises(InvalidInput) as caught:
        await store.update(memory.id, text="changed", occurred_at=value)
    assert caught.value.path == "occurred_at"
    assert await store.get(memory.id) == memory
    for kwargs in ({"occurred_after": value}, {"occurred_before": value}):
        with pytest.raises(InvalidInput) as caught:
            await store.list(**kwargs)
        assert caught.value.path == next(iter(kwargs))
        with pytest.raises(InvalidInput) as caught:
            await store.search("q", **kwargs)
        assert caught.value.path == next(iter(kwargs))


async def test_a_reversed_range_and_an_unknown_order_are_refused(store: gm.Store) -> None:
    with pytest.raises(InvalidInput, match="later than occurred_before") as caught:
        await store.list(occurred_after=MAR, occurred_before=FEB)
    assert caught.value.path == "occurred_after"
    with pytest.raises(InvalidInput) as caught:
        await store.search("q", occurred_after=MAR, occurred_before=FEB)
    assert caught.value.path == "occurred_after"
    with pytest.raises(InvalidInput) as caught:
        await store.list(order_by="updated_at")
    assert caught.value.path == "order_by"
    with pytest.raises(InvalidInput) as caught:
        await store.list(cursor="o12.x")
    assert caught.value.path == "cursor"


# -- HTTP ------------------------------------------------------------------------------------


async def test_http_add_patch_list_and_search_by_event_time(server: RunningServer) -> None:
    status, added = await server.call("POST", "/v1/memories", json={"text": "Flew to Tokyo.", "occurred_at": JAN})
    assert status == 201 and added["occurred_at"] == "2024-01-15T09:30:00.000Z"
    status, batch = await server.call("POST", "/v1/memories", json={"memories": [
        {"text": "Flew back from Tokyo.", "occurred_at": MAR}, {"text": "Flew nowhere.", "occurred_at": None}]})
    assert status == 201 and batch["memories"][0]["occurred_at"] == "2024-03-15T09:30:00.000Z"
    assert batch["memories"][1]["occurred_at"] == batch["memories"][1]["created_at"]  # null: the add time

    status, patched = await server.call("PATCH", f"/v1/memories/{added['id']}", json={"occurred_at": FEB})
    assert status == 200 and patched["occurred_at"] == "2024-02-15T09:30:00.000Z"
    assert patched["text"] == added["text"] and patched["created_at"] == added["created_at"]
    assert (await server.call("GET", f"/v1/memories/{added['id']}"))[1] == patched

    status, page = await server.call("GET", "/v1/memories", params={"order_by": "occurred_at", "limit": "1"})
    assert status == 200 and [m["text"] for m in page["memories"]] == ["Flew nowhere."]
    status, rest = await server.call(
        "GET", "/v1/memories", params={"order_by": "occurred_at", "cursor": page["next_cursor"]})
    assert status == 200 and [m["text"] for m in rest["memories"]] == ["Flew back from Tokyo.", "Flew to Tokyo."]
    status, body = await server.call("GET", "/v1/memories", params={"cursor": page["next_cursor"]})
    assert status == 422 and body["error"]["details"] == {"path": "cursor"}

    status, page = await server.call("GET", "/v1/memories", params={"occurred_after": FEB, "occurred_before": APR})
    assert status == 200 and [m["text"] for m in page["memories"]] == ["Flew back from Tokyo.", "Flew to Tokyo."]
    for mode in ("hybrid", "vector", "keyword"):
        status, body = await server.call("POST", "/v1/memories/search", json={
            "query": "Tokyo flight", "mode": mode, "occurred_after": FEB, "occurred_before": MAR})
        assert status == 200 and [h["memory"]["text"] for h in body["hits"]] == ["Flew to Tokyo."], mode


@pytest.mark.parametrize(("method", "path", "payload", "field"), [
    ("POST", "/v1/memories", {"json": {"text": "ok", "occurred_at": "yesterday"}}, "occurred_at"),
    ("POST", "/v1/memories", {"json": {"text": "ok", "occurred_at": "1969-07-20T20:17:00Z"}}, "occurred_at"),
    ("POST", "/v1/memories", {"json": {"memories": [{"text": "ok", "occurred_at": 5}]}}, "memories[0].occurred_at"),
    ("POST", "/v1/memories", {"json": {"text": "ok", "ocurred_at": JAN}}, "ocurred_at"),
    ("PATCH", "ID", {"json": {"occurred_at": None}}, "occurred_at"),
    ("PATCH", "ID", {"json": {"occurred_at": "2024-13-01T00:00:00Z"}}, "occurred_at"),
    ("PATCH", "ID", {"json": {"text": "changed", "occurred_at": ""}}, "occurred_at"),
    ("PATCH", "ID", {"json": {"occured_at": JAN}}, "occured_at"),
    ("GET", "/v1/memories", {"params": {"occurred_after": "2024-01-15"}}, "occurred_after"),
    ("GET", "/v1/memories", {"params": {"occurred_before": "10000-01-01T00:00:00Z"}}, "occurred_before"),
    ("GET", "/v1/memories", {"params": {"occurred_after": MAR, "occurred_before": FEB}}, "occurred_after"),
    ("GET", "/v1/memories", {"params": {"order_by": "text"}}, "order_by"),
    ("GET", "/v1/memories", {"params": {"occured_after": JAN}}, "occured_after"),
    ("POST", "/v1/memories/search", {"json": {"query": "q", "occurred_after": MAR, "occurred_before": FEB}},
     "occurred_after"),
    ("POST", "/v1/memories/search", {"json": {"query": "q", "occurred_before": "soon"}}, "occurred_before"),
    ("POST", "/v1/memories/search", {"json": {"query": "q", "occurred_at": JAN}}, "occurred_at"),
    ("POST", "/v1/memories/search", {"json": {"query": "q", "order_by": "occurred_at"}}, "order_by"),
])
async def test_http_bad_event_times_are_422_naming_the_field(
    server: RunningServer, method: str, path: str, payload: dict[str, Any], field: str
) -> None:
    status, memory = await server.call("POST", "/v1/memories", json={"text": "untouched", "occurred_at": JAN})
    assert status == 201
    status, body = await server.call(method, f"/v1/memories/{memory['id']}" if path == "ID" else path, **payload)
    assert status == 422, body
    assert body["error"]["details"] == {"path": field}
    assert (await server.call("GET", f"/v1/memories/{memory['id']}"))[1] == memory
    status, page = await server.call("GET", "/v1/memories")
    assert [m["id"] for m in page["memories"]] == [memory["id"]]  # nothing else stored


# -- export / import -------------------------------------------------------------------------


async def export_of(target: str, **options: Any) -> list[dict[str, Any]]:
    return [orjson.loads(line) async for line in transfer.export_lines_async(target, **options)]


@pytest.mark.parametrize("vectors", [False, True])
async def test_export_and_import_keep_the_event_time(target: str, tmp_path: Path, vectors: bool) -> None:
    async with gm.open(target) as source:
        made = await source.add_many([{"text": "Graduated.", "occurred_at": JAN}, {"text": "Said nothing of when."}])
    header, *lines = await export_of(target, vectors=vectors)
    assert header["greatmemory"]["memories"] == 2
    assert [line["occurred_at"] for line in lines] == [format_time(m.occurred_at) for m in made]
    assert all(("vector" in line) == vectors for line in lines)
    raw = [orjson.dumps(header)] + [orjson.dumps(line) for line in lines]
    assert transfer.check_fields(raw) == 3
    async with gm.open(tmp_path / "copy.db") as copy:
        report = await transfer.import_lines(copy, raw)
        assert report.imported == 2 and report.skipped == []
        assert report.embedded == (0 if vectors else 2)
        for memory in made:
            assert await copy.get(memory.id) == memory
        again = await transfer.import_lines(copy, raw)  # idempotent: the same content, event time included
        assert again.imported == 0 and {s.reason for s in again.skipped} == {"already present with the same content"}


async def test_import_defaults_the_event_time_to_the_lines_created_at_else_the_import(store: gm.Store) -> None:
    lines = [
        orjson.dumps({"id": "a", "text": "Given its own event time.", "occurred_at": FEB, "created_at": APR}),
        orjson.dumps({"id": "b", "text": "Only a creation time.", "created_at": JAN}),
        orjson.dumps({"id": "c", "text": "No times at all."}),
        orjson.dumps({"id": "d", "text": "A bad event time.", "occurred_at": "in spring"}),
    ]
    report = await transfer.import_lines(store, lines)
    assert report.imported == 3
    assert [(s.line, s.id) for s in report.skipped] == [(4, "d")] and "occurred_at" in report.skipped[0].reason
    a, b, c = [await store.get(i) for i in "abc"]
    assert (a.occurred_at, a.created_at) == (ms(FEB), ms(APR))
    assert b.occurred_at == b.created_at == ms(JAN)
    assert c.occurred_at == c.created_at > ms(APR)


def test_an_unknown_field_in_an_import_is_still_refused() -> None:
    with pytest.raises(transfer.UnknownField) as caught:
        transfer.check_fields([orjson.dumps({"text": "ok", "occurred_at": JAN}), orjson.dumps({"text": "ok",
                                                                                              "occured_at": JAN})])
    assert caught.value.line == 2 and caught.value.path == "occured_at"


# -- a database from before event times ------------------------------------------------------


async def add_apart(store: gm.Store, items: list[str], **scope: str) -> list[gm.Memory]:
    """One add each, a few milliseconds apart: distinct creation times."""
    made = []
    for text in items:
        made.append(await store.add(text, **scope))
        await asyncio.sleep(0.005)
    assert len({m.created_at for m in made}) == len(made)
    return made


async def test_a_v2_database_shows_the_creation_time_as_event_time_before_and_after_upgrading(db_path: Path) -> None:
    async with gm.open(db_path, target_version=2) as old:
        made = await add_apart(old, [f"old memory {i}" for i in range(3)], user_id="u1")
        # What an old release sees and serves: the event time is the creation time, in SQL too.
        assert [m.occurred_at for m in made] == [m.created_at for m in made]
        page = await old.list(order_by="occurred_at", occurred_after=format_time(made[1].created_at), limit=1)
        assert texts(page.memories) == ["old memory 2"]
        more = await old.list(order_by="occurred_at", occurred_after=format_time(made[1].created_at),
                              cursor=page.next_cursor)
        assert texts(more.memories) == ["old memory 1"]
        for mode in ("vector", "keyword", "hybrid"):
            hits = await old.search("old memory", mode=mode, occurred_before=format_time(made[1].created_at))
            assert [h.memory.id for h in hits] == [made[0].id], mode
    assert sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0] == 2

    async with gm.open(db_path) as upgraded:
        assert upgraded.backend.schema_version >= 3
        for memory in made:
            assert await upgraded.get(memory.id) == memory
        raw = sqlite3.connect(db_path).execute("SELECT count(*) FROM memories WHERE occurred_at IS NULL").fetchone()
        assert raw[0] == 3  # the old rows were not rewritten: read through coalesce(occurred_at, created_at)
        newer = await upgraded.add("new memory", user_id="u1", occurred_at=JAN)
        page = await upgraded.list(user_id="u1", order_by="occurred_at")
        assert [m.id for m in page.memories] == [m.id for m in made[::-1]] + [newer.id]
        hits = await upgraded.search("memory", mode="keyword", occurred_after=format_time(made[0].created_at))
        assert {h.memory.id for h in hits} == {m.id for m in made}


async def test_a_postgres_database_capped_below_v3_lists_and_searches_by_creation_time(pg_url: str) -> None:
    async with gm.open(pg_url, target_version=2) as old:
        made = await add_apart(old, [f"old memory {i}" for i in range(3)])
        assert [m.occurred_at for m in made] == [m.created_at for m in made]
        page = await old.list(order_by="occurred_at", occurred_before=format_time(made[2].created_at))
        assert [m.id for m in page.memories] == [made[1].id, made[0].id]
        for mode in ("vector", "keyword", "hybrid"):
            hits = await old.search("old memory", mode=mode, occurred_after=format_time(made[2].created_at))
            assert [h.memory.id for h in hits] == [made[2].id], mode
    async with gm.open(pg_url) as upgraded:
        for memory in made:
            assert await upgraded.get(memory.id) == memory
