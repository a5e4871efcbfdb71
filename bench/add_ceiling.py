"""Hand-run benchmark: HTTP adds with server-side embedding against the raw model ceiling,
measured in one run (not a test: it prints figures, asserts nothing).

    .venv/bin/python bench/add_ceiling.py                 # 3 rounds of 600 adds: ~3 minutes on 2 cores
    .venv/bin/python bench/add_ceiling.py --quick         # 1 round of 192
    .venv/bin/python bench/add_ceiling.py --gmem ../before/.venv/bin/gmem   # another build beside this one

The ceiling is the model in this process on the texts bench/load.py sends (its
``Workload``) in batches of 32, kept busy by nothing but itself, run two ways: one call at a
time over every core (``Encoder(spec)``) and one single-threaded call per core at once
(``Encoder(spec, threads=1)``, as the Embedder runs it); each pass counts the better one.
Each round measures a ceiling pass, then each server's HTTP adds (``--clients`` closed-loop
clients of bench/load.py, single-memory ``POST /v1/memories``), each followed by another
ceiling pass; a phase's **adds/ceiling** is its adds/s over the mean of the ceiling passes on
either side of it, so a burst of other work on a shared machine hits both. The servers
(``gmem serve`` of this checkout, plus each ``--gmem``) run on temporary SQLite files and
take turns within every round.

Beside each phase, from the server's own ``/metrics`` scraped before and after: the share of
the wall time its embedder was running the model (``embedder busy``), the mean texts per
model call, the share its Writer spent between BEGIN and COMMIT, and the server's CPU
milliseconds per add. Then ``--single`` adds from one client, one at a time, to each server in
turn (which goes first alternating): the latency of an add alone (p50/p99), model loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

import gm
from cpu import CpuMeter, Quiet
from figures import cell, load_average, percentile
from gm.embedding import Encoder, ModelSpec
from load import LoadConfig, run_load
from servers import Server, log_problems, warm_up
from workload import Workload

TARGET = 0.90
BATCH = 32  # the ceiling's batch


@dataclass
class Phase:
    """One server's HTTP adds in one round."""

    rate: float
    before: tuple[float, float]  # the ceiling passes on either side (texts/s, CPU ms a text)
    after: tuple[float, float]
    p50: float
    p99: float
    errors: int
    cpu_ms: float  # the server's CPU per add
    client_ms: float  # the load generator's (this process's) CPU per add
    others: float  # share of the machine other processes used
    busy: float | None = None  # embedder running the model, share of the wall time
    per_call: float | None = None  # texts per model call
    writing: float | None = None  # Writer between BEGIN and COMMIT, share of the wall time
    io_stall: float | None = None  # share of the wall time some task on the machine waited for I/O

    @property
    def ceiling(self) -> float:
        return (self.before[0] + self.after[0]) / 2

    @property
    def cpu_ratio(self) -> float:
        """The ceiling's CPU a text over the CPU an add took, server and client: what the ratio
        would be on a machine of our own (wall rates follow whoever else runs meanwhile)."""
        return (self.before[1] + self.after[1]) / 2 / (self.cpu_ms + self.client_ms)

    @property
    def ratio(self) -> float:
        return self.rate / self.ceiling


@dataclass
class Build:
    label: str
    server: Server
    phases: list[Phase] = field(default_factory=list)
    alone: list[float] = field(default_factory=list)  # ms, single adds one at a time


class Ceiling:
    """The raw model on the load generator's texts in batches of 32, two ways, the better one
    counting: one call at a time over every core (``Encoder(spec)``, as the library ran it
    before), and one single-threaded call per core at once (``Encoder(spec, threads=1)``, as
    the Embedder runs it now)."""

    def __init__(self, texts: int) -> None:
        spec = ModelSpec.default()
        self.wide = Encoder(spec)
        self.single = Encoder(spec, threads=1)
        self.cores = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.cores)
        self.texts = [m["text"] for m in Workload(seed=1).memories(texts)]
        self.wide.encode(self.texts[:64])  # warm-up
        self.single.encode(self.texts[:64])
        self.passes: list[dict[str, tuple[float, float]]] = []

    def measure(self) -> tuple[float, float]:
        """The better way's texts/s and CPU milliseconds a text (each pass's are kept in ``passes``)."""
        batches = [self.texts[i : i + BATCH] for i in range(0, len(self.texts), BATCH)]
        found: dict[str, tuple[float, float]] = {}
        for way in ("wide", "single"):
            with CpuMeter() as cpu:
                if way == "wide":
                    for batch in batches:
                        self.wide.encode(batch)
                else:
                    list(self.pool.map(self.single.encode, batches))
            found[way] = (len(self.texts) / cpu.wall, cpu.bench / len(self.texts) * 1000)
        self.passes.append(found)
        return max(found.values())

    def summary(self) -> str:
        def median(way: str, i: int) -> float:
            return statistics.median(p[way][i] for p in self.passes)

        return (f"   ceiling passes (median of {len(self.passes)}): one call over {self.wide.threads} threads "
                f"{median('wide', 0):.1f} texts/s, {median('wide', 1):.2f} CPU ms a text; {self.cores} "
                f"single-threaded calls at once {median('single', 0):.1f} texts/s, {median('single', 1):.2f} CPU ms")


METRICS = {
    "embed_s": "greatmemory_embedder_batch_duration_seconds_sum",
    "calls": "greatmemory_embedder_batch_duration_seconds_count",
    "texts": "greatmemory_embedder_batch_texts_sum",
    "commit_s": "greatmemory_writer_commit_duration_seconds_sum",
}


def io_stalled() -> float | None:
    """Microseconds some task waited for I/O since boot (Linux PSI), None where unknown: other
    work's disk traffic slows every commit's fsync (p90 0.27 ms on a quiet disk, 20 ms beside it)."""
    try:
        with open("/proc/pressure/io") as f:
            return float(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float] | None:
    """The few /metrics samples this bench reads (None if the server does not serve them)."""
    async with session.get(url + "/metrics") as resp:
        if resp.status != 200:
            return None
        text = await resp.text()
    names = {v: k for k, v in METRICS.items()}
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[names[name]] = float(value)
    return found


async def adds_phase(build: Build, cfg: argparse.Namespace, seed: int, before: tuple[float, float],
                     ceiling: Ceiling, session: aiohttp.ClientSession) -> Phase:
    url = build.server.url
    first = await scrape(session, url)
    load = LoadConfig(url=url, concurrency=cfg.clients, requests=cfg.adds, mix={"add": 1.0}, namespace="adds",
                      users=100, seed=seed, warmup=0, timeout=120.0)
    stalled = io_stalled()
    with CpuMeter([build.server.pid]) as cpu:
        result = await run_load(load, session)
    stalled_after = io_stalled()
    last = await scrape(session, url)
    after = ceiling.measure()
    lat = result.ops["add"].latencies_ms
    phase = Phase(result.rate("add"), before, after, percentile(lat, 50), percentile(lat, 99), result.errors,
                  cpu.servers / max(1, cfg.adds) * 1000, cpu.bench / max(1, cfg.adds) * 1000, cpu.others_share)
    if stalled is not None and stalled_after is not None:
        phase.io_stall = (stalled_after - stalled) / 1e6 / cpu.wall
    if first is not None and last is not None:
        delta = {k: last.get(k, 0.0) - first.get(k, 0.0) for k in METRICS}
        phase.busy = delta["embed_s"] / cpu.wall
        phase.per_call = delta["texts"] / delta["calls"] if delta["calls"] else None
        phase.writing = delta["commit_s"] / cpu.wall
    return phase


async def alone(builds: list[Build], count: int, session: aiohttp.ClientSession) -> None:
    """``count`` single adds per build, one at a time: one to each build in turn, which goes
    first alternating (a server's first request after the others' is the slower one)."""
    work = Workload(seed=77, namespace="alone", users=10)
    for i in range(count):
        for build in builds if i % 2 == 0 else builds[::-1]:
            began = time.perf_counter()
            async with session.post(build.server.url + "/v1/memories", json=work.memory()) as resp:
                assert resp.status == 201, await resp.text()
                await resp.read()
            build.alone.append((time.perf_counter() - began) * 1000)


def report(builds: list[Build]) -> None:
    print(f"\n   {'build':<6} {'round':>5} {'adds/s':>7} {'ceiling/s':>9} {'adds/ceiling':>12} {'cpu ratio':>9} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'embedder busy':>13} {'texts/call':>10} {'writer busy':>11} "
          f"{'server ms/add':>13} {'client':>6} {'ceiling ms':>10} {'others':>6} {'io stall':>8} {'errors':>6}")
    for build in builds:
        for r, p in enumerate(build.phases, start=1):
            print(f"   {build.label:<6} {r:>5} {p.rate:>7.1f} {p.ceiling:>9.1f} {p.ratio:>12.2f} {p.cpu_ratio:>9.2f} "
                  f"{p.p50:>7.0f} {p.p99:>7.0f} {cell(p.busy, '>13.0%')} {cell(p.per_call, '>10.1f')} "
                  f"{cell(p.writing, '>11.0%')} {p.cpu_ms:>13.2f} {p.client_ms:>6.2f} "
                  f"{(p.before[1] + p.after[1]) / 2:>10.2f} {p.others:>6.0%} {cell(p.io_stall, '>8.0%')} {p.errors:>6}")
    print("   (cpu ratio: the ceiling's CPU ms a text over the server's and client's CPU ms an add; "
          "others: the share of the machine other processes used meanwhile; io stall: the share of the time some "
          "task waited for the disk)\n")
    for build in builds:
        ratio = statistics.median(p.ratio for p in build.phases)
        verdict = "met" if ratio >= TARGET else "NOT met"
        print(f"   {build.label}: adds/ceiling (HTTP, median of {len(build.phases)}) {ratio:.2f} "
              f"(target >= {TARGET}: {verdict}); cpu ratio {statistics.median(p.cpu_ratio for p in build.phases):.2f}; "
              f"adds/s {statistics.median(p.rate for p in build.phases):.1f}; "
              f"one add alone p50 {percentile(build.alone, 50):.1f} ms, p99 {percentile(build.alone, 99):.1f} ms "
              f"({len(build.alone)} adds)")


async def run(cfg: argparse.Namespace) -> int:
    quiet = Quiet(cfg.wait_quiet * cfg.rounds)
    ceiling = Ceiling(cfg.ceiling_texts)
    print(f"   ceiling: {len(ceiling.texts)} texts a pass, batch {BATCH}, the better of {ceiling.wide.threads} "
          f"intra-op threads and {ceiling.cores} single-threaded calls at once; "
          "first pass {:.1f} texts/s, {:.1f} CPU ms a text".format(*ceiling.measure()))
    with tempfile.TemporaryDirectory(prefix="gm-add-ceiling-") as directory:
        tmp = Path(directory)
        builds = [Build("this", Server(tmp / "this.db", tmp / "this.log"))]
        for i, gmem in enumerate(cfg.gmem, start=1):
            builds.append(Build(f"gmem{i}", Server(tmp / f"gmem{i}.db", tmp / f"gmem{i}.log", gmem=Path(gmem))))
        for build in builds:
            print(f"   {build.label}: {' '.join(build.server.command())}")
        try:
            for build in builds:
                await build.server.start()
            connector = aiohttp.TCPConnector(limit=cfg.clients + 8)
            async with aiohttp.ClientSession(connector=connector) as session:
                await warm_up(session, [b.server for b in builds])
                for build in builds:  # every batching path once, unmeasured
                    await run_load(LoadConfig(url=build.server.url, concurrency=cfg.clients, requests=64,
                                              mix={"add": 1.0}, namespace="warmup", seed=999, warmup=0), session)
                for r in range(cfg.rounds):
                    await quiet.wait(cfg.wait_quiet)
                    before = ceiling.measure()
                    order = builds if r % 2 == 0 else builds[::-1]
                    for build in order:
                        phase = await adds_phase(build, cfg, 100 + r, before, ceiling, session)
                        build.phases.append(phase)
                        before = phase.after
                        print(f"   round {r + 1} {build.label}: {phase.rate:.1f} adds/s, adds/ceiling "
                              f"{phase.ratio:.2f}", file=sys.stderr)
                await alone(builds, cfg.single, session)
            report(builds)
            print(ceiling.summary())
            for line in log_problems([b.server for b in builds]):
                print(f"   server log: {line}")
        finally:
            for build in builds:
                build.server.kill_if_running()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 192 adds, 30 single adds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adds", type=int, default=600, help="adds per server and round (default 600)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients (default 32)")
    parser.add_argument("--single", type=int, default=100, help="single adds one at a time per server (default 100)")
    parser.add_argument("--ceiling-texts", type=int, default=256, help="texts a ceiling pass (default 256)")
    parser.add_argument("--gmem", action="append", default=[], metavar="PATH",
                        help="another build's gmem executable, served and measured beside this one (repeatable)")
    parser.add_argument("--wait-quiet", type=float, default=20.0, metavar="SECONDS",
                        help="before each round, wait up to this long for other processes to use under 15%% of "
                             "the machine (default 20; 0: never wait)")
    cfg = parser.parse_args()
    if cfg.quick:
        cfg.rounds, cfg.adds, cfg.single = 1, 192, 30
    print(f"greatmemory {gm.__version__}: HTTP adds against the model ceiling; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {load_average()} at start, "
          f"GM_EMBED_THREADS={os.environ.get('GM_EMBED_THREADS', 'unset')}; {cfg.rounds} round(s) of {cfg.adds} "
          f"adds from {cfg.clients} clients per server")
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
