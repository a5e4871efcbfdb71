"""The change feed of a shared Postgres database: how each instance's in-process vector
index follows every instance's committed writes (the ``changes`` table, LISTEN/NOTIFY, a poll):
the writers number their changed rows, the feed reads them after the last one it applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from gm import loops
from gm.errors import StorageUnavailable
from gm.memory import Scope
from gm.storage.ops import IndexChange
from gm.storage.sql import search_vector

log = logging.getLogger(__name__)

CHANNEL = "gm_changes"  # every committing writer NOTIFYs it
POLL_SECONDS = 1.0  # the feed also catches up this often, should a notification be missed
FEED_LOCK = 0x676D6368616E67  # "gmchang": writers number their changes under this transaction lock
CHANGES_KEPT_MS = 24 * 3600 * 1000  # an instance away longer than this reloads its index
LAST_SEQ = (  # where a feed starts: after the last change, or the last one pruned
    "SELECT GREATEST(coalesce(max(seq), 0), coalesce((SELECT value::bigint FROM meta "
    "WHERE key = 'changes_pruned_through'), 0)) FROM changes"
)


async def number_changes(conn: asyncpg.Connection, rowids: list[int]) -> int | None:
    """In a writer's transaction: number its changed rows (under a lock held to commit, so
    seq order is commit order across instances) and wake every feed once it commits;
    returns the last number."""
    if not rowids:
        return None
    await conn.execute("SELECT pg_advisory_xact_lock($1)", FEED_LOCK)
    last_seq: int = await conn.fetchval(
        "WITH added AS (INSERT INTO changes (rowid, at) SELECT unnest($1::bigint[]), $2 RETURNING seq) "
        "SELECT max(seq) FROM added",
        rowids, int(time.time() * 1000),
    )
    await conn.execute(f"NOTIFY {CHANNEL}")
    return last_seq


async def prune_changes(conn: asyncpg.Connection, now: int) -> None:
    """Forget changes older than ``CHANGES_KEPT_MS``; a feed that had not read them reloads."""
    pruned = await conn.fetchval(
        "WITH gone AS (DELETE FROM changes WHERE at < $1 RETURNING seq) SELECT max(seq) FROM gone",
        now - CHANGES_KEPT_MS,
    )
    if pruned is not None:
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('changes_pruned_through', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value::bigint, excluded.value::bigint)::text",
            str(pruned),
        )


class ChangeFeed:
    """Keeps this instance's in-process index in step with every instance's committed
    writes: LISTEN for a notification (sent by each committing writer), then read the
    ``changes`` rows after the last one seen, joined with the rows' current state. Also
    polls every ``POLL_SECONDS`` and catches up after reconnecting, so nothing is missed."""

    def __init__(
        self,
        fetch: Callable[[str, list[Any]], Awaitable[list[Any]]],
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        apply: Callable[[list[IndexChange]], Awaitable[None]],
        reload: Callable[[], None],
        context: bool,
    ) -> None:
        self.fetch = fetch  # a read on a connection not queued behind requests' reads
        self.connect = connect
        self.apply = apply
        self.reload = reload  # the index must be loaded afresh: changes were pruned before we read them
        self.context = context
        self.last_seq = 0
        self.following: str | None = None  # the identity of a re-embed's next model, once seen
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
                try:
                    rows = await self.fetch(self._changes_sql(), [self.last_seq])
                except StorageUnavailable:
                    if self.following is None:
                        raise
                    self.following = None  # the re-embed ended (switched or cancelled): its columns went
                    continue
                if not rows:
                    return
                if rows[-1][9] != self.following:  # a re-embed began or ended: read them again, with its vectors
                    self.following = rows[-1][9]
                    continue
                if rows[0][0] > self.last_seq + 1 and await self._pruned_past():
                    log.warning("change feed: fell behind the kept changes; reloading the vector index")
                    self.reload()
                changes = []
                for r in rows:
                    if r[2] is None:
                        changes.append(IndexChange(r[1], remove=True))
                        continue
                    scope = Scope(r[2], r[3], r[4], r[5])
                    changes.append(IndexChange(r[1], vector=r[7], scope=scope, expires_at=r[6], model=r[8] or ""))
                    if self.following is not None and r[9] == self.following:  # a re-embed's next vectors
                        changes.append(IndexChange(r[1], remove=r[10] is None, vector=r[10], scope=scope,
                                                   expires_at=r[6], model=self.following))
                await self.apply(changes)
                self.last_seq = rows[-1][0]

    def _changes_sql(self) -> str:
        """The changes after ``$1`` with each row's state now, the model of its vectors, and
        while a re-embed runs (gm.reembed), its next model and next vector."""
        following = (", coalesce(m.search_embedding_next, m.embedding_next)" if self.following is not None
                     else ", NULL")
        return (
            "SELECT c.seq, c.rowid, m.namespace, m.user_id, m.agent_id, m.session_id, m.expires_at, "
            f"{search_vector(self.context, 'm.')}, (SELECT value FROM meta WHERE key = 'model_identity'), "
            "(SELECT value::json->>'identity' FROM meta WHERE key = 'reembed')"
            f"{following} "
            "FROM changes c LEFT JOIN memories m ON m.rowid = c.rowid "
            "WHERE c.seq > $1 ORDER BY c.seq LIMIT 5000"
        )

    async def _pruned_past(self) -> bool:
        rows = await self.fetch("SELECT value FROM meta WHERE key = 'changes_pruned_through'", [])
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
        conn = await self.connect()
        try:
            await conn.add_listener(CHANNEL, lambda *_: self._wake.set())
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(lambda *_: self._wake.set())
        self._wake.set()  # changes made while not listening: catch up now
        return conn
