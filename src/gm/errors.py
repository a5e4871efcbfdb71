"""The typed exceptions of greatmemory.

Every error a caller can act on is a subclass of :class:`GMError` carrying a stable
snake_case ``code`` (the HTTP API puts it in its error body) and a message that says
what to do next. The HTTP status for each class is the ``status`` attribute.
"""

from __future__ import annotations

from typing import Any


class GMError(Exception):
    """Base of every greatmemory error."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class InvalidInput(GMError):
    """A value of the wrong shape or out of range (HTTP 422). ``details['path']`` names it."""

    code = "invalid_input"
    status = 422

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message, details={"path": path} if path else None)
        self.path = path


class InvalidSetting(InvalidInput):
    """A ``GM_*`` variable (or the flag standing for it) with a value it cannot take;
    ``variable`` names it. Raised at start-up, before anything is opened."""

    code = "invalid_setting"

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message, path=variable)
        self.variable = variable


class InvalidFilter(InvalidInput):
    """A metadata filter that does not parse (HTTP 422)."""

    code = "invalid_filter"


class Unauthorized(GMError):
    """No API key, or not a key this server knows (HTTP 401)."""

    code = "unauthorized"
    status = 401


class Forbidden(GMError):
    """The API key is bound to another namespace (HTTP 403)."""

    code = "forbidden"
    status = 403


class NotFound(GMError):
    """No memory with that id (or it has expired) (HTTP 404)."""

    code = "not_found"
    status = 404


class Conflict(GMError):
    """A client-chosen id already names a memory with other content (HTTP 409)."""

    code = "conflict"
    status = 409


class StoreClosed(GMError):
    """The store was closed; open a new one with :func:`gm.open`."""

    code = "store_closed"
    status = 503


class NotReady(GMError):
    """The store is still starting or migrating (HTTP 503)."""

    code = "not_ready"
    status = 503


class ModelError(GMError):
    """Base of embedding-model problems."""

    code = "model_error"
    status = 500


class ModelNotFound(ModelError):
    """The model files (``model.onnx``, ``tokenizer.json``) are missing."""

    code = "model_not_found"


class ModelMismatch(ModelError):
    """The database's vectors came from another model than the one configured."""

    code = "model_mismatch"


class ModelSwitched(ModelError):
    """The database's vectors moved to another model (a re-embed switched) after this write
    was embedded; the store embeds it again with the new model and retries once."""

    code = "model_switched"
    status = 503


class ReembedInProgress(Conflict):
    """A re-embed (or reindex) is already under way: to another model, or run by another
    process; finish it, or cancel it with ``gmem reembed --cancel``."""

    code = "reembed_in_progress"


class SchemaError(GMError):
    """Base of schema / migration problems."""

    code = "schema_error"
    status = 503


class SchemaTooNew(SchemaError):
    """The database was written by a newer release; this one refuses to touch it."""

    code = "schema_too_new"


class MigrationFailed(SchemaError):
    """A migration step failed and was rolled back; the database is at the last good version."""

    code = "migration_failed"

    def __init__(self, message: str, *, step: int, name: str) -> None:
        super().__init__(message, details={"step": step, "name": name})
        self.step = step
        self.name = name


class StorageUnavailable(GMError):
    """The database cannot be reached or read (HTTP 503). ``transient`` says whether
    trying again may help (a server waits and retries); see :class:`DatabaseUnusable`."""

    code = "storage_unavailable"
    status = 503
    transient = True


class DatabaseUnusable(StorageUnavailable):
    """The database can never be opened as it is: not a SQLite file, damaged, a directory,
    in a folder that does not exist, or not a greatmemory database. Retrying cannot help."""

    code = "database_unusable"
    transient = False


class DatabaseLocked(StorageUnavailable):
    """Another process (a running server) holds the database."""

    code = "database_locked"


class ServerUnreachable(StorageUnavailable):
    """No greatmemory server answered at the URL :func:`gm.connect` was given: nothing
    listens there, the name does not resolve, it did not answer in time, or what answered
    is not a greatmemory server. The message names the URL and what to check."""

    code = "server_unreachable"


class IndexTooLarge(StorageUnavailable):
    """The in-process vector index of this database would not fit in the memory the machine
    has available: refused at open rather than killed for memory later."""

    code = "index_too_large"
    transient = False


class BackupInvalid(GMError):
    """A backup file failed verification (not SQLite, corrupt, or counts that do not match)."""

    code = "backup_invalid"
    status = 422


# Each library error by its code: what an HTTP error body names comes back as this class.
BY_CODE: dict[str, type[GMError]] = {
    cls.code: cls
    for cls in (
        GMError, InvalidInput, InvalidSetting, InvalidFilter, Unauthorized, Forbidden, NotFound, Conflict,
        StoreClosed, NotReady, ModelError, ModelNotFound, ModelMismatch, ModelSwitched, ReembedInProgress, SchemaError,
        SchemaTooNew, MigrationFailed, StorageUnavailable, DatabaseUnusable, DatabaseLocked, ServerUnreachable,
        IndexTooLarge, BackupInvalid,
    )
}


def from_dict(body: dict[str, Any], status: int, cls: type[GMError] | None = None) -> GMError:
    """The inverse of :meth:`GMError.to_dict`: the error an HTTP error body names, as the
    class of its code (or ``cls``, for a code of the server's own), keeping the body's code,
    message, details and ``status``; a code this release does not know is a plain GMError."""
    code = str(body.get("code") or "internal")
    message = str(body.get("message") or f"the server answered {status}")
    given = body.get("details")
    details: dict[str, Any] = given if isinstance(given, dict) else {}
    kind = cls or BY_CODE.get(code, GMError)
    error: GMError
    if issubclass(kind, InvalidSetting):
        error = kind(message, variable=str(details.get("path") or ""))
    elif issubclass(kind, InvalidInput):
        error = kind(message, path=details.get("path"))
    elif issubclass(kind, MigrationFailed):
        error = kind(message, step=details.get("step", 0), name=str(details.get("name", "")))
    else:
        error = kind(message, details=details or None)
    error.code, error.status = code, status  # the server's words: e.g. draining is a NotReady coded so
    return error
