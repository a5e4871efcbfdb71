"""The actor base: a task with a mailbox, replies through futures, a clean stop that drains.

Every actor of the core (Writer, Embedder, Migrator, Indexer) is one of these; its state is
touched only by its own task, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Generic, TypeVar

from gm.errors import StoreClosed

log = logging.getLogger(__name__)

Msg = TypeVar("Msg")
Reply = TypeVar("Reply")


class Overdue(Exception):
    """No reply within the ``timeout`` given to :meth:`Actor.ask`. ``taken`` False: the
    message was withdrawn before the actor took it up (it never will); True: the actor was
    handling it, so it may still take effect."""

    def __init__(self, taken: bool) -> None:
        super().__init__("taken up, not answered in time" if taken else "withdrawn before it was taken up")
        self.taken = taken


def _unheard(reply: asyncio.Future[Reply]) -> None:
    """The late outcome of a message whose sender stopped waiting: nobody will read it."""
    if not reply.cancelled():
        reply.exception()


class Envelope(Generic[Msg, Reply]):
    """A message, the future its sender awaits, when it was sent, and whether the actor has
    taken it up."""

    __slots__ = ("msg", "reply", "queued_at", "taken")

    def __init__(self, msg: Msg, reply: asyncio.Future[Reply]) -> None:
        self.msg = msg
        self.reply = reply
        self.queued_at = time.monotonic()
        self.taken = False

    def answer(self, result: Reply) -> None:
        if not self.reply.done():
            self.reply.set_result(result)

    def fail(self, error: BaseException) -> None:
        if not self.reply.done():
            self.reply.set_exception(error)


class Actor(Generic[Msg, Reply]):
    """A mailbox drained by one task, up to ``max_batch`` messages at a time; each message
    of type ``Msg`` is answered with a ``Reply``.

    Subclasses implement :meth:`handle`, which must answer or fail every envelope.
    :meth:`stop` refuses new messages, lets the loop handle everything already queued,
    then returns.
    """

    name = "actor"

    def __init__(self, *, max_batch: int = 1) -> None:
        self.max_batch = max_batch
        self._mailbox: asyncio.Queue[Envelope[Msg, Reply] | None] = asyncio.Queue()  # None: stop
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._oldest_unanswered: float | None = None  # queued_at of the batch under way, if any
        self._arrived = asyncio.Event()  # a message was sent since the last take_queued

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def _post(self, msg: Msg) -> Envelope[Msg, Reply]:
        if self._closing:
            raise StoreClosed(f"the {self.name} has stopped; open the store again")
        self.start()
        envelope: Envelope[Msg, Reply] = Envelope(msg, asyncio.get_running_loop().create_future())
        self._mailbox.put_nowait(envelope)
        self._arrived.set()
        return envelope

    def tell(self, msg: Msg) -> None:
        """Send ``msg`` without waiting for the reply: from a callback that cannot await, or
        a sub-task reporting back. A failure is logged, since nobody else will see it."""
        self._post(msg).reply.add_done_callback(self._told)

    def _told(self, reply: asyncio.Future[Reply]) -> None:
        if not reply.cancelled() and (error := reply.exception()) is not None:
            log.error("%s failed a message nobody waits for", self.name, exc_info=error)

    async def ask(self, msg: Msg, timeout: float | None = None) -> Reply:
        """Send ``msg`` and wait for the actor's reply (or its exception); after ``timeout``
        seconds raise :class:`Overdue`, withdrawing the message if it was not taken up yet."""
        envelope = self._post(msg)
        reply = envelope.reply
        if timeout is None:
            return await reply
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow the caller's cancellation
        # when the reply lands at the same moment, and a cancelled task would then run on.
        try:
            await asyncio.wait([reply], timeout=timeout)
        finally:
            if not reply.done():  # overdue, or the caller was cancelled
                if envelope.taken:
                    reply.add_done_callback(_unheard)
                else:
                    reply.cancel()  # withdrawn: the loop below drops it unhandled
        if reply.cancelled():
            raise Overdue(False)
        if not reply.done():
            raise Overdue(True)
        return reply.result()

    @property
    def queued(self) -> int:
        """Messages waiting in the mailbox, not yet taken up (what /metrics shows as queue depth)."""
        return self._mailbox.qsize()

    def oldest_wait(self) -> float:
        """Seconds the oldest message not yet answered has waited (0 when idle): the batch
        under way holds the oldest, since the mailbox is first in, first out."""
        since = self._oldest_unanswered
        return 0.0 if since is None else time.monotonic() - since

    async def handle(self, batch: list[Envelope[Msg, Reply]]) -> None:
        raise NotImplementedError

    def take_queued(self) -> list[Envelope[Msg, Reply]]:
        """For a :meth:`handle` that takes more work in while it runs: the messages queued
        now (up to ``max_batch``, withdrawn ones left out), which that handle must answer too."""
        self._arrived.clear()
        taken: list[Envelope[Msg, Reply]] = []
        while len(taken) < self.max_batch and not self._mailbox.empty():
            item = self._mailbox.get_nowait()
            if item is None:  # stopping: the loop must see it (it is last, nothing is sent after it)
                self._mailbox.put_nowait(None)
                break
            if not item.reply.done():
                item.taken = True
                taken.append(item)
        return taken

    async def arrival(self) -> None:
        """Until a message is sent (or the actor told to stop) after the last :meth:`take_queued`."""
        await self._arrived.wait()

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
        self._mailbox.put_nowait(None)
        self._arrived.set()
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        stopping = False
        try:
            while not stopping:
                item = await self._mailbox.get()
                batch: list[Envelope[Msg, Reply]] = []
                while True:
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                    if len(batch) >= self.max_batch or self._mailbox.empty():
                        break
                    item = self._mailbox.get_nowait()
                batch = [envelope for envelope in batch if not envelope.reply.done()]  # not withdrawn
                if batch:
                    for envelope in batch:
                        envelope.taken = True
                    self._oldest_unanswered = batch[0].queued_at
                    try:
                        await self.handle(batch)
                    except Exception as exc:  # a bug in handle must not kill the actor
                        log.exception("%s failed a batch of %d", self.name, len(batch))
                        for envelope in batch:
                            envelope.fail(exc)
                    finally:
                        self._oldest_unanswered = None
        finally:
            await self.on_stop()
