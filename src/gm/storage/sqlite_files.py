"""Whole-file operations on a SQLite database: the lock a running store holds, consistent
online backups with verification, and atomic restore.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gm.errors import BackupInvalid, DatabaseLocked, SchemaTooNew, StorageUnavailable
from gm.storage import sqlite_migrations

Progress = Callable[[int, int], None]  # (pages done, pages in all)


def lock_path(db: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(db)}.lock")


class DatabaseLock:
    """An exclusive advisory lock on ``<db>.lock``, held while a store has the database
    open, so a second server or a restore cannot run against it at the same time."""

    def __init__(self, db: str | os.PathLike[str]) -> None:
        self.path = lock_path(db)
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        try:
            handle = self.path.open("a+")
        except OSError as exc:
            raise StorageUnavailable(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise DatabaseLocked(
                f"{self.path.with_suffix('')} is in use by {holder}; stop that server first "
                "(one SQLite database has one server)"
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
    """Check ``path`` is an intact greatmemory database this release can open: integrity
    check, schema version not newer than this release, and (if given) row counts."""
    file = Path(path)
    if not file.is_file():
        raise BackupInvalid(f"{file} does not exist")
    try:
        version = sqlite_migrations.read_version(file)
    except StorageUnavailable as exc:  # not SQLite at all: the backup is invalid, not the storage unreachable
        raise BackupInvalid(exc.message) from None
    sqlite_migrations.guard(file, version, sqlite_migrations.LATEST)
    try:
        conn = sqlite3.connect(f"file:{file.resolve()}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA integrity_check").fetchall()
            if result != [("ok",)]:
                raise BackupInvalid(f"{file} failed SQLite's integrity check: {result[0][0]}")
            counts = _counts(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupInvalid(f"{file} is not a readable SQLite database: {exc}") from None
    if expect is not None and counts != expect:
        raise BackupInvalid(
            f"{file} holds {counts[0]} memories and {counts[1]} history rows, but the database held "
            f"{expect[0]} and {expect[1]} when it was copied"
        )
    return FileInfo(file, version or 0, counts[0], counts[1], file.stat().st_size)


def default_backup_path(db: str | os.PathLike[str]) -> Path:
    source = Path(db)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return source.with_name(f"{source.stem}-{stamp}.backup{source.suffix or '.db'}")


def backup(
    db: str | os.PathLike[str],
    target: str | os.PathLike[str],
    progress: Progress | None = None,
    pages_per_step: int = 1024,
) -> FileInfo:
    """Copy ``db`` into ``target`` with SQLite's online backup, safe while a server writes.

    The copy is taken inside one read transaction, so it is a consistent snapshot (every
    write committed before it started, none after) and it never restarts however busy the
    writer is. It is verified (integrity check, same row counts as the snapshot) before it
    is renamed into place.
    """
    source_path, out = Path(db), Path(target)
    if not source_path.is_file():
        raise BackupInvalid(f"there is no database at {source_path}")
    if out.exists():
        raise BackupInvalid(f"{out} exists already; choose another name")
    version = sqlite_migrations.read_version(source_path)
    if version is not None and version > sqlite_migrations.LATEST:
        raise SchemaTooNew(
            f"{source_path} has schema version {version}, newer than this release's {sqlite_migrations.LATEST}; "
            "back it up with the release that wrote it"
        )
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{source_path.resolve()}?mode=ro", uri=True, isolation_level=None)
    try:
        source.execute("BEGIN")
        expect = _counts(source)  # also opens the read snapshot the copy will see
        dest = sqlite3.connect(partial)
        try:
            source.backup(dest, pages=pages_per_step, progress=_progress(progress))
        finally:
            dest.close()
        source.execute("COMMIT")
    finally:
        source.close()
    try:
        info = verify(partial, expect)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    return FileInfo(out, info.schema_version, info.memories, info.history, info.bytes)


def _progress(callback: Progress | None) -> Callable[[int, int, int], object] | None:
    if callback is None:
        return None
    return lambda status, remaining, total: callback(total - remaining, total)


def restore(db: str | os.PathLike[str], source: str | os.PathLike[str]) -> tuple[FileInfo, Path | None]:
    """Replace ``db`` with the backup ``source`` atomically. Verifies the backup first,
    refuses while a server holds ``db``, and keeps the replaced file as
    ``<db>.pre-restore-<time>.bak``. Returns the restored file's info and that path."""
    target = Path(db)
    info = verify(source)
    if info.schema_version < 1:  # an empty file is valid SQLite, but restoring it would wipe the database
        raise BackupInvalid(f"{source} holds no greatmemory database (schema version 0); it is not a backup")
    with DatabaseLock(target):
        partial = target.with_name(target.name + ".restore.partial")
        partial.unlink(missing_ok=True)
        conn = sqlite3.connect(f"file:{Path(source).resolve()}?mode=ro", uri=True)
        dest = sqlite3.connect(partial)
        try:
            conn.backup(dest)
        finally:
            dest.close()
            conn.close()
        kept: Path | None = None
        if target.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            kept = target.with_name(f"{target.name}.pre-restore-{stamp}.bak")
            for n in range(1, 1000):  # two restores in one second must not overwrite the first one's copy
                if not kept.exists():
                    break
                kept = target.with_name(f"{target.name}.pre-restore-{stamp}-{n}.bak")
            conn = sqlite3.connect(target)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # fold the WAL in before moving the file
            finally:
                conn.close()
            os.replace(target, kept)
        for suffix in ("-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        os.replace(partial, target)
    return FileInfo(target, info.schema_version, info.memories, info.history, info.bytes), kept
