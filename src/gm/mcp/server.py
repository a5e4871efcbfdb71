"""The MCP server: the memory tools on the SDK's low-level ``Server`` (exact schemas, results
built here), every store error a tool error the model can read, and ``gmem mcp`` over stdio.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

import gm
from gm.errors import GMError
from gm.mcp import NAMESPACE_SCOPE_KEY, render
from gm.mcp.handle import Memories
from gm.mcp.tools import TOOLS

log = logging.getLogger("gm.mcp")

INSTRUCTIONS = (
    "Long-term memory. Use remember to store facts, preferences and events worth keeping (short, "
    "self-contained texts, with user_id / agent_id / session_id to say whose they are), and recall to find "
    "the ones relevant to what you are doing before you answer. get, list, update, forget and history act "
    "on memories by id or by scope."
)

_LISTED = [
    types.Tool(
        name=tool.name,
        description=tool.description,
        input_schema=tool.input_schema,
        output_schema=tool.output_schema,
        annotations=types.ToolAnnotations(
            read_only_hint=tool.read_only, destructive_hint=tool.destructive, idempotent_hint=tool.read_only
        ),
    )
    for tool in TOOLS.values()
]


def bound_namespace(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """The namespace the caller's API key is bound to, if it came over HTTP with such a key."""
    scope = getattr(ctx.request, "scope", None)
    value = scope.get(NAMESPACE_SCOPE_KEY) if isinstance(scope, dict) else None
    return value if isinstance(value, str) else None


async def call_tool(
    memories: Memories, name: str, arguments: dict[str, Any], bound: str | None
) -> types.CallToolResult:
    """Run one tool. A store error (bad argument, unknown id, not ready...) is a tool error whose
    text says what to change; an unexpected fault is logged and answered without its traceback."""
    tool = TOOLS.get(name)
    if tool is None:  # not a tool error: the host asked for something this server never listed
        raise MCPError(types.INVALID_PARAMS, f"unknown tool {name!r}; the tools are {', '.join(TOOLS)}")
    try:
        answer = await tool.call(memories, arguments, bound)
    except GMError as exc:
        return _failed(render.error(exc))
    except Exception:
        log.exception("unexpected fault in MCP tool %s", name)
        return _failed("internal: an unexpected fault; it was logged on the server")
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=answer.text)], structured_content=answer.data
    )


def _failed(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def build_server(memories: Callable[[], Memories]) -> Server[Any]:
    """The MCP server over the handle ``memories()`` returns when a tool is called (a server's
    store may be replaced while it retries opening it)."""

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=_LISTED)

    async def on_call(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        return await call_tool(memories(), params.name, params.arguments or {}, bound_namespace(ctx))

    def input_schema(name: str) -> dict[str, Any] | None:  # spares the SDK a tools/list per HTTP call
        tool = TOOLS.get(name)
        return tool.input_schema if tool is not None else None

    return Server(
        "greatmemory",
        version=gm.__version__,
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=on_call,
        get_tool_input_schema=input_schema,
    )


async def serve_stdio(memories: Memories) -> None:
    """Serve the tools on standard input and output until the host closes them (or SIGTERM)."""
    server = build_server(lambda: memories)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # a host stopping us: stop serving, so that the caller closes the store
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    except asyncio.CancelledError:
        log.info("stopping on SIGTERM")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
