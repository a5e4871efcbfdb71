"""The Migrator actor: brings a backend's schema up to date once, reports its phase
(starting, migrating, ready, failed; the server's readyz shows it); :meth:`run` is awaited
by whatever must wait for the schema to be current.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gm.actor import Actor, Envelope

MigrateFn = Callable[[Callable[[str], None]], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Migrate:
    """Bring the schema up to date (once; every later message gets the same outcome)."""


class Migrator(Actor[Migrate, int]):
    """Runs ``migrate`` (which reports phases through its callback) on its first message;
    later messages get the same outcome."""

    name = "migrator"

    def __init__(self, migrate: MigrateFn) -> None:
        super().__init__()
        self._migrate = migrate
        self.phase = "starting"
        self.version: int | None = None
        self.error: BaseException | None = None

    def _set_phase(self, phase: str) -> None:
        self.phase = phase

    async def handle(self, batch: list[Envelope[Migrate, int]]) -> None:
        if self.version is None and self.error is None:
            try:
                self.version = await self._migrate(self._set_phase)
                self.phase = "ready"
            except Exception as exc:
                self.error = exc
                self.phase = "failed"
        for envelope in batch:
            if self.version is not None:
                envelope.answer(self.version)
            else:
                envelope.fail(self.error or RuntimeError("the migration did not run"))

    async def run(self) -> int:
        """Migrate (once) and return the schema version, or raise why it could not."""
        return await self.ask(Migrate())
