"""A bounded load generator for a RUNNING greatmemory server (loopback only).

    .venv/bin/python bench/load.py --duration 20 --mix add=1
    .venv/bin/python bench/load.py --requests 2000 --mix add=2,search=5,get=3 --prefill 1000 --users 50
    .venv/bin/python bench/load.py --requests 500 --mix search=1 --concurrency 8 --json

It is a closed loop: ``--concurrency`` clients each send a request, wait for its answer,
then send the next, until ``--duration`` seconds have passed or ``--requests`` requests
were sent (one of the two is required; ``--max-seconds`` also caps a --requests run, and
every request has a timeout). Only 127.0.0.0/8, ::1 and localhost are accepted as hosts.

Operations (``--mix`` weights, e.g. ``add=1,search=3,get=1``):

  add     POST /v1/memories            one memory-like text of 10-40 words
  batch   POST /v1/memories            ``--batch-size`` memories in one request
  search  POST /v1/memories/search     a question about the stored memories (one user's
                                       scope by default, ``--search-scope namespace``)
  get     GET  /v1/memories/{id}       an id from the prefill or an earlier add
  list    GET  /v1/memories            one user's newest ``--limit`` memories

Texts, users and queries are deterministic for a ``--seed``. Prints requests/s overall
and per operation, p50/p95/p99/max latency per operation in milliseconds, and the errors
(count, and the first few status codes and bodies); ``--json`` prints one JSON object.
Exit status: 0 if every measured request succeeded, 1 if some failed, 2 on bad usage.

Importable: ``await run_load(LoadConfig(...))`` returns a :class:`LoadResult`, and
``run_spread`` runs it against several servers at once. The texts, users and queries are
bench/workload.py's ``Workload``. Needs only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import random
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from figures import percentile, rounded
from workload import Workload

OPS = ("add", "batch", "search", "get", "list")
DEFAULT_URL = "http://127.0.0.1:8420"
MAX_ERRORS_KEPT = 5
ABORT_AFTER = 200  # measured requests that all failed before the run gives up

# -- configuration and results ----------------------------------------------------------------


class UsageError(ValueError):
    pass


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, weight = part.partition("=")
        name = name.strip()
        if name not in OPS:
            raise UsageError(f"unknown operation {name!r} in --mix; choose from {', '.join(OPS)}")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise UsageError(f"weight of {name!r} in --mix is not a number: {weight!r}") from None
        if value < 0 or not math.isfinite(value):
            raise UsageError(f"weight of {name!r} in --mix must be >= 0")
        mix[name] = value
    if sum(mix.values()) <= 0:
        raise UsageError("--mix needs at least one operation with a weight above 0, e.g. add=1")
    return {k: v for k, v in mix.items() if v > 0}


def check_loopback_url(url: str) -> str:
    """The URL without a trailing slash, if its host is a loopback address; else UsageError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must look like http://127.0.0.1:8420, not {url!r}")
    host = parts.hostname
    if host.lower() == "localhost":
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            addresses = set()
    else:
        addresses = {host}
    try:
        loopback = bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"refusing to load {host!r}: only loopback hosts (127.0.0.1, ::1, localhost) are allowed")
    return url.rstrip("/")


@dataclass
class LoadConfig:
    url: str = DEFAULT_URL
    api_key: str | None = None
    concurrency: int = 32
    duration: float | None = None  # seconds of measured load, or
    requests: int | None = None  # measured requests (one of the two is required)
    max_seconds: float = 600.0  # hard cap on the measured phase, whichever bound is given
    mix: dict[str, float] = field(default_factory=lambda: {"add": 1.0})
    namespace: str = "loadtest"
    users: int = 100
    seed: int = 0
    prefill: int = 0
    prefill_batch: int = 100
    batch_size: int = 50
    warmup: int = 2  # unmeasured requests per operation of the mix, sent one by one first
    search_scope: str = "user"
    search_mode: str | None = None
    limit: int = 10
    timeout: float = 60.0  # per request

    def check(self) -> None:
        self.url = check_loopback_url(self.url)
        if (self.duration is None) == (self.requests is None):
            raise UsageError("give exactly one bound: --duration SECONDS or --requests COUNT")
        if self.duration is not None and not 0 < self.duration <= 3600:
            raise UsageError("--duration must be in (0, 3600] seconds")
        if self.requests is not None and not 0 < self.requests <= 10_000_000:
            raise UsageError("--requests must be in [1, 10,000,000]")
        if not 0 < self.max_seconds <= 3600:
            raise UsageError("--max-seconds must be in (0, 3600]")
        if not 1 <= self.concurrency <= 1024:
            raise UsageError("--concurrency must be in [1, 1024]")
        if not 0 <= self.prefill <= 1_000_000:
            raise UsageError("--prefill must be in [0, 1,000,000]")
        if not 1 <= self.prefill_batch <= 1000 or not 1 <= self.batch_size <= 1000:
            raise UsageError("batch sizes must be in [1, 1000] (the server's batch limit)")
        if not 0 < self.timeout <= 600:
            raise UsageError("--timeout must be in (0, 600] seconds")
        if self.search_scope not in ("user", "namespace"):
            raise UsageError("--search-scope must be user or namespace")
        if not self.mix or any(op not in OPS for op in self.mix):
            raise UsageError(f"the mix must name operations among {', '.join(OPS)}")
        if ("get" in self.mix) and self.prefill == 0:
            raise UsageError("get needs ids to fetch: add --prefill N")


@dataclass
class OpStats:
    latencies_ms: list[float] = field(default_factory=list)  # successful requests
    errors: int = 0
    server_ms: list[float] = field(default_factory=list)  # search: the server's own took_ms

    @property
    def count(self) -> int:
        return len(self.latencies_ms) + self.errors


@dataclass
class LoadResult:
    config: LoadConfig
    elapsed: float  # seconds from the first measured request to the last answer
    ops: dict[str, OpStats]
    first_errors: list[dict[str, Any]]
    prefill_seconds: float | None = None
    prefilled: int = 0
    client_cpu_seconds: float = 0.0
    stopped_by: str = ""

    @property
    def total(self) -> int:
        return sum(s.count for s in self.ops.values())

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.ops.values())

    def rate(self, op: str | None = None) -> float:
        count = self.total if op is None else self.ops[op].count
        return count / self.elapsed if self.elapsed > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        cfg = self.config
        ops: dict[str, Any] = {}
        for name, s in self.ops.items():
            lat = s.latencies_ms
            ops[name] = {
                "requests": s.count, "ok": len(lat), "errors": s.errors, "per_second": round(self.rate(name), 2),
                "p50_ms": rounded(percentile(lat, 50), 3), "p95_ms": rounded(percentile(lat, 95), 3),
                "p99_ms": rounded(percentile(lat, 99), 3), "max_ms": rounded(max(lat) if lat else float("nan"), 3),
                "mean_ms": rounded(sum(lat) / len(lat) if lat else float("nan"), 3),
            }
            if s.server_ms:
                ops[name]["server_took_p50_ms"] = rounded(percentile(s.server_ms, 50), 3)
                ops[name]["server_took_p99_ms"] = rounded(percentile(s.server_ms, 99), 3)
            if name == "batch":
                ops[name]["memories_per_second"] = round(len(lat) * cfg.batch_size / self.elapsed, 2)
        return {
            "url": cfg.url, "concurrency": cfg.concurrency, "mix": cfg.mix, "namespace": cfg.namespace,
            "users": cfg.users, "seed": cfg.seed, "bound": {"duration": cfg.duration, "requests": cfg.requests},
            "stopped_by": self.stopped_by, "elapsed_s": round(self.elapsed, 3), "requests": self.total,
            "requests_per_second": round(self.rate(), 2), "errors": self.errors, "first_errors": self.first_errors,
            "ops": ops, "prefilled": self.prefilled,
            "prefill_s": round(self.prefill_seconds, 3) if self.prefill_seconds is not None else None,
            "client_cpu_s": round(self.client_cpu_seconds, 3),
        }

    def report(self) -> str:
        d = self.to_dict()
        cfg = self.config
        mix = ",".join(f"{k}={v:g}" for k, v in cfg.mix.items())
        lines = []
        if self.prefilled:
            lines.append(f"prefill: {self.prefilled} memories in {self.prefill_seconds:.1f}s "
                         f"({self.prefilled / max(self.prefill_seconds or 0, 1e-9):.1f}/s, "
                         f"batches of {cfg.prefill_batch})")
        lines.append(f"{self.total} requests in {self.elapsed:.2f}s = {self.rate():.1f} req/s  "
                     f"(concurrency {cfg.concurrency}, mix {mix}, stopped by {self.stopped_by}; "
                     f"load generator CPU {self.client_cpu_seconds:.1f}s)")
        lines.append(f"{'op':<7} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
                     f"{'p99 ms':>8} {'max ms':>8}")
        for name, o in d["ops"].items():
            cells = " ".join(f"{o[k]:>8.1f}" if o[k] is not None else f"{'-':>8}"
                             for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms"))
            lines.append(f"{name:<7} {o['requests']:>8} {o['errors']:>6} {o['per_second']:>8.1f} {cells}")
        for name, o in d["ops"].items():
            if "server_took_p50_ms" in o:
                lines.append(f"{name}: server-reported took_ms p50 {o['server_took_p50_ms']:.1f}, "
                             f"p99 {o['server_took_p99_ms']:.1f}")
            if "memories_per_second" in o:
                lines.append(f"{name}: {o['memories_per_second']:.1f} memories/s")
        lines.append(f"errors: {self.errors}")
        for e in self.first_errors:
            lines.append(f"  {e['op']}: status {e['status']}: {e['body']}")
        return "\n".join(lines)


# -- the generator ----------------------------------------------------------------------------


class _Run:
    def __init__(self, cfg: LoadConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.work = Workload(cfg.seed, namespace=cfg.namespace, users=cfg.users, search_scope=cfg.search_scope,
                             search_mode=cfg.search_mode, limit=cfg.limit, batch_size=cfg.batch_size)
        self.ops = {op: OpStats() for op in cfg.mix}
        self.first_errors: list[dict[str, Any]] = []
        self.ids: list[str] = []
        names = list(cfg.mix)
        self._names = names
        self._weights = [cfg.mix[n] for n in names]
        self._op_rng = random.Random(f"{cfg.seed}:ops")
        self._issued = 0
        self.measuring = False
        self.aborted = False

    def _record_error(self, op: str, status: int, body: str) -> None:
        if self.measuring:
            self.ops[op].errors += 1
        if len(self.first_errors) < MAX_ERRORS_KEPT:
            self.first_errors.append({"op": op, "status": status, "body": body[:300],
                                      "phase": "measured" if self.measuring else "setup"})

    async def _send(self, op: str, method: str, path: str, *, body: Any = None,
                    params: dict[str, str] | None = None, ok: tuple[int, ...] = (200, 201)) -> Any:
        url = self.cfg.url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        started = time.perf_counter()
        try:
            async with self.session.request(method, url, data=data, params=params, headers=headers) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._record_error(op, 0, f"{type(exc).__name__}: {exc}")
            return None
        elapsed_ms = (time.perf_counter() - started) * 1000
        if status not in ok:
            self._record_error(op, status, raw.decode("utf-8", "replace"))
            return None
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            self._record_error(op, status, "unparsable body: " + raw[:200].decode("utf-8", "replace"))
            return None
        if self.measuring:
            self.ops[op].latencies_ms.append(elapsed_ms)
        return parsed

    async def one(self, op: str) -> None:
        if op == "add":
            out = await self._send(op, "POST", "/v1/memories", body=self.work.memory())
            if out is not None:
                self.ids.append(out["id"])
        elif op == "batch":
            body = {"memories": self.work.memories(self.cfg.batch_size)}
            out = await self._send(op, "POST", "/v1/memories", body=body)
            if out is not None:
                self.ids.extend(m["id"] for m in out["memories"])
        elif op == "search":
            out = await self._send(op, "POST", "/v1/memories/search", body=self.work.search())
            if out is not None and self.measuring and "took_ms" in out:
                self.ops[op].server_ms.append(float(out["took_ms"]))
        elif op == "get":
            await self._send(op, "GET", f"/v1/memories/{self.work.pick(self.ids)}")
        elif op == "list":
            await self._send(op, "GET", "/v1/memories", params=self.work.list_query())
        else:  # pragma: no cover - parse_mix refuses these
            raise ValueError(op)

    async def prefill(self) -> float:
        """Add ``cfg.prefill`` memories in batch POSTs, two in flight (unmeasured)."""
        started = time.perf_counter()
        sizes = [min(self.cfg.prefill_batch, self.cfg.prefill - i) for i in range(0, self.cfg.prefill,
                                                                                  self.cfg.prefill_batch)]
        pending = iter(sizes)

        async def loader() -> None:
            for size in pending:
                out = await self._send("prefill", "POST", "/v1/memories", body={"memories": self.work.memories(size)})
                if out is None:
                    raise RuntimeError(f"prefill failed: {self.first_errors[-1] if self.first_errors else '?'}")
                self.ids.extend(m["id"] for m in out["memories"])

        await asyncio.gather(*(loader() for _ in range(2)))
        return time.perf_counter() - started

    def _next_ticket(self, deadline: float) -> str | None:
        cfg = self.cfg
        if cfg.requests is not None and self._issued >= cfg.requests:
            return None
        if self._issued >= ABORT_AFTER and not any(s.latencies_ms for s in self.ops.values()):
            self.aborted = True  # every answer so far was an error: stop hammering
            return None
        if time.perf_counter() >= deadline:
            return None
        self._issued += 1
        return self._op_rng.choices(self._names, self._weights)[0]

    async def measure(self) -> tuple[float, str]:
        cfg = self.cfg
        self.measuring = True
        started = time.perf_counter()
        limit = cfg.duration if cfg.duration is not None else cfg.max_seconds
        deadline = started + min(limit, cfg.max_seconds)

        async def worker() -> None:
            while (op := self._next_ticket(deadline)) is not None:
                await self.one(op)

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elapsed = time.perf_counter() - started
        self.measuring = False
        if self.aborted:
            stopped = f"abort: the first {ABORT_AFTER} requests all failed"
        elif cfg.duration is not None:
            stopped = "duration"
        else:
            stopped = "requests" if self._issued >= (cfg.requests or 0) else "max-seconds"
        return elapsed, stopped


class NotReady(RuntimeError):
    pass


async def check_ready(cfg: LoadConfig, session: aiohttp.ClientSession) -> None:
    """GET /v1/readyz once: a server that is down or not ready is reported, not loaded."""
    try:
        async with session.get(cfg.url + "/v1/readyz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = (await resp.read()).decode("utf-8", "replace")
            if resp.status != 200:
                raise NotReady(f"{cfg.url}/v1/readyz answered {resp.status}: {body[:200]}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise NotReady(f"no server answering at {cfg.url}: {type(exc).__name__}: {exc}") from None


def client_session(cfg: LoadConfig) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    connector = aiohttp.TCPConnector(limit=cfg.concurrency + 2, limit_per_host=cfg.concurrency + 2)
    return aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=cfg.timeout)
    )


async def run_load(cfg: LoadConfig, session: aiohttp.ClientSession | None = None) -> LoadResult:
    """Prefill, warm up, then measure; the server must already be ready."""
    cfg.check()
    own = session is None
    session = session or client_session(cfg)
    try:
        await check_ready(cfg, session)
        run = _Run(cfg, session)
        cpu0 = time.process_time()
        prefill_seconds = await run.prefill() if cfg.prefill else None
        prefilled = len(run.ids)
        for op in cfg.mix:
            for _ in range(cfg.warmup):
                await run.one(op)
        elapsed, stopped = await run.measure()
        cpu = time.process_time() - cpu0
    finally:
        if own:
            await session.close()
    return LoadResult(cfg, elapsed, run.ops, run.first_errors, prefill_seconds, prefilled, cpu, stopped)


def spread(total: int, parts: int) -> list[int]:
    """``total`` (clients, memories) dealt round-robin to ``parts`` servers."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_spread(urls: list[str], clients: int, session: aiohttp.ClientSession,
                     make: Callable[[str, int, int], LoadConfig]) -> list[LoadResult]:
    """The generator against every server at once, ``clients`` dealt round-robin:
    ``make(url, share, i)`` is the i-th server's configuration."""
    shares = spread(clients, len(urls))
    return list(await asyncio.gather(*(run_load(make(url, share, i), session)
                                       for i, (url, share) in enumerate(zip(urls, shares, strict=True)))))


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[LoadConfig, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: bench/load.py --duration 20 --mix add=1,search=3 --prefill 500")
    p.add_argument("--url", default=DEFAULT_URL, help=f"server base URL, loopback only (default {DEFAULT_URL})")
    p.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    bound = p.add_mutually_exclusive_group(required=True)
    bound.add_argument("--duration", type=float, help="seconds of measured load")
    bound.add_argument("--requests", type=int, help="number of measured requests")
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard cap on the measured phase (600)")
    p.add_argument("--mix", default="add=1", help="operation weights, e.g. add=1,search=3,get=1 "
                   f"(operations: {', '.join(OPS)}; default add=1)")
    p.add_argument("--namespace", default="loadtest", help="namespace to write and search (default loadtest)")
    p.add_argument("--users", type=int, default=100, help="distinct user_ids (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of texts, users, queries and the op sequence")
    p.add_argument("--prefill", type=int, default=0, help="memories to add in batches before measuring")
    p.add_argument("--prefill-batch", type=int, default=100, help="memories per prefill request (100)")
    p.add_argument("--batch-size", type=int, default=50, help="memories per request of the batch op (50)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per operation first (2)")
    p.add_argument("--search-scope", choices=["user", "namespace"], default="user",
                   help="search one random user's memories (default) or the whole namespace")
    p.add_argument("--search-mode", choices=["hybrid", "vector", "keyword"], help="search mode (server default)")
    p.add_argument("--limit", type=int, default=10, help="search/list limit (10)")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (60)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    try:
        mix = parse_mix(args.mix)
    except UsageError as exc:
        p.error(str(exc))
    cfg = LoadConfig(
        url=args.url, api_key=args.api_key, concurrency=args.concurrency, duration=args.duration,
        requests=args.requests, max_seconds=args.max_seconds, mix=mix, namespace=args.namespace, users=args.users,
        seed=args.seed, prefill=args.prefill, prefill_batch=args.prefill_batch, batch_size=args.batch_size,
        warmup=args.warmup, search_scope=args.search_scope, search_mode=args.search_mode, limit=args.limit,
        timeout=args.timeout,
    )
    try:
        cfg.check()
    except UsageError as exc:
        p.error(str(exc))
    return cfg, args.json


def main(argv: list[str] | None = None) -> int:
    cfg, as_json = parse_args(argv)
    try:
        result = asyncio.run(run_load(cfg))
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:
        print(f"load: cannot run against {cfg.url}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.report())
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
