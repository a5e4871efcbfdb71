"""Hand-run benchmark of the Postgres backend (not a test: it prints figures, asserts nothing).

    .venv/bin/python bench/postgres.py                          # all three parts (about 12 minutes on 2 cores)
    .venv/bin/python bench/postgres.py throughput --quick       # one part, small and fast
    .venv/bin/python bench/postgres.py visibility recall --json # two parts, one JSON object on stdout
    .venv/bin/python bench/postgres.py recall --rows 100000 --ef 40,100,200

Parts:

throughput  Adds/s and searches/s through 1, 2 and 3 ``gmem serve --database-url`` instances
            sharing one fresh database on the Postgres at 127.0.0.1:5432 (``--admin-url``; it has
            no pgvector, so every instance keeps its in-process vector index and follows the
            others' writes through the ``changes`` table, LISTEN/NOTIFY and a 1 s poll), against
            one ``gmem serve --db`` on a temporary SQLite file. Per row: ``--prefill`` memories
            (2,000) are added in batches of 100, then ``--duration`` seconds (20) of hybrid
            searches over that namespace by ``--search-clients`` clients (8), then ``--duration``
            seconds of single adds by ``--clients`` clients (32). The clients are spread
            round-robin over the instances: bench/load.py's generator runs once per instance, all
            at once, and the rates are summed. Each phase also prints the CPU seconds used by the
            gm servers, by the Postgres backends serving this database, by this process and by
            everything else on the machine.
            The embedding model (ONNX, CPU-bound) is the bottleneck of both operations, and
            instances started on one machine share its cores: on 2 cores, more instances cannot
            add throughput. What the rows show is that the shared database is not the bottleneck
            (its CPU per add) and what an extra instance costs (following every other instance's
            writes, its own event loop and HTTP stack). Several instances run with
            GM_EMBED_THREADS=1 each (one ONNX thread, so two instances do not oversubscribe two
            cores); single instances run once with the default (all cores) and once with 1.

visibility  3 instances on one fresh database (GM_EMBED_THREADS=1). ``--writes`` times (100): add
            a memory with a unique made-up word through instance A, then poll B and C (one
            concurrent loop per instance and mode, each sending its next search as soon as the
            last one answered) with a keyword search for the word and a vector search for the
            memory's exact text, until each returns it; the delay runs from A's 201 to the answer
            that first contains it, and a probe counts as seen when both B and C return it. Then
            delete it through A and poll until B and C no longer return it. A deleted memory
            drops out of every answer at once (hits are read back from the database), so for
            vector search a second figure says when B's and C's in-process index has caught up:
            the namespace holds 20 fillers, and a vector search with limit 10 returns 9 hits
            while the index still holds the deleted row, 10 once it followed the delete.
            A search's round trip bounds that resolution (~10 ms keyword, ~20-30 ms vector, which
            embeds the query), so a fourth instance, ``gm.open`` on the same database inside this
            process, notes when its change feed applies each change to its index: the feed's
            delay to the millisecond. All of it twice: on idle instances, then while
            ``--background-clients`` clients (8) add memories through all three.

recall      pgvector's HNSW recall@10 against exact search at ``--rows`` memories (100,000) of
            384 dimensions, on a Postgres 16 + pgvector 0.6.2 started by the ``pgserver`` package
            in a temporary directory. Embedding 100,000 texts would take ~10 minutes here, so the
            vectors are made this way: ``--base`` real texts (5,000: the LoCoMo dev memories of
            bench/recall.py where present, the rest from bench/load.py's ``Workload``) are embedded
            with the real model; each stored vector is a base vector e plus Gaussian noise drawn
            with the covariance of the real embeddings (so it moves along the directions real
            texts vary in), scaled by ``--spread`` (0.7), renormalised: cos(v, e) is about 0.85-0.88.
            The median similarity to the 1st and 10th nearest neighbour is printed for the real
            texts and the synthetic set, to judge how alike they are (the synthetic set is denser,
            as 100,000 real texts would be). The 200 query vectors are embeddings of real questions
            (LoCoMo and Workload), not perturbations. Rows go straight into a database migrated by
            gm (``gm.open`` once, then COPY into ``memories``: embedding as float32 bytes and
            ``vec``), then the HNSW index gm creates is built over them (timed; gm itself creates
            it on the first vector write and fills it row by row), and each query goes
            through ``PostgresBackend.vector_search`` itself (its module's ef_search constant is
            set per run, bench-side) and is compared with a numpy brute-force top-10 of the same
            scope, at each ``--ef`` (40,100,200); then at limit 50 with gm's own ef_search, the
            call a hybrid search with limit 10 makes. Scopes: the main namespace (99% of the
            rows), one user of it (10%), and a namespace holding 1% of the rows. HNSW filters
            after its graph walk (pgvector < 0.8), so a narrow scope can leave the page short, and
            then the backend runs an exact scan: the output says how often that happened and which
            plans Postgres chose.

Every database this creates is dropped at the end (``gm_bench_<pid>_...``), the pgserver
directory is removed, and all load goes to 127.0.0.1. Progress goes to stderr; the tables
(or, with ``--json``, one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np

import gm
import gm.storage.postgres as pg
from gm import search
from gm.embedding import Encoder, ModelSpec
from gm.memory import Scope
from http_vs_embedded import QUIET_BUDGET, _machine_jiffies, _process_jiffies, wait_quiet
from load import LoadConfig, LoadResult, Workload, percentile, query_texts, run_load
from recall import DEFAULT_DATA, read_jsonl
from servers import ADMIN_URL, Databases, PgServer, Server, check_loopback_postgres

PARTS = ("throughput", "visibility", "recall")
USERS = 100
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    duration: float  # seconds per measured throughput phase
    clients: int  # add clients, spread over the instances
    search_clients: int
    prefill: int  # memories searched in the throughput rows
    writes: int  # visibility probes
    background_clients: int  # visibility: adding clients during the second round of probes (0: none)
    rows: int  # recall: stored vectors
    base: int  # recall: real texts embedded
    queries: int  # recall: query vectors
    spread: float = 0.7  # recall: noise scale of the synthetic vectors
    ef: tuple[int, ...] = (40, 100, 200)
    maintenance_work_mem: str = "512MB"
    quiet_wait: float = 30.0  # seconds to wait for a quiet machine before each measured phase


FULL = Config(duration=20, clients=32, search_clients=8, prefill=2000, writes=100, background_clients=8,
              rows=100_000, base=5000, queries=200)
QUICK = Config(duration=4, clients=32, search_clients=8, prefill=200, writes=10, background_clients=8,
               rows=10_000, base=600, queries=40)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def quiet(seconds: float) -> None:
    """http_vs_embedded's wait for a quiet machine; its remark goes to stderr (stdout may be JSON)."""
    with contextlib.redirect_stdout(sys.stderr):
        await wait_quiet(seconds)


def rounded(value: float, digits: int = 1) -> float | None:
    """``value`` rounded, or None for NaN (no samples): JSON has no NaN."""
    return None if value != value else round(value, digits)


def cell(value: float | None, spec: str) -> str:
    """A table cell: the number formatted by ``spec`` (width first), or '-' right-aligned."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(value, spec) if value is not None else "-".rjust(width)


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# -- databases and servers -----------------------------------------------------------------------


async def start_servers(servers: list[Server], threads: int | None) -> None:
    """Start them all at once with GM_EMBED_THREADS=threads (None: unset, so all cores);
    Server.start passes that variable on to the server."""
    saved = os.environ.get("GM_EMBED_THREADS")
    if threads is None:
        os.environ.pop("GM_EMBED_THREADS", None)
    else:
        os.environ["GM_EMBED_THREADS"] = str(threads)
    try:
        await asyncio.gather(*(s.start() for s in servers))
    finally:
        if saved is None:
            os.environ.pop("GM_EMBED_THREADS", None)
        else:
            os.environ["GM_EMBED_THREADS"] = saved


def stop_servers(servers: list[Server]) -> list[int]:
    codes = []
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            codes.append(server.stop()[0])
        server.kill_if_running()
    return codes


def log_problems(servers: list[Server]) -> list[str]:
    lines = []
    for server in servers:
        if server.log_path.exists():
            for line in server.log_path.read_text(errors="replace").splitlines():
                if " WARNING " in line or " ERROR " in line:
                    if "no GM_API_KEYS set" not in line:
                        lines.append(line[:200])
    return lines


async def warm_up(session: aiohttp.ClientSession, servers: list[Server]) -> None:
    """One add and one search per instance: loads each one's model before anything is timed."""

    async def one(url: str) -> None:
        async with session.post(url + "/v1/memories", json={"text": "Warm-up memory.", "namespace": "warmup"}) as r:
            assert r.status == 201, await r.text()
        async with session.post(url + "/v1/memories/search", json={"query": "warm up", "namespace": "warmup"}) as r:
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(s.url) for s in servers))


# -- CPU accounting ----------------------------------------------------------------------------


class CpuSplit:
    """CPU seconds of the gm servers, of the Postgres backends serving the benchmark's
    database, of this process, and of everything else, over a phase."""

    def __init__(self, servers: list[Server], pg_pids: Callable[[], Awaitable[list[int]]] | None = None) -> None:
        self.servers = servers
        self.pg_pids = pg_pids

    async def __aenter__(self) -> CpuSplit:
        self.pg0 = {p: _process_jiffies(p) for p in (await self.pg_pids() if self.pg_pids else [])}
        self.wall0 = time.perf_counter()
        self.machine0 = _machine_jiffies()
        self.servers0 = sum(_process_jiffies(s.pid) for s in self.servers)
        self.self0 = _process_jiffies(os.getpid())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall0
        busy1, total1 = _machine_jiffies()
        self.gm = (sum(_process_jiffies(s.pid) for s in self.servers) - self.servers0) / TICK
        self.bench = (_process_jiffies(os.getpid()) - self.self0) / TICK
        pids = await self.pg_pids() if self.pg_pids else []
        # a backend that appeared meanwhile (the pool grew) did all its work in the phase
        self.postgres = sum(max(0, _process_jiffies(p) - self.pg0.get(p, 0)) for p in pids) / TICK
        self.busy = (busy1 - self.machine0[0]) / TICK
        self.capacity = (total1 - self.machine0[1]) / TICK
        self.others = max(0.0, self.busy - self.gm - self.bench - self.postgres)

    def to_dict(self) -> dict[str, float]:
        cores = self.wall or 1.0
        return {"wall_s": round(self.wall, 2), "gm_cores": round(self.gm / cores, 2),
                "postgres_cores": round(self.postgres / cores, 2), "bench_cores": round(self.bench / cores, 2),
                "other_cores": round(self.others / cores, 2),
                "idle_cores": round((self.capacity - self.busy) / cores, 2)}


# -- 1. throughput -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    backend: str  # sqlite or postgres
    instances: int
    threads: int | None  # GM_EMBED_THREADS per instance; None = unset (all cores)

    @property
    def label(self) -> str:
        return f"{self.backend} x{self.instances}, threads {self.threads or 'default'}"


ROWS = (
    Row("sqlite", 1, None), Row("postgres", 1, None),
    Row("sqlite", 1, 1), Row("postgres", 1, 1), Row("postgres", 2, 1), Row("postgres", 3, 1),
)


def spread(total: int, parts: int) -> list[int]:
    """``total`` clients dealt round-robin to ``parts`` instances."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def combine(results: list[LoadResult], op: str) -> dict[str, Any]:
    """One figure for runs against several instances at once: rates add up, latencies pool."""
    latencies = [x for r in results for x in r.ops[op].latencies_ms]
    return {
        "per_second": round(sum(r.rate(op) for r in results), 1),
        "per_instance": [round(r.rate(op), 1) for r in results],
        "requests": sum(r.ops[op].count for r in results),
        "errors": sum(r.errors for r in results),
        "first_errors": [e for r in results for e in r.first_errors][:3],
        "p50_ms": rounded(percentile(latencies, 50)), "p99_ms": rounded(percentile(latencies, 99)),
    }


def per_request(cpu: CpuSplit, results: list[LoadResult], op: str) -> dict[str, float]:
    """CPU milliseconds per request of the gm servers and of the Postgres backends."""
    done = max(1, sum(len(r.ops[op].latencies_ms) for r in results))
    return {"gm_cpu_ms": round(cpu.gm / done * 1000, 2), "postgres_cpu_ms": round(cpu.postgres / done * 1000, 2)}


async def spread_load(servers: list[Server], clients: int, session: aiohttp.ClientSession,
                      make: Callable[[str, int, int], LoadConfig]) -> list[LoadResult]:
    shares = spread(clients, len(servers))
    return list(await asyncio.gather(*(run_load(make(s.url, share, i), session)
                                       for i, (s, share) in enumerate(zip(servers, shares, strict=True)))))


async def throughput_row(row: Row, cfg: Config, dbs: Databases, tmp: Path,
                         session: aiohttp.ClientSession) -> dict[str, Any]:
    progress(f"\n-- {row.label} --")
    tag = f"{row.backend}{row.instances}t{row.threads or 0}"
    pg_pids: Callable[[], Awaitable[list[int]]] | None = None
    if row.backend == "postgres":
        url = await dbs.create(f"tp_{tag}")
        servers: list[Server] = [PgServer(url, tmp / f"{tag}-{i}.log") for i in range(row.instances)]
        pg_pids = functools.partial(dbs.backend_pids, url)
    else:
        servers = [Server(tmp / f"{tag}.db", tmp / f"{tag}.log")]
    out: dict[str, Any] = {"backend": row.backend, "instances": row.instances,
                           "embed_threads": row.threads or f"default ({os.cpu_count()})"}
    try:
        began = time.perf_counter()
        await start_servers(servers, row.threads)
        await warm_up(session, servers)
        progress(f"   {len(servers)} instance(s) ready and warm in {time.perf_counter() - began:.1f}s: "
                 + ", ".join(s.url for s in servers))
        began = time.perf_counter()
        shares = spread(cfg.prefill, len(servers))
        await asyncio.gather(*(
            run_load(LoadConfig(url=s.url, concurrency=1, requests=1, mix={"search": 1.0}, namespace="search",
                                users=USERS, seed=10 + i, prefill=share, prefill_batch=100, warmup=0,
                                timeout=300.0), session)
            for i, (s, share) in enumerate(zip(servers, shares, strict=True)) if share))
        await asyncio.sleep(2.0)  # every instance's change feed follows within its 1 s poll
        out["prefilled"] = cfg.prefill
        progress(f"   prefilled {cfg.prefill} memories in {time.perf_counter() - began:.1f}s")

        await quiet(cfg.quiet_wait)
        out["load_before_search"] = load_average()
        async with CpuSplit(servers, pg_pids) as cpu:
            searched = await spread_load(servers, cfg.search_clients, session, lambda url, n, i: LoadConfig(
                url=url, concurrency=n, duration=cfg.duration, mix={"search": 1.0}, namespace="search",
                users=USERS, seed=20 + i, search_scope="namespace", search_mode="hybrid", timeout=120.0))
        out["search"] = combine(searched, "search") | {"cpu": cpu.to_dict()} | per_request(cpu, searched, "search")
        progress(f"   search: {out['search']['per_second']}/s {out['search']['per_instance']}, "
                 f"p50 {out['search']['p50_ms']} ms; cpu {cpu.to_dict()}")

        await quiet(cfg.quiet_wait)
        out["load_before_add"] = load_average()
        async with CpuSplit(servers, pg_pids) as cpu:
            added = await spread_load(servers, cfg.clients, session, lambda url, n, i: LoadConfig(
                url=url, concurrency=n, duration=cfg.duration, mix={"add": 1.0}, namespace="adds",
                users=USERS, seed=30 + i, timeout=120.0))
        out["add"] = combine(added, "add") | {"cpu": cpu.to_dict()} | per_request(cpu, added, "add")
        progress(f"   add: {out['add']['per_second']}/s {out['add']['per_instance']}, p50 {out['add']['p50_ms']} ms; "
                 f"cpu {cpu.to_dict()}")
    finally:
        out["exit_codes"] = stop_servers(servers)
        out["log_problems"] = log_problems(servers)[:5]
    return out


async def bench_throughput(cfg: Config, dbs: Databases, tmp: Path) -> dict[str, Any]:
    progress(f"\n== throughput: {cfg.duration:g} s of hybrid searches ({cfg.search_clients} clients, "
             f"{cfg.prefill} memories) then {cfg.duration:g} s of adds ({cfg.clients} clients) per row ==")
    connector = aiohttp.TCPConnector(limit=cfg.clients + 16)
    async with aiohttp.ClientSession(connector=connector) as session:
        rows = [await throughput_row(row, cfg, dbs, tmp, session) for row in ROWS]
    return {"duration_s": cfg.duration, "add_clients": cfg.clients, "search_clients": cfg.search_clients,
            "prefill": cfg.prefill, "rows": rows}


def report_throughput(result: dict[str, Any]) -> str:
    lines = [
        f"\n== throughput: {result['duration_s']:g} s per phase; hybrid search over {result['prefill']:,} memories "
        f"(whole namespace, limit 10) by {result['search_clients']} clients; single adds by "
        f"{result['add_clients']} clients; clients spread round-robin over the instances ==",
        f"{'':<24} | {'adds':<50} | {'hybrid searches':<50}",
        f"{'backend':<9} {'inst':>4} {'threads':>8} | {'per s':>7} {'p50':>6} {'p99':>6} {'err':>4} "
        f"{'gm cpu':>6} {'pg cpu':>6} {'others':>6} | {'per s':>7} {'p50':>6} {'p99':>6} {'err':>4} "
        f"{'gm cpu':>6} {'pg cpu':>6} {'others':>6} | per instance adds/s",
    ]
    for r in result["rows"]:
        a, s = r["add"], r["search"]
        threads = str(r["embed_threads"]).split(" ")[0]
        cells = []
        for o, digits in ((a, 0), (s, 1)):
            pg_cpu = o["postgres_cpu_ms"] if r["backend"] == "postgres" else None
            cells.append(f"{o['per_second']:>7.1f} {cell(o['p50_ms'], f'>6.{digits}f')} "
                         f"{cell(o['p99_ms'], f'>6.{digits}f')} {o['errors']:>4} {o['gm_cpu_ms']:>6.2f} "
                         f"{cell(pg_cpu, '>6.2f')} {o['cpu']['other_cores']:>6.2f}")
        lines.append(f"{r['backend']:<9} {r['instances']:>4} {threads:>8} | {cells[0]} | {cells[1]} | "
                     + ", ".join(f"{x:.0f}" for x in a["per_instance"]))
    lines.append("(p50/p99: ms at the client; gm cpu / pg cpu: CPU ms per request of the gm servers / of the "
                 "Postgres backends serving this database; others: cores used by every other process meanwhile, "
                 f"of {os.cpu_count()}; threads: GM_EMBED_THREADS per instance)")
    for r in result["rows"]:
        for op in ("add", "search"):
            for e in r[op]["first_errors"]:
                lines.append(f"   {r['backend']} x{r['instances']} {op} error: {e}")
        if any(code != 0 for code in r["exit_codes"]):
            lines.append(f"   {r['backend']} x{r['instances']}: server exit codes {r['exit_codes']} (expected 0)")
        for line in r["log_problems"]:
            lines.append(f"   {r['backend']} x{r['instances']} log: {line}")
    return "\n".join(lines)


# -- 2. cross-instance visibility ----------------------------------------------------------------------


VIS_NAMESPACE = "visibility"
VIS_LIMIT = 10
FILLERS = 20


def made_up_word(rng: random.Random) -> str:
    """A word no memory contains (and no stemmer shortens): 12 letters, never a real one."""
    return "zq" + "".join(rng.choice(string.ascii_lowercase) for _ in range(10))


async def poll(session: aiohttp.ClientSession, url: str, body: dict[str, Any], since: float, timeout: float,
               conditions: dict[str, Callable[[list[str]], bool]],
               ) -> tuple[dict[str, float | None], dict[str, int], list[float]]:
    """Search until every condition on the hit ids held once: seconds from ``since`` to the
    answer where each first held (None if not within ``timeout``), how many searches that
    took, and each search's round trip."""
    first: dict[str, float | None] = dict.fromkeys(conditions)
    polls: dict[str, int] = {}
    trips: list[float] = []
    while True:
        sent = time.perf_counter()
        async with session.post(url + "/v1/memories/search", json=body) as resp:
            data = await resp.json() if resp.status == 200 else None
        answered = time.perf_counter()
        trips.append(answered - sent)
        if data is not None:
            ids = [h["memory"]["id"] for h in data["hits"]]
            for name, holds in conditions.items():
                if first[name] is None and holds(ids):
                    first[name] = answered - since
                    polls[name] = len(trips)
        if all(v is not None for v in first.values()) or answered - since > timeout:
            return first, polls, trips


class Follower:
    """A fourth instance: the embedded library on the same database, in this process, whose
    vector index notes when each change reaches it (the same change feed as the servers'),
    so its delay is measured to the millisecond instead of to a search's round trip."""

    def __init__(self) -> None:
        self.arrivals: dict[tuple[int, bool], float] = {}  # (rowid, removed) -> when it reached the index

    async def open(self, url: str) -> None:
        self.store = await gm.open(url)
        await self.store.wait_index()
        original = self.store.index.apply

        def apply(changes: list[Any]) -> None:
            now = time.perf_counter()
            for change in changes:
                self.arrivals.setdefault((change.rowid, change.remove), now)
            original(changes)

        self.store.index.apply = apply  # type: ignore[method-assign]

    async def rowid(self, memory_id: str) -> int:
        rowid: int = await self.store.backend.fetchval("SELECT rowid FROM memories WHERE id = $1", memory_id)
        return rowid

    async def arrival(self, rowid: int, removed: bool, since: float, timeout: float = 10.0) -> float | None:
        """Seconds from ``since`` until the change reached the index (negative: before ``since``)."""
        while (rowid, removed) not in self.arrivals:
            if time.perf_counter() - since > timeout:
                return None
            await asyncio.sleep(0.0005)
        return self.arrivals[rowid, removed] - since

    async def close(self) -> None:
        await self.store.close()


async def run_probes(session: aiohttp.ClientSession, a: Server, observers: list[Server], writes: int,
                     rng: random.Random, follower: Follower) -> dict[str, Any]:
    """``writes`` times: add a probe through ``a``, poll the observers until they show it,
    delete it through ``a``, poll until they no longer do. Per condition: the delay until
    every observer's answer met it (p50/p99/max), and how many probes missed the 10 s limit."""
    samples: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    at_once: dict[str, int] = {}  # probes that every observer's first search already showed
    trips: dict[str, list[float]] = {"keyword": [], "vector": []}
    for i in range(writes):
        word = made_up_word(rng)
        text = (f"{rng.choice(('Alice', 'Bilal', 'Carmen', 'Dmitri'))} said the code word for probe {i} "
                f"is {word} and asked us to remember it.")
        async with session.post(a.url + "/v1/memories", json={"text": text, "namespace": VIS_NAMESPACE}) as r:
            assert r.status == 201, await r.text()
            memory_id = (await r.json())["id"]
        added = time.perf_counter()
        rowid = await follower.rowid(memory_id)
        followed = {"add follower indexed": await follower.arrival(rowid, False, added)}
        bodies = {"keyword": {"query": word, "mode": "keyword"}, "vector": {"query": text, "mode": "vector"}}
        seen = await asyncio.gather(*(
            poll(session, b.url, body | {"namespace": VIS_NAMESPACE, "limit": VIS_LIMIT}, added, 10.0,
                 {"seen": lambda ids, m=memory_id: m in ids})
            for b in observers for body in bodies.values()))
        async with session.delete(a.url + f"/v1/memories/{memory_id}") as r:
            assert r.status == 204, await r.text()
        deleted = time.perf_counter()
        followed["delete follower removed"] = await follower.arrival(rowid, True, deleted)
        gone = await asyncio.gather(*(
            poll(session, b.url, body | {"namespace": VIS_NAMESPACE, "limit": VIS_LIMIT}, deleted, 10.0,
                 {"gone": lambda ids, m=memory_id: m not in ids}
                 | ({"index": lambda ids, m=memory_id: m not in ids and len(ids) == VIS_LIMIT}
                    if mode == "vector" else {}))
            for b in observers for mode, body in bodies.items()))
        # answers come observer-major: (B, keyword), (B, vector), (C, keyword), (C, vector)
        for phase, answers in (("add", seen), ("delete", gone)):
            for j, mode in enumerate(bodies):
                per_observer = [answers[k * len(bodies) + j] for k in range(len(observers))]
                for name in per_observer[0][0]:
                    key = f"{phase} {mode} {name}"
                    delays = [first[name] for first, _, _ in per_observer]
                    if any(d is None for d in delays):
                        missed[key] = missed.get(key, 0) + 1
                    else:
                        samples.setdefault(key, []).append(max(d for d in delays if d is not None))
                        at_once[key] = at_once.get(key, 0) + all(n[name] == 1 for _, n, _ in per_observer)
                for _, _, polls in per_observer:
                    trips[mode].extend(polls)
        for key, delay in followed.items():
            if delay is None:
                missed[key] = missed.get(key, 0) + 1
            else:
                samples.setdefault(key, []).append(delay)
        await asyncio.sleep(rng.uniform(0.02, 0.2))  # no phase lock with the feed's 1 s poll
        if (i + 1) % max(1, writes // 4) == 0:
            progress(f"   {i + 1}/{writes} probes")
    figures: dict[str, Any] = {
        key: {"n": len(v), "missed": missed.get(key, 0),
              "first_search": None if key in followed else at_once.get(key, 0),
              "p50_ms": round(percentile(v, 50) * 1000, 1), "p99_ms": round(percentile(v, 99) * 1000, 1),
              "max_ms": round(max(v) * 1000, 1), "min_ms": round(min(v) * 1000, 1)}
        for key, v in samples.items()
    }
    for key, n in missed.items():
        figures.setdefault(key, {"n": 0, "missed": n, "first_search": 0})
    return {"delays": figures,
            "search_round_trip_p50_ms": {m: rounded(percentile(t, 50) * 1000) for m, t in trips.items()}}


async def bench_visibility(cfg: Config, dbs: Databases, tmp: Path) -> dict[str, Any]:
    progress(f"\n== visibility: {cfg.writes} adds and deletes through instance A, polled on B and C; idle, then "
             f"under {cfg.background_clients} clients adding through all three ==")
    url = await dbs.create("visibility")
    servers: list[Server] = [PgServer(url, tmp / f"vis-{i}.log") for i in range(3)]
    rng = random.Random(42)
    out: dict[str, Any] = {"writes": cfg.writes, "background_clients": cfg.background_clients}
    follower = Follower()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        try:
            await start_servers(servers, 1)
            await warm_up(session, servers)
            a, observers = servers[0], servers[1:]
            fillers = Workload(seed=5, namespace=VIS_NAMESPACE).memories(FILLERS)
            async with session.post(a.url + "/v1/memories", json={"memories": fillers}) as resp:
                assert resp.status == 201, await resp.text()
            await follower.open(url)
            await asyncio.sleep(2.0)
            await quiet(cfg.quiet_wait)
            out["load_before_idle"] = load_average()
            out["idle"] = await run_probes(session, a, observers, cfg.writes, rng, follower)
            if cfg.background_clients:
                await quiet(cfg.quiet_wait)
                out["load_before_busy"] = load_average()
                async with aiohttp.ClientSession() as background_session:
                    background = asyncio.ensure_future(spread_load(
                        servers, cfg.background_clients, background_session,
                        lambda url, n, i: LoadConfig(url=url, concurrency=n, duration=600, mix={"add": 1.0},
                                                     namespace="background", seed=40 + i, warmup=0)))
                    await asyncio.sleep(2.0)  # the load settles
                    try:
                        async with CpuSplit(servers, functools.partial(dbs.backend_pids, url)) as cpu:
                            out["busy"] = await run_probes(session, a, observers, cfg.writes, rng, follower)
                    finally:
                        background.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await background
                    out["busy"]["cpu"] = cpu.to_dict()
        finally:
            if hasattr(follower, "store"):
                await follower.close()
            out["exit_codes"] = stop_servers(servers)
    out["log_problems"] = log_problems(servers)[:5]
    return out


VIS_LABELS = {
    "add keyword seen": "add: keyword search on B and C returns it",
    "add vector seen": "add: vector search on B and C returns it",
    "delete keyword gone": "delete: keyword search on B and C no longer returns it",
    "delete vector gone": "delete: vector search on B and C no longer returns it",
    "delete vector index": "delete: B's and C's vector index followed (page full again)",
    "add follower indexed": "add: a 4th instance's index had it (in-process clock)",
    "delete follower removed": "delete: a 4th instance's index dropped it (in-process clock)",
}


def report_visibility(result: dict[str, Any]) -> str:
    conditions = [c for c in ("idle", "busy") if c in result]
    head = {"idle": f"idle (load average {result.get('load_before_idle')} before)",
            "busy": f"under {result['background_clients']} adding clients"}
    lines = [f"\n== visibility across 3 instances on one Postgres database: {result['writes']} probes through A; "
             "delay from A's answer (201/204) until the answers of both B and C show it ==",
             f"{'':<60} " + " | ".join(f"{head[c]:<40}" for c in conditions),
             f"{'':<60} " + " | ".join(f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'missed':>6} {'1st':>9}"
                                       for _ in conditions)]
    for key, label in VIS_LABELS.items():
        cells = []
        for c in conditions:
            f = result[c]["delays"].get(key)
            if f is None or not f["n"]:
                cells.append(f"{'-':>7} {'-':>7} {'-':>7} {f['missed'] if f else 0:>6} {'-':>9}")
            else:
                first = f"{f['first_search']:>4}/{f['n']:<4}" if f["first_search"] is not None else f"{'-':>4}{'':5}"
                cells.append(f"{f['p50_ms']:>7.1f} {f['p99_ms']:>7.1f} {f['max_ms']:>7.1f} {f['missed']:>6} {first}")
        lines.append(f"{label:<60} " + " | ".join(cells))
    for c in conditions:
        trips = result[c]["search_round_trip_p50_ms"]
        lines.append(f"{c}: one search's round trip (the resolution) p50 {cell(trips['keyword'], '.1f')} ms keyword, "
                     f"{cell(trips['vector'], '.1f')} ms vector (it embeds the query)"
                     + (f"; cpu {result[c]['cpu']}" if "cpu" in result[c] else ""))
    lines.append("(1st = probes that B's and C's first search, sent right after A's answer, already showed, so "
                 "their true delay is below one round trip; missed = not within 10 s. The 4th instance is gm.open on "
                 "the same database inside this process, timed when the change feed applies the change to its index; "
                 "a negative delay means the change arrived before A's answer reached the client. min ms: "
                 + ", ".join(f"{c} {result[c]['delays'].get(k, {}).get('min_ms')}" for c in conditions
                             for k in ("add follower indexed", "delete follower removed")) + ")")
    if any(c != 0 for c in result["exit_codes"]):
        lines.append(f"   server exit codes {result['exit_codes']} (expected 0)")
    for line in result["log_problems"]:
        lines.append(f"   log: {line}")
    return "\n".join(lines)


# -- 3. pgvector HNSW recall ----------------------------------------------------------------------


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
        source.append(f"{rest} bench/load.py Workload texts")
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


class CountingBackend(pg.PostgresBackend):
    """The real backend; records how many statements each vector_search issued (2 = the
    exact fallback ran), how many rows the first (HNSW) one returned, and the SQL used."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.calls: list[tuple[str, list[Any], int]] = []

    async def _vector_rows(self, sql: str, params: list[Any], limit: int) -> list[Any]:
        rows = await super()._vector_rows(sql, params, limit)
        self.calls.append((sql, list(params), len(rows)))
        return rows


async def load_rows(url: str, vectors: np.ndarray, texts: list[str], parents: np.ndarray,
                    namespaces: list[str], users: list[str | None]) -> float:
    """COPY the rows into ``memories`` on a pooled connection of the backend (it knows the
    binary format of ``vector``); ids are ``r<index>``."""
    backend = pg.PostgresBackend(url)
    await backend.open(lambda changes: None)
    started = time.perf_counter()
    now = int(time.time() * 1000)
    try:
        async with backend.acquire("loading") as conn:
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


async def explain(backend: CountingBackend, sql: str, params: list[Any], ef: int) -> str:
    """The scan nodes of Postgres's plan for a statement, under the same settings."""
    async with backend.acquire("explaining") as conn, conn.transaction():
        await conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
        lines = [r[0] for r in await conn.fetch("EXPLAIN " + sql, *params)]
    nodes = [line.strip().removeprefix("->").strip().split("  (cost")[0] for line in lines
             if line.lstrip().startswith("->") or line is lines[0]]
    return " <- ".join(nodes)


async def run_queries(backend: CountingBackend, vectors: np.ndarray, queries: np.ndarray, scope: Scope,
                      members: np.ndarray, ef: int, rowid_to_index: dict[int, int], limit: int = 10,
                      ) -> dict[str, Any]:
    """Every query through ``backend.vector_search`` (sequentially), against numpy's exact
    top-``limit`` of the scope: recall@limit, latency, how often the exact fallback ran."""
    pg.HNSW_EF_SEARCH = ef  # read by _vector_rows at each call: SET LOCAL hnsw.ef_search = max(this, limit)
    recalls: list[float] = []
    latencies: list[float] = []
    first_rows: list[int] = []
    fallbacks = 0
    now = int(time.time() * 1000) + 1
    plans: dict[str, str] = {}
    for q in queries:
        backend.calls.clear()
        began = time.perf_counter()
        hits = await backend.vector_search(q.astype("<f4").tobytes(), scope, None, limit, now)
        latencies.append(time.perf_counter() - began)
        truth, kth = exact_top(vectors, members, q, limit)
        sims = {rowid_to_index[r]: float(vectors[rowid_to_index[r]] @ q) for r, _ in hits}
        # a returned row as close as the exact last one counts (float ties between pgvector and numpy)
        recalls.append(sum(1 for i, s in sims.items() if i in truth or s >= kth - 1e-5) / len(truth))
        first_rows.append(backend.calls[0][2])
        fallbacks += len(backend.calls) > 1
        for name, (sql, params, _) in zip(("hnsw", "fallback"), backend.calls, strict=False):
            if name not in plans:
                plans[name] = await explain(backend, sql, params, max(ef, limit))
    return {
        "ef_search": max(ef, limit), "limit": limit, "recall": round(statistics.mean(recalls), 4),
        "queries": len(queries), "fallbacks": fallbacks,
        "first_statement_rows_p50": statistics.median(first_rows),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2), "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "plans": plans,
    }


async def backend_pids(backend: pg.PostgresBackend) -> list[int]:
    return [r[0] for r in await backend.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")]


def start_pgserver(directory: Path) -> Any:
    if "XDG_RUNTIME_DIR" not in os.environ:  # pgserver warns without a private runtime dir
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    import pgserver

    return pgserver.get_server(directory / "pgdata", cleanup_mode="delete")


async def bench_recall(cfg: Config, data: Path, tmp: Path) -> dict[str, Any]:
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
        backend = CountingBackend(url)
        await backend.open(lambda changes: None)
        try:
            rowid_to_index = {r[0]: int(r[1][1:]) for r in await backend.fetch("SELECT rowid, id FROM memories")}
            ns = np.array(namespaces)
            user_arr = np.array([u or "" for u in users])
            scopes = [
                ("main namespace (99%)", Scope(MAIN_NS), np.flatnonzero(ns == MAIN_NS)),
                ("one user (~10%)", Scope(MAIN_NS, "user-3"), np.flatnonzero(user_arr == "user-3")),
                ("small namespace (1%)", Scope(SMALL_NS), np.flatnonzero(ns == SMALL_NS)),
            ]
            saved = pg.HNSW_EF_SEARCH
            try:
                await run_queries(backend, vectors, queries, scopes[0][1], scopes[0][2], 100, rowid_to_index)  # warm
                results = []
                # recall@10 at each ef_search, then the call hybrid search makes: limit 50 (its
                # candidate depth) at gm's own ef_search, max(100, limit)
                runs = [(ef, 10) for ef in cfg.ef] + [(saved, HYBRID_DEPTH)]
                for label, scope, members in scopes:
                    for ef, limit in runs:
                        await quiet(min(cfg.quiet_wait, 10))
                        async with CpuSplit([], functools.partial(backend_pids, backend)) as cpu:
                            r = await run_queries(backend, vectors, queries, scope, members, ef, rowid_to_index,
                                                  limit)
                        results.append({"scope": label, "rows": len(members), "cpu": cpu.to_dict()} | r)
                        progress(f"   {label} ef {r['ef_search']} limit {limit}: recall {r['recall']:.3f}, "
                                 f"p50 {r['p50_ms']} ms, fallbacks {r['fallbacks']}")
            finally:
                pg.HNSW_EF_SEARCH = saved
        finally:
            await backend.close()
    finally:
        server.cleanup()
    return {"rows": cfg.rows, "base_texts": len(texts), "text_source": text_source,
            "queries": len(questions), "question_source": question_source, "spread": cfg.spread,
            "embed_seconds": round(embed_seconds, 1), "similarity": similarity,
            "load_seconds": round(loaded, 1), "index": index, "results": results, "load_average": load_average()}


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
        f"{'exact fallback':>14} {'HNSW rows p50':>13} {'others':>6}",
    ]
    for r in result["results"]:
        lines.append(f"{r['scope']:<22} {r['rows']:>7,} {r['ef_search']:>9} {r['limit']:>5} {r['recall']:>9.3f} "
                     f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['fallbacks']:>7}/{r['queries']:<6} "
                     f"{r['first_statement_rows_p50']:>13} {r['cpu']['other_cores']:>6.2f}")
    lines.append("(recall = recall@limit against numpy's exact top-limit of the scope; limit 10 at each ef_search, "
                 f"then limit {HYBRID_DEPTH} at gm's ef_search, the call a hybrid search with limit 10 makes; "
                 "latency = PostgresBackend.vector_search as called, one at a time; exact fallback = queries where "
                 "the HNSW statement returned fewer than limit rows and the backend ran the exact one; HNSW rows = "
                 "what that first statement returned; others = cores used meanwhile by processes other than this "
                 "one and the Postgres backends of the benchmark database)")
    seen = set()
    for r in result["results"]:
        for name, plan in r["plans"].items():
            if (r["scope"], name) not in seen:
                seen.add((r["scope"], name))
                lines.append(f"plan, {r['scope']}, {name} statement: {plan}")
    for notice in ix["notices"]:
        lines.append(f"index build notice: {notice}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------------


async def run(parts: list[str], cfg: Config, admin_url: str, data: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "greatmemory": gm.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average_at_start": load_average(), "config": asdict(cfg),
    }
    dbs = Databases(admin_url)
    with tempfile.TemporaryDirectory(prefix="gm-pg-bench-") as directory:
        tmp = Path(directory)
        try:
            if "throughput" in parts:
                out["throughput"] = await bench_throughput(cfg, dbs, tmp)
            if "visibility" in parts:
                out["visibility"] = await bench_visibility(cfg, dbs, tmp)
        finally:
            await dbs.drop_all()
        if "recall" in parts:
            out["recall"] = await bench_recall(cfg, data, tmp)
    out["load_average_at_end"] = load_average()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: bench/postgres.py throughput visibility --quick")
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"which parts to run: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    parser.add_argument("--admin-url", default=ADMIN_URL,
                        help=f"a loopback Postgres where benchmark databases may be created (default {ADMIN_URL})")
    parser.add_argument("--duration", type=float, help="seconds per throughput phase (20)")
    parser.add_argument("--clients", type=int, help="add clients, spread over the instances (32)")
    parser.add_argument("--search-clients", type=int, help="search clients, spread over the instances (8)")
    parser.add_argument("--prefill", type=int, help="memories searched in the throughput rows (2000)")
    parser.add_argument("--writes", type=int, help="visibility probes (100)")
    parser.add_argument("--background-clients", type=int,
                        help="visibility: clients adding through all instances during the second round (8; 0: skip)")
    parser.add_argument("--rows", type=int, help="recall: stored vectors (100000)")
    parser.add_argument("--base", type=int, help="recall: real texts embedded (5000)")
    parser.add_argument("--queries", type=int, help="recall: query vectors (200)")
    parser.add_argument("--spread", type=float, help="recall: noise scale of the synthetic vectors (0.7)")
    parser.add_argument("--ef", help="recall: ef_search values, comma-separated (40,100,200)")
    parser.add_argument("--maintenance-work-mem", help="recall: for the index build ('512MB'; '' = server default)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"LoCoMo folder (default {DEFAULT_DATA})")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each measured phase, wait up to this long for other processes to use under "
                             "15%% of the machine (default 30, at most 600 in all; 0 = never wait)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    cfg = QUICK if args.quick else FULL
    names = ("duration", "clients", "search_clients", "prefill", "writes", "background_clients", "rows", "base",
             "queries", "spread", "maintenance_work_mem")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.ef:
        changes["ef"] = tuple(int(x) for x in args.ef.split(","))
    cfg = replace(cfg, quiet_wait=args.wait_quiet, **changes)
    QUIET_BUDGET[0] = 600.0 if args.wait_quiet > 0 else 0.0
    parts = [p for p in PARTS if p in args.parts] or list(PARTS)
    admin_url = check_loopback_postgres(args.admin_url)
    progress(f"greatmemory {gm.__version__}: Postgres benchmark ({', '.join(parts)}; "
             f"{'quick' if args.quick else 'full'}); {os.cpu_count()} CPUs, load average {load_average()}")
    result = asyncio.run(run(parts, cfg, admin_url, args.data))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"greatmemory {result['greatmemory']}, Python {result['python']}, {result['cpus']} CPUs; load average "
          f"{result['load_average_at_start']} at start, {result['load_average_at_end']} at the end")
    if "throughput" in result:
        print(report_throughput(result["throughput"]))
    if "visibility" in result:
        print(report_visibility(result["visibility"]))
    if "recall" in result:
        print(report_recall(result["recall"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
