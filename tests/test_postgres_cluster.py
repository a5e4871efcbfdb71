"""Several `gmem serve` processes on one Postgres database: each instance's searches follow
the others' writes, a rolling upgrade fails no request, and database faults fail fast and heal.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest

from gm.storage.postgres_migrations import LATEST, MIGRATION_LOCK
from tests.http_server import free_port, launch_server, spawn_server

VISIBLE_WITHIN = 1.0  # seconds: the change feed's promise (NOTIFY, and a poll every second)
FACTS = [
    "Prefers a window seat on long flights.",
    "Allergic to peanuts and tree nuts.",
    "Her daughter plays the cello in the school orchestra.",
    "Runs a half marathon every October in Lisbon.",
    "Drinks oat milk flat whites, never sugar.",
    "Keeps a sourdough starter called Bubbles in the fridge.",
    "Is learning Japanese with a tutor on Thursdays.",
    "Owns a grey Volvo estate from 2014.",
    "Works night shifts as a paramedic.",
    "Grows tomatoes and basil on the balcony.",
    "Collects first editions of Agatha Christie novels.",
    "The dog, a beagle named Pepper, is afraid of thunder.",
    "Banks with a small credit union in Leeds.",
    "Wants the quarterly report as a PDF, not slides.",
    "Moved from Toronto to Oslo last spring.",
    "Plays five-a-side football on Sunday mornings.",
    "Cannot eat shellfish since a reaction in 2019.",
    "Her passport expires in March next year.",
    "Builds mechanical keyboards as a hobby.",
    "Takes the 7:40 train to the office on Mondays.",
]


# -- parts the tests share -------------------------------------------------------------


@dataclass
class Reply:
    """One HTTP exchange as the client saw it; status 0 means no answer came."""

    kind: str
    instance: str
    status: int
    body: Any
    started: float
    seconds: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def call(
    session: aiohttp.ClientSession,
    method: str,
    instance: str,
    path: str,
    body: Any = None,
    *,
    kind: str = "",
    timeout: float = 10.0,
) -> Reply:
    started = time.monotonic()
    status, parsed = 0, None
    try:
        async with session.request(
            method, instance + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            raw = await response.read()
            status = response.status
            if response.content_type == "application/json":
                parsed = orjson.loads(raw)
            elif raw:
                parsed = raw.decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as exc:
        parsed = repr(exc)
    return Reply(kind or f"{method} {path}", instance, status, parsed, started, time.monotonic() - started)


async def found_ids(session: aiohttp.ClientSession, instance: str, query: str) -> set[str]:
    """Ids a vector search on ``instance`` returns: vector mode answers from the instance's
    own in-process index, which only the change feed fills with other instances' writes."""
    reply = await call(session, "POST", instance, "/v1/memories/search",
                       {"query": query, "mode": "vector", "limit": 5})
    assert reply.status == 200, reply
    return {hit["memory"]["id"] for hit in reply.body["hits"]}


async def seconds_until(
    session: aiohttp.ClientSession, instance: str, query: str, memory_id: str, *, present: bool, since: float
) -> float:
    """Seconds from ``since`` until ``instance``'s search finds (or stops finding) the memory;
    infinity if that has not happened after 5 s."""
    while time.monotonic() - since < 5:
        if (memory_id in await found_ids(session, instance, query)) == present:
            return time.monotonic() - since
        await asyncio.sleep(0.01)
    return float("inf")


async def readyz(session: aiohttp.ClientSession, instance: str) -> Reply:
    return await call(session, "GET", instance, "/v1/readyz", timeout=3)


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.02)


async def stored_ids(pg_url: str) -> set[str]:
    conn = await asyncpg.connect(pg_url)
    try:
        return {row[0] for row in await conn.fetch("SELECT id FROM memories")}
    finally:
        await conn.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Fleet:
    """The `gmem serve` processes a test started, each logging to its own file; whatever is
    still running when the test ends is stopped."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    async def spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True
    ) -> tuple[subprocess.Popen[bytes], str]:
        start = spawn_server if wait_ready else launch_server
        process, url = await start(self.log_path(name), *args, env=env)
        self.processes[name] = process
        return process, url

    def log_path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text()

    async def stop(self, name: str, timeout: float = 30) -> int:
        """SIGTERM, then the exit status once the server has drained."""
        process = self.processes[name]
        process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(process.wait, timeout)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def fleet(pg_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """Depends on ``pg_url`` so the servers stop before their database is dropped."""
    servers = Fleet(tmp_path)
    yield servers
    servers.stop_all()


class Balancer:
    """Routes like a load balancer: round robin over the registered instances whose last
    readyz (checked every 0.1 s) was 200."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.registered: list[str] = []
        self.healthy: set[str] = set()
        self._turn = itertools.count()
        self._checker: asyncio.Task[None] | None = None

    def register(self, instance: str) -> None:
        self.registered.append(instance)

    def deregister(self, instance: str) -> None:
        self.registered.remove(instance)

    def pick(self) -> str | None:
        routable = [i for i in self.registered if i in self.healthy]
        return routable[next(self._turn) % len(routable)] if routable else None

    async def check(self) -> None:
        instances = list(self.registered)
        replies = await asyncio.gather(*(readyz(self.session, i) for i in instances))
        for instance, reply in zip(instances, replies, strict=True):
            (self.healthy.add if reply.status == 200 else self.healthy.discard)(instance)

    async def _check_forever(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(0.1)

    async def start(self) -> None:
        await self.check()
        self._checker = asyncio.create_task(self._check_forever())

    async def stop(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)


class Load:
    """Clients that each add a memory (with a client id) and then search, as fast as the
    answers come, sending each request where ``route`` says."""

    def __init__(self, session: aiohttp.ClientSession, route: Callable[[], str | None], workers: int = 4) -> None:
        self.session = session
        self.route = route
        self.workers = workers
        self.replies: list[Reply] = []
        self.acked: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(n)) for n in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _send(self, kind: str, path: str, body: dict[str, Any]) -> Reply | None:
        instance = self.route()
        if instance is None:  # nowhere to route: a balancer would queue, we wait
            await asyncio.sleep(0.01)
            return None
        reply = await call(self.session, "POST", instance, path, body, kind=kind)
        self.replies.append(reply)
        return reply

    async def _worker(self, n: int) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            memory_id = f"load-{n}-{i}"
            text = f"worker {n} note {i}: {FACTS[i % len(FACTS)]}"
            reply = await self._send("add", "/v1/memories", {"text": text, "id": memory_id, "user_id": f"u{n}"})
            if reply is not None and reply.ok:
                self.acked.append(memory_id)
            query = FACTS[(i * 7) % len(FACTS)]
            await self._send("search", "/v1/memories/search", {"query": query, "user_id": f"u{n}"})

    def succeeded(self, instance: str | None = None, after: float = 0.0) -> int:
        return sum(1 for r in self.replies if r.ok and r.started >= after and instance in (None, r.instance))


class TcpProxy:
    """Forwards connections on a local port to Postgres: a database that comes up late."""

    def __init__(self, port: int, target_host: str, target_port: int) -> None:
        self.port = port
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def _forward(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            reader, writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        for pipe in (self._pipe(client_reader, writer), self._pipe(reader, client_writer)):
            task = asyncio.create_task(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


# -- 1. several instances ---------------------------------------------------------------


async def test_each_instance_searches_the_others_writes_within_a_second(pg_url: str, fleet: Fleet) -> None:
    started = await asyncio.gather(*(fleet.spawn(f"node-{n}", "--database-url", pg_url) for n in range(3)))
    nodes = [url for _, url in started]
    async with aiohttp.ClientSession() as session:
        for node in nodes:  # load each model before timing anything
            assert await found_ids(session, node, "warming up") == set()

        appeared: list[float] = []
        for i, text in enumerate(FACTS):
            writer = nodes[i % 3]
            reply = await call(session, "POST", writer, "/v1/memories", {"text": text, "id": f"fact-{i}"})
            acked = time.monotonic()
            assert reply.status == 201, reply
            assert f"fact-{i}" in await found_ids(session, writer, text), "the writer's own search must see it"
            appeared += await asyncio.gather(*(
                seconds_until(session, node, text, f"fact-{i}", present=True, since=acked)
                for node in nodes if node != writer
            ))

        vanished: list[float] = []
        deleted = range(0, len(FACTS), 4)
        for i in deleted:
            reply = await call(session, "DELETE", nodes[(i + 1) % 3], f"/v1/memories/fact-{i}")
            acked = time.monotonic()
            assert reply.status == 204, reply
            vanished += await asyncio.gather(*(
                seconds_until(session, node, FACTS[i], f"fact-{i}", present=False, since=acked) for node in nodes
            ))

        stats = [await call(session, "GET", node, "/v1/stats") for node in nodes]

    print(f"\nvisible on the other instances after an add ({len(appeared)} samples): "
          f"p50 {ms(statistics.median(appeared))}, max {ms(max(appeared))}")
    print(f"gone from every instance after a delete ({len(vanished)} samples): "
          f"p50 {ms(statistics.median(vanished))}, max {ms(max(vanished))}")
    assert max(appeared) < VISIBLE_WITHIN, appeared
    assert max(vanished) < VISIBLE_WITHIN, vanished
    left = len(FACTS) - len(deleted)
    for reply in stats:
        assert reply.status == 200, reply
        assert (reply.body["memories"], reply.body["namespaces"]) == (left, {"default": left}), reply.body
        assert reply.body["backend"] == "postgres"


# -- 2. rolling upgrade -----------------------------------------------------------------


async def schema_rows(pg_url: str) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT version, compatible_from FROM gm_schema ORDER BY version")
        return [(row[0], row[1]) for row in rows]
    finally:
        await conn.close()


async def test_rolling_upgrade_fails_no_request_and_loses_no_write(pg_url: str, fleet: Fleet) -> None:
    old_env = {"GM_TEST_SCHEMA_CAP": "1", "GM_DRAIN_SECONDS": "20"}
    (_, old_a), (_, old_b) = await asyncio.gather(
        fleet.spawn("old-a", "--database-url", pg_url, env=old_env),
        fleet.spawn("old-b", "--database-url", pg_url, env=old_env),
    )
    assert await schema_rows(pg_url) == [(1, 1)]
    async with aiohttp.ClientSession() as session:
        balancer = Balancer(session)
        balancer.register(old_a)
        balancer.register(old_b)
        await balancer.start()
        load = Load(session, balancer.pick)
        load.start()
        try:
            await until(lambda: len(load.acked) >= 20, 30, "20 adds on the old instances")

            # The new release starts while another instance holds the migration lock (we hold
            # it here, so the `migrating` phase lasts long enough to be seen), then migrates.
            lock = await asyncpg.connect(pg_url)
            try:
                await lock.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
                _, new = await fleet.spawn("new", "--database-url", pg_url, wait_ready=False)
                phases: list[str] = []
                release_at: float | None = None  # half a second after `migrating` was first seen
                deadline = time.monotonic() + 30
                while True:
                    reply = await readyz(session, new)
                    status = reply.body["status"] if isinstance(reply.body, dict) else f"no answer: {reply.body}"
                    if not phases or phases[-1] != status:
                        phases.append(status)
                    if reply.status == 200:
                        break
                    assert reply.status == 503 and status in ("starting", "migrating"), reply
                    if status == "migrating" and release_at is None:
                        release_at = time.monotonic() + 0.5
                    if release_at is not None and time.monotonic() > release_at:
                        await lock.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
                        release_at = float("inf")
                    assert time.monotonic() < deadline, (phases, fleet.log("new"))
                    await asyncio.sleep(0.01)
            finally:
                await lock.close()
            new_ready = time.monotonic()
            print(f"\nnew instance's readyz went {' -> '.join(phases)}")
            assert phases[0] in ("starting", "migrating") and "migrating" in phases and phases[-1] == "ready"
            assert reply.body["schema_version"] == LATEST
            steps = [(version, 1) for version in range(1, LATEST + 1)]
            assert await schema_rows(pg_url) == steps, "additive steps: v1 code may still run"

            balancer.register(new)
            await until(lambda: load.succeeded(new) >= 10, 30, "10 answers from the new instance")
            # The old release keeps serving on the newer schema, and the instances follow
            # each other's writes across releases.
            await until(lambda: all(load.succeeded(o, after=new_ready) >= 10 for o in (old_a, old_b)),
                        30, "10 answers from each old instance after the migration")
            for writer, readers in ((new, (old_a, old_b)), (old_a, (new,))):
                text = f"written on {writer} during the upgrade"
                reply = await call(session, "POST", writer, "/v1/memories", {"text": text})
                acked = time.monotonic()
                assert reply.status == 201, reply
                for reader in readers:
                    delay = await seconds_until(session, reader, text, reply.body["id"], present=True, since=acked)
                    assert delay < VISIBLE_WITHIN, (writer, reader, delay)

            # Retire the old instances one at a time: stop routing to it, give the balancer
            # a moment, SIGTERM; a long batch sent just before is still running and must drain.
            exits: dict[str, int] = {}
            stragglers: list[Reply] = []
            for name, old in (("old-a", old_a), ("old-b", old_b)):
                batch = [{"text": f"{name} straggler {i}: {FACTS[i % len(FACTS)]}", "id": f"{name}-straggler-{i}"}
                         for i in range(128)]
                straggler = asyncio.create_task(
                    call(session, "POST", old, "/v1/memories", {"memories": batch}, kind="straggler", timeout=30)
                )
                await asyncio.sleep(0.05)
                balancer.deregister(old)
                await asyncio.sleep(0.25)
                in_flight = not straggler.done()
                exits[name] = await fleet.stop(name)
                assert in_flight, "the straggler batch finished before SIGTERM: make it longer to test draining"
                stragglers.append(await straggler)
                print(f"{name}: SIGTERM with a 128-memory batch in flight; exit {exits[name]}, "
                      f"the batch answered {stragglers[-1].status} after {stragglers[-1].seconds:.2f}s")
            tail = time.monotonic()
            await until(lambda: load.succeeded(new, after=tail) >= 10, 30, "10 answers from the new one alone")
        finally:
            await load.stop()
            await balancer.stop()

        acked = load.acked + [m["id"] for r in stragglers if r.ok for m in r.body["memories"]]
        semaphore = asyncio.Semaphore(16)

        async def get(memory_id: str) -> Reply:
            async with semaphore:
                return await call(session, "GET", new, f"/v1/memories/{memory_id}")

        missing = [r for r in await asyncio.gather(*(get(i) for i in acked)) if r.status != 200]

    failed = [r for r in load.replies + stragglers if not r.ok]
    by_instance = {name: sum(1 for r in load.replies if r.instance == url)
                   for name, url in (("old-a", old_a), ("old-b", old_b), ("new", new))}
    print(f"load: {len(load.replies)} requests ({by_instance}), {len(failed)} failed, "
          f"{len(acked)} acknowledged adds, {len(missing)} missing afterwards")
    assert failed == [], failed[:5]
    assert all(r.status == 201 for r in stragglers), stragglers
    assert missing == [], missing[:5]
    assert exits == {"old-a": 0, "old-b": 0}, (fleet.log("old-a"), fleet.log("old-b"))
    for name in ("old-a", "old-b"):
        assert "stopped; every acknowledged write is committed" in fleet.log(name)
    assert await schema_rows(pg_url) == [(version, 1) for version in range(1, LATEST + 1)]


# -- 3. faults --------------------------------------------------------------------------


async def test_unreachable_postgres_is_unavailable_until_it_answers(pg_url: str, fleet: Fleet) -> None:
    real = urlsplit(pg_url)
    port = free_port()  # nothing listens here until the proxy starts
    url = real._replace(netloc=f"{real.username}@127.0.0.1:{port}").geturl()
    process, server = await fleet.spawn("late-db", "--database-url", url, wait_ready=False)
    proxy = TcpProxy(port, real.hostname or "127.0.0.1", real.port or 5432)
    async with aiohttp.ClientSession() as session:
        try:
            deadline = time.monotonic() + 10
            while (reply := await readyz(session, server)).body["status"] != "unavailable":
                assert reply.status == 503 and reply.body["status"] == "starting", reply
                assert time.monotonic() < deadline, fleet.log("late-db")
                await asyncio.sleep(0.05)
            assert reply.status == 503
            assert str(port) in reply.body["reason"], reply.body  # says which database it cannot reach
            refused = await call(session, "POST", server, "/v1/memories", {"text": "too early"})
            assert refused.status == 503 and refused.body["error"]["code"] == "not_ready", refused

            await asyncio.sleep(2)  # it keeps running and retrying
            assert process.poll() is None, fleet.log("late-db")
            assert (await readyz(session, server)).body["status"] == "unavailable"

            await proxy.start()
            reachable = time.monotonic()
            while (reply := await readyz(session, server)).status != 200:
                assert time.monotonic() - reachable < 15, (reply, fleet.log("late-db"))
                await asyncio.sleep(0.1)
            print(f"\nready {time.monotonic() - reachable:.1f}s after Postgres became reachable")
            added = await call(session, "POST", server, "/v1/memories", {"text": "the database came up late"})
            assert added.status == 201, added

            # The database goes away while serving: readyz says so, requests fail fast, both heal.
            await proxy.close()
            gone = time.monotonic()
            while (reply := await readyz(session, server)).status == 200:
                assert time.monotonic() - gone < 10, fleet.log("late-db")
                await asyncio.sleep(0.1)
            assert reply.status == 503 and reply.body["status"] == "unavailable" and reply.body["reason"], reply
            started = time.monotonic()
            refused = await call(session, "POST", server, "/v1/memories", {"text": "while the database is away"})
            assert refused.status == 503 and refused.body["error"]["code"] == "storage_unavailable", refused
            assert time.monotonic() - started < 15
            await proxy.start()
            back = time.monotonic()
            while (reply := await readyz(session, server)).status != 200:
                assert time.monotonic() - back < 15, (reply, fleet.log("late-db"))
                await asyncio.sleep(0.1)
            again = await call(session, "POST", server, "/v1/memories", {"text": "the database is back"})
            assert again.status == 201, again
            assert await fleet.stop("late-db") == 0
        finally:
            fleet.stop_all()
            await proxy.close()
    assert "retrying" in fleet.log("late-db")


async def test_killed_connections_fail_fast_and_heal(pg_url: str, fleet: Fleet) -> None:
    (process, server), (_, observer) = await asyncio.gather(
        fleet.spawn("loaded", "--database-url", pg_url), fleet.spawn("observer", "--database-url", pg_url)
    )
    database = urlsplit(pg_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_url)
    async with aiohttp.ClientSession() as session:
        for instance in (server, observer):
            assert await found_ids(session, instance, "warming up") == set()
        load = Load(session, lambda: server)
        load.start()
        try:
            await until(lambda: len(load.acked) >= 20, 30, "20 adds before the kills")
            killed = []
            for _ in range(5):
                killed.append(await admin.fetchval(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()) AS t", database,
                ))
                await asyncio.sleep(0.5)
            last_kill = time.monotonic()

            while True:  # the server heals by itself: readyz 200, an add and a search succeed
                ok = (await readyz(session, server)).status == 200
                ok = ok and (await call(session, "POST", server, "/v1/memories", {"text": "after the kills"})).ok
                ok = ok and (await call(session, "POST", server, "/v1/memories/search", {"query": "kills"})).ok
                if ok:
                    break
                assert time.monotonic() - last_kill < 10, fleet.log("loaded")
                await asyncio.sleep(0.1)
            recovered = time.monotonic()

            # The other instance's change feed reconnected too.
            probe = await call(session, "POST", server, "/v1/memories", {"text": "written after the kills"})
            assert probe.status == 201, probe
            seen = await seconds_until(session, observer, probe.body["text"], probe.body["id"],
                                       present=True, since=time.monotonic())
            await until(lambda: load.succeeded(after=recovered + 0.1) >= 20, 30, "20 answers after recovering")
        finally:
            await load.stop()
            await admin.close()

    failed = [r for r in load.replies if not r.ok]
    after = [r for r in load.replies if r.started > recovered + 0.1]
    codes = Counter(f"{r.status} {r.body['error']['code'] if isinstance(r.body, dict) else r.body}" for r in failed)
    print(f"\nkilled {killed} backends; load: {len(load.replies)} requests, {len(failed)} refused "
          f"({dict(codes)}), slowest {max(r.seconds for r in load.replies):.2f}s; "
          f"healed {recovered - last_kill:.2f}s after the last kill; observer saw a new write after {ms(seen)}")
    assert all(k >= 1 for k in killed), killed
    for reply in failed:  # refused quickly, with the contract's error body; never a hang or a 500
        assert reply.status == 503, reply
        assert set(reply.body["error"]) >= {"code", "message"}, reply
    assert max(r.seconds for r in load.replies) < 5, sorted(load.replies, key=lambda r: -r.seconds)[:3]
    assert recovered - last_kill < 5
    assert [r for r in after if not r.ok] == []
    assert seen < 5
    assert set(load.acked) <= await stored_ids(pg_url)
    assert process.poll() is None
    assert await fleet.stop("loaded") == 0, fleet.log("loaded")
    assert "unexpected fault" not in fleet.log("loaded")
