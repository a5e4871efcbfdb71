"""The ``gmem`` command: ``serve`` runs the HTTP API; ``version`` prints the release.

Exit codes: 0 success, 1 error, 2 usage, 3 database refused (schema newer than this
release), 4 migration failed (rolled back), 5 model problem.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import gm
from gm import logs
from gm.config import ServerConfig, is_loopback
from gm.errors import GMError, InvalidInput, MigrationFailed, ModelError, SchemaTooNew

log = logging.getLogger("gm.serve")

EXIT_ERROR, EXIT_USAGE, EXIT_SCHEMA, EXIT_MIGRATION, EXIT_MODEL = 1, 2, 3, 4, 5


def exit_code(error: GMError) -> int:
    if isinstance(error, SchemaTooNew):
        return EXIT_SCHEMA
    if isinstance(error, MigrationFailed):
        return EXIT_MIGRATION
    if isinstance(error, ModelError):
        return EXIT_MODEL
    if isinstance(error, InvalidInput):
        return EXIT_USAGE
    return EXIT_ERROR


async def serve(config: ServerConfig) -> int:
    """Listen at once (healthz answers), open the store (readyz turns 200), and on
    SIGTERM/SIGINT drain: readyz 503, new requests 503, in-flight ones finish, writes commit."""
    from aiohttp import web

    from gm.http import ServerState, make_app
    from gm.store import open as open_store

    if config.database_url:
        raise InvalidInput("GM_DATABASE_URL is reserved for the Postgres backend, which this release does not have yet")

    state = ServerState(lambda: open_store(config.db, model_dir=config.model_dir).build(), config.api_keys)
    app = make_app(state, max_body_bytes=config.max_body_bytes)
    runner = web.AppRunner(
        app, handle_signals=False, access_log_class=logs.AccessLogger, access_log=logging.getLogger("gm.access")
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=config.drain_seconds)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
    if not config.api_keys:
        where = "loopback only" if is_loopback(config.host) else f"{config.host}, as --host asked"
        log.warning("no GM_API_KEYS set: anyone who can reach the port can read and write (listening on %s)", where)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    opener = loop.create_task(state.open_store())
    log.info("listening on %s, database %s; opening", url, config.db)
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({opener, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if opener.done() and opener.exception() is not None:
        error = opener.exception()
        log.error("cannot serve %s: %s", config.db, getattr(error, "message", error))
        code = exit_code(error) if isinstance(error, GMError) else EXIT_ERROR
    elif opener.done():
        backend = state.store.backend
        log.info(
            "ready on %s, database %s (%s, schema v%d), model %s",
            url,
            config.db,
            backend.name,
            backend.schema_version,
            state.store.model.identity,
        )
        await stopped
    if not opener.done():
        opener.cancel()
    state.draining = True
    log.info("draining: readyz is 503, new requests are refused; waiting up to %.0fs", config.drain_seconds)
    if not await state.wait_idle(config.drain_seconds):
        log.warning("%d requests still running after %.0fs; stopping anyway", state.in_flight, config.drain_seconds)
    await runner.cleanup()
    await state.store.close()
    log.info("stopped; every acknowledged write is committed")
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmem",
        description="greatmemory: long-term memory for AI agents.",
        epilog="Example: gmem serve --db memories.db --port 8420",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser(
        "serve",
        help="run the HTTP API server",
        description="Run the HTTP API (/v1) on a SQLite file. Flags win over GM_* variables.",
        epilog="Example: GM_API_KEYS=$(gmem keys new) gmem serve --host 0.0.0.0 --db /data/mem.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--host", help="address to listen on (GM_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="TCP port (GM_PORT; default 8420; 0 picks a free one)")
    s.add_argument("--db", help="SQLite database file (GM_DB; default ./greatmemory.db)")
    s.add_argument("--database-url", help="postgresql://... (GM_DATABASE_URL; reserved, not yet supported)")
    s.add_argument("--model-dir", help="folder with model.onnx and tokenizer.json (GM_MODEL_DIR)")
    s.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (GM_LOG_FORMAT)")
    s.add_argument("--max-body-bytes", type=int, help="request body limit (GM_MAX_BODY_BYTES; default 4 MiB)")
    s.add_argument("--drain-seconds", type=float, help="how long to wait for in-flight requests on stop (30)")
    sub.add_parser(
        "version", help="print the release", description="Print greatmemory's version.", epilog="Example: gmem version"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"greatmemory {gm.__version__}")
        return 0
    try:
        config = ServerConfig.load(vars(args))
    except GMError as exc:
        print(f"gmem: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    logs.setup(config.log_format)
    try:
        return asyncio.run(serve(config))
    except GMError as exc:
        print(f"gmem: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    except OSError as exc:
        print(f"gmem: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
