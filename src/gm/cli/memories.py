"""``gmem list``, ``update``, ``history`` and ``forget``: paging through a scope's memories,
changing one, reading what happened to it and forgetting a scope's, on a database or a server.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

import gm
from gm.cli.commands import _json_arg, _scope, emit, memories
from gm.cli.exits import EXIT_ERROR
from gm.errors import InvalidInput
from gm.remote import RemoteStore

FORGET_PAGE = 1000  # the largest list page: counting what a forget would delete takes one read per 1,000


class Memories:
    """The memories of a database opened here or of a server (``gm.open`` and ``gm.connect``
    have the same methods), in the HTTP API's JSON shapes, so a command prints the same
    thing on either."""

    def __init__(self, handle: gm.Store | RemoteStore) -> None:
        self.handle = handle

    async def page(self, query: dict[str, Any]) -> dict[str, Any]:
        """One page: ``query`` holds the list's parameters (scope, filter, limit, cursor, ...)."""
        page = await self.handle.list(**query)
        return page.to_dict()

    async def update(self, memory_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        return (await self.handle.update(memory_id, **changes)).to_dict()

    async def history(self, memory_id: str) -> list[dict[str, Any]]:
        return [entry.to_dict() for entry in await self.handle.history(memory_id)]

    async def delete_many(self, scope: dict[str, Any], filter: Any) -> int:
        return await self.handle.delete_many(**scope, filter=filter)


@asynccontextmanager
async def memories_at(args: argparse.Namespace) -> AsyncIterator[Memories]:
    """The server of ``--url`` (or GM_URL), else the database of ``--db``, which must exist."""
    async with memories(args) as handle:
        yield Memories(handle)


# -- list -------------------------------------------------------------------------------------


def _short_time(value: str) -> str:
    """``2026-11-29T16:20:00.123Z`` as ``2026-11-29 16:20:00`` (UTC) for a table."""
    return value[:19].replace("T", " ")


def table(memories: list[dict[str, Any]], order_by: str | None) -> str:
    """One line per memory: id, its time in the list's order, the scope fields any of them
    has, and the text on one line (cut to the terminal's width when printing to one)."""
    when = "occurred_at" if order_by == "occurred_at" else "created_at"
    keys = ["id", when, *(key for key in ("user_id", "agent_id", "session_id") if any(m.get(key) for m in memories))]
    header = [key.removesuffix("_at").removesuffix("_id").upper() for key in keys] + ["TEXT"]
    rows = [[_short_time(m[key]) if key == when else str(m.get(key) or "") for key in keys]
            + [" ".join(m["text"].split())] for m in memories]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(keys))]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
             for row in (header, *rows)]
    if sys.stdout.isatty():
        room = shutil.get_terminal_size().columns
        lines = [line if len(line) <= room else line[: room - 1] + "…" for line in lines]
    return "\n".join(lines)


def _list_query(args: argparse.Namespace) -> dict[str, Any]:
    query: dict[str, Any] = dict(_scope(args))
    for key in ("limit", "cursor", "order_by", "occurred_after", "occurred_before"):
        if getattr(args, key) is not None:
            query[key] = getattr(args, key)
    if args.filter is not None:
        query["filter"] = _json_arg(args.filter, "filter")
    return query


async def list_(args: argparse.Namespace) -> int:
    async with memories_at(args) as memories:
        page = await memories.page(_list_query(args))
    text = table(page["memories"], args.order_by) if page["memories"] else "no memories"
    if page["next_cursor"]:
        text += f"\nnext page: --cursor {page['next_cursor']}"
    emit(args, page, text)
    return 0


# -- update and history -------------------------------------------------------------------------


async def update(args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    for key, value in (("text", args.text), ("metadata", _json_arg(args.metadata, "metadata")),
                       ("expires_at", args.expires_at), ("occurred_at", args.occurred_at)):
        if value is not None:
            changes[key] = value
    if args.no_expiry:
        changes["expires_at"] = None
    if not changes:
        raise InvalidInput("give at least one of --text, --metadata, --expires-at, --no-expiry, --occurred-at")
    async with memories_at(args) as memories:
        memory = await memories.update(args.id, changes)
    emit(args, memory, f"updated {memory['id']}")
    return 0


async def history(args: argparse.Namespace) -> int:
    async with memories_at(args) as memories:
        entries = await memories.history(args.id)
    lines = []
    for entry in entries:
        line = f"{entry['at']}  {entry['op']:<6}"
        if entry["op"] != "delete":
            line += f"  {' '.join((entry['text'] or '').split())}"
            if entry["metadata"]:
                line += f"  {orjson.dumps(entry['metadata']).decode()}"
        lines.append(line)
    emit(args, {"history": entries}, "\n".join(lines))
    return 0


# -- forget -----------------------------------------------------------------------------------


def forget_scope(args: argparse.Namespace) -> dict[str, Any]:
    """The scope a forget acts on. Without a user, agent or session it would reach a whole
    namespace, so that namespace must then be named with --namespace: a forgotten --user-id
    (an unset shell variable, a typo in a script) must not turn into "every memory"."""
    scope = _scope(args)
    if not scope.keys() & {"user_id", "agent_id", "session_id"} and "namespace" not in scope:
        raise InvalidInput("forget needs a scope: --user-id, --agent-id or --session-id, or --namespace NAME "
                           "to forget a whole namespace (with --filter: only what matches)")
    return scope


def _memories(count: int) -> str:
    return f"{count:,} memor{'y' if count == 1 else 'ies'}"


def _described(scope: dict[str, Any], filter: Any) -> str:
    words = ", ".join(f"{key}={value}" for key, value in scope.items())
    return words + (f", filter {orjson.dumps(filter).decode()}" if filter is not None else "")


async def _count(memories: Memories, scope: dict[str, Any], filter: Any) -> tuple[int, str | None]:
    """How many memories a forget would delete now, and the namespace they are in."""
    query = {**scope, "limit": FORGET_PAGE, **({"filter": filter} if filter is not None else {})}
    count, namespace = 0, None
    while True:
        page = await memories.page(query)
        count += len(page["memories"])
        if page["memories"]:
            namespace = page["memories"][0]["namespace"]
        if not page["next_cursor"]:
            return count, namespace
        query["cursor"] = page["next_cursor"]


def confirmed(question: str) -> bool:
    """Ask on the terminal; only y or yes (any case) goes ahead, end of input does not."""
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


async def forget(args: argparse.Namespace) -> int:
    scope = forget_scope(args)
    filter = _json_arg(args.filter, "filter")
    async with memories_at(args) as memories:
        matched, namespace = await _count(memories, scope, filter)
        shown = {"namespace": namespace, **scope} if namespace else scope
        what = f"{_memories(matched)} match{'es' if matched == 1 else ''} {_described(shown, filter)}"
        if matched == 0 or args.dry_run:
            emit(args, {"matched": matched, "deleted": 0}, what + ("; nothing deleted (--dry-run)" if matched else ""))
            return 0
        if not args.yes:
            if not sys.stdin.isatty():
                raise InvalidInput(f"{what}; forgetting them needs a confirmation: run gmem forget on a terminal, "
                                   "or add --yes")
            if not confirmed(f"{what}. Forget them?"):
                print("gmem: not confirmed; nothing was forgotten", file=sys.stderr)
                return EXIT_ERROR
        # A server asks a bulk delete for its namespace unless the key is bound to one; the
        # namespace the memories were just listed in is the one meant (the key's, or default).
        deleted = await memories.delete_many({"namespace": namespace, **scope}, filter)
    note = f" ({matched:,} when counted)" if deleted != matched else ""
    emit(args, {"matched": matched, "deleted": deleted},
         f"forgot {_memories(deleted)}{note}")
    return 0
