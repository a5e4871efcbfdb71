"""The Indexer: the actor that alone owns the published in-process vector index, loads it
from the database and keeps it in step with committed writes; readiness is awaited here.

Its messages: :class:`Open` (the store opened), :class:`Apply` (a committed batch of index
changes, answered once applied: a Writer replies to its caller only after that, so a search
started after a write returns sees it), :class:`Reload` (a shared database's change feed lost
its place), :class:`Loaded` / :class:`LoadFailed` (the loader's results) and
:class:`StopLoading` (the store closes). A load fills a fresh :class:`VectorIndex` in a
sub-task, off the loop; meanwhile Apply's changes are buffered, then replayed onto it before
it is published. Searches read the published snapshot on worker threads, outside the
mailbox: VectorIndex publishes its arrays only once complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gm import heap, index_file, loops, vector_models, vector_plan
from gm.actor import Actor, Envelope
from gm.errors import ModelSwitched, StorageUnavailable, StoreClosed
from gm.index import VectorIndex
from gm.memory import Scope
from gm.storage.base import IndexChange, VectorRow

log = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0  # after a failed load; doubled after each failure, up to MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 30.0

VectorSource = Callable[[], AsyncIterator[list[VectorRow]]]  # a backend's vectors(): every stored vector


@dataclass(slots=True)
class Open:
    """The store opened: load the index (unless the change feed asked for a load already),
    or, with ``load`` False (the database searches vectors itself), be ready with none."""

    load: bool


@dataclass(slots=True)
class Apply:
    """A committed batch of changes (in commit order, each with its row's final state)."""

    changes: list[IndexChange]


@dataclass(slots=True)
class Reload:
    """Load afresh: a shared database's change feed fell behind the changes it keeps."""


@dataclass(slots=True)
class Loaded:
    """Load number ``load`` filled ``index`` (started at ``started``, a perf_counter)."""

    load: int
    index: VectorIndex
    started: float
    saved: bool = False  # read from the file saved beside the database


@dataclass(slots=True)
class LoadFailed:
    """Load number ``load`` failed; it is tried again after a pause."""

    load: int
    error: StorageUnavailable


@dataclass(slots=True)
class Prepare:
    """A re-embed to ``model`` is under way (gm.reembed): fill an index of the next vectors
    beside the published one, and keep it in step with them."""

    model: str


@dataclass(slots=True)
class NextLoaded:
    model: str
    index: VectorIndex | None  # None: the load failed (the re-embed prepares again)


@dataclass(slots=True)
class Promote:
    """The switch to ``model`` committed: its index is the published one from now on; the
    one before stays for the searches under way (their query has the old model's vector).
    If no index of it was prepared here, the switched vectors are loaded."""

    model: str


@dataclass(slots=True)
class DropRetired:
    """The searches embedded with the model before ``model``'s switch are done: its index goes."""

    model: str


@dataclass(slots=True)
class Discard:
    """The re-embed was cancelled: drop the next index."""


@dataclass(slots=True)
class StopLoading:
    """The store closes: end the load under way and start none (Apply still comes, from the
    last batches of the Writer, which stops after this and before the Indexer)."""


IndexMsg = (
    Open | Apply | Reload | Loaded | LoadFailed | StopLoading | Prepare | NextLoaded | Promote | DropRetired | Discard
)


async def _nothing() -> AsyncIterator[list[VectorRow]]:
    return
    yield  # (an async generator of no pages)


class Indexer(Actor[IndexMsg, None]):
    """Owns ``index``, the one searches read; see the module's docstring."""

    name = "indexer"

    def __init__(self, vectors: VectorSource, next_vectors: VectorSource | None = None, model: str = "",
                 on_unknown_model: Callable[[str], None] = lambda model: None, database: Path | None = None) -> None:
        super().__init__(max_batch=64)
        self.database = database  # a SQLite file: the index is saved beside it at close and read back at open
        self._saved = False  # the published index is as the saved file holds it (nothing to save)
        self._file_tried = False
        self.loaded_from: str | None = None  # where the published index came from: "file" or "database"
        self.vectors = vectors
        self.next_vectors = next_vectors or _nothing  # a re-embed's next vectors (gm.reembed)
        self.index = VectorIndex()  # published: searches read it; only this actor writes or replaces it
        self.model = model  # the identity of the model whose vectors ``index`` holds
        self.retired: tuple[str, VectorIndex] | None = None  # the index before the last switch
        self.next_model: str | None = None  # a re-embed's, while one is under way
        self.next_index: VectorIndex | None = None
        self._next_pending: list[IndexChange] | None = None  # next changes committed while it loads
        self._next_loader: asyncio.Task[None] | None = None
        self._next_ready = asyncio.Event()
        self._retire: asyncio.TimerHandle | None = None
        self.on_unknown_model = on_unknown_model  # changes of a model this instance does not use: it must follow
        self.error: StorageUnavailable | None = None  # why the last load failed, until one succeeds
        self.load_seconds: float | None = None  # how long the last load took, once one is published
        self._pending: list[IndexChange] | None = []  # changes committed while a load runs
        self._load = 0  # the number of the latest load: a result of an older one is stale
        self._loader: asyncio.Task[None] | None = None
        self._loading_stopped = False
        self._loaded = asyncio.Event()
        self._grower: asyncio.Task[None] | None = None  # adds new rows to the published index's graph
        self._growing = True  # until the store closes
        self._graph_holds = 0  # bulk writes under way that asked the graph to wait (hold_graph)
        self._outcome: asyncio.Future[None] | None = None  # what those waiting for readiness hear next

    # -- what other tasks call -------------------------------------------------------

    @contextlib.contextmanager
    def hold_graph(self) -> Iterator[None]:
        """While a bulk write runs (an import), the graph does not grow: both cores go to the
        writes (measured: bench/import_speed.py), the rows it lacks are scored exactly, and it
        catches up in the background once the last hold ends."""
        self._graph_holds += 1
        try:
            yield
        finally:
            self._graph_holds -= 1
            self._grow()

    async def open(self, *, load: bool) -> None:
        await self.ask(Open(load))

    async def apply(self, changes: list[IndexChange]) -> None:
        """The backends' ``on_commit``: returns once the index follows ``changes``."""
        await self.ask(Apply(changes))

    def reload(self) -> None:
        """The backends' ``on_reset`` (a callback: it cannot await)."""
        if not self._closing:
            self.tell(Reload())

    def native(self) -> None:
        """The backends' ``on_native``: the database searches vectors itself from now on
        (pgvector's backfill completed), so those waiting for the index wait no more."""
        if not self._closing:
            self.tell(Open(load=False))

    async def stop_loading(self) -> None:
        await self.ask(StopLoading())

    async def prepare(self, model: str) -> None:
        """Fill the next index for a re-embed to ``model``; returns once it is filled."""
        await self.ask(Prepare(model))
        await self._next_ready.wait()
        if self._closing:
            raise StoreClosed("the store is closed; open it again with gm.open()")
        if self.next_index is None or self.next_model != model:
            raise StorageUnavailable("the next model's vector index could not be loaded; the re-embed will retry")

    async def promote(self, model: str) -> None:
        await self.ask(Promote(model))

    async def discard(self) -> None:
        await self.ask(Discard())

    @property
    def state(self) -> str:
        """``ready`` (loaded, or nothing to load), ``failed`` (the last load failed; another
        follows) or ``loading``."""
        return "ready" if self._loaded.is_set() else "failed" if self.error is not None else "loading"

    async def wait_loaded(self) -> None:
        """Wait until the index holds every stored vector, through failed loads."""
        await self._loaded.wait()

    async def wait_ready(self) -> None:
        """Wait until the index holds every stored vector; while the last load failed (or
        when one fails meanwhile) raise why at once."""
        if self._loaded.is_set():
            return
        if self.error is not None:
            raise self.error
        if self._closing:
            raise StoreClosed("the store is closed; open it again with gm.open()")
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._outcome)  # (a waiter that gives up leaves it to the others)

    def index_of(self, model: str) -> VectorIndex:
        """The index of ``model``'s vectors: the published one, or the one before the last
        switch for a search whose query was embedded before it; ModelSwitched if neither."""
        if model == self.model or not model:
            return self.index
        if self.retired is not None and self.retired[0] == model:
            return self.retired[1]
        raise ModelSwitched(f"the vectors moved to model {self.model!r}; embed the query again")

    async def search(
        self, query: npt.NDArray[np.float32], scope: Scope, now: int, k: int, allowed: Iterable[int] | None,
        model: str = "",
    ) -> list[tuple[int, float]]:
        """The ``k`` best (rowid, cosine) pairs of the index of ``model`` (the query's), searched on a worker thread."""
        index = self.index_of(model)
        return await asyncio.to_thread(index.search, query, scope, now, k, allowed)

    def cosines(self, query: npt.NDArray[np.float32], rowids: Iterable[int], model: str = "") -> dict[int, float]:
        return self.index_of(model).cosines(query, rowids)

    @property
    def dim(self) -> int:
        return self.index.dim

    # -- the actor's own task --------------------------------------------------------

    async def handle(self, batch: list[Envelope[IndexMsg, None]]) -> None:
        for envelope in batch:  # one by one: a message that fails fails only its sender
            try:
                await self._take(envelope.msg)
            except Exception as exc:
                envelope.fail(exc)
            else:
                envelope.answer(None)

    async def _take(self, msg: IndexMsg) -> None:
        await self._follow(msg)
        if self.index.wasted and (self._loader is None or self._loader.done()) and self._loaded.is_set():
            self._start_load(serving=True)  # mostly dead slots: a fresh load, searched only once complete
        self._grow()

    async def _follow(self, msg: IndexMsg) -> None:
        match msg:
            case Apply(changes):
                self._apply(changes)
            case Prepare(model):
                self._prepare(model)
            case NextLoaded(model, index) if model == self.next_model:
                if index is not None:
                    index.apply(self._next_pending or [])
                    self.next_index = index
                    log.info("next model's vector index loaded: %d memories", len(index))
                else:
                    self.next_model = None
                self._next_pending = None
                self._next_ready.set()
            case Promote(model):
                self._promote(model)
            case DropRetired(model) if model == self.model:
                self.retired = None
            case Discard():
                await self._drop_next()
            case Loaded(load, index, started, saved) if load == self._load:
                replayed = bool(self._pending)  # (changes committed while it loaded: the file lacks them)
                self._publish(index, started)
                self._saved = saved and not replayed
                self.loaded_from = "file" if saved else "database"
            case LoadFailed(load, error) if load == self._load:
                self.error = error
                self._settle()
            case Reload():
                self._start_load()
            case Open(load=False):
                await loops.stop(self._loader)  # (a load under way is not needed any more)
                self._loader = None
                self._pending = None
                self.error = None
                self._loaded.set()
                self._settle()
            case Open() if self._loader is None:
                self._start_load()
            case StopLoading():
                self._loading_stopped = True
                await loops.stop(self._loader)

    def _apply(self, changes: list[IndexChange]) -> None:
        if changes:
            self._saved = False
        self._split(changes)

    def _split(self, changes: list[IndexChange]) -> None:
        """Each change to the index of its model's vectors; one of no model's (a removal, a new
        expiry) to both."""
        current: list[IndexChange] = []
        following: list[IndexChange] = []
        for change in changes:
            if change.model == self.model or not change.model:
                current.append(change)
            if self.next_model is not None and (change.model == self.next_model or not change.model):
                following.append(change)
            elif change.model and change.model != self.model and not (self.retired and change.model == self.retired[0]):
                self.on_unknown_model(change.model)  # another instance switched: this one must follow
        if self._pending is not None:
            self._pending.extend(current)
        if self._pending is None or self._loaded.is_set():  # (a load that replaces a served index)
            self.index.apply(current)
        if self._next_pending is not None:
            self._next_pending.extend(following)
        elif self.next_index is not None:
            self.next_index.apply(following)

    def _prepare(self, model: str) -> None:
        if self.next_model == model and (self.next_index is not None or self._next_loader is not None
                                         and not self._next_loader.done()):
            return  # (already prepared, or under way)
        if self._next_loader is not None:
            self._next_loader.cancel()
        self.next_model, self.next_index, self._next_pending = model, None, []
        self._next_ready.clear()
        self._next_loader = asyncio.get_running_loop().create_task(self._fill_next(model), name="gm-next-index-load")

    async def _fill_next(self, model: str) -> None:
        index = VectorIndex()
        try:
            async for rows in self.next_vectors():
                await asyncio.to_thread(index.load, rows)  # nobody else holds this index yet
        except Exception:
            log.exception("loading the next model's vector index failed")
            self._report_next(NextLoaded(model, None))
            return
        self._report_next(NextLoaded(model, index))

    def _report_next(self, msg: NextLoaded | DropRetired) -> None:
        if not self._closing:
            self.tell(msg)

    def _promote(self, model: str) -> None:
        if model == self.model:
            return
        self.retired = (self.model, self.index)
        if self._retire is not None:
            self._retire.cancel()
        grace = vector_models.OLD_MODEL_GRACE_SECONDS  # (as long as the old model answers the searches under way)
        self._retire = asyncio.get_running_loop().call_later(grace, self._report_next, DropRetired(model))
        self.model = model
        if self.next_model == model and self.next_index is not None and self._next_pending is None:
            self.index = self.next_index
        else:  # nothing prepared (another instance re-embedded): load the switched vectors
            self._start_load()
        self.next_model, self.next_index, self._next_pending = None, None, None
        log.info("vectors switched to model %s", model)

    async def _drop_next(self) -> None:
        await loops.stop(self._next_loader)
        self._next_loader = None
        self.next_model, self.next_index, self._next_pending = None, None, None
        self._next_ready.set()

    def _grow(self) -> None:
        """Have the graph of the published index catch up with its rows, in the background."""
        if (self._grower is None or self._grower.done()) and self.index.graph_backlog() > 0 and self._growing \
                and not self._graph_holds:
            self._grower = asyncio.get_running_loop().create_task(self._grow_graph(), name="gm-index-graph")

    async def _grow_graph(self) -> None:
        """Add rows to the graph a chunk at a time, off the loop; searches score the rows it
        does not hold yet exactly, and use it once few are left (gm.index)."""
        try:
            while self._growing and not self._graph_holds and (backlog := (index := self.index).graph_backlog()) > 0:
                self._saved = False
                # A long backlog (a load) takes both cores; after that, one, beside the model.
                await asyncio.to_thread(index.grow_graph, 2 if backlog > vector_plan.EXACT_MAX_ROWS else 1)
        except Exception:
            log.exception("growing the vector index's graph failed; searches score its rows exactly")

    async def on_stop(self) -> None:
        self._next_ready.set()  # (whoever waits for the next index hears the store closed)
        self._growing = False
        await loops.stop(self._grower)
        if self._retire is not None:
            self._retire.cancel()
        await loops.stop(self._next_loader)
        await loops.stop(self._loader)
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(StoreClosed("the store is closed; open it again with gm.open()"))

    def _start_load(self, *, serving: bool = False) -> None:
        """Load afresh; with ``serving``, the published index answers until the new one is
        complete (it follows the writes meanwhile too)."""
        if self._loading_stopped:
            return
        if self._loader is not None:
            self._loader.cancel()  # superseded: should its cancellation be lost, its result is stale
        self._load += 1
        self._pending = []
        if not serving:
            self._loaded.clear()
        self._loader = asyncio.get_running_loop().create_task(self._fill(self._load), name="gm-index-load")

    def _publish(self, index: VectorIndex, started: float) -> None:
        index.apply(self._pending or [])  # replaying in order is idempotent: each change carries its final state
        self._pending = None
        self.index = index
        self.error = None
        self._loaded.set()
        self._settle()
        self.load_seconds = time.perf_counter() - started
        log.info("vector index loaded: %d memories in %.2fs", len(index), self.load_seconds)

    def _settle(self) -> None:
        """Tell those waiting for readiness: loaded, or why the load failed."""
        outcome, self._outcome = self._outcome, None
        if outcome is None or outcome.done():
            return
        if self.error is None or self._loaded.is_set():
            outcome.set_result(None)
        else:
            outcome.set_exception(self.error)

    async def _fill(self, load: int) -> None:
        """The loader: fill a fresh index from the database and post it back; after a
        failure (the database went away) post why, and try again with backoff."""
        delay = FIRST_RETRY_SECONDS
        while True:
            started = time.perf_counter()
            index = VectorIndex()
            try:
                if (saved := await self._read_file()) is not None:
                    self._report(Loaded(load, saved, started, saved=True))
                    return
                async for rows in self.vectors():
                    await asyncio.to_thread(index.load, rows)  # nobody else holds this index yet
                await asyncio.to_thread(heap.trim)  # (the rows read from the database, freed)
            except Exception as exc:
                log.exception("loading the vector index failed; retrying in %.0fs", delay)
                self._report(LoadFailed(load, StorageUnavailable(f"the vector index could not be loaded: {exc}")))
                await loops.pause(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                if load != self._load or self._loading_stopped:
                    return  # superseded or stopped (should its cancellation have been lost, see gm.loops)
                continue
            self._report(Loaded(load, index, started))
            return

    async def _read_file(self) -> VectorIndex | None:
        """The index saved at the last close, at the first load only (a later one reloads
        because the index went stale or wasted)."""
        if self.database is None or self._file_tried:
            return None
        self._file_tried = True
        return await asyncio.to_thread(index_file.load, self.database, self.model)

    async def save(self) -> None:
        """Save the published index beside the database (the store closes: the Writer has
        stopped), unless it is just as saved; a failure is logged, never raised."""
        self._growing = False  # (the graph's chunk under way ends first: a save must not race it)
        if self._grower is not None:
            await asyncio.gather(self._grower, return_exceptions=True)
        if self.database is None or self._saved or not self._loaded.is_set() or self._pending is not None:
            return
        try:
            await asyncio.to_thread(index_file.save, self.index, self.database, self.model)
            self._saved = True
        except Exception:
            log.exception("saving the vector index beside %s failed; the next open loads it from the database",
                          self.database)

    def _report(self, msg: Loaded | LoadFailed) -> None:
        if not self._closing:
            self.tell(msg)
