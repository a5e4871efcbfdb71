"""SQLite's keyword index keyed by scope, and keyword search over it: each memory's FTS5 row
is numbered so that a namespace's rows, and a user's within it, lie in one range of rowids.

FTS5 walks a term's matches in rowid order and seeks to a rowid range, so a search given its
scope's range reads that scope's matches only (plus the term statistics BM25 needs). The key
of a memory's row (schema v4 on) is ``ns << 52 | user << 40 | rowid``: ``ns`` its namespace's
slot (0-2047), ``user`` its user's (1-4095; 0 without one), from the dense ids of the tables
``keyword_namespaces`` and ``keyword_users`` (rows never deleted, so a slot never moves). More
namespaces or users than slots share a slot, and every hit is checked against its memory's row,
so sharing costs time, never results. The table holds exactly the columns and tokens of the
index it replaces (schema v3's, keyed by memories.rowid), so BM25 ranks the same: same rows,
lengths and statistics, same scores to the bit (tests/test_keyword_scope.py compares them).
"""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable
from typing import Any

from gm.context import CONTEXT_WEIGHT
from gm.filters import Filter
from gm.memory import Scope, TimeRange
from gm.storage.sql import QMarks, scope_sql

KEYED_VERSION = 4  # the schema version with the slot tables (the index itself is rebuilt online)
ROWID_BITS = 40  # memories.rowid below 2**40 (AUTOINCREMENT: a trillion writes)
NAMESPACE_SHIFT = 52  # 12 bits of user slot between them
NAMESPACE_SLOTS = 2048
USER_SLOTS = 4096  # slot 0: no user
ROWID_MASK = (1 << ROWID_BITS) - 1
TABLE = "memories_search"
RANK = f"bm25({TABLE}, 1.0, {CONTEXT_WEIGHT})"  # the context column counts CONTEXT_WEIGHT of the text's (gm.context)
# A ranked page is first taken from the index alone, this many rows deeper than the page, and
# only those rows are read to check scope and expiry: at 1M memories a user's page costs 7 ms
# so, against 11 ms joining every match of the range to its row (bench/keyword_scope.py).
TOP_MARGIN = 20

Fetch = Callable[[str, builtins.list[Any]], Awaitable[builtins.list[Any]]]
# The in-process postings' ranking of a key range (gm.storage.sqlite_postings): (terms, low, high,
# depth) -> the best (key, score) and whether they are every match of the range; None: ask FTS5.
Rank = Callable[[builtins.list[str], int, int, int], Awaitable[tuple[builtins.list[tuple[int, float]], bool] | None]]
DEEPER = 10  # a page the postings' first ranking left short (rows expired) is ranked this much deeper once


def _namespace_id(value: str) -> str:
    return f"(SELECT id FROM keyword_namespaces WHERE namespace = {value})"


def _user_id(value: str) -> str:
    return f"(SELECT id FROM keyword_users WHERE user_id = {value})"


def key_sql(row: str) -> str:
    """The key of the memory ``row`` (``new``, ``old`` or a table alias) in SQL; its slots must exist."""
    ns = f"(({_namespace_id(f'{row}.namespace')} % {NAMESPACE_SLOTS}) << {NAMESPACE_SHIFT})"
    user = f"(coalesce({_user_id(f'{row}.user_id')} % {USER_SLOTS - 1} + 1, 0) << {ROWID_BITS})"
    return f"({ns} | {user} | {row}.rowid)"


def slots_sql(row: str) -> builtins.list[str]:
    """Statements giving the memory ``row`` (in a trigger) its namespace's and user's slots.
    Not INSERT OR IGNORE: the outer statement's conflict clause would override a trigger's."""
    return [
        f"INSERT INTO keyword_namespaces (namespace) SELECT {row}.namespace "
        f"WHERE NOT EXISTS (SELECT 1 FROM keyword_namespaces WHERE namespace = {row}.namespace);",
        f"INSERT INTO keyword_users (user_id) SELECT {row}.user_id WHERE {row}.user_id IS NOT NULL "
        f"AND NOT EXISTS (SELECT 1 FROM keyword_users WHERE user_id = {row}.user_id);",
    ]


BATCH_SLOTS = [  # the slots of the memories with rowid in (?, ?]: a rebuild's copy
    "INSERT INTO keyword_namespaces (namespace) SELECT DISTINCT namespace FROM memories m "
    "WHERE rowid > ? AND rowid <= ? "
    "AND NOT EXISTS (SELECT 1 FROM keyword_namespaces k WHERE k.namespace = m.namespace)",
    "INSERT INTO keyword_users (user_id) SELECT DISTINCT user_id FROM memories m "
    "WHERE rowid > ? AND rowid <= ? AND user_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM keyword_users k WHERE k.user_id = m.user_id)",
]


def _match(terms: builtins.list[str], p: QMarks) -> str:
    return p(" OR ".join('"' + t.replace('"', '""') + '"' for t in terms))


class Slots:
    """The slot tables' ids of the namespaces and users searched, each read once: an id never
    changes (its row is never deleted) and the file is this process's alone (DatabaseLock). The
    bounds of a range go into a search as numbers: as subqueries, SQLite evaluated them again
    for every match it checked against them (70 VM steps a match)."""

    LIMIT = 100_000  # ids remembered; past it the memory starts afresh

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.namespaces: dict[str, int] = {}
        self.users: dict[str, int] = {}

    async def range(self, scope: Scope) -> tuple[int, int] | None:
        """The keys of ``scope``'s namespace, or of its user there: (low, high), inclusive;
        None if no memory was ever indexed in it."""
        ns, user = self.namespaces.get(scope.namespace), self.users.get(scope.user_id or "")
        if ns is None or (scope.user_id is not None and user is None):
            rows = await self.fetch(f"SELECT {_namespace_id('?')}, {_user_id('?')}", [scope.namespace, scope.user_id])
            ns, user = rows[0][0], rows[0][1]
            if len(self.namespaces) + len(self.users) > self.LIMIT:
                self.namespaces.clear()
                self.users.clear()
            if ns is not None:
                self.namespaces[scope.namespace] = ns
            if user is not None and scope.user_id is not None:
                self.users[scope.user_id] = user
        if ns is None:
            return None
        low = (ns % NAMESPACE_SLOTS) << NAMESPACE_SHIFT
        if scope.user_id is None:
            return low, low + (1 << NAMESPACE_SHIFT) - 1
        if user is None:
            return None
        low |= (user % (USER_SLOTS - 1) + 1) << ROWID_BITS
        return low, low + ROWID_MASK


async def search(
    slots: Slots, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
    time_range: TimeRange | None, version: int, rank: Rank | None = None,
) -> builtins.list[tuple[int, float]]:
    """The ``limit`` best (rowid, BM25 score) of the live memories in ``scope`` matching
    ``filter`` and ``time_range``: from the scope's range of the keyed index, best first, ties
    newest first. A scope the key holds whole (namespace, user) is ranked first, by ``rank``
    (the postings in process) or else in the index, and only the page's rows read; a narrower
    one (agent, session, filter, time) joins every match of its range to its row, as does a
    page the first way left short (unless the first way saw every match of the range: each
    statement reads BM25's statistics again)."""
    bounds = await slots.range(scope)
    if bounds is None:
        return []
    whole = filter is None and time_range is None and scope.agent_id is None and scope.session_id is None
    if whole and rank is not None:
        for depth in (limit + TOP_MARGIN, DEEPER * (limit + TOP_MARGIN)):
            best = await rank(terms, bounds[0], bounds[1], depth)
            if best is None:
                break
            page = await _checked(slots, best[0], scope, limit, now, version)
            if len(page) >= limit or best[1]:
                return page
        else:
            whole = False  # (short twice: rows of other namespaces share the slot, or many expired)
    if whole:
        p = QMarks()
        depth = limit + TOP_MARGIN
        ranked = (
            f"SELECT s.rowid AS key, {RANK} AS rank FROM {TABLE} s WHERE {TABLE} MATCH {_match(terms, p)} "
            f"AND s.rowid BETWEEN {p(bounds[0])} AND {p(bounds[1])} "
            f"ORDER BY rank, (s.rowid & {ROWID_MASK}) DESC LIMIT {p(depth)}"
        )
        where = scope_sql(scope, None, now, p, "m.", None, version)
        rows = await slots.fetch(
            f"SELECT m.rowid, c.rank, c.seen FROM (SELECT key, rank, count(*) OVER () AS seen FROM ({ranked})) c "
            f"JOIN memories m ON m.rowid = (c.key & {ROWID_MASK}) WHERE {where} "
            f"ORDER BY c.rank, m.rowid DESC LIMIT {p(limit)}",
            p.values,
        )
        if len(rows) >= limit or (rows and rows[0][2] < depth):
            return [(r[0], -float(r[1])) for r in rows]
    p = QMarks()
    match, low, high = _match(terms, p), p(bounds[0]), p(bounds[1])
    where = scope_sql(scope, filter, now, p, "m.", time_range, version)
    rows = await slots.fetch(
        f"SELECT m.rowid, {RANK} AS rank FROM {TABLE} s JOIN memories m ON m.rowid = (s.rowid & {ROWID_MASK}) "
        f"WHERE {TABLE} MATCH {match} AND s.rowid BETWEEN {low} AND {high} AND {where} "
        f"ORDER BY rank, m.rowid DESC LIMIT {p(limit)}",
        p.values,
    )
    return [(r[0], -float(r[1])) for r in rows]


async def _checked(
    slots: Slots, ranked: builtins.list[tuple[int, float]], scope: Scope, limit: int, now: int, version: int,
) -> builtins.list[tuple[int, float]]:
    """The first ``limit`` of ``ranked`` (key, score) whose memories are live and in ``scope``, as (rowid, score)."""
    if not ranked:
        return []
    p = QMarks()
    where = scope_sql(scope, None, now, p, "m.", None, version)
    ids = ",".join(str(key & ROWID_MASK) for key, _ in ranked)
    # NOT INDEXED: by rowid, always. Left to itself SQLite read the rows by the index on the
    # namespace, a million of them (212 ms, against 0.3 ms by rowid, at 1M).
    kept = {r[0] for r in await slots.fetch(
        f"SELECT m.rowid FROM memories m NOT INDEXED WHERE m.rowid IN ({ids}) AND {where}", p.values)}
    return [(key & ROWID_MASK, score) for key, score in ranked if key & ROWID_MASK in kept][:limit]


async def search_unkeyed(
    fetch: Fetch, terms: builtins.list[str], scope: Scope, filter: Filter | None, limit: int, now: int,
    time_range: TimeRange | None, version: int, table: str = TABLE, rank: str = RANK,
) -> builtins.list[tuple[int, float]]:
    """The same ranking over every match of the database, each joined to its row to check its
    scope: an index not keyed yet (before its online rebuild), or schema v2's ``memories_fts``.
    The join masks the rowid, so a keyed index gives the same answer (a search that began
    before the rebuild switched to it, gm.storage.sqlite_rebuild)."""
    p = QMarks()
    match = _match(terms, p)
    where = scope_sql(scope, filter, now, p, "m.", time_range, version)
    rows = await fetch(
        f"SELECT m.rowid, {rank} AS rank FROM {table} JOIN memories m ON m.rowid = ({table}.rowid & {ROWID_MASK}) "
        f"WHERE {table} MATCH {match} AND {where} ORDER BY rank, m.rowid DESC LIMIT {p(limit)}",
        p.values,
    )
    return [(r[0], -float(r[1])) for r in rows]
