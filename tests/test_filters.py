"""The metadata filter language on real data, through every call that takes a filter
(list, search, delete_many), and the errors a malformed filter gets.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import gm
from gm import filters
from gm.errors import InvalidFilter

pytestmark = pytest.mark.asyncio(loop_scope="module")

# One memory per key; the memory's text is "memory <key>".
ROWS: dict[str, dict[str, Any]] = {
    "a": {"topic": "travel", "priority": 1, "pinned": True, "trip": {"city": "Oslo", "days": 3}},
    "b": {"topic": "health", "priority": 3, "pinned": False, "note": None},
    "c": {"topic": "travel", "priority": 5, "trip": {"city": "Lima", "days": 10}},
    "d": {"topic": "music", "priority": "3", "score": 2.5},
    "e": {"tags": ["x", "y"], "slots": {"0": "first"}},
}
ALL = set(ROWS)

CASES: list[tuple[dict[str, Any], set[str]]] = [
    # equality, implicit and explicit
    ({"topic": "travel"}, {"a", "c"}),
    ({"topic": {"$eq": "travel"}}, {"a", "c"}),
    ({"topic": "travel", "pinned": True}, {"a"}),
    ({"topic": "nowhere"}, set()),
    # $ne and $nin also match memories without the key
    ({"topic": {"$ne": "travel"}}, {"b", "d", "e"}),
    ({"topic": {"$nin": ["travel", "health"]}}, {"d", "e"}),
    ({"priority": {"$nin": [1, 3]}}, {"c", "d", "e"}),
    # ordering comparisons only compare like with like: numbers with numbers, strings with strings
    ({"priority": {"$gt": 1}}, {"b", "c"}),
    ({"priority": {"$gte": 3}}, {"b", "c"}),
    ({"priority": {"$lt": 3}}, {"a"}),
    ({"priority": {"$lte": 3}}, {"a", "b"}),
    ({"priority": {"$gt": 1, "$lt": 5}}, {"b"}),
    ({"priority": {"$gt": "2"}}, {"d"}),
    ({"score": {"$gt": 2}}, {"d"}),
    ({"score": 2.5}, {"d"}),
    # numbers versus strings: strict
    ({"priority": 3}, {"b"}),
    ({"priority": "3"}, {"d"}),
    ({"priority": {"$in": [1, 5]}}, {"a", "c"}),
    ({"priority": {"$in": ["3"]}}, {"d"}),
    ({"priority": {"$in": [3, "3"]}}, {"b", "d"}),
    ({"trip.days": 3.0}, {"a"}),  # JSON has one number type: 3.0 equals 3
    # booleans are neither numbers nor strings
    ({"pinned": True}, {"a"}),
    ({"pinned": False}, {"b"}),
    ({"pinned": {"$ne": True}}, {"b", "c", "d", "e"}),
    ({"pinned": 1}, set()),
    ({"pinned": "true"}, set()),
    ({"pinned": {"$in": [True, False]}}, {"a", "b"}),
    # null is a value; $exists is about the key
    ({"note": None}, {"b"}),
    ({"note": {"$ne": None}}, ALL - {"b"}),
    ({"note": {"$exists": True}}, {"b"}),
    ({"note": {"$exists": False}}, ALL - {"b"}),
    ({"topic": None}, set()),
    ({"pinned": {"$exists": True}}, {"a", "b"}),
    # dotted keys reach into nested objects
    ({"trip.city": "Oslo"}, {"a"}),
    ({"trip.days": {"$gte": 5}}, {"c"}),
    ({"trip.city": {"$exists": True}}, {"a", "c"}),
    ({"trip": {"$exists": True}}, {"a", "c"}),
    ({"trip.city.name": {"$exists": True}}, set()),
    # a numeric segment names an object's key, never an array position
    ({"slots.0": "first"}, {"e"}),
    ({"tags.0": "x"}, set()),
    ({"tags.0": {"$exists": True}}, set()),
    # logic
    ({"$and": [{"topic": "travel"}, {"priority": {"$gt": 2}}]}, {"c"}),
    ({"$or": [{"topic": "health"}, {"trip.city": "Oslo"}]}, {"a", "b"}),
    ({"$not": {"topic": "travel"}}, {"b", "d", "e"}),
    ({"$not": {"priority": {"$gt": 2}}}, {"a", "d", "e"}),
    ({"$or": [{"$and": [{"topic": "travel"}, {"pinned": True}]}, {"score": {"$exists": True}}]}, {"a", "d"}),
    ({"topic": "travel", "$or": [{"priority": 5}, {"priority": 3}]}, {"c"}),
    ({"$and": [{"$not": {"topic": "music"}}, {"$not": {"pinned": True}}]}, {"b", "c", "e"}),
    # no filter
    ({}, ALL),
]


def case_id(case: tuple[dict[str, Any], set[str]]) -> str:
    return str(case[0])


def keys_of(memories: list[gm.Memory]) -> set[str]:
    return {m.text.removeprefix("memory ") for m in memories}


async def seed(store: gm.Store, namespace: str) -> None:
    await store.add_many(
        [{"text": f"memory {key}", "namespace": namespace, "metadata": meta} for key, meta in ROWS.items()]
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mem(module_target: str) -> AsyncIterator[gm.Store]:
    async with gm.open(module_target) as store:
        await seed(store, "default")
        yield store


@pytest.mark.parametrize(("filter", "expected"), CASES, ids=[case_id(c) for c in CASES])
async def test_list_applies_the_filter(mem: gm.Store, filter: dict[str, Any], expected: set[str]) -> None:
    page = await mem.list(filter=filter)
    assert keys_of(page.memories) == expected


@pytest.mark.parametrize(("filter", "expected"), CASES, ids=[case_id(c) for c in CASES])
@pytest.mark.parametrize("mode", ["vector", "hybrid", "keyword"])
async def test_search_applies_the_filter(mem: gm.Store, mode: str, filter: dict[str, Any], expected: set[str]) -> None:
    hits = await mem.search("memory", filter=filter, mode=mode, limit=100)
    assert keys_of([h.memory for h in hits]) == expected


_namespaces = (f"delete-{i}" for i in itertools.count())


@pytest.mark.parametrize(("filter", "expected"), CASES, ids=[case_id(c) for c in CASES])
async def test_delete_many_applies_the_filter(mem: gm.Store, filter: dict[str, Any], expected: set[str]) -> None:
    namespace = next(_namespaces)  # a fresh copy of the rows for each case
    await seed(mem, namespace)
    assert await mem.delete_many(namespace=namespace, filter=filter) == len(expected)
    assert keys_of((await mem.list(namespace=namespace)).memories) == ALL - expected
    assert keys_of((await mem.list()).memories) == ALL  # the other namespace is untouched


MALFORMED: list[tuple[Any, str]] = [
    ({"topic": {"$regex": "trav.*"}}, "filter.topic.$regex"),
    ({"$nor": [{"topic": "travel"}]}, "filter.$nor"),
    ({"topic": {"$in": "travel"}}, "filter.topic.$in"),
    ({"topic": {"$nin": []}}, "filter.topic.$nin"),
    ({"topic": {"$in": [{"a": 1}]}}, "filter.topic.$in[0]"),
    ({"$and": {"topic": "travel"}}, "filter.$and"),
    ({"$or": []}, "filter.$or"),
    ({"$or": [{"topic": "travel"}, "health"]}, "filter.$or[1]"),
    ({"$not": "travel"}, "filter.$not"),
    ({"$and": [{"priority": {"$gt": [1]}}]}, "filter.$and[0].priority.$gt"),
    ({"priority": {"$gte": True}}, "filter.priority.$gte"),
    ({"priority": {"$lt": None}}, "filter.priority.$lt"),
    ({"note": {"$exists": "yes"}}, "filter.note.$exists"),
    ({"trip": {"city": "Oslo"}}, "filter.trip"),
    ({"trip": {"$eq": {"city": "Oslo"}}}, "filter.trip.$eq"),
    ({"tags": ["a", "b"]}, "filter.tags"),
    ({"trip..city": "Oslo"}, "filter.trip..city"),
    ({'say "hi"': {"$ne": 1}}, 'filter.say "hi"'),  # a key SQLite's JSON paths cannot reach
    ({"to\x00pic": "travel"}, "filter.to\x00pic"),  # no stored key holds NUL; was a 503 on SQLite
    ({"topic": "tra\x00vel"}, "filter.topic"),  # nor a stored string; was a 422 on Postgres only
    ({"topic": {"$gt": "\x00"}}, "filter.topic.$gt"),
    (["topic", "travel"], "filter"),
    ("topic=travel", "filter"),
    (42, "filter"),
]


@pytest.mark.parametrize(("filter", "path"), MALFORMED, ids=[str(m[0]) for m in MALFORMED])
async def test_a_malformed_filter_names_its_bad_part(mem: gm.Store, filter: Any, path: str) -> None:
    for call in (
        mem.list(filter=filter),
        mem.search("memory", filter=filter),
        mem.search("memory", filter=filter, mode="vector"),
        mem.delete_many(filter=filter),
    ):
        with pytest.raises(InvalidFilter) as caught:
            await call
        assert caught.value.path == path
        assert caught.value.code == "invalid_filter"
        assert caught.value.to_dict()["details"] == {"path": path}
    assert keys_of((await mem.list()).memories) == ALL  # the failed delete_many deleted nothing


async def test_an_unknown_operator_error_lists_the_known_ones(mem: gm.Store) -> None:
    with pytest.raises(InvalidFilter) as caught:
        await mem.list(filter={"priority": {"$between": [1, 3]}})
    assert "$between" in caught.value.message and "$gte" in caught.value.message


# -- limits: a filter the database could not run is refused before it reaches a writer ---------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"a": {"$in": list(range(300))}}, "filter"),
        ({"a": 2**64}, "filter.a"),
        ({"a": {"$nin": [1, -(2**63) - 1]}}, "filter.a.$nin[1]"),
        ({"a\\b": 1}, "filter.a\\b"),
    ],
)
async def test_filters_the_database_cannot_run_are_refused(raw: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidFilter) as caught:
        filters.parse(raw)
    assert caught.value.path == path


async def test_a_too_deep_filter_fails_alone_and_other_writes_commit(tmp_path: Path) -> None:
    deep: dict[str, Any] = {"a": 1}
    for _ in range(300):
        deep = {"$not": deep}
    async with gm.open(tmp_path / "deep.db") as store:  # this module's tests share one event loop
        memory = await store.add("kept", metadata={"a": 1})
        results = await asyncio.gather(
            store.delete_many(filter=deep),
            *(store.update(memory.id, metadata={"a": 1, "n": n}) for n in range(20)),
            return_exceptions=True,
        )
        assert isinstance(results[0], InvalidFilter)
        assert not any(isinstance(r, BaseException) for r in results[1:])
        assert (await store.get(memory.id)).metadata["n"] == 19
