"""The base of both Writers: a mailbox drained in batches, the health of their commits, the
commit stamp of the batch under way, and how a batch's outcomes reach their callers.
"""

from __future__ import annotations

from gm.actor import Actor, Envelope
from gm.errors import GMError
from gm.memory import now_ms
from gm.storage.ops import WriteOp, WriteResult
from gm.tally import SECONDS, SIZES, Tally


class WriteHealth:
    """How a Writer's commits are going, for readyz, ``/v1/stats`` and /metrics: touched only by the
    Writer's task. A batch refused as a whole by the database (disk full, read-only, I/O
    error, a lock or write timeout, a missing table) is a failure; a single write refused
    for its own values (422, 404, 409) is not."""

    def __init__(self) -> None:
        self.last_commit_at: int | None = None
        self.last_failure_at: int | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.failures = 0  # batches failed since the Writer started (a counter for gm.http.metrics)
        self.batch_writes = Tally(SIZES)  # writes per committed batch, and its seconds from BEGIN to COMMIT
        self.commit_seconds = Tally(SECONDS)

    def committed(self, writes: int, seconds: float) -> None:
        self.last_commit_at = now_ms()
        self.consecutive_failures = 0
        self.batch_writes.observe(writes)
        self.commit_seconds.observe(seconds)

    def failed(self, error: GMError) -> None:
        self.last_failure_at = now_ms()
        self.last_error = error.message
        self.consecutive_failures += 1
        self.failures += 1


class BatchWriter(Actor[WriteOp, object]):
    """What the two Writers share around their own transaction frames: a mailbox drained in
    batches of up to 512 writes, the health of their commits, and the commit stamp of the
    batch under way.

    A batch's history rows, ``updated_at`` and (for adds) ``created_at`` carry its stamp,
    taken once the batch holds the database's write lock (SQLite; on Postgres, once its
    transaction begins: commit order per instance), so history is in commit order. The
    stamp never goes back, even if the clock does."""

    def __init__(self) -> None:
        super().__init__(max_batch=512)
        self.stamp = 0
        self.health = WriteHealth()

    def next_stamp(self) -> int:
        self.stamp = max(now_ms(), self.stamp)
        return self.stamp

    @staticmethod
    def reply(batch: list[Envelope[WriteOp, object]], outcomes: list[WriteResult | GMError]) -> None:
        """Answer each write of a committed batch: its value, or why it alone was refused."""
        for envelope, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, WriteResult):
                envelope.answer(outcome.value)
            else:
                envelope.fail(outcome)

    def fail_all(self, batch: list[Envelope[WriteOp, object]], error: GMError) -> None:
        """The whole batch failed (nothing of it committed): every caller hears why."""
        self.health.failed(error)
        for envelope in batch:
            envelope.fail(error)
