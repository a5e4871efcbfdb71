"""Side by side with a peer: greatmemory and Chroma embedded, loaded with the same realistic
vectors and measured in one run, in interleaved rounds (a benchmark: it asserts nothing).

    .venv/bin/pip install -e '.[bench]'                       # chromadb==1.5.9, bench only
    .venv/bin/python bench/peers.py --size 100000             # about 7 minutes on 2 cores
    .venv/bin/python bench/peers.py --size 100000 --size 1000000 --json peers.json
    .venv/bin/python bench/peers.py --size 20000 --rounds 2   # a quick look

Per size: the memories (peers_data: perturbations of the LoCoMo texts' real embeddings, 100
users in one namespace) are written once as a JSON Lines file with vectors, then loaded into
greatmemory by ``gmem import`` and into Chroma (PersistentClient, default HNSW, no embedding
function) by ``collection.add`` in batches, each in a subprocess of its own. Then spawn to the
first answered vector query (a fresh subprocess each, alternated); then one subprocess per
system opens its store and answers the queries, in rounds that alternate which system goes
first: vector top-10 at index time (the index call alone) and, greatmemory only, end to end
through ``Store.search`` (query embedded) in vector, hybrid and keyword mode, each over the
whole namespace and over one user (1% of the data). Recall@10 is against numpy's exact top-10
over the same vectors and scope. Resident memory is that of the process that queried.
Every file lives under --work-dir (a temporary folder by default) and is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson

import gm
import peers_report
from cpu import CpuMeter
from figures import load_average, progress
from peers_data import Exact, Queries, chunks, embedded, model_spec, row_of, write_dataset
from recall import describe_commit, git_state

BENCH = Path(__file__).resolve().parent
WORKER = BENCH / "peers_worker.py"
SYSTEMS = ("greatmemory", "chroma")
# Disk a row needs while a size runs (the JSON Lines file, both stores), with room to spare:
# measured at 100k: file 2.3 KB, greatmemory 2.5 KB, Chroma 3.0 KB a row.
BYTES_PER_ROW = 12_000


class Worker:
    """``peers_worker.py serve``: one system's store open in a subprocess, answering commands."""

    def __init__(self, system: str, store: Path, queries: Path, log: IO[bytes]) -> None:
        self.system = system
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "serve", system, str(store), str(queries)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self.ready = self.receive()
        self.figures: list[str] = self.ready["figures"]

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.system} worker exited ({self.proc.wait()}); see its log")
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        self.proc.stdin.flush()
        return self.receive()

    def quit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "quit"}\n')
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def peak_bytes(pid: int) -> int | None:
    """VmHWM of ``pid`` (None once it exited): the peak of its own program, since exec.
    (Not the child's ru_maxrss: Linux carries the forking parent's peak over exec into it.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def finished(proc: subprocess.Popen[bytes]) -> tuple[bytes, int]:
    """The standard output of ``proc`` once it exited, and its peak resident bytes, read every
    0.1 s while it ran (the peak is monotonic: the last reading counts)."""
    assert proc.stdout is not None
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            peak[0] = peak_bytes(proc.pid) or peak[0]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = proc.stdout.read()
    proc.wait()
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} exited {proc.returncode}; see its log")
    return out, peak[0]


def load(system: str, dataset: Path, store: Path, log: IO[bytes]) -> dict[str, Any]:
    """Load ``dataset`` into a new store: the subprocess's wall time, rate and peak memory."""
    if system == "greatmemory":
        store.mkdir()
        command = [str(Path(sys.executable).parent / "gmem"), "import", "--json", "--db", str(store / "memories.db"),
                   str(dataset)]
    else:
        command = [sys.executable, str(WORKER), "load", system, str(store), str(dataset)]
    started = time.perf_counter()
    out, peak = finished(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log))
    wall = time.perf_counter() - started
    report = orjson.loads(out)  # gmem import --json: one (indented) document; the worker: one line
    count = report["imported"] if system == "greatmemory" else report["added"]
    if system == "greatmemory" and (report["embedded"] or report["skipped"]):
        raise RuntimeError(f"gmem import embedded {report['embedded']} and skipped {len(report['skipped'])} "
                           "lines: the file's vectors were not taken as they are")
    return {"load_s": wall, "loaded": count, "rate": count / wall, "load_peak": peak, "report": report}


def spawn(system: str, store: Path, queries: Path, log: IO[bytes]) -> dict[str, float]:
    """Seconds from spawning a fresh process to its first answered vector query; for
    greatmemory also the seconds of the first search that embeds its query (model load included)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(WORKER), "spawn", system, str(store), str(queries)],
                            stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    first = orjson.loads(proc.stdout.readline() or b"{}")
    answered = time.perf_counter() - started
    if first.get("answered") != 10:
        raise RuntimeError(f"the {system} spawn answered {first!r}; see its log")
    out, _ = finished(proc)
    result = {"spawn_s": answered}
    if out.strip():
        result["embedded_search_s"] = orjson.loads(out.splitlines()[0])["embedded_search_s"]
    return result


def settle(store: Path, log: IO[bytes]) -> dict[str, float]:
    """Open the greatmemory store until its index's graph is complete, then close it (saving
    the index): what spawns then open is what a server that ran a while leaves behind."""
    proc = subprocess.Popen([sys.executable, str(WORKER), "settle", "greatmemory", str(store), "-"],
                            stdout=subprocess.PIPE, stderr=log)
    out, _ = finished(proc)
    reply: dict[str, float] = orjson.loads(out)
    return reply


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def warm_up(workers: dict[str, Worker], queries: Queries) -> dict[str, dict[str, int]]:
    """Every figure of every system over the warm-up queries (the model loads, the index is
    ready); returns each worker's memory then."""
    warm = list(range(queries.warmup))
    for worker in workers.values():
        for figure in worker.figures:
            for user in (False, True):
                worker.ask({"op": "run", "figure": figure, "user": user, "queries": warm})
    return {system: worker.ask({"op": "memory"}) for system, worker in workers.items()}


def measure_queries(workers: dict[str, Worker], queries: Queries, rounds: int) -> dict[str, dict[str, Any]]:
    """``rounds`` rounds over the measured queries (a slice each), alternating which system
    goes first; every figure of a system runs its slice over the whole namespace and over one
    user. Returns each system's samples by ``figure.scope``."""
    measured = list(range(queries.warmup, len(queries.texts)))
    samples: dict[str, dict[str, Any]] = {s: {} for s in workers}
    for r in range(rounds):
        picked = measured[r::rounds]
        order = list(workers.values()) if r % 2 == 0 else list(workers.values())[::-1]
        for worker in order:
            for figure in worker.figures:
                for user in (False, True):
                    got = worker.ask({"op": "run", "figure": figure, "user": user, "queries": picked})
                    entry = samples[worker.system].setdefault(f"{figure}.{'user' if user else 'whole'}",
                                                              {"ms": [], "ids": [], "queries": [], "rounds": []})
                    entry["ms"] += got["ms"]
                    entry["ids"] += got["ids"]
                    entry["queries"] += picked
                    entry["rounds"].append(got["ms"])
        progress(f"   round {r + 1}/{rounds} done")
    return samples


def recall(entry: dict[str, Any], exact: Exact, user: bool) -> float:
    hits = [len({row_of(i) for i in ids} & (exact.one_user(q) if user else exact.whole(q))) / exact.k
            for q, ids in zip(entry["queries"], entry["ids"], strict=True)]
    return sum(hits) / len(hits)


def run_size(size: int, args: argparse.Namespace, queries: Queries, queries_path: Path, bases: Any,
             work: Path) -> dict[str, Any]:
    systems = [s for s in SYSTEMS if s != "chroma" or args.chroma_max is None or size <= args.chroma_max]
    free = shutil.disk_usage(work).free
    if free < size * BYTES_PER_ROW and not args.reuse:
        raise SystemExit(f"peers.py: {size:,} memories need about {size * BYTES_PER_ROW / 1e9:.1f} GB under {work}, "
                         f"{free / 1e9:.1f} GB are free; pass --work-dir on a larger disk")
    folder = (args.reuse or work) / f"n{size}"
    if args.reuse:
        systems = [s for s in systems if (folder / s).is_dir()]
        if "greatmemory" not in systems:
            raise SystemExit(f"peers.py: {folder} holds no greatmemory store to measure")
    else:
        folder.mkdir()
    log = (folder / "workers.log").open("ab")
    result: dict[str, Any] = {s: {} for s in systems}
    workers: dict[str, Worker] = {}
    try:
        exact = Exact(queries, args.users)
        stores = {s: folder / s for s in systems}
        started = time.perf_counter()
        if args.reuse:  # the stores of an earlier --keep run: the same memories (same --seed), not loaded again
            for start, vectors, _ in chunks(bases, size, args.seed):
                exact.add(start, vectors)
            progress(f"{size:,}: the stores of {folder} reused; their exact top-10 in "
                     f"{time.perf_counter() - started:.0f}s")
        else:
            dataset = folder / "memories.jsonl"
            model = model_spec().identity
            result["dataset_bytes"] = write_dataset(bases, size, args.users, args.seed, dataset, exact, model)
            progress(f"{size:,}: wrote the memories and their exact top-10 in {time.perf_counter() - started:.0f}s")
            for system in systems:
                result[system] |= load(system, dataset, stores[system], log)
                result[system]["disk_after_load"] = disk_bytes(stores[system])
                progress(f"   {system}: loaded in {result[system]['load_s']:.1f}s")
            dataset.unlink()
        result["greatmemory"] |= settle(stores["greatmemory"], log)
        progress(f"   greatmemory: its graph complete {result['greatmemory']['graph_s']:.0f}s after opening, saved")
        for trial in range(args.spawns):
            for system in systems if trial % 2 == 0 else systems[::-1]:
                result[system].setdefault("spawns", []).append(spawn(system, stores[system], queries_path, log))
        progress(f"   spawn trials done: {args.spawns} per system")
        for system in systems:
            workers[system] = Worker(system, stores[system], queries_path, log)
        for system, warm in warm_up(workers, queries).items():
            result[system] |= {"open_s": workers[system].ready["open_s"], "warm": warm}
        with CpuMeter([w.proc.pid for w in workers.values()]) as cpu:
            samples = measure_queries(workers, queries, args.rounds)
        progress(cpu.line())
        result["cpu"] = cpu.to_dict()
        for system, worker in workers.items():
            result[system] |= worker.ask({"op": "memory"})
            worker.quit()
            result[system]["disk"] = disk_bytes(stores[system])
            for key, entry in samples[system].items():
                result[system][key] = {"ms": entry["ms"], "rounds": entry["rounds"]}
                if key.startswith(("index.", "vector.")):
                    result[system][key]["recall"] = recall(entry, exact, key.endswith(".user"))
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:  # a run that failed midway
                worker.proc.kill()
                worker.proc.wait()
        log.close()
        if not args.keep and not args.reuse:
            shutil.rmtree(folder, ignore_errors=True)
    return result


def meta(args: argparse.Namespace) -> dict[str, Any]:
    try:
        import chromadb
    except ImportError:
        raise SystemExit("peers.py: chromadb is not installed; run `.venv/bin/pip install -e '.[bench]'`") from None

    spec = model_spec()
    return {
        "gm": {"version": gm.__version__, "commit": describe_commit(git_state(Path(gm.__file__).parent))},
        "bench_commit": describe_commit(git_state(Path(__file__))), "chromadb": chromadb.__version__,
        "model": spec.shown, "embed_threads": os.environ.get("GM_EMBED_THREADS", "default"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_average": load_average(),
        "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()},
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example:\n  .venv/bin/python bench/peers.py --size 100000 --json p.json")
    parser.add_argument("--size", type=int, action="append", help="memories (repeatable; default 100000)")
    parser.add_argument("--users", type=int, default=100, help="users in the one namespace (default 100: 1%% each)")
    parser.add_argument("--queries", type=int, default=200, help="measured queries per figure (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="unmeasured queries per figure first (default 10)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the queries are split over (4)")
    parser.add_argument("--spawns", type=int, default=3, help="spawn trials per system, the median counts (3)")
    parser.add_argument("--chroma-max", type=int, help="load Chroma only up to this size (default: every size)")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/locomo/dev"),
                        help="a folder with memories.jsonl and queries.jsonl (LoCoMo's)")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "greatmemory-bench",
                        help="where the embedded base texts and queries are kept between runs")
    parser.add_argument("--work-dir", type=Path, help="where the files of a run go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the stores (and the log) of each size")
    parser.add_argument("--reuse", type=Path, help="measure the stores an earlier --keep run left in this folder "
                        "(the gm-peers-* one; same --seed and --users), without loading them again")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", type=Path, help="also write every figure and sample to this file")
    args = parser.parse_args()
    args.size = args.size or [100_000]
    if min(args.size) < 10 * args.users or args.users < 1 or args.rounds < 1 or args.queries < args.rounds:
        parser.error("need --size ≥ 10 × --users, --rounds ≥ 1 and --queries ≥ --rounds")
    return args


def main() -> None:
    args = parse_args()
    info = meta(args)
    started = time.perf_counter()
    bases, queries = embedded(args.data, model_spec(), args.cache_dir, args.queries, args.warmup, args.users, args.seed)
    progress(f"embedded {len(bases.texts):,} base texts and {len(queries.texts)} queries "
             f"(or read them from {args.cache_dir}) in {time.perf_counter() - started:.0f}s")
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gm-peers-", dir=args.work_dir))
    try:
        queries_path = work / "queries.npz"
        queries.save(queries_path)
        results = {str(size): run_size(size, args, queries, queries_path, bases, work) for size in args.size}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(peers_report.header(info, len(queries.texts) - queries.warmup, args))
    for size, result in results.items():
        print(peers_report.size_table(int(size), result))
    if args.json:
        args.json.write_bytes(orjson.dumps({"meta": info, "sizes": peers_report.for_json(results)},
                                           option=orjson.OPT_INDENT_2))
        progress(f"wrote {args.json}")


if __name__ == "__main__":
    main()
