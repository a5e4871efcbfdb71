"""Export and import of memories as JSON Lines: the portable path between databases and
releases. Export reads the file read-only (safe while a server runs); import goes
through a store, batched and idempotent by id.

The first line of an export is a header, ``{"greatmemory": {"format": 1, "model": ...,
"model_label": ..., "schema_version": ..., "memories": N, "vectors": bool}}`` (``model``: the
vectors' model identity, see gm.model_identity); every other line is one memory
with the contract's fields (``occurred_at`` among them) plus, with ``--vectors``,
``"vector"``: its float32 embedding in base64. Import also takes plain lines with just
``"text"`` (and any other input field); a line without ``occurred_at`` occurred at its
``created_at``, or, without that too, when it is imported.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

import gm
from gm.errors import GMError, InvalidInput
from gm.memory import Memory, NewMemory, now_ms, parse_json, parse_time
from gm.storage.inspection import EXPORTING, inspect
from gm.storage.sql import memory_from_row
from gm.store import Store
from gm.validation import new_memory

FORMAT = 1
BATCH = 1000  # memories a write (MAX_BATCH): each commit also flushes the keyword index's new terms
YIELD_EVERY = 100  # lines parsed between two turns of the event loop, so the batch being written moves on
# A line's fields: the memory input's, plus what an export adds (the kept times and the vector).
LINE_FIELDS = frozenset({"text", "id", "namespace", "user_id", "agent_id", "session_id", "metadata", "expires_at",
                         "ttl_seconds", "occurred_at", "created_at", "updated_at", "vector"})
Progress = Callable[[int, int], None]  # (done, total)


async def export_lines_async(
    target: str, *, vectors: bool = False, namespace: str | None = None
) -> AsyncIterator[bytes]:
    """The export of the SQLite file or ``postgresql://`` database ``target``, line by line
    (header first), read in one consistent snapshot."""
    async with inspect(target, EXPORTING) as database:
        database.guard()
        if database.schema_version == 0:
            yield _header({"model": None, "model_label": None}, 0, 0, vectors)
            return
        now = now_ms()
        total = await database.total(now, namespace)
        yield _header(await database.model_fields(), database.schema_version, total, vectors)
        async for rows in database.export_rows(now, vectors=vectors, namespace=namespace):
            for row in rows:
                yield orjson.dumps(_line(row, vectors)) + b"\n"


def _header(model: dict[str, str | None], version: int, total: int, vectors: bool) -> bytes:
    # ``model`` is the content identity (an older release importing this file compares it to
    # its own old-scheme name, finds them unequal and embeds again: slower, never wrong).
    header = {"format": FORMAT, "release": gm.__version__, "schema_version": version, **model,
              "memories": total, "vectors": vectors}
    return orjson.dumps({"greatmemory": header}) + b"\n"


def _line(row: Any, vectors: bool) -> dict[str, Any]:
    line = memory_from_row(row).to_dict()
    if vectors:
        line["vector"] = base64.b64encode(row[12]).decode()  # the column after columns_for's
    return line


class UnknownField(InvalidInput):
    """A line with a field import does not know: a typo (``userid``) or another tool's format,
    which must not be imported with the field dropped. The whole import is refused."""

    def __init__(self, line: int, field: str) -> None:
        known = ", ".join(sorted(LINE_FIELDS))
        super().__init__(f"line {line}: unknown field {field!r}; a line may have {known}", path=field)
        self.line = line


def check_fields(lines: Iterable[bytes]) -> int:
    """Read every line once before anything is imported; raises :class:`UnknownField` for the
    first line with a field import would drop. Returns the number of lines."""
    count = 0
    for count, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # reported, and skipped, by the import itself
        if isinstance(data, dict) and "greatmemory" not in data:
            _check_line_fields(count, data)
    return count


def _check_line_fields(number: int, data: dict[str, Any]) -> None:
    for name in data:
        if name not in LINE_FIELDS:
            raise UnknownField(number, name)


@dataclass
class Skipped:
    line: int
    id: str | None
    reason: str


@dataclass
class ImportReport:
    imported: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    embedded: int = 0  # how many had to be embedded (no usable vector in the file)


class Importer:
    """Feeds JSON Lines into a store in batches; see :func:`import_lines`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.report = ImportReport()
        self.same_model = False  # the file's vectors were made by the store's model: reuse them

    def parse(self, number: int, raw: bytes) -> tuple[int, NewMemory] | None:
        """One line as a memory to add, or None (a header, a blank line, or skipped with a reason)."""
        if not raw.strip():
            return None
        try:
            data = parse_json(raw)
        except orjson.JSONDecodeError as exc:
            self.report.skipped.append(Skipped(number, None, f"not JSON: {exc}"))
            return None
        if not isinstance(data, dict):
            self.report.skipped.append(Skipped(number, None, "not a JSON object"))
            return None
        if "greatmemory" in data:
            header = data["greatmemory"]
            model = header.get("model") if isinstance(header, dict) else None
            # A content identity, or an older release's ``label@digest``: either names these files or not.
            self.same_model = isinstance(model, str) and self.store.model.record().made(model)
            return None
        _check_line_fields(number, data)
        memory_id = data.get("id") if isinstance(data.get("id"), str) else None
        try:
            return number, self._memory(data)
        except GMError as exc:
            self.report.skipped.append(Skipped(number, memory_id, exc.message))
            return None

    def _memory(self, data: dict[str, Any]) -> NewMemory:
        now = now_ms()
        fields = {k: data[k] for k in ("text", "id", "namespace", "user_id", "agent_id", "session_id", "metadata",
                                         "ttl_seconds", "occurred_at") if data.get(k) is not None}
        if data.get("expires_at") is not None:
            fields["expires_at"] = data["expires_at"]
        item = new_memory(fields, now)
        if item.expires_at is not None and item.expires_at <= now:
            raise InvalidInput("expired before it was imported")
        if data.get("created_at") is not None:
            item.created_at = parse_time(data["created_at"], "created_at")
        if data.get("updated_at") is not None:
            item.updated_at = parse_time(data["updated_at"], "updated_at")
        vector = data.get("vector")
        if isinstance(vector, str) and self.same_model:
            try:  # (binascii's strict mode: base64.b64decode's validate=True checks with a regex, 9 against 1 us)
                item.vector = binascii.a2b_base64(vector, strict_mode=True)
            except ValueError:
                raise InvalidInput("vector is not valid base64", path="vector") from None
        return item

    async def add(self, batch: list[tuple[int, NewMemory]]) -> None:
        """Store a batch: ids already present with the same content are skipped as such,
        with other content as conflicts; the rest is added in one transaction."""
        if not batch:
            return
        existing = await self.store.get_by_ids([item.id for _, item in batch])
        fresh: list[tuple[int, NewMemory]] = []
        for number, item in batch:
            found = existing.get(item.id)
            if found is None:
                fresh.append((number, item))
                existing[item.id] = _as_memory(item)  # a later line with this id in the same batch is a repeat
            elif item.same_content(found):
                self.report.skipped.append(Skipped(number, item.id, "already present with the same content"))
            else:
                self.report.skipped.append(Skipped(number, item.id, "id already names a memory with other content"))
        if fresh:
            self.report.embedded += await self.store.add_prepared([item for _, item in fresh])
            self.report.imported += len(fresh)


def _as_memory(item: NewMemory) -> Memory:
    s = item.scope
    return Memory(item.id, s.namespace, s.user_id, s.agent_id, s.session_id, item.text, item.metadata,
                  item.created_at or 0, item.updated_at or 0, item.expires_at,
                  item.occurred_at if item.occurred_at is not None else item.created_at or 0)


def _heard(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()


async def import_lines(
    store: Store, lines: Iterable[bytes], *, total: int | None = None, progress: Progress | None = None
) -> ImportReport:
    """Import JSON Lines into ``store`` in batches of ``BATCH``; returns what was imported
    and what was skipped and why. Running it twice imports nothing the second time. A line
    with an unknown field raises :class:`UnknownField` there, after the batches before it
    were stored: run :func:`check_fields` over the lines first to refuse it up front.

    One batch is written while the next one is parsed (the Writer works on its own thread); the
    vector index's graph waits until the import ends."""
    with store.indexer.hold_graph():  # (both cores go to the writes; the graph catches up after)
        return await _import(store, lines, total, progress)


async def _import(store: Store, lines: Iterable[bytes], total: int | None, progress: Progress | None) -> ImportReport:
    importer = Importer(store)
    model = asyncio.ensure_future(store.embedder.dimensions())  # (loaded meanwhile: vectors are checked against it)
    model.add_done_callback(_heard)  # (a model that fails to load fails the first batch's write, which says so)
    writing: asyncio.Task[None] | None = None
    batch: list[tuple[int, NewMemory]] = []
    done = 0
    try:
        for number, raw in enumerate(lines, start=1):
            parsed = importer.parse(number, raw)
            done += 1
            if parsed is not None:
                batch.append(parsed)
            if len(batch) >= BATCH:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(importer.add(batch))
                batch = []
                if progress:
                    progress(done, total or 0)
            elif done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        if writing is not None:
            await writing
        await importer.add(batch)
    finally:
        if writing is not None and not writing.done():  # (a bad line: the batches before it are stored first)
            await asyncio.wait([writing])
            _heard(writing)
    if progress:
        progress(done, total or done)
    return importer.report
