"""The store: the embedded library's handle on a memory database. It validates inputs and
delegates: vectors to the Embedder, writes to the backend's Writer, searches to the Searcher.

Its rooms: the backend (gm.storage) holds the data, the Indexer (gm.indexer) the in-process
vector index, the Searcher (gm.search) the ranking, the Upkeep (gm.upkeep) the background
purge and context build. The HTTP server is a thin layer over the store.
"""

from __future__ import annotations

import builtins
import os
from datetime import datetime
from typing import Any

from gm import filters
from gm.config import StoreSettings
from gm.embedding import Embedder, ModelSpec
from gm.errors import InvalidInput, NotReady, StoreClosed
from gm.index import limit_blas_threads
from gm.index_memory import check_fits
from gm.indexer import Indexer
from gm.memory import MAX_BATCH, HistoryEntry, Memory, NewMemory, Page, SearchHit, Stats, now_ms
from gm.model_identity import model_of
from gm.readiness import Readiness, confirm, current_write_health
from gm.reembed import BATCH as REEMBED_BATCH
from gm.reembed import (
    ModelFollower,
    ProgressSink,
    Recorded,
    Reembed,
    ReembedReport,
    new_model,
    recorded,
    say_if_waiting,
)
from gm.reembed import end as end_reembed
from gm.search import Searcher, SearchRequest
from gm.storage.base import (
    UNSET,
    AddMemories,
    Backend,
    DeleteMemory,
    DeleteWhere,
    PurgeExpired,
    RecordModel,
    UpdateMemory,
    unknown_id,
)
from gm.upkeep import Upkeep
from gm.validation import (
    check_id,
    check_limit,
    check_min_score,
    check_mode,
    check_order,
    check_recency,
    check_scope,
    check_scope_value,
    check_text,
    check_time_range,
    new_memory,
    update_op,
)
from gm.vector_models import VectorModels

MAX_SEARCH_LIMIT = 100
MAX_LIST_LIMIT = 1000
MAX_REEMBED_BATCH = 1000  # memories a re-embed's write holds at most (the default, 64, keeps its commits short)


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
        self.settings = settings or StoreSettings.load()
        self.models = VectorModels(model, Embedder(model, threads=self.settings.embed_threads))
        self.following = ModelFollower(self)  # a switch another instance made (a shared database)
        self.indexer = Indexer(backend.vectors, backend.next_vectors, model.identity, self.following.soon,
                               database=backend.index_beside)
        self.searcher = Searcher(backend, self.models, self.indexer, self.following.wait)
        self.upkeep = Upkeep(backend, self.settings.purge_seconds, self.following.check if backend.shared else None)
        self._opened = False
        self._closed = False

    # -- life cycle -----------------------------------------------------------------

    async def open(self) -> Store:
        """Migrate and open the database, check the model; the model itself stays unloaded."""
        if self._closed:
            raise StoreClosed("the store is closed; open it again with gm.open()")
        limit_blas_threads(self.settings.blas_threads)
        await self.backend.open(self.indexer.apply, self.indexer.reload, self.indexer.native)
        self.models.identity = self.indexer.model = await self.backend.write(RecordModel(self.model.record()))
        if not self.backend.native_vectors:
            await check_fits(self.backend)
        await self.indexer.open(load=not self.backend.native_vectors)  # (the database may search vectors itself)
        self._opened = True
        self.upkeep.start()
        await say_if_waiting(self)
        return self

    async def close(self) -> None:
        """Finish queued writes and close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.upkeep.stop()
            await self.following.stop()
            await self.models.close()
            await self.indexer.stop_loading()
            await self.backend.close()  # its last batches still send index changes: the Indexer stops after it
            await self.indexer.save()
        finally:
            await self.indexer.stop()  # (which fails whoever still waits for the index)

    async def __aenter__(self) -> Store:
        if not self._opened:
            await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def model(self) -> ModelSpec:
        """The model of the vectors (it changes when a re-embed switches)."""
        return self.models.spec

    @property
    def embedder(self) -> Embedder:
        return self.models.embedder

    @property
    def vectors_model(self) -> str:
        """The identity the database records for its vectors."""
        return self.models.identity

    @property
    def closing(self) -> bool:
        return self._closed

    @property
    def ready(self) -> bool:
        return self._opened and not self._closed

    def readiness(self) -> Readiness:
        """Whether the store serves now (without asking the database: see :meth:`probe`)."""
        backend, error = self.backend, self.following.error or self.indexer.error
        if error is not None:
            phase, reason = "unavailable", error.message
        elif self.ready:
            phase, reason = "ready", None
        else:
            phase, reason = (backend.phase if backend.phase in ("starting", "migrating") else "starting"), None
        return Readiness(phase, reason, self.indexer.state, backend.name, backend.schema_version)

    async def probe(self) -> Readiness:
        """:meth:`readiness`, and when ready, whether the database answers and writes commit
        (readyz's question; see :func:`gm.readiness.confirm`)."""
        return await confirm(self.readiness(), self.backend)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed; open it again with gm.open()")
        if not self._opened:
            raise NotReady(f"the store is still {self.backend.phase}; try again shortly")

    async def wait_index(self) -> None:
        """Wait until the vector index holds every stored vector (searches do this themselves)."""
        await self.indexer.wait_loaded()

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
        return await self._add(items, now, items)

    async def _add(
        self, items: builtins.list[NewMemory], now: int, unembedded: builtins.list[NewMemory]
    ) -> builtins.list[tuple[Memory, bool]]:
        """Embed ``unembedded`` (each item with the next model too during a re-embed) and write all."""

        todo = [unembedded]

        async def embedded() -> AddMemories:
            model, following = await self.models.embed_items(items, todo[0])
            todo[0] = items  # (all embedded again, should a switch overtake the write)
            return AddMemories(items, now, model, following)

        added: builtins.list[tuple[Memory, bool]] = await self.models.write(self.backend, embedded, self.following.wait)
        return added

    async def add_prepared(self, items: builtins.list[NewMemory]) -> int:
        """Store memories validated by :func:`gm.validation.new_memory` all-or-nothing, as an
        import does: with their own ids, times and, when of the model's size, vectors; the
        others are embedded first. Returns how many had to be embedded."""
        self._check_open()
        if not items:
            return 0
        if len(items) > MAX_BATCH:
            raise InvalidInput(f"a batch holds at most {MAX_BATCH} memories; split it", path="memories")
        size = await self.embedder.dimensions() * 4
        missing = [item for item in items if len(item.vector) != size]
        await self._add(items, now_ms(), missing)
        return len(missing)

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
        op = update_op(id, _check_namespace(namespace), now_ms(), text, metadata, expires_at, occurred_at)
        if op.text is not None and await self.backend.get(id, op.now, op.namespace) is None:
            raise unknown_id(id)  # (spares the embedding; the Writer decides)

        async def embedded() -> UpdateMemory:
            if op.text is not None:
                op.vector, op.model, op.next_vector, op.next_model = await self.models.embed_text(op.text)
            return op

        memory: Memory = await self.models.write(self.backend, embedded, self.following.wait)
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
        return await self.backend.write(DeleteWhere(scope, filters.parse(filter), now_ms()))

    async def purge_expired(self) -> int:
        """Delete expired memories now (the store also does this every GM_PURGE_SECONDS)."""
        self._check_open()
        return await self.backend.write(PurgeExpired(now_ms()))

    # -- reads ----------------------------------------------------------------------

    async def get(self, id: str, *, namespace: str | None = None) -> Memory:
        """The memory with this id; raises :class:`gm.errors.NotFound` (also once expired,
        and, with ``namespace``, when it lies in another namespace)."""
        self._check_open()
        memory = await self.backend.get(check_id(id), now_ms(), _check_namespace(namespace))
        if memory is None:
            raise unknown_id(id)
        return memory

    async def get_by_ids(self, ids: builtins.list[str]) -> dict[str, Memory]:
        """The live memories among ``ids``, by id, in any namespace (what an import checks first)."""
        self._check_open()
        return await self.backend.get_by_ids([check_id(i) for i in ids], now_ms())

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
            model=model_of(self.vectors_model),
            database_bytes=await self.backend.database_size(),
            extra={
                "model_label": self.model.label,
                "model_loaded": self.embedder.loaded,
                "index_ready": self.indexer.state == "ready",
                "writes": self.backend.write_health(),
            },
        )

    # -- the model ------------------------------------------------------------------

    async def reembed(
        self, model_dir: str | os.PathLike[str] | None = None, *, progress: ProgressSink | None = None,
        batch: int = REEMBED_BATCH,
    ) -> ReembedReport:
        """Move the vectors to the model in ``model_dir`` (None: rebuild them with the current
        model, a reindex) while this store keeps serving; resumes one that was interrupted.
        ``progress`` hears how far it is; ``batch``: memories embedded and written at a time
        (1-1000). See :mod:`gm.reembed`.

        >>> await mem.reembed("/models/bge-small", progress=lambda p: print(p.line()))
        """
        self._check_open()
        batch = check_limit(batch, default=REEMBED_BATCH, maximum=MAX_REEMBED_BATCH, path="batch")
        spec = new_model(model_dir) if model_dir is not None else None
        return await Reembed(self, spec, progress, batch).run()

    async def end_reembed(self, *, drop_old: bool) -> bool:
        """``drop_old``: drop the vectors the last switch left behind (the later step of a
        re-embed); else cancel the re-embed under way. Whether there was anything to do."""
        self._check_open()
        return await end_reembed(self, drop_old=drop_old)

    async def reembed_recorded(self) -> Recorded:
        """What the database records: the re-embed under way (its model, how many memories
        have its vector; run by this store, another one, or interrupted) and the model whose
        vectors the last switch left until ``end_reembed(drop_old=True)``."""
        self._check_open()
        return await recorded(self.backend)

    async def write_health(self, *, probe: bool = False) -> dict[str, Any]:
        """How writes are going; see :func:`gm.readiness.current_write_health`."""
        return await current_write_health(self.backend, probe=probe)


def _check_namespace(namespace: Any) -> str | None:
    """A namespace constraint (None: any namespace)."""
    return check_scope_value(namespace, "namespace")

