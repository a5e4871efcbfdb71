"""Reading a request into plain values: its JSON body, its query string and the integers in it.
What the contract does not name is refused (422, ``details.path`` naming it) so that a typo cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from gm.errors import GMError, InvalidInput
from gm.memory import parse_json


class MalformedJson(GMError):
    """A body that is not JSON at all (HTTP 400); valid JSON of the wrong shape is a 422."""

    code = "malformed_json"
    status = 400


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object."""
    raw = await request.read()
    try:
        body = parse_json(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


def only_fields(body: dict[str, Any], allowed: Iterable[str]) -> None:
    names = set(allowed)
    for key in body:
        if key not in names:
            raise InvalidInput(f"unknown field {key}", path=key)


def query(request: web.Request, allowed: Iterable[str] = ()) -> dict[str, str]:
    """The query parameters of ``request`` by name. A name the route does not take, or one
    given twice, is refused: ``?userid=u1`` must not silently list every user's memories."""
    names = tuple(allowed)
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name not in names:
            takes = f"it takes {', '.join(names)}" if names else "it takes none"
            raise InvalidInput(f"unknown query parameter {name!r} for {request.path}; {takes}", path=name)
        if name in params:
            raise InvalidInput(f"query parameter {name} is given more than once", path=name)
        params[name] = value
    return params


def query_int(params: dict[str, str], name: str) -> int | None:
    """An integer query parameter, written in ASCII digits only: ``+5``, `` 5``, ``1_000`` and
    ``١٢`` (which Python's ``int`` would all take) are refused."""
    raw = params.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()):
        raise InvalidInput(f"{name} must be a whole number written with the digits 0-9", path=name)
    try:
        return int(raw)
    except ValueError:  # more digits than Python converts (4300): out of any range anyway
        raise InvalidInput(f"{name} is far too large", path=name) from None


def query_json(params: dict[str, str], name: str) -> Any:
    """A query parameter holding URL-encoded JSON (a filter)."""
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return parse_json(raw)
    except orjson.JSONDecodeError:
        raise InvalidInput(f"{name} must be a JSON object (URL-encoded)", path=name) from None
