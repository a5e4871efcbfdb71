"""The OpenAPI 3.1 document of the v1 API, served at ``/v1/openapi.json``. A test checks
that it names exactly the routes the application serves.
"""

from __future__ import annotations

from typing import Any

import gm

_NULLABLE_STR = {"type": ["string", "null"]}
_SCOPE = {
    "namespace": {"type": "string", "default": "default"},
    "user_id": {"type": "string"},
    "agent_id": {"type": "string"},
    "session_id": {"type": "string"},
}
_FILTER = {
    "type": "object",
    "description": 'Metadata filter: {"topic": "travel"}, {"priority": {"$gte": 2}}; operators $eq $ne $gt '
    "$gte $lt $lte $in $nin $exists, and $and / $or (lists) and $not (object). Dotted keys reach nested metadata.",
}

SCHEMAS: dict[str, Any] = {
    "Memory": {
        "type": "object",
        "required": ["id", "namespace", "text", "metadata", "created_at", "updated_at"],
        "properties": {
            "id": {"type": "string"},
            "namespace": {"type": "string"},
            "user_id": _NULLABLE_STR,
            "agent_id": _NULLABLE_STR,
            "session_id": _NULLABLE_STR,
            "text": {"type": "string"},
            "metadata": {"type": "object"},
            "created_at": {"type": "string", "format": "date-time"},
            "updated_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "MemoryInput": {
        "type": "object",
        "required": ["text"],
        "additionalProperties": False,
        "properties": {
            "text": {"type": "string", "minLength": 1, "maxLength": 32000},
            "id": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
            **_SCOPE,
            "metadata": {"type": "object"},
            "expires_at": {"type": "string", "format": "date-time"},
            "ttl_seconds": {"type": "number", "exclusiveMinimum": 0},
        },
    },
    "MemoryBatch": {
        "type": "object",
        "required": ["memories"],
        "properties": {
            "memories": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1000,
                "items": {"$ref": "#/components/schemas/MemoryInput"},
            }
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "details": {"type": "object"},
                },
            }
        },
    },
    "Probe": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON",
        401: "Missing or wrong API key",
        403: "Key bound to another namespace",
        404: "Unknown id",
        409: "Id taken by other content",
        413: "Body over the size limit",
        422: "Wrong shape or value",
        503: "Not ready or draining",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


_AUTH = (401, 403, 503)
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_SEARCH = {
    "type": "object",
    "required": ["query"],
    "additionalProperties": False,
    "properties": {
        "query": {"type": "string", "minLength": 1},
        **_SCOPE,
        "filter": _FILTER,
        "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        "mode": {"type": "string", "enum": ["hybrid", "vector", "keyword"], "default": "hybrid"},
    },
}
_HITS = {
    "type": "object",
    "properties": {
        "hits": {
            "type": "array",
            "items": {"type": "object", "properties": {"memory": _ref("Memory"), "score": {"type": "number"}}},
        },
        "took_ms": {"type": "number"},
    },
}

PATHS: dict[str, Any] = {
    "/v1/healthz": {
        "get": {
            "summary": "Liveness: the process is up",
            "security": [],
            "responses": {"200": _json(_ref("Probe"), "Up")},
        }
    },
    "/v1/readyz": {
        "get": {
            "summary": "Readiness: storage reachable and migrated",
            "security": [],
            "responses": {
                "200": _json(_ref("Probe"), "Ready"),
                "503": _json(_ref("Probe"), "starting, migrating, unavailable or draining"),
            },
        }
    },
    "/v1/stats": {
        "get": {
            "summary": "Counts, schema version, backend and model",
            "responses": {"200": _json({"type": "object"}, "Stats"), **_errors(*_AUTH)},
        }
    },
    "/v1/memories": {
        "post": {
            "summary": "Add one memory, or a batch all-or-nothing",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"oneOf": [_ref("MemoryInput"), _ref("MemoryBatch")]}}},
            },
            "responses": {
                "201": _json(
                    {
                        "oneOf": [
                            _ref("Memory"),
                            {"type": "object", "properties": {"memories": {"type": "array", "items": _ref("Memory")}}},
                        ]
                    },
                    "Stored",
                ),
                "200": _json(_ref("Memory"), "Already stored with this id and content"),
                **_errors(400, 409, 413, 422, *_AUTH),
            },
        },
        "get": {
            "summary": "List memories of a scope, newest first",
            "parameters": [
                {"name": n, "in": "query", "schema": {"type": "string"}}
                for n in ("namespace", "user_id", "agent_id", "session_id", "cursor", "filter")
            ]
            + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "memories": {"type": "array", "items": _ref("Memory")},
                            "next_cursor": _NULLABLE_STR,
                        },
                    },
                    "A page",
                ),
                **_errors(422, *_AUTH),
            },
        },
    },
    "/v1/memories/search": {
        "post": {
            "summary": "Search a scope: hybrid (default), vector or keyword",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _SEARCH}}},
            "responses": {"200": _json(_HITS, "Hits, best first"), **_errors(400, 413, 422, *_AUTH)},
        }
    },
    "/v1/memories/delete": {
        "post": {
            "summary": "Delete every memory of a scope matching a filter",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["namespace"],
                            "properties": {**_SCOPE, "filter": _FILTER},
                        }
                    }
                },
            },
            "responses": {
                "200": _json({"type": "object", "properties": {"deleted": {"type": "integer"}}}, "Deleted"),
                **_errors(400, 422, *_AUTH),
            },
        }
    },
    "/v1/memories/{id}": {
        "parameters": _ID,
        "get": {
            "summary": "One memory",
            "responses": {"200": _json(_ref("Memory"), "The memory"), **_errors(404, *_AUTH)},
        },
        "patch": {
            "summary": "Change text (re-embedded), metadata (replaced) and/or expires_at (null: never)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "text": {"type": "string"},
                                "metadata": {"type": "object"},
                                "expires_at": {"type": ["string", "null"], "format": "date-time"},
                            },
                        }
                    }
                },
            },
            "responses": {"200": _json(_ref("Memory"), "Updated"), **_errors(400, 404, 422, *_AUTH)},
        },
        "delete": {
            "summary": "Delete one memory",
            "responses": {"204": {"description": "Deleted"}, **_errors(404, *_AUTH)},
        },
    },
    "/v1/memories/{id}/history": {
        "parameters": _ID,
        "get": {
            "summary": "Every add, update and delete of a memory, oldest first",
            "responses": {
                "200": _json(
                    {
                        "type": "object",
                        "properties": {
                            "history": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "op": {"type": "string", "enum": ["add", "update", "delete"]},
                                        "at": {"type": "string", "format": "date-time"},
                                        "text": _NULLABLE_STR,
                                        "metadata": {"type": ["object", "null"]},
                                    },
                                },
                            }
                        },
                    },
                    "History",
                ),
                **_errors(404, *_AUTH),
            },
        },
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1"), **_errors(*_AUTH)},
        }
    },
}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "greatmemory",
            "version": gm.__version__,
            "description": "Long-term memory for AI agents: store short texts, find the relevant ones.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "paths": PATHS,
    }
