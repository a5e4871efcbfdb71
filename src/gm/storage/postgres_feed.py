"""The change feed of a shared Postgres database: how each instance's in-process vector
index follows every instance's committed writes (the ``changes`` table, LISTEN/NOTIFY, a poll).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import asyncpg

from gm import loops
from gm.errors import StorageUnavailable
from gm.memory import Scope
from gm.storage.base import IndexChange
from gm.storage.sqlite import search_vector

if TYPE_CHECKING:
    from gm.storage.postgres import PostgresBackend

log = logging.getLogger(__name__)

CHANNEL = "gm_changes"  # every committing writer NOTIFYs it
POLL_SECONDS = 1.0  # the feed also catches up this often, should a notification be missed


class ChangeFeed:
    """Keeps this instance's in-process index in step with every instance's committed
    writes: LISTEN for a notification (sent by each committing writer), then read the
    ``changes`` rows after the last one seen, joined with the rows' current state. Also
    polls every ``POLL_SECONDS`` and catches up after reconnecting, so nothing is missed."""

    def __init__(self, backend: PostgresBackend, apply: Callable[[list[IndexChange]], Awaitable[None]]) -> None:
        self.backend = backend
        self.apply = apply
        self.last_seq = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, from_seq: int) -> None:
        self.last_seq = from_seq
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gm-change-feed")

    async def stop(self) -> None:
        await loops.stop(self._task)

    async def reach(self, seq: int) -> None:
        """Catch up to at least ``seq`` (a commit of this instance), best effort."""
        if seq > self.last_seq:
            try:
                await self.catch_up()
            except StorageUnavailable as exc:
                log.warning("change feed: catching up failed, the poll will retry: %s", exc.message)
                self._wake.set()

    async def catch_up(self) -> None:
        async with self._lock:
            while True:
                rows = await self.backend.fetch_own(
                    "SELECT c.seq, c.rowid, m.namespace, m.user_id, m.agent_id, m.session_id, m.expires_at, "
                    f"{search_vector(self.backend.context, 'm.')} "
                    "FROM changes c LEFT JOIN memories m ON m.rowid = c.rowid "
                    "WHERE c.seq > $1 ORDER BY c.seq LIMIT 5000",
                    self.last_seq,
                )
                if not rows:
                    return
                if rows[0][0] > self.last_seq + 1 and await self._pruned_past():
                    log.warning("change feed: fell behind the kept changes; reloading the vector index")
                    self.backend.request_reload()
                changes = []
                for r in rows:
                    if r[2] is None:
                        changes.append(IndexChange(r[1], remove=True))
                    else:
                        changes.append(IndexChange(r[1], vector=r[7], scope=Scope(r[2], r[3], r[4], r[5]),
                                                   expires_at=r[6]))
                await self.apply(changes)
                self.last_seq = rows[-1][0]

    async def _pruned_past(self) -> bool:
        rows = await self.backend.fetch_own("SELECT value FROM meta WHERE key = 'changes_pruned_through'")
        return bool(rows) and int(rows[0][0]) > self.last_seq

    async def _run(self) -> None:
        """Catch up on every notification, and at least every ``POLL_SECONDS`` whether or
        not the LISTEN connection is up (it is re-made in the background when lost)."""
        listener: asyncpg.Connection | None = None
        listening: asyncio.Task[asyncpg.Connection] | None = None
        try:
            while True:
                if listener is None or listener.is_closed():
                    listener = None
                    if listening is None:
                        listening = asyncio.get_running_loop().create_task(self._listen())
                    elif listening.done():
                        listener = listening.result() if listening.exception() is None else None
                        if listener is None:
                            log.warning("change feed: cannot LISTEN (%s); polling every %.0fs meanwhile",
                                        getattr(listening.exception(), "message", listening.exception()),
                                        POLL_SECONDS)
                        listening = None
                try:
                    await self.catch_up()
                except StorageUnavailable as exc:
                    log.warning("change feed: %s; will retry", exc.message)
                await loops.pause(POLL_SECONDS, self._wake)
                self._wake.clear()
        finally:
            if listening is not None:
                await loops.stop(listening)
                if not listening.cancelled() and listening.exception() is None:
                    listening.result().terminate()
            if listener is not None and not listener.is_closed():
                listener.terminate()

    async def _listen(self) -> asyncpg.Connection:
        conn = await self.backend.connect()
        try:
            await conn.add_listener(CHANNEL, lambda *_: self._wake.set())
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda *_: self._wake.set())
        self._wake.set()  # changes made while not listening: catch up now
        return conn
