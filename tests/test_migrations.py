"""The promises of the "Upgrades & migrations" page, on real SQLite files: automatic stepwise
migrations, the ``<db>.pre-v<N>.bak`` snapshot, rollback of a failing step, the downgrade
guard, and a start-up that does not load the model.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import gm
from gm.embedding import ModelSpec
from gm.errors import MigrationFailed, SchemaTooNew
from gm.storage.sqlite import SQLiteBackend
from gm.storage.sqlite_migrations import LATEST, STEPS, Step, migrate, read_version, snapshot_path


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    return {r[0] for r in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_v1_database(path: Path) -> None:
    """A database as release 1 left it: schema v1 with one memory in it."""
    assert migrate(path, target=1) == 1
    vector = np.zeros(384, dtype=np.float32)
    vector[0] = 1.0
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO memories (id, namespace, user_id, text, metadata, created_at, updated_at, embedding) "
            "VALUES ('legacy-1', 'default', 'u1', 'Written by release one.', '{\"topic\": \"old\"}', 1, 1, ?)",
            [vector.tobytes()],
        )
    conn.close()


def failing(message: str) -> Step:
    def apply(conn: sqlite3.Connection) -> None:
        raise RuntimeError(message)

    return Step(LATEST + 1, "boom", apply)


def no_bak_files(directory: Path) -> bool:
    return not list(directory.glob("*.bak*"))


# -- new and current databases ---------------------------------------------------------------


async def test_a_new_database_is_migrated_without_a_snapshot(db_path: Path, tmp_path: Path) -> None:
    async with gm.open(db_path) as store:
        assert (await store.stats()).schema_version == LATEST
        await store.add("First memory.")
    assert user_version(db_path) == LATEST
    assert no_bak_files(tmp_path)

    async with gm.open(db_path) as store:  # up to date already: nothing to migrate, nothing to snapshot
        assert (await store.stats()).memories == 1
    assert no_bak_files(tmp_path)


def test_migrate_creates_a_database_step_by_step(db_path: Path, tmp_path: Path) -> None:
    assert read_version(db_path) is None
    assert migrate(db_path, target=1) == 1
    assert "memories" in tables(db_path) and "memories_fts" not in tables(db_path)
    assert migrate(db_path) == LATEST
    assert "memories_fts" in tables(db_path)
    assert migrate(db_path) == LATEST  # idempotent
    assert no_bak_files(tmp_path)  # it never held data


# -- upgrading a database that holds data ------------------------------------------------------


async def test_upgrading_existing_data_writes_a_snapshot_first(db_path: Path) -> None:
    make_v1_database(db_path)

    async with gm.open(db_path) as store:
        assert (await store.stats()).schema_version == LATEST
        memory = await store.get("legacy-1")
        assert memory.text == "Written by release one." and memory.metadata == {"topic": "old"}
        assert [h.memory.id for h in await store.search("release", mode="keyword")] == ["legacy-1"]  # v2 indexed it
        await store.add("Written after the upgrade.")
    assert user_version(db_path) == LATEST

    snapshot = snapshot_path(db_path, LATEST)
    assert snapshot == Path(f"{db_path}.pre-v{LATEST}.bak")
    assert snapshot.is_file()
    assert rows(snapshot, "PRAGMA integrity_check") == [("ok",)]
    assert user_version(snapshot) == 1
    assert rows(snapshot, "SELECT id, text FROM memories") == [("legacy-1", "Written by release one.")]
    assert "memories_fts" not in tables(snapshot)
    assert not Path(f"{snapshot}.partial").exists()


async def test_a_failing_step_is_rolled_back_and_named(db_path: Path) -> None:
    make_v1_database(db_path)

    with pytest.raises(MigrationFailed) as caught:
        await gm.open(db_path, steps=(*STEPS, failing("disk on fire")))
    error = caught.value
    assert error.step == LATEST + 1 and error.name == "boom"
    assert f"step {LATEST + 1}" in error.message and "disk on fire" in error.message
    assert f"schema version {LATEST}" in error.message

    # Each step commits on its own: the good ones stay, the failing one left no trace.
    assert user_version(db_path) == LATEST
    assert rows(db_path, "SELECT id, text, metadata FROM memories") == [
        ("legacy-1", "Written by release one.", '{"topic": "old"}')
    ]
    snapshot = snapshot_path(db_path, LATEST + 1)
    assert snapshot.is_file() and user_version(snapshot) == 1
    assert rows(snapshot, "SELECT id FROM memories") == [("legacy-1",)]

    async with gm.open(db_path) as store:  # this release's own steps are all applied: it opens
        assert (await store.get("legacy-1")).text == "Written by release one."
    assert snapshot.is_file()  # the snapshot stays for the operator


async def test_a_failing_step_on_a_current_database_keeps_its_data(db_path: Path) -> None:
    async with gm.open(db_path) as store:
        memory = await store.add("Keep me through a failed upgrade.")
    before = rows(db_path, "SELECT id, text FROM memories")

    backend = SQLiteBackend(db_path, steps=(*STEPS, failing("nope")))
    store = gm.Store(backend, ModelSpec.default())
    with pytest.raises(MigrationFailed) as caught:
        await store.open()
    await store.close()
    assert caught.value.step == LATEST + 1
    assert backend.phase == "failed"
    assert user_version(db_path) == LATEST
    assert rows(db_path, "SELECT id, text FROM memories") == before == [(memory.id, memory.text)]
    assert snapshot_path(db_path, LATEST + 1).is_file()


def test_a_partially_applied_step_is_rolled_back_whole(db_path: Path) -> None:
    migrate(db_path)
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('marker', 'before')")
    conn.close()

    def half(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        conn.execute("INSERT INTO half_done VALUES (1)")
        conn.execute("UPDATE meta SET value = 'during' WHERE key = 'marker'")
        conn.execute("ALTER TABLE no_such_table ADD COLUMN y TEXT")  # fails: the step stops here

    with pytest.raises(MigrationFailed) as caught:
        migrate(db_path, (*STEPS, Step(LATEST + 1, "half", half)))
    assert caught.value.step == LATEST + 1
    assert "no_such_table" in caught.value.message
    assert "half_done" not in tables(db_path)
    assert rows(db_path, "SELECT value FROM meta WHERE key = 'marker'") == [("before",)]
    assert user_version(db_path) == LATEST


# -- downgrade protection ----------------------------------------------------------------------


async def test_a_newer_schema_is_refused_and_left_untouched(db_path: Path, tmp_path: Path) -> None:
    async with gm.open(db_path) as store:
        await store.add("Written by the future.")
    newer = LATEST + 3
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    digest = sha256(db_path)

    with pytest.raises(SchemaTooNew) as caught:
        await gm.open(db_path)
    message = caught.value.message
    assert f"version {newer}" in message and f"version {LATEST}" in message
    with pytest.raises(SchemaTooNew):
        migrate(db_path)

    assert sha256(db_path) == digest
    assert no_bak_files(tmp_path)
    # refusing reads the header only: no -wal or -shm appears next to the file
    assert not Path(f"{db_path}-wal").exists() and not Path(f"{db_path}-shm").exists()
    assert user_version(db_path) == newer  # (a plain connection that may checkpoint on close)
    assert sha256(db_path) == digest


# -- start-up does not need the model ------------------------------------------------------------


async def test_the_model_loads_lazily(db_path: Path) -> None:
    async with gm.open(db_path) as store:
        await store.add("Loads the model.")
    async with gm.open(db_path) as store:
        stats = await store.stats()
        assert stats.memories == 1
        assert store.embedder.loaded is False and stats.extra["model_loaded"] is False
        await store.list()
        await store.get((await store.list()).memories[0].id)
        assert store.embedder.loaded is False
        [hit] = await store.search("model")
        assert hit.memory.text == "Loads the model."
        assert store.embedder.loaded is True
        assert (await store.stats()).extra["model_loaded"] is True


async def test_a_retried_upgrade_keeps_the_snapshot_of_the_older_version(db_path: Path, tmp_path: Path) -> None:
    """v1 -> v3 fails at step 3 after step 2 committed; the retry must not replace the v1
    snapshot (the one the previous release can open) with a copy of the half-way v2."""
    migrate(db_path, target=1)
    conn = sqlite3.connect(db_path)
    conn.execute("INSERT INTO meta (key, value) VALUES ('marker', 'v1 data')")
    conn.commit()
    conn.close()

    def boom(conn: sqlite3.Connection) -> None:
        raise RuntimeError("step 3 is broken")

    steps = (*STEPS, Step(LATEST + 1, "broken", boom))
    for _ in range(2):
        with pytest.raises(MigrationFailed):
            migrate(db_path, steps)
        assert user_version(db_path) == LATEST
    snapshot = snapshot_path(db_path, LATEST + 1)
    assert user_version(snapshot) == 1
    assert rows(snapshot, "SELECT value FROM meta WHERE key = 'marker'") == [("v1 data",)]
