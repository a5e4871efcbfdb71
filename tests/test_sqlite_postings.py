"""The keyword postings in process (gm.storage.sqlite_postings) rank every namespace and user
exactly as FTS5's bm25() does, to the bit and in the same order, once built, as they follow
adds, rewrites, deletes and refused writes, when writes race their build, after they are
built again for a long tail, and with MaxScore pruning on; terms FTS5 reads as phrases fall
back to FTS5. Saved beside the database at close, they are read back at open, and a file that
is damaged, truncated, of an earlier state or left by a killed save is never served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from gm.errors import GMError
from gm.memory import NewMemory, Scope
from gm.search import keyword_terms
from gm.storage import postings_file, postings_follower, sqlite_keywords, sqlite_postings
from gm.storage.base import AddMemories, DeleteMemory, UpdateMemory
from gm.storage.postings_file import postings_path
from gm.storage.sqlite import SQLiteBackend
from tests.test_keyword_scope import NOW, T0, VECTOR, WEIGHTS, WORDS, ignore_changes, mix, text

SCOPES = [Scope("main"), Scope("team"), Scope("tiny"), Scope("main", "u3"), Scope("team", "u7"),
          Scope("main", "nobody"), Scope("nowhere")]


def queries(seed: int, n: int = 60) -> list[tuple[list[str], Scope, int]]:
    rng = random.Random(seed)
    out = [(keyword_terms(" ".join(rng.choices(WORDS, WEIGHTS, k=rng.randint(1, 4)))), rng.choice(SCOPES),
            rng.choice([1, 5, 10, 50, 500])) for _ in range(n)]
    out.append((["running", "runs", "garden"], Scope("main"), 20))  # two words, one token: two phrases
    out.append((["coffee_tea", "garden"], Scope("main"), 20))  # a phrase of two tokens: FTS5 ranks it
    return out


async def fts5(backend: SQLiteBackend, terms: list[str], scope: Scope, limit: int) -> list[tuple[int, float]]:
    """FTS5's own ranking of the scope (the keyed index alone, no postings)."""
    return await sqlite_keywords.search(backend.slots, terms, scope, None, limit, NOW, None, backend.schema_version)


async def built(backend: SQLiteBackend) -> sqlite_postings.Postings:
    async with asyncio.timeout(30):
        while backend.postings is None or backend.postings.postings is None:
            await asyncio.sleep(0.01)
    return backend.postings.postings


async def same_as_fts5(backend: SQLiteBackend, seed: int) -> int:
    """Every query's page from the backend (its postings) is FTS5's, to the bit; returns how many were nonempty."""
    nonempty, ranked = 0, []
    follower = backend.postings
    assert follower is not None
    top = follower.top

    def spy(*args: object) -> object:
        answer = top(*args)  # type: ignore[arg-type]
        ranked.append(answer is not None)
        return answer

    follower.top = spy  # type: ignore[method-assign]
    try:
        for terms, scope, limit in queries(seed):
            expected = await fts5(backend, terms, scope, limit)
            assert await backend.keyword_search(terms, scope, None, limit, NOW) == expected, (terms, scope, limit)
            nonempty += bool(expected)
    finally:
        del follower.top
    assert sum(ranked) >= 30 and not all(ranked)  # the postings ranked them, but the phrase of two tokens
    scratch = follower.postings._partial if follower.postings is not None else None
    assert scratch is None or not scratch.any()  # (every slot a ranking touched is reset)
    return nonempty


def statistics(db: Path) -> tuple[int, int]:
    """FTS5's row and token counts (its docsize table)."""
    conn = sqlite3.connect(db)
    try:
        rows = tokens = 0
        for (blob,) in conn.execute("SELECT sz FROM memories_search_docsize"):
            rows += 1
            value = shift = 0
            for byte in blob:
                value |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    tokens, value, shift = tokens + value, 0, 0
        return rows, tokens
    finally:
        conn.close()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(tmp_path / "m.db")
    await b.open(ignore_changes)
    try:
        items = mix(1500)
        for start in range(0, len(items), 300):
            await b.write(AddMemories(items[start:start + 300], T0))
        await built(b)  # (at open, of the empty file: these rows went into its tail)
        assert b.postings is not None
        await asyncio.to_thread(b.postings.build)  # (these rows in its base)
        yield b
    finally:
        await b.close()


async def writes(backend: SQLiteBackend, rng: random.Random, n: int, keys: list[str]) -> None:
    """``n`` adds, rewrites and deletes, and adds refused part way."""
    for _ in range(n):
        kind = rng.randrange(4)
        key = rng.choice(keys)
        if kind == 0:
            fresh = f"w{rng.randrange(10**9)}"
            scope = Scope(rng.choice(["main", "team"]), rng.choice([None, "u3", "u7"]))
            await backend.write(AddMemories([NewMemory(fresh, True, scope, text(rng), {}, None, vector=VECTOR)], T0))
            keys.append(fresh)
        elif kind == 1:
            await backend.write(UpdateMemory(key, T0, text=text(rng)))
        elif kind == 2:
            await backend.write(DeleteMemory(key, T0))
            keys.remove(key)
        else:
            # An id taken, with other content: the add is refused after its first memory went in
            # (and the savepoint rolled it back; the triggers saw it come and go).
            fresh = NewMemory(f"w{rng.randrange(10**9)}", True, Scope("main"), text(rng), {}, None, vector=VECTOR)
            taken = NewMemory(key, True, Scope("main"), "an id taken already", {}, None, vector=VECTOR)
            with pytest.raises(GMError):
                await backend.write(AddMemories([fresh, taken], T0))


@pytest.mark.parametrize(("rare", "lookup_cost"), [
    (sqlite_postings.RARE, sqlite_postings.LOOKUP_COST), (3, sqlite_postings.LOOKUP_COST), (3, 10**9), (3, 0),
], ids=["every-word-scored", "maxscore-pruning", "maxscore-scoring-the-rest", "maxscore-looking-up-the-rest"])
async def test_the_postings_rank_as_fts5_through_writes(
    backend: SQLiteBackend, rare: int, lookup_cost: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlite_postings, "RARE", rare)
    monkeypatch.setattr(sqlite_postings, "LOOKUP_COST", lookup_cost)  # (the words left: scored, or looked up)
    postings = await built(backend)
    assert (postings.rows, postings.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 1) >= 40
    keys = [f"m{i}" for i in range(1500)]
    await writes(backend, random.Random(5), 120, keys)
    assert backend.postings is not None and backend.postings.postings is postings  # (followed, not rebuilt)
    assert len(postings.tail) > 20 and postings.dead > 20
    assert (postings.rows, postings.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 2) >= 40


async def test_writes_racing_the_build_are_all_applied(backend: SQLiteBackend) -> None:
    first = await built(backend)
    assert backend.postings is not None
    keys = [f"m{i}" for i in range(1500)]
    done = asyncio.Event()

    async def keep_writing() -> None:
        rng = random.Random(9)
        while not done.is_set():
            await writes(backend, rng, 5, keys)

    writer = asyncio.create_task(keep_writing())
    try:
        for _ in range(3):  # builds, each with writes before, during and after its snapshot
            await asyncio.to_thread(backend.postings.build)
            await asyncio.sleep(0.05)
    finally:
        done.set()
        await writer
    latest = await built(backend)
    assert latest is not first
    assert (latest.rows, latest.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 3) >= 40


async def test_a_long_tail_builds_them_again(backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    first = await built(backend)
    monkeypatch.setattr(sqlite_postings, "TAIL_ROWS", 30)
    await writes(backend, random.Random(11), 120, [f"m{i}" for i in range(1500)])
    async with asyncio.timeout(30):
        while (latest := await built(backend)) is first:
            await asyncio.sleep(0.01)
    assert len(latest.tail) < len(first.tail) or not latest.stale
    assert (latest.rows, latest.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 4) >= 40


async def test_expired_rows_at_the_top_are_passed_over(tmp_path: Path) -> None:
    """The best rows expired: the page is ranked deeper, then by FTS5, never short."""
    b = SQLiteBackend(tmp_path / "e.db")
    await b.open(ignore_changes)
    try:
        gone = [NewMemory(f"x{i}", True, Scope("main"), "piano piano piano", {}, T0 + 1, vector=VECTOR)
                for i in range(300)]
        kept = [NewMemory(f"k{i}", True, Scope("main"), f"piano lesson {i} on a long afternoon", {}, None,
                          vector=VECTOR) for i in range(30)]
        await b.write(AddMemories(gone + kept, T0))
        await built(b)
        for limit in (5, 30):
            page = await b.keyword_search(["piano"], Scope("main"), None, limit, NOW)
            assert page == await fts5(b, ["piano"], Scope("main"), limit)
            assert len(page) == limit
    finally:
        await b.close()


# -- saved beside the database ------------------------------------------------------------


async def reopened(path: Path) -> SQLiteBackend:
    b = SQLiteBackend(path)
    await b.open(ignore_changes)
    return b


@pytest.fixture
def saving(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postings_file, "SAVE_MIN_ROWS", 100)


async def test_saved_postings_are_read_back_at_open(backend: SQLiteBackend, saving: None) -> None:
    path = backend.path
    await writes(backend, random.Random(21), 60, [f"m{i}" for i in range(1500)])  # (a tail too)
    expected = [await fts5(backend, t, s, n) for t, s, n in queries(6)]
    await backend.close()
    assert postings_path(path).exists()
    again = await reopened(path)
    try:
        postings = await built(again)
        assert not postings.changed  # read from the file, not built
        base = postings.base  # mapped from it, not copied into the process's memory (plain arrays over the mapping)
        assert all(type(a) is np.ndarray and isinstance(a.base, np.memmap) for a in (base.keys, base.lengths, base.rows,
                                                                                    base.halves))
        assert len(postings.tail) > 10 and (postings.rows, postings.tokens) == statistics(path)
        assert [await again.keyword_search(t, s, None, n, NOW) for t, s, n in queries(6)] == expected
        await writes(again, random.Random(22), 40, [f"m{i}" for i in range(1500) if i % 7])
        assert postings.changed
        expected = [await fts5(again, t, s, n) for t, s, n in queries(7)]
    finally:
        await again.close()
    third = await reopened(path)
    try:
        assert not (await built(third)).changed  # saved again at close, with those writes
        assert [await third.keyword_search(t, s, None, n, NOW) for t, s, n in queries(7)] == expected
    finally:
        await third.close()
    backend.postings = None  # (closed already)


@pytest.mark.parametrize("fault", ["damaged", "truncated", "stale", "rewritten", "killed save"])
async def test_a_saved_file_that_does_not_match_is_never_served(
    backend: SQLiteBackend, saving: None, fault: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "gm")
    path = backend.path
    await backend.close()
    backend.postings = None
    saved = postings_path(path)
    size = saved.stat().st_size
    if fault == "damaged":
        with saved.open("r+b") as f:
            f.seek(size - 100)
            f.write(b"\xff" * 8)
    elif fault == "truncated":
        os.truncate(saved, size // 2)
    elif fault in ("stale", "rewritten"):  # written to while closed, by another program
        conn = sqlite3.connect(path)
        if fault == "stale":
            conn.execute("DELETE FROM memories WHERE rowid IN (SELECT rowid FROM memories LIMIT 50)")
        else:  # (as many rows and words as before: only the index's own records tell)
            conn.execute("UPDATE memories SET text = 'zebra ' || substr(text, 7) WHERE rowid <= 3")
        conn.commit()
        conn.close()
    else:  # a save killed before its rename leaves its temporary file, and the old file whole
        saved.with_name(f"{saved.name}.0123456789ab.tmp").write_bytes(saved.read_bytes()[: size // 3])
    again = await reopened(path)
    try:
        postings = await built(again)
        assert postings.changed is (fault != "killed save")  # built from FTS5, but for the whole file
        assert (postings.rows, postings.tokens) == statistics(path)
        assert await same_as_fts5(again, 8) >= 40
    finally:
        await again.close()
    if fault != "killed save":
        assert "not used" in caplog.text or "earlier state" in caplog.text
    assert not list(path.parent.glob("*.tmp"))  # (the next open cleared it)


async def moves(backend: SQLiteBackend, rng: random.Random, n: int) -> None:
    """``n`` memories moved to another namespace or user (their keys change), through the write
    connection's own transactions (the write flow never moves one; the triggers allow it)."""
    assert backend.writer is not None
    for _ in range(n):
        values = [rng.choice(["main", "team"]), rng.choice([None, "u3", "u7"]), rng.randrange(1, 1500)]
        await backend.writer.conn.transaction(
            lambda c, v=values: c.execute("UPDATE memories SET namespace = ?, user_id = ? WHERE rowid = ?", v))


async def test_memories_moved_to_another_scope_are_followed_also_during_a_build(backend: SQLiteBackend) -> None:
    await built(backend)
    await moves(backend, random.Random(31), 40)
    assert (await built(backend)).rows == statistics(backend.path)[0]
    assert await same_as_fts5(backend, 9) >= 40
    assert backend.postings is not None
    building = asyncio.create_task(asyncio.to_thread(backend.postings.build))
    keys, rng = [f"m{i}" for i in range(1500)], random.Random(33)
    for _ in range(10):  # before, during and after its snapshot; the same rows moved again and back
        await moves(backend, random.Random(32), 8)
        await writes(backend, rng, 3, keys)
    await building
    postings = await built(backend)
    assert (postings.rows, postings.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 10) >= 40


async def test_metadata_changes_leave_the_saved_file_usable(backend: SQLiteBackend, saving: None) -> None:
    path = backend.path
    await backend.close()
    again = await reopened(path)
    try:
        await built(again)
        for i in range(0, 200, 10):
            await again.write(UpdateMemory(f"m{i}", T0, metadata={"topic": "moved"}))
    finally:
        await again.close()
    third = await reopened(path)
    try:
        assert not (await built(third)).changed  # read from its file: the keyword index did not change
        assert await same_as_fts5(third, 11) >= 40
    finally:
        await third.close()
    backend.postings = None


def test_a_count_past_what_the_postings_hold_is_left_to_fts5() -> None:
    postings = sqlite_postings.Postings.of(sqlite_postings.read_base(_empty_index()))
    postings.apply([(None, (7, (3, {"word": sqlite_postings.MAX_HALVES + 1, "other": 2})))])
    assert not postings.ranks(["word"]) and postings.ranks(["other"])
    assert postings.tail_tokens["word"][7] == sqlite_postings.MAX_HALVES  # (kept, clamped)


def _empty_index() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    tokenizer = sqlite_postings.TOKENIZER
    conn.execute(f"CREATE VIRTUAL TABLE memories_search USING fts5 (text, context, tokenize='{tokenizer}')")
    return conn


async def test_a_bulk_write_sets_them_aside_until_writes_are_quiet(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(postings_follower, "QUIET_SECONDS", 0.2)
    first = await built(backend)
    assert backend.postings is not None
    await backend.write(_bulk(random.Random(41), "b"))  # (an import's batch: not tokenized on the writer's thread)
    assert backend.postings.postings is None  # set aside: FTS5 ranks meanwhile
    await same_as_fts5_without_postings(backend, 12)
    latest = await built(backend)  # built again once quiet, with the bulk rows in its base
    assert latest is not first and not latest.tail
    assert (latest.rows, latest.tokens) == statistics(backend.path)
    assert await same_as_fts5(backend, 12) >= 40


def _bulk(rng: random.Random, prefix: str) -> AddMemories:
    return AddMemories([NewMemory(f"{prefix}{i}", True, Scope("main", "u3"), text(rng), {}, None, vector=VECTOR)
                        for i in range(postings_follower.BULK)], T0)


async def test_they_wait_for_quiet_after_the_last_bulk_write_not_the_first(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An import's batches come one after another: each one counts, also those written while
    the postings are set aside, so no build runs (and chases the import) until they stop."""
    monkeypatch.setattr(postings_follower, "QUIET_SECONDS", 1.0)
    await built(backend)
    rng = random.Random(43)
    for batch in range(3):
        await backend.write(_bulk(rng, f"b{batch}-"))
        await asyncio.sleep(0.3)
        assert backend.postings is not None and backend.postings.postings is None  # (0.3-0.9 s after the first)
    latest = await built(backend)
    assert (latest.rows, latest.tokens) == statistics(backend.path) and not latest.tail
    assert await same_as_fts5(backend, 14) >= 40


async def test_a_bulk_write_during_a_build_stops_it_unpublished(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A build that a bulk write overtakes would tokenize every row of it in Python: it stops,
    and the postings are built once writes are quiet, with the bulk rows in their base."""
    monkeypatch.setattr(postings_follower, "QUIET_SECONDS", 0.2)
    await built(backend)
    follower = backend.postings
    assert follower is not None
    reading, written = threading.Event(), threading.Event()
    read_base, reads = postings_follower.read_base, []

    def held_up(conn: sqlite3.Connection, stopped: Callable[[], bool]) -> sqlite_postings.Base:
        reads.append(conn)
        if len(reads) == 1:  # (the first build reads its snapshot once the bulk write is in)
            reading.set()
            written.wait(10)
        return read_base(conn, stopped=stopped)

    monkeypatch.setattr(postings_follower, "read_base", held_up)
    follower.refresh = True
    backend._postings_wanted.set()
    assert await asyncio.to_thread(reading.wait, 10)
    with caplog.at_level(logging.INFO, logger="gm.storage.postings_follower"):
        await backend.write(_bulk(random.Random(44), "c"))
        written.set()
        assert follower.postings is None  # set aside, and the build under way will not publish
        latest = await built(backend)
    assert len(reads) == 2 and "stopped for a bulk write" in caplog.text
    assert (latest.rows, latest.tokens) == statistics(backend.path) and not latest.tail
    assert await same_as_fts5(backend, 15) >= 40


async def same_as_fts5_without_postings(backend: SQLiteBackend, seed: int) -> None:
    """While the postings are set aside, every page is FTS5's (its own ranking answers)."""
    for terms, scope, limit in queries(seed):
        if backend.postings is not None and backend.postings.postings is not None:
            break  # (built again meanwhile: the rest is checked with them)
        assert await backend.keyword_search(terms, scope, None, limit, NOW) == await fts5(backend, terms, scope, limit)
