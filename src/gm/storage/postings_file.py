"""The keyword postings saved beside a SQLite database (``<db>.keywords``): a store reopened
ranks keywords in process at once, rather than reading them from FTS5 again (29 s at 1M).

One file: a header (what the database looked like when saved, the statistics, the vocabulary,
the tail of rows written since the base, each array's place and CRC-32) and the base's arrays.
It is saved at close, once the Writer has stopped (the postings are then the database's), to a
temporary file synced and renamed over the old one, so a save killed at any point leaves the
old file whole. It is read back only if every check passes; a file that is damaged, truncated,
of another format or of another database state is logged and the postings built from FTS5.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gm.index_file import CHUNK, IndexFileInvalid, aligned, read_header, stream_crc, write_saved
from gm.storage.sqlite_keywords import ROWID_MASK, TABLE
from gm.storage.sqlite_postings import Base, Postings

log = logging.getLogger(__name__)

MAGIC = b"GMPOSTS\x00"
FORMAT = 1
SAVE_MIN_ROWS = 20_000  # fewer build from FTS5 in well under a second
ARRAYS = {  # each array's dtype
    "keys": "<i8", "lengths": "<i4", "starts": "<i8", "rows": "<i4", "halves": "<u2", "top_half": "<u2",
    "shortest": "<i4", "live": "|b1",
}


class SavedPostings:
    """The postings saved beside ``database``, as the follower reads them (postings_follower.Saved)."""

    def __init__(self, database: Path) -> None:
        self.database = database

    def load(self) -> tuple[Postings, dict[str, Any]] | None:
        return load(self.database)

    def state(self) -> dict[str, Any]:
        return database_state(self.database)


def postings_path(database: Path) -> Path:
    return database.with_name(database.name + ".keywords")


def database_state(database: Path) -> dict[str, Any]:
    """What saved postings must match: the keyword table's definition and FTS5's own records of
    its state, the averages (rows and tokens) and the structure (its segments, and a cookie
    every change to them moves), so any write to the index shows, and a write that leaves it
    alone (metadata, vectors) leaves the file usable."""
    conn = sqlite3.connect(f"file:{database.resolve()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", [TABLE]).fetchall()
        records = dict(conn.execute(f"SELECT id, hex(block) FROM {TABLE}_data WHERE id IN (1, 10)").fetchall())
    finally:
        conn.close()
    return {"keywords": rows[0][0] if rows else None, "averages": records.get(1), "structure": records.get(10)}


def save(postings: Postings, database: Path) -> Path | None:
    """Write ``postings`` (quiescent: the Writer has stopped) for the database as it is now,
    unless their file holds them so already (a write the postings did not need, metadata, still
    rewrote the index's rows); postings small enough to build in no time are not saved (nor an
    older file kept)."""
    path = postings_path(database)
    if postings.rows < SAVE_MIN_ROWS:
        path.unlink(missing_ok=True)
        return None
    state = database_state(database)
    if not postings.changed and postings.saved_at == state:
        return path  # (the file holds them already)
    with postings.lock:
        base = postings.base
        arrays = {name: np.ascontiguousarray(postings.live if name == "live" else getattr(base, name))
                  for name in ARRAYS}
        header: dict[str, Any] = {
            "format": FORMAT, "database": state, "rows": postings.rows,
            "tokens": postings.tokens, "dead": postings.dead, "hits": postings.hits,
            "vocabulary": sorted(base.vocabulary, key=base.vocabulary.__getitem__),
            "overflow": sorted(base.overflow | postings.overflow),
            "tail": [[key, length, counts] for key, (length, counts) in postings.tail.items()],
        }
    entries: list[dict[str, Any]] = []
    offset = 0
    for name, array in arrays.items():
        entries.append({"name": name, "dtype": array.dtype.str, "length": len(array), "offset": offset,
                        "crc": zlib.crc32(array.data.cast("B"))})
        offset += aligned(array.nbytes)
    header["arrays"] = entries
    temporary = path.with_name(f"{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        blocks = [(e["offset"], a.data.cast("B")) for e, a in zip(entries, arrays.values(), strict=True)]
        write_saved(path, temporary, MAGIC, header, blocks, offset)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # (a killed save's)
        stale.unlink(missing_ok=True)
    postings.changed, postings.saved_at = False, state
    log.info("keyword postings saved: %d rows in %s", postings.rows, path)
    return path


def load(database: Path) -> tuple[Postings, dict[str, Any]] | None:
    """The saved postings if the file is whole, with the database state they were saved at
    (the caller compares it with the database's between two transactions); else None (logged)."""
    path = postings_path(database)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # (a killed save's: the store holds the lock)
        stale.unlink(missing_ok=True)
    if not path.exists():
        return None
    try:
        return _load(path)
    except Exception as exc:  # (a header written by hand can fail in ways no check names: never served)
        log.warning("the saved keyword postings %s are not used (%s): building them from the database", path, exc)
        return None


def _load(path: Path) -> tuple[Postings, dict[str, Any]]:
    with path.open("rb", buffering=0) as f:
        header, start = read_header(f, MAGIC, FORMAT, "keyword postings")
        entries = header["arrays"]
        if [e["name"] for e in entries] != list(ARRAYS) or any(e["dtype"] != ARRAYS[e["name"]] for e in entries):
            raise IndexFileInvalid("its arrays are not the ones this release reads")
        arrays: dict[str, np.ndarray[Any, Any]] = {}
        buffer = bytearray(CHUNK)
        for entry in entries:
            dtype = np.dtype(entry["dtype"])
            f.seek(start + entry["offset"])
            if stream_crc(f, entry["length"] * dtype.itemsize, buffer) != entry["crc"]:
                raise IndexFileInvalid(f"its {entry['name']} are damaged")
            # Mapped, not copied: a query touches its own words' postings only, and a page read
            # (above, for its check) stays in the OS's cache, not in this process's memory. A plain
            # array over the mapping: np.memmap's own indexing costs ~20 us a slice in Python, and a
            # ranking slices its words' arrays ~60 times (1.4 ms of a 1M whole-namespace query).
            arrays[entry["name"]] = np.memmap(path, dtype=dtype, mode="r", offset=start + entry["offset"],
                                              shape=(entry["length"],)).view(np.ndarray) if entry["length"] \
                else np.empty(0, dtype)
    live = arrays.pop("live")
    vocabulary = {token: number for number, token in enumerate(header["vocabulary"])}
    base = Base(vocabulary=vocabulary, overflow=frozenset(header["overflow"]), **arrays)
    n = len(base.keys)
    if (len(base.lengths) != n or len(live) != n or len(base.starts) != len(vocabulary) + 1
            or len(base.top_half) != len(vocabulary) or len(base.shortest) != len(vocabulary)
            or len(base.halves) != len(base.rows) or int(base.starts[-1]) != len(base.rows)):
        raise IndexFileInvalid("its arrays do not match its header")
    if header["rows"] < len(base.keys) - int(np.count_nonzero(~live)) or header["dead"] != int(np.count_nonzero(~live)):
        raise IndexFileInvalid("its counts do not match its arrays")
    postings = Postings(base, rows=header["rows"], tokens=header["tokens"], live=live.copy(), dead=header["dead"],
                        hits={str(t): int(c) for t, c in header["hits"].items()}, changed=False)
    for key, length, counts in header["tail"]:
        postings.tail[int(key)] = (int(length), {str(t): int(c) for t, c in counts.items()})
        postings.tail_keys[int(key) & ROWID_MASK] = int(key)
        for token, half in counts.items():
            postings.tail_tokens.setdefault(token, {})[int(key)] = int(half)
    postings.saved_at = header["database"]
    log.info("keyword postings read from %s: %d rows", path, postings.rows)
    return postings, header["database"]
