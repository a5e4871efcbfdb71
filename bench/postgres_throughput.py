"""The Postgres backend's throughput: adds/s and searches/s through 1, 2 and 3 ``gmem serve
--database-url`` instances sharing one database, against one ``gmem serve --db`` on SQLite.

    .venv/bin/python bench/postgres.py throughput [--quick] [--json]

Each instance shares one fresh database on the Postgres at 127.0.0.1:5432 (``--admin-url``; it
has no pgvector, so every instance keeps its in-process vector index and follows the others'
writes through the ``changes`` table, LISTEN/NOTIFY and a 1 s poll). Per row: ``--prefill``
memories (2,000) are added in batches of 100, then ``--duration`` seconds (20) of hybrid
searches over that namespace by ``--search-clients`` clients (8), then ``--duration`` seconds of
single adds by ``--clients`` clients (32). The clients are spread round-robin over the
instances: bench/load.py's generator runs once per instance, all at once, and the rates are
summed. Each phase also prints the CPU seconds used by the gm servers, by the Postgres
backends serving this database, by this process and by everything else on the machine.

The embedding model (ONNX, CPU-bound) is the bottleneck of both operations, and instances
started on one machine share its cores: on 2 cores, more instances cannot add throughput.
What the rows show is that the shared database is not the bottleneck (its CPU per add) and
what an extra instance costs (following every other instance's writes, its own event loop and
HTTP stack). Several instances run with GM_EMBED_THREADS=1 each (one ONNX thread, so two
instances do not oversubscribe two cores); single instances run once with the default (all
cores) and once with 1.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from cpu import CpuMeter, Quiet
from figures import cell, load_average, percentile, progress, rounded
from load import LoadConfig, LoadResult, run_load, run_spread, spread
from servers import Databases, PgServer, Server, log_problems, start_all, stop_all, warm_up

if TYPE_CHECKING:
    from postgres import Config

USERS = 100


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


def per_request(cpu: CpuMeter, results: list[LoadResult], op: str) -> dict[str, float]:
    """CPU milliseconds per request of the gm servers and of the Postgres backends."""
    done = max(1, sum(len(r.ops[op].latencies_ms) for r in results))
    return {"gm_cpu_ms": round(cpu.servers / done * 1000, 2), "postgres_cpu_ms": round(cpu.postgres / done * 1000, 2)}


async def throughput_row(row: Row, cfg: Config, dbs: Databases, tmp: Path, session: aiohttp.ClientSession,
                         quiet: Quiet) -> dict[str, Any]:
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
        await start_all(servers, row.threads)
        await warm_up(session, servers)
        urls = [s.url for s in servers]
        progress(f"   {len(servers)} instance(s) ready and warm in {time.perf_counter() - began:.1f}s: "
                 + ", ".join(urls))
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

        await quiet.wait(cfg.quiet_wait)
        out["load_before_search"] = load_average()
        async with CpuMeter([s.pid for s in servers], pg_pids) as cpu:
            searched = await run_spread(urls, cfg.search_clients, session, lambda url, n, i: LoadConfig(
                url=url, concurrency=n, duration=cfg.duration, mix={"search": 1.0}, namespace="search",
                users=USERS, seed=20 + i, search_scope="namespace", search_mode="hybrid", timeout=120.0))
        out["search"] = combine(searched, "search") | {"cpu": cpu.to_dict()} | per_request(cpu, searched, "search")
        progress(f"   search: {out['search']['per_second']}/s {out['search']['per_instance']}, "
                 f"p50 {out['search']['p50_ms']} ms; cpu {cpu.to_dict()}")

        await quiet.wait(cfg.quiet_wait)
        out["load_before_add"] = load_average()
        async with CpuMeter([s.pid for s in servers], pg_pids) as cpu:
            added = await run_spread(urls, cfg.clients, session, lambda url, n, i: LoadConfig(
                url=url, concurrency=n, duration=cfg.duration, mix={"add": 1.0}, namespace="adds",
                users=USERS, seed=30 + i, timeout=120.0))
        out["add"] = combine(added, "add") | {"cpu": cpu.to_dict()} | per_request(cpu, added, "add")
        progress(f"   add: {out['add']['per_second']}/s {out['add']['per_instance']}, p50 {out['add']['p50_ms']} ms; "
                 f"cpu {cpu.to_dict()}")
    finally:
        out["exit_codes"] = stop_all(servers)
        out["log_problems"] = log_problems(servers)[:5]
    return out


async def bench_throughput(cfg: Config, dbs: Databases, tmp: Path, quiet: Quiet) -> dict[str, Any]:
    progress(f"\n== throughput: {cfg.duration:g} s of hybrid searches ({cfg.search_clients} clients, "
             f"{cfg.prefill} memories) then {cfg.duration:g} s of adds ({cfg.clients} clients) per row ==")
    connector = aiohttp.TCPConnector(limit=cfg.clients + 16)
    async with aiohttp.ClientSession(connector=connector) as session:
        rows = [await throughput_row(row, cfg, dbs, tmp, session, quiet) for row in ROWS]
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
