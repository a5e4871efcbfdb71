"""Hand-run benchmark of the embedded library (not a test: it prints figures, asserts nothing).

    .venv/bin/python bench/embedded.py           # full run (about 5 minutes on 2 cores)
    .venv/bin/python bench/embedded.py --quick   # small, fast run

Prints, in one run:

a) the raw embedding ceiling: ``Encoder.encode`` on realistic 10-40-word texts at batch
   sizes 1, 8, 16, 32 and 64 over every core, and one single-threaded call per core at once
   at batch 32 (the way the library's Embedder runs it); the best counts;
b) ``Store.add`` throughput with 32 concurrent callers, and its ratio to the ceiling;
c) search latency (p50/p99) and searches/s, one caller and 8 concurrent callers, per
   mode, over 10,000 and 100,000 memories (their vectors are random unit vectors
   written straight into a database made by gm's migrations; texts are realistic, so the
   keyword index is real);
d) start-up: how long ``gm.open`` takes on each of those files (model not loaded), how
   long until the vector index is ready, and the longest event-loop stall meanwhile.

Every database lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import gm
from cpu import OtherLoad
from figures import percentile
from gm.embedding import Encoder, ModelSpec
from gm.memory import new_id
from workload import embedded_questions, embedded_texts

try:
    from gm.context import date_words
except ImportError:  # a release before session context (run against an older checkout)
    def date_words(ms: int) -> str:
        return ""
from gm.storage import sqlite_migrations

DIM = 384
NAMESPACE = "bench"
USERS = 100
SESSION_TURNS = 20  # memories a session holds (schema v3 on)


@dataclass(frozen=True)
class Config:
    ceiling_texts: int  # texts encoded per batch size in each round
    ceiling_rounds: int  # rounds over all batch sizes, interleaved; the best round counts
    adds: int  # total adds, shared by the callers
    add_callers: int
    sizes: tuple[int, ...]  # store sizes for the search benchmark
    searches: int  # timed searches per (size, mode, scope, concurrency)
    search_callers: int


FULL = Config(
    ceiling_texts=512, ceiling_rounds=3, adds=1600, add_callers=32, sizes=(10_000, 100_000), searches=300,
    search_callers=8,
)
QUICK = Config(
    ceiling_texts=128, ceiling_rounds=1, adds=256, add_callers=32, sizes=(2_000, 10_000), searches=40,
    search_callers=8,
)


# -- a quiet machine, event-loop stalls ---------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def wait_quiet(minutes: float, threshold: float = 0.2) -> None:
    """Wait (up to ``minutes``) for a 10-second window in which other processes use < ``threshold`` cores."""
    load = OtherLoad()
    deadline = time.monotonic() + minutes * 60
    while True:
        time.sleep(10)
        other = load.cores()
        if other is None or other < threshold:
            print(f"machine quiet enough (other processes: {other if other is not None else 0:.2f} cores)")
            return
        if time.monotonic() > deadline:
            print(f"machine still busy after {minutes:g} min (other processes: {other:.2f} cores); running anyway")
            return


class LoopStallMonitor:
    """The longest gap between ticks of a task that wants to run every ``tick`` seconds."""

    def __init__(self, tick: float = 0.002) -> None:
        self.tick = tick
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> LoopStallMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.tick)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - self.tick)
            last = now


# -- a) raw embedding ceiling -----------------------------------------------------------------


def bench_ceiling(cfg: Config) -> dict[int, float]:
    print("\n== a) raw embedding ceiling: Encoder(ModelSpec.default()).encode ==")
    spec = ModelSpec.default()
    started = time.perf_counter()
    encoder = Encoder(spec)  # the library's Embedder builds it the same way: Encoder(spec)
    load = time.perf_counter() - started
    threads = encoder.session.get_session_options().intra_op_num_threads
    texts = embedded_texts(cfg.ceiling_texts, seed=1)
    words = [len(t.split()) for t in texts]
    tokens = [len(e.ids) for e in encoder.tokenizer.encode_batch(texts)]
    print(f"model {spec.shown}; loaded in {load:.2f}s; ONNX intra-op threads {threads} "
          f"(os.cpu_count() = {os.cpu_count()})")
    print(f"{len(texts)} texts per batch size and round, {cfg.ceiling_rounds} round(s); words/text "
          f"{min(words)}-{max(words)} (mean {np.mean(words):.1f}); tokens/text mean {np.mean(tokens):.1f}, "
          f"max {max(tokens)}")
    encoder.encode(texts[:64])  # warm-up
    sizes = (1, 8, 16, 32, 64)
    rounds: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(cfg.ceiling_rounds):  # rounds interleave the batch sizes, so drifting load hits them all
        for size in sizes:
            started = time.perf_counter()
            for i in range(0, len(texts), size):
                encoder.encode(texts[i : i + size])
            rounds[size].append(len(texts) / (time.perf_counter() - started))
    print(f"{'batch':>6} {'best texts/s':>13} {'median':>8} {'ms/batch (best)':>16}   rounds")
    results: dict[int, float] = {}
    for size in sizes:
        results[size] = max(rounds[size])
        print(f"{size:>6} {results[size]:>13.1f} {float(np.median(rounds[size])):>8.1f} "
              f"{size / results[size] * 1000:>16.2f}   " + " ".join(f"{r:.1f}" for r in rounds[size]))
    # The way the library's Embedder runs the model: one single-threaded call per core at once.
    single, cores = Encoder(spec, threads=1), os.cpu_count() or 1
    single.encode(texts[:64])
    side_by_side = []
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(cfg.ceiling_rounds):
            started = time.perf_counter()
            list(pool.map(single.encode, [texts[i : i + 32] for i in range(0, len(texts), 32)]))
            side_by_side.append(len(texts) / (time.perf_counter() - started))
    results[0] = max(side_by_side)  # (key 0: those calls side by side, batch 32)
    print(f"{cores} single-threaded calls at once, batch 32: {results[0]:.1f} texts/s best   "
          + " ".join(f"{r:.1f}" for r in side_by_side))
    best = max(results, key=results.__getitem__)
    print(f"ceiling (best): {results[best]:.1f} texts/s " + ("side by side" if best == 0 else f"at batch {best}"))
    return results


# -- b) add throughput --------------------------------------------------------------------------


async def bench_adds(cfg: Config, ceiling: dict[int, float], tmp: Path) -> None:
    print(f"\n== b) Store.add throughput: {cfg.add_callers} concurrent callers, {cfg.adds} adds ==")
    texts = embedded_texts(cfg.adds, seed=2)
    async with gm.open(tmp / "adds.db") as mem:
        started = time.perf_counter()
        await mem.add("Warm-up memory that loads the embedding model before the timing starts.", user_id="warmup")
        print(f"first add (loads the model): {time.perf_counter() - started:.2f}s")

        # Instrumentation (bench-side wrappers, src untouched): ONNX calls and Writer commits.
        encode_batches: list[tuple[int, float]] = []
        original_encode = mem.embedder._encode

        def timed_encode(batch: list[str]) -> Any:
            began = time.perf_counter()
            out = original_encode(batch)
            encode_batches.append((len(batch), time.perf_counter() - began))
            return out

        mem.embedder._encode = timed_encode  # type: ignore[method-assign]
        writer = mem.backend.writer  # type: ignore[attr-defined]
        commits: list[tuple[int, float]] = []
        original_handle = writer.handle

        async def timed_handle(batch: list[Any]) -> None:
            began = time.perf_counter()
            await original_handle(batch)
            commits.append((len(batch), time.perf_counter() - began))

        writer.handle = timed_handle

        async def caller(i: int) -> None:
            for text in texts[i :: cfg.add_callers]:
                await mem.add(text, user_id=f"user-{i:02d}", metadata={"source": "bench"})

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(cfg.add_callers)))
        elapsed = time.perf_counter() - started
        stats = await mem.stats()
    rate = cfg.adds / elapsed
    best = max(ceiling.values())
    busy = sum(t for _, t in encode_batches)
    write_busy = sum(t for _, t in commits)
    print(f"{cfg.adds} adds in {elapsed:.2f}s: {rate:.1f} adds/s  (stored: {stats.memories - 1})")
    print(f"ratio to the ceiling: {rate / best:.2f} of best ({best:.1f}/s); "
          f"{rate / ceiling[32]:.2f} of batch-32 ({ceiling[32]:.1f}/s)   [target >= 0.8]")
    print(f"embedder: {len(encode_batches)} ONNX calls, mean batch {np.mean([n for n, _ in encode_batches]):.1f}, "
          f"encoder busy {busy:.2f}s = {busy / elapsed:.0%} of the wall time, "
          f"{sum(n for n, _ in encode_batches) / busy:.1f} texts/s while busy")
    print(f"writer: {len(commits)} group commits, mean {np.mean([n for n, _ in commits]):.1f} ops, "
          f"{np.mean([t for _, t in commits]) * 1000:.1f} ms each; busy {write_busy:.2f}s = "
          f"{write_busy / elapsed:.0%} of the wall time")


# -- c) + d) search latency and start-up ---------------------------------------------------------


def build_db(path: Path, n: int, seed: int) -> float:
    """A database made by gm's migrations holding ``n`` memories with realistic texts and
    random unit vectors (written straight with sqlite3; the FTS triggers fill the keyword
    index). The model identity is left for gm.open to record. Returns the seconds taken."""
    started = time.perf_counter()
    sqlite_migrations.migrate(path)
    rng = np.random.default_rng(seed)
    users = random.Random(seed)
    texts = embedded_texts(n, seed=seed)
    created = int(time.time() * 1000) - n * 60_000
    conn = sqlite3.connect(path)
    try:
        # From schema v3 on, memories come in sessions of SESSION_TURNS with their context
        # (gm.context: the date and the neighbours' text), as the Writer would store them, so
        # the keyword index is as large as a real one and no backfill runs during the timing.
        with_context = "context" in {r[1] for r in conn.execute("PRAGMA table_info(memories)")}
        chunk = 10_000
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            vectors = rng.standard_normal((count, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = []
            for j in range(count):
                i = start + j
                at = created + i * 60_000
                row: tuple[Any, ...] = (new_id(), NAMESPACE, f"user-{users.randrange(USERS):03d}", texts[i],
                                        '{"source": "bench"}', at, at, vectors[j].tobytes())
                if with_context:
                    first = i - i % SESSION_TURNS
                    around = texts[max(first, i - 2) : i] + texts[i + 1 : min(i + 2, first + SESSION_TURNS, n)]
                    row += (f"s{i // SESSION_TURNS}", "\n".join([date_words(at), *around]))
                rows.append(row)
            extra = ", session_id, context" if with_context else ""
            conn.executemany(
                "INSERT INTO memories (id, namespace, user_id, text, metadata, created_at, updated_at, "
                f"embedding{extra}) "
                f"VALUES (?,?,?,?,?,?,?,?{',?,?' if with_context else ''})",
                rows,
            )
            conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - started


async def timed_searches(
    mem: gm.Store, queries: list[str], callers: int, mode: str, scope: dict[str, str]
) -> tuple[list[float], float, list[int]]:
    """Run ``queries`` split among ``callers`` tasks: (latencies, wall seconds, hits per search)."""
    latencies: list[float] = []
    hits: list[int] = []

    async def caller(i: int) -> None:
        for query in queries[i::callers]:
            began = time.perf_counter()
            found = await mem.search(query, limit=10, mode=mode, **scope)
            latencies.append(time.perf_counter() - began)
            hits.append(len(found))

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    return latencies, time.perf_counter() - started, hits


async def bench_size(cfg: Config, n: int, tmp: Path, load: OtherLoad) -> dict[str, Any]:
    path = tmp / f"search-{n}.db"
    built = build_db(path, n, seed=n)
    size_mb = path.stat().st_size / 1e6
    print(f"\n-- {n:,} memories ({USERS} users in namespace {NAMESPACE!r}); db built in {built:.1f}s, "
          f"{size_mb:.0f} MB --")

    startup: dict[str, Any] = {}
    started = time.perf_counter()
    mem = await gm.open(path)
    try:
        startup["open"] = time.perf_counter() - started
        startup["model_loaded"] = mem.embedder.loaded
        with LoopStallMonitor() as monitor:
            await mem.wait_index()
            startup["ready"] = time.perf_counter() - started
            await asyncio.sleep(0.01)
        startup["stall"] = monitor.worst
        startup["indexed"] = len(mem.indexer.index)
        print(f"gm.open {startup['open'] * 1000:.0f} ms (model loaded: {startup['model_loaded']}); vector index "
              f"ready {startup['ready'] * 1000:.0f} ms after the call ({startup['indexed']:,} vectors); longest "
              f"event-loop stall while loading {startup['stall'] * 1000:.0f} ms")

        queries = embedded_questions(cfg.searches, seed=n + 7)
        warm = time.perf_counter()
        await mem.search("What does Maya like to eat?", namespace=NAMESPACE, limit=10)  # loads the model
        print(f"first search (loads the model): {(time.perf_counter() - warm) * 1000:.0f} ms")
        for query in embedded_questions(10, seed=99):
            await mem.search(query, namespace=NAMESPACE, limit=10)
        print(f"{'mode':<8} {'scope':<22} {'callers':>7} {'p50':>11} {'p99':>11} {'searches/s':>11} {'hits':>5}")
        for mode in ("hybrid", "vector", "keyword"):
            for scope_name, scope in (
                (f"namespace ({n:,})", {"namespace": NAMESPACE}),
                (f"one user (~{n // USERS:,})", {"namespace": NAMESPACE, "user_id": "user-007"}),
            ):
                for callers in (1, cfg.search_callers):
                    latencies, wall, hits = await timed_searches(mem, queries, callers, mode, scope)
                    print(f"{mode:<8} {scope_name:<22} {callers:>7} {ms(percentile(latencies, 50)):>11} "
                          f"{ms(percentile(latencies, 99)):>11} {len(latencies) / wall:>11.1f} "
                          f"{np.mean(hits):>5.1f}")
    finally:
        await mem.close()
    print(load.section())
    return startup


async def bench_search(cfg: Config, tmp: Path, load: OtherLoad) -> None:
    print(f"\n== c) search latency, limit 10: {cfg.searches} searches per row, 1 and {cfg.search_callers} "
          f"concurrent callers (random unit vectors, realistic texts) ==")
    startups = {n: await bench_size(cfg, n, tmp, load) for n in cfg.sizes}
    print("\n== d) start-up (file just written, so in the OS page cache) ==")
    print(f"{'memories':>9} {'gm.open':>10} {'model loaded':>13} {'index ready':>12} {'loop stall':>11}")
    for n, s in startups.items():
        print(f"{n:>9,} {ms(s['open']):>10} {s['model_loaded']!s:>13} {ms(s['ready']):>12} {ms(s['stall']):>11}")
    largest = max(startups)
    s = startups[largest]
    verdict = "met" if s["open"] < 1 and not s["model_loaded"] else "NOT met"
    print(f"target at {largest:,}: gm.open < 1 s with the model not loaded -> {verdict}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run instead of the full one")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                        help="first wait up to MINUTES for other processes to leave the CPUs idle")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows when piped
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    cfg = QUICK if args.quick else FULL
    began = time.perf_counter()
    print(f"greatmemory {gm.__version__} embedded benchmark ({'quick' if args.quick else 'full'} run); "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"GM_EMBED_THREADS={os.environ.get('GM_EMBED_THREADS', 'unset')}")
    if hasattr(os, "getloadavg"):
        print("load average before the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    load = OtherLoad()
    ceiling = bench_ceiling(cfg)
    print(load.section())
    with tempfile.TemporaryDirectory(prefix="gm-bench-") as directory:
        tmp = Path(directory)
        await bench_adds(cfg, ceiling, tmp)
        print(load.section())
        await bench_search(cfg, tmp, load)
    print(f"\ntotal run time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
