"""The MCP tools over streamable HTTP at ``/mcp`` of ``gmem serve``: the SDK's ASGI transport
run inside aiohttp, behind the server's own middlewares (Host guard, API keys, readiness, drain).

The transport is stateless and answers JSON: each POST carries one message and gets its answer,
so any instance sharing a Postgres database can serve any call, and a namespace-bound key's
namespace is read from that very request. A GET (the optional server-to-client stream) is a 405,
as the transport's specification allows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from gm import loops
from gm.http.connections import Connection, expect_continue
from gm.http.errors import MAX_BODY_KEY, Handler, json_response
from gm.mcp import NAMESPACE_SCOPE_KEY
from gm.mcp.handle import Memories

if TYPE_CHECKING:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

log = logging.getLogger("gm.mcp")

MCP_PATH = "/mcp"
SERVER_ERROR = -32000  # JSON-RPC's first implementation-defined server error
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade"})  # aiohttp's to write


def mount(app: web.Application, memories: Callable[[], Memories],
          namespace_of: Callable[[web.Request], str | None]) -> None:
    """Serve the MCP tools at ``/mcp`` of ``app`` over ``memories()``; ``namespace_of(request)``
    is the namespace the request's API key is bound to (None: any)."""
    endpoint = McpEndpoint(memories, namespace_of)
    app.cleanup_ctx.append(endpoint.running)
    app.router.add_route("POST", MCP_PATH, endpoint.handle, expect_handler=expect_continue)


@web.middleware
async def json_rpc_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """On ``/mcp``, an error the server answers before the MCP transport (401 no key, 503 not
    ready, 421, 415...) goes out as a JSON-RPC error, which MCP clients show their user, with
    the same status and headers; its ``data`` is the server's usual error object."""
    response = await handler(request)
    if request.path != MCP_PATH or response.status < 400 or not isinstance(response, web.Response):
        return response
    try:
        error = orjson.loads(response.body)["error"] if isinstance(response.body, bytes) else None
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error = None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return response  # already the transport's own JSON-RPC answer
    rewritten = json_response({"jsonrpc": "2.0", "id": None, "error": {
        "code": SERVER_ERROR, "message": f"{error['code']}: {error.get('message', '')}", "data": error}},
        response.status)
    for name in ("Allow", "Retry-After"):
        if name in response.headers:
            rewritten.headers[name] = response.headers[name]
    if response.keep_alive is False:
        rewritten.force_close()
    return rewritten


def _load_sdk() -> None:
    """Import the MCP SDK and the tools (over a second: pydantic, starlette, their models)."""
    import mcp.server.streamable_http_manager  # noqa: F401

    import gm.mcp.server  # noqa: F401


def _session_manager(memories: Callable[[], Memories], max_body_bytes: int) -> StreamableHTTPSessionManager:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from gm.mcp.server import build_server

    # No transport security settings: the server's own cross-site guard has already checked the Host.
    return StreamableHTTPSessionManager(build_server(memories), stateless=True, json_response=True,
                                        max_request_body_size=max_body_bytes)


class McpEndpoint:
    """The SDK's session manager, started with the application, and the handler of ``/mcp``."""

    def __init__(self, memories: Callable[[], Memories], namespace_of: Callable[[web.Request], str | None]) -> None:
        self.memories = memories
        self.namespace_of = namespace_of
        self._manager: asyncio.Future[StreamableHTTPSessionManager] | None = None

    async def running(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: the manager runs in a task of its own (anyio's task group must end in
        the task that began it), started without holding up listening: the SDK takes over a
        second to import, done on a worker thread, and a call that comes sooner waits for it."""
        self._manager = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._run(self._manager, app[MAX_BODY_KEY]), name="gm-mcp")
        yield
        await loops.stop(task)  # after the drain: the calls under way have had their time

    async def _run(self, ready: asyncio.Future[StreamableHTTPSessionManager], max_body_bytes: int) -> None:
        try:
            await asyncio.to_thread(_load_sdk)  # (off the loop: /v1 and the probes answer meanwhile)
            manager = _session_manager(self.memories, max_body_bytes)
            async with manager.run():
                ready.set_result(manager)
                await asyncio.Event().wait()  # until cancelled
        except Exception as exc:
            log.exception("the MCP endpoint could not start; /mcp answers 500")
            if not ready.done():
                ready.set_exception(exc)
                ready.exception()  # each call to /mcp raises it; none may ever come
        finally:
            ready.cancel()  # (no-op once settled)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self._manager is None:
            raise RuntimeError("the application was not started")
        manager = await asyncio.shield(self._manager)
        return await asgi_response(request, manager.handle_request, {NAMESPACE_SCOPE_KEY: self.namespace_of(request)})


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]],
                    Callable[[MutableMapping[str, Any]], Awaitable[None]]], Awaitable[None]]


async def asgi_response(request: web.Request, app: ASGIApp, scope: dict[str, Any]) -> web.StreamResponse:
    """Answer ``request`` with the ASGI application ``app`` (its scope with ``scope`` added)."""
    exchange = Exchange(request)
    try:
        await app(exchange.scope(scope), exchange.receive, exchange.send)
    except Exception:
        if exchange.response is None:
            raise  # nothing sent yet: the error middleware answers 500
        log.exception("the ASGI application failed while answering %s %s", request.method, request.path)
        exchange.response.force_close()
    finally:
        exchange.over.set()
    return await exchange.finish()


class Exchange:
    """One aiohttp request and its response as ASGI's ``scope``, ``receive`` and ``send``: the
    body arrives in one message (the body middleware has read it, within its size and time
    limits), the response is streamed as the application sends it (SSE included), and once the
    body is delivered ``receive`` waits for the response to end or the client to go."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.over = asyncio.Event()  # the response is complete, or the client has gone
        self._start: MutableMapping[str, Any] | None = None
        self._body_delivered = False

    def scope(self, extra: dict[str, Any]) -> dict[str, Any]:
        request = self.request
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": request.rel_url.raw_path.encode("ascii"),
            "query_string": request.rel_url.raw_query_string.encode("ascii"),
            "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.raw_headers],
            "client": tuple(peer[:2]) if isinstance(peer, tuple) else None,
            "server": tuple(local[:2]) if isinstance(local, tuple) else None,
            "state": {},
            **extra,
        }

    async def receive(self) -> dict[str, Any]:
        if not self._body_delivered:
            self._body_delivered = True
            return {"type": "http.request", "body": await self.request.read(), "more_body": False}
        over = asyncio.ensure_future(self.over.wait())
        protocol = self.request.protocol
        waits: set[asyncio.Future[Any]] = {over, protocol.closed} if isinstance(protocol, Connection) else {over}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            over.cancel()
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if self._start is not None:
                raise RuntimeError("the response was already started")
            self._start = message
            return
        if message["type"] != "http.response.body" or self.over.is_set():
            return  # (after the end, or once the client has gone, as ASGI servers do: dropped)
        response = await self._prepared()
        try:
            if message.get("body"):
                await response.write(message["body"])
            if not message.get("more_body", False):
                await response.write_eof()
                self.over.set()
        except ConnectionResetError:  # the client went away mid-response
            self.over.set()

    async def _prepared(self) -> web.StreamResponse:
        if self.response is None:
            if self._start is None:
                raise RuntimeError("a response body was sent before its start")
            response = web.StreamResponse(status=self._start["status"])
            for name, value in self._start.get("headers", ()):
                key = name.decode("latin-1")
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value.decode("latin-1"))
            await response.prepare(self.request)
            self.response = response
        return self.response

    async def finish(self) -> web.StreamResponse:
        """The response, for aiohttp to complete (it ends one the application left unfinished)."""
        if self._start is None:
            raise RuntimeError("the MCP transport sent no response")
        return await self._prepared()
