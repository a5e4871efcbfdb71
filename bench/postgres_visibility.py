"""Cross-instance visibility on Postgres: how long after one instance's answer the others'
searches show an add, and stop showing a delete.

    .venv/bin/python bench/postgres.py visibility [--quick] [--json]

3 instances on one fresh database (GM_EMBED_THREADS=1). ``--writes`` times (100): add a memory
with a unique made-up word through instance A, then poll B and C (one concurrent loop per
instance and mode, each sending its next search as soon as the last one answered) with a
keyword search for the word and a vector search for the memory's exact text, until each returns
it; the delay runs from A's 201 to the answer that first contains it, and a probe counts as
seen when both B and C return it. Then delete it through A and poll until B and C no longer
return it. A deleted memory drops out of every answer at once (hits are read back from the
database), so for vector search a second figure says when B's and C's in-process index has
caught up: the namespace holds 20 fillers, and a vector search with limit 10 returns 9 hits
while the index still holds the deleted row, 10 once it followed the delete.

A search's round trip bounds that resolution (~10 ms keyword, ~20-30 ms vector, which embeds
the query), so a fourth instance, ``gm.open`` on the same database inside this process, notes
when its change feed applies each change to its index: the feed's delay to the millisecond.
All of it twice: on idle instances, then while ``--background-clients`` clients (8) add
memories through all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

import gm
from cpu import CpuMeter, Quiet
from figures import cell, load_average, percentile, progress, rounded
from load import LoadConfig, run_spread
from servers import Databases, PgServer, Server, log_problems, start_all, stop_all, warm_up
from workload import Workload

if TYPE_CHECKING:
    from postgres import Config

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
        index = self.store.indexer.index  # the published one (a reload would publish an unpatched one)
        original = index.apply

        def apply(changes: list[Any]) -> None:
            now = time.perf_counter()
            for change in changes:
                self.arrivals.setdefault((change.rowid, change.remove), now)
            original(changes)

        index.apply = apply  # type: ignore[method-assign]

    async def rowid(self, memory_id: str) -> int:
        rows = await self.store.backend.fetch("SELECT rowid FROM memories WHERE id = $1", [memory_id])
        return int(rows[0][0])

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


async def bench_visibility(cfg: Config, dbs: Databases, tmp: Path, quiet: Quiet) -> dict[str, Any]:
    progress(f"\n== visibility: {cfg.writes} adds and deletes through instance A, polled on B and C; idle, then "
             f"under {cfg.background_clients} clients adding through all three ==")
    url = await dbs.create("visibility")
    servers: list[Server] = [PgServer(url, tmp / f"vis-{i}.log") for i in range(3)]
    rng = random.Random(42)
    out: dict[str, Any] = {"writes": cfg.writes, "background_clients": cfg.background_clients}
    follower = Follower()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
        try:
            await start_all(servers, 1)
            await warm_up(session, servers)
            a, observers = servers[0], servers[1:]
            fillers = Workload(seed=5, namespace=VIS_NAMESPACE).memories(FILLERS)
            async with session.post(a.url + "/v1/memories", json={"memories": fillers}) as resp:
                assert resp.status == 201, await resp.text()
            await follower.open(url)
            await asyncio.sleep(2.0)
            await quiet.wait(cfg.quiet_wait)
            out["load_before_idle"] = load_average()
            out["idle"] = await run_probes(session, a, observers, cfg.writes, rng, follower)
            if cfg.background_clients:
                await quiet.wait(cfg.quiet_wait)
                out["load_before_busy"] = load_average()
                async with aiohttp.ClientSession() as background_session:
                    background = asyncio.ensure_future(run_spread(
                        [s.url for s in servers], cfg.background_clients, background_session,
                        lambda url, n, i: LoadConfig(url=url, concurrency=n, duration=600, mix={"add": 1.0},
                                                     namespace="background", seed=40 + i, warmup=0)))
                    await asyncio.sleep(2.0)  # the load settles
                    try:
                        async with CpuMeter([s.pid for s in servers], functools.partial(dbs.backend_pids, url)) as cpu:
                            out["busy"] = await run_probes(session, a, observers, cfg.writes, rng, follower)
                    finally:
                        background.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await background
                    out["busy"]["cpu"] = cpu.to_dict()
        finally:
            if hasattr(follower, "store"):
                await follower.close()
            out["exit_codes"] = stop_all(servers)
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
