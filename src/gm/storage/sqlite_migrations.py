"""The SQLite schema as numbered, additive migration steps, and the blocking routine
that applies them: downgrade guard, ``<db>.pre-v<N>.bak`` snapshot, one transaction a step.

The version lives in ``PRAGMA user_version``. Steps only add (tables, indexes, nullable
or defaulted columns); a column never changes shape or disappears in the same release.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gm.errors import DatabaseUnusable, MigrationFailed, SchemaTooNew, StorageUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One migration: brings the schema from ``version - 1`` to ``version``."""

    version: int
    name: str
    apply: Callable[[sqlite3.Connection], None]


def _script(sql: str) -> Callable[[sqlite3.Connection], None]:
    statements, pending = [], ""
    for line in sql.strip().splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        statements.append(pending.strip())

    def run(conn: sqlite3.Connection) -> None:
        for statement in statements:  # executescript would COMMIT; execute keeps the transaction
            conn.execute(statement)

    return run


V1_CORE = """
CREATE TABLE memories (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    namespace TEXT NOT NULL,
    user_id TEXT,
    agent_id TEXT,
    session_id TEXT,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    expires_at INTEGER,
    embedding BLOB NOT NULL
);
CREATE INDEX memories_by_namespace ON memories (namespace, created_at, rowid);
CREATE INDEX memories_by_user ON memories (namespace, user_id, created_at, rowid);
CREATE INDEX memories_by_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    memory_id TEXT NOT NULL,
    namespace TEXT NOT NULL,
    op TEXT NOT NULL,
    at INTEGER NOT NULL,
    text TEXT,
    metadata TEXT
);
CREATE INDEX history_by_memory ON history (memory_id, seq);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""

V2_KEYWORDS = """
CREATE VIRTUAL TABLE memories_fts USING fts5 (
    text, content='memories', content_rowid='rowid',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER memories_fts_insert AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts (rowid, text) VALUES (new.rowid, new.text);
END;
CREATE TRIGGER memories_fts_delete AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;
CREATE TRIGGER memories_fts_update AFTER UPDATE OF text ON memories BEGIN
    INSERT INTO memories_fts (memories_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO memories_fts (rowid, text) VALUES (new.rowid, new.text);
END;
INSERT INTO memories_fts (memories_fts) VALUES ('rebuild')
"""

# Event time and session context (see gm.context). `context` NULL means "not built yet":
# the online backfill builds it; until then the row is found by its text alone. The
# search index moves to `memories_search` (FTS5 cannot add a column). The table
# `memories_fts` stays (no table is dropped), emptied and no longer kept by triggers: an
# older release never runs on this file (the downgrade guard refuses it; a rollback
# restores the pre-v3 snapshot), so keeping it current would only cost every write.
V3_CONTEXT = """
DROP TRIGGER memories_fts_insert;
DROP TRIGGER memories_fts_delete;
DROP TRIGGER memories_fts_update;
INSERT INTO memories_fts (memories_fts) VALUES ('delete-all');
ALTER TABLE memories ADD COLUMN occurred_at INTEGER;
ALTER TABLE memories ADD COLUMN context TEXT;
ALTER TABLE memories ADD COLUMN search_embedding BLOB;
CREATE INDEX memories_by_occurrence ON memories (namespace, coalesce(occurred_at, created_at), rowid);
CREATE INDEX memories_by_session_order ON memories (namespace, session_id, coalesce(occurred_at, created_at), rowid)
    WHERE session_id IS NOT NULL;
CREATE INDEX memories_without_context ON memories (rowid) WHERE context IS NULL;
CREATE INDEX memories_by_user_occurrence ON memories (namespace, user_id, coalesce(occurred_at, created_at), rowid);
CREATE VIRTUAL TABLE memories_search USING fts5 (
    text, context, content='memories', content_rowid='rowid',
    tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER memories_search_insert AFTER INSERT ON memories BEGIN
    INSERT INTO memories_search (rowid, text, context) VALUES (new.rowid, new.text, new.context);
END;
CREATE TRIGGER memories_search_delete AFTER DELETE ON memories BEGIN
    INSERT INTO memories_search (memories_search, rowid, text, context)
    VALUES ('delete', old.rowid, old.text, old.context);
END;
CREATE TRIGGER memories_search_update AFTER UPDATE OF text, context ON memories BEGIN
    INSERT INTO memories_search (memories_search, rowid, text, context)
    VALUES ('delete', old.rowid, old.text, old.context);
    INSERT INTO memories_search (rowid, text, context) VALUES (new.rowid, new.text, new.context);
END;
INSERT INTO memories_search (memories_search) VALUES ('rebuild')
"""

# The keyword index keyed by scope (gm.storage.sqlite_keywords): the dense ids its keys take a
# namespace's and a user's slot from, filled as memories are indexed, never deleted (a slot must
# not move). The index itself is not rebuilt here: FTS5 fills about 7,000 rows/s on this machine
# (2.5 minutes at 1M memories), so the backend rebuilds it online after open
# (gm.storage.sqlite_rebuild), and the index of schema v3 answers meanwhile.
V4_KEYWORD_SCOPES = """
CREATE TABLE keyword_namespaces (id INTEGER PRIMARY KEY, namespace TEXT NOT NULL UNIQUE);
CREATE TABLE keyword_users (id INTEGER PRIMARY KEY, user_id TEXT NOT NULL UNIQUE)
"""

STEPS: tuple[Step, ...] = (
    Step(1, "core tables: memories, history, meta", _script(V1_CORE)),
    Step(2, "keyword index: FTS5 over memories.text", _script(V2_KEYWORDS)),
    Step(3, "event time and session context: occurred_at, context, search_embedding, FTS5 over text and context",
         _script(V3_CONTEXT)),
    Step(4, "keyword index keyed by scope: the slot tables keyword_namespaces and keyword_users "
         "(the index is rebuilt online)", _script(V4_KEYWORD_SCOPES)),
)
LATEST = STEPS[-1].version


def snapshot_path(db: str | os.PathLike[str], version: int) -> Path:
    """Where the snapshot taken before migrating ``db`` to ``version`` goes."""
    return Path(f"{os.fspath(db)}.pre-v{version}.bak")


# SQLITE_CORRUPT and SQLITE_NOTADB: the file itself is wrong, and stays wrong however often it is opened.
_FILE_ERRORS = frozenset({11, 26})


def storage_error(exc: sqlite3.Error, db: str | os.PathLike[str], doing: str = "open") -> StorageUnavailable:
    """``exc`` as the typed error: :class:`DatabaseUnusable` when the file is not (or no
    longer) a SQLite database, else a transient :class:`StorageUnavailable`."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _FILE_ERRORS:
        return DatabaseUnusable(f"{db} is not a SQLite database, or it is damaged ({exc}); restore a backup")
    return StorageUnavailable(f"cannot {doing} {db}: {exc}")


def check_path(db: str | os.PathLike[str]) -> Path:
    """``db`` as a path, refused with :class:`DatabaseUnusable` if it names a directory."""
    path = Path(db)
    if path.is_dir():
        raise DatabaseUnusable(
            f"{path} is a directory, not a database file; name a file, e.g. {path / 'greatmemory.db'}"
        )
    return path


@contextmanager
def reading(db: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """A read-only connection to ``db`` that leaves nothing behind: a read-only reader of a
    WAL-mode file creates ``-wal``/``-shm`` files it cannot remove, so those it created are
    removed after it closes (only if they are still empty: then no writer has used them)."""
    path = Path(db).resolve()
    sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    existed = [p.exists() for p in sidecars]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()
        wal, shm = sidecars
        if not any(existed) and wal.exists() and wal.stat().st_size == 0:
            wal.unlink(missing_ok=True)
            shm.unlink(missing_ok=True)


def has_sqlite_header(db: str | os.PathLike[str]) -> bool:
    """Whether ``db`` starts with a plausible SQLite header (see :func:`_plausible_header`)."""
    with Path(db).open("rb") as f:
        return _plausible_header(f.read(100))


def _plausible_header(header: bytes) -> bool:
    """The fixed fields of a SQLite header: magic, a power-of-two page size, file format
    1 or 2, and the payload fractions 64/32/32 every SQLite database has."""
    if len(header) < 100:
        return False
    page = int.from_bytes(header[16:18], "big")
    return (
        header.startswith(b"SQLite format 3\x00")
        and (page == 1 or (512 <= page <= 32768 and page & (page - 1) == 0))
        and header[18] in (1, 2)
        and header[19] in (1, 2)
        and header[21:24] == b"\x40\x20\x20"
    )


def read_version(db: str | os.PathLike[str]) -> int | None:
    """The database's ``user_version``, read without writing anything; None if no file.

    A cleanly closed database is read from its header (bytes 60-63), which creates no
    ``-wal``/``-shm`` files next to it; one with a non-empty write-ahead log is asked
    through a read-only connection, since the log may hold a newer version. A file
    that is not SQLite raises :class:`DatabaseUnusable`.
    """
    path = check_path(db)
    if not path.exists():
        return None
    wal = Path(f"{path}-wal")
    if not (wal.exists() and wal.stat().st_size > 0):
        with path.open("rb") as f:
            header = f.read(100)
        if len(header) == 0:
            return 0
        if not _plausible_header(header):
            raise DatabaseUnusable(f"{db} is not a SQLite database (its header is not one); restore a backup")
        return int.from_bytes(header[60:64], "big")
    try:
        with reading(path) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise storage_error(exc, db) from None


def guard(db: str | os.PathLike[str], version: int | None, latest: int) -> None:
    if version is not None and version > latest:
        try:  # a damaged file can claim any version: it must read as SQLite before it is called newer
            with reading(db) as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise storage_error(exc, db) from None
        raise SchemaTooNew(
            f"{db} has schema version {version} but this release of greatmemory knows only up to "
            f"version {latest}. It was written by a newer release: run that release, or restore "
            f"a backup or the {Path(db).name}.pre-v{version}.bak snapshot taken before the "
            "upgrade. The file was not changed."
        )


@cache
def expected_schema(steps: tuple[Step, ...], version: int) -> dict[tuple[str, str], frozenset[str]]:
    """What ``steps`` up to ``version`` create: (type, name) of every table, index and
    trigger, with each table's columns (built once in memory)."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for step in steps:
            if step.version <= version:
                step.apply(conn)
        return _schema_of(conn)
    finally:
        conn.close()


def _schema_of(
    conn: sqlite3.Connection, known: dict[tuple[str, str], frozenset[str]] | None = None
) -> dict[tuple[str, str], frozenset[str]]:
    """Every table, index and trigger, with the columns of each table (of each ``known`` one:
    a table of no step, e.g. a half-built keyword index, is not opened, so its damage is not the
    database's, gm.storage.sqlite_rebuild)."""
    objects = conn.execute(
        "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'index', 'trigger') AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {
        (kind, name): frozenset(r[1] for r in conn.execute(f'PRAGMA table_info("{name}")'))
        if kind == "table" and (known is None or (kind, name) in known) else frozenset()
        for kind, name in objects
    }


def check_schema(conn: sqlite3.Connection, db: str | os.PathLike[str], version: int,
                 steps: tuple[Step, ...] = STEPS) -> None:
    """Refuse (:class:`DatabaseUnusable`) a database whose tables, columns, indexes or
    triggers are not the ones its schema version stands for."""
    expected = expected_schema(steps, version)
    present = _schema_of(conn, expected)
    for kind, name in sorted(expected, key=lambda key: key[0] != "table"):  # tables first, in creation order
        columns = expected[kind, name]
        if (kind, name) not in present:
            missing = f"the {kind} {name}"
        elif not columns <= present[kind, name]:
            missing = f"the column(s) {', '.join(sorted(columns - present[kind, name]))} of the table {name}"
        else:
            continue
        raise DatabaseUnusable(
            f"{db} says it is at schema version {version} but lacks {missing}: it is not a greatmemory "
            "database, or it was damaged; restore a backup"
        )


def _holds_data(conn: sqlite3.Connection) -> bool:
    tables = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND sql NOT LIKE 'CREATE VIRTUAL TABLE%'"
        )
    ]
    return any(conn.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone() for t in tables)


def take_snapshot(conn: sqlite3.Connection, target: Path) -> None:
    """Copy the database with SQLite's online backup into ``target`` (atomically renamed)."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    out = sqlite3.connect(partial)
    try:
        conn.backup(out)
    finally:
        out.close()
    os.replace(partial, target)


def _keep_snapshot(conn: sqlite3.Connection, db: str | os.PathLike[str], version: int, target: int) -> None:
    """Write ``<db>.pre-v<target>.bak`` before the first step, if the database holds data."""
    snapshot = snapshot_path(db, target)
    kept = read_version(snapshot) if snapshot.exists() else None
    if kept is not None and kept < version:
        # An earlier attempt at this upgrade failed after some steps: its snapshot holds the
        # older state the previous release can open. Keep it rather than snapshot a half-way version.
        log.info("keeping %s (schema v%d) from an earlier attempt at this upgrade", snapshot, kept)
    elif _holds_data(conn):
        log.info("snapshot of %s (schema v%d) written to %s before migrating", db, version, snapshot)
        take_snapshot(conn, snapshot)


def _apply_step(conn: sqlite3.Connection, db: str | os.PathLike[str], step: Step, version: int) -> None:
    """One step and its ``user_version`` bump in one transaction; rolled back if it fails."""
    log.info("migrating %s to schema v%d: %s", db, step.version, step.name)
    conn.execute("BEGIN IMMEDIATE")
    try:
        step.apply(conn)
        conn.execute(f"PRAGMA user_version = {int(step.version)}")
        conn.execute("COMMIT")
    except Exception as exc:
        conn.execute("ROLLBACK")
        raise MigrationFailed(
            f"migration step {step.version} ({step.name}) failed and was rolled back: {exc}. "
            f"{db} stays at schema version {version}; fix the cause and start again, or "
            "restore the snapshot next to it.",
            step=step.version,
            name=step.name,
        ) from exc


def migrate(
    db: str | os.PathLike[str],
    steps: tuple[Step, ...] = STEPS,
    target: int | None = None,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> int:
    """Bring ``db`` up to ``target`` (default: the last step) and return its version.

    Refuses (and leaves untouched) a database newer than ``steps`` know. Before touching
    a database that holds data, writes ``<db>.pre-v<target>.bak``. Each step runs in its
    own transaction together with the ``user_version`` bump; a failing step is rolled
    back and raises :class:`MigrationFailed` naming it.
    """
    latest = steps[-1].version if steps else 0
    target = latest if target is None else min(target, latest)
    current = read_version(db)
    guard(db, current, latest)
    try:
        conn = sqlite3.connect(db, isolation_level=None)
    except sqlite3.Error as exc:
        raise storage_error(exc, db) from None
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        guard(db, version, latest)  # another process may have moved it since the read above
        pending = [s for s in steps if version < s.version <= target]
        if version > 0:  # e.g. a stray file with user_version 2 (or 1, migrations to go) and no tables
            check_schema(conn, db, version, steps)
        if not pending:
            return version
        on_phase("migrating")
        _keep_snapshot(conn, db, version, pending[-1].version)
        for step in pending:
            _apply_step(conn, db, step, version)
            version = step.version
        return version
    except sqlite3.Error as exc:
        raise storage_error(exc, db, "migrate") from None
    finally:
        conn.close()
