"""The metadata filter language (Chroma / mem0 style): parsing into a small tree, and
compiling that tree to a SQLite WHERE clause over the JSON ``metadata`` column.

``{"topic": "travel"}``, ``{"priority": {"$gte": 2}}``, ``$eq $ne $gt $gte $lt $lte $in
$nin $exists``, ``{"$and": [...]}``, ``{"$or": [...]}``, ``{"$not": {...}}``. A key may
be a dotted path into nested metadata (``{"trip.city": "Oslo"}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gm.errors import InvalidFilter
from gm.memory import INT64_MAX, INT64_MIN

Scalar = str | int | float | bool | None
MAX_DEPTH = 16  # nesting of $and / $or / $not
MAX_CONDITIONS = 256  # field conditions and $in / $nin values, all told
COMPARISONS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
LOGICAL = ("$and", "$or", "$not")


@dataclass(frozen=True, slots=True)
class Condition:
    key: tuple[str, ...]
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class All:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Not:
    part: Filter


Filter = Condition | All | AnyOf | Not


def parse(raw: Any, path: str = "filter") -> Filter | None:
    """Parse a filter object; ``None`` or ``{}`` means no filter. Raises :class:`InvalidFilter`."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidFilter(f"{path} must be a JSON object", path=path)
    if not raw:
        return None
    tree = _parse_object(raw, path, 0)
    if _size(tree) > MAX_CONDITIONS:
        raise InvalidFilter(
            f"{path} has more than {MAX_CONDITIONS} conditions and $in/$nin values; simplify it", path=path
        )
    return tree


def _size(node: Filter) -> int:
    if isinstance(node, (All, AnyOf)):
        return sum(_size(part) for part in node.parts)
    if isinstance(node, Not):
        return _size(node.part)
    return len(node.value) if node.op in ("$in", "$nin") else 1


def _parse_object(raw: Any, path: str, depth: int) -> Filter:
    if not isinstance(raw, dict) or not raw:
        raise InvalidFilter(f"{path} must be a non-empty JSON object", path=path)
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"{path} nests $and/$or/$not more than {MAX_DEPTH} deep; flatten it", path=path)
    parts: list[Filter] = []
    for key, value in raw.items():
        sub = f"{path}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidFilter(f"{sub} must be a non-empty list of filters", path=sub)
            children = tuple(_parse_object(item, f"{sub}[{i}]", depth + 1) for i, item in enumerate(value))
            parts.append(All(children) if key == "$and" else AnyOf(children))
        elif key == "$not":
            parts.append(Not(_parse_object(value, sub, depth + 1)))
        elif key.startswith("$"):
            raise InvalidFilter(
                f"unknown operator {key} at {path}; use one of {', '.join(LOGICAL)} here "
                f"or {', '.join(COMPARISONS)} under a field",
                path=sub,
            )
        else:
            parts.extend(_parse_field(key, value, sub))
    return parts[0] if len(parts) == 1 else All(tuple(parts))


def _parse_field(key: str, value: Any, path: str) -> list[Filter]:
    segments = tuple(key.split("."))
    if not key or any(not s for s in segments):
        raise InvalidFilter(f"{path}: a field name must be non-empty (dots separate nested keys)", path=path)
    if "\x00" in key:  # no stored metadata holds it (refused on add), and SQLite's JSON paths cannot take it
        raise InvalidFilter(f"{path}: a field name in a filter cannot contain the NUL character (U+0000)", path=path)
    if '"' in key or "\\" in key:  # SQLite's JSON paths cannot address such keys: they would match nothing
        raise InvalidFilter(f"{path}: a field name in a filter cannot contain a double quote or backslash", path=path)
    if not (isinstance(value, dict) and value and all(isinstance(k, str) and k.startswith("$") for k in value)):
        return [Condition(segments, "$eq", _scalar(value, path))]
    out: list[Filter] = []
    for op, operand in value.items():
        sub = f"{path}.{op}"
        if op not in COMPARISONS:
            raise InvalidFilter(f"unknown operator {op} at {path}; use one of {', '.join(COMPARISONS)}", path=sub)
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or not operand:
                raise InvalidFilter(f"{sub} must be a non-empty list of values", path=sub)
            out.append(Condition(segments, op, tuple(_scalar(v, f"{sub}[{i}]") for i, v in enumerate(operand))))
        elif op == "$exists":
            if not isinstance(operand, bool):
                raise InvalidFilter(f"{sub} must be true or false", path=sub)
            out.append(Condition(segments, op, operand))
        elif op in ("$gt", "$gte", "$lt", "$lte"):
            if isinstance(operand, bool) or not isinstance(operand, (int, float, str)):
                raise InvalidFilter(f"{sub} must be a number or a string", path=sub)
            _check_number_or_string(operand, sub)
            out.append(Condition(segments, op, operand))
        else:
            out.append(Condition(segments, op, _scalar(operand, sub)))
    return out


def _scalar(value: Any, path: str) -> Scalar:
    _check_number_or_string(value, path)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise InvalidFilter(f"{path} must be a string, number, boolean or null", path=path)


def _check_number_or_string(value: Any, path: str) -> None:
    """Refuse what no stored metadata can hold: integers past 64 bits, strings with NUL."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidFilter(f"{path} is outside the 64-bit integer range metadata numbers can hold", path=path)
    if isinstance(value, str) and "\x00" in value:
        raise InvalidFilter(f"{path} must not contain the NUL character (U+0000)", path=path)


# -- SQLite ---------------------------------------------------------------------------

_SQL_CMP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def to_sqlite(node: Filter, column: str = "metadata") -> tuple[str, list[Any]]:
    """A WHERE fragment and its parameters for ``node`` against the JSON text ``column``."""
    params: list[Any] = []
    return _sqlite(node, column, params), params


def _json_path(key: tuple[str, ...]) -> str:
    return "$" + "".join('."' + segment.replace('"', '""') + '"' for segment in key)


def _sqlite(node: Filter, column: str, params: list[Any]) -> str:
    if isinstance(node, All):
        return "(" + " AND ".join(_sqlite(p, column, params) for p in node.parts) + ")"
    if isinstance(node, AnyOf):
        return "(" + " OR ".join(_sqlite(p, column, params) for p in node.parts) + ")"
    if isinstance(node, Not):
        return "(NOT " + _sqlite(node.part, column, params) + ")"
    path = _json_path(node.key)
    if node.op == "$exists":
        params.append(path)
        return f"(json_type({column}, ?) IS {'NOT ' if node.value else ''}NULL)"
    if node.op in ("$eq", "$ne"):
        sql = _sqlite_equals(column, path, node.value, params)
        return sql if node.op == "$eq" else f"(NOT {sql})"
    if node.op in ("$in", "$nin"):
        sql = "(" + " OR ".join(_sqlite_equals(column, path, v, params) for v in node.value) + ")"
        return sql if node.op == "$in" else f"(NOT {sql})"
    kinds = "('text')" if isinstance(node.value, str) else "('integer', 'real')"
    params.extend([path, path, node.value])
    return f"(IFNULL(json_type({column}, ?), '') IN {kinds} AND json_extract({column}, ?) {_SQL_CMP[node.op]} ?)"


def _sqlite_equals(column: str, path: str, value: Scalar, params: list[Any]) -> str:
    """True only where the stored value has the operand's JSON type and value (never NULL)."""
    if value is None:
        params.append(path)
        return f"(json_type({column}, ?) IS 'null')"
    if isinstance(value, bool):
        params.append(path)
        return f"(json_type({column}, ?) IS '{'true' if value else 'false'}')"
    kinds = "('text')" if isinstance(value, str) else "('integer', 'real')"
    params.extend([path, path, value])
    return f"(IFNULL(json_type({column}, ?), '') IN {kinds} AND json_extract({column}, ?) = ?)"


# -- Postgres -------------------------------------------------------------------------


class PgParams:
    """Collects query parameters and hands out their ``$n`` placeholders."""

    def __init__(self, values: list[Any] | None = None) -> None:
        self.values: list[Any] = list(values or [])

    def __call__(self, value: Any, cast: str = "") -> str:
        self.values.append(value)
        return f"${len(self.values)}{'::' + cast if cast else ''}"


def to_postgres(node: Filter, params: PgParams, column: str = "metadata") -> str:
    """A WHERE fragment for ``node`` against the jsonb ``column``, with the same meaning
    as :func:`to_sqlite`: a value matches only where the stored JSON type agrees, strings
    compare by code point, and no fragment is ever NULL (so ``$not`` and ``$ne`` are exact)."""
    if isinstance(node, All):
        return "(" + " AND ".join(to_postgres(p, params, column) for p in node.parts) + ")"
    if isinstance(node, AnyOf):
        return "(" + " OR ".join(to_postgres(p, params, column) for p in node.parts) + ")"
    if isinstance(node, Not):
        return "(NOT " + to_postgres(node.part, params, column) + ")"
    at = _pg_at(column, node.key, params)
    if node.op == "$exists":
        return f"({at} IS {'NOT ' if node.value else ''}NULL)"
    if node.op in ("$eq", "$ne"):
        sql = _pg_equals(at, node.value, params)
        return sql if node.op == "$eq" else f"(NOT {sql})"
    if node.op in ("$in", "$nin"):
        sql = "(" + " OR ".join(_pg_equals(at, v, params) for v in node.value) + ")"
        return sql if node.op == "$in" else f"(NOT {sql})"
    return _pg_typed(at, node.value, _SQL_CMP[node.op], params)


def _pg_at(column: str, key: tuple[str, ...], params: PgParams) -> str:
    """The value at ``key``, or SQL NULL. ``#>`` would also index into arrays with a
    numeric segment ({"a.0": ...}); SQLite's object paths never do, so neither do we."""
    at = f"{column} #> {params(list(key), 'text[]')}"
    parents = [key[:i] for i in range(1, len(key)) if key[i].lstrip("-").isdigit()]
    if not parents:
        return at
    objects = " AND ".join(f"jsonb_typeof({column} #> {params(list(p), 'text[]')}) = 'object'" for p in parents)
    return f"(CASE WHEN {objects} THEN {at} END)"


def _pg_typed(at: str, value: str | int | float, op: str, params: PgParams) -> str:
    if isinstance(value, str):
        return (f"(CASE WHEN jsonb_typeof({at}) = 'string' "
                f"THEN ({at} #>> '{{}}') COLLATE \"C\" {op} {params(value, 'text')} ELSE false END)")
    return (f"(CASE WHEN jsonb_typeof({at}) = 'number' "
            f"THEN ({at})::numeric {op} {params(str(value), 'numeric')} ELSE false END)")


def _pg_equals(at: str, value: Scalar, params: PgParams) -> str:
    if value is None:
        return f"(jsonb_typeof({at}) IS NOT DISTINCT FROM 'null')"
    if isinstance(value, bool):
        return f"(jsonb_typeof({at}) IS NOT DISTINCT FROM 'boolean' AND {at} = '{'true' if value else 'false'}'::jsonb)"
    return _pg_typed(at, value, "=", params)
