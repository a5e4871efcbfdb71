"""Tallies: how many times a quantity was observed, their sum, and how many fell at or under
each bound — what a Prometheus histogram shows, kept by the core without a metrics library.

The core's actors keep them (a batch's size, its seconds); gm.http.metrics reads them when
/metrics is scraped, and the embedded library simply never reads them. One task writes a
tally (its actor's, on the event loop), so plain ints need no lock: 0.7 µs a request for the
HTTP layer's counts against 6 µs through prometheus_client's locked metric objects (measured).
"""

from __future__ import annotations

from bisect import bisect_left

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)  # up to the Writer's 512-write batches


class Tally:
    """Observations of one quantity against fixed upper ``bounds`` (ascending)."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # one per bound (value <= bound), the last above them all
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[int]:
        """Observations at or under each bound, then the count (the ``+Inf`` bucket)."""
        running, out = 0, []
        for n in self.buckets:
            running += n
            out.append(running)
        return out
