"""A read-only, consistent view of a whole database, opened without migrating or locking it
(safe while servers run on it): what ``gmem status`` reports and what an export reads.
"""

from __future__ import annotations

import abc
import builtins
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from gm.errors import StorageUnavailable
from gm.memory import now_ms
from gm.storage import is_postgres_url, postgres_migrations, sqlite_files, sqlite_migrations
from gm.storage.postgres_pool import DB_ERRORS, Pools, redact
from gm.storage.postgres_vectors import has_vec_column, register_codec
from gm.storage.reads import Reads
from gm.storage.sql import Numbered, Params, QMarks

PENDING = {"sqlite": "migrations pending (applied on next open)",
           "postgres": "migrations pending (the first instance to start applies them)"}


class Snapshot(Reads):
    """One database as it is now, read in one transaction."""

    backend: str
    where: str  # the file, or the URL without its password
    latest: int  # the newest schema this release knows
    compatible_from = 0  # the oldest release's schema that runs on it (Postgres)

    @abc.abstractmethod
    def guard(self) -> None:
        """Refuse a schema newer than this release can read (SchemaTooNew)."""

    @abc.abstractmethod
    async def size(self) -> int | None: ...

    async def details(self) -> dict[str, Any]:
        """What this backend adds to a status report."""
        return {}

    def readiness(self) -> str:
        if self.schema_version > self.latest:
            if self.compatible_from and self.compatible_from <= self.latest:
                return "newer than this release, backward compatible (this release runs on it)"
            return "refused: newer than this release"
        return "ready" if self.schema_version == self.latest else PENDING[self.backend]

    async def status(self) -> dict[str, Any]:
        """Everything ``gmem status`` reports on the database."""
        namespaces = await self.counts(now_ms()) if self.schema_version > 0 else {}
        report: dict[str, Any] = {
            "target": self.where,
            "backend": self.backend,
            "schema_version": self.schema_version,
            "latest_schema_version": self.latest,
            "migrations_pending": self.schema_version < self.latest,
            "readiness": self.readiness(),
        }
        return {**report, "memories": sum(namespaces.values()), "namespaces": namespaces,
                "database_bytes": await self.size(),
                "model": await self.meta("model") if self.schema_version > 0 else None, **await self.details()}


class SQLiteSnapshot(Snapshot):
    backend = "sqlite"
    latest = sqlite_migrations.LATEST

    def __init__(self, path: Path, conn: sqlite3.Connection, version: int) -> None:
        self.path = path
        self.where = str(path)
        self.conn = conn
        self.schema_read(version)

    def params(self) -> Params:
        return QMarks()

    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        try:
            return self.conn.execute(sql, values).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StorageUnavailable(f"cannot read {self.path}: {exc}") from None

    def guard(self) -> None:
        sqlite_migrations.guard(self.path, self.schema_version, self.latest)

    async def size(self) -> int | None:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())

    async def details(self) -> dict[str, Any]:
        return {"in_use_by": sqlite_files.holder(self.path)}


class PostgresSnapshot(Snapshot):
    backend = "postgres"
    latest = postgres_migrations.LATEST

    def __init__(self, url: str, conn: asyncpg.Connection, version: int, compatible_from: int) -> None:
        self.where = redact(url)
        self.conn = conn
        self.compatible_from = compatible_from
        self.schema_read(version)

    def params(self) -> Params:
        return Numbered()

    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        try:
            return list(await self.conn.fetch(sql, *values))
        except DB_ERRORS as exc:
            raise StorageUnavailable(f"cannot read {self.where}: {exc}") from None

    def guard(self) -> None:
        postgres_migrations.guard(self.where, self.schema_version, self.compatible_from, self.latest)

    async def size(self) -> int | None:
        rows = await self.fetch("SELECT pg_database_size(current_database())", [])
        return int(rows[0][0])

    async def details(self) -> dict[str, Any]:
        vectors = None
        if self.schema_version > 0:
            vectors = ("pgvector (HNSW, cosine)" if await has_vec_column(self.conn)
                       else "in-process index in each instance")
        rows = await self.fetch(  # each instance's connections carry its name (see SERVER_SETTINGS)
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'greatmemory %' AND application_name <> current_setting('application_name')",
            [],
        )
        return {"vector_search": vectors, "connected_instances": rows[0][0]}


@asynccontextmanager
async def snapshot(target: str) -> AsyncIterator[Snapshot]:
    """A snapshot of the SQLite file or ``postgresql://`` database ``target``; raises
    StorageUnavailable if there is none or it cannot be read."""
    if is_postgres_url(target):
        async with _postgres(target) as pg:
            yield pg
        return
    path = sqlite_migrations.check_path(target)
    if not path.is_file():
        raise StorageUnavailable(f"there is no database at {path}")
    version = sqlite_migrations.read_version(path) or 0
    with sqlite_migrations.reading(path) as conn:
        conn.execute("BEGIN")  # one consistent snapshot until closed
        yield SQLiteSnapshot(path, conn, version)


@asynccontextmanager
async def _postgres(url: str) -> AsyncIterator[PostgresSnapshot]:
    async with AsyncExitStack() as stack:
        conn = await Pools(url, register_codec).connect()
        stack.push_async_callback(conn.close)
        try:
            version, compatible_from = await postgres_migrations.read_version(conn)
            transaction = conn.transaction(isolation="repeatable_read", readonly=True)
            await transaction.start()
        except DB_ERRORS as exc:
            raise StorageUnavailable(f"cannot read {redact(url)}: {exc}") from None
        yield PostgresSnapshot(url, conn, version, compatible_from)
        await transaction.rollback()
