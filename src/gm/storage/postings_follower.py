"""Keeping the keyword postings (gm.storage.sqlite_postings) in step with SQLite's one write
connection, and building them: from the file saved beside the database, else from FTS5.

Temp triggers on the write connection note each memory a transaction touches, with its key,
text and context as they were before it (once). After the transaction, committed or rolled
back, those rows are read back and what changed applied, on the writer's thread, before the
Writer replies: a search after a write sees it. What the postings hold for a row is their tail's
row if they have one, else the state before the transaction (their base row, if current), so
applying a row twice changes nothing. A build takes its snapshot between two transactions, and
applies the rows written since (they are noted meanwhile) before it publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from gm import heap, loops
from gm.errors import StoreClosed
from gm.storage.sqlite_keywords import TABLE, key_sql
from gm.storage.sqlite_postings import Postings, State, Tokenizer, read_base

log = logging.getLogger(__name__)

# A transaction touching this many memories is a bulk write (an import): the postings are set
# aside rather than follow it (tokenizing runs ~10,000 rows/s here), and built again once no bulk
# write came for QUIET_SECONDS; FTS5 ranks meanwhile.
BULK = 1000
QUIET_SECONDS = 2.0
CATCH_UP = 500  # rows written during a build it applies while holding up the writer; more, it applies first
ROUNDS = 5  # rounds of applying those first, after which the rest is applied holding it up (a writer outrunning it)
FIRST_RETRY_SECONDS = 5.0  # after a failed build; doubled after each failure, up to MAX_RETRY_SECONDS
MAX_RETRY_SECONDS = 300.0

TOUCH = "gm_postings_touch"  # the temp triggers' function: (rowid, key before, text before, context before)
TRIGGERS = [
    f"CREATE TEMP TRIGGER gm_postings_insert AFTER INSERT ON main.memories "
    f"BEGIN SELECT {TOUCH}(new.rowid, NULL, NULL, NULL); END",
    f"CREATE TEMP TRIGGER gm_postings_delete AFTER DELETE ON main.memories "
    f"BEGIN SELECT {TOUCH}(old.rowid, {key_sql('old')}, old.text, old.context); END",
    f"CREATE TEMP TRIGGER gm_postings_update AFTER UPDATE OF text, context, namespace, user_id ON main.memories "
    f"BEGIN SELECT {TOUCH}(old.rowid, {key_sql('old')}, old.text, old.context); END",
]
STATES = (f"SELECT m.rowid, {key_sql('m')}, m.text, m.context FROM memories m "
          "WHERE m.rowid IN (SELECT value FROM json_each(?))")
Row = tuple[int, str | None, str | None]  # a memory's key, text and context


def _rows(conn: sqlite3.Connection, rowids: Iterable[int]) -> dict[int, Row]:
    """The key, text and context of each memory of ``rowids`` that exists, as ``conn`` sees them."""
    ids = list(rowids)
    found: dict[int, Row] = {}
    for at in range(0, len(ids), 10_000):
        chunk = "[" + ",".join(map(str, ids[at: at + 10_000])) + "]"
        for rowid, key, text, context in conn.execute(STATES, [chunk]):
            found[rowid] = (key, text, context)
    return found


class Saved(Protocol):
    """The postings saved beside the database (gm.storage.postings_file)."""

    def load(self) -> tuple[Postings, dict[str, Any]] | None:
        """The saved postings and the database state they are of; None if there are none whole."""

    def state(self) -> dict[str, Any]:
        """The database's state now."""


class PostingsFollower:
    """Keeps :class:`Postings` in step with the database's one write connection, and builds
    them. ``frame`` is held by the write connection from BEGIN until the transaction's changes
    are applied (:meth:`after`), and by a build while it takes its snapshot and while it
    switches: so a build's snapshot falls between transactions, and every transaction after it
    is applied to the new postings, either by the build (the rows it touched, read then) or
    after it."""

    def __init__(self, path: Path, on_stale: Callable[[], None], saved: Saved | None = None) -> None:
        self.path = path
        self.on_stale = on_stale  # (called on the writer's thread: the postings should be built again)
        self.saved = saved
        self.postings: Postings | None = None
        self.tokenizer = Tokenizer()
        self.frame = threading.Lock()
        self._touched: dict[int, Row | None] = {}  # this transaction's memories, as they were before it
        self._pending: set[int] | None = None  # while a build runs: the memories written since its snapshot
        self._building: list[sqlite3.Connection] = []
        self._one_build = threading.Lock()  # (builds one at a time: each resets the pending rows)
        self._file_tried = False
        self._closed = False
        self.refresh = False  # build again though the postings are current (the FTS5 table was rebuilt)
        self._bulk_at = -QUIET_SECONDS  # (time.monotonic) the last bulk write
        self._chased = False  # a bulk write came during the build under way: it stops, unpublished

    def install(self, conn: sqlite3.Connection) -> None:
        """Note the memories each transaction of ``conn`` (the write connection) touches."""
        conn.create_function(TOUCH, 4, self._touch)
        for sql in TRIGGERS:
            conn.execute(sql)

    def _touch(self, rowid: int, key: int | None, text: str | None, context: str | None) -> None:
        if rowid not in self._touched:  # (the first: the state before the transaction)
            self._touched[rowid] = None if key is None else (key, text, context)

    def after(self, conn: sqlite3.Connection) -> None:
        """After a transaction of the write connection (committed or rolled back): apply what
        it changed. Never raises: postings that fail to follow are dropped and built again."""
        touched, self._touched = self._touched, {}
        if not touched:
            return
        if len(touched) >= BULK:  # (an import: tokenizing its rows here would slow it by half)
            # Every bulk write counts, also one while the postings are set aside or being built: a
            # build chasing an import tokenized each of its rows (gmem import of 100k: 13.9 -> 10.0 s).
            self._bulk_at = time.monotonic()
            if self._pending is not None:
                self._chased = True  # (the build under way stops; built again once writes are quiet)
            if self.postings is not None:
                log.info("keyword postings set aside during a bulk write; FTS5 serves until they are built again")
                self.postings = None
            self.on_stale()
            return
        if self._pending is not None:
            self._pending.update(touched)
        postings = self.postings
        if postings is None:
            return
        try:
            self._follow(postings, touched, _rows(conn, touched))
        except Exception:
            log.exception("the keyword postings failed to follow a write; building them again (FTS5 serves meanwhile)")
            self.postings = None
            self.on_stale()
            return
        if postings.stale:
            self.on_stale()

    def _follow(self, postings: Postings, before: dict[int, Row | None], now: dict[int, Row]) -> None:
        """Make ``postings`` hold each memory of ``before`` (its state before, which the postings
        hold unless their tail does) as it is ``now``."""
        changed = [r for r in before if before[r] != now.get(r) or r in postings.tail_keys]
        docs = iter(self.tokenizer.docs(
            [(b[1], b[2]) for r in changed if (b := before[r]) is not None]
            + [(n[1], n[2]) for r in changed if (n := now.get(r)) is not None]))
        old = {r: next(docs) for r in changed if before[r] is not None}
        changes: list[tuple[State, State]] = []
        for rowid in changed:
            was, current = before[rowid], now.get(rowid)
            new: State = (current[0], next(docs)) if current is not None else None
            # (its base row is under the key it had before; its tail row, if any, is found by rowid)
            held = postings.held(rowid, was[0] if was is not None else None, old.get(rowid))
            if held != new:
                changes.append((held, new))
        postings.apply(changes)

    def build(self) -> Postings | None:
        """Publish the postings: read from their file (once an open), else from the FTS5
        table, on a thread of its own. The rows written while they are read from FTS5 are
        applied in rounds, outside ``frame``, until few are left (or ROUNDS went by): those are
        applied under it, and the postings published. None if the store closed meanwhile, or a bulk
        write came (it is built again once writes are quiet)."""
        with self._one_build:
            started = time.perf_counter()
            if self._read_file():
                return self.postings
            snapshot, current = (sqlite3.connect(f"file:{self.path.resolve()}?mode=ro", uri=True,
                                                 isolation_level=None, check_same_thread=False) for _ in range(2))
            self._building = [snapshot, current]
            try:
                with self.frame:
                    snapshot.execute("BEGIN")
                    snapshot.execute(f"SELECT 1 FROM {TABLE}_docsize LIMIT 1").fetchall()  # (the snapshot)
                    self._pending, self._chased = set(), False
                try:
                    postings = Postings.of(read_base(snapshot, stopped=lambda: self._closed or self._chased))
                except StoreClosed:
                    if self._closed:
                        raise
                    self._stopped_by_bulk()
                    return None
                for round_ in range(ROUNDS + 1):
                    with self.frame:
                        if self._chased:
                            self._stopped_by_bulk()
                            return None
                        pending, self._pending = self._pending, set()
                        if len(pending) <= CATCH_UP or round_ == ROUNDS:
                            self._catch_up(postings, snapshot, current, pending)
                            if self._closed:
                                return None
                            self.postings = postings
                            break
                    self._catch_up(postings, snapshot, current, pending)
            finally:
                with self.frame:
                    self._pending = None
                self._building = []
                snapshot.close()
                current.close()
            log.info("keyword postings of %s built: %d rows, %d tokens, %.0f MiB, in %.1f s", self.path, postings.rows,
                     len(postings.base.vocabulary), postings.nbytes / 2**20, time.perf_counter() - started)
            heap.trim()  # (the rows read and tokenized to build them, freed)
            return postings

    def _stopped_by_bulk(self) -> None:
        log.info("the keyword postings build of %s stopped for a bulk write: built once writes are quiet", self.path)

    def _read_file(self) -> bool:
        """Publish the postings saved beside the database, if they are whole and of the
        database as it is (checked between two transactions): True if so. Tried once an open."""
        if self._file_tried or self.saved is None:
            return False
        self._file_tried = True
        found = self.saved.load()
        if found is None:
            return False
        with self.frame:
            if found[1] != self.saved.state():
                log.info("the saved keyword postings are of an earlier state of %s: building them", self.path)
                return False
            if not self._closed:
                self.postings = found[0]
        return True

    def _catch_up(self, postings: Postings, snapshot: sqlite3.Connection, current: sqlite3.Connection,
                  rows: set[int]) -> None:
        """Apply the memories ``rows`` as they are now: their base rows are as ``snapshot`` sees them."""
        then = _rows(snapshot, rows)
        self._follow(postings, {r: then.get(r) for r in rows}, _rows(current, rows))

    def close(self) -> None:
        """The store closes: a build under way stops at its next statement or token (any thread)."""
        self._closed = True
        for conn in list(self._building):
            with contextlib.suppress(sqlite3.ProgrammingError):  # (closed by the build meanwhile)
                conn.interrupt()

    def wanted(self) -> bool:
        """Whether a build is called for: none yet, a long tail, or asked (``refresh``)."""
        postings = self.postings
        return postings is None or postings.stale or self.refresh

    def quiet(self) -> bool:
        """No bulk write lately: a build now will not be chasing one."""
        return time.monotonic() - self._bulk_at >= QUIET_SECONDS

    def top(self, terms: list[str], low: int, high: int, k: int) -> tuple[list[tuple[int, float]], bool] | None:
        """The postings' ranking of a scope's range (:meth:`Postings.top`); None if there are
        none yet, a term is not one token (FTS5 ranks a phrase) or a count is past them."""
        postings = self.postings
        if postings is None:
            return None
        tokens = self.tokenizer.tokens(terms)
        if any(len(t) != 1 for t in tokens) or not postings.ranks([t[0] for t in tokens]):
            return None
        return postings.top([t[0] for t in tokens], low, high, k)


async def keep(follower: PostingsFollower, wanted: asyncio.Event, ready: Callable[[], bool]) -> None:
    """Build ``follower``'s postings whenever ``wanted`` is set, one is called for and
    ``ready()`` (the FTS5 table is keyed and not being rebuilt); a failed build is tried again
    after a pause, doubled each time."""
    pause = FIRST_RETRY_SECONDS
    while True:
        await wanted.wait()
        wanted.clear()
        while not follower.quiet():
            await loops.pause(QUIET_SECONDS)
        if not ready() or not follower.wanted():
            continue
        follower.refresh = False
        try:
            await asyncio.to_thread(follower.build)
            pause = FIRST_RETRY_SECONDS
        except StoreClosed:
            return
        except Exception as exc:
            log.warning("building the keyword postings of %s: %s; will retry in %.0f s (FTS5 serves meanwhile)",
                        follower.path, exc, pause)
            await loops.pause(pause)
            pause = min(2 * pause, MAX_RETRY_SECONDS)
            wanted.set()
