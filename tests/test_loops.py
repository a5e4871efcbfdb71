"""Background loops always stop: a pause does not drop a cancellation that arrives as it
wakes (Python 3.11's ``wait_for`` did, and a Postgres change feed then ran on after stop and
hung the shutdown), and a stop ends a task even if something swallowed its first cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import gm
from gm import loops


async def test_a_cancel_arriving_as_the_pause_wakes_is_not_dropped() -> None:
    wake = asyncio.Event()
    paused = asyncio.create_task(loops.pause(30, wake))
    await asyncio.sleep(0)  # the task now waits on the event
    wake.set()  # the wait completes ...
    paused.cancel()  # ... in the same step as the stop's cancellation
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await paused


async def test_pause_returns_whether_it_was_woken() -> None:
    wake = asyncio.Event()
    assert await loops.pause(0.01, wake) is False
    asyncio.get_running_loop().call_later(0.01, wake.set)
    assert await loops.pause(30, wake) is True


async def test_stop_ends_a_task_that_swallowed_its_first_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loops, "STOP_RETRY_SECONDS", 0.05)
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as a library catching CancelledError on the way would

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await loops.stop(task, None)
    assert task.cancelled() and swallowed == 1


async def test_stop_retrieves_a_failed_task_exception() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await loops.stop(task)  # does not raise, and leaves nothing unretrieved
    assert isinstance(task.exception(), RuntimeError)


async def test_a_postgres_change_feed_stops_while_it_is_being_woken(pg_url: str) -> None:
    """The hang seen in the suite: the feed's poll woke (a NOTIFY) as stop() cancelled it."""
    async with gm.open(pg_url) as mem:
        feed = mem.backend.feed  # type: ignore[attr-defined]
        assert feed is not None
        for _ in range(20):  # each round: a wake and a stop in the same step
            await asyncio.sleep(0.01)
            feed._wake.set()
            started = time.monotonic()
            async with asyncio.timeout(10):
                await feed.stop()
            assert time.monotonic() - started < 5
            await feed.start(feed.last_seq)
        await mem.add("still writes after the feed restarted", user_id="u1")


async def test_closing_a_store_with_every_loop_running_is_prompt(target: str, tmp_path: Path) -> None:
    mem = await gm.open(target)
    await mem.add("one memory so the loops have work", user_id="u1")
    started = time.monotonic()
    async with asyncio.timeout(20):
        await mem.close()
    assert time.monotonic() - started < 10
