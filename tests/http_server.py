"""A real greatmemory HTTP server on an ephemeral 127.0.0.1 port, in this process, for tests."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gm.config import DEFAULT_METRICS, ApiKey, ConnectionLimits
from gm.embedding import ModelSpec
from gm.http import ServerState, make_app
from gm.http.connections import ConnectionRunner
from gm.http.guard import HostPolicy
from gm.storage import is_postgres_url
from gm.storage.postgres import PostgresBackend
from gm.storage.sqlite import SQLiteBackend
from gm.store import Store


@dataclass
class RunningServer:
    url: str
    state: ServerState
    runner: web.AppRunner
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, *, key: str | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as response:
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, body

    async def stop(self) -> None:
        await self.session.close()
        await self.runner.cleanup()
        await self.state.store.close()


def store_factory(db: Path | str, **backend_options: Any) -> Callable[[], Store]:
    """Builds a store on a SQLite path or a postgresql:// URL, as ``gmem serve`` does."""
    if is_postgres_url(str(db)):
        return lambda: Store(PostgresBackend(str(db), **backend_options), ModelSpec.default())
    return lambda: Store(SQLiteBackend(Path(db), **backend_options), ModelSpec.default())


async def start_server(
    make_store: Callable[[], Store],
    *,
    api_keys: tuple[ApiKey, ...] = (),
    max_body_bytes: int = 4 * 1024 * 1024,
    open_store: bool = True,
    hosts: HostPolicy | None = None,
    limits: ConnectionLimits = ConnectionLimits(),
    metrics: str = DEFAULT_METRICS,
) -> RunningServer:
    state = ServerState(make_store, api_keys)
    app = make_app(state, max_body_bytes=max_body_bytes, hosts=hosts, body_timeout=limits.body_timeout,
                   metrics=metrics)
    runner = ConnectionRunner(app, limits, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server = RunningServer(f"http://{host}:{port}", state, runner, aiohttp.ClientSession())
    if open_store:
        await state.open_store()
    return server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def launch_server(
    log_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`gmem serve` as a child process on a free port; returns once it listens (healthz is
    200), whatever its readyz says: for tests that watch it become ready."""
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gm", "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    await _wait_for(process, log_path, url + "/v1/healthz")
    return process, url


async def spawn_server(
    log_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`gmem serve` as a child process on a free port; returns once its readyz is 200."""
    process, url = await launch_server(log_path, *args, env=env)
    await _wait_for(process, log_path, url + "/v1/readyz")
    return process, url


async def _wait_for(process: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
