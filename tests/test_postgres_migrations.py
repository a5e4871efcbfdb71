"""The promises of the "Upgrades & migrations" page on the real Postgres: numbered steps
recorded in ``gm_schema``, one transaction a step, exactly one instance migrating while the
others wait (readyz says ``migrating``), the downgrade guard and its additive exception,
and the test-only schema cap standing in for an older release.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

import gm
from gm.cli.exits import EXIT_SCHEMA
from gm.embedding import ModelSpec
from gm.errors import MigrationFailed, SchemaTooNew
from gm.storage.postgres import PostgresBackend
from gm.storage.postgres_migrations import LATEST, MIGRATION_LOCK, STEPS, Step
from gm.store import Store
from tests.conftest import pg_fetch
from tests.http_server import spawn_server, start_server, store_factory

NEXT = LATEST + 1

# A "newer release": the real steps plus one more, either expand (additive) or contract.
EXPAND = Step(NEXT, "expand: a nullable mood column and a reactions table", (
    "ALTER TABLE memories ADD COLUMN mood text",
    "CREATE TABLE reactions (memory_id text NOT NULL, emoji text NOT NULL)",
))
CONTRACT = Step(NEXT, "contract: memories.metadata becomes attributes", (
    "ALTER TABLE memories ADD COLUMN attributes jsonb",
), additive=False)


async def schema_rows(url: str) -> list[tuple[Any, ...]]:
    rows = await pg_fetch(
        url, "SELECT version, name, applied_at, release, compatible_from FROM gm_schema ORDER BY version"
    )
    return [tuple(r) for r in rows]


async def versions(url: str) -> list[int]:
    return [row[0] for row in await schema_rows(url)]


async def exists(url: str, relation: str) -> bool:
    return bool((await pg_fetch(url, "SELECT to_regclass($1) IS NOT NULL", relation))[0][0])


async def columns(url: str) -> list[tuple[str, str, str]]:
    rows = await pg_fetch(
        url,
        "SELECT table_name, column_name, udt_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, column_name",
    )
    return [tuple(r) for r in rows]


async def memory_rows(url: str) -> list[tuple[Any, ...]]:
    rows = await pg_fetch(url, "SELECT id, namespace, user_id, text, metadata, created_at, updated_at FROM memories "
                            "ORDER BY id")
    return [tuple(r) for r in rows]


async def migration_lock(url: str) -> tuple[int, int]:
    """(holders, waiters) of the migration advisory lock on ``url``'s database."""
    rows = await pg_fetch(
        url,
        "SELECT granted, count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1 GROUP BY granted",
        MIGRATION_LOCK >> 32, MIGRATION_LOCK & 0xFFFFFFFF,
    )
    counts = {r[0]: r[1] for r in rows}
    return counts.get(True, 0), counts.get(False, 0)


def pg_store(url: str, **options: Any) -> Store:
    return Store(PostgresBackend(url, **options), ModelSpec.default())


async def wait_for_hit(store: gm.Store, query: str, memory_id: str, **scope: Any) -> None:
    """Another instance's write reaches this one's vector index through the change feed."""
    deadline = time.monotonic() + 10
    while True:
        hits = await store.search(query, mode="vector", limit=3, **scope)
        if memory_id in [h.memory.id for h in hits]:
            return
        assert time.monotonic() < deadline, f"{memory_id} never became searchable: {hits}"
        await asyncio.sleep(0.1)


# -- a fresh database ------------------------------------------------------------------------


async def test_a_fresh_database_is_migrated_to_latest_and_every_step_is_recorded(pg_url: str) -> None:
    started = datetime.now(UTC)
    async with gm.open(pg_url) as store:
        assert store.backend.schema_version == LATEST
        assert (await store.stats()).schema_version == LATEST
        assert store.backend.phase == "ready"
    rows = await schema_rows(pg_url)
    assert [r[0] for r in rows] == [s.version for s in STEPS] == list(range(1, LATEST + 1))
    assert [r[1] for r in rows] == [s.name for s in STEPS]
    assert {r[3] for r in rows} == {gm.__version__}
    assert {r[4] for r in rows} == {1}  # every real step is additive: releases from v1 on can run on it
    applied = [r[2] for r in rows]
    assert applied == sorted(applied)
    assert all(started - timedelta(seconds=5) <= at <= datetime.now(UTC) for at in applied)

    async with gm.open(pg_url) as store:  # current already: nothing is applied or recorded again
        assert store.backend.schema_version == LATEST
    assert await schema_rows(pg_url) == rows


# -- one transaction a step ----------------------------------------------------------------------


async def test_a_failing_step_is_rolled_back_alone_and_a_fixed_run_succeeds(pg_url: str) -> None:
    bad = Step(NEXT, "tags table", (
        "CREATE TABLE tags (memory_id text NOT NULL, tag text NOT NULL)",
        "CREATE INDEX tags_by_tag ON tags (tag)",
        "INSERT INTO no_such_table VALUES (1)",
    ))
    with pytest.raises(MigrationFailed) as caught:
        await gm.open(pg_url, steps=(*STEPS, bad))
    error = caught.value
    assert (error.step, error.name, error.code) == (NEXT, "tags table", "migration_failed")
    assert f"migration step {NEXT} (tags table) failed and was rolled back" in error.message
    assert "no_such_table" in error.message
    assert f"stays at schema version {LATEST}" in error.message

    # The steps before it committed on their own; the failing one left nothing behind.
    assert await versions(pg_url) == list(range(1, LATEST + 1))
    assert await exists(pg_url, "memories")
    assert not await exists(pg_url, "tags") and not await exists(pg_url, "tags_by_tag")
    assert await migration_lock(pg_url) == (0, 0)  # and the lock was given back

    # This release opens the database as it was left, and writes to it.
    async with gm.open(pg_url) as store:
        kept = await store.add("Written between the failed and the fixed upgrade.", user_id="u1")

    fixed = Step(NEXT, "tags table", bad.statements[:2])
    async with gm.open(pg_url, steps=(*STEPS, fixed)) as store:
        assert store.backend.schema_version == NEXT
        assert (await store.get(kept.id)).text == kept.text
    assert await versions(pg_url) == list(range(1, NEXT + 1))
    assert await exists(pg_url, "tags") and await exists(pg_url, "tags_by_tag")


# -- several instances at once ------------------------------------------------------------------


async def test_exactly_one_of_four_starting_instances_migrates(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    slow = Step(NEXT, "slow step with a side effect", (
        "CREATE TABLE slow_marker (n int)",
        "INSERT INTO slow_marker VALUES (1)",
        "SELECT pg_sleep(1)",
    ))
    steps = (*STEPS, slow)
    stores = [pg_store(pg_url, steps=steps) for _ in range(4)]
    caplog.set_level(logging.INFO, logger="gm.storage.postgres_migrations")
    opening = asyncio.ensure_future(asyncio.gather(*(s.open() for s in stores)))
    seen: list[tuple[tuple[str, ...], tuple[int, int]]] = []
    try:
        while not opening.done():
            seen.append((tuple(s.backend.phase for s in stores), await migration_lock(pg_url)))
            await asyncio.sleep(0.05)
        await opening

        # One held the lock and migrated while the three others waited on it, all "migrating".
        assert (("migrating",) * 4, (1, 3)) in seen, seen
        assert all(holders <= 1 for _, (holders, _) in seen)
        applied = [r.getMessage() for r in caplog.records if r.getMessage().startswith("migrating ")]
        assert len(applied) == len(steps), applied  # each step logged once, by one instance

        assert await versions(pg_url) == [s.version for s in steps]
        assert (await pg_fetch(pg_url, "SELECT count(*) FROM slow_marker"))[0][0] == 1
        assert [(s.backend.phase, s.backend.schema_version, s.ready) for s in stores] == [("ready", NEXT, True)] * 4

        # They share one database: a write through one is seen by another.
        memory = await stores[0].add("Shared by every instance after the migration.", user_id="u1")
        assert (await stores[3].get(memory.id)).text == memory.text
        await wait_for_hit(stores[2], "shared by every instance", memory.id, user_id="u1")
    finally:
        if not opening.done():
            opening.cancel()
        await asyncio.gather(opening, return_exceptions=True)
        for store in stores:
            await store.close()


async def test_an_instance_dying_mid_step_leaves_no_half_step_and_a_waiting_one_finishes(pg_url: str) -> None:
    slow = Step(NEXT, "slow step with a side effect", (
        "CREATE TABLE slow_marker (n int)",
        "INSERT INTO slow_marker VALUES (1)",
        "SELECT pg_sleep(2)",
    ))
    steps = (*STEPS, slow)
    first, second = pg_store(pg_url, steps=steps), pg_store(pg_url, steps=steps)
    dying = asyncio.ensure_future(first.open())
    waiting: asyncio.Future[Store] | None = None
    try:
        deadline = time.monotonic() + 10
        while await migration_lock(pg_url) != (1, 0):
            assert time.monotonic() < deadline, "the first instance never took the migration lock"
            await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(second.open())
        while await migration_lock(pg_url) != (1, 1):
            assert time.monotonic() < deadline, "the second instance never waited on the lock"
            await asyncio.sleep(0.02)
        while not await exists(pg_url, "gm_schema") or await versions(pg_url) != list(range(1, LATEST + 1)):
            assert time.monotonic() < deadline, "the first instance never reached the slow step"
            await asyncio.sleep(0.02)
        # The migrating instance's connection dies inside the slow step (a crash, a killed pod).
        await pg_fetch(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = $1 AND objid::bigint = $2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            MIGRATION_LOCK >> 32, MIGRATION_LOCK & 0xFFFFFFFF,
        )
        with pytest.raises(gm.errors.StorageUnavailable):
            await dying
        assert first.backend.phase == "failed"
        await asyncio.wait_for(waiting, 20)
        assert (second.backend.phase, second.backend.schema_version) == ("ready", NEXT)
        assert await versions(pg_url) == [s.version for s in steps]
        assert (await pg_fetch(pg_url, "SELECT count(*) FROM slow_marker"))[0][0] == 1  # the step ran once, whole
    finally:
        for task in (dying, waiting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await first.close()
        await second.close()


async def test_readyz_is_503_migrating_while_another_instance_holds_the_migration_lock(pg_url: str) -> None:
    holder = await asyncpg.connect(pg_url)
    await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    server = await start_server(store_factory(pg_url, steps=STEPS), open_store=False)
    opener = asyncio.create_task(server.state.open_store())
    try:
        deadline = time.monotonic() + 10
        while True:
            status, body = await server.call("GET", "/v1/readyz")
            assert status == 503 and body["status"] in ("starting", "migrating"), body
            if body["status"] == "migrating":
                break
            assert time.monotonic() < deadline, "readyz never said migrating"
            await asyncio.sleep(0.05)

        await asyncio.sleep(0.5)  # it keeps waiting, and says so, as long as the lock is held
        assert await server.call("GET", "/v1/readyz") == (
            503, {"status": "migrating", "schema_version": 0, "backend": "postgres", "index": "loading"})
        assert await server.call("GET", "/v1/healthz") == (200, {"status": "ok"})
        status, body = await server.call("POST", "/v1/memories", json={"text": "too early"})
        assert status == 503 and body["error"]["code"] == "not_ready"
        assert not opener.done()
        assert await migration_lock(pg_url) == (1, 1)
        assert not await exists(pg_url, "gm_schema")  # nothing was applied while it waited

        await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await asyncio.wait_for(opener, 20)
        status, body = await server.call("GET", "/v1/readyz")
        assert status == 200 and body["writes"]["status"] == "ok"
        assert body["index"] in ("loading", "ready")  # (the in-process index loads in the background)
        assert {k: v for k, v in body.items() if k not in ("writes", "index")} == {
            "status": "ready", "schema_version": LATEST, "backend": "postgres"
        }
        assert (await server.call("POST", "/v1/memories", json={"text": "now it works"}))[0] == 201
        assert await versions(pg_url) == list(range(1, LATEST + 1))
    finally:
        opener.cancel()
        await asyncio.gather(opener, return_exceptions=True)
        await holder.close()
        await server.stop()


# -- the downgrade guard ---------------------------------------------------------------------------


async def snapshot_of(url: str) -> tuple[Any, ...]:
    return await schema_rows(url), await columns(url), await memory_rows(url), await migration_lock(url)


async def test_a_newer_incompatible_schema_is_refused_and_left_unchanged(pg_url: str) -> None:
    async with gm.open(pg_url, steps=(*STEPS, CONTRACT)) as newer:
        await newer.add("Written by the newer release.", user_id="u1", metadata={"v": 2})
    before = await snapshot_of(pg_url)
    assert before[0][-1][4] == NEXT  # the contract step raised compatible_from past this release

    with pytest.raises(SchemaTooNew) as caught:
        await gm.open(pg_url)
    message = caught.value.message
    assert caught.value.code == "schema_too_new"
    assert f"has schema version {NEXT}" in message
    assert f"knows only up to version {LATEST}" in message
    assert "not backward compatible" in message and "restore a backup" in message
    assert message.endswith("The database was not changed.")
    assert await snapshot_of(pg_url) == before


async def test_gmem_serve_on_a_newer_incompatible_schema_exits_3_with_one_line(pg_url: str) -> None:
    async with gm.open(pg_url, steps=(*STEPS, CONTRACT)):
        pass
    before = await snapshot_of(pg_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GM_")}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gm", "serve", "--port", "0", "--database-url", pg_url],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert done.returncode == EXIT_SCHEMA == 3, done.stderr
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1, output
    assert f"schema version {NEXT}" in errors[0] and f"only up to version {LATEST}" in errors[0]
    assert "The database was not changed." in errors[0]
    assert await snapshot_of(pg_url) == before


async def test_an_older_release_opens_and_serves_a_newer_additive_schema(pg_url: str, tmp_path: Path) -> None:
    newer_steps = (*STEPS, EXPAND)
    # Rolling deploy: the old release is running when the new one starts and migrates.
    async with gm.open(pg_url) as older:
        first = await older.add("Written by the older release before the upgrade: likes green tea.", user_id="u1")
        async with gm.open(pg_url, steps=newer_steps) as newer:
            assert newer.backend.schema_version == NEXT
            assert (await newer.get(first.id)).text == first.text
            second = await newer.add("Written by the newer release: reads sci-fi.", user_id="u1")
            assert (await older.get(second.id)).text == second.text
            third = await older.add("Written by the older release on the new schema: cycles to work.", user_id="u1")
            assert (await newer.get(third.id)).text == third.text
            await wait_for_hit(older, "reads science fiction", second.id, user_id="u1")
            await wait_for_hit(newer, "commutes by bicycle", third.id, user_id="u1")
    rows = await schema_rows(pg_url)
    assert (rows[-1][0], rows[-1][4]) == (NEXT, 1)  # additive: every release from v1 may run on it

    # Rollback: only the old release runs now, on the migrated database.
    async with gm.open(pg_url) as older:
        assert older.backend.schema_version == NEXT and older.backend.phase == "ready"
        for memory in (first, second, third):
            assert await older.get(memory.id) == memory
        hits = await older.search("green tea", mode="keyword", user_id="u1")
        assert [h.memory.id for h in hits] == [first.id]
    assert await schema_rows(pg_url) == rows  # the older release recorded nothing

    # And its server, redeployed as is, serves it.
    process, url = await spawn_server(tmp_path / "serve.log", "--database-url", pg_url)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/v1/readyz") as response:
                assert response.status == 200
                body = await response.json()
                assert body.pop("writes")["status"] == "ok"
                assert body.pop("index") in ("loading", "ready")  # (loading in the background)
                assert body == {"status": "ready", "schema_version": NEXT, "backend": "postgres"}
            added = {"text": "Added after the rollback.", "user_id": "u1"}
            async with session.post(url + "/v1/memories", json=added) as response:
                assert response.status == 201
            query = {"query": "likes green tea", "user_id": "u1", "limit": 1}
            async with session.post(url + "/v1/memories/search", json=query) as response:
                assert response.status == 200
                assert [h["memory"]["id"] for h in (await response.json())["hits"]] == [first.id]
    finally:
        process.terminate()
        assert process.wait(30) == 0, (tmp_path / "serve.log").read_text()
    assert await schema_rows(pg_url) == rows
    assert len(await memory_rows(pg_url)) == 4


# -- the test-only schema cap ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["GM_TEST_SCHEMA_CAP", "target_version"])
async def test_a_capped_database_works_and_the_next_open_migrates_it_keeping_every_memory(
    pg_url: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    options: dict[str, Any] = {}
    if how == "GM_TEST_SCHEMA_CAP":
        monkeypatch.setenv("GM_TEST_SCHEMA_CAP", "1")
    else:
        options["target_version"] = 1
    facts = [
        {"text": "Prefers a window seat on long flights.", "user_id": "u1", "metadata": {"topic": "travel"}},
        {"text": "Allergic to peanuts and tree nuts.", "user_id": "u1", "agent_id": "chef"},
        {"text": "Has a dog called Miso, a shiba inu.", "user_id": "u2", "session_id": "s1"},
        {"text": "Team standup is at nine.", "namespace": "team"},
    ]
    async with gm.open(pg_url, **options) as store:
        assert store.backend.schema_version == 1
        made = await store.add_many(facts)
        hits = await store.search("aisle or window on a plane", user_id="u1", mode="vector", limit=1)
        assert [h.memory.id for h in hits] == [made[0].id]
        hits = await store.search("peanuts", user_id="u1", agent_id="chef", mode="keyword")
        assert [h.memory.id for h in hits] == [made[1].id]
        assert (await store.stats()).namespaces == {"default": 3, "team": 1}
    assert await versions(pg_url) == [1]
    assert not await exists(pg_url, "memories_by_agent")  # a v2 object
    before = await memory_rows(pg_url)

    monkeypatch.delenv("GM_TEST_SCHEMA_CAP", raising=False)
    async with gm.open(pg_url) as store:
        assert store.backend.schema_version == LATEST
        for memory in made:
            assert await store.get(memory.id) == memory
        hits = await store.search("which pet", user_id="u2", session_id="s1", limit=1)
        assert [h.memory.id for h in hits] == [made[2].id]
        assert (await store.stats()).namespaces == {"default": 3, "team": 1}
    assert await versions(pg_url) == list(range(1, LATEST + 1))
    assert await exists(pg_url, "memories_by_agent")
    assert await memory_rows(pg_url) == before
