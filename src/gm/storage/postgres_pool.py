"""Connections to a Postgres database: the two pools (requests' reads; the Writer and the
background work), one-off connections, how a failure is classified, and the one retry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from gm.errors import InvalidInput, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT = 5.0
COMMAND_TIMEOUT = 30.0
POOL_SIZE = 8
OWN_POOL_SIZE = 3
IDLE_IN_TRANSACTION_TIMEOUT = "60s"  # the server ends a writer stalled mid-transaction, freeing its locks
SERVER_SETTINGS = {"application_name": f"greatmemory {socket.gethostname()}:{os.getpid()}"}
# SQLSTATE classes that mean a value the caller gave was refused, not that the database
# failed: data exceptions, integrity violations, program limits (a filter too complex).
_STATEMENT_CLASSES = ("22", "23", "54")
# InternalClientError: asyncpg's state after the server ended the connection while it was idle.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
Init = Callable[[asyncpg.Connection], Awaitable[None]]


def redact(url: str) -> str:
    """The URL without its password (in the user part or a ``password`` parameter), for
    messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)], safe="/:*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def statement_error(exc: BaseException) -> bool:
    """True if Postgres refused the statement itself (bad value, constraint, limit)."""
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _STATEMENT_CLASSES


def connection_lost(exc: BaseException) -> bool:
    return isinstance(exc, (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                            OSError, asyncpg.AdminShutdownError, asyncpg.CannotConnectNowError))


def unavailable(exc: BaseException, doing: str) -> StorageUnavailable:
    if isinstance(exc, StorageUnavailable):
        return exc
    if connection_lost(exc):
        return StorageUnavailable(f"{doing} failed: Postgres is unreachable or dropped the connection ({exc})")
    return StorageUnavailable(f"{doing} failed: Postgres refused it ({type(exc).__name__}: {exc})")


async def once_more(
    run: Callable[[], Awaitable[T]], may_retry: Callable[[BaseException], bool], doing: str,
    on_retry: Callable[[BaseException], None] = lambda exc: None,
) -> T:
    """Run ``run``; if it fails in a way ``may_retry`` accepts (a connection that died under
    it, a batch that cannot have committed), run it once more on a fresh connection. A
    failure of the database is StorageUnavailable."""
    for attempt in (1, 2):
        try:
            return await run()
        except (StorageUnavailable, *DB_ERRORS) as exc:
            if attempt == 2 or not may_retry(exc):
                raise unavailable(exc, doing) from None
            on_retry(exc)
    raise AssertionError("unreachable")


async def connect(url: str, init: Init) -> asyncpg.Connection:
    """A connection of its own (migrations, LISTEN, inspection), set up as the pools' are."""
    conn: asyncpg.Connection | None = None
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT, server_settings=SERVER_SETTINGS)
        await init(conn)
        return conn
    except DB_ERRORS as exc:
        if conn is not None:
            conn.terminate()
        raise StorageUnavailable(f"cannot connect to {redact(url)}: {exc}") from None


class Acquire:
    """``async with pools.acquire(...)``: a pooled connection; failures to get one are
    StorageUnavailable, and a connection that broke is never handed to the next caller."""

    def __init__(self, pool: asyncpg.Pool, doing: str) -> None:
        self.pool = pool
        self.doing = doing
        self.conn: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            self.conn = await self.pool.acquire(timeout=CONNECT_TIMEOUT)
        except DB_ERRORS as exc:
            raise unavailable(exc, self.doing) from None
        conn: asyncpg.Connection = self.conn
        return conn

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and connection_lost(exc):
            self.conn.terminate()  # the pool replaces it
        try:
            await self.pool.release(self.conn)
        except DB_ERRORS:
            pass


class Pools:
    """A database's connections: ``reads`` for requests, ``own`` for the Writer, the change
    feed, the vector backfill and readyz (never queued behind requests' reads)."""

    def __init__(self, url: str, init: Init, size: int = POOL_SIZE) -> None:
        self.url = url
        self.where = redact(url)
        self.init = init
        self.size = size
        self.reads: asyncpg.Pool | None = None
        self.own: asyncpg.Pool | None = None

    async def open(self) -> None:
        self.reads = await self._create(self.size)
        settings = {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT}
        self.own = await self._create(OWN_POOL_SIZE, settings)

    async def _create(self, size: int, settings: dict[str, str] | None = None) -> asyncpg.Pool:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=size, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
            init=self.init, server_settings={**SERVER_SETTINGS, **(settings or {})},
        )
        return pool

    async def close(self) -> None:
        for pool in (self.reads, self.own):
            if pool is not None:
                try:
                    async with asyncio.timeout(10):
                        await pool.close()
                except DB_ERRORS:
                    pool.terminate()
        self.reads = self.own = None

    async def connect(self) -> asyncpg.Connection:
        return await connect(self.url, self.init)

    def acquire(self, doing: str, *, own: bool = False) -> Acquire:
        pool = self.own if own else self.reads
        if pool is None:
            raise StorageUnavailable("the database is not open")
        return Acquire(pool, doing)

    async def fetch(self, sql: str, values: list[Any], *, own: bool = False, doing: str = "reading") -> list[Any]:
        """Run a read; a request's read (not ``own``) on a connection that died under it is
        retried once on a fresh one (the background work and readyz look again anyway)."""
        async def run() -> list[Any]:
            async with self.acquire(doing, own=own) as conn:
                try:
                    return list(await conn.fetch(sql, *values))
                except asyncpg.PostgresError as exc:
                    if statement_error(exc):  # a value the query could not take is the caller's
                        raise InvalidInput(f"the database refused the query: {exc}") from None
                    raise

        return await once_more(run, (lambda exc: False) if own else connection_lost, doing)
