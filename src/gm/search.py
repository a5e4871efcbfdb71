"""The searcher: how a question becomes ranked hits. Keyword terms for BM25, the vector
ranking, their fusion for hybrid mode, the recency boost and the ``min_score`` cut.

Hybrid fusion was chosen by leave-one-conversation-out cross-validation on the LoCoMo dev
split (docs/retrieval-study.md): each ranking fetches ``candidates(limit)`` (50 for a
page of 10), each one's scores are min-max normalised over its own candidates (best 1,
last 0; a memory the other ranking did not return gets 0 from it), and the fused score is
``KEYWORD_WEIGHT * keyword + VECTOR_WEIGHT * vector``. Reciprocal rank fusion with k = 60
and equal weights, used before, let the weaker vector ranking drag the keyword one down.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gm.errors import ModelSwitched
from gm.filters import Filter
from gm.indexer import Indexer
from gm.memory import Memory, Scope, SearchHit, TimeRange
from gm.storage.base import Backend
from gm.storage.sql import memory_from_row
from gm.vector_models import VectorModels

KEYWORD_WEIGHT = 0.7
VECTOR_WEIGHT = 1.0 - KEYWORD_WEIGHT
DAY_MS = 86_400_000
MAX_TERMS = 32
_WORD = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    """a an and are as at be been but by did do does for from had has have he her him his how i
    if in into is it its me my of on or our she so than that the their them then there these they
    this to was we were what when where which who whom why will with would you your""".split()
)

Ranking = list[tuple[int, float]]  # (rowid, score), best first
Rows = dict[int, Any]  # rowid -> its row of the memory columns, read while ranking (gm.storage.sql.memory_from_row)


def keyword_terms(query: str) -> list[str]:
    """The distinct lowercase words of ``query`` worth matching (stopwords dropped, unless
    the query is nothing but stopwords)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    kept = [w for w in words if w not in STOPWORDS] or words
    return kept[:MAX_TERMS]


def rescore_depth(depth: int) -> int:
    """How many of the in-process index's int8-approximate best the exact cosines rescore for
    a ranking ``depth`` deep: int8 scores of every row so rescored find the exact top 10 (recall 1.0 at 1M)."""
    return 2 * depth + 10


def candidates(limit: int) -> int:
    """How deep each ranking goes before fusion: deeper lists let agreement surface."""
    return max(50, 4 * limit)


@dataclass(slots=True)
class Candidate:
    """A memory one of the rankings found, with its score from each (None: not found by it)."""

    rowid: int
    score: float = 0.0
    vector_score: float | None = None
    keyword_score: float | None = None


def _normalised(ranking: Ranking) -> dict[int, float]:
    """Min-max over the ranking's own candidates: best 1, last 0; all alike (one candidate,
    or ties throughout): 1, since each is as good as the best."""
    if not ranking:
        return {}
    scores = [score for _, score in ranking]
    low, high = min(scores), max(scores)
    if high - low <= 1e-12:
        return {rowid: 1.0 for rowid, _ in ranking}
    return {rowid: (score - low) / (high - low) for rowid, score in ranking}


def fuse(keyword: Ranking, vector: Ranking) -> list[Candidate]:
    """The weighted sum of both rankings' normalised scores, best first (ties: the keyword
    ranking's order, then the vector one's)."""
    found: dict[int, Candidate] = {}
    for rowid, score in keyword:
        found[rowid] = Candidate(rowid, keyword_score=score)
    for rowid, score in vector:
        found.setdefault(rowid, Candidate(rowid)).vector_score = score
    kw, vec = _normalised(keyword), _normalised(vector)
    for candidate in found.values():
        candidate.score = KEYWORD_WEIGHT * kw.get(candidate.rowid, 0.0) + VECTOR_WEIGHT * vec.get(candidate.rowid, 0.0)
    return sorted(found.values(), key=lambda c: -c.score)


def decay(age_ms: int, half_life_days: float) -> float:
    """The recency factor: 1 for a memory that occurred now (or later), 1/2 one half-life ago."""
    return math.exp2(-max(age_ms, 0) / (half_life_days * DAY_MS))


@dataclass(frozen=True, slots=True)
class SearchRequest:
    """A validated search (see :meth:`gm.Store.search`)."""

    query: str
    scope: Scope
    filter: Filter | None
    limit: int
    mode: str
    now: int
    time_range: TimeRange | None = None
    min_score: float | None = None
    recency: float | None = None  # half-life in days


class Searcher:
    """Plans and runs a :class:`SearchRequest`: the keyword ranking from the backend, the
    vector one from the database itself (pgvector) or the Indexer's in-process index."""

    def __init__(
        self, backend: Backend, models: VectorModels, indexer: Indexer,
        follow: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.backend = backend
        self.models = models
        self.indexer = indexer
        self.follow = follow  # catch up with a switch another instance made (a shared database)

    async def search(self, request: SearchRequest) -> list[SearchHit]:
        """The hits of ``request``; one whose query a re-embed's switch overtook (embedded by
        the old model once its index was gone) runs again with the new model."""
        try:
            return await self._search(request)
        except ModelSwitched:
            if self.follow is not None:
                await self.follow()
            return await self._search(request)

    async def _search(self, request: SearchRequest) -> list[SearchHit]:
        r, backend = request, self.backend
        # With a recency boost or a cosine cut, a single ranking also looks deeper, so a newer or
        # closer memory further down can still make the page.
        deep = r.mode == "hybrid" or r.recency is not None or r.min_score is not None
        depth = candidates(r.limit) if deep else r.limit
        wants_vector = r.mode != "keyword" or r.min_score is not None
        model = self.models.identity  # the vectors the query is embedded for (a switch may come meanwhile)
        # A vector search's page is among the rows it rescores: their memories are read with their
        # vectors (30 rows for a page of 10 at 1M memories: 0.32 ms against 0.28, and no 0.2 ms read
        # of the page after). A hybrid page holds keyword hits too: it is read after.
        rows: Rows | None = {} if r.mode == "vector" else None
        (query_vector, vector), keyword = await asyncio.gather(  # the keyword query runs beside both vector steps
            self._vector_side(r, depth, model, rows) if wants_vector else _no_vector(),
            backend.keyword_search(keyword_terms(r.query), r.scope, r.filter, depth, r.now, time_range=r.time_range)
            if r.mode != "vector" else _empty(),
        )
        if r.mode == "hybrid":
            ranked = fuse(keyword, vector)
        elif r.mode == "vector":
            ranked = [Candidate(rowid, score, vector_score=score) for rowid, score in vector]
        else:
            ranked = [Candidate(rowid, score, keyword_score=score) for rowid, score in keyword]
        if r.min_score is not None and query_vector is not None:
            ranked = await self._cut(ranked, query_vector, r.min_score, model)
        if r.recency is None:
            ranked = ranked[: r.limit]
        found = await self._memories([c.rowid for c in ranked], r.now, rows)
        if r.recency is not None:
            for c in ranked:
                if c.rowid in found:
                    c.score *= decay(r.now - found[c.rowid].occurred_at, r.recency)
            ranked = sorted(ranked, key=lambda c: -c.score)[: r.limit]
        return [SearchHit(found[c.rowid], c.score, c.vector_score, c.keyword_score) for c in ranked if c.rowid in found]

    async def _memories(self, rowids: list[int], now: int, rows: Rows | None) -> dict[int, Memory]:
        """The live memories among ``rowids``: those the vector ranking read with their vectors
        into ``rows`` (a vector search's page), the rest read now."""
        rows = rows or {}
        found = {rowid: memory_from_row(rows[rowid]) for rowid in rowids if rowid in rows}
        missing = [rowid for rowid in rowids if rowid not in found]
        if missing:
            found |= await self.backend.get_many(missing, now)
        return found

    async def _vector_side(self, r: SearchRequest, depth: int, model: str,
                           rows: Rows | None) -> tuple[np.ndarray, Ranking]:
        """The query's embedding, and the vector ranking unless only the embedding is needed
        (keyword mode with ``min_score``)."""
        embedder = self.models.embedder
        if self.models.identity != model:
            raise ModelSwitched("the vectors switched model; search again")
        vector, _ = await asyncio.gather(embedder.embed(r.query, urgent=True), self._index_ready())
        query = np.asarray(vector)
        if self.models.identity != model:
            raise ModelSwitched("the vectors switched model; search again")
        ranking = await self._vector_ranking(query, r, depth, model, rows) if r.mode != "keyword" else []
        if self.backend.native_vectors and self.models.identity != model:
            raise ModelSwitched("the vectors switched model while searching; search again")
        return query, ranking

    async def _index_ready(self) -> None:
        """Wait for the in-process index, unless (or until) loading it failed: then raise why,
        at once. A database that searches vectors itself needs none."""
        if not self.backend.native_vectors:
            await self.indexer.wait_ready()

    async def nearest(self, query: np.ndarray, scope: Scope, now: int, k: int) -> list[tuple[Memory, float]]:
        """The ``k`` live memories of ``scope`` nearest ``query`` (an embedding) by cosine, as a
        vector search ranks and reads them (bench/peers.py times this step alone)."""
        if not self.backend.native_vectors:
            await self.indexer.wait_ready()
        request = SearchRequest("", scope, None, k, "vector", now)
        rows: Rows = {}
        ranked = await self._vector_ranking(query, request, k, self.models.identity, rows)
        found = await self._memories([rowid for rowid, _ in ranked], now, rows)
        return [(found[rowid], score) for rowid, score in ranked if rowid in found]

    async def _vector_ranking(self, query: np.ndarray, r: SearchRequest, depth: int, model: str,
                              rows: Rows | None) -> Ranking:
        """The vector ranking ``depth`` deep; with ``rows``, the memories rescored are read into it."""
        backend = self.backend
        if backend.native_vectors:
            return await backend.vector_search(
                query.tobytes(), r.scope, r.filter, depth, r.now, time_range=r.time_range, model=model
            )
        allowed: Iterable[int] | None = None
        if r.filter is not None or r.time_range is not None:  # the index knows scopes and expiry, not the rest
            allowed = await backend.matching_rowids(r.scope, r.filter, r.now, time_range=r.time_range)
        approximate = await self.indexer.search(query, r.scope, r.now, rescore_depth(depth), allowed, model)
        rescored = await self._stored_cosines(query, [rowid for rowid, _ in approximate], model, r.now, rows)
        if rescored is None:  # (the index before a switch, for a query embedded before it)
            return approximate[:depth]
        return sorted(rescored.items(), key=lambda pair: -pair[1])[:depth]

    async def _stored_cosines(self, query: np.ndarray, rowids: list[int], model: str, now: int = 0,
                              rows: Rows | None = None) -> dict[int, float] | None:
        """The exact cosines of ``query`` with the stored vectors of ``rowids`` (the index holds
        int8 approximations); None if ``model`` is not the one the database has now. With
        ``rows``, only of the memories live at ``now``, their rows read into ``rows``."""
        if model and model != self.indexer.model:
            return None
        if rows is None:
            identity, vectors = await self.backend.searched_vectors(rowids)
        else:
            identity, read = await self.backend.searched_rows(rowids, now)
            vectors = {rowid: vector for rowid, (vector, _) in read.items()}
            rows.update((rowid, row) for rowid, (_, row) in read.items())
        if identity is not None and model and identity != model:
            raise ModelSwitched("the vectors switched model while searching; search again")
        if not vectors:
            return {}
        matrix = np.frombuffer(b"".join(vectors.values()), dtype=np.float32).reshape(len(vectors), -1)
        if matrix.shape[1] != len(query):
            raise ModelSwitched("the vectors switched model while searching; search again")
        return dict(zip(vectors, (matrix @ query).tolist(), strict=True))

    async def _cut(self, ranked: list[Candidate], query: np.ndarray, min_score: float, model: str) -> list[Candidate]:
        """Drop the candidates whose cosine is below ``min_score``; one the vector ranking did
        not return has its cosine looked up (it stays out of ``vector_score``)."""
        unknown = [c.rowid for c in ranked if c.vector_score is None]
        cosines: dict[int, float] = {}
        if unknown:
            if self.backend.native_vectors:
                cosines = await self.backend.cosines(query.tobytes(), unknown)
            else:
                exact = await self._stored_cosines(query, unknown, model)
                cosines = exact if exact is not None else self.indexer.cosines(query, unknown, model)
        return [
            c for c in ranked
            if (c.vector_score if c.vector_score is not None else cosines.get(c.rowid, -1.0)) >= min_score
        ]


async def _empty() -> Ranking:
    return []


async def _no_vector() -> tuple[None, Ranking]:
    return None, []
