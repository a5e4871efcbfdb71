"""The memory tools an MCP client calls (remember, recall, get, list, update, forget, history),
written once over :class:`gm.mcp.handle.Memories`: their schemas, arguments and answers.

Arguments are checked the way the HTTP API checks a body: a name the tool does not take is
refused, then the store's own validation names any bad value (``InvalidInput.path``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gm.errors import InvalidInput
from gm.mcp import render
from gm.mcp.handle import Memories
from gm.mcp.schemas import closed, component, described, parameters, request_body, response_body, tool_schema
from gm.validation import update_changes, within_namespace


@dataclass(frozen=True)
class Answer:
    """What a tool returns: the HTTP API's JSON for the same operation, and a text to read."""

    data: dict[str, Any]
    text: str


Run = Callable[[Memories, dict[str, Any], "str | None"], Awaitable[Answer]]


@dataclass(frozen=True)
class Tool:
    """One tool: ``run(memories, arguments, bound)`` with ``bound`` the namespace the caller's
    API key is bound to (None: any namespace)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    read_only: bool
    run: Run
    destructive: bool = False  # it may change or delete what is stored (as a host may warn)

    async def call(self, memories: Memories, arguments: dict[str, Any], bound: str | None) -> Answer:
        known = self.input_schema["properties"]
        for key in arguments:
            if key not in known:
                raise InvalidInput(f"unknown argument {key!r}; {self.name} takes {', '.join(known)}", path=key)
        for key in self.input_schema.get("required", ()):
            if arguments.get(key) is None:
                raise InvalidInput(f"{key} is required", path=key)
        return await self.run(memories, dict(arguments), bound)


# -- the operations ------------------------------------------------------------------------


async def remember(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    if args.get("memories") is not None:
        other = next((key for key in args if key != "memories"), None)
        if other is not None:
            raise InvalidInput(f"give memories (several) or text and its fields (one), not both: {other} with "
                               "memories; put it in each memory instead", path=other)
        items = args["memories"]
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    item["namespace"] = within_namespace(bound, item.get("namespace"))
        added = await memories.add_many(items)
    else:
        args.pop("memories", None)  # (given as null)
        if args.get("text") is None:
            raise InvalidInput("text is required (or memories, a list, to remember several at once)", path="text")
        args["namespace"] = within_namespace(bound, args.get("namespace"))
        added = [await memories.add(args.pop("text"), **args)]
    return Answer({"memories": [m.to_dict() for m in added]}, render.remembered(added))


async def recall(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    started = time.perf_counter()
    query = args.pop("query")
    args["namespace"] = within_namespace(bound, args.get("namespace"))
    hits = await memories.search(query, **args)
    took = round((time.perf_counter() - started) * 1000, 3)
    return Answer({"hits": [h.to_dict() for h in hits], "took_ms": took}, render.hits(query, hits))


async def get(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    memory = await memories.get(args["id"], namespace=bound)
    return Answer(memory.to_dict(), render.memory(memory))


async def list_(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    args["namespace"] = within_namespace(bound, args.get("namespace"))
    page = await memories.list(**args)
    data = page.to_dict()
    return Answer(data, render.page(page))


async def update(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    memory_id = args.pop("id")
    memory = await memories.update(memory_id, namespace=bound, **update_changes(args))
    return Answer(memory.to_dict(), "Updated:\n" + render.memory(memory))


async def forget(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    if args.get("id") is not None:
        other = next((key for key in args if key != "id"), None)
        if other is not None:
            raise InvalidInput(f"give id (one memory) or a scope and filter (many), not both: {other} with id",
                               path=other)
        await memories.delete(args["id"], namespace=bound)
        return Answer({"deleted": 1}, f"Forgot memory {args['id']}.")
    args.pop("id", None)
    namespace = within_namespace(bound, args.get("namespace"))
    if namespace is None:
        raise InvalidInput("give id to forget one memory, or namespace (with user_id, agent_id, session_id, filter "
                           "as needed) to forget every memory of a scope", path="namespace")
    args["namespace"] = namespace
    deleted = await memories.delete_many(**args)
    return Answer({"deleted": deleted}, f"Forgot {render.counted(deleted)}.")


async def history(memories: Memories, args: dict[str, Any], bound: str | None) -> Answer:
    entries = await memories.history(args["id"], namespace=bound)
    return Answer({"history": [e.to_dict() for e in entries]}, render.history(args["id"], entries))


# -- their schemas ------------------------------------------------------------------------------

_ID = described(parameters("/v1/memories/{id}", "get")["id"], "the memory's id, as remember, recall or list gave it")
_MEMORY = tool_schema(component("Memory"))
_ONE = component("MemoryInput")["properties"]
_SEVERAL = described(component("MemoryBatch")["properties"]["memories"],
                     "several memories to store at once, all or nothing; each takes the fields above")
_SCOPE_WORDS = ("Scope: namespace (default 'default'), user_id, agent_id, session_id; a memory is in the scope "
                "when it matches each one given.")


def _search_body() -> dict[str, Any]:
    body = request_body("/v1/memories/search", "post")
    body["properties"]["query"] = described(body["properties"]["query"], "what to look for, in words")
    return body


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (
    Tool(
        "remember",
        "Store a memory: a short self-contained fact, preference or event worth recalling later (text), in a "
        f"scope, with optional metadata (a JSON object) and occurred_at (when it happened). {_SCOPE_WORDS} "
        "To store several at once, give memories: a list of such objects instead.",
        tool_schema(closed({**_ONE, "text": described(_ONE["text"], "the memory, in words"), "memories": _SEVERAL})),
        tool_schema(response_body("/v1/memories", "post", "201")["oneOf"][1]),
        False,
        remember,
    ),
    Tool(
        "recall",
        "Find the memories most relevant to a question or topic (query), best first, within a scope. "
        f"{_SCOPE_WORDS} filter matches metadata, e.g. {{\"topic\": \"travel\"}}; mode is hybrid (default), "
        "vector or keyword; occurred_after / occurred_before bound when they happened; recency favours newer ones.",
        tool_schema(_search_body()),
        tool_schema(response_body("/v1/memories/search", "post")),
        True,
        recall,
    ),
    Tool("get", "One memory by its id.", tool_schema(closed({"id": _ID}, "id")), _MEMORY, True, get),
    Tool(
        "list",
        f"The memories of a scope, newest first, a page at a time (limit, then cursor: the next_cursor of the page "
        f"before). {_SCOPE_WORDS} filter matches metadata.",
        tool_schema(closed(parameters("/v1/memories", "get"))),
        tool_schema(response_body("/v1/memories", "get")),
        True,
        list_,
    ),
    Tool(
        "update",
        "Change a memory by id: its text (searched anew), metadata (replaces the old object), expires_at (null: "
        "never expires) and/or occurred_at. Give at least one.",
        tool_schema(closed({"id": _ID, **request_body("/v1/memories/{id}", "patch")["properties"]}, "id")),
        _MEMORY,
        False,
        update,
        destructive=True,
    ),
    Tool(
        "forget",
        "Delete memories for good: one by id, or every memory of a scope (namespace required, with user_id, "
        "agent_id, session_id and a metadata filter to narrow it). Answers how many were deleted.",
        tool_schema(closed({"id": _ID, **request_body("/v1/memories/delete", "post")["properties"]})),
        tool_schema(response_body("/v1/memories/delete", "post")),
        False,
        forget,
        destructive=True,
    ),
    Tool(
        "history",
        "Every change of a memory (add, update, delete) with its time and the text and metadata after it, "
        "oldest first.",
        tool_schema(closed({"id": _ID}, "id")),
        tool_schema(response_body("/v1/memories/{id}/history", "get")),
        True,
        history,
    ),
)}
