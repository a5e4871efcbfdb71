"""The store: the embedded library's handle on a memory database. It validates inputs,
asks the Embedder for vectors, sends writes to the backend's Writer, and answers reads and
searches from the readers and the vector index. The HTTP server is a thin layer over it.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from gm import context, filters, loops
from gm.config import DEFAULT_DB, StoreSettings
from gm.embedding import Embedder, ModelSpec
from gm.errors import InvalidInput, NotReady, StorageUnavailable, StoreClosed
from gm.index import VectorIndex
from gm.memory import MAX_BATCH, HistoryEntry, Memory, Page, SearchHit, Stats, now_ms, parse_time
from gm.search import Searcher, SearchRequest
from gm.storage import is_postgres_url
from gm.storage.base import (
    UNSET,
    AddMemories,
    Backend,
    CheckWrites,
    DeleteMemory,
    DeleteWhere,
    IndexChange,
    PurgeExpired,
    RecordModel,
    UpdateMemory,
    unknown_id,
)
from gm.validation import (
    check_expiry,
    check_id,
    check_limit,
    check_metadata,
    check_min_score,
    check_mode,
    check_order,
    check_recency,
    check_scope,
    check_scope_value,
    check_text,
    check_time_range,
    new_memory,
)

log = logging.getLogger(__name__)

MAX_SEARCH_LIMIT = 100
MAX_LIST_LIMIT = 1000
PROBE_SECONDS = 2.0  # readyz's probe write: a load balancer's health check should not wait longer


class Store:
    """A memory database opened for use; create it with :func:`gm.open`.

    Example::

        async with gm.open("mem.db") as mem:
            await mem.add("Prefers window seats.", user_id="u1", metadata={"topic": "travel"})
            for hit in await mem.search("where does she like to sit?", user_id="u1", limit=5):
                print(hit.score, hit.memory.text)
    """

    def __init__(self, backend: Backend, model: ModelSpec, settings: StoreSettings | None = None) -> None:
        self.backend = backend
        self.model = model
        self.settings = settings or StoreSettings.load()
        self.embedder = Embedder(model, threads=self.settings.embed_threads)
        self.index = VectorIndex()
        self.searcher = Searcher(self)
        self._index_ready = asyncio.Event()
        self.index_error: StorageUnavailable | None = None
        self._pending: list[IndexChange] | None = []  # changes committed while the index loads
        self._tasks: list[asyncio.Task[None]] = []
        self._loader: asyncio.Task[None] | None = None
        self._opened = False
        self._closed = False

    # -- life cycle -----------------------------------------------------------------

    async def open(self) -> Store:
        """Migrate and open the database, check the model; the model itself stays unloaded."""
        _limit_blas_threads(self.settings.blas_threads)
        await self.backend.open(self._on_commit, self._reload_index)
        await self.backend.write(RecordModel(self.model.identity))
        self._opened = True
        loop = asyncio.get_running_loop()
        if self.backend.native_vectors:  # the database searches vectors itself
            self._pending = None
            self._index_ready.set()
        elif self._loader is None:  # (the backend may have asked for a reload already)
            self._reload_index()
        self._tasks.append(loop.create_task(self._purge_forever(), name="gm-purge"))
        self._tasks.append(loop.create_task(context.backfill_forever(self.backend), name="gm-context-backfill"))
        return self

    async def close(self) -> None:
        """Finish queued writes and close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await loops.stop(*self._tasks, self._loader)
        await self.embedder.stop()
        await self.backend.close()

    async def __aenter__(self) -> Store:
        if not self._opened:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def ready(self) -> bool:
        return self._opened and not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed; open it again with gm.open()")
        if not self._opened:
            raise NotReady(f"the store is still {self.backend.phase}; try again shortly")

    def _on_commit(self, changes: list[IndexChange]) -> None:
        if self._pending is not None:
            self._pending.extend(changes)
        else:
            self.index.apply(changes)

    async def _load_index(self) -> None:
        """Fill the index from the database; a failure (the database went away) is kept in
        ``index_error`` (readyz says unavailable) and the load is tried again with backoff."""
        delay = 1.0
        while True:
            started = time.perf_counter()
            index = self.index
            try:
                async for rows in self.backend.vectors():  # commits meanwhile wait in _pending,
                    await asyncio.to_thread(index.load, rows)  # so the loader may mutate off the loop
                break
            except Exception as exc:
                log.exception("loading the vector index failed; retrying in %.0fs", delay)
                self.index_error = StorageUnavailable(f"the vector index could not be loaded: {exc}")
                await loops.pause(delay)
                delay = min(delay * 2, 30.0)
                if self._superseded():
                    return
                self.index = VectorIndex()
        if self._superseded():
            return
        pending, self._pending = self._pending or [], None
        self.index.apply(pending)  # replaying in order is idempotent: each change carries its final state
        self.index_error = None
        self._index_ready.set()
        log.info("vector index loaded: %d memories in %.2fs", len(self.index), time.perf_counter() - started)

    def _superseded(self) -> bool:
        """A loader that a newer reload replaced must not publish (should its cancellation
        have been lost on the way, see gm.loops)."""
        return asyncio.current_task() is not self._loader

    def _reload_index(self) -> None:
        """Load the index afresh: at open, or when a shared database's change feed lost its
        place. Exactly one load runs at a time."""
        if self._closed:
            return
        if self._loader is not None:
            self._loader.cancel()
        self.index = VectorIndex()
        self._pending = []
        self._index_ready.clear()
        self._loader = asyncio.get_running_loop().create_task(self._load_index(), name="gm-index-load")

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge_expired()
            except Exception:
                log.exception("purging expired memories failed; will retry")
            await loops.pause(self.settings.purge_seconds)

    async def wait_index_or_fail(self) -> None:
        """Wait for the index, unless (or until) loading it failed: then raise why, at once."""
        while not self._index_ready.is_set() and not self.backend.native_vectors:
            if self.index_error is not None:
                raise self.index_error
            await loops.pause(0.25, self._index_ready)

    async def wait_index(self) -> None:
        """Wait until the vector index holds every stored vector (searches do this themselves)."""
        await self._index_ready.wait()

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
        """Store one memory and return it. With a client ``id``, adding the same content
        again returns the stored memory; other content raises :class:`gm.errors.Conflict`.
        ``occurred_at`` (RFC 3339) is when it happened; by default, when it is added.

        >>> await mem.add("Allergic to peanuts.", user_id="u1", metadata={"topic": "health"})
        """
        data = {
            "text": text, "namespace": namespace, "user_id": user_id, "agent_id": agent_id,
            "session_id": session_id, "metadata": metadata, "id": id, "expires_at": expires_at,
            "ttl_seconds": ttl_seconds, "occurred_at": occurred_at,
        }
        [(memory, _)] = await self.add_inputs([{k: v for k, v in data.items() if v is not None}], batch=False)
        return memory

    async def add_many(self, inputs: list[dict[str, Any]]) -> list[Memory]:
        """Store a batch all-or-nothing; each input has the contract's fields (``text``,
        ``user_id``, ``metadata``, ...). Returns the memories in input order."""
        return [memory for memory, _ in await self.add_inputs(inputs)]

    async def add_inputs(self, inputs: list[Any], *, batch: bool = True) -> list[tuple[Memory, bool]]:
        """Like :meth:`add_many`, with a flag per memory: True if this call created it,
        False if a retry with the same client id and content found it stored."""
        self._check_open()
        if not isinstance(inputs, list) or not inputs:
            raise InvalidInput("memories must be a non-empty list", path="memories")
        if len(inputs) > MAX_BATCH:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH} memories; split it", path="memories")
        now = now_ms()
        items = []
        for i, data in enumerate(inputs):
            prefix = f"memories[{i}]." if batch else ""
            if not isinstance(data, dict):
                raise InvalidInput(f"{prefix or 'memory '}must be a JSON object", path=prefix.rstrip(".") or None)
            items.append(new_memory(data, now, prefix))
        vectors = await self.embedder.embed_many([item.text for item in items])
        for item, vector in zip(items, vectors, strict=True):
            item.vector = vector.tobytes()
        result: list[tuple[Memory, bool]] = await self.backend.write(AddMemories(items, now))
        return result

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
        """Change a memory's text (re-embedded), metadata (replaced whole), ``expires_at``
        (an RFC 3339 time, or None to never expire) and/or ``occurred_at`` (an RFC 3339
        time; None keeps it: a memory always has an event time). Raises NotFound.

        With ``namespace``, only a memory in that namespace is changed; one elsewhere is
        NotFound, as an unknown id is. The check is made in the transaction that writes, so
        a memory deleted and re-added under the same id in another namespace meanwhile is
        never touched (what a server's namespace-bound API keys rely on).

        >>> await mem.update(memory.id, metadata={"topic": "travel", "confirmed": True})
        """
        self._check_open()
        check_id(id)
        ns = _check_namespace(namespace)
        if text is None and metadata is None and expires_at is UNSET and occurred_at is None:
            raise InvalidInput("give at least one of text, metadata, expires_at, occurred_at")
        now = now_ms()
        op = UpdateMemory(id, now, namespace=ns)
        if text is not None:
            op.text = check_text(text)
        if metadata is not None:
            op.metadata = check_metadata(metadata)
        if expires_at is not UNSET:
            op.expires_at = None if expires_at is None else check_expiry(expires_at, None, now)
        if occurred_at is not None:
            op.occurred_at = parse_time(occurred_at, "occurred_at")
        if op.text is not None:
            if await self.backend.get(id, now, ns) is None:  # spare the embedding; the Writer decides
                raise unknown_id(id)
            op.vector = (await self.embedder.embed(op.text)).tobytes()
        memory: Memory = await self.backend.write(op)
        return memory

    async def delete(self, id: str, *, namespace: str | None = None) -> None:
        """Delete one memory; raises :class:`gm.errors.NotFound` if there is none (with
        ``namespace``: none in that namespace, checked in the deleting transaction)."""
        self._check_open()
        await self.backend.write(DeleteMemory(check_id(id), now_ms(), _check_namespace(namespace)))

    async def delete_many(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        filter: dict[str, Any] | None = None,
    ) -> int:
        """Delete every memory in a scope that matches ``filter``; returns how many.

        >>> await mem.delete_many(user_id="u1", filter={"topic": "travel"})
        """
        self._check_open()
        scope = check_scope(namespace, user_id, agent_id, session_id)
        deleted: int = await self.backend.write(DeleteWhere(scope, filters.parse(filter), now_ms()))
        return deleted

    async def purge_expired(self) -> int:
        """Delete expired memories now (the store also does this every GM_PURGE_SECONDS)."""
        self._check_open()
        purged: int = await self.backend.write(PurgeExpired(now_ms()))
        return purged

    # -- reads ----------------------------------------------------------------------

    async def get(self, id: str, *, namespace: str | None = None) -> Memory:
        """The memory with this id; raises :class:`gm.errors.NotFound` (also once expired,
        and, with ``namespace``, when it lies in another namespace)."""
        self._check_open()
        memory = await self.backend.get(check_id(id), now_ms(), _check_namespace(namespace))
        if memory is None:
            raise unknown_id(id)
        return memory

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
        """Memories of a scope, newest first, ``limit`` (default 50) a page. ``order_by`` is
        ``created_at`` (default: when they were added) or ``occurred_at`` (when they
        happened); a cursor goes on in the order it came from. ``occurred_after``
        (inclusive) and ``occurred_before`` (exclusive), RFC 3339, bound the event time.

        >>> page = await mem.list(user_id="u1")
        >>> more = await mem.list(user_id="u1", cursor=page.next_cursor)
        """
        self._check_open()
        scope = check_scope(namespace, user_id, agent_id, session_id)
        size = check_limit(limit, default=50, maximum=MAX_LIST_LIMIT)
        if cursor is not None and not isinstance(cursor, str):
            raise InvalidInput("cursor must be a string", path="cursor")
        order = check_order(order_by)
        during = check_time_range(occurred_after, occurred_before)
        parsed = filters.parse(filter)
        return await self.backend.list(scope, parsed, size, cursor, now_ms(), order_by=order, time_range=during)

    async def history(self, id: str, *, namespace: str | None = None) -> builtins.list[HistoryEntry]:
        """Every add/update/delete of a memory, in commit order; NotFound if it never existed.
        With ``namespace``, only the changes made in that namespace (an id freed by a delete
        can be taken in another one), and NotFound if there are none."""
        self._check_open()
        entries = await self.backend.history(check_id(id), _check_namespace(namespace))
        if not entries:
            raise unknown_id(id)
        return entries

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
        """The memories of a scope most relevant to ``query``, best first.

        ``mode`` is ``hybrid`` (default: the keyword and vector rankings fused, see
        :mod:`gm.search`), ``vector`` (score = cosine similarity) or ``keyword`` (score =
        the keyword rank). Each hit also carries ``vector_score`` and ``keyword_score``.
        ``occurred_after`` (inclusive) and ``occurred_before`` (exclusive), RFC 3339, keep
        only memories whose event time lies between them. ``min_score`` drops hits whose
        cosine similarity is below it; ``recency`` (a half-life in days) multiplies each
        score by 1/2 per half-life since the memory occurred.

        >>> hits = await mem.search("seat preference", user_id="u1", limit=5)
        >>> hits[0].memory.text, hits[0].score
        """
        self._check_open()
        request = SearchRequest(
            query=check_text(query, "query"),
            scope=check_scope(namespace, user_id, agent_id, session_id),
            filter=filters.parse(filter),
            limit=check_limit(limit, default=10, maximum=MAX_SEARCH_LIMIT),
            mode=check_mode(mode),
            now=now_ms(),
            time_range=check_time_range(occurred_after, occurred_before),
            min_score=check_min_score(min_score),
            recency=check_recency(recency),
        )
        return await self.searcher.search(request)

    async def stats(self) -> Stats:
        """Counts per namespace, schema version, backend and model (does not load the model)."""
        self._check_open()
        counts = await self.backend.counts(now_ms())
        return Stats(
            memories=sum(counts.values()),
            namespaces=counts,
            schema_version=self.backend.schema_version,
            backend=self.backend.name,
            model=self.model.identity,
            database_bytes=await self.backend.database_size(),
            extra={
                "model_loaded": self.embedder.loaded,
                "index_ready": self._index_ready.is_set(),
                "writes": self.backend.write_health(),
            },
        )

    async def write_health(self, *, probe: bool = False) -> dict[str, Any]:
        """How writes are going (see :meth:`Backend.write_health`). With ``probe``, while the
        last batch failed, the Writer is first asked to commit a one-row write (waiting at most
        PROBE_SECONDS): health follows the database back once it heals, with no traffic needed
        (an instance that left a load balancer's rotation gets none)."""
        health = self.backend.write_health()
        if probe and health["status"] == "failing":
            try:
                async with asyncio.timeout(PROBE_SECONDS):  # (wait_for could swallow a cancellation on 3.11)
                    await self.backend.write(CheckWrites(now_ms()))
            except (StorageUnavailable, TimeoutError):
                pass  # counted by the Writer; the answer below says so
            health = self.backend.write_health()
        return health


def _check_namespace(namespace: Any) -> str | None:
    """A namespace constraint (None: any namespace)."""
    return check_scope_value(namespace, "namespace")


def _limit_blas_threads(threads: int) -> None:
    """Scoring is a memory-bound matrix-vector product: one BLAS thread does it faster than
    two (measured: 12.6 vs 18.7 ms over 100k vectors) and leaves the other core to the
    embedding model. GM_BLAS_THREADS=0 leaves the process's BLAS settings alone."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")


def open(
    target: str | os.PathLike[str] = DEFAULT_DB,
    *,
    model_dir: str | os.PathLike[str] | None = None,
    **backend_options: Any,
) -> _Opening:
    """Open (creating and migrating as needed) a memory database: a SQLite file path, or a
    ``postgresql://`` URL for a database shared by several instances.

    Use it as ``async with gm.open("mem.db") as mem:`` (closes on exit) or
    ``mem = await gm.open("mem.db")`` (then ``await mem.close()``). ``model_dir`` (or
    ``GM_MODEL_DIR``) names a folder with ``model.onnx`` and ``tokenizer.json`` to use
    instead of the default all-MiniLM-L6-v2.
    """
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", os.fspath(target)) if isinstance(target, str) else None
    if scheme and not is_postgres_url(os.fspath(target)):
        raise InvalidInput(
            f"gm.open({target!r}): that is a {scheme[1]}:// URL, not a database; gm.open takes a SQLite file path "
            "or a postgresql:// URL. To use a running greatmemory server, use its client: `from gm.client "
            "import Client`, then `async with Client(url, api_key) as c: await c.add({'text': ...})`",
            path="target",
        )
    return _Opening(target, model_dir, backend_options)


class _Opening:
    """Awaitable and async context manager returned by :func:`open`."""

    def __init__(self, target: str | os.PathLike[str], model_dir: Any, options: dict[str, Any]) -> None:
        self.target = target
        self.model_dir = model_dir
        self.options = options
        self.store: Store | None = None

    def build(self) -> Store:
        settings = StoreSettings.load()  # a bad GM_* value fails here, before anything opens
        directory = self.model_dir or settings.model_dir
        model = ModelSpec.from_dir(directory) if directory else ModelSpec.default()
        text = os.fspath(self.target)
        options = dict(self.options)
        if settings.schema_cap is not None and "target_version" not in options:
            options["target_version"] = settings.schema_cap  # testing only: stands in for an older release
        options.setdefault("write_timeout", settings.write_timeout)
        if is_postgres_url(text):
            from gm.storage.postgres import PostgresBackend

            return Store(PostgresBackend(text, **options), model, settings)
        from gm.storage.sqlite import SQLiteBackend

        return Store(SQLiteBackend(Path(text), **options), model, settings)

    def __await__(self) -> Any:
        return self.__aenter__().__await__()

    def __getattr__(self, name: str) -> Any:
        if hasattr(Store, name):  # e.g. `mem = gm.open("mem.db"); await mem.add(...)`
            raise AttributeError(
                f"gm.open() returns an opener, not an open store, so it has no .{name}: write "
                f"`async with gm.open(...) as mem:` or `mem = await gm.open(...)`, then use mem.{name}"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> None:
        raise TypeError("gm.open() is asynchronous: write `async with gm.open(...) as mem:` (not `with`)")

    def __exit__(self, *exc: object) -> None:  # never reached: __enter__ refuses
        pass

    async def __aenter__(self) -> Store:
        self.store = self.build()
        try:
            return await self.store.open()
        except BaseException:
            await self.store.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self.store is not None:
            await self.store.close()
