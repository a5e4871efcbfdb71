"""The Migrator actor: brings a backend's schema up to date once, reports its phase
(starting, migrating, ready, failed; the server's readyz shows it) and sets its ``ready``
event once the schema is current, for anything that must wait for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gm.actor import Actor, Envelope

MigrateFn = Callable[[Callable[[str], None]], Awaitable[int]]


class Migrator(Actor[str]):
    """Runs ``migrate`` (which reports phases through its callback) on its first message;
    later messages get the same outcome. ``ready`` is set once the schema is current."""

    name = "migrator"

    def __init__(self, migrate: MigrateFn) -> None:
        super().__init__()
        self._migrate = migrate
        self.phase = "starting"
        self.version: int | None = None
        self.error: BaseException | None = None
        self.ready = asyncio.Event()

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

    async def handle(self, batch: list[Envelope[str]]) -> None:
        if self.version is None and self.error is None:
            try:
                self.version = await self._migrate(self._set_phase)
                self.phase = "ready"
                self.ready.set()
            except Exception as exc:
                self.error = exc
                self.phase = "failed"
        for envelope in batch:
            if self.error is not None:
                envelope.fail(self.error)
            else:
                envelope.answer(self.version)

    async def run(self) -> int:
        """Migrate (once) and return the schema version, or raise why it could not."""
        version: int = await self.ask("migrate")
        return version
