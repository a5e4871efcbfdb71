"""The SQLite backend: a file in WAL mode, its Writer (gm.storage.sqlite_writer) on the only
write connection, a pool of read-only connections, and keyword search on FTS5 (keyed by scope:
gm.storage.sqlite_keywords; an index of an older definition is rebuilt so in the background).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from gm import loops
from gm.config import DEFAULT_WRITE_TIMEOUT_SECONDS
from gm.errors import InvalidInput, StorageUnavailable, StoreClosed
from gm.filters import Filter
from gm.memory import Scope, TimeRange
from gm.migrator import Migrator
from gm.progress import OnProgress, Progress
from gm.storage import postings_file, postings_follower, sqlite_keywords, sqlite_migrations, sqlite_rebuild
from gm.storage.base import Backend
from gm.storage.ops import IndexChange
from gm.storage.sql import Params, QMarks
from gm.storage.sqlite_files import DatabaseLock
from gm.storage.sqlite_writer import WriteConnection, Writer, statement_error

READERS = 4
# No connection maps the file (mmap_size 0): reads copy pages through SQLite's own 2 MB cache
# a connection. Each mapping of a page counts in the process's resident memory again, so five
# connections mapping 256 MiB each held 713 MiB of it at 1M memories (bench/peers.py: 2,479 ->
# 1,499 MiB) for no measurable speed now that keyword ranking is in process (searches within 2%
# either way; gm.storage.sqlite_postings). Mapping once paid at 10k memories, when FTS5 ranked
# every keyword search (9.3 -> 2.9 ms p50).

# The write connection's page cache: a batch of 1,000 memories dirties more pages than the
# default 2 MB holds, and SQLite then spills them to the WAL before the commit writes them again
# (py-spy: 20% of the Writer's samples in sqlite3PcacheFetchStress). 100k more memories with
# vectors into a 1M file: 20.1 -> 18.8 s (64 MiB: 18.7 s). Taken as pages are used, held after.
WRITE_CACHE_KIB = 32 << 10
KEYING_RETRY_SECONDS = 5.0  # the background rebuild of an older keyword index, after a failure
KEYING_LOG_SECONDS = 10.0  # how often it logs its progress

log = logging.getLogger(__name__)


class SQLiteBackend(Backend):
    """A SQLite file in WAL mode: one Writer, ``READERS`` read-only connections."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        steps: tuple[sqlite_migrations.Step, ...] = sqlite_migrations.STEPS,
        target_version: int | None = None,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.index_beside = self.path
        self.steps = steps
        self.target_version = target_version
        self.write_timeout = write_timeout
        self.migrator = Migrator(self._migrate)
        self.writer: Writer | None = None
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []
        self._lock = DatabaseLock(self.path)
        self.rebuilding_keywords = False  # a keyword index rebuild is under way (gm.storage.sqlite_rebuild)
        self.keyword_keyed = False  # the live keyword index is keyed by scope (gm.storage.sqlite_keywords)
        self._keying: asyncio.Task[None] | None = None  # rebuilding an older one so, after open
        self.slots = sqlite_keywords.Slots(self.fetch)
        self.postings: postings_follower.PostingsFollower | None = None  # keyword postings in process, once built
        self._postings_wanted = asyncio.Event()  # (set: build them, when the keyword index is keyed)
        self._keeping: asyncio.Task[None] | None = None

    async def _migrate(self, on_phase: Callable[[str], None]) -> int:
        return await asyncio.to_thread(
            sqlite_migrations.migrate, self.path, self.steps, self.target_version, on_phase
        )

    async def open(
        self,
        on_commit: Callable[[list[IndexChange]], Awaitable[None]],
        on_reset: Callable[[], None] | None = None,
        on_native: Callable[[], None] | None = None,
    ) -> None:
        sqlite_migrations.check_path(self.path)
        self._lock.acquire()
        self.schema_read(await self.migrator.run())
        conn = None
        try:
            pragmas = ("journal_mode = WAL", "synchronous = FULL", "busy_timeout = 10000",
                       f"cache_size = -{WRITE_CACHE_KIB}")
            conn = await WriteConnection.open(self.path, pragmas)
            if self.context:
                await sqlite_rebuild.settle_at_open(conn, self.schema_version)
            if self.schema_version >= sqlite_keywords.KEYED_VERSION:
                self.keyword_keyed = await sqlite_rebuild.key_at_open(conn, self.schema_version)
            uri = f"file:{self.path.resolve()}?mode=ro"
            for _ in range(READERS):
                reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
                self._all_readers.append(reader)  # (closed by close(), whatever happens next)
                await reader.execute("PRAGMA busy_timeout = 10000")
                self._readers.put_nowait(reader)
        except BaseException as exc:
            # An open that failed or was cancelled (a server stopped while opening) closes the
            # write connection it made: its thread would keep the process from exiting.
            if conn is not None:
                await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise sqlite_migrations.storage_error(exc, self.path) from None
            raise
        loop = asyncio.get_running_loop()
        if self.schema_version >= sqlite_keywords.KEYED_VERSION:
            def stale() -> None:  # (on the writer's thread)
                with contextlib.suppress(RuntimeError):  # (the loop closed: so did the store)
                    loop.call_soon_threadsafe(self._postings_wanted.set)

            try:
                follower = postings_follower.PostingsFollower(self.path, stale, postings_file.SavedPostings(self.path))
                await conn.run(follower.install)
            except BaseException:
                await conn.close()
                raise
            conn.watch, self.postings = follower, follower
            self._postings_wanted.set()
            keeping = postings_follower.keep(follower, self._postings_wanted, self._postings_ready)
            self._keeping = loop.create_task(keeping, name="gm-keyword-postings")
        self.writer = Writer(conn, on_commit, self.schema_version)
        self.writer.start()
        if self.schema_version >= sqlite_keywords.KEYED_VERSION and not self.keyword_keyed:
            self._keying = loop.create_task(self._key_keywords(), name="gm-keyword-keying")

    def _postings_ready(self) -> bool:
        return self.keyword_keyed and not self.rebuilding_keywords

    async def _key_keywords(self) -> None:
        """Rebuild a keyword index of an older definition keyed by scope, online (searches read
        the old one until the switch), logging its progress; tried again after a failure."""
        logged = [0.0]

        def report(p: Progress) -> None:
            if p.finished or time.monotonic() - logged[0] >= KEYING_LOG_SECONDS:
                logged[0] = time.monotonic()
                log.info("%s", p.line())

        while not self.keyword_keyed:
            try:
                log.info("rebuilding the keyword index of %s keyed by scope (searches use the old one meanwhile)",
                         self.path)
                await sqlite_rebuild.rebuild(self, report)
                self._postings_wanted.set()
            except Exception as exc:  # (a cancellation at close is not one: it ends the task)
                log.warning("rebuilding the keyword index: %s; will retry", getattr(exc, "message", exc))
                await loops.pause(KEYING_RETRY_SECONDS)

    async def close(self) -> None:
        await self.migrator.stop()
        await loops.stop(self._keying)  # (resumed at the next open, from its cursor)
        if self.postings is not None:
            self.postings.close()  # (a build under way stops at once)
        await loops.stop(self._keeping)
        # Readers first: the writer's connection must be the last one to close, so SQLite
        # checkpoints the WAL into the database file (a read-only connection cannot).
        for reader in self._all_readers:
            await reader.close()
        self._all_readers.clear()
        if self.writer is not None:
            await self.writer.stop()
        await self._save_postings()
        self._lock.release()

    async def _save_postings(self) -> None:
        """Save the keyword postings beside the database (the Writer has stopped)."""
        postings = self.postings.postings if self.postings is not None else None
        if postings is None:
            return
        try:
            await asyncio.to_thread(postings_file.save, postings, self.path)
        except (OSError, sqlite3.Error) as exc:
            log.warning("saving the keyword postings of %s failed (%s): they are built again at the next open",
                        self.path, exc)

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            self._readers.put_nowait(conn)

    def params(self) -> Params:
        return QMarks()

    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        async with self._reader() as conn:
            try:
                return list(await conn.execute_fetchall(sql, values))
            except sqlite3.Error as exc:
                if statement_error(exc):  # as on Postgres: a value the query could not take is the caller's
                    raise InvalidInput(f"the database refused the query: {exc}") from None
                raise StorageUnavailable(f"reading {self.path} failed: {exc}") from None
            except ValueError as exc:  # aiosqlite's, for a read still under way when the store closed
                if str(exc) != "Connection closed":
                    raise
                raise StoreClosed("the store is closed; open it again with gm.open()") from None

    async def keyword_search(
        self, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
        *, time_range: TimeRange | None = None,
    ) -> builtins.list[tuple[int, float]]:
        if not terms:
            return []
        args = (terms, scope, filter, limit, now, time_range, self.schema_version)
        if self.keyword_keyed:
            rank = self._rank if self.postings is not None and self.postings.postings is not None else None
            return await sqlite_keywords.search(self.slots, *args, rank=rank)
        if self.context:
            return await sqlite_keywords.search_unkeyed(self.fetch, *args)
        return await sqlite_keywords.search_unkeyed(self.fetch, *args, table="memories_fts", rank="bm25(memories_fts)")

    async def _rank(
        self, terms: builtins.list[str], low: int, high: int, depth: int,
    ) -> tuple[builtins.list[tuple[int, float]], bool] | None:
        assert self.postings is not None  # (given as the rank only with postings)
        return await asyncio.to_thread(self.postings.top, terms, low, high, depth)

    async def rebuild_keyword(self, progress: OnProgress | None = None, *, batch: int = sqlite_rebuild.BATCH) -> None:
        """A new FTS5 table built beside the live one, ``batch`` rows a step (gm.storage.sqlite_rebuild);
        the background rebuild after open, if one is under way, gives way to it (this one resumes it).
        The keyword postings are built again from the new table."""
        await loops.stop(self._keying)
        try:
            await sqlite_rebuild.rebuild(self, progress, batch=batch)
        finally:
            if self.postings is not None:
                self.postings.refresh = True
            self._postings_wanted.set()

    def size_bytes(self) -> int | None:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total
