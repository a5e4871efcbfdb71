"""The in-process vector index: every live memory's vector quantised to int8 in one matrix,
with its scope and expiry beside it, and once it is large an HNSW graph (usearch) over it.

A query is planned (gm.vector_plan): the rows its scope and filter allow are scored exactly
when they are few, else the graph proposes candidates and the allowed ones are kept. Either
way the scores are int8 approximations; the Searcher rescores the best with the stored
float32 vectors (gm.search), so what it returns is exact cosines.

Only the Indexer (gm.indexer) writes it: its loader fills a fresh one that nobody else holds
yet, then the published one follows each committed batch, and a background task of the
Indexer adds the new rows to the graph. Searches run on worker threads against a snapshot:
the published arrays and the row count they carry. Appends fill a row before counting it and
growth builds new arrays completely before publishing them, so a running search never sees a
torn or missing row. A row keeps its slot for the index's life (the graph knows rows by
slot): a changed vector takes a new slot, and an index mostly of dead slots is loaded afresh.

A graph read back from its file stays a read-only view of it (no memory of the process's own):
the rows added since go into a second, smaller graph, the delta, and a search walks both.
Copying the view into memory to grow it instead cost a 1M-memory server taking writes 532 MiB.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from usearch.index import Index as Graph

from gm import vector_plan
from gm.memory import Scope
from gm.storage.base import IndexChange, VectorRow

Vec = npt.NDArray[np.int64]  # slots
NEVER = np.iinfo(np.int64).max
_FIELDS = ("namespace", "user_id", "agent_id", "session_id")

GRAPH_MIN_ROWS = vector_plan.EXACT_MAX_ROWS  # below this many live rows exact scoring is as fast: no graph
CONNECTIVITY = 16  # the graph's links per node (usearch's default)
EXPANSION_ADD = 128  # 64 builds twice as fast but recall@10 at 100k (ef 192, rescored) falls from .999 to .970
# How far a search looks, by the graph's size: recall@10 after rescoring on bench/peers_data.py's
# vectors (2,760 real embeddings, each perturbed into hundreds of near neighbours) at 100k with
# 192: .9935 (128: .9695); at 1M, 192: .84, 384: .94, 768: .965, 1024: .977, 1536: .994
# (2.8, 3.2, 4.6 ms for the last three, rescoring included, on an idle machine).
EXPANSION_SEARCH = 192
EXPANSION_SEARCH_MAX = 1024
ROWS_PER_EXPANSION = 976  # 1M rows: 1024
# Rows a graph read back as a view of its file lets wait before they go into a delta graph in
# memory: scored exactly beside its candidates meanwhile (4,096 rows: ~0.3 ms a search).
VIEW_BACKLOG = 4096
SCORE_BLOCK = 512  # rows scored exactly at a time (192 KiB of float32)
GRAPH_CHUNK = 256  # rows added to the graph at a time: the lock searches wait on is held that long
# A unit vector's components rarely pass 6/sqrt(dim) (MiniLM: 0.28 at most, 5.5/sqrt(384)):
# the int8 scale when no batch of data is there to measure it.
DEFAULT_SPREAD = 6.0


@dataclass
class _Arrays:
    vectors: npt.NDArray[np.int8]
    rowids: npt.NDArray[np.int64]
    live: npt.NDArray[np.bool_]
    expires: npt.NDArray[np.int64]
    scope: npt.NDArray[np.int32]  # one column per scope field; -1 = not set
    count: int = 0  # rows in use (live or not); rows past it are not yet written


@dataclass
class IndexState:
    """What an index is made of, as gm.index_file saves and reads it (arrays up to ``count``
    or longer; ``codes``: each scope field's values, in code order)."""

    dim: int
    scale: float | None
    count: int
    graphed: int
    codes: list[list[str]]
    graph: Graph | None
    vectors: npt.NDArray[np.int8]
    rowids: npt.NDArray[np.int64]
    live: npt.NDArray[np.bool_]
    expires: npt.NDArray[np.int64]
    scope: npt.NDArray[np.int32]
    graph_file: tuple[str, int] | None = None  # (name, CRC) of the file ``graph`` is a read-only view of
    graph_vectors: GraphVectors | None = None  # that file's copy of the vectors, and which row is each slot's
    delta: Graph | None = None  # the graph of the rows from ``delta_start`` on, while ``graph`` is a view
    delta_start: int = 0
    delta_file: tuple[str, int] | None = None  # (name, CRC) of the file ``delta`` is a read-only view of


@dataclass(frozen=True)
class GraphVectors:
    """The int8 vectors a graph file read back holds (usearch keeps each vector it links, in
    the order it was added), mapped once for both: the graph's walk reads them, and exact
    scoring reads a slot's from here too (``rows[slot]``; -1: not there, or past ``rows``)
    rather than the index's own copy. The pages either touches count once in resident
    memory, not twice (at 1M memories the two copies held 366 MiB each)."""

    block: npt.NDArray[np.int8]  # one row a vector the graph holds, a view of the file's mapping
    rows: npt.NDArray[np.intp]  # slot -> its row in ``block``, for the slots below len(rows)

    def rows_of(self, slots: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
        """Each slot's row in ``block`` (-1: not there)."""
        at = np.full(len(slots), -1, dtype=np.intp)
        inside = slots < len(self.rows)
        at[inside] = self.rows[slots[inside]]
        return at

    def take(self, vectors: npt.NDArray[np.int8], slots: npt.NDArray[np.int64],
             at: npt.NDArray[np.intp]) -> npt.NDArray[np.int8]:
        """The int8 vectors of ``slots`` (at block rows ``at``): from the block where it holds
        them, else from ``vectors``."""
        held = at >= 0
        out = np.empty((len(slots), self.block.shape[1]), dtype=np.int8)
        out[held] = self.block[at[held]]
        out[~held] = vectors[slots[~held]]
        return out


def _copy_rows(source: _Arrays | IndexState, target: _Arrays, n: int) -> None:
    """The first ``n`` rows of every array, each keeping its slot."""
    target.vectors[:n] = source.vectors[:n]
    target.rowids[:n] = source.rowids[:n]
    target.live[:n] = source.live[:n]
    target.expires[:n] = source.expires[:n]
    target.scope[:n] = source.scope[:n]


class _Slots:
    """The slots of one scope value (live or not), appended in order; published like _Arrays."""

    __slots__ = ("slots", "count")

    def __init__(self) -> None:
        self.slots = np.empty(16, dtype=np.int64)
        self.count = 0

    def extend(self, slots: npt.NDArray[np.int64]) -> None:
        end = self.count + len(slots)
        if end > len(self.slots):
            grown = np.empty(max(end, 2 * len(self.slots)), dtype=np.int64)
            grown[: self.count] = self.slots[: self.count]
            self.slots = grown
        self.slots[self.count : end] = slots
        self.count = end

    def view(self) -> npt.NDArray[np.int64]:
        count = self.count  # (read first: a growth meanwhile publishes a copy holding these)
        return self.slots[:count]


class _RowSlots:
    """rowid -> slot. Rows that come in rowid order (a load, an import, every new memory) go
    into two sorted arrays, 16 bytes a row; a row that comes again (an old rowid's new vector)
    goes into a dict. A slot the arrays give is current only while it is live (its row was
    not removed or added again meanwhile). At 1M rows: 16 MB built in tens of ms at open,
    where a dict took about 100 MB and 0.5-0.9 s. Written by the Indexer's task; read by
    worker threads, which see the arrays as one published tuple."""

    def __init__(self, rowids: Vec | None = None, slots: Vec | None = None) -> None:
        if rowids is None or slots is None:
            rowids, slots = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        elif len(rowids) > 1 and not bool(np.all(rowids[1:] > rowids[:-1])):  # (rows added again before a save)
            order = np.argsort(rowids, kind="stable")
            rowids, slots = rowids[order], slots[order]
        self._sorted: tuple[Vec, Vec, int] = (rowids, slots, len(rowids))
        self._other: dict[int, int] = {}

    def __len__(self) -> int:
        return self._sorted[2] + len(self._other)

    def _last(self) -> int:
        rowids, _, n = self._sorted
        return int(rowids[n - 1]) if n else -1

    def extend(self, rowids: Vec, slots: Vec) -> None:
        """Map ``rowids`` (none mapped now) to ``slots``."""
        ascending = len(rowids) == 1 or bool(np.all(rowids[1:] > rowids[:-1]))
        if len(rowids) and int(rowids[0]) > self._last() and ascending:
            old_rowids, old_slots, n = self._sorted
            end = n + len(rowids)
            if end > len(old_rowids):  # (grown into new arrays: a reader keeps the tuple it took)
                size = max(end, 2 * len(old_rowids), 1024)
                grown_rowids, grown_slots = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
                grown_rowids[:n], grown_slots[:n] = old_rowids[:n], old_slots[:n]
                old_rowids, old_slots = grown_rowids, grown_slots
            old_rowids[n:end], old_slots[n:end] = rowids, slots
            self._sorted = (old_rowids, old_slots, end)
        else:
            self._other.update(zip(rowids.tolist(), slots.tolist(), strict=True))

    def get(self, rowid: int, live: npt.NDArray[np.bool_]) -> int | None:
        slot = self._other.get(rowid)
        if slot is not None:
            return slot
        rowids, slots, n = self._sorted
        at = int(np.searchsorted(rowids[:n], rowid))
        if at < n and int(rowids[at]) == rowid:
            slot = int(slots[at])
            return slot if live[slot] else None
        return None

    def pop(self, rowid: int, live: npt.NDArray[np.bool_]) -> int | None:
        """The current slot of ``rowid``, unmapped (the caller marks it dead), or None."""
        slot = self._other.pop(rowid, None)
        return slot if slot is not None else self.get(rowid, live)

    def many(self, rowids: list[int], live: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
        """(rowid, slot) for each of ``rowids`` mapped now, in their order."""
        sorted_rowids, slots, n = self._sorted
        asked = np.asarray(rowids, dtype=np.int64)
        at = np.minimum(np.searchsorted(sorted_rowids[:n], asked), max(n - 1, 0))
        hit = (sorted_rowids[at] == asked) if n else np.zeros(len(asked), dtype=np.bool_)
        found = np.where(hit, slots[at] if n else 0, -1)
        pairs = []
        for rowid, slot in zip(rowids, found.tolist(), strict=True):
            other = self._other.get(rowid)
            if other is not None:
                pairs.append((rowid, other))
            elif slot >= 0 and live[slot]:
                pairs.append((rowid, slot))
        return pairs


class VectorIndex:
    """Cosine search over the vectors of live memories, restricted to a scope."""

    def __init__(self, dim: int = 384, capacity: int = 1024) -> None:
        self.dim = dim
        self.live_count = 0
        self.scale: float | None = None  # int8 value = round(component * scale), set by the first vectors
        self._a = self._allocate(capacity)
        self._slot = _RowSlots()
        self._codes: list[dict[str, int]] = [{} for _ in _FIELDS]
        self._slots: list[dict[int, _Slots]] = [{} for _ in _FIELDS]
        self._sizes: list[dict[int, int]] = [{} for _ in _FIELDS]  # live rows per scope value
        self._graph: Graph | None = None
        self._graphed = 0  # slots below this are in the graph (the live ones, as they were)
        self._graph_file: tuple[str, int] | None = None  # while the graph is a view of a saved file
        self._graph_vectors: GraphVectors | None = None  # a saved graph file's vectors (it stays mapped)
        # The rows added after a view was read back go into a second graph of their own (the
        # slots from its start on): the view, most of the index, is never copied into memory.
        self._delta: tuple[Graph, int] | None = None  # (graph, first slot)
        self._delta_file: tuple[str, int] | None = None  # while the delta is a view of a saved file too
        self._graph_lock = threading.Lock()  # the graphs grow while searches read them: one at a time

    def state(self) -> IndexState:
        """Its contents, for a save (of a quiescent index: nothing writes it meanwhile)."""
        a = self._a
        delta, delta_start = self._delta if self._delta is not None else (None, 0)
        return IndexState(self.dim, self.scale, a.count, self.graphed, [list(codes) for codes in self._codes],
                          self._graph, a.vectors, a.rowids, a.live, a.expires, a.scope, self._graph_file,
                          delta=delta, delta_start=delta_start, delta_file=self._delta_file)

    @classmethod
    def from_state(cls, state: IndexState) -> VectorIndex:
        """An index of a saved state (gm.index_file). Arrays with room past ``count`` are used as
        they are (the file's copy-on-write mappings: nothing is copied); others are copied into
        arrays with room to grow. A graph that is a view of its file stays one until enough
        rows wait for it (:meth:`graph_backlog`)."""
        n = state.count
        if len(state.rowids) > n:
            index = cls(state.dim, capacity=0)
            index._a = _Arrays(state.vectors, state.rowids, state.live, state.expires, state.scope, n)
        else:
            index = cls(state.dim, capacity=with_room(n))
            _copy_rows(state, index._a, n)
            index._a.count = n
        index.scale = state.scale
        a = index._a
        for field, values in enumerate(state.codes):
            for value in values:
                index._intern(field, value)
        live = np.flatnonzero(a.live[:n])
        index._file(live, a.scope[live])
        index._slot = _RowSlots(a.rowids[live], live.astype(np.int64))
        index.live_count = len(live)
        index._graph, index._graphed = state.graph, state.graphed if state.graph is not None else 0
        index._graph_file = state.graph_file if state.graph is not None else None
        index._graph_vectors = state.graph_vectors if state.graph is not None else None
        if state.graph is not None and state.delta is not None:
            index._delta, index._delta_file = (state.delta, state.delta_start), state.delta_file
        return index

    def _allocate(self, capacity: int) -> _Arrays:
        return _Arrays(
            np.zeros((capacity, self.dim), dtype=np.int8),
            np.zeros(capacity, dtype=np.int64),
            np.zeros(capacity, dtype=np.bool_),
            np.full(capacity, NEVER, dtype=np.int64),
            np.full((capacity, len(_FIELDS)), -1, dtype=np.int32),
        )

    def __len__(self) -> int:
        return self.live_count

    @property
    def count(self) -> int:
        return self._a.count

    @property
    def graphed(self) -> int:
        """Slots the graph covers (searches score the rest exactly)."""
        return self._graphed if self._graph is not None else 0

    @property
    def nbytes(self) -> int:
        """The memory its arrays and graph hold, allocated rows included (for /metrics); mapped
        from the saved file or not (a view's whole file)."""
        a = self._a
        arrays = a.vectors.nbytes + a.rowids.nbytes + a.live.nbytes + a.expires.nbytes + a.scope.nbytes
        slots = sum(s.slots.nbytes for field in self._slots for s in field.values())
        graph = 0 if self._graph is None else \
            self._graph.serialized_length if self._graph_file is not None else self._graph.memory_usage
        if self._delta is not None:
            delta = self._delta[0]
            graph += delta.serialized_length if self._delta_file is not None else delta.memory_usage
        return int(arrays + slots + graph)

    @property
    def wasted(self) -> bool:
        """Most slots are dead (removed or replaced rows): a fresh load would be far smaller."""
        return self._a.count > 2 * max(self.live_count, GRAPH_MIN_ROWS)

    # -- writes (the Indexer's task only) --------------------------------------------

    def _intern(self, field: int, value: str) -> int:
        codes = self._codes[field]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
            self._slots[field][code] = _Slots()
            self._sizes[field][code] = 0
        return code

    def _codes_of(self, scope: Scope) -> list[int]:
        values = (scope.namespace, scope.user_id, scope.agent_id, scope.session_id)
        return [-1 if value is None else self._intern(field, value) for field, value in enumerate(values)]

    def _reserve(self, extra: int) -> None:
        """Make room for ``extra`` rows; publishes the grown arrays only once complete (every
        row keeps its slot)."""
        old = self._a
        if old.count + extra <= len(old.rowids):
            return
        new = self._allocate(max(old.count + extra, 2 * len(old.rowids)))
        new.count = old.count
        _copy_rows(old, new, old.count)
        self._a = new

    def _fit(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.int8]:
        """``vectors`` (one per row) in int8; the first ones set the dimension and scale."""
        dim = vectors.shape[1]
        if dim != self.dim:
            if self._a.count:
                raise ValueError(f"vector of {dim} dimensions in an index of {self.dim}")
            self.dim = dim
            self._a = self._allocate(len(self._a.rowids))
        if self.scale is None:
            spread = float(np.abs(vectors).max()) * 1.1 if len(vectors) >= 100 else DEFAULT_SPREAD / math.sqrt(dim)
            self.scale = 127.0 / (spread or 1.0)
        quantised: npt.NDArray[np.int8] = np.clip(np.rint(vectors * self.scale), -127, 127).astype(np.int8)
        return quantised

    def _file(self, slots: npt.NDArray[np.int64], codes: npt.NDArray[np.int32]) -> None:
        """Count new live ``slots`` (of these scope ``codes``) under their scope values."""
        for field in range(len(_FIELDS)):
            column = codes[:, field]
            order = np.argsort(column, kind="stable")
            values, starts = np.unique(column[order], return_index=True)
            ends = [*starts[1:], len(order)]
            for value, start, end in zip(values.tolist(), starts.tolist(), ends, strict=True):
                if value >= 0:
                    self._slots[field][value].extend(slots[order[start:end]])
                    self._sizes[field][value] += end - start

    def add(self, rowid: int, vector: bytes | npt.NDArray[np.float32], scope: Scope, expires_at: int | None) -> None:
        """Add (or replace) the vector of ``rowid``."""
        row = np.frombuffer(vector, dtype=np.float32) if isinstance(vector, bytes) else vector
        quantised = self._fit(row.reshape(1, -1))
        self.remove(rowid)
        self._reserve(1)
        a = self._a
        slot = a.count
        codes = np.array([self._codes_of(scope)], dtype=np.int32)
        a.vectors[slot] = quantised[0]
        a.rowids[slot] = rowid
        a.expires[slot] = NEVER if expires_at is None else expires_at
        a.scope[slot] = codes[0]
        a.live[slot] = True
        self._file(np.array([slot], dtype=np.int64), codes)
        self._slot.extend(np.array([rowid], dtype=np.int64), np.array([slot], dtype=np.int64))
        a.count = slot + 1  # counted only once written
        self.live_count += 1

    def load(self, rows: list[VectorRow]) -> None:
        """Add many rows at once (the bulk path of opening a store; blocking)."""
        if not rows:
            return
        quantised = self._fit(np.frombuffer(b"".join(r.vector for r in rows), dtype=np.float32).reshape(len(rows), -1))
        for row in rows:
            self.remove(row.rowid)
        self._reserve(len(rows))
        a = self._a
        start, end = a.count, a.count + len(rows)
        codes = np.array([self._codes_of(r.scope) for r in rows], dtype=np.int32).reshape(len(rows), len(_FIELDS))
        a.vectors[start:end] = quantised
        a.rowids[start:end] = [r.rowid for r in rows]
        a.expires[start:end] = [NEVER if r.expires_at is None else r.expires_at for r in rows]
        a.scope[start:end] = codes
        a.live[start:end] = True
        self._file(np.arange(start, end, dtype=np.int64), codes)
        self._slot.extend(a.rowids[start:end].copy(), np.arange(start, end, dtype=np.int64))
        a.count = end
        self.live_count += len(rows)

    def remove(self, rowid: int) -> None:
        slot = self._slot.pop(rowid, self._a.live)
        if slot is not None:
            self._a.live[slot] = False
            self.live_count -= 1
            for field, code in enumerate(self._a.scope[slot].tolist()):
                if code >= 0:
                    self._sizes[field][code] -= 1

    def apply(self, changes: Iterable[IndexChange]) -> None:
        """Follow a committed batch of writes; a run of adds goes in as one :meth:`load` (an
        import's batches of 1,000: 71.6 -> 3.4 us a row, measured)."""
        adds: dict[int, VectorRow] = {}
        for change in changes:
            if not change.remove and change.vector is not None and change.scope is not None:
                if change.rowid in adds:  # (a row twice in one run: its first vector goes in first)
                    self.load(list(adds.values()))
                    adds.clear()
                adds[change.rowid] = VectorRow(change.rowid, change.scope, change.expires_at, change.vector)
                continue
            if adds:
                self.load(list(adds.values()))
                adds.clear()
            if change.remove:
                self.remove(change.rowid)
            else:
                slot = self._slot.get(change.rowid, self._a.live)
                if slot is not None:
                    self._a.expires[slot] = NEVER if change.expires_at is None else change.expires_at
        if adds:
            self.load(list(adds.values()))

    # -- the graph (the Indexer's background task, on a worker thread) -----------------

    def graph_backlog(self) -> int:
        """Rows still to add to the graph: 0 while the index is too small to want one, and while
        fewer than VIEW_BACKLOG wait for graphs that are views of saved files (searches score
        them exactly; a view costs no memory of the process's own)."""
        if self._graph is None and self.live_count < GRAPH_MIN_ROWS:
            return 0
        backlog = self._a.count - self._graphed
        viewed = self._graph_file is not None and (self._delta is None or self._delta_file is not None)
        return 0 if viewed and backlog < VIEW_BACKLOG else backlog

    def grow_graph(self, threads: int = 1) -> int:
        """Add the next rows (at most GRAPH_CHUNK) to the graph; how many slots it covered.
        While the graph is a view of its file, they go to the delta graph instead, which is
        first copied into memory if it is a view too (it holds only the rows added since the
        graph was saved: usearch's copy lets other threads run, searches use the view meanwhile);
        unless more rows wait than the view holds: then the view is copied and grows, as the
        delta would hold most of the index and exact scoring of its rows could not read the
        graph file's vectors."""
        a = self._a
        start = self._graphed
        end = min(a.count, start + GRAPH_CHUNK)
        if end <= start:
            return 0
        if self._delta is not None and self._delta_file is not None:
            writable = self._delta[0].copy()
            with self._graph_lock:
                self._delta, self._delta_file = (writable, self._delta[1]), None
        if self._graph is None:
            self._graph = self._new_graph()
        elif self._graph_file is not None and self._delta is None:
            if a.count - start > len(self._graph):  # the delta would outgrow the view (a graph saved mid-import):
                writable = self._graph.copy()  # grow the view's copy instead (the next save is one graph again)
                with self._graph_lock:
                    self._graph, self._graph_file, self._graph_vectors = writable, None, None
            else:
                self._delta = (self._new_graph(), start)  # (published with its start: searches read both at once)
        target = self._graph if self._delta is None else self._delta[0]
        slots = np.arange(start, end, dtype=np.int64)[a.live[start:end]]
        if len(slots):
            with self._graph_lock:
                target.add(slots, a.vectors[slots], threads=threads)
        self._graphed = end
        return end - start

    def _new_graph(self) -> Graph:
        return Graph(ndim=self.dim, metric="cos", dtype="i8", connectivity=CONNECTIVITY,
                     expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)

    # -- reads (worker threads) -----------------------------------------------------

    def cosines(self, query: npt.NDArray[np.float32], rowids: Iterable[int]) -> dict[int, float]:
        """The (int8-approximate) cosine of ``query`` with each of ``rowids`` the index holds."""
        a = self._a
        pairs = self._slot.many(list(rowids), a.live)
        if not pairs:
            return {}
        scores = self._scores(a, np.array([slot for _, slot in pairs], dtype=np.int64), query)
        return {rowid: float(score) for (rowid, _), score in zip(pairs, scores, strict=True)}

    def _scores(self, a: _Arrays, slots: Vec, query: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """int8 rows times the query, SCORE_BLOCK rows at a time: each block's float32 copy stays
        in the cache (one user of 1M, 10k rows: 0.99 -> 0.63 ms, measured). The query is rounded
        to integers as large as keep every sum of products below 2**24 (±343 at 384 dimensions,
        2.7 times finer than int8): every sum is exact in float32 whatever the order BLAS adds
        in, so a row scores the same whichever rows it is scored with (exact scan, graph
        candidates, tail), and near-ties fall the same way on every path."""
        steps = max(1, (2**24 - 1) // (127 * a.vectors.shape[1]))
        unit = (self.scale or 1.0) * steps / 127.0
        query = np.clip(np.rint(query * unit), -steps, steps).astype(np.float32)
        scores = np.empty(len(slots), dtype=np.float32)
        block = np.empty((min(SCORE_BLOCK, len(slots)), a.vectors.shape[1]), dtype=np.float32)
        vectors = self._graph_vectors
        at = vectors.rows_of(slots) if vectors is not None else None
        held = at is not None and bool((at >= 0).all())  # (every row from the block: no mixing)
        for start in range(0, len(slots), SCORE_BLOCK):
            end = start + SCORE_BLOCK
            if vectors is None or at is None:  # (one is None only with the other)
                rows = a.vectors[slots[start:end]]
            elif held:
                rows = vectors.block[at[start:end]]
            else:
                rows = vectors.take(a.vectors, slots[start:end], at[start:end])
            floats = block[: len(rows)]
            np.copyto(floats, rows, casting="unsafe")
            np.dot(floats, query, out=scores[start : start + len(rows)])
        scores /= np.float32(unit * (self.scale or 1.0))
        return scores

    def _quantise(self, query: npt.NDArray[np.float32]) -> npt.NDArray[np.int8]:
        quantised: npt.NDArray[np.int8] = np.clip(np.rint(query * (self.scale or 1.0)), -127, 127).astype(np.int8)
        return quantised

    def search(
        self,
        query: npt.NDArray[np.float32],
        scope: Scope,
        now: int,
        k: int,
        allowed: Iterable[int] | None = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` best (rowid, cosine) pairs among live, unexpired vectors in ``scope``
        (and among ``allowed`` rowids if given), best first, by int8-approximate cosine.
        Blocking: run it off the loop."""
        a = self._a
        if a.count == 0 or k <= 0:
            return []
        wanted = self._wanted(scope)
        if wanted is None:
            return []  # a scope value no row has
        allowed_rowids = None if allowed is None else np.fromiter(allowed, dtype=np.int64)
        if allowed_rowids is not None and len(allowed_rowids) == 0:
            return []
        # Read before the graphs: whichever graphs are read next hold these slots (the grower swaps a
        # view for its copy, or publishes a delta, then adds, then moves _graphed on).
        covered = min(self._graphed, a.count)
        graph, delta = self._graph, self._delta
        # The rows the graph lacks (an import held it back, a load it catches up with) are scored
        # exactly beside its candidates: cheaper than scoring every row while it covers most.
        if graph is not None and a.count - covered <= max(covered, vector_plan.EXACT_MAX_ROWS):
            sizes = [self._sizes[field][code] for field, code in wanted]
            estimate = min([*sizes, len(allowed_rowids) if allowed_rowids is not None else self.live_count])
            plan = vector_plan.plan(estimate, self.live_count, k, vector_plan.EXACT_MAX_ROWS)
            if not plan.exact:
                graphs = [(graph, 0, covered if delta is None else min(covered, delta[1]))]
                if delta is not None:
                    graphs.append((delta[0], delta[1], covered))
                return self._graph_search(a, graphs, covered, query, wanted, allowed_rowids, now, k, plan.fetch)
        return self._exact(a, query, wanted, allowed_rowids, now, k)

    def _wanted(self, scope: Scope) -> list[tuple[int, int]] | None:
        """The (field, code) pairs ``scope`` sets; None if a value is unknown here."""
        wanted = []
        for field, value in enumerate((scope.namespace, scope.user_id, scope.agent_id, scope.session_id)):
            if value is not None:
                code = self._codes[field].get(value)
                if code is None:
                    return None
                wanted.append((field, code))
        return wanted

    def _keep(self, a: _Arrays, slots: npt.NDArray[np.int64], wanted: list[tuple[int, int]],
              allowed: npt.NDArray[np.int64] | None, now: int) -> npt.NDArray[np.int64]:
        """Those of ``slots`` live, unexpired, in the scope and allowed."""
        mask = a.live[slots] & (a.expires[slots] > now)
        for field, code in wanted:
            mask &= a.scope[slots, field] == code
        if allowed is not None:
            mask &= np.isin(a.rowids[slots], allowed)
        return slots[mask]

    def _exact(self, a: _Arrays, query: npt.NDArray[np.float32], wanted: list[tuple[int, int]],
               allowed: npt.NDArray[np.int64] | None, now: int, k: int) -> list[tuple[int, float]]:
        if wanted:  # the slots of the scope's rarest value: a user's rows, not the database's
            field, code = min(wanted, key=lambda fc: self._sizes[fc[0]][fc[1]])
            candidates = self._slots[field][code].view()
        else:
            candidates = np.arange(a.count, dtype=np.int64)
        slots = self._keep(a, candidates, wanted, allowed, now)
        return self._best(a, slots, self._scores(a, slots, query), k)

    def _graph_search(self, a: _Arrays, graphs: list[tuple[Graph, int, int]], covered: int,
                      query: npt.NDArray[np.float32], wanted: list[tuple[int, int]],
                      allowed: npt.NDArray[np.int64] | None, now: int, k: int, fetch: int) -> list[tuple[int, float]]:
        """Each graph's candidates among the slots it covers (from, to) that are allowed, and the
        rows from ``covered`` on exactly (the graphs may have grown past them since)."""
        quantised = self._quantise(query)
        found = []
        for graph, low, high in graphs:
            if not len(graph) or low >= high:
                continue
            wants = fetch
            while True:
                with self._graph_lock:
                    graph.expansion_search = max(expansion(len(graph)), wants)  # type: ignore[misc]  # (it has an untyped setter)
                    keys = np.asarray(graph.search(quantised, min(wants, len(graph)), threads=1).keys, dtype=np.int64)
                slots = self._keep(a, keys[(keys >= low) & (keys < high)], wanted, allowed, now)
                if len(slots) >= k or wants >= len(graph):
                    break
                wants = min(4 * wants, len(graph))  # the allowed rows lay thinner near the query than on average
            found.append(slots)
        slots = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
        tail = self._keep(a, np.arange(covered, a.count, dtype=np.int64), wanted, allowed, now)
        slots = np.concatenate([slots, tail])
        return self._best(a, slots, self._scores(a, slots, query), k)

    @staticmethod
    def _best(a: _Arrays, slots: Vec, scores: npt.NDArray[np.float32], k: int) -> list[tuple[int, float]]:
        if len(slots) > k:
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(slots))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(a.rowids[slots[i]]), float(scores[i])) for i in top]


def with_room(rows: int) -> int:
    """Rows to hold ``rows`` and the ones added next: a quarter more, at least 1,024 (an index
    read back, and the arrays gm.index_file saves)."""
    return rows + max(1024, rows // 4)


def expansion(rows: int) -> int:
    """The search expansion for a graph of ``rows``: a larger graph is walked further."""
    return min(EXPANSION_SEARCH_MAX, max(EXPANSION_SEARCH, rows // ROWS_PER_EXPANSION))


def limit_blas_threads(threads: int) -> None:
    """Scoring is a memory-bound matrix-vector product: one BLAS thread does it faster than
    two (measured: 12.6 vs 18.7 ms over 100k vectors) and leaves the other core to the
    embedding model. GM_BLAS_THREADS=0 leaves the process's BLAS settings alone."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
