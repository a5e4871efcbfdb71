"""How far long work has come (a rebuild, a re-embedding): :class:`Progress`, what a
callback receives, and :class:`Meter`, which works out its rate and ETA from the start time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Progress:
    """``done`` of ``total`` units (rows, blocks) of ``phase``; ``rate`` in units per second
    over this run; ``eta_seconds`` None while the rate is not known yet."""

    phase: str
    done: int
    total: int
    rate: float
    eta_seconds: float | None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def line(self) -> str:
        """``embedding: 1,234 / 2,938 memories (42%), 310/s, ETA 6s`` (an index build on
        Postgres counts table blocks, not memories: no unit then)."""
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        rate = f", {self.rate:,.0f}/s" if self.rate > 0 else ""
        eta = f", ETA {duration(self.eta_seconds)}" if self.eta_seconds is not None and self.done < self.total else ""
        unit = "" if self.phase.startswith("reindex ") else " memories"
        return f"{self.phase}: {self.done:,} / {self.total:,}{unit}{share}{rate}{eta}"


def duration(seconds: float) -> str:
    """``45s``, ``3m07s``, ``2h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


OnProgress = Callable[[Progress], None]


class Meter:
    """Reports one phase's progress: ``at(done)`` is a :class:`Progress` whose rate counts only
    the units done since the meter started (``done`` given at start: work of an earlier run,
    resumed), so a resumed job's ETA is not flattered by work it did not do now."""

    def __init__(self, phase: str, total: int, done: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.phase = phase
        self.total = total
        self.clock = clock
        self.started = clock()
        self.started_done = done

    def at(self, done: int, total: int | None = None) -> Progress:
        if total is not None:
            self.total = total
        elapsed = self.clock() - self.started
        now_done = done - self.started_done
        rate = now_done / elapsed if elapsed > 0 and now_done > 0 else 0.0
        eta = max(self.total - done, 0) / rate if rate > 0 else None
        return Progress(self.phase, done, self.total, rate, eta)
