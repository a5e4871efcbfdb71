"""Idle connections against a `gmem serve` of its own, on 127.0.0.1 only: does it still answer?

    .venv/bin/python bench/idle_connections.py
    .venv/bin/python bench/idle_connections.py --sockets 1100 --nofile 1024 --wait 12

Starts `gmem serve` on a temporary SQLite file with its open-file limit set to
``--nofile`` (what most Linux boxes give a process), opens ``--sockets`` connections that
never send a byte, then times ten healthz requests and one add on fresh connections, and
counts the server's open files and how many idle sockets it has closed after ``--wait``
seconds (GM_HEADER_TIMEOUT_SECONDS, default 10, closes them). Extra GM_* settings pass
through the environment. Figures from issue 14, 1,100 sockets under a 1,024 limit:
before, every healthz and the add timed out (the server held 1,024 files); after, healthz
in 1-6 ms, the add 201, 528 files open, every idle socket closed within 11 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from servers import Server


async def main(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp())
    server = Server(folder / "idle.db", folder / "serve.log", keep_settings=True, open_files=args.nofile)
    sockets: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    try:
        try:
            await server.start(timeout=30)
        except RuntimeError as exc:
            raise SystemExit(f"the server did not start: {exc}") from None
        url = server.url
        port = urlsplit(url).port
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for _ in range(args.sockets):
                try:
                    sockets.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2))
                except (OSError, TimeoutError):
                    break
            await asyncio.sleep(0.5)
            files = len(os.listdir(f"/proc/{server.pid}/fd"))
            print(f"{len(sockets)} idle sockets open; the server holds {files} files (limit {args.nofile})")
            for label, method, path, body in [("healthz", "GET", "/v1/healthz", None)] * 10 + [
                ("add", "POST", "/v1/memories", {"text": "Written during the flood."})
            ]:
                started = time.perf_counter()
                try:
                    async with session.request(
                        method, url + path, json=body, headers={"Connection": "close"}
                    ) as response:
                        outcome = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = type(exc).__name__
                print(f"  {label:8} {outcome:14} {(time.perf_counter() - started) * 1000:8.1f} ms")
        await asyncio.sleep(args.wait)
        still = sum(1 for reader, _ in sockets if not reader.at_eof())
        print(f"after {args.wait:g} s more: {len(sockets) - still} idle sockets closed by the server, {still} open")
    finally:
        for _, writer in sockets:
            writer.close()
        server.kill_if_running()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=1100, help="idle connections to open (1100)")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit (1024)")
    parser.add_argument("--wait", type=float, default=11.0, help="seconds to wait before counting closed sockets")
    parser.add_argument("--timeout", type=float, default=6.0, help="per-request timeout in seconds (6)")
    asyncio.run(main(parser.parse_args()))
