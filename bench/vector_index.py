"""The in-process vector index at scale (gm.index): load, graph build, and search latency and
recall@10 against exact float32 search, whole namespace and one user, at each size.

Vectors are the peer benchmark's (bench/peers_data.py): perturbations of real embeddings of
the LoCoMo dev memories, queries the dev questions' own embeddings. The searches rescore
the index's int8 best in float32 as gm.search does (here from memory, there
from the database), so recall is what a user gets.

    .venv/bin/python bench/vector_index.py --size 100000 --size 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import percentile  # noqa: E402
from gm import vector_plan  # noqa: E402
from gm.index import VectorIndex, limit_blas_threads  # noqa: E402
from gm.memory import Scope  # noqa: E402
from gm.search import rescore_depth  # noqa: E402
from gm.storage.base import VectorRow  # noqa: E402
from peers_data import chunks, embedded, model_spec  # noqa: E402

USERS = 100


def rss_mib() -> float:
    return float(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


DATA = Path("/work/shared/data/locomo/dev")
CACHE = Path.home() / ".cache" / "greatmemory-bench"


def run(size: int, queries: int, seed: int) -> dict[str, object]:
    bases, asked = embedded(DATA, model_spec(), CACHE, queries, 0, USERS, seed)
    data = np.concatenate([vectors for _, vectors, _ in chunks(bases, size, seed)])
    asks = asked.vectors
    users = np.arange(size) % USERS
    before = rss_mib()
    index = VectorIndex(data.shape[1])
    started = time.perf_counter()
    for start in range(0, size, 20_000):  # as the Indexer loads: pages of 20,000
        end = min(size, start + 20_000)
        index.load([VectorRow(i + 1, Scope("ns", f"u{users[i]}"), None, data[i].tobytes()) for i in range(start, end)])
    load = time.perf_counter() - started
    started = time.perf_counter()
    while index.graph_backlog():
        index.grow_graph(threads=2)
    graph = time.perf_counter() - started
    figures: dict[str, object] = {
        "size": size, "load_s": round(load, 2), "graph_s": round(graph, 1),
        "graph_rows_per_s": round(size / graph) if graph else None,
        "index_mib": round(index.nbytes / 2**20), "rss_growth_mib": round(rss_mib() - before),
    }
    for name, scope, mask in (("namespace", Scope("ns"), None), ("one user", Scope("ns", "u7"), users == 7)):
        rows = np.arange(size) if mask is None else np.flatnonzero(mask)
        times, recalls = [], []
        for q in asks:
            t = time.perf_counter()
            found = [r for r, _ in index.search(q, scope, 0, rescore_depth(10))]
            ids = np.asarray(found, dtype=np.int64) - 1
            top = ids[np.argsort(-(data[ids] @ q), kind="stable")[:10]]  # the rescoring
            times.append(time.perf_counter() - t)
            exact = rows[np.argsort(-(data[rows] @ q), kind="stable")[:10]]
            recalls.append(len(set(top.tolist()) & set(exact.tolist())) / 10)
        ms = [t * 1000 for t in times]
        figures[name] = {"p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
                         "recall_at_10": round(float(np.mean(recalls)), 3)}
    figures["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, action="append", help="memories (repeatable; default 100000)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limit_blas_threads(1)
    print(f"planner: exact up to {vector_plan.EXACT_MAX_ROWS} rows or below {vector_plan.MIN_SELECTIVITY:.0%}")
    results = []
    for size in args.size or [100_000]:
        figures = run(size, args.queries, args.seed)
        print(json.dumps(figures))
        results.append(figures)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
