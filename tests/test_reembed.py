"""Re-embedding online (gm.reembed): the vectors move to another model while the store keeps
serving searches and writes; nothing is lost, every memory ends with the new model's vector,
the switch is atomic, an interrupted run resumes, and Postgres instances follow each other.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gm
from gm.embedding import Encoder, ModelSpec
from gm.errors import InvalidInput, ModelMismatch, ReembedInProgress
from tests.conftest import pg_fetch

pytestmark = pytest.mark.timeout(120)


def own_vectors_sqlite(db: Path) -> dict[str, tuple[str, bytes]]:
    with sqlite3.connect(db) as conn:
        return {r[0]: (r[1], bytes(r[2])) for r in conn.execute("SELECT id, text, embedding FROM memories")}


async def own_vectors(target: str) -> dict[str, tuple[str, bytes]]:
    if target.startswith("postgresql"):
        return {r[0]: (r[1], bytes(r[2])) for r in await pg_fetch(target, "SELECT id, text, embedding FROM memories")}
    return own_vectors_sqlite(Path(target))


def assert_all_made_by(rows: dict[str, tuple[str, bytes]], model_dir: Path) -> None:
    """Every stored vector is the one ``model_dir``'s model gives its text."""
    encoder = Encoder(ModelSpec.from_dir(model_dir), threads=1)
    ids = sorted(rows)
    expected = encoder.encode([rows[i][0] for i in ids])
    for i, want in zip(ids, expected, strict=True):
        got = np.frombuffer(rows[i][1], dtype=np.float32)
        assert got.shape == want.shape, f"{i} ({rows[i][0]!r}): {got.shape} dimensions, the model gives {want.shape}"
        assert float(got @ want) > 0.999, f"{i} ({rows[i][0]!r}) keeps a vector of another model"


async def fill(mem: gm.Store, count: int, prefix: str = "m") -> list[gm.Memory]:
    batch = [{"text": f"{prefix} {i}: the {['cat', 'dog', 'bird', 'fish'][i % 4]} likes topic {i % 9}",
              "user_id": f"u{i % 3}", "session_id": f"s{i % 6}"} for i in range(count)]
    added = []
    for start in range(0, count, 100):
        added += await mem.add_many(batch[start:start + 100])
    return added


@pytest.fixture(params=["sqlite", "postgres", "pgvector"])
def reembed_target(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from tests.conftest import _target

    yield from _target(request.param, tmp_path)


async def test_reembed_under_concurrent_writes_and_searches_loses_nothing(
    reembed_target: str, wide_model_dir: Path
) -> None:
    async with gm.open(reembed_target) as mem:
        first = await fill(mem, 240)
        seen: list[int] = []
        hits_during: list[int] = []
        stop = asyncio.Event()

        async def writes() -> tuple[list[str], list[str], dict[str, str]]:
            added, deleted, changed = [], [], {}
            for i in range(60):
                added.append((await mem.add(f"new {i}: a turtle named {i}", user_id="u1", session_id="s1")).id)
                if i % 3 == 0:
                    victim = first[i]
                    await mem.delete(victim.id)
                    deleted.append(victim.id)
                if i % 4 == 1:
                    target = first[100 + i]
                    changed[target.id] = f"changed {i}: now about a horse"
                    await mem.update(target.id, text=changed[target.id])
                await asyncio.sleep(0)
            return added, deleted, changed

        async def searches() -> None:
            while not stop.is_set():
                hits = await mem.search("the cat likes topic 3", user_id="u2", limit=5)  # (u0 loses memories meanwhile)
                hits_during.append(len(hits))
                await asyncio.sleep(0.005)

        searching = asyncio.ensure_future(searches())
        writing = asyncio.ensure_future(writes())
        report = await mem.reembed(wide_model_dir, progress=lambda p: seen.append(p.done), batch=16)
        added, deleted, changed = await writing
        stop.set()
        await searching

        assert report.total >= 240 and report.embedded >= 240 - len(deleted)
        assert seen and seen[-1] == report.total  # progress reached the end
        assert hits_during and min(hits_during) == 5  # searches answered all along
        assert mem.model.identity == ModelSpec.from_dir(wide_model_dir).identity
        stats = await mem.stats()
        assert stats.memories == 240 + len(added) - len(deleted)
        for memory_id in added:
            assert (await mem.get(memory_id)).text.startswith("new ")
        for memory_id, text in changed.items():
            assert (await mem.get(memory_id)).text == text
        for memory_id in deleted:
            with pytest.raises(gm.errors.NotFound):
                await mem.get(memory_id)
        # Searches use the new model and find the memories written during the re-embed.
        hits = await mem.search("a horse", mode="vector", limit=3)
        assert hits and hits[0].memory.text.startswith("changed")
        turtles = await mem.search("a turtle named 7", user_id="u1", limit=3)
        assert turtles[0].memory.text == "new 7: a turtle named 7"
    rows = await own_vectors(reembed_target)
    assert len(rows) == stats.memories
    assert_all_made_by(rows, wide_model_dir)


async def test_reembed_switch_is_atomic_and_survives_reopening(tmp_path: Path, paraphrase_model_dir: Path) -> None:
    db = tmp_path / "mem.db"
    async with gm.open(db) as mem:
        await fill(mem, 50)
        before = await mem.search("the bird likes topic 2", limit=5, mode="vector")
        report = await mem.reembed(paraphrase_model_dir)
        assert report.model.startswith(ModelSpec.from_dir(paraphrase_model_dir).identity)
        after = await mem.search("the bird likes topic 2", limit=5, mode="vector")
        assert [h.vector_score for h in after] != [h.vector_score for h in before]
        cosine = float(np.frombuffer((await own_vectors(str(db)))[after[0].memory.id][1], dtype=np.float32)
                       @ Encoder(ModelSpec.from_dir(paraphrase_model_dir), 1).encode(["the bird likes topic 2"])[0])
        assert after[0].vector_score == pytest.approx(cosine, abs=0.2)  # (a search vector mixes in neighbours)
    # The old model is refused now, naming the way back; the new one opens it.
    with pytest.raises(ModelMismatch):
        async with gm.open(db):
            pass
    async with gm.open(db, model_dir=paraphrase_model_dir) as mem:
        assert (await mem.stats()).memories == 50
        assert await mem.search("the bird likes topic 2", limit=1)
        assert await mem.end_reembed(drop_old=True)
        assert not await mem.end_reembed(drop_old=True)  # nothing left to drop
    with sqlite3.connect(db) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(memories)")}
    assert not {c for c in columns if c.endswith(("_old", "_next"))}


async def test_a_384_dimension_database_moves_to_a_768_dimension_model(target: str, wide_model_dir: Path) -> None:
    async with gm.open(target) as mem:
        await fill(mem, 30)
        await mem.reembed(wide_model_dir)
        hits = await mem.search("the fish likes topic 7", limit=3)
        assert hits[0].memory.text == "m 7: the fish likes topic 7"
        await mem.add("added after the switch: a pelican", user_id="u9")
        assert (await mem.search("a pelican", user_id="u9", mode="vector"))[0].memory.text.endswith("pelican")
    rows = await own_vectors(target)
    assert {len(v) for _, v in rows.values()} == {768 * 4}
    async with gm.open(target, model_dir=wide_model_dir) as mem:  # (reopened: the index loads 768-dim vectors)
        assert (await mem.search("a pelican", user_id="u9", mode="vector"))[0].memory.text.endswith("pelican")


async def test_refusals(tmp_path: Path, wide_model_dir: Path, default_model_copy_dir: Path) -> None:
    db = tmp_path / "mem.db"
    async with gm.open(db) as mem:
        await fill(mem, 10)
        with pytest.raises(InvalidInput, match="gmem reindex"):
            await mem.reembed(default_model_copy_dir)  # the same model's files elsewhere: nothing to move
        first = asyncio.ensure_future(mem.reembed(wide_model_dir, batch=2))
        await asyncio.sleep(0)
        with pytest.raises(ReembedInProgress):
            await mem.reembed(wide_model_dir)
        await first
    # A store opened with the new model on the old database's vectors names the command.
    other = tmp_path / "other.db"
    async with gm.open(other) as mem:
        await fill(mem, 3)
    with pytest.raises(ModelMismatch, match="gmem reembed"):
        async with gm.open(other, model_dir=wide_model_dir):
            pass


async def test_a_reembed_to_another_model_under_way_refuses_a_second_and_can_be_cancelled(
    tmp_path: Path, wide_model_dir: Path, paraphrase_model_dir: Path
) -> None:
    db = tmp_path / "mem.db"
    async with gm.open(db) as mem:
        await fill(mem, 20)
        from gm.storage.base import BeginReembed

        spec = ModelSpec.from_dir(wide_model_dir)  # begun, as a run killed after its first step leaves it
        await mem.backend.write(BeginReembed(spec.identity + "~1", spec.label, str(wide_model_dir), 768))
        with pytest.raises(ReembedInProgress, match="cancel"):
            await mem.reembed(paraphrase_model_dir)
        assert await mem.end_reembed(drop_old=False)  # cancel
        assert (await mem.reembed(paraphrase_model_dir)).embedded == 20
        assert len(await mem.search("the cat", limit=3)) == 3


async def test_reindex_rebuilds_the_vectors_with_the_same_model(target: str) -> None:
    async with gm.open(target) as mem:
        await fill(mem, 40)
        before = [(h.memory.id, round(h.score, 4)) for h in await mem.search("the dog likes topic 1", limit=5)]
        report = await mem.reembed(None)
        assert report.embedded == 40 and report.model.endswith("~1")
        after = [(h.memory.id, round(h.score, 4)) for h in await mem.search("the dog likes topic 1", limit=5)]
        assert after == before  # the same model's vectors, rebuilt: the same answers
    async with gm.open(target) as mem:  # the default model still opens it (its vectors, another generation)
        assert (await mem.stats()).memories == 40
        assert (await mem.reembed(None)).model.endswith("~2")


KILLED_RUN = textwrap.dedent("""
    import asyncio, sys
    import gm

    async def main():
        async with gm.open(sys.argv[1]) as mem:
            def progress(p):
                print(p.done, flush=True)
            await mem.reembed(sys.argv[2], progress=progress, batch=8)

    asyncio.run(main())
""")


def test_a_reembed_killed_mid_way_resumes_where_it_stopped(tmp_path: Path, paraphrase_model_dir: Path) -> None:
    db = tmp_path / "mem.db"

    async def prepare() -> None:
        async with gm.open(db) as mem:
            await fill(mem, 400)

    asyncio.run(prepare())
    env = {**os.environ, "GM_EMBED_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(db), str(paraphrase_model_dir)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    deadline = time.monotonic() + 60
    done = 0
    while done < 80 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        done = int(line)
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    assert 80 <= done < 400, f"killed after {done} of 400"
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT count(embedding_next) FROM memories").fetchone()[0]
    assert stored >= done

    async def resume() -> gm.ReembedReport:
        async with gm.open(db) as mem:
            report = await mem.reembed(paraphrase_model_dir)
            assert len(await mem.search("the cat likes topic 3", limit=3)) == 3
            return report

    report = asyncio.run(resume())
    assert report.resumed and report.embedded <= 400 - stored + 8
    assert_all_made_by(own_vectors_sqlite(db), paraphrase_model_dir)


@pytest.fixture(params=["postgres", "pgvector"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from tests.conftest import _target

    yield from _target(request.param, tmp_path)


async def test_two_postgres_instances_the_other_switches_when_it_commits(shared_url: str, wide_model_dir: Path) -> None:
    async with gm.open(shared_url) as a, gm.open(shared_url) as b:
        await fill(a, 120)
        stop = asyncio.Event()
        b_added: list[str] = []
        b_hits: list[int] = []
        instances = {"b": b}

        async def serve_b() -> None:
            i = 0
            while not stop.is_set():
                other = instances["b"]
                b_added.append((await other.add(f"b wrote {i}: an owl", user_id="u2")).id)
                b_hits.append(len(await other.search("the cat likes topic 3", user_id="u0", limit=4)))
                i += 1
                await asyncio.sleep(0.01)

        serving = asyncio.ensure_future(serve_b())
        await asyncio.sleep(0.05)
        outcomes = await asyncio.gather(a.reembed(wide_model_dir, batch=8), b.reembed(wide_model_dir, batch=8),
                                        return_exceptions=True)
        # One instance at a time: one ran to the end, the other was refused at once.
        assert sorted(type(o).__name__ for o in outcomes) == ["ReembedInProgress", "ReembedReport"], outcomes
        runner, other = (a, b) if isinstance(outcomes[0], gm.ReembedReport) else (b, a)
        instances["b"] = other  # (the one that did not run it goes on serving)
        deadline = time.monotonic() + 10
        while other.vectors_model != runner.vectors_model and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        stop.set()
        await serving
        assert other.vectors_model == runner.vectors_model and other.model.identity == runner.model.identity
        assert min(b_hits) == 4
        assert (await other.search("an owl", user_id="u2", mode="vector", limit=1))[0].memory.text.endswith("owl")
        assert (await other.stats()).memories == 120 + len(b_added)
    assert_all_made_by(await own_vectors(shared_url), wide_model_dir)
