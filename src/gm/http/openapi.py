"""The OpenAPI 3.1 document of the v1 API, served at ``/v1/openapi.json``: each route's
operation, parameters, answers and errors; the bodies' schemas are gm.http.schemas'. A test
checks that it names exactly the routes the application serves.
"""

from __future__ import annotations

from typing import Any

import gm
from gm.http.schemas import ID, OCCURRED_AFTER, OCCURRED_BEFORE, SCHEMAS, SCOPE_VALUE, ref
from gm.memory import ORDERS
from gm.storage.sql import CURSOR_PATTERN
from gm.store import MAX_LIST_LIMIT


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
    return {str(s): _json(ref("Error"), text[s]) for s in statuses}


_AUTH = (401, 403, 503)
_ID_PARAMETER = [
    {"name": "id", "in": "path", "required": True, "schema": ID},
    {"name": "namespace", "in": "query", "schema": SCOPE_VALUE,
     "description": "only the memory in this namespace: one elsewhere is 404, as an unknown id"},
]
_LIST_PARAMETERS = [
    *({"name": name, "in": "query", "schema": SCOPE_VALUE} for name in ("namespace", "user_id", "agent_id",
                                                                          "session_id")),
    {"name": "filter", "in": "query", "content": {"application/json": {"schema": ref("Filter")}}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": f"^{CURSOR_PATTERN}$"},
     "description": "next_cursor of the previous page, listed with the same order_by"},
    {"name": "occurred_after", "in": "query", "schema": OCCURRED_AFTER},
    {"name": "occurred_before", "in": "query", "schema": OCCURRED_BEFORE},
    {"name": "order_by", "in": "query", "schema": {"enum": list(ORDERS), "default": "created_at"},
     "description": "newest first by when memories were added (created_at) or when they happened (occurred_at)"},
]


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _admin_errors(*statuses: int) -> dict[str, Any]:
    return {**_errors(*statuses, *_AUTH), "403": _json(ref("Error"), "Key bound to a namespace (admin needs one bound "
                                                       "to none)"),
            **({"409": _json(ref("Error"), "A re-embed is under way (here, or on another instance)")}
               if 409 in statuses else {})}


PATHS: dict[str, Any] = {
    "/v1/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: the process is up",
            "security": [],
            "responses": {"200": _json(ref("Health"), "Up"), **_errors(422)},
        }
    },
    "/v1/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: storage reachable and migrated, writes committing",
            "security": [],
            "responses": {
                "200": _json(ref("Ready"), "Ready"),
                "503": _json({"oneOf": [ref("NotReady"), ref("Error")]},
                             "starting, migrating, unavailable or draining; or too many connections (an Error)"),
                **_errors(422),
            },
        }
    },
    "/v1/stats": {
        "get": {
            "operationId": "stats",
            "summary": "Counts, schema version, backend, model, index and write health",
            "responses": {"200": _json(ref("Stats"), "Stats"), **_errors(422, *_AUTH)},
        }
    },
    "/v1/memories": {
        "post": {
            "operationId": "addMemories",
            "summary": "Add one memory, or a batch all-or-nothing",
            "requestBody": _body({"oneOf": [ref("MemoryInput"), ref("MemoryBatch")]}),
            "responses": {
                "201": _json({"oneOf": [ref("Memory"), ref("MemoryList")]}, "Stored: the memory, or the batch's"),
                "200": _json(ref("Memory"), "Already stored with this id and content"),
                **_errors(400, 409, 413, 415, 422, *_AUTH),
            },
        },
        "get": {
            "operationId": "listMemories",
            "summary": "List memories of a scope, newest first",
            "parameters": _LIST_PARAMETERS,
            "responses": {"200": _json(ref("Page"), "A page"), **_errors(422, *_AUTH)},
        },
    },
    "/v1/memories/search": {
        "post": {
            "operationId": "searchMemories",
            "summary": "Search a scope: hybrid (default), vector or keyword",
            "requestBody": _body(ref("SearchRequest")),
            "responses": {"200": _json(ref("SearchResults"), "Hits, best first"),
                          **_errors(400, 413, 415, 422, *_AUTH)},
        }
    },
    "/v1/memories/delete": {
        "post": {
            "operationId": "deleteMemories",
            "summary": "Delete every memory of a scope matching a filter",
            "requestBody": _body(ref("BulkDelete")),
            "responses": {"200": _json(ref("Deleted"), "Deleted"), **_errors(400, 413, 415, 422, *_AUTH)},
        }
    },
    "/v1/memories/{id}": {
        "parameters": _ID_PARAMETER,
        "get": {
            "operationId": "getMemory",
            "summary": "One memory",
            "responses": {"200": _json(ref("Memory"), "The memory"), **_errors(404, 422, *_AUTH)},
        },
        "patch": {
            "operationId": "updateMemory",
            "summary": "Change text (re-embedded), metadata (replaced), expires_at (null: never) and/or occurred_at",
            "requestBody": _body(ref("MemoryUpdate")),
            "responses": {"200": _json(ref("Memory"), "Updated"), **_errors(400, 404, 413, 415, 422, *_AUTH)},
        },
        "delete": {
            "operationId": "deleteMemory",
            "summary": "Delete one memory",
            "responses": {"204": {"description": "Deleted"}, **_errors(404, 422, *_AUTH)},
        },
    },
    "/v1/memories/{id}/history": {
        "parameters": _ID_PARAMETER,
        "get": {
            "operationId": "memoryHistory",
            "summary": "Every add, update and delete of a memory, oldest first",
            "responses": {"200": _json(ref("History"), "History"), **_errors(404, 422, *_AUTH)},
        },
    },
    "/v1/admin/reembed": {
        "post": {
            "operationId": "startReembed",
            "summary": "Start moving the vectors to another model (model_dir null: a reindex) in the background",
            "requestBody": _body(ref("ReembedRequest")),
            "responses": {"202": _json(ref("ReembedStatus"), "Started (or resumed): its status"),
                          **_admin_errors(400, 409, 413, 415, 422)},
        },
        "get": {
            "operationId": "reembedStatus",
            "summary": "How this server's re-embed goes, and what the database records",
            "responses": {"200": _json(ref("ReembedStatus"), "Status"), **_admin_errors(422)},
        },
    },
    "/v1/admin/reembed/cancel": {
        "post": {
            "operationId": "cancelReembed",
            "summary": "Cancel the re-embed under way: its new vectors are dropped, the current ones stay",
            "requestBody": _body(ref("NoFields")),
            "responses": {"200": _json(ref("Done"), "Cancelled, or nothing to cancel"),
                          **_admin_errors(400, 409, 413, 415, 422)},
        },
    },
    "/v1/admin/reembed/drop-old": {
        "post": {
            "operationId": "dropOldVectors",
            "summary": "Drop the vectors the last switch left behind (the later step of a re-embed)",
            "requestBody": _body(ref("NoFields")),
            "responses": {"200": _json(ref("Done"), "Dropped, or nothing to drop"),
                          **_admin_errors(400, 409, 413, 415, 422)},
        },
    },
    "/v1/openapi.json": {
        "get": {
            "operationId": "openapiDocument",
            "summary": "This document",
            "responses": {"200": _json(ref("OpenAPIDocument"), "OpenAPI 3.1"), **_errors(422, *_AUTH)},
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
