"""Hand-run retrieval benchmark on LoCoMo (not a test: it prints figures, asserts nothing):
recall of every search mode, overall, per category and per conversation, and the search
latency at 10,000 memories.

    .venv/bin/python bench/recall.py                       # dev split, SQLite, recall + latency
    .venv/bin/python bench/recall.py --data DIR --json out.json
    .venv/bin/python bench/recall.py --database-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/recall.py --no-latency --mode default --mode keyword
    .venv/bin/python bench/recall.py --latency-only

Ingest follows the data set's README protocol through the real library (``gm.open`` on a
temporary SQLite file, or fresh databases on the Postgres at ``--database-url``, dropped at
the end): one namespace per conversation, every memory of ``memories.jsonl`` in file order
(``add_many`` in batches of 100) with its ``id``, ``namespace``, ``metadata``, ``session_id``
``<namespace>:s<metadata.session>`` and ``occurred_at`` = ``metadata.date_time`` as RFC 3339
UTC. A store that refuses ``occurred_at`` (before schema v3) gets the memories without it,
and the header says so. Every query of ``queries.jsonl`` searches its own namespace with
limit 10 in each mode: ``default`` (no mode given), ``hybrid``, ``vector``, ``keyword``.
Per query R@k = |evidence ∩ top k| / |evidence| and Hit@5 = any evidence in the top 5,
averaged over queries; reported pooled (all queries), per category and per conversation.
The script tunes nothing, so a "fold" of leave-one-conversation-out is simply its
held-out conversation's figures here.

Latency: a second store holds the memories copied (namespaces ``<ns>#1``, ``#2``, ...,
ids ``<id>.1``, ...) until it has 10,000, each copy ingested like the original; after a
warm-up, 3 rounds of 300 queries search one copy each, one search at a time, the modes
interleaved; wall time and the process's CPU time per search are reported.
The copies' vectors are not recomputed: the stores share one embedder (the model loads
once) behind a cache keyed by text, so each distinct text is embedded once and a repeat
gets the same vector the model gave it. Query embeddings are never cached: they are part
of the search being timed.

The header names the measured code (the git commit of the ``gm`` package imported, which
may be another checkout's: run this file with an older checkout's virtualenv to measure
that commit), the schema version, the model and the embedding threads. The data set
(CC BY-NC 4.0, Maharana et al., ACL 2024) is read in place; nothing is copied.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gm
from figures import quantile, table, three_places
from gm.config import StoreSettings
from gm.errors import InvalidInput
from locomo import (
    DEFAULT_DATA,
    README_ROWS,
    memory_input,
    per_query,
    print_recall,
    read_jsonl,
    reference_figures,
    summarise,
)
from servers import Databases, check_loopback_postgres

MODES = ("default", "hybrid", "vector", "keyword")  # "default": search() without a mode
BATCH = 100
CONCURRENCY = 4  # recall queries in flight at once; the figures do not depend on it
WARMUP = 20  # untimed searches per mode before the latency run


# -- the latency store --------------------------------------------------------------------


def copies(memories: list[dict[str, Any]], size: int) -> tuple[list[dict[str, Any]], int]:
    """Add inputs for the latency store: the memories copied into ``<ns>#1``, ``<ns>#2``, ... in
    file order until there are ``size``; and how many copies are complete."""
    out: list[dict[str, Any]] = []
    copy = 0
    while len(out) < size and memories:
        copy += 1
        for m in memories[: size - len(out)]:
            memory_id = f"{m['id']}.{copy}"
            out.append(memory_input(m, f"{m['namespace']}#{copy}", memory_id if len(memory_id) <= 128
                                    else f"c{copy}.{len(out)}"))
    return out, len(out) // len(memories) if memories else 0


# -- what is measured -----------------------------------------------------------------------


def git_state(path: Path) -> dict[str, Any]:
    """The commit of the checkout holding ``path``, and whether ``path`` differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path.parent if path.is_file() else path), *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    try:
        commit, subject = git("log", "-1", "--format=%h %s").split(" ", 1)
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", str(path)))
    except (OSError, ValueError, subprocess.CalledProcessError):
        return {"commit": None, "subject": "(not a git checkout)", "modified": False}
    return {"commit": commit, "subject": subject, "modified": dirty}


def describe_commit(state: dict[str, Any]) -> str:
    if state["commit"] is None:
        return str(state["subject"])
    subject = state["subject"] if len(state["subject"]) <= 60 else state["subject"][:60] + "…"
    return f"{state['commit']}{' + uncommitted changes' if state['modified'] else ''} ({subject})"


class SharedEmbedder:
    """One embedder for every store of the run (the model loads once), with ``embed_many``
    cached by text: each distinct text is embedded once; a repeat gets the vector the model
    gave it the first time. ``embed`` (a search's query) is passed through uncached."""

    def __init__(self, embedder: Any) -> None:
        self.inner = embedder
        self.vectors: dict[str, Any] = {}
        self.embedded = 0

    async def embed_many(self, texts: list[str]) -> list[Any]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if missing:
            for text, vector in zip(missing, await self.inner.embed_many(missing), strict=True):
                self.vectors[text] = vector
            self.embedded += len(missing)
        return [self.vectors[t] for t in texts]

    async def stop(self) -> None:
        """A store's close: the shared embedder outlives it (see :meth:`close`)."""

    async def close(self) -> None:
        await self.inner.stop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Target:
    """Where the stores live: temporary SQLite files, or fresh databases on a Postgres
    (bench/servers.py's ``Databases``, dropped at the end)."""

    def __init__(self, directory: Path, database_url: str | None) -> None:
        self.directory = directory
        self.databases = Databases(database_url) if database_url is not None else None

    async def location(self, label: str) -> str:
        if self.databases is None:
            return str(self.directory / f"{label}.db")
        return await self.databases.create(f"recall_{label}")

    async def drop_all(self) -> None:
        if self.databases is not None:
            await self.databases.drop_all()


@contextlib.asynccontextmanager
async def opened(target: Target, label: str, shared: list[SharedEmbedder]) -> AsyncIterator[gm.Store]:
    """A store on a fresh database, its embedder the run's shared one."""
    async with gm.open(await target.location(label)) as mem:
        if shared:
            await mem.embedder.stop()  # never started; the shared one takes its place
        else:
            shared.append(SharedEmbedder(mem.embedder))
        if hasattr(mem, "models"):  # (since re-embedding, the store's models hold its embedder)
            mem.models.embedder = shared[0]  # type: ignore[assignment]
        else:  # an older checkout's store
            mem.embedder = mem.searcher.embedder = shared[0]
        yield mem


async def ingest(mem: gm.Store, inputs: list[dict[str, Any]], occurred: dict[str, Any]) -> float:
    """``add_many`` in batches of BATCH, in order. The first batch finds out whether the store
    takes ``occurred_at`` (a batch is all-or-nothing, so a refused one is simply sent again)."""
    started = time.perf_counter()
    for start in range(0, len(inputs), BATCH):
        batch = inputs[start : start + BATCH]
        if not occurred.get("accepted", True):
            batch = [{k: v for k, v in item.items() if k != "occurred_at"} for item in batch]
        try:
            stored = await mem.add_many(batch)
        except InvalidInput as exc:
            if "accepted" in occurred or "occurred_at" not in (exc.path or exc.message):
                raise
            occurred.update(accepted=False, reason=exc.message)
            batch = [{k: v for k, v in item.items() if k != "occurred_at"} for item in batch]
            stored = await mem.add_many(batch)
        occurred.setdefault("accepted", True)
        for item, memory in zip(batch, stored, strict=True):
            if "occurred_at" in item:
                kept = getattr(memory, "occurred_at", None) == _ms(item["occurred_at"])
                occurred["kept"] = occurred.get("kept", 0) + kept
                occurred["sent"] = occurred.get("sent", 0) + 1
    await mem.wait_index()
    return time.perf_counter() - started


def _ms(rfc: str) -> int:
    return int(datetime.fromisoformat(rfc.replace("Z", "+00:00")).timestamp() * 1000)


async def search(mem: gm.Store, query: str, namespace: str, mode: str, limit: int) -> list[str]:
    options: dict[str, Any] = {} if mode == "default" else {"mode": mode}
    hits = await mem.search(query, namespace=namespace, limit=limit, **options)
    return [hit.memory.id for hit in hits]


async def ranked_ids(mem: gm.Store, queries: list[dict[str, Any]], mode: str, limit: int) -> list[list[str]]:
    ranked: list[list[str]] = [[] for _ in queries]

    async def worker(offset: int) -> None:
        for i in range(offset, len(queries), CONCURRENCY):
            ranked[i] = await search(mem, queries[i]["question"], queries[i]["namespace"], mode, limit)

    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return ranked


async def measure_recall(mem: gm.Store, queries: list[dict[str, Any]], modes: list[str],
                         limit: int) -> tuple[dict[str, Any], dict[str, Any]]:
    figures: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for mode in modes:
        started = time.perf_counter()
        ranked = await ranked_ids(mem, queries, mode, limit)
        scores = [per_query(q, ids) for q, ids in zip(queries, ranked, strict=True)]
        figures[mode] = summarise(queries, scores)
        rows[mode] = [{"id": q["id"], "namespace": q["namespace"], "category": q["category"], **s, "top": ids}
                      for q, s, ids in zip(queries, scores, ranked, strict=True)]
        print(f"  {mode:<8} {len(queries)} searches in {time.perf_counter() - started:.1f}s")
    return figures, rows


async def measure_latency(mem: gm.Store, queries: list[dict[str, Any]], full: int, modes: list[str],
                          count: int, rounds: int, limit: int) -> dict[str, Any]:
    """``rounds`` passes of ``count`` searches per mode, one at a time, the modes interleaved
    (so drift in the machine's load hits them alike), each query in one complete copy of its
    conversation. Wall time, and the process's CPU time (all its threads), which other work
    on a shared machine disturbs less."""
    if not queries:
        return {}
    chosen = [(queries[i * len(queries) // count % len(queries)], 1 + i % max(full, 1)) for i in range(count)]
    for q, copy in chosen[:WARMUP]:
        for mode in modes:
            await search(mem, q["question"], f"{q['namespace']}#{copy}", mode, limit)
    wall: dict[str, list[list[float]]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode in modes:
            wall[mode].append([])
        for q, copy in chosen:
            for mode in modes:
                began, began_cpu = time.perf_counter(), time.process_time()
                await search(mem, q["question"], f"{q['namespace']}#{copy}", mode, limit)
                wall[mode][-1].append((time.perf_counter() - began) * 1000)
                cpu[mode].append((time.process_time() - began_cpu) * 1000)
    figures = {}
    for mode in modes:
        every = [t for passed in wall[mode] for t in passed]
        figures[mode] = {"n": len(every), "p50_ms": statistics.median(every), "p90_ms": quantile(every, 0.9),
                         "p99_ms": quantile(every, 0.99), "mean_ms": statistics.fmean(every),
                         "cpu_p50_ms": statistics.median(cpu[mode]),
                         "round_p50_ms": [statistics.median(passed) for passed in wall[mode]]}
    return figures


# -- printing ---------------------------------------------------------------------------------


def print_latency(latency: dict[str, Any], size: int) -> None:
    print(f"\n### Search latency at {size:,} memories (one search at a time)\n")
    rows = [[m, str(v["n"]), f"{v['p50_ms']:.1f}", f"{v['p90_ms']:.1f}", f"{v['p99_ms']:.1f}", f"{v['mean_ms']:.1f}",
             f"{v['cpu_p50_ms']:.1f}", " / ".join(f"{t:.1f}" for t in v["round_p50_ms"])] for m, v in latency.items()]
    print(table(["mode", "searches", "p50 ms", "p90 ms", "p99 ms", "mean ms", "CPU p50 ms", "p50 per round"], rows))


# -- the run ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data: Path = args.data
    modes: list[str] = list(dict.fromkeys(args.mode or MODES))
    memories = read_jsonl(data / "memories.jsonl")
    queries = read_jsonl(data / "queries.jsonl")
    unanswerable = [q["id"] for q in queries if not q.get("evidence")]
    queries = [q for q in queries if q.get("evidence")]
    known = {m["id"] for m in memories}
    missing = sum(1 for q in queries for e in set(q["evidence"]) if e not in known)
    namespaces = sorted({m["namespace"] for m in memories})
    settings = StoreSettings.load()
    report: dict[str, Any] = {
        "data": str(data), "memories": len(memories), "queries": len(queries), "conversations": namespaces,
        "gm": {"version": gm.__version__, "path": str(Path(gm.__file__).parent), "commit": git_state(
            Path(gm.__file__).parent)},
        "script_commit": git_state(Path(__file__).resolve()), "backend": "postgres" if args.database_url else "sqlite",
        "embed_threads": settings.embed_threads or "one per core", "limit": args.limit, "modes": modes,
        "python": platform.python_version(), "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"greatmemory {gm.__version__} at {describe_commit(report['gm']['commit'])}")
    print(f"  package {report['gm']['path']}; this script at {describe_commit(report['script_commit'])}")
    print(f"data {data}: {len(memories):,} memories in {len(namespaces)} conversations, {len(queries):,} queries"
          + (f"; WARNING: {missing} evidence ids are not among the memories" if missing else "")
          + (f"; {len(unanswerable)} queries without evidence left out" if unanswerable else ""))

    shared: list[SharedEmbedder] = []
    with tempfile.TemporaryDirectory(prefix="gm-recall-") as directory:
        target = Target(Path(directory), args.database_url)
        try:
            if not args.latency_only:
                async with opened(target, "recall", shared) as mem:
                    await header(mem, report)
                    occurred: dict[str, Any] = {}
                    took = await ingest(mem, [memory_input(m, m["namespace"], m["id"]) for m in memories], occurred)
                    report["occurred_at"] = occurred
                    print(f"ingested {len(memories):,} memories in {took:.1f}s (add_many, batches of {BATCH}, "
                          f"model load and embedding included); {describe_occurred(occurred)}")
                    print(f"searching ({CONCURRENCY} in flight, limit {args.limit}):")
                    report["recall"], report["per_query"] = await measure_recall(mem, queries, modes, args.limit)
            if not args.no_latency:
                inputs, full = copies(memories, args.latency_size)
                async with opened(target, "latency", shared) as mem:
                    if "schema_version" not in report:
                        await header(mem, report)
                    occurred = {}
                    before = shared[0].embedded
                    took = await ingest(mem, inputs, occurred)
                    report.setdefault("occurred_at", occurred)
                    print(f"latency store: {len(inputs):,} memories ({full} complete copies) ingested in {took:.1f}s "
                          f"({shared[0].embedded - before:,} texts embedded, the rest from the cache); "
                          f"{describe_occurred(occurred)}")
                    started = time.perf_counter()
                    report["latency"] = {"memories": len(inputs), "copies": full, "ingest_seconds": took,
                                         "modes": await measure_latency(mem, queries, full, modes,
                                                                        args.latency_queries, args.latency_rounds,
                                                                        args.limit)}
                    print(f"  {args.latency_rounds} × {args.latency_queries} timed searches per mode "
                          f"in {time.perf_counter() - started:.1f}s")
        finally:
            if shared:
                await shared[0].close()
            await target.drop_all()

    occurred_at = "sent" if report["occurred_at"].get("accepted") else "not accepted"
    print(f"\n## LoCoMo {data.name}, greatmemory {report['gm']['commit']['commit']}, "
          f"schema v{report['schema_version']}, {report['backend']}, occurred_at {occurred_at}")
    if "recall" in report:
        print_recall(report["recall"], args.limit)
        references = reference_figures(data)
        if references and data.name == "dev":
            print("\nThe README's reference rows (other implementations of each idea, not the product's modes): "
                  + "; ".join(f"{README_ROWS[m]} R@5 {three_places(r[0])} R@10 {three_places(r[1])} "
                              f"Hit@5 {three_places(r[2])}" for m, r in references.items()))
    if "latency" in report:
        print_latency(report["latency"]["modes"], report["latency"]["memories"])
    return report


async def header(mem: gm.Store, report: dict[str, Any]) -> None:
    stats = await mem.stats()
    vectors = "pgvector" if getattr(mem.backend, "native_vectors", False) else "in-process index"
    report.update(schema_version=stats.schema_version, model=stats.model, backend=stats.backend, vectors=vectors)
    print(f"schema v{stats.schema_version}, backend {stats.backend} (vector search: {vectors}), model {stats.model}, "
          f"embedding threads {report['embed_threads']}")


def describe_occurred(occurred: dict[str, Any]) -> str:
    if not occurred.get("accepted", True):
        return f"this store does not take occurred_at ({occurred.get('reason')}): ingested without it"
    if not occurred.get("sent"):
        return "no memory has a date_time: no occurred_at sent"
    kept = occurred.get("kept", 0)
    return f"occurred_at sent on {occurred['sent']:,} memories, kept on {kept:,}" + (
        "" if kept == occurred["sent"] else " (WARNING: the store dropped or changed the rest)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder with memories.jsonl and queries.jsonl (default {DEFAULT_DATA})")
    parser.add_argument("--database-url", help="a postgresql:// URL: the stores are fresh databases on that server "
                        "(created and dropped by the run); default: temporary SQLite files")
    parser.add_argument("--mode", action="append", choices=MODES,
                        help="measure only this mode (repeat for several; default all: " + ", ".join(MODES) + ")")
    parser.add_argument("--limit", type=int, default=10, help="search limit (default 10)")
    parser.add_argument("--json", type=Path, help="also write every figure (and each query's top ids) to this file")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--latency-only", action="store_true", help="skip the recall run")
    group.add_argument("--no-latency", action="store_true", help="skip the latency run")
    parser.add_argument("--latency-size", type=int, default=10_000, help="memories in the latency store (10000)")
    parser.add_argument("--latency-queries", type=int, default=300, help="timed searches per mode and round (300)")
    parser.add_argument("--latency-rounds", type=int, default=3,
                        help="passes over those queries (3): the spread of their p50s shows the noise")
    args = parser.parse_args()
    if args.database_url and not args.database_url.startswith(("postgresql://", "postgres://")):
        parser.error("--database-url must be a postgresql:// URL")
    if args.database_url:
        check_loopback_postgres(args.database_url, "--database-url")  # bench load stays on this machine
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows when piped
    began = time.perf_counter()
    report = asyncio.run(run(args))
    report["run_seconds"] = time.perf_counter() - began
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"\nfigures written to {args.json}")
    print(f"\ntotal run time {report['run_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
