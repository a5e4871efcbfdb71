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
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sqlite3
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gm.index import IndexState, VectorIndex, with_room

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
    A graph still a view of the file it was read from is kept as that file, not written again."""
    path = index_path(database)
    if len(index) < SAVE_MIN_ROWS:
        for stale in (path, *path.parent.glob(f"{path.name}.*")):
            stale.unlink(missing_ok=True)
        return None
    state = index.state()
    print_ = fingerprint(database)
    token = os.urandom(6).hex()
    kept = state.graph_file if state.graph_file is not None and path.with_name(state.graph_file[0]).exists() else None
    graph_name = None if state.graph is None else kept[0] if kept is not None else f"{path.name}.{token}.graph"
    temporary = path.with_name(f"{path.name}.{token}.tmp")
    try:
        _write(state, path, temporary, graph_name, kept, model, print_)
    except BaseException:
        temporary.unlink(missing_ok=True)
        if graph_name is not None and kept is None:
            path.with_name(graph_name).unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f"{path.name}.*"):  # graphs of earlier saves, a temporary file of a killed one
        if stale.name != graph_name:
            stale.unlink(missing_ok=True)
    log.info("vector index saved: %d rows in %s", len(index), path)
    return path


def _write(state: IndexState, path: Path, temporary: Path, graph_name: str | None, kept: tuple[str, int] | None,
           model: str, print_: dict[str, Any]) -> None:
    graph_crc = kept[1] if kept is not None else None
    if state.graph is not None and graph_name is not None and kept is None:
        state.graph.save(str(path.with_name(graph_name)))
        graph_crc = _file_crc(path.with_name(graph_name))
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
    header = {
        "format": FORMAT, "model": model, "fingerprint": print_, "dim": state.dim, "scale": state.scale,
        "count": state.count, "graphed": state.graphed, "codes": state.codes, "arrays": entries,
        "graph": None if graph_name is None else {"file": graph_name, "crc": graph_crc,
                                                  "size": len(state.graph) if state.graph is not None else 0},
    }
    blocks = [(entry["offset"], array.data.cast("B")) for entry, array in zip(entries, arrays.values(), strict=True)]
    write_saved(path, temporary, MAGIC, header, blocks, offset)


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
    # Both checksums at once (zlib lets other threads run), read through a buffer of their own
    # rather than the mappings below: the pages stay the OS's cache, not this process's memory.
    with ThreadPoolExecutor(2, thread_name_prefix="gm-index-check") as pool:
        arrays_checked = pool.submit(_check_arrays, path, start, entries)
        graph_crc = pool.submit(_file_crc, graph_path) if graph_path is not None else None
        arrays_checked.result()
        if graph_crc is not None and graph_crc.result() != header["graph"]["crc"]:
            raise IndexFileInvalid("its graph is damaged")
    (rows,) = rooms
    arrays = {entry["name"]: np.memmap(path, dtype=np.dtype(entry["dtype"]), mode="c", offset=start + entry["offset"],
                                       shape=(rows, *entry["shape"][1:])) for entry in entries}
    graph = None
    if graph_path is not None:
        from usearch.index import Index as Graph

        graph = Graph.restore(str(graph_path), view=True)
        if graph is None or len(graph) != header["graph"]["size"]:
            raise IndexFileInvalid("its graph could not be read")
    state = IndexState(dim=header["dim"], scale=header["scale"], count=count, graphed=header["graphed"],
                       codes=header["codes"], graph=graph, **arrays,
                       graph_file=None if graph is None else (header["graph"]["file"], header["graph"]["crc"]))
    index = VectorIndex.from_state(state)
    log.info("vector index read from %s: %d memories", path, len(index))
    return index


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
