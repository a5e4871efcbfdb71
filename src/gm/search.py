"""How a question becomes ranked hits: keyword terms for BM25, and reciprocal rank
fusion of the vector and keyword rankings for hybrid mode.
"""

from __future__ import annotations

import re

RRF_K = 60
MAX_TERMS = 32
_WORD = re.compile(r"\w+", re.UNICODE)
STOPWORDS = frozenset(
    """a an and are as at be been but by did do does for from had has have he her him his how i
    if in into is it its me my of on or our she so than that the their them then there these they
    this to was we were what when where which who whom why will with would you your""".split()
)


def keyword_terms(query: str) -> list[str]:
    """The distinct lowercase words of ``query`` worth matching (stopwords dropped, unless
    the query is nothing but stopwords)."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    kept = [w for w in words if w not in STOPWORDS] or words
    return kept[:MAX_TERMS]


def fuse(rankings: list[list[tuple[int, float]]], limit: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum over rankings of 1 / (RRF_K + rank)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, (rowid, _) in enumerate(ranking, start=1):
            scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: -item[1])[:limit]


def candidates(limit: int) -> int:
    """How deep each ranking goes before fusion: deeper lists let agreement surface."""
    return max(50, 4 * limit)
