"""Hand-run benchmark: the round-trip time of an MCP ``recall`` as a host sees it, over stdio
and over streamable HTTP, beside the same search on ``/v1`` (what MCP adds to it).

    .venv/bin/python bench/mcp_latency.py                 # 3 rounds of 100 calls a transport (~2 minutes)
    .venv/bin/python bench/mcp_latency.py --calls 50 --rounds 2 --json mcp.json

A small store (``--memories``, 200 by default, bench/workload.py's texts, 20 users) is filled
through the library, then copied, since a SQLite file has one server at a time: ``gmem mcp``
serves one copy over stdio, ``gmem serve`` (loopback, a port the OS picks) the other. The
MCP SDK's own client calls ``recall`` (one user's scope, limit 10) one call at a time:

- ``stdio``: ``Client(StdioServerParameters(gmem mcp --db ...))``, as a host starts it;
- ``http``: ``Client(streamable_http_client(.../mcp))`` in the SDK's default mode (the 2026
  per-request protocol, one POST a call);
- ``http-legacy``: the same with ``mode="legacy"`` (the 2025 ``initialize`` handshake, as
  hosts of today mostly speak it);
- ``v1``: ``POST /v1/memories/search`` with the same body, from aiohttp: the baseline.

Every transport first gets ``--warmup`` calls (the model is loaded, caches are warm); then the
rounds alternate between them, so a burst of other work on the machine hits all of them. Each
call's time runs from the call to its parsed result (the SDK client's validation of the result
against the tool's output schema included). Printed: p50, p99, mean and max per transport, each
round's p50 (their spread is the noise), and the load average. Everything lives in a temporary
directory removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

import gm
from figures import load_average, percentile, progress, rounded, table
from servers import Server
from workload import Workload, query_texts

USERS = 20
Call = Callable[[str, str], Awaitable[None]]  # (query, user) -> None, raising on a failed call


async def fill(db: Path, memories: int) -> None:
    workload = Workload(seed=1, namespace="default", users=USERS)
    async with gm.open(db) as mem:
        for start in range(0, memories, 100):
            await mem.add_many(workload.memories(min(100, memories - start)))


def recall_arguments(query: str, user: str) -> dict[str, Any]:
    return {"query": query, "user_id": user, "limit": 10}


@asynccontextmanager
async def mcp_caller(client: Client) -> AsyncIterator[Call]:
    async def call(query: str, user: str) -> None:
        result = await client.call_tool("recall", recall_arguments(query, user))
        if result.is_error:
            raise RuntimeError(f"recall failed: {result.content}")

    yield call


@asynccontextmanager
async def callers(stdio_db: Path, server: Server) -> AsyncIterator[dict[str, Call]]:
    async with AsyncExitStack() as stack:
        gmem = Path(sys.executable).with_name("gmem")
        stdio = StdioServerParameters(command=str(gmem), args=["mcp", "--db", str(stdio_db)],
                                      env={k: v for k, v in os.environ.items() if k != "GM_DB"})
        found: dict[str, Call] = {}
        found["stdio"] = await stack.enter_async_context(mcp_caller(
            await stack.enter_async_context(Client(stdio, read_timeout_seconds=60))))
        for name, mode in (("http", "auto"), ("http-legacy", "legacy")):
            client = Client(streamable_http_client(server.url + "/mcp"), mode=mode, read_timeout_seconds=60)
            found[name] = await stack.enter_async_context(mcp_caller(await stack.enter_async_context(client)))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)))

        async def v1(query: str, user: str) -> None:
            async with session.post(server.url + "/v1/memories/search", json=recall_arguments(query, user)) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"search answered {resp.status}")

        found["v1"] = v1
        yield found


async def timed(call: Call, queries: list[str], first: int) -> list[float]:
    times = []
    for i, query in enumerate(queries):
        started = time.perf_counter()
        await call(query, f"user-{(first + i) % USERS:03d}")
        times.append((time.perf_counter() - started) * 1000)
    return times


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gm-mcp-bench-"))
    server = Server(work / "served.db", work / "serve.log")
    try:
        progress(f"filling a store of {args.memories} memories")
        await fill(work / "served.db", args.memories)
        shutil.copy(work / "served.db", work / "stdio.db")
        await server.start()
        queries = query_texts(args.warmup + args.calls * args.rounds, seed=2)
        samples: dict[str, list[list[float]]] = {}
        async with callers(work / "stdio.db", server) as calls:
            for name, call in calls.items():
                progress(f"warming up {name}")
                await timed(call, queries[: args.warmup], 0)
                samples[name] = []
            for r in range(args.rounds):
                batch = queries[args.warmup + r * args.calls: args.warmup + (r + 1) * args.calls]
                for name, call in calls.items():
                    progress(f"round {r + 1}/{args.rounds}: {name}")
                    samples[name].append(await timed(call, batch, r * args.calls))
        code, _ = server.stop()
        if code != 0:
            raise RuntimeError(f"the server exited with status {code}; see {work / 'serve.log'}")
    finally:
        server.kill_if_running()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "memories": args.memories, "calls_per_round": args.calls, "rounds": args.rounds, "warmup": args.warmup,
        "gm_version": gm.__version__, "load_average": load_average(),
        "transports": {name: summary(rounds) for name, rounds in samples.items()},
    }


def summary(rounds: list[list[float]]) -> dict[str, Any]:
    every = [t for one in rounds for t in one]
    return {"p50_ms": rounded(percentile(every, 50), 2), "p99_ms": rounded(percentile(every, 99), 2),
            "mean_ms": rounded(sum(every) / len(every), 2), "max_ms": rounded(max(every), 2),
            "round_p50_ms": [rounded(percentile(one, 50), 2) for one in rounds]}


def report(result: dict[str, Any]) -> str:
    rows = [[name, f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}", f"{s['mean_ms']:.2f}", f"{s['max_ms']:.1f}",
             " / ".join(f"{p:.2f}" for p in s["round_p50_ms"])] for name, s in result["transports"].items()]
    head = (f"MCP recall round trip, {result['memories']} memories, {result['rounds']} rounds x "
            f"{result['calls_per_round']} calls after {result['warmup']} warm-up, load average "
            f"{result['load_average']} (at the end)")
    return head + "\n\n" + table(["transport", "p50 ms", "p99 ms", "mean ms", "max ms", "p50 per round"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", type=int, default=200, help="memories in the store (default 200)")
    parser.add_argument("--calls", type=int, default=100, help="calls a transport, per round (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating the transports (default 3)")
    parser.add_argument("--warmup", type=int, default=20, help="calls a transport before measuring (default 20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if not (1 <= args.memories <= 10_000 and 1 <= args.calls <= 5_000 and 1 <= args.rounds <= 20):
        parser.error("bounded: --memories 1-10000, --calls 1-5000, --rounds 1-20")
    result = asyncio.run(run(args))
    print(report(result))
    if args.json:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
