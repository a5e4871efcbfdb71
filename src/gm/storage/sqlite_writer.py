"""The SQLite Writer: the actor that owns the database's only write connection and runs
each batch of writes (gm.storage.write_flow) in one transaction, a savepoint per write.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite

from gm.actor import Envelope
from gm.errors import GMError, InvalidInput, StorageUnavailable
from gm.storage.batch_writer import BatchWriter
from gm.storage.ops import IndexChange, WriteOp, WriteResult, final_changes
from gm.storage.sql import Params, QMarks
from gm.storage.transaction import Transaction
from gm.storage.write_flow import apply_batch

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


class SQLiteTransaction(Transaction):
    """The Writer's connection inside ``BEGIN IMMEDIATE``."""

    def __init__(self, conn: aiosqlite.Connection, version: int) -> None:
        super().__init__(version)
        self.conn = conn

    def params(self) -> Params:
        return QMarks()

    async def fetch(self, sql: str, values: list[Any]) -> list[Any]:
        return list(await self.conn.execute_fetchall(sql, values))

    async def execute(self, sql: str, values: list[Any]) -> None:
        await self.conn.execute(sql, values)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.conn.executemany(sql, rows)

    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        await self.conn.execute("SAVEPOINT op")
        try:
            yield
        except Exception as exc:
            if not database_failed(exc):  # (a failing database is rolled back whole by the Writer)
                await self.conn.execute("ROLLBACK TO op")
                await self.conn.execute("RELEASE op")
            raise
        await self.conn.execute("RELEASE op")

    async def memory_columns(self) -> set[str]:
        return {r[0] for r in await self.conn.execute_fetchall("SELECT name FROM pragma_table_info('memories')")}

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
        self, conn: aiosqlite.Connection, on_commit: Callable[[list[IndexChange]], Awaitable[None]], version: int
    ) -> None:
        super().__init__()
        self.conn = conn
        self.on_commit = on_commit
        self.version = version

    async def handle(self, batch: list[Envelope[WriteOp, object]]) -> None:
        started = time.perf_counter()
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            stamp = self.next_stamp()  # the write lock is held from here to COMMIT: stamps follow commit order
            outcomes = await apply_batch(SQLiteTransaction(self.conn, self.version), [e.msg for e in batch], stamp)
            await self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                await self.conn.execute("ROLLBACK")
            self.fail_all(batch, StorageUnavailable(f"the database refused the write: {exc}"))
            return
        self.health.committed(len(batch), time.perf_counter() - started)
        changes = final_changes([c for o in outcomes if isinstance(o, WriteResult) for c in o.changes])
        if changes:
            await self.on_commit(changes)
        self.reply(batch, outcomes)

    async def on_stop(self) -> None:
        await self.conn.close()
