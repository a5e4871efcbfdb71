"""Write health: a write that cannot commit fails within GM_WRITE_TIMEOUT_SECONDS instead of
hanging, readyz leaves rotation while writes are stuck or failing and comes back by itself
once the database commits again, and /v1/stats shows the same. The fault is real: another
connection holds the database's write lock (SQLite) or locks the tables (Postgres).
"""

from __future__ import annotations

import asyncio
import resource
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from gm.actor import Actor, Envelope, Overdue
from gm.config import DEFAULT_WRITE_TIMEOUT_SECONDS, WRITE_TIMEOUT, ServerConfig
from gm.errors import InvalidInput
from gm.storage import is_postgres_url
from tests.http_server import RunningServer, spawn_server, start_server, store_factory


@asynccontextmanager
async def writes_locked_out(target: str) -> AsyncIterator[None]:
    """Another session holds what every write needs, until the block ends."""
    if is_postgres_url(target):
        conn = await asyncpg.connect(target)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("LOCK TABLE memories, meta IN EXCLUSIVE MODE")  # reads still pass
            yield
            await transaction.rollback()
        finally:
            await conn.close()
    else:
        conn = sqlite3.connect(target, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the write lock: the server's Writer waits for it
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()


async def until(check: Callable[[], Awaitable[bool]], seconds: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < seconds, f"not {what} within {seconds}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target, write_timeout=1.0))
    yield running
    await running.stop()


async def texts(server: RunningServer) -> set[str]:
    status, page = await server.call("GET", "/v1/memories")
    assert status == 200
    return {m["text"] for m in page["memories"]}


async def test_stuck_writes_fail_fast_take_readyz_out_and_it_comes_back(server: RunningServer, target: str) -> None:
    assert (await server.call("POST", "/v1/memories", json={"text": "before"}))[0] == 201
    status, ready = await server.call("GET", "/v1/readyz")
    assert status == 200 and ready["writes"]["status"] == "ok" and ready["writes"]["last_commit_at"]

    async with writes_locked_out(target):
        started = time.monotonic()
        first = asyncio.create_task(server.call("POST", "/v1/memories", json={"text": "first"}))
        await asyncio.sleep(0.3)  # the Writer has taken up the first; the second queues behind it
        second = asyncio.create_task(server.call("POST", "/v1/memories", json={"text": "second"}))
        (status_1, body_1), (status_2, body_2) = await asyncio.wait_for(asyncio.gather(first, second), 30)
        assert time.monotonic() - started < 5  # the 1 s timeout, not the database's own 5-10 s waits
        assert (status_1, body_1["error"]["code"]) == (503, "storage_unavailable")
        assert "may still be applied" in body_1["error"]["message"]
        assert (status_2, body_2["error"]["code"]) == (503, "storage_unavailable")
        assert "was not applied" in body_2["error"]["message"]

        status, ready = await server.call("GET", "/v1/readyz")
        assert status == 503 and ready["status"] == "unavailable", ready
        assert ready["writes"]["status"] == "blocked" and "GM_WRITE_TIMEOUT_SECONDS" in ready["reason"]
        status, stats = await server.call("GET", "/v1/stats")
        assert status == 200 and stats["writes"]["status"] == "blocked"
        assert stats["writes"]["oldest_pending_seconds"] > 1

        async def batch_failed() -> bool:  # the database's own wait ends: the whole batch fails
            return (await server.call("GET", "/v1/stats"))[1]["writes"]["consecutive_failures"] >= 1

        await until(batch_failed, 30, "failed")
        status, ready = await server.call("GET", "/v1/readyz")  # its probe write fails or waits too
        assert status == 503 and ready["status"] == "unavailable"
        assert ready["writes"]["status"] in ("failing", "blocked") and ready["writes"]["last_error"]

    async def ready_again() -> bool:
        return (await server.call("GET", "/v1/readyz"))[0] == 200

    await until(ready_again, 30, "ready again")  # by its own probe write: no request had to succeed
    status, stats = await server.call("GET", "/v1/stats")
    assert stats["writes"]["status"] == "ok" and stats["writes"]["consecutive_failures"] == 0
    assert await texts(server) == {"before"}  # the failed batch left nothing; the withdrawn write never ran
    assert (await server.call("POST", "/v1/memories", json={"text": "after"}))[0] == 201
    assert await texts(server) == {"before", "after"}


def test_the_write_timeout_setting_is_checked_at_start() -> None:
    assert WRITE_TIMEOUT.read({}) == DEFAULT_WRITE_TIMEOUT_SECONDS == 15.0
    assert WRITE_TIMEOUT.read({"GM_WRITE_TIMEOUT_SECONDS": "2.5"}) == 2.5
    assert ServerConfig.load({}, {"GM_WRITE_TIMEOUT_SECONDS": "30"}).store.write_timeout == 30.0
    for bad in ("0", "-1", "soon", "nan", "inf", "7200"):
        with pytest.raises(InvalidInput) as caught:
            ServerConfig.load({}, {"GM_WRITE_TIMEOUT_SECONDS": bad})
        assert "GM_WRITE_TIMEOUT_SECONDS" in caught.value.message


class Holding(Actor[str, str]):
    """An actor that takes messages up and answers only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Envelope[str, str]] = []
        self.took = asyncio.Event()

    async def handle(self, batch: list[Envelope[str, str]]) -> None:
        self.held.extend(batch)
        self.took.set()
        while not all(envelope.reply.done() for envelope in batch):
            await asyncio.sleep(0.01)


async def test_a_cancelled_ask_stays_cancelled_when_its_reply_lands_at_that_moment() -> None:
    """asyncio.wait_for on 3.11 returns the reply and drops the cancellation in this case; the
    store's purge task then slept on through close() and `gmem delete` hung."""
    actor = Holding()
    task = asyncio.create_task(actor.ask("m", timeout=10))
    await asyncio.wait_for(actor.took.wait(), 10)
    actor.held[0].answer("reply")
    task.cancel()  # in the same moment
    (outcome,) = await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    assert isinstance(outcome, asyncio.CancelledError)
    await asyncio.wait_for(actor.stop(), 10)


async def test_a_message_not_taken_up_in_time_is_withdrawn_and_never_handled() -> None:
    actor = Holding()
    first = asyncio.create_task(actor.ask("first"))
    await asyncio.wait_for(actor.took.wait(), 10)
    with pytest.raises(Overdue) as late:
        await actor.ask("second", timeout=0.05)
    assert late.value.taken is False
    actor.held[0].answer("done")
    assert await asyncio.wait_for(first, 10) == "done"
    await asyncio.wait_for(actor.stop(), 10)
    assert [envelope.msg for envelope in actor.held] == ["first"]


async def test_a_full_disk_takes_readyz_out_and_it_comes_back_when_space_returns(tmp_path: Path) -> None:
    """A real `gmem serve` whose file-size limit (RLIMIT_FSIZE) is cut to zero mid-run: every
    write that grows a file fails as on a full disk (SQLite: "database or disk is full")."""
    db = tmp_path / "full.db"
    process, url = await spawn_server(tmp_path / "serve.log", "--db", str(db))
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    try:
        async with aiohttp.ClientSession() as session:

            async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
                async with session.request(method, url + path, timeout=aiohttp.ClientTimeout(30), **kwargs) as r:
                    return r.status, await r.json()

            assert (await call("POST", "/v1/memories", json={"text": "before"}))[0] == 201
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (0, hard))  # the disk is full
            status, body = await call("POST", "/v1/memories", json={"text": "x" * 20_000})
            assert (status, body["error"]["code"]) == (503, "storage_unavailable"), body
            status, ready = await call("GET", "/v1/readyz")
            assert status == 503 and ready["status"] == "unavailable", ready
            assert ready["writes"]["status"] == "failing" and "disk" in ready["writes"]["last_error"]  # I/O error
            status, stats = await call("GET", "/v1/stats")  # reads still work
            assert status == 200 and stats["memories"] == 1 and stats["writes"]["consecutive_failures"] >= 1

            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space again

            async def ready_again() -> bool:
                return (await call("GET", "/v1/readyz"))[0] == 200

            await until(ready_again, 30, "ready again")
            assert (await call("POST", "/v1/memories", json={"text": "after"}))[0] == 201
            status, page = await call("GET", "/v1/memories")
            assert {m["text"] for m in page["memories"]} == {"before", "after"}
    finally:
        process.terminate()
        process.wait(30)
