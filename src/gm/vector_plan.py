"""The vector search planner: for one query, exact scoring of the rows its scope and filter
allow, or the approximate (HNSW) index with enough candidates to fill the page after them.

Both vector searchers ask it (the in-process index, gm.index, and pgvector on Postgres), from
two figures they know: how many rows the query may match and how many the index holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Exact scoring of this many rows costs about what an HNSW walk does (gm.index measures both):
# below it, exact is as fast and never misses.
EXACT_MAX_ROWS = 20_000
# An HNSW walk filtered after the fact must see ~k / selectivity candidates to fill a page of
# k; below this share of the index, exact scoring of the few allowed rows is the cheaper one.
MIN_SELECTIVITY = 0.05
OVERSAMPLE = 2.0  # candidates beyond k / selectivity: the allowed rows are not spread evenly


@dataclass(frozen=True, slots=True)
class VectorPlan:
    """``exact``: score every allowed row; else ask the approximate index for ``fetch``
    candidates and keep the allowed ones (asking again, deeper, if the page comes short)."""

    exact: bool
    fetch: int = 0


def plan(allowed: int, total: int, k: int, exact_max_rows: int = EXACT_MAX_ROWS) -> VectorPlan:
    """The plan for a page of ``k`` among ``allowed`` rows (an estimate will do) of an index of
    ``total``; ``exact_max_rows``: the searcher's own break-even, where it differs (pgvector's)."""
    if allowed <= max(exact_max_rows, k) or total <= exact_max_rows:
        return VectorPlan(exact=True)
    selectivity = allowed / total
    if selectivity < MIN_SELECTIVITY:
        return VectorPlan(exact=True)
    fetch = k if selectivity >= 1.0 else math.ceil(k / selectivity * OVERSAMPLE)
    return VectorPlan(exact=False, fetch=min(fetch, total))
