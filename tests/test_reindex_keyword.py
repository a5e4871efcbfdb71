"""The online keyword index rebuild (gm.storage.sqlite_rebuild, gm.storage.postgres_reindex):
under concurrent adds, updates, deletes and searches every live memory ends up found by a word
of its text and no deleted one is; a rebuild killed part-way (kill -9 of the process running it)
resumes; a damaged or missing half-built table is dropped and built again; progress reaches
its total. Real SQLite files and the real Postgres; small data and small batches, to be quick.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from gm.errors import Conflict, StorageUnavailable
from gm.memory import NewMemory, Scope
from gm.progress import Meter, Progress
from gm.storage import sqlite_migrations, sqlite_rebuild
from gm.storage.base import AddMemories, Backend, DeleteMemory, UpdateMemory
from gm.storage.ops import IndexChange
from gm.storage.postgres import PostgresBackend
from gm.storage.postgres_reindex import LEFTOVERS, SEARCH_TSV
from gm.storage.sqlite import SQLiteBackend
from gm.storage.sqlite_keywords import key_sql

SCOPE = Scope("ns", None, None, None)
ROWS = 300
VECTOR = np.ones(384, dtype="<f4").tobytes()  # (vectors play no part in keyword search)


async def ignore_changes(changes: list[IndexChange]) -> None:
    return None


def item(key: str, word: str) -> NewMemory:
    return NewMemory(key, True, SCOPE, f"a memory about {word} and other things", {}, None, vector=VECTOR)


class Workload:
    """Adds, updates and deletes memories, each with a word of its own, and checks by keyword
    search after every write that live words find their memory and dead words nothing."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.words: dict[str, str] = {}  # live memory id -> its word
        self.dead: set[str] = set()  # words of deleted or rewritten memories
        self.serial = 0
        self.writes = 0
        self.random = random.Random(7)

    def word(self) -> str:
        self.serial += 1
        return f"kw{self.serial}x"

    async def populate(self, n: int) -> None:
        for start in range(0, n, 100):
            batch = [(f"m{i}", self.word()) for i in range(start, min(n, start + 100))]
            await self.backend.write(AddMemories([item(key, word) for key, word in batch], 1))
            self.words.update(batch)

    async def hits(self, word: str) -> list[int]:
        return [rowid for rowid, _ in await self.backend.keyword_search([word], SCOPE, None, 10, 1)]

    async def rowid(self, key: str) -> int:
        p = self.backend.params()
        rows = await self.backend.fetch(f"SELECT rowid FROM memories WHERE id = {p(key)}", p.values)
        return int(rows[0][0])

    async def step(self) -> None:
        """One write, then the searches that must see it."""
        kind, key = self.writes % 3, self.random.choice(sorted(self.words))
        self.writes += 1
        gone = None
        if kind == 0:
            key, word = f"new{self.writes}", self.word()
            await self.backend.write(AddMemories([item(key, word)], 1))
            self.words[key] = word
        elif kind == 1:
            word, gone = self.word(), self.words[key]
            await self.backend.write(UpdateMemory(key, 1, text=f"a memory rewritten about {word}"))
            self.words[key] = word
        else:
            await self.backend.write(DeleteMemory(key, 1))
            gone = self.words.pop(key)
        if key in self.words:
            assert await self.hits(self.words[key]) == [await self.rowid(key)], key
        if gone is not None:
            self.dead.add(gone)
            assert await self.hits(gone) == [], gone

    async def check_all(self) -> None:
        for key, word in self.words.items():
            assert await self.hits(word) == [await self.rowid(key)], (key, word)
        for word in self.dead:
            assert await self.hits(word) == [], word


async def run_beside(rebuild: Any, workload: Workload, minimum: int = 20) -> list[Progress]:
    """Run ``rebuild(progress)`` while the workload writes and searches; return the progress
    reports, each checked to come after some writes when there were steps to interleave."""
    seen: list[Progress] = []
    writes_at: list[int] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        writes_at.append(workload.writes)

    task = asyncio.create_task(rebuild(progress))
    async with asyncio.timeout(60):
        while not task.done() or workload.writes < minimum:
            await workload.step()
        await task
    assert writes_at[-1] > writes_at[0], "no write happened while the rebuild was under way"
    return seen


def reached_total(seen: list[Progress]) -> None:
    """Every phase's last report has done == total, and done never went back within a phase."""
    assert seen
    last: dict[str, Progress] = {}
    for p in seen:
        phase = p.phase.split(":")[0]
        if phase in last:
            assert p.done >= last[phase].done or p.phase != last[phase].phase, (last[phase], p)
        last[phase] = p
    for p in last.values():
        assert p.done == p.total and p.finished, p


@pytest.fixture
async def sqlite_backend(db_path: Path) -> AsyncIterator[SQLiteBackend]:
    backend = SQLiteBackend(db_path)
    await backend.open(ignore_changes)
    try:
        yield backend
    finally:
        await backend.close()


def fts_matches_content(db: Path) -> None:
    """FTS5's integrity check, and the index holds exactly one row a memory, under its key (the
    index has no content of its own to compare: a row's words are checked by searches)."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("INSERT INTO memories_search (memories_search, rank) VALUES ('integrity-check', 0)")
        keys = [r[0] for r in conn.execute(f"SELECT {key_sql('m')} FROM memories m ORDER BY 1")]
        assert [r[0] for r in conn.execute("SELECT id FROM memories_search_docsize ORDER BY id")] == keys
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'memories_search%'")}
        assert not {n for n in names if n.startswith(sqlite_rebuild.NEXT)}, names
        assert {"memories_search_insert", "memories_search_delete", "memories_search_update"} <= names
        assert conn.execute("SELECT count(*) FROM meta WHERE key = ?", [sqlite_rebuild.CURSOR]).fetchone()[0] == 0
    finally:
        conn.close()


# -- progress ------------------------------------------------------------------------


def test_meter_counts_the_rate_of_this_run_only() -> None:
    now = [100.0]
    meter = Meter("rows", total=1000, done=400, clock=lambda: now[0])  # 400 done by an earlier run
    assert meter.at(400) == Progress("rows", 400, 1000, 0.0, None)
    now[0] = 102.0
    p = meter.at(600)
    assert (p.rate, p.eta_seconds, p.finished) == (100.0, 4.0, False)
    assert meter.at(1000, total=1000).eta_seconds == 0.0


# -- SQLite ----------------------------------------------------------------------------


def live_definition(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT sql FROM sqlite_master WHERE name = 'memories_search'").fetchone()[0])
    finally:
        conn.close()


async def test_a_new_database_gets_the_keyed_index_at_open(db_path: Path) -> None:
    sqlite_migrations.migrate(db_path)  # (schema v3 made the index keyed by memories.rowid)
    assert not sqlite_rebuild.keyed(live_definition(db_path))
    backend = SQLiteBackend(db_path)
    await backend.open(ignore_changes)
    try:
        assert backend.keyword_keyed
    finally:
        await backend.close()
    assert sqlite_rebuild.keyed(live_definition(db_path))


async def test_sqlite_rebuild_beside_writes_and_searches(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    workload = Workload(sqlite_backend)
    await workload.populate(ROWS)
    seen = await run_beside(lambda progress: sqlite_backend.rebuild_keyword(progress, batch=20), workload)
    await workload.check_all()
    fts_matches_content(db_path)
    reached_total(seen)
    assert len(seen) >= ROWS // 20  # a report a step


CHILD = """
import asyncio, sys, time
from gm.storage.sqlite import SQLiteBackend

async def ignore(changes):
    return None

def report(p):
    print(p.done, p.total, flush=True)
    time.sleep(0.05)  # a slow rebuild, to be killed part-way

async def main():
    backend = SQLiteBackend(sys.argv[1])
    await backend.open(ignore)
    await backend.rebuild_keyword(report, batch=20)
    print("finished", flush=True)

asyncio.run(main())
"""


async def test_sqlite_rebuild_killed_mid_way_resumes(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open(ignore_changes)
    workload = Workload(backend)
    await workload.populate(ROWS)
    await backend.close()

    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(db_path), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            assert child.stdout is not None
            while True:
                line = (await child.stdout.readline()).decode()
                assert line and line != "finished\n", "the rebuild ended before it was killed"
                if int(line.split()[0]) >= 100:
                    break
    finally:
        child.kill()  # SIGKILL
        await child.wait()

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    cursor = int(conn.execute("SELECT value FROM meta WHERE key = ?", [sqlite_rebuild.CURSOR]).fetchone()[0])
    conn.close()
    assert cursor >= 100  # the half-built table and its cursor survived

    backend = SQLiteBackend(db_path)
    await backend.open(ignore_changes)
    try:
        workload.backend = backend
        seen = await run_beside(lambda progress: backend.rebuild_keyword(progress, batch=20), workload, 10)
        assert seen[0].done >= 100  # resumed, not started again
        await workload.check_all()
    finally:
        await backend.close()
    fts_matches_content(db_path)
    reached_total(seen)


class Interrupted(Exception):
    pass


async def interrupt_after(backend: SQLiteBackend, steps: int) -> None:
    """Stop a rebuild between two steps, as a crash there would (its progress callback raises)."""
    seen: list[Progress] = []

    def progress(p: Progress) -> None:
        seen.append(p)
        if len(seen) > steps:
            raise Interrupted

    with pytest.raises(Interrupted):
        await backend.rebuild_keyword(progress, batch=20)


async def wait_postings(backend: SQLiteBackend) -> None:
    """Until the backend's keyword postings are built (gm.storage.sqlite_postings)."""
    async with asyncio.timeout(30):
        while backend.postings is None or backend.postings.postings is None:
            await asyncio.sleep(0.01)


def damage(db: Path, statements: list[str]) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


NEXT = sqlite_rebuild.NEXT
DAMAGE = {
    "table dropped": [f"DROP TABLE {NEXT}"],  # its triggers stay: every write would fail
    "index corrupted": [f"UPDATE {NEXT}_data SET block = randomblob(40) WHERE id > 10"],
    "shadow table gone": [f"DROP TABLE {NEXT}_data"],
    "cursor lost": [f"DELETE FROM meta WHERE key = '{sqlite_rebuild.CURSOR}'"],
    "another definition": [  # e.g. left by a release whose index was defined otherwise
        f"DROP TABLE {NEXT}",
        f"CREATE VIRTUAL TABLE {NEXT} USING fts5 (text, context, content='memories', content_rowid='rowid')",
    ],
}


@pytest.mark.parametrize(("kind", "reopen"), [  # (a damaged index is found by the check made at open)
    pytest.param(kind, reopen, id=f"{kind}-{'reopened' if reopen else 'while-open'}")
    for kind in sorted(DAMAGE) for reopen in (True, False) if reopen or kind != "index corrupted"
])
async def test_sqlite_unsound_half_built_table_is_dropped_and_built_again(
    db_path: Path, kind: str, reopen: bool
) -> None:
    backend = SQLiteBackend(db_path)
    await backend.open(ignore_changes)
    workload = Workload(backend)
    try:
        await workload.populate(ROWS)
        await interrupt_after(backend, 5)
        if reopen:  # opening drops what would fail writes, before any write
            await backend.close()
            damage(db_path, DAMAGE[kind])
            backend = workload.backend = SQLiteBackend(db_path)
            await backend.open(ignore_changes)
        else:  # a write may fail until the rebuild, run again, drops the damaged table
            damage(db_path, DAMAGE[kind])
        seen: list[Progress] = []
        await backend.rebuild_keyword(seen.append, batch=20)
        assert seen[0].done == 0  # started again from the first row
        for _ in range(10):
            await workload.step()
        await workload.check_all()
    finally:
        await backend.close()
    fts_matches_content(db_path)
    reached_total(seen)


async def test_sqlite_a_second_rebuild_at_once_is_refused(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    await Workload(sqlite_backend).populate(ROWS)
    results = await asyncio.gather(
        sqlite_backend.rebuild_keyword(batch=20), sqlite_backend.rebuild_keyword(batch=20), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "NoneType"], results
    fts_matches_content(db_path)


async def test_sqlite_rebuild_replaces_a_damaged_live_index(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    workload = Workload(sqlite_backend)
    await workload.populate(ROWS)
    await wait_postings(sqlite_backend)
    damage(db_path, ["UPDATE memories_search_data SET block = randomblob(40) WHERE id > 10"])
    with pytest.raises(sqlite3.DatabaseError):  # FTS5 itself cannot read it...
        fts_matches_content(db_path)
    with pytest.raises(StorageUnavailable):  # ...nor a search FTS5 ranks (a narrower scope)...
        for word in list(workload.words.values())[:20]:
            await sqlite_backend.keyword_search([word], dataclasses.replace(SCOPE, agent_id="a"), None, 10, 1)
    await workload.check_all()  # ...while the postings read before the damage still answer rightly
    await sqlite_backend.rebuild_keyword(batch=50)
    await workload.check_all()
    for _ in range(6):
        await workload.step()
    fts_matches_content(db_path)


async def test_sqlite_rebuild_of_an_empty_database(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    seen: list[Progress] = []
    await sqlite_backend.rebuild_keyword(seen.append)
    assert (seen[-1].done, seen[-1].total) == (0, 0)
    fts_matches_content(db_path)


# -- Postgres ----------------------------------------------------------------------------


@pytest.fixture
async def pg_backend(pg_url: str) -> AsyncIterator[PostgresBackend]:
    backend = PostgresBackend(pg_url)
    await backend.open(ignore_changes)
    try:
        yield backend
    finally:
        await backend.close()


async def invalid_indexes(backend: PostgresBackend) -> list[str]:
    return [r[0] for r in await backend.fetch(LEFTOVERS, [".*"])]


async def test_postgres_rebuild_beside_writes_and_searches(pg_backend: PostgresBackend) -> None:
    workload = Workload(pg_backend)
    await workload.populate(ROWS)
    seen = await run_beside(lambda progress: pg_backend.rebuild_keyword(progress, batch=20), workload)
    await workload.check_all()
    reached_total(seen)
    assert {p.phase.split(":")[0] for p in seen} == {
        "keyword columns", "reindex memories_search_keywords", "reindex memories_keywords",
        "reindex memories_scoped_keywords"}
    assert await invalid_indexes(pg_backend) == []
    names = {r[0] for r in await pg_backend.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'memories'", [])}
    assert {"memories_keywords", "memories_search_keywords"} <= names


async def test_postgres_rebuild_recomputes_stale_search_tsv(pg_backend: PostgresBackend, pg_url: str) -> None:
    workload = Workload(pg_backend)
    await workload.populate(ROWS)
    stale = f"SELECT count(*) FROM memories WHERE search_tsv IS DISTINCT FROM ({SEARCH_TSV})"
    assert (await pg_backend.fetch(stale, []))[0][0] == 0  # SEARCH_TSV is what the trigger computes
    conn = await asyncpg.connect(pg_url)
    try:  # as if a release changed the text search configuration (and rows written before it)
        await conn.execute("UPDATE memories SET search_tsv = to_tsvector('simple', 'nothing') WHERE rowid % 3 = 0")
        await conn.execute("UPDATE memories SET search_tsv = NULL WHERE rowid % 3 = 1")
    finally:
        await conn.close()
    assert (await pg_backend.fetch(stale, []))[0][0] == ROWS * 2 // 3
    await pg_backend.rebuild_keyword(batch=50)
    assert (await pg_backend.fetch(stale, []))[0][0] == 0
    await workload.check_all()


async def test_postgres_interrupted_reindex_is_dropped_and_redone_one_caller_at_a_time(
    pg_backend: PostgresBackend, pg_url: str
) -> None:
    workload = Workload(pg_backend)
    await workload.populate(ROWS)
    blocker = await asyncpg.connect(pg_url)  # a transaction REINDEX CONCURRENTLY must wait out
    await blocker.execute("BEGIN; LOCK TABLE memories IN ROW EXCLUSIVE MODE")
    first = asyncio.create_task(pg_backend.rebuild_keyword())
    try:
        async with asyncio.timeout(30):
            while not await pg_backend.fetch("SELECT 1 FROM pg_class WHERE relname LIKE '%\\_ccnew%'", []):
                await asyncio.sleep(0.05)
        with pytest.raises(Conflict, match="another instance is rebuilding"):
            await pg_backend.rebuild_keyword()
        first.cancel()  # the build is cancelled in Postgres too: its new index is left INVALID
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await blocker.execute("ROLLBACK")
        await blocker.close()
    assert await invalid_indexes(pg_backend) == ["memories_search_keywords_ccnew"]

    seen: list[Progress] = []
    await pg_backend.rebuild_keyword(seen.append)
    assert await invalid_indexes(pg_backend) == []
    assert not await pg_backend.fetch("SELECT 1 FROM pg_class WHERE relname LIKE '%\\_cc%'", [])
    reached_total(seen)
    await workload.check_all()


async def test_pgvector_hnsw_index_rebuilt_online(pgvector_url: str) -> None:
    backend = PostgresBackend(pgvector_url)
    await backend.open(ignore_changes)
    try:
        rng = np.random.default_rng(3)
        vectors = rng.standard_normal((ROWS, 384)).astype("<f4")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        items = [NewMemory(f"v{i}", True, SCOPE, f"vector {i}", {}, None, vector=vectors[i].tobytes())
                 for i in range(ROWS)]
        await backend.write(AddMemories(items, 1))
        assert await backend.fetch("SELECT 1 FROM pg_indexes WHERE indexname = 'memories_vec_hnsw'", [])
        seen: list[Progress] = []
        await backend.rebuild_vector_index(seen.append)
        reached_total(seen)
        assert [p.phase for p in seen][-1] == "reindex memories_vec_hnsw"
        assert await invalid_indexes(backend) == []
        assert await backend.fetch("SELECT 1 FROM pg_indexes WHERE indexname = 'memories_vec_hnsw'", [])
        hits = await backend.vector_search(vectors[42].tobytes(), SCOPE, None, 1, 1)
        assert hits[0][0] == (await backend.fetch("SELECT rowid FROM memories WHERE id = 'v42'", []))[0][0]
    finally:
        await backend.close()
