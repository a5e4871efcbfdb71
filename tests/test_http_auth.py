"""API keys: parsing, the headers they travel in, bound stats; probes stay open. The full
matrix of routes x keys is tests/test_auth_matrix.py."""

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
