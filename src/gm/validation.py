"""The validation of memory inputs: each ``check_*`` takes a value as a caller sent it and
returns it typed, or raises :class:`InvalidInput` naming the field; :func:`new_memory` a whole input.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from gm.errors import Forbidden, InvalidInput
from gm.memory import (
    DEFAULT_NAMESPACE,
    ID_PATTERN,
    INT64_MAX,
    INT64_MIN,
    MAX_METADATA_BYTES,
    MAX_RECENCY_DAYS,
    MAX_SCOPE_CHARS,
    MAX_TEXT_CHARS,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    MODES,
    ORDERS,
    RESERVED_IDS,
    NewMemory,
    Scope,
    TimeRange,
    long_digits,
    new_id,
    parse_time,
)
from gm.storage.ops import UNSET, UpdateMemory

_ID_RE = re.compile(ID_PATTERN)


def check_id(value: Any, path: str = "id") -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidInput(
            f"{path} must be 1-128 characters of A-Z a-z 0-9 . _ : -", path=path
        )
    return value


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
    if long_digits(encoded):
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


def within_namespace(bound: str | None, given: Any) -> Any:
    """The namespace a caller acts on: with an API key bound to ``bound``, the key's own when
    none is given; another one is refused (HTTP 403). Unbound (None): ``given`` as it is."""
    if bound is None:
        return given
    if given is None:
        return bound
    if given != bound:
        raise Forbidden(f"this API key may only be used on namespace {bound!r}")
    return given


UPDATE_FIELDS = ("text", "metadata", "expires_at", "occurred_at")


def update_changes(body: dict[str, Any]) -> dict[str, Any]:
    """An update's changes as a caller sent them (a JSON object) as ``Store.update``'s keyword
    arguments: ``expires_at`` null clears it; a null ``text``, ``metadata`` or ``occurred_at`` is
    refused rather than read as "unchanged", and so is an unknown field."""
    for key in body:
        if key not in UPDATE_FIELDS:
            raise InvalidInput(f"unknown field {key}", path=key)
    if "metadata" in body and body["metadata"] is None:
        raise InvalidInput("metadata must be a JSON object (send {} to clear it)", path="metadata")
    if "text" in body and body["text"] is None:
        raise InvalidInput("text must be a non-empty string", path="text")
    if "occurred_at" in body and body["occurred_at"] is None:
        raise InvalidInput("occurred_at cannot be cleared: a memory always has an event time; "
                           "give an RFC 3339 time such as 2026-11-29T16:20:00Z", path="occurred_at")
    changes: dict[str, Any] = {k: body[k] for k in ("text", "metadata", "occurred_at") if k in body}
    if "expires_at" in body:
        changes["expires_at"] = body["expires_at"]
    return changes


def update_op(
    id: Any, namespace: str | None, now: int, text: Any, metadata: Any, expires_at: Any, occurred_at: Any
) -> UpdateMemory:
    """The checked update of :meth:`gm.Store.update` (``expires_at`` UNSET: keep it)."""
    check_id(id)
    if text is None and metadata is None and expires_at is UNSET and occurred_at is None:
        raise InvalidInput("give at least one of text, metadata, expires_at, occurred_at")
    op = UpdateMemory(id, now, namespace=namespace)
    if text is not None:
        op.text = check_text(text)
    if metadata is not None:
        op.metadata = check_metadata(metadata)
    if expires_at is not UNSET:
        op.expires_at = None if expires_at is None else check_expiry(expires_at, None, now)
    if occurred_at is not None:
        op.occurred_at = parse_time(occurred_at, "occurred_at")
    return op
