"""Session context on every backend: each memory is indexed with its date in words and its
session neighbours (gm.context), kept current through adds, updates and deletes, and built
for memories written before it existed; the fused search and the scores a client gets.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gm
from gm.context import VECTOR_MIX, date_words
from gm.search import Candidate, decay, fuse
from tests.conftest import pg_fetch

TURNS = [
    ("t0", "Caroline: I went to a pottery class yesterday."),
    ("t1", "Melanie: Oh nice, what did you make?"),
    ("t2", "Caroline: A little blue bowl for my cat."),
    ("t3", "Melanie: Yes, last Tuesday!"),
    ("t4", "Caroline: We should go together next time."),
]


async def ignore_changes(changes: list[Any]) -> None:
    """A backend opened alone: no index follows its commits."""


def at(minute: int, day: int = 8) -> str:
    return f"2023-05-{day:02d}T13:{minute:02d}:00Z"


async def stored(target: str) -> dict[str, tuple[str | None, bool]]:
    """Each memory's context column and whether it has a search embedding of its own."""
    sql = "SELECT id, context, search_embedding IS NOT NULL FROM memories"
    if target.startswith("postgresql://"):
        return {r[0]: (r[1], r[2]) for r in await pg_fetch(target, sql)}
    conn = sqlite3.connect(target)
    try:
        return {r[0]: (r[1], bool(r[2])) for r in conn.execute(sql)}
    finally:
        conn.close()


async def execute(target: str, sql: str) -> None:
    if target.startswith("postgresql://"):
        await pg_fetch(target, sql)
        return
    conn = sqlite3.connect(target)
    try:
        conn.execute(sql)
        conn.commit()
    finally:
        conn.close()


def expected(turns: list[tuple[str, str]], day: int = 8) -> dict[str, tuple[str, bool]]:
    """What gm.context promises for a session in this order: the date, the 2 previous
    turns and the next one; a search embedding for every turn that has a predecessor."""
    out = {}
    for i, (memory_id, _) in enumerate(turns):
        around = [text for _, text in turns[max(0, i - 2) : i] + turns[i + 1 : i + 2]]
        out[memory_id] = ("\n".join([date_words(_ms(day)), *around]), i > 0)
    return out


def _ms(day: int) -> int:
    return int(datetime(2023, 5, day, 13, tzinfo=UTC).timestamp() * 1000)


async def backfilled(mem: gm.Store) -> None:
    """Wait (at most 20 s) until the store's context backfill has left no memory without context."""
    deadline = time.perf_counter() + 20
    while await mem.backend.without_context():
        assert time.perf_counter() < deadline, "the context backfill never finished"
        await asyncio.sleep(0.05)


async def add_session(mem: gm.Store, turns: list[tuple[str, str]] = TURNS) -> None:
    await mem.add_many([
        {"id": memory_id, "text": text, "session_id": "s1", "occurred_at": at(i)}
        for i, (memory_id, text) in enumerate(turns)
    ])


async def test_context_follows_adds_updates_and_deletes(target: str) -> None:
    async with gm.open(target) as mem:
        for i, (memory_id, text) in enumerate(TURNS[:3]):  # one at a time, as an agent stores a conversation
            await mem.add(text, id=memory_id, session_id="s1", occurred_at=at(i))
        assert await stored(target) == expected(TURNS[:3])
        await mem.add_many([{"id": i, "text": t, "session_id": "s1", "occurred_at": at(n + 3)}
                            for n, (i, t) in enumerate(TURNS[3:])])
        assert await stored(target) == expected(TURNS)

        await mem.update("t2", text="Caroline: A big green vase for my mother.")
        turns = [*TURNS[:2], ("t2", "Caroline: A big green vase for my mother."), *TURNS[3:]]
        assert await stored(target) == expected(turns)

        await mem.delete("t1")
        turns = [t for t in turns if t[0] != "t1"]
        assert await stored(target) == expected(turns)

        # An earlier memory added later takes its place in the session's order.
        await mem.add("Melanie: Did you sleep well?", id="t-early", session_id="s1", occurred_at="2023-05-08T12:00:00Z")
        turns = [("t-early", "Melanie: Did you sleep well?"), *turns]
        assert await stored(target) == expected(turns)

        # A PATCH of the event time moves a memory: its old neighbours and its new ones follow.
        await mem.update("t0", occurred_at="2023-05-08T13:59:00Z")
        turns = [t for t in turns if t[0] != "t0"] + [t for t in turns if t[0] == "t0"]
        assert await stored(target) == expected(turns)

        await mem.delete_many(namespace="default", session_id="s1", filter=None)
        assert await stored(target) == {}


async def contexts(target: str) -> dict[str, tuple[str | None, bytes | None]]:
    """Each memory's context column and search embedding."""
    sql = "SELECT id, context, search_embedding FROM memories"
    if target.startswith("postgresql://"):
        rows = [tuple(r) for r in await pg_fetch(target, sql)]
    else:
        conn = sqlite3.connect(target)
        try:
            rows = conn.execute(sql).fetchall()
        finally:
            conn.close()
    return {r[0]: (r[1], bytes(r[2]) if r[2] is not None else None) for r in rows}


async def test_a_batch_of_turns_gets_the_context_they_get_one_by_one(target: str, tmp_path: Path) -> None:
    # One write starting two sessions (turns out of order, two at the same minute) and
    # extending a stored one: its new sessions are worked out before the rows go in
    # (gm.storage.add_flow), the stored one refreshed; both as adding each turn alone gives.
    stored_turn = {"id": "a0", "text": "Alex: Did the plumber come?", "session_id": "a", "occurred_at": at(0)}
    batch = [
        {"id": "b3", "text": "Bea: The train was late again.", "session_id": "b", "occurred_at": at(3)},
        {"id": "b1", "text": "Bea: I am on my way.", "session_id": "b", "occurred_at": at(1)},
        {"id": "a1", "text": "Sam: Yes, he fixed the sink.", "session_id": "a", "occurred_at": at(1)},
        {"id": "b2", "text": "Kim: Where are you now?", "session_id": "b", "occurred_at": at(2)},
        {"id": "b2b", "text": "Kim: Call me when you arrive.", "session_id": "b", "occurred_at": at(2)},
        {"id": "c0", "text": "Lee: Lunch on Friday?", "session_id": "c", "occurred_at": at(5)},
        {"id": "c1", "text": "Ana: Friday works for me.", "session_id": "c", "occurred_at": at(6)},
        {"id": "n0", "text": "A note in no session.", "occurred_at": at(7)},
    ]
    one_by_one = str(tmp_path / "one-by-one.db")
    async with gm.open(one_by_one) as mem:
        for turn in [stored_turn, *batch]:
            await mem.add(**turn)
    async with gm.open(target) as mem:
        await mem.add(**stored_turn)
        await mem.add_many(batch)
    assert await contexts(target) == await contexts(one_by_one)
    lines = [date_words(_ms(8)), "Bea: I am on my way.", "Kim: Where are you now?", "Bea: The train was late again."]
    assert (await contexts(target))["b2b"][0] == "\n".join(lines)


async def test_a_memory_without_a_session_is_indexed_with_its_date_alone(target: str) -> None:
    async with gm.open(target) as mem:
        lone = await mem.add("Bought a new bicycle.", occurred_at="2023-05-08T09:00:00Z")
        other = await mem.add("Repainted the kitchen.", occurred_at="2021-02-01T09:00:00Z")
        assert (await stored(target))[lone.id] == ("Monday 8 May 2023", False)
        hits = await mem.search("May 2023", mode="keyword")  # the date in words is findable
        assert [h.memory.id for h in hits] == [lone.id]
        assert other.id not in [h.memory.id for h in await mem.search("when in May 2023?", mode="keyword")]


async def test_the_index_searches_each_memory_mixed_with_its_predecessors(target: str) -> None:
    async with gm.open(target) as mem:
        await add_session(mem)
        query = "what did Caroline make at pottery?"
        q = await mem.embedder.embed(query)
        own = np.stack(await mem.embedder.embed_many([text for _, text in TURNS]))
        hits = await mem.search(query, mode="vector", limit=5)
        assert len(hits) == 5
        for hit in hits:
            i = [memory_id for memory_id, _ in TURNS].index(hit.memory.id)
            mixed = own[i] + VECTOR_MIX * own[max(0, i - 2) : i].sum(axis=0)
            mixed /= np.linalg.norm(mixed)
            assert hit.vector_score == pytest.approx(float(q @ mixed), abs=2e-3)
            assert hit.score == hit.vector_score and hit.keyword_score is None


async def test_context_lets_a_turn_be_found_by_its_neighbours_words(target: str) -> None:
    async with gm.open(target) as mem:
        await add_session(mem)
        await mem.add_many([{"text": f"Unrelated note number {i} about groceries.", "session_id": f"x{i}"}
                            for i in range(6)])
        # "Yes, last Tuesday!" has no word of the question; its neighbours have.
        hits = await mem.search("when did Melanie make a bowl", mode="keyword", limit=10)
        assert "t3" in [h.memory.id for h in hits]


@pytest.mark.parametrize("capped", [2])
async def test_an_older_database_gets_its_context_built_online(
    target: str, capped: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gm.context")
    async with gm.open(target, target_version=capped) as old:
        assert not old.backend.context
        await add_session(old)  # an older release: no occurred_at, no context
    async with gm.open(target) as mem:
        assert mem.backend.context
        assert mem.ready and mem.backend.phase == "ready"  # readyz's answer: the build does not hold it up
        assert await mem.search("pottery class", mode="keyword", limit=1)  # searchable at once
        deadline = time.perf_counter() + 20
        while not any("session context: built for 5 memories" in r.getMessage() for r in caplog.records):
            assert time.perf_counter() < deadline, "the context backfill never finished"
            await asyncio.sleep(0.05)
        assert any("session context: building it for 5 memories" in r.getMessage() for r in caplog.records)
        assert await mem.backend.without_context() == 0
        made = {memory_id: await mem.get(memory_id) for memory_id, _ in TURNS}
        contexts = await stored(target)
        for i, (memory_id, _) in enumerate(TURNS):
            around = [text for _, text in TURNS[max(0, i - 2) : i] + TURNS[i + 1 : i + 2]]
            assert contexts[memory_id] == ("\n".join([date_words(made[memory_id].occurred_at), *around]), i > 0)
            assert made[memory_id].occurred_at == made[memory_id].created_at  # no event time was given


async def test_rows_whose_context_is_missing_are_found_by_their_text_and_built_at_the_next_open(
    target: str,
) -> None:
    async with gm.open(target) as mem:
        await add_session(mem)
    # As if an older release had written them meanwhile (during a rolling deploy) or a
    # backfill was cut short by a restart.
    await execute(target, "UPDATE memories SET context = NULL, search_embedding = NULL")
    async with gm.open(target) as mem:
        await backfilled(mem)
        assert await stored(target) == expected(TURNS)
        hits = await mem.search("pottery class", mode="keyword", limit=1)
        assert [h.memory.id for h in hits] == ["t0"]


# -- fusion and scores -------------------------------------------------------------------


def test_fusion_normalises_each_ranking_and_weighs_keywords_more() -> None:
    keyword = [(1, 9.0), (2, 5.0), (3, 1.0)]
    vector = [(3, 0.9), (4, 0.5), (1, 0.1)]
    fused = {c.rowid: c for c in fuse(keyword, vector)}
    assert fused[1].score == pytest.approx(0.7 * 1.0 + 0.3 * 0.0)
    assert fused[2].score == pytest.approx(0.7 * 0.5)  # not found by the vector ranking: 0 from it
    assert fused[3].score == pytest.approx(0.7 * 0.0 + 0.3 * 1.0)
    assert fused[4].score == pytest.approx(0.3 * 0.5)
    assert (fused[2].vector_score, fused[2].keyword_score) == (None, 5.0)
    assert (fused[4].vector_score, fused[4].keyword_score) == (0.5, None)
    assert [c.rowid for c in fuse(keyword, vector)] == [1, 2, 3, 4]
    # A ranking whose candidates all score alike gives each the best value, not the worst.
    assert [(c.rowid, c.score) for c in fuse([(7, 2.0)], [])] == [(7, pytest.approx(0.7))]
    assert fuse([], []) == []
    assert isinstance(fuse(keyword, [])[0], Candidate)


def test_recency_halves_a_score_per_half_life() -> None:
    day = 86_400_000
    assert decay(0, 30) == 1.0
    assert decay(-5 * day, 30) == 1.0  # occurring later than now counts as now
    assert decay(30 * day, 30) == pytest.approx(0.5)
    assert decay(90 * day, 30) == pytest.approx(0.125)


async def test_hits_carry_both_scores_and_min_score_cuts_unrelated_memories(target: str) -> None:
    async with gm.open(target) as mem:
        seat = await mem.add("Prefers window seats on long flights.")
        await mem.add("Allergic to peanuts.")
        hits = await mem.search("which seat does she like on a plane?", limit=5)
        assert hits[0].memory.id == seat.id
        assert all(h.vector_score is not None for h in hits)  # the vector ranking saw both (depth 50)
        assert hits[0].keyword_score is not None
        assert [h.keyword_score for h in hits[1:]] == [None]  # no word of the question in "Allergic to peanuts."
        assert hits[0].score > hits[1].score
        cut = await mem.search("which seat does she like on a plane?", min_score=0.3)
        assert [h.memory.id for h in cut] == [seat.id]
        keyword = await mem.search("window seats", mode="keyword", min_score=0.3)
        assert [(h.memory.id, h.vector_score) for h in keyword] == [(seat.id, None)]
        assert await mem.search("window seats", mode="keyword", min_score=0.99) == []


async def test_recency_ranks_a_newer_memory_first(target: str) -> None:
    def days_ago(days: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * 86400))

    async with gm.open(target) as mem:
        old = await mem.add("Lives in Lisbon, in a flat by the river.", occurred_at=days_ago(730))
        new = await mem.add("Moved to a flat in Berlin by the river Spree.", occurred_at=days_ago(1))
        await mem.add_many([{"text": "Allergic to peanuts."}, {"text": "Plays the violin on Sundays."}])
        plain = await mem.search("Lisbon flat by the river", limit=4)
        assert plain[0].memory.id == old.id
        boosted = await mem.search("Lisbon flat by the river", limit=4, recency=30)
        assert boosted[0].memory.id == new.id
        before, after = ({h.memory.id: h.score for h in hits} for hits in (plain, boosted))
        assert after[old.id] == pytest.approx(before[old.id] * decay(730 * 86_400_000, 30), rel=1e-3)
        assert after[new.id] == pytest.approx(before[new.id] * decay(86_400_000, 30), rel=1e-3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_score", 1.5), ("min_score", -2), ("min_score", "0.5"), ("min_score", True),
     ("recency", 0), ("recency", -3), ("recency", "30d"), ("recency", 1e9)],
)
async def test_bad_search_options_are_refused_naming_the_field(sqlite_store: gm.Store, field: str, value: Any) -> None:
    with pytest.raises(gm.errors.InvalidInput) as caught:
        await sqlite_store.search("anything", **{field: value})
    assert caught.value.path == field


async def test_two_postgres_instances_writing_one_session_at_once_keep_its_context_exact(pg_url: str) -> None:
    # Two instances behind a load balancer store alternate turns of one conversation at the
    # same moment: each must see the other's turn when it recomputes the neighbours.
    from gm.context import TURN_COLUMNS, context_of, search_embedding_of, turn_from_row
    from gm.memory import NewMemory, Scope
    from gm.storage.base import AddMemories
    from gm.storage.postgres import PostgresBackend

    rng = np.random.default_rng(0)

    def vector() -> bytes:
        v = rng.standard_normal(8).astype(np.float32)
        return (v / np.linalg.norm(v)).tobytes()

    first, second = PostgresBackend(pg_url), PostgresBackend(pg_url)
    await first.open(ignore_changes)
    await second.open(ignore_changes)
    try:
        async def add(backend: PostgresBackend, k: int) -> None:
            item = NewMemory(f"m{k}", True, Scope("ns", None, None, "s1"), f"turn {k}", {}, None, vector=vector(),
                             occurred_at=k * 1000)
            await backend.write(AddMemories([item], 1))

        for k in range(0, 40, 2):
            await asyncio.gather(add(first, k), add(second, k + 1))
    finally:
        await first.close()
        await second.close()
    rows = await pg_fetch(pg_url, f"SELECT {TURN_COLUMNS} FROM memories ORDER BY 3, 1")
    turns = [turn_from_row(r) for r in rows]
    assert len(turns) == 40
    stale = [t.text for i, t in enumerate(turns)
             if (t.context, t.search_embedding) != (context_of(turns, i), search_embedding_of(turns, i))]
    assert stale == []


async def test_postgres_finds_rows_without_search_tsv_by_their_text_until_the_backfill_reaches_them(
    pg_url: str,
) -> None:
    from gm.memory import Scope
    from gm.storage.postgres import PostgresBackend

    async with gm.open(pg_url) as mem:
        await add_session(mem)
    # What the v3 migration leaves on rows written before it: no search_tsv (a trigger fills
    # it on the next write of text or context), no context yet.
    await pg_fetch(pg_url, "UPDATE memories SET context = NULL")
    await pg_fetch(pg_url, "UPDATE memories SET search_tsv = NULL")  # (not a column the trigger follows)
    assert await pg_fetch(pg_url, "SELECT id FROM memories WHERE search_tsv IS NOT NULL") == []
    backend = PostgresBackend(pg_url)  # a backend alone runs no backfill
    await backend.open(ignore_changes)
    try:
        assert await backend.without_context() == len(TURNS)
        hits = await backend.keyword_search(["pottery", "class"], Scope(), None, 10, int(time.time() * 1000))
        rows = await pg_fetch(pg_url, "SELECT rowid FROM memories WHERE id = 't0'")
        assert [rowid for rowid, _ in hits] == [rows[0][0]]
    finally:
        await backend.close()


async def test_an_older_release_changing_or_deleting_a_turn_hands_its_neighbours_to_the_backfill(
    pg_url: str,
) -> None:
    async with gm.open(pg_url) as mem:
        await add_session(mem)
    # What a release before v3 does, running beside this one during a rolling deploy: it
    # writes the row alone, knowing nothing of its neighbours' context.
    await pg_fetch(pg_url, "DELETE FROM memories WHERE id = 't2'")
    await pg_fetch(pg_url, "UPDATE memories SET text = 'Melanie: What colour was it?' WHERE id = 't1'")
    left = await stored(pg_url)
    assert not [i for i, (context, _) in left.items() if context and "blue bowl" in context]  # gone at once
    assert {i for i, (context, _) in left.items() if context is None} == {"t0", "t1", "t3", "t4"}
    async with gm.open(pg_url) as mem:
        await backfilled(mem)
    turns = [TURNS[0], ("t1", "Melanie: What colour was it?"), TURNS[3], TURNS[4]]
    assert await stored(pg_url) == expected(turns)
