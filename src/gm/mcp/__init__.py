"""The MCP server: greatmemory's memory operations as Model Context Protocol tools, over stdio
(``gmem mcp``) and over streamable HTTP at ``/mcp`` of ``gmem serve``.
"""

# The key of an HTTP request's ASGI scope under which gm.mcp.bridge puts the namespace the
# request's API key is bound to, for the tools to act within; stdio has no key to bind one.
NAMESPACE_SCOPE_KEY = "gm.key_namespace"
