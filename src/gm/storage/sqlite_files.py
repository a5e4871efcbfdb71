"""Whole-file operations on a SQLite database: the lock a running store holds, consistent
online backups with verification, and atomic restore.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gm.errors import BackupInvalid, DatabaseLocked, DatabaseUnusable, SchemaTooNew, StorageUnavailable
from gm.storage import sqlite_migrations

Progress = Callable[[int, int], None]  # (pages done, pages in all)


def lock_path(db: str | os.PathLike[str]) -> Path:
    """``<db>.lock`` beside the real file: symlinks are resolved, so every path that leads
    to one database (a link, a linked folder) leads to one lock."""
    return Path(f"{Path(db).resolve()}.lock")


def holder(db: str | os.PathLike[str]) -> str | None:
    """Who holds ``db``'s lock (a running server), found without taking or changing anything."""
    lock = lock_path(db)
    if not lock.exists():
        return None
    with lock.open("r") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
    return None


class DatabaseLock:
    """An exclusive advisory lock on ``<db>.lock``, held while a store has the database
    open, so a second server or a restore cannot run against it at the same time."""

    def __init__(self, db: str | os.PathLike[str]) -> None:
        self.db = Path(db)
        self._file: IO[str] | None = None

    @property
    def path(self) -> Path:
        return lock_path(self.db)  # resolved when asked: a link may be re-pointed between opens

    def acquire(self) -> None:
        path = self.path
        try:
            handle = path.open("a+")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # a typo in the path, not a passing fault
                raise DatabaseUnusable(
                    f"cannot open {self.db}: the folder {self.db.parent} does not exist; create it, or fix the path"
                ) from None
            raise StorageUnavailable(f"cannot create the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            shown = self.db if self.db.resolve() == path.with_suffix("") else f"{self.db} ({path.with_suffix('')})"
            raise DatabaseLocked(
                f"{shown} is in use by {holder}; stop that server first (one SQLite database has one server)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the lock
            self._file = None

    def __enter__(self) -> DatabaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class FileInfo:
    """What verification found in a database or backup file."""

    path: Path
    schema_version: int
    memories: int
    history: int
    bytes: int


def _counts(conn: sqlite3.Connection) -> tuple[int, int]:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    memories = conn.execute("SELECT count(*) FROM memories").fetchone()[0] if "memories" in tables else 0
    history = conn.execute("SELECT count(*) FROM history").fetchone()[0] if "history" in tables else 0
    return int(memories), int(history)


def verify(path: str | os.PathLike[str], expect: tuple[int, int] | None = None) -> FileInfo:
    """Check ``path`` is an intact greatmemory database this release can open: a SQLite
    file, integrity check, schema version not newer than this release, the tables and
    columns that version stands for, and (if given) row counts."""
    file = Path(path)
    if file.is_dir():
        raise BackupInvalid(f"{file} is a directory, not a backup file")
    if not file.is_file():
        raise BackupInvalid(f"{file} does not exist")
    try:
        version = sqlite_migrations.read_version(file) or 0
        sqlite_migrations.guard(file, version, sqlite_migrations.LATEST)
        with sqlite_migrations.reading(file) as conn:
            result = conn.execute("PRAGMA integrity_check").fetchall()
            if result != [("ok",)]:
                raise BackupInvalid(f"{file} failed SQLite's integrity check: {result[0][0]}")
            sqlite_migrations.check_schema(conn, file, version)
            counts = _counts(conn)
    except DatabaseUnusable as exc:  # not SQLite, or not greatmemory's: the backup is invalid, not the storage down
        raise BackupInvalid(exc.message) from None
    except sqlite3.DatabaseError as exc:
        raise BackupInvalid(f"{file} is not a readable SQLite database: {exc}") from None
    if expect is not None and counts != expect:
        raise BackupInvalid(
            f"{file} holds {counts[0]} memories and {counts[1]} history rows, but the database held "
            f"{expect[0]} and {expect[1]} when it was copied"
        )
    return FileInfo(file, version, counts[0], counts[1], file.stat().st_size)


def default_backup_path(db: str | os.PathLike[str]) -> Path:
    source = Path(db)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return source.with_name(f"{source.stem}-{stamp}.backup{source.suffix or '.db'}")


def _remove(db: Path) -> None:
    """Delete a file this module wrote and every file SQLite may have made beside it."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _copy(
    source: Path, partial: Path, progress: Progress | None = None, pages_per_step: int = -1, *, tidy: bool = False
) -> tuple[int, int]:
    """Copy ``source`` into ``partial`` with SQLite's online backup, inside one read
    transaction (a consistent snapshot that never restarts however busy a writer is),
    and return the snapshot's (memories, history rows). The copy is left in rollback-journal
    mode: one self-contained file, which a read-only verification leaves alone. ``tidy``
    removes the ``-wal``/``-shm`` files reading ``source`` created (never for a live database,
    whose server may be about to use them)."""
    _remove(partial)
    opened = (
        sqlite_migrations.reading(source) if tidy
        else closing(sqlite3.connect(f"file:{source.resolve()}?mode=ro", uri=True, isolation_level=None))
    )
    with opened as src:
        src.execute("BEGIN")
        expect = _counts(src)  # also opens the read snapshot the copy will see
        dest = sqlite3.connect(partial, isolation_level=None)
        try:
            src.backup(dest, pages=pages_per_step, progress=_progress(progress))
            dest.execute("PRAGMA journal_mode = DELETE")
        finally:
            dest.close()
        src.execute("COMMIT")
    return expect


def backup(
    db: str | os.PathLike[str],
    target: str | os.PathLike[str],
    progress: Progress | None = None,
    pages_per_step: int = 1024,
) -> FileInfo:
    """Copy ``db`` into ``target`` with SQLite's online backup, safe while a server writes.

    The copy is a consistent snapshot (every write committed before it started, none
    after). It is verified (integrity check, the tables of its schema version, the same
    row counts as the snapshot) before it is renamed into place; on any failure nothing
    is left behind.
    """
    source_path, out = Path(db), Path(target)
    if source_path.is_dir():
        raise BackupInvalid(f"{source_path} is a directory, not a database file")
    if not source_path.is_file():
        raise BackupInvalid(f"there is no database at {source_path}")
    if out.is_dir():
        raise BackupInvalid(f"{out} is a directory; give the backup a file name, e.g. {out / 'greatmemory-backup.db'}")
    if out.exists():
        raise BackupInvalid(f"{out} exists already; choose another name")
    try:
        version = sqlite_migrations.read_version(source_path)
    except DatabaseUnusable as exc:
        raise BackupInvalid(f"cannot back it up: {exc.message}") from None
    if version is not None and version > sqlite_migrations.LATEST:
        raise SchemaTooNew(
            f"{source_path} has schema version {version}, newer than this release's {sqlite_migrations.LATEST}; "
            "back it up with the release that wrote it"
        )
    partial = out.with_name(out.name + ".partial")
    try:
        expect = _copy(source_path, partial, progress, pages_per_step)
        info = verify(partial, expect)
        os.replace(partial, out)
    finally:
        _remove(partial)
    return FileInfo(out, info.schema_version, info.memories, info.history, info.bytes)


def _progress(callback: Progress | None) -> Callable[[int, int, int], object] | None:
    if callback is None:
        return None
    return lambda status, remaining, total: callback(total - remaining, total)


def restore(db: str | os.PathLike[str], source: str | os.PathLike[str]) -> tuple[FileInfo, Path | None]:
    """Replace ``db`` with the backup ``source`` atomically. Verifies the backup first (a
    greatmemory database this release can open), refuses while a server holds ``db``, keeps
    the replaced file, whatever state it is in, as ``<db>.pre-restore-<time>.bak``, and
    leaves no partial file behind on failure. Returns the restored file's info and that
    path. Through a symlink, the file it points to is replaced and the link kept."""
    target = Path(db).resolve()
    if target.is_dir():
        raise BackupInvalid(f"{db} is a directory, not a database file; name the database file to restore into")
    info = verify(source)
    if info.schema_version < 1:  # an empty file is valid SQLite, but restoring it would wipe the database
        raise BackupInvalid(f"{source} holds no greatmemory database (schema version 0); it is not a backup")
    with DatabaseLock(target):
        partial = target.with_name(target.name + ".restore.partial")
        try:
            if _copy(Path(source), partial, tidy=True) != (info.memories, info.history):
                raise BackupInvalid(f"{source} changed while it was being restored; try again")
            kept = _set_aside(target)
            os.replace(partial, target)
        finally:
            _remove(partial)
    return FileInfo(target, info.schema_version, info.memories, info.history, info.bytes), kept


def _set_aside(db: Path) -> Path | None:
    """Move ``db`` (and a write-ahead log it may still need) to a new
    ``<db>.pre-restore-<time>.bak``; a damaged file is moved as it is."""
    if not db.exists():
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kept = db.with_name(f"{db.name}.pre-restore-{stamp}.bak")
    for n in range(1, 1000):  # two restores in one second must not overwrite the first one's copy
        if not kept.exists():
            break
        kept = db.with_name(f"{db.name}.pre-restore-{stamp}-{n}.bak")
    if sqlite_migrations.has_sqlite_header(db):  # never let SQLite near a ruined file: it would drop its WAL
        try:
            conn = sqlite3.connect(db)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fold the WAL in before moving the file
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            pass  # damaged further in: keep it, and its WAL, as they are
    os.replace(db, kept)
    wal = Path(f"{db}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        os.replace(wal, f"{kept}-wal")  # beside the kept file under the name SQLite looks for
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return kept
