"""The blocking flavour of :func:`gm.connect`, for scripts and notebooks: :func:`connect_sync`
runs a :class:`gm.RemoteStore` on an event loop of its own, on a background thread.

Each method hands its coroutine to that loop and waits for the answer, so it works from any
thread, including one whose event loop is running (a Jupyter cell, an async framework's
handler): the caller's loop is never touched, only blocked for the call.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from gm.errors import StoreClosed
from gm.remote import RemoteStore, connect
from gm.store import Store

P = ParamSpec("P")
R = TypeVar("R")


def connect_sync(
    url: str | None = None,
    *,
    api_key: str | None = None,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
    retry_for: float = 30.0,
    max_connections: int = 100,
) -> SyncRemoteStore:
    """:func:`gm.connect`, blocking: ``with gm.connect_sync(url) as mem: mem.add(...)``, or
    ``mem = gm.connect_sync(url)`` then ``mem.close()``. Takes the same options."""
    store = SyncRemoteStore(url, {"api_key": api_key, "timeout": timeout, "connect_timeout": connect_timeout,
                                  "retry_for": retry_for, "max_connections": max_connections})
    try:
        store.run(store.remote.open())
    except BaseException:
        store.close()
        raise
    return store


def _blocking(method: Callable[Concatenate[RemoteStore, P], Coroutine[Any, Any, R]]) -> Callable[
    Concatenate[SyncRemoteStore, P], R
]:
    """``method`` of :class:`RemoteStore`, run on the store's own loop and waited for."""

    def call(self: SyncRemoteStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.run(method(self.remote, *args, **kwargs))

    functools.update_wrapper(call, method)  # its name, docstring and signature, for help()
    return call


class SyncRemoteStore:
    """A greatmemory server's memories with blocking methods: those of :class:`gm.RemoteStore`
    (and so of :class:`gm.Store`), arguments, results and errors alike. Create it with
    :func:`gm.connect_sync`; one may be shared by several threads."""

    def __init__(self, url: str | None, options: dict[str, Any]) -> None:
        self.remote: RemoteStore = connect(url, **options).store  # bad options fail here, before a thread starts
        self.url = self.remote.url
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gm.connect_sync", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<SyncRemoteStore {self.url}>"

    def run(self, work: Coroutine[Any, Any, R]) -> R:
        """Run ``work`` on this store's loop and wait for its result (or its exception)."""
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError("a SyncRemoteStore was called from its own event loop; use gm.connect there")
        if self._loop.is_closed():
            work.close()
            raise StoreClosed(f"the connection to {self.url} is closed; connect again with gm.connect_sync()")
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in a notebook: the request stops too
            raise

    def close(self) -> None:
        """Close the connections and stop the loop's thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._loop.is_running():
            self.run(self.remote.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> SyncRemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> bool:
        return self.remote.ready

    def __getattr__(self, name: str) -> Any:
        if name != "remote" and hasattr(Store, name) and not hasattr(RemoteStore, name):
            return getattr(self.remote, name)  # which says it is the embedded store's only
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    probe = _blocking(RemoteStore.probe)
    add = _blocking(RemoteStore.add)
    add_many = _blocking(RemoteStore.add_many)
    update = _blocking(RemoteStore.update)
    delete = _blocking(RemoteStore.delete)
    delete_many = _blocking(RemoteStore.delete_many)
    get = _blocking(RemoteStore.get)
    list = _blocking(RemoteStore.list)
    history = _blocking(RemoteStore.history)
    search = _blocking(RemoteStore.search)
    stats = _blocking(RemoteStore.stats)
    reembed = _blocking(RemoteStore.reembed)
    reembed_status = _blocking(RemoteStore.reembed_status)
    end_reembed = _blocking(RemoteStore.end_reembed)
