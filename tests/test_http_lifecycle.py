"""Readiness while migrating or when storage is unreachable, and graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from gm.errors import DatabaseUnusable
from gm.storage.sqlite_files import DatabaseLock
from gm.storage.sqlite_migrations import STEPS, Step
from tests.http_server import spawn_server, start_server, store_factory


def slow_step(conn: sqlite3.Connection) -> None:
    time.sleep(1.5)
    conn.execute("CREATE TABLE slow_marker (x INTEGER)")


async def test_readyz_503_while_migrating_then_200(tmp_path: Path) -> None:
    steps = (*STEPS, Step(STEPS[-1].version + 1, "a deliberately slow step", slow_step))
    server = await start_server(store_factory(tmp_path / "slow.db", steps=steps), open_store=False)
    opener = asyncio.create_task(server.state.open_store())
    try:
        phases: list[str] = []
        early_route: tuple[int, dict] | None = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert await server.call("GET", "/v1/healthz") == (200, {"status": "ok"})
            status, body = await server.call("GET", "/v1/readyz")
            phases.append(body["status"])
            if status == 200:
                break
            assert status == 503 and body["status"] in ("starting", "migrating")
            if body["status"] == "migrating" and early_route is None:
                early_route = await server.call("GET", "/v1/stats")
            await asyncio.sleep(0.05)
        assert phases[-1] == "ready"
        assert "migrating" in phases
        assert early_route is not None
        status, body = early_route
        assert status == 503 and body["error"]["code"] == "not_ready"
        status, stats = await server.call("GET", "/v1/stats")
        assert status == 200 and stats["schema_version"] == STEPS[-1].version + 1
    finally:
        await opener
        await server.stop()


async def test_unreachable_storage_is_unavailable_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "mem.db"
    holder = DatabaseLock(db)  # another server has the file: a passing fault, waited out
    holder.acquire()
    server = await start_server(store_factory(db), open_store=False)
    opener = asyncio.create_task(server.state.open_store(retry_seconds=0.1))
    try:
        await asyncio.sleep(0.5)
        status, body = await server.call("GET", "/v1/readyz")
        assert status == 503 and body["status"] == "unavailable" and "in use by" in body["reason"]
        assert (await server.call("GET", "/v1/healthz"))[0] == 200
        status, body = await server.call("POST", "/v1/memories", json={"text": "too early"})
        assert status == 503
        holder.release()
        await asyncio.wait_for(opener, 10)
        assert (await server.call("GET", "/v1/readyz"))[0] == 200
        assert (await server.call("POST", "/v1/memories", json={"text": "now it works"}))[0] == 201
    finally:
        holder.release()
        opener.cancel()
        await server.stop()


@pytest.mark.parametrize(
    "fault",
    ["missing folder", "not SQLite", "SQLite header then garbage", "a directory", "no greatmemory tables",
     "an older version without its tables"],
)
async def test_a_database_that_can_never_open_fails_at_once_instead_of_retrying(tmp_path: Path, fault: str) -> None:
    db = tmp_path / "mem.db"
    if fault == "missing folder":
        db = tmp_path / "no-such-folder" / "mem.db"
    elif fault == "not SQLite":
        db.write_bytes(b"id,text\n1,a spreadsheet\n" * 100)
    elif fault == "SQLite header then garbage":
        db.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    elif fault == "a directory":
        db.mkdir()
    else:  # a schema version (the latest, or one with migrations still to run) but not its tables
        conn = sqlite3.connect(db)
        conn.execute(f"PRAGMA user_version = {2 if fault == 'no greatmemory tables' else 1}")
        conn.execute("CREATE TABLE unrelated (x)")
        conn.close()
    server = await start_server(store_factory(db), open_store=False)
    try:
        with pytest.raises(DatabaseUnusable) as failed:
            await asyncio.wait_for(server.state.open_store(retry_seconds=0.05), 10)
        assert str(db) in failed.value.message
        status, body = await server.call("GET", "/v1/readyz")
        assert status == 503 and body["status"] == "unavailable" and body["reason"] == failed.value.message
    finally:
        await server.stop()
    assert not (tmp_path / "no-such-folder").exists()


async def test_sigterm_drains_and_keeps_every_acknowledged_add(tmp_path: Path) -> None:
    db = tmp_path / "drain.db"
    log_path = tmp_path / "serve.log"
    process, url = await spawn_server(log_path, "--db", str(db), env={"GM_DRAIN_SECONDS": "20"})
    acknowledged: list[str] = []
    refused = 0
    async with aiohttp.ClientSession() as session:
        stop_adding = asyncio.Event()

        async def writer(n: int) -> None:
            nonlocal refused
            i = 0
            while not stop_adding.is_set():
                i += 1
                try:
                    async with session.post(url + "/v1/memories", json={"text": f"writer {n} fact {i}"}) as response:
                        if response.status == 201:
                            acknowledged.append((await response.json())["id"])
                        else:
                            assert response.status == 503, await response.text()
                            refused += 1
                except aiohttp.ClientError:
                    refused += 1
                    await asyncio.sleep(0.01)

        writers = [asyncio.create_task(writer(n)) for n in range(8)]
        deadline = time.monotonic() + 60
        while len(acknowledged) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 30)
        stop_adding.set()
        await asyncio.gather(*writers)
    assert code == 0, log_path.read_text()
    assert len(acknowledged) >= 50
    with sqlite3.connect(db) as conn:
        stored = {row[0] for row in conn.execute("SELECT id FROM memories")}
    assert set(acknowledged) <= stored
    assert "stopped" in log_path.read_text()


async def test_draining_refuses_new_requests_and_waits_for_running_ones(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "drain.db"))
    try:
        state = server.state
        state.enter()  # a request still running
        state.draining = True
        status, body = await server.call("GET", "/v1/readyz")
        assert (status, body["status"]) == (503, "draining")
        assert (await server.call("GET", "/v1/healthz"))[0] == 200
        status, body = await server.call("POST", "/v1/memories", json={"text": "late"})
        assert status == 503 and body["error"]["code"] == "draining"
        assert await state.wait_idle(0.1) is False
        asyncio.get_running_loop().call_later(0.1, state.leave)
        assert await state.wait_idle(5) is True
    finally:
        await server.stop()


async def test_json_logs_one_line_per_event_and_keys_never_logged(tmp_path: Path) -> None:
    key = "secret-key-that-must-not-leak-0001"
    log_path = tmp_path / "serve.log"
    process, url = await spawn_server(
        log_path, "--db", str(tmp_path / "logs.db"), "--log-format", "json", env={"GM_API_KEYS": key}
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/v1/stats", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200
        async with session.get(url + "/v1/stats", headers={"X-API-Key": key + "x"}) as response:
            assert response.status == 401
    process.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(process.wait, 30) == 0
    text = log_path.read_text()
    assert key not in text
    lines = [orjson.loads(line) for line in text.splitlines()]
    messages = [line["msg"] for line in lines]
    assert any("ready on http://127.0.0.1:" in m and f"schema v{STEPS[-1].version}" in m and "logs.db" in m
               for m in messages)
    access = [line for line in lines if line["logger"] == "gm.access"]
    assert {(a["path"], a["status"]) for a in access} >= {("/v1/stats", 200), ("/v1/stats", 401)}
