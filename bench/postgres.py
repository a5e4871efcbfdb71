"""Hand-run benchmark of the Postgres backend (not a test: it prints figures, asserts nothing).

    .venv/bin/python bench/postgres.py                          # all three parts (about 12 minutes on 2 cores)
    .venv/bin/python bench/postgres.py throughput --quick       # one part, small and fast
    .venv/bin/python bench/postgres.py visibility recall --json # two parts, one JSON object on stdout
    .venv/bin/python bench/postgres.py recall --rows 100000 --ef 40,100,200

Parts, each in its own file beside this one (this file holds their flags and sizes):

throughput  bench/postgres_throughput.py: adds/s and searches/s through 1, 2 and 3 ``gmem serve
            --database-url`` instances sharing one fresh database on the Postgres at
            127.0.0.1:5432 (``--admin-url``), against one ``gmem serve --db`` on SQLite, with
            the CPU each phase cost the gm servers, the Postgres backends and everything else.

visibility  bench/postgres_visibility.py: 3 instances on one fresh database; ``--writes`` (100)
            adds and deletes through A, and the delay until the searches of B and C (and the
            vector index of a 4th, in-process instance) show each of them; idle, then under
            ``--background-clients`` (8) adding clients.

recall      bench/pgvector_recall.py: pgvector's HNSW recall@10 against exact search at
            ``--rows`` (100,000) synthetic vectors shaped like real embeddings, on a Postgres 16
            + pgvector started by the ``pgserver`` package, in three scopes and at each ``--ef``;
            how often the backend fell back to an exact scan, and the plans Postgres chose.

Every database this creates is dropped at the end (``gm_bench_<pid>_...``), the pgserver
directory is removed, and all load goes to 127.0.0.1. Progress goes to stderr; the tables
(or, with ``--json``, one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gm
from cpu import Quiet
from figures import load_average, progress
from locomo import DEFAULT_DATA
from pgvector_recall import bench_recall, report_recall
from postgres_throughput import bench_throughput, report_throughput
from postgres_visibility import bench_visibility, report_visibility
from servers import ADMIN_URL, Databases, check_loopback_postgres

PARTS = ("throughput", "visibility", "recall")


@dataclass(frozen=True)
class Config:
    duration: float  # seconds per measured throughput phase
    clients: int  # add clients, spread over the instances
    search_clients: int
    prefill: int  # memories searched in the throughput rows
    writes: int  # visibility probes
    background_clients: int  # visibility: adding clients during the second round of probes (0: none)
    rows: int  # recall: stored vectors
    base: int  # recall: real texts embedded
    queries: int  # recall: query vectors
    spread: float = 0.7  # recall: noise scale of the synthetic vectors
    ef: tuple[int, ...] = (40, 100, 200)
    maintenance_work_mem: str = "512MB"
    quiet_wait: float = 30.0  # seconds to wait for a quiet machine before each measured phase


FULL = Config(duration=20, clients=32, search_clients=8, prefill=2000, writes=100, background_clients=8,
              rows=100_000, base=5000, queries=200)
QUICK = Config(duration=4, clients=32, search_clients=8, prefill=200, writes=10, background_clients=8,
               rows=10_000, base=600, queries=40)


async def run(parts: list[str], cfg: Config, admin_url: str, data: Path, quiet: Quiet) -> dict[str, Any]:
    out: dict[str, Any] = {
        "greatmemory": gm.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average_at_start": load_average(), "config": asdict(cfg),
    }
    dbs = Databases(admin_url)
    with tempfile.TemporaryDirectory(prefix="gm-pg-bench-") as directory:
        tmp = Path(directory)
        try:
            if "throughput" in parts:
                out["throughput"] = await bench_throughput(cfg, dbs, tmp, quiet)
            if "visibility" in parts:
                out["visibility"] = await bench_visibility(cfg, dbs, tmp, quiet)
        finally:
            await dbs.drop_all()
        if "recall" in parts:
            out["recall"] = await bench_recall(cfg, data, tmp, quiet)
    out["load_average_at_end"] = load_average()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: bench/postgres.py throughput visibility --quick")
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"which parts to run: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a check that everything runs")
    parser.add_argument("--admin-url", default=ADMIN_URL,
                        help=f"a loopback Postgres where benchmark databases may be created (default {ADMIN_URL})")
    parser.add_argument("--duration", type=float, help="seconds per throughput phase (20)")
    parser.add_argument("--clients", type=int, help="add clients, spread over the instances (32)")
    parser.add_argument("--search-clients", type=int, help="search clients, spread over the instances (8)")
    parser.add_argument("--prefill", type=int, help="memories searched in the throughput rows (2000)")
    parser.add_argument("--writes", type=int, help="visibility probes (100)")
    parser.add_argument("--background-clients", type=int,
                        help="visibility: clients adding through all instances during the second round (8; 0: skip)")
    parser.add_argument("--rows", type=int, help="recall: stored vectors (100000)")
    parser.add_argument("--base", type=int, help="recall: real texts embedded (5000)")
    parser.add_argument("--queries", type=int, help="recall: query vectors (200)")
    parser.add_argument("--spread", type=float, help="recall: noise scale of the synthetic vectors (0.7)")
    parser.add_argument("--ef", help="recall: ef_search values, comma-separated (40,100,200)")
    parser.add_argument("--maintenance-work-mem", help="recall: for the index build ('512MB'; '' = server default)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"LoCoMo folder (default {DEFAULT_DATA})")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each measured phase, wait up to this long for other processes to use under "
                             "15%% of the machine (default 30, at most 600 in all; 0 = never wait)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    cfg = QUICK if args.quick else FULL
    names = ("duration", "clients", "search_clients", "prefill", "writes", "background_clients", "rows", "base",
             "queries", "spread", "maintenance_work_mem")
    changes = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.ef:
        changes["ef"] = tuple(int(x) for x in args.ef.split(","))
    cfg = replace(cfg, quiet_wait=args.wait_quiet, **changes)
    quiet = Quiet(600.0 if args.wait_quiet > 0 else 0.0, say=progress)
    parts = [p for p in PARTS if p in args.parts] or list(PARTS)
    admin_url = check_loopback_postgres(args.admin_url)
    progress(f"greatmemory {gm.__version__}: Postgres benchmark ({', '.join(parts)}; "
             f"{'quick' if args.quick else 'full'}); {os.cpu_count()} CPUs, load average {load_average()}")
    result = asyncio.run(run(parts, cfg, admin_url, args.data, quiet))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"greatmemory {result['greatmemory']}, Python {result['python']}, {result['cpus']} CPUs; load average "
          f"{result['load_average_at_start']} at start, {result['load_average_at_end']} at the end")
    if "throughput" in result:
        print(report_throughput(result["throughput"]))
    if "visibility" in result:
        print(report_visibility(result["visibility"]))
    if "recall" in result:
        print(report_recall(result["recall"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
