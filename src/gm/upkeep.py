"""The store's upkeep: the work an open store does on its own, in the background: purging
expired memories every GM_PURGE_SECONDS and building the session context older rows lack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gm import context, loops
from gm.memory import now_ms
from gm.storage.base import Backend, PurgeExpired

log = logging.getLogger(__name__)

WATCH_SECONDS = 1.0  # how often an instance of a shared database looks whether the vectors switched model


class Upkeep:
    """The background tasks of one open store; :meth:`stop` ends them (before the backend closes)."""

    def __init__(
        self, backend: Backend, purge_seconds: float, watch_model: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.backend = backend
        self.purge_seconds = purge_seconds
        self.watch_model = watch_model  # a shared database: whether another instance switched the vectors' model
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._purge_forever(), name="gm-purge"))
        self._tasks.append(loop.create_task(context.backfill_forever(self.backend), name="gm-context-backfill"))
        if self.watch_model is not None:
            self._tasks.append(loop.create_task(self._watch_forever(self.watch_model), name="gm-watch-model"))

    async def stop(self) -> None:
        await loops.stop(*self._tasks)

    async def _watch_forever(self, watch: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await watch()
            except Exception as exc:
                log.warning("watching the vectors' model: %s; will retry", getattr(exc, "message", exc))
            await loops.pause(WATCH_SECONDS)

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.backend.write(PurgeExpired(now_ms()))
            except Exception:
                log.exception("purging expired memories failed; will retry")
            await loops.pause(self.purge_seconds)
