"""Hand-run benchmark: ``gmem import`` of an export file that carries vectors (not a test: it
prints figures, asserts nothing).

    .venv/bin/python bench/import_speed.py                      # 100,000 memories into SQLite
    .venv/bin/python bench/import_speed.py --memories 20000
    .venv/bin/python bench/import_speed.py --database-url postgresql://postgres@127.0.0.1:5432/postgres

The file is written the way ``gmem export --vectors`` writes it (a header naming the default
model, so its vectors are used, then one memory a line), built quickly: the texts are
bench/embedded.py's realistic 10-40-word ones, 100 users in one namespace, every memory in a
session of ``--turns`` (20) with its own event time, so the import builds session context as
it does for a real export (``--turns 0``: no sessions), and each vector a random unit vector
in base64.

Then, each a ``gmem import --json`` subprocess timed from spawn to exit: the import into a
fresh SQLite file (or, with ``--database-url``, a fresh database on that Postgres, created and
dropped by the run), and the same file again (every line already present: the idempotent
re-run). Prints memories/s for both, and checks the count stored and the report's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

import gm
from cpu import CpuMeter
from figures import load_average
from gm.embedding import ModelSpec
from gm.memory import format_time, new_id
from servers import Databases, check_loopback_postgres
from workload import embedded_texts

DIM = 384
USERS = 100
TURNS = 20  # memories a session holds
TARGET = 10_000  # memories/s


def write_export(path: Path, n: int, turns: int = TURNS, seed: int = 1) -> float:
    """An export file of ``n`` memories with vectors; the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    texts = embedded_texts(n, seed=seed)
    base = int(time.time() * 1000) - n * 60_000
    header = {"format": 1, "release": gm.__version__, "schema_version": None, "model": ModelSpec.default().identity,
              "model_label": "all-MiniLM-L6-v2-int8", "memories": n, "vectors": True}
    with open(path, "wb") as out:
        out.write(orjson.dumps({"greatmemory": header}) + b"\n")
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            vectors = rng.standard_normal((count, DIM), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            for j in range(count):
                i = start + j
                at = format_time(base + i * 60_000)
                session = f"s{i // turns}" if turns else None
                line = {"id": new_id(), "namespace": "bench", "user_id": f"user-{(i // (turns or 1)) % USERS:03d}",
                        "agent_id": None, "session_id": session, "text": texts[i],
                        "metadata": {"source": "bench", "turn": i % (turns or 1)}, "created_at": at, "updated_at": at,
                        "expires_at": None, "occurred_at": at,
                        "vector": base64.b64encode(vectors[j].tobytes()).decode()}
                out.write(orjson.dumps(line) + b"\n")
    return time.perf_counter() - started


def gmem_import(target: list[str], path: Path) -> tuple[float, dict[str, object], str]:
    gmem = Path(sys.executable).with_name("gmem")
    command = [str(gmem) if gmem.exists() else sys.executable, *([] if gmem.exists() else ["-m", "gm"]),
               "import", *target, str(path), "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with CpuMeter() as cpu:
        done = subprocess.run(command, capture_output=True, timeout=3600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"gmem import exited with {done.returncode}: {done.stderr.decode()[-2000:]}")
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    others = max(0.0, cpu.busy - used - cpu.bench) / cpu.capacity if cpu.capacity else 0.0
    line = (f"   cpu: the import process {used:.1f}s in {cpu.wall:.1f}s ({used / cpu.wall:.2f} cores); "
            f"other processes {others:.0%} of the machine")
    return cpu.wall, json.loads(done.stdout), line


async def run(cfg: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="gm-import-") as directory:
        tmp = Path(directory)
        export = tmp / "export.jsonl"
        built = write_export(export, cfg.memories, cfg.turns)
        sessions = f"sessions of {cfg.turns} turns" if cfg.turns else "no sessions"
        size = export.stat().st_size / 1e6
        print(f"   export file: {cfg.memories:,} memories with vectors, {sessions}, {size:.0f} MB, "
              f"written in {built:.1f}s")
        databases = Databases(check_loopback_postgres(cfg.database_url, "--database-url")) if cfg.database_url else None
        try:
            if databases is not None:
                url = await databases.create("import")
                target, shown = ["--database-url", url], "a fresh Postgres database"
            else:
                target, shown = ["--db", str(tmp / "imported.db")], "a fresh SQLite file"
            for run_name in ("import", "again"):
                seconds, report, cpu = gmem_import(target, export)
                skipped = report["skipped"]
                assert isinstance(skipped, list)
                rate = cfg.memories / seconds
                what = "into " + shown if run_name == "import" else "the same file again (all present)"
                print(f"   gmem import {what}: {seconds:.1f}s = {rate:,.0f} memories/s; "
                      f"imported {report['imported']:,}, embedded {report['embedded']:,}, skipped {len(skipped):,}")
                print(cpu)
                if run_name == "import":
                    verdict = "met" if rate >= TARGET else "NOT met"
                    print(f"   target >= {TARGET:,} memories/s: {verdict}")
            async with gm.open(target[1] if databases is None else url) as store:
                stats = await store.stats()
                print(f"   stored: {stats.memories:,} memories")
        finally:
            if databases is not None:
                await databases.drop_all()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=100_000, help="memories in the file (default 100,000)")
    parser.add_argument("--turns", type=int, default=TURNS,
                        help=f"memories a session holds (default {TURNS}; 0: none in a session)")
    parser.add_argument("--database-url", help="import into a fresh database on this Postgres (loopback) instead")
    cfg = parser.parse_args()
    print(f"greatmemory {gm.__version__}: gmem import with vectors; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load average {load_average()} at start")
    return asyncio.run(run(cfg))


if __name__ == "__main__":
    sys.exit(main())
