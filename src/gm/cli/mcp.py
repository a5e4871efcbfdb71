"""``gmem mcp``: the memory tools for an MCP host (Claude Desktop, an agent framework) over
standard input and output, on a local database or a server's; stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from gm import config, logs
from gm.cli.commands import client, database, server_url

log = logging.getLogger("gm.mcp")


async def run(args: argparse.Namespace) -> int:
    from gm.mcp.server import serve_stdio
    from gm.opening import open as open_store
    from gm.storage.postgres_pool import redact

    logs.setup(config.LOG_FORMAT.read(flags=vars(args)))  # (to standard error: standard output is the protocol)
    url = server_url(args)
    if url:  # the same tools over a running server's API (its keys decide what they see)
        async with client(args, url) as remote:
            log.info("serving MCP on stdio, server %s", url)
            await serve_stdio(remote)
        return 0
    target = database(args)
    async with open_store(target, model_dir=args.model_dir) as store:
        log.info("serving MCP on stdio, database %s", redact(target))
        await serve_stdio(store)
    return 0


def add_mcp_command(sub: Any) -> None:
    p = sub.add_parser(
        "mcp",
        help="serve the memory tools to an MCP host over stdio",
        description="Serve remember, recall, get, list, update, forget and history as Model Context Protocol "
        "tools over standard input and output, for an MCP host that starts this command (see docs/mcp.md). "
        "The database is created and migrated if need be. Logs go to standard error. A running server serves "
        "the same tools over HTTP at /mcp.",
        epilog="Examples (an MCP host's configuration):\n"
        '  {"mcpServers": {"memory": {"command": "gmem", "args": ["mcp", "--db", "/home/me/memory.db"]}}}\n'
        '  {"mcpServers": {"memory": {"command": "gmem", "args": ["mcp", "--url", "http://127.0.0.1:8420"],\n'
        '                             "env": {"GM_API_KEY": "..."}}}}',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(run=run)
    p.add_argument(
        "--db", help="SQLite database file or postgresql:// URL (GM_DATABASE_URL, else GM_DB; default ./greatmemory.db)"
    )
    p.add_argument("--url", help="serve the tools of a running server instead, through its API (GM_URL)")
    p.add_argument("--api-key", help="the key for --url (GM_API_KEY)")
    p.add_argument("--model-dir", help="folder with model.onnx and tokenizer.json (GM_MODEL_DIR)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (GM_LOG_FORMAT)")
