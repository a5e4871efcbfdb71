"""What bench/crash.py checks after each restart: the ledger of what the clients were told
(and what the database must therefore hold), and the integrity checks of either backend.
"""

from __future__ import annotations

import json
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

NAMESPACE = "crash"
EMBEDDING_BYTES = 384 * 4  # all-MiniLM-L6-v2, float32
CUT = ("disconnected", "timeout")  # request outcomes that leave a write applied or not

State = tuple[str, str, str | None]  # (text, metadata as sorted JSON, user_id); None: absent


def state_of(text: str, metadata: dict[str, Any], user_id: str | None) -> State:
    return text, json.dumps(metadata, sort_keys=True), user_id


# -- what the database must hold ---------------------------------------------------------------


@dataclass
class Entry:
    """One id's acknowledged state and what requests without a definite answer may have left."""

    acked: State | None = None
    versions: list[State] = field(default_factory=list)  # every acknowledged state, oldest first
    maybe: list[State | None] = field(default_factory=list)  # asked for; the answer never came
    refused: list[State | None] = field(default_factory=list)  # asked for and refused

    @property
    def settled(self) -> bool:
        return not self.maybe and not self.refused


@dataclass
class Verdict:
    expected: int = 0  # memories that must be there: acknowledged, and deleted by no 2xx nor a cut-off delete
    present: int = 0  # of those, listed with exactly the acknowledged content (or a cut-off write's)
    lost: int = 0  # acknowledged add or update missing, or an older version found
    deletes: int = 0  # acknowledged deletes checked
    undone: int = 0  # of those, found again
    applied: int = 0  # writes of cut-off requests (one per memory) found applied
    unapplied: int = 0  # ... found not applied
    problems: list[str] = field(default_factory=list)  # anything else, one line each


class Ledger:
    """Every id the harness wrote, the ids free for an update or delete, the cut-off batches."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.idle: list[str] = []  # acknowledged present, no request in flight or unsettled
        self.cut_batches: list[list[str]] = []
        self._next = 0

    def new_id(self) -> str:
        self._next += 1
        return f"k{self._next:06d}"

    def take(self, rng: random.Random) -> str | None:
        if not self.idle:
            return None
        at = rng.randrange(len(self.idle))
        self.idle[at], self.idle[-1] = self.idle[-1], self.idle[at]
        return self.idle.pop()

    def record(self, memory_id: str, wanted: State | None, outcome: str) -> None:
        entry = self.entries.setdefault(memory_id, Entry())
        if outcome == "ok":
            entry.acked = wanted
            if wanted is not None:
                entry.versions.append(wanted)
        elif outcome in CUT:
            entry.maybe.append(wanted)
        else:  # an error status, or the connection was refused: nothing may have changed
            entry.refused.append(wanted)
        if entry.acked is not None and entry.settled:
            self.idle.append(memory_id)

    def verify(self, listed: dict[str, State]) -> Verdict:
        """Compare what the server lists with the ledger, then take the listing as the new truth."""
        v = Verdict()
        for memory_id, entry in self.entries.items():
            seen = listed.get(memory_id)
            if entry.acked is not None and not (seen is None and None in entry.maybe):  # a cut-off delete took it
                v.expected += 1
                v.present += seen == entry.acked or seen in entry.maybe  # or a cut-off update followed
            elif entry.versions:
                v.deletes += 1
            if seen == entry.acked:
                v.unapplied += len(entry.maybe)
                continue
            if seen in entry.maybe:
                v.applied += 1
                v.unapplied += len(entry.maybe) - 1
            elif seen in entry.refused:
                v.problems.append(f"{memory_id}: a refused request was applied")
            elif entry.acked is not None and (seen is None or seen in entry.versions):
                v.lost += 1
                v.problems.append(f"{memory_id}: acknowledged {'add' if len(entry.versions) == 1 else 'update'} "
                                  f"lost ({'missing' if seen is None else 'an older version is back'})")
            elif entry.acked is None and entry.versions:
                v.undone += 1
                v.problems.append(f"{memory_id}: acknowledged delete undone")
            else:
                v.problems.append(f"{memory_id}: content nobody sent: {seen!r:.120}")
        for memory_id in listed.keys() - self.entries.keys():
            v.problems.append(f"{memory_id}: a memory nobody added")
        for batch in self.cut_batches:
            found = sum(m in listed for m in batch)
            if 0 < found < len(batch):
                v.problems.append(f"cut-off batch {batch[0]}..: {found} of {len(batch)} memories stored")
        self._settle(listed)
        return v

    def _settle(self, listed: dict[str, State]) -> None:
        for memory_id, entry in self.entries.items():
            seen = listed.get(memory_id)
            if seen is not None and seen != entry.acked:
                entry.versions.append(seen)
            entry.acked, entry.maybe, entry.refused = seen, [], []
        self.idle = [m for m, e in self.entries.items() if e.acked is not None]
        self.cut_batches = []


# -- the checks -----------------------------------------------------------------------


async def list_all(session: aiohttp.ClientSession, url: str) -> dict[str, State]:
    listed: dict[str, State] = {}
    cursor: str | None = None
    while True:
        params = {"namespace": NAMESPACE, "limit": "1000", **({"cursor": cursor} if cursor else {})}
        async with session.get(url + "/v1/memories", params=params) as resp:
            page = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"listing answered {resp.status}: {page}")
        for m in page["memories"]:
            listed[m["id"]] = state_of(m["text"], m["metadata"], m["user_id"])
        cursor = page["next_cursor"]
        if not cursor:
            return listed


async def search_ids(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[str]:
    async with session.post(url + "/v1/memories/search", json={"namespace": NAMESPACE, **body}) as resp:
        out = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"search answered {resp.status}: {out}")
    return [hit["memory"]["id"] for hit in out["hits"]]


async def probe(session: aiohttp.ClientSession, url: str, ledger: Ledger, count: int,
                rng: random.Random) -> tuple[int, int, list[str]]:
    """(probes passed, probes, failures): live memories found by keyword and vector search,
    deleted ones by neither."""
    live = sorted(m for m, e in ledger.entries.items() if e.acked is not None)
    gone = sorted(m for m, e in ledger.entries.items() if e.acked is None and e.versions)
    failures: list[str] = []
    picked_live = rng.sample(live, min(count, len(live)))
    picked_gone = rng.sample(gone, min(count, len(gone)))
    for memory_id in picked_live:
        text, _, user = ledger.entries[memory_id].acked or ("", "", None)
        keyword = await search_ids(session, url, {"query": memory_id, "mode": "keyword", "limit": 5})
        vector = await search_ids(session, url, {"query": text, "user_id": user, "mode": "vector", "limit": 3})
        if keyword != [memory_id]:
            failures.append(f"{memory_id}: keyword search for its token found {keyword}")
        if memory_id not in vector:
            failures.append(f"{memory_id}: vector search for its text found {vector}")
    for memory_id in picked_gone:
        last = ledger.entries[memory_id].versions[-1]
        keyword = await search_ids(session, url, {"query": memory_id, "mode": "keyword", "limit": 5})
        vector = await search_ids(session, url, {"query": last[0], "user_id": last[2], "mode": "vector", "limit": 3})
        if memory_id in keyword or memory_id in vector:
            failures.append(f"{memory_id}: deleted, yet found by search")
    probes = len(picked_live) + len(picked_gone)
    return probes - len({f.split(":")[0] for f in failures}), probes, failures


CONSISTENCY = {  # the same SQL on both backends; each counts rows that break the rule
    "rows unlike their last history entry":
        "SELECT count(*) FROM memories m WHERE NOT EXISTS (SELECT 1 FROM history h WHERE h.memory_id = m.id "
        "AND h.seq = (SELECT max(h2.seq) FROM history h2 WHERE h2.memory_id = m.id) AND h.op <> 'delete' "
        "AND h.text = m.text AND h.metadata = m.metadata)",
    "live history entries without a row":
        "SELECT count(*) FROM history h WHERE h.seq = (SELECT max(h2.seq) FROM history h2 "
        "WHERE h2.memory_id = h.memory_id) AND h.op <> 'delete' AND NOT EXISTS "
        "(SELECT 1 FROM memories m WHERE m.id = h.memory_id)",
    "embeddings of another size": f"SELECT count(*) FROM memories WHERE length(embedding) <> {EMBEDDING_BYTES}",
}
POSTGRES_CONSISTENCY = {
    "rows missing from the change feed":
        "SELECT count(*) FROM memories m WHERE NOT EXISTS (SELECT 1 FROM changes c WHERE c.rowid = m.rowid)",
}


def sqlite_integrity(db: Path, copy: Path) -> list[str]:
    """Problems found in an online backup of ``db`` (the served file is only read)."""
    copy.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    target = sqlite3.connect(copy)
    try:
        source.backup(target)
        problems = []
        result = [r[0] for r in target.execute("PRAGMA integrity_check")]
        if result != ["ok"]:
            problems.append(f"integrity_check: {'; '.join(result[:3])}")
        # the keyword index the triggers keep: memories_search from schema v3 on (memories_fts
        # stays behind, emptied, and would fail a check against its content table)
        tables = {r[0] for r in target.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        index = "memories_search" if "memories_search" in tables else "memories_fts"
        try:  # rank 1: also compare the index with the content table
            target.execute(f"INSERT INTO {index} ({index}, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError as exc:
            problems.append(f"FTS5 integrity-check of {index}: {exc}")
        for rule, sql in CONSISTENCY.items():
            if (n := target.execute(sql).fetchone()[0]) != 0:
                problems.append(f"{n} {rule}")
        return problems
    finally:
        source.close()
        target.close()


async def postgres_integrity(url: str) -> tuple[list[str], str]:
    """(problems, what amcheck could check) in the trial's database."""
    conn = await asyncpg.connect(url)
    try:
        problems = []
        for rule, sql in {**CONSISTENCY, **POSTGRES_CONSISTENCY}.items():
            if (n := await conn.fetchval(sql)) != 0:
                problems.append(f"{n} {rule}")
        if await conn.fetchval("SELECT count(*) FROM information_schema.columns "
                               "WHERE table_name = 'memories' AND column_name = 'vec'"):
            if (n := await conn.fetchval("SELECT count(*) FROM memories WHERE vec IS NULL")) != 0:
                problems.append(f"{n} rows without a pgvector vector")
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        except asyncpg.PostgresError as exc:
            return problems, f"amcheck unavailable ({exc})"
        indexes = await conn.fetch(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "WHERE a.amname = 'btree' AND i.indrelid::regclass::text IN ('memories', 'history', 'changes')")
        for row in indexes:
            try:
                await conn.execute("SELECT bt_index_check($1::regclass, true)", row[0])
            except asyncpg.PostgresError as exc:
                problems.append(f"amcheck {row[0]}: {exc}")
        return problems, f"amcheck on {len(indexes)} btree indexes"
    finally:
        await conn.close()


async def stats_problems(session: aiohttp.ClientSession, url: str, listed: int) -> list[str]:
    async with session.get(url + "/v1/stats") as resp:
        stats = await resp.json()
    counted = stats.get("namespaces", {}).get(NAMESPACE, 0)
    return [] if counted == listed else [f"/v1/stats counts {counted} memories, the listing {listed}"]
