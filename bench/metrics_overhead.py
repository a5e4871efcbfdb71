"""Hand-run benchmark: what /metrics costs the HTTP add and search paths, on this machine.

    .venv/bin/python bench/metrics_overhead.py                      # 3 rounds, ~6 minutes on 2 cores
    .venv/bin/python bench/metrics_overhead.py --rounds 2 --seconds 10 --json

Each round starts ``gmem serve`` twice on a fresh SQLite file, once with GM_METRICS=off (no
route, no counting middleware) and once with GM_METRICS=open (alternating which goes first,
so a drift of the machine hits both), and measures the same closed-loop load with
bench/load.py's generator: ``--prefill`` memories, then ``--seconds`` of searches, then
``--seconds`` of single adds, ``--concurrency`` clients. With metrics, a scraper also GETs
/metrics every ``--scrape-seconds`` (1 s: 15 times Prometheus's default rate), so the scrape's
own cost is in the figures. Printed per round and variant: requests/s, p50/p99 latency (ms) and
the server's CPU time per request (ms), and the medians over the rounds with the change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from cpu import CpuMeter
from figures import percentile, progress, table
from gm import loops
from load import LoadConfig, LoadResult, run_load
from servers import Server, warm_up

VARIANTS = ("off", "open")


async def scraping(url: str, every: float, stop: asyncio.Event) -> int:
    """GET /metrics every ``every`` seconds until ``stop``; how many scrapes answered 200."""
    answered = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        while not stop.is_set():
            async with session.get(url + "/metrics") as response:
                await response.read()
                answered += response.status == 200
            await loops.pause(every, stop)
    return answered


async def measure(server: Server, variant: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One server's search phase then add phase; a row per operation."""
    rows = []
    # The prefill first, unmeasured (its embedding would swamp the search phase's CPU figure).
    await run_load(LoadConfig(url=server.url, requests=1, mix={"search": 1.0}, prefill=args.prefill, seed=args.seed))
    phases = [("search", LoadConfig(url=server.url, duration=args.seconds, mix={"search": 1.0},
                                    concurrency=args.concurrency, seed=args.seed)),
              ("add", LoadConfig(url=server.url, duration=args.seconds, mix={"add": 1.0},
                                 concurrency=args.concurrency, seed=args.seed + 1))]
    for op, config in phases:
        stop = asyncio.Event()
        scraper = (asyncio.create_task(scraping(server.url, args.scrape_seconds, stop))
                   if variant == "open" else None)
        with CpuMeter([server.pid]) as cpu:
            result: LoadResult = await run_load(config)
        stop.set()
        scrapes = await scraper if scraper is not None else 0
        stats = result.ops[op]
        lat = stats.latencies_ms
        rows.append({"variant": variant, "op": op, "requests": stats.count, "errors": stats.errors,
                     "per_second": result.rate(op), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                     # (the server's CPU over the phase, its few warm-up requests included, per measured request)
                     "server_cpu_ms": 1000 * cpu.servers / max(1, stats.count), "scrapes": scrapes,
                     "others_share": cpu.others_share})
    return rows


async def one_round(number: int, directory: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    order = VARIANTS if number % 2 == 0 else VARIANTS[::-1]
    rows = []
    for variant in order:
        os.environ["GM_METRICS"] = variant
        db = directory / f"round{number}-{variant}.db"
        server = Server(db, directory / f"round{number}-{variant}.log", keep_settings=True)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                await warm_up(session, [server])
            progress(f"round {number + 1}: GM_METRICS={variant}")
            for row in await measure(server, variant, args):
                rows.append({"round": number + 1, **row})
        finally:
            server.kill_if_running()
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    def fmt(row: dict[str, Any]) -> list[str]:
        return [str(row.get("round", "median")), row["variant"], row["op"], f"{row['per_second']:.1f}",
                f"{row['p50_ms']:.1f}", f"{row['p99_ms']:.1f}", f"{row['server_cpu_ms']:.2f}"]

    header = ["round", "GM_METRICS", "op", "req/s", "p50 ms", "p99 ms", "server CPU ms/req"]
    out = [table(header, [fmt(r) for r in rows]), ""]
    medians, changes = [], []
    for op in ("search", "add"):
        by = {v: [r for r in rows if r["op"] == op and r["variant"] == v] for v in VARIANTS}
        med = {v: {k: statistics.median(r[k] for r in by[v]) for k in ("per_second", "p50_ms", "p99_ms",
                                                                         "server_cpu_ms")} for v in VARIANTS}
        for v in VARIANTS:
            medians.append(fmt({"variant": v, "op": op, **med[v]}))
        changes.append([op] + [f"{100 * (med['open'][k] / med['off'][k] - 1):+.1f}%"
                               for k in ("per_second", "p50_ms", "p99_ms", "server_cpu_ms")])
    out += [table(header, medians), "", table(["op", "req/s", "p50", "p99", "server CPU/req"], changes)]
    return "\n".join(out)


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds, each with and without metrics (3)")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds of each measured phase (15)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--prefill", type=int, default=500, help="memories added before the search phase (500)")
    p.add_argument("--scrape-seconds", type=float, default=1.0, help="seconds between scrapes with metrics (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 300 or not 0.1 <= args.scrape_seconds <= 60:
        p.error("--rounds 1-20, --seconds 1-300, --scrape-seconds 0.1-60")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gm-metrics-bench-") as tmp:
        for number in range(args.rounds):
            rows += await one_round(number, Path(tmp), args)
    print(report(rows))
    if any(r["errors"] for r in rows):
        print("errors:", [(r["round"], r["variant"], r["op"], r["errors"]) for r in rows if r["errors"]])
    if args.json:
        print(json.dumps(rows))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
