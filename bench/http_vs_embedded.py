"""Hand-run benchmark: what the HTTP server costs over the embedded library, on this machine.

    .venv/bin/python bench/http_vs_embedded.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/http_vs_embedded.py --quick    # small, fast run
    .venv/bin/python bench/http_vs_embedded.py --profile always   # also py-spy the server's add path

In one run:

a) the raw embedding ceiling: ``Encoder(ModelSpec.default()).encode`` at batch 32 on the
   same kind of texts the load generator sends (bench/load.py's ``Workload``);
b) the embedded library's add throughput: 32 concurrent tasks calling ``mem.add`` on a
   temporary file (``async with gm.open(path) as mem``);
c) ``gmem serve`` started as a subprocess on a temporary database and a free loopback
   port; once /v1/readyz is 200, bench/load.py's generator (in-process) sends the same
   adds with 32 concurrent clients. (b) and (c) alternate for a few rounds, so a burst of
   other work on the machine hits both; the ratio HTTP/embedded (target >= 0.85) and
   HTTP/ceiling are printed per round and as the median;
d) 10,000 memories are added through the batch endpoint, then search p50/p99 over HTTP
   (one client sequential, then 8 concurrent) for one user's scope and the whole
   namespace; the server is stopped with SIGTERM (its exit status must be 0) and the
   embedded library searches the same database with the same queries.

Each phase prints how much CPU this process, the server, and everything else on the
machine used meanwhile: on a shared 2-core machine the last one explains odd figures.
Before each phase the run waits up to ``--wait-quiet`` seconds (90 in all) for other
processes to calm down.
With ``--profile auto`` (default) or ``always``, when py-spy is installed, one more HTTP add
round runs under ``py-spy record`` attached to the server, and the hottest functions are
printed (``auto``: only if HTTP reached less than 0.85 of embedded).

Everything lives in a temporary directory removed at the end (profiles are kept).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import linecache
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

import gm
from cpu import CpuMeter, Quiet
from figures import percentile
from gm.embedding import Encoder, ModelSpec
from load import LoadConfig, LoadResult, run_load
from servers import Server, log_problems
from workload import Workload

TARGET = 0.85
ADD_CLIENTS = 32
SEARCH_CLIENTS = 8
USERS = 100
QUIET_BUDGET = 90.0  # seconds of waiting for a quiet machine in the whole run


@dataclass(frozen=True)
class Config:
    ceiling_texts: int
    adds: int  # per round, per side
    rounds: int
    prefill: int
    searches: int  # measured searches per (scope, clients, side)
    quiet_wait: float = 0.0  # seconds to wait for other processes to calm down before each phase


FULL = Config(ceiling_texts=1024, adds=1000, rounds=3, prefill=10_000, searches=300)
QUICK = Config(ceiling_texts=128, adds=192, rounds=1, prefill=1_000, searches=40)


# -- a) ceiling ---------------------------------------------------------------------------------------


def bench_ceiling(cfg: Config) -> float:
    print("\n== a) raw embedding ceiling: Encoder(ModelSpec.default()).encode, batch 32 ==")
    encoder = Encoder(ModelSpec.default())
    work = Workload(seed=1)
    texts = [m["text"] for m in work.memories(cfg.ceiling_texts)]
    threads = encoder.session.get_session_options().intra_op_num_threads
    words = [len(t.split()) for t in texts]
    print(f"   {len(texts)} texts, {min(words)}-{max(words)} words (mean {statistics.mean(words):.1f}); "
          f"ONNX intra-op threads {threads}")
    encoder.encode(texts[:64])  # warm-up
    rates = []
    for _ in range(2):
        with CpuMeter() as cpu:
            for i in range(0, len(texts), 32):
                encoder.encode(texts[i : i + 32])
        rates.append(len(texts) / cpu.wall)
    ceiling = max(rates)
    print(f"   ceiling: {ceiling:.1f} texts/s (best of 2 passes: {', '.join(f'{r:.1f}' for r in rates)})")
    print(cpu.line())
    return ceiling


# -- b) embedded adds --------------------------------------------------------------------------------


async def embedded_adds(
    mem: Any, inputs: list[dict[str, Any]], clients: int
) -> tuple[float, list[int], list[float]]:
    """Adds/s with ``clients`` tasks taking the inputs in order; the ONNX batch sizes; latencies (ms)."""
    batches: list[int] = []
    latencies: list[float] = []
    original = mem.embedder._encode

    def counting_encode(texts: list[str]) -> Any:
        batches.append(len(texts))
        return original(texts)

    mem.embedder._encode = counting_encode
    queue = iter(inputs)

    async def client() -> None:
        for item in queue:
            began = time.perf_counter()
            await mem.add(item["text"], namespace=item["namespace"], user_id=item["user_id"],
                          metadata=item["metadata"])
            latencies.append((time.perf_counter() - began) * 1000)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    finally:
        mem.embedder._encode = original
    return len(inputs) / elapsed, batches, latencies


# -- c) HTTP adds --------------------------------------------------------------------------------------


def add_config(url: str, cfg: Config, seed: int, session_clients: int = ADD_CLIENTS) -> LoadConfig:
    return LoadConfig(url=url, concurrency=session_clients, requests=cfg.adds, mix={"add": 1.0}, namespace="adds",
                      users=USERS, seed=seed, warmup=0, timeout=120.0)


async def bench_adds(cfg: Config, ceiling: float, tmp: Path, server: Server,
                     session: aiohttp.ClientSession, quiet: Quiet) -> dict[str, Any]:
    print(f"\n== b) + c) adds with {ADD_CLIENTS} concurrent clients: embedded library vs HTTP, "
          f"{cfg.rounds} round(s) of {cfg.adds} each ==")
    rows = []
    async with gm.open(tmp / "embedded-adds.db") as mem:
        began = time.perf_counter()
        await mem.add("Warm-up memory: loads the embedding model before timing.", namespace="warmup")
        print(f"   embedded: first add (loads the model) {time.perf_counter() - began:.2f}s")
        began = time.perf_counter()
        async with session.post(server.url + "/v1/memories", json={"text": "Warm-up memory.",
                                                                    "namespace": "warmup"}) as resp:
            assert resp.status == 201, await resp.text()
        print(f"   HTTP: first add (loads the model) {time.perf_counter() - began:.2f}s")
        # both sides also warm their batching paths once, unmeasured
        warm = Workload(seed=999, namespace="warmup").memories(64)
        await embedded_adds(mem, warm, ADD_CLIENTS)
        await run_load(LoadConfig(url=server.url, concurrency=ADD_CLIENTS, requests=64, mix={"add": 1.0},
                                  namespace="warmup", seed=999, warmup=0), session)
        print(f"   {'round':>5} {'embedded/s':>11} {'HTTP/s':>8} {'HTTP/emb':>9} {'HTTP/ceil':>10} "
              f"{'emb/ceil':>9} {'p50 emb/HTTP':>14} {'p99 emb/HTTP':>14} {'errors':>6} {'emb batch':>9}")
        cpu_lines = []
        for r in range(cfg.rounds):
            seed = 100 + r
            inputs = Workload(seed, namespace="adds", users=USERS).memories(cfg.adds)
            await quiet.wait(cfg.quiet_wait)
            with CpuMeter([server.pid]) as cpu_e:
                emb_rate, batches, emb_lat = await embedded_adds(mem, inputs, ADD_CLIENTS)
            await quiet.wait(cfg.quiet_wait)
            with CpuMeter([server.pid]) as cpu_h:
                result = await run_load(add_config(server.url, cfg, seed), session)
            http_rate = result.rate("add")
            lat = result.ops["add"].latencies_ms
            rows.append({"embedded": emb_rate, "http": http_rate, "errors": result.errors,
                         "p50": percentile(lat, 50), "p99": percentile(lat, 99),
                         "cpu_e": cpu_e, "cpu_h": cpu_h, "result": result})
            print(f"   {r + 1:>5} {emb_rate:>11.1f} {http_rate:>8.1f} {http_rate / emb_rate:>9.2f} "
                  f"{http_rate / ceiling:>10.2f} {emb_rate / ceiling:>9.2f} "
                  f"{percentile(emb_lat, 50):>6.0f}/{percentile(lat, 50):>4.0f}ms "
                  f"{percentile(emb_lat, 99):>6.0f}/{percentile(lat, 99):>4.0f}ms "
                  f"{result.errors:>6} {statistics.mean(batches):>9.1f}")
            cpu_lines.append((r + 1, cpu_e.line(), cpu_h.line()))
            for e in result.first_errors[:3]:
                print(f"      error: {e}")
        for r, le, lh in cpu_lines:
            print(f"   round {r} embedded\n{le}\n   round {r} HTTP\n{lh}")
    emb = statistics.median(row["embedded"] for row in rows)
    http = statistics.median(row["http"] for row in rows)
    ratio = statistics.median(row["http"] / row["embedded"] for row in rows)
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"   median: embedded {emb:.1f} adds/s, HTTP {http:.1f} adds/s; HTTP/embedded {ratio:.2f} "
          f"(target >= {TARGET}: {verdict}); HTTP/ceiling {http / ceiling:.2f}; embedded/ceiling {emb / ceiling:.2f}")
    return {"embedded": emb, "http": http, "ratio": ratio, "rows": rows}


# -- profiling ----------------------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# A leaf frame sitting on one of these calls is a thread waiting, not working (py-spy
# cannot always tell: a blocking C call such as SimpleQueue.get looks busy to it).
_WAITING = re.compile(r"\.(get|select|poll|wait|acquire|recv|accept|join)\(|\bselect\(")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker == "/lib/python3." and "/" in tail else tail
    return path


def _parse_frame(frame: str) -> tuple[str, str, int]:
    m = _FRAME.match(frame)
    if not m:
        return frame, "", 0
    return m.group("func"), m.group("file"), int(m.group("line") or 0)


def _is_waiting(path: str, line: int) -> bool:
    return bool(line) and bool(_WAITING.search(linecache.getline(path, line)))


def summarize_profile(raw: Path, seconds: float, rate: int, top: int = 15) -> str:
    """Per thread: how much of the wall time it was working; for the busiest threads, the
    functions with the most working samples on top of the stack (self) and anywhere in
    it (inclusive). Samples of threads blocked on a queue/selector are counted apart."""
    busy: dict[str, int] = defaultdict(int)
    waiting: dict[str, int] = defaultdict(int)
    self_t: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    incl_t: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for text in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = text.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        parsed = [_parse_frame(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not parsed:
            continue
        func, path, line = parsed[-1]
        if _is_waiting(path, line):
            waiting[thread] += count
            continue
        busy[thread] += count
        names = [f"{fn} ({_short(p)})" for fn, p, _ in parsed]
        self_t[thread][names[-1]] += count
        for name in set(names):
            incl_t[thread][name] += count
    possible = seconds * rate
    out = [f"   threads (working = share of the {seconds:.1f}s wall time with a Python stack not blocked "
           "on a queue or selector; ONNX's own worker threads are native and not seen):"]
    for thread in sorted(set(busy) | set(waiting), key=lambda t: -busy.get(t, 0)):
        out.append(f"     working {busy.get(thread, 0) / possible:6.1%}   waiting-but-sampled "
                   f"{waiting.get(thread, 0) / possible:6.1%}   {thread}")
    for thread, n in sorted(busy.items(), key=lambda kv: -kv[1])[:2]:
        out.append(f"   {thread}: top functions by self samples (share of its working samples)")
        for name, c in sorted(self_t[thread].items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"     {c / n:6.1%}  {name}")
        out.append(f"   {thread}: top functions by inclusive samples")
        for name, c in sorted(incl_t[thread].items(), key=lambda kv: -kv[1])[:top]:
            if c < n:  # frames under every sample (thread bootstrap, run_forever) say nothing
                out.append(f"     {c / n:6.1%}  {name}")
    return "\n".join(out)


async def profile_adds(cfg: Config, server: Server, session: aiohttp.ClientSession, out_dir: Path,
                       quiet: Quiet) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("   py-spy is not installed (.venv/bin/pip install py-spy); skipping the profile")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = 200
    print(f"\n== profile: HTTP add rounds ({cfg.adds} adds, {ADD_CLIENTS} clients) under py-spy record "
          f"--rate {rate} attached to the server ==")
    path = out_dir / "server-adds.txt"
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(server.pid), "--rate", str(rate), "--nonblocking", "--threads", "--full-filenames",
         "--format", "raw", "-o", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    await asyncio.sleep(1.0)  # let py-spy attach
    if proc.poll() is not None:
        print(f"   py-spy failed: {proc.stderr.read().decode(errors='replace')[-500:] if proc.stderr else ''}")
        return
    await quiet.wait(cfg.quiet_wait)
    with CpuMeter([server.pid]) as cpu:
        result = await run_load(add_config(server.url, cfg, seed=500), session)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    print(f"   HTTP adds/s while profiled: {result.rate('add'):.1f}")
    print(cpu.line())
    if not path.exists():
        print("   py-spy wrote no output")
        return
    print(summarize_profile(path, cpu.wall, rate))
    print(f"   collapsed stacks kept in {path} (a flame graph: py-spy record -o prof.svg --pid PID)")


# -- d) search ------------------------------------------------------------------------------------------


def search_config(url: str, cfg: Config, scope: str, clients: int) -> LoadConfig:
    return LoadConfig(url=url, concurrency=clients, requests=cfg.searches, mix={"search": 1.0}, namespace="search",
                      users=USERS, seed=7, warmup=2, search_scope=scope, timeout=120.0)


async def embedded_searches(mem: Any, cfg: Config, scope: str, clients: int) -> tuple[list[float], float]:
    """The same queries as the HTTP run (same Workload seed; warm-up ones too), in the same order."""
    work = Workload(7, namespace="search", users=USERS, search_scope=scope)
    for _ in range(2):
        await mem.search(**work.search())
    bodies = iter([work.search() for _ in range(cfg.searches)])
    latencies: list[float] = []

    async def client() -> None:
        for body in bodies:
            began = time.perf_counter()
            await mem.search(**body)
            latencies.append((time.perf_counter() - began) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, len(latencies) / (time.perf_counter() - started)


async def bench_search(cfg: Config, server: Server, db: Path, session: aiohttp.ClientSession,
                       quiet: Quiet) -> dict[str, Any]:
    print(f"\n== d) search latency over {cfg.prefill:,} memories (namespace 'search', {USERS} users), limit 10, "
          f"hybrid; {cfg.searches} searches per row ==")
    with CpuMeter([server.pid]) as cpu:
        prefill = await run_load(LoadConfig(url=server.url, concurrency=1, requests=1, mix={"search": 1.0},
                                            namespace="search", users=USERS, seed=7, prefill=cfg.prefill,
                                            prefill_batch=100, warmup=0, timeout=300.0), session)
    print(f"   prefill through POST /v1/memories (batches of 100, 2 in flight): {prefill.prefilled} memories in "
          f"{prefill.prefill_seconds:.1f}s = {prefill.prefilled / (prefill.prefill_seconds or 1):.1f} memories/s")
    print(cpu.line())
    http: dict[tuple[str, int], LoadResult] = {}
    others: dict[tuple[str, int, str], float] = {}
    for scope in ("user", "namespace"):
        for clients in (1, SEARCH_CLIENTS):
            await quiet.wait(cfg.quiet_wait)
            with CpuMeter([server.pid]) as cpu:
                http[scope, clients] = await run_load(search_config(server.url, cfg, scope, clients), session)
            others[scope, clients, "http"] = cpu.others_share
            if http[scope, clients].errors:
                print(f"   HTTP search errors ({scope}, {clients}): {http[scope, clients].first_errors[:3]}")
    code, seconds = server.stop()
    print(f"   server stopped by SIGTERM in {seconds:.2f}s with exit status {code} "
          f"({'ok' if code == 0 else 'EXPECTED 0'})")

    embedded: dict[tuple[str, int], tuple[list[float], float]] = {}
    async with gm.open(db) as mem:
        began = time.perf_counter()
        await mem.wait_index()
        stats = await mem.stats()
        print(f"   embedded: opened the server's database, index ready in {time.perf_counter() - began:.2f}s; "
              f"namespace 'search' holds {stats.namespaces.get('search', 0):,} memories")
        for scope in ("user", "namespace"):
            for clients in (1, SEARCH_CLIENTS):
                await quiet.wait(cfg.quiet_wait)
                with CpuMeter() as cpu:
                    embedded[scope, clients] = await embedded_searches(mem, cfg, scope, clients)
                others[scope, clients, "embedded"] = cpu.others_share

    print(f"   {'scope':<10} {'clients':>7} | {'HTTP p50':>8} {'p99':>7} {'/s':>6} {'server took p50':>15} | "
          f"{'embedded p50':>12} {'p99':>7} {'/s':>6} | {'HTTP-emb p50':>12} | {'others HTTP/emb':>15}")
    for (scope, clients), result in http.items():
        s = result.ops["search"]
        lat, rate = embedded[scope, clients]
        h50, h99, e50, e99 = (percentile(s.latencies_ms, 50), percentile(s.latencies_ms, 99),
                              percentile(lat, 50), percentile(lat, 99))
        took = percentile(s.server_ms, 50)
        label = "one user" if scope == "user" else "namespace"
        print(f"   {label:<10} {clients:>7} | {h50:>6.1f}ms {h99:>5.1f}ms {result.rate('search'):>6.1f} "
              f"{took:>13.1f}ms | {e50:>10.1f}ms {e99:>5.1f}ms {rate:>6.1f} | {h50 - e50:>+10.1f}ms | "
              f"{others[scope, clients, 'http']:>7.0%}/{others[scope, clients, 'embedded']:<7.0%}")
    print("   (others = share of the machine used by other processes meanwhile; 'server took' = the handler's "
          "own took_ms, so HTTP p50 minus it is parsing, transport and the client)")
    return {"exit_code": code}


# -- main ------------------------------------------------------------------------------------------------


async def run(cfg: Config, profile: str, profile_dir: Path) -> int:
    began = time.perf_counter()
    quiet = Quiet(QUIET_BUDGET)
    await quiet.wait(cfg.quiet_wait)
    ceiling = bench_ceiling(cfg)
    code = 1
    with tempfile.TemporaryDirectory(prefix="gm-http-bench-") as directory:
        tmp = Path(directory)
        server = Server(tmp / "server.db", tmp / "server.log")
        try:
            ready = await server.start()
            print(f"\n== server: {' '.join(server.command())}\n   {server.url}: /v1/readyz 200 after {ready:.2f}s "
                  f"(pid {server.pid})")
            connector = aiohttp.TCPConnector(limit=ADD_CLIENTS + 8)
            async with aiohttp.ClientSession(connector=connector) as session:
                adds = await bench_adds(cfg, ceiling, tmp, server, session, quiet)
                if profile == "always" or (profile == "auto" and adds["ratio"] < TARGET):
                    await profile_adds(cfg, server, session, profile_dir, quiet)
                searched = await bench_search(cfg, server, tmp / "server.db", session, quiet)
            code = 0 if searched["exit_code"] == 0 else 1
            access = sum(1 for line in server.log_path.read_text(errors="replace").splitlines() if "gm.access" in line)
            print(f"\n   server log: {access} access-log lines; warnings/errors:")
            for line in log_problems([server], ignore=()):
                print(f"     {line}")
        finally:
            server.kill_if_running()
    print(f"\ntotal run time {time.perf_counter() - began:.0f}s")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run instead of the full one")
    parser.add_argument("--profile", choices=["auto", "always", "never"], default="auto",
                        help=f"py-spy the server's add path: auto = only if HTTP/embedded < {TARGET} (default)")
    parser.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "gm-http-profile",
                        help="where profiles are written (default: %(default)s)")
    parser.add_argument("--wait-quiet", type=float, default=15.0, metavar="SECONDS",
                        help="before each measured phase, wait up to this long for other processes to use "
                             "under 15%% of the machine (default 15, at most 90 in all; 0 = never wait)")
    args = parser.parse_args()
    cfg = dataclasses.replace(QUICK if args.quick else FULL, quiet_wait=args.wait_quiet)
    load1, load5, _ = os.getloadavg()
    print(f"greatmemory {gm.__version__}: HTTP vs embedded ({'quick' if args.quick else 'full'} run); "
          f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{load1:.2f}/{load5:.2f} at start, GM_EMBED_THREADS={os.environ.get('GM_EMBED_THREADS', 'unset')}")
    return asyncio.run(run(cfg, args.profile, args.profile_dir))


if __name__ == "__main__":
    sys.exit(main())
