"""What the MCP tools need of a memory store: :class:`Memories`, the methods of ``gm.Store``
they call, which an embedded store (``gm.open``) and a remote client both offer.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any, Protocol

from gm.memory import HistoryEntry, Memory, Page, SearchHit


class Memories(Protocol):
    """A handle with ``gm.Store``'s memory methods, arguments and typed results."""

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
    ) -> Memory: ...

    async def add_many(self, inputs: builtins.list[dict[str, Any]]) -> builtins.list[Memory]: ...

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
    ) -> builtins.list[SearchHit]: ...

    async def get(self, id: str, *, namespace: str | None = None) -> Memory: ...

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
    ) -> Page: ...

    async def update(
        self,
        id: str,
        *,
        text: str | None = None,
        metadata: dict[str, Any] | None = None,
        expires_at: Any = ...,
        namespace: str | None = None,
        occurred_at: str | datetime | None = None,
    ) -> Memory: ...

    async def delete(self, id: str, *, namespace: str | None = None) -> None: ...

    async def delete_many(
        self,
        *,
        namespace: str | None = None,
        user_id: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        filter: dict[str, Any] | None = None,
    ) -> int: ...

    async def history(self, id: str, *, namespace: str | None = None) -> builtins.list[HistoryEntry]: ...
