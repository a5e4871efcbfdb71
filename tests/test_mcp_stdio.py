"""`gmem mcp` over stdio, driven by the MCP SDK's own client as a host would: it starts the
command as a subprocess and calls every tool; wrong arguments are tool errors naming the field,
and the session goes on; standard output carries nothing but the protocol."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.shared.exceptions import MCPError

import gm

TOOLS = {"remember", "recall", "get", "list", "update", "forget", "history"}


DOC = Path(__file__).resolve().parent.parent / "docs" / "mcp.md"


def documented_server() -> dict[str, Any]:
    """The stdio entry of docs/mcp.md's first mcpServers snippet."""
    snippet = re.search(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    assert snippet is not None
    entry: dict[str, Any] = orjson.loads(snippet[1])["mcpServers"]["memory"]
    return entry


@asynccontextmanager
async def stdio_client(db: Path) -> AsyncIterator[Client]:
    """The SDK's client starting the server as docs/mcp.md tells a host to, on ``db``."""
    entry = documented_server()
    assert entry["command"] == "gmem" and entry["args"][:2] == ["mcp", "--db"]
    command = str(Path(sys.executable).parent / entry["command"])  # (this virtualenv's gmem)
    params = StdioServerParameters(command=command, args=[*entry["args"][:2], str(db)], env=dict(os.environ))
    async with asyncio.timeout(90), Client(params, read_timeout_seconds=30) as client:
        yield client


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    """The structured answer of a call that must succeed."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.content and result.content[0].type == "text"
    return result.structured_content


async def refused(client: Client, tool: str, arguments: dict[str, Any]) -> str:
    """The text of a call that must be a tool error."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error and result.structured_content is None
    text = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return str(text)


async def test_every_tool_over_stdio(tmp_path: Path) -> None:
    async with stdio_client(tmp_path / "mem.db") as client:
        listed = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(listed) == TOOLS
        for tool in listed.values():
            assert tool.input_schema["type"] == "object" and tool.output_schema["type"] == "object"
        assert listed["recall"].annotations.read_only_hint and listed["forget"].annotations.destructive_hint

        one = await call(client, "remember", {"text": "Prefers window seats.", "user_id": "u1",
                                              "metadata": {"topic": "travel"}, "occurred_at": "2024-03-15T09:30:00Z"})
        [seat] = one["memories"]
        assert seat["user_id"] == "u1" and seat["occurred_at"] == "2024-03-15T09:30:00.000Z"
        several = await call(client, "remember", {"memories": [
            {"text": "Allergic to peanuts.", "user_id": "u1", "metadata": {"topic": "health"}},
            {"text": "Works night shifts.", "user_id": "u1", "metadata": {"topic": "work"}},
            {"text": "Likes aisle seats.", "user_id": "u2", "metadata": {"topic": "travel"}},
        ]})
        assert [m["text"] for m in several["memories"]][0] == "Allergic to peanuts."

        found = await call(client, "recall", {"query": "where does she like to sit?", "user_id": "u1", "limit": 2})
        assert found["hits"][0]["memory"]["id"] == seat["id"] and len(found["hits"]) == 2
        text = (await client.call_tool("recall", {"query": "seat", "user_id": "u1"})).content[0].text  # type: ignore
        assert seat["id"] in text and "Prefers window seats." in text
        found = await call(client, "recall", {"query": "seat", "filter": {"topic": "travel"}, "mode": "keyword",
                                              "occurred_before": "2025-01-01T00:00:00Z", "min_score": -1,
                                              "recency": 30})
        assert [h["memory"]["id"] for h in found["hits"]] == [seat["id"]]

        assert (await call(client, "get", {"id": seat["id"]}))["text"] == "Prefers window seats."
        page = await call(client, "list", {"user_id": "u1", "limit": 2})
        assert len(page["memories"]) == 2 and page["next_cursor"]
        rest = await call(client, "list", {"user_id": "u1", "limit": 2, "cursor": page["next_cursor"]})
        assert len(rest["memories"]) == 1 and rest["next_cursor"] is None

        changed = await call(client, "update", {"id": seat["id"], "text": "Prefers aisle seats now.",
                                                "expires_at": None})
        assert changed["text"] == "Prefers aisle seats now."
        steps = await call(client, "history", {"id": seat["id"]})
        assert [e["op"] for e in steps["history"]] == ["add", "update"]

        assert await call(client, "forget", {"id": seat["id"]}) == {"deleted": 1}
        assert "not_found" in await refused(client, "get", {"id": seat["id"]})
        assert await call(client, "forget", {"namespace": "default", "filter": {"topic": "travel"}}) == {"deleted": 1}
        left = await call(client, "list", {})
        assert sorted(m["text"] for m in left["memories"]) == ["Allergic to peanuts.", "Works night shifts."]


async def test_wrong_arguments_are_tool_errors_and_the_session_goes_on(tmp_path: Path) -> None:
    async with stdio_client(tmp_path / "mem.db") as client:
        mistakes: list[tuple[str, dict[str, Any], str]] = [
            ("recall", {"query": "seats", "limit": 0}, "(argument: limit)"),
            ("recall", {"query": "seats", "userid": "u1"}, "(argument: userid)"),
            ("recall", {"user_id": "u1"}, "(argument: query)"),
            ("recall", {"query": "seats", "filter": {"n": {"$near": 1}}}, "filter.n.$near"),
            ("remember", {"user_id": "u1"}, "(argument: text)"),
            ("remember", {"memories": [{"text": "ok"}, {"text": " "}]}, "(argument: memories[1].text)"),
            ("remember", {"memories": [{"text": "ok"}], "user_id": "u1"}, "(argument: user_id)"),
            ("remember", {"text": "x", "metadata": "topic=travel"}, "(argument: metadata)"),
            ("update", {"id": "some-id", "metadata": None}, "(argument: metadata)"),
            ("forget", {}, "(argument: namespace)"),
            ("forget", {"id": "some-id", "user_id": "u1"}, "(argument: user_id)"),
            ("get", {"id": "not an id!"}, "(argument: id)"),
            ("list", {"order_by": "size"}, "(argument: order_by)"),
        ]
        for tool, arguments, named in mistakes:
            text = await refused(client, tool, arguments)
            assert named in text, (tool, arguments, text)
        assert "not_found" in await refused(client, "history", {"id": "never-used"})
        with pytest.raises(MCPError, match="unknown tool 'search'"):
            await client.call_tool("search", {"query": "seats"})
        [added] = (await call(client, "remember", {"text": "Still here after the mistakes.", "memories": None,
                                                   "id": None}))["memories"]
        assert (await call(client, "get", {"id": added["id"]}))["text"] == "Still here after the mistakes."


def test_the_docs_name_every_tool_and_argument() -> None:
    from gm.mcp.tools import TOOLS

    rows = {line.split("|")[1].strip(" `"): line for line in DOC.read_text().splitlines() if line.startswith("| `")}
    assert set(rows) == set(TOOLS)
    for name, tool in TOOLS.items():
        for argument in tool.input_schema["properties"]:
            assert f"`{argument}`" in rows[name].split("|")[2], (name, argument)


def _message(payload: dict[str, Any]) -> bytes:
    return orjson.dumps({"jsonrpc": "2.0", **payload}) + b"\n"


async def test_standard_output_carries_only_the_protocol(tmp_path: Path) -> None:
    """Migrating, loading the model and embedding log to standard error; every line on standard
    output is a JSON-RPC message, one per request."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gm", "mcp", "--db", str(tmp_path / "mem.db"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    requests = [
        {"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}},
        {"method": "notifications/initialized"},
        {"id": 2, "method": "tools/call", "params": {"name": "remember", "arguments": {"text": "A fact."}}},
        {"id": 3, "method": "tools/call", "params": {"name": "recall", "arguments": {"query": "fact"}}},
    ]
    answers = []
    async with asyncio.timeout(60):
        for request in requests:  # one at a time: the SDK drops calls still under way when input ends
            process.stdin.write(_message(request))
            if "id" in request:
                answers.append(orjson.loads(await process.stdout.readline()))
        process.stdin.close()
        rest, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert rest == b"" and [a["id"] for a in answers] == [1, 2, 3] and all(a["jsonrpc"] == "2.0" for a in answers)
    assert answers[2]["result"]["structuredContent"]["hits"][0]["memory"]["text"] == "A fact."
    assert b"embedding model" in stderr and b"serving MCP on stdio" in stderr


async def test_a_database_in_use_is_one_line_on_stderr(tmp_path: Path) -> None:
    db = tmp_path / "mem.db"
    async with gm.open(db):
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gm", "mcp", "--db", str(db)],
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert done.returncode == 6 and done.stdout == b""
    [line] = done.stderr.decode().splitlines()
    assert line.startswith("gmem: ") and "mem.db" in line


async def test_gmem_mcp_url_serves_a_running_servers_memories_under_its_key(tmp_path: Path) -> None:
    # The same tools through a server's API: the host runs `gmem mcp --url`, the key decides
    # what the tools see (here one bound to namespace "team").
    from tests.http_server import spawn_server

    keys = "admin-secret-key-123,team-secret-key-456@team"
    process, url = await spawn_server(tmp_path / "server.log", "--db", str(tmp_path / "server.db"),
                                      env={"GM_API_KEYS": keys})
    try:
        async with gm.connect(url, api_key="admin-secret-key-123") as admin:
            await admin.add("Kept elsewhere: the admin's note.", namespace="other", id="elsewhere")
        command = str(Path(sys.executable).parent / "gmem")
        params = StdioServerParameters(command=command, args=["mcp", "--url", url],
                                       env={**os.environ, "GM_API_KEY": "team-secret-key-456"})
        async with asyncio.timeout(90), Client(params, read_timeout_seconds=30) as client:
            remembered = await call(client, "remember", {"text": "Prefers the window seat.", "user_id": "u1"})
            [added] = remembered["memories"]
            assert added["namespace"] == "team"
            hits = await call(client, "recall", {"query": "where does she like to sit?", "user_id": "u1"})
            assert [h["memory"]["text"] for h in hits["hits"]] == ["Prefers the window seat."]
            assert "not_found" in await refused(client, "get", {"id": "elsewhere"})
        async with gm.connect(url, api_key="admin-secret-key-123") as admin:  # it was written on the server
            assert (await admin.get(added["id"])).text == "Prefers the window seat."
    finally:
        process.terminate()
        process.wait(timeout=30)
