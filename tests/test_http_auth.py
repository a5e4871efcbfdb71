"""API keys: every route x no key / wrong key / good key / key bound to another namespace; probes stay open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gm.config import ApiKey, parse_api_keys
from gm.errors import InvalidInput
from tests.http_server import RunningServer, start_server, store_factory

ADMIN = "admin-key-0123456789abcdef"
TEAM = "team-key-0123456789abcdef"
KEYS = parse_api_keys(f"{ADMIN}, {TEAM}@team")


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target), api_keys=KEYS)
    yield running
    await running.stop()


def test_key_list_parsing() -> None:
    assert KEYS == (ApiKey(ADMIN, None), ApiKey(TEAM, "team"))
    assert "admin-key" not in repr(KEYS)  # never printed by accident
    with pytest.raises(InvalidInput):
        parse_api_keys("short")


async def seed(server: RunningServer) -> tuple[str, str]:
    """One memory in 'default' and one in 'team'; returns their ids."""
    status, other = await server.call("POST", "/v1/memories", key=ADMIN, json={"text": "default ns memory"})
    assert status == 201
    status, own = await server.call(
        "POST", "/v1/memories", key=ADMIN, json={"text": "team memory", "namespace": "team"}
    )
    assert status == 201
    return other["id"], own["id"]


def requests(other_id: str, own_id: str) -> list[tuple[str, str, dict, dict]]:
    """(method, path, kwargs acting on another namespace, kwargs acting on the key's own)."""
    return [
        ("GET", "/v1/stats", {}, {}),
        ("GET", "/v1/openapi.json", {}, {}),
        ("POST", "/v1/memories", {"json": {"text": "x", "namespace": "default"}}, {"json": {"text": "y"}}),
        ("GET", "/v1/memories", {"params": {"namespace": "default"}}, {"params": {"namespace": "team"}}),
        (
            "POST",
            "/v1/memories/search",
            {"json": {"query": "memory", "namespace": "default"}},
            {"json": {"query": "memory"}},
        ),
        ("GET", "/v1/memories/{id}", {"id": other_id}, {"id": own_id}),
        ("GET", "/v1/memories/{id}/history", {"id": other_id}, {"id": own_id}),
        (
            "PATCH",
            "/v1/memories/{id}",
            {"id": other_id, "json": {"metadata": {"a": 1}}},
            {"id": own_id, "json": {"metadata": {"a": 1}}},
        ),
        (
            "POST",
            "/v1/memories/delete",
            {"json": {"namespace": "default", "filter": {"nothing": 1}}},
            {"json": {"filter": {"nothing": 1}}},
        ),
        ("DELETE", "/v1/memories/{id}", {"id": other_id}, {"id": own_id}),
    ]


async def test_auth_matrix(server: RunningServer) -> None:
    other_id, own_id = await seed(server)
    unbound_only = {"/v1/stats", "/v1/openapi.json"}
    for method, path, on_other, on_own in requests(other_id, own_id):
        for kwargs in (on_other, on_own):
            kwargs = dict(kwargs)
            url = path.replace("{id}", kwargs.pop("id", ""))
            for key, header in ((None, {}), ("wrong-key-0123456789abcdef", {})):
                status, body = await server.call(method, url, key=key, headers=header, **kwargs)
                assert status == 401, (method, url, key)
                assert body["error"]["code"] == "unauthorized"
                assert "admin-key" not in str(body) and "team-key" not in str(body)
        # a key bound to 'team' on another namespace: 403
        kwargs = dict(on_other)
        url = path.replace("{id}", kwargs.pop("id", ""))
        status, body = await server.call(method, url, key=TEAM, **kwargs)
        if path in unbound_only:
            assert status == 200, (method, url)
        else:
            assert status == 403, (method, url, body)
            assert body["error"]["code"] == "forbidden"
        # the bound key on its own namespace, and the admin key, succeed
        kwargs = dict(on_own)
        url = path.replace("{id}", kwargs.pop("id", ""))
        status, body = await server.call(method, url, key=TEAM, **kwargs)
        assert status in (200, 201, 204), (method, url, body)
    status, _ = await server.call("GET", f"/v1/memories/{other_id}", key=ADMIN)
    assert status == 200  # the 403s above changed nothing


async def test_key_headers_and_bound_stats(server: RunningServer) -> None:
    await seed(server)
    status, _ = await server.call("GET", "/v1/stats", headers={"X-API-Key": ADMIN})
    assert status == 200
    status, _ = await server.call("GET", "/v1/stats", headers={"Authorization": f"bearer {ADMIN}"})
    assert status == 200
    status, stats = await server.call("GET", "/v1/stats", key=TEAM)
    assert stats["namespaces"] == {"team": 1} and stats["memories"] == 1


async def test_probes_need_no_key(server: RunningServer) -> None:
    assert (await server.call("GET", "/v1/healthz"))[0] == 200
    assert (await server.call("GET", "/v1/readyz"))[0] == 200
    assert (await server.call("GET", "/v1/readyz", key="wrong-key-0123456789abcdef"))[0] == 200


def test_key_lists_that_would_widen_access_are_refused() -> None:
    for raw in (f"{TEAM}@", f"{TEAM},{TEAM}@team", f"{ADMIN}@{'x' * 300}"):
        with pytest.raises(InvalidInput):
            parse_api_keys(raw)


async def test_a_reused_id_shows_each_bound_key_only_its_own_history(tmp_path: Path) -> None:
    keys = parse_api_keys(f"{TEAM}@team, {ADMIN}@other")
    server = await start_server(store_factory(tmp_path / "reuse.db"), api_keys=keys)
    try:
        assert (await server.call("POST", "/v1/memories", key=TEAM, json={"id": "shared-1", "text": "team note"}))[
            0
        ] == 201
        assert (await server.call("DELETE", "/v1/memories/shared-1", key=TEAM))[0] == 204
        status, _ = await server.call(
            "POST", "/v1/memories", key=ADMIN, json={"id": "shared-1", "text": "other secret"}
        )
        assert status == 201
        status, body = await server.call("GET", "/v1/memories/shared-1/history", key=TEAM)
        assert status == 200 and [(h["op"], h["text"]) for h in body["history"]] == [
            ("add", "team note"),
            ("delete", "team note"),
        ]
        status, body = await server.call("GET", "/v1/memories/shared-1/history", key=ADMIN)
        assert status == 200 and [h["text"] for h in body["history"]] == ["other secret"]
    finally:
        await server.stop()
