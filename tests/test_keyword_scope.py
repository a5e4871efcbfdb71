"""Keyword search whose cost follows the scope (gm.storage.sqlite_keywords on SQLite): on a
realistic mix of namespaces, users, agents, sessions, expiries, metadata and event times, the
keyed index answers every scope (namespace, +user, +agent, +session, filters, time ranges,
expiry) with exactly the rows and BM25 scores of the index it replaces, the one schema v3 made,
as that release's query ranked them. A database upgraded from v3 gets the keyed index online,
and shared slots (more namespaces or users than the key has room for) cost nothing in results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gm.filters import Filter, parse
from gm.memory import NewMemory, Scope, TimeRange
from gm.search import keyword_terms
from gm.storage import postgres_keywords, sqlite_keywords
from gm.storage.base import AddMemories, DeleteMemory, UpdateMemory
from gm.storage.ops import IndexChange
from gm.storage.postgres import PostgresBackend
from gm.storage.postgres_migrations import V4_SCOPED_KEYWORDS
from gm.storage.sql import QMarks, scope_sql
from gm.storage.sqlite import SQLiteBackend
from gm.storage.sqlite_keywords import NAMESPACE_SLOTS, USER_SLOTS

VECTOR = np.ones(384, dtype="<f4").tobytes()  # (keyword search reads no vector)
DAY = 86_400_000
T0 = 1_700_000_000_000
NOW = T0 + 400 * DAY  # searches happen then: memories that expired before are gone
WORDS = (  # a long tail, drawn with Zipf-like weights, so terms range from rare to very common
    "coffee tea garden flight meeting sister brother budget invoice piano climbing recipe curry ramen pizza "
    "doctor allergy peanut gluten birthday gift flowers train airport hotel lisbon berlin tokyo toronto "
    "project deadline review report launch release dashboard contract audit offsite podcast novel jazz "
    "running marathon yoga swimming cycling chess painting pottery sailing camera guitar violin dog cat "
    "parrot rabbit apartment rent mortgage savings salary bonus manager mentor colleague neighbour dentist "
    "monday tuesday wednesday thursday friday weekend morning evening night spring summer autumn winter"
).split()
WEIGHTS = [1 / (i + 1) ** 0.8 for i in range(len(WORDS))]
FILLER = "the a of to and in on for with at about after before".split()

# Schema v3's query, as that release ran it (ties were left in SQLite's order).
OLD_SQL = (
    "SELECT m.rowid, bm25(memories_search, 1.0, 0.5) AS rank FROM memories_search "
    "JOIN memories m ON m.rowid = memories_search.rowid WHERE memories_search MATCH ? AND {where} "
    "ORDER BY rank LIMIT ?"
)


async def ignore_changes(changes: list[IndexChange]) -> None:
    return None


def text(rng: random.Random) -> str:
    words = rng.choices(WORDS, WEIGHTS, k=rng.randint(5, 30)) + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words)


def mix(n: int, seed: int = 1) -> list[NewMemory]:
    """``n`` memories: three namespaces (80/15/5%), users (some none), agents, sessions of a few
    turns, a few expired or expiring, metadata, event times over a year, some duplicate texts."""
    rng = random.Random(seed)
    out: list[NewMemory] = []
    previous = ""
    for i in range(n):
        namespace = rng.choices(["main", "team", "tiny"], [80, 15, 5])[0]
        user = rng.choice([None, *(f"u{k}" for k in range(12))])
        agent = rng.choice([None, None, "planner", "coach"])
        session = f"{namespace}-{user}-s{rng.randrange(8)}" if rng.random() < 0.4 else None
        expires = rng.choice([None] * 12 + [T0 + 10 * DAY, NOW + DAY])
        body = previous if rng.random() < 0.03 else text(rng)  # ties: the same text twice
        previous = body
        metadata: dict[str, Any] = {"topic": rng.choice(["food", "work", "travel"]), "priority": rng.randint(1, 3)}
        out.append(NewMemory(f"m{i}", True, Scope(namespace, user, agent, session), body, metadata, expires,
                             vector=VECTOR, occurred_at=T0 + rng.randrange(365) * DAY))
    return out


def cases(seed: int = 2, n: int = 40) -> list[tuple[list[str], Scope, Filter | None, TimeRange | None, int]]:
    """Queries of 1-4 words against every kind of scope, some with a filter or time range."""
    rng = random.Random(seed)
    scopes = [
        Scope("main"), Scope("team"), Scope("tiny"), Scope("nowhere"),
        Scope("main", "u3"), Scope("team", "u7"), Scope("main", "nobody"),
        Scope("main", "u3", "coach"), Scope("main", None, "planner"),
        Scope("main", "u5", None, "main-u5-s2"), Scope("team", None, None, "team-None-s1"),
        Scope("main", "u1", "planner", "main-u1-s0"),
    ]
    filters: list[Filter | None] = [None, None, parse({"topic": "food"}), parse({"priority": {"$gte": 2}})]
    ranges = [None, None, None, TimeRange(T0 + 100 * DAY, T0 + 250 * DAY), TimeRange(after=T0 + 300 * DAY)]
    out = []
    for scope in scopes:
        for _ in range(n // len(scopes) + 1):
            terms = keyword_terms(" ".join(rng.choices(WORDS, WEIGHTS, k=rng.randint(1, 4))))
            out.append((terms, scope, rng.choice(filters), rng.choice(ranges), rng.choice([1, 5, 10, 50])))
    return out


def old_results(db: Path, terms: list[str], scope: Scope, filter: Filter | None, time_range: TimeRange | None,
                limit: int) -> list[tuple[int, float]]:
    """Schema v3's query, run on the file as it left it."""
    p = QMarks()
    p(" OR ".join(f'"{t}"' for t in terms))  # (the MATCH, its placeholder in OLD_SQL)
    where = scope_sql(scope, filter, NOW, p, "m.", time_range, 3)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(OLD_SQL.format(where=where), [*p.values, limit]).fetchall()
    finally:
        conn.close()
    return [(r[0], -float(r[1])) for r in rows]


def same_ranking(old: list[tuple[int, float]], new: list[tuple[int, float]]) -> bool:
    """The same scores in the same order, and the same rows but for the order within ties (which
    the old query left open, and so which of a tie a page cut off): the new one orders them newest first."""
    if [s for _, s in old] != [s for _, s in new]:
        return False
    last = old[-1][1] if old else None
    groups: dict[float, tuple[set[int], set[int]]] = {}
    for (a, score), (b, _) in zip(old, new, strict=True):
        groups.setdefault(score, (set(), set()))[0].add(a)
        groups[score][1].add(b)
    return all(x == y for score, (x, y) in groups.items() if score != last)


async def wait_keyed(backend: SQLiteBackend) -> None:
    async with asyncio.timeout(60):
        while not backend.keyword_keyed:
            await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def v3_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database written by schema v3 (a capped backend stands in for that release): 1,500
    memories, more than the keyed index is built for at open, so an upgrade builds it online."""
    db = tmp_path_factory.mktemp("kw") / "v3.db"

    async def fill() -> None:
        backend = SQLiteBackend(db, target_version=3)
        await backend.open(ignore_changes)
        try:
            items = mix(1500)
            for start in range(0, len(items), 250):
                await backend.write(AddMemories(items[start:start + 250], T0))
            for i in range(0, 1500, 97):  # some rewritten, some deleted
                await backend.write(UpdateMemory(f"m{i}", T0, text=text(random.Random(i))))
                await backend.write(DeleteMemory(f"m{i + 1}", T0))
        finally:
            await backend.close()

    asyncio.run(fill())
    return db


@pytest.fixture
async def upgraded(v3_file: Path, tmp_path: Path) -> AsyncIterator[tuple[Path, SQLiteBackend]]:
    """A copy of the v3 file, and a backend of this release open on another copy of it."""
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    for target in (old, new):
        source = sqlite3.connect(v3_file)
        out = sqlite3.connect(target)
        source.backup(out)
        out.close()
        source.close()
    backend = SQLiteBackend(new)
    await backend.open(ignore_changes)
    try:
        yield old, backend
    finally:
        await backend.close()


async def test_the_keyed_index_ranks_every_scope_as_schema_v3s_did(upgraded: tuple[Path, SQLiteBackend]) -> None:
    old, backend = upgraded
    assert not backend.keyword_keyed  # too large to rebuild at open: searched as it is meanwhile
    before = [await backend.keyword_search(t, s, f, n, NOW, time_range=r) for t, s, f, n, r in _args()]
    await wait_keyed(backend)
    compared = nonempty = 0
    for (terms, scope, filter, limit, time_range), unkeyed in zip(_args(), before, strict=True):
        expected = old_results(old, terms, scope, filter, time_range, limit)
        keyed = await backend.keyword_search(terms, scope, filter, limit, NOW, time_range=time_range)
        assert keyed == unkeyed, (terms, scope, filter, time_range, limit)  # to the bit, ties newest first
        assert same_ranking(expected, keyed), (terms, scope, filter, time_range, limit, expected, keyed)
        compared += 1
        nonempty += bool(keyed)
    assert compared >= 40 and nonempty >= 30


def _args() -> list[tuple[list[str], Scope, Filter | None, int, TimeRange | None]]:
    return [(t, s, f, n, r) for t, s, f, r, n in cases()]


async def test_writes_after_the_switch_keep_the_ranking(upgraded: tuple[Path, SQLiteBackend], tmp_path: Path) -> None:
    """Adds, updates and deletes on the keyed index rank as the same writes on a v3 index do."""
    old, backend = upgraded
    await wait_keyed(backend)
    reference = SQLiteBackend(old, target_version=3)
    await reference.open(ignore_changes)
    try:
        more = [dataclasses.replace(item, id=f"x{item.id}") for item in mix(200, seed=9)]
        for target in (backend, reference):
            await target.write(AddMemories(more, T0))
            for i in range(0, 200, 7):
                await target.write(UpdateMemory(f"xm{i}", T0, text=text(random.Random(-i))))
                await target.write(DeleteMemory(f"xm{i + 3}", T0))
        for terms, scope, filter, limit, time_range in _args():
            expected = old_results(old, terms, scope, filter, time_range, limit)
            keyed = await backend.keyword_search(terms, scope, filter, limit, NOW, time_range=time_range)
            assert same_ranking(expected, keyed), (terms, scope, expected, keyed)
    finally:
        await reference.close()


async def test_reopened_the_keyed_index_is_used_at_once(upgraded: tuple[Path, SQLiteBackend]) -> None:
    _, backend = upgraded
    await wait_keyed(backend)
    await backend.close()
    again = SQLiteBackend(backend.path)
    await again.open(ignore_changes)
    try:
        assert again.keyword_keyed and again._keying is None
    finally:
        await again.close()


async def test_a_page_crowded_out_by_expired_memories_is_filled(tmp_path: Path) -> None:
    """The page ranked in the index first holds only expired memories: the rows behind them are found."""
    backend = SQLiteBackend(tmp_path / "mem.db")
    await backend.open(ignore_changes)
    try:
        scope = Scope("ns", "alice")
        expired = [NewMemory(f"e{i}", True, scope, "zebra " * 5 + f"stripes {i}", {}, T0, vector=VECTOR)
                   for i in range(60)]
        live = [NewMemory(f"l{i}", True, scope, f"a zebra among many other words number {i}", {}, None,
                          vector=VECTOR) for i in range(3)]
        await backend.write(AddMemories(expired + live, T0 - DAY))
        assert backend.keyword_keyed
        hits = await backend.keyword_search(["zebra"], scope, None, 5, NOW)
        rows = await backend.fetch("SELECT rowid FROM memories WHERE id LIKE 'l%' ORDER BY rowid DESC", [])
        assert [rowid for rowid, _ in hits] == [r[0] for r in rows]
    finally:
        await backend.close()


@pytest.mark.parametrize("shared", ["user", "namespace"])
async def test_scopes_that_share_a_slot_never_see_each_others_memories(tmp_path: Path, shared: str) -> None:
    """More users (or namespaces) than slots: the first and the one a whole round of ids later
    share a slot of the key, and each still finds only its own."""
    db = tmp_path / "mem.db"
    backend = SQLiteBackend(db)
    await backend.open(ignore_changes)
    try:
        if shared == "user":
            first, second = Scope("ns", "first"), Scope("ns", "second")
            filler = [(f"filler{i}",) for i in range(USER_SLOTS - 2)]
            table = "keyword_users (user_id)"
        else:
            first, second = Scope("first"), Scope("second")
            filler = [(f"filler{i}",) for i in range(NAMESPACE_SLOTS - 1)]
            table = "keyword_namespaces (namespace)"
        await backend.write(AddMemories([NewMemory("a", True, first, "shared words here", {}, None,
                                                   vector=VECTOR)], T0))
        conn = sqlite3.connect(db)  # (the slots of the scopes in between, as if they held memories)
        with conn:
            conn.executemany(f"INSERT INTO {table} VALUES (?)", filler)
        conn.close()
        await backend.write(AddMemories([NewMemory("b", True, second, "shared words there", {}, None,
                                                   vector=VECTOR)], T0))
        keys = [r[0] >> 40 for r in await backend.fetch("SELECT id FROM memories_search_docsize ORDER BY id", [])]
        assert keys[0] == keys[1]  # one slot
        for scope, key in ((first, "a"), (second, "b")):
            hits = await backend.keyword_search(["shared"], scope, None, 10, NOW)
            rows = await backend.fetch("SELECT rowid FROM memories WHERE id = ?", [key])
            assert [rowid for rowid, _ in hits] == [rows[0][0]]
    finally:
        await backend.close()


async def test_a_scope_moved_by_hand_moves_its_key(tmp_path: Path) -> None:
    """The write flow never changes a memory's scope; an UPDATE by hand re-keys its index row."""
    db = tmp_path / "mem.db"
    backend = SQLiteBackend(db)
    await backend.open(ignore_changes)
    try:
        await backend.write(AddMemories([NewMemory("a", True, Scope("ns", "alice"), "a lonely walrus", {}, None,
                                                   vector=VECTOR)], T0))
        await backend.close()
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("UPDATE memories SET user_id = 'bob', namespace = 'other'")
        conn.close()
        backend = SQLiteBackend(db)
        await backend.open(ignore_changes)
        assert await backend.keyword_search(["walrus"], Scope("ns", "alice"), None, 10, NOW) == []
        assert len(await backend.keyword_search(["walrus"], Scope("other", "bob"), None, 10, NOW)) == 1
    finally:
        await backend.close()


async def test_a_users_search_costs_what_the_users_matches_cost(tmp_path: Path) -> None:
    """Counted in SQLite's own VM steps: doubling the database with other users' memories (the
    same words) leaves a user's search as it was, and doubles the walk over every match."""
    db = tmp_path / "mem.db"
    rng = random.Random(5)

    async def add(users: range) -> None:
        backend = SQLiteBackend(db)
        await backend.open(ignore_changes)
        try:
            items = [NewMemory(f"m{u}-{i}", True, Scope("ns", f"u{u}"), f"common {text(rng)}", {}, None,
                               vector=VECTOR) for i in range(100) for u in users]
            for start in range(0, len(items), 500):
                await backend.write(AddMemories(items[start:start + 500], T0))
            assert backend.keyword_keyed
        finally:
            await backend.close()

    async def count() -> dict[str, tuple[int, list[tuple[int, float]]]]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        steps = [0]

        def step() -> int:
            steps[0] += 1
            return 0

        async def fetch(sql: str, values: list[Any]) -> list[Any]:
            return conn.execute(sql, values).fetchall()

        try:
            slots = sqlite_keywords.Slots(fetch)
            args = (["common", "garden"], Scope("ns", "u7"), None, 10, NOW, None, 4)
            await slots.range(args[1])  # (ids read once; not what is counted)
            conn.set_progress_handler(step, 1)
            counted = {}
            for name in ("keyed", "unkeyed"):
                steps[0] = 0
                if name == "keyed":
                    hits = await sqlite_keywords.search(slots, *args)
                else:
                    hits = await sqlite_keywords.search_unkeyed(fetch, *args)
                counted[name] = (steps[0], hits)
            assert counted["keyed"][1] == counted["unkeyed"][1] and len(counted["keyed"][1]) == 10
            return counted
        finally:
            conn.close()

    await add(range(40))
    before = await count()
    await add(range(40, 80))
    after = await count()
    assert [r for r, _ in after["keyed"][1]] == [r for r, _ in before["keyed"][1]]  # (BM25's statistics moved)
    assert after["keyed"][0] <= before["keyed"][0] * 1.1, (before, after)
    assert after["unkeyed"][0] >= before["unkeyed"][0] * 1.8, (before, after)
    assert before["keyed"][0] * 5 < before["unkeyed"][0]


# -- Postgres ------------------------------------------------------------------------------


async def pg_write_mix(backend: PostgresBackend) -> None:
    items = mix(1500)
    for start in range(0, len(items), 250):
        await backend.write(AddMemories(items[start:start + 250], T0))
    for i in range(0, 1500, 97):
        await backend.write(UpdateMemory(f"m{i}", T0, text=text(random.Random(i))))
        await backend.write(DeleteMemory(f"m{i + 1}", T0))


async def test_postgres_scoped_index_ranks_every_scope_as_schema_v3s_query_did(pg_url: str) -> None:
    old = PostgresBackend(pg_url, target_version=3)
    await old.open(ignore_changes)
    try:
        await pg_write_mix(old)
        await old.fetch("ANALYZE memories", [])
        expected = [await old.keyword_search(t, s, f, n, NOW, time_range=r) for t, s, f, n, r in _args()]
    finally:
        await old.close()
    new = PostgresBackend(pg_url)
    await new.open(ignore_changes)  # (schema v4: the scoped index)
    try:
        assert new.schema_version == 4
        await new.fetch("ANALYZE memories", [])
        nonempty = 0
        for (terms, scope, filter, limit, time_range), before in zip(_args(), expected, strict=True):
            after = await new.keyword_search(terms, scope, filter, limit, NOW, time_range=time_range)
            assert after == before, (terms, scope, filter, time_range, limit)
            nonempty += bool(after)
        assert nonempty >= 30
    finally:
        await new.close()


async def test_postgres_a_users_search_reads_that_users_matches(pg_url: str) -> None:
    """The scoped index serves a user's search, reading that user's matches only: a user with
    3,000 of 4,000 memories, a word in 1,020 of them, 20 that user's. Postgres may prefer the
    user's btree on so small a table, so the plans are taken with only the keyword indexes to
    choose from (no btree over scopes): the user's search reads 20 rows, schema v3's query the word's 1,020."""
    backend = PostgresBackend(pg_url)
    await backend.open(ignore_changes)
    try:
        rng = random.Random(5)

        def body(i: int) -> str:
            return f"{'zucchini' if i % 4 == 0 or i % 200 == 1 else ''} {text(rng)}"

        items = [NewMemory(f"m{i}", True, Scope("ns", f"u{int(i % 4 != 0)}"), body(i), {}, None, vector=VECTOR)
                 for i in range(4000)]
        for start in range(0, len(items), 500):
            await backend.write(AddMemories(items[start:start + 500], T0))
        await backend.fetch("ANALYZE memories", [])
        ran: list[tuple[str, list[Any]]] = []

        async def fetch(sql: str, values: list[Any]) -> list[Any]:
            ran.append((sql, values))
            return await backend.fetch(sql, values)

        hits = {version: await postgres_keywords.search(fetch, ["zucchini"], Scope("ns", "u1"), None, 50, NOW,
                                                        None, version, True) for version in (3, 4)}
        assert hits[3] == hits[4] and len(hits[4]) == 20
        conn = await backend.connect()
        plans = conn.transaction()
        await plans.start()
        try:  # (rolled back: the indexes stay)
            await conn.execute("DROP INDEX memories_by_user, memories_by_user_occurrence, memories_by_namespace, "
                               "memories_by_occurrence")
            await conn.execute("SET LOCAL enable_seqscan = off")
            read = [max(_rows_read(json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}",
                                                                  *values))[0]["Plan"])) for sql, values in ran]
        finally:
            await plans.rollback()
            await conn.close()
        assert read == [1020, 20], read
    finally:
        await backend.close()


def _rows_read(node: dict[str, Any]) -> list[int]:
    """The table rows each scan of a plan read: those it produced and those its filter or
    recheck dropped (a bitmap index scan reads only its index)."""
    looked = ("Actual Rows", "Rows Removed by Filter", "Rows Removed by Index Recheck")
    reads = "Scan" in node["Node Type"] and node["Node Type"] != "Bitmap Index Scan"
    own = [sum(int(node.get(k, 0)) for k in looked)] if reads else []
    return own + [n for child in node.get("Plans", []) for n in _rows_read(child)]


async def test_the_docs_build_the_scoped_index_the_step_finds(pg_url: str) -> None:
    """docs/postgres.md's statement, run on a v3 database while it serves, builds the index the v4
    step makes (same name, same expression), so the step finds it and builds nothing."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "postgres.md").read_text()
    statement = docs.split("```sql\n", 1)[1].split("```")[0]
    assert "CREATE INDEX CONCURRENTLY memories_scoped_keywords" in statement
    old = PostgresBackend(pg_url, target_version=3)
    await old.open(ignore_changes)
    try:
        conn = await old.connect()
        try:
            await conn.execute(statement)
        finally:
            await conn.close()
    finally:
        await old.close()
    new = PostgresBackend(pg_url)
    await new.open(ignore_changes)
    try:
        assert new.schema_version == 4
        conn = await new.connect()
        try:
            check = conn.transaction()
            await check.start()
            try:  # (the index the step would have made, rolled back)
                await conn.execute(V4_SCOPED_KEYWORDS[0].replace("IF NOT EXISTS memories_scoped_keywords", "stepped"))
                made = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE indexname IN "
                                        "('memories_scoped_keywords', 'stepped') ORDER BY indexname")
            finally:
                await check.rollback()
        finally:
            await conn.close()
        assert [r[0] for r in made] == ["memories_scoped_keywords", "stepped"]
        assert made[0][1].replace("memories_scoped_keywords", "stepped") == made[1][1]
    finally:
        await new.close()
