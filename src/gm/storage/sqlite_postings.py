"""Keyword search at scale on SQLite: the keyword index's postings held in process, ranked
exactly as FTS5's ``bm25()`` ranks them, at a cost that follows the scope, not the database.

FTS5's ``bm25()`` counts every row each query word matches before it scores one (its idf):
at 1M memories a speaker's name is in 150,000-290,000 rows, 10-40 ms a word in every query,
even one scoped to a user (bench/keyword_maxscore.py). Here each word's rows are an array
sorted by the index's key (gm.storage.sqlite_keywords: a namespace's rows, and a user's, are
one range of it), its count a number kept current, and a ranking scores the rows holding the
scope's rarer words first (term-level MaxScore): the common words' parts are added for those
rows (scored into the scratch, or looked up, whichever costs less), and a row holding common
words only is skipped once their bounds cannot reach the page's last. The scores are FTS5's
to the bit: the same tokens (FTS5's tokenizer on an in-memory table of the index's
definition), lengths, statistics and formula, summed in the query's phrase order;
tests/test_sqlite_postings.py compares them.

:class:`Postings` is the index: a base read from the FTS5 table in one snapshot (the
``fts5vocab`` instance rows), and a tail of the rows written since, each with its tokens.
gm.storage.postings_follower keeps it in step with the write connection and builds it;
gm.storage.postings_file saves it beside the database.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from gm.context import CONTEXT_WEIGHT
from gm.errors import StoreClosed
from gm.storage.sqlite_keywords import ROWID_MASK, TABLE

log = logging.getLogger(__name__)

K1, B = 1.2, 0.75  # FTS5's bm25 constants (fts5_aux.c)
TOKENIZER = "porter unicode61 remove_diacritics 2"  # the index's (gm.storage.sqlite_rebuild.DEFINITION)
# Frequencies are kept in half counts (uint16): a word of the text counts 2, of the context 1,
# so FTS5's weighted frequency (text 1.0, context CONTEXT_WEIGHT) is half2 * 0.5, exactly.
assert CONTEXT_WEIGHT == 0.5, "the postings keep frequencies in half counts: CONTEXT_WEIGHT must be 0.5"
TAIL_ROWS = 20_000  # rows written since the base past which it is built again (and at least TAIL_SHARE of it)
TAIL_SHARE = 0.05
RARE = 20_000  # a word in at most this many rows of a scope is scored first (MaxScore's "essential")
# A word is looked up for the candidates (a binary search of its rows each) once they are fewer
# than its rows over this; until then scoring all its rows into the scratch costs less.
LOOKUP_COST = 4
TERMS_CACHED = 10_000  # query words whose tokens are remembered
# A word's half counts in one row past this (a long text and context repeating it 20,000 times)
# are kept clamped, and queries holding it ranked by FTS5.
MAX_HALVES = 0xFFFF

Doc = tuple[int, dict[str, int]]  # a row's length in tokens, and each token's half count
State = tuple[int, Doc] | None  # (key, doc) of a memory, or None: no such memory
Vector = npt.NDArray[np.float64]


class Tokenizer:
    """FTS5's own tokenizer: an in-memory FTS5 table of the index's columns and tokenizer,
    read back through ``fts5vocab``. One connection, shared under a lock."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.conn.execute(f"CREATE VIRTUAL TABLE t USING fts5 (text, context, tokenize='{TOKENIZER}')")
        self.conn.execute("CREATE VIRTUAL TABLE v USING fts5vocab (t, instance)")
        self.lock = threading.Lock()
        self.terms: dict[str, list[str]] = {}

    def _instances(self, rows: list[tuple[str | None, str | None]]) -> list[tuple[str, int, str, int]]:
        """Every (token, row, column, offset) of ``rows`` (text, context), in the table's order;
        the caller holds ``lock``. Nothing stays in the table (its transaction is rolled back)."""
        self.conn.execute("BEGIN")
        try:
            self.conn.executemany("INSERT INTO t (rowid, text, context) VALUES (?, ?, ?)",
                                  [(i, text, context) for i, (text, context) in enumerate(rows)])
            return self.conn.execute("SELECT term, doc, col, offset FROM v").fetchall()
        finally:
            self.conn.execute("ROLLBACK")

    def docs(self, rows: list[tuple[str | None, str | None]]) -> list[Doc]:
        """Each (text, context)'s length and half counts, as the index counts them."""
        out: list[tuple[list[int], dict[str, int]]] = [([0], {}) for _ in rows]
        if not rows:
            return []
        with self.lock:
            instances = self._instances(rows)
        for token, doc, column, _ in instances:
            length, counts = out[doc]
            length[0] += 1
            counts[token] = counts.get(token, 0) + (2 if column == "text" else 1)
        return [(length[0], counts) for length, counts in out]

    def tokens(self, terms: list[str]) -> list[list[str]]:
        """Each query term's tokens, in order (a quoted term is a phrase of them)."""
        with self.lock:
            known = {t: self.terms[t] for t in terms if t in self.terms}
            missing = [t for t in dict.fromkeys(terms) if t not in known]
            if missing:
                found: dict[int, list[tuple[int, str]]] = {}
                for token, doc, _, offset in self._instances([(term, None) for term in missing]):
                    found.setdefault(doc, []).append((offset, token))
                for i, term in enumerate(missing):
                    known[term] = [token for _, token in sorted(found.get(i, []))]
                if len(self.terms) + len(missing) > TERMS_CACHED:
                    self.terms.clear()
                self.terms.update(known)
            return [known[t] for t in terms]


@dataclass(slots=True)
class Base:
    """Every row of the FTS5 table at one snapshot: keys sorted, lengths, and each token's
    rows (positions in ``keys``, sorted) with half counts, one CSR block."""

    keys: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int32]
    vocabulary: dict[str, int]  # token -> its number
    starts: npt.NDArray[np.int64]  # token number -> its postings: rows[starts[i]:starts[i + 1]]
    rows: npt.NDArray[np.int32]
    halves: npt.NDArray[np.uint16]
    top_half: npt.NDArray[np.uint16]  # each token's largest half count
    shortest: npt.NDArray[np.int32]  # the length of each token's shortest row
    overflow: frozenset[str] = frozenset()  # tokens with a count past MAX_HALVES in a row (clamped)

    @property
    def nbytes(self) -> int:
        arrays = (self.keys, self.lengths, self.starts, self.rows, self.halves, self.top_half, self.shortest)
        return sum(a.nbytes for a in arrays)


def read_base(conn: sqlite3.Connection, table: str = TABLE, stopped: Callable[[], bool] = lambda: False) -> Base:
    """The base of the FTS5 table ``table`` as ``conn``'s open read transaction sees it: one
    statement, a row a token (``fts5vocab`` instance rows in token order, no sort), its rows and
    columns as text (a row an instance read into Python costs ~3x). At 1M memories of the peer
    benchmark (27.6M postings, 2,851 tokens): 35 s, 169 MiB held."""
    keys = np.array([r[0] for r in conn.execute(f"SELECT id FROM {table}_docsize ORDER BY id")], dtype=np.int64)
    conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.gm_postings USING fts5vocab (main, {table}, instance)")
    vocabulary: dict[str, int] = {}
    row_parts: list[npt.NDArray[np.int32]] = []
    half_parts: list[npt.NDArray[np.uint16]] = []
    lengths = np.zeros(len(keys), dtype=np.int32)  # a row's count of token instances, every column (FTS5's docsize)
    overflow: set[str] = set()
    for token, docs, columns in conn.execute(
        "SELECT term, group_concat(doc), group_concat(col = 'text', '') FROM temp.gm_postings GROUP BY term"
    ):
        if stopped():
            raise StoreClosed("the store closed while its keyword postings were read")
        at = np.searchsorted(keys, np.fromstring(docs, dtype=np.int64, sep=",")).astype(np.int32)
        weight = np.frombuffer(columns.encode(), dtype=np.uint8) - np.uint8(47)  # '1' (text) -> 2, '0' (context) -> 1
        first = np.flatnonzero(np.r_[True, at[1:] != at[:-1]])
        rows = at[first]
        vocabulary[token] = len(row_parts)
        row_parts.append(rows)
        halves = np.add.reduceat(weight.astype(np.uint32), first)
        if int(halves.max()) > MAX_HALVES:
            overflow.add(token)
        half_parts.append(np.minimum(halves, MAX_HALVES).astype(np.uint16))
        lengths[rows] += np.diff(np.r_[first, len(at)]).astype(np.int32)  # (a token's rows are distinct)
    counts = np.array([len(r) for r in row_parts], dtype=np.int64)
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    rows = np.concatenate(row_parts) if row_parts else np.empty(0, np.int32)
    del row_parts
    halves = np.concatenate(half_parts) if half_parts else np.empty(0, np.uint16)
    del half_parts
    top_half = np.zeros(len(counts), dtype=np.uint16)
    shortest = np.zeros(len(counts), dtype=np.int32)
    if len(rows):  # (every token of the vocabulary has a row)
        top_half[:] = np.maximum.reduceat(halves, starts[:-1])
        shortest[:] = np.minimum.reduceat(lengths[rows], starts[:-1])
    return Base(keys, lengths, vocabulary, starts, rows, halves, top_half, shortest, frozenset(overflow))


@dataclass(slots=True)
class _Side:
    """One token's rows in a key range: base positions and tail keys, with half counts."""

    base: npt.NDArray[np.int32]
    base_halves: npt.NDArray[np.uint16]
    tail: npt.NDArray[np.int64]
    tail_halves: npt.NDArray[np.uint16]
    hits: int  # rows of the whole table holding it (its idf)
    bound: float = 0.0

    def __len__(self) -> int:
        return len(self.base) + len(self.tail)


@dataclass(slots=True)
class _Tail:
    """A token's tail rows as sorted arrays, made when a search first needs them after a change."""

    keys: npt.NDArray[np.int64]
    halves: npt.NDArray[np.uint16]
    shortest: int  # the length of its shortest tail row


@dataclass
class Postings:
    """The keyword index in process: a :class:`Base` and the rows written since (the tail).
    Changes and rankings take ``lock``: a ranking reads one consistent state."""

    base: Base
    rows: int = 0  # FTS5's row count (every memory)
    tokens: int = 0  # FTS5's token count (every column of every row)
    live: npt.NDArray[np.bool_] = field(default_factory=lambda: np.empty(0, np.bool_))  # base rows still current
    dead: int = 0
    hits: dict[str, int] = field(default_factory=dict)  # token -> rows holding it, less the base's count
    tail: dict[int, Doc] = field(default_factory=dict)  # key -> the row written since the base
    tail_tokens: dict[str, dict[int, int]] = field(default_factory=dict)  # token -> key -> half count
    tail_keys: dict[int, int] = field(default_factory=dict)  # rowid -> its key in the tail
    overflow: set[str] = field(default_factory=set)  # tail tokens with a count past MAX_HALVES in a row
    _arrays: dict[str, _Tail] = field(default_factory=dict)
    _partial: Vector | None = None  # a ranking's scratch (under the lock): partial scores, a slot a base row
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: bool = True  # since they were read from or saved to their file (gm.storage.postings_file)
    saved_at: dict[str, Any] | None = None  # the database state that file is of

    @classmethod
    def of(cls, base: Base) -> Postings:
        return cls(base, rows=len(base.keys), tokens=int(base.lengths.sum()), live=np.ones(len(base.keys), np.bool_))

    @property
    def stale(self) -> bool:
        """Enough written since the base that building it again pays."""
        return len(self.tail) + self.dead > max(TAIL_ROWS, TAIL_SHARE * len(self.base.keys))

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.live.nbytes

    def apply(self, changes: Iterable[tuple[State, State]]) -> None:
        """Each (state held, current state) of a memory written: the first is what the index
        holds for it (its base row, unless the tail holds it), the second replaces it."""
        with self.lock:
            for before, after in changes:
                self.changed = True
                if before is not None:
                    self._remove(*before)
                if after is not None:
                    self._add(*after)

    def held(self, rowid: int, key: int | None, before: Doc | None) -> State:
        """What the index holds for memory ``rowid``: its tail row (under whatever key), else
        ``before`` if its base row under ``key`` (its key before) is current."""
        tail_key = self.tail_keys.get(rowid)
        if tail_key is not None:
            return tail_key, self.tail[tail_key]
        if key is None:
            return None
        at = int(np.searchsorted(self.base.keys, key))
        if at < len(self.base.keys) and self.base.keys[at] == key and self.live[at]:
            if before is None:
                raise ValueError(f"the keyword postings hold row {key} that the database says was absent")
            return key, before
        return None

    def _remove(self, key: int, doc: Doc) -> None:
        if self.tail.pop(key, None) is not None:
            del self.tail_keys[key & ROWID_MASK]
        else:
            at = int(np.searchsorted(self.base.keys, key))
            self.live[at] = False
            self.dead += 1
        self.rows -= 1
        self.tokens -= doc[0]
        for token in doc[1]:
            self.hits[token] = self.hits.get(token, 0) - 1
            rows = self.tail_tokens.get(token)
            if rows is not None and rows.pop(key, None) is not None:
                self._arrays.pop(token, None)

    def _add(self, key: int, doc: Doc) -> None:
        self.tail[key] = doc
        self.tail_keys[key & ROWID_MASK] = key
        self.rows += 1
        self.tokens += doc[0]
        for token, half in doc[1].items():
            self.hits[token] = self.hits.get(token, 0) + 1
            if half > MAX_HALVES:
                self.overflow.add(token)
            self.tail_tokens.setdefault(token, {})[key] = min(half, MAX_HALVES)
            self._arrays.pop(token, None)

    def ranks(self, tokens: list[str]) -> bool:
        """Whether these tokens' counts all fit the postings (FTS5 ranks a word past MAX_HALVES in a row)."""
        return not any(t in self.overflow or t in self.base.overflow for t in tokens)

    def _tail_of(self, token: str) -> _Tail:
        made = self._arrays.get(token)
        if made is None:
            rows = self.tail_tokens.get(token, {})
            keys = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
            halves = np.fromiter(rows.values(), dtype=np.uint16, count=len(rows))
            order = np.argsort(keys)
            shortest = min((self.tail[key][0] for key in rows), default=1 << 30)
            made = self._arrays[token] = _Tail(keys[order], halves[order], shortest)
        return made

    def top(self, tokens: list[str], low: int, high: int, k: int) -> tuple[list[tuple[int, float]], bool]:
        """The ``k`` best (key, score) of the rows keyed in [``low``, ``high``] holding any of
        ``tokens`` (one a query phrase, in order), best first, ties highest key first (newest:
        the key ends in the memory's rowid, and a range holds one namespace's, or user's);
        and whether they are every such row."""
        with self.lock:
            return self._top(tokens, low, high, k)

    def _top(self, tokens: list[str], low: int, high: int, k: int) -> tuple[list[tuple[int, float]], bool]:
        base = self.base
        first, last = np.searchsorted(base.keys, [low, high + 1])
        avgdl = self.tokens / self.rows if self.rows else 1.0  # (FTS5: nToken / nRow)
        sides: dict[str, _Side] = {}
        for token in dict.fromkeys(tokens):
            number = base.vocabulary.get(token)
            hits = self.hits.get(token, 0)
            if number is None:
                rows, halves = np.empty(0, np.int32), np.empty(0, np.uint16)
                top_half, shortest = 0, 1 << 30
            else:
                s, e = int(base.starts[number]), int(base.starts[number + 1])
                hits += e - s
                a, b = np.searchsorted(base.rows[s:e], [first, last]) + s
                rows, halves = base.rows[a:b], base.halves[a:b]
                top_half, shortest = int(base.top_half[number]), int(base.shortest[number])
            tail = self._tail_of(token) if token in self.tail_tokens else None
            if tail is not None and len(tail.keys):
                a, b = np.searchsorted(tail.keys, [low, high + 1])
                tail_keys, tail_halves = tail.keys[a:b], tail.halves[a:b]
                top_half, shortest = max(top_half, int(tail.halves.max())), min(shortest, tail.shortest)
            else:
                tail_keys, tail_halves = np.empty(0, np.int64), np.empty(0, np.uint16)
            side = _Side(rows, halves, tail_keys, tail_halves, hits)
            # No row scores more for it than its largest count in its shortest row would.
            bound = _part(self._idf(hits), np.array([top_half * 0.5]), np.array([float(shortest)]), avgdl)
            side.bound = float(bound[0]) * (1 + 1e-9)
            sides[token] = side
        return self._best(tokens, sides, avgdl, k)

    def _best(self, tokens: list[str], sides: dict[str, _Side], avgdl: float,
              k: int) -> tuple[list[tuple[int, float]], bool]:
        """MaxScore over the range's base rows (their partial scores in a dense scratch array,
        one slot a base row: scattering a word's rows costs less than merging lists, and only
        the slots touched are read and reset; a slot above 0 is a row touched, as every part is)
        and its tail rows."""
        if self._partial is None or len(self._partial) != len(self.base.keys):
            self._partial = np.zeros(len(self.base.keys))
        partial = self._partial
        found: list[npt.NDArray[np.int32]] = []  # the base rows the scored words hold, each once
        try:
            return self._rank(tokens, sides, avgdl, k, partial, found)
        finally:
            for rows in found:
                partial[rows] = 0.0

    def _rank(self, tokens: list[str], sides: dict[str, _Side], avgdl: float, k: int, partial: Vector,
              found: list[npt.NDArray[np.int32]],
              ) -> tuple[list[tuple[int, float]], bool]:
        base = self.base
        times = {t: tokens.count(t) for t in sides}
        ordered = sorted(sides, key=lambda t: len(sides[t]))
        essential = [t for t in ordered if 0 < len(sides[t]) <= RARE] or ordered[:1]
        others = [t for t in ordered if t not in essential]
        tail = np.unique(np.concatenate([np.empty(0, np.int64), *(side.tail for side in sides.values())]))
        tail_lengths = np.array([self.tail[int(key)][0] for key in tail], dtype=np.float64)
        tail_partial = np.zeros(len(tail))
        no_rows = np.empty(0, np.int32)

        def scatter(token: str) -> npt.NDArray[np.int32]:
            """Add ``token``'s parts to its rows' partial scores; its rows that held a word scored before."""
            side = sides[token]
            lengths = base.lengths[side.base].astype(np.float64)
            halves = side.base_halves.astype(np.float64) * 0.5
            before = partial[side.base]
            held = before > 0.0
            found.append(side.base[~held])  # (before the slots change: reset whatever happens next)
            partial[side.base] = before + _part(self._idf(side.hits), halves, lengths, avgdl) * times[token]
            tail_partial[:] += self._parts(side, no_rows, tail, tail_lengths, avgdl) * times[token]
            return side.base[held]

        def kth(rows: npt.NDArray[np.int32]) -> float:
            """The k-th best partial score among base ``rows`` (live) and the tail's rows (0: fewer)."""
            scores = np.concatenate([partial[rows], tail_partial[tail_partial > 0]])
            return float(np.partition(scores, len(scores) - k)[len(scores) - k]) if len(scores) >= k else 0.0

        def bound(token: str) -> float:
            return sides[token].bound * times[token]

        for token in essential:
            scatter(token)
        live = np.concatenate(found)
        tenth = kth(live[self.live[live]])
        rest = sum(bound(t) for t in others)
        # MaxScore: a word joins the scored ones while the words left could lift a row holding none
        # of the scored ones to the tenth best. Past the first, the tenth is bounded below by the
        # k-th best of a part of the rows touched: those holding two scored words or more (the word
        # just scored's rows that held one before, where the best rows usually are), or that word's
        # rows if fewer than k held one. Ordering every row touched after each word cost a
        # whole-namespace query of common words alone (1M memories, 45k-150k rows a word) a
        # quarter of its time.
        while others and rest >= tenth:
            token = max(others, key=bound)
            others.remove(token)
            rest -= bound(token)
            held = scatter(token)
            part = held if len(held) >= k else sides[token].base
            tenth = max(tenth, kth(part[self.live[part]]))
        live = np.concatenate(found)
        live = live[self.live[live]]
        complete = not others and len(live) + int(np.count_nonzero(tail_partial > 0)) <= k
        tenth *= 1 - 1e-9  # (sums in another order differ by a few ulps: FTS5's order is taken below)
        rows = live[partial[live] + rest >= tenth]
        keys = tail[(tail_partial > 0) & (tail_partial + rest >= tenth)]
        def scored(rows: npt.NDArray[np.int32], keys: npt.NDArray[np.int64]) -> Vector:
            """The partial scores of the base ``rows``, then of the tail rows ``keys``."""
            return np.concatenate([partial[rows], tail_partial[np.isin(tail, keys)]])

        so_far = scored(rows, keys)
        # The other words' parts for the candidates, the largest bound first: each tightens both
        # the tenth best (a partial score never exceeds the score) and what the words left could
        # add, so the candidates thin out before the next word. A word is scored into the scratch
        # while that costs less than looking it up for each candidate (a binary search of its rows
        # each), then looked up.
        lengths: Vector | None = None  # the candidates' (once a word is looked up)
        for token in sorted(others, key=lambda t: -bound(t)):
            rest -= bound(token)
            side = sides[token]
            if lengths is None and len(rows) * LOOKUP_COST >= len(side.base):
                scatter(token)
                so_far = scored(rows, keys)
            else:
                if lengths is None:
                    lengths = self._lengths(rows, keys)
                so_far += self._parts(side, rows, keys, lengths, avgdl) * times[token]
            if len(so_far) >= k:
                tenth = max(tenth, float(np.partition(so_far, len(so_far) - k)[len(so_far) - k]) * (1 - 1e-9))
            keep = so_far + rest >= tenth
            rows, keys, so_far = rows[keep[: len(rows)]], keys[keep[len(rows):]], so_far[keep]
            if lengths is not None:
                lengths = lengths[keep]
        if lengths is None:
            lengths = self._lengths(rows, keys)
        exact = np.zeros(len(rows) + len(keys))
        for token in tokens:  # phrase order, as FTS5 sums
            exact += self._parts(sides[token], rows, keys, lengths, avgdl)
        if len(exact) > k:  # (the k best and their ties first: ordering every candidate costs more)
            kth_exact = np.partition(exact, len(exact) - k)[len(exact) - k]
            keep = exact >= kth_exact
            rows, keys, exact = rows[keep[: len(rows)]], keys[keep[len(rows):]], exact[keep]
        every = np.concatenate([base.keys[rows], keys])
        order = np.lexsort((-(every & ROWID_MASK), -exact))[:k]  # (ties: newest memory first, as FTS5's order)
        return [(int(every[i]), float(exact[i])) for i in order], complete

    def _idf(self, hits: int) -> float:
        value = math.log((self.rows - hits + 0.5) / (hits + 0.5))
        return value if value > 0.0 else 1e-6

    def _lengths(self, rows: npt.NDArray[np.int32], keys: npt.NDArray[np.int64]) -> Vector:
        """The lengths of the base rows ``rows``, then of the tail rows ``keys``."""
        return np.concatenate([self.base.lengths[rows].astype(np.float64),
                               np.array([self.tail[int(key)][0] for key in keys], dtype=np.float64)])

    def _parts(self, side: _Side, rows: npt.NDArray[np.int32], keys: npt.NDArray[np.int64], lengths: Vector,
               avgdl: float) -> Vector:
        """``side``'s token's part of the score of each base row ``rows``, then each tail row
        ``keys`` (of ``lengths``)."""
        f = np.concatenate([_lookup(side.base, side.base_halves, rows), _lookup(side.tail, side.tail_halves, keys)])
        present = f > 0
        return np.where(present, _part(self._idf(side.hits), f * 0.5, lengths, avgdl), 0.0)


def _lookup(have: npt.NDArray[np.int64] | npt.NDArray[np.int32], halves: npt.NDArray[np.uint16],
            want: npt.NDArray[np.int64] | npt.NDArray[np.int32]) -> Vector:
    """The half count of each of ``want`` in the sorted ``have`` (0 where absent)."""
    if not len(have) or not len(want):
        return np.zeros(len(want))
    at = np.minimum(np.searchsorted(have, want), len(have) - 1)
    return np.where(have[at] == want, halves[at], 0).astype(np.float64)


def _part(idf: float, f: Vector, lengths: Vector, avgdl: float) -> Vector:
    """FTS5's bm25 term, operation for operation (fts5Bm25Function)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return idf * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * lengths / avgdl)))
