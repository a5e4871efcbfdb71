"""The blocking flavour, gm.connect_sync, against real servers on threads of their own: in
a thread whose event loop runs (as a notebook's does), shared by several threads, closed
cleanly; and the library docs' remote examples, run as written.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import gm
from gm.errors import NotFound, ServerUnreachable, StoreClosed
from tests.handles import server_thread
from tests.http_server import free_port, store_factory

ROOT = Path(__file__).resolve().parent.parent


def sync_threads() -> int:
    return sum(t.name == "gm.connect_sync" for t in threading.enumerate())


async def test_the_sync_flavour_blocks_while_this_threads_loop_runs(tmp_path: Path) -> None:
    """As in a notebook: this test's event loop runs in this thread, and each call blocks it."""
    asyncio.get_running_loop()
    threads = sync_threads()
    with server_thread(store_factory(tmp_path / "mem.db")) as server:
        with gm.connect_sync(server.url) as mem:
            memory = mem.add("Prefers window seats.", user_id="u1", metadata={"topic": "travel"})
            assert isinstance(memory, gm.Memory) and mem.get(memory.id) == memory
            assert [h.memory for h in mem.search("where does she sit?", user_id="u1")] == [memory]
            assert mem.list(user_id="u1") == gm.Page([memory], None)
            assert [e.op for e in mem.history(memory.id)] == ["add"]
            assert mem.update(memory.id, metadata={"topic": "air"}).metadata == {"topic": "air"}
            assert mem.stats().memories == 1 and mem.probe().phase == "ready"
            with pytest.raises(NotFound):
                mem.get("no-such-memory")
            with pytest.raises(AttributeError, match="embedded store's only"):
                mem.purge_expired  # noqa: B018
            assert mem.add.__doc__ == gm.RemoteStore.add.__doc__  # help(mem.add) reads as the async one's
            assert sync_threads() == threads + 1
        assert sync_threads() == threads  # closed: its loop's thread has ended
        with pytest.raises(StoreClosed):
            mem.get(memory.id)
        mem.close()  # twice is fine


async def test_one_sync_store_serves_several_threads_each_with_or_without_a_loop(tmp_path: Path) -> None:
    with server_thread(store_factory(tmp_path / "mem.db")) as server, gm.connect_sync(server.url) as mem:
        def plain(i: int) -> gm.Memory:
            return mem.add(f"from thread {i}", user_id="threads")

        def in_a_loop(i: int) -> gm.Memory:
            async def main() -> gm.Memory:  # a loop runs in this thread too: the call blocks it, and works
                return mem.add(f"from a loop {i}", user_id="threads")
            return asyncio.run(main())

        work: list[Callable[[int], gm.Memory]] = [plain, in_a_loop]
        with ThreadPoolExecutor(4) as pool:
            made = list(pool.map(lambda i: work[i % 2](i), range(8)))
        assert len({m.id for m in made}) == 8
        assert {m.text for m in mem.list(user_id="threads").memories} == {m.text for m in made}
        assert mem.delete_many(user_id="threads") == 8


async def test_a_sync_connection_that_fails_leaves_no_thread_behind() -> None:
    threads = sync_threads()
    with pytest.raises(ServerUnreachable, match="the connection was refused"):
        gm.connect_sync(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(gm.errors.InvalidInput, match="did you mean http://localhost:8420"):
        gm.connect_sync("localhost:8420")
    assert sync_threads() == threads


def test_the_library_docs_remote_examples_run(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "library.md").read_text()
    examples = re.findall(r"```python\n(.*?)```", text[text.index("## Remote: gm.connect"):], flags=re.S)
    assert len(examples) == 2
    env = {k: v for k, v in os.environ.items() if k != "GM_API_KEY"}
    with server_thread(store_factory(tmp_path / "mem.db")) as server:
        for code in examples:
            done = subprocess.run([sys.executable, "-c", code], env={**env, "GM_URL": server.url}, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{code}\n{done.stderr}"
            assert done.stdout.strip() and "Traceback" not in done.stderr
