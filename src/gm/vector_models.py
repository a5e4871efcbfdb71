"""The models a store's vectors come from: the current one (its embedder and the identity
the database records for its vectors) and, during a re-embed, the next one (gm.reembed).

Writes and searches take their vectors here; a switch replaces the current model in one
step, so a query is always searched in the index of the model that embedded it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from gm.embedding import Embedder, ModelSpec, Vector
from gm.errors import ModelSwitched

if TYPE_CHECKING:
    from gm.memory import NewMemory
    from gm.reembed import NextModel
    from gm.storage.base import Backend, WriteOp

log = logging.getLogger(__name__)

OLD_MODEL_GRACE_SECONDS = 5.0  # the old model still answers the searches under way at a switch


class VectorModels:
    """The current model and the next one; see the module's docstring."""

    def __init__(self, spec: ModelSpec, embedder: Embedder) -> None:
        self.spec = spec
        self.embedder = embedder
        self.identity = spec.identity  # the database's record of the vectors (set once opened)
        self._next: NextModel | None = None
        self._settled = asyncio.Event()  # no re-embed of this store's own is under way
        self._settled.set()
        self._retiring: dict[asyncio.Task[None], Embedder] = {}

    @property
    def next(self) -> NextModel | None:
        """The next model while a re-embed is under way (this store's own, or another instance's)."""
        return self._next

    @next.setter
    def next(self, following: NextModel | None) -> None:
        self._next = following
        if following is not None and following.own:
            self._settled.clear()
        else:
            self._settled.set()

    async def settled(self, timeout: float) -> None:
        """Until this store's own re-embed has switched or stopped (at most ``timeout`` seconds):
        a search or write that met the switch before this store made it waits for it here."""
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            pass

    async def embed_items(self, items: Sequence[NewMemory], unembedded: Sequence[NewMemory]) -> tuple[str, str]:
        """Give each of ``unembedded`` its vector, and each of ``items`` its next one during a
        re-embed; returns the models that made them (identity, next identity or "")."""
        identity, following = self.identity, self.next
        if unembedded:
            vectors = await self.embedder.embed_many([item.text for item in unembedded])
            for item, vector in zip(unembedded, vectors, strict=True):
                item.vector = vector.tobytes()
        if following is None or not items:
            return identity, ""
        nexts = await following.vectors([item.text for item in items], [item.vector for item in items])
        if nexts is None:
            return identity, ""
        for item, next_vector in zip(items, nexts, strict=True):
            item.next_vector = next_vector
        return identity, following.info.identity

    async def embed_text(self, text: str) -> tuple[bytes, str, bytes | None, str]:
        """A text's vector, its model, and its next vector and model during a re-embed."""
        identity, following = self.identity, self.next
        vector: Vector = await self.embedder.embed(text)
        if following is None:
            return vector.tobytes(), identity, None, ""
        nexts = await following.vectors([text], [vector.tobytes()])
        if nexts is None:
            return vector.tobytes(), identity, None, ""
        return vector.tobytes(), identity, nexts[0], following.info.identity

    async def write(
        self, backend: Backend, embedded: Callable[[], Awaitable[WriteOp]], follow: Callable[[], Awaitable[None]]
    ) -> Any:
        """Write what ``embedded`` makes (embedding its texts here); one that a re-embed's
        switch overtook (its vectors are the old model's) is made again once ``follow`` has
        caught up with the switch."""
        try:
            return await backend.write(await embedded())
        except ModelSwitched:
            await follow()
            return await backend.write(await embedded())

    def switch(self, identity: str, spec: ModelSpec | None, embedder: Embedder | None) -> None:
        """The vectors are ``identity``'s now (made by ``spec``'s ``embedder``; None: the same
        model, a reindex). The old embedder stops once the searches under way are done."""
        self.identity = identity
        self.next = None
        if spec is None or embedder is None:
            return
        old, self.spec, self.embedder = self.embedder, spec, embedder
        task = asyncio.get_running_loop().create_task(self._retire(old), name="gm-retire-model")
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _retire(self, embedder: Embedder) -> None:
        await asyncio.sleep(OLD_MODEL_GRACE_SECONDS)
        await embedder.stop()

    async def close(self) -> None:
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.stop()
        await self.embedder.stop()
        if self.next is not None and self.next.embedder is not None:
            await self.next.embedder.stop()
