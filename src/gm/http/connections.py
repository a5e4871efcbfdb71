"""The server's connections: how many may be open, how long a client may take to send a
request, JSON bodies for requests too broken to route, and closing idle ones at drain.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gm.config import ConnectionLimits
from gm.errors import GMError
from gm.http.errors import Handler, error_body, error_response

log = logging.getLogger("gm.http")

# After the drain has waited for in-flight requests (ServerState.wait_idle), what is left
# gets this long to write its response before aiohttp cancels it.
SHUTDOWN_GRACE_SECONDS = 2.0


class BodyTimeout(GMError):
    code = "body_timeout"
    status = 408


def _raw_response(status: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response, for a connection refused before it has a request to answer."""
    body = orjson.dumps(error_body(code, message))
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY_CONNECTIONS = _raw_response(
    "503 Service Unavailable",
    "too_many_connections",
    "every connection this server allows (GM_MAX_CONNECTIONS) is busy with a request; retry shortly",
)


class Connection(RequestHandler):
    """aiohttp's protocol with a deadline for each request's line and headers: from the
    connection's opening for the first, from its first byte for the next ones."""

    def __init__(self, manager: ConnectionServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        limits = manager.limits
        super().__init__(manager, loop=loop, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._server = manager
        self._header_timeout = limits.header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self.awaiting_head = True  # no request parsed since the last response (or the opening)
        self.awaiting_since = loop.time()
        self._head_begun = False  # some bytes of the awaited request have arrived
        self.refused = False
        # Settles when the client has gone: what a bridged ASGI application's receive() waits on
        # (aiohttp does not cancel a handler whose client left; see gm.mcp.bridge).
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit(self):
            self.refused = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.refused:
            return
        self._server.release(self)
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self.awaiting_head = False
            self._cancel_head_timer()
        elif self.awaiting_head and data:
            self._head_begun = True
            if self._head_timer is None:
                self._start_head_timer()

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if not self._messages:
            self.awaiting_head, self._head_begun = True, False
            self.awaiting_since = self._loop.time()
        return result

    @property
    def idle(self) -> bool:
        """Waiting for a request of which no byte has arrived."""
        return self.awaiting_head and not self._head_begun

    @property
    def served(self) -> bool:
        """At least one request has been read on this connection."""
        return self._request_count > 0

    def _start_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.awaiting_head and not self._messages:
            self.force_close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """A request aiohttp could not parse or handle gets the contract's JSON error body."""
        if request.writer.output_size > 0:  # a response was under way: aiohttp drops the connection
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            response = error_response(
                400, "line_too_long", f"the request line or a header is over the {self.max_line_size}-byte limit"
            )
        elif isinstance(exc, HttpProcessingError):
            log.debug("unparsable request from %s: %s", request.remote, exc)
            response = error_response(400, "bad_request", "the request is not valid HTTP/1.1")
        else:
            log.error("unexpected fault handling a request from %s", request.remote, exc_info=exc)
            response = error_response(500, "internal", "an unexpected fault; it was logged on the server")
        response.force_close()
        return response


class ConnectionServer(web.Server):
    """aiohttp's server that counts its connections: over ``limits.max_connections``, the one
    waiting longest for a request is closed to make room, or, when every one has a request
    under way, the newcomer gets a 503 and is closed."""

    def __init__(self, base: web.Server, limits: ConnectionLimits) -> None:
        # AppRunner builds its Server from the application's private parts; take them over
        # from it whole rather than rebuilding them.
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self.limits = limits
        self._open: set[Connection] = set()

    def __call__(self) -> Connection:
        return Connection(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, connection: Connection) -> bool:
        if len(self._open) >= self.limits.max_connections:
            waiting = [c for c in self._open if c.awaiting_head]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c.awaiting_since)
            self._open.discard(oldest)
            oldest.force_close()
        self._open.add(connection)
        return True

    def release(self, connection: Connection) -> None:
        self._open.discard(connection)

    def close_idle(self, *, fresh: bool = False) -> None:
        """Close connections idle between requests; ``fresh``: also those yet to send their
        first (at drain start these are left to get their 503 and ``Connection: close``)."""
        for connection in list(self._open):
            if connection.idle and (fresh or connection.served):
                connection.force_close()

    def pre_shutdown(self) -> None:
        """Stop: aiohttp's own would leave a connection whose task has not yet started waiting
        for a request that it then ignores, until the shutdown timeout; close idle ones outright."""
        self.close_idle(fresh=True)
        super().pre_shutdown()


class ConnectionRunner(web.AppRunner):
    """An AppRunner whose server is a :class:`ConnectionServer` under ``limits``."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, shutdown_timeout=SHUTDOWN_GRACE_SECONDS, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return ConnectionServer(await super()._make_server(), self.limits)

    def close_idle(self) -> None:
        """Drain start: close keep-alive connections idle between requests; busy ones close
        after their response, new ones after their 503."""
        if isinstance(self.server, ConnectionServer):
            self.server.close_idle()


def body_middleware(body_timeout: float) -> Middleware:
    """A body declared over the limit gets its 413 before a byte of it is read; the rest
    must arrive within ``body_timeout`` seconds (else 408)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > request.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=declared)
        if request.body_exists:
            try:
                async with asyncio.timeout(body_timeout):  # (not wait_for: see gm.loops)
                    await request.read()
            except TimeoutError:
                raise BodyTimeout(
                    f"the request body did not arrive within {body_timeout:g} s (GM_BODY_TIMEOUT_SECONDS)"
                ) from None
        return await handler(request)

    return middleware


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue`` (curl sends it for bodies over 1 MiB): aiohttp asks this before
    any middleware runs, so the declared-size check is made here too, and a body over the limit
    gets its 413 instead of an invitation to send it. Any other expectation: 417, as JSON."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        return error_response(417, "expectation_failed", "the only Expect this server meets is 100-continue")
    declared = request.content_length
    if declared is not None and declared > request.client_max_size:
        response = error_response(
            413, "body_too_large",
            f"the request body is over the {request.client_max_size}-byte limit (GM_MAX_BODY_BYTES)",
        )
        response.force_close()  # the body was never invited: do not read it as the next request
        return response
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # (as aiohttp's own handler does: the response proper is yet to come)
    return None


async def close_unfinished(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: a response leaving a body unread ends its connection, so the
    client does not send the next request after bytes the server never read."""
    if not request.content.is_eof():
        end_connection(response)


def end_connection(response: web.StreamResponse) -> None:
    """From an ``on_response_prepare`` hook, which runs after aiohttp wrote the Connection
    header: close after this response, and say so."""
    response.force_close()
    response.headers["Connection"] = "close"
