"""Turning every failure into the contract's error body: typed errors keep their status
and code, aiohttp's own (404, 405, 413) get JSON bodies, anything else is a bare 500.
Every error body is made by :func:`error_response`, so every one has the same shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from gm.errors import GMError

log = logging.getLogger("gm.http")

MAX_BODY_KEY = web.AppKey("gm_max_body_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The contract's error body, ``{"error": {"code", "message", "details"}}``; ``details``
    is always an object, empty when there is nothing more to say."""
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None) -> web.Response:
    return json_response(error_body(code, message, details), status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GMError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[MAX_BODY_KEY]
        return error_response(
            413, "body_too_large", f"the request body is over the {limit}-byte limit (GM_MAX_BODY_BYTES)"
        )
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        response = error_response(405, "method_not_allowed", f"{request.method} is not allowed here; use {allowed}")
        response.headers["Allow"] = ",".join(sorted(exc.allowed_methods))
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return error_response(404, "not_found", f"no route {request.method} {request.path}; see /v1/openapi.json")
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "http_error"), exc.reason)
    except Exception:
        log.exception("unexpected fault in %s %s", request.method, request.path)
        return error_response(500, "internal", "an unexpected fault; it was logged on the server")
