"""The exit codes of ``gmem`` (documented in docs/cli.md) and which error maps to which."""

from __future__ import annotations

from gm.errors import (
    BackupInvalid,
    DatabaseLocked,
    GMError,
    InvalidInput,
    MigrationFailed,
    ModelError,
    ModelSwitched,
    NotFound,
    ReembedInProgress,
    SchemaTooNew,
    StorageUnavailable,
)

EXIT_OK = 0
EXIT_ERROR = 1  # anything else
EXIT_USAGE = 2  # bad flags, arguments or input values
EXIT_SCHEMA = 3  # the database's schema is newer than this release; nothing was changed
EXIT_MIGRATION = 4  # a migration step failed and was rolled back
EXIT_MODEL = 5  # the embedding model is missing or does not match the database
EXIT_LOCKED = 6  # a running server holds the database
EXIT_INVALID_BACKUP = 7  # a backup failed verification
EXIT_NOT_FOUND = 8  # no memory with that id
EXIT_UNAVAILABLE = 9  # the server or database cannot be reached
EXIT_BUSY = 10  # a re-embed or reindex is already under way (on this database, by this or another process)


def exit_code(error: GMError) -> int:
    for cls, code in (
        (SchemaTooNew, EXIT_SCHEMA),
        (MigrationFailed, EXIT_MIGRATION),
        (ModelSwitched, EXIT_MODEL),  # (a write that a re-embed's switch overtook twice: a ModelError)
        (ModelError, EXIT_MODEL),
        (ReembedInProgress, EXIT_BUSY),
        (DatabaseLocked, EXIT_LOCKED),
        (BackupInvalid, EXIT_INVALID_BACKUP),
        (NotFound, EXIT_NOT_FOUND),
        (InvalidInput, EXIT_USAGE),
        (StorageUnavailable, EXIT_UNAVAILABLE),  # and ServerUnreachable, one of them
    ):
        if isinstance(error, cls):
            return code
    return EXIT_ERROR
