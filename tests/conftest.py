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
import itertools
import os
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

import gm
import gm.embedding
from gm.config import EMBED_THREADS
from gm.embedding import Encoder, ModelSpec
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
        self.supplies: dict[bool, DatabaseSupply] = {}

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

    def create(self, migrated: bool = False) -> str:
        """A new database's name: empty, or (``migrated``) a copy of one at the latest schema."""
        self.require()
        if migrated not in self.supplies:
            self.supplies[migrated] = DatabaseSupply(self.admin_url, migrated)
        return self.supplies[migrated].take()

    def drop(self, name: str) -> None:
        for supply in self.supplies.values():
            if supply.owns(name):
                supply.give_back(name)
                return
        _run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        """Drops every database still made or to be dropped (at the session's end)."""
        for supply in self.supplies.values():
            supply.close()
        self.supplies.clear()


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
        self.close()
        if self.server is not None:
            self.server.cleanup()
            self.server = None


POSTGRES = PostgresServer(ADMIN_URL)
PGVECTOR = PgvectorServer()


def pytest_sessionfinish(session: pytest.Session) -> None:
    POSTGRES.close()
    PGVECTOR.stop()


def _target(backend: str, directory: Path, migrated: bool = False) -> Iterator[str]:
    if backend == "sqlite":
        yield str(directory / "mem.db")
        return
    server = POSTGRES if backend == "postgres" else PGVECTOR
    name = server.create(migrated)
    try:
        yield server.url_of(name)
    finally:
        server.drop(name)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file path, or a postgresql:// URL. Under the ``store``
    fixture, which migrates it at once, a Postgres one comes migrated already (a copy of a
    migrated template: 0.1-0.3 s less a test than running the steps on it)."""
    yield from _target(request.param, tmp_path, migrated="store" in request.fixturenames)


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


class DatabaseSupply:
    """Makes Postgres databases ahead and drops used ones, on threads of their own, so a test
    waits for neither: on this 2-core machine, beside other runs, CREATE DATABASE took
    0.12-0.5 s and DROP DATABASE 0.02-0.7 s (at times seconds), for each of the hundreds of
    tests that get a database of their own (test_memories alone: 131 s -> 74 s, with the
    template and the shared model below). Each test still gets a database made for it alone,
    dropped after it.

    ``migrated`` databases are copies (CREATE DATABASE ... TEMPLATE) of one that
    ``gm.open`` migrated to the latest schema once, when the supply starts.
    """

    AHEAD = 3  # databases kept made: a test takes one, a worker makes its replacement
    WORKERS = 3  # a slow DROP on one does not hold up the CREATEs on the others
    CREATE, DROP, STOP = 0, 1, 2  # the order the workers take their work in

    def __init__(self, admin_url: str, migrated: bool) -> None:
        self.admin_url = admin_url
        self.prefix = f"gm_test_{uuid.uuid4().hex[:6]}_"
        self.template = self.prefix + "template" if migrated else None
        self._work: queue.PriorityQueue[tuple[int, int, str]] = queue.PriorityQueue()
        self._made: queue.Queue[str | BaseException] = queue.Queue()
        self._order = itertools.count()
        self._failure: BaseException | None = None
        if self.template is not None:
            _run(self._make_template(self.template))
        for _ in range(self.AHEAD):
            self._ask(self.CREATE)
        self._workers = [threading.Thread(target=self._serve, name="gm-test-databases", daemon=True)
                         for _ in range(self.WORKERS)]
        for worker in self._workers:
            worker.start()

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix)

    def take(self) -> str:
        self._ask(self.CREATE)
        deadline = time.monotonic() + 60
        while True:
            try:
                made = self._made.get(timeout=0.5)
            except queue.Empty:
                if self._failure is not None:
                    raise self._failure from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no database made in 60 s on {self.admin_url}: is it overloaded?") from None
                continue
            if isinstance(made, BaseException):
                raise made
            return made

    def give_back(self, name: str) -> None:
        self._ask(self.DROP, name)

    def close(self) -> None:
        """Waits for the drops asked for, then drops what was made and not taken."""
        for _ in self._workers:
            self._ask(self.STOP)
        for worker in self._workers:
            worker.join(120)
        left = [made for made in iter_queue(self._made) if isinstance(made, str)]
        _run(self._drop(*left, *([self.template] if self.template else [])))

    def _ask(self, kind: int, name: str = "") -> None:
        self._work.put((kind, next(self._order), name))

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        conn: asyncpg.Connection | None = None
        try:
            while True:
                kind, _, name = self._work.get()
                if kind == self.STOP:
                    break
                try:
                    if conn is None or conn.is_closed():
                        conn = loop.run_until_complete(asyncpg.connect(self.admin_url, timeout=5))
                    if kind == self.CREATE:
                        self._made.put(loop.run_until_complete(self._create(conn)))
                    else:
                        loop.run_until_complete(conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    if kind == self.CREATE:  # the test that asked hears it; a failed drop leaves a database
                        self._made.put(exc)
        except BaseException as exc:  # noqa: BLE001 - every taker hears it
            self._failure = exc
        finally:
            if conn is not None:
                loop.run_until_complete(conn.close())
            loop.close()

    async def _create(self, conn: asyncpg.Connection) -> str:
        name = self.prefix + uuid.uuid4().hex[:12]
        if self.template is None:
            await conn.execute(f'CREATE DATABASE "{name}"')
            return name
        for attempt in itertools.count():
            try:
                await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
                return name
            except asyncpg.ObjectInUseError:  # the template's last session is still going away
                if attempt == 50:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def _make_template(self, name: str) -> None:
        conn = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        async with gm.open(urlsplit(self.admin_url)._replace(path=f"/{name}").geturl()):
            pass

    async def _drop(self, *names: str) -> None:
        conn = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            for name in names:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def iter_queue(items: queue.Queue[Any]) -> Iterator[Any]:
    """What is in ``items`` now, taken out."""
    while True:
        try:
            yield items.get_nowait()
        except queue.Empty:
            return


# -- one loaded model for the session's in-process stores ------------------------------

_ENCODERS: dict[tuple[Any, ...], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def _shared_encoder(spec: ModelSpec, threads: int | None = None) -> Encoder:
    """The Encoder every Embedder of this process gets for the same model files and threads.
    Loading one took 0.2-0.3 s (0.3-0.5 s beside other runs), and a full run's tests open 545
    stores that load the model; the model is the same real one, loaded for real once. (Servers
    and CLIs run as child processes still load it each time; test_embedder builds its own.)"""
    key = tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else str(path)
                for path in (spec.model_path, spec.tokenizer_path))
    key += (EMBED_THREADS.read() if threads is None else threads,)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(spec, threads)
        return _ENCODERS[key]


@pytest.fixture(autouse=True, scope="session")
def shared_model() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gm.embedding, "Encoder", _shared_encoder)
        yield
