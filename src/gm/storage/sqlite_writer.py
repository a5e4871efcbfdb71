"""The SQLite Writer: the actor that owns the database's only write connection and runs
each batch of writes (gm.storage.write_flow) in one transaction, a savepoint per write.

The connection lives on a thread of its own (:class:`WriteConnection`, aiosqlite's idea
without a hop per statement): a whole batch, BEGIN to COMMIT, runs there in one call, the
write flow's coroutine driven to its end on that thread by :func:`drive`, since a
:class:`SQLiteTransaction`'s statements complete without suspending. A hop a statement cost
5-6 thread round trips an add, each waking the thread and then the event loop: 32 concurrent
adds with their vectors took 0.71-0.86 ms of CPU an add that way, 0.41 ms in one hop (measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from gm.actor import Envelope
from gm.errors import GMError, InvalidInput, StorageUnavailable, StoreClosed
from gm.storage.batch_writer import BatchWriter
from gm.storage.ops import IndexChange, WriteOp, WriteResult, final_changes
from gm.storage.sql import Params, QMarks
from gm.storage.transaction import Transaction
from gm.storage.write_flow import apply_batch

T = TypeVar("T")

# SQLITE_ERROR, TOOBIG, CONSTRAINT, MISMATCH, RANGE: the statement was wrong, not the database.
_STATEMENT_ERRORS = frozenset({1, 18, 19, 20, 25})
# ...except that SQLITE_ERROR also says a table or column is missing: the schema is damaged
# (someone dropped a table), and the database cannot serve until it is restored.
_SCHEMA_MISSING = ("no such table", "no such column")


def statement_error(exc: BaseException) -> bool:
    """True if SQLite refused the statement itself (a value it cannot hold, a constraint)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _STATEMENT_ERRORS and not str(exc).startswith(_SCHEMA_MISSING)


def database_failed(exc: BaseException) -> bool:
    """True if the database itself failed (disk, I/O, lock), not the one statement."""
    return isinstance(exc, sqlite3.Error) and not statement_error(exc)


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on this thread. It must never suspend: the write flow awaits
    nothing but its :class:`SQLiteTransaction`, whose statements return at once."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a write on SQLite waited for something other than its transaction")


class Watch(Protocol):
    """What follows the write connection's transactions (gm.storage.postings_follower): ``frame``
    is held from BEGIN until ``after`` has run, committed or rolled back."""

    frame: threading.Lock

    def after(self, conn: sqlite3.Connection) -> None: ...


class WriteConnection:
    """The database's one write connection and the thread that alone uses it."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gm-sqlite-write")
        self._conn: sqlite3.Connection | None = None
        self.watch: Watch | None = None

    @classmethod
    async def open(cls, path: Path, pragmas: Sequence[str]) -> WriteConnection:
        opened = cls()

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for pragma in pragmas:
                    conn.execute(f"PRAGMA {pragma}")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            opened._conn = await opened._call(connect)
        except BaseException:
            opened._thread.shutdown(wait=False)
            raise
        return opened

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` on the connection's thread."""
        conn = self._conn
        if conn is None:
            raise StoreClosed("the database's write connection is closed; open the store again")
        return await self._call(lambda: work(conn))

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
        """``work`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` on the thread; anything it raises
        rolls the whole transaction back."""

        def framed(conn: sqlite3.Connection) -> T:
            watch = self.watch
            with watch.frame if watch is not None else contextlib.nullcontext():
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    if watch is not None:
                        watch.after(conn)
            return result

        return self.run(framed)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await self._call(conn.close)
        finally:
            self._thread.shutdown(wait=False)


class SQLiteTransaction(Transaction):
    """The write connection inside ``BEGIN IMMEDIATE``, on its own thread: each statement runs
    there and then, so its coroutines return without suspending (see :func:`drive`)."""

    def __init__(self, conn: sqlite3.Connection, version: int) -> None:
        super().__init__(version)
        self.conn = conn

    def params(self) -> Params:
        return QMarks()

    async def fetch(self, sql: str, values: list[Any]) -> list[Any]:
        return self.conn.execute(sql, values).fetchall()

    async def execute(self, sql: str, values: list[Any]) -> None:
        self.conn.execute(sql, values)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        self.conn.execute("SAVEPOINT op")
        try:
            yield
        except Exception as exc:
            if not database_failed(exc):  # (a failing database is rolled back whole by the Writer)
                self.conn.execute("ROLLBACK TO op")
                self.conn.execute("RELEASE op")
            raise
        self.conn.execute("RELEASE op")

    async def memory_columns(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM pragma_table_info('memories')")}

    def refusal(self, exc: Exception) -> GMError | None:
        if database_failed(exc):
            return None  # the whole batch fails
        # A rejected write, or one SQLite cannot hold or run (an integer past 64 bits, an
        # expression too deep): only it fails; the others in the batch still commit.
        return exc if isinstance(exc, GMError) else InvalidInput(f"the database refused it: {exc}")


class Writer(BatchWriter):
    """Owns the database's only write connection. Drains its mailbox into one
    transaction (group commit; each message in its own savepoint so one failure does not
    spoil the others), commits, lets the index follow, then replies: a reply is durable."""

    name = "writer"

    def __init__(
        self, conn: WriteConnection, on_commit: Callable[[list[IndexChange]], Awaitable[None]], version: int
    ) -> None:
        super().__init__()
        self.conn = conn
        self.on_commit = on_commit
        self.version = version

    async def handle(self, batch: list[Envelope[WriteOp, object]]) -> None:
        started = time.perf_counter()
        ops = [e.msg for e in batch]

        def apply(conn: sqlite3.Connection) -> list[WriteResult | GMError]:
            stamp = self.next_stamp()  # the write lock is held from here to COMMIT: stamps follow commit order
            return drive(apply_batch(SQLiteTransaction(conn, self.version), ops, stamp))

        try:
            outcomes = await self.conn.transaction(apply)
        except sqlite3.Error as exc:
            self.fail_all(batch, StorageUnavailable(f"the database refused the write: {exc}"))
            return
        self.health.committed(len(batch), time.perf_counter() - started)
        changes = final_changes([c for o in outcomes if isinstance(o, WriteResult) for c in o.changes])
        if changes:
            await self.on_commit(changes)
        self.reply(batch, outcomes)

    async def on_stop(self) -> None:
        await self.conn.close()
