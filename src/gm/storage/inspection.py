"""Inspection of a whole database: a read-only, consistent view opened without migrating or
locking it (safe while servers run on it), for what ``gmem status`` reports and an export reads.
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

from gm.errors import SchemaTooNew, StorageUnavailable
from gm.memory import now_ms
from gm.model_identity import META_KEYS, RecordedModel, recorded_model
from gm.reembed import recorded
from gm.storage import is_postgres_url, postgres_migrations, sqlite_files, sqlite_migrations
from gm.storage.postgres_pool import DB_ERRORS, connect, redact
from gm.storage.postgres_vectors import HAS_VEC, register_codec
from gm.storage.reads import Reads
from gm.storage.sql import Numbered, Params, QMarks, live


class Inspection(Reads):
    """One database as it is now, read in one transaction."""

    backend: str
    where: str  # the file, or the URL without its password
    latest: int  # the newest schema this release knows
    pending: str  # what readiness says while migrations are pending

    @abc.abstractmethod
    def guard(self) -> None:
        """Refuse a schema newer than this release can read (SchemaTooNew)."""

    @abc.abstractmethod
    async def size(self) -> int | None: ...

    @abc.abstractmethod
    async def memory_columns(self) -> set[str]:
        """The columns of ``memories`` (a re-embed under way adds ``embedding_next``)."""

    async def details(self) -> dict[str, Any]:
        """What this backend adds to a status report."""
        return {}

    def readiness(self) -> str:
        try:
            self.guard()
        except SchemaTooNew:
            return "refused: newer than this release"
        if self.schema_version > self.latest:
            return "newer than this release, backward compatible (this release runs on it)"
        return "ready" if self.schema_version == self.latest else self.pending

    async def status(self) -> dict[str, Any]:
        """Everything ``gmem status`` reports on the database."""
        namespaces = await self.counts(now_ms()) if self.schema_version > 0 else {}
        return {
            "target": self.where,
            "backend": self.backend,
            "schema_version": self.schema_version,
            "latest_schema_version": self.latest,
            "migrations_pending": self.schema_version < self.latest,
            "readiness": self.readiness(),
            "memories": sum(namespaces.values()),
            "namespaces": namespaces,
            "database_bytes": await self.size(),
            **await self.model_fields(),
            **await self.reembedding(),
            **await self.details(),
        }

    async def reembedding(self) -> dict[str, Any]:
        """The re-embed under way (its model, how many memories have its vector) and the old
        vectors a switch left, awaiting ``gmem reembed --drop-old`` (gm.reembed.Recorded)."""
        if self.schema_version == 0:
            return {"reembed": None, "old_vectors": None}
        found = await recorded(self, next_column="embedding_next" in await self.memory_columns())
        return found.to_dict()

    async def meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        p = self.params()
        rows = await self.fetch(f"SELECT value FROM meta WHERE key = {p(key)}", p.values)
        return str(rows[0][0]) if rows else None

    async def recorded_model(self) -> RecordedModel | None:
        """Which model made the stored vectors (None: none recorded yet)."""
        if self.schema_version == 0:
            return None
        p = self.params()
        marks = ", ".join(p(key) for key in META_KEYS)
        rows = await self.fetch(f"SELECT key, value FROM meta WHERE key IN ({marks})", p.values)
        return recorded_model({str(row[0]): str(row[1]) for row in rows})

    async def model_fields(self) -> dict[str, str | None]:
        """``model`` (the stored vectors' model: its content identity, or the old-scheme
        ``label@digest`` an older release recorded) and ``model_label``, for status and export."""
        recorded = await self.recorded_model()
        return {"model": recorded.shown if recorded else None, "model_label": recorded.label if recorded else None}

    async def total(self, now: int, namespace: str | None) -> int:
        """How many live memories (of ``namespace``, when given) an export writes."""
        p = self.params()
        where = live(p, now) + ("" if namespace is None else f" AND namespace = {p(namespace)}")
        rows = await self.fetch(f"SELECT count(*) FROM memories WHERE {where}", p.values)
        return int(rows[0][0])

    async def export_rows(
        self, now: int, *, vectors: bool, namespace: str | None, page: int = 1000
    ) -> AsyncIterator[builtins.list[Any]]:
        """Every live memory (of ``namespace``, when given) in rowid order, in pages of rows of
        ``columns`` followed by the embedding when ``vectors`` (what an export writes)."""
        columns = self.columns + (", embedding" if vectors else "")
        last = 0
        while True:
            p = self.params()
            where = f"rowid > {p(last)} AND {live(p, now)}"
            if namespace is not None:
                where += f" AND namespace = {p(namespace)}"
            rows = await self.fetch(f"SELECT {columns} FROM memories WHERE {where} ORDER BY rowid LIMIT {page}",
                                    p.values)
            if not rows:
                return
            yield rows
            last = rows[-1][0]


class SQLiteInspection(Inspection):
    backend = "sqlite"
    latest = sqlite_migrations.LATEST
    pending = "migrations pending (applied on next open)"

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

    async def memory_columns(self) -> set[str]:
        return {str(row[1]) for row in await self.fetch("PRAGMA table_info(memories)", [])}

    async def details(self) -> dict[str, Any]:
        return {"in_use_by": sqlite_files.holder(self.path)}


class PostgresInspection(Inspection):
    backend = "postgres"
    latest = postgres_migrations.LATEST
    pending = "migrations pending (the first instance to start applies them)"

    def __init__(self, where: str, conn: asyncpg.Connection, version: int, compatible_from: int, doing: str) -> None:
        self.where = where
        self.doing = doing
        self.conn = conn
        self.compatible_from = compatible_from
        self.schema_read(version)

    def params(self) -> Params:
        return Numbered()

    async def fetch(self, sql: str, values: builtins.list[Any]) -> builtins.list[Any]:
        try:
            return list(await self.conn.fetch(sql, *values))
        except DB_ERRORS as exc:
            raise StorageUnavailable(self.doing.format(where=self.where, error=exc)) from None

    def guard(self) -> None:
        postgres_migrations.guard(self.where, self.schema_version, self.compatible_from, self.latest)

    async def size(self) -> int | None:
        rows = await self.fetch("SELECT pg_database_size(current_database())", [])
        return int(rows[0][0])

    async def memory_columns(self) -> set[str]:
        rows = await self.fetch("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                "current_schema() AND table_name = 'memories'", [])
        return {str(row[0]) for row in rows}

    async def details(self) -> dict[str, Any]:
        vectors = None
        if self.schema_version > 0:
            has_vec = (await self.fetch(HAS_VEC, []))[0][0]
            vectors = "pgvector (HNSW, cosine)" if has_vec else "in-process index in each instance"
        rows = await self.fetch(  # each instance's connections carry its name (see SERVER_SETTINGS)
            "SELECT count(DISTINCT application_name) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'greatmemory %' AND application_name <> current_setting('application_name')",
            [],
        )
        return {"vector_search": vectors, "connected_instances": rows[0][0]}


READING = "cannot read {where}: {error}"
EXPORTING = "exporting from {where} failed: {error}"


@asynccontextmanager
async def inspect(target: str, doing: str = READING) -> AsyncIterator[Inspection]:
    """An inspection of the SQLite file or ``postgresql://`` database ``target``; raises
    StorageUnavailable (its message from ``doing``) if there is none or it cannot be read."""
    if is_postgres_url(target):
        async with _postgres(target, doing) as pg:
            yield pg
        return
    path = sqlite_migrations.check_path(target)
    if not path.is_file():
        raise StorageUnavailable(f"there is no database at {path}")
    version = sqlite_migrations.read_version(path) or 0
    with sqlite_migrations.reading(path) as conn:
        conn.execute("BEGIN")  # one consistent view until closed
        yield SQLiteInspection(path, conn, version)


@asynccontextmanager
async def _postgres(url: str, doing: str) -> AsyncIterator[PostgresInspection]:
    where = redact(url)
    async with AsyncExitStack() as stack:
        conn = await connect(url, register_codec)
        stack.push_async_callback(conn.close)
        try:
            version, compatible_from = await postgres_migrations.read_version(conn)
            # One snapshot of the whole database; left (not committed) by closing the connection.
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except DB_ERRORS as exc:
            raise StorageUnavailable(doing.format(where=where, error=exc)) from None
        yield PostgresInspection(where, conn, version, compatible_from, doing)
