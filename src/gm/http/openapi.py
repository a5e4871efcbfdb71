"""The OpenAPI 3.1 document of the v1 API, served at ``/v1/openapi.json``. A test checks
that it names exactly the routes the application serves.
"""

from __future__ import annotations

from typing import Any

import gm
from gm.filters import COMPARISONS
from gm.memory import (
    ID_PATTERN,
    INT64_MAX,
    INT64_MIN,
    MAX_BATCH,
    MAX_RECENCY_DAYS,
    MAX_SCOPE_CHARS,
    MAX_TEXT_CHARS,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    MODES,
    ORDERS,
    RESERVED_IDS,
)
from gm.storage.sql import CURSOR_PATTERN
from gm.store import MAX_LIST_LIMIT, MAX_SEARCH_LIMIT


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """An object with just these ``properties`` (``required`` among them)."""
    return {"type": "object", **({"required": list(required)} if required else {}), "additionalProperties": False,
            "properties": properties}


# The bounds below are the validation's own constants (gm.memory, gm.store, gm.filters), so the
# document is exactly as strict as the server: a request it allows is one the server takes.
_NO_NUL = "^[^\\x00]*$"
_TEXT = {  # gm.validation.check_text: not blank, no NUL, at most MAX_TEXT_CHARS
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_TEXT_CHARS,
    "pattern": "^[^\\x00]*[^\\s\\x00][^\\x00]*$",
}
_ID = {
    "type": "string",
    "pattern": f"^(?!(?:{'|'.join(sorted(RESERVED_IDS))})$){ID_PATTERN}$",
    "description": f"1-128 of A-Z a-z 0-9 . _ : -, but not {' or '.join(sorted(RESERVED_IDS))} (routes' names)",
}
_SCOPE_VALUE = {"type": "string", "minLength": 1, "maxLength": MAX_SCOPE_CHARS, "pattern": _NO_NUL}
_NULLABLE_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_EVENT_TIME = {**_TIME, "description": "RFC 3339 with a time zone, from 1970 to the end of 9999 (UTC)"}
_OCCURRED_AFTER = {**_EVENT_TIME, "description": "only memories that occurred at or after this time (inclusive); "
                   "not later than occurred_before. RFC 3339 with a time zone, 1970-9999"}
_OCCURRED_BEFORE = {**_EVENT_TIME, "description": "only memories that occurred before this time (exclusive). "
                    "RFC 3339 with a time zone, 1970-9999"}
_INPUT_SCOPE = {  # null is the same as leaving the field out
    "namespace": {**_SCOPE_VALUE, "type": ["string", "null"], "default": "default"},
    "user_id": {**_SCOPE_VALUE, "type": ["string", "null"]},
    "agent_id": {**_SCOPE_VALUE, "type": ["string", "null"]},
    "session_id": {**_SCOPE_VALUE, "type": ["string", "null"]},
}
_SCALAR = {  # gm.filters._scalar: a JSON scalar; an integer must fit in 64 bits
    "anyOf": [
        {"type": ["string", "boolean", "null"]},
        {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
        {"type": "number", "not": {"type": "integer"}},
    ]
}
_FIELD_NAME = '^[^$."\\\\\\x00][^."\\\\\\x00]*(?:\\.[^."\\\\\\x00]+)*$'  # dotted path; no $ first, no ", \\ or NUL

SCHEMAS: dict[str, Any] = {
    "Memory": _closed(
        {
            "id": {"type": "string"},
            "namespace": {"type": "string"},
            "user_id": _NULLABLE_STR,
            "agent_id": _NULLABLE_STR,
            "session_id": _NULLABLE_STR,
            "text": {"type": "string"},
            "metadata": {"type": "object"},
            "created_at": _TIME,
            "updated_at": _TIME,
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "occurred_at": {**_TIME, "description": "when it happened, as the client said; else when it was added"},
        },
        "id", "namespace", "user_id", "agent_id", "session_id", "text", "metadata", "created_at", "updated_at",
        "expires_at", "occurred_at",
    ),
    "MemoryList": _closed({"memories": {"type": "array", "items": _ref("Memory")}}, "memories"),
    "MemoryInput": {
        **_closed({
            "text": _TEXT,
            "id": {**_ID, "type": ["string", "null"]},
            **_INPUT_SCOPE,
            "metadata": {"anyOf": [_ref("Metadata"), {"type": "null"}]},
            "expires_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "RFC 3339 with a time zone, in the future and before the year 10000",
            },
            "ttl_seconds": {
                "type": ["number", "null"],
                "minimum": MIN_TTL_SECONDS,
                "description": "seconds from now, at least a millisecond and at most 100 years",
                "maximum": MAX_TTL_SECONDS,
            },
            "occurred_at": {
                **_EVENT_TIME,
                "type": ["string", "null"],
                "description": "when it happened (default, or null: when it is added); RFC 3339 with a time zone, "
                "from 1970 to the end of 9999 (UTC)",
            },
        }, "text"),
        "not": {  # both given (not null) is refused
            "required": ["expires_at", "ttl_seconds"],
            "properties": {"expires_at": {"type": "string"}, "ttl_seconds": {"type": "number"}},
        },
    },
    "MemoryBatch": _closed(
        {"memories": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": _ref("MemoryInput")}},
        "memories",
    ),
    "Metadata": {
        "type": "object",
        "description": "Any JSON object up to 64 KiB as JSON, without the NUL character in a key or string",
        "propertyNames": {"pattern": _NO_NUL},
        "additionalProperties": _ref("JsonValue"),
    },
    "JsonValue": {
        "anyOf": [
            {"type": "string", "pattern": _NO_NUL},
            {"type": ["boolean", "null"]},
            {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},  # wider ones are refused by name
            {"type": "number", "not": {"type": "integer"}},
            {"type": "array", "items": _ref("JsonValue")},
            _ref("Metadata"),
        ]
    },
    "Filter": {
        "type": "object",
        "description": 'Metadata filter: {"topic": "travel"}, {"priority": {"$gte": 2}}; operators $eq $ne $gt '
        "$gte $lt $lte $in $nin $exists, and $and / $or (lists) and $not (object). Dotted keys reach nested "
        "metadata. At most 16 levels of $and/$or/$not and 256 conditions.",
        "propertyNames": {"anyOf": [{"enum": ["$and", "$or", "$not"]}, {"pattern": _FIELD_NAME}]},
        "properties": {
            "$and": {"type": "array", "minItems": 1, "items": _ref("Clause")},
            "$or": {"type": "array", "minItems": 1, "items": _ref("Clause")},
            "$not": _ref("Clause"),
        },
        "additionalProperties": {
            "oneOf": [
                _SCALAR,
                {
                    "type": "object",
                    "minProperties": 1,
                    "additionalProperties": False,
                    "properties": {
                        op: {"type": "array", "minItems": 1, "items": _SCALAR} if op in ("$in", "$nin")
                        else {"type": "boolean"} if op == "$exists"
                        else {"type": ["number", "string"]} if op in ("$gt", "$gte", "$lt", "$lte")
                        else _SCALAR
                        for op in COMPARISONS
                    },
                },
            ]
        },
    },
    "Clause": {"allOf": [_ref("Filter"), {"minProperties": 1}]},
    "Error": _closed(
        {"error": _closed(
            {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}},
            "code", "message", "details",
        )},
        "error",
    ),
    "Probe": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    """Error answers of a route: those named, 400 (a request line or header over the limit)
    and 421 (a Host it does not answer to) on every route, and with a body (415) also 408
    (body too slow) and 417 (an Expect other than 100-continue)."""
    statuses = tuple(dict.fromkeys((400, *statuses, 421, *((408, 417) if 415 in statuses else ()))))
    text = {
        400: "Malformed JSON, or a request line or header over 8190 bytes",
        408: "Body not received within GM_BODY_TIMEOUT_SECONDS",
        417: "An Expect header other than 100-continue",
        421: "A Host header this server does not answer to",
        401: "Missing or wrong API key",
        403: "Key bound to another namespace",
        404: "Unknown id",
        409: "Id taken by other content",
        413: "Body over the size limit",
        415: "Body not sent as application/json",
        422: "Wrong shape or value, or an unknown query parameter",
        503: "Not ready, draining, storage unavailable, or too many connections",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


_AUTH = (401, 403, 503)
_ID_PARAMETER = [
    {"name": "id", "in": "path", "required": True, "schema": _ID},
    {"name": "namespace", "in": "query", "schema": _SCOPE_VALUE,
     "description": "only the memory in this namespace: one elsewhere is 404, as an unknown id"},
]
_NULLABLE_FILTER = {"anyOf": [_ref("Filter"), {"type": "null"}]}
_SEARCH = _closed(
    {
        "query": _TEXT,
        **_INPUT_SCOPE,
        "filter": _NULLABLE_FILTER,
        "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_SEARCH_LIMIT, "default": 10},
        "mode": {"enum": [*MODES, None], "default": "hybrid"},
        "occurred_after": {**_OCCURRED_AFTER, "type": ["string", "null"]},
        "occurred_before": {**_OCCURRED_BEFORE, "type": ["string", "null"]},
        "min_score": {
            "type": ["number", "null"], "minimum": -1, "maximum": 1,
            "description": "drop hits whose cosine similarity with the query is below this",
        },
        "recency": {
            "type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_RECENCY_DAYS,
            "description": "a half-life in days: each score is halved per half-life since the memory occurred",
        },
    },
    "query",
)
_BULK_DELETE = {
    **_closed({**_INPUT_SCOPE, "namespace": _SCOPE_VALUE, "filter": _NULLABLE_FILTER}, "namespace"),
    "description": "namespace may be left out with a key bound to one: it is the key's",
}
_PATCH = {
    **_closed({
        "text": _TEXT,
        "metadata": _ref("Metadata"),
        "expires_at": {"type": ["string", "null"], "format": "date-time", "description": "null: never expires"},
        "occurred_at": {**_EVENT_TIME, "description": "when it happened (it cannot be cleared: a memory always "
                        "has an event time); RFC 3339 with a time zone, 1970-9999"},
    }),
    "minProperties": 1,
}
_LIST_PARAMETERS = [
    *({"name": name, "in": "query", "schema": _SCOPE_VALUE} for name in ("namespace", "user_id", "agent_id",
                                                                          "session_id")),
    {"name": "filter", "in": "query", "content": {"application/json": {"schema": _ref("Filter")}}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": f"^{CURSOR_PATTERN}$"},
     "description": "next_cursor of the previous page, listed with the same order_by"},
    {"name": "occurred_after", "in": "query", "schema": _OCCURRED_AFTER},
    {"name": "occurred_before", "in": "query", "schema": _OCCURRED_BEFORE},
    {"name": "order_by", "in": "query", "schema": {"enum": list(ORDERS), "default": "created_at"},
     "description": "newest first by when memories were added (created_at) or when they happened (occurred_at)"},
]
_HIT = _closed(
    {
        "memory": _ref("Memory"),
        "score": {"type": "number", "description": "the mode's score; in hybrid mode the fused one"},
        "vector_score": {"type": ["number", "null"],
                         "description": "cosine similarity; null if the vector ranking did not find it"},
        "keyword_score": {"type": ["number", "null"],
                          "description": "keyword rank; null if the keyword ranking did not find it"},
    },
    "memory", "score", "vector_score", "keyword_score",
)
_HITS = _closed({"hits": {"type": "array", "items": _HIT}, "took_ms": {"type": "number"}}, "hits", "took_ms")
_PAGE = _closed(
    {"memories": {"type": "array", "items": _ref("Memory")}, "next_cursor": _NULLABLE_STR}, "memories", "next_cursor"
)
_HISTORY_ENTRY = _closed(
    {
        "op": {"type": "string", "enum": ["add", "update", "delete"]},
        "at": _TIME,
        "text": _NULLABLE_STR,
        "metadata": {"type": ["object", "null"]},
        "namespace": {"type": "string", "description": "the namespace the change was made in"},
    },
    "op", "at", "text", "metadata", "namespace",
)
_HISTORY = _closed({"history": {"type": "array", "items": _HISTORY_ENTRY}}, "history")


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


PATHS: dict[str, Any] = {
    "/v1/healthz": {
        "get": {
            "summary": "Liveness: the process is up",
            "security": [],
            "responses": {"200": _json(_ref("Probe"), "Up"), **_errors(422)},
        }
    },
    "/v1/readyz": {
        "get": {
            "summary": "Readiness: storage reachable and migrated",
            "security": [],
            "responses": {
                "200": _json(_ref("Probe"), "Ready"),
                "503": _json(_ref("Probe"), "starting, migrating, unavailable or draining"),
                **_errors(422),
            },
        }
    },
    "/v1/stats": {
        "get": {
            "summary": "Counts, schema version, backend and model",
            "responses": {"200": _json({"type": "object"}, "Stats"), **_errors(422, *_AUTH)},
        }
    },
    "/v1/memories": {
        "post": {
            "summary": "Add one memory, or a batch all-or-nothing",
            "requestBody": _body({"oneOf": [_ref("MemoryInput"), _ref("MemoryBatch")]}),
            "responses": {
                "201": _json({"oneOf": [_ref("Memory"), _ref("MemoryList")]}, "Stored"),
                "200": _json(_ref("Memory"), "Already stored with this id and content"),
                **_errors(400, 409, 413, 415, 422, *_AUTH),
            },
        },
        "get": {
            "summary": "List memories of a scope, newest first",
            "parameters": _LIST_PARAMETERS,
            "responses": {"200": _json(_PAGE, "A page"), **_errors(422, *_AUTH)},
        },
    },
    "/v1/memories/search": {
        "post": {
            "summary": "Search a scope: hybrid (default), vector or keyword",
            "requestBody": _body(_SEARCH),
            "responses": {"200": _json(_HITS, "Hits, best first"), **_errors(400, 413, 415, 422, *_AUTH)},
        }
    },
    "/v1/memories/delete": {
        "post": {
            "summary": "Delete every memory of a scope matching a filter",
            "requestBody": _body(_BULK_DELETE),
            "responses": {
                "200": _json(_closed({"deleted": {"type": "integer", "minimum": 0}}, "deleted"), "Deleted"),
                **_errors(400, 413, 415, 422, *_AUTH),
            },
        }
    },
    "/v1/memories/{id}": {
        "parameters": _ID_PARAMETER,
        "get": {
            "summary": "One memory",
            "responses": {"200": _json(_ref("Memory"), "The memory"), **_errors(404, 422, *_AUTH)},
        },
        "patch": {
            "summary": "Change text (re-embedded), metadata (replaced), expires_at (null: never) and/or occurred_at",
            "requestBody": _body(_PATCH),
            "responses": {"200": _json(_ref("Memory"), "Updated"), **_errors(400, 404, 413, 415, 422, *_AUTH)},
        },
        "delete": {
            "summary": "Delete one memory",
            "responses": {"204": {"description": "Deleted"}, **_errors(404, 422, *_AUTH)},
        },
    },
    "/v1/memories/{id}/history": {
        "parameters": _ID_PARAMETER,
        "get": {
            "summary": "Every add, update and delete of a memory, oldest first",
            "responses": {"200": _json(_HISTORY, "History"), **_errors(404, 422, *_AUTH)},
        },
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors(422, *_AUTH)},
        }
    },
}


def openapi_document(*, keys: bool = True) -> dict[str, Any]:
    """The document; ``keys=False`` (a server without ``GM_API_KEYS``) requires no key anywhere."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "greatmemory",
            "version": gm.__version__,
            "description": "Long-term memory for AI agents: store short texts, find the relevant ones.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}] if keys else [],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "paths": PATHS,
    }
