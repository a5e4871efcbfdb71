"""schemathesis over ``/v1/openapi.json`` against a real ``gmem serve``, with and without API
keys: generated requests, valid and not, never get a 5xx, and every answer conforms to the
document (status, content type, headers, body), so the document is as strict as the server.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema_rs  # schemathesis' own JSON Schema validator
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import ignored_auth

from gm.http.openapi import openapi_document
from tests.http_server import spawn_server, start_server, store_factory

KEY = "conformance-key-0123456789abcdef"
# Examples per operation in the fuzzing phase: 12 operations x 2 servers in about 35 s on 2 cores (50: 48 s).
MAX_EXAMPLES = 25

# A valid expires_at is one JSON Schema cannot state: a time in the future (and before 10000).
# Valid requests are generated with such times; invalid ones still get arbitrary strings.
schemathesis.openapi.format(
    "date-time",
    st.builds(
        lambda days, offset: (datetime.now(UTC) + timedelta(days=days)).astimezone(offset).isoformat(),
        st.integers(1, 2_900_000),
        st.sampled_from([UTC, *(timezone(timedelta(hours=h)) for h in (-11, -5, 2, 14))]),
    ),
)


def served(directory: Path, keys: str | None) -> Iterator[str]:
    """`gmem serve` on a fresh SQLite file, as the documents' users run it."""
    env = {"GM_API_KEYS": keys} if keys else {}
    process, url = asyncio.run(spawn_server(directory / "serve.log", "--db", str(directory / "mem.db"), env=env))
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module", params=["without-keys", "with-keys"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict]]:
    """A server and the headers to send it: none without keys, the admin key with them."""
    if request.param == "without-keys":
        yield from ((url, {}) for url in served(tmp_path_factory.mktemp("open"), None))
    else:
        keys = f"{KEY}, other-key-0123456789abcdef@team"
        yield from ((url, {"Authorization": f"Bearer {KEY}"}) for url in served(tmp_path_factory.mktemp("keyed"), keys))


# The document a server with keys serves (test_http checks it is the one served), loaded at
# collection so that each operation is a test of its own; one server without keys serves the
# same document but for its empty `security`.
DOCUMENT = openapi_document(keys=True)
assert openapi_document(keys=False) == {**DOCUMENT, "security": []}
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=schemathesis.Config.from_dict(
        {
            "suppress-health-check": ["all"],
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            # The coverage phase's cases for the recursive filter language ($and / $or / $not) take
            # minutes to build on 2 cores; those operations are fuzzed, valid and invalid, all the same.
            "operations": [
                {"include-name": name, "phases": {"coverage": {"enabled": False}}}
                for name in ("GET /v1/memories", "POST /v1/memories/search", "POST /v1/memories/delete")
            ],
        }
    ),
)


def _time(value: object) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


@schema.hook
def map_case(ctx: object, case: schemathesis.Case) -> schemathesis.Case:
    """Three rules JSON Schema cannot state, kept by the valid requests generated (the
    document's descriptions say them): occurred_after is not later than occurred_before, a
    list's cursor goes with the order_by it came from, and a re-embed's model_dir is a model's
    folder on the server (here none is: a valid request asks for a reindex, null)."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return case
    if case.method.upper() == "POST" and case.path == "/v1/admin/reembed" and isinstance(case.body, dict):
        case.body["model_dir"] = None
    for values in (case.query, case.body):
        if not isinstance(values, dict):
            continue
        after, before = _time(values.get("occurred_after")), _time(values.get("occurred_before"))
        if after is not None and before is not None and after > before:
            values["occurred_after"], values["occurred_before"] = values["occurred_before"], values["occurred_after"]
        cursor = values.get("cursor")
        if isinstance(cursor, str) and (cursor.startswith("o") != (values.get("order_by") == "occurred_at")):
            values["cursor"] = cursor.removeprefix("o") if cursor.startswith("o") else "o" + cursor
    return case


@pytest.mark.timeout(120)
@schema.parametrize()
def test_generated_requests_get_documented_answers(case: schemathesis.Case, server: tuple[str, dict]) -> None:
    url, headers = server
    # Without keys every request is served whatever auth it carries: that is what `security: []` says.
    excluded = [] if headers else [ignored_auth]
    case.call_and_validate(base_url=url, headers=headers, excluded_checks=excluded, timeout=30)


# -- what generated clients need: names for every operation, a shape for every answer ----------------

OPERATIONS = [(method, path, operation) for path, item in DOCUMENT["paths"].items()
              for method, operation in item.items() if method in ("get", "post", "put", "patch", "delete")]


def test_every_operation_has_a_unique_operation_id() -> None:
    ids = [operation.get("operationId") for _, _, operation in OPERATIONS]
    assert all(isinstance(i, str) and i.isidentifier() for i in ids), ids
    assert len(set(ids)) == len(ids) == 16, ids
    assert {("post", "/v1/memories"): "addMemories", ("get", "/v1/stats"): "stats",
            ("delete", "/v1/memories/{id}"): "deleteMemory"}.items() <= {
        (method, path): operation["operationId"] for method, path, operation in OPERATIONS}.items()


def _resolved(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = DOCUMENT["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _shapes(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema's alternatives (through $ref, oneOf, anyOf), each resolved."""
    schema = _resolved(schema)
    branches = schema.get("oneOf") or schema.get("anyOf")
    return [shape for branch in branches for shape in _shapes(branch)] if branches else [schema]


def test_every_answer_has_a_described_body() -> None:
    """No success answer is a bare ``{"type": "object"}`` (a client could only hand out a
    dict), and every error answer is the contract's Error."""
    for method, path, operation in OPERATIONS:
        for status, answer in operation["responses"].items():
            if status == "204":
                assert "content" not in answer, (method, path)
                continue
            schema = answer["content"]["application/json"]["schema"]
            if status.startswith("2"):
                for shape in _shapes(schema):
                    assert shape.get("properties"), (method, path, status, shape)
            elif not (path == "/v1/readyz" and status == "503"):  # readyz's 503 also says why it is not ready
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(
        {"components": DOCUMENT["components"], "$ref": f"#/components/schemas/{name}"}, validate_formats=True
    )


def assert_valid(name: str, body: Any) -> None:
    errors = [str(e) for e in validator(name).iter_errors(body)]
    assert not errors, errors


async def test_stats_and_readiness_answers_are_what_the_document_says(target: str) -> None:
    server = await start_server(store_factory(target))
    try:
        for namespace in ("n1", "n2", "n2"):
            assert (await server.call("POST", "/v1/memories", json={"text": "a", "namespace": namespace}))[0] == 201
        status, stats = await server.call("GET", "/v1/stats")
        assert status == 200
        assert_valid("Stats", stats)
        assert stats["namespaces"] == {"n1": 1, "n2": 2} and stats["model_loaded"] is True
        assert isinstance(stats["process_resident_bytes"], int) and stats["writes"]["status"] == "ok"
        status, ready = await server.call("GET", "/v1/readyz")
        assert status == 200
        assert_valid("Ready", ready)
        assert_valid("Health", (await server.call("GET", "/v1/healthz"))[1])
        # The schemas are closed: a field the document does not name (a new one in Store.stats,
        # say) fails here, so the document cannot fall behind the answer.
        assert not validator("Stats").is_valid({**stats, "new_field": 1})
        assert not validator("Stats").is_valid({**stats, "writes": {**stats["writes"], "status": "fine"}})
        server.state.draining = True
        status, draining = await server.call("GET", "/v1/readyz")
        assert status == 503
        assert_valid("NotReady", draining)
    finally:
        server.state.draining = False
        await server.stop()
