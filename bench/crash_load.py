"""The write load of bench/crash.py: closed loops of single and batch adds, PATCHes and DELETEs
against one server, every answer (or the lack of one) recorded in the ledger.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from crash_checks import CUT, Ledger, State, state_of
from workload import Workload

WEIGHTS = {"add": 4, "batch": 1, "update": 2, "delete": 2}
REQUEST_TIMEOUT = 30.0
REFUSED_PAUSE = 0.1  # a client's pause after a refusal while the server drains


@dataclass
class Request:
    op: str
    started: float
    ended: float | None = None
    outcome: str = ""  # ok, "<status> <code>", disconnected, connect refused, timeout


class Load:
    """``clients`` closed loops of writes against one server until ``stop`` is set."""

    def __init__(self, url: str, ledger: Ledger, work: Workload, batch_size: int, seed: str) -> None:
        self.url = url
        self.ledger = ledger
        self.work = work
        self.batch_size = batch_size
        self.seed = seed
        self.requests: list[Request] = []
        self.acked: Counter[str] = Counter()  # memories added, updated, deleted with a 2xx
        self.stop = asyncio.Event()
        self.signalled = False  # term mode: SIGTERM was sent; pause after refusals

    async def run(self, clients: int) -> None:
        await asyncio.gather(*(self._client(c) for c in range(clients)))

    async def _client(self, number: int) -> None:
        """One connection's closed loop. After SIGTERM the even clients go on (pausing after a
        refusal) until the server is gone, as clients that do not know yet; the odd ones stop
        after their request in flight and keep their connection open, idle, as a load balancer
        that saw readyz turn 503 keeps its pool."""
        rng = random.Random(f"{self.seed}:{number}")
        ops, weights = list(WEIGHTS), list(WEIGHTS.values())
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         trace_configs=[connection_counter()]) as session:
            while not self.stop.is_set():
                if self.signalled and number % 2:
                    await self.stop.wait()
                    break
                outcome = await self._one(session, rng.choices(ops, weights)[0], rng)
                if self.signalled and outcome != "ok":
                    await asyncio.sleep(REFUSED_PAUSE)

    def _memory(self, memory_id: str) -> dict[str, Any]:
        body = self.work.memory()
        body["id"] = memory_id
        body["text"] += f" (ref {memory_id})"  # the id is a word of the text: keyword probes find it
        return body

    async def _one(self, session: aiohttp.ClientSession, op: str, rng: random.Random) -> str:
        ledger = self.ledger
        target = ledger.take(rng) if op in ("update", "delete") else None
        if target is None and op in ("update", "delete"):
            op = "add"
        if op in ("add", "batch"):
            bodies = [self._memory(ledger.new_id()) for _ in range(1 if op == "add" else self.batch_size)]
            wanted: dict[str, State | None] = {
                b["id"]: state_of(b["text"], b["metadata"], b["user_id"]) for b in bodies}
            body = bodies[0] if op == "add" else {"memories": bodies}
            outcome = await self._send(session, op, "POST", "/v1/memories", body)
            if op == "batch" and outcome in CUT:
                ledger.cut_batches.append(list(wanted))
        elif op == "update":
            assert target is not None
            current = ledger.entries[target].acked
            assert current is not None
            text, _, user = current
            patch: dict[str, Any] = {"metadata": {"topic": "updated", "rev": rng.randint(1, 10**6)}}
            if rng.random() < 0.5:  # half re-embed a new text, half change the metadata only
                patch["text"] = self.work.memory()["text"] + f" (ref {target})"
            wanted = {target: state_of(patch.get("text", text), patch["metadata"], user)}
            outcome = await self._send(session, op, "PATCH", f"/v1/memories/{target}", patch)
        else:
            assert target is not None
            wanted = {target: None}
            outcome = await self._send(session, op, "DELETE", f"/v1/memories/{target}", None)
        for memory_id, state in wanted.items():
            ledger.record(memory_id, state, outcome)
        if outcome == "ok":
            self.acked[{"batch": "add"}.get(op, op)] += len(wanted)
        return outcome

    async def _send(self, session: aiohttp.ClientSession, op: str, method: str, path: str, body: Any) -> str:
        request = Request(op, time.perf_counter())
        self.requests.append(request)
        taken = {"connections": 0}
        try:
            async with session.request(method, self.url + path, json=body, trace_request_ctx=taken) as resp:
                raw = await resp.read()
                if 200 <= resp.status < 300:
                    request.outcome = "ok"
                else:
                    try:
                        code = json.loads(raw)["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "?"
                    request.outcome = f"{resp.status} {code}"
        except aiohttp.ClientConnectorError:
            request.outcome = "connect refused"
        except (aiohttp.ClientError, OSError):
            request.outcome = "disconnected"
        except TimeoutError:
            request.outcome = "timeout"
        if taken["connections"] > 1:  # sent again: the first one was cut off, and may have applied
            request.outcome = "disconnected"
        request.ended = time.perf_counter()
        return request.outcome


def connection_counter() -> aiohttp.TraceConfig:
    """Counts the connections each request takes: aiohttp sends a DELETE again on a new
    connection when a kept-alive one drops (RFC 9112 retry), hiding that the first was cut off."""

    async def taken(session: aiohttp.ClientSession, context: Any, params: Any) -> None:
        if context.trace_request_ctx is not None:
            context.trace_request_ctx["connections"] += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(taken)
    trace.on_connection_reuseconn.append(taken)
    return trace
