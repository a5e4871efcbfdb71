"""``GET /metrics``: the server's figures in the Prometheus text format, from a registry of its
own: the requests this layer counts, and the store's actors, index and counts read at scrape time.

The core keeps plain counters and :class:`gm.tally.Tally` observations and knows nothing of
Prometheus; this module turns them into metric families when scraped. No label takes a value
a client chose: routes are aiohttp's templates (``/v1/memories/{id}``), a path that matches
none is ``unmatched``, an unusual method ``other``, and phases and states are fixed lists.
Each part is collected on its own: one that fails is logged and left out, the rest answer.
docs/metrics.md lists every metric.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

import gm
from gm import loops
from gm.http.errors import Handler
from gm.memory import now_ms
from gm.tally import SECONDS, Tally

if TYPE_CHECKING:
    from gm.http.app import ServerState
    from gm.store import Store

log = logging.getLogger("gm.http")

ACCESS = ("open", "key", "off")  # GM_METRICS
UNMATCHED = "unmatched"  # the route of a request no route matched (404, 405)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other is "other"
READINESS_PHASES = ("starting", "migrating", "ready", "unavailable", "draining")
MIGRATION_PHASES = ("starting", "migrating", "ready", "failed")
INDEX_STATES = ("loading", "ready", "failed")
PARTS = ("http", "embedder", "writer", "index", "store", "memories", "process", "platform")

# greatmemory_memories: counts at least this far apart, and apart by 50 times the last count's
# length, so counting costs at most 2% of one core however big the database or many the scrapers.
COUNT_EVERY_SECONDS = 15.0
COUNT_SHARE = 0.02
COUNT_WAIT_SECONDS = 1.0  # a scrape waits this long for a count that is due, else shows the last one


# -- the requests this layer counts ---------------------------------------------------------------


class Requests:
    """Requests by (route, method, status), their seconds by (route, method), and those in
    flight; touched only on the event loop."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str], int] = {}
        self.seconds: dict[tuple[str, str], Tally] = {}
        self.in_flight = 0

    def record(self, request: web.Request, status: int, seconds: float) -> None:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else UNMATCHED
        method = request.method if request.method in METHODS else "other"
        key = (route, method, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1
        tally = self.seconds.get(key[:2])
        if tally is None:
            tally = self.seconds[key[:2]] = Tally(SECONDS)
        tally.observe(seconds)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("greatmemory_http_requests", "HTTP requests answered, by route template, "
                                       "method and status.", labels=["route", "method", "status"])
        for labels, n in sorted(self.counts.items()):
            requests.add_metric(labels, n)
        yield requests
        yield histogram("greatmemory_http_request_duration_seconds", "Seconds from routing a request to its "
                        "response being ready, by route template and method.", ["route", "method"],
                        sorted(self.seconds.items()))
        yield gauge("greatmemory_http_requests_in_flight", "Requests being handled now (a scrape counts itself).",
                    self.in_flight)


def request_middleware(requests: Requests) -> Middleware:
    """Counts every request that reaches the application, errors included (it runs outside the
    error middleware, so it sees the status sent). One the client abandoned is not counted."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        requests.in_flight += 1
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # (a redirect: the error middleware turns the others into bodies)
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 0
            raise
        finally:
            requests.in_flight -= 1
            if status:
                requests.record(request, status, time.perf_counter() - started)

    return middleware


# -- what the store's parts show ------------------------------------------------------------------


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def one_of(name: str, documentation: str, label: str, values: Sequence[str], current: str) -> GaugeMetricFamily:
    """A 0/1 gauge per value of a fixed list: 1 for ``current`` (all 0 if it is not listed)."""
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value in values:
        family.add_metric([value], 1.0 if value == current else 0.0)
    return family


def histogram(name: str, documentation: str, labels: list[str],
              tallies: Iterable[tuple[Sequence[str], Tally]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, tally in tallies:
        bounds = [str(float(b)) for b in tally.bounds] + ["+Inf"]
        family.add_metric(list(values), list(zip(bounds, tally.cumulative(), strict=True)), tally.sum)
    return family


def embedder_part(store: Store) -> Iterator[Metric]:
    embedder = store.embedder
    yield gauge("greatmemory_embedder_queue_depth", "Texts waiting for the embedding model.", embedder.queued)
    yield histogram("greatmemory_embedder_batch_texts", "Texts per call of the embedding model.", [],
                    [((), embedder.batch_texts)])
    yield histogram("greatmemory_embedder_batch_duration_seconds", "Seconds per call of the embedding model "
                    "(loading the model aside).", [], [((), embedder.batch_seconds)])


def writer_part(store: Store) -> Iterator[Metric]:
    writer = store.backend.writer
    if writer is None:  # not open yet
        return
    health = writer.health
    yield gauge("greatmemory_writer_queue_depth", "Writes waiting for the Writer's next transaction.", writer.queued)
    yield gauge("greatmemory_writer_oldest_pending_seconds", "Seconds the oldest unanswered write has waited "
                "(readyz turns unavailable past GM_WRITE_TIMEOUT_SECONDS).", writer.oldest_wait())
    yield histogram("greatmemory_writer_batch_writes", "Writes per committed transaction.", [],
                    [((), health.batch_writes)])
    yield histogram("greatmemory_writer_commit_duration_seconds", "Seconds per committed transaction, from BEGIN "
                    "to COMMIT.", [], [((), health.commit_seconds)])
    yield CounterMetricFamily("greatmemory_writer_failed_batches", "Transactions the database refused as a whole "
                              "(disk full, read-only, I/O error, lock timeout).", value=health.failures)


def index_part(store: Store) -> Iterator[Metric]:
    if not store.ready or store.backend.native_vectors:  # (pgvector searches vectors itself: no index here)
        return
    indexer = store.indexer
    yield one_of("greatmemory_index_state", "The in-process vector index: 1 for its state.", "state",
                 INDEX_STATES, indexer.state)
    yield gauge("greatmemory_index_vectors", "Vectors in the in-process index.", len(indexer.index))
    yield gauge("greatmemory_index_bytes", "Bytes the in-process index's arrays and graph hold.", indexer.index.nbytes)
    yield gauge("greatmemory_index_graph_rows", "Rows the index's HNSW graph covers (the rest are scored exactly).",
                indexer.index.graphed)
    if indexer.load_seconds is not None:
        yield gauge("greatmemory_index_load_duration_seconds", "Seconds the last load of the index (from the "
                    "database, or the file saved beside it) took.", indexer.load_seconds)


def store_part(state: ServerState) -> Iterator[Metric]:
    store = state.store
    backend = store.backend
    yield one_of("greatmemory_readiness_phase", "What /v1/readyz says (without its probe write): 1 for the phase.",
                 "phase", READINESS_PHASES, state.phase)
    yield one_of("greatmemory_migration_phase", "The schema migration at start: 1 for its phase.", "phase",
                 MIGRATION_PHASES, backend.phase)
    info = InfoMetricFamily("greatmemory_build", "This server: its version, backend, schema version (empty until "
                            "migrated) and embedding model (its content identity and label).")
    info.add_metric([], {"version": gm.__version__, "backend": backend.name, "model": store.model.identity,
                         "model_label": store.model.label,
                         "schema_version": str(backend.schema_version) if backend.schema_version else ""})
    yield info


class MemoryCount:
    """The live memories behind ``greatmemory_memories``: the database's
    :meth:`~gm.storage.reads.Reads.live_total` (two index scans), paced by COUNT_EVERY_SECONDS
    and COUNT_SHARE. A failed count leaves the gauge out until one succeeds."""

    def __init__(self, on_failure: Callable[[str], None]) -> None:
        self.value: int | None = None
        self._store: Store | None = None
        self._next_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._on_failure = on_failure

    async def refresh(self, store: Store) -> None:
        """Count if a count is due; wait for it at most COUNT_WAIT_SECONDS (it goes on after)."""
        if store is not self._store:  # a store opened afresh (after a transient failure)
            self._store, self.value, self._next_at = store, None, 0.0
        if not store.ready:
            return
        if self._task is None and time.monotonic() >= self._next_at:
            self._task = asyncio.get_running_loop().create_task(self._count(store), name="gm-metrics-count")
        if self._task is not None:
            await asyncio.wait([self._task], timeout=COUNT_WAIT_SECONDS)

    async def _count(self, store: Store) -> None:
        started = time.monotonic()
        value: int | None
        try:
            value = await store.backend.live_total(now_ms())
        except Exception as exc:
            log.warning("metrics: counting the memories failed; greatmemory_memories is left out: %s",
                        getattr(exc, "message", exc))
            self._on_failure("memories")
            value = None
        if store is self._store:
            self.value = value
            self._next_at = time.monotonic() + max(COUNT_EVERY_SECONDS, (time.monotonic() - started) / COUNT_SHARE)
        self._task = None

    def collect(self) -> Iterator[Metric]:
        if self.value is not None:
            yield gauge("greatmemory_memories", "Live memories, every namespace (counted at most every 15 s).",
                        self.value)

    async def stop(self) -> None:
        await loops.stop(self._task)


# -- the registry and the scrape ------------------------------------------------------------------


class Part(Collector):
    """One part of the figures: if it fails, it is logged and left out of that scrape."""

    def __init__(self, name: str, collect: Callable[[], Iterable[Metric]], on_failure: Callable[[str], None]):
        self.name = name
        self._collect = collect
        self._on_failure = on_failure

    def collect(self) -> Iterable[Metric]:
        try:
            return list(self._collect())
        except Exception:
            log.exception("metrics: the %s figures failed and are left out of this scrape", self.name)
            self._on_failure(self.name)
            return []


class Metrics:
    """A server's figures: its own registry (two servers in one process do not share one),
    the requests middleware's counts, and ``scrape``, the body of ``GET /metrics``."""

    def __init__(self, state: ServerState, access: str) -> None:
        if access not in ACCESS:
            raise ValueError(f"metrics access is one of {', '.join(ACCESS)}, not {access!r}")
        self.access = access
        self.state = state
        self.requests = Requests()
        self.failures = dict.fromkeys(PARTS, 0)
        self.count = MemoryCount(self._failed)
        self.registry = CollectorRegistry(auto_describe=False)
        parts: list[tuple[str, Callable[[], Iterable[Metric]]]] = [
            ("http", self.requests.collect),
            ("embedder", lambda: embedder_part(state.store)),
            ("writer", lambda: writer_part(state.store)),
            ("index", lambda: index_part(state.store)),
            ("store", lambda: store_part(state)),
            ("memories", self.count.collect),
            ("process", ProcessCollector(registry=None).collect),
            ("platform", PlatformCollector(registry=None).collect),
            ("failures", self._failures),
        ]
        for name, collect in parts:
            self.registry.register(Part(name, collect, self._failed))

    @property
    def open(self) -> bool:
        """Served without a key, as the probes are."""
        return self.access == "open"

    def middleware(self) -> Middleware:
        return request_middleware(self.requests)

    def _failed(self, part: str) -> None:
        self.failures[part] = self.failures.get(part, 0) + 1

    def _failures(self) -> Iterator[Metric]:
        family = CounterMetricFamily("greatmemory_metrics_collector_failures", "Scrapes that left a part of the "
                                     "figures out because collecting it failed (the server's log says why).",
                                     labels=["collector"])
        for part, n in self.failures.items():
            family.add_metric([part], n)
        yield family

    async def scrape(self, request: web.Request) -> web.Response:
        """The figures, in the format the scraper asks for (Prometheus text, or OpenMetrics)."""
        await self.count.refresh(self.state.store)
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def stop(self, app: web.Application) -> None:
        """``on_cleanup``: a count under way ends before the store closes."""
        await self.count.stop()
