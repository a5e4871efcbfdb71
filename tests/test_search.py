"""Search on a real store: each mode finds the relevant memory first, scores descend, and
filters, limits and scopes hold. One store, seeded once, serves the whole module.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import gm
from gm.errors import InvalidInput
from gm.memory import DEFAULT_NAMESPACE, Scope, now_ms
from gm.storage.sql import memory_from_row

pytestmark = pytest.mark.asyncio(loop_scope="module")

FACTS = {
    "seat": ("Prefers window seats on long flights.", {"topic": "travel", "priority": 2}),
    "peanuts": ("Allergic to peanuts and shellfish.", {"topic": "health", "priority": 5}),
    "violin": ("Plays the violin in a community orchestra.", {"topic": "music", "priority": 1}),
    "car": ("Drives a red electric car to work.", {"topic": "travel", "priority": 3}),
    "dog": ("Has a golden retriever named Biscuit.", {"topic": "pets", "priority": 4}),
    "rust": ("Works as a backend engineer writing Rust code.", {"topic": "work", "priority": 2}),
}
MODES = ("hybrid", "vector", "keyword")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mem(module_target: str) -> AsyncIterator[gm.Store]:
    async with gm.open(module_target) as store:
        await store.add_many([
            {"id": key, "text": text, "user_id": "u1", "metadata": metadata} for key, (text, metadata) in FACTS.items()
        ])
        await store.add_many([
            {"id": "other-user-seat", "text": "Prefers window seats on long flights.", "user_id": "u2"},
            {"id": "work-violin", "namespace": "work", "text": "Plays the violin at the office party.",
             "user_id": "u1"},
            {"id": "work-seat", "namespace": "work", "text": "Books aisle seats for work trips.", "user_id": "u1"},
        ])
        yield store


def hit_ids(hits: list[gm.SearchHit]) -> list[str]:
    return [h.memory.id for h in hits]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("where does she like to sit on a plane", "seat"),
        ("food allergies", "peanuts"),
        ("what musical instrument does he play", "violin"),
        ("what kind of dog do they own", "dog"),
        ("vehicle for commuting", "car"),
        ("programming language at the job", "rust"),
    ],
)
@pytest.mark.parametrize("mode", ["hybrid", "vector"])
async def test_semantic_modes_put_the_relevant_memory_first(
    mem: gm.Store, mode: str, query: str, expected: str
) -> None:
    hits = await mem.search(query, user_id="u1", mode=mode)
    assert hit_ids(hits)[0] == expected
    assert len(hits) == len(FACTS)  # both semantic modes rank every memory in scope
    if mode == "vector":  # cosine similarity: the relevant memory stands clearly apart
        assert hits[0].score > 0.35 and hits[0].score - hits[1].score > 0.15


@pytest.mark.parametrize(
    ("query", "expected"),
    [("violin", ["violin"]), ("peanuts", ["peanuts"]), ("golden retriever", ["dog"]), ("seats", ["seat"]),
     ("plays", ["violin"]), ("rust engineer", ["rust"])],
)
async def test_keyword_mode_matches_words(mem: gm.Store, query: str, expected: list[str]) -> None:
    hits = await mem.search(query, user_id="u1", mode="keyword")
    assert hit_ids(hits) == expected
    assert all(h.score > 0 for h in hits)


async def test_keyword_mode_finds_nothing_without_a_shared_word(mem: gm.Store) -> None:
    assert await mem.search("food allergies", user_id="u1", mode="keyword") == []
    assert await mem.search("???", user_id="u1", mode="keyword") == []


async def test_keyword_ranking_prefers_more_matching_words(mem: gm.Store) -> None:
    hits = await mem.search("window seats on flights for work", mode="keyword", user_id="u1")
    assert set(hit_ids(hits)) == {"seat", "car", "rust"}  # each shares at least one word
    assert hit_ids(hits)[0] == "seat" and hits[0].score > 2 * hits[1].score  # it shares three


async def test_hybrid_mode_rewards_agreement_of_both_rankings(mem: gm.Store) -> None:
    hits = await mem.search("violin music", user_id="u1")  # hybrid is the default mode
    assert hit_ids(hits)[0] == "violin"
    assert hits[0].score > hits[1].score  # first in both rankings beats first in one


@pytest.mark.parametrize("mode", MODES)
async def test_scores_descend(mem: gm.Store, mode: str) -> None:
    hits = await mem.search("seats for travel to work on a plane", user_id="u1", mode=mode)
    assert len(hits) >= 2
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert len(set(hit_ids(hits))) == len(hits)


@pytest.mark.parametrize("mode", MODES)
async def test_a_filter_restricts_search(mem: gm.Store, mode: str) -> None:
    hits = await mem.search("seats car violin", user_id="u1", mode=mode, filter={"topic": "travel"})
    assert set(hit_ids(hits)) == {"seat", "car"}
    hits = await mem.search("seats car violin", user_id="u1", mode=mode, filter={"priority": {"$gte": 3}})
    assert set(hit_ids(hits)) == {"car"} if mode == "keyword" else {"car", "peanuts", "dog"}
    assert await mem.search("violin", user_id="u1", mode=mode, filter={"topic": "nothing"}) == []


@pytest.mark.parametrize("mode", MODES)
async def test_limit_is_respected(mem: gm.Store, mode: str) -> None:
    query = "seats violin car retriever peanuts rust"
    assert len(await mem.search(query, user_id="u1", mode=mode, limit=1)) == 1
    three = await mem.search(query, user_id="u1", mode=mode, limit=3)
    assert len(three) == 3
    everything = await mem.search(query, user_id="u1", mode=mode, limit=100)
    assert len(everything) == len(FACTS)
    assert hit_ids(three) == hit_ids(everything)[:3]


async def test_the_default_limit_is_ten(tmp_path: Path) -> None:
    async with gm.open(tmp_path / "many.db") as store:
        await store.add_many([{"text": f"note number {i} about seats"} for i in range(15)])
        assert len(await store.search("seats")) == 10
        assert len(await store.search("seats", mode="keyword")) == 10


@pytest.mark.parametrize("mode", MODES)
async def test_search_sees_only_its_namespace_and_user(mem: gm.Store, mode: str) -> None:
    work = await mem.search("violin seats", namespace="work", mode=mode)
    assert set(hit_ids(work)) == {"work-violin", "work-seat"}
    assert all(h.memory.namespace == "work" for h in work)

    default = await mem.search("violin seats", mode=mode, limit=100)
    assert not {"work-violin", "work-seat"} & set(hit_ids(default))
    assert "other-user-seat" in hit_ids(default)  # no user given: the whole namespace

    u1 = await mem.search("window seats on long flights", user_id="u1", mode=mode, limit=100)
    assert "other-user-seat" not in hit_ids(u1) and "seat" in hit_ids(u1)
    u2 = await mem.search("window seats on long flights", user_id="u2", mode=mode, limit=100)
    assert hit_ids(u2) == ["other-user-seat"]

    assert await mem.search("violin", namespace="empty", mode=mode) == []
    assert await mem.search("violin", user_id="nobody", mode=mode) == []


@pytest.mark.parametrize("mode", ["keyword", "vector", "hybrid"])
async def test_hits_carry_the_whole_memory(mem: gm.Store, mode: str) -> None:
    # (a vector ranking reads its page's memories with the vectors it rescores: the same memory)
    hits = await mem.search("golden retriever", user_id="u1", mode=mode)
    assert hits and all([hit.memory == await mem.get(hit.memory.id) for hit in hits])
    [hit] = [hit for hit in hits if hit.memory.id == "dog"]
    assert hit.to_dict()["memory"]["metadata"] == {"topic": "pets", "priority": 4}


async def test_bad_search_arguments(mem: gm.Store) -> None:
    with pytest.raises(InvalidInput, match="mode"):
        await mem.search("x", mode="semantic")
    with pytest.raises(InvalidInput) as caught:
        await mem.search("x", limit=101)
    assert caught.value.path == "limit"


async def test_a_query_of_only_stopwords_still_matches_those_words(target: str) -> None:
    async with gm.open(target) as store:  # this module's tests share one event loop
        question = await store.add("What is it about?")
        await store.add("Peanut allergy.")
        assert [h.memory for h in await store.search("it", mode="keyword")] == [question]
        assert [h.memory.text for h in await store.search("peanuts", mode="keyword")] == ["Peanut allergy."]


async def test_the_rescoring_read_leaves_an_expired_memory_out_yet_names_the_model(target: str) -> None:
    """A vector search reads the memories of its page with the vectors it rescores: one expired
    since the index ranked it is not on the page, and the read still tells which model made the
    vectors (a re-embed's switch in between is caught)."""
    async with gm.open(target) as store:
        kept = await store.add("Keeps bees on the roof.", user_id="u1")
        brief = await store.add("Keeps a spare key under the mat.", user_id="u1", ttl_seconds=60)
        now = now_ms()
        rowids = await store.backend.matching_rowids(Scope(DEFAULT_NAMESPACE, "u1"), None, now)
        identity, rows = await store.backend.searched_rows(rowids, now)
        assert identity == store.vectors_model
        assert sorted(memory_from_row(row).id for _, row in rows.values()) == sorted([kept.id, brief.id])
        identity, rows = await store.backend.searched_rows(rowids, now + 61_000)
        assert identity == store.vectors_model
        assert [memory_from_row(row) for _, row in rows.values()] == [kept]
        identity, rows = await store.backend.searched_rows([max(rowids)], now + 61_000)  # (the brief one alone)
        assert identity == store.vectors_model and rows == {}
        assert [h.memory for h in await store.search("bees on the roof", user_id="u1", mode="vector")][0] == kept
