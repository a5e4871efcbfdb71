"""The vector index saved beside a SQLite database (``<db>.vectors`` and its graph file), so a
store opens in a time that does not grow with its data: read back, never rebuilt.

The file holds the index's arrays and names the graph file, each with its CRC-32; a header
records what the database looked like when it was saved (its fingerprint: the last history
row, the rows, the vectors' model). It is used only when every check passes: a file that is
truncated, damaged, of another format version or of another database state is logged and
ignored, and the index is loaded from the database instead (then saved again at close).

A save writes the graph under a new name (or keeps the file a still unchanged graph is a view
of), then the arrays to a temporary file that is synced and renamed over the old one: a save
killed at any point leaves the previous file whole. Read back, the arrays are copy-on-write
mappings of the file and the graph a view of its file: nothing is copied at open.

The graph file holds its own copy of every vector it links. The arrays file records which of
those rows is each slot's (``graph.rows``), so a read-back index scores exactly from the graph
file's mapping, which the graph's walk reads anyway: the arrays' copy of the vectors stays on
disk (at 1M memories, resident memory after the peer benchmark's queries 1,371 -> 1,014 MiB).
A file without that record (an earlier release's) is read back as before. The rows added
after a graph was read back have a graph of their own, the delta (gm.index): it is saved
beside the kept graph file (``<db>.vectors.<token>.delta``) and read back as a view too.
"""

from __future__ import annotations

import io
import json
import logging
import math
import mmap
import os
import sqlite3
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import numpy.typing as npt

from gm.index import GraphVectors, IndexState, VectorIndex, with_room

if TYPE_CHECKING:
    from usearch.index import Index as Graph

log = logging.getLogger(__name__)

MAGIC = b"GMVECTS\x00"
FORMAT = 2  # 2: each array has room to grow (mapped copy-on-write)
ALIGN = 64
CHUNK = 16 << 20  # bytes read or checked at a time
SAVE_MIN_ROWS = 20_000  # fewer load from the database in a fraction of a second (~0.1 s)
# Each array's dtype and the shape of a row ("dim": the vectors' dimensions; scope: one column a scope field).
LAYOUT: dict[str, tuple[str, tuple[int | str, ...]]] = {
    "vectors": ("|i1", ("dim",)), "rowids": ("<i8", ()), "live": ("|b1", ()), "expires": ("<i8", ()),
    "scope": ("<i4", (4,)),
}
ARRAYS = tuple(LAYOUT)


class IndexFileInvalid(Exception):
    """The file cannot be used (why is the message); the index loads from the database."""


def index_path(database: Path) -> Path:
    return database.with_name(database.name + ".vectors")


def fingerprint(database: Path) -> dict[str, Any]:
    """What the saved index must match: every write leaves a history row, a purge or delete too;
    session context filled after an upgrade changes no history but the rows without context;
    a re-embed or reindex changes the vectors' model or generation."""
    conn = sqlite3.connect(f"file:{database.resolve()}?mode=ro", uri=True)
    try:
        history, rows, last = conn.execute(
            "SELECT (SELECT max(seq) FROM history), (SELECT count(*) FROM memories), (SELECT max(rowid) FROM memories)"
        ).fetchone()
        try:
            (uncontexted,) = conn.execute("SELECT count(*) FROM memories WHERE context IS NULL").fetchone()
        except sqlite3.OperationalError:  # a schema before session context
            uncontexted = None
        meta = dict(conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('model_identity', 'vectors_generation', 'old_vectors')"
        ).fetchall())
        (schema,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    return {"schema": schema, "history": history, "rows": rows, "last_rowid": last, "without_context": uncontexted,
            "meta": meta}


def _crc(data: memoryview | bytes, crc: int = 0) -> int:
    for start in range(0, len(data), CHUNK):
        crc = zlib.crc32(data[start : start + CHUNK], crc)
    return crc


def _file_crc(path: Path) -> int:
    with path.open("rb", buffering=0) as f:
        return stream_crc(f, os.fstat(f.fileno()).st_size, bytearray(CHUNK))


def save(index: VectorIndex, database: Path, model: str) -> Path | None:
    """Write ``index`` (quiescent: the Writer has stopped) for the database as it is now; an
    index small enough to load from the database in no time is not saved (nor an older file kept).
    A graph (or delta) still a view of the file it was read from is kept as that file, not
    written again."""
    path = index_path(database)
    if len(index) < SAVE_MIN_ROWS:
        for stale in (path, *path.parent.glob(f"{path.name}.*")):
            stale.unlink(missing_ok=True)
        return None
    state = index.state()
    print_ = fingerprint(database)
    token = os.urandom(6).hex()
    kept, kept_delta = (file if file is not None and path.with_name(file[0]).exists() else None
                        for file in (state.graph_file, state.delta_file))
    names = {kind: None if graph is None else file[0] if file is not None else f"{path.name}.{token}.{kind}"
             for kind, graph, file in (("graph", state.graph, kept), ("delta", state.delta, kept_delta))}
    graph_name, delta_name = names["graph"], names["delta"]
    temporary = path.with_name(f"{path.name}.{token}.tmp")
    try:
        _write(state, path, temporary, (graph_name, kept), (delta_name, kept_delta), model, print_)
    except BaseException:
        temporary.unlink(missing_ok=True)
        for name, was_kept in ((graph_name, kept), (delta_name, kept_delta)):
            if name is not None and was_kept is None:
                path.with_name(name).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f"{path.name}.*"):  # graphs of earlier saves, a temporary file of a killed one
        if stale.name not in (graph_name, delta_name):
            stale.unlink(missing_ok=True)
    log.info("vector index saved: %d rows in %s", len(index), path)
    return path


Named = tuple[str | None, tuple[str, int] | None]  # a graph's file name, and (name, CRC) if that file is kept


def _write(state: IndexState, path: Path, temporary: Path, graph_file: Named, delta_file: Named, model: str,
           print_: dict[str, Any]) -> None:
    (graph_name, kept), (delta_name, kept_delta) = graph_file, delta_file
    graph_crc = kept[1] if kept is not None else None
    if state.graph is not None and graph_name is not None and kept is None:
        state.graph.save(str(path.with_name(graph_name)))
        graph_crc = _file_crc(path.with_name(graph_name))
    delta_crc = kept_delta[1] if kept_delta is not None else None
    if state.delta is not None and delta_name is not None and kept_delta is None:
        state.delta.save(str(path.with_name(delta_name)))
        delta_crc = _file_crc(path.with_name(delta_name))
    graph_rows = None
    if state.graph is not None and graph_name is not None:
        graph_rows = _graph_rows(path.with_name(graph_name), state,
                                 state.delta_start if state.delta is not None else state.graphed)
    # Each array is laid out with room for a quarter more rows (a sparse hole in the file): it is
    # mapped copy-on-write when read back, and the rows added after fill that room.
    rows = with_room(state.count)
    arrays = {name: np.ascontiguousarray(getattr(state, name)[: state.count]) for name in ARRAYS}
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, array in arrays.items():
        room = array.nbytes // max(state.count, 1) * rows
        entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                        "bytes": array.nbytes, "room": room, "crc": _crc(array.data.cast("B"))})
        offset += aligned(room)
    blocks = [(entry["offset"], array.data.cast("B")) for entry, array in zip(entries, arrays.values(), strict=True)]
    graph: dict[str, Any] | None = None
    if graph_name is not None:
        graph = {"file": graph_name, "crc": graph_crc, "size": len(state.graph) if state.graph is not None else 0}
        if graph_rows is not None:  # (a release before it ignores the key; one after reads a file without it)
            graph["rows"] = {"offset": offset, "count": len(graph_rows), "crc": _crc(graph_rows.data.cast("B"))}
            blocks.append((offset, graph_rows.data.cast("B")))
            offset += aligned(graph_rows.nbytes)
        if state.delta is not None and delta_name is not None:
            graph["delta"] = {"file": delta_name, "crc": delta_crc, "size": len(state.delta),
                              "start": state.delta_start}
    header = {
        "format": FORMAT, "model": model, "fingerprint": print_, "dim": state.dim, "scale": state.scale,
        "count": state.count, "graphed": state.graphed, "codes": state.codes, "arrays": entries, "graph": graph,
    }
    write_saved(path, temporary, MAGIC, header, blocks, offset)


def _graph_block(head: bytes, size: int, dim: int) -> bool:
    """Whether a usearch file of ``size`` vectors begins with their int8 rows as this release
    reads them: the row count and row bytes (two little-endian uint32), then the rows."""
    return len(head) >= 8 and struct.unpack("<II", head[:8]) == (size, dim)


def _row_hashes(rows: npt.NDArray[np.int8], seeds: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Two 64-bit hashes of each row (a row of zeros pads it to whole words)."""
    words = -(-rows.shape[1] // 8)
    if rows.shape[1] != words * 8 or not rows.flags.c_contiguous:
        padded = np.zeros((len(rows), words * 8), dtype=np.int8)
        padded[:, : rows.shape[1]] = rows
        rows = padded
    as_words = rows.view(np.uint64)
    with np.errstate(over="ignore"):
        return np.stack([(as_words * seed[:words]).sum(axis=1, dtype=np.uint64) for seed in seeds], axis=1)


def _graph_rows(graph_path: Path, state: IndexState, graphed: int) -> npt.NDArray[np.int32] | None:
    """Each slot's row in the vectors of the graph file (-1: not there), for the slots below
    ``graphed`` (those it covers): the graph holds each vector in the order it was added, and adds on two
    threads interleave, so the rows are matched by content (two 64-bit hashes of each; equal
    vectors are interchangeable). Read through a buffer: the pages stay the OS's cache. None
    if the file does not start as this release reads (the index's own vectors serve then)."""
    size, dim = len(state.graph) if state.graph is not None else 0, state.dim
    seeds = np.random.default_rng(0x9E3779B9).integers(1, 2**63, size=(2, -(-dim // 8)), dtype=np.uint64) | np.uint64(1)
    with graph_path.open("rb", buffering=0) as f:
        if not _graph_block(f.read(8), size, dim):
            log.info("%s does not hold its vectors as this release reads them: exact scoring reads the index's own",
                     graph_path)
            return None
        theirs = np.empty((size, 2), dtype=np.uint64)
        per_read = max(1, CHUNK // dim)
        buffer = bytearray(per_read * dim)
        for start in range(0, size, per_read):
            n = min(per_read, size - start)
            view = memoryview(buffer)[: n * dim]
            if f.readinto(view) != n * dim:
                raise IndexFileInvalid("its graph is truncated")
            theirs[start : start + n] = _row_hashes(np.frombuffer(view, dtype=np.int8).reshape(n, dim), seeds)
    order = np.argsort(theirs[:, 0], kind="stable")
    first = theirs[order, 0]
    rows = np.full(graphed, -1, dtype="<i4")
    for start in range(0, graphed, CHUNK // dim):
        slots = np.arange(start, min(graphed, start + CHUNK // dim), dtype=np.int64)
        slots = slots[state.live[slots]]
        ours = _row_hashes(np.asarray(state.vectors[slots]), seeds)
        at = np.minimum(np.searchsorted(first, ours[:, 0]), max(size - 1, 0))
        found = order[at] if size else np.zeros(len(slots), dtype=np.int64)
        same = (theirs[found] == ours).all(axis=1) if size else np.zeros(len(slots), dtype=np.bool_)
        rows[slots[same]] = found[same]
    return rows


def aligned(size: int) -> int:
    """``size`` rounded up to ALIGN bytes."""
    return -(-size // ALIGN) * ALIGN


def write_saved(path: Path, temporary: Path, magic: bytes, header: dict[str, Any],
                blocks: list[tuple[int, memoryview]], size: int) -> None:
    """Write a saved file to ``temporary``, synced, then rename it over ``path``: ``magic``,
    the JSON header's length and CRC-32, the header, then each (offset, bytes) block at its
    offset from the first aligned byte after the header; ``size`` bytes of blocks in all."""
    encoded = json.dumps(header).encode()
    start = aligned(len(magic) + 8 + len(encoded))
    with temporary.open("wb") as f:
        f.write(magic + len(encoded).to_bytes(4, "little") + zlib.crc32(encoded).to_bytes(4, "little") + encoded)
        for offset, data in blocks:
            f.seek(start + offset)
            f.write(data)
        f.truncate(start + size)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(database: Path, model: str) -> VectorIndex | None:
    """The saved index if it is whole and matches the database now; else None (logged)."""
    path = index_path(database)
    if not path.exists():
        return None
    try:
        return _load(path, database, model)
    except Exception as exc:  # (a header written by hand can fail in ways no check names: never served)
        log.warning("the saved vector index %s is not used (%s): loading from the database", path, exc)
        return None


def read_header(f: BinaryIO, magic: bytes = MAGIC, version: int = FORMAT, what: str = "vector index") -> tuple[
        dict[str, Any], int]:
    """A saved file's JSON header, checked (its magic, CRC-32 and format ``version``), and
    where its arrays start."""
    head = f.read(len(magic) + 8)
    if len(head) < len(magic) + 8 or head[: len(magic)] != magic:
        raise IndexFileInvalid(f"not a greatmemory {what} file")
    length = int.from_bytes(head[len(magic) : len(magic) + 4], "little")
    encoded = f.read(length)
    if len(encoded) != length or zlib.crc32(encoded) != int.from_bytes(head[len(magic) + 4 :], "little"):
        raise IndexFileInvalid("its header is damaged")
    header: dict[str, Any] = json.loads(encoded)
    if header.get("format") != version:
        raise IndexFileInvalid(f"format {header.get('format')}, this release reads {version}")
    return header, aligned(len(magic) + 8 + length)


def _load(path: Path, database: Path, model: str) -> VectorIndex:
    with path.open("rb") as f:
        header, start = read_header(f)
        size = os.fstat(f.fileno()).st_size
    if header["model"] != model:
        raise IndexFileInvalid(f"it holds vectors of model {header['model']}, the database {model}")
    if header["fingerprint"] != fingerprint(database):
        raise IndexFileInvalid("the database changed since it was saved")
    count, dim = header["count"], header["dim"]
    if not isinstance(count, int) or count < 1 or not isinstance(dim, int) or dim < 1:
        raise IndexFileInvalid(f"it holds {count!r} rows of {dim!r} dimensions")
    if not isinstance(header["graphed"], int) or not 0 <= header["graphed"] <= count:
        raise IndexFileInvalid(f"its graph covers {header['graphed']!r} of {count} rows")
    if header["graph"] is not None and not 0 <= header["graph"]["size"] <= header["graphed"]:
        raise IndexFileInvalid(f"its graph holds {header['graph']['size']!r} of {header['graphed']} rows")
    delta = header["graph"].get("delta") if header["graph"] is not None else None
    if delta is not None and not (isinstance(delta["start"], int) and 0 <= delta["start"] <= header["graphed"]
                                  and 0 <= delta["size"] <= header["graphed"] - delta["start"]):
        raise IndexFileInvalid(f"its delta graph holds {delta['size']!r} rows from {delta['start']!r}")
    entries = header["arrays"]
    if [entry["name"] for entry in entries] != list(ARRAYS):
        raise IndexFileInvalid("its arrays are not the ones this release reads")
    rooms = set()
    for entry in entries:
        dtype, shape = LAYOUT[entry["name"]]
        want = [count, *(dim if isinstance(extent, str) else extent for extent in shape)]
        row = math.prod(want[1:]) * np.dtype(dtype).itemsize
        if entry["dtype"] != dtype or entry["shape"] != want or entry["bytes"] != count * row \
                or entry["room"] < entry["bytes"] or entry["room"] % row:
            raise IndexFileInvalid(f"its {entry['name']} do not match its header")
        if start + entry["offset"] + entry["room"] > size:
            raise IndexFileInvalid(f"it is truncated ({entry['name']})")
        rooms.add(entry["room"] // row)
    if len(rooms) != 1:
        raise IndexFileInvalid("its arrays have room for different numbers of rows")
    graph_path = path.with_name(header["graph"]["file"]) if header["graph"] is not None else None
    delta_path = path.with_name(delta["file"]) if delta is not None else None
    # The checksums two at a time (zlib lets other threads run), read through a buffer of their
    # own rather than the mappings below: the pages stay the OS's cache, not this process's memory.
    with ThreadPoolExecutor(2, thread_name_prefix="gm-index-check") as pool:
        arrays_checked = pool.submit(_check_arrays, path, start, entries)
        graph_crc = pool.submit(_file_crc, graph_path) if graph_path is not None else None
        delta_crc = pool.submit(_file_crc, delta_path) if delta_path is not None else None
        arrays_checked.result()
        if graph_crc is not None and graph_crc.result() != header["graph"]["crc"]:
            raise IndexFileInvalid("its graph is damaged")
        if delta_crc is not None and delta is not None and delta_crc.result() != delta["crc"]:
            raise IndexFileInvalid("its delta graph is damaged")
    (rows,) = rooms
    arrays = {entry["name"]: np.memmap(path, dtype=np.dtype(entry["dtype"]), mode="c", offset=start + entry["offset"],
                                       shape=(rows, *entry["shape"][1:])) for entry in entries}
    graph, vectors, delta_graph = None, None, None
    if graph_path is not None:
        graph, vectors = _view_graph(graph_path, path, start, header)
    if delta_path is not None and delta is not None:
        delta_graph, _ = _view(delta_path)
        if len(delta_graph) != delta["size"]:
            raise IndexFileInvalid("its delta graph could not be read")
    state = IndexState(dim=header["dim"], scale=header["scale"], count=count, graphed=header["graphed"],
                       codes=header["codes"], graph=graph, vectors=arrays["vectors"], rowids=arrays["rowids"],
                       live=arrays["live"], expires=arrays["expires"], scope=arrays["scope"],
                       graph_file=None if graph is None else (header["graph"]["file"], header["graph"]["crc"]),
                       graph_vectors=vectors, delta=delta_graph, delta_start=delta["start"] if delta else 0,
                       delta_file=(delta["file"], delta["crc"]) if delta is not None else None)
    index = VectorIndex.from_state(state)
    log.info("vector index read from %s: %d memories", path, len(index))
    return index


def _view_graph(graph_path: Path, path: Path, start: int, header: dict[str, Any]) -> tuple[Graph, GraphVectors | None]:
    """The graph as a view of its file, mapped here once, and (if the file records which row is
    each slot's) its vectors for exact scoring from the same mapping."""
    graph, mapped = _view(graph_path)
    size, dim = header["graph"]["size"], header["dim"]
    if len(graph) != size:
        raise IndexFileInvalid("its graph could not be read")
    rows = header["graph"].get("rows")
    if rows is None or not _graph_block(mapped[:8], size, dim):
        return graph, None
    count, delta = rows.get("count"), header["graph"].get("delta")
    covered = delta["start"] if delta is not None else header["graphed"]
    if count != covered:
        raise IndexFileInvalid(f"its graph's rows are {count!r} for {covered} slots")
    with path.open("rb") as f:
        f.seek(start + rows["offset"])
        data = f.read(4 * count)
    if len(data) != 4 * count or zlib.crc32(data) != rows["crc"]:
        raise IndexFileInvalid("its graph's rows are damaged")
    slot_rows = np.frombuffer(data, dtype="<i4").astype(np.intp)
    if len(slot_rows) and (int(slot_rows.min()) < -1 or int(slot_rows.max()) >= size):
        raise IndexFileInvalid("its graph's rows point past its vectors")
    block = np.frombuffer(mapped, dtype=np.int8, count=size * dim, offset=8).reshape(size, dim)
    return graph, GraphVectors(block, slot_rows)


def _view(graph_path: Path) -> tuple[Graph, mmap.mmap]:
    """A usearch view of a graph file, and the mapping made here that it reads (kept on the
    graph as ``gm_mapping``, so it lives as long as the graph)."""
    from usearch.index import Index as Graph

    with graph_path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    graph = Graph.restore(memoryview(mapped), view=True)
    if graph is None:
        raise IndexFileInvalid(f"{graph_path.name} could not be read")
    graph.gm_mapping = mapped  # type: ignore[attr-defined]
    return graph, mapped


def _check_arrays(path: Path, start: int, entries: list[dict[str, Any]]) -> None:
    buffer = bytearray(CHUNK)
    with path.open("rb", buffering=0) as f:
        for entry in entries:
            f.seek(start + entry["offset"])
            if stream_crc(f, entry["bytes"], buffer) != entry["crc"]:
                raise IndexFileInvalid(f"its {entry['name']} are damaged")


def stream_crc(f: io.RawIOBase, length: int, buffer: bytearray) -> int:
    """The CRC-32 of the next ``length`` bytes of ``f`` (IndexFileInvalid if fewer are there)."""
    crc, view = 0, memoryview(buffer)
    while length > 0:
        got = f.readinto(view[: min(length, len(buffer))])
        if not got:
            raise IndexFileInvalid("it is truncated")
        crc = zlib.crc32(view[:got], crc)
        length -= got
    return crc
