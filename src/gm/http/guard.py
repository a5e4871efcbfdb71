"""Refusing what a web page could make a browser send: a Host that is not this server's
name (DNS rebinding) and a write whose body is not declared JSON (a cross-site form post).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gm.config import ServerConfig
from gm.errors import GMError
from gm.http.errors import Handler

# A page on another site can send these without a CORS preflight, but only with the
# "simple" content types (text/plain, form encodings) or none: requiring JSON stops it.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HostNotAllowed(GMError):
    code = "host_not_allowed"
    status = 421


class UnsupportedMediaType(GMError):
    code = "unsupported_media_type"
    status = 415


class HostPolicy:
    """Which ``Host`` headers this server answers to. ``names`` None: IP literals and
    ``localhost`` only (a rebinding page reaches us under its own DNS name, never an IP);
    ``*`` among them: any host."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.names = None if names is None else frozenset(names)

    @classmethod
    def serving(cls, config: ServerConfig) -> HostPolicy:
        """``gmem serve``'s: GM_ALLOWED_HOSTS when set; else any host when API keys are set (a
        rebinding page has no key to read with), and IP literals and localhost when not."""
        if config.allowed_hosts is not None:
            return cls(config.allowed_hosts)
        return cls(["*"]) if config.api_keys else cls()

    @property
    def any_host(self) -> bool:
        return self.names is not None and "*" in self.names

    def allows(self, host: str | None) -> bool:
        if host is None or self.any_host:  # no Host at all: HTTP/1.0, never a browser
            return True
        name = host_name(host)
        if self.names is not None:
            return name in self.names
        if name == "localhost":
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def host_name(host: str) -> str:
    """The name in a Host header, without its port, lower-case, brackets off an IPv6 literal."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port, nothing else
        inside, bracket, rest = host[1:].partition("]")
        return inside if bracket and re.fullmatch(r"(:[0-9]+)?", rest) else host
    name, colon, port = host.rpartition(":")
    if colon and re.fullmatch(r"[0-9]+", port):
        host = name
    return host.rstrip(".")


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters (charset) aside."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def cross_site_middleware(policy: HostPolicy) -> Middleware:
    """Refuses a Host outside ``policy`` (421) and, on a route that exists, a POST/PUT/PATCH
    whose Content-Type is not JSON, missing included (415)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not policy.allows(host):
            raise HostNotAllowed(
                f"this server does not answer to the host {host_name(host or '')!r}; "
                "add it to GM_ALLOWED_HOSTS (gmem serve --allowed-hosts) to reach it by that name"
            )
        if request.method in WRITE_METHODS and request.match_info.http_exception is None:
            given = request.headers.get("Content-Type")
            if given is None or not is_json(given):
                shown = f"Content-Type {given!r}" if given is not None else "no Content-Type"
                raise UnsupportedMediaType(
                    f"the body must be JSON sent with Content-Type: application/json (got {shown})"
                )
        return await handler(request)

    return middleware
