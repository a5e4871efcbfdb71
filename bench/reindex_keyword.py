"""Hand-run benchmark of the online keyword index rebuild (not a test: it prints figures).

    .venv/bin/python bench/reindex_keyword.py                 # SQLite, 20,000 memories
    .venv/bin/python bench/reindex_keyword.py --rows 100000 --batch 2000
    .venv/bin/python bench/reindex_keyword.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

Fills a fresh database (a temporary SQLite file, or a database created on that Postgres and
dropped afterwards) with realistic 10-40-word memories through the backend's Writer (their
vectors are one constant: keyword search does not read them), then prints:

a) the rebuild alone: rows/s, and on SQLite how long each step holds the Writer;
b) the rebuild beside a writer adding one memory at a time: rows/s, and that writer's add
   latency (p50/p99/max) during the rebuild against the same writer idle;
c) keyword search latency (one word, p50/p99) over the index before and after the rebuild;
d) on SQLite, the cost of resuming at the half-way point: the check of the half-built table made
   at open, and the step that resumes it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from figures import percentile
from gm.memory import NewMemory, Scope
from gm.progress import Progress
from gm.storage import sqlite_rebuild
from gm.storage.base import AddMemories, Backend, RebuildStep
from gm.storage.ops import IndexChange
from gm.storage.postgres import PostgresBackend
from gm.storage.sqlite import SQLiteBackend
from workload import memory_text

SCOPE = Scope("bench", None, None, None)
VECTOR = np.ones(384, dtype="<f4").tobytes()


async def ignore(changes: list[IndexChange]) -> None:
    return None


def memories(n: int, rng: random.Random, prefix: str) -> list[NewMemory]:
    return [NewMemory(f"{prefix}{i}", True, SCOPE, memory_text(rng)[1], {}, None, vector=VECTOR) for i in range(n)]


async def fill(backend: Backend, rows: int) -> list[str]:
    rng = random.Random(1)
    words: set[str] = set()
    for start in range(0, rows, 500):
        batch = memories(min(500, rows - start), rng, f"m{start}-")
        words.update(w.lower() for m in batch for w in m.text.split() if w.isalpha() and len(w) > 4)
        await backend.write(AddMemories(batch, 1))
    return sorted(words)


async def add_latencies(backend: Backend, until: asyncio.Future[Any] | None, n: int) -> list[float]:
    """Adds one memory at a time: ``n`` of them, or until ``until`` is done; their latencies (ms)."""
    rng, out = random.Random(2), []
    while (until is None and len(out) < n) or (until is not None and not until.done()):
        started = time.perf_counter()
        await backend.write(AddMemories(memories(1, rng, f"w{uuid.uuid4().hex[:8]}-"), 1))
        out.append((time.perf_counter() - started) * 1000)
    return out


async def search_latencies(backend: Backend, words: list[str], n: int = 300) -> list[float]:
    rng, out = random.Random(3), []
    for _ in range(n):
        started = time.perf_counter()
        await backend.keyword_search([rng.choice(words)], SCOPE, None, 10, 1)
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(values: list[float]) -> str:
    return f"p50 {percentile(values, 50):.1f} ms, p99 {percentile(values, 99):.1f} ms, max {max(values):.1f} ms"


async def rebuild(backend: Backend, batch: int, progress: Any = None) -> float:
    started = time.perf_counter()
    await backend.rebuild_keyword(progress, batch=batch)  # type: ignore[call-arg]
    return time.perf_counter() - started


async def resume_check(backend: SQLiteBackend, batch: int) -> tuple[float, float]:
    """Stop a rebuild half-way, then time the check of its table made at open (with the Writer
    held, as before the first write) and the step that resumes it."""
    class Stop(Exception):
        pass

    def stop(p: Progress) -> None:
        if p.done * 2 >= p.total > 0:
            raise Stop

    try:
        await backend.rebuild_keyword(stop, batch=batch)
    except Stop:
        pass
    started = time.perf_counter()
    await backend.write(RebuildStep(lambda tx: sqlite_rebuild.discard_if_unsound(tx, thorough=True)))
    checked = time.perf_counter()
    await backend.write(RebuildStep(sqlite_rebuild.prepare))
    return checked - started, time.perf_counter() - checked


async def run(backend: Backend, rows: int, batch: int) -> None:
    await backend.open(ignore)
    try:
        print(f"filling {rows} memories ...", file=sys.stderr, flush=True)
        words = await fill(backend, rows)
        before = await search_latencies(backend, words)

        steps: list[float] = []
        last = [time.perf_counter()]

        def step_times(p: Progress) -> None:
            now = time.perf_counter()
            steps.append((now - last[0]) * 1000)
            last[0] = now

        alone = await rebuild(backend, batch, step_times)
        print(f"a) rebuild alone: {rows} rows in {alone:.2f} s = {rows / alone:,.0f} rows/s", end="")
        if isinstance(backend, SQLiteBackend):
            print(f"; a step of {batch} rows: p50 {percentile(steps[1:-1], 50):.1f} ms, "
                  f"max {max(steps[1:-1]):.1f} ms", end="")
        print()

        idle = await add_latencies(backend, None, 300)
        task = asyncio.ensure_future(rebuild(backend, batch))
        during = await add_latencies(backend, task, 0)
        beside = await task
        print(f"b) rebuild beside a writer: {rows / beside:,.0f} rows/s; {len(during)} adds meanwhile")
        print(f"   add latency idle:           {summary(idle)}")
        print(f"   add latency during rebuild: {summary(during)}")
        after = await search_latencies(backend, words)
        print(f"c) keyword search, one word: before {summary(before)}")
        print(f"                             after  {summary(after)}")
        if isinstance(backend, SQLiteBackend):
            check, resume = await resume_check(backend, batch)
            print(f"d) resuming at half-way: the check of the half-built table at open took {check * 1000:.0f} ms, "
                  f"the step that resumes it {resume * 1000:.0f} ms")
    finally:
        await backend.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=sqlite_rebuild.BATCH)
    parser.add_argument("--database-url", help="a Postgres server where this user may CREATE DATABASE")
    args = parser.parse_args()
    if args.database_url is None:
        with tempfile.TemporaryDirectory() as directory:
            await run(SQLiteBackend(Path(directory) / "bench.db"), args.rows, args.batch)
        return
    name = f"gm_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = args.database_url.rsplit("/", 1)[0]
        await run(PostgresBackend(f"{base}/{name}"), args.rows, args.batch)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
