"""The in-process vector index: every live memory's unit vector in one float32 matrix,
with its scope and expiry beside it, scored by cosine (a dot product) off the event loop.

Only the Indexer (gm.indexer) writes it: its loader fills a fresh one that nobody else
holds yet, then the published one follows each committed batch. Searches run on worker
threads against a snapshot: the published arrays and the row count they carry. Appends
fill a row before counting it, and growth or compaction builds new arrays completely
before publishing them, so a running search never sees a torn or missing row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gm.memory import Scope
from gm.storage.base import IndexChange, VectorRow

NEVER = np.iinfo(np.int64).max
_FIELDS = ("namespace", "user_id", "agent_id", "session_id")


@dataclass
class _Arrays:
    vectors: npt.NDArray[np.float32]
    rowids: npt.NDArray[np.int64]
    live: npt.NDArray[np.bool_]
    expires: npt.NDArray[np.int64]
    scope: npt.NDArray[np.int32]  # one column per scope field; -1 = not set
    count: int = 0  # rows in use (live or not); rows past it are not yet written


class VectorIndex:
    """Cosine search over the vectors of live memories, restricted to a scope."""

    def __init__(self, dim: int = 384, capacity: int = 1024) -> None:
        self.dim = dim
        self.live_count = 0
        self._a = self._allocate(capacity)
        self._slot: dict[int, int] = {}
        self._codes: list[dict[str, int]] = [{} for _ in _FIELDS]

    def _allocate(self, capacity: int) -> _Arrays:
        return _Arrays(
            np.zeros((capacity, self.dim), dtype=np.float32),
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
    def nbytes(self) -> int:
        """The memory its arrays hold, allocated rows included (for /metrics)."""
        a = self._a
        return a.vectors.nbytes + a.rowids.nbytes + a.live.nbytes + a.expires.nbytes + a.scope.nbytes

    def _intern(self, field: int, value: str) -> int:
        codes = self._codes[field]
        code = codes.get(value)
        if code is None:
            code = codes[value] = len(codes)
        return code

    def _codes_of(self, scope: Scope) -> list[int]:
        values = (scope.namespace, scope.user_id, scope.agent_id, scope.session_id)
        return [-1 if value is None else self._intern(field, value) for field, value in enumerate(values)]

    def _reserve(self, extra: int) -> None:
        """Make room for ``extra`` rows, compacting away removed rows; publishes new arrays
        only once they are complete."""
        old = self._a
        if old.count + extra <= len(old.rowids):
            return
        keep = np.flatnonzero(old.live[: old.count])
        capacity = len(old.rowids)
        if len(keep) + extra > capacity // 2:  # grow unless removed rows free at least half
            capacity = max(len(keep) + extra, capacity * 2)
        new = self._allocate(capacity)
        n = len(keep)
        new.vectors[:n] = old.vectors[keep]
        new.rowids[:n] = old.rowids[keep]
        new.live[:n] = True
        new.expires[:n] = old.expires[keep]
        new.scope[:n] = old.scope[keep]
        new.count = n
        self._slot = {int(r): i for i, r in enumerate(new.rowids[:n])}
        self._a = new

    def _fit_dim(self, dim: int) -> None:
        if dim != self.dim:
            if self._a.count:
                raise ValueError(f"vector of {dim} dimensions in an index of {self.dim}")
            self.dim = dim
            self._a = self._allocate(len(self._a.rowids))

    def add(self, rowid: int, vector: bytes | npt.NDArray[np.float32], scope: Scope, expires_at: int | None) -> None:
        """Add (or replace) the vector of ``rowid``."""
        row = np.frombuffer(vector, dtype=np.float32) if isinstance(vector, bytes) else vector
        self._fit_dim(row.shape[0])
        self.remove(rowid)
        self._reserve(1)
        a = self._a
        slot = a.count
        a.vectors[slot] = row
        a.rowids[slot] = rowid
        a.expires[slot] = NEVER if expires_at is None else expires_at
        a.scope[slot] = self._codes_of(scope)
        a.live[slot] = True
        self._slot[rowid] = slot
        a.count = slot + 1  # counted only once written
        self.live_count += 1

    def load(self, rows: list[VectorRow]) -> None:
        """Add many rows at once (the bulk path of opening a store; blocking, ~1 s per million)."""
        if not rows:
            return
        self._fit_dim(len(rows[0].vector) // 4)
        for row in rows:
            self.remove(row.rowid)
        self._reserve(len(rows))
        a = self._a
        start, end = a.count, a.count + len(rows)
        a.vectors[start:end] = np.frombuffer(b"".join(r.vector for r in rows), dtype=np.float32).reshape(-1, self.dim)
        a.rowids[start:end] = [r.rowid for r in rows]
        a.expires[start:end] = [NEVER if r.expires_at is None else r.expires_at for r in rows]
        a.scope[start:end] = [self._codes_of(r.scope) for r in rows]
        a.live[start:end] = True
        self._slot.update((r.rowid, start + i) for i, r in enumerate(rows))
        a.count = end
        self.live_count += len(rows)

    def remove(self, rowid: int) -> None:
        slot = self._slot.pop(rowid, None)
        if slot is not None:
            self._a.live[slot] = False
            self.live_count -= 1

    def apply(self, changes: Iterable[IndexChange]) -> None:
        """Follow a committed batch of writes."""
        for change in changes:
            if change.remove:
                self.remove(change.rowid)
            elif change.vector is not None and change.scope is not None:
                self.add(change.rowid, change.vector, change.scope, change.expires_at)
            else:
                slot = self._slot.get(change.rowid)
                if slot is not None:
                    self._a.expires[slot] = NEVER if change.expires_at is None else change.expires_at

    def cosines(self, query: npt.NDArray[np.float32], rowids: Iterable[int]) -> dict[int, float]:
        """The cosine of ``query`` with each of ``rowids`` the index holds."""
        a = self._a
        pairs = [(rowid, slot) for rowid in rowids if (slot := self._slot.get(rowid)) is not None]
        if not pairs:
            return {}
        scores = a.vectors[[slot for _, slot in pairs]] @ query
        return {rowid: float(score) for (rowid, _), score in zip(pairs, scores, strict=True)}

    def search(
        self,
        query: npt.NDArray[np.float32],
        scope: Scope,
        now: int,
        k: int,
        allowed: Iterable[int] | None = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` best (rowid, cosine) pairs among live, unexpired vectors in ``scope``
        (and among ``allowed`` rowids if given), best first. Blocking: run it off the loop."""
        a = self._a
        n = a.count
        if n == 0:
            return []
        mask = a.live[:n] & (a.expires[:n] > now)
        for field, value in enumerate((scope.namespace, scope.user_id, scope.agent_id, scope.session_id)):
            if value is None:
                continue
            code = self._codes[field].get(value)
            if code is None:
                return []
            mask &= a.scope[:n, field] == code
        if allowed is not None:
            mask &= np.isin(a.rowids[:n], np.fromiter(allowed, dtype=np.int64))
        slots = np.flatnonzero(mask)
        if len(slots) == 0:
            return []
        if len(slots) * 4 > n:  # gathering rows costs ~4x a row of the full product (measured)
            scores = (a.vectors[:n] @ query)[slots]
        else:
            scores = a.vectors[slots] @ query
        if len(slots) > k:
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(slots))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(a.rowids[slots[i]]), float(scores[i])) for i in top]


def limit_blas_threads(threads: int) -> None:
    """Scoring is a memory-bound matrix-vector product: one BLAS thread does it faster than
    two (measured: 12.6 vs 18.7 ms over 100k vectors) and leaves the other core to the
    embedding model. GM_BLAS_THREADS=0 leaves the process's BLAS settings alone."""
    if threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")
