"""Hand-run retrieval-quality benchmark on the LoCoMo development split (not a test: it
prints figures, asserts nothing).

    .venv/bin/python bench/recall.py [--data /work/shared/data/locomo/dev]

Loads ``memories.jsonl`` into a temporary store (``add_many`` in batches of 100, with the
given ids, namespaces and metadata), runs every query of ``queries.jsonl`` in its own
namespace with limit 10 in each mode (hybrid, vector, keyword), and prints R@5, R@10 and
Hit@5 of the evidence ids, overall and per category, next to the reference figures of the
data set's README. The data set (CC BY-NC 4.0) is read in place; nothing is copied.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gm

DEFAULT_DATA = Path("/work/shared/data/locomo/dev")
MODES = ("hybrid", "vector", "keyword")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
BATCH = 100
LIMIT = 10
CONCURRENCY = 4  # queries in flight at once; results do not depend on it
# The README's table rows, by the mode that corresponds to each method.
README_ROWS = {"keyword": "BM25", "vector": "dense cosine", "hybrid": "reciprocal rank fusion"}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_figures(data: Path) -> dict[str, tuple[float, float, float]]:
    """R@5, R@10, Hit@5 per mode from the README's table (next to or above ``data``)."""
    for readme in (data / "README.md", data.parent / "README.md"):
        if readme.is_file():
            break
    else:
        return {}
    found: dict[str, tuple[float, float, float]] = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4:
            continue
        for mode, method in README_ROWS.items():
            if cells[0].startswith(method):
                try:
                    found[mode] = (float(cells[1]), float(cells[2]), float(cells[3]))
                except ValueError:
                    pass
    return found


async def ingest(mem: gm.Store, memories: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for start in range(0, len(memories), BATCH):
        batch = memories[start : start + BATCH]
        await mem.add_many(
            [{"id": m["id"], "namespace": m["namespace"], "text": m["text"], "metadata": m.get("metadata") or {}}
             for m in batch]
        )
    return time.perf_counter() - started


async def run_mode(mem: gm.Store, queries: list[dict[str, Any]], mode: str) -> tuple[list[list[str]], list[float]]:
    """The ranked ids (up to LIMIT) of every query, and each search's latency."""
    ranked: list[list[str]] = [[] for _ in queries]
    latencies: list[float] = [0.0] * len(queries)

    async def worker(offset: int) -> None:
        for i in range(offset, len(queries), CONCURRENCY):
            query = queries[i]
            began = time.perf_counter()
            hits = await mem.search(query["question"], namespace=query["namespace"], limit=LIMIT, mode=mode)
            latencies[i] = time.perf_counter() - began
            ranked[i] = [hit.memory.id for hit in hits]

    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    return ranked, latencies


def score(queries: list[dict[str, Any]], ranked: list[list[str]]) -> dict[Any, tuple[int, float, float, float]]:
    """Per category and overall ("all"): (queries, R@5, R@10, Hit@5)."""
    sums: dict[Any, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
    for query, ids in zip(queries, ranked, strict=True):
        evidence = set(query["evidence"])
        r5 = len(evidence & set(ids[:5])) / len(evidence)
        r10 = len(evidence & set(ids[:10])) / len(evidence)
        hit5 = 1.0 if evidence & set(ids[:5]) else 0.0
        for key in ("all", query["category"]):
            acc = sums[key]
            acc[0] += 1
            acc[1] += r5
            acc[2] += r10
            acc[3] += hit5
    return {key: (int(n), r5 / n, r10 / n, h5 / n) for key, (n, r5, r10, h5) in sums.items()}


def fmt(value: float) -> str:
    return f"{value:.3f}".lstrip("0") if value < 1 else f"{value:.3f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"folder with memories.jsonl and queries.jsonl (default {DEFAULT_DATA})")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows when piped
    data: Path = args.data
    began = time.perf_counter()
    memories = read_jsonl(data / "memories.jsonl")
    queries = read_jsonl(data / "queries.jsonl")
    known = {m["id"] for m in memories}
    missing = sum(1 for q in queries for e in set(q["evidence"]) if e not in known)
    namespaces = sorted({m["namespace"] for m in memories})
    print(f"greatmemory {gm.__version__} recall benchmark on {data}")
    print(f"{len(memories):,} memories in {len(namespaces)} namespaces, {len(queries):,} queries"
          + (f"; WARNING: {missing} evidence ids are not among the memories" if missing else ""))
    references = reference_figures(data)

    with tempfile.TemporaryDirectory(prefix="gm-recall-") as directory:
        async with gm.open(Path(directory) / "locomo.db") as mem:
            took = await ingest(mem, memories)
            stats = await mem.stats()
            print(f"ingested {stats.memories:,} memories with add_many (batches of {BATCH}) in {took:.1f}s "
                  f"({stats.memories / took:.0f}/s, model load included); model {stats.model}")
            await mem.wait_index()
            results = {}
            for mode in MODES:
                started = time.perf_counter()
                ranked, latencies = await run_mode(mem, queries, mode)
                results[mode] = score(queries, ranked)
                latencies.sort()
                print(f"{mode:<8} {len(queries)} searches in {time.perf_counter() - started:.1f}s "
                      f"({CONCURRENCY} in flight; p50 {latencies[len(latencies) // 2] * 1000:.1f} ms)")

    print(f"\nLoCoMo {data.name}: R@5 / R@10 / Hit@5 of the evidence ids, each query in its own namespace, "
          f"limit {LIMIT}")
    if references and data.name != "dev":
        print("(the README's reference figures are for the dev split; this is another folder)")
    header = f"{'mode':<8} {'category':<16} {'n':>4} {'R@5':>6} {'R@10':>6} {'Hit@5':>6}"
    print(header + ("   README reference (R@5 / R@10 / Hit@5)" if references else ""))
    for mode in MODES:
        keys: list[Any] = ["all", *sorted(k for k in results[mode] if k != "all")]
        for key in keys:
            n, r5, r10, h5 = results[mode][key]
            label = "overall" if key == "all" else f"{key} {CATEGORIES.get(key, '?')}"
            line = f"{mode:<8} {label:<16} {n:>4} {fmt(r5):>6} {fmt(r10):>6} {fmt(h5):>6}"
            if key == "all" and mode in references:
                ref = references[mode]
                line += f"   {fmt(ref[0])} / {fmt(ref[1])} / {fmt(ref[2])}  ({README_ROWS[mode]}); " \
                        f"delta R@5 {r5 - ref[0]:+.3f}"
            print(line)
        print()
    print(f"total run time {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
