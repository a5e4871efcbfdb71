"""The actor base: a task with a mailbox, replies through futures, a clean stop that drains.

Every actor of the core (Writer, Embedder, Migrator) is one of these; its state is
touched only by its own task, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generic, TypeVar

from gm.errors import StoreClosed

log = logging.getLogger(__name__)

Msg = TypeVar("Msg")

_STOP = object()


class Envelope(Generic[Msg]):
    """A message and the future its sender awaits."""

    __slots__ = ("msg", "reply")

    def __init__(self, msg: Msg, reply: asyncio.Future[Any]) -> None:
        self.msg = msg
        self.reply = reply

    def answer(self, result: Any) -> None:
        if not self.reply.done():
            self.reply.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.reply.done():
            self.reply.set_exception(error)


class Actor(Generic[Msg]):
    """A mailbox drained by one task, up to ``max_batch`` messages at a time.

    Subclasses implement :meth:`handle`, which must answer or fail every envelope.
    :meth:`stop` refuses new messages, lets the loop handle everything already queued,
    then returns.
    """

    name = "actor"

    def __init__(self, *, max_batch: int = 1) -> None:
        self.max_batch = max_batch
        self._mailbox: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def ask(self, msg: Msg) -> Any:
        """Send ``msg`` and wait for the actor's reply (or its exception)."""
        if self._closing:
            raise StoreClosed(f"the {self.name} has stopped; open the store again")
        self.start()
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait(Envelope(msg, reply))
        return await reply

    async def handle(self, batch: list[Envelope[Msg]]) -> None:
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Called in the actor's task after the mailbox is drained."""

    async def stop(self) -> None:
        """Refuse new messages, handle those already queued, then end the task."""
        if self._closing:
            if self._task is not None:
                await asyncio.shield(self._task)
            return
        self._closing = True
        if self._task is None:
            return
        self._mailbox.put_nowait(_STOP)
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                item = await self._mailbox.get()
                batch: list[Envelope[Msg]] = []
                while True:
                    if item is _STOP:
                        stopping = True
                    else:
                        batch.append(item)
                    if len(batch) >= self.max_batch or self._mailbox.empty():
                        break
                    item = self._mailbox.get_nowait()
                if batch:
                    try:
                        await self.handle(batch)
                    except Exception as exc:  # a bug in handle must not kill the actor
                        log.exception("%s failed a batch of %d", self.name, len(batch))
                        for envelope in batch:
                            envelope.fail(exc)
        finally:
            await self.on_stop()
