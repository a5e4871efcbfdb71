"""The write operations (the messages a backend's Writer receives), what a committed write
replies and the index changes it produces, and the errors every backend answers alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from gm.errors import Conflict, ModelMismatch, NotFound
from gm.filters import Filter
from gm.memory import Memory, NewMemory, Scope
from gm.model_identity import ModelRecord

if TYPE_CHECKING:
    from gm.storage.transaction import Transaction

UNSET: Any = object()


@dataclass(slots=True)
class AddMemories:
    """Insert all items or none; a client id seen before with the same content is returned as is.

    ``model`` is the identity of the model that made the items' vectors; during a re-embed
    (gm.reembed) ``next_model`` made their ``next_vector`` (empty when not made)."""

    items: list[NewMemory]
    now: int
    model: str = ""
    next_model: str = ""


@dataclass(slots=True)
class UpdateMemory:
    """Change the live memory ``id``; with ``namespace``, only if it lies in that namespace
    (checked in the transaction that writes, so a memory that another tenant added under the
    same id meanwhile is never touched)."""

    id: str
    now: int
    text: str | None = None
    vector: bytes | None = None
    metadata: dict[str, Any] | None = None
    expires_at: Any = UNSET  # int, None (clear) or UNSET (keep)
    namespace: str | None = None
    occurred_at: int | None = None  # None: keep
    model: str = ""  # the identity of the model that made ``vector``; ``next_vector`` by ``next_model``
    next_vector: bytes | None = None
    next_model: str = ""


@dataclass(slots=True)
class DeleteMemory:
    """Delete the live memory ``id``; with ``namespace``, only if it lies in that namespace."""

    id: str
    now: int
    namespace: str | None = None


@dataclass(slots=True)
class DeleteWhere:
    scope: Scope
    filter: Filter | None
    now: int


@dataclass(slots=True)
class PurgeExpired:
    now: int


@dataclass(slots=True)
class RecordModel:
    """Record which model makes the vectors (gm.model_identity), upgrading an old-scheme record
    of the same files in place, or fail with ModelMismatch if another model's vectors hold data."""

    model: ModelRecord


@dataclass(slots=True)
class CheckWrites:
    """Commit a one-row write (``meta.write_check``): readyz's probe of whether writes work
    again after they failed, so an instance out of rotation comes back without traffic."""

    now: int


@dataclass(slots=True)
class BuildContext:
    """Build the session context (gm.context) of up to ``limit`` memories that have none yet
    (written before schema v3, or by an older release meanwhile); replies how many it built."""

    limit: int


@dataclass(frozen=True, slots=True)
class ReembedInfo:
    """A re-embed under way, as ``meta.reembed`` records it."""

    identity: str  # the next model's
    label: str
    model_dir: str
    dimensions: int
    copy: bool  # the same model: a reindex copies the vectors instead of running a model
    started_at: int  # ms

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> ReembedInfo:
        data: dict[str, Any] = orjson.loads(text)
        return cls(str(data["identity"]), str(data.get("label", "")), str(data.get("model_dir", "")),
                   int(data["dimensions"]), bool(data.get("copy", False)), int(data.get("started_at", 0)))


@dataclass(slots=True)
class BeginReembed:
    """Start moving the vectors to the model ``identity`` (gm.reembed): the next columns
    are added beside the current ones, and the re-embed is recorded in ``meta``; a re-embed
    to the same model already under way is resumed. ``copy``: the same model (a reindex)."""

    identity: str
    label: str
    model_dir: str
    dimensions: int
    copy: bool = False


@dataclass(slots=True)
class StoreNextVectors:
    """Store the next model's vectors of memories whose text is still ``text``:
    (rowid, text, vector); replies how many were stored."""

    rows: list[tuple[int, str, bytes]]
    identity: str


@dataclass(slots=True)
class SwitchVectors:
    """Make the next vectors current, atomically, if every memory has one; replies the new
    vectors generation, or None if some memory still has none."""

    identity: str


@dataclass(slots=True)
class EndReembed:
    """``drop_old``: drop the vectors a switch left behind; else cancel the re-embed under way
    (its next columns go). Replies whether there was anything to drop."""

    drop_old: bool


@dataclass(slots=True)
class RebuildStep:
    """One bounded piece of an online rebuild of derived state (gm.storage.keyword_rebuild):
    ``run`` works on the Writer's transaction, in its own savepoint like any write, and what
    it returns is the reply. A rebuild made of such steps keeps the one-writer rule, and other
    writes take their turns between its steps."""

    run: Callable[[Transaction], Awaitable[Any]]


WriteOp = (
    AddMemories | UpdateMemory | DeleteMemory | DeleteWhere | PurgeExpired | RecordModel | CheckWrites | BuildContext
    | BeginReembed | StoreNextVectors | SwitchVectors | EndReembed | RebuildStep
)


def updated(old: Memory, op: UpdateMemory, stamp: int) -> Memory:
    """``old`` with the update's fields applied at commit time ``stamp`` (what the Writers
    store and return)."""
    return Memory(
        old.id, old.namespace, old.user_id, old.agent_id, old.session_id,
        op.text if op.text is not None else old.text,
        op.metadata if op.metadata is not None else old.metadata,
        old.created_at, stamp,
        old.expires_at if op.expires_at is UNSET else op.expires_at,
        old.occurred_at if op.occurred_at is None else op.occurred_at,
    )


def added_times(item: NewMemory, stamp: int) -> tuple[int, int, int | None, int]:
    """An added memory's created_at, updated_at, expires_at and occurred_at: an import keeps
    its own times; any other add is created at the commit ``stamp``, and a TTL counts from
    then; it occurred when the client says, else when it was created."""
    created = item.created_at if item.created_at is not None else stamp  # (0 is 1970, a time like any other)
    expires = stamp + item.ttl_ms if item.ttl_ms is not None else item.expires_at
    occurred = item.occurred_at if item.occurred_at is not None else created
    return created, item.updated_at if item.updated_at is not None else created, expires, occurred


def unknown_id(memory_id: str) -> NotFound:
    """The one answer for an id that names no live memory, or one in a namespace the caller
    may not see: the two are indistinguishable."""
    return NotFound(f"no memory with id {memory_id!r}")


def id_conflict(memory_id: str) -> Conflict:
    return Conflict(
        f"id {memory_id!r} already names a memory with other content; choose another id or update that memory"
    )


def model_mismatch(
    stored: str, configured: str, *, stored_label: str | None = None, configured_label: str | None = None,
    configured_dir: str | None = None,
) -> ModelMismatch:
    def named(identity: str, label: str | None) -> str:
        return f"{identity!r} ({label})" if label and not identity.startswith(f"{label}@") else repr(identity)

    folder = configured_dir or "<folder of the configured model>"
    return ModelMismatch(
        f"this database's vectors were made by model {named(stored, stored_label)} but the configured "
        f"model is {named(configured, configured_label)}; to move this database to the configured model run "
        f"`gmem reembed --model-dir {folder}` with the server on the old model, or set GM_MODEL_DIR back to "
        "the model the database was built with"
    )


@dataclass(slots=True)
class IndexChange:
    """One committed change the in-process vector index must follow.

    ``vector`` None with ``remove`` False means only ``expires_at`` changed.
    """

    rowid: int
    remove: bool = False
    vector: bytes | None = None
    scope: Scope | None = None
    expires_at: int | None = None
    next: bool = False  # the vector is the next model's (a re-embed under way): for the next index
    model: str = ""  # the identity of the model whose vector this is (set by the write flow); "" every index


def final_changes(changes: list[IndexChange]) -> list[IndexChange]:
    """A batch's index changes with one per row, its final state: an add into a session
    first carries the memory's own vector, then the mixed one (gm.context); the index then
    writes one slot, not two. An expiry-only change keeps the vector before it."""
    final: dict[tuple[int, bool], IndexChange] = {}
    for change in changes:
        key = (change.rowid, change.next)
        before = final.get(key)
        if before is not None and not change.remove and change.vector is None and not before.remove:
            before.expires_at = change.expires_at
        else:
            final.pop(key, None)  # (re-inserted: the dict keeps the order of final states)
            final[key] = change
    return list(final.values())


@dataclass(slots=True)
class WriteResult:
    value: Any
    changes: list[IndexChange] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VectorRow:
    rowid: int
    scope: Scope
    expires_at: int | None
    vector: bytes
