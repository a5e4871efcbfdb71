"""The MCP tools' input and output schemas, taken from the HTTP API's OpenAPI document so both
front doors advertise one contract: its component references become each schema's own ``$defs``.
"""

from __future__ import annotations

import copy
from typing import Any

from gm.http.openapi import openapi_document

_DOCUMENT = openapi_document()
_COMPONENTS: dict[str, Any] = _DOCUMENT["components"]["schemas"]
_PREFIX = "#/components/schemas/"


def component(name: str) -> dict[str, Any]:
    return copy.deepcopy(_COMPONENTS[name])


def request_body(path: str, method: str) -> dict[str, Any]:
    """The JSON body ``method path`` takes (a named schema: what it names)."""
    body = _DOCUMENT["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return _named(body)


def response_body(path: str, method: str, status: str = "200") -> dict[str, Any]:
    """The JSON body ``method path`` answers ``status`` with (a named schema: what it names)."""
    answer = _DOCUMENT["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return _named(answer)


def _named(schema: dict[str, Any]) -> dict[str, Any]:
    while set(schema) == {"$ref"}:
        schema = _COMPONENTS[_name(schema["$ref"])]
    return copy.deepcopy(schema)


def parameters(path: str, method: str) -> dict[str, Any]:
    """The path and query parameters of ``method path``, by name, each with its schema (a JSON
    parameter, such as a list's ``filter``, with the schema of its JSON value)."""
    route = _DOCUMENT["paths"][path]
    found: dict[str, Any] = {}
    for parameter in [*route.get("parameters", []), *route[method].get("parameters", [])]:
        schema = parameter.get("schema") or parameter["content"]["application/json"]["schema"]
        if "description" in parameter:
            schema = {**schema, "description": parameter["description"]}
        found[parameter["name"]] = copy.deepcopy(schema)
    return found


def closed(properties: dict[str, Any], *required: str) -> dict[str, Any]:
    """An object with just these ``properties`` (``required`` among them)."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            **({"required": list(required)} if required else {})}


def described(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """``schema`` with this description (what the model reads to fill the argument in)."""
    return {**schema, "description": description}


def tool_schema(root: dict[str, Any]) -> dict[str, Any]:
    """``root`` as a self-contained JSON Schema (2020-12): a reference at its root is replaced
    by what it names, and every component it reaches is copied under ``$defs``."""
    while set(root) == {"$ref"}:
        root = component(_name(root["$ref"]))
    reached: dict[str, Any] = {}
    pending = _references(root)
    while pending:
        name = pending.pop()
        if name not in reached:
            reached[name] = component(name)
            pending |= _references(reached[name])
    schema: dict[str, Any] = _rewritten(root)
    if reached:
        schema["$defs"] = {name: _rewritten(reached[name]) for name in sorted(reached)}
    return schema


def _name(ref: str) -> str:
    if not ref.startswith(_PREFIX):
        raise ValueError(f"not a component reference: {ref}")
    return ref[len(_PREFIX):]


def _references(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        found = {_name(schema["$ref"])} if isinstance(schema.get("$ref"), str) else set()
        for value in schema.values():
            found |= _references(value)
        return found
    if isinstance(schema, list):
        return set().union(*(_references(item) for item in schema)) if schema else set()
    return set()


def _rewritten(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {key: ("#/$defs/" + _name(value) if key == "$ref" and isinstance(value, str) else _rewritten(value))
                for key, value in schema.items()}
    if isinstance(schema, list):
        return [_rewritten(item) for item in schema]
    return schema
