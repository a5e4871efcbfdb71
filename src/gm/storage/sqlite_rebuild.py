"""The online rebuild of SQLite's keyword index: a new FTS5 table filled beside the live one in
short steps on the Writer, resumable from a cursor in ``meta``, then switched in one transaction.
It builds the index as this release defines it, keyed by scope (gm.storage.sqlite_keywords); an
index of an older definition (schema v3's) is rebuilt so by the backend itself after open.

While it is built, ``memories_search_next`` is kept in step by triggers for the rows already
copied (rowid <= the cursor); rows past the cursor are copied later as they are then, so each
row is indexed exactly once. Searches read ``memories_search`` until the switch, which drops it
and renames the new table into its place. A kill at any point leaves either the old index
whole or the new one whole; the half-built table and its cursor stay for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gm.errors import Conflict, DatabaseUnusable, SchemaError, StorageUnavailable
from gm.progress import Meter, OnProgress
from gm.storage.ops import RebuildStep
from gm.storage.sqlite_keywords import BATCH_SLOTS, KEYED_VERSION, key_sql, slots_sql
from gm.storage.sqlite_writer import SQLiteTransaction, WriteConnection, drive
from gm.storage.transaction import Transaction

if TYPE_CHECKING:
    from gm.storage.sqlite import SQLiteBackend

log = logging.getLogger(__name__)

LIVE = "memories_search"
NEXT = "memories_search_next"
CURSOR = "keyword_rebuild_cursor"  # meta: the last rowid copied into NEXT
PHASE = "keyword index"
# Rows a step copies: a write queued behind a step waits for it. 1,000 memories of 10-40 words
# take 10-12 ms p50 here (2,000: 38 ms, for no faster a rebuild; bench/reindex_keyword.py).
BATCH = 1000
# Pages a merge step of the new index writes (FTS5's incremental 'optimize'): 26 ms p50, 72 ms
# max here. The copy leaves its segments as inserts made them; merged into one, the term
# statistics BM25 reads in every search cost half as much (bench/keyword_scope.py: at 1M
# memories 7.1 -> 4.2 ms p50), and a scoped search with them.
MERGE_PAGES = 100
STEP_ATTEMPTS = 5  # a write into a damaged index fails its whole batch, a step beside it too
# The latest definition of the keyword index: what a rebuild builds (a release that changes it
# changes it here, and the index is rebuilt online). Schema v3 created the index with external
# content keyed by memories.rowid; this one holds the same tokens keyed by scope, and no content
# of its own (it never reads the texts back: BM25 needs only its own statistics).
DEFINITION = "text, context, content='', tokenize='porter unicode61 remove_diacritics 2'"
MAX_ROWID = (1 << 63) - 1


def _table_sql(name: str) -> str:
    return f"CREATE VIRTUAL TABLE {name} USING fts5 ({DEFINITION})"


def keyed(sql: str | None) -> bool:
    """Whether a keyword table's CREATE statement (from sqlite_master) is of DEFINITION."""
    if sql is None or "USING" not in sql:
        return False
    return "".join(sql.split("USING", 1)[1].split()) == "".join(f"fts5 ({DEFINITION})".split())


def _triggers_sql(table: str, when: str = "") -> list[str]:
    """The triggers that keep ``table`` in step with ``memories``, named after it; ``when``
    (with ``{row}`` for new/old) limits them to some rows. A row's key follows its scope, so
    an update of the scope moves it too (the write flow never makes one)."""
    new, old = (when.format(row=row) if when else "" for row in ("new", "old"))
    insert = " ".join([*slots_sql("new"), f"INSERT INTO {table} (rowid, text, context) "
                       f"VALUES ({key_sql('new')}, new.text, new.context);"])
    delete = (f"INSERT INTO {table} ({table}, rowid, text, context) "
              f"VALUES ('delete', {key_sql('old')}, old.text, old.context);")
    return [
        f"CREATE TRIGGER {table}_insert AFTER INSERT ON memories {new} BEGIN {insert} END",
        f"CREATE TRIGGER {table}_delete AFTER DELETE ON memories {old} BEGIN {delete} END",
        f"CREATE TRIGGER {table}_update AFTER UPDATE OF text, context, namespace, user_id ON memories {old} "
        f"BEGIN {delete} {insert} END",
    ]


async def _copy_rows(tx: Transaction, after: int, last: int) -> None:
    """Index the memories with rowid in (``after``, ``last``] in NEXT, giving them their slots first."""
    for sql in BATCH_SLOTS:
        await tx.execute(sql, [after, last])
    # In key order: FTS5 writes out what it holds whenever a rowid comes lower than the last one, and
    # a batch in memories' order jumps between users' ranges (22,000 rows/s of CPU; sorted 53,000).
    await tx.execute(
        f"INSERT INTO {NEXT} (rowid, text, context) SELECT {key_sql('m')}, text, context FROM memories m "
        "WHERE rowid > ? AND rowid <= ? ORDER BY 1", [after, last],
    )


# Only rows at or before the cursor: a row past it is not in NEXT yet (its copy will index it).
COPIED = f"WHEN {{row}}.rowid <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{CURSOR}')"
TRIGGER_KINDS = ("insert", "delete", "update")
OURS = f"name LIKE '{NEXT.replace('_', '!_')}%' ESCAPE '!'"  # NEXT, its shadow tables and its triggers
UNDER_WAY = f"SELECT 1 FROM sqlite_master WHERE {OURS} UNION ALL SELECT 1 FROM meta WHERE key = ?"


@dataclass(frozen=True, slots=True)
class Resume:
    cursor: int  # the last rowid in NEXT
    done: int  # memories at or before it
    total: int  # memories now


async def rebuild(backend: SQLiteBackend, progress: OnProgress | None = None, *, batch: int = BATCH) -> None:
    """Build the keyword index afresh beside the live one and switch to it; resumes a rebuild
    that was interrupted. Every step is a write on the backend's Writer (gm.storage.ops.RebuildStep).
    One at a time: the file is this process's alone (gm.storage.sqlite_files.DatabaseLock), and
    a second call while one runs gets Conflict."""
    if backend.schema_version < KEYED_VERSION:
        raise SchemaError(
            f"{backend.path} is at schema v{backend.schema_version}, before the keyword index keyed by scope; "
            "open it with this release (it migrates) and run the rebuild again"
        )
    if backend.rebuilding_keywords:
        raise Conflict(f"the keyword index of {backend.path} is being rebuilt already; let that rebuild finish")
    backend.rebuilding_keywords = True
    try:
        at: Resume = await _write(backend, prepare)
        meter = Meter(PHASE, at.total, at.done)
        if progress is not None:
            progress(meter.at(at.done))
        done = at.done
        while True:
            copied: int = await _write(backend, lambda tx: copy(tx, batch))
            done += copied
            if copied < batch:
                break
            if progress is not None:
                progress(meter.at(done, max(meter.total, done)))
        while await _write(backend, merge):
            pass
        total: int = await _write(backend, switch)
        backend.keyword_keyed = True  # (only now: a search that began before reads either index alike)
    finally:
        backend.rebuilding_keywords = False
    log.info("keyword index rebuilt: %d memories", total)
    if progress is not None:
        progress(meter.at(total, total))


async def _write(backend: SQLiteBackend, run: Callable[[Transaction], Awaitable[Any]]) -> Any:
    """One step on the Writer, tried again if its batch failed as a whole: a write beside it may
    have failed the batch (one into a damaged index, which a step is about to replace). Each
    step reads the cursor it starts from, so one that did commit is not done twice."""
    for attempt in range(1, STEP_ATTEMPTS + 1):
        try:
            return await backend.write(RebuildStep(run))
        except StorageUnavailable as exc:
            if attempt == STEP_ATTEMPTS or not exc.transient:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def prepare(tx: Transaction) -> Resume:
    """Resume the half-built table if it is whole, else start one (dropping what is left of an
    incomplete one; its index was checked when the database was opened)."""
    if await discard_if_unsound(tx):
        log.warning("the half-built keyword index was damaged or incomplete: dropped, starting again")
    cursor = await _cursor(tx)
    if cursor is None:
        await tx.execute(_table_sql(NEXT), [])
        for sql in _triggers_sql(NEXT, COPIED):
            await tx.execute(sql, [])
        await tx.execute("INSERT INTO meta (key, value) VALUES (?, '0')", [CURSOR])
        cursor = 0
    else:
        log.info("resuming the keyword index rebuild after rowid %d", cursor)
    rows = await tx.fetch("SELECT count(*), count(*) FILTER (WHERE rowid <= ?) FROM memories", [cursor])
    return Resume(cursor, rows[0][1], rows[0][0])


async def copy(tx: Transaction, size: int) -> int:
    """Copy the next ``size`` memories after the cursor into NEXT and move the cursor past
    them, in one transaction; how many it copied."""
    after = await _current(tx)
    rows = await tx.fetch(
        "SELECT count(*), max(rowid) FROM (SELECT rowid FROM memories WHERE rowid > ? ORDER BY rowid LIMIT ?)",
        [after, size],
    )
    count, last = rows[0][0], rows[0][1]
    if not count:
        return 0
    await _copy_rows(tx, after, last)
    await tx.execute("UPDATE meta SET value = ? WHERE key = ?", [str(last), CURSOR])
    return int(count)


async def merge(tx: Transaction) -> bool:
    """Merge NEXT's segments by up to MERGE_PAGES pages; False once there is nothing left to
    merge (FTS5 then changes fewer than two rows: its documented test for an optimized index)."""
    before = (await tx.fetch("SELECT total_changes()", []))[0][0]
    await tx.execute(f"INSERT INTO {NEXT} ({NEXT}, rank) VALUES ('merge', ?)", [-MERGE_PAGES])
    return bool((await tx.fetch("SELECT total_changes()", []))[0][0] - before >= 2)


async def switch(tx: Transaction) -> int:
    """Copy what was added since the last step, then put NEXT in the live index's place: the
    old table and its triggers go, NEXT is renamed and the live triggers made for it. One
    transaction, so searches see the old index or the new one, never neither. Returns how many
    memories the index holds."""
    await _copy_rows(tx, await _current(tx), MAX_ROWID)
    for kind in TRIGGER_KINDS:
        await tx.execute(f"DROP TRIGGER IF EXISTS {LIVE}_{kind}", [])
        await tx.execute(f"DROP TRIGGER IF EXISTS {NEXT}_{kind}", [])
    await _drop(tx, LIVE)  # (the rebuild also replaces a damaged live index)
    await tx.execute(f"ALTER TABLE {NEXT} RENAME TO {LIVE}", [])
    for sql in _triggers_sql(LIVE):
        await tx.execute(sql, [])
    await tx.execute("DELETE FROM meta WHERE key = ?", [CURSOR])
    rows = await tx.fetch("SELECT count(*) FROM memories", [])
    return int(rows[0][0])


async def _current(tx: Transaction) -> int:
    cursor = await _cursor(tx)
    if cursor is None:
        raise StorageUnavailable(
            f"the half-built keyword index {NEXT} lost its cursor while it was built; run the rebuild again"
        )
    return cursor


async def _cursor(tx: Transaction) -> int | None:
    rows = await tx.fetch("SELECT value FROM meta WHERE key = ?", [CURSOR])
    return int(rows[0][0]) if rows else None


async def discard_if_unsound(tx: Transaction, thorough: bool = False) -> bool:
    """Drop what an interrupted rebuild left if it cannot be resumed: a half-built table that
    is missing (or a shadow table of it), of another definition (an older release's) or without
    its cursor, or triggers whose table is gone (they would fail every write); ``thorough``,
    also one whose index is damaged (FTS5's integrity check, which reads all of it: 335 ms
    at 50,000 rows here, so it is made at open, not while writes wait). True if something
    was dropped."""
    rows = await tx.fetch(f"SELECT type, name, sql FROM sqlite_master WHERE {OURS}", [])
    objects = {name: (kind, sql) for kind, name, sql in rows}
    if not objects and await _cursor(tx) is None:
        return False  # nothing under way: the common case, one look at the schema
    table = objects.get(NEXT)
    triggers = {f"{NEXT}_{kind}" for kind in TRIGGER_KINDS}
    parts = triggers | {f"{NEXT}_{shadow}" for shadow in SHADOWS if shadow != "content"}
    sound = (
        table is not None and table[1] == _table_sql(NEXT) and parts <= objects.keys()
        and await _cursor(tx) is not None and (not thorough or await _intact(tx))
    )
    if sound:
        return False
    for trigger in triggers:
        await tx.execute(f"DROP TRIGGER IF EXISTS {trigger}", [])
    await _drop(tx, NEXT)
    await tx.execute("DELETE FROM meta WHERE key = ?", [CURSOR])
    return True


SHADOWS = ("data", "idx", "content", "docsize", "config")  # the tables an FTS5 table keeps itself in


async def _drop(tx: Transaction, table: str) -> None:
    """Drop the FTS5 ``table`` and its shadow tables, even damaged: if FTS5 cannot open it (a
    shadow table gone), its schema row is removed instead (SQLite's last resort,
    ``writable_schema``, with the schema cookie bumped so every connection reloads the schema)."""
    await tx.execute("SAVEPOINT keyword_drop", [])
    try:
        await tx.execute(f"DROP TABLE IF EXISTS {table}", [])
    except sqlite3.DatabaseError as exc:
        await tx.execute("ROLLBACK TO keyword_drop", [])
        log.warning("FTS5 cannot drop the damaged %s (%s): removing its schema entry", table, exc)
        try:
            version = (await tx.fetch("PRAGMA schema_version", []))[0][0]
            await tx.execute("PRAGMA writable_schema = ON", [])
            await tx.execute("DELETE FROM sqlite_master WHERE type = 'table' AND name = ?", [table])
            await tx.execute(f"PRAGMA schema_version = {int(version) + 1}", [])
        except sqlite3.DatabaseError as again:
            raise DatabaseUnusable(
                f"the keyword index table {table} is damaged and cannot be dropped ({again}); restore a backup"
            ) from None
        finally:
            await tx.execute("PRAGMA writable_schema = OFF", [])
    finally:
        await tx.execute("RELEASE keyword_drop", [])
    for shadow in SHADOWS:  # (what a damaged table did not take with it)
        await tx.execute(f"DROP TABLE IF EXISTS {table}_{shadow}", [])


async def _intact(tx: Transaction) -> bool:
    """FTS5's own check of NEXT's structure (it does not compare an external-content table with
    its content, so a half-built one passes), undone in a savepoint of its own."""
    await tx.execute("SAVEPOINT keyword_check", [])
    try:
        await tx.execute(f"INSERT INTO {NEXT} ({NEXT}) VALUES ('integrity-check')", [])
        return True
    except sqlite3.DatabaseError as exc:
        log.warning("the half-built keyword index %s failed its check: %s", NEXT, exc)
        return False
    finally:
        await tx.execute("ROLLBACK TO keyword_check", [])
        await tx.execute("RELEASE keyword_check", [])


async def settle_at_open(conn: WriteConnection, version: int) -> None:
    """At open, before any write: drop what an interrupted rebuild left that would fail writes
    (triggers into a missing or damaged table); a sound half-built table stays to be resumed.
    Nothing is written, nor the write lock taken, unless a rebuild was under way."""
    if not await conn.run(lambda c: c.execute(UNDER_WAY, [CURSOR]).fetchall()):
        return
    if await conn.transaction(lambda c: drive(discard_if_unsound(SQLiteTransaction(c, version), thorough=True))):
        log.warning("dropped the damaged half-built keyword index of an interrupted rebuild; run it again")


async def key_at_open(conn: WriteConnection, version: int) -> bool:
    """At open (schema v4 on), after :func:`settle_at_open`: whether the live index is keyed by
    scope. One of an older definition over at most ``BATCH`` memories is rebuilt now, in one
    transaction (a new database's: milliseconds); a larger one is left to the backend's online
    rebuild, and searched as it is meanwhile."""
    rows = await conn.run(lambda c: c.execute("SELECT sql FROM sqlite_master WHERE name = ?", [LIVE]).fetchall())
    if rows and keyed(rows[0][0]):
        return True
    small = await conn.run(lambda c: c.execute(f"SELECT count(*) FROM (SELECT 1 FROM memories LIMIT {BATCH + 1})")
                           .fetchall())
    if small[0][0] > BATCH:
        return False

    async def rekey(tx: SQLiteTransaction) -> None:
        await prepare(tx)
        await switch(tx)

    await conn.transaction(lambda c: drive(rekey(SQLiteTransaction(c, version))))
    return True
