"""The text part of the MCP tools' answers: what a model reads when its host shows it the text
rather than the structured content, so every id, scope, time and metadata value is there too.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from gm.errors import GMError
from gm.memory import HistoryEntry, Memory, Page, SearchHit, format_time


def _details(memory: Memory) -> str:
    parts = [f"id {memory.id}", f"namespace {memory.namespace}"]
    parts += [f"{name} {value}" for name, value in (("user_id", memory.user_id), ("agent_id", memory.agent_id),
                                                    ("session_id", memory.session_id)) if value is not None]
    parts.append(f"occurred {format_time(memory.occurred_at)}")
    if memory.expires_at is not None:
        parts.append(f"expires {format_time(memory.expires_at)}")
    if memory.metadata:
        parts.append("metadata " + orjson.dumps(memory.metadata).decode())
    return " · ".join(parts)


def memory(m: Memory) -> str:
    return f"{m.text}\n  {_details(m)}"


def counted(n: int) -> str:
    return "1 memory" if n == 1 else f"{n} memories"


def remembered(memories: Sequence[Memory]) -> str:
    lines = [f"Remembered {counted(len(memories))}:"]
    lines += [f"- {memory(m)}" for m in memories]
    return "\n".join(lines)


def hits(query: str, found: Sequence[SearchHit]) -> str:
    if not found:
        return f"No memory in this scope matches {query!r}."
    lines = [f"{counted(len(found))} for {query!r}, best first:"]
    lines += [f"{i}. [score {hit.score:.3f}] {memory(hit.memory)}" for i, hit in enumerate(found, 1)]
    return "\n".join(lines)


def page(p: Page) -> str:
    if not p.memories:
        return "No memories in this scope."
    lines = [f"{counted(len(p.memories))}, newest first:"]
    lines += [f"- {memory(m)}" for m in p.memories]
    if p.next_cursor is not None:
        lines.append(f"More: call list again with cursor {p.next_cursor!r}.")
    return "\n".join(lines)


def history(memory_id: str, entries: Sequence[HistoryEntry]) -> str:
    lines = [f"History of memory {memory_id}, oldest first:"]
    for entry in entries:
        after = "" if entry.text is None else f": {entry.text}"
        metadata = "" if not entry.metadata else " · metadata " + orjson.dumps(entry.metadata).decode()
        lines.append(f"- {format_time(entry.at)} {entry.op}{after}{metadata}")
    return "\n".join(lines)


def error(exc: GMError) -> str:
    """``invalid_input: limit must be an integer from 1 to 100 (argument: limit)``."""
    path = (exc.details or {}).get("path")
    return f"{exc.code}: {exc.message}" + (f" (argument: {path})" if path else "")
