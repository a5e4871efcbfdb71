"""What the benchmarks start and tear down: ``gmem serve`` subprocesses on loopback ports
(SQLite or Postgres), one at a time or several at once, and fresh databases on the Postgres at 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class Server:
    """``gmem serve`` on a loopback port picked by the OS, logging to a file; ``args`` are
    more flags for it (e.g. ``["--drain-seconds", "5"]``). It can be started again after
    it stopped (a new port, the log file rewritten). Of this process's GM_* settings only
    GM_EMBED_THREADS reaches it, unless ``keep_settings``; ``open_files`` caps its file
    descriptors (RLIMIT_NOFILE); ``gmem``: another build's executable (default: this one's)."""

    def __init__(self, db: Path, log_path: Path, args: Sequence[str] = (), *, keep_settings: bool = False,
                 open_files: int | None = None, gmem: Path | None = None) -> None:
        self.db = db
        self.log_path = log_path
        self.args = list(args)
        self.keep_settings = keep_settings
        self.open_files = open_files
        self.gmem = gmem
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        gmem = self.gmem or Path(sys.executable).with_name("gmem")
        head = [str(gmem)] if gmem.exists() else [sys.executable, "-m", "gm.cli"]
        return [*head, "serve", "--db", str(self.db), "--host", "127.0.0.1", "--port", "0", *self.args]

    async def start(self, timeout: float = 120.0) -> float:
        """Spawn it and wait for /v1/readyz 200; the seconds from spawn to ready."""
        env = {k: v for k, v in os.environ.items()
               if self.keep_settings or not k.startswith("GM_") or k == "GM_EMBED_THREADS"}
        self.url = ""
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=log, env=env,
                                         preexec_fn=self._limit_files if self.open_files else None)
        deadline = started + timeout
        while not self.url:
            self._check_alive()
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log_path.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
            elif time.perf_counter() > deadline:
                raise RuntimeError(f"the server did not listen within {timeout:.0f}s; see {self.log_path}")
            else:
                await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as session:
            while True:
                self._check_alive()
                try:
                    async with session.get(self.url + "/v1/readyz") as resp:
                        if resp.status == 200:
                            return time.perf_counter() - started
                except aiohttp.ClientError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"/v1/readyz was not 200 within {timeout:.0f}s; see {self.log_path}")
                await asyncio.sleep(0.02)

    def _limit_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{tail}")

    def stop(self, timeout: float = 60.0) -> tuple[int, float]:
        """SIGTERM, wait; (exit status, seconds to exit)."""
        assert self.proc is not None
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.perf_counter() - started

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap it."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PgServer(Server):
    """``gmem serve --database-url URL`` on a loopback port picked by the OS."""

    def __init__(self, url: str, log_path: Path, args: Sequence[str] = ()) -> None:
        super().__init__(Path(os.devnull), log_path, args)
        self.database_url = url

    def command(self) -> list[str]:
        head = super().command()
        at = head.index("--db")
        return [*head[:at], "--database-url", self.database_url, *head[at + 2 :]]


async def start_all(servers: Sequence[Server], threads: int | None) -> None:
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


def stop_all(servers: Sequence[Server]) -> list[int]:
    """SIGTERM each one still running; their exit statuses."""
    codes = []
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            codes.append(server.stop()[0])
        server.kill_if_running()
    return codes


def log_problems(servers: Sequence[Server], ignore: Sequence[str] = ("no GM_API_KEYS set",)) -> list[str]:
    """The WARNING and ERROR lines of their logs (each cut at 200 characters), but those
    containing one of ``ignore``."""
    lines = []
    for server in servers:
        if server.log_path.exists():
            for line in server.log_path.read_text(errors="replace").splitlines():
                if (" WARNING " in line or " ERROR " in line) and not any(text in line for text in ignore):
                    lines.append(line[:200])
    return lines


async def warm_up(session: aiohttp.ClientSession, servers: Sequence[Server]) -> None:
    """One add and one search per instance: loads each one's model before anything is timed."""

    async def one(url: str) -> None:
        async with session.post(url + "/v1/memories", json={"text": "Warm-up memory.", "namespace": "warmup"}) as r:
            assert r.status == 201, await r.text()
        async with session.post(url + "/v1/memories/search", json={"query": "warm up", "namespace": "warmup"}) as r:
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(s.url) for s in servers))


def check_loopback_postgres(url: str, flag: str = "--admin-url") -> str:
    host = urlsplit(url).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{flag} must point at a loopback Postgres (127.0.0.1), not {host!r}")
    return url


def database_url(admin_url: str, name: str) -> str:
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path="/" + name))


class Databases:
    """Fresh databases on the shared Postgres, each dropped (WITH FORCE) when done."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.made: list[str] = []

    async def create(self, label: str) -> str:
        name = f"gm_bench_{os.getpid()}_{label}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.made.append(name)
        return database_url(self.admin_url, name)

    async def backend_pids(self, url: str) -> list[int]:
        """The Postgres backend processes serving ``url``'s database (the instances' pools and listeners)."""
        conn = await asyncpg.connect(self.admin_url)
        try:
            rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1",
                                    urlsplit(url).path.lstrip("/"))
        finally:
            await conn.close()
        return [r[0] for r in rows]

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for name in self.made:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        self.made.clear()
