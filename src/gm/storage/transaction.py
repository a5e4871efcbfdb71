"""The Transaction protocol: a Writer's open transaction as the write flow
(gm.storage.write_flow) uses it; each backend implements it on its connection.
"""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager
from typing import Any

from gm.errors import GMError
from gm.storage.sql import CONTEXT_VERSION, Params, columns_for


class Transaction(abc.ABC):
    """A Writer's open transaction, as the write flow uses it: statements, a savepoint per
    write, which failures refuse only that write, and the backend's own columns."""

    def __init__(self, version: int) -> None:
        self.version = version  # the schema's
        self.columns = columns_for(version)
        self.context = version >= CONTEXT_VERSION  # it has event time and session context

    @abc.abstractmethod
    def params(self) -> Params: ...

    @abc.abstractmethod
    async def fetch(self, sql: str, values: list[Any]) -> list[Any]: ...

    @abc.abstractmethod
    async def execute(self, sql: str, values: list[Any]) -> None: ...

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...

    @abc.abstractmethod
    def savepoint(self) -> AbstractAsyncContextManager[None]:
        """Undo the statements inside it if it raises a refusal (see :meth:`refusal`)."""

    @abc.abstractmethod
    def refusal(self, exc: Exception) -> GMError | None:
        """What a write that raised ``exc`` answers, if only it failed; None if the database
        itself failed (the whole batch fails)."""

    def embedding_columns(self, vector: bytes) -> dict[str, bytes]:
        """The columns a memory's own embedding is written to."""
        return {"embedding": vector}

    def search_columns(self, search: bytes | None, own: bytes) -> dict[str, bytes | None]:
        """The columns a memory's search embedding (gm.context) is written to."""
        return {"search_embedding": search}

    blob_type = "BLOB"  # the type of a vector column

    def next_vector_columns(self, vector: bytes | None) -> dict[str, bytes | None]:
        """The columns the next model's own embedding is written to (gm.reembed)."""
        return {"embedding_next": vector}

    def next_search_columns(self, search: bytes | None, own: bytes) -> dict[str, bytes | None]:
        return {"search_embedding_next": search}

    @abc.abstractmethod
    async def memory_columns(self) -> set[str]:
        """The names of the ``memories`` table's columns now."""

    async def exclusive(self) -> None:
        """Hold every writer off until this transaction ends (Postgres: other instances' too)."""
        return None

    async def next_columns_added(self, dimensions: int) -> None:
        """After the next vector columns were added (Postgres: pgvector's, and its index)."""
        return None

    async def vectors_switched(self, dimensions: int) -> None:
        """After the next vector columns became the current ones (Postgres: pgvector's too)."""
        return None

    async def vector_columns_dropped(self, suffix: str) -> None:
        """Before the vector columns ending in ``suffix`` (``_next``, ``_old``) are dropped."""
        return None

    async def vectors_added(self, dimensions: int) -> None:
        """After vectors of ``dimensions`` were inserted (Postgres: the HNSW index may be due)."""
        return None

    async def purged(self, now: int) -> None:
        """After expired memories were purged (Postgres: prune the change feed)."""
        return None
