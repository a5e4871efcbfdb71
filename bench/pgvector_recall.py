"""pgvector's HNSW recall@10 against exact search, as the Postgres backend runs it.

    .venv/bin/python bench/postgres.py recall [--quick] [--rows 100000] [--ef 40,100,200] [--json]

At ``--rows`` memories (100,000) of 384 dimensions, on a Postgres 16 + pgvector 0.6.2 started by
the ``pgserver`` package in a temporary directory. Embedding 100,000 texts would take ~10 minutes
here, so the vectors are made this way: ``--base`` real texts (5,000: the LoCoMo dev memories of
bench/recall.py where present, the rest from bench/workload.py's ``Workload``) are embedded with
the real model; each stored vector is a base vector e plus Gaussian noise drawn with the
covariance of the real embeddings (so it moves along the directions real texts vary in), scaled
by ``--spread`` (0.7), renormalised: cos(v, e) is about 0.85-0.88. The median similarity to the
1st and 10th nearest neighbour is printed for the real texts and the synthetic set, to judge
how alike they are (the synthetic set is denser, as 100,000 real texts would be). The 200 query
vectors are embeddings of real questions (LoCoMo and Workload), not perturbations.

Rows go straight into a database migrated by gm (``gm.open`` once, then COPY into
``memories``: embedding as float32 bytes and ``vec``), then the HNSW index gm creates is built
over them (timed; gm itself creates it on the first vector write and fills it row by row), and
each query goes through ``PostgresBackend.vector_search`` itself (its module's ef_search
constant is set per run, bench-side) and is compared with a numpy brute-force top-10 of the
same scope, at each ``--ef`` (40,100,200); then at limit 50 with gm's own ef_search, the call a
hybrid search with limit 10 makes. Scopes: the main namespace (99% of the rows), one user of it
(10%), and a namespace holding 1% of the rows. HNSW filters after its graph walk (pgvector <
0.8), so a narrow scope can leave the page short, and then the backend runs an exact scan.
The backend asks the vector planner (gm.vector_plan) which plan a search takes: the output says
how often each was taken (exact scan, HNSW, HNSW left short and answered exactly), and, with
each plan forced in turn at limit 10, what each costs at each scope's size: where the exact scan
stops being the cheaper one (pgvector's break-even, postgres_vectors.EXACT_MAX_ROWS).
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import numpy as np

import gm
import gm.storage.postgres as pg
import gm.storage.postgres_vectors as pgv
from cpu import CpuMeter, Quiet
from figures import load_average, percentile, progress
from gm import search, vector_plan
from gm.embedding import Encoder, ModelSpec
from gm.memory import Scope
from locomo import read_jsonl
from workload import Workload, query_texts

if TYPE_CHECKING:
    from postgres import Config

MAIN_NS, SMALL_NS = "bench", "small"
RECALL_USERS = 10  # users of the main namespace: one of them holds ~10% of the rows
HYBRID_DEPTH = search.candidates(10)  # how deep a hybrid search with limit 10 asks vector_search to go


def real_texts(n: int, data: Path) -> tuple[list[str], str]:
    """``n`` memory texts: the LoCoMo dev memories where present, then Workload ones."""
    texts: list[str] = []
    source = []
    if (data / "memories.jsonl").is_file():
        texts = [m["text"] for m in read_jsonl(data / "memories.jsonl")][:n]
        source.append(f"{len(texts)} LoCoMo dev memories")
    rest = n - len(texts)
    if rest:
        texts += [m["text"] for m in Workload(seed=3).memories(rest)]
        source.append(f"{rest} bench/workload.py Workload texts")
    return texts, " + ".join(source)


def real_questions(n: int, data: Path) -> tuple[list[str], str]:
    questions: list[str] = []
    source = []
    if (data / "queries.jsonl").is_file():
        questions = [q["question"] for q in read_jsonl(data / "queries.jsonl")][: n // 2]
        source.append(f"{len(questions)} LoCoMo dev questions")
    rest = n - len(questions)
    questions += query_texts(rest, seed=11)
    source.append(f"{rest} Workload questions")
    return questions, " + ".join(source)


def synthesize(base: np.ndarray, n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors, each a random base vector plus Gaussian noise with the base set's
    covariance times ``scale``; and the base index of each."""
    rng = np.random.default_rng(seed)
    centered = base - base.mean(axis=0)
    _, singular, directions = np.linalg.svd(centered, full_matrices=False)
    stddev = (singular / np.sqrt(len(base))).astype(np.float32)  # per principal direction
    parents = rng.integers(0, len(base), n)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 20_000):
        end = min(n, start + 20_000)
        noise = (rng.standard_normal((end - start, len(stddev)), dtype=np.float32) * stddev) @ directions
        chunk = base[parents[start:end]] + scale * noise
        out[start:end] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out, parents


def neighbour_similarity(vectors: np.ndarray, sample: int, seed: int) -> dict[str, float]:
    """Median cosine similarity of a sample of vectors to their 1st and 10th nearest neighbour."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    sims = vectors[picked] @ vectors.T
    sims[np.arange(len(picked)), picked] = -2.0  # not itself
    top = -np.partition(-sims, 10, axis=1)[:, :10]
    top.sort(axis=1)
    return {"nn1_p50": round(float(np.median(top[:, -1])), 3), "nn10_p50": round(float(np.median(top[:, 0])), 3)}


def exact_top(vectors: np.ndarray, members: np.ndarray, query: np.ndarray, k: int) -> tuple[set[int], float]:
    """The exact top-``k`` rows of ``members`` by cosine, and the k-th best similarity."""
    k = min(k, len(members))
    sims = vectors[members] @ query
    best = np.argpartition(-sims, k - 1)[:k]
    return {int(members[i]) for i in best}, float(sims[best].min())


async def ignore_changes(changes: list[Any]) -> None:
    """A backend opened alone: no index follows its commits."""


async def load_rows(url: str, vectors: np.ndarray, texts: list[str], parents: np.ndarray,
                    namespaces: list[str], users: list[str | None]) -> float:
    """COPY the rows into ``memories`` on a pooled connection of the backend (it knows the
    binary format of ``vector``); ids are ``r<index>``."""
    backend = pg.PostgresBackend(url)
    await backend.open(ignore_changes)
    started = time.perf_counter()
    now = int(time.time() * 1000)
    try:
        async with backend.pools.acquire("loading") as conn:
            for start in range(0, len(vectors), 10_000):
                records = []
                for i in range(start, min(len(vectors), start + 10_000)):
                    raw = vectors[i].astype("<f4").tobytes()
                    at = now - (len(vectors) - i) * 1000
                    records.append((f"r{i}", namespaces[i], users[i], texts[parents[i]], "{}", at, at, raw, raw))
                await conn.copy_records_to_table(
                    "memories", records=records,
                    columns=["id", "namespace", "user_id", "text", "metadata", "created_at", "updated_at",
                             "embedding", "vec"])
                progress(f"   loaded {min(len(vectors), start + 10_000):,}/{len(vectors):,} rows")
            await conn.execute("ANALYZE memories")
    finally:
        await backend.close()
    return time.perf_counter() - started


async def build_hnsw(url: str, dim: int, maintenance_work_mem: str) -> dict[str, Any]:
    """The index gm's ensure_hnsw creates, built over the loaded rows, and the meta row it
    records (so the backend treats it as its own)."""
    notices: list[str] = []
    conn = await asyncpg.connect(url)
    try:
        conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
        default_mwm = await conn.fetchval("SHOW maintenance_work_mem")
        workers = await conn.fetchval("SHOW max_parallel_maintenance_workers")
        if maintenance_work_mem:
            await conn.execute(f"SET maintenance_work_mem = '{maintenance_work_mem}'")
        started = time.perf_counter()
        await conn.execute(f"CREATE INDEX memories_vec_hnsw ON memories USING hnsw ((vec::vector({dim})) "
                           "vector_cosine_ops)")
        seconds = time.perf_counter() - started
        await conn.execute("INSERT INTO meta (key, value) VALUES ('hnsw_dimensions', $1)", str(dim))
        size = await conn.fetchval("SELECT pg_relation_size('memories_vec_hnsw')")
        version = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        server = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {"seconds": round(seconds, 1), "index_mb": round(size / 1e6, 1), "maintenance_work_mem":
            maintenance_work_mem or default_mwm, "server_default_maintenance_work_mem": default_mwm,
            "max_parallel_maintenance_workers": workers, "notices": notices[:5], "pgvector": version,
            "postgres": server}


async def run_queries(backend: pg.PostgresBackend, vectors: np.ndarray, queries: np.ndarray, scope: Scope,
                      members: np.ndarray, ef: int, rowid_to_index: dict[int, int], limit: int = 10,
                      ) -> dict[str, Any]:
    """Every query through ``backend.vector_search`` (sequentially), against numpy's exact
    top-``limit`` of the scope: recall@limit, latency, the plans the planner took."""
    pgv.HNSW_EF_SEARCH = ef  # the least ef_search PgVectors.search sets (more if the plan's fetch is deeper)
    recalls: list[float] = []
    latencies: list[float] = []
    now = int(time.time() * 1000) + 1
    before = dict(backend.pg_vectors.plans)
    for q in queries:
        began = time.perf_counter()
        hits = await backend.vector_search(q.astype("<f4").tobytes(), scope, None, limit, now)
        latencies.append(time.perf_counter() - began)
        truth, kth = exact_top(vectors, members, q, limit)
        sims = {rowid_to_index[r]: float(vectors[rowid_to_index[r]] @ q) for r, _ in hits}
        # a returned row as close as the exact last one counts (float ties between pgvector and numpy)
        recalls.append(sum(1 for i, s in sims.items() if i in truth or s >= kth - 1e-5) / len(truth))
    return {
        "ef_search": max(ef, limit), "limit": limit, "recall": round(statistics.mean(recalls), 4),
        "queries": len(queries), "plans": {k: n - before[k] for k, n in backend.pg_vectors.plans.items()},
        "p50_ms": round(percentile(latencies, 50) * 1000, 2), "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


async def forced(backend: pg.PostgresBackend, vectors: np.ndarray, queries: np.ndarray, scope: Scope,
                 members: np.ndarray, rowid_to_index: dict[int, int]) -> dict[str, Any]:
    """Limit 10 with each plan forced: exact (break-even above any scope), then HNSW (break-even
    0 and no selectivity floor: ef_search as the planner sets it for the scope's share)."""
    saved = backend.pg_vectors.exact_max_rows, vector_plan.MIN_SELECTIVITY
    out = {}
    try:
        for name, rows, selectivity in (("exact", 10**12, 0.0), ("hnsw", 0, 0.0)):
            backend.pg_vectors.exact_max_rows, vector_plan.MIN_SELECTIVITY = rows, selectivity
            out[name] = await run_queries(backend, vectors, queries, scope, members, pgv.HNSW_EF_SEARCH,
                                          rowid_to_index)
    finally:
        backend.pg_vectors.exact_max_rows, vector_plan.MIN_SELECTIVITY = saved
    return out


async def backend_pids(backend: pg.PostgresBackend) -> list[int]:
    rows = await backend.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()", [])
    return [r[0] for r in rows]


def start_pgserver(directory: Path) -> Any:
    if "XDG_RUNTIME_DIR" not in os.environ:  # pgserver warns without a private runtime dir
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import pgserver

    return pgserver.get_server(directory / "pgdata", cleanup_mode="delete")


async def bench_recall(cfg: Config, data: Path, tmp: Path, quiet: Quiet) -> dict[str, Any]:
    progress(f"\n== recall: pgvector HNSW vs exact at {cfg.rows:,} vectors ==")
    texts, text_source = real_texts(cfg.base, data)
    questions, question_source = real_questions(cfg.queries, data)
    encoder = Encoder(ModelSpec.default())
    began = time.perf_counter()
    base = encoder.encode(texts)
    queries = encoder.encode(questions)
    embed_seconds = time.perf_counter() - began
    progress(f"   embedded {len(texts)} texts and {len(questions)} questions in {embed_seconds:.1f}s")
    vectors, parents = synthesize(base, cfg.rows, cfg.spread, seed=1)
    similarity = {"real": neighbour_similarity(base, 500, seed=2),
                  "synthetic": neighbour_similarity(vectors, 500, seed=2),
                  "cos_to_base_p50": round(float(np.median(np.einsum("ij,ij->i", vectors, base[parents]))), 3)}
    rng = np.random.default_rng(3)
    order = rng.permutation(cfg.rows)
    small = set(order[: cfg.rows // 100].tolist())
    namespaces = [SMALL_NS if i in small else MAIN_NS for i in range(cfg.rows)]
    users: list[str | None] = [None if i in small else f"user-{i % RECALL_USERS}" for i in range(cfg.rows)]

    server = start_pgserver(tmp)
    try:
        url = server.get_uri()
        async with gm.open(url):  # migrations: the schema, with the vec column since pgvector is there
            pass
        loaded = await load_rows(url, vectors, texts, parents, namespaces, users)
        progress(f"   loaded {cfg.rows:,} rows in {loaded:.1f}s; building the HNSW index")
        index = await build_hnsw(url, vectors.shape[1], cfg.maintenance_work_mem)
        progress(f"   index built in {index['seconds']}s ({index['index_mb']} MB)")
        backend = pg.PostgresBackend(url)
        await backend.open(ignore_changes)
        try:
            rowid_to_index = {r[0]: int(r[1][1:]) for r in await backend.fetch("SELECT rowid, id FROM memories", [])}
            ns = np.array(namespaces)
            user_arr = np.array([u or "" for u in users])
            scopes = [
                ("main namespace (99%)", Scope(MAIN_NS), np.flatnonzero(ns == MAIN_NS)),
                ("one user (~10%)", Scope(MAIN_NS, "user-3"), np.flatnonzero(user_arr == "user-3")),
                ("small namespace (1%)", Scope(SMALL_NS), np.flatnonzero(ns == SMALL_NS)),
            ]
            saved = pgv.HNSW_EF_SEARCH
            try:
                await run_queries(backend, vectors, queries, scopes[0][1], scopes[0][2], 100, rowid_to_index)  # warm
                results = []
                # recall@10 at each ef_search, then the call hybrid search makes: limit 50 (its
                # candidate depth) at gm's own ef_search, max(100, limit)
                runs = [(ef, 10) for ef in cfg.ef] + [(saved, HYBRID_DEPTH)]
                for label, scope, members in scopes:
                    for ef, limit in runs:
                        await quiet.wait(min(cfg.quiet_wait, 10))
                        async with CpuMeter([], functools.partial(backend_pids, backend)) as cpu:
                            r = await run_queries(backend, vectors, queries, scope, members, ef, rowid_to_index,
                                                  limit)
                        results.append({"scope": label, "rows": len(members), "cpu": cpu.to_dict()} | r)
                        progress(f"   {label} ef {r['ef_search']} limit {limit}: recall {r['recall']:.3f}, "
                                 f"p50 {r['p50_ms']} ms, plans {r['plans']}")
                sweep = []
                for label, scope, members in scopes:
                    both = await forced(backend, vectors, queries, scope, members, rowid_to_index)
                    sweep.append({"scope": label, "rows": len(members)} | both)
                    progress(f"   {label} forced: exact p50 {both['exact']['p50_ms']} ms, "
                             f"HNSW p50 {both['hnsw']['p50_ms']} ms recall {both['hnsw']['recall']:.3f}")
            finally:
                pgv.HNSW_EF_SEARCH = saved
        finally:
            await backend.close()
    finally:
        server.cleanup()
    return {"rows": cfg.rows, "base_texts": len(texts), "text_source": text_source,
            "queries": len(questions), "question_source": question_source, "spread": cfg.spread,
            "embed_seconds": round(embed_seconds, 1), "similarity": similarity,
            "load_seconds": round(loaded, 1), "index": index, "results": results, "forced": sweep,
            "load_average": load_average()}


def report_recall(result: dict[str, Any]) -> str:
    ix, sim = result["index"], result["similarity"]
    lines = [
        f"\n== recall: pgvector {ix['pgvector']} HNSW (m 16, ef_construction 64: the defaults gm creates) on "
        f"Postgres {ix['postgres']}, {result['rows']:,} vectors of 384 dims, {result['queries']} queries; "
        f"load average {result['load_average']} at the end ==",
        f"vectors: {result['base_texts']:,} real texts ({result['text_source']}) embedded, each stored vector one "
        f"of them plus covariance-shaped noise x{result['spread']} (median cos to its base {sim['cos_to_base_p50']}); "
        f"queries: {result['question_source']}",
        f"median similarity to the 1st / 10th nearest neighbour: real texts ({result['base_texts']:,}) "
        f"{sim['real']['nn1_p50']} / {sim['real']['nn10_p50']}, synthetic set ({result['rows']:,}) "
        f"{sim['synthetic']['nn1_p50']} / {sim['synthetic']['nn10_p50']}",
        f"rows COPYed in {result['load_seconds']:.1f}s; index build {ix['seconds']:.1f}s, {ix['index_mb']} MB "
        f"(maintenance_work_mem {ix['maintenance_work_mem']}, server default "
        f"{ix['server_default_maintenance_work_mem']}; "
        f"max_parallel_maintenance_workers {ix['max_parallel_maintenance_workers']})",
        f"{'scope':<22} {'rows':>7} {'ef_search':>9} {'limit':>5} {'recall':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'exact':>6} {'HNSW':>6} {'short':>6} {'others':>6}",
    ]
    for r in result["results"]:
        plans = r["plans"]
        lines.append(f"{r['scope']:<22} {r['rows']:>7,} {r['ef_search']:>9} {r['limit']:>5} {r['recall']:>9.3f} "
                     f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {plans['exact']:>6} {plans['hnsw']:>6} "
                     f"{plans['hnsw_short']:>6} {r['cpu']['other_cores']:>6.2f}")
    lines.append("(recall = recall@limit against numpy's exact top-limit of the scope; limit 10 at each ef_search, "
                 f"then limit {HYBRID_DEPTH} at gm's ef_search, the call a hybrid search with limit 10 makes; "
                 "ef_search = the least the backend sets (the planner's fetch may ask more); latency = "
                 "PostgresBackend.vector_search as called, one at a time; exact / HNSW / short = the searches "
                 "that took each plan (short: HNSW left the page short and the exact scan answered); others = "
                 "cores used meanwhile by processes other than this one and the Postgres backends of the "
                 "benchmark database)")
    lines.append(f"{'each plan forced, limit 10':<28} {'rows':>7} {'exact p50':>10} {'HNSW p50':>9} "
                 f"{'HNSW recall':>11}")
    for f in result["forced"]:
        lines.append(f"{f['scope']:<28} {f['rows']:>7,} {f['exact']['p50_ms']:>10.2f} {f['hnsw']['p50_ms']:>9.2f} "
                     f"{f['hnsw']['recall']:>11.3f}")
    for notice in ix["notices"]:
        lines.append(f"index build notice: {notice}")
    return "\n".join(lines)
