"""The ``gmem`` command line: argument parsing for every command and the one place
where errors become one line on stderr and an exit code (see gm.cli.exits)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence

from gm.cli import commands, memories
from gm.cli.exits import EXIT_ERROR, EXIT_USAGE, exit_code
from gm.errors import GMError

Command = Callable[[argparse.Namespace], Awaitable[int]]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"gmem: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _command(
    sub: argparse._SubParsersAction[_Parser], name: str, run: Command, summary: str, example: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description or summary, epilog=f"Example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return parser


def _target(parser: argparse.ArgumentParser, remote: bool = True) -> None:
    parser.add_argument(
        "--db", help="SQLite database file or postgresql:// URL (GM_DATABASE_URL, else GM_DB; default ./greatmemory.db)"
    )
    if remote:
        parser.add_argument("--url", help="a running server instead of a file, e.g. http://127.0.0.1:8420 (GM_URL)")
        parser.add_argument("--api-key", help="API key for --url (GM_API_KEY)")


def _scope(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", help="namespace (default: default)")
    parser.add_argument("--user-id")
    parser.add_argument("--agent-id")
    parser.add_argument("--session-id")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gmem",
        description="greatmemory: long-term memory for AI agents. Run `gmem COMMAND --help` for each command.",
        epilog="Example:\n  gmem serve --db memories.db\n\nExit codes: 0 ok, 1 error, 2 usage, 3 schema newer "
        "than this release, 4 migration failed, 5 model problem, 6 database in use, 7 backup invalid, "
        "8 not found, 9 unreachable, 10 a re-embed already under way.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    from gm.cli.serve import add_serve_command

    add_serve_command(sub)

    from gm.cli.mcp import add_mcp_command

    add_mcp_command(sub)

    p = _command(sub, "status", commands.status, "show schema version, readiness, counts, size and model",
                 "gmem status --db greatmemory.db",
                 "Report on a running server (--url) or a database file (--db, read-only: it never migrates "
                 "or writes): schema version and pending migrations, readiness, memories per namespace, database "
                 "size, model in use, and the server's memory when remote.")
    _target(p)

    p = _command(sub, "backup", commands.backup, "write a verified, consistent copy of a SQLite database",
                 "gmem backup --db greatmemory.db nightly.db",
                 "Copy the database with SQLite's online backup inside one read snapshot (safe while the "
                 "server writes), verify it (integrity check, row counts), then rename it into place.")
    _target(p, remote=False)
    p.add_argument("path", nargs="?", help="where to write (default: <db>-<UTC time>.backup.db next to it)")

    p = _command(sub, "restore", commands.restore, "replace a database with a verified backup",
                 "gmem restore --db greatmemory.db nightly.db",
                 "Verify the backup (integrity, schema not newer than this release), refuse while a server "
                 "holds the database, keep the replaced file as <db>.pre-restore-<time>.bak, and swap "
                 "atomically. An older backup is migrated on the next open.")
    _target(p, remote=False)
    p.add_argument("path", help="the backup file")

    p = _command(sub, "export", commands.export, "write memories as JSON Lines",
                 "gmem export --db greatmemory.db --vectors memories.jsonl",
                 "Stream every live memory (all fields; with --vectors also its embedding) as JSON Lines, "
                 "after a header line. Read-only: safe while a server runs.")
    _target(p, remote=False)
    p.add_argument("path", nargs="?", help="output file (default: standard output)")
    p.add_argument("--vectors", action="store_true", help="include each memory's embedding (base64 float32)")
    p.add_argument("--namespace", help="only this namespace")

    p = _command(sub, "import", commands.import_, "read memories from JSON Lines",
                 "gmem import --db new.db memories.jsonl",
                 "Add the memories of a JSON Lines file (an export, or lines with at least \"text\") in "
                 "batches. Idempotent by id: a memory already present is skipped, and every skip is reported "
                 "with its reason. Vectors in the file are reused when they come from the same model.")
    _target(p, remote=False)
    p.add_argument("path", help="input file, or - for standard input")

    p = _command(sub, "add", commands.add, "add one memory",
                 "gmem add --user-id u1 --metadata '{\"topic\": \"travel\"}' \"Prefers window seats.\"")
    _target(p)
    _scope(p)
    p.add_argument("text")
    p.add_argument("--metadata", help="a JSON object")
    p.add_argument("--id", help="your own id (makes retries idempotent)")
    p.add_argument("--ttl-seconds", type=float, help="forget it after this many seconds")
    p.add_argument("--occurred-at", help="when it happened, RFC 3339 (default: now), e.g. 2024-03-15T09:30:00Z")

    p = _command(sub, "search", commands.search, "find the memories most relevant to a question",
                 "gmem search --user-id u1 \"where does she like to sit?\"")
    _target(p)
    _scope(p)
    p.add_argument("query")
    p.add_argument("--filter", help="a metadata filter as JSON, e.g. '{\"topic\": \"travel\"}'")
    p.add_argument("--limit", type=int, default=10, help="how many hits (1-100, default 10)")
    p.add_argument("--mode", choices=["hybrid", "vector", "keyword"], default="hybrid")
    p.add_argument("--occurred-after", help="only memories that happened at or after this RFC 3339 time")
    p.add_argument("--occurred-before", help="only memories that happened before this RFC 3339 time")
    p.add_argument("--min-score", type=float, help="drop hits whose cosine similarity is below this (-1 to 1)")
    p.add_argument("--recency", type=float, metavar="DAYS",
                   help="favour newer memories: a score halves per this many days since the memory occurred")

    p = _command(sub, "get", commands.get, "show one memory", "gmem get 0193a5c2-...")
    _target(p)
    p.add_argument("id")

    p = _command(sub, "delete", commands.delete, "delete one memory", "gmem delete 0193a5c2-...")
    _target(p)
    p.add_argument("id")

    _add_memory_commands(sub)

    from gm.cli.reembed import add_reembed_commands

    add_reembed_commands(sub, _command, _target)

    keys = sub.add_parser("keys", help="API key tools", description="API key tools.",
                          epilog="Example:\n  gmem keys new", formatter_class=argparse.RawDescriptionHelpFormatter)
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION", parser_class=_Parser)
    p = _command(keys_sub, "new", commands.keys_new, "print a new random API key (256 bits)",
                 "KEY=$(gmem keys new); echo \"$KEY\" > client.key; GM_API_KEYS=$KEY gmem serve --host 0.0.0.0")
    p.add_argument("--namespace", help="print it bound to this namespace (KEY@NAMESPACE)")

    _command(sub, "version", commands.version, "print the release and its schema version", "gmem version")
    return parser


def _add_memory_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """gmem list, update, history and forget (gm.cli.memories)."""
    p = _command(sub, "list", memories.list_, "list a scope's memories, newest first, a page at a time",
                 "gmem list --user-id u1 --filter '{\"topic\": \"travel\"}' --limit 20",
                 "Print a page of a scope's memories as a table (newest added first, or newest event first "
                 "with --order-by occurred_at) and the cursor of the next page; --json prints the page.")
    _target(p)
    _scope(p)
    p.add_argument("--filter", help="a metadata filter as JSON, e.g. '{\"topic\": \"travel\"}'")
    p.add_argument("--limit", type=int, help="how many a page (1-1000, default 50)")
    p.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    p.add_argument("--order-by", choices=["created_at", "occurred_at"],
                   help="newest added first (created_at, the default) or newest event first (occurred_at)")
    p.add_argument("--occurred-after", help="only memories that happened at or after this RFC 3339 time")
    p.add_argument("--occurred-before", help="only memories that happened before this RFC 3339 time")

    p = _command(sub, "update", memories.update, "change a memory's text, metadata, expiry or event time",
                 "gmem update 0193a5c2-... --metadata '{\"topic\": \"travel\", \"confirmed\": true}'",
                 "Change one memory; give at least one of the options. New text is embedded again; new "
                 "metadata replaces the old object whole.")
    _target(p)
    p.add_argument("id")
    p.add_argument("--text", help="the new text (embedded again)")
    p.add_argument("--metadata", help="a JSON object replacing the metadata ('{}' clears it)")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires-at", help="forget it at this RFC 3339 time, e.g. 2027-01-01T00:00:00Z")
    expiry.add_argument("--no-expiry", action="store_true", help="never forget it (clears an expiry)")
    p.add_argument("--occurred-at", help="when it happened, RFC 3339, e.g. 2024-03-15T09:30:00Z")

    p = _command(sub, "history", memories.history, "show every add, update and delete of a memory",
                 "gmem history 0193a5c2-...",
                 "Print each change of one memory in commit order: when, what (add, update, delete), and "
                 "the text and metadata it left.")
    _target(p)
    p.add_argument("id")

    p = _command(sub, "forget", memories.forget, "delete every memory of a scope that matches a filter",
                 "gmem forget --user-id u1 --filter '{\"topic\": \"travel\"}'",
                 "Count the memories of a scope (and --filter) and, once confirmed, delete them. It asks on a "
                 "terminal; elsewhere (a script, a pipe) it deletes only with --yes. A scope is required: "
                 "--user-id, --agent-id or --session-id, or --namespace to forget a whole namespace.")
    _target(p)
    _scope(p)
    p.add_argument("--filter", help="only memories whose metadata matches this JSON filter")
    p.add_argument("--yes", action="store_true", help="do not ask: delete what matches")
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A command's failure is the one line below; the library's log lines reach stderr only
    # where logging is set up (gmem serve), not through logging's last-resort handler.
    quiet = logging.getLogger("gm")
    if not any(isinstance(h, logging.NullHandler) for h in quiet.handlers):
        quiet.addHandler(logging.NullHandler())
    try:
        code: int = asyncio.run(args.run(args))
        return code
    except GMError as exc:
        print(f"gmem: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        print("gmem: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (OSError, sqlite3.Error) as exc:  # e.g. an output path in a folder that does not exist
        print(f"gmem: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, with what to report
        print(f"gmem: unexpected {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        return EXIT_ERROR
