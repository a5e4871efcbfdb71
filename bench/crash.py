"""Hand-run crash harness: kill -9 (or SIGTERM) a real ``gmem serve`` under write load, restart
it, and check that every acknowledged write survived and the database is intact.

    .venv/bin/python bench/crash.py --trials 5 --seconds 4                  # SQLite, kill -9
    .venv/bin/python bench/crash.py --backend postgres --trials 3 --seconds 4
    .venv/bin/python bench/crash.py --mode term --trials 5 --drain-seconds 10

One server runs over the whole run, on a temporary SQLite file or (``--backend postgres``) a
fresh database it creates on the Postgres at ``--database-url`` (loopback only) and drops at
the end. Each trial: ``--clients`` clients (127.0.0.1 only) send a closed loop of writes -
single adds, batch adds of ``--batch-size``, PATCHes of text and/or metadata, DELETEs of
earlier memories - for a random moment between 30% and 100% of ``--seconds``; then the
server is killed (``--mode kill``: SIGKILL) or stopped (``--mode term``: SIGTERM, waited on
for up to ``--drain-seconds`` + 30 s), started again on the same database (spawn to readyz
200 is the restart time), and checked:

- every memory whose add or last update was acknowledged (a 2xx came back) is listed with
  exactly that text, metadata and user; every acknowledged delete stays deleted (in every
  later trial too); a request cut off by the stop may have applied or not, but a batch only
  wholly; nothing refused (4xx/5xx) applied; no memory appears that nobody sent;
- integrity: SQLite ``PRAGMA integrity_check`` and the FTS5 index's own integrity-check
  (on an online backup copy, so the served file is only read); on Postgres ``amcheck`` on
  the btree indexes where the extension exists; on both, every row equal to its last
  history entry, every live history entry with a row, every embedding 384 floats, on
  Postgres every row in the change feed; /v1/stats counting what the listing lists; and
  ``--probes`` live memories found by a keyword search for their unique token and a vector
  search for their text (the keyword and vector indexes agree with the rows), deleted
  ones found by neither.

Adds carry client ids (``k000123``, also a word of the text), so a cut-off add can be looked
for. ``--mode term`` also reports the exit status, SIGTERM to exit, the requests in flight
at SIGTERM and how they ended (completed, refused 503 draining, disconnected), how the
requests sent after it ended, and how long the process lived after the last in-flight
request was answered; after SIGTERM half the clients keep sending, the other half hold
their kept-alive connection idle (a load balancer's pool). Exit status 0 when every check
of every trial passed, 1 if not (the temporary directory is then kept and named), 2 on bad
usage. Its parts live beside it: bench/crash_load.py (the write load) and bench/crash_checks.py
(the ledger of what the clients were told, and the integrity checks).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from crash_checks import (
    CUT,
    NAMESPACE,
    Ledger,
    Verdict,
    list_all,
    postgres_integrity,
    probe,
    search_ids,
    sqlite_integrity,
    stats_problems,
)
from crash_load import REQUEST_TIMEOUT, Load, Request
from figures import load_average, percentile, progress
from servers import ADMIN_URL, Databases, PgServer, Server, check_loopback_postgres
from workload import Workload

# -- trials ---------------------------------------------------------------------------------------


@dataclass
class Config:
    mode: str = "kill"
    backend: str = "sqlite"
    database_url: str = ADMIN_URL
    trials: int = 5
    seconds: float = 4.0
    clients: int = 4
    batch_size: int = 8
    probes: int = 10
    drain_seconds: float = 10.0
    seed: int = 0
    max_minutes: float = 30.0


@dataclass
class Trial:
    number: int
    stopped_at: float  # seconds of load before the kill or SIGTERM
    requests: int
    acked: Counter[str]
    cut: int  # requests the stop cut off (no answer)
    errors: Counter[str]  # error answers before the stop, by outcome
    verdict: Verdict
    integrity: list[str]
    probes: tuple[int, int]
    restart: float
    checked: str  # which database checks ran, besides the consistency queries
    term: dict[str, Any] = field(default_factory=dict)


async def stop_by_signal(server: Server, load: Load, cfg: Config) -> dict[str, Any]:
    """SIGTERM now; wait for the exit (SIGKILL after drain + 30 s) and describe the drain."""
    assert server.proc is not None
    sent = time.perf_counter()
    in_flight = [r for r in load.requests if r.ended is None]
    load.signalled = True
    server.proc.terminate()
    try:
        code: int | str = await asyncio.to_thread(server.proc.wait, cfg.drain_seconds + 30)
    except subprocess.TimeoutExpired:
        server.kill()
        code = "hung"
    exited = time.perf_counter()
    load.stop.set()
    await asyncio.sleep(0)  # let the clients see it
    warnings = [line[:160] for line in server.log_path.read_text(errors="replace").splitlines()
                if "still running" in line]
    return {"sent": sent, "exited": exited, "code": code, "in_flight": in_flight, "warnings": warnings}


def describe_term(stop: dict[str, Any], requests: list[Request]) -> dict[str, Any]:
    sent, exited = stop["sent"], stop["exited"]
    in_flight: list[Request] = stop["in_flight"]
    done = [r.ended for r in in_flight if r.ended is not None]
    last_done = max(done) if done else sent
    after = [r for r in requests if r.started >= sent]
    return {
        "code": stop["code"], "exit_s": exited - sent, "in_flight": len(in_flight),
        "in_flight_ended": Counter(r.outcome or "unanswered" for r in in_flight),
        "after": Counter(r.outcome for r in after), "last_done_s": last_done - sent,
        "lived_after_last_s": exited - last_done, "warnings": stop["warnings"],
    }


async def one_trial(number: int, cfg: Config, server: Server, ledger: Ledger, work: Workload,
                    rng: random.Random, tmp: Path) -> Trial:
    load = Load(server.url, ledger, work, cfg.batch_size, f"{cfg.seed}:{number}")
    clients = asyncio.create_task(load.run(cfg.clients))
    began = time.perf_counter()
    await asyncio.sleep(rng.uniform(0.3, 1.0) * cfg.seconds)
    stopped_at = time.perf_counter() - began
    if cfg.mode == "kill":
        stop_time = time.perf_counter()
        server.kill()
        load.stop.set()
        await asyncio.wait_for(clients, REQUEST_TIMEOUT + 5)
        term: dict[str, Any] = {}
    else:
        stop = await stop_by_signal(server, load, cfg)
        stop_time = stop["sent"]
        await asyncio.wait_for(clients, REQUEST_TIMEOUT + 5)
        term = describe_term(stop, load.requests)
    before = [r for r in load.requests if r.started < stop_time]
    errors = Counter(r.outcome for r in before if r.ended is not None and r.ended < stop_time and r.outcome != "ok")
    server.log_path = tmp / f"server-{number + 1}.log"
    restart = await server.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as session:
        listed = await list_all(session, server.url)
        verdict = ledger.verify(listed)  # the ledger now holds what is stored: the probes search for that
        integrity = await stats_problems(session, server.url, len(listed))
        passed, probes, failures = await probe(session, server.url, ledger, cfg.probes, rng)
    integrity += failures
    if isinstance(server, PgServer):
        problems, checked = await postgres_integrity(server.database_url)
    else:
        problems, checked = sqlite_integrity(server.db, tmp / "check.db"), "integrity_check, FTS5 integrity-check"
    integrity += problems
    return Trial(number, stopped_at, len(load.requests), load.acked, cut=sum(r.outcome in CUT for r in before),
                 errors=errors, verdict=verdict, integrity=integrity, probes=(passed, probes), restart=restart,
                 checked=checked, term=term)


# -- reporting --------------------------------------------------------------------------------


def kill_header() -> str:
    return (f"{'trial':>5} {'kill@s':>6} {'reqs':>5} {'err':>3} {'adds':>5} {'upd':>4} {'dels':>4} {'cut':>4} "
            f"{'applied':>7} {'expected':>8} {'present':>7} {'lost':>4} {'undone':>6} {'probes':>6} "
            f"{'integrity':>9} {'restart s':>9}")


def kill_row(t: Trial) -> str:
    v = t.verdict
    return (f"{t.number:>5} {t.stopped_at:>6.2f} {t.requests:>5} {t.errors.total():>3} {t.acked['add']:>5} "
            f"{t.acked['update']:>4} "
            f"{t.acked['delete']:>4} {t.cut:>4} {v.applied:>3}/{v.applied + v.unapplied:<3} {v.expected:>8} "
            f"{v.present:>7} {v.lost:>4} {v.undone:>6} {t.probes[0]:>3}/{t.probes[1]:<2} "
            f"{'ok' if not t.integrity else 'FAILED':>9} {t.restart:>9.2f}")


def term_header() -> str:
    return (f"{'trial':>5} {'term@s':>6} {'reqs':>5} {'err':>3} {'adds':>5} {'dels':>4} {'exit':>4} {'exit s':>6} "
            f"{'in-flight: completed/503/disc':>29} {'last done s':>11} {'lived after':>11} "
            f"{'after: 503/refused/disc/ok':>26} {'lost':>4} {'undone':>6} {'integrity':>9} {'restart s':>9}")


def term_row(t: Trial) -> str:
    d, v = t.term, t.verdict
    flight, after = d["in_flight_ended"], d["after"]
    others = sum(flight.values()) - flight["ok"] - flight["503 draining"] - flight["disconnected"]
    flight_cell = f"{d['in_flight']} = {flight['ok']}/{flight['503 draining']}/{flight['disconnected']}"
    flight_cell += f" +{others}" if others else ""
    after_cell = (f"{after['503 draining']}/{after['connect refused']}/{after['disconnected']}/{after['ok']}")
    return (f"{t.number:>5} {t.stopped_at:>6.2f} {t.requests:>5} {t.errors.total():>3} {t.acked['add']:>5} "
            f"{t.acked['delete']:>4} "
            f"{d['code']!s:>4} {d['exit_s']:>6.2f} {flight_cell:>29} {d['last_done_s']:>11.3f} "
            f"{d['lived_after_last_s']:>11.3f} {after_cell:>26} {v.lost:>4} {v.undone:>6} "
            f"{'ok' if not t.integrity else 'FAILED':>9} {t.restart:>9.2f}")


def totals(trials: list[Trial], cfg: Config) -> list[str]:
    restarts = [t.restart for t in trials]
    acked = sum((t.acked for t in trials), Counter())
    lost = sum(t.verdict.lost for t in trials)
    lines = [
        f"totals over {len(trials)} {cfg.mode} trials on {cfg.backend}: acknowledged adds {acked['add']}, "
        f"updates {acked['update']}, deletes {acked['delete']}; lost acknowledged writes {lost}; "
        f"acknowledged deletes undone {sum(t.verdict.undone for t in trials)}",
        f"  at the last check: {trials[-1].verdict.present} of {trials[-1].verdict.expected} expected memories "
        f"present, {trials[-1].verdict.deletes - trials[-1].verdict.undone} of {trials[-1].verdict.deletes} "
        f"deleted memories (by a 2xx, or a cut-off delete found applied) still deleted; "
        f"cut-off requests {sum(t.cut for t in trials)} (applied {sum(t.verdict.applied for t in trials)}, "
        f"not applied {sum(t.verdict.unapplied for t in trials)})",
        f"  integrity and consistency checks passed in {sum(not t.integrity for t in trials)} of {len(trials)} "
        f"trials ({trials[-1].checked}, history, embedding{', change-feed' if cfg.backend == 'postgres' else ''} "
        f"and /v1/stats consistency); search probes {sum(t.probes[0] for t in trials)}/"
        f"{sum(t.probes[1] for t in trials)}",
        f"  restart (spawn to readyz 200): p50 {percentile(restarts, 50):.2f}s, max {max(restarts):.2f}s",
    ]
    if cfg.mode == "term":
        exits = [t.term["exit_s"] for t in trials]
        codes = Counter(str(t.term["code"]) for t in trials)
        slow = sum(t.term["lived_after_last_s"] > 1.0 for t in trials)
        lines.append(f"  SIGTERM to exit: p50 {percentile(exits, 50):.2f}s, max {max(exits):.2f}s; exit codes "
                     f"{dict(codes)}; {slow} trials lived > 1 s after their last in-flight request was answered")
        flight = sum((t.term["in_flight_ended"] for t in trials), Counter())
        after = sum((t.term["after"] for t in trials), Counter())
        lines.append(f"  in flight at SIGTERM ended: {dict(flight)}; sent after SIGTERM ended: {dict(after)}")
    return lines


# -- the run ----------------------------------------------------------------------------------------


async def run(cfg: Config) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="gm-crash-"))
    dbs = Databases(cfg.database_url)
    args = ["--drain-seconds", f"{cfg.drain_seconds:g}"]
    server = Server(tmp / "crash.db", tmp / "server-1.log", args)
    ledger, work, rng = Ledger(), Workload(cfg.seed, namespace=NAMESPACE, users=20), random.Random(cfg.seed)
    trials: list[Trial] = []
    deadline = time.perf_counter() + cfg.max_minutes * 60
    failures: list[str] = []
    try:
        if cfg.backend == "postgres":
            server = PgServer(await dbs.create("crash"), tmp / "server-1.log", args)
        first = await server.start()
        progress(f"{cfg.mode} trials on {cfg.backend}: {cfg.trials} x up to {cfg.seconds:g}s, {cfg.clients} clients, "
                 f"batches of {cfg.batch_size}, drain {cfg.drain_seconds:g}s, seed {cfg.seed}; "
                 f"first start {first:.2f}s; load average {load_average()}; "
                 f"files in {tmp}")
        async with aiohttp.ClientSession() as session:  # load the model before the first trial
            await search_ids(session, server.url, {"query": "warm up"})
        print(kill_header() if cfg.mode == "kill" else term_header(), flush=True)
        for number in range(1, cfg.trials + 1):
            if time.perf_counter() > deadline:
                progress(f"--max-minutes {cfg.max_minutes:g} reached: stopping after {len(trials)} trials")
                break
            trial = await one_trial(number, cfg, server, ledger, work, rng, tmp)
            trials.append(trial)
            print(kill_row(trial) if cfg.mode == "kill" else term_row(trial), flush=True)
            errors = [f"{n} answered {outcome} before the stop" for outcome, n in trial.errors.items()]
            warnings = trial.term.get("warnings", [])[:3]
            for line in errors + trial.verdict.problems[:10] + trial.integrity[:10] + warnings:
                print(f"      {line}", flush=True)
            if trial.verdict.problems or trial.integrity:
                failures.append(f"trial {number}: {len(trial.verdict.problems) + len(trial.integrity)} problems")
            if trial.term and trial.term["code"] != 0:
                failures.append(f"trial {number}: exit status {trial.term['code']} after SIGTERM")
        code, seconds = server.stop(cfg.drain_seconds + 30)
        final = sqlite_integrity(server.db, tmp / "check.db") if cfg.backend == "sqlite" else []
        print(f"final SIGTERM: exit {code} in {seconds:.2f}s" +
              (f"; the stopped file's integrity: {'ok' if not final else final}" if cfg.backend == "sqlite" else ""))
        if code != 0 or final:
            failures.append("the final stop")
    except (RuntimeError, OSError, sqlite3.Error, asyncpg.PostgresError, aiohttp.ClientError, TimeoutError) as exc:
        failures.append(f"the run stopped: {type(exc).__name__}: {exc}")
    finally:
        server.kill_if_running()
        if dbs.made:
            await dbs.drop_all()
    if trials:
        print("\n".join(totals(trials, cfg)))
    kept = bool(failures) and any(tmp.iterdir())
    if not kept:
        shutil.rmtree(tmp)
    if failures:
        where = f"; kept {tmp} (database and server logs) for a look" if kept else ""
        print(f"FAILED: {'; '.join(failures)}{where}")
        return 1
    print("every check passed")
    return 0


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: bench/crash.py --backend postgres --mode term --trials 2 --seconds 3")
    p.add_argument("--mode", choices=["kill", "term"], default="kill", help="kill -9 (default) or SIGTERM")
    p.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite", help="database (sqlite)")
    p.add_argument("--database-url", default=ADMIN_URL,
                   help=f"the Postgres on which to create (and drop) a fresh database (default {ADMIN_URL})")
    p.add_argument("--trials", type=int, default=5, help="trials, 1-100 (5)")
    p.add_argument("--seconds", type=float, default=4.0, help="most seconds of load per trial, 0.5-120 (4)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients, 1-16 (4)")
    p.add_argument("--batch-size", type=int, default=8, help="memories per batch add, 2-100 (8)")
    p.add_argument("--probes", type=int, default=10, help="live and deleted memories searched for per trial (10)")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="the server's --drain-seconds (10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the texts, the ops and the stop moments (0)")
    p.add_argument("--max-minutes", type=float, default=30.0, help="start no trial after this (30)")
    a = p.parse_args(argv)
    try:
        check_loopback_postgres(a.database_url, "--database-url")
    except SystemExit as exc:
        p.error(str(exc))
    bounds = {"--trials": (a.trials, 1, 100), "--seconds": (a.seconds, 0.5, 120), "--clients": (a.clients, 1, 16),
              "--batch-size": (a.batch_size, 2, 100), "--probes": (a.probes, 0, 1000),
              "--drain-seconds": (a.drain_seconds, 0, 300), "--max-minutes": (a.max_minutes, 0.1, 600)}
    for flag, (value, low, high) in bounds.items():
        if not low <= value <= high:
            p.error(f"{flag} must be in [{low}, {high}], not {value}")
    return Config(mode=a.mode, backend=a.backend, database_url=a.database_url, trials=a.trials, seconds=a.seconds,
                  clients=a.clients, batch_size=a.batch_size, probes=a.probes, drain_seconds=a.drain_seconds,
                  seed=a.seed, max_minutes=a.max_minutes)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
