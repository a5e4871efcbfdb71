"""What a memory is: the typed results (Memory, SearchHit, HistoryEntry, Stats), the
validation of memory inputs, time-ordered ids and the RFC 3339 time format.
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
_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
ID_PATTERN = _ID_RE.pattern
RESERVED_IDS = frozenset({"search", "delete"})  # /v1/memories/search and /delete are routes, not memories
SCOPE_FIELDS = ("namespace", "user_id", "agent_id", "session_id")
MIN_TTL_SECONDS = 0.001  # times are kept in milliseconds: a shorter TTL would expire on arrival
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the integers both backends store and compare exactly
_LONG_DIGITS = re.compile(rb"\d{19}")  # the shortest run that can spell an integer past 64 bits

Mode = Literal["hybrid", "vector", "keyword"]
MODES: tuple[str, ...] = ("hybrid", "vector", "keyword")
ORDERS: tuple[str, ...] = ("created_at", "occurred_at")  # what a list can be ordered by, newest first


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


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One change of a memory: ``op`` is add, update or delete; text and metadata as after it."""

    op: str
    at: int
    text: str | None
    metadata: dict[str, Any] | None
    namespace: str

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "at": format_time(self.at), "text": self.text, "metadata": self.metadata}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of :meth:`gm.Store.list`; pass ``next_cursor`` back for the next one."""

    memories: list[Memory]
    next_cursor: str | None


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


def check_id(value: Any, path: str = "id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidInput(
            f"{path} must be 1-128 characters of A-Z a-z 0-9 . _ : -", path=path
        )
    return value


# -- validation -----------------------------------------------------------------------


def check_text(value: Any, path: str = "text") -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{path} must be a string", path=path)
    if not value.strip():
        raise InvalidInput(f"{path} must not be empty", path=path)
    if "\x00" in value:  # neither backend's text type holds it the same way: refuse it on both
        raise InvalidInput(f"{path} must not contain the NUL character (U+0000)", path=path)
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidInput(
            f"{path} is {len(value)} characters; the limit is {MAX_TEXT_CHARS}. "
            "Split it into several memories.",
            path=path,
        )
    return value


def parse_json(raw: bytes | str) -> Any:
    """JSON as Python values, as ``orjson.loads`` gives them (and raising its
    ``JSONDecodeError``), except that an integer past 64 bits stays an exact ``int``: orjson
    turns it into a float, silently rounded, where validation must refuse it by name."""
    value = orjson.loads(raw)
    data = raw.encode() if isinstance(raw, str) else raw
    if _LONG_DIGITS.search(data):  # rare (19+ digits, maybe only in a string): the exact, slower parser
        try:  # the same document: orjson has just accepted it, so it is strict JSON
            value = json.loads(data)
        except RecursionError:  # nested deeper than Python's parser goes (orjson allows 1024 levels)
            raise orjson.JSONDecodeError("nested too deeply", "", 0) from None
    return value


def _integer_out_of_range(value: Any, path: str) -> str | None:
    """The path of the first integer in ``value`` outside the 64-bit range, if any."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if INT64_MIN <= value <= INT64_MAX else path
    if isinstance(value, dict):
        items: Any = ((f"{path}.{k}", v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, item in items:
        found = _integer_out_of_range(item, sub)
        if found is not None:
            return found
    return None


def check_metadata(value: Any, path: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{path} must be a JSON object", path=path)
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        _check_integers(value, path)
        raise InvalidInput(f"{path} must hold only JSON values: {exc}", path=path) from None
    if _LONG_DIGITS.search(encoded):
        _check_integers(value, path)
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidInput(
            f"{path} is {len(encoded)} bytes as JSON; the limit is {MAX_METADATA_BYTES}", path=path
        )
    if b"\\u0000" in encoded and _holds_nul(value):
        raise InvalidInput(f"{path} must not contain the NUL character (U+0000) in a key or string", path=path)
    decoded: dict[str, Any] = orjson.loads(encoded)
    return decoded


def _check_integers(value: Any, path: str) -> None:
    bad = _integer_out_of_range(value, path)
    if bad is not None:
        raise InvalidInput(
            f"{bad} is an integer outside the 64-bit range (-2**63 to 2**63-1) that metadata numbers can "
            "hold; send it as a string to keep it exact", path=bad)


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(v) for v in value)
    return False


def check_scope_value(value: Any, path: str, *, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise InvalidInput(f"{path} is required", path=path)
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_SCOPE_CHARS or "\x00" in value:
        raise InvalidInput(
            f"{path} must be a non-empty string of at most {MAX_SCOPE_CHARS} characters, without NUL", path=path
        )
    return value


def check_scope(
    namespace: Any = None,
    user_id: Any = None,
    agent_id: Any = None,
    session_id: Any = None,
    *,
    prefix: str = "",
) -> Scope:
    ns = check_scope_value(namespace, prefix + "namespace") or DEFAULT_NAMESPACE
    return Scope(
        ns,
        check_scope_value(user_id, prefix + "user_id"),
        check_scope_value(agent_id, prefix + "agent_id"),
        check_scope_value(session_id, prefix + "session_id"),
    )


def check_expiry(expires_at: Any, ttl_seconds: Any, now: int, prefix: str = "") -> int | None:
    if expires_at is not None and ttl_seconds is not None:
        raise InvalidInput("give expires_at or ttl_seconds, not both", path=prefix + "ttl_seconds")
    if ttl_seconds is not None:
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, (int, float))
            or not 0 < ttl_seconds <= MAX_TTL_SECONDS  # also refuses inf and NaN
        ):
            raise InvalidInput(
                f"ttl_seconds must be a positive number of seconds, at most {MAX_TTL_SECONDS} (100 years)",
                path=prefix + "ttl_seconds",
            )
        if ttl_seconds < MIN_TTL_SECONDS:  # expired on arrival, as a past expires_at would be
            raise InvalidInput("ttl_seconds is under a millisecond; the memory would never be seen",
                               path=prefix + "ttl_seconds")
        moment = now + int(ttl_seconds * 1000)
        return moment
    if expires_at is not None:
        moment = parse_time(expires_at, prefix + "expires_at")
        if moment <= now:
            raise InvalidInput(f"{prefix}expires_at is in the past; the memory would never be seen",
                               path=prefix + "expires_at")
        return moment
    return None


def check_limit(value: Any, *, default: int, maximum: int, path: str = "limit") -> int:
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():  # JSON's 3.0 is the integer 3 (as JSON Schema says)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidInput(f"{path} must be an integer from 1 to {maximum}", path=path)
    return value


def check_time_range(after: Any, before: Any) -> TimeRange | None:
    """``occurred_after`` (inclusive) and ``occurred_before`` (exclusive) as a range, or None
    if neither is given. An ``after`` later than ``before`` is refused: it can match nothing."""
    if after is None and before is None:
        return None
    start = parse_time(after, "occurred_after") if after is not None else None
    end = parse_time(before, "occurred_before") if before is not None else None
    if start is not None and end is not None and start > end:
        raise InvalidInput("occurred_after is later than occurred_before; no memory can lie between them",
                           path="occurred_after")
    return TimeRange(start, end)


def check_order(value: Any) -> str:
    if value is None:
        return "created_at"
    if value not in ORDERS:
        raise InvalidInput("order_by must be created_at or occurred_at", path="order_by")
    return str(value)


def check_mode(value: Any) -> str:
    if value is None:
        return "hybrid"
    if value not in MODES:
        raise InvalidInput("mode must be one of hybrid, vector, keyword", path="mode")
    return str(value)


MAX_RECENCY_DAYS = 100 * 365


def check_min_score(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise InvalidInput("min_score must be a number from -1 to 1 (a cosine similarity)", path="min_score")
    return float(value)


def check_recency(value: Any) -> float | None:
    """A recency half-life in days (None: no recency boost)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_RECENCY_DAYS:
        raise InvalidInput(
            f"recency must be a half-life in days, a number above 0 and at most {MAX_RECENCY_DAYS}", path="recency"
        )
    return float(value)


def new_memory(data: dict[str, Any], now: int, prefix: str = "") -> NewMemory:
    """Validate one memory input (the contract's fields) into a :class:`NewMemory`."""
    known = {"text", "id", "namespace", "user_id", "agent_id", "session_id", "metadata", "expires_at", "ttl_seconds",
             "occurred_at"}
    for key in data:
        if key not in known:
            raise InvalidInput(f"unknown field {prefix}{key}", path=prefix + key)
    if "text" not in data:
        raise InvalidInput(f"{prefix}text is required", path=prefix + "text")
    text = check_text(data["text"], prefix + "text")
    client_id = data.get("id") is not None
    mem_id = check_id(data["id"], prefix + "id") if client_id else new_id()
    if mem_id in RESERVED_IDS:
        raise InvalidInput(f"{prefix}id {mem_id!r} is reserved: it names an HTTP route", path=prefix + "id")
    scope = check_scope(
        data.get("namespace"), data.get("user_id"), data.get("agent_id"), data.get("session_id"), prefix=prefix
    )
    metadata = check_metadata(data.get("metadata"), prefix + "metadata")
    expires_at = check_expiry(data.get("expires_at"), data.get("ttl_seconds"), now, prefix)
    ttl_ms = expires_at - now if expires_at is not None and data.get("ttl_seconds") is not None else None
    occurred = data.get("occurred_at")
    occurred_at = parse_time(occurred, prefix + "occurred_at") if occurred is not None else None
    return NewMemory(mem_id, client_id, scope, text, metadata, expires_at, ttl_ms=ttl_ms, occurred_at=occurred_at)
