"""Online re-embedding (gm.reembed) at its edges: a write in flight when a run is cancelled
after its switch, another instance writing all along, another pgvector instance's searches
right after the switch, closing the store mid-run, the old index's release, an instance
that cannot follow, and an update that keeps its text. Each was a bug found in review.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gm
from gm.context import mix
from tests.conftest import pg_fetch
from tests.test_reembed import assert_all_made_by, fill, own_vectors, own_vectors_sqlite

pytestmark = pytest.mark.timeout(120)


async def test_a_write_in_flight_when_a_reembed_is_cancelled_after_its_switch_keeps_a_real_vector(
    tmp_path: Path, paraphrase_model_dir: Path
) -> None:
    """A run cancelled once its switch committed (Ctrl-C, a caller's timeout) stops the next
    model's embedder in its ``finally``; a write that was embedded with both meanwhile gets
    b"" from NextModel.vectors, and the write flow, seeing the switch, takes that b"" as the
    memory's vector (add: ``vector = item.next_vector if swap``): an empty embedding."""
    db = tmp_path / "mem.db"
    async with gm.open(db) as mem:
        await fill(mem, 40)
        written: list[asyncio.Task[gm.Memory]] = []
        me: list[asyncio.Task[gm.ReembedReport]] = []

        def progress(p: gm.Progress) -> None:
            if p.phase == "switched":  # (committed: the run has only to promote and switch the store)
                written.append(asyncio.ensure_future(mem.add("written at the switch: a heron", user_id="u7")))
                me[0].cancel()

        me.append(asyncio.ensure_future(mem.reembed(paraphrase_model_dir, progress=progress)))
        with contextlib.suppress(asyncio.CancelledError):
            await me[0]
        outcome = (await asyncio.gather(written[0], return_exceptions=True))[0]
    rows = own_vectors_sqlite(db)
    empty = [text for text, vector in rows.values() if len(vector) == 0]
    assert not empty, f"committed with an empty embedding: {empty} (the add answered {outcome!r})"
    assert not isinstance(outcome, BaseException) or isinstance(outcome, gm.errors.GMError), repr(outcome)
    assert_all_made_by(rows, paraphrase_model_dir)


SEARCH_ROWS = (
    "SELECT rowid, namespace, session_id, coalesce(occurred_at, created_at), embedding, search_embedding{vec} "
    "FROM memories"
)
Row = tuple[int, str, str | None, int, bytes, bytes | None, bytes | None]


async def search_rows(target: str, pgvector: bool) -> list[Row]:
    if target.startswith("postgresql"):
        sql = SEARCH_ROWS.format(vec=", vec::real[]" if pgvector else "")
        out = []
        for r in await pg_fetch(target, sql):
            vec = np.asarray(r[6], dtype=np.float32).tobytes() if pgvector and r[6] is not None else None
            out.append((r[0], r[1], r[2], r[3], bytes(r[4]), None if r[5] is None else bytes(r[5]), vec))
        return out
    with sqlite3.connect(target) as conn:
        return [(r[0], r[1], r[2], r[3], bytes(r[4]), None if r[5] is None else bytes(r[5]), None)
                for r in conn.execute(SEARCH_ROWS.format(vec=""))]


def close_enough(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    x, y = np.frombuffer(a, dtype=np.float32), np.frombuffer(b, dtype=np.float32)
    return x.shape == y.shape and bool(np.allclose(x, y, atol=1e-5))


async def assert_search_vectors_follow_the_sessions(target: str, pgvector: bool) -> None:
    """Each memory's search_embedding is its own embedding mixed with its two predecessors'
    in session order (gm.context), NULL without one; pgvector's ``vec`` is that, or its own."""
    rows = await search_rows(target, pgvector)
    sessions: dict[tuple[str, str], list[Row]] = {}
    wrong = []
    for row in rows:
        if row[2] is None:
            if row[5] is not None:
                wrong.append((row[0], "a search vector without a session"))
        else:
            sessions.setdefault((row[1], row[2]), []).append(row)
    for turns in sessions.values():
        turns.sort(key=lambda r: (r[3], r[0]))
        for i, row in enumerate(turns):
            previous = [t[4] for t in turns[max(0, i - 2) : i]]
            want = mix(row[4], previous) if previous else None
            if not close_enough(row[5], want):
                wrong.append((row[0], "search_embedding is not its session's mix"))
    for row in rows:
        if pgvector and not close_enough(row[6], row[5] if row[5] is not None else row[4]):
            wrong.append((row[0], "vec is not its search vector"))
    assert not wrong, f"{len(wrong)} of {len(rows)} memories: {wrong[:8]}"


@pytest.fixture(params=["postgres", "pgvector"])
def shared_target(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from tests.conftest import _target

    yield from _target(request.param, tmp_path)


async def test_a_reembed_finishes_while_another_instance_keeps_adding(
    shared_target: str, paraphrase_model_dir: Path
) -> None:
    """Another instance embeds its writes with the current model only, so each of its adds
    during the re-embed leaves a memory without the next vector; the switch refuses while
    any exists, and the sweep gives up after MAX_PASSES passes. Steady writes elsewhere (here
    four clients adding in a loop, a few ms apart) make the re-embed impossible to finish."""
    async with gm.open(shared_target) as a, gm.open(shared_target) as b:
        await fill(a, 100)
        done = asyncio.Event()
        added = 0

        async def writes(client: int) -> None:
            nonlocal added
            while not done.is_set():
                await b.add(f"b {client}: an otter {added}", user_id="u1")
                added += 1
                await asyncio.sleep(0.005)

        writing = asyncio.gather(*(writes(client) for client in range(4)))
        try:
            await asyncio.sleep(0.05)
            report = await a.reembed(paraphrase_model_dir, batch=16)
        finally:
            done.set()
            await writing
        assert report.total >= 100
        assert (await a.stats()).memories == 100 + added
    assert_all_made_by(await own_vectors(shared_target), paraphrase_model_dir)


async def test_an_update_that_keeps_its_text_keeps_pgvectors_session_mix(pgvector_url: str) -> None:
    """(Not the re-embed's own, but the switch carries it over through vec_next.) An update
    with its text unchanged (text and metadata given) writes ``vec`` = its own embedding
    (PgTransaction.embedding_columns) but refreshes no context (context_moves: same text), so
    ``search_embedding`` keeps the session mix while pgvector searches the bare vector."""
    async with gm.open(pgvector_url) as mem:
        ms = [await mem.add(f"turn {i} about cats", session_id="s", user_id="u") for i in range(4)]
        await mem.update(ms[2].id, text=ms[2].text, metadata={"x": 1})
    await assert_search_vectors_follow_the_sessions(pgvector_url, True)


async def test_the_old_models_index_is_released_after_the_switch(
    tmp_path: Path, paraphrase_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old embedder is stopped after OLD_MODEL_GRACE_SECONDS; the old model's in-process
    index (Indexer.retired, a full copy of every vector) is kept until the next switch."""
    import gm.vector_models

    monkeypatch.setattr(gm.vector_models, "OLD_MODEL_GRACE_SECONDS", 0.1)
    async with gm.open(tmp_path / "mem.db") as mem:
        await fill(mem, 30)
        old_embedder = mem.embedder
        await mem.reembed(paraphrase_model_dir)
        await asyncio.sleep(0.5)
        assert old_embedder._closing  # (the old embedder is retired after the grace)
        assert mem.indexer.retired is None, (
            f"the old model's index of {len(mem.indexer.retired[1])} vectors is still held after the grace"
        )


async def test_another_pgvector_instance_never_searches_new_vectors_with_the_old_models_query(
    pgvector_url: str, paraphrase_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After A's switch to a model of the same dimensions, B (pgvector, native search) embeds
    its queries with the old model and pgvector compares them with the new vectors: nothing
    fails (the dimensions agree), the ranking is silently another model's cosine until B's
    watch (every WATCH_SECONDS, 1 s) or a write of its own makes it follow. (The watch is
    slowed here only to take the timing out of the test; at 1 s the window is the same.)"""
    import gm.upkeep

    monkeypatch.setattr(gm.upkeep, "WATCH_SECONDS", 10.0)
    async with gm.open(pgvector_url) as a, gm.open(pgvector_url) as b:
        await fill(a, 60)
        assert b.backend.native_vectors
        await a.reembed(paraphrase_model_dir)
        query = "the bird likes topic 2"
        theirs = [(h.memory.id, round(h.vector_score or 0, 3)) for h in await a.search(query, mode="vector", limit=5)]
        ours = [(h.memory.id, round(h.vector_score or 0, 3)) for h in await b.search(query, mode="vector", limit=5)]
        assert ours == theirs, f"B ranked with model {b.vectors_model}, the vectors are {a.vectors_model}"


async def test_a_write_on_an_instance_that_cannot_follow_says_why(
    pg_url: str, paraphrase_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B cannot load the model A switched to (its folder is not on B's machine): B's writes
    answer the follower's ModelMismatch, which names the fix, not a ModelSwitched "retry it"
    that no retry can make succeed. Both instances run in this process, so the folder's
    absence on B's machine is stood in for where B's follower looks for it."""
    import shutil

    import gm.reembed
    from gm.errors import ModelNotFound

    def not_here(folder: str) -> Any:
        raise ModelNotFound(f"model file {folder}/model.onnx is missing")

    monkeypatch.setattr(gm.reembed, "recorded_model_here", not_here)
    folder = tmp_path / "only-on-a"
    shutil.copytree(paraphrase_model_dir, folder)
    async with gm.open(pg_url) as a, gm.open(pg_url) as b:
        await fill(a, 10)
        await a.reembed(folder)
        shutil.rmtree(folder)
        with pytest.raises(gm.errors.GMError) as refused:
            await b.add("written on b after the switch", user_id="u1")
        assert isinstance(refused.value, gm.errors.ModelMismatch), repr(refused.value)
        assert "GM_MODEL_DIR" in refused.value.message


async def test_closing_the_store_while_a_resumed_run_loads_its_next_index_ends_the_run(tmp_path: Path) -> None:
    """Indexer.prepare waits on ``_next_ready`` with no bound; closing the store stops the
    next index's loader (on_stop) and a loader that finishes while closing posts nothing
    (``_report_next``), so nothing sets it: the run waits for ever (and on Postgres keeps its
    advisory-lock connection)."""
    from gm.validation import new_memory

    db = tmp_path / "mem.db"
    rng = np.random.default_rng(7)
    async with gm.open(db) as mem:
        now = gm.memory.now_ms()
        for start in range(0, 12_000, 1000):
            items = [new_memory({"text": f"imported {i}", "user_id": "u1"}, now) for i in range(start, start + 1000)]
            for item in items:
                v = rng.standard_normal(384).astype(np.float32)
                item.vector = (v / np.linalg.norm(v)).tobytes()
            await mem.add_prepared(items)
        going = asyncio.Event()
        run = asyncio.ensure_future(mem.reembed(None, batch=1000,
                                                progress=lambda p: p.done >= 10_000 and going.set()))
        await asyncio.wait_for(going.wait(), 60)
        run.cancel()  # (a reindex stopped part-way: 10,000 next vectors stored)
        with contextlib.suppress(asyncio.CancelledError):
            await run
    mem = await gm.open(db)
    resumed = asyncio.ensure_future(mem.reembed(None))
    for _ in range(2000):  # until the run has begun (its record read back) and is loading the next index
        await asyncio.sleep(0.001)
        if mem.indexer.next_model is not None:
            break
    assert mem.indexer.next_model is not None and mem.indexer.next_index is None
    await mem.close()
    with pytest.raises(gm.errors.GMError):  # (StoreClosed), not a wait for ever
        await asyncio.wait_for(resumed, 5)


@pytest.mark.parametrize("failure", ["closed", "broken"])
async def test_a_look_at_another_instances_switch_that_fails_is_logged_not_left_for_the_loop(
    failure: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """ModelFollower.soon's look runs in a task nobody awaits: a store closing under it ends it
    quietly, another failure is logged, and neither is left for the loop to report ("Task
    exception was never retrieved", once seen at interpreter exit)."""
    from types import SimpleNamespace

    from gm.errors import StoreClosed
    from gm.reembed import ModelFollower

    class Backend:
        shared = True

        async def meta_value(self, key: str) -> str:
            raise StoreClosed("the store is closed") if failure == "closed" else RuntimeError("the disk went away")

    follower = ModelFollower(SimpleNamespace(models=SimpleNamespace(next=None), backend=Backend()))  # type: ignore[arg-type]
    follower.soon("another-model")
    task = follower._task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), 10)
    assert task.exception() is None
    logged = [r for r in caplog.records if r.name == "gm.reembed" and r.levelname == "ERROR"]
    assert (len(logged), failure) in ((0, "closed"), (1, "broken"))
    if logged:
        assert logged[0].exc_info is not None and "the disk went away" in str(logged[0].exc_info[1])
