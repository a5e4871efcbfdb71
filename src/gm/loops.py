"""Background loops (change feed, purge, index loader, vector backfill): how they pause and
how they are stopped, so that a stop always ends them even when a cancellation is lost.

On Python 3.11, ``asyncio.wait_for`` returns the inner result and drops a cancellation that
arrives as the inner wait completes; a loop paused that way ran on after ``stop()`` and hung
the shutdown that awaited it. So loops pause with :func:`pause` (``asyncio.timeout``, which
does not drop it), and :func:`stop` cancels again until the task has really ended.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

STOP_RETRY_SECONDS = 1.0  # how long one cancellation is given before it is sent again


async def pause(seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep ``seconds``, or less if ``wake`` is (or gets) set; True if woken."""
    if wake is None:
        await asyncio.sleep(seconds)
        return False
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        return False
    return True


async def stop(*tasks: asyncio.Task[object] | None) -> None:
    """Cancel each task and wait until it has ended, cancelling again every
    ``STOP_RETRY_SECONDS`` should something on its way have swallowed the cancellation.
    Exceptions of the tasks are not raised (they were logged where they happened)."""
    pending = {task for task in tasks if task is not None and not task.done()}
    rounds = 0
    while pending:
        for task in pending:
            task.cancel()
        if rounds:
            log.warning("%s ignored a cancellation; cancelling again",
                        ", ".join(sorted(task.get_name() for task in pending)))
        _, pending = await asyncio.wait(pending, timeout=STOP_RETRY_SECONDS)
        rounds += 1
    for ended in tasks:
        if ended is not None and ended.done() and not ended.cancelled():
            ended.exception()  # retrieved: no "exception was never retrieved" at exit
