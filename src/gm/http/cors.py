"""CORS: which web origins may call the API from a browser (``GM_CORS_ORIGINS``), answering
their preflights and letting their pages read the answers. Off unless origins are listed.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gm.http.errors import Handler

# What a page may send beyond the CORS-safelisted headers: the two ways of giving a key
# (gm.http.app's auth) and Content-Type, since writes must be application/json (gm.http.guard);
# and for /mcp the streamable HTTP transport's own (an MCP client in a browser sends them).
ALLOWED_HEADERS = "Authorization, Content-Type, X-API-Key"
MCP_HEADER_PREFIX = "mcp-"  # Mcp-Protocol-Version, Mcp-Session-Id, Mcp-Method, Mcp-Param-*
MCP_HEADERS = frozenset({"last-event-id"})
EXPOSED_HEADERS = "Retry-After"  # a 503 not_ready says when to try again
MAX_AGE_SECONDS = 600  # a browser asks again after ten minutes (Chrome caps it at two hours)


class CorsPolicy:
    """The origins whose pages may call the API: exact ``scheme://host[:port]`` strings, as
    gm.config.cors_origins checked and normalised them, or ``*`` alone for any. Empty: none,
    and no response carries a CORS header."""

    def __init__(self, origins: Iterable[str] = ()) -> None:
        self.origins = frozenset(origin.lower() for origin in origins)
        self.any_origin = "*" in self.origins

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin.lower() in self.origins)

    async def allow_origin(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: every answer to a listed origin may be read by its page,
        errors included (a 401 or 422 says what to fix); caches keep answers apart by Origin."""
        if not self.origins:
            return
        origin = request.headers.get("Origin")
        if not self.any_origin:
            vary = response.headers.get("Vary")
            if vary is None:
                response.headers["Vary"] = "Origin"
            elif "origin" not in vary.lower():
                response.headers["Vary"] = f"{vary}, Origin"
        if self.allows(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if self.any_origin else str(origin)
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


def is_preflight(request: web.Request) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def cors_middleware(policy: CorsPolicy) -> Middleware:
    """Answers a listed origin's preflight on a route that exists: 204 with the route's
    methods and the headers a request may carry. It runs after the Host check and before
    auth and readiness: a preflight carries no key, and asks nothing of the store. Any other
    preflight goes on to the answer it always got (405, or 401 with keys)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (is_preflight(request) and policy.allows(request.headers.get("Origin"))):
            return await handler(request)
        unmatched = request.match_info.http_exception
        if not isinstance(unmatched, web.HTTPMethodNotAllowed):  # no such route: its 404
            return await handler(request)
        response = web.Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = ", ".join(sorted(unmatched.allowed_methods))
        response.headers["Access-Control-Allow-Headers"] = _allowed_headers(request)
        response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
        if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            # A public site's page calling a server on this machine or network: Chrome asks first.
            response.headers["Access-Control-Allow-Private-Network"] = "true"
        return response

    return middleware


def _allowed_headers(request: web.Request) -> str:
    """The API's headers; on /mcp also those of the MCP transport the browser asks for."""
    if request.path != "/mcp":
        return ALLOWED_HEADERS
    asked = [h.strip().lower() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")]
    mcp = [h for h in asked if h.startswith(MCP_HEADER_PREFIX) or h in MCP_HEADERS]
    return ", ".join([ALLOWED_HEADERS, *mcp])
