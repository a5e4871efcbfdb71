"""Search and bad input through both handles (embedded, and gm.connect to a real server),
each on one store seeded once for the module: every mode ranks the relevant memory first
with the same scores, filters, scopes, limits, min_score, recency and time ranges hold, and
every bad argument is the same InvalidInput naming the same field, with nothing stored.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import gm
from gm.errors import InvalidInput
from tests.handles import HANDLES, Memories, open_handle
from tests.test_memories import BAD_ADDS, BAD_READS

pytestmark = pytest.mark.asyncio(loop_scope="module")

FACTS = {
    "seat": ("Prefers window seats on long flights.", {"topic": "travel", "priority": 2}),
    "peanuts": ("Allergic to peanuts and shellfish.", {"topic": "health", "priority": 5}),
    "violin": ("Plays the violin in a community orchestra.", {"topic": "music", "priority": 1}),
    "car": ("Drives a red electric car to work.", {"topic": "travel", "priority": 3}),
    "dog": ("Has a golden retriever named Biscuit.", {"topic": "pets", "priority": 4}),
}
MODES = ("hybrid", "vector", "keyword")
JAN, FEB, MAR, APR = (f"2024-{m:02d}-15T09:30:00Z" for m in (1, 2, 3, 4))


def days_ago(days: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days * 86400))


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=HANDLES)
async def mem(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Memories]:
    async with open_handle(request.param, tmp_path_factory.mktemp("db") / "mem.db") as handle:
        await handle.add_many([{"id": k, "text": t, "user_id": "u1", "metadata": m} for k, (t, m) in FACTS.items()])
        await handle.add_many([
            {"id": "other-user-seat", "text": "Prefers window seats on long flights.", "user_id": "u2"},
            {"id": "work-violin", "namespace": "work", "text": "Plays the violin at the office party."},
            {"id": "old-flat", "namespace": "moves", "text": "Lives in Lisbon, in a flat by the river.",
             "occurred_at": days_ago(730)},
            {"id": "new-flat", "namespace": "moves", "text": "Moved to a flat in Berlin by the river Spree.",
             "occurred_at": days_ago(1)},
            {"namespace": "moves", "text": "Allergic to peanuts."},  # (the fused scores' floor is theirs)
            {"namespace": "moves", "text": "Plays the violin on Sundays."},
            *({"id": f"bike-{i}", "namespace": "bikes", "text": f"{month[5:7]}: rode the bike.", "occurred_at": month}
              for i, month in enumerate((JAN, FEB, MAR, APR))),
        ])
        yield handle


def hit_ids(hits: list[gm.SearchHit]) -> list[str]:
    return [h.memory.id for h in hits]


@pytest.mark.parametrize(
    ("query", "expected"),
    [("where does she like to sit on a plane", "seat"), ("food allergies", "peanuts"),
     ("what musical instrument does he play", "violin"), ("what kind of dog do they own", "dog"),
     ("vehicle for commuting", "car")],
)
@pytest.mark.parametrize("mode", ["hybrid", "vector"])
async def test_semantic_modes_put_the_relevant_memory_first(mem: Memories, mode: str, query: str,
                                                            expected: str) -> None:
    hits = await mem.search(query, user_id="u1", mode=mode)
    assert all(isinstance(h, gm.SearchHit) for h in hits)
    assert hit_ids(hits)[0] == expected and len(hits) == len(FACTS)
    if mode == "vector":
        assert hits[0].score > 0.35 and hits[0].score - hits[1].score > 0.15
        assert all(h.vector_score == h.score and h.keyword_score is None for h in hits)


@pytest.mark.parametrize(("query", "expected"), [("violin", ["violin"]), ("golden retriever", ["dog"]),
                                                 ("plays", ["violin"]), ("food allergies", [])])
async def test_keyword_mode_matches_words(mem: Memories, query: str, expected: list[str]) -> None:
    hits = await mem.search(query, user_id="u1", mode="keyword")
    assert hit_ids(hits) == expected
    assert all(h.score > 0 and h.keyword_score == h.score and h.vector_score is None for h in hits)


@pytest.mark.parametrize("mode", MODES)
async def test_scores_descend_and_a_filter_and_limit_hold(mem: Memories, mode: str) -> None:
    query = "seats car violin retriever peanuts"
    everything = await mem.search(query, user_id="u1", mode=mode, limit=100)
    scores = [h.score for h in everything]
    assert len(everything) >= 4 and scores == sorted(scores, reverse=True)
    assert hit_ids(await mem.search(query, user_id="u1", mode=mode, limit=2)) == hit_ids(everything)[:2]
    travel = await mem.search(query, user_id="u1", mode=mode, filter={"topic": "travel"})
    assert set(hit_ids(travel)) == {"seat", "car"}
    urgent = await mem.search(query, user_id="u1", mode=mode, filter={"priority": {"$gte": 4}})
    assert set(hit_ids(urgent)) == {"peanuts", "dog"}
    assert await mem.search(query, user_id="u1", mode=mode, filter={"topic": "nothing"}) == []


@pytest.mark.parametrize("mode", MODES)
async def test_search_sees_only_its_namespace_and_user(mem: Memories, mode: str) -> None:
    assert hit_ids(await mem.search("violin", namespace="work", mode=mode)) == ["work-violin"]
    default = hit_ids(await mem.search("violin seats", mode=mode, limit=100))
    assert "work-violin" not in default and "other-user-seat" in default
    assert hit_ids(await mem.search("window seats on long flights", user_id="u2", mode=mode)) == ["other-user-seat"]
    assert await mem.search("violin", namespace="empty", mode=mode) == []


async def test_min_score_cuts_unrelated_memories_in_any_mode(mem: Memories) -> None:
    cut = await mem.search("which seat does she like on a plane?", user_id="u1", min_score=0.3)
    assert hit_ids(cut) == ["seat"]
    keyword = await mem.search("window seats", user_id="u1", mode="keyword", min_score=0.3)
    assert [(h.memory.id, h.vector_score) for h in keyword] == [("seat", None)]
    assert await mem.search("window seats", user_id="u1", mode="keyword", min_score=0.99) == []


async def test_recency_ranks_a_newer_memory_first(mem: Memories) -> None:
    plain = await mem.search("Lisbon flat by the river", namespace="moves")
    boosted = await mem.search("Lisbon flat by the river", namespace="moves", recency=30)
    assert hit_ids(plain)[0] == "old-flat" and hit_ids(boosted)[0] == "new-flat"


@pytest.mark.parametrize("mode", MODES)
async def test_search_keeps_only_the_event_times_in_range(mem: Memories, mode: str) -> None:
    async def found(**bounds: Any) -> set[str]:
        return {h.memory.text[:2] for h in await mem.search("bike", namespace="bikes", mode=mode, **bounds)}

    assert await found() == {"01", "02", "03", "04"}
    assert await found(occurred_after=FEB, occurred_before=APR) == {"02", "03"}
    assert await found(occurred_before=FEB) == {"01"}
    assert await found(occurred_after=APR, occurred_before=APR) == set()


async def test_hits_carry_the_whole_memory(mem: Memories) -> None:
    [hit] = await mem.search("golden retriever", user_id="u1", mode="keyword")
    assert hit.memory == await mem.get("dog")
    assert hit.to_dict()["memory"]["metadata"] == {"topic": "pets", "priority": 4}


# -- bad input: the same error, naming the same field, and nothing stored -----------------------


@pytest.mark.parametrize(("fields", "path"), BAD_ADDS)
async def test_a_bad_add_names_the_field_and_stores_nothing(mem: Memories, fields: dict[str, Any], path: str) -> None:
    before = await mem.stats()
    with pytest.raises(InvalidInput) as caught:
        await mem.add(**fields)
    assert type(caught.value) is InvalidInput and caught.value.path == path and caught.value.message
    with pytest.raises(InvalidInput) as caught:
        await mem.add_many([{"text": "fine"}, fields])
    assert caught.value.path == f"memories[1].{path}"
    assert (await mem.stats()).namespaces == before.namespaces


@pytest.mark.parametrize(
    ("inputs", "path"),
    [([], "memories"), ("not a list", "memories"), (["just text"], "memories[0]"),
     ([{"text": "ok"}, {"metadata": {}}], "memories[1].text"),
     ([{"text": "ok", "colour": "red"}], "memories[0].colour")],
)
async def test_a_bad_batch_names_the_item(mem: Memories, inputs: Any, path: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await mem.add_many(inputs)
    assert caught.value.path == path


SEARCH_OPTIONS = [("min_score", 1.5), ("min_score", -2), ("min_score", "0.5"), ("min_score", True),
                  ("recency", 0), ("recency", "30d"), ("recency", 1e9), ("occurred_after", "last june"),
                  ("filter", {"n": {"$near": 1}}), ("filter", ["not", "an", "object"]), ("limit", 2.5)]


@pytest.mark.parametrize(("method", "kwargs", "path"), [
    *BAD_READS,
    *(("search", {"query": "q", name: value}, "filter" if name == "filter" and isinstance(value, list)
       else "filter.n.$near" if name == "filter" else name) for name, value in SEARCH_OPTIONS),
    ("list", {"order_by": "newest"}, "order_by"), ("list", {"occurred_before": "2024-01-15"}, "occurred_before"),
    ("list", {"filter": {"n": {"$near": 1}}}, "filter.n.$near"), ("list", {"namespace": 5}, "namespace"),
    ("list", {"limit": 3.5}, "limit"), ("delete_many", {"filter": {"$or": []}}, "filter.$or"),
])
async def test_a_bad_argument_names_it(mem: Memories, method: str, kwargs: dict[str, Any], path: str) -> None:
    kwargs = dict(kwargs)
    args = [kwargs.pop("id")] if "id" in kwargs else [kwargs.pop("query")] if "query" in kwargs else []
    with pytest.raises(InvalidInput) as caught:
        await getattr(mem, method)(*args, **kwargs)
    assert caught.value.path == path
    assert caught.value.to_dict()["details"] == {"path": path}


async def test_a_list_limit_written_as_a_whole_float_is_taken(mem: Memories) -> None:
    assert len((await mem.list(user_id="u1", limit=2.0)).memories) == 2  # type: ignore[arg-type]

