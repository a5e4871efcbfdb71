"""The online rebuild of SQLite's keyword index: a new FTS5 table filled beside the live one in
short steps on the Writer, resumable from a cursor in ``meta``, then switched in one transaction.

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

import aiosqlite

from gm.errors import Conflict, DatabaseUnusable, SchemaError, StorageUnavailable
from gm.progress import Meter, OnProgress
from gm.storage.ops import RebuildStep
from gm.storage.sqlite_writer import SQLiteTransaction
from gm.storage.write_flow import Transaction

if TYPE_CHECKING:
    from gm.storage.sqlite import SQLiteBackend

log = logging.getLogger(__name__)

LIVE = "memories_search"
NEXT = "memories_search_next"
CURSOR = "keyword_rebuild_cursor"  # meta: the last rowid copied into NEXT
PHASE = "keyword index"
# Rows a step copies. 2,000 short memories take ~25 ms on the Writer here (see docs/reindex.md),
# which is as long as a write queued behind a step waits.
BATCH = 2000
PREPARE_ATTEMPTS = 5  # a damaged half-built table fails every write's batch, ours too until it is first
# The latest definition of the keyword index: what a rebuild builds. (Schema v3 created it;
# a release that changes it changes it here, and `gmem reindex` builds it online.)
DEFINITION = (
    "text, context, content='memories', content_rowid='rowid', tokenize='porter unicode61 remove_diacritics 2'"
)


def _table_sql(name: str) -> str:
    return f"CREATE VIRTUAL TABLE {name} USING fts5 ({DEFINITION})"


def _triggers_sql(table: str, when: str = "") -> list[str]:
    """The triggers that keep ``table`` in step with ``memories``, named after it; ``when``
    (with ``{row}`` for new/old) limits them to some rows."""
    new, old = (when.format(row=row) if when else "" for row in ("new", "old"))
    insert = f"INSERT INTO {table} (rowid, text, context) VALUES (new.rowid, new.text, new.context);"
    delete = (f"INSERT INTO {table} ({table}, rowid, text, context) "
              "VALUES ('delete', old.rowid, old.text, old.context);")
    return [
        f"CREATE TRIGGER {table}_insert AFTER INSERT ON memories {new} BEGIN {insert} END",
        f"CREATE TRIGGER {table}_delete AFTER DELETE ON memories {old} BEGIN {delete} END",
        f"CREATE TRIGGER {table}_update AFTER UPDATE OF text, context ON memories {old} BEGIN {delete} {insert} END",
    ]


# Only rows at or before the cursor: a row past it is not in NEXT yet (its copy will index it).
COPIED = f"WHEN {{row}}.rowid <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{CURSOR}')"
TRIGGER_KINDS = ("insert", "delete", "update")


@dataclass(frozen=True, slots=True)
class Resume:
    cursor: int  # the last rowid in NEXT
    done: int  # memories at or before it
    total: int  # memories now


async def rebuild(backend: SQLiteBackend, progress: OnProgress | None = None, *, batch: int = BATCH) -> None:
    """Build the keyword index afresh beside the live one and switch to it; resumes a rebuild
    that was interrupted. Every step is a write on the backend's Writer (gm.storage.ops.RebuildStep)."""
    if not backend.context:
        raise SchemaError(
            f"{backend.path} is at schema v{backend.schema_version}, before the keyword index over text and "
            "context; open it with this release (it migrates) and run the rebuild again"
        )
    at = await _prepare_retrying(backend)
    meter = Meter(PHASE, at.total, at.done)
    if progress is not None:
        progress(meter.at(at.done))
    cursor, done = at.cursor, at.done
    while True:
        copied, cursor = await backend.write(RebuildStep(_step(copy, cursor, batch)))
        done += copied
        if copied < batch:
            break
        if progress is not None:
            progress(meter.at(done, max(meter.total, done)))
    total = await backend.write(RebuildStep(_step(switch, cursor)))
    log.info("keyword index rebuilt: %d memories", total)
    if progress is not None:
        progress(meter.at(total, total))


def _step(run: Callable[..., Awaitable[Any]], *args: Any) -> Callable[[Transaction], Awaitable[Any]]:
    async def step(tx: Transaction) -> Any:
        return await run(tx, *args)

    return step


async def _prepare_retrying(backend: SQLiteBackend) -> Resume:
    for attempt in range(1, PREPARE_ATTEMPTS + 1):
        try:
            result: Resume = await backend.write(RebuildStep(prepare))
            return result
        except StorageUnavailable:
            if attempt == PREPARE_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


async def prepare(tx: Transaction) -> Resume:
    """Resume the half-built table if it is sound, else start one (dropping what is left of a
    damaged one)."""
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


async def copy(tx: Transaction, after: int, size: int) -> tuple[int, int]:
    """Copy the next ``size`` memories after rowid ``after`` into NEXT and move the cursor
    there, in one transaction; (rows copied, the new cursor)."""
    await _still_at(tx, after)
    rows = await tx.fetch(
        "SELECT count(*), max(rowid) FROM (SELECT rowid FROM memories WHERE rowid > ? ORDER BY rowid LIMIT ?)",
        [after, size],
    )
    count, last = rows[0][0], rows[0][1]
    if not count:
        return 0, after
    await tx.execute(
        f"INSERT INTO {NEXT} (rowid, text, context) SELECT rowid, text, context FROM memories "
        "WHERE rowid > ? AND rowid <= ?", [after, last],
    )
    await tx.execute("UPDATE meta SET value = ? WHERE key = ?", [str(last), CURSOR])
    return count, last


async def switch(tx: Transaction, after: int) -> int:
    """Copy what was added since the last step, then put NEXT in the live index's place: the
    old table and its triggers go, NEXT is renamed and the live triggers made for it. One
    transaction, so searches see the old index or the new one, never neither. Returns how many
    memories the index holds."""
    await _still_at(tx, after)
    await tx.execute(
        f"INSERT INTO {NEXT} (rowid, text, context) SELECT rowid, text, context FROM memories WHERE rowid > ?",
        [after],
    )
    for kind in TRIGGER_KINDS:
        await tx.execute(f"DROP TRIGGER IF EXISTS {LIVE}_{kind}", [])
        await tx.execute(f"DROP TRIGGER IF EXISTS {NEXT}_{kind}", [])
    await tx.execute(f"DROP TABLE IF EXISTS {LIVE}", [])
    await tx.execute(f"ALTER TABLE {NEXT} RENAME TO {LIVE}", [])
    for sql in _triggers_sql(LIVE):
        await tx.execute(sql, [])
    await tx.execute("DELETE FROM meta WHERE key = ?", [CURSOR])
    rows = await tx.fetch("SELECT count(*) FROM memories", [])
    return int(rows[0][0])


async def _still_at(tx: Transaction, after: int) -> None:
    """Refuse a step whose cursor another rebuild has moved (two at once would index rows twice)."""
    if await _cursor(tx) != after:
        raise Conflict("another rebuild of the keyword index is under way on this database; let it finish")


async def _cursor(tx: Transaction) -> int | None:
    rows = await tx.fetch("SELECT value FROM meta WHERE key = ?", [CURSOR])
    return int(rows[0][0]) if rows else None


async def discard_if_unsound(tx: Transaction) -> bool:
    """Drop what an interrupted rebuild left if it cannot be resumed: a half-built table that
    is missing, damaged, of another definition (an older release's) or without its cursor, or
    triggers whose table is gone (they would fail every write). True if something was dropped."""
    rows = await tx.fetch("SELECT type, name, sql FROM sqlite_master WHERE name LIKE ? ESCAPE '\\'",
                          [NEXT.replace("_", "\\_") + "%"])
    objects = {name: (kind, sql) for kind, name, sql in rows}
    if not objects and await _cursor(tx) is None:
        return False  # nothing under way: the common case, one look at the schema
    table = objects.get(NEXT)
    triggers = {f"{NEXT}_{kind}" for kind in TRIGGER_KINDS}
    sound = (
        table is not None and table[1] == _table_sql(NEXT) and triggers <= objects.keys()
        and await _cursor(tx) is not None and await _intact(tx)
    )
    if sound:
        return False
    for trigger in triggers:
        await tx.execute(f"DROP TRIGGER IF EXISTS {trigger}", [])
    if table is not None:
        await _drop_next(tx)
    for name, (kind, _) in objects.items():  # shadow tables a damaged FTS5 table did not take with it
        if kind == "table" and name != NEXT and name.startswith(NEXT + "_"):
            await tx.execute(f"DROP TABLE IF EXISTS {name}", [])
    await tx.execute("DELETE FROM meta WHERE key = ?", [CURSOR])
    return True


async def _drop_next(tx: Transaction) -> None:
    """DROP TABLE NEXT; if FTS5 cannot even open it (a shadow table gone), its schema row is
    removed instead (SQLite's documented last resort, ``writable_schema``, the schema cookie
    bumped so every connection reloads it) and the caller drops the shadow tables left."""
    await tx.execute("SAVEPOINT keyword_drop", [])
    try:
        await tx.execute(f"DROP TABLE {NEXT}", [])
    except sqlite3.DatabaseError as exc:
        await tx.execute("ROLLBACK TO keyword_drop", [])
        log.warning("FTS5 cannot drop the damaged %s (%s): removing its schema entry", NEXT, exc)
        try:
            version = (await tx.fetch("PRAGMA schema_version", []))[0][0]
            await tx.execute("PRAGMA writable_schema = ON", [])
            await tx.execute("DELETE FROM sqlite_master WHERE type = 'table' AND name = ?", [NEXT])
            await tx.execute(f"PRAGMA schema_version = {int(version) + 1}", [])
        except sqlite3.DatabaseError as again:
            raise DatabaseUnusable(
                f"the half-built keyword index {NEXT} is damaged and cannot be dropped ({again}); restore a backup"
            ) from None
        finally:
            await tx.execute("PRAGMA writable_schema = OFF", [])
    finally:
        await tx.execute("RELEASE keyword_drop", [])


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


async def settle_at_open(conn: aiosqlite.Connection, version: int) -> None:
    """At open, before any write: drop what an interrupted rebuild left that would fail writes
    (triggers into a missing or damaged table); a sound half-built table stays to be resumed."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        if await discard_if_unsound(SQLiteTransaction(conn, version)):
            log.warning("dropped the damaged half-built keyword index of an interrupted rebuild; run it again")
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
