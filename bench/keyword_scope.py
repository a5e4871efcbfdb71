"""Keyword search scoped to a user, a session, an agent or a whole namespace, before and after the
index keyed by scope (SQLite: gm.storage.sqlite_keywords; Postgres: the v4 GIN index of
gm.storage.postgres_keywords), at database sizes too large to fill through the embedder.

    .venv/bin/python bench/keyword_scope.py                          # SQLite, 100,000 memories
    .venv/bin/python bench/keyword_scope.py --rows 1000000 --queries 200
    .venv/bin/python bench/keyword_scope.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

The database is written at schema v3 (the release before) by direct SQL inserts: one namespace,
100 users (1% each), 4 agents, 100 sessions a user, bench/workload.py's memory texts, event times
over two years, session context of the date only (no neighbours' text), random bytes as vectors
(keyword search reads none). Then, for each scope, ``--queries`` questions of the Workload
(keyword terms as gm.search makes them, page of 10; one user also at 50, the depth a hybrid
search asks for) are timed through the backend after a warm-up:

a) before: schema v3's query as that release ran it;
b) the upgrade: opening with this release (migration, snapshot on SQLite) and the index built
   (SQLite: rebuilt online, rows/s; Postgres: the v4 step's index build);
c) after: the same questions, and on SQLite the old walk over every match interleaved with the
   keyed search on the same file (a ratio within one run), and the floor of FTS5's BM25: its term
   statistics, read over the whole index whatever the scope;
d) whether every page is the one before (SQLite: same scores, ties newest first now; Postgres: same).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg

from figures import percentile, progress
from gm.context import date_words
from gm.filters import Filter, parse
from gm.memory import Scope
from gm.search import keyword_terms
from gm.storage import postgres_migrations, sqlite_keywords, sqlite_migrations
from gm.storage.ops import IndexChange
from gm.storage.postgres import PostgresBackend
from gm.storage.sql import QMarks, scope_sql
from gm.storage.sqlite import SQLiteBackend
from workload import memory_text, query_texts

NS = "bench"
USERS, AGENTS, SESSIONS = 100, 4, 100
T0 = 1_640_000_000_000
NOW = T0 + 800 * 86_400_000
COLUMNS = ("id", "namespace", "user_id", "agent_id", "session_id", "text", "metadata", "created_at", "updated_at",
           "occurred_at", "context", "embedding")
# Schema v3's SQLite query, as that release ran it.
V3_SQL = ("SELECT m.rowid, bm25(memories_search, 1.0, 0.5) AS rank FROM memories_search "
          "JOIN memories m ON m.rowid = memories_search.rowid WHERE memories_search MATCH {match} AND {where} "
          "ORDER BY rank LIMIT {limit}")

Search = Callable[[list[str], Scope, Filter | None, int], Awaitable[list[tuple[int, float]]]]
Case = tuple[str, list[str], Scope, Filter | None, int]


async def ignore(changes: list[IndexChange]) -> None:
    return None


def rows(n: int, seed: int = 1) -> Iterator[list[tuple[Any, ...]]]:
    """The memories, 10,000 a batch, as COLUMNS."""
    rng = random.Random(seed)
    for start in range(0, n, 10_000):
        batch = []
        for i in range(start, min(n, start + 10_000)):
            topic, text = memory_text(rng)
            user = rng.randrange(USERS)
            at = T0 + rng.randrange(730 * 86_400) * 1000
            batch.append((f"m{i}", NS, f"user-{user:03d}", f"agent-{rng.randrange(AGENTS)}",
                          f"user-{user:03d}-s{rng.randrange(SESSIONS)}", text,
                          json.dumps({"topic": topic, "priority": rng.randint(1, 3)}), at, at, at, date_words(at),
                          rng.randbytes(1536)))
        yield batch


def cases(n: int, seed: int = 5) -> dict[str, list[Case]]:
    """Per scope, ``n`` (name, terms, scope, filter, limit)."""
    rng = random.Random(seed)
    questions = [keyword_terms(q) for q in query_texts(n, seed)]
    food = parse({"topic": "food"})
    out: dict[str, list[Case]] = {}
    for terms in questions:
        user, agent = f"user-{rng.randrange(USERS):03d}", f"agent-{rng.randrange(AGENTS)}"
        session = f"{user}-s{rng.randrange(SESSIONS)}"
        for case in (
            ("one user (1%)", terms, Scope(NS, user), None, 10),
            ("one user, 50 deep", terms, Scope(NS, user), None, 50),
            ("user + session", terms, Scope(NS, user, None, session), None, 10),
            ("user + filter", terms, Scope(NS, user), food, 10),
            ("one agent (25%)", terms, Scope(NS, None, agent), None, 10),
            ("whole namespace", terms, Scope(NS), None, 10),
        ):
            out.setdefault(case[0], []).append(case)
    return out


def line(name: str, ms: list[float]) -> str:
    return (f"  {name:24} p50 {percentile(ms, 50):8.2f}  p90 {percentile(ms, 90):8.2f}  "
            f"p99 {percentile(ms, 99):8.2f} ms")


async def timed(search: Search, case: Case) -> tuple[float, list[tuple[int, float]]]:
    started = time.perf_counter()
    hits = await search(case[1], case[2], case[3], case[4])
    return (time.perf_counter() - started) * 1000, hits


async def measure(search: Search, all_cases: dict[str, list[Case]], warm: int = 20
                  ) -> dict[str, tuple[list[float], list[list[tuple[int, float]]]]]:
    """Each scope's latencies and pages, after ``warm`` untimed questions of it."""
    out = {}
    for name, scoped in all_cases.items():
        for case in scoped[:warm]:
            await search(case[1], case[2], case[3], case[4])
        results = [await timed(search, case) for case in scoped]
        out[name] = ([ms for ms, _ in results], [hits for _, hits in results])
        print(line(name, out[name][0]), flush=True)
    return out


def same_page(old: list[tuple[int, float]], new: list[tuple[int, float]]) -> bool:
    """Same scores in order, same rows but for the order within ties (which v3 left open)."""
    if [round(s, 12) for _, s in old] != [round(s, 12) for _, s in new]:
        return False
    last = old[-1][1] if old else None
    groups: dict[float, tuple[set[int], set[int]]] = {}
    for (a, score), (b, _) in zip(old, new, strict=True):
        groups.setdefault(score, (set(), set()))[0].add(a)
        groups[score][1].add(b)
    return all(x == y for score, (x, y) in groups.items() if score != last)


def compare(before: dict[str, Any], after: dict[str, Any], exact: bool) -> None:
    for name in before:
        pairs = list(zip(before[name][1], after[name][1], strict=True))
        same = sum(old == new if exact else same_page(old, new) for old, new in pairs)
        print(f"  {name:24} {same}/{len(pairs)} pages the same")


# -- SQLite ----------------------------------------------------------------------------------


def build_sqlite(path: Path, n: int) -> None:
    sqlite_migrations.migrate(path, target=3)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    marks = ", ".join("?" * len(COLUMNS))
    for done, batch in enumerate(rows(n), 1):
        conn.executemany(f"INSERT INTO memories ({', '.join(COLUMNS)}) VALUES ({marks})", batch)
        progress(f"written {done * 10_000:,} of {n:,}")
    conn.execute("COMMIT")
    conn.close()


def sqlite_v3(backend: SQLiteBackend) -> Search:
    async def search(terms: list[str], scope: Scope, filter: Filter | None, limit: int) -> list[tuple[int, float]]:
        p = QMarks()
        match = p(" OR ".join(f'"{t}"' for t in terms))
        where = scope_sql(scope, filter, NOW, p, "m.", None, 3)
        found = await backend.fetch(V3_SQL.format(match=match, where=where, limit=p(limit)), p.values)
        return [(r[0], -float(r[1])) for r in found]

    return search


def through(backend: SQLiteBackend | PostgresBackend) -> Search:
    async def search(terms: list[str], scope: Scope, filter: Filter | None, limit: int) -> list[tuple[int, float]]:
        return await backend.keyword_search(terms, scope, filter, limit, NOW)

    return search


async def interleaved(backend: SQLiteBackend, all_cases: dict[str, list[Case]]) -> None:
    """Per scope, the keyed search and the old walk over every match, alternated on one file."""
    for name, scoped in all_cases.items():
        walk, keyed = [], []
        for case in scoped:
            _, terms, scope, filter, limit = case
            started = time.perf_counter()
            await sqlite_keywords.search_unkeyed(backend.fetch, terms, scope, filter, limit, NOW, None, 4)
            walk.append((time.perf_counter() - started) * 1000)
            keyed.append((await timed(through(backend), case))[0])
        print(f"  {name:24} keyed p50 {percentile(keyed, 50):7.2f} p99 {percentile(keyed, 99):7.2f}; "
              f"walk p50 {percentile(walk, 50):7.2f} p99 {percentile(walk, 99):7.2f} ms; "
              f"{percentile(walk, 50) / percentile(keyed, 50):5.1f}x at p50")


async def bm25_floor(backend: SQLiteBackend, scoped: list[Case]) -> None:
    ms = []
    for _, terms, _, _, _ in scoped:
        p = QMarks()
        match = p(" OR ".join(f'"{t}"' for t in terms))
        started = time.perf_counter()
        await backend.fetch(f"SELECT {sqlite_keywords.RANK} FROM memories_search WHERE memories_search MATCH {match} "
                            "LIMIT 1", p.values)
        ms.append((time.perf_counter() - started) * 1000)
    print(line("BM25 statistics alone", ms))


async def run_sqlite(path: Path, n: int, all_cases: dict[str, list[Case]], optimize: bool) -> None:
    started = time.perf_counter()
    build_sqlite(path, n)
    print(f"\nSQLite, {n:,} memories: written at schema v3 in {time.perf_counter() - started:.0f} s, "
          f"{path.stat().st_size / 2**20:,.0f} MiB")
    print("a) before (schema v3's query):")
    old = SQLiteBackend(path, target_version=3)
    await old.open(ignore)
    try:
        before = await measure(sqlite_v3(old), all_cases)
    finally:
        await old.close()
    started = time.perf_counter()
    backend = SQLiteBackend(path)
    await backend.open(ignore)
    try:
        opened = time.perf_counter() - started
        while not backend.keyword_keyed:
            await asyncio.sleep(0.2)
        built = time.perf_counter() - started - opened
        print(f"b) upgrade: open {opened:.1f} s (migration and its snapshot); keyed index rebuilt online in "
              f"{built:.0f} s ({n / built:,.0f} memories/s)")
        print("c) after:")
        after = await measure(through(backend), all_cases)
        print("   interleaved on the upgraded file: keyed search, and the walk of every match as v3's plan:")
        await interleaved(backend, all_cases)
        await bm25_floor(backend, all_cases["one user (1%)"])
        if optimize:
            started = time.perf_counter()
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("INSERT INTO memories_search (memories_search) VALUES ('optimize')")
            conn.close()
            print(f"   after FTS5 'optimize' ({time.perf_counter() - started:.1f} s):")
            await measure(through(backend), {k: all_cases[k] for k in ("one user (1%)", "whole namespace")})
            await bm25_floor(backend, all_cases["one user (1%)"])
        print("d) pages against schema v3's:")
        compare(before, after, exact=False)
    finally:
        await backend.close()
    print(f"   file after: {path.stat().st_size / 2**20:,.0f} MiB")


# -- Postgres --------------------------------------------------------------------------------


async def build_postgres(url: str, n: int) -> None:
    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(url)

    await postgres_migrations.migrate(connect, url, "bench", target=3)
    conn = await connect()
    try:
        indexes = await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'memories' "
                                   "AND indexname NOT IN ('memories_pkey', 'memories_id_key')")
        for index in indexes:  # (built once after the load: much faster than row by row)
            await conn.execute(f"DROP INDEX {index['indexname']}")
        for done, batch in enumerate(rows(n), 1):
            await conn.copy_records_to_table("memories", records=batch, columns=list(COLUMNS))
            progress(f"copied {done * 10_000:,} of {n:,}")
        for index in indexes:
            await conn.execute(index["indexdef"])
        await conn.execute("VACUUM ANALYZE memories")
    finally:
        await conn.close()


async def explain(backend: PostgresBackend, case: Case) -> str:
    """The plan's scans and the execution time of one search, as Postgres ran it."""
    ran: list[tuple[str, list[Any]]] = []
    fetch = backend.fetch

    async def capture(sql: str, values: list[Any]) -> list[Any]:
        ran.append((sql, values))
        return await fetch(sql, values)

    backend.fetch = capture  # type: ignore[method-assign]
    try:
        await through(backend)(case[1], case[2], case[3], case[4])
    finally:
        backend.fetch = fetch  # type: ignore[method-assign]
    plan = json.loads((await fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) {ran[-1][0]}", ran[-1][1]))[0][0])[0]

    def scans(node: dict[str, Any]) -> list[str]:
        own = [f"{node['Node Type']} {node.get('Index Name', '')} {node['Actual Rows']} rows".replace("  ", " ")
               ] if "Scan" in node["Node Type"] else []
        return own + [s for child in node.get("Plans", []) for s in scans(child)]

    return f"{'; '.join(scans(plan['Plan']))}; {plan['Execution Time']:.1f} ms"


async def run_postgres(admin_url: str, n: int, all_cases: dict[str, list[Case]]) -> None:
    name = f"gm_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}"
    try:
        started = time.perf_counter()
        await build_postgres(url, n)
        print(f"\nPostgres, {n:,} memories: written at schema v3 in {time.perf_counter() - started:.0f} s")
        user_case = all_cases["one user (1%)"][0]
        print("a) before (schema v3's query):")
        old = PostgresBackend(url, target_version=3)
        await old.open(ignore)
        try:
            before = await measure(through(old), all_cases)
            print(f"   plan of one user's search: {await explain(old, user_case)}")
        finally:
            await old.close()
        started = time.perf_counter()
        backend = PostgresBackend(url)
        await backend.open(ignore)
        try:
            print(f"b) upgrade: open {time.perf_counter() - started:.1f} s (the v4 step builds "
                  "memories_scoped_keywords while writes wait)")
            await backend.fetch("ANALYZE memories", [])
            print("c) after:")
            after = await measure(through(backend), all_cases)
            print(f"   plan of one user's search: {await explain(backend, user_case)}")
            print("d) pages against schema v3's:")
            compare(before, after, exact=True)
        finally:
            await backend.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200, help="questions a scope (200)")
    parser.add_argument("--database-url", help="a Postgres server (loopback) where this user may CREATE DATABASE")
    parser.add_argument("--optimize", action="store_true", help="SQLite: also measure after FTS5's 'optimize'")
    parser.add_argument("--dir", type=Path, help="where the SQLite file goes (default: a temporary directory)")
    args = parser.parse_args()
    all_cases = cases(args.queries)
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    if args.database_url:
        await run_postgres(args.database_url, args.rows, all_cases)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        await run_sqlite(Path(directory) / "bench.db", args.rows, all_cases, args.optimize)


if __name__ == "__main__":
    asyncio.run(main())
