"""A small HTTP client for a running greatmemory server, used by the CLI's remote mode.
Errors come back as the same typed exceptions the library raises.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gm import errors

_BY_CODE: dict[str, type[errors.GMError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidInput, errors.InvalidFilter, errors.NotFound, errors.Conflict, errors.Unauthorized,
        errors.Forbidden, errors.NotReady, errors.StorageUnavailable,
    )
}


class ServerUnreachable(errors.GMError):
    """No server answered at the URL."""

    code = "server_unreachable"
    status = 503


class Client:
    """``async with Client("http://127.0.0.1:8420", api_key=...) as c: await c.search({...})``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None,
                      ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, dict[str, Any]]:
        """The status and JSON object of an answer with a status in ``ok`` (an empty body, as
        a 204's, is ``{}``); any other status raises the error the body names."""
        data = orjson.dumps(body) if body is not None else None
        try:
            async with self._session.request(method, self.url + path, data=data, params=params,
                                             headers={"Content-Type": "application/json"}) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServerUnreachable(f"no greatmemory server answered at {self.url}: {exc}") from None
        try:
            payload = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:  # something else listens there (another service, a proxy's error page)
            raise self._foreign(status) from None
        if status in ok:
            if not isinstance(payload, dict):  # every answer of a greatmemory server is an object
                raise self._foreign(status)
            return status, payload
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        cls = _BY_CODE.get(error.get("code", ""), errors.GMError)
        message = error.get("message") or f"the server answered {status}"
        if issubclass(cls, errors.InvalidInput):
            raise cls(message, path=(error.get("details") or {}).get("path"))
        raise cls(message)

    def _foreign(self, status: int) -> ServerUnreachable:
        return ServerUnreachable(f"{self.url} answered {status} with something that is not a greatmemory server's JSON")

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        return await self.request("GET", "/v1/readyz", ok=(200, 503))

    async def stats(self) -> dict[str, Any]:
        return (await self.request("GET", "/v1/stats"))[1]

    async def add(self, memory: dict[str, Any]) -> dict[str, Any]:
        return (await self.request("POST", "/v1/memories", memory))[1]

    async def get(self, memory_id: str) -> dict[str, Any]:
        return (await self.request("GET", f"/v1/memories/{memory_id}"))[1]

    async def delete(self, memory_id: str) -> None:
        await self.request("DELETE", f"/v1/memories/{memory_id}")

    async def search(self, query: dict[str, Any]) -> dict[str, Any]:
        return (await self.request("POST", "/v1/memories/search", query))[1]
