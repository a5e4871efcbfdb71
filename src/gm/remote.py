"""A running greatmemory server used like the embedded library: :func:`gm.connect` and the
:class:`RemoteStore` it opens, with the Store's methods, arguments, results and errors.

Each method is the HTTP route of the same name (docs/api.md) and parses the answer with the
results' own ``from_dict``; the server validates. What a URL or a query string cannot carry
typed (an id, a list's limit, cursor and scope) is checked here with the library's checks,
so the error is the one the embedded store raises.
"""

from __future__ import annotations

import asyncio
import builtins
import os
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from gm import config, errors, filters
from gm.client import DEFAULT_URL, Client, encode
from gm.errors import GMError, InvalidInput, StorageUnavailable, StoreClosed
from gm.memory import RESERVED_IDS, HistoryEntry, Memory, Page, SearchHit, Stats
from gm.progress import Progress
from gm.readiness import Readiness
from gm.reembed import BATCH as REEMBED_BATCH
from gm.reembed import ProgressSink, ReembedReport
from gm.storage.base import UNSET, unknown_id
from gm.store import MAX_LIST_LIMIT, MAX_REEMBED_BATCH, Store
from gm.validation import check_id, check_limit, check_order, check_scope_value


def connect(
    url: str | None = None,
    *,
    api_key: str | None = None,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
    retry_for: float = 30.0,
    max_connections: int = 100,
) -> Connecting:
    """Connect to a greatmemory server (``gmem serve``): ``url`` (default ``GM_URL``, else
    http://127.0.0.1:8420) and ``api_key`` (default ``GM_API_KEY``).

    Use it as the embedded store: ``async with gm.connect(url) as mem:`` (closes on exit) or
    ``mem = await gm.connect(url)`` (then ``await mem.close()``). ``timeout``: seconds one
    request may take in all; ``connect_timeout``: to open a connection; ``retry_for``: how
    long refused requests are retried (see :mod:`gm.client`); ``max_connections``: the pool.
    """
    target = url if url is not None else config.URL.read() or DEFAULT_URL
    key = api_key if api_key is not None else config.API_KEY.read()
    client = Client(target, key, timeout=timeout, connect_timeout=connect_timeout, retry_for=retry_for,
                    max_connections=max_connections)
    return Connecting(RemoteStore(client))


class Connecting:
    """Awaitable and async context manager returned by :func:`connect` (as gm.open's opener)."""

    def __init__(self, store: RemoteStore) -> None:
        self.store = store

    def __await__(self) -> Any:
        return self.__aenter__().__await__()

    def __getattr__(self, name: str) -> Any:
        if hasattr(RemoteStore, name):  # e.g. `mem = gm.connect(url); await mem.add(...)`
            raise AttributeError(
                f"gm.connect() returns a connector, not a connected store, so it has no .{name}: write "
                f"`async with gm.connect(...) as mem:` or `mem = await gm.connect(...)`, then use mem.{name}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> None:
        raise TypeError("gm.connect() is asynchronous: write `async with gm.connect(...) as mem:`, "
                        "or use gm.connect_sync(...) for blocking calls")

    def __exit__(self, *exc: object) -> None:  # never reached: __enter__ refuses
        pass

    async def __aenter__(self) -> RemoteStore:
        try:
            return await self.store.open()
        except BaseException:
            await self.store.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()


class RemoteStore:
    """A greatmemory server's memories, with the methods of :class:`gm.Store`; create it
    with :func:`gm.connect`.

    Example::

        async with gm.connect("http://127.0.0.1:8420", api_key=key) as mem:
            await mem.add("Prefers window seats.", user_id="u1", metadata={"topic": "travel"})
            for hit in await mem.search("where does she like to sit?", user_id="u1", limit=5):
                print(hit.score, hit.memory.text)
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.url = client.url
        self._opened = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<RemoteStore {self.url}>"

    # -- life cycle -----------------------------------------------------------------

    async def open(self) -> RemoteStore:
        """Check that a greatmemory server answers at the URL (its liveness probe)."""
        _, body = await self.client.request("GET", "/v1/healthz", idempotent=True)
        if body.get("status") != "ok":
            raise self.client.foreign(200)
        self._opened = True
        return self

    async def close(self) -> None:
        """Close the pooled connections. Safe to call twice."""
        self._closed = True
        await self.client.close()

    async def __aenter__(self) -> RemoteStore:
        if not self._opened:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        return self._opened and not self._closed

    async def probe(self) -> Readiness:
        """What the server's readiness probe says (``/v1/readyz``): its phase and why."""
        body = await self._call("GET", "/v1/readyz", idempotent=True, ok=(200, 503))
        if "status" not in body:  # a 503 made before readyz ran (too many connections): an error body
            error = body.get("error")
            raise errors.from_dict(error if isinstance(error, dict) else {}, 503)
        return Readiness(body["status"], body.get("reason"), body["index"], body["backend"], body["schema_version"],
                         body.get("writes"))

    def __getattr__(self, name: str) -> Any:
        if hasattr(Store, name):
            raise AttributeError(
                f"{name} is the embedded store's only (a server does it for itself, e.g. purging expired "
                f"memories every GM_PURGE_SECONDS); a RemoteStore has the methods the HTTP API offers"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        if self._closed:
            raise StoreClosed(f"the connection to {self.url} is closed; connect again with gm.connect()")
        return (await self.client.request(method, path, **kwargs))[1]

    # -- writes ---------------------------------------------------------------------

    async def add(
        self,
        text: str,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        id: str | None = None,
        expires_at: str | datetime | None = None,
        ttl_seconds: float | None = None,
        occurred_at: str | datetime | None = None,
    ) -> Memory:
        """Store one memory and return it (see :meth:`gm.Store.add`). With a client ``id`` it
        is retried also when its answer was lost (not after a total timeout: that is raised),
        since the same id and content again return the stored memory."""
        data = {
            "text": text, "namespace": namespace, "user_id": user_id, "agent_id": agent_id,
            "session_id": session_id, "metadata": metadata, "id": id, "expires_at": expires_at,
            "ttl_seconds": ttl_seconds, "occurred_at": occurred_at,
        }
        body = {k: v for k, v in data.items() if v is not None}
        return Memory.from_dict(await self._call("POST", "/v1/memories", body=body, idempotent=id is not None))

    async def add_many(self, inputs: builtins.list[dict[str, Any]]) -> builtins.list[Memory]:
        """Store a batch all-or-nothing (see :meth:`gm.Store.add_many`); retried whatever
        happened only when every input has an ``id``."""
        identified = isinstance(inputs, builtins.list) and all(
            isinstance(item, dict) and item.get("id") is not None for item in inputs
        )
        answer = await self._call("POST", "/v1/memories", body={"memories": inputs}, idempotent=identified)
        return [Memory.from_dict(m) for m in answer["memories"]]

    async def update(
        self,
        id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        expires_at: Any = UNSET,
        namespace: str | None = None,
        occurred_at: str | datetime | None = None,
    ) -> Memory:
        """Change a memory (see :meth:`gm.Store.update`): ``expires_at=None`` clears its expiry."""
        changes: dict[str, Any] = {"text": text, "metadata": metadata, "occurred_at": occurred_at}
        body = {k: v for k, v in changes.items() if v is not None}
        if expires_at is not UNSET:
            body["expires_at"] = expires_at
        return Memory.from_dict(await self._by_id("PATCH", id, namespace, body=body))

    async def delete(self, id: str, *, namespace: str | None = None) -> None:
        """Delete one memory; raises :class:`gm.errors.NotFound` if there is none."""
        await self._by_id("DELETE", id, namespace)

    async def delete_many(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        filter: dict[str, Any] | None = None,
    ) -> int:
        """Delete every memory of a scope matching ``filter``; returns how many. Without a
        namespace: the key's own with a namespace-bound key, else ``default``, as embedded."""
        data = {"namespace": namespace, "user_id": user_id, "agent_id": agent_id, "session_id": session_id,
                "filter": filter}
        body = {k: v for k, v in data.items() if v is not None}
        try:
            answer = await self._call("POST", "/v1/memories/delete", body=body, idempotent=False)
        except InvalidInput as refused:
            # The HTTP route wants a namespace named, unless the key is bound to one; it refused
            # before deleting anything, so the library's default is sent in a second request.
            if namespace is not None or refused.path != "namespace":
                raise
            body["namespace"] = "default"
            answer = await self._call("POST", "/v1/memories/delete", body=body, idempotent=False)
        deleted: int = answer["deleted"]
        return deleted

    # -- reads ----------------------------------------------------------------------

    async def get(self, id: str, *, namespace: str | None = None) -> Memory:
        """The memory with this id; raises :class:`gm.errors.NotFound`."""
        return Memory.from_dict(await self._by_id("GET", id, namespace))

    async def list(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        filter: dict[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        occurred_after: str | datetime | None = None,
        occurred_before: str | datetime | None = None,
        order_by: str | None = None,
    ) -> Page:
        """Memories of a scope, newest first (see :meth:`gm.Store.list`)."""
        params: dict[str, str] = {}
        for name, given in (("namespace", namespace), ("user_id", user_id), ("agent_id", agent_id),
                            ("session_id", session_id)):
            scope_value = check_scope_value(given, name)
            if scope_value is not None:
                params[name] = scope_value
        if limit is not None:
            params["limit"] = str(check_limit(limit, default=50, maximum=MAX_LIST_LIMIT))
        if cursor is not None:
            if not isinstance(cursor, str):
                raise InvalidInput("cursor must be a string", path="cursor")
            params["cursor"] = cursor
        if order_by is not None:
            params["order_by"] = check_order(order_by)
        for name, moment in (("occurred_after", occurred_after), ("occurred_before", occurred_before)):
            if moment is not None:
                params[name] = moment.isoformat() if isinstance(moment, datetime) else str(moment)
        if filter is not None:
            filters.parse(filter)  # refused here as the embedded store refuses it, naming the field
            encode({"filter": filter})  # and what JSON cannot carry (NaN) as a body's would be
            params["filter"] = orjson.dumps(filter).decode()
        return Page.from_dict(await self._call("GET", "/v1/memories", params=params, idempotent=True))

    async def history(self, id: str, *, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        """Every add/update/delete of a memory, in commit order; NotFound if it never existed."""
        answer = await self._by_id("GET", id, namespace, "/history")
        return [HistoryEntry.from_dict(entry) for entry in answer["history"]]

    async def search(
        self,
        query: str,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        filter: dict[str, Any] | None = None,
        limit: int | None = None,
        mode: str | None = None,
        occurred_after: str | datetime | None = None,
        occurred_before: str | datetime | None = None,
        min_score: float | None = None,
        recency: float | None = None,
    ) -> builtins.list[SearchHit]:
        """The memories of a scope most relevant to ``query``, best first (see :meth:`gm.Store.search`)."""
        data = {
            "namespace": namespace, "user_id": user_id, "agent_id": agent_id, "session_id": session_id,
            "filter": filter, "limit": limit, "mode": mode, "occurred_after": occurred_after,
            "occurred_before": occurred_before, "min_score": min_score, "recency": recency,
        }
        body = {"query": query, **{k: v for k, v in data.items() if v is not None}}
        answer = await self._call("POST", "/v1/memories/search", body=body, idempotent=True)
        return [SearchHit.from_dict(hit) for hit in answer["hits"]]

    async def stats(self) -> Stats:
        """Counts per namespace, schema version, backend and model; ``extra`` has the rest of
        ``/v1/stats`` (the Writer's health, the index's state, the server's resident memory)."""
        return Stats.from_dict(await self._call("GET", "/v1/stats", idempotent=True))

    # -- the model ------------------------------------------------------------------

    async def reembed(
        self, model_dir: str | os.PathLike[str] | None = None, *, progress: ProgressSink | None = None,
        batch: int = REEMBED_BATCH, poll_seconds: float = 1.0,
    ) -> ReembedReport:
        """Have the server move its vectors to the model in ``model_dir``, a folder on the
        server (None: a reindex), and wait until it has switched (see :meth:`gm.Store.reembed`):
        the server runs it in the background, and its status is read every ``poll_seconds``
        for ``progress``. Cancelling this call leaves the server's re-embed running."""
        check_limit(batch, default=REEMBED_BATCH, maximum=MAX_REEMBED_BATCH, path="batch")
        body = {"model_dir": os.fspath(model_dir) if model_dir is not None else None, "batch": batch}
        status = await self._call("POST", "/v1/admin/reembed", body=body, idempotent=False, ok=(202,))
        ours, heard = status["started_at"], None
        while True:
            if status["started_at"] != ours:
                raise GMError("another re-embed was started on the server after this one; see GET /v1/admin/reembed")
            if progress is not None and status["phase"] is not None:
                now = Progress(status["phase"], status["done"], status["total"], status["rate"], status["eta_seconds"])
                if now != heard:
                    progress(now)
                    heard = now
            if status["state"] == "done":
                return ReembedReport.from_dict(status["report"])
            if status["state"] == "failed":
                error = status["error"] or {}
                raise errors.from_dict(error, errors.BY_CODE.get(str(error.get("code")), GMError).status)
            if status["state"] != "running":
                raise StorageUnavailable(
                    f"the server at {self.url} stopped the re-embed before it finished (cancelled, or restarted); "
                    "ask again to resume it where it stopped"
                )
            await asyncio.sleep(poll_seconds)
            status = await self.reembed_status()

    async def reembed_status(self) -> dict[str, Any]:
        """The server's re-embed as ``GET /v1/admin/reembed`` answers (its ``state``, ``phase``,
        ``done``, ``total``, ``rate``, ``eta_seconds``, ..., and ``database``: what the database
        records, as :meth:`gm.Store.reembed_recorded` reads it)."""
        return await self._call("GET", "/v1/admin/reembed", idempotent=True)

    async def end_reembed(self, *, drop_old: bool) -> bool:
        """``drop_old``: drop the vectors the server's last switch left behind; else cancel the
        re-embed under way. Whether there was anything to do (see :meth:`gm.Store.end_reembed`)."""
        path = "/v1/admin/reembed/drop-old" if drop_old else "/v1/admin/reembed/cancel"
        done: bool = (await self._call("POST", path, body={}, idempotent=True))["done"]
        return done

    async def _by_id(self, method: str, id: str, namespace: str | None, tail: str = "",
                     body: dict[str, Any] | None = None) -> dict[str, Any]:
        check_id(id)
        constraint = check_scope_value(namespace, "namespace")
        params = {"namespace": constraint} if constraint is not None else None
        if id in RESERVED_IDS:  # the name of a route beside /v1/memories/{id}: never a memory's
            raise unknown_id(id)
        # "." and ".." are ids, but as a path's segment they are steps: percent-encoded (and sent
        # as encoded), they reach the server as the id.
        segment = quote(id, safe="").replace(".", "%2E")
        return await self._call(method, f"/v1/memories/{segment}{tail}", body=body, params=params,
                                idempotent=method == "GET")
