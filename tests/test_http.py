"""The HTTP API on a real server: every route's success and error cases, limits, and the OpenAPI document."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gm.config import parse_api_keys
from gm.embedding import ModelSpec
from gm.http.app import ROUTES, make_app
from gm.http.openapi import openapi_document
from gm.mcp.bridge import MCP_PATH
from gm.memory import MAX_BATCH, MAX_TTL_SECONDS
from gm.storage import postgres_migrations, sqlite_migrations
from tests.http_server import RunningServer, start_server, store_factory

JSON = {"Content-Type": "application/json"}
LATEST = sqlite_migrations.LATEST
assert postgres_migrations.LATEST == LATEST  # both backends number their schemas alike


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target), max_body_bytes=64 * 1024)
    yield running
    await running.stop()


def error_code(body: dict) -> str:
    """The code of a contract error body, after checking its whole shape."""
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]["code"]


async def test_probes(server: RunningServer) -> None:
    assert await server.call("GET", "/v1/healthz") == (200, {"status": "ok"})
    status, body = await server.call("GET", "/v1/readyz")
    assert status == 200 and body["status"] == "ready" and body["schema_version"] == LATEST


async def test_add_get_list_update_delete_history(server: RunningServer) -> None:
    status, memory = await server.call(
        "POST", "/v1/memories", json={"text": "Prefers window seats.", "user_id": "u1", "metadata": {"topic": "travel"}}
    )
    assert status == 201
    assert memory["namespace"] == "default" and memory["user_id"] == "u1" and memory["agent_id"] is None
    assert memory["metadata"] == {"topic": "travel"} and memory["expires_at"] is None
    assert memory["created_at"].endswith("Z") and memory["created_at"] == memory["updated_at"]

    assert await server.call("GET", f"/v1/memories/{memory['id']}") == (200, memory)

    status, page = await server.call("GET", "/v1/memories", params={"user_id": "u1"})
    assert status == 200 and page == {"memories": [memory], "next_cursor": None}

    status, updated = await server.call(
        "PATCH", f"/v1/memories/{memory['id']}", json={"text": "Prefers aisle seats.", "metadata": {"topic": "air"}}
    )
    assert status == 200 and updated["text"] == "Prefers aisle seats." and updated["metadata"] == {"topic": "air"}
    assert updated["created_at"] == memory["created_at"]

    status, body = await server.call("DELETE", f"/v1/memories/{memory['id']}")
    assert status == 204
    status, body = await server.call("GET", f"/v1/memories/{memory['id']}")
    assert status == 404 and error_code(body) == "not_found"
    status, body = await server.call("DELETE", f"/v1/memories/{memory['id']}")
    assert status == 404

    status, body = await server.call("GET", f"/v1/memories/{memory['id']}/history")
    assert status == 200
    assert [h["op"] for h in body["history"]] == ["add", "update", "delete"]
    assert body["history"][1]["text"] == "Prefers aisle seats."
    status, body = await server.call("GET", "/v1/memories/never-existed/history")
    assert status == 404


async def test_batch_add_is_all_or_nothing(server: RunningServer) -> None:
    inputs = [{"text": f"fact number {i}", "user_id": "u1"} for i in range(3)]
    status, body = await server.call("POST", "/v1/memories", json={"memories": inputs})
    assert status == 201 and [m["text"] for m in body["memories"]] == [i["text"] for i in inputs]

    bad = [{"text": "fine"}, {"text": ""}]
    status, body = await server.call("POST", "/v1/memories", json={"memories": bad})
    assert status == 422 and body["error"]["details"]["path"] == "memories[1].text"
    status, stats = await server.call("GET", "/v1/stats")
    assert stats["memories"] == 3

    status, body = await server.call("POST", "/v1/memories", json={"memories": [{"text": "x"}] * (MAX_BATCH + 1)})
    assert status == 422 and error_code(body) == "invalid_input"


async def test_client_ids_make_retries_idempotent(server: RunningServer) -> None:
    item = {"id": "import:42", "text": "Lives in Oslo.", "user_id": "u1"}
    status, first = await server.call("POST", "/v1/memories", json=item)
    assert status == 201
    status, again = await server.call("POST", "/v1/memories", json=item)
    assert status == 200 and again == first
    status, body = await server.call("POST", "/v1/memories", json={**item, "text": "Lives in Bergen."})
    assert status == 409 and error_code(body) == "conflict"
    status, body = await server.call("POST", "/v1/memories", json={**item, "id": "bad id!"})
    assert status == 422 and body["error"]["details"]["path"] == "id"


async def test_search_modes_filters_and_scope(server: RunningServer) -> None:
    texts = [
        ("Prefers window seats on long flights.", "u1", {"topic": "travel", "priority": 3}),
        ("Allergic to peanuts and shellfish.", "u1", {"topic": "health", "priority": 5}),
        ("Plays the cello in a string quartet.", "u2", {"topic": "music", "priority": 1}),
    ]
    for text, user, metadata in texts:
        status, _ = await server.call(
            "POST", "/v1/memories", json={"text": text, "user_id": user, "metadata": metadata}
        )
        assert status == 201
    for mode in ("hybrid", "vector", "keyword"):
        status, body = await server.call(
            "POST", "/v1/memories/search", json={"query": "which seat on the flights", "user_id": "u1", "mode": mode}
        )
        assert status == 200, body
        assert body["hits"][0]["memory"]["text"].startswith("Prefers window seats"), mode
        scores = [h["score"] for h in body["hits"]]
        assert scores == sorted(scores, reverse=True) and isinstance(body["took_ms"], float)
        assert all(h["memory"]["user_id"] == "u1" for h in body["hits"])
    status, body = await server.call(
        "POST", "/v1/memories/search", json={"query": "food", "filter": {"priority": {"$gte": 4}}, "limit": 5}
    )
    assert [h["memory"]["text"] for h in body["hits"]] == ["Allergic to peanuts and shellfish."]
    # Each hit carries its parts; min_score cuts the unrelated ones; recency is taken.
    status, body = await server.call("POST", "/v1/memories/search", json={
        "query": "which seat on the flights", "user_id": "u1", "min_score": 0.3, "recency": 30})
    assert status == 200, body
    assert [h["memory"]["text"] for h in body["hits"]] == ["Prefers window seats on long flights."]
    assert isinstance(body["hits"][0]["vector_score"], float) and isinstance(body["hits"][0]["keyword_score"], float)

    for payload, path in [
        ({"query": ""}, "query"),
        ({"query": "x", "mode": "fuzzy"}, "mode"),
        ({"query": "x", "limit": 0}, "limit"),
        ({"query": "x", "filter": {"priority": {"$near": 1}}}, "filter.priority.$near"),
        ({"query": "x", "colour": "red"}, "colour"),
        ({"query": "x", "min_scor": 0.3}, "min_scor"),
        ({"query": "x", "min_score": 1.5}, "min_score"),
        ({"query": "x", "recency": 0}, "recency"),
        ({"query": "x", "recency": "30d"}, "recency"),
        ({}, "query"),
    ]:
        status, body = await server.call("POST", "/v1/memories/search", json=payload)
        assert status == 422, payload
        assert body["error"]["details"]["path"] == path


async def test_bulk_delete_and_list_paging(server: RunningServer) -> None:
    inputs = [{"text": f"note {i}", "user_id": "u1", "metadata": {"n": i}} for i in range(7)]
    await server.call("POST", "/v1/memories", json={"memories": inputs})
    seen: list[str] = []
    cursor = None
    while True:
        params = {"user_id": "u1", "limit": "3", **({"cursor": cursor} if cursor else {})}
        status, page = await server.call("GET", "/v1/memories", params=params)
        assert status == 200
        seen += [m["text"] for m in page["memories"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"note {i}" for i in reversed(range(7))]
    status, body = await server.call("GET", "/v1/memories", params={"limit": "many"})
    assert status == 422 and body["error"]["details"]["path"] == "limit"
    status, body = await server.call("GET", "/v1/memories", params={"cursor": "garbage"})
    assert status == 422

    status, body = await server.call(
        "POST", "/v1/memories/delete", json={"namespace": "default", "filter": {"n": {"$lt": 3}}}
    )
    assert (status, body) == (200, {"deleted": 3})
    status, body = await server.call("POST", "/v1/memories/delete", json={"user_id": "u1"})
    assert status == 422 and body["error"]["details"]["path"] == "namespace"


async def test_bad_requests_get_json_errors(server: RunningServer) -> None:
    status, body = await server.call("POST", "/v1/memories", data=b'{"text": "unterminated', headers=dict(JSON))
    assert status == 400 and error_code(body) == "malformed_json"
    # nested deeper than Python's own parser goes, with a long number that needs it: a 400, never a 500
    deep = b'{"text": "x", "metadata": {"a": ' + b"[" * 1000 + b"12345678901234567890" + b"]" * 1000 + b"}}"
    status, body = await server.call("POST", "/v1/memories", data=deep, headers=dict(JSON))
    assert status == 400 and error_code(body) == "malformed_json"
    status, body = await server.call("GET", "/v1/memories", params={"filter": "[" * 900 + "1" * 20 + "]" * 900})
    assert status == 422 and body["error"]["details"]["path"] == "filter"
    status, body = await server.call("POST", "/v1/memories", json=["not", "an", "object"])
    assert status == 422
    status, body = await server.call("POST", "/v1/memories", json={"text": "x", "metadata": [1, 2]})
    assert status == 422 and body["error"]["details"]["path"] == "metadata"
    status, body = await server.call("POST", "/v1/memories", json={"text": "x" * (70 * 1024)})
    assert status == 413 and error_code(body) == "body_too_large"
    status, body = await server.call("GET", "/v1/nowhere")
    assert status == 404 and error_code(body) == "not_found"
    status, body = await server.call("PUT", "/v1/memories")
    assert status == 405 and error_code(body) == "method_not_allowed"
    status, body = await server.call("PATCH", "/v1/memories/nope", json={"text": "x"})
    assert status == 404
    status, body = await server.call("PATCH", "/v1/memories/nope", data=b"{", headers=JSON)
    assert status == 400
    status, stats = await server.call("GET", "/v1/stats")
    assert stats["memories"] == 0


async def test_integers_past_64_bits_are_refused_by_name_not_rounded(server: RunningServer) -> None:
    huge = "18446744073709551616"  # 2**64: orjson alone reads it as a float, silently rounded
    json_header = {"Content-Type": "application/json"}
    cases = [
        ("POST", "/v1/memories", f'{{"text": "x", "metadata": {{"n": {huge}}}}}', "metadata.n"),
        ("POST", "/v1/memories", f'{{"text": "x", "metadata": {{"a": [1, -{huge}]}}}}', "metadata.a[1]"),
        ("POST", "/v1/memories", f'{{"memories": [{{"text": "x", "metadata": {{"n": {huge}}}}}]}}',
         "memories[0].metadata.n"),
        ("POST", "/v1/memories", f'{{"text": "x", "ttl_seconds": {huge}}}', "ttl_seconds"),
        ("POST", "/v1/memories/search", f'{{"query": "x", "filter": {{"n": {huge}}}}}', "filter.n"),
        ("POST", "/v1/memories/search", f'{{"query": "x", "limit": {huge}}}', "limit"),
        ("POST", "/v1/memories/delete", f'{{"namespace": "default", "filter": {{"n": {{"$gt": {huge}}}}}}}',
         "filter.n.$gt"),
    ]
    for method, path, body, field in cases:
        status, answer = await server.call(method, path, data=body.encode(), headers=dict(json_header))
        assert status == 422 and answer["error"]["details"]["path"] == field, (body, answer)
    status, memory = await server.call("POST", "/v1/memories", json={"text": "kept", "metadata": {"n": 2**63 - 1}})
    assert status == 201
    status, answer = await server.call(
        "PATCH", f"/v1/memories/{memory['id']}", data=f'{{"metadata": {{"n": {huge}}}}}'.encode(), headers=json_header
    )
    assert status == 422 and answer["error"]["details"]["path"] == "metadata.n"
    status, page = await server.call("GET", "/v1/memories", params={"filter": f'{{"n": {huge}}}'})
    assert status == 422 and page["error"]["details"]["path"] == "filter.n"
    status, page = await server.call("GET", "/v1/memories", params={"filter": '{"n": 9223372036854775807}'})
    assert [m["metadata"] for m in page["memories"]] == [{"n": 2**63 - 1}]  # the largest is kept exact
    status, body = await server.call("POST", "/v1/memories", json={"text": "a long number: 12345678901234567890"})
    assert status == 201 and body["text"].endswith("12345678901234567890")


async def test_expiry_over_http(server: RunningServer) -> None:
    status, memory = await server.call("POST", "/v1/memories", json={"text": "short lived", "ttl_seconds": 0.05})
    assert status == 201 and memory["expires_at"] is not None
    for bad in ("2020-01-01T00:00:00Z", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00"):
        status, body = await server.call("POST", "/v1/memories", json={"text": "never stored", "expires_at": bad})
        assert status == 422 and body["error"]["details"]["path"] == "expires_at", bad
    status, lasting = await server.call("POST", "/v1/memories", json={"text": "lasting", "namespace": "other"})
    status, body = await server.call("PATCH", f"/v1/memories/{lasting['id']}", json={"expires_at": "2020-01-01T00:00Z"})
    assert status == 422 and body["error"]["details"]["path"] == "expires_at"
    await asyncio.sleep(0.1)
    assert (await server.call("GET", f"/v1/memories/{memory['id']}"))[0] == 404
    status, page = await server.call("GET", "/v1/memories")
    assert page["memories"] == []
    status, body = await server.call("POST", "/v1/memories/search", json={"query": "short lived gone"})
    assert body["hits"] == []


async def test_stats_shape(server: RunningServer, target: str) -> None:
    await server.call("POST", "/v1/memories", json={"text": "a", "namespace": "n1"})
    await server.call("POST", "/v1/memories", json={"text": "b", "namespace": "n2"})
    status, stats = await server.call("GET", "/v1/stats")
    assert status == 200
    assert stats["memories"] == 2 and stats["namespaces"] == {"n1": 1, "n2": 1}
    assert stats["schema_version"] == LATEST and stats["model"] == ModelSpec.default().identity
    assert stats["model_label"] == "all-MiniLM-L6-v2-int8"
    assert stats["backend"] == ("postgres" if target.startswith("postgresql:") else "sqlite")


async def test_openapi_names_exactly_the_served_routes(server: RunningServer) -> None:
    status, document = await server.call("GET", "/v1/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.1")
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "patch", "delete", "put")
    }
    app = make_app(server.state)
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None and route.resource.canonical != MCP_PATH
    }
    # /metrics speaks Prometheus's format to Prometheus, not the v1 JSON contract: not in the document.
    served.remove(("GET", "/metrics"))
    assert served == documented
    assert served == {(method, path) for method, path, _ in ROUTES}
    assert document == openapi_document(keys=False) and document["security"] == []


async def test_unknown_query_parameters_are_refused_on_every_route(server: RunningServer) -> None:
    for user in ("u1", "u2"):
        await server.call("POST", "/v1/memories", json={"text": f"a memory of {user}", "user_id": user})
    status, body = await server.call("GET", "/v1/memories", params={"userid": "u1"})
    assert status == 422 and error_code(body) == "invalid_input" and body["error"]["details"] == {"path": "userid"}
    assert "userid" in body["error"]["message"] and "user_id" in body["error"]["message"]
    status, body = await server.call("GET", "/v1/memories?user_id=u1&user_id=u2")
    assert status == 422 and body["error"]["details"] == {"path": "user_id"}
    for method, path, _ in ROUTES:
        url = path.replace(path[path.find("{") : path.find("}") + 1], "some-id") if "{" in path else path
        status, body = await server.call(method, url, params={"colour": "red"}, json={"query": "x", "text": "x"})
        assert status == 422, (method, url, status, body)
        assert error_code(body) == "invalid_input" and body["error"]["details"] == {"path": "colour"}
    status, page = await server.call("GET", "/v1/memories", params={"user_id": "u1"})
    assert status == 200 and [m["text"] for m in page["memories"]] == ["a memory of u1"]


async def test_query_integers_are_plain_ascii_digits(server: RunningServer) -> None:
    await server.call("POST", "/v1/memories", json={"memories": [{"text": f"note {i}"} for i in range(3)]})
    for raw in ("\u0661\u0662", "1_000", " 5", "5 ", "+5", "-1", "0x5", "2.0", "", "\uff15", "\u00b2", "9" * 5000):
        status, body = await server.call("GET", "/v1/memories", params={"limit": raw})
        assert status == 422, raw
        assert error_code(body) == "invalid_input" and body["error"]["details"] == {"path": "limit"}, raw
    for raw, count in (("2", 2), ("02", 2), ("1000", 3)):
        status, page = await server.call("GET", "/v1/memories", params={"limit": raw})
        assert status == 200 and len(page["memories"]) == count, raw
    status, body = await server.call("GET", "/v1/memories", params={"limit": "1001"})
    assert status == 422 and body["error"]["details"] == {"path": "limit"}
    status, page = await server.call("GET", "/v1/memories", params={"limit": "2"})
    cursor = page["next_cursor"]
    assert (await server.call("GET", "/v1/memories", params={"cursor": cursor}))[0] == 200
    created, rowid = cursor.split(".")
    for raw in ("", f"+{created}.{rowid}", f" {created}.{rowid}", f"{created}.{rowid}_0", "\u0661.\u0662", "1.2.3"):
        status, body = await server.call("GET", "/v1/memories", params={"cursor": raw})
        assert status == 422 and body["error"]["details"] == {"path": "cursor"}, raw


async def test_a_route_asked_with_the_wrong_method_is_a_405_naming_the_right_ones(server: RunningServer) -> None:
    for method, url, allowed in [
        ("GET", "/v1/memories/search", "POST"),
        ("GET", "/v1/memories/delete", "POST"),
        ("PATCH", "/v1/memories/search", "POST"),
        ("DELETE", "/v1/memories/delete", "POST"),
        ("PUT", "/v1/memories/some-id", "DELETE,GET,PATCH"),
        ("POST", "/v1/memories/some-id", "DELETE,GET,PATCH"),
        ("POST", "/v1/memories/some-id/history", "GET"),
        ("DELETE", "/v1/memories", "GET,POST"),
        ("POST", "/v1/stats", "GET"),
    ]:
        async with server.session.request(method, server.url + url) as response:
            body = await response.json()
            assert response.status == 405, (method, url)
            assert response.headers["Allow"] == allowed, (method, url)
            assert error_code(body) == "method_not_allowed" and allowed.split(",")[0] in body["error"]["message"]
    # the two names are routes, so they cannot be ids (a memory called "search" could never be read back)
    for bad in ({"text": "x", "id": "search"}, {"memories": [{"text": "x"}, {"text": "y", "id": "delete"}]}):
        status, body = await server.call("POST", "/v1/memories", json=bad)
        assert status == 422 and body["error"]["details"]["path"] in ("id", "memories[1].id"), bad
    status, body = await server.call("POST", "/v1/memories", json={"text": "x", "id": "search-2"})
    assert status == 201
    assert (await server.call("GET", "/v1/memories/search-2"))[0] == 200


async def test_every_error_body_has_details(tmp_path: Path) -> None:
    """404, 405, 413, 503 and auth errors too, not only the 422s that name a field."""
    key = "an-admin-key-0123456789abcdef"
    keyed = await start_server(store_factory(tmp_path / "keyed.db"), api_keys=parse_api_keys(key), max_body_bytes=1024)
    starting = await start_server(store_factory(tmp_path / "starting.db"), open_store=False)
    try:
        for server, method, url, kwargs, status in [
            (keyed, "GET", "/v1/stats", {}, 401),
            (keyed, "GET", "/v1/nowhere", {"key": key}, 404),
            (keyed, "GET", "/v1/memories/unknown", {"key": key}, 404),
            (keyed, "PUT", "/v1/memories", {"key": key}, 405),
            (keyed, "POST", "/v1/memories", {"key": key, "json": {"text": "x" * 2000}}, 413),
            (keyed, "POST", "/v1/memories", {"key": key, "data": b"{", "headers": dict(JSON)}, 400),
                (keyed, "POST", "/v1/memories", {"key": key, "data": b"{}"}, 415),
            (keyed, "PATCH", "/v1/memories/unknown", {"key": key, "json": {}}, 422),
            (starting, "GET", "/v1/stats", {}, 503),
        ]:
            got, body = await server.call(method, url, **kwargs)
            assert got == status, (method, url, got, body)
            error_code(body)
    finally:
        await keyed.stop()
        await starting.stop()


async def test_unknown_body_fields_are_refused_on_every_route_with_a_body(server: RunningServer) -> None:
    status, memory = await server.call("POST", "/v1/memories", json={"text": "kept as it was"})
    assert status == 201
    for method, url, body, path in [
        ("POST", "/v1/memories", {"text": "x", "userid": "u1"}, "userid"),
        ("POST", "/v1/memories", {"memories": [{"text": "x"}, {"text": "y", "userid": "u1"}]}, "memories[1].userid"),
        ("POST", "/v1/memories", {"memories": [{"text": "x"}], "userid": "u1"}, "userid"),
        ("POST", "/v1/memories/search", {"query": "x", "userid": "u1"}, "userid"),
        ("PATCH", f"/v1/memories/{memory['id']}", {"text": "changed", "userid": "u1"}, "userid"),
        ("POST", "/v1/memories/delete", {"namespace": "default", "userid": "u1"}, "userid"),
    ]:
        status, answer = await server.call(method, url, json=body)
        assert status == 422 and answer["error"]["details"] == {"path": path}, (method, url, answer)
    status, page = await server.call("GET", "/v1/memories")
    assert [m["text"] for m in page["memories"]] == ["kept as it was"]


async def test_bounds_the_document_can_state(server: RunningServer) -> None:
    """What schemathesis found looser or stricter than the document: now the same bound on both sides."""
    status, body = await server.call("POST", "/v1/memories/search", json={"query": "x", "limit": 3.0})
    assert status == 200  # JSON Schema's integer 3, written 3.0
    status, body = await server.call("POST", "/v1/memories/search", json={"query": "x", "limit": 3.5})
    assert status == 422 and body["error"]["details"] == {"path": "limit"}
    status, _ = await server.call("POST", "/v1/memories", json={"text": "a century", "ttl_seconds": MAX_TTL_SECONDS})
    assert status == 201
    status, body = await server.call("POST", "/v1/memories", json={"text": "x", "ttl_seconds": MAX_TTL_SECONDS + 1})
    assert status == 422 and body["error"]["details"] == {"path": "ttl_seconds"}
    schema = openapi_document()["components"]["schemas"]["MemoryInput"]["properties"]["ttl_seconds"]
    assert schema["maximum"] == MAX_TTL_SECONDS
