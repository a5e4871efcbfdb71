"""The two handles the parity tests run every behaviour through: the embedded store
(``gm.open``) and ``gm.connect`` to a real server on an ephemeral port over the same kind of
database; and a real server on a thread of its own, for callers that block their loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import gm
from gm.store import Store
from tests.http_server import RunningServer, start_server, store_factory

HANDLES = ["embedded", "remote"]
Memories = gm.Store | gm.RemoteStore


@asynccontextmanager
async def open_handle(kind: str, db: Path | str) -> AsyncIterator[Memories]:
    """An open handle on the database at ``db``: the store itself, or a client of a server on it."""
    if kind == "embedded":
        async with gm.open(db) as store:
            yield store
        return
    server = await start_server(store_factory(db))
    try:
        # (a longer timeout than the default 30 s: on a machine shared by several test runs, a
        # server's first add, which loads the model, once took longer)
        async with gm.connect(server.url, timeout=90) as remote:
            yield remote
    finally:
        await server.stop()


@contextmanager
def server_thread(make_store: Callable[[], Store], **options: Any) -> Iterator[RunningServer]:
    """A real server on an event loop of its own thread: it keeps serving while the test's
    own loop is blocked (as a notebook's is, by a blocking call)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start_server(make_store, **options), loop).result(60)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
