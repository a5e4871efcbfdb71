"""CORS on a real ``gmem serve``: off by default (no header, preflights answered as they
always were), and with ``GM_CORS_ORIGINS`` a listed origin's page can call the API (its
preflight, then the request with a key and JSON) while another origin gets nothing; a bad
origin list stops the server at start, naming the variable."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from gm.config import ServerConfig, cors_origins
from gm.errors import InvalidSetting
from tests.http_server import spawn_server

KEY = "cors-key-0123456789abcdef"
APP = "https://app.example.com"
OTHER = "https://evil.example"


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def cors(self) -> dict[str, str]:
        """Its Access-Control-* headers, by lower-case name."""
        return {k.lower(): v for k, v in self.headers.items() if k.lower().startswith("access-control-")}


async def call(url: str, method: str, path: str, *, origin: str | None = None, preflight: str | None = None,
               headers: dict[str, str] | None = None, json: object = None) -> Answer:
    """A request as a browser sends it from a page at ``origin``; with ``preflight`` (a
    method), the OPTIONS it sends first for that method."""
    sent = dict(headers or {})
    if origin is not None:
        sent["Origin"] = origin
    if preflight is not None:
        sent["Access-Control-Request-Method"] = preflight
        sent["Access-Control-Request-Headers"] = "authorization,content-type"
    async with aiohttp.ClientSession() as session, session.request(
        method, url + path, headers=sent, json=json, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        return Answer(response.status, dict(response.headers), await response.read())


def served(folder: Path, env: dict[str, str]) -> Iterator[str]:
    process, url = asyncio.run(spawn_server(folder / "serve.log", "--db", str(folder / "mem.db"), env=env))
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (folder / "serve.log").read_text()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with keys and no GM_CORS_ORIGINS."""
    yield from served(tmp_path_factory.mktemp("plain"), {"GM_API_KEYS": KEY})


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server with keys that lets two origins in (one written with its default port)."""
    env = {"GM_API_KEYS": KEY, "GM_CORS_ORIGINS": f"{APP}:443, http://localhost:3000"}
    yield from served(tmp_path_factory.mktemp("listed"), env)


async def started(folder: Path, env: dict[str, str]) -> AsyncIterator[str]:
    process, url = await spawn_server(folder / "serve.log", "--db", str(folder / "mem.db"), env=env)
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (folder / "serve.log").read_text()


@pytest.fixture
async def keyless(tmp_path: Path) -> AsyncIterator[str]:
    """A server without keys that lets one origin in."""
    async for url in started(tmp_path, {"GM_CORS_ORIGINS": APP}):
        yield url


@pytest.fixture
async def any_origin(tmp_path: Path) -> AsyncIterator[str]:
    """A server with keys that lets every origin in."""
    async for url in started(tmp_path, {"GM_API_KEYS": KEY, "GM_CORS_ORIGINS": "*"}):
        yield url


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_off_by_default(plain: str) -> None:
    for origin in (APP, OTHER):
        simple = await call(plain, "GET", "/v1/stats", origin=origin, headers=AUTH)
        assert simple.status == 200 and simple.cors == {} and "Vary" not in simple.headers
        # A preflight gets what it always got: with keys, the 401 of a request without one.
        preflight = await call(plain, "OPTIONS", "/v1/memories", origin=origin, preflight="POST")
        assert preflight.status == 401 and preflight.cors == {}


async def test_a_listed_origin_can_call_the_api_from_a_page(listed: str) -> None:
    preflight = await call(listed, "OPTIONS", "/v1/memories", origin=APP, preflight="POST")
    assert preflight.status == 204 and preflight.body == b""
    assert preflight.cors == {
        "access-control-allow-origin": APP,
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": "Authorization, Content-Type, X-API-Key",
        "access-control-max-age": "600",
        "access-control-expose-headers": "Retry-After",
    }
    assert preflight.headers["Vary"] == "Origin"
    by_id = await call(listed, "OPTIONS", "/v1/memories/some-id", origin=APP, preflight="PATCH")
    assert by_id.status == 204 and by_id.cors["access-control-allow-methods"] == "DELETE, GET, PATCH"

    added = await call(listed, "POST", "/v1/memories", origin=APP, headers=AUTH, json={"text": "From a page."})
    assert added.status == 201 and added.cors["access-control-allow-origin"] == APP
    assert added.headers["Vary"] == "Origin"
    # Errors too, so the page can read what to fix.
    refused = await call(listed, "GET", "/v1/stats", origin=APP)
    assert refused.status == 401 and refused.cors["access-control-allow-origin"] == APP
    assert b"a valid API key is required" in refused.body
    other_port = await call(listed, "GET", "/v1/healthz", origin="http://localhost:3000")
    assert other_port.cors["access-control-allow-origin"] == "http://localhost:3000"

    nowhere = await call(listed, "OPTIONS", "/v1/nothing", origin=APP, preflight="GET")
    # A preflight is answered only for a route that exists; here, what any keyless request gets.
    assert nowhere.status == 401 and "access-control-allow-methods" not in nowhere.cors
    private = await call(listed, "OPTIONS", "/v1/memories", origin=APP, preflight="GET",
                         headers={"Access-Control-Request-Private-Network": "true"})
    assert private.status == 204 and private.cors["access-control-allow-private-network"] == "true"


async def test_an_unlisted_origin_gets_no_cors_headers(listed: str) -> None:
    for origin in (OTHER, "http://localhost:3001", "http://app.example.com", "null"):
        preflight = await call(listed, "OPTIONS", "/v1/memories", origin=origin, preflight="POST")
        assert preflight.status == 401 and preflight.cors == {}, origin
        simple = await call(listed, "GET", "/v1/stats", origin=origin, headers=AUTH)
        assert simple.status == 200 and simple.cors == {}, origin
        assert simple.headers["Vary"] == "Origin"  # a cache must not hand this answer to a listed origin


async def test_the_cross_site_guard_still_holds_for_listed_origins(keyless: str) -> None:
    """Without keys: a listed origin's page may write JSON; a form post is still refused, and
    so is a Host the server does not answer to (a rebinding page)."""
    preflight = await call(keyless, "OPTIONS", "/v1/memories", origin=APP, preflight="POST")
    assert preflight.status == 204 and preflight.cors["access-control-allow-origin"] == APP
    added = await call(keyless, "POST", "/v1/memories", origin=APP, json={"text": "From a page, no key."})
    assert added.status == 201 and added.cors["access-control-allow-origin"] == APP
    form = await call(keyless, "POST", "/v1/memories", origin=APP, headers={"Content-Type": "text/plain"})
    assert form.status == 415 and form.cors["access-control-allow-origin"] == APP
    rebound = await call(keyless, "GET", "/v1/stats", origin=APP, headers={"Host": "rebound.example"})
    assert rebound.status == 421
    rebound = await call(keyless, "OPTIONS", "/v1/stats", origin=APP, preflight="GET",
                         headers={"Host": "rebound.example"})
    assert rebound.status == 421
    unlisted = await call(keyless, "OPTIONS", "/v1/memories", origin=OTHER, preflight="POST")
    assert unlisted.status == 405 and unlisted.cors == {}  # as without CORS: OPTIONS is no method of the route


async def test_any_origin_with_keys(any_origin: str) -> None:
    preflight = await call(any_origin, "OPTIONS", "/v1/memories/search", origin=OTHER, preflight="POST")
    assert preflight.status == 204 and preflight.cors["access-control-allow-origin"] == "*"
    simple = await call(any_origin, "GET", "/v1/healthz", origin=OTHER)
    assert simple.cors["access-control-allow-origin"] == "*" and "Vary" not in simple.headers
    assert (await call(any_origin, "GET", "/v1/healthz")).cors == {}  # not a browser's cross-origin request


@pytest.mark.parametrize(("value", "says"), [
    ("https://app.example.com/", "an origin has no path: write https://app.example.com"),
    ("app.example.com", "did you mean https://app.example.com?"),
    ("*,https://app.example.com", "* allows every origin: give it alone"),
    ("null", "it cannot be allowed"),
    ("https://app.example.com:99999", "not from 1 to 65535"),
    ("https://a.example,,https://b.example", "an entry is empty"),
])
def test_a_bad_origin_list_stops_the_server_at_start(value: str, says: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gm", "serve", "--db", str(tmp_path / "mem.db"), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "GM_CORS_ORIGINS": value}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gmem: GM_CORS_ORIGINS={value!r} is not valid: ") and says in line, line
    assert not (tmp_path / "mem.db").exists()


def test_any_origin_needs_keys(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gm", "serve", "--db", str(tmp_path / "mem.db"), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "GM_CORS_ORIGINS": "*"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("gmem: GM_CORS_ORIGINS=* lets every web page") and "set GM_API_KEYS" in line
    with pytest.raises(InvalidSetting) as refused:
        ServerConfig.load({}, {"GM_CORS_ORIGINS": "*"})
    assert refused.value.variable == "GM_CORS_ORIGINS"
    assert ServerConfig.load({}, {"GM_CORS_ORIGINS": "*", "GM_API_KEYS": KEY}).cors_origins == ("*",)


def test_origins_are_kept_as_browsers_send_them() -> None:
    assert cors_origins("HTTPS://App.Example.com:443, http://localhost:80,http://[::1]:8080,"
                        "https://app.example.com") == ("https://app.example.com", "http://localhost",
                                                       "http://[::1]:8080")
    assert ServerConfig.load({}, {}).cors_origins == ()


async def test_a_listed_origins_mcp_client_may_send_the_transports_headers(listed: str) -> None:
    # An MCP client in a browser (an inspector) sends the streamable HTTP transport's headers.
    asked = "authorization,content-type,mcp-protocol-version,mcp-method,mcp-param-name,last-event-id"
    async with aiohttp.ClientSession() as session, session.options(
        listed + "/mcp", timeout=aiohttp.ClientTimeout(total=30),
        headers={"Origin": APP, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked},
    ) as response:
        assert response.status == 204
        allowed = {h.strip().lower() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert set(asked.split(",")) <= allowed
    plain_api = await call(listed, "OPTIONS", "/v1/memories", origin=APP, preflight="POST")
    assert "mcp" not in plain_api.cors["access-control-allow-headers"].lower()  # only /mcp takes them
