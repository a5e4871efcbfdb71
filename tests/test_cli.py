"""The ``gmem`` command line as a user drives it: backups under load, restore and its refusals,
export/import round trips, status, the client commands, exit codes and ``--json`` shapes.

Real parts only: temp SQLite files, the default model, ``gmem serve`` and ``gmem`` child
processes on 127.0.0.1. Commands run in-process through ``gm.cli.main`` where that is the
same thing, and as child processes where a separate process matters (locks, the server).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import numpy as np
import pytest

import gm
from gm.cli import build_parser, main
from gm.cli.commands import new_key
from gm.embedding import ModelSpec
from gm.storage.sqlite_migrations import LATEST, migrate, read_version, snapshot_path
from tests.http_server import free_port, spawn_server, start_server, store_factory

FIELDS = "id, namespace, user_id, agent_id, session_id, text, metadata, created_at, updated_at, expires_at"
MEMORY_KEYS = {
    "id",
    "namespace",
    "user_id",
    "agent_id",
    "session_id",
    "occurred_at",
    "text",
    "metadata",
    "created_at",
    "updated_at",
    "expires_at",
}


# -- helpers -------------------------------------------------------------------------------------


class Run(NamedTuple):
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)

    @property
    def error_line(self) -> str:
        """The one line a failing command writes to stderr (asserting it is just one)."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("gmem: "), self.err
        return lines[0]


def gmem(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Run:
    """``gmem ARGV`` in this process (argparse's exits included)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def gmem_process(*argv: str | Path) -> Run:
    """``python -m gm ARGV`` as a child process."""
    done = subprocess.run([sys.executable, "-m", "gm", *map(str, argv)], capture_output=True, text=True, timeout=120)
    return Run(done.returncode, done.stdout, done.stderr)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read through a read-only connection (never writes to ``db``)."""
    conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def memories(db: Path) -> list[tuple[Any, ...]]:
    """Every stored memory, all fields, ordered by id."""
    return query(db, f"SELECT {FIELDS} FROM memories ORDER BY id")


def seed(db: Path, inputs: list[dict[str, Any]]) -> list[gm.Memory]:
    async def run() -> list[gm.Memory]:
        async with gm.open(db) as store:
            return await store.add_many(inputs)

    return asyncio.run(run())


FACTS = [
    "Prefers a window seat on long flights.",
    "Allergic to peanuts and tree nuts.",
    "Her favourite programming language is Rust.",
    "Lives in Lisbon since 2021.",
    "Drinks oat milk in her coffee, never sugar.",
    "Runs a half marathon every October.",
    "Works as a data engineer at a logistics company.",
    "Has a dog called Miso, a shiba inu.",
    "Reads science fiction before sleeping.",
    "Wants reminders in the morning, not in the evening.",
    "Speaks Portuguese, English and some Japanese.",
    "Keeps her notes in plain Markdown files.",
]


def make_v1_database(path: Path, memory_id: str, text: str, vector: bytes) -> None:
    """A database as release 1 left it: schema v1 with one memory and its history row."""
    assert migrate(path, target=1) == 1
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO memories (id, namespace, user_id, text, metadata, created_at, updated_at, embedding) "
            "VALUES (?, 'default', 'u1', ?, '{\"topic\": \"old\"}', 1700000000000, 1700000000000, ?)",
            [memory_id, text, vector],
        )
        conn.execute(
            "INSERT INTO history (memory_id, namespace, op, at, text, metadata) "
            "VALUES (?, 'default', 'add', 1700000000000, ?, '{\"topic\": \"old\"}')",
            [memory_id, text],
        )
    conn.close()


def embedding_of(text: str, scratch: Path) -> bytes:
    async def run() -> bytes:
        async with gm.open(scratch) as store:
            return bytes((await store.embedder.embed(text)).tobytes())

    return asyncio.run(run())


class Served(NamedTuple):
    url: str
    db: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One ``gmem serve`` child process for the module, on a database with a few memories."""
    folder = tmp_path_factory.mktemp("served")
    db = folder / "served.db"
    seed(db, [{"text": fact, "user_id": "seed"} for fact in FACTS[:6]])
    process, url = asyncio.run(spawn_server(folder / "serve.log", "--db", str(db)))
    try:
        yield Served(url, db, process)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (folder / "serve.log").read_text()


# -- 1. backup under load ----------------------------------------------------------------------------


async def test_backup_taken_while_1000_adds_are_in_flight_is_a_consistent_prefix(tmp_path: Path) -> None:
    db, out = tmp_path / "live.db", tmp_path / "snapshot.db"
    log = tmp_path / "serve.log"
    process, url = await spawn_server(log, "--db", str(db))
    everything = [f"m-{i:04d}" for i in range(1000)]
    pending = deque(everything)
    sent: set[str] = set()
    acked: set[str] = set()
    try:
        async with aiohttp.ClientSession() as session:

            async def writer() -> None:
                while pending:
                    memory_id = pending.popleft()
                    sent.add(memory_id)
                    n = int(memory_id[2:])
                    body = {"id": memory_id, "text": f"fact {n}: the meeting about project {n % 50} is in room {n % 7}"}
                    async with session.post(url + "/v1/memories", json=body) as response:
                        assert response.status == 201, await response.text()
                        acked.add(memory_id)

            writers = [asyncio.create_task(writer()) for _ in range(16)]
            try:
                for _ in range(3000):
                    if len(acked) >= 100:
                        break
                    await asyncio.sleep(0.01)
                acked_before = set(acked)
                backup = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "gm",
                    "backup",
                    "--db",
                    str(db),
                    str(out),
                    "--json",
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
                stdout, stderr = await backup.communicate()
                sent_by_then = set(sent)
                await asyncio.gather(*writers)
            finally:
                for task in writers:
                    task.cancel()
    finally:
        process.send_signal(signal.SIGTERM)
        server_code = await asyncio.to_thread(process.wait, 30)

    assert backup.returncode == 0, stderr.decode()
    assert stderr == b""
    assert server_code == 0, log.read_text()

    # The backup is an intact SQLite file holding one consistent moment of the database.
    assert query(out, "PRAGMA integrity_check") == [("ok",)]
    ids = {r[0] for r in query(out, "SELECT id FROM memories")}
    count = len(ids)
    add_rows = sorted(r[0] for r in query(out, "SELECT memory_id FROM history WHERE op = 'add'"))
    assert add_rows == sorted(ids)  # each memory has its add row, and no add row lacks its memory
    assert query(out, "SELECT count(*) FROM history") == [(count,)]
    # Commits are serialised, so a consistent snapshot is a prefix of them: rowids 1..N, seqs 1..N.
    assert query(out, "SELECT count(*), max(rowid) FROM memories") == [(count, count)]
    assert query(out, "SELECT count(*), max(seq) FROM history") == [(count, count)]
    # Everything acknowledged before the backup started is in it; nothing that was never sent is.
    assert acked_before <= ids <= sent_by_then
    assert len(acked_before) >= 100
    assert count < 1000, "the backup did not overlap the adds"
    assert not list(tmp_path.glob("*.partial"))

    report = json.loads(stdout)
    assert report == {
        "backup": str(out),
        "memories": count,
        "history": count,
        "schema_version": LATEST,
        "bytes": out.stat().st_size,
        "verified": True,
    }

    # The backup opens as a store, and the live database kept every one of the 1,000 adds.
    async with gm.open(out) as store:
        assert (await store.stats()).memories == count
        some = sorted(acked_before)[0]
        assert (await store.get(some)).text.startswith(f"fact {int(some[2:])}:")
    assert acked == set(everything)
    assert {r[0] for r in query(db, "SELECT id FROM memories")} == set(everything)
    assert query(db, "SELECT count(*) FROM history WHERE op = 'add'") == [(1000,)]


def test_backup_refuses_to_overwrite_and_needs_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mem.db"
    seed(db, [{"text": FACTS[0]}])
    taken = tmp_path / "taken.db"
    taken.write_bytes(b"keep me")
    result = gmem(capsys, "backup", "--db", db, taken)
    assert result.code == 7 and "exists already" in result.error_line
    assert taken.read_bytes() == b"keep me"
    assert gmem(capsys, "backup", "--db", tmp_path / "missing.db", tmp_path / "x.db").code == 7
    assert not (tmp_path / "missing.db").exists() and not (tmp_path / "x.db").exists()
    # Without a path it writes <stem>-<time>.backup.db next to the database.
    result = gmem(capsys, "backup", "--db", db)
    assert result.code == 0, result.err
    [written] = tmp_path.glob("mem-*.backup.db")
    assert f"backup written: {written}" in result.out and "1 memories" in result.out
    assert memories(written) == memories(db)


# -- 2. restore round trip ------------------------------------------------------------------------


def test_restore_round_trip_keeps_the_replaced_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, backup = tmp_path / "mem.db", tmp_path / "nightly.db"
    kept = seed(db, [{"text": fact, "user_id": "u1", "metadata": {"i": i}} for i, fact in enumerate(FACTS[:6])])
    assert gmem(capsys, "backup", "--db", db, backup).code == 0
    at_backup = memories(backup)
    assert at_backup == memories(db) and len(at_backup) == 6

    # Life goes on after the backup: one memory more, one fewer.
    added = gmem(capsys, "add", "--db", db, "--json", "--user-id", "u1", "Moved to Porto in 2026.").json
    assert gmem(capsys, "delete", "--db", db, kept[0].id).code == 0
    after_backup = memories(db)
    assert after_backup != at_backup

    result = gmem(capsys, "restore", "--db", db, backup, "--json")
    assert result.code == 0, result.err
    [previous] = tmp_path.glob("mem.db.pre-restore-*.bak")
    assert result.json == {
        "database": str(db),
        "restored_from": str(backup),
        "memories": 6,
        "schema_version": LATEST,
        "previous_kept_as": str(previous),
    }
    assert memories(db) == at_backup
    assert memories(previous) == after_backup  # the replaced database, not lost

    # Restoring again at once keeps a second copy rather than overwriting the first one.
    result = gmem(capsys, "restore", "--db", db, backup)
    assert result.code == 0, result.err
    assert "the database it replaced is kept as" in result.out
    copies = sorted(tmp_path.glob("mem.db.pre-restore-*.bak"))
    assert len(copies) == 2
    assert memories(previous) == after_backup
    assert memories(db) == at_backup

    async def use_restored() -> None:
        async with gm.open(db) as store:
            hits = await store.search("peanut allergy", user_id="u1", limit=1)
            assert [h.memory.id for h in hits] == [kept[1].id]
            assert (await store.get(kept[0].id)).text == FACTS[0]  # deleted after the backup: back again
            with pytest.raises(gm.errors.NotFound):
                await store.get(added["id"])  # added after the backup: gone with the restore

    asyncio.run(use_restored())


# -- 3. restore refusals ---------------------------------------------------------------------------


def test_restore_refuses_a_backup_from_a_newer_release(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, backup = tmp_path / "mem.db", tmp_path / "future.db"
    seed(db, [{"text": fact} for fact in FACTS[:3]])
    shutil.copy(db, backup)
    conn = sqlite3.connect(backup)
    conn.execute(f"PRAGMA user_version = {LATEST + 1}")
    conn.close()
    before = sha256(db)
    result = gmem(capsys, "restore", "--db", db, backup)
    assert result.code == 3
    assert f"schema version {LATEST + 1}" in result.error_line
    assert sha256(db) == before
    assert not list(tmp_path.glob("*.bak"))


@pytest.fixture(scope="module")
def good_backup(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a verified backup of a database with a few dozen memories."""
    folder = tmp_path_factory.mktemp("good")
    seed(folder / "mem.db", [{"text": f"{fact} ({i})"} for i, fact in enumerate(FACTS * 2)])
    assert main(["backup", "--db", str(folder / "mem.db"), str(folder / "good.db")]) == 0
    return (folder / "good.db").read_bytes()


@pytest.mark.parametrize("kind", ["random bytes", "text", "empty", "truncated", "garbled page", "missing"])
def test_restore_refuses_an_invalid_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good_backup: bytes, kind: str
) -> None:
    db, bad = tmp_path / "mem.db", tmp_path / "bad.db"
    db.write_bytes(good_backup)
    assert len(good_backup) >= 8 * 4096
    if kind == "random bytes":
        bad.write_bytes(np.random.default_rng(7).bytes(8192))
    elif kind == "text":
        bad.write_text("id,text\n1,not a database\n")
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(good_backup[: len(good_backup) // 2])
    elif kind == "garbled page":
        page = 4096
        bad.write_bytes(good_backup[: 3 * page] + b"\x5a" * page + good_backup[4 * page :])
    before = sha256(db)
    result = gmem(capsys, "restore", "--db", db, bad)
    assert result.code == 7, result.err
    result.error_line  # noqa: B018 - one line on stderr
    assert sha256(db) == before
    assert not list(tmp_path.glob("*.bak")) and not list(tmp_path.glob("*.partial"))


def test_restore_refuses_a_database_a_server_holds(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup = tmp_path / "served-backup.db"
    assert gmem(capsys, "backup", "--db", served.db, backup).code == 0  # online, while it serves
    before, rows = sha256(served.db), memories(served.db)
    result = gmem_process("restore", "--db", served.db, backup)
    assert result.code == 6
    assert f"process {served.process.pid}" in result.error_line
    assert sha256(served.db) == before and memories(served.db) == rows
    assert not list(served.db.parent.glob("*.pre-restore-*.bak"))


HOLDER = """
import asyncio, sys, gm
async def hold():
    async with gm.open(sys.argv[1]):
        print("open", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
asyncio.run(hold())
"""


def test_restore_refuses_while_another_process_has_the_store_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, backup = tmp_path / "mem.db", tmp_path / "b.db"
    seed(db, [{"text": fact} for fact in FACTS[:3]])
    assert gmem(capsys, "backup", "--db", db, backup).code == 0
    seed(db, [{"text": FACTS[5]}])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        before = sha256(db)
        result = gmem(capsys, "restore", "--db", db, backup)
        assert result.code == 6
        assert "in use by process" in result.error_line
        assert sha256(db) == before
        assert gmem(capsys, "status", "--db", db, "--json").json["in_use_by"] == f"process {holder.pid}"
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    # Once that store is closed the same restore goes through.
    assert gmem(capsys, "restore", "--db", db, backup).code == 0
    assert len(memories(db)) == 3


def test_restore_of_an_older_schema_is_migrated_on_next_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, old = tmp_path / "mem.db", tmp_path / "release-one.db"
    seed(db, [{"text": fact} for fact in FACTS[:2]])
    text = "Written by release one: prefers aisle seats on trains."
    make_v1_database(old, "legacy-1", text, embedding_of(text, tmp_path / "scratch.db"))
    result = gmem(capsys, "restore", "--db", db, old)
    assert result.code == 0, result.err
    assert f"it is at schema v1; the next open migrates it to v{LATEST}" in result.out
    assert read_version(db) == 1

    async def open_restored() -> None:
        async with gm.open(db) as store:
            assert store.backend.schema_version == LATEST
            memory = await store.get("legacy-1")
            assert (memory.text, memory.user_id, memory.metadata) == (text, "u1", {"topic": "old"})
            for mode in ("keyword", "vector", "hybrid"):
                hits = await store.search("aisle seats on trains", mode=mode, limit=1)
                assert [h.memory.id for h in hits] == ["legacy-1"], mode
            assert [h.op for h in await store.history("legacy-1")] == ["add"]

    asyncio.run(open_restored())
    assert read_version(db) == LATEST
    assert snapshot_path(db, LATEST).is_file()
    assert query(snapshot_path(db, LATEST), "PRAGMA user_version") == [(1,)]


def sqlite_header_then_garbage(size: int) -> bytes:
    """The 16 magic bytes of a SQLite file, then noise: a damaged file, not a newer schema."""
    return b"SQLite format 3\x00" + np.random.default_rng(3).bytes(size - 16)


def test_restore_over_a_damaged_database_keeps_it_and_leaves_nothing_half_done(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good_backup: bytes
) -> None:
    db, backup = tmp_path / "mem.db", tmp_path / "nightly.db"
    backup.write_bytes(good_backup)
    damaged = sqlite_header_then_garbage(2 * 1024 * 1024)  # the case restore is for: the live file is ruined
    db.write_bytes(damaged)
    Path(f"{db}-wal").write_bytes(b"a log that no longer matches anything" * 100)
    result = gmem(capsys, "restore", "--db", db, backup, "--json")
    assert result.code == 0, result.err
    [kept] = tmp_path.glob("mem.db.pre-restore-*.bak")
    assert result.json["previous_kept_as"] == str(kept)
    assert kept.read_bytes() == damaged  # the damaged file, kept exactly as it was
    assert Path(f"{kept}-wal").read_bytes().startswith(b"a log")  # with its log, under the name SQLite expects
    assert memories(db) == memories(backup) and len(memories(db)) == 24
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["mem.db", "mem.db.lock", "nightly.db", kept.name, f"{kept.name}-wal"]
    )


@pytest.mark.parametrize("kind", ["user_version 2, no tables", "a table missing", "SQLite header then garbage"])
def test_restore_refuses_a_file_that_is_not_a_greatmemory_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], good_backup: bytes, kind: str
) -> None:
    db, bad = tmp_path / "mem.db", tmp_path / "bad.db"
    db.write_bytes(good_backup)
    if kind == "SQLite header then garbage":
        bad.write_bytes(sqlite_header_then_garbage(64 * 1024))
    elif kind == "user_version 2, no tables":
        conn = sqlite3.connect(bad)
        conn.execute(f"PRAGMA user_version = {LATEST}")
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.close()
    else:
        bad.write_bytes(good_backup)
        conn = sqlite3.connect(bad)
        conn.execute("DROP TABLE history")
        conn.close()
    before = sha256(db)
    result = gmem(capsys, "restore", "--db", db, bad)
    assert result.code == 7, result.err
    line = result.error_line
    if kind == "SQLite header then garbage":
        assert "not a SQLite database" in line and "newer" not in line
    else:
        assert "not a greatmemory database" in line
        assert ("lacks the table history" if kind == "a table missing" else "lacks the table memories") in line
    assert sha256(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db", "mem.db"]


def test_backup_and_restore_leave_no_wal_or_shm_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, out, again = tmp_path / "mem.db", tmp_path / "out" / "copy.db", tmp_path / "again.db"
    out.parent.mkdir()
    seed(db, [{"text": fact} for fact in FACTS[:4]])
    holder = subprocess.Popen(  # a store holds the database open, so it has a live -wal and -shm
        [sys.executable, "-c", HOLDER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        assert Path(f"{db}-wal").exists()
        assert gmem(capsys, "backup", "--db", db, out).code == 0
        assert [p.name for p in out.parent.iterdir()] == ["copy.db"]
    finally:
        holder.communicate("\n", timeout=30)
    assert gmem(capsys, "restore", "--db", again, out).code == 0
    assert [p.name for p in out.parent.iterdir()] == ["copy.db"]  # reading the backup left nothing beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("again")) == ["again.db", "again.db.lock"]
    assert len(memories(again)) == 4


def test_a_directory_is_called_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, folder = tmp_path / "mem.db", tmp_path / "folder"
    seed(db, [{"text": FACTS[0]}])
    folder.mkdir()
    for argv in (["backup", "--db", db, folder], ["backup", "--db", folder, tmp_path / "b.db"],
                 ["restore", "--db", db, folder], ["restore", "--db", folder, db]):
        result = gmem(capsys, *argv)
        assert result.code == 7, (argv, result.err)
        assert f"{folder} is a directory" in result.error_line, argv
    for argv in (["add", "--db", folder, "x"], ["search", "--db", folder, "q"], ["status", "--db", folder],
                 ["export", "--db", folder], ["import", "--db", folder, db]):
        result = gmem(capsys, *argv)
        assert result.code == 9, (argv, result.err)
        assert f"{folder} is a directory, not a database file" in result.error_line, argv
    assert list(folder.iterdir()) == []


def test_the_lock_follows_symlinks_to_the_real_file(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "link.db"
    link.symlink_to(served.db)
    linked_folder = tmp_path / "linked-folder"
    linked_folder.symlink_to(served.db.parent, target_is_directory=True)

    async def open_through(path: Path) -> None:
        async with gm.open(path):
            pass

    for path in (link, linked_folder / served.db.name):
        with pytest.raises(gm.errors.DatabaseLocked, match=f"in use by process {served.process.pid}"):
            asyncio.run(open_through(path))

    async def second_server_through(path: Path) -> tuple[int, Any]:
        server = await start_server(store_factory(path), open_store=False)
        opener = asyncio.create_task(server.state.open_store(retry_seconds=0.05))
        try:
            await asyncio.sleep(0.3)
            return await server.call("GET", "/v1/readyz")
        finally:
            opener.cancel()
            await server.stop()

    status, body = asyncio.run(second_server_through(link))  # it waits for the first, as on the real path
    assert status == 503 and body["status"] == "unavailable"
    assert f"in use by process {served.process.pid}" in body["reason"]
    backup = tmp_path / "b.db"
    assert gmem(capsys, "backup", "--db", link, backup).code == 0
    before = sha256(served.db)
    result = gmem(capsys, "restore", "--db", link, backup)
    assert result.code == 6 and f"process {served.process.pid}" in result.error_line
    assert link.is_symlink() and sha256(served.db) == before
    assert gmem(capsys, "status", "--db", link, "--json").json["in_use_by"] == f"process {served.process.pid}"


def test_restore_through_a_symlink_replaces_the_file_it_points_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real, link, backup = tmp_path / "data" / "real.db", tmp_path / "link.db", tmp_path / "b.db"
    real.parent.mkdir()
    seed(real, [{"text": fact} for fact in FACTS[:3]])
    assert gmem(capsys, "backup", "--db", real, backup).code == 0
    seed(real, [{"text": FACTS[4]}])
    link.symlink_to(real)
    assert gmem(capsys, "restore", "--db", link, backup).code == 0
    assert link.is_symlink() and link.resolve() == real
    assert len(memories(real)) == 3
    assert len(list(real.parent.glob("real.db.pre-restore-*.bak"))) == 1


# -- 4. export / import ------------------------------------------------------------------------------

QUERIES = ["window seat on a plane", "food allergy", "which programming language", "morning reminders"]


def varied_database(db: Path) -> None:
    """Memories with every field in use: scopes, metadata, a TTL, an update, a deletion."""

    async def run() -> None:
        async with gm.open(db) as store:
            made = await store.add_many(
                [
                    {
                        "text": fact,
                        "user_id": f"u{i % 3}" if i % 4 else None,
                        "agent_id": "planner" if i % 2 else None,
                        "session_id": f"s{i}" if i % 5 == 0 else None,
                        "metadata": {
                            "i": i,
                            "topic": ["travel", "health", "work"][i % 3],
                            "tags": ["a", "é"],
                            "nested": {"ok": i % 2 == 0, "score": i / 7},
                        },
                    }
                    for i, fact in enumerate(FACTS)
                ]
            )
            await store.add_many(
                [
                    {"text": f"Team note {i}: {fact}", "namespace": "team", "user_id": "u1"}
                    for i, fact in enumerate(FACTS[:4])
                ]
            )
            await store.add("Temporary: parked on level 3.", ttl_seconds=3600, metadata={"kind": "ttl"})
            await store.update(
                made[2].id,
                text="Her favourite programming language is now Zig.",
                metadata={"topic": "work", "changed": True},
            )
            await store.delete(made[3].id)

    asyncio.run(run())


def search_results(db: Path) -> list[list[tuple[str, float]]]:
    async def run() -> list[list[tuple[str, float]]]:
        async with gm.open(db) as store:
            results = []
            for q in QUERIES:
                for mode in ("hybrid", "vector", "keyword"):
                    hits = await store.search(q, mode=mode, limit=5)
                    results.append([(h.memory.id, h.score) for h in hits])
            hits = await store.search("programming language", namespace="team", user_id="u1", limit=3)
            results.append([(h.memory.id, h.score) for h in hits])
            return results

    return asyncio.run(run())


@pytest.mark.parametrize("vectors", [True, False], ids=["with-vectors", "re-embedded"])
def test_export_import_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str], vectors: bool) -> None:
    source, target, dump = tmp_path / "source.db", tmp_path / "fresh.db", tmp_path / "dump.jsonl"
    varied_database(source)
    stored = memories(source)
    assert len(stored) == 16
    flag = ["--vectors"] if vectors else []
    result = gmem(capsys, "export", "--db", source, dump, "--json", *flag)
    assert result.code == 0, result.err
    assert result.json == {"exported": 16, "path": str(dump), "vectors": vectors}
    lines = dump.read_bytes().splitlines()
    header = json.loads(lines[0])["greatmemory"]
    assert (header["memories"], header["vectors"], header["schema_version"]) == (16, vectors, LATEST)
    assert (header["model"], header["model_label"]) == (ModelSpec.default().identity, "all-MiniLM-L6-v2-int8")
    assert len(lines) == 17
    assert all(("vector" in json.loads(line)) == vectors for line in lines[1:])
    if vectors:
        first = json.loads(lines[1])
        assert (
            base64.b64decode(first["vector"])
            == query(source, "SELECT embedding FROM memories WHERE id = ?", (first["id"],))[0][0]
        )

    result = gmem(capsys, "import", "--db", target, dump, "--json")
    assert result.code == 0, result.err
    assert result.json == {"imported": 16, "embedded": 0 if vectors else 16, "skipped": []}
    assert memories(target) == stored  # every field: scope, metadata, created/updated/expires times

    before, after = search_results(source), search_results(target)
    assert [[i for i, _ in hits] for hits in after] == [[i for i, _ in hits] for hits in before]
    if vectors:
        assert after == before  # the very same vectors: the very same scores
    else:
        for got, want in zip(after, before, strict=True):
            assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6)

    # A second import adds nothing and says why for every line.
    result = gmem(capsys, "import", "--db", target, dump, "--json")
    assert result.code == 0, result.err
    report = result.json
    assert (report["imported"], report["embedded"]) == (0, 0)
    assert sorted(s["line"] for s in report["skipped"]) == list(range(2, 18))
    assert {s["reason"] for s in report["skipped"]} == {"already present with the same content"}
    assert {s["id"] for s in report["skipped"]} == {r[0] for r in stored}
    assert memories(target) == stored

    result = gmem(capsys, "import", "--db", target, dump)
    assert result.code == 0
    assert result.out.startswith(f"imported 0 memories into {target}, skipped 16")
    assert "16 skipped: already present with the same content" in result.out


def test_import_reports_every_skipped_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, data = tmp_path / "mem.db", tmp_path / "in.jsonl"
    data.write_text(
        '{"id": "a-1", "text": "Prefers tea to coffee."}\n'  # 1
        "this is not json\n"  # 2
        '{"user_id": "u1", "metadata": {"topic": "x"}}\n'  # 3: no text
        '{"id": "a-1", "text": "Prefers coffee to tea."}\n'  # 4: same id, other content
        "[1, 2, 3]\n"  # 5
        "\n"  # 6: blank lines are ignored
        '{"id": "b-2", "text": "Cycles to work.", "metadata": "not an object"}\n'  # 7
        '{"id": "c-3", "text": "Cycles to work.", "user_id": "u1"}\n'  # 8
    )
    result = gmem(capsys, "import", "--db", db, data, "--json")
    assert result.code == 0, result.err
    report = result.json
    assert (report["imported"], report["embedded"]) == (2, 2)
    skipped = {s["line"]: s for s in report["skipped"]}
    assert sorted(skipped) == [2, 3, 4, 5, 7]
    assert skipped[2]["reason"].startswith("not JSON") and skipped[2]["id"] is None
    assert "text" in skipped[3]["reason"]
    assert skipped[4] == {"line": 4, "id": "a-1", "reason": "id already names a memory with other content"}
    assert skipped[5]["reason"] == "not a JSON object"
    assert skipped[7]["id"] == "b-2" and "metadata" in skipped[7]["reason"]
    assert [(r[0], r[5]) for r in memories(db)] == [("a-1", "Prefers tea to coffee."), ("c-3", "Cycles to work.")]

    # Against what is stored now, the other content under a known id is a conflict too.
    again = tmp_path / "again.jsonl"
    again.write_text('{"id": "c-3", "text": "Walks to work."}\n{"id": "d-4", "text": "Swims on Sundays."}\n')
    report = gmem(capsys, "import", "--db", db, again, "--json").json
    assert report["imported"] == 1
    assert report["skipped"] == [{"line": 1, "id": "c-3", "reason": "id already names a memory with other content"}]
    assert gmem(capsys, "import", "--db", db, tmp_path / "nope.jsonl").code == 2


def test_import_refuses_a_file_with_an_unknown_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, data = tmp_path / "mem.db", tmp_path / "in.jsonl"
    lines = [f'{{"text": "fact {i}", "user_id": "u1"}}' for i in range(300)]  # more than one batch before it
    lines.insert(299, '{"text": "Prefers tea.", "userid": "u2"}')  # line 300: a typo that would drop the user
    data.write_text("\n".join(lines) + "\n")
    result = gmem(capsys, "import", "--db", db, data)
    assert result.code == 2
    assert "line 300" in result.err and "'userid'" in result.err and "user_id" in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert not db.exists() or memories(db) == []  # nothing of the file was imported
    # the same through standard input
    done = subprocess.run([sys.executable, "-m", "gm", "import", "--db", str(db), "-"], input=data.read_bytes(),
                          capture_output=True, timeout=120)
    assert done.returncode == 2 and b"line 300" in done.stderr
    assert not db.exists() or memories(db) == []
    data.write_text("\n".join(lines[:299]) + "\n")
    assert gmem(capsys, "import", "--db", db, data).code == 0
    assert len(memories(db)) == 299


def test_export_while_the_server_runs(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "live.jsonl"
    result = gmem_process("export", "--db", served.db, dump, "--vectors")
    assert result.code == 0, result.err
    stats = gmem(capsys, "status", "--url", served.url, "--json").json
    lines = dump.read_text().splitlines()
    assert json.loads(lines[0])["greatmemory"]["memories"] == stats["memories"] == len(lines) - 1
    assert {json.loads(line)["text"] for line in lines[1:]} >= set(FACTS[:6])
    # The server is undisturbed: it still takes writes.
    added = gmem(capsys, "add", "--url", served.url, "--json", "--user-id", "export-test", "Written after export.")
    assert added.code == 0, added.err
    assert gmem(capsys, "delete", "--url", served.url, added.json["id"]).code == 0
    # To standard output, nothing but the lines.
    result = gmem(capsys, "export", "--db", served.db, "--namespace", "nobody")
    assert result.code == 0
    assert [json.loads(line)["greatmemory"]["memories"] for line in result.out.splitlines()] == [0]


# -- 5. status ----------------------------------------------------------------------------------


def test_status_of_database_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    current, old = tmp_path / "current.db", tmp_path / "old.db"
    seed(current, [{"text": fact} for fact in FACTS[:3]] + [{"text": FACTS[4], "namespace": "team"}])
    report = gmem(capsys, "status", "--db", current, "--json").json
    assert report["schema_version"] == LATEST and report["migrations_pending"] is False
    assert (report["memories"], report["namespaces"]) == (4, {"default": 3, "team": 1})
    assert (report["model"], report["model_label"]) == (ModelSpec.default().identity, "all-MiniLM-L6-v2-int8")
    assert report["in_use_by"] is None and report["readiness"] == "ready"
    text = gmem(capsys, "status", "--db", current).out
    assert f"model: all-MiniLM-L6-v2-int8 ({ModelSpec.default().identity})\n" in text
    assert f"schema: v{LATEST}; this release knows v{LATEST}" in text
    assert "memories: 4" in text and "team: 1" in text and "in use by: nobody" in text

    make_v1_database(old, "legacy-1", "Written by release one.", np.ones(384, dtype=np.float32).tobytes())
    before = sha256(old)
    result = gmem(capsys, "status", "--db", old, "--json")
    assert result.code == 0, result.err
    report = result.json
    assert (report["schema_version"], report["migrations_pending"], report["memories"]) == (1, True, 1)
    assert report["namespaces"] == {"default": 1} and report["model"] is None and report["in_use_by"] is None
    text = gmem(capsys, "status", "--db", old).out
    assert "schema: v1 (migrations pending)" in text and "migrations pending (applied on next open)" in text
    assert sha256(old) == before and read_version(old) == 1  # status never migrates or writes
    assert not list(tmp_path.glob("*.bak"))

    missing = gmem(capsys, "status", "--db", tmp_path / "missing.db")
    assert missing.code == 9 and "there is no database" in missing.error_line
    assert not (tmp_path / "missing.db").exists()


def test_status_of_a_server(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    report = gmem(capsys, "status", "--url", served.url, "--json").json
    assert report["ready"] is True and report["readiness"] == "ready"
    assert report["schema_version"] == LATEST and report["migrations_pending"] is False
    assert report["memories"] >= 6 and report["namespaces"]["default"] == report["memories"]
    assert isinstance(report["process_resident_bytes"], int) and report["process_resident_bytes"] > 0
    text = gmem(capsys, "status", "--url", served.url).out
    assert f"server: {served.url}" in text and "readiness: ready" in text and "server memory (resident):" in text
    assert f"model: all-MiniLM-L6-v2-int8 ({ModelSpec.default().identity})\n" in text
    # The same database seen as a file names the server process holding it.
    on_file = gmem(capsys, "status", "--db", served.db, "--json").json
    assert on_file["in_use_by"] == f"process {served.process.pid}"
    assert on_file["memories"] == report["memories"]


# -- 6. client commands, exit codes, --json shapes ---------------------------------------------------------


@pytest.mark.parametrize("where", ["db", "url"])
def test_add_search_get_delete(where: str, served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--db", str(tmp_path / "mem.db")] if where == "db" else ["--url", served.url]
    user = f"client-{where}"
    added = gmem(
        capsys,
        "add",
        *target,
        "--json",
        "--user-id",
        user,
        "--agent-id",
        "a1",
        "--metadata",
        '{"topic": "travel", "n": 1}',
        "Prefers window seats on trains.",
    )
    assert added.code == 0, added.err
    memory = added.json
    assert set(memory) == MEMORY_KEYS
    assert (memory["text"], memory["user_id"], memory["agent_id"], memory["namespace"]) == (
        "Prefers window seats on trains.",
        user,
        "a1",
        "default",
    )
    assert memory["metadata"] == {"topic": "travel", "n": 1} and memory["expires_at"] is None
    other = gmem(capsys, "add", *target, "--user-id", user, "Allergic to shellfish.")
    assert other.code == 0 and re.fullmatch(r"added \S+\n", other.out)

    result = gmem(capsys, "search", *target, "--json", "--user-id", user, "--limit", "5", "where does she sit?")
    assert result.code == 0, result.err
    hits = result.json["hits"]
    assert [set(h) for h in hits] == [{"memory", "score", "vector_score", "keyword_score"}] * 2
    assert hits[0]["memory"] == memory and isinstance(hits[0]["score"], float)
    result = gmem(
        capsys,
        "search",
        *target,
        "--json",
        "--user-id",
        user,
        "--filter",
        '{"topic": "travel"}',
        "--mode",
        "keyword",
        "seats",
    )
    assert [h["memory"]["id"] for h in result.json["hits"]] == [memory["id"]]
    text = gmem(capsys, "search", *target, "--user-id", user, "--mode", "vector", "--limit", "1", "seats").out
    assert re.fullmatch(rf"\d\.\d{{4}}  Prefers window seats on trains\.  \({memory['id']}\)\n", text)
    assert gmem(capsys, "search", *target, "--user-id", "nobody-at-all", "seats").out == "no memories match\n"

    got = gmem(capsys, "get", *target, "--json", memory["id"])
    assert got.code == 0 and got.json == memory
    text = gmem(capsys, "get", *target, memory["id"]).out
    assert f"{memory['id']}  [namespace=default, user_id={user}, agent_id=a1]" in text
    assert '  metadata: {"topic":"travel","n":1}' in text

    deleted = gmem(capsys, "delete", *target, "--json", memory["id"])
    assert deleted.code == 0 and deleted.json == {"deleted": memory["id"]}
    missing = gmem(capsys, "get", *target, memory["id"])
    assert missing.code == 8 and missing.out == ""
    assert missing.error_line.startswith("gmem: no memory with id")
    assert gmem(capsys, "delete", *target, memory["id"]).code == 8
    assert gmem(capsys, "delete", *target, other.out.split()[1]).code == 0


@pytest.mark.parametrize("where", ["db", "url"])
def test_add_and_search_by_event_time(where: str, served: Served, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--db", str(tmp_path / "mem.db")] if where == "db" else ["--url", served.url]
    user = f"when-{where}"
    added = gmem(capsys, "add", *target, "--json", "--user-id", user, "--occurred-at", "2023-06-01T14:00:00+02:00",
                 "Moved to Lisbon.")
    assert added.code == 0, added.err
    assert added.json["occurred_at"] == "2023-06-01T12:00:00.000Z"
    assert gmem(capsys, "add", *target, "--user-id", user, "Moved to Porto.").code == 0  # occurred now
    assert "  occurred 2023-06-01T12:00:00.000Z\n" in gmem(capsys, "get", *target, added.json["id"]).out

    def found(*bounds: str) -> list[str]:
        result = gmem(capsys, "search", *target, "--json", "--user-id", user, *bounds, "where did she move?")
        assert result.code == 0, result.err
        return [h["memory"]["text"] for h in result.json["hits"]]

    assert sorted(found()) == ["Moved to Lisbon.", "Moved to Porto."]
    assert found("--occurred-before", "2024-01-01T00:00:00Z") == ["Moved to Lisbon."]
    assert found("--occurred-after", "2024-01-01T00:00:00Z") == ["Moved to Porto."]
    bad = gmem(capsys, "add", *target, "--occurred-at", "last june", "Moved away.")
    assert bad.code == 2 and "occurred_at" in bad.error_line
    bad = gmem(capsys, "search", *target, "--occurred-after", "2024-02-01T00:00:00Z", "--occurred-before",
               "2024-01-01T00:00:00Z", "q")
    assert bad.code == 2 and "occurred_after" in bad.error_line


def test_usage_errors_exit_2_with_one_gmem_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mem.db"
    for argv in (
        ["add", "--db", str(db)],
        ["search"],
        ["get"],
        ["restore", "--db", str(db)],
        ["frobnicate"],
        ["search", "--mode", "fuzzy", "q"],
        ["search", "--limit", "many", "q"],
        ["keys"],
    ):
        result = gmem(capsys, *argv)
        assert result.code == 2, argv
        assert result.out == ""
        assert [line for line in result.err.splitlines() if line.startswith("gmem: ")] == [
            result.err.splitlines()[-1]
        ], argv
    # Values argparse accepts but the command refuses: the first one creates the (empty) database.
    for argv in (
        ["add", "   "],
        ["add", "--metadata", "{not json", "text"],
        ["add", "--metadata", "[1, 2]", "text"],
        ["search", "--filter", "{oops", "q"],
        ["search", "--limit", "0", "q"],
    ):
        result = gmem(capsys, *argv[:1], "--db", db, *argv[1:])
        assert result.code == 2, (argv, result.err)
        result.error_line  # noqa: B018 - exactly one "gmem: ..." line
    assert "--metadata must be JSON" in gmem(capsys, "add", "--db", db, "--metadata", "{", "t").error_line
    assert memories(db) == []


def test_a_url_without_a_scheme_suggests_http(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for argv in (["get", "some-id"], ["status"], ["add", "x"]):
        result = gmem(capsys, *argv[:1], "--url", "localhost:8420", *argv[1:])
        assert result.code == 2, (argv, result.err)
        assert "did you mean http://localhost:8420?" in result.error_line
    monkeypatch.setenv("GM_URL", "127.0.0.1:8420")
    result = gmem(capsys, "search", "q")
    assert result.code == 2 and result.error_line.startswith("gmem: GM_URL='127.0.0.1:8420' is not valid")
    assert "did you mean http://127.0.0.1:8420?" in result.error_line
    monkeypatch.setenv("GM_URL", "ftp://127.0.0.1:8420")
    assert "expected an http:// or https:// URL" in gmem(capsys, "search", "q").error_line


@pytest.mark.parametrize("fault", ["not SQLite", "SQLite header then garbage", "missing folder"])
def test_serve_on_a_database_that_can_never_open_exits_instead_of_retrying(tmp_path: Path, fault: str) -> None:
    db = tmp_path / "no-such-folder" / "mem.db" if fault == "missing folder" else tmp_path / "mem.db"
    if fault == "not SQLite":
        db.write_text("id,text\n1,a spreadsheet\n")
    elif fault == "SQLite header then garbage":
        db.write_bytes(sqlite_header_then_garbage(8192))
    result = gmem_process("serve", "--db", db, "--port", "0")  # retrying forever would time out here
    assert result.code == 9, result.err
    [line] = [line for line in result.err.splitlines() if "cannot serve" in line]
    expected = "does not exist" if fault == "missing folder" else "is not a SQLite database"
    assert expected in line and "newer" not in line
    assert "Traceback" not in result.err


def test_a_broken_tokenizer_is_one_line(tmp_path: Path) -> None:
    models = tmp_path / "model"
    models.mkdir()
    (models / "model.onnx").symlink_to(ModelSpec.default().model_path)
    (models / "tokenizer.json").write_text('{"version": "1.0", "truncation": nul')
    done = subprocess.run(
        [sys.executable, "-m", "gm", "add", "--db", str(tmp_path / "mem.db"), "A memory."],
        env={"PATH": "/usr/bin:/bin", "GM_MODEL_DIR": str(models)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 5, done.stderr
    assert done.stderr.splitlines() == [f"gmem: cannot read tokenizer {models / 'tokenizer.json'}: "
                                        + done.stderr.split(": ", 2)[2].strip()]


def test_unreachable_server_and_missing_database_exit_9(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["add", "x"], ["search", "q"], ["get", "some-id"], ["delete", "some-id"], ["status"]):
        result = gmem(capsys, *argv[:1], "--url", url, *argv[1:])
        assert result.code == 9, (argv, result.err)
        assert f"no greatmemory server answered at {url}" in result.error_line
    for argv in (["search", "q"], ["get", "some-id"], ["delete", "some-id"]):
        result = gmem(capsys, *argv[:1], "--db", tmp_path / "typo.db", *argv[1:])
        assert result.code == 9 and "there is no database" in result.error_line
    assert not (tmp_path / "typo.db").exists()  # a typo does not create a database


class NotGreatmemory(http.server.BaseHTTPRequestHandler):
    """Some other web service, listening where --url points."""

    def do_GET(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body>It works!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_DELETE = do_GET

    def log_message(self, *args: Any) -> None:
        pass


def test_other_failures_are_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotGreatmemory)
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{web.server_address[1]}"
        for argv in (["status"], ["add", "x"], ["get", "some-id"]):
            result = gmem(capsys, *argv[:1], "--url", url, *argv[1:])
            assert result.code == 9, (argv, result.err)
            assert "not a greatmemory server" in result.error_line
    finally:
        web.shutdown()
        web.server_close()
    db = tmp_path / "mem.db"
    db.write_bytes(b"")
    assert gmem(capsys, "add", "--db", db, "A memory to export.").code == 0
    nowhere = tmp_path / "no-such-folder"
    result = gmem(capsys, "export", "--db", db, nowhere / "out.jsonl")
    assert result.code == 1 and "No such file or directory" in result.error_line
    result = gmem(capsys, "backup", "--db", db, nowhere / "b.db")
    assert result.code == 1 and "unable to open database file" in result.error_line
    assert not nowhere.exists()


def test_keys_new(capsys: pytest.CaptureFixture[str]) -> None:
    first, second = gmem(capsys, "keys", "new").out.strip(), gmem(capsys, "keys", "new").out.strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", first) and first != second
    # One in 64 bare token_urlsafe keys starts with "-", which argparse reads as a flag: none may.
    keys = {new_key() for _ in range(5000)}
    assert len(keys) == 5000
    for key in keys:
        assert not key.startswith("-") and key.startswith("gm_")
        assert len(base64.urlsafe_b64decode(key[3:] + "=")) == 32  # still 256 random bits
    parser = build_parser()
    for key in sorted(keys)[:500]:
        assert parser.parse_args(["get", "--url", "http://127.0.0.1:1", "--api-key", key, "some-id"]).api_key == key
    bound = gmem(capsys, "keys", "new", "--namespace", "team").out.strip()
    key, _, namespace = bound.rpartition("@")
    assert namespace == "team" and re.fullmatch(r"[A-Za-z0-9_-]{40,}", key)
    report = gmem(capsys, "keys", "new", "--namespace", "team", "--json").json
    assert report["gm_api_keys_entry"] == report["key"] + "@team"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert gmem(capsys, "version").out == f"greatmemory {gm.__version__} (schema v{LATEST})\n"
    assert gmem(capsys, "version", "--json").json == {"version": gm.__version__, "schema_version": LATEST}
    script = Path(sys.executable).parent / "gmem"  # the installed console script
    done = subprocess.run([script, "version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"greatmemory {gm.__version__} (schema v{LATEST})\n")


def all_commands() -> list[list[str]]:
    """Every command path the parser knows, e.g. ["backup"], ["keys", "new"], read from the parser."""
    found: list[list[str]] = [[]]

    def walk(parser: Any, path: list[str]) -> None:
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, child in action.choices.items():
                    found.append([*path, name])
                    walk(child, [*path, name])

    walk(build_parser(), [])
    return found


def test_every_help_exits_0_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    commands = all_commands()
    assert {
        "serve",
        "status",
        "backup",
        "restore",
        "export",
        "import",
        "add",
        "search",
        "get",
        "delete",
        "keys",
        "version",
    } <= {c[0] for c in commands if c}
    assert ["keys", "new"] in commands
    for command in commands:
        result = gmem(capsys, *command, "--help")
        assert result.code == 0, command
        assert "Example" in result.out, command
        assert result.out.startswith("usage: gmem"), command
