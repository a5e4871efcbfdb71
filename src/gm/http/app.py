"""The v1 routes. Handlers only parse HTTP into store calls and render the results;
readiness, draining and API keys are middlewares in front of them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from aiohttp import web

from gm import loops
from gm.config import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_BODY_BYTES, DEFAULT_METRICS, ApiKey
from gm.errors import Forbidden, GMError, InvalidInput, StorageUnavailable, Unauthorized
from gm.http import admin
from gm.http.connections import body_middleware, close_unfinished, end_connection, expect_continue
from gm.http.cors import CorsPolicy, cors_middleware
from gm.http.errors import MAX_BODY_KEY, Handler, error_middleware, error_response, json_response
from gm.http.guard import HostPolicy, cross_site_middleware
from gm.http.metrics import Metrics
from gm.http.openapi import openapi_document
from gm.http.parsing import json_object, only_fields, query, query_int, query_json
from gm.mcp.bridge import json_rpc_errors as mcp_json_rpc_errors
from gm.mcp.bridge import mount as mount_mcp
from gm.memory import RESERVED_IDS
from gm.readiness import Readiness
from gm.store import Store
from gm.validation import update_changes, within_namespace

log = logging.getLogger("gm.http")

PROBES = frozenset({"/v1/healthz", "/v1/readyz"})
METRICS_PATH = "/metrics"  # like the probes, it answers while starting and draining (GM_METRICS: whether with a key)
NAMESPACE_KEY: web.RequestKey[str | None] = web.RequestKey("gm_key_namespace")


class ServerState:
    """What the middlewares and handlers share: the store, its phase, the keys, in-flight count."""

    def __init__(self, make_store: Callable[[], Store], api_keys: Iterable[ApiKey] = ()) -> None:
        self.make_store = make_store
        self.store = make_store()
        self.api_keys = tuple(api_keys)
        self.draining = False
        self.failure: GMError | None = None
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def readiness(self) -> Readiness:
        """The store's readiness, unless this server is draining or could not open it."""
        readiness = self.store.readiness()
        if self.draining:
            reason = self.failure.message if self.failure is not None else readiness.reason
            return replace(readiness, phase="draining", reason=reason)
        if self.failure is not None:
            return replace(readiness, phase="unavailable", reason=self.failure.message)
        return readiness

    @property
    def phase(self) -> str:
        return self.readiness().phase

    async def open_store(self, retry_seconds: float = 0.5, max_retry_seconds: float = 10.0) -> None:
        """Open the store; transient storage faults (``StorageUnavailable.transient``: a
        database another server holds, Postgres not answering) are retried with backoff
        (readyz says ``unavailable`` meanwhile); any other failure, such as a file that is
        not a database, is kept and re-raised."""
        delay = retry_seconds
        while True:
            try:
                await self.store.open()
                self.failure = None
                return
            except StorageUnavailable as exc:
                self.failure = exc
                if not exc.transient:
                    raise
                log.warning("storage unavailable, retrying in %.1fs: %s", delay, exc.message)
                await self.store.close()
                await asyncio.sleep(delay)
                self.store = self.make_store()
                delay = min(delay * 2, max_retry_seconds)
            except GMError as exc:
                self.failure = exc
                raise

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for in-flight requests to finish; False if some were still running at ``timeout``."""
        return await loops.pause(timeout, self._idle)


STATE_KEY = web.AppKey("gm_state", ServerState)
METRICS_KEY = web.AppKey("gm_metrics", Metrics)


def _state(request: web.Request) -> ServerState:
    return request.app[STATE_KEY]


@web.middleware
async def lifecycle_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Probes and /metrics always pass; other requests get 503 while starting, migrating or draining."""
    if request.path in PROBES or request.path == METRICS_PATH:
        return await handler(request)
    state = _state(request)
    if state.draining:
        return error_response(503, "draining", "this instance is shutting down; retry on another")
    if not state.store.ready:
        reason = state.failure.message if state.failure else f"the server is {state.phase}; retry shortly"
        response = error_response(503, "not_ready", reason)
        response.headers["Retry-After"] = "1"
        return response
    state.enter()
    try:
        return await handler(request)
    finally:
        state.leave()


async def close_when_draining(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: while draining, every response ends its connection."""
    if _state(request).draining:
        end_connection(response)


def _metrics_open(request: web.Request) -> bool:
    metrics = request.app.get(METRICS_KEY)
    return metrics is not None and metrics.open


def _presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = _state(request)
    if not state.api_keys or request.path in PROBES or (request.path == METRICS_PATH and _metrics_open(request)):
        return await handler(request)
    presented = (_presented_key(request) or "").encode()
    match: ApiKey | None = None
    for key in state.api_keys:  # compare with every key so timing does not tell which matched
        if hmac.compare_digest(presented, key.secret.encode()) and match is None:
            match = key
    if match is None:
        raise Unauthorized(
            "a valid API key is required: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>`"
        )
    request[NAMESPACE_KEY] = match.namespace
    return await handler(request)


# -- request parsing ----------------------------------------------------------------


def _namespace(request: web.Request, given: Any) -> Any:
    """The namespace a request acts on: the key's own when it is bound and none is given;
    a different one than the key's is refused."""
    return within_namespace(request.get(NAMESPACE_KEY), given)


# -- handlers ---------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    query(request)
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    query(request)
    state = _state(request)
    readiness = state.readiness()
    if readiness.phase == "ready":
        # The database answers and writes commit: else out of the load balancer's rotation,
        # and the probe write brings the instance back once one commits.
        readiness = await state.store.probe()
    body: dict[str, Any] = {"status": readiness.phase, "schema_version": readiness.schema_version,
                            "backend": readiness.backend, "index": readiness.index}
    if readiness.writes is not None:
        body["writes"] = readiness.writes
    if readiness.reason is not None:
        body["reason"] = readiness.reason
    return json_response(body, 200 if readiness.phase == "ready" else 503)


def _resident_bytes() -> int | None:
    """This process's resident memory (Linux /proc), for operators watching it stay flat."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


async def stats(request: web.Request) -> web.Response:
    query(request)
    result = (await _state(request).store.stats()).to_dict()
    result["process_resident_bytes"] = _resident_bytes()
    bound = request.get(NAMESPACE_KEY)
    if bound is not None:
        result["namespaces"] = {bound: result["namespaces"].get(bound, 0)}
        result["memories"] = result["namespaces"][bound]
    return json_response(result)


async def add_memories(request: web.Request) -> web.Response:
    query(request)
    store = _state(request).store
    body = await json_object(request)
    if "memories" in body:
        only_fields(body, ["memories"])
        inputs = body["memories"]
        if isinstance(inputs, list):
            for item in inputs:
                if isinstance(item, dict):
                    item["namespace"] = _namespace(request, item.get("namespace"))
        added = await store.add_inputs(inputs)
        return json_response({"memories": [m.to_dict() for m, _ in added]}, 201)
    body["namespace"] = _namespace(request, body.get("namespace"))
    [(memory, created)] = await store.add_inputs([body], batch=False)
    return json_response(memory.to_dict(), 201 if created else 200)


def _constraint(request: web.Request) -> Any:
    """A by-id route's namespace: ``?namespace=`` (only a memory there; another key's is a
    403), else a bound key's own, else None: wherever the memory is."""
    return _namespace(request, query(request, ("namespace",)).get("namespace"))


async def get_memory(request: web.Request) -> web.Response:
    memory = await _state(request).store.get(request.match_info["id"], namespace=_constraint(request))
    return json_response(memory.to_dict())


LIST_PARAMETERS = ("namespace", "user_id", "agent_id", "session_id", "filter", "limit", "cursor",
                   "occurred_after", "occurred_before", "order_by")


async def list_memories(request: web.Request) -> web.Response:
    q = query(request, LIST_PARAMETERS)
    page = await _state(request).store.list(
        namespace=_namespace(request, q.get("namespace")),
        user_id=q.get("user_id"),
        agent_id=q.get("agent_id"),
        session_id=q.get("session_id"),
        filter=query_json(q, "filter"),
        limit=query_int(q, "limit"),
        cursor=q.get("cursor"),
        occurred_after=q.get("occurred_after"),
        occurred_before=q.get("occurred_before"),
        order_by=q.get("order_by"),
    )
    return json_response(page.to_dict())


async def update_memory(request: web.Request) -> web.Response:
    namespace = _constraint(request)
    store = _state(request).store
    body = await json_object(request)
    # PATCH {}: Store.update refuses it before any lookup
    changes = update_changes(body)
    # A bound key's namespace goes with the write: an id in another namespace is a 404, as an
    # unknown one is, decided in the transaction that writes (never by a read before it).
    memory = await store.update(request.match_info["id"], namespace=namespace, **changes)
    return json_response(memory.to_dict())


async def delete_memory(request: web.Request) -> web.Response:
    await _state(request).store.delete(request.match_info["id"], namespace=_constraint(request))
    return web.Response(status=204)


async def memory_history(request: web.Request) -> web.Response:
    # A bound key sees only its namespace's changes: an id freed by a delete may be taken elsewhere since.
    entries = await _state(request).store.history(request.match_info["id"], namespace=_constraint(request))
    return json_response({"history": [e.to_dict() for e in entries]})


async def search_memories(request: web.Request) -> web.Response:
    started = time.perf_counter()
    query(request)
    body = await json_object(request)
    only_fields(body, ["query", "namespace", "user_id", "agent_id", "session_id", "filter", "limit", "mode",
                       "min_score", "recency", "occurred_after", "occurred_before"])
    if "query" not in body:
        raise InvalidInput("query is required", path="query")
    hits = await _state(request).store.search(
        body["query"],
        namespace=_namespace(request, body.get("namespace")),
        user_id=body.get("user_id"),
        agent_id=body.get("agent_id"),
        session_id=body.get("session_id"),
        filter=body.get("filter"),
        limit=body.get("limit"),
        mode=body.get("mode"),
        min_score=body.get("min_score"),
        recency=body.get("recency"),
        occurred_after=body.get("occurred_after"),
        occurred_before=body.get("occurred_before"),
    )
    took = (time.perf_counter() - started) * 1000
    return json_response({"hits": [h.to_dict() for h in hits], "took_ms": round(took, 3)})


async def delete_many(request: web.Request) -> web.Response:
    query(request)
    body = await json_object(request)
    only_fields(body, ["namespace", "user_id", "agent_id", "session_id", "filter"])
    namespace = _namespace(request, body.get("namespace"))
    if namespace is None:
        raise InvalidInput("namespace is required for a bulk delete", path="namespace")
    deleted = await _state(request).store.delete_many(
        namespace=namespace,
        user_id=body.get("user_id"),
        agent_id=body.get("agent_id"),
        session_id=body.get("session_id"),
        filter=body.get("filter"),
    )
    return json_response({"deleted": deleted})


async def scrape_metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` (not a /v1 route: Prometheus's format, not in the OpenAPI document)."""
    query(request)
    if request.get(NAMESPACE_KEY) is not None:
        raise Forbidden("the metrics cover every namespace: scrape them with a key not bound to one")
    return await request.app[METRICS_KEY].scrape(request)


async def openapi(request: web.Request) -> web.Response:
    query(request)
    return json_response(openapi_document(keys=bool(_state(request).api_keys)))


# `{id}` is registered as a pattern that never matches a reserved id, the name of a sibling
# route: `GET /v1/memories/search` is a 405 naming POST, not a lookup of a memory called "search".
_ID_PATTERN = "{id:(?!(?:" + "|".join(sorted(RESERVED_IDS)) + ")(?:/|$))[^/]+}"

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/v1/healthz", healthz),
    ("GET", "/v1/readyz", readyz),
    ("GET", "/v1/stats", stats),
    ("POST", "/v1/memories", add_memories),
    ("GET", "/v1/memories", list_memories),
    ("POST", "/v1/memories/search", search_memories),
    ("POST", "/v1/memories/delete", delete_many),
    ("GET", "/v1/memories/{id}", get_memory),
    ("PATCH", "/v1/memories/{id}", update_memory),
    ("DELETE", "/v1/memories/{id}", delete_memory),
    ("GET", "/v1/memories/{id}/history", memory_history),
    ("GET", "/v1/openapi.json", openapi),
    *admin.ROUTES,  # /v1/admin/...: re-embedding (gm.http.admin)
)


def make_app(
    state: ServerState,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    hosts: HostPolicy | None = None,
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS,
    cors: CorsPolicy | None = None,
    metrics: str = DEFAULT_METRICS,
) -> web.Application:
    """The aiohttp application for ``state``; the caller opens the store (``state.open_store``).
    ``hosts``: the Host headers it answers to (default: IP literals and localhost); ``cors``:
    the origins whose pages may call it (default: none); ``metrics``: GM_METRICS, ``/metrics``
    open, behind a key, or ``off`` (not served, nothing counted)."""
    cors = cors if cors is not None else CorsPolicy()
    figures = Metrics(state, metrics) if metrics != "off" else None
    counting = [figures.middleware()] if figures is not None else []  # outermost: it sees the status sent
    middlewares = [
        *counting,
        mcp_json_rpc_errors,
        error_middleware,
        cross_site_middleware(hosts or HostPolicy()),
        cors_middleware(cors),
        auth_middleware,
        lifecycle_middleware,
        body_middleware(body_timeout),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[STATE_KEY] = state
    app[MAX_BODY_KEY] = max_body_bytes
    app[admin.ADMIN_KEY] = admin.Admin(lambda: state.store, lambda request: request.get(NAMESPACE_KEY))
    app.on_shutdown.append(app[admin.ADMIN_KEY].stop)  # a re-embed under way stops before the store closes
    app.on_response_prepare.append(close_unfinished)
    app.on_response_prepare.append(close_when_draining)
    app.on_response_prepare.append(cors.allow_origin)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path.replace("{id}", _ID_PATTERN), handler, expect_handler=expect_continue)
    if figures is not None:
        app[METRICS_KEY] = figures
        app.router.add_route("GET", METRICS_PATH, scrape_metrics)
        app.on_cleanup.append(figures.stop)
    mount_mcp(app, lambda: state.store, lambda request: request.get(NAMESPACE_KEY))  # /mcp: the MCP tools
    return app
