"""Keyword search on Postgres: ``ts_rank`` over the ``tsvector`` columns, within scope and filter.
From schema v4 the GIN index over the keyword vector and the scope's lexemes
(postgres_migrations.SCOPED_KEYWORDS) finds the scope's matches without reading the others.
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any

from gm.context import CONTEXT_WEIGHT
from gm.filters import Filter
from gm.memory import Scope, TimeRange
from gm.search import STOPWORDS
from gm.storage.postgres_migrations import SCOPED_KEYWORDS
from gm.storage.sql import Numbered, scope_sql

SCOPED_VERSION = 4  # the schema version with memories_scoped_keywords
# The scope's lexeme a search asks the index for: its narrowest field (a session is the smallest
# part of a user, a user of an agent's, usually); the other fields are checked on the row.
LEXEMES = (("session_id", "s "), ("user_id", "u "), ("agent_id", "a "), ("namespace", "n "))

Fetch = Callable[[str, builtins.list[Any]], Awaitable[builtins.list[Any]]]


def _scope_query(scope: Scope, params: Numbered) -> str:
    column, prefix = next((c, x) for c, x in LEXEMES if getattr(scope, c) is not None)
    return f"quote_literal('{prefix}' || md5({params(getattr(scope, column))}))::tsquery"


async def search(
    fetch: Fetch, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
    time_range: TimeRange | None, version: int, context: bool,
) -> builtins.list[tuple[int, float]]:
    """The ``limit`` best (rowid, ts_rank) of the live memories in ``scope`` matching ``filter``
    and ``time_range``, best first, ties newest first."""
    params = Numbered()
    query = " | ".join("'" + t.replace("'", "''") + "'" for t in terms)
    if all(t in STOPWORDS for t in terms):  # English stemming drops them all: match the words as they are
        q = f"to_tsquery('simple', {params(query)})"
        match, rank = f"to_tsvector('simple', m.text) @@ {q}", f"ts_rank(to_tsvector('simple', m.text), {q})"
    elif context:
        # The text weighs A and its session context B (gm.context). A row the context backfill
        # has not reached yet has no search_tsv: its text alone (tsv, weight D) is ranked as A.
        q = f"to_tsquery('english', {params(query)})"
        if version >= SCOPED_VERSION:  # (coalesce(search_tsv, tsv) matches as the clause below does)
            match = f"{SCOPED_KEYWORDS} @@ ({q} && {_scope_query(scope, params)})"
        else:
            match = f"(m.search_tsv @@ {q} OR (m.search_tsv IS NULL AND m.tsv @@ {q}))"
        rank = (f"CASE WHEN m.search_tsv IS NULL THEN ts_rank('{{1, 1, 1, 1}}', m.tsv, {q}) "
                f"ELSE ts_rank('{{0.1, 0.2, {CONTEXT_WEIGHT}, 1}}', m.search_tsv, {q}) END")
    else:
        q = f"to_tsquery('english', {params(query)})"
        match, rank = f"m.tsv @@ {q}", f"ts_rank(m.tsv, {q})"
    where = scope_sql(scope, filter, now, params, "m.", time_range, version)
    rows = await fetch(
        f"SELECT m.rowid, {rank} AS rank FROM memories m "
        f"WHERE {match} AND {where} ORDER BY rank DESC, m.rowid DESC LIMIT {params(limit)}",
        params.values,
    )
    return [(r[0], float(r[1])) for r in rows]
