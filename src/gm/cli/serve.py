"""``gmem serve``: listen at once, open the store behind readiness, drain on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
from typing import TYPE_CHECKING, Any

from gm import logs, loops
from gm.cli.exits import EXIT_ERROR, exit_code
from gm.config import ServerConfig, is_loopback
from gm.errors import GMError

if TYPE_CHECKING:
    from gm.http import ServerState
    from gm.http.connections import ConnectionRunner

log = logging.getLogger("gm.serve")


async def serve(config: ServerConfig) -> int:
    """Listen at once (healthz answers), open the store (readyz turns 200), and on
    SIGTERM/SIGINT drain: readyz 503, new requests 503, in-flight ones finish, writes commit."""
    from gm.http import ServerState
    from gm.opening import open as open_store

    target = config.target
    state = ServerState(lambda: open_store(target, model_dir=config.model_dir).build(), config.api_keys)
    runner, url = await _listen(state, config)
    _warn_about_exposure(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    opener = loop.create_task(state.open_store())
    log.info("listening on %s, database %s; opening", url, config.shown_target)
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({opener, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if opener.done() and opener.exception() is not None:
        error = opener.exception()
        log.error("cannot serve %s: %s", config.shown_target, getattr(error, "message", error))
        code = exit_code(error) if isinstance(error, GMError) else EXIT_ERROR
    elif opener.done():
        ready = state.store.readiness()
        log.info("ready on %s, database %s (%s, schema v%d), model %s", url, config.shown_target,
                 ready.backend, ready.schema_version, state.store.model.shown)
        await stopped
    state.draining = True
    await loops.stop(opener, stopped)  # an open still under way ends before the store is closed
    runner.close_idle()  # an idle keep-alive connection must not hold the stop back
    if code != 0:  # it never served: nothing to drain, nothing to report but the error above
        await runner.cleanup()
        await state.store.close()
        return code
    log.info("draining: readyz is 503, new requests are refused; waiting up to %.0fs", config.drain_seconds)
    if not await state.wait_idle(config.drain_seconds):
        log.warning("%d requests still running after %.0fs; stopping anyway", state.in_flight, config.drain_seconds)
    await runner.cleanup()
    await state.store.close()
    log.info("stopped; every acknowledged write is committed")
    return code


async def _listen(state: ServerState, config: ServerConfig) -> tuple[ConnectionRunner, str]:
    """The application on its port, listening; returns its runner and the URL it answers at."""
    from aiohttp import web

    from gm.http import make_app
    from gm.http.connections import ConnectionRunner
    from gm.http.cors import CorsPolicy
    from gm.http.guard import HostPolicy

    app = make_app(
        state,
        max_body_bytes=config.max_body_bytes,
        hosts=HostPolicy.serving(config),
        body_timeout=config.limits.body_timeout,
        cors=CorsPolicy(config.cors_origins),
        metrics=config.metrics,
    )
    runner = ConnectionRunner(
        app,
        config.limits,
        handle_signals=False,
        access_log_class=logs.AccessLogger,
        access_log=logging.getLogger("gm.access"),
    )
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
    return runner, url


def _warn_about_exposure(config: ServerConfig) -> None:
    """Say so when anyone who reaches the port may use it, and when the open-file limit is
    too low for the connections allowed."""
    if config.ignored_host:
        log.warning("GM_HOST=%s ignored: no GM_API_KEYS set; pass --host to listen there without keys",
                    config.ignored_host)
    if not config.api_keys:
        where = "loopback only" if is_loopback(config.host) else f"{config.host}, as --host asked"
        log.warning("no GM_API_KEYS set: anyone who can reach the port can read and write (listening on %s)", where)
        if config.allowed_hosts is None and not is_loopback(config.host):
            log.info("requests must name this server by IP address or localhost; GM_ALLOWED_HOSTS adds names")
    files, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if files != resource.RLIM_INFINITY and config.limits.max_connections + 64 > files:
        log.warning("GM_MAX_CONNECTIONS=%d leaves too few of the %d open files (ulimit -n) for the database; "
                    "raise the limit or lower GM_MAX_CONNECTIONS", config.limits.max_connections, files)


async def run(args: argparse.Namespace) -> int:
    """``gmem serve``: configuration from flags over GM_* variables, then :func:`serve`."""
    config = ServerConfig.load(vars(args))
    logs.setup(config.log_format)
    try:
        return await serve(config)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return EXIT_ERROR


def add_serve_command(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="run the HTTP API server",
        description="Run the HTTP API (/v1) on a SQLite file, or on a Postgres database shared by several "
        "instances. Flags win over GM_* variables.",
        epilog="Example:\n  KEY=$(gmem keys new); echo \"$KEY\" > client.key\n"
        "  GM_API_KEYS=$KEY gmem serve --host 0.0.0.0 --db /data/mem.db",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.set_defaults(run=run)
    s.add_argument("--host", help="address to listen on (GM_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="TCP port (GM_PORT; default 8420; 0 picks a free one)")
    s.add_argument("--db", help="SQLite database file (GM_DB; default ./greatmemory.db)")
    s.add_argument(
        "--database-url", help="postgresql://user:password@host/db: serve a Postgres database, which several "
        "instances may share (GM_DATABASE_URL; wins over --db)"
    )
    s.add_argument("--model-dir", help="folder with model.onnx and tokenizer.json (GM_MODEL_DIR)")
    s.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (GM_LOG_FORMAT)")
    s.add_argument("--max-body-bytes", type=int, help="request body limit (GM_MAX_BODY_BYTES; default 4 MiB)")
    s.add_argument("--drain-seconds", type=float, help="how long to wait for in-flight requests on stop (30)")
    s.add_argument(
        "--allowed-hosts", help="comma-separated host names clients may use in the Host header, * for any "
        "(GM_ALLOWED_HOSTS; default: IP addresses and localhost without keys, any host with keys)"
    )
    s.add_argument("--max-connections", type=int, help="most connections open at once (GM_MAX_CONNECTIONS; 512)")
