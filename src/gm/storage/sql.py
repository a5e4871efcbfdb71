"""The SQL both backends speak, written once: the two dialects' placeholders (``?`` and
``$n``), the live and scope clauses, event time, the memory columns and their row mapping.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import Any

import orjson

from gm.errors import InvalidInput
from gm.filters import Filter, PgParams, to_postgres, to_sqlite
from gm.memory import HistoryEntry, Memory, Page, Scope, TimeRange
from gm.storage.ops import VectorRow

CONTEXT_VERSION = 3  # the schema version with occurred_at, context and search_embedding (both backends)
# A row written by a release before event times has no occurred_at: it occurred when it was created.
OCCURRED = "coalesce(occurred_at, created_at)"
_BASE = "rowid, id, namespace, user_id, agent_id, session_id, text, metadata, created_at, updated_at, expires_at"
COLUMNS = f"{_BASE}, {OCCURRED}"
LEGACY_COLUMNS = f"{_BASE}, created_at"  # a database capped below CONTEXT_VERSION (tests stand in for old releases)
VECTOR_COLUMNS = "rowid, namespace, user_id, agent_id, session_id, expires_at"  # then the searched vector
EXPIRES_COLUMN = 10  # expires_at's place in a row of COLUMNS (memory_from_row)


class Params(abc.ABC):
    """One query's values in a dialect: calling it with a value records the value and
    returns its placeholder. The subclass is the dialect (its placeholders, how it compiles
    a filter, a list, a cursor, a row lock)."""

    lock_row = ""  # what makes a SELECT lock the row it reads for the rest of the transaction
    values: list[Any]

    @abc.abstractmethod
    def __call__(self, value: Any, cast: str = "") -> str: ...

    @abc.abstractmethod
    def mark(self, position: int) -> str:
        """The placeholder of the ``position``-th value (from 1) of a statement run with ``executemany``."""

    def marks(self, count: int) -> str:
        return ", ".join(self.mark(i) for i in range(1, count + 1))

    def json(self, value: str) -> str:
        """The placeholder of a JSON document (``metadata``)."""
        return self(value, "jsonb")

    def rows(self, rows: Sequence[Sequence[Any]], casts: Sequence[str]) -> str:
        """The placeholders of a multi-row ``VALUES`` list (``casts``: each column's, "" none)."""
        return ", ".join("(" + ", ".join(self(v, c) for v, c in zip(row, casts, strict=True)) + ")" for row in rows)

    @abc.abstractmethod
    def matches(self, filter: Filter, column: str) -> str:
        """The clause for a metadata filter on the JSON ``column``."""

    @abc.abstractmethod
    def one_of(self, column: str, values: Sequence[Any], kind: str) -> str:
        """``column`` equal to one of ``values`` (``kind``: text or bigint)."""

    def before(self, key: str, last: int, rowid: int) -> str:
        """Rows after a cursor in a (``key``, rowid) descending order."""
        return f"({key} < {self(last)} OR ({key} = {self(last)} AND rowid < {self(rowid)}))"


class QMarks(Params):
    """SQLite's ``?`` placeholders (casts are Postgres's: ignored)."""

    def __init__(self) -> None:
        self.values = []

    def __call__(self, value: Any, cast: str = "") -> str:
        self.values.append(value)
        return "?"

    def mark(self, position: int) -> str:
        return "?"

    def rows(self, rows: Sequence[Sequence[Any]], casts: Sequence[str]) -> str:
        for row in rows:
            self.values.extend(row)
        one = "(" + ", ".join("?" * len(casts)) + ")"
        return ", ".join([one] * len(rows))

    def matches(self, filter: Filter, column: str) -> str:
        sql, values = to_sqlite(filter, column)
        self.values.extend(values)
        return sql

    def one_of(self, column: str, values: Sequence[Any], kind: str) -> str:
        return f"{column} IN ({', '.join(self(v) for v in values)})"


class Numbered(PgParams, Params):
    """Postgres's ``$n`` placeholders, with an optional cast (what gm.filters compiles with)."""

    lock_row = " FOR UPDATE"

    def mark(self, position: int) -> str:
        return f"${position}"

    def matches(self, filter: Filter, column: str) -> str:
        return to_postgres(filter, self, column)

    def one_of(self, column: str, values: Sequence[Any], kind: str) -> str:
        return f"{column} = ANY({self(list(values), kind + '[]')})"

    def before(self, key: str, last: int, rowid: int) -> str:
        return f"({key}, rowid) < ({self(last)}, {self(rowid)})"  # a row comparison Postgres ranges an index on


def live(p: Params, now: int, prefix: str = "") -> str:
    """The clause for memories not expired at ``now``."""
    return f"({prefix}expires_at IS NULL OR {prefix}expires_at > {p(now)})"


def live_by_id(memory_id: str, now: int, namespace: str | None, p: Params) -> str:
    """The WHERE clause for the live memory ``memory_id`` (in ``namespace``, if given). The
    Writers put it in the statement that locks or deletes the row: the namespace check and
    the write are one."""
    clause = f"id = {p(memory_id)} AND {live(p, now)}"
    if namespace is not None:
        clause += f" AND namespace = {p(namespace)}"
    return clause


def event_time_sql(version: int, prefix: str = "") -> str:
    """A memory's event time in SQL on a schema at ``version``: ``OCCURRED`` (the expression
    the indexes memories_by_occurrence and memories_by_session_order hold); before event
    times existed, every memory occurred when it was created."""
    if version >= CONTEXT_VERSION:
        return f"coalesce({prefix}occurred_at, {prefix}created_at)"
    return f"{prefix}created_at"


def columns_for(version: int) -> str:
    """The memory columns a query reads on a schema at ``version``."""
    return COLUMNS if version >= CONTEXT_VERSION else LEGACY_COLUMNS


def search_vector(context: bool, prefix: str = "") -> str:
    """The vector the index searches for a row: its search embedding (gm.context) if it has one."""
    return f"coalesce({prefix}search_embedding, {prefix}embedding)" if context else f"{prefix}embedding"


def time_range_sql(time_range: TimeRange, event_time: str, p: Params) -> list[str]:
    """The clauses for ``event_time`` in ``time_range``: from ``after`` (inclusive) up to
    ``before`` (exclusive)."""
    clauses = []
    if time_range.after is not None:
        clauses.append(f"{event_time} >= {p(time_range.after)}")
    if time_range.before is not None:
        clauses.append(f"{event_time} < {p(time_range.before)}")
    return clauses


def scope_sql(
    scope: Scope, filter: Filter | None, now: int, p: Params, prefix: str = "",
    time_range: TimeRange | None = None, version: int = CONTEXT_VERSION,
) -> str:
    """A WHERE clause for live memories in ``scope`` matching ``filter`` whose event time
    lies in ``time_range`` (on a schema at ``version``)."""
    clauses = [f"{prefix}namespace = {p(scope.namespace)}", live(p, now, prefix)]
    for column in ("user_id", "agent_id", "session_id"):
        value = getattr(scope, column)
        if value is not None:
            clauses.append(f"{prefix}{column} = {p(value)}")
    if filter is not None:
        clauses.append(p.matches(filter, f"{prefix}metadata"))
    if time_range is not None:
        clauses.extend(time_range_sql(time_range, event_time_sql(version, prefix), p))
    return " AND ".join(clauses)


# -- rows -----------------------------------------------------------------------------------


def memory_from_row(row: Any) -> Memory:
    """A row of ``COLUMNS`` as a memory."""
    return Memory(
        id=row[1],
        namespace=row[2],
        user_id=row[3],
        agent_id=row[4],
        session_id=row[5],
        text=row[6],
        metadata=orjson.loads(row[7]),
        created_at=row[8],
        updated_at=row[9],
        expires_at=row[EXPIRES_COLUMN],
        occurred_at=row[11],
    )


def page_from_rows(rows: list[Any], limit: int, order_by: str = "created_at") -> Page:
    """A list query's rows (``COLUMNS``, up to ``limit + 1`` of them) as a page and its cursor."""
    memories = [memory_from_row(r) for r in rows[:limit]]
    more = len(rows) > limit
    return Page(memories, encode_cursor(memories[-1], rows[limit - 1][0], order_by) if more else None)


def history_from_row(row: Any) -> HistoryEntry:
    """A row of (op, at, text, metadata, namespace) from ``history``."""
    return HistoryEntry(row[0], row[1], row[2], orjson.loads(row[3]) if row[3] is not None else None, row[4])


def vector_row(row: Any) -> VectorRow:
    """A row of ``VECTOR_COLUMNS`` and the searched vector."""
    return VectorRow(row[0], Scope(row[1], row[2], row[3], row[4]), row[5], row[6])


# A cursor is the last memory's sort key and rowid, in ASCII digits (int() takes "+5", "١٢"); one
# of a list ordered by occurred_at starts with "o", so it cannot be taken for the other order's.
CURSOR_PATTERN = r"o?[0-9]{1,18}\.[0-9]{1,18}"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
_CURSOR_PREFIX = {"created_at": "", "occurred_at": "o"}


def encode_cursor(memory: Memory, rowid: int, order_by: str = "created_at") -> str:
    key = memory.occurred_at if order_by == "occurred_at" else memory.created_at
    return f"{_CURSOR_PREFIX[order_by]}{key}.{rowid}"


def decode_cursor(cursor: str, order_by: str = "created_at") -> tuple[int, int]:
    """A cursor's sort key and rowid; refused if it was not given out for a list in ``order_by``."""
    if not _CURSOR_RE.fullmatch(cursor):
        raise InvalidInput("cursor is not one this server gave out; start again without it", path="cursor")
    given = "occurred_at" if cursor.startswith("o") else "created_at"
    if given != order_by:
        raise InvalidInput(
            f"cursor belongs to a list ordered by {given}, not {order_by}; pass order_by={given} with it, "
            "or start again without it", path="cursor")
    key, rowid = cursor.removeprefix("o").split(".")
    return int(key), int(rowid)
