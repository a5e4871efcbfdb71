"""The in-process vector index: every live memory's unit vector in one float32 matrix,
with its scope and expiry beside it, scored by cosine (a dot product) off the event loop.

The Writer's task is its only mutator (after each commit); searches run on worker threads
against a snapshot (the arrays and the row count when they started). Appends land past
that count and growth swaps in new arrays, so a running search never sees a torn row.
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


class VectorIndex:
    """Cosine search over the vectors of live memories, restricted to a scope."""

    def __init__(self, dim: int = 384, capacity: int = 1024) -> None:
        self.dim = dim
        self.count = 0  # slots used (live or not)
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

    def _code(self, field: int, value: str | None, *, create: bool) -> int | None:
        if value is None:
            return -1
        codes = self._codes[field]
        code = codes.get(value)
        if code is None and create:
            code = codes[value] = len(codes)
        return code

    def _reserve(self, extra: int) -> None:
        need = self.count + extra
        old = self._a
        if need <= len(old.rowids):
            return
        if self.live_count < self.count // 2:  # mostly tombstones: compact instead of growing
            keep = np.flatnonzero(old.live[: self.count])
            if self.live_count + extra <= len(old.rowids):
                self._a = new = self._allocate(len(old.rowids))
                self._copy(old, new, keep)
                return
        capacity = max(need, len(old.rowids) * 2)
        keep = np.flatnonzero(old.live[: self.count])
        self._a = new = self._allocate(capacity)
        self._copy(old, new, keep)

    def _copy(self, old: _Arrays, new: _Arrays, keep: npt.NDArray[np.intp]) -> None:
        n = len(keep)
        new.vectors[:n] = old.vectors[keep]
        new.rowids[:n] = old.rowids[keep]
        new.live[:n] = True
        new.expires[:n] = old.expires[keep]
        new.scope[:n] = old.scope[keep]
        self._slot = {int(r): i for i, r in enumerate(new.rowids[:n])}
        self.count = n

    def add(self, rowid: int, vector: bytes | npt.NDArray[np.float32], scope: Scope, expires_at: int | None) -> None:
        """Add (or replace) the vector of ``rowid``."""
        row = np.frombuffer(vector, dtype=np.float32) if isinstance(vector, bytes) else vector
        if row.shape[0] != self.dim:
            if self.count:
                raise ValueError(f"vector of {row.shape[0]} dimensions in an index of {self.dim}")
            self.dim = row.shape[0]
            self._a = self._allocate(len(self._a.rowids))
        self.remove(rowid)
        self._reserve(1)
        a, slot = self._a, self.count
        a.vectors[slot] = row
        a.rowids[slot] = rowid
        a.expires[slot] = NEVER if expires_at is None else expires_at
        for field, value in enumerate((scope.namespace, scope.user_id, scope.agent_id, scope.session_id)):
            a.scope[slot, field] = self._code(field, value, create=True)  # type: ignore[assignment]
        a.live[slot] = True
        self._slot[rowid] = slot
        self.count += 1
        self.live_count += 1

    def load(self, rows: Iterable[VectorRow]) -> None:
        for row in rows:
            self.add(row.rowid, row.vector, row.scope, row.expires_at)

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
        a, n = self._a, self.count
        if n == 0:
            return []
        mask = a.live[:n] & (a.expires[:n] > now)
        for field, value in enumerate((scope.namespace, scope.user_id, scope.agent_id, scope.session_id)):
            if value is None:
                continue
            code = self._code(field, value, create=False)
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
