"""Shared fixtures. Everything is real: a SQLite file in pytest's tmp_path or a fresh
Postgres database (dropped afterwards), the default embedding model, no mocks.

``target`` is the one parametrized fixture the backend-neutral tests run through: each
such test runs on SQLite, on Postgres (vectors searched by each instance's in-process
index) and on Postgres with pgvector (HNSW). Postgres is the server at
``GM_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
pgvector comes from a Postgres the ``pgserver`` package (a test dependency) starts in a
temp dir, once per session. Where either is missing those runs are skipped with a reason
saying how to enable them, except under ``CI=true``, where they fail.

Models besides the default (a second real one, a 768-dim one, copies of the default) are
tests/models.py's fixtures, imported here.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

import gm
from tests.models import default_model_copy_dir, paraphrase_model_dir, wide_model_dir  # noqa: F401 - fixtures

BACKENDS = ["sqlite", "postgres", "pgvector"]
ADMIN_URL = os.environ.get("GM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _run(coro: Any) -> Any:
    """Run a coroutine to completion on a loop of its own (fixtures may run inside another loop)."""
    result: dict[str, Any] = {}

    def main() -> None:
        try:
            result["value"] = asyncio.run(coro)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


class PostgresServer:
    """Creates and drops throwaway databases on one Postgres server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.problem: str | None = None

    def find(self) -> str:
        """Check the server answers; the reason to give if not, else ''."""
        try:
            _run(self._admin("SELECT 1"))
            return ""
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            return (
                f"Postgres is not reachable at {self.admin_url} ({exc}); start it "
                "(pg_ctlcluster 15 main start) or set GM_TEST_POSTGRES_URL to a server where "
                "this user may CREATE DATABASE"
            )

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def require(self) -> None:
        if self.problem is None:
            self.problem = self.find()
        if self.problem:
            if os.environ.get("CI"):
                pytest.fail(self.problem)
            pytest.skip(self.problem)

    def url_of(self, name: str) -> str:
        return urlsplit(self.admin_url)._replace(path=f"/{name}").geturl()

    def create(self) -> str:
        self.require()
        name = f"gm_test_{uuid.uuid4().hex[:12]}"
        _run(self._admin(f'CREATE DATABASE "{name}"'))
        return name

    def drop(self, name: str) -> None:
        _run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class PgvectorServer(PostgresServer):
    """A Postgres with pgvector, started by ``pgserver`` in a temp dir on first use."""

    def __init__(self) -> None:
        super().__init__("")
        self.server: Any = None
        self.directory: Path | None = None

    def find(self) -> str:
        if "XDG_RUNTIME_DIR" not in os.environ:  # pgserver warns without a private runtime dir
            os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="gm-runtime-")
        try:
            import pgserver
        except ImportError:
            return "the pgserver package is missing: pip install -e '.[test]' (it bundles Postgres with pgvector)"

        self.directory = Path(tempfile.mkdtemp(prefix="gm-pgvector-"))
        try:
            self.server = pgserver.get_server(self.directory, cleanup_mode="delete")
        except Exception as exc:  # noqa: BLE001 - any start failure is the reason to give
            return f"pgserver could not start a Postgres with pgvector in {self.directory}: {exc}"
        self.admin_url = self.server.get_uri()
        return ""

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None


POSTGRES = PostgresServer(ADMIN_URL)
PGVECTOR = PgvectorServer()


def pytest_sessionfinish(session: pytest.Session) -> None:
    PGVECTOR.stop()


def _target(backend: str, directory: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield str(directory / "mem.db")
        return
    server = POSTGRES if backend == "postgres" else PGVECTOR
    name = server.create()
    try:
        yield server.url_of(name)
    finally:
        server.drop(name)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file path, or a postgresql:// URL."""
    yield from _target(request.param, tmp_path)


@pytest.fixture(scope="module", params=BACKENDS)
def module_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like ``target``, shared by a module's tests."""
    yield from _target(request.param, tmp_path_factory.mktemp("db"))


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database (for Postgres-only tests)."""
    yield from _target("postgres", Path())


@pytest.fixture
def other_pg_url() -> Iterator[str]:
    """A second fresh Postgres database, for tests that move data between two."""
    yield from _target("postgres", Path())


async def pg_fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One query on a connection of its own (sees only what is committed)."""
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


@pytest.fixture
def pgvector_url() -> Iterator[str]:
    """A fresh, empty database on a Postgres that has pgvector."""
    yield from _target("pgvector", Path())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mem.db"


@pytest.fixture
async def store(target: str) -> AsyncIterator[gm.Store]:
    async with gm.open(target) as mem:
        yield mem


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[gm.Store]:
    """For tests that look inside the SQLite file."""
    async with gm.open(db_path) as mem:
        yield mem


class WriteGate:
    """Holds the first write of one kind at a backend's door until released: the moment
    between a caller's checks and its write, made to last. A stand-in for timing only; the
    write itself then runs on the real Writer."""

    def __init__(self, backend: Any, kind: type) -> None:
        self.kind = kind
        self.reached = asyncio.Event()
        self.released = asyncio.Event()
        self.write = backend.write
        backend.write = self._write

    async def _write(self, op: Any) -> Any:
        if isinstance(op, self.kind) and not self.reached.is_set():
            self.reached.set()
            async with asyncio.timeout(60):  # (not wait_for: see gm.loops)
                await self.released.wait()
        return await self.write(op)
