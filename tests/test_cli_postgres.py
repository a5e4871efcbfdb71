"""``gmem`` on a Postgres database: status (with --db or GM_DATABASE_URL, text and --json),
backup/restore pointing at pg_dump, and export/import moving every memory from Postgres
to a SQLite file and back, with and without vectors.

Real parts only: the Postgres on 127.0.0.1 (fresh databases, dropped afterwards), temp
SQLite files, the default model. Commands run in-process through ``gm.cli.main``, as in
tests/test_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

import gm
from gm.embedding import ModelSpec
from gm.storage.postgres_migrations import LATEST, STEPS, Step
from tests.conftest import pg_fetch
from tests.test_cli import FACTS, gmem

FIELDS = "id, namespace, user_id, agent_id, session_id, text, metadata, created_at, updated_at, expires_at, embedding"


def stored(target: str | Path) -> dict[str, tuple[Any, ...]]:
    """Every stored memory by id, all fields (metadata parsed, embedding as float32)."""
    if isinstance(target, Path):
        conn = sqlite3.connect(f"file:{target.resolve()}?mode=ro", uri=True)
        try:
            rows = [tuple(r) for r in conn.execute(f"SELECT {FIELDS} FROM memories")]
        finally:
            conn.close()
    else:
        rows = [tuple(r) for r in asyncio.run(pg_fetch(target, f"SELECT {FIELDS} FROM memories"))]
    return {
        row[0]: (*row[1:6], orjson.loads(row[6]), *row[7:10], np.frombuffer(row[10], dtype="<f4"))
        for row in rows
    }


def assert_same_memories(got: dict[str, tuple[Any, ...]], want: dict[str, tuple[Any, ...]], exact: bool) -> None:
    """Same ids and every field equal; vectors identical when ``exact``, else re-embedded (near-identical)."""
    assert sorted(got) == sorted(want)
    for memory_id, row in want.items():
        assert got[memory_id][:-1] == row[:-1], memory_id
        if exact:
            assert got[memory_id][-1].tobytes() == row[-1].tobytes(), memory_id
        else:
            assert float(np.dot(got[memory_id][-1], row[-1])) == pytest.approx(1.0, abs=1e-4), memory_id


def seed_varied(url: str) -> None:
    """Memories with every field in use: scopes, metadata, a client id, a TTL, an update, a deletion."""

    async def run() -> None:
        async with gm.open(url) as store:
            made = await store.add_many([
                {
                    "text": fact,
                    "user_id": f"u{i % 3}" if i % 4 else None,
                    "agent_id": "planner" if i % 2 else None,
                    "session_id": f"s{i}" if i % 5 == 0 else None,
                    "metadata": {"i": i, "topic": ["travel", "health", "work"][i % 3], "tags": ["a", "é"],
                                 "nested": {"ok": i % 2 == 0, "score": i / 7}},
                }
                for i, fact in enumerate(FACTS)
            ])
            await store.add_many([
                {"text": f"Team note {i}: {fact}", "namespace": "team", "user_id": "u1"}
                for i, fact in enumerate(FACTS[:3])
            ])
            await store.add("Chosen id: the spare key is under the blue pot.", id="client-chosen-1")
            await store.add("Temporary: parked on level 3.", ttl_seconds=3600, metadata={"kind": "ttl"})
            await store.update(made[2].id, text="Her favourite programming language is now Zig.",
                               metadata={"topic": "work", "changed": True})
            await store.delete(made[3].id)

    asyncio.run(run())


def search_each(target: str | Path, memories: dict[str, tuple[Any, ...]]) -> None:
    """Every memory is found by a search for its own text in its own scope."""

    async def run() -> None:
        async with gm.open(target) as store:
            for memory_id, (namespace, user_id, agent_id, session_id, text, *_) in memories.items():
                scope = {"namespace": namespace, "user_id": user_id, "agent_id": agent_id, "session_id": session_id}
                hits = await store.search(text, mode="vector", limit=1, **scope)
                assert [h.memory.id for h in hits] == [memory_id], text
                hits = await store.search(text, mode="keyword", limit=5, **scope)
                assert memory_id in [h.memory.id for h in hits], text
            hits = await store.search("programming language", user_id="u2", mode="hybrid", limit=3)
            assert "Zig" in hits[0].memory.text

    asyncio.run(run())


# -- status ------------------------------------------------------------------------------------


def test_status_of_a_postgres_database(
    pg_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GM_URL", raising=False)
    monkeypatch.delenv("GM_DATABASE_URL", raising=False)
    # An empty database: status reads, and does not migrate it.
    report = gmem(capsys, "status", "--db", pg_url, "--json").json
    assert (report["backend"], report["schema_version"], report["migrations_pending"]) == ("postgres", 0, True)
    assert report["readiness"] == "migrations pending (the first instance to start applies them)"
    assert (report["memories"], report["namespaces"], report["model"]) == (0, {}, None)
    assert asyncio.run(pg_fetch(pg_url, "SELECT to_regclass('gm_schema')"))[0][0] is None

    async def seed() -> None:
        async with gm.open(pg_url) as store:
            await store.add_many([{"text": fact} for fact in FACTS[:3]] + [{"text": FACTS[4], "namespace": "team"}])

    asyncio.run(seed())
    for argv, env in ((["--db", pg_url], None), ([], pg_url)):
        if env:
            monkeypatch.setenv("GM_DATABASE_URL", env)
        result = gmem(capsys, "status", *argv, "--json")
        assert result.code == 0, result.err
        report = result.json
        assert report["target"] == pg_url and report["backend"] == "postgres"
        assert (report["schema_version"], report["latest_schema_version"]) == (LATEST, LATEST)
        assert report["migrations_pending"] is False and report["readiness"] == "ready"
        assert (report["memories"], report["namespaces"]) == (4, {"default": 3, "team": 1})
        assert report["model"] == ModelSpec.default().identity
        assert isinstance(report["database_bytes"], int) and report["database_bytes"] > 0
        assert report["vector_search"] in ("pgvector (HNSW, cosine)", "in-process index in each instance")
        assert report["connected_instances"] == 0

        result = gmem(capsys, "status", *argv)
        assert result.code == 0, result.err
        text = result.out
        assert f"database: {pg_url}\nreadiness: ready\nbackend: postgres\n" in text
        assert f"schema: v{LATEST}; this release knows v{LATEST}" in text
        assert "memories: 4\n  default: 3\n  team: 1\n" in text
        assert f"model: all-MiniLM-L6-v2-int8 ({ModelSpec.default().identity})\n" in text
        assert "connected instances: 0" in text


def test_status_text_names_the_backend(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> None:
        async with gm.open(pg_url) as store:
            await store.add(FACTS[0])

    asyncio.run(seed())
    assert "backend: postgres" in gmem(capsys, "status", "--db", pg_url).out


@pytest.mark.parametrize("additive", [False, True], ids=["contract", "expand"])
def test_status_and_export_of_a_schema_newer_than_this_release(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], additive: bool
) -> None:
    newer = Step(LATEST + 1, "a step of a newer release", ("ALTER TABLE memories ADD COLUMN x text",),
                 additive=additive)

    async def migrate_newer() -> None:
        async with gm.open(pg_url, steps=(*STEPS, newer)) as store:
            await store.add(FACTS[0])

    asyncio.run(migrate_newer())
    report = gmem(capsys, "status", "--db", pg_url, "--json").json
    assert (report["schema_version"], report["migrations_pending"]) == (LATEST + 1, False)
    result = gmem(capsys, "export", "--db", pg_url, tmp_path / "out.jsonl")
    if additive:  # this release runs on it, and exports it
        assert report["readiness"] == "newer than this release, backward compatible (this release runs on it)"
        assert result.code == 0, result.err
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    else:
        assert report["readiness"] == "refused: newer than this release"
        assert result.code == 3 and f"schema version {LATEST + 1}" in result.error_line
        assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


# -- backup / restore ----------------------------------------------------------------------------


def test_backup_and_restore_of_postgres_point_to_pg_dump(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GM_DATABASE_URL", raising=False)
    backup = tmp_path / "b.db"
    for argv in (["backup", "--db", pg_url, backup], ["backup", "--db", pg_url],
                 ["restore", "--db", pg_url, backup]):
        result = gmem(capsys, *argv)
        assert result.code != 0 and result.out == "", argv
        line = result.error_line
        assert "pg_dump" in line and "Postgres" in line, line
        assert f"gmem {argv[0]} works on SQLite files" in line
    monkeypatch.setenv("GM_DATABASE_URL", pg_url)
    for argv in (["backup", backup], ["restore", backup]):
        result = gmem(capsys, *argv)
        assert result.code != 0 and "pg_dump" in result.error_line, argv
    assert list(tmp_path.iterdir()) == []


# -- export / import between the backends ------------------------------------------------------------


@pytest.mark.parametrize("vectors", [True, False], ids=["with-vectors", "re-embedded"])
def test_export_import_postgres_to_sqlite_and_back(
    pg_url: str, other_pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], vectors: bool
) -> None:
    seed_varied(pg_url)
    source = stored(pg_url)
    assert len(source) == len(FACTS) - 1 + 3 + 2
    flag = ["--vectors"] if vectors else []

    # Postgres -> SQLite
    dump, sqlite_db = tmp_path / "from-postgres.jsonl", tmp_path / "copy.db"
    result = gmem(capsys, "export", "--db", pg_url, dump, "--json", *flag)
    assert result.code == 0, result.err
    assert result.json == {"exported": len(source), "path": str(dump), "vectors": vectors}
    lines = dump.read_bytes().splitlines()
    header = json.loads(lines[0])["greatmemory"]
    assert (header["memories"], header["vectors"], header["schema_version"]) == (len(source), vectors, LATEST)
    assert header["model"] == ModelSpec.default().identity
    result = gmem(capsys, "import", "--db", sqlite_db, dump, "--json")
    assert result.code == 0, result.err
    assert result.json == {"imported": len(source), "embedded": 0 if vectors else len(source), "skipped": []}
    assert_same_memories(stored(sqlite_db), source, exact=vectors)

    # SQLite -> Postgres
    back = tmp_path / "from-sqlite.jsonl"
    result = gmem(capsys, "export", "--db", sqlite_db, back, "--json", *flag)
    assert result.code == 0, result.err
    result = gmem(capsys, "import", "--db", other_pg_url, back, "--json")
    assert result.code == 0, result.err
    assert result.json == {"imported": len(source), "embedded": 0 if vectors else len(source), "skipped": []}
    assert_same_memories(stored(other_pg_url), source, exact=vectors)

    search_each(sqlite_db, source)
    search_each(other_pg_url, source)

    # Importing again adds nothing to Postgres, and says why for every line.
    report = gmem(capsys, "import", "--db", other_pg_url, back, "--json").json
    assert (report["imported"], report["embedded"]) == (0, 0)
    assert {s["id"] for s in report["skipped"]} == set(source)
    assert {s["reason"] for s in report["skipped"]} == {"already present with the same content"}
    assert_same_memories(stored(other_pg_url), source, exact=vectors)


def test_export_of_one_namespace_from_postgres(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    seed_varied(pg_url)
    result = gmem(capsys, "export", "--db", pg_url, "--namespace", "team")
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert lines[0]["greatmemory"]["memories"] == 3
    assert [line["text"] for line in lines[1:]] == [f"Team note {i}: {fact}" for i, fact in enumerate(FACTS[:3])]
    assert lines[0]["greatmemory"]["schema_version"] == LATEST
