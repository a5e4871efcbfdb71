"""``GET /metrics`` on a real server, scraped and parsed with prometheus-client's own parsers:
requests counted by route template and status, the store's figures, no label a client chose,
the GM_METRICS access setting, and answers while the store is not ready or a part fails.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gm.config import parse_api_keys
from gm.embedding import ModelSpec
from gm.http import metrics
from gm.index import VectorIndex
from gm.storage import sqlite_migrations
from tests.http_server import RunningServer, launch_server, start_server, store_factory

ADMIN = "metrics-admin-key-0123456789"
TEAM = "metrics-team-key-0123456789"
KEYS = parse_api_keys(f"{ADMIN},{TEAM}@team")
# What the client sends that must never become a label value.
DOCS = Path(__file__).resolve().parent.parent / "docs"
NAMESPACE, MEMORY_ID, PATH = "tenant-namespace-7f3a", "client-id-9c2e", "/no/such/path-4b1d"


async def scrape(server: RunningServer, key: str | None = None) -> dict[str, list[Sample]]:
    """Every sample of a scrape (parsed as Prometheus parses it) by its name: a histogram's
    ``_bucket``, ``_count`` and ``_sum``, a counter's ``_total``, an info's ``_info``."""
    status, body = await server.call("GET", "/metrics", key=key)
    assert status == 200, body
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample ``name`` with these ``labels`` among its own (0 if there is none)."""
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def every_label_value(samples: dict[str, list[Sample]]) -> set[str]:
    return {v for named in samples.values() for s in named for v in s.labels.values()}


@pytest.fixture
async def server(target: str) -> AsyncIterator[RunningServer]:
    running = await start_server(store_factory(target))
    yield running
    await running.stop()


async def test_requests_are_counted_by_route_template_and_status(server: RunningServer, target: str) -> None:
    before = await scrape(server)
    status, memory = await server.call("POST", "/v1/memories", json={"text": "Prefers window seats.",
                                                                   "namespace": NAMESPACE, "id": MEMORY_ID})
    assert status == 201
    assert (await server.call("GET", f"/v1/memories/{MEMORY_ID}"))[0] == 200
    assert (await server.call("GET", "/v1/memories/unknown-id"))[0] == 404
    status, found = await server.call("POST", "/v1/memories/search", json={"query": "seats", "namespace": NAMESPACE})
    assert status == 200 and found["hits"][0]["memory"]["id"] == MEMORY_ID
    for path in (PATH, PATH + "-2"):
        assert (await server.call("GET", path))[0] == 404
    after = await scrape(server)

    def moved(route: str, method: str, code: str) -> float:
        labels = {"route": route, "method": method, "status": code}
        return value(after, "greatmemory_http_requests_total", **labels) - value(
            before, "greatmemory_http_requests_total", **labels)

    assert moved("/v1/memories", "POST", "201") == 1
    assert moved("/v1/memories/{id}", "GET", "200") == 1 and moved("/v1/memories/{id}", "GET", "404") == 1
    assert moved("/v1/memories/search", "POST", "200") == 1
    assert moved("unmatched", "GET", "404") == 2  # two unknown paths, one fixed label value
    assert moved("/metrics", "GET", "200") == 1  # the scrape before this one
    latency = "greatmemory_http_request_duration_seconds"
    assert value(after, latency + "_count", route="/v1/memories/search", method="POST") == 1
    assert value(after, latency + "_bucket", route="/v1/memories/search", method="POST", le="+Inf") == 1
    assert 0 < value(after, latency + "_sum", route="/v1/memories/search", method="POST") < 30
    assert value(after, "greatmemory_http_requests_in_flight") == 1  # the scrape itself

    sent = {NAMESPACE, MEMORY_ID, PATH, PATH + "-2", "unknown-id", memory["id"]}
    assert not {v for v in every_label_value(after) if any(s in v for s in sent)}

    assert value(after, "greatmemory_embedder_batch_texts_count") >= 2  # the memory, then the query
    assert value(after, "greatmemory_embedder_batch_duration_seconds_count") >= 2
    writes = "greatmemory_writer_batch_writes_count"
    assert value(after, writes) > value(before, writes)
    assert value(after, "greatmemory_writer_commit_duration_seconds_count") >= 1
    assert value(after, "greatmemory_writer_failed_batches_total") == 0
    assert value(after, "greatmemory_readiness_phase", phase="ready") == 1
    assert value(after, "greatmemory_readiness_phase", phase="starting") == 0
    assert value(after, "greatmemory_migration_phase", phase="ready") == 1
    [info] = after["greatmemory_build_info"]
    assert info.labels["backend"] == ("postgres" if target.startswith("postgresql:") else "sqlite")
    assert info.labels["schema_version"] == str(sqlite_migrations.LATEST)
    assert info.labels["model"] == ModelSpec.default().identity and info.labels["version"]
    assert info.labels["model_label"] == "all-MiniLM-L6-v2-int8"
    if target.startswith("postgresql:") and server.state.store.backend.native_vectors:
        assert "greatmemory_index_vectors" not in after  # pgvector searches: no in-process index
    else:
        assert value(after, "greatmemory_index_vectors") == 1 and value(after, "greatmemory_index_bytes") > 0
        assert value(after, "greatmemory_index_graph_rows") == 0  # (no graph below 20,000 rows)
        assert value(after, "greatmemory_index_state", state="ready") == 1
    assert value(before, "greatmemory_memories") == 0  # counted by the first scrape; paced after it
    assert value(after, "greatmemory_memories") == 0
    assert after["process_resident_memory_bytes"][0].value > 0


async def test_docs_list_every_metric_served(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        assert (await server.call("POST", "/v1/memories", json={"text": "Prefers window seats."}))[0] == 201
        assert (await server.call("POST", "/v1/memories/search", json={"query": "seats"}))[0] == 200
        await scrape(server)  # (the first scrape counts the memories)
        status, body = await server.call("GET", "/metrics")
        served = {f.name + ("_total" if f.type == "counter" else "")
                  for f in text_string_to_metric_families(body.decode()) if f.name.startswith("greatmemory_")}
    finally:
        await server.stop()
    documented = set(re.findall(r"^\| `(greatmemory_[a-z_]+)` \|", (DOCS / "metrics.md").read_text(), re.M))
    assert served == documented


async def test_the_memory_count_leaves_out_expired_memories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Unpaced here: a count is due as soon as the last one's length has passed (by default 15 s
    # apart at least, as the test above shows).
    monkeypatch.setattr(metrics, "COUNT_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(metrics, "COUNT_SHARE", 1.0)
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        assert value(await scrape(server), "greatmemory_memories") == 0
        batch = [{"text": f"memory {i}", "ttl_seconds": 0.5 if i < 2 else 3600} for i in range(5)]
        assert (await server.call("POST", "/v1/memories", json={"memories": batch}))[0] == 201
        await asyncio.sleep(0.6)  # two have expired; the purge (every 60 s) has not deleted them yet
        deadline = time.monotonic() + 10
        while (counted := value(await scrape(server), "greatmemory_memories")) != 3:
            assert time.monotonic() < deadline, counted
            await asyncio.sleep(0.05)
        assert (await server.call("GET", "/v1/stats"))[1]["memories"] == 3
    finally:
        await server.stop()


async def test_unusual_methods_and_unknown_routes_get_fixed_labels(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        # (a method HTTP does not know, BREW, is a 400 from the parser, before the application)
        assert (await server.call("PROPFIND", "/coffee-pot-3e1f"))[0] == 404
        assert (await server.call("PROPFIND", "/v1/memories"))[0] == 405
        assert (await server.call("GET", "/v1/memories/search"))[0] == 405
        samples = await scrape(server)
        count = "greatmemory_http_requests_total"
        assert value(samples, count, route="unmatched", method="other", status="404") == 1
        assert value(samples, count, route="unmatched", method="other", status="405") == 1
        assert value(samples, count, route="unmatched", method="GET", status="405") == 1
        assert not {v for v in every_label_value(samples) if "coffee" in v or "PROPFIND" in v}
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("access", "keys", "key", "expected"),
    [
        ("open", KEYS, None, (200, None)),
        ("key", KEYS, None, (401, "unauthorized")),
        ("key", KEYS, ADMIN, (200, None)),
        ("key", KEYS, TEAM, (403, "forbidden")),  # a namespace's key: the figures span every namespace
        ("key", (), None, (200, None)),  # no GM_API_KEYS: every route is open, this one too
        ("off", (), None, (404, "not_found")),
        ("off", KEYS, ADMIN, (404, "not_found")),
    ],
)
async def test_the_access_setting(access: str, keys: tuple, key: str | None, expected: tuple, tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), api_keys=keys, metrics=access)
    try:
        status, body = await server.call("GET", "/metrics", key=key)
        code = body["error"]["code"] if isinstance(body, dict) else None
        assert (status, code) == expected, body
        if status == 200:
            assert "greatmemory_build_info" in {f.name for f in text_string_to_metric_families(body.decode())}
            status, body = await server.call("GET", "/metrics", key=key, params={"name[]": "x"})
            assert status == 422 and body["error"]["details"] == {"path": "name[]"}
    finally:
        await server.stop()


async def test_prometheus_gets_openmetrics_when_it_asks(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        accept = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")  # what Prometheus 2.x/3.x sends
        async with server.session.get(server.url + "/metrics", headers={"Accept": accept}) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            families = {f.name: f for f in openmetrics_families(await response.text())}
        assert families["greatmemory_http_requests"].type == "counter"
        assert families["greatmemory_build"].type == "info"
        assert families["greatmemory_writer_commit_duration_seconds"].type == "histogram"
    finally:
        await server.stop()


async def test_metrics_answer_while_the_store_is_not_ready(tmp_path: Path) -> None:
    """A second `gmem serve` on a database another server holds waits, unavailable: its
    /metrics (GM_METRICS=open, with keys) answers all the same, and says so."""
    db = tmp_path / "mem.db"
    holder = await start_server(store_factory(db))
    process, url = await launch_server(tmp_path / "serve.log", "--db", str(db),
                                       env={"GM_METRICS": "open", "GM_API_KEYS": ADMIN})
    try:
        waiting = RunningServer(url, holder.state, holder.runner, holder.session)  # (its url, the holder's session)
        assert (await waiting.call("GET", "/v1/stats", key=ADMIN))[0] == 503
        deadline = time.monotonic() + 10
        while value(samples := await scrape(waiting), "greatmemory_readiness_phase", phase="unavailable") != 1:
            assert time.monotonic() < deadline, samples.get("greatmemory_readiness_phase")
            await asyncio.sleep(0.1)
        assert value(samples, "greatmemory_readiness_phase", phase="ready") == 0
        assert "greatmemory_memories" not in samples and "greatmemory_writer_queue_depth" not in samples
        assert samples["greatmemory_build_info"][0].labels["schema_version"] == ""
        assert value(samples, "greatmemory_http_requests_total", route="/v1/stats", method="GET", status="503") == 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        await holder.stop()


async def test_metrics_answer_while_starting_and_draining(tmp_path: Path) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"), open_store=False)
    try:
        assert (await server.call("GET", "/v1/stats"))[0] == 503
        samples = await scrape(server)
        assert value(samples, "greatmemory_readiness_phase", phase="starting") == 1
        assert value(samples, "greatmemory_migration_phase", phase="starting") == 1
        await server.state.open_store()
        server.state.draining = True
        samples = await scrape(server)
        assert value(samples, "greatmemory_readiness_phase", phase="draining") == 1
        assert value(samples, "greatmemory_http_requests_total", route="/v1/stats", method="GET", status="503") == 1
    finally:
        await server.stop()


async def test_a_failing_part_is_logged_and_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_server(store_factory(tmp_path / "mem.db"))
    try:
        def broken(index: VectorIndex) -> int:  # a fault we cannot cause for real: a bug in a collector
            raise RuntimeError("index figures broke")

        monkeypatch.setattr(VectorIndex, "nbytes", property(broken))
        await server.state.store.backend.close()  # a real one: the database is gone, the count fails
        samples = await scrape(server)
        assert "greatmemory_index_bytes" not in samples and "greatmemory_memories" not in samples
        assert value(samples, "greatmemory_metrics_collector_failures_total", collector="index") == 1
        assert value(samples, "greatmemory_metrics_collector_failures_total", collector="memories") == 1
        assert value(samples, "greatmemory_readiness_phase", phase="ready") == 1  # the rest answers
        assert "index figures broke" in caplog.text and "counting the memories failed" in caplog.text
    finally:
        await server.stop()


async def test_two_servers_in_one_process_keep_their_own_figures(tmp_path: Path) -> None:
    one = await start_server(store_factory(tmp_path / "one.db"))
    other = await start_server(store_factory(tmp_path / "other.db"))
    try:
        for _ in range(3):
            assert (await one.call("GET", "/v1/healthz"))[0] == 200
        labels = {"route": "/v1/healthz", "method": "GET", "status": "200"}
        assert value(await scrape(one), "greatmemory_http_requests_total", **labels) == 3
        assert value(await scrape(other), "greatmemory_http_requests_total", **labels) == 0
    finally:
        await one.stop()
        await other.stop()
