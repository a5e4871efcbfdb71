"""What a memory is: the typed results (Memory, SearchHit, HistoryEntry, Stats), its
bounds, time-ordered ids, the RFC 3339 time format and JSON that keeps big integers exact.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from gm.errors import InvalidInput

MAX_TEXT_CHARS = 32_000
MAX_METADATA_BYTES = 64 * 1024
MAX_SCOPE_CHARS = 256
MAX_BATCH = 1000
DEFAULT_NAMESPACE = "default"
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, the last time RFC 3339 can write
MAX_TTL_SECONDS = 100 * 365 * 86_400  # a bound that does not move with the clock, as a schema can state
ID_PATTERN = r"[A-Za-z0-9._:\-]{1,128}"
RESERVED_IDS = frozenset({"search", "delete"})  # /v1/memories/search and /delete are routes, not memories
SCOPE_FIELDS = ("namespace", "user_id", "agent_id", "session_id")
MIN_TTL_SECONDS = 0.001  # times are kept in milliseconds: a shorter TTL would expire on arrival
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the integers both backends store and compare exactly
# Every byte but an ASCII digit to "x", the digits to "0": a run of 19 digits, the shortest that
# can spell an integer past 64 bits, is then a substring search (a 2.3 KB line of an export
# with vectors: 4 us, against 47 us for re's \d{19}, measured).
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_LONG_RUN = b"0" * 19


def long_digits(data: bytes) -> bool:
    """Whether ``data`` holds 19 ASCII digits in a row."""
    return _LONG_RUN in data.translate(_DIGITS_AS_ZEROS)


Mode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[str, ...] = ("hybrid", "vector", "keyword")
ORDERS: tuple[str, ...] = ("created_at", "occurred_at")  # what a list can be ordered by, newest first
MAX_RECENCY_DAYS = 100 * 365


@dataclass(frozen=True, slots=True)
class Memory:
    """One stored memory. Times are milliseconds since the Unix epoch (UTC)."""

    id: str
    namespace: str
    user_id: str | None
    agent_id: str | None
    session_id: str | None
    text: str
    metadata: dict[str, Any]
    created_at: int
    updated_at: int
    expires_at: int | None
    occurred_at: int  # when it happened, as the client said (default: when it was added)

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON shape, with RFC 3339 times."""
        return {
            "id": self.id,
            "namespace": self.namespace,
            "user_id": self.user_id,
            "agent_id": self.agent_id,
            "session_id": self.session_id,
            "text": self.text,
            "metadata": self.metadata,
            "created_at": format_time(self.created_at),
            "updated_at": format_time(self.updated_at),
            "expires_at": format_time(self.expires_at) if self.expires_at is not None else None,
            "occurred_at": format_time(self.occurred_at),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Memory:
        """The inverse of :meth:`to_dict`: a memory as the HTTP API sends it (what gm.connect reads)."""
        expires = data["expires_at"]
        return cls(
            id=data["id"], namespace=data["namespace"], user_id=data["user_id"], agent_id=data["agent_id"],
            session_id=data["session_id"], text=data["text"], metadata=data["metadata"],
            created_at=parse_time(data["created_at"], "created_at"),
            updated_at=parse_time(data["updated_at"], "updated_at"),
            expires_at=parse_time(expires, "expires_at") if expires is not None else None,
            occurred_at=parse_time(data["occurred_at"], "occurred_at"),
        )


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A search result: the memory and its score (higher is better; comparable within one
    response), with its parts: ``vector_score`` the cosine similarity and ``keyword_score``
    the keyword rank, each None when that ranking did not find the memory."""

    memory: Memory
    score: float
    vector_score: float | None = None
    keyword_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory": self.memory.to_dict(), "score": self.score,
            "vector_score": self.vector_score, "keyword_score": self.keyword_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchHit:
        return cls(Memory.from_dict(data["memory"]), data["score"], data["vector_score"], data["keyword_score"])


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change of a memory: ``op`` is add, update or delete; text and metadata as after it."""

    op: str
    at: int
    text: str | None
    metadata: dict[str, Any] | None
    namespace: str

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "at": format_time(self.at), "text": self.text, "metadata": self.metadata,
                "namespace": self.namespace}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryEntry:
        return cls(data["op"], parse_time(data["at"], "at"), data["text"], data["metadata"], data["namespace"])


@dataclass(frozen=True, slots=True)
class Page:
    """One page of :meth:`gm.Store.list`; pass ``next_cursor`` back for the next one."""

    memories: list[Memory]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        """The page as the HTTP API, the MCP tools and the CLI's ``--json`` give it."""
        return {"memories": [m.to_dict() for m in self.memories], "next_cursor": self.next_cursor}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Page:
        return cls([Memory.from_dict(m) for m in data["memories"]], data["next_cursor"])


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts and facts about a store."""

    memories: int
    namespaces: dict[str, int]
    schema_version: int
    backend: str
    model: str
    database_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "memories": self.memories,
            "namespaces": self.namespaces,
            "schema_version": self.schema_version,
            "backend": self.backend,
            "model": self.model,
            "database_bytes": self.database_bytes,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        """The inverse of :meth:`to_dict`: what is not a field goes back into ``extra``."""
        fields = ("memories", "namespaces", "schema_version", "backend", "model", "database_bytes")
        return cls(
            memories=data["memories"], namespaces=data["namespaces"], schema_version=data["schema_version"],
            backend=data["backend"], model=data["model"], database_bytes=data["database_bytes"],
            extra={k: v for k, v in data.items() if k not in fields},
        )


@dataclass(frozen=True, slots=True)
class Scope:
    """Which memories an operation sees: a namespace and optional user/agent/session."""

    namespace: str = DEFAULT_NAMESPACE
    user_id: str | None = None
    agent_id: str | None = None
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class TimeRange:
    """Memories whose event time (``occurred_at``) lies in ``[after, before)``, in
    milliseconds since the epoch; None on a side means unbounded there."""

    after: int | None = None
    before: int | None = None


@dataclass(slots=True)
class NewMemory:
    """A validated memory input, before it gets its vector and row."""

    id: str
    client_id: bool
    scope: Scope
    text: str
    metadata: dict[str, Any]
    expires_at: int | None
    vector: bytes = b""
    next_vector: bytes = b""  # the next model's, while a re-embed is under way (gm.reembed)
    created_at: int | None = None  # set only by imports, which keep the original times
    updated_at: int | None = None
    ttl_ms: int | None = None  # the expiry was given as a TTL: it counts from the commit
    occurred_at: int | None = None  # None: when it is added (the commit's stamp)

    def same_content(self, other: Memory) -> bool:
        return (
            self.text == other.text
            and canonical(self.metadata) == canonical(other.metadata)  # type-strict: true is not 1
            and self.scope.namespace == other.namespace
            and self.scope.user_id == other.user_id
            and self.scope.agent_id == other.agent_id
            and self.scope.session_id == other.session_id
            and (self.occurred_at is None or self.occurred_at == other.occurred_at)
        )


def canonical(value: Any) -> bytes:
    """JSON with sorted keys: equal bytes mean equal values of the same JSON types."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


# -- time ---------------------------------------------------------------------------


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def format_time(ms: int) -> str:
    """Milliseconds since the epoch as RFC 3339 UTC, e.g. ``2026-11-29T16:20:00.123Z``. In
    integers: through a float, 4 in 10 times came back a millisecond off."""
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?")


def parse_time(value: Any, path: str) -> int:
    """An RFC 3339 string (or a datetime) as milliseconds since the epoch."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        if not _RFC3339.fullmatch(value):  # fromisoformat alone also takes 20240115T093000Z and the like
            raise InvalidInput(f"{path} must be an RFC 3339 time such as 2026-11-29T16:20:00Z", path=path)
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise InvalidInput(
                f"{path} must be an RFC 3339 time such as 2026-11-29T16:20:00Z", path=path
            ) from None
    else:
        raise InvalidInput(f"{path} must be an RFC 3339 time string", path=path)
    if moment.tzinfo is None:
        raise InvalidInput(f"{path} needs a time zone, e.g. a trailing Z for UTC", path=path)
    ms = (moment - _EPOCH) // _MS  # (whole milliseconds, rounded down; a float would lose the last one)
    if not 0 <= ms <= MAX_TIME_MS:  # times are stored and written back as UTC years 1970-9999
        raise InvalidInput(f"{path} must lie between 1970 and the end of 9999 (UTC)", path=path)
    return ms


# -- ids ------------------------------------------------------------------------------

_id_lock = threading.Lock()
_last_id_ms = 0
_last_id_seq = 0


def new_id() -> str:
    """A time-ordered id (UUIDv7 layout, lowercase hex with dashes); sorts by creation."""
    global _last_id_ms, _last_id_seq
    with _id_lock:
        ms = now_ms()
        if ms <= _last_id_ms:
            ms = _last_id_ms
            _last_id_seq += 1
            if _last_id_seq >= 0x1000:
                ms += 1
                _last_id_seq = 0
        else:
            _last_id_seq = int.from_bytes(os.urandom(2), "big") & 0x3FF
        _last_id_ms = ms
        seq = _last_id_seq
    rand = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (seq << 64) | (0b10 << 62) | rand
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- JSON -------------------------------------------------------------------------------


def parse_json(raw: bytes | str) -> Any:
    """JSON as Python values, as ``orjson.loads`` gives them (and raising its
    ``JSONDecodeError``), except that an integer past 64 bits stays an exact ``int``: orjson
    turns it into a float, silently rounded, where validation must refuse it by name."""
    value = orjson.loads(raw)
    data = raw.encode() if isinstance(raw, str) else raw
    if long_digits(data):  # rare (19+ digits, maybe only in a string): the exact, slower parser
        try:  # the same document: orjson has just accepted it, so it is strict JSON
            value = json.loads(data)
        except RecursionError:  # nested deeper than Python's parser goes (orjson allows 1024 levels)
            raise orjson.JSONDecodeError("nested too deeply", "", 0) from None
    return value
