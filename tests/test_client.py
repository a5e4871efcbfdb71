"""What only the remote handle does, against real servers: retries of refused requests (a
server migrating, draining, full), no repeat of a write whose outcome is unknown unless a
client id makes it idempotent, one clear error for a server that cannot be reached, its
timeouts, API keys, every documented error code as its exception, and misuse. The sync
flavour has tests/test_client_sync.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import gm
from gm.client import SERVER_CODES
from gm.config import ApiKey, ConnectionLimits
from gm.errors import (
    Conflict,
    Forbidden,
    GMError,
    InvalidFilter,
    InvalidInput,
    ModelError,
    ModelNotFound,
    ModelSwitched,
    NotFound,
    NotReady,
    ReembedInProgress,
    ServerUnreachable,
    StorageUnavailable,
    Unauthorized,
)
from gm.http.guard import HostPolicy
from gm.storage.base import AddMemories
from gm.storage.sqlite_migrations import STEPS, Step
from tests.conftest import WriteGate
from tests.http_server import RunningServer, free_port, start_server, store_factory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(tmp_path / "mem.db"))
    yield running
    await running.stop()


def count_calls(obj: Any, name: str) -> list[int]:
    """Counts the calls of ``obj.name`` as they reach it (the real method still runs)."""
    calls: list[int] = []
    method = getattr(obj, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await method(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


async def stored(server: RunningServer) -> list[gm.Memory]:
    return (await server.state.store.list(limit=1000)).memories


# -- retries ---------------------------------------------------------------------------------


def slow_step(conn: sqlite3.Connection) -> None:
    time.sleep(1.5)
    conn.execute("CREATE TABLE slow_marker (x INTEGER)")


async def test_requests_refused_while_the_server_migrates_are_retried_until_it_serves(tmp_path: Path) -> None:
    steps = (*STEPS, Step(STEPS[-1].version + 1, "a deliberately slow step", slow_step))
    server = await start_server(store_factory(tmp_path / "slow.db", steps=steps), open_store=False)
    opener = asyncio.create_task(server.state.open_store())
    try:
        async with gm.connect(server.url, retry_for=0.3) as impatient:  # healthz answers while migrating
            assert (await impatient.probe()).phase in ("starting", "migrating")
            with pytest.raises(NotReady) as refused:  # Retry-After: 1 is past a 0.3 s budget
                await impatient.add("Never sent twice.")
            assert (refused.value.code, refused.value.status) == ("not_ready", 503)
        async with gm.connect(server.url, retry_for=30) as mem:
            started = time.monotonic()
            memory = await mem.add("Written while the server migrates.")  # no id: it was refused, not applied
            assert time.monotonic() - started > 0.5 and opener.done()
            assert (await mem.list()).memories == [memory]
            assert [e.op for e in await mem.history(memory.id)] == ["add"]
            assert (await mem.probe()).phase == "ready"
    finally:
        await asyncio.wait_for(opener, 30)
        await server.stop()


async def test_a_write_refused_by_a_draining_server_is_retried_and_lands_once(server: RunningServer) -> None:
    async with gm.connect(server.url, retry_for=0.5) as mem:
        server.state.draining = True
        with pytest.raises(NotReady, match=r"shutting down.*\(tried \d+ times in 0\.\d s: retry_for\)") as caught:
            await mem.add("Refused while draining.")
        assert (caught.value.code, caught.value.status) == ("draining", 503)
    assert await stored(server) == []
    async with gm.connect(server.url, retry_for=30) as mem:
        adding = asyncio.create_task(mem.add("Sent while draining."))
        await asyncio.sleep(0.5)
        assert not adding.done()
        server.state.draining = False  # e.g. a load balancer's next instance takes it
        memory = await asyncio.wait_for(adding, 30)
    assert await stored(server) == [memory]


async def test_a_write_whose_answer_was_lost_is_not_sent_again(server: RunningServer) -> None:
    gate = WriteGate(server.state.store.backend, AddMemories)
    calls = count_calls(server.state.store, "add_inputs")
    async with gm.connect(server.url) as mem:
        adding = asyncio.create_task(mem.add("Sent once; its answer is lost."))
        await asyncio.wait_for(gate.reached.wait(), 30)
        for connection in server.runner.server.connections:  # type: ignore[union-attr]
            connection.force_close()
        with pytest.raises(ServerUnreachable, match="the write was sent and may have been applied"):
            await asyncio.wait_for(adding, 30)
        assert len(calls) == 1
        gate.released.set()
        deadline = time.monotonic() + 10
        while not await stored(server):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert [m.text for m in await stored(server)] == ["Sent once; its answer is lost."]


async def test_an_add_with_a_client_id_is_sent_again_when_its_answer_was_lost(server: RunningServer) -> None:
    gate = WriteGate(server.state.store.backend, AddMemories)
    calls = count_calls(server.state.store, "add_inputs")
    async with gm.connect(server.url) as mem:
        adding = asyncio.create_task(mem.add("Sent twice, stored once.", id="note-1"))
        await asyncio.wait_for(gate.reached.wait(), 30)
        for connection in server.runner.server.connections:  # type: ignore[union-attr]
            connection.force_close()
        memory = await asyncio.wait_for(adding, 30)  # the repeat was answered
        assert len(calls) == 2 and memory.id == "note-1"
        gate.released.set()  # the first one commits too: same id, same content
        await asyncio.sleep(0.2)
        assert await mem.get("note-1") == memory
        assert [e.op for e in await mem.history("note-1")] == ["add"]


async def test_storage_unavailable_retries_reads_but_not_writes_that_may_have_landed(
    server: RunningServer, tmp_path: Path
) -> None:
    async with gm.connect(server.url, retry_for=1.0) as mem:
        memory = await mem.add("Kept until the table goes.")
        with sqlite3.connect(tmp_path / "mem.db") as conn:
            conn.execute("DROP TABLE memories")
        lists, adds = count_calls(server.state.store, "list"), count_calls(server.state.store, "add_inputs")
        updates, deletes = count_calls(server.state.store, "update"), count_calls(server.state.store, "delete")
        with pytest.raises(StorageUnavailable, match="no such table") as caught:
            await mem.list()
        assert caught.value.code == "storage_unavailable" and "retry_for" in caught.value.message
        assert len(lists) >= 3
        for call in (mem.add("Never stored."), mem.update(memory.id, metadata={"k": 1}), mem.delete(memory.id)):
            with pytest.raises(StorageUnavailable):
                await call
        assert (len(adds), len(updates), len(deletes)) == (1, 1, 1)
        with pytest.raises(StorageUnavailable):
            await mem.add("An id makes it safe to repeat.", id="safe-1")
        assert len(adds) >= 3


async def test_a_full_server_is_waited_for(tmp_path: Path) -> None:
    limits = ConnectionLimits(max_connections=1, body_timeout=1.5)
    server = await start_server(store_factory(tmp_path / "full.db"), limits=limits)
    try:
        reader, writer = await asyncio.open_connection(*server.url[7:].split(":"))
        writer.write(b"POST /v1/memories HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 40\r\n\r\n{")  # the one connection allowed, busy until its body times out
        await asyncio.sleep(0.3)
        started = time.monotonic()
        async with gm.connect(server.url, retry_for=30) as mem:
            memory = await mem.add("Written once the server had room.")
        assert time.monotonic() - started > 0.5
        assert await stored(server) == [memory]
        writer.close()
    finally:
        await server.stop()


# -- unreachable, timeouts -------------------------------------------------------------------


async def test_nothing_listening_is_one_clear_error_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ServerUnreachable) as caught:
        await gm.connect(url)
    message = caught.value.message
    assert message.startswith(f"no greatmemory server answered at {url}: the connection was refused")
    assert "gmem serve" in message and "GM_URL" in message and time.monotonic() - started < 2  # not retried
    assert isinstance(caught.value, StorageUnavailable) and caught.value.code == "server_unreachable"
    with pytest.raises(ServerUnreachable, match="does not resolve"):
        await gm.connect("http://nonexistent.invalid:8420")


async def test_a_service_that_is_not_greatmemory_is_named_so() -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>It works!</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        with pytest.raises(ServerUnreachable, match=f"{re.escape(url)} answered 200 with something that is not a "
                                                    "greatmemory server's JSON"):
            await gm.connect(url)
    finally:
        await runner.cleanup()


async def test_a_server_that_does_not_accept_in_time_is_a_connect_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepts: once its backlog is full, connecting hangs
    port = listener.getsockname()[1]
    filler = [socket.socket() for _ in range(3)]
    for sock in filler:
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
    try:
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match=r"did not accept a connection within 0\.3 s \(connect_timeout\)"):
            await gm.connect(f"http://127.0.0.1:{port}", connect_timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        for sock in (*filler, listener):
            sock.close()


async def test_a_write_that_takes_longer_than_the_timeout_may_have_landed(server: RunningServer) -> None:
    await server.state.store.search("the model loads now, not within the timeouts below")
    async with gm.connect(server.url, timeout=0.5) as mem:
        gate = WriteGate(server.state.store.backend, AddMemories)
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match=r"did not answer within 0\.5 s \(timeout\); the write was sent"
                                                    " and may have been applied"):
            await mem.add("Slow to commit.")
        assert gate.reached.is_set() and time.monotonic() - started < 2  # a timeout is not retried
        gate.released.set()
        again = WriteGate(server.state.store.backend, AddMemories)
        with pytest.raises(ServerUnreachable, match=r"did not answer within 0\.5 s") as caught:
            await mem.add("Slow too, but safe to repeat.", id="slow-1")
        assert again.reached.is_set() and "may have been applied" not in caught.value.message
        assert "longer timeout" in caught.value.message
        again.released.set()
        deadline = time.monotonic() + 10
        while len(await stored(server)) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert sorted(m.text for m in await stored(server)) == ["Slow to commit.", "Slow too, but safe to repeat."]


# -- API keys ---------------------------------------------------------------------------------

ADMIN, TEAM = "admin-key-0123456789abcdef", "team-key-0123456789abcdef"


async def test_api_keys_unauthorized_forbidden_and_a_bound_keys_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_server(store_factory(tmp_path / "keys.db"), api_keys=(ApiKey(ADMIN), ApiKey(TEAM, "team")))
    try:
        for key in (None, "not-a-key-0123456789"):
            async with gm.connect(server.url, api_key=key) as anonymous:  # opening needs no key: healthz is open
                with pytest.raises(Unauthorized, match="a valid API key is required") as caught:
                    await anonymous.stats()
                assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
        async with gm.connect(server.url, api_key=TEAM) as team:
            note = await team.add("Team note.")
            assert note.namespace == "team"
            for call in (team.add("Elsewhere.", namespace="other"), team.get(note.id, namespace="other"),
                         team.list(namespace="other"), team.delete_many(namespace="other")):
                with pytest.raises(Forbidden, match="may only be used on namespace 'team'") as refused:
                    await call
                assert (refused.value.code, refused.value.status) == ("forbidden", 403)
            assert (await team.list()).memories == [note]
            assert (await team.stats()).namespaces == {"team": 1}
        monkeypatch.setenv("GM_API_KEY", ADMIN)
        monkeypatch.setenv("GM_URL", server.url)
        async with gm.connect() as admin:  # GM_URL and GM_API_KEY, as the CLI reads them
            await admin.add("Default note.")
            assert await admin.delete_many() == 1  # the default namespace, as embedded
            assert (await admin.stats()).namespaces == {"team": 1}
        async with gm.connect(server.url, api_key=TEAM) as team:
            assert await team.delete_many() == 1  # a bound key's own
    finally:
        await server.stop()


# -- every documented error code ---------------------------------------------------------------

EXPECTED: dict[str, type[GMError]] = {
    "malformed_json": GMError, "bad_request": GMError, "line_too_long": InvalidInput, "unauthorized": Unauthorized,
    "forbidden": Forbidden, "not_found": NotFound, "method_not_allowed": GMError, "body_timeout": GMError,
    "conflict": Conflict, "body_too_large": InvalidInput, "unsupported_media_type": GMError,
    "host_not_allowed": GMError, "invalid_input": InvalidInput, "invalid_filter": InvalidFilter,
    "not_ready": NotReady, "draining": NotReady, "storage_unavailable": StorageUnavailable,
    "too_many_connections": NotReady, "internal": GMError, "reembed_in_progress": ReembedInProgress,
    "model_not_found": ModelNotFound, "model_error": ModelError, "model_switched": ModelSwitched,
}


def documented_codes() -> list[tuple[int, str]]:
    """(status, code) of every row of docs/api.md's error table."""
    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| Status | code | When |"):].split("\n\n")[0]
    return [(int(row[0]), code) for row in re.findall(r"^\| (\d{3}) \| (.*?) \|", table, flags=re.M)
            for code in re.findall(r"`([a-z_]+)`", row[1])]


async def test_every_documented_error_code_comes_back_as_its_exception() -> None:
    """A server answering each documented error in turn (the faults a real one cannot be made
    to give on demand, such as a 500, are among them): the client raises the library's
    exception with the server's code, status, message and path."""
    codes = documented_codes()
    assert {code for _, code in codes} == set(EXPECTED) and len(codes) == len(EXPECTED)
    status_of = {code: status for status, code in codes}

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/v1/healthz":
            return web.json_response({"status": "ok"})
        code = request.match_info["id"]
        details = {"path": "metadata.k"} if issubclass(EXPECTED[code], InvalidInput) else {}
        return web.json_response({"error": {"code": code, "message": f"the server says {code}", "details": details}},
                                 status=status_of[code])

    app = web.Application()
    app.router.add_get("/v1/healthz", answer)
    app.router.add_get("/v1/memories/{id}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        async with gm.connect(f"http://127.0.0.1:{runner.addresses[0][1]}", retry_for=0) as mem:
            for status, code in codes:
                with pytest.raises(GMError) as caught:
                    await mem.get(code)
                error = caught.value
                assert type(error) is EXPECTED[code], code
                assert (error.code, error.status, error.message) == (code, status, f"the server says {code}")
                if isinstance(error, InvalidInput):
                    assert error.path == "metadata.k"
    finally:
        await runner.cleanup()
    assert set(SERVER_CODES) <= set(EXPECTED)


async def test_oversized_requests_and_a_foreign_host_name_the_problem(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "small.db"), max_body_bytes=4000)
    try:
        async with gm.connect(server.url) as mem:
            with pytest.raises(InvalidInput, match="4000-byte limit") as caught:
                await mem.add_many([{"text": "x" * 1000} for _ in range(5)])
            assert (caught.value.code, caught.value.status) == ("body_too_large", 413)
            with pytest.raises(InvalidInput, match="over the 8190-byte limit") as caught:
                await mem.list(filter={"k": "x" * 9000})
            assert caught.value.code == "line_too_long"
    finally:
        await server.stop()
    named = await start_server(store_factory(tmp_path / "named.db"), hosts=HostPolicy(["mem.example.com"]))
    try:
        with pytest.raises(GMError, match="GM_ALLOWED_HOSTS") as refused:
            await gm.connect(named.url)
        assert (refused.value.code, refused.value.status) == ("host_not_allowed", 421)
    finally:
        await named.stop()


# -- using it ---------------------------------------------------------------------------------------


async def test_misuse_says_what_to_write(server: RunningServer) -> None:
    connector = gm.connect(server.url)
    with pytest.raises(AttributeError, match=r"async with gm.connect\(...\) as mem:.*mem = await gm.connect"):
        connector.add  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(TypeError, match="gm.connect_sync"), connector:  # type: ignore[attr-defined]
        pass
    for bad, path in (({"url": "localhost:8420"}, "url"), ({"url": "ftp://x"}, "url"), ({"timeout": -1}, "timeout"),
                      ({"retry_for": float("inf")}, "retry_for"), ({"max_connections": 0}, "max_connections")):
        with pytest.raises(InvalidInput) as caught:
            gm.connect(**{"url": server.url, **bad})
        assert caught.value.path == path
    with pytest.raises(InvalidInput, match="did you mean http://localhost:8420"):
        gm.connect("localhost:8420")
    mem = await gm.connect(server.url)  # the awaited form, closed by hand
    try:
        assert repr(mem) == f"<RemoteStore {server.url}>"
        with pytest.raises(AttributeError, match="purge_expired is the embedded store's only"):
            mem.purge_expired  # noqa: B018
    finally:
        await mem.close()
