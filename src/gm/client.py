"""The HTTP side of :func:`gm.connect`: one pooled aiohttp session a handle, its timeouts,
the retry rule, and every error body turned back into the library's own exception.

The retry rule (docs/library.md, "Remote: gm.connect"):

- An answer that proves the server did nothing — 503 ``not_ready`` or ``draining`` (the
  lifecycle middleware refuses before any handler runs), ``too_many_connections`` (refused
  before the request is read) or ``model_switched`` (a write refused in its transaction: a
  re-embed switched the model under it) — is retried for every operation, writes included.
- When the outcome is unknown — the connection broke after the request went out, or 503
  ``storage_unavailable`` (a write past its timeout may still commit) — only requests a
  repeat cannot harm are retried: reads, searches, and adds whose every memory has a client
  ``id`` (the same id and content again is answered with the stored memory). An update or a
  delete is not: between the two tries the id can be freed and taken by another memory,
  which the repeat would change; a repeated delete would also answer NotFound for a delete
  that worked.
- Retries back off (0.1 s doubling to 2 s, jittered; a ``Retry-After`` is waited as given)
  until ``retry_for`` seconds have passed since the first try. A server that cannot be
  connected to, or that does not answer within ``timeout``, is not retried: that is
  :class:`gm.errors.ServerUnreachable` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import yarl

from gm import errors
from gm.config import DEFAULT_PORT, server_url
from gm.errors import GMError, InvalidInput, NotReady, ServerUnreachable
from gm.memory import parse_json

log = logging.getLogger("gm.client")

DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
RETRY_FIRST_SECONDS = 0.1
RETRY_MOST_SECONDS = 2.0

# Answered before the server did anything: safe to send again, whatever the request.
REFUSED = frozenset({"not_ready", "draining", "too_many_connections", "model_switched"})
# The server's own codes (gm.http), each as the library error a caller catches; the
# exception keeps the server's code (``error.code == "draining"``).
SERVER_CODES: dict[str, type[GMError]] = {
    "draining": NotReady,
    "too_many_connections": NotReady,
    "line_too_long": InvalidInput,  # a list whose filter makes the query string too long
    "body_too_large": InvalidInput,  # a batch over the server's GM_MAX_BODY_BYTES
}
_UNCERTAIN = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)


class Client:
    """The HTTP connection to one server: ``request`` sends, retries by the module's rule and
    returns the status and JSON object of a success, or raises the error the answer names.

    The aiohttp session (a pool of at most ``max_connections`` kept-alive connections) is
    made on the first request, in the event loop that sends it, and closed by :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        retry_for: float = 30.0,
        max_connections: int = 100,
    ) -> None:
        try:
            self.url = str(yarl.URL(server_url(url))).rstrip("/")
        except ValueError as exc:
            raise InvalidInput(f"url {url!r} is not valid: {exc}", path="url") from None
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout), ("retry_for", retry_for)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise InvalidInput(f"{name} must be a number of seconds, 0 or more", path=name)
        if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
            raise InvalidInput("max_connections must be a whole number, at least 1", path="max_connections")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry_for = retry_for
        self.max_connections = max_connections
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                # (total, not sock_read: a search that takes long but answers is not a failure)
                timeout=aiohttp.ClientTimeout(total=self.timeout or None, sock_connect=self.connect_timeout or None),
                connector=aiohttp.TCPConnector(limit=self.max_connections),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        idempotent: bool,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> tuple[int, dict[str, Any]]:
        """Send ``method path`` and return the status and JSON object of an answer in ``ok``
        (a 204's empty body is ``{}``). ``idempotent``: a repeat cannot harm, so it is also
        retried when the outcome is unknown (see the module's rule)."""
        data = encode(body) if body is not None else None
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return await self._attempt(method, path, data, params, ok, idempotent)
            except _Retryable as retry:
                delay = retry.wait if retry.wait is not None else backoff(attempt)
                attempt += 1
                if time.monotonic() + delay > started + self.retry_for:
                    error = retry.error
                    if attempt > 1:
                        error.message += f" (tried {attempt} times in {time.monotonic() - started:.1f} s: retry_for)"
                        error.args = (error.message,)
                    raise error from None
                log.debug("%s %s: %s; retrying in %.2f s", method, path, retry.error.code, delay)
                await asyncio.sleep(delay)

    async def _attempt(
        self, method: str, path: str, data: bytes | None, params: dict[str, str] | None,
        ok: tuple[int, ...], idempotent: bool,
    ) -> tuple[int, dict[str, Any]]:
        session = self._open_session()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        url = yarl.URL(self.url + path, encoded=True)  # as the caller encoded it: "%2E%2E" is an id, not a step up
        try:
            async with session.request(method, url, data=data, params=params, headers=headers) as answer:
                raw = await answer.read()
                status, retry_after = answer.status, answer.headers.get("Retry-After")
        except aiohttp.ConnectionTimeoutError:
            raise self.unreachable(f"it did not accept a connection within {self.connect_timeout:g} s "
                                   "(connect_timeout)") from None
        except aiohttp.ClientConnectorError as exc:  # refused, no such host: nothing was sent
            raise self.unreachable(_connect_failure(exc)) from None
        except TimeoutError:
            raise self.unreachable(f"it did not answer within {self.timeout:g} s (timeout)", sent=not idempotent,
                                   answered=True) from None
        except _UNCERTAIN as exc:  # the request went out; whether it was acted on is unknown
            broke = self.unreachable(f"the connection broke before the answer came ({exc or type(exc).__name__})",
                                     sent=not idempotent, answered=True)
            if idempotent:
                raise _Retryable(broke, None) from None
            raise broke from None
        except aiohttp.ClientError as exc:
            raise self.unreachable(f"{type(exc).__name__}: {exc}", sent=not idempotent) from None
        payload = self._payload(status, raw)
        if status in ok:
            return status, payload
        body = payload.get("error")
        if not isinstance(body, dict) or not isinstance(body.get("code"), str):
            raise self.foreign(status)
        error = errors.from_dict(body, status, SERVER_CODES.get(body["code"]))
        if status == 503 and (error.code in REFUSED or (idempotent and error.code == "storage_unavailable")):
            raise _Retryable(error, retry_seconds(retry_after))
        raise error

    def _payload(self, status: int, raw: bytes) -> dict[str, Any]:
        try:
            payload = parse_json(raw) if raw else {}  # (parse_json keeps integers past 64 bits exact)
        except orjson.JSONDecodeError:  # something else listens there: another service, a proxy's error page
            raise self.foreign(status) from None
        if not isinstance(payload, dict):  # every answer of a greatmemory server is an object
            raise self.foreign(status)
        return payload

    def unreachable(self, reason: str, *, sent: bool = False, answered: bool = False) -> ServerUnreachable:
        """The error for a server that did not answer: ``sent``, a write whose outcome is
        unknown; ``answered``, one that took the connection (so it runs: look elsewhere)."""
        maybe = "; the write was sent and may have been applied: look (get, list) before sending it again" if sent \
            else ""
        if answered:
            hint = "It may be overloaded or the request large: try again, or give gm.connect a longer timeout"
        else:
            hint = ("Check that `gmem serve` runs there and that the URL's host and port are right "
                    "(gm.connect(url), GM_URL)")
        return ServerUnreachable(f"no greatmemory server answered at {self.url}: {reason}{maybe}. {hint}")

    def foreign(self, status: int) -> ServerUnreachable:
        error = ServerUnreachable(
            f"{self.url} answered {status} with something that is not a greatmemory server's JSON: is the URL "
            "that of a greatmemory server (GM_URL), and not of another service or a proxy's error page?"
        )
        error.transient = False
        return error


def _connect_failure(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return f"the connection was refused (nothing listens on {exc.host}:{exc.port})"
    if isinstance(os_error, socket.gaierror):
        return f"the host name {exc.host!r} does not resolve ({os_error.strerror})"
    return f"cannot connect to {exc.host}:{exc.port} ({os_error})"


class _Retryable(Exception):
    """An attempt that failed in a way the rule allows to try again."""

    def __init__(self, error: GMError, wait: float | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.wait = wait


def backoff(attempt: int) -> float:
    """The pause before retry ``attempt + 1``: doubling, capped, jittered so that many
    clients refused at once do not all come back at once."""
    return min(RETRY_MOST_SECONDS, RETRY_FIRST_SECONDS * 2.0 ** min(attempt, 16)) * random.uniform(0.5, 1.0)


def retry_seconds(header: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now."""
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        moment: datetime = parsedate_to_datetime(header)
        return max(0.0, moment.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# -- request bodies --------------------------------------------------------------------


def encode(body: dict[str, Any]) -> bytes:
    """``body`` as JSON, refusing what JSON cannot carry with the error the library gives,
    naming the field: NaN and infinity (which orjson would write as null, dropping a
    ``ttl_seconds``) and values that are not JSON at all. An integer past 64 bits is written
    exactly, for the server to refuse by name as the library does."""
    for path, value in fields(body):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{path} must be a finite number", path=path)
    try:
        return orjson.dumps(body)
    except TypeError:
        pass
    for path, value in fields(body):
        try:
            json.dumps(value, default=_time, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidInput(f"{path} must hold only JSON values: {exc}", path=path) from None
    return json.dumps(body, default=_time, allow_nan=False).encode()


def fields(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Each field of a body by the path the library's errors name it by; a batch's items'
    fields as ``memories[i].field``."""
    for key, value in body.items():
        if key == "memories" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from ((f"memories[{i}].{k}", v) for k, v in item.items())
                else:
                    yield f"memories[{i}]", item
        else:
            yield key, value


def _time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()  # as orjson writes it: naive stays naive, for the server to refuse
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")
