"""The vector index saved beside a SQLite database: a store reopens from it with the same
hits, a file the database moved on from (writes after a kill -9, when no save ran) is not
used, a damaged or truncated file or graph is detected and the index loaded from the
database, a save that fails midway leaves the previous file whole, and a small index is not
saved at all."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import orjson
import pytest

import gm
from gm import index as index_module
from gm import index_file, index_memory, transfer, vector_plan
from gm.indexer import Indexer
from gm.memory import DEFAULT_NAMESPACE, Scope, now_ms

ROWS = 240


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Save from 50 rows on and build the graph from 100 (not 20,000), so a test stays quick."""
    monkeypatch.setattr(index_file, "SAVE_MIN_ROWS", 50)
    monkeypatch.setattr(index_module, "GRAPH_MIN_ROWS", 100)
    monkeypatch.setattr(vector_plan, "EXACT_MAX_ROWS", 100)


TOPICS = ["window seats on long flights", "green tea in the morning", "the dog is called Biscuit",
          "allergic to peanuts", "learning the cello", "moved to Lisbon in May"]


async def fill(path: Path) -> list[list[str]]:
    """A store of ROWS memories, closed once its graph is whole; the ids each query finds."""
    async with gm.open(path) as mem:
        await mem.add_many([{"text": f"{TOPICS[i % 6]}, note {i}", "user_id": f"u{i % 4}"} for i in range(ROWS)])
        await mem.indexer.wait_ready()
        while mem.indexer.index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]  (the background task that grows it)
        assert mem.indexer.index.graphed > 0
        return await hits(mem)


QUERIES = ("where do I like to sit on a plane", "what is my pet's name", "which city did I move to")
_embedded: dict[str, np.ndarray] = {}  # each query's vector, embedded once a test run


async def hits(mem: gm.Store) -> list[list[str]]:
    """The ids of a vector search's page for each query, whole and for one user. The queries are
    embedded once: a vector a last bit apart can move which of a topic's near-identical notes
    the approximate step hands on, so two opens compare the index, not the embedding."""
    found = []
    for query in QUERIES:
        if query not in _embedded:
            _embedded[query] = np.asarray(await mem.embedder.embed(query, urgent=True))
        for user in (None, "u1"):
            now = now_ms()
            ranked = await mem.searcher.nearest(_embedded[query], Scope(DEFAULT_NAMESPACE, user), now, 5)
            found.append([memory.id for memory, _ in ranked])
    return found


async def test_a_store_reopens_from_its_saved_index_with_the_same_hits(tmp_path: Path) -> None:
    path = tmp_path / "mem.db"
    before = await fill(path)
    assert index_file.index_path(path).exists()
    async with gm.open(path) as mem:
        assert await hits(mem) == before
        assert mem.indexer.loaded_from == "file"
        assert mem.indexer.index.graphed >= ROWS  # the graph came back too
        await mem.add("a new memory about the cello teacher")
        assert (await mem.search("cello teacher", mode="vector", limit=1))[0].memory.text.startswith("a new")
    async with gm.open(path) as mem:  # saved again at close, with the new memory
        await mem.indexer.wait_ready()
        assert mem.indexer.loaded_from == "file" and len(mem.indexer.index) == ROWS + 1


async def test_a_store_read_back_maps_its_file_and_grows_a_second_graph_beside_the_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back, the arrays are the file's copy-on-write mappings and the graph a view of its
    file: nothing is copied at open. Writes land in the mapped arrays (the file is not
    touched); rows the view lacks are scored exactly until VIEW_BACKLOG wait, then they go
    into a delta graph in memory that grows, the view left as it is. An unchanged view is
    saved without rewriting it, the delta beside it; read back, both are views, and the delta
    (never the graph) is copied into memory once VIEW_BACKLOG more rows wait."""
    monkeypatch.setattr(index_module, "VIEW_BACKLOG", 20)
    path = tmp_path / "mem.db"
    before = await fill(path)
    vectors = index_file.index_path(path)
    (graph_file,) = vectors.parent.glob(f"{vectors.name}.*.graph")
    saved_bytes = vectors.read_bytes()
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        assert isinstance(index._a.vectors, np.memmap) and index._graph_file is not None
        assert await hits(mem) == before
        victim = (await mem.search("green tea", mode="vector", limit=1))[0].memory
        await mem.delete(victim.id)
        added = await mem.add_many([{"text": f"the cello teacher, lesson {i}"} for i in range(10)])
        assert index.graph_backlog() == 0 and index._graph_file is not None  # 10 < VIEW_BACKLOG: the view stays
        page = await mem.search("cello teacher lesson", mode="vector", limit=10)
        assert {hit.memory.id for hit in page} == {m.id for m in added}  # the rows the view lacks, scored exactly
        assert victim.id not in [h.memory.id for h in await mem.search("green tea", mode="vector", limit=50)]
        assert vectors.read_bytes() == saved_bytes  # copy-on-write: the file is as saved
    (kept,) = vectors.parent.glob(f"{vectors.name}.*.graph")
    assert kept == graph_file  # the unchanged view: its file kept, not written again
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        assert mem.indexer.loaded_from == "file" and len(index) == ROWS + 10 - 1
        await mem.add_many([{"text": f"moved to Porto, note {i}"} for i in range(30)])  # past VIEW_BACKLOG
        while index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]
        assert index._graph_file is not None and index._delta is not None and index._delta_file is None
        assert index.graphed == index.count and len(index._delta[0]) == 40  # the rows since the save, in the delta
        assert (await mem.search("moved to Porto", mode="vector", limit=1))[0].memory.text.startswith("moved to Porto")
        porto = await mem.search("moved to Porto", mode="vector", limit=30)
    assert kept.exists() and len(list(vectors.parent.glob(f"{vectors.name}.*.delta"))) == 1
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        assert index._graph_file is not None and index._delta is not None and index._delta_file is not None
        assert index.graph_backlog() == 0  # nothing waits: both are views
        assert [h.memory.id for h in await mem.search("moved to Porto", mode="vector", limit=30)] == \
            [h.memory.id for h in porto]
        await mem.add_many([{"text": f"learning the violin, lesson {i}"} for i in range(25)])
        while index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]
        assert index._graph_file is not None and index._delta_file is None and len(index._delta[0]) == 40 + 25
        assert (await mem.search("violin lesson", mode="vector", limit=1))[0].memory.text.startswith("learning the vio")
    assert list(vectors.parent.glob(f"{vectors.name}.*.graph")) == [graph_file]  # the view's file, never rewritten
    (delta,) = vectors.parent.glob(f"{vectors.name}.*.delta")  # the grown delta, saved anew (the old one gone)
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        assert mem.indexer.loaded_from == "file" and index.graphed == index.count
        assert len(index) == ROWS + 10 - 1 + 30 + 25 and len(index._delta[0]) == 40 + 25


async def test_a_read_back_graph_smaller_than_what_waits_is_copied_and_grown_not_given_a_delta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graph saved with few rows (an import saves the graph it held back) and many waiting:
    a delta would hold most of the index, so the view is copied and grows, and the next save
    is one graph again, whose file exact scoring reads the vectors of."""
    monkeypatch.setattr(index_module, "VIEW_BACKLOG", 20)
    path = tmp_path / "mem.db"
    await fill(path)
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        await mem.add_many([{"text": f"moved to Porto, note {i}"} for i in range(ROWS + 60)])
        while index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]
        assert index._graph_file is None and index._delta is None and index.graphed == index.count
        assert (await mem.search("moved to Porto", mode="vector", limit=1))[0].memory.text.startswith("moved to")
    vectors = index_file.index_path(path)
    assert not list(vectors.parent.glob(f"{vectors.name}.*.delta"))
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        assert mem.indexer.loaded_from == "file" and index._delta is None and index._graph_vectors is not None
        assert len(index._graph_vectors.rows) == index.graphed == index.count == 2 * ROWS + 60


async def test_a_damaged_delta_graph_is_detected_and_the_index_loaded_from_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(index_module, "VIEW_BACKLOG", 20)
    path = tmp_path / "mem.db"
    await fill(path)
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        await mem.add_many([{"text": f"moved to Porto, note {i}"} for i in range(30)])
        while mem.indexer.index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]
        assert mem.indexer.index._delta is not None
    vectors = index_file.index_path(path)
    (delta,) = vectors.parent.glob(f"{vectors.name}.*.delta")
    damage(delta, delta.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="gm.index_file"):
        async with gm.open(path) as mem:
            await mem.indexer.wait_ready()
            assert mem.indexer.loaded_from == "database" and len(mem.indexer.index) == ROWS + 30
            assert (await mem.search("moved to Porto", mode="vector", limit=1))[0].memory.text.startswith("moved to")
    assert any("its delta graph is damaged" in r.getMessage() for r in caplog.records)


def resident_bytes(path: Path, offset: int, length: int) -> int:
    """How much of ``path``'s bytes [offset, offset + length) this process's mappings of it hold
    resident (/proc/self/smaps: each mapping's Rss, counted for the mappings that overlap)."""
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's first line
            start, end = (int(x, 16) for x in fields[0].split("-"))
            file_offset = int(fields[2], 16)
            overlaps = fields[-1] == str(path) and file_offset < offset + length and file_offset + end - start > offset
        elif overlaps and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


async def test_read_back_exact_scoring_reads_the_graph_files_vectors_not_a_second_copy(tmp_path: Path) -> None:
    """The graph file holds each vector it links (usearch's copy); read back, exact scoring reads
    a row's there too, through the one mapping the graph's walk reads, so the arrays file's own
    copy of the vectors is never touched and none of it is resident."""
    path = tmp_path / "mem.db"
    before = await fill(path)
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        index = mem.indexer.index
        vectors = index._graph_vectors
        assert vectors is not None and index._graph_file is not None
        assert await hits(mem) == before  # (one user, 60 rows: scored exactly)
        for user in ("u0", "u1", "u2", "u3"):
            assert await mem.search("green tea", user_id=user, mode="vector", limit=5)
        with index_file.index_path(path).open("rb") as f:
            header, start = index_file.read_header(f)
        own = header["arrays"][0]
        assert own["name"] == "vectors"
        assert resident_bytes(index_file.index_path(path), start + own["offset"], own["bytes"]) == 0
        live = np.flatnonzero(index._a.live[: index.count])
        at = vectors.rows_of(live)  # every live row's vector is there, the same
        assert (at >= 0).all() and np.array_equal(vectors.block[at], index._a.vectors[live])


async def test_a_file_that_does_not_say_which_graph_row_is_whose_is_still_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file saved without the graph rows (an earlier release's, or a graph file this release
    cannot read the vectors of) is read back whole: exact scoring reads the arrays' vectors."""
    path = tmp_path / "mem.db"
    monkeypatch.setattr(index_file, "_graph_rows", lambda graph_path, state, graphed: None)
    before = await fill(path)
    with index_file.index_path(path).open("rb") as f:
        header, _ = index_file.read_header(f)
    assert "rows" not in header["graph"]
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        assert mem.indexer.loaded_from == "file" and mem.indexer.index._graph_vectors is None
        assert await hits(mem) == before


async def test_writes_after_the_save_make_the_file_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mem.db"
    await fill(path)
    saved = Indexer.save

    async def killed(self: Indexer) -> None:  # as if the process died before its save at close
        return None

    monkeypatch.setattr(Indexer, "save", killed)
    async with gm.open(path) as mem:
        await mem.add("the locksmith's number is in the drawer")
        victim = (await mem.search("green tea", mode="vector", limit=1))[0].memory
        await mem.delete(victim.id)
    monkeypatch.setattr(Indexer, "save", saved)
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        assert mem.indexer.loaded_from == "database"
        assert (await mem.search("locksmith", mode="vector", limit=1))[0].memory.text.startswith("the locksmith")
        assert victim.id not in [h.memory.id for h in await mem.search("green tea", mode="vector", limit=50)]


def damage(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", ["array byte", "header byte", "crafted header", "truncated", "graph byte", "no graph",
                                   "graph rows byte", "garbage"])
async def test_a_damaged_file_is_detected_logged_and_the_index_loaded_from_the_database(
    tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mem.db"
    await fill(path)
    # Exact scoring from here on: near-identical rows (a topic's 40 notes) make a page depend on
    # which path ranked it (the saved graph, or the database's rows while a new graph grows).
    monkeypatch.setattr(vector_plan, "EXACT_MAX_ROWS", 10_000)
    async with gm.open(path) as mem:
        before = await hits(mem)
    vectors = index_file.index_path(path)
    (graph,) = vectors.parent.glob(f"{vectors.name}.*.graph")
    size = vectors.stat().st_size
    if fault == "array byte":  # the middle of the last array's rows (past them is room to grow, unread)
        with vectors.open("rb") as f:
            header, start = index_file.read_header(f)
        last = header["arrays"][-1]
        damage(vectors, start + last["offset"] + last["bytes"] // 2)
    elif fault == "header byte":
        damage(vectors, 40)
    elif fault == "crafted header":  # a whole header (its CRC right) naming Python objects: never mapped
        data = bytearray(vectors.read_bytes())
        length = int.from_bytes(data[8:12], "little")
        header = bytes(data[16 : 16 + length]).replace(b'"dtype": "|b1"', b'"dtype": "|O8"')
        data[12:16] = zlib.crc32(header).to_bytes(4, "little")
        data[16 : 16 + length] = header
        vectors.write_bytes(bytes(data))
    elif fault == "truncated":
        with vectors.open("r+b") as f:
            f.truncate(size // 2)
    elif fault == "graph byte":
        damage(graph, graph.stat().st_size // 2)
    elif fault == "graph rows byte":  # which row of the graph's vectors is each slot's
        with vectors.open("rb") as f:
            header, start = index_file.read_header(f)
        damage(vectors, start + header["graph"]["rows"]["offset"] + 4 * ROWS // 2)
    elif fault == "no graph":
        graph.unlink()
    else:
        vectors.write_bytes(b"not an index at all")
    with caplog.at_level(logging.WARNING, logger="gm.index_file"):
        async with gm.open(path) as mem:
            assert await hits(mem) == before
            assert mem.indexer.loaded_from == "database"
    assert any("is not used" in r.getMessage() for r in caplog.records)
    if fault == "crafted header":
        assert any("its live do not match its header" in r.getMessage() for r in caplog.records)


async def test_a_save_that_fails_midway_leaves_the_previous_file_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mem.db"
    before = await fill(path)
    whole = index_file.index_path(path).read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk full")

    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        mem.indexer._saved = False  # (so the close saves again)
        monkeypatch.setattr(index_file.os, "fsync", crash)
    monkeypatch.undo()
    assert index_file.index_path(path).read_bytes() == whole
    assert len(list(tmp_path.glob("mem.db.vectors*"))) == 2  # the file and its graph: the failed save's are gone
    async with gm.open(path) as mem:
        await mem.indexer.wait_ready()
        assert mem.indexer.loaded_from == "file"
        assert await hits(mem) == before


async def test_a_small_index_is_not_saved_and_an_older_file_goes(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mem.db"
    await fill(path)
    monkeypatch.setattr(index_file, "SAVE_MIN_ROWS", 10_000)
    async with gm.open(path) as mem:
        await mem.add("one more")
        await mem.indexer.wait_ready()  # (an index still loading at close is not saved: the file stays)
    assert not list(tmp_path.glob("mem.db.vectors*"))


async def test_a_database_whose_index_cannot_fit_in_memory_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "mem.db"
    async with gm.open(path) as mem:
        await mem.add_many([{"text": f"note {i}"} for i in range(30)])
    monkeypatch.setattr(index_memory, "available_memory", lambda: 4096)  # (a machine short of memory: a fault)
    with pytest.raises(gm.errors.IndexTooLarge, match="30 memories needs about .* GiB of memory and this machine has"):
        await gm.open(path)
    monkeypatch.undo()
    async with gm.open(path) as mem:  # nothing was harmed
        assert len(await mem.search("note", limit=50)) == 30


async def test_an_import_holds_the_graph_back_until_it_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both cores go to an import's writes: the graph grows only once the import ended (and
    searches meanwhile score the rows it lacks exactly)."""
    grown_during: list[int] = []
    grow = index_module.VectorIndex.grow_graph
    async with gm.open(tmp_path / "mem.db") as mem:

        def watched(self: index_module.VectorIndex, threads: int = 1) -> int:
            grown_during.append(mem.indexer._graph_holds)
            return grow(self, threads)

        monkeypatch.setattr(index_module.VectorIndex, "grow_graph", watched)
        with mem.indexer.hold_graph():
            await mem.add_many([{"text": f"{TOPICS[i % 6]}, note {i}"} for i in range(ROWS)])
            assert mem.indexer.index.graph_backlog() == ROWS and mem.indexer.index.graphed == 0
            assert (await mem.search("my pet's name", mode="vector", limit=1))[0].memory.text.startswith("the dog")
        assert not grown_during
        lines = [orjson.dumps({"text": f"{TOPICS[i % 6]}, imported {i}"}) for i in range(ROWS)]
        report = await transfer.import_lines(mem, lines)
        assert report.imported == ROWS
        while mem.indexer.index.graph_backlog():
            await mem.indexer._grower  # type: ignore[misc]
        assert grown_during and set(grown_during) == {0} and mem.indexer.index.graphed == 2 * ROWS
