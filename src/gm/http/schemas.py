"""The JSON Schemas of the v1 API's bodies, requests and answers, as the OpenAPI document's
components; every bound is the validation's own constant, so the document is as strict as the server.
"""

from __future__ import annotations

from typing import Any

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
    RESERVED_IDS,
)
from gm.store import MAX_REEMBED_BATCH, MAX_SEARCH_LIMIT


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
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
ID = {
    "type": "string",
    "pattern": f"^(?!(?:{'|'.join(sorted(RESERVED_IDS))})$){ID_PATTERN}$",
    "description": f"1-128 of A-Z a-z 0-9 . _ : -, but not {' or '.join(sorted(RESERVED_IDS))} (routes' names)",
}
SCOPE_VALUE = {"type": "string", "minLength": 1, "maxLength": MAX_SCOPE_CHARS, "pattern": _NO_NUL}
_NULLABLE_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_EVENT_TIME = {**_TIME, "description": "RFC 3339 with a time zone, from 1970 to the end of 9999 (UTC)"}
OCCURRED_AFTER = {**_EVENT_TIME, "description": "only memories that occurred at or after this time (inclusive); "
                   "not later than occurred_before. RFC 3339 with a time zone, 1970-9999"}
OCCURRED_BEFORE = {**_EVENT_TIME, "description": "only memories that occurred before this time (exclusive). "
                    "RFC 3339 with a time zone, 1970-9999"}
_INPUT_SCOPE = {  # null is the same as leaving the field out
    "namespace": {**SCOPE_VALUE, "type": ["string", "null"], "default": "default"},
    "user_id": {**SCOPE_VALUE, "type": ["string", "null"]},
    "agent_id": {**SCOPE_VALUE, "type": ["string", "null"]},
    "session_id": {**SCOPE_VALUE, "type": ["string", "null"]},
}
_SCALAR = {  # gm.filters._scalar: a JSON scalar; an integer must fit in 64 bits
    "anyOf": [
        {"type": ["string", "boolean", "null"]},
        {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
        {"type": "number", "not": {"type": "integer"}},
    ]
}
_FIELD_NAME = '^[^$."\\\\\\x00][^."\\\\\\x00]*(?:\\.[^."\\\\\\x00]+)*$'  # dotted path; no $ first, no ", \\ or NUL

_BODIES: dict[str, Any] = {  # what clients send and get back about memories
    "Memory": closed(
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
    "MemoryList": closed({"memories": {"type": "array", "items": ref("Memory")}}, "memories"),
    "MemoryInput": {
        **closed({
            "text": _TEXT,
            "id": {**ID, "type": ["string", "null"]},
            **_INPUT_SCOPE,
            "metadata": {"anyOf": [ref("Metadata"), {"type": "null"}]},
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
    "MemoryBatch": closed(
        {"memories": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": ref("MemoryInput")}},
        "memories",
    ),
    "Metadata": {
        "type": "object",
        "description": "Any JSON object up to 64 KiB as JSON, without the NUL character in a key or string",
        "propertyNames": {"pattern": _NO_NUL},
        "additionalProperties": ref("JsonValue"),
    },
    "JsonValue": {
        "anyOf": [
            {"type": "string", "pattern": _NO_NUL},
            {"type": ["boolean", "null"]},
            {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},  # wider ones are refused by name
            {"type": "number", "not": {"type": "integer"}},
            {"type": "array", "items": ref("JsonValue")},
            ref("Metadata"),
        ]
    },
    "Filter": {
        "type": "object",
        "description": 'Metadata filter: {"topic": "travel"}, {"priority": {"$gte": 2}}; operators $eq $ne $gt '
        "$gte $lt $lte $in $nin $exists, and $and / $or (lists) and $not (object). Dotted keys reach nested "
        "metadata. At most 16 levels of $and/$or/$not and 256 conditions.",
        "propertyNames": {"anyOf": [{"enum": ["$and", "$or", "$not"]}, {"pattern": _FIELD_NAME}]},
        "properties": {
            "$and": {"type": "array", "minItems": 1, "items": ref("Clause")},
            "$or": {"type": "array", "minItems": 1, "items": ref("Clause")},
            "$not": ref("Clause"),
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
    "Clause": {"allOf": [ref("Filter"), {"minProperties": 1}]},
    "Error": closed(
        {"error": closed(
            {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}},
            "code", "message", "details",
        )},
        "error",
    ),
    }

_NULLABLE_FILTER = {"anyOf": [ref("Filter"), {"type": "null"}]}
_REQUESTS = {
    "SearchRequest": closed(
        {
            "query": _TEXT,
            **_INPUT_SCOPE,
            "filter": _NULLABLE_FILTER,
            "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_SEARCH_LIMIT, "default": 10},
            "mode": {"enum": [*MODES, None], "default": "hybrid"},
            "occurred_after": {**OCCURRED_AFTER, "type": ["string", "null"]},
            "occurred_before": {**OCCURRED_BEFORE, "type": ["string", "null"]},
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
    ),
    "BulkDelete": {
        **closed({**_INPUT_SCOPE, "namespace": SCOPE_VALUE, "filter": _NULLABLE_FILTER}, "namespace"),
        "description": "namespace may be left out with a key bound to one: it is the key's",
    },
    "MemoryUpdate": {
        **closed({
            "text": _TEXT,
            "metadata": ref("Metadata"),
            "expires_at": {"type": ["string", "null"], "format": "date-time", "description": "null: never expires"},
            "occurred_at": {**_EVENT_TIME, "description": "when it happened (it cannot be cleared: a memory always "
                            "has an event time); RFC 3339 with a time zone, 1970-9999"},
        }),
        "minProperties": 1,
    },
}
_ANSWERS = {
    "SearchHit": closed(
        {
            "memory": ref("Memory"),
            "score": {"type": "number", "description": "the mode's score; in hybrid mode the fused one"},
            "vector_score": {"type": ["number", "null"],
                             "description": "cosine similarity; null if the vector ranking did not find it"},
            "keyword_score": {"type": ["number", "null"],
                              "description": "keyword rank; null if the keyword ranking did not find it"},
        },
        "memory", "score", "vector_score", "keyword_score",
    ),
    "SearchResults": closed(
        {"hits": {"type": "array", "items": ref("SearchHit")}, "took_ms": {"type": "number", "minimum": 0}},
        "hits", "took_ms",
    ),
    "Page": closed(
        {"memories": {"type": "array", "items": ref("Memory")},
         "next_cursor": {**_NULLABLE_STR, "description": "the cursor of the next page; null on the last"}},
        "memories", "next_cursor",
    ),
    "HistoryEntry": closed(
        {
            "op": {"type": "string", "enum": ["add", "update", "delete"]},
            "at": _TIME,
            "text": _NULLABLE_STR,
            "metadata": {"type": ["object", "null"]},
            "namespace": {"type": "string", "description": "the namespace the change was made in"},
        },
        "op", "at", "text", "metadata", "namespace",
    ),
    "History": closed({"history": {"type": "array", "items": ref("HistoryEntry")}}, "history"),
    "Deleted": closed({"deleted": {"type": "integer", "minimum": 0}}, "deleted"),
}

# What the probes and /v1/stats say about the server (gm.readiness, Store.stats, the Writer's health).
_BACKEND = {"enum": ["sqlite", "postgres"]}
_OPTIONAL_TIME = {"type": ["string", "null"], "format": "date-time"}
_INDEX_STATE = {"enum": ["ready", "loading", "failed"], "description": "the vector index: ready (loaded, or not "
                "needed: pgvector searches), loading, or failed (the last load failed; another follows)"}
_STATUS = {
    "Health": closed({"status": {"const": "ok"}}, "status"),
    "WriteHealth": {
        **closed(
            {
                "status": {"enum": ["ok", "failing", "blocked"],
                           "description": "failing: the last write batch failed as a whole; blocked: a write has "
                           "waited past timeout_seconds"},
                "last_commit_at": _OPTIONAL_TIME,
                "last_failure_at": _OPTIONAL_TIME,
                "last_error": _NULLABLE_STR,
                "consecutive_failures": {"type": "integer", "minimum": 0},
                "oldest_pending_seconds": {"type": "number", "minimum": 0},
                "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "description": "GM_WRITE_TIMEOUT_SECONDS"},
            },
            "status", "last_commit_at", "last_failure_at", "last_error", "consecutive_failures",
            "oldest_pending_seconds", "timeout_seconds",
        ),
        "description": "How the Writer's commits are going",
    },
    "Ready": closed(
        {"status": {"const": "ready"}, "schema_version": {"type": "integer", "minimum": 0}, "backend": _BACKEND,
         "index": _INDEX_STATE, "writes": ref("WriteHealth")},
        "status", "schema_version", "backend", "index", "writes",
    ),
    "NotReady": closed(
        {"status": {"enum": ["starting", "migrating", "unavailable", "draining"]}, "reason": {"type": "string"},
         "schema_version": {"type": "integer", "minimum": 0}, "backend": _BACKEND, "index": _INDEX_STATE,
         "writes": ref("WriteHealth")},
        "status", "schema_version", "backend", "index",
    ),
    "Stats": closed(
        {
            "memories": {"type": "integer", "minimum": 0, "description": "live memories (in the key's namespace)"},
            "namespaces": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
                           "description": "live memories per namespace (only the key's, for a bound key)"},
            "schema_version": {"type": "integer", "minimum": 0},
            "backend": _BACKEND,
            "model": {"type": "string", "description": "the embedding model's identity: sha256 of its files' content "
                      "and pooling, the same wherever its files are"},
            "model_label": {"type": "string", "description": "the model's name for people: the default model's, "
                            "or GM_MODEL_DIR's folder name"},
            "database_bytes": {"type": ["integer", "null"], "minimum": 0},
            "model_loaded": {"type": "boolean", "description": "the model is loaded (it loads on first use)"},
            "index_ready": {"type": "boolean", "description": "the vector index is loaded and searches run"},
            "writes": ref("WriteHealth"),
            "process_resident_bytes": {"type": ["integer", "null"], "minimum": 0,
                                       "description": "the server's resident memory (null where unknown)"},
        },
        "memories", "namespaces", "schema_version", "backend", "model", "model_label", "database_bytes", "model_loaded",
        "index_ready", "writes", "process_resident_bytes",
    ),
    "OpenAPIDocument": {
        "type": "object",
        "required": ["openapi", "info", "paths", "components"],
        "properties": {
            "openapi": {"type": "string", "pattern": "^3\\.1\\."},
            "info": {"type": "object", "required": ["title", "version"],
                     "properties": {"title": {"type": "string"}, "version": {"type": "string"},
                                    "description": {"type": "string"}}},
            "servers": {"type": "array", "items": {"type": "object"}},
            "security": {"type": "array", "items": {"type": "object"}},
            "components": {"type": "object"},
            "paths": {"type": "object"},
        },
    },
}

# The admin routes' (gm.http.admin): a re-embed or reindex run by the server.
_COUNT = {"type": "integer", "minimum": 0}
_ADMIN = {
    "ReembedRequest": closed(
        {
            "model_dir": {"type": ["string", "null"], "minLength": 1, "pattern": _NO_NUL,
                          "description": "the new model's folder on the server (model.onnx, tokenizer.json); null: "
                          "a reindex, the derived index state rebuilt with the current model"},
            "batch": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_REEMBED_BATCH, "default": 64,
                      "description": "memories embedded and written at a time"},
        },
        "model_dir",
    ),
    "ReembedReport": closed(
        {
            "model": {"type": "string", "description": "the identity the vectors have now"},
            "embedded": {**_COUNT, "description": "memories this run embedded (a resumed run counts only its own)"},
            "total": _COUNT,
            "seconds": {"type": "number", "minimum": 0},
            "rate": {"type": "number", "minimum": 0, "description": "memories embedded a second"},
            "resumed": {"type": "boolean", "description": "it went on with a run that had been interrupted"},
        },
        "model", "embedded", "total", "seconds", "rate", "resumed",
    ),
    "ReembedRecord": {
        **closed(
            {
                "reembed": {"anyOf": [closed({
                    "model": {"type": "string"}, "label": {"type": "string"}, "model_dir": {"type": "string"},
                    "started_at": _TIME, "done": _COUNT, "total": _COUNT,
                }, "model", "label", "model_dir", "started_at", "done", "total"), {"type": "null"}],
                    "description": "the re-embed under way: run by this server, by another instance, or "
                    "interrupted (asking again resumes it); done of total memories have its vector"},
                "old_vectors": {**_NULLABLE_STR, "description": "the model whose vectors the last switch left, until "
                                "POST /v1/admin/reembed/drop-old"},
            },
            "reembed", "old_vectors",
        ),
        "description": "What the database records about re-embedding",
    },
    "ReembedStatus": closed(
        {
            "state": {"enum": ["idle", "running", "done", "failed"],
                      "description": "this server's re-embed: none yet, under way, finished, or stopped by an error"},
            "phase": {**_NULLABLE_STR, "description": "starting, embedding, switched, ..."},
            "done": _COUNT,
            "total": _COUNT,
            "rate": {"type": "number", "minimum": 0, "description": "memories a second in this run"},
            "eta_seconds": {"type": ["number", "null"], "minimum": 0, "description": "null while not known"},
            "model": {**_NULLABLE_STR, "description": "the model identity the vectors move to"},
            "started_at": _OPTIONAL_TIME,
            "finished_at": _OPTIONAL_TIME,
            "error": {"anyOf": [closed({"code": {"type": "string"}, "message": {"type": "string"}}, "code", "message"),
                                {"type": "null"}], "description": "why it failed"},
            "report": {"anyOf": [ref("ReembedReport"), {"type": "null"}]},
            "database": ref("ReembedRecord"),
        },
        "state", "phase", "done", "total", "rate", "eta_seconds", "model", "started_at", "finished_at", "error",
        "report", "database",
    ),
    "Done": closed({"done": {"type": "boolean", "description": "false: there was nothing to do"}}, "done"),
    "NoFields": {**closed({}), "description": "an empty object: the action takes nothing"},
}

SCHEMAS: dict[str, Any] = {**_BODIES, **_REQUESTS, **_ANSWERS, **_STATUS, **_ADMIN}
