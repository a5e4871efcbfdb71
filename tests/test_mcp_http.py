"""The MCP tools at /mcp of a running server, reached with the MCP SDK's own client over
streamable HTTP: behind the same API keys as /v1 (a namespace-bound key sees only its
namespace), the same readiness and drain, the same cross-site guard."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gm.config import parse_api_keys
from tests.http_server import RunningServer, spawn_server, start_server, store_factory

ADMIN = "admin-key-0123456789abcdef"
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdefgh"
KEYS = parse_api_keys(f"{ADMIN}, {ALICE}@alice, {BOB}@bob")
JSON_RPC = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
LIST_TOOLS = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(tmp_path / "mem.db"), api_keys=KEYS)
    yield running
    await running.stop()


@asynccontextmanager
async def mcp_client(server: RunningServer | str, key: str, mode: str = "auto") -> AsyncIterator[Client]:
    url = server if isinstance(server, str) else server.url
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    async with asyncio.timeout(60), http, Client(streamable_http_client(url + "/mcp", http_client=http),
                                                 mode=mode, read_timeout_seconds=30) as client:
        yield client


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def error_text(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return str(result.content[0].text)  # type: ignore[union-attr]


def gm_error(body: dict[str, Any]) -> dict[str, Any]:
    """The server's error object in a JSON-RPC error answered before the MCP transport."""
    assert body["jsonrpc"] == "2.0" and body["id"] is None and body["error"]["code"] == -32000
    error: dict[str, Any] = body["error"]["data"]
    assert body["error"]["message"] == f"{error['code']}: {error['message']}"
    return error


@pytest.mark.parametrize("mode", ["auto", "legacy"])  # the 2026 per-request protocol, and the 2025 handshake
async def test_every_tool_over_http(server: RunningServer, mode: str) -> None:
    async with mcp_client(server, ADMIN, mode) as client:
        assert len((await client.list_tools()).tools) == 7
        added = await call(client, "remember", {"memories": [{"text": "Prefers window seats.", "user_id": "u1"},
                                                             {"text": "Allergic to peanuts.", "user_id": "u1"}]})
        seat = added["memories"][0]["id"]
        hits = (await call(client, "recall", {"query": "where to sit", "user_id": "u1", "limit": 1}))["hits"]
        assert [h["memory"]["id"] for h in hits] == [seat]
        assert (await call(client, "get", {"id": seat}))["text"] == "Prefers window seats."
        assert len((await call(client, "list", {"user_id": "u1"}))["memories"]) == 2
        await call(client, "update", {"id": seat, "metadata": {"confirmed": True}})
        assert [e["op"] for e in (await call(client, "history", {"id": seat}))["history"]] == ["add", "update"]
        assert await call(client, "forget", {"id": seat}) == {"deleted": 1}
        assert "(argument: limit)" in await error_text(client, "recall", {"query": "x", "limit": 101})
        assert await call(client, "forget", {"namespace": "default", "user_id": "u1"}) == {"deleted": 1}
    status, page = await server.call("GET", "/v1/memories", key=ADMIN)
    assert status == 200 and page["memories"] == []


async def test_a_namespace_bound_key_sees_only_its_namespace(server: RunningServer) -> None:
    async with mcp_client(server, ALICE) as alice:
        added = await call(alice, "remember", {"text": "Alice's door code is 4711.", "user_id": "u1"})
    [memory] = added["memories"]
    assert memory["namespace"] == "alice"
    async with mcp_client(server, BOB) as bob:
        assert (await call(bob, "recall", {"query": "door code", "user_id": "u1"}))["hits"] == []
        assert (await call(bob, "list", {}))["memories"] == []
        for tool, arguments in (("get", {}), ("history", {}), ("update", {"text": "taken"}), ("forget", {})):
            text = await error_text(bob, tool, {"id": memory["id"], **arguments})
            assert text.startswith("not_found:") and "4711" not in text, (tool, text)
        text = await error_text(bob, "recall", {"query": "door code", "namespace": "alice"})
        assert text.startswith("forbidden:") and "'bob'" in text
        assert "forbidden:" in await error_text(bob, "remember", {"memories": [{"text": "x", "namespace": "alice"}]})
        assert await call(bob, "forget", {"user_id": "u1"}) == {"deleted": 0}  # in bob's namespace: nothing
        mine = await call(bob, "remember", {"text": "Bob's own note."})
        assert mine["memories"][0]["namespace"] == "bob"
    async with mcp_client(server, ADMIN) as admin:
        found = await call(admin, "recall", {"query": "door code", "namespace": "alice"})
        assert [h["memory"]["text"] for h in found["hits"]] == ["Alice's door code is 4711."]


async def test_a_request_without_a_valid_key_is_refused(server: RunningServer) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-key-0123456789abcdef"}, {"X-API-Key": ""}):
        status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers={**JSON_RPC, **headers})
        assert status == 401 and gm_error(body)["code"] == "unauthorized", headers
    status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers={**JSON_RPC, "X-API-Key": ADMIN})
    assert status == 200 and len(body["result"]["tools"]) == 7
    for mode in ("auto", "legacy"):  # what a host shows its user: the server's own reason
        http = httpx2.AsyncClient(timeout=30)
        with pytest.raises(BaseException) as refused:  # (in an exception group, from the SDK's task group)
            async with asyncio.timeout(30), http, Client(streamable_http_client(server.url + "/mcp", http_client=http),
                                                         mode=mode):
                pass
        assert "unauthorized: a valid API key is required" in repr(refused.value), mode


async def test_mcp_follows_the_server_lifecycle(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), open_store=False)
    try:
        status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers=JSON_RPC)
        assert status == 503 and gm_error(body)["code"] == "not_ready"
        async with server.session.post(server.url + "/mcp", json=LIST_TOOLS, headers=JSON_RPC) as response:
            assert response.status == 503 and response.headers["Retry-After"] == "1"
        await server.state.open_store()
        status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers=JSON_RPC)
        assert status == 200 and body["id"] == 1
        server.state.draining = True
        status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers=JSON_RPC)
        assert status == 503 and gm_error(body)["code"] == "draining"
    finally:
        await server.stop()


async def test_mcp_is_behind_the_cross_site_guard(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        status, body = await server.call("POST", "/mcp", json=LIST_TOOLS, headers={**JSON_RPC, "Host": "evil.example"})
        assert status == 421 and gm_error(body)["code"] == "host_not_allowed"
        status, body = await server.call("POST", "/mcp", data=b'{"jsonrpc": "2.0"}',
                                         headers={"Content-Type": "text/plain"})
        assert status == 415 and gm_error(body)["code"] == "unsupported_media_type"
        status, body = await server.call("GET", "/mcp", headers={"Accept": "text/event-stream"})
        assert status == 405 and gm_error(body)["code"] == "method_not_allowed"
    finally:
        await server.stop()


async def test_gmem_serve_answers_mcp_and_stops_cleanly(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    process, url = await spawn_server(log, "--db", str(tmp_path / "mem.db"), env={"GM_API_KEYS": ADMIN})
    try:
        async with mcp_client(url, ADMIN) as client:
            [memory] = (await call(client, "remember", {"text": "Served by gmem serve."}))["memories"]
            assert (await call(client, "get", {"id": memory["id"]}))["text"] == "Served by gmem serve."
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 60)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text() and " ERROR " not in log.read_text()
