"""The auth matrix: every route x {no key, wrong key, own namespace, other namespace}, on
each backend, and the race a namespace check made before the write would lose: a memory
deleted and re-added under the same id by another tenant between check and write.

Tenant A's key is bound to ``team-a``, B's to ``team-b``; ADMIN is bound to none. Every
body served to A is kept and searched for B's data at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gm.config import parse_api_keys
from gm.storage.base import DeleteMemory, UpdateMemory, WriteOp
from tests.conftest import WriteGate
from tests.http_server import RunningServer, start_server, store_factory

ADMIN = "admin-key-0123456789abcdef"
KEY_A = "tenant-a-key-0123456789abcdef"
KEY_B = "tenant-b-key-0123456789abcdef"
WRONG = "wrong-key-0123456789abcdef"
KEYS = parse_api_keys(f"{ADMIN}, {KEY_A}@team-a, {KEY_B}@team-b")
B_SECRETS = ("team-b", "b-secret-text", "b-secret-value")  # nothing of B's may reach A


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target), api_keys=KEYS)
    yield running
    await running.stop()


class Tenant:
    """Calls as one key and keeps every body it was served."""

    def __init__(self, server: RunningServer, key: str | None) -> None:
        self.server = server
        self.key = key
        self.seen: list[str] = []

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, body = await asyncio.wait_for(self.server.call(method, path, key=self.key, **kwargs), 60)
        self.seen.append(str(body))
        return status, body

    def assert_saw_nothing_of_b(self) -> None:
        for body in self.seen:
            for secret in B_SECRETS:
                assert secret not in body, body


async def add(server: RunningServer, key: str, memory_id: str, text: str, **fields: Any) -> dict[str, Any]:
    status, body = await server.call("POST", "/v1/memories", key=key, json={"id": memory_id, "text": text, **fields})
    assert status == 201, body
    return dict(body)


def routes(own_id: str, other_id: str, fresh: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(method, path, kwargs on A's own namespace, kwargs on B's); ``{id}`` comes from the kwargs."""
    return [
        ("GET", "/v1/stats", {}, {}),
        ("GET", "/v1/openapi.json", {}, {}),
        ("POST", "/v1/memories", {"json": {"text": "a note"}}, {"json": {"text": "x", "namespace": "team-b"}}),
        (
            "POST",
            "/v1/memories",
            {"json": {"memories": [{"text": "a batch note"}]}},
            {"json": {"memories": [{"text": "x", "namespace": "team-b"}]}},
        ),
        ("GET", "/v1/memories", {"params": {"namespace": "team-a"}}, {"params": {"namespace": "team-b"}}),
        (
            "POST",
            "/v1/memories/search",
            {"json": {"query": "secret note"}},
            {"json": {"query": "secret note", "namespace": "team-b"}},
        ),
        (
            "POST",
            "/v1/memories/delete",
            {"json": {"filter": {"nothing": 1}}},
            {"json": {"namespace": "team-b", "filter": {"nothing": 1}}},
        ),
        ("GET", "/v1/memories/{id}", {"id": own_id}, {"id": other_id}),
        ("GET", "/v1/memories/{id}/history", {"id": own_id}, {"id": other_id}),
        ("PATCH", "/v1/memories/{id}", {"id": own_id, "json": {"metadata": {"k": 1}}},
         {"id": other_id, "json": {"metadata": {"k": 1}}}),
        ("PATCH", "/v1/memories/{id}", {"id": own_id, "json": {"text": "a new text"}},
         {"id": other_id, "json": {"text": "overwritten"}}),
        ("DELETE", "/v1/memories/{id}", {"id": fresh}, {"id": other_id}),
    ]


def _url(path: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kwargs = dict(kwargs)
    return path.replace("{id}", kwargs.pop("id", "")), kwargs


async def test_every_route_with_every_kind_of_key(server: RunningServer) -> None:
    await add(server, KEY_A, "a-1", "a secret note", metadata={"k": "a-value"})
    await add(server, KEY_A, "a-2", "a note to delete")
    await add(server, KEY_B, "b-1", "b-secret-text note", metadata={"k": "b-secret-value"})
    a, nobody, wrong = Tenant(server, KEY_A), Tenant(server, None), Tenant(server, WRONG)
    for method, path, own, other in routes("a-1", "b-1", "a-2"):
        for kwargs in (own, other):
            url, rest = _url(path, kwargs)
            for stranger in (nobody, wrong):
                status, body = await stranger.call(method, url, **rest)
                assert status == 401 and body["error"]["code"] == "unauthorized", (method, url, body)
        url, rest = _url(path, own)
        status, body = await a.call(method, url, **rest)
        assert status in (200, 201, 204), (method, url, body)
        url, rest = _url(path, other)
        status, body = await a.call(method, url, **rest)
        if path in ("/v1/stats", "/v1/openapi.json"):
            assert status == 200
        elif "{id}" in path:  # an id in another namespace is an unknown id: same status, same words
            unknown_url = url.replace("b-1", "never-used-9")
            unknown_status, unknown = await a.call(method, unknown_url, **rest)
            assert (status, body) == (unknown_status, _with_id(unknown, "never-used-9", "b-1")), (method, url)
            unknown = {"code": "not_found", "message": "no memory with id 'b-1'", "details": {}}
            assert status == 404 and body["error"] == unknown
        else:  # naming another namespace is refused outright
            assert status == 403 and body["error"]["code"] == "forbidden", (method, url, body)
    for probe in ("/v1/healthz", "/v1/readyz"):
        for caller in (nobody, wrong, a):
            assert (await caller.call("GET", probe))[0] == 200
    status, stats = await a.call("GET", "/v1/stats")
    assert set(stats["namespaces"]) == {"team-a"}
    # A client id held in another namespace: 409, and nothing of B's in the answer.
    status, body = await a.call("POST", "/v1/memories", json={"id": "b-1", "text": "mine now"})
    assert status == 409 and body["error"]["code"] == "conflict"
    a.assert_saw_nothing_of_b()
    for stranger in (nobody, wrong):
        stranger.assert_saw_nothing_of_b()
    status, b_memory = await server.call("GET", "/v1/memories/b-1", key=KEY_B)  # untouched by all of the above
    assert status == 200 and b_memory["text"] == "b-secret-text note"
    assert b_memory["metadata"] == {"k": "b-secret-value"} and b_memory["updated_at"] == b_memory["created_at"]
    status, body = await server.call("GET", "/v1/memories/b-1/history", key=KEY_B)
    assert [h["op"] for h in body["history"]] == ["add"]


def _with_id(body: Any, old: str, new: str) -> Any:
    error = dict(body["error"])
    error["message"] = error["message"].replace(old, new)
    return {"error": error}


async def _replace_with_bs(server: RunningServer, memory_id: str) -> None:
    """A's memory goes and B adds one under the same id, while A's request waits at the gate."""
    status, _ = await server.call("DELETE", f"/v1/memories/{memory_id}", key=ADMIN)
    assert status == 204
    await add(server, KEY_B, memory_id, "b-secret-text", metadata={"k": "b-secret-value"})


@pytest.mark.parametrize(
    ("method", "kind", "body"),
    [
        ("PATCH", UpdateMemory, {"text": "a overwrites"}),
        ("PATCH", UpdateMemory, {"metadata": {"k": "a overwrites"}}),
        ("DELETE", DeleteMemory, None),
    ],
    ids=["patch-text", "patch-metadata", "delete"],
)
async def test_a_memory_replaced_by_another_tenant_meanwhile_is_never_touched(
    server: RunningServer, method: str, kind: type[WriteOp], body: dict[str, Any] | None
) -> None:
    await add(server, KEY_A, "shared-1", "a note")
    gate = WriteGate(server.state.store.backend, kind)
    a = Tenant(server, KEY_A)
    request = asyncio.create_task(a.call(method, "/v1/memories/shared-1", **({"json": body} if body else {})))
    await asyncio.wait_for(gate.reached.wait(), 60)  # A's request passed every check before its write
    await _replace_with_bs(server, "shared-1")
    gate.released.set()
    status, answer = await request
    unknown = {"code": "not_found", "message": "no memory with id 'shared-1'", "details": {}}
    assert status == 404 and answer["error"] == unknown
    a.assert_saw_nothing_of_b()
    status, b_memory = await server.call("GET", "/v1/memories/shared-1", key=KEY_B)
    assert status == 200
    assert (b_memory["namespace"], b_memory["text"], b_memory["metadata"]) == (
        "team-b", "b-secret-text", {"k": "b-secret-value"}
    )
    status, history = await server.call("GET", "/v1/memories/shared-1/history", key=KEY_B)
    assert [h["op"] for h in history["history"]] == ["add"]
    status, history = await a.call("GET", "/v1/memories/shared-1/history")
    assert [h["op"] for h in history["history"]] == ["add", "delete"]
    a.assert_saw_nothing_of_b()
