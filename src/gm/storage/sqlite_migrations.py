"""The SQLite schema as numbered, additive migration steps, and the blocking routine
that applies them: downgrade guard, ``<db>.pre-v<N>.bak`` snapshot, one transaction a step.

The version lives in ``PRAGMA user_version``. Steps only add (tables, indexes, nullable
or defaulted columns); a column never changes shape or disappears in the same release.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gm.errors import MigrationFailed, SchemaTooNew, StorageUnavailable

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

STEPS: tuple[Step, ...] = (
    Step(1, "core tables: memories, history, meta", _script(V1_CORE)),
    Step(2, "keyword index: FTS5 over memories.text", _script(V2_KEYWORDS)),
)
LATEST = STEPS[-1].version


def snapshot_path(db: str | os.PathLike[str], version: int) -> Path:
    """Where the snapshot taken before migrating ``db`` to ``version`` goes."""
    return Path(f"{os.fspath(db)}.pre-v{version}.bak")


def read_version(db: str | os.PathLike[str]) -> int | None:
    """The database's ``user_version``, read without writing anything; None if no file.

    A cleanly closed database is read from its header (bytes 60-63), which creates no
    ``-wal``/``-shm`` files next to it; one with a non-empty write-ahead log is asked
    through a read-only connection, since the log may hold a newer version.
    """
    path = Path(db)
    if not path.exists():
        return None
    wal = Path(f"{path}-wal")
    if not (wal.exists() and wal.stat().st_size > 0):
        with path.open("rb") as f:
            header = f.read(100)
        if len(header) == 0:
            return 0
        if len(header) == 100 and header.startswith(b"SQLite format 3\x00"):
            return int.from_bytes(header[60:64], "big")
    try:
        conn = sqlite3.connect(f"file:{Path(db).resolve()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot open {db}: {exc}") from None
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise StorageUnavailable(f"{db} is not a readable SQLite database: {exc}") from None
    finally:
        conn.close()


def guard(db: str | os.PathLike[str], version: int | None, latest: int) -> None:
    if version is not None and version > latest:
        raise SchemaTooNew(
            f"{db} has schema version {version} but this release of greatmemory knows only up to "
            f"version {latest}. It was written by a newer release: run that release, or restore "
            f"a backup or the {Path(db).name}.pre-v{version}.bak snapshot taken before the "
            "upgrade. The file was not changed."
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
        raise StorageUnavailable(f"cannot open {db}: {exc}") from None
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("PRAGMA journal_mode = WAL")
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        guard(db, version, latest)  # another process may have moved it since the read above
        pending = [s for s in steps if version < s.version <= target]
        if not pending:
            return version
        on_phase("migrating")
        snapshot = snapshot_path(db, pending[-1].version)
        kept = read_version(snapshot) if snapshot.exists() else None
        if kept is not None and kept < version:
            # An earlier attempt at this upgrade failed after some steps: its snapshot holds the
            # older state the previous release can open. Keep it rather than snapshot a half-way version.
            log.info("keeping %s (schema v%d) from an earlier attempt at this upgrade", snapshot, kept)
        elif _holds_data(conn):
            log.info("snapshot of %s (schema v%d) written to %s before migrating", db, version, snapshot)
            take_snapshot(conn, snapshot)
        for step in pending:
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
            version = step.version
        return version
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot migrate {db}: {exc}") from None
    finally:
        conn.close()
