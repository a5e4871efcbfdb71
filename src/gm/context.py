"""Session context: what a memory is indexed with beside its own text. Memories that share
a ``session_id`` are turns of one conversation, and a turn like "Yes, last Tuesday!" means
little alone, so the keyword index also holds a second column, ``context`` (the memory's
date in words and its neighbours' text), and the vector index searches the memory's own
embedding mixed with its predecessors' (``search_embedding``). The memory's text and its
stored embedding stay its own.

The windows were chosen by leave-one-conversation-out cross-validation on the LoCoMo dev
split (docs/retrieval-study.md): the keyword side takes the 2 previous turns and the next
one, the vector side the 2 previous embeddings at a quarter weight each. A session is
ordered by (occurred_at, rowid). The Writers keep context current in the transaction that
writes: :func:`refresh` recomputes the turns whose window a write touched, over the small
:class:`SessionRows` protocol each backend implements with its own SQL.
"""

from __future__ import annotations

import abc
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from gm import loops
from gm.memory import Memory, Scope
from gm.storage.base import Backend, BuildContext, IndexChange

log = logging.getLogger(__name__)

KEYWORD_PREVIOUS = 2  # turns before a memory whose text goes into its context column
KEYWORD_NEXT = 1  # turns after it (so an answer finds the question it answers)
VECTOR_PREVIOUS = 2  # embeddings before it mixed into the vector the index searches
VECTOR_MIX = 0.25  # each one's weight beside the memory's own (1.0)
CONTEXT_WEIGHT = 0.5  # a context word counts half a word of the memory's own text (BM25 column weight)
# The turns whose window holds a changed position: the KEYWORD_NEXT before it (their next
# turns) and the _REACH at or after it (their previous ones); and the rows fetched around
# it to recompute them, each with its own window.
_REACH = 1 + max(KEYWORD_PREVIOUS, VECTOR_PREVIOUS)
_BEFORE = KEYWORD_NEXT + max(KEYWORD_PREVIOUS, VECTOR_PREVIOUS)
_AFTER = _REACH + KEYWORD_NEXT
WHOLE_SESSION_CHECK = 4  # more places than this in one session: first look whether any of it is left


def date_words(ms: int) -> str:
    """A time as words a question can match: ``Monday 8 May 2023`` (UTC)."""
    return _day_words(ms // DAY_MS)


DAY_MS = 86_400_000


@functools.lru_cache(maxsize=4096)  # (an import of a year's memories formats each day once: 20 us a row saved)
def _day_words(day: int) -> str:
    moment = datetime.fromtimestamp(day * 86_400, UTC)
    return f"{moment:%A} {moment.day} {moment:%B %Y}"


@dataclass(slots=True)
class Turn:
    """A memory of a session as the context needs it, with what is stored for it now."""

    rowid: int
    text: str
    occurred_at: int
    embedding: bytes | None  # None: the next model's not made yet (the next columns, gm.reembed)
    context: str | None
    search_embedding: bytes | None
    scope: Scope
    expires_at: int | None


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a session's order where a write added, changed or removed a memory."""

    namespace: str
    session_id: str
    occurred_at: int
    rowid: int


def context_of(turns: list[Turn], i: int) -> str:
    """The context column of ``turns[i]``: its date in words, then the text of the turns
    around it in session order (the list holds the session, or enough of it around i)."""
    around = turns[max(0, i - KEYWORD_PREVIOUS) : i] + turns[i + 1 : i + 1 + KEYWORD_NEXT]
    return "\n".join([date_words(turns[i].occurred_at), *(t.text for t in around)])


def search_embedding_of(turns: list[Turn], i: int) -> bytes | None:
    """The vector the index searches for ``turns[i]``: its own embedding plus VECTOR_MIX of
    each previous one, renormalised; None when it has no predecessor (its own is used)."""
    previous = [t.embedding for t in turns[max(0, i - VECTOR_PREVIOUS) : i] if t.embedding is not None]
    own = turns[i].embedding
    if not previous or own is None:  # (a neighbour the next model has not embedded yet joins the mix once it is)
        return None
    return mix(own, previous)


def mix(own: bytes, previous: list[bytes]) -> bytes:
    vector = np.frombuffer(own, dtype=np.float32).copy()
    for other in previous:
        vector += VECTOR_MIX * np.frombuffer(other, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32).tobytes()


def context_moves(old: Memory, new: Memory, rowid: int) -> list[Position]:
    """Where an update changed a session's context: the memory's place, if its text moved
    (changed) there, and its old place too if its event time moved it."""
    if old.session_id is None or (old.text == new.text and old.occurred_at == new.occurred_at):
        return []
    places = [Position(new.namespace, old.session_id, new.occurred_at, rowid)]
    if old.occurred_at != new.occurred_at:
        places.append(Position(old.namespace, old.session_id, old.occurred_at, rowid))
    return places


def deleted_positions(rows: list[Any]) -> list[Position]:
    """The session places a delete emptied, from rows of (rowid, id, text, metadata,
    namespace, session_id, occurred_at)."""
    return [Position(r[4], r[5], r[6], r[0]) for r in rows if r[5] is not None]


ORDER_KEY = "coalesce(occurred_at, created_at)"  # a session's order: event time, then rowid (its index holds it)


def turn_columns(next: bool = False) -> str:
    """The columns of a turn: with ``next``, the next model's vectors (gm.reembed)."""
    suffix = "_next" if next else ""
    return (f"rowid, text, {ORDER_KEY}, embedding{suffix}, context, search_embedding{suffix}, "
            "namespace, user_id, agent_id, session_id, expires_at")


TURN_COLUMNS = turn_columns()


def _blob(value: Any) -> bytes | None:
    return bytes(value) if value is not None else None


def turn_from_row(row: Any) -> Turn:
    return Turn(row[0], row[1], row[2], _blob(row[3]), row[4], _blob(row[5]), Scope(row[6], row[7], row[8], row[9]),
                row[10])


def window_sql(at: Position, before: bool, limit: int, param: Callable[[Any], str], next: bool = False) -> str:
    """The turns of ``at``'s session before it (nearest first) or at and after it, as SQL
    both backends run (``param`` gives each value's placeholder); the session-order index
    ``memories_by_session_order`` serves it."""
    key = ORDER_KEY
    session = f"namespace = {param(at.namespace)} AND session_id = {param(at.session_id)}"  # (placeholders in order)
    if before:  # (key, rowid) < (t, r), spelt so SQLite ranges the index on key (a row value it would not)
        place = f"{key} <= {param(at.occurred_at)} AND ({key} < {param(at.occurred_at)} OR rowid < {param(at.rowid)})"
    else:
        place = f"{key} >= {param(at.occurred_at)} AND ({key} > {param(at.occurred_at)} OR rowid >= {param(at.rowid)})"
    order = "DESC" if before else "ASC"
    return (
        f"SELECT {turn_columns(next)} FROM memories WHERE {session} AND {place} "
        f"ORDER BY {key} {order}, rowid {order} LIMIT {param(limit)}"
    )


class SessionRows(abc.ABC):
    """What :func:`refresh` asks of a Writer, inside its transaction. With ``next`` they are
    the next model's vectors of a re-embed under way (gm.reembed): only search vectors are
    refreshed, the context column being shared by both."""

    next = False

    @abc.abstractmethod
    async def around(self, at: Position, before: int, after: int) -> list[Turn]:
        """Up to ``before`` turns of the session strictly before ``at`` and up to ``after``
        at or after it, in session order."""

    @abc.abstractmethod
    async def store(self, turn: Turn, context: str | None, search_embedding: bytes | None) -> None:
        """Write a turn's new context (None: keep it) and search embedding (and whatever index
        follows them)."""

    @abc.abstractmethod
    async def missing(self, limit: int) -> list[tuple[int, str, str | None, int]]:
        """Up to ``limit`` memories without context, oldest rows first: (rowid, namespace,
        session_id, occurred_at)."""

    @abc.abstractmethod
    async def store_alone(self, contexts: list[tuple[int, str]]) -> None:
        """Write the context of memories without a session: (rowid, context)."""


MISSING_SQL = (
    f"SELECT rowid, namespace, session_id, {ORDER_KEY} FROM memories "
    "WHERE context IS NULL ORDER BY rowid LIMIT {limit}"
)


async def build_missing(rows: SessionRows, limit: int) -> tuple[int, list[IndexChange]]:
    """Build the context of up to ``limit`` memories that have none (the backfill's one
    write): how many, and the index changes for their new search vectors."""
    found = await rows.missing(limit)
    await rows.store_alone([(rowid, date_words(at)) for rowid, _, session, at in found if session is None])
    places = [Position(ns, session, at, rowid) for rowid, ns, session, at in found if session is not None]
    return len(found), await refresh(rows, places)


async def refresh(rows: SessionRows, positions: list[Position]) -> list[IndexChange]:
    """Recompute the context and search embedding of every turn whose window holds one of
    ``positions`` (taken after the writes, so each is computed once from the final state);
    returns the index changes for the turns whose search vector changed."""
    done: set[int] = set()
    changes: list[IndexChange] = []
    sessions: dict[tuple[str, str], int] = {}
    for at in positions:
        sessions[at.namespace, at.session_id] = sessions.get((at.namespace, at.session_id), 0) + 1
    emptied = set()
    for (namespace, session_id), count in sessions.items():
        # A delete of a whole session (or namespace) leaves nothing to refresh: one look saves
        # a look around each of its places.
        if count > WHOLE_SESSION_CHECK and not await rows.around(Position(namespace, session_id, -1, -1), 0, 1):
            emptied.add((namespace, session_id))
    for at in positions:
        if (at.namespace, at.session_id) in emptied:
            continue
        turns = await rows.around(at, _BEFORE, _AFTER)
        first = sum(1 for t in turns if (t.occurred_at, t.rowid) < (at.occurred_at, at.rowid))
        for i in range(max(0, first - KEYWORD_NEXT), min(len(turns), first + _REACH)):
            turn = turns[i]
            if turn.rowid in done:
                continue
            done.add(turn.rowid)
            if rows.next and turn.embedding is None:
                continue  # the next model has not embedded it yet: done when it has
            context = turn.context if rows.next else context_of(turns, i)
            search = search_embedding_of(turns, i)
            if context == turn.context and search == turn.search_embedding:
                continue
            await rows.store(turn, None if rows.next else context, search)
            if search != turn.search_embedding:
                vector = search if search is not None else turn.embedding
                changes.append(IndexChange(turn.rowid, vector=vector, scope=turn.scope, expires_at=turn.expires_at,
                                           next=rows.next))
    return changes


BACKFILL_BATCH = 500  # memories a backfill write builds: short enough not to hold up other writes
PROGRESS_SECONDS = 5.0  # how often the backfill logs its progress
BACKFILL_IDLE_SECONDS = 60.0  # then it looks again (an older release may still be writing rows without context)


async def backfill_forever(backend: Backend) -> None:
    """Build the context of every memory that has none, in small writes through the Writer
    (searches stay correct meanwhile: such a memory is found by its own text and vector),
    logging progress; the work is kept in the rows themselves, so a restart resumes it."""
    while True:
        try:
            waiting = await backend.without_context()
            if waiting:
                log.info("session context: building it for %d memories", waiting)
                started, built, said = time.perf_counter(), 0, time.perf_counter()
                while count := await backend.write(BuildContext(BACKFILL_BATCH)):
                    built += count
                    if time.perf_counter() - said >= PROGRESS_SECONDS:
                        log.info("session context: %d of %d memories built", built, waiting)
                        said = time.perf_counter()
                log.info("session context: built for %d memories in %.1fs", built, time.perf_counter() - started)
        except Exception as exc:
            log.warning("session context backfill: %s; will retry", getattr(exc, "message", exc))
        await loops.pause(BACKFILL_IDLE_SECONDS)
