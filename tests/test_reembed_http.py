"""The admin routes of re-embedding (gm.http.admin) on a real server: starting one (202, 409
while it runs, 422 for bad input, 403 for a key bound to a namespace), its status from start to
switch while searches keep answering, cancel and drop-old, a shutdown that stops it and a
restart that resumes it; and the same through gm.connect's reembed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

import gm
from gm.config import parse_api_keys
from gm.embedding import ModelSpec
from gm.errors import Forbidden, InvalidInput, ModelNotFound, ReembedInProgress
from gm.http.openapi import openapi_document
from gm.storage.base import StoreNextVectors
from tests.conftest import WriteGate
from tests.http_server import RunningServer, start_server, store_factory

pytestmark = pytest.mark.timeout(120)

ADMIN = "admin-key-0123456789abcdef"
TEAM = "team-key-0123456789abcdef"
KEYS = parse_api_keys(f"{ADMIN}, {TEAM}@team")
DOCUMENT = openapi_document()


def assert_valid(name: str, body: Any) -> None:
    validator = jsonschema_rs.Draft202012Validator(
        {"components": DOCUMENT["components"], "$ref": f"#/components/schemas/{name}"}, validate_formats=True
    )
    errors = [str(e) for e in validator.iter_errors(body)]
    assert not errors, (errors, body)


async def fill(server: RunningServer, count: int) -> None:
    animals = ["cat", "dog", "bird", "fish"]
    batch = [{"text": f"m {i}: the {animals[i % 4]} likes topic {i % 9}", "user_id": f"u{i % 3}",
              "session_id": f"s{i % 5}"} for i in range(count)]
    await server.state.store.add_many(batch)


async def call(server: RunningServer, method: str, path: str, key: str | None = ADMIN, **kwargs: Any
               ) -> tuple[int, Any]:
    return await asyncio.wait_for(server.call(method, path, key=key, **kwargs), 60)


async def wait_for_state(server: RunningServer, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status, body = await call(server, "GET", "/v1/admin/reembed")
        assert status == 200, body
        assert_valid("ReembedStatus", body)
        if body["state"] in states:
            return dict(body)
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


@pytest.fixture
async def server(target: str) -> Any:
    running = await start_server(store_factory(target), api_keys=KEYS)
    yield running
    await running.stop()


async def test_a_reembed_runs_in_the_background_while_searches_answer(
    server: RunningServer, wide_model_dir: Path
) -> None:
    await fill(server, 60)
    old = server.state.store.vectors_model
    status, idle = await call(server, "GET", "/v1/admin/reembed")
    assert status == 200 and idle["state"] == "idle" and idle["database"] == {"reembed": None, "old_vectors": None}
    assert_valid("ReembedStatus", idle)
    gate = WriteGate(server.state.store.backend, StoreNextVectors)  # holds it part-way, for the checks below
    status, started = await call(server, "POST", "/v1/admin/reembed",
                                 json={"model_dir": str(wide_model_dir), "batch": 8})
    assert status == 202, started
    assert_valid("ReembedStatus", started)
    wide = ModelSpec.from_dir(wide_model_dir).identity
    assert started["state"] == "running" and started["model"] == wide and started["total"] == 60
    await asyncio.wait_for(gate.reached.wait(), 60)

    # While it runs: a second one is refused, the status says how far it is, searches answer.
    status, refused = await call(server, "POST", "/v1/admin/reembed", json={"model_dir": str(wide_model_dir)})
    assert status == 409 and refused["error"]["code"] == "reembed_in_progress", refused
    assert "gmem reembed --cancel" in refused["error"]["message"]
    status, running = await call(server, "GET", "/v1/admin/reembed")
    assert running["state"] == "running" and running["phase"] == "embedding" and running["finished_at"] is None
    assert running["database"]["reembed"]["model"].startswith(wide) and running["database"]["old_vectors"] is None
    status, dropped = await call(server, "POST", "/v1/admin/reembed/drop-old", json={})
    assert status == 409 and dropped["error"]["code"] == "reembed_in_progress"  # (it holds the re-embed lock)
    for _ in range(3):
        status, found = await call(server, "POST", "/v1/memories/search",
                                   json={"query": "the cat likes topic 3", "user_id": "u0", "limit": 5})
        assert status == 200 and len(found["hits"]) == 5
    status, stats = await call(server, "GET", "/v1/stats")
    assert stats["model"] != wide  # not switched yet
    gate.released.set()

    searched = 0
    while True:  # to the switch, searching all along
        status, found = await call(server, "POST", "/v1/memories/search", json={"query": "the dog", "limit": 3})
        assert status == 200 and len(found["hits"]) == 3
        searched += 1
        status, now = await call(server, "GET", "/v1/admin/reembed")
        assert_valid("ReembedStatus", now)
        if now["state"] != "running":
            break
        await asyncio.sleep(0.01)
    assert now["state"] == "done", now
    assert now["report"]["embedded"] == 60 and now["report"]["model"].startswith(wide)
    assert (now["done"], now["total"], now["phase"]) == (60, 60, "switched") and now["finished_at"]
    assert now["database"] == {"reembed": None, "old_vectors": old}
    status, stats = await call(server, "GET", "/v1/stats")
    assert stats["model"] == wide
    status, found = await call(server, "POST", "/v1/memories/search",
                               json={"query": "the fish likes topic 7", "limit": 1})
    assert found["hits"][0]["memory"]["text"] == "m 7: the fish likes topic 7"

    # The later step: the old vectors go (once), and there is nothing to cancel.
    for path, done in (("drop-old", True), ("drop-old", False), ("cancel", False)):
        status, body = await call(server, "POST", f"/v1/admin/reembed/{path}", json={})
        assert (status, body) == (200, {"done": done}), path
        assert_valid("Done", body)
    status, after = await call(server, "GET", "/v1/admin/reembed")
    assert after["state"] == "done" and after["database"] == {"reembed": None, "old_vectors": None}


async def test_admin_routes_refuse_bad_input_and_keys_bound_to_a_namespace(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), api_keys=KEYS)
    try:
        await fill(server, 5)
        for method, path, body in (("POST", "/v1/admin/reembed", {"model_dir": None}),
                                   ("GET", "/v1/admin/reembed", None),
                                   ("POST", "/v1/admin/reembed/cancel", {}),
                                   ("POST", "/v1/admin/reembed/drop-old", {})):
            extra = {"json": body} if body is not None else {}
            status, answer = await call(server, method, path, key=TEAM, **extra)
            assert status == 403 and answer["error"]["code"] == "forbidden", (path, answer)
            assert "not bound to one" in answer["error"]["message"]
            status, answer = await call(server, method, path, key=None, **extra)
            assert status == 401, (path, answer)
        for body, where in (({"model_dir": "/no/such/folder"}, None), ({}, "model_dir"),
                            ({"model_dir": None, "colour": 1}, "colour"), ({"model_dir": 3}, "model_dir"),
                            ({"model_dir": None, "batch": 0}, "batch"), ({"model_dir": ""}, "model_dir")):
            status, answer = await call(server, "POST", "/v1/admin/reembed", json=body)
            assert status == 422, (body, answer)
            assert answer["error"]["details"].get("path") == where, (body, answer)
        status, answer = await call(server, "POST", "/v1/admin/reembed", json={"model_dir": "/no/such/folder"})
        assert answer["error"]["code"] == "model_not_found" and "is not a model's folder" in answer["error"]["message"]
        status, answer = await call(server, "POST", "/v1/admin/reembed/cancel", json={"model_dir": None})
        assert status == 422 and answer["error"]["details"] == {"path": "model_dir"}
        status, idle = await call(server, "GET", "/v1/admin/reembed")
        assert idle["state"] == "idle" and idle["error"] is None  # refusals leave no failed run behind
    finally:
        await server.stop()


async def test_a_reindex_through_the_route(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))  # (no keys: no key needed)
    try:
        await fill(server, 20)
        before = server.state.store.vectors_model
        status, started = await call(server, "POST", "/v1/admin/reembed", key=None, json={"model_dir": None})
        assert status == 202 and started["model"] == before
        done = await wait_for_state(server, "done", "failed")
        assert done["state"] == "done" and done["report"]["model"] == before + "~1"
        assert done["database"]["old_vectors"] == before
    finally:
        await server.stop()


async def test_cancel_stops_the_run_and_drops_its_new_vectors(tmp_path: Path, wide_model_dir: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), api_keys=KEYS)
    try:
        await fill(server, 30)
        model = server.state.store.vectors_model
        gate = WriteGate(server.state.store.backend, StoreNextVectors)
        status, _ = await call(server, "POST", "/v1/admin/reembed", json={"model_dir": str(wide_model_dir)})
        assert status == 202
        await asyncio.wait_for(gate.reached.wait(), 60)
        status, body = await call(server, "POST", "/v1/admin/reembed/cancel", json={})
        assert (status, body) == (200, {"done": True})
        status, after = await call(server, "GET", "/v1/admin/reembed")
        assert after["state"] == "idle" and after["error"] is None
        assert after["database"] == {"reembed": None, "old_vectors": None}
        assert server.state.store.vectors_model == model
        status, found = await call(server, "POST", "/v1/memories/search", json={"query": "the bird", "limit": 2})
        assert status == 200 and len(found["hits"]) == 2
        columns = await server.state.store.backend.fetch("PRAGMA table_info(memories)", [])
        assert not [c for c in columns if str(c[1]).endswith("_next")]
    finally:
        await server.stop()


async def test_a_shutdown_stops_the_run_and_asking_again_resumes_it(tmp_path: Path, wide_model_dir: Path) -> None:
    db = tmp_path / "mem.db"
    server = await start_server(store_factory(db))
    await fill(server, 40)
    gate = WriteGate(server.state.store.backend, StoreNextVectors)
    status, _ = await call(server, "POST", "/v1/admin/reembed", key=None,
                           json={"model_dir": str(wide_model_dir), "batch": 8})
    assert status == 202
    await asyncio.wait_for(gate.reached.wait(), 60)
    stopping = time.monotonic()
    await server.stop()  # (the gated write is cancelled with the run)
    assert time.monotonic() - stopping < 10

    server = await start_server(store_factory(db))  # the old model still: the switch never came
    try:
        status, idle = await call(server, "GET", "/v1/admin/reembed", key=None)
        assert idle["state"] == "idle"
        recorded = idle["database"]["reembed"]
        assert recorded["model"].startswith(ModelSpec.from_dir(wide_model_dir).identity) and recorded["total"] == 40
        assert recorded["model_dir"] == str(wide_model_dir)
        status, _ = await call(server, "POST", "/v1/admin/reembed", key=None,
                               json={"model_dir": str(wide_model_dir), "batch": 8})
        assert status == 202
        done = await wait_for_state(server, "done", "failed")
        assert done["state"] == "done" and done["report"]["resumed"] is True, done
        assert (await call(server, "GET", "/v1/stats", key=None))[1]["memories"] == 40
    finally:
        await server.stop()


async def test_gm_connect_reembed_follows_the_servers_run(tmp_path: Path, wide_model_dir: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), api_keys=KEYS)
    try:
        await fill(server, 30)
        seen: list[gm.Progress] = []
        async with gm.connect(server.url, api_key=ADMIN) as mem:
            report = await mem.reembed(wide_model_dir, progress=seen.append, batch=4, poll_seconds=0.02)
            assert isinstance(report, gm.ReembedReport)
            assert report.model.startswith(ModelSpec.from_dir(wide_model_dir).identity) and report.total == 30
            assert seen and seen[-1].done == 30 and {p.phase for p in seen} <= {"embedding", "switched"}
            assert (await mem.stats()).model == ModelSpec.from_dir(wide_model_dir).identity
            with pytest.raises(InvalidInput, match="gmem reindex") as same:  # the model it has now
                await mem.reembed(wide_model_dir)
            assert same.value.status == 422
            with pytest.raises(ModelNotFound, match="not a model's folder") as refused:
                await mem.reembed(tmp_path / "nothing-here")
            assert refused.value.status == 422
            status = await mem.reembed_status()
            assert status["state"] == "done" and status["database"]["old_vectors"] is not None
            assert await mem.end_reembed(drop_old=True) is True
            assert await mem.end_reembed(drop_old=True) is False
            assert await mem.end_reembed(drop_old=False) is False
            gate = WriteGate(server.state.store.backend, StoreNextVectors)
            following = asyncio.ensure_future(mem.reembed(None, poll_seconds=0.02))
            await asyncio.wait_for(gate.reached.wait(), 60)
            with pytest.raises(ReembedInProgress):
                await mem.reembed(None)
            gate.released.set()
            assert (await following).model == report.model.split("~")[0] + "~2"  # a reindex: the vectors made afresh
        async with gm.connect(server.url, api_key=TEAM) as team:
            with pytest.raises(Forbidden):
                await team.reembed(wide_model_dir)
    finally:
        await server.stop()
