"""``gmem reembed`` and ``gmem reindex``: moving a database's vectors to another model, or
rebuilding its derived index state, online, on a database file or through a running server.

On a database (``--db``) the command opens it and does the work itself, with progress on
stderr; through a server (``--url``) the server does it in the background and the command
follows its status. A SQLite file a running server holds can only be re-embedded by that
server: the one-line error says to use ``--url``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TextIO

from gm import reindex as reindexing
from gm.cli.commands import client, database, emit, local_store, server_url
from gm.errors import DatabaseLocked
from gm.model_identity import model_of
from gm.progress import Progress
from gm.reembed import BATCH, ReembedReport
from gm.remote import RemoteStore
from gm.store import Store

REPORT_SECONDS = 2.0  # off a terminal, a progress line every this many seconds (and the last one)
REDRAW_SECONDS = 0.1  # on a terminal, the line is redrawn at most this often


class ProgressLine:
    """A job's progress on stderr: on a terminal one line redrawn in place; elsewhere (a log,
    a pipe) a line every REPORT_SECONDS, the first and a change of phase at once."""

    def __init__(self, stream: TextIO | None = None, clock: Any = time.monotonic) -> None:
        self.stream = stream or sys.stderr  # (looked up when made: tests and callers may have replaced it)
        self.terminal = self.stream.isatty()
        self.clock = clock
        self.last_at: float | None = None
        self.last_phase: str | None = None
        self.pending: str | None = None  # a line not written yet (throttled), written by finish
        self.drawn = False

    def __call__(self, progress: Progress) -> None:
        now, line = self.clock(), progress.line()
        due = self.last_at is None or progress.phase != self.last_phase or now - self.last_at >= (
            REDRAW_SECONDS if self.terminal else REPORT_SECONDS)
        self.last_phase = progress.phase
        if not due:
            self.pending = line
            return
        self._write(line)
        self.last_at, self.pending = now, None

    def _write(self, line: str) -> None:
        if self.terminal:
            self.stream.write(f"\r\x1b[K{line}")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.pending is not None:
            self._write(self.pending)
            self.pending = None
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


@asynccontextmanager
async def _opened(args: argparse.Namespace, command: str) -> AsyncIterator[Store | RemoteStore]:
    """The server of ``--url`` (or GM_URL), else the database, opened here. A SQLite file a
    server holds is refused naming ``--url``: only that server may write it."""
    url = server_url(args)
    if url:
        async with client(args, url) as remote:
            yield remote
        return
    async with AsyncExitStack() as stack:
        try:
            store = await stack.enter_async_context(local_store(args))
        except DatabaseLocked as exc:
            raise DatabaseLocked(
                f"{exc.message.split('; ', 1)[0]}; run `gmem {command}` through that server instead: give --url "
                "with its address (and --api-key if it has keys), e.g. --url http://127.0.0.1:8420"
            ) from None
        yield store


def _where(args: argparse.Namespace) -> dict[str, str]:
    url = server_url(args)
    return {"server": url} if url else {"database": database(args)}


async def _run(args: argparse.Namespace, handle: Store | RemoteStore, model_dir: str | None) -> ReembedReport:
    line = ProgressLine()
    try:
        if isinstance(handle, RemoteStore):
            return await handle.reembed(model_dir, progress=line, batch=args.batch)
        if model_dir is None:
            return await reindexing.reindex(handle, progress=line, batch=args.batch)
        return await handle.reembed(model_dir, progress=line, batch=args.batch)
    except asyncio.CancelledError:  # Ctrl-C
        line.finish()
        if isinstance(handle, RemoteStore):
            print("gmem: stopped following; the re-embed goes on at the server: `gmem status --url ...` shows it, "
                  "`gmem reembed --cancel --url ...` cancels it", file=sys.stderr)
        else:
            print("gmem: stopped; run the same command again to resume where it stopped", file=sys.stderr)
        raise
    finally:
        line.finish()


def _summary(report: ReembedReport, what: str) -> str:
    resumed = " (it went on with an interrupted run)" if report.resumed else ""
    return (f"{what} {report.embedded:,} of {report.total:,} memories in {report.seconds:.1f}s "
            f"({report.rate:,.0f}/s){resumed}; the vectors are model {model_of(report.model)} now")


async def reembed(args: argparse.Namespace) -> int:
    if args.cancel or args.drop_old:
        return await _end(args)
    model_dir = os.path.abspath(args.model_dir)  # (a server runs elsewhere: it gets the whole path)
    async with _opened(args, "reembed") as handle:
        report = await _run(args, handle, model_dir)
    remote = isinstance(handle, RemoteStore)
    restart = ("the server uses it now; start it with GM_MODEL_DIR" if remote
               else "from now on open this database with GM_MODEL_DIR") + f"={model_dir} (gmem serve --model-dir)"
    text = [_summary(report, "re-embedded"), f"  {restart}",
            "  the old vectors are kept until `gmem reembed --drop-old`"]
    emit(args, {**_where(args), **report.to_dict(), "model_dir": model_dir}, "\n".join(text))
    return 0


async def _end(args: argparse.Namespace) -> int:
    async with _opened(args, "reembed") as handle:
        done = await handle.end_reembed(drop_old=args.drop_old)
    if args.drop_old:
        text = "dropped the vectors the last switch left behind" if done else "no old vectors to drop"
    else:
        text = ("cancelled the re-embed under way: its new vectors are dropped, the current ones stay" if done
                else "no re-embed under way: nothing to cancel")
    emit(args, {**_where(args), "done": done}, text)
    return 0


async def reindex(args: argparse.Namespace) -> int:
    async with _opened(args, "reindex") as handle:
        report = await _run(args, handle, None)
    text = [_summary(report, "reindexed") + ", and the keyword index is rebuilt",
            "  the old vectors are kept until `gmem reembed --drop-old`"]
    emit(args, {**_where(args), **report.to_dict()}, "\n".join(text))
    return 0


def add_reembed_commands(sub: Any, command: Any, target: Any) -> None:
    """``gmem reembed`` and ``gmem reindex`` (``command`` and ``target`` are gm.cli's builders)."""
    p = command(
        sub, "reembed", reembed, "move the vectors to another embedding model, online",
        "gmem reembed --db greatmemory.db --model-dir /models/bge-base-en",
        "Embed every memory with the model in --model-dir (model.onnx, tokenizer.json) into new vectors "
        "beside the current ones, while servers keep searching the old ones and accepting writes; then "
        "switch in one step. Progress goes to stderr; killed, it resumes where it stopped when run again. "
        "The old vectors stay until --drop-old. On a SQLite file a server holds, give --url: the server "
        "does it. See docs/models.md.",
    )
    target(p)
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--model-dir", help="the new model's folder (on the server's machine, with --url)")
    action.add_argument("--cancel", action="store_true", help="cancel the re-embed under way (drops its new vectors)")
    action.add_argument("--drop-old", action="store_true",
                        help="drop the vectors the last switch left behind (the later step)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"memories embedded and written at a time (1-1000, "
                   f"default {BATCH})")

    parts = "; ".join(reindexing.PARTS)
    p = command(
        sub, "reindex", reindex, "rebuild the derived index state, online",
        "gmem reindex --db greatmemory.db",
        f"Rebuild what is derived from the memories while servers keep serving: {parts}. Progress goes "
        "to stderr; killed, it resumes where it stopped; each part is switched in one step, and the old "
        "vectors stay until `gmem reembed --drop-old`. See docs/reindex.md.",
    )
    target(p)
    p.add_argument("--batch", type=int, default=BATCH, help=f"memories rebuilt and written at a time (1-1000, "
                   f"default {BATCH})")
