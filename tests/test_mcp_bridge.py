"""The aiohttp-to-ASGI bridge that carries /mcp, on small ASGI applications of its own: a
request body arrives whole, a response streams as it is sent, a client that leaves is a
``http.disconnect``, and a failing application is a 500 with the server's error body."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gm.config import ConnectionLimits
from gm.http.connections import ConnectionRunner
from gm.http.errors import error_middleware
from gm.mcp.bridge import asgi_response

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Apps:
    """ASGI applications, and what they saw."""

    def __init__(self) -> None:
        self.first_chunk_read = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.scope: dict[str, Any] = {}

    async def echo(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        self.scope = scope
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        digest = hashlib.sha256(body).hexdigest().encode()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-type", b"text/plain"), (b"x-length", str(len(body)).encode()),
                                (b"connection", b"keep-alive")]})
        await send({"type": "http.response.body", "body": digest})

    async def stream(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
        await self.first_chunk_read.wait()  # only the client's having read it lets the rest go
        await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def until_disconnect(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.request"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: waiting\n\n", "more_body": True})
        assert (await receive())["type"] == "http.disconnect"
        self.disconnected.set()
        await send({"type": "http.response.body", "body": b"data: too late\n\n", "more_body": True})  # dropped

    async def failing(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raise RuntimeError("broken")


def _handler(asgi_app: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await asgi_response(request, asgi_app, {"gm.extra": "given"})

    return handle


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Apps]]:
    apps = Apps()
    app = web.Application(middlewares=[error_middleware])
    for name in ("echo", "stream", "until_disconnect", "failing"):
        app.router.add_route("*", f"/{name}", _handler(getattr(apps, name)))
    runner = ConnectionRunner(app, ConnectionLimits(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", apps
    await runner.cleanup()


async def test_a_request_body_arrives_whole_with_its_scope(served: tuple[str, Apps]) -> None:
    url, apps = served
    body = bytes(range(256)) * 4096  # 1 MiB
    async with asyncio.timeout(30), aiohttp.ClientSession() as session:
        async with session.post(url + "/echo?a=1&b=%20", data=body, headers={"X-Custom": "yes"}) as response:
            assert response.status == 201 and response.headers["x-length"] == str(len(body))
            assert await response.read() == hashlib.sha256(body).hexdigest().encode()
            assert "Connection" not in response.headers  # the app's hop-by-hop header is aiohttp's to write
    scope = apps.scope
    assert scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/echo"
    assert scope["query_string"] == b"a=1&b=%20" and scope["http_version"] == "1.1"
    assert (b"x-custom", b"yes") in scope["headers"] and scope["client"][0] == "127.0.0.1"
    assert scope["gm.extra"] == "given"


async def test_a_response_streams_as_it_is_sent(served: tuple[str, Apps]) -> None:
    url, apps = served
    async with asyncio.timeout(30), aiohttp.ClientSession() as session, session.get(url + "/stream") as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        assert await response.content.readuntil(b"\n\n") == b"data: one\n\n"  # before the app sent the rest
        apps.first_chunk_read.set()
        assert await response.content.read() == b"data: two\n\n"


async def test_a_client_that_leaves_is_a_disconnect(served: tuple[str, Apps]) -> None:
    url, apps = served
    async with asyncio.timeout(30):
        async with aiohttp.ClientSession() as session, session.post(url + "/until_disconnect", data=b"x") as response:
            assert await response.content.readuntil(b"\n\n") == b"data: waiting\n\n"
            assert not apps.disconnected.is_set()
            response.close()  # drops the connection
        await apps.disconnected.wait()


async def test_a_failing_application_is_a_500(served: tuple[str, Apps]) -> None:
    url, _ = served
    async with asyncio.timeout(30), aiohttp.ClientSession() as session, session.get(url + "/failing") as response:
        assert response.status == 500
        assert (await response.json())["error"]["code"] == "internal"
