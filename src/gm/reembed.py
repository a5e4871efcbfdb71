"""Re-embedding online: moving a database's vectors to another model (or rebuilding them
with the same one, a reindex) while the store keeps serving searches and writes.

How it goes (gm.storage.reembed_flow holds the SQL): the next model's columns are added
beside the current ones; a sweep embeds every memory into them in small writes through
the Writer, while this store embeds its own new writes with both models; the Indexer fills
an index of the next vectors beside the published one. Once every memory has its next
vector, one transaction renames the next columns to the current names, and the store
switches its model and index in the same step. The state is in the rows (a NULL
``embedding_next``), so a re-embed killed at any point resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gm import loops
from gm.embedding import Embedder, ModelSpec
from gm.errors import (
    GMError,
    InvalidInput,
    ModelMismatch,
    ModelNotFound,
    ReembedInProgress,
    StorageUnavailable,
    StoreClosed,
)
from gm.memory import format_time
from gm.model_identity import IDENTITY, model_of, vectors_identity
from gm.progress import Meter, OnProgress, Progress
from gm.storage.base import BeginReembed, EndReembed, StoreNextVectors, SwitchVectors
from gm.storage.ops import ReembedInfo

if TYPE_CHECKING:
    from gm.storage.reads import Reads
    from gm.store import Store

log = logging.getLogger(__name__)

BATCH = 64  # memories a sweep write holds: one embedding call, and a commit short enough for other writes
MAX_PASSES = 20  # sweeps from the start that find memories written meanwhile without the next vector
SETTLE_SECONDS = 10.0  # how long a search that met this store's own switch waits for the store to make it
SWITCH_ATTEMPTS = 3
SWITCH_PAUSE_SECONDS = 1.0


ProgressSink = OnProgress


@dataclass(frozen=True, slots=True)
class ReembedReport:
    """What a finished re-embed did."""

    model: str  # the identity the vectors have now
    embedded: int  # memories this run embedded (a resumed run counts only its own)
    total: int
    seconds: float
    resumed: bool

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as the HTTP API and ``gmem reembed --json`` write it."""
        return {"model": self.model, "embedded": self.embedded, "total": self.total,
                "seconds": round(self.seconds, 3), "rate": round(self.rate, 1), "resumed": self.resumed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReembedReport:
        return cls(str(data["model"]), int(data["embedded"]), int(data["total"]), float(data["seconds"]),
                   bool(data["resumed"]))


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a database records about re-embedding: the one under way (``info``; ``done`` of
    ``total`` memories have its vector), and ``old_model``, whose vectors the last switch left
    until ``end_reembed(drop_old=True)``."""

    info: ReembedInfo | None
    done: int
    total: int
    old_model: str | None

    def to_dict(self) -> dict[str, Any]:
        under_way = None
        if self.info is not None:
            under_way = {"model": self.info.identity, "label": self.info.label, "model_dir": self.info.model_dir,
                         "started_at": format_time(self.info.started_at), "done": self.done, "total": self.total}
        return {"reembed": under_way, "old_vectors": self.old_model}


async def recorded(reads: Reads, *, next_column: bool = True) -> Recorded:
    """What ``reads`` (a backend, or a read-only inspection) records about re-embedding;
    ``next_column``: whether ``memories.embedding_next`` exists to be counted (BeginReembed
    adds it in the transaction that records the re-embed, so a backend need not look)."""
    raw, old = await reads.meta_value("reembed"), await reads.meta_value("old_vectors")
    info = ReembedInfo.from_json(raw) if raw is not None else None
    done, total = await reads.next_progress() if info is not None and next_column else (0, 0)
    old_model = None
    if old is not None:
        try:
            old_model = str(orjson.loads(old).get("model") or "") or "an earlier model"
        except (orjson.JSONDecodeError, AttributeError):
            old_model = "an earlier model"
    return Recorded(info, done, total, old_model)


def new_model(folder: str | os.PathLike[str]) -> ModelSpec:
    """The model a re-embed is asked to move to, in ``folder``."""
    try:
        return ModelSpec.from_dir(folder)
    except ModelNotFound:
        raise ModelNotFound(
            f"{os.fspath(folder)} is not a model's folder: the model to re-embed with must be a folder holding "
            "model.onnx and tokenizer.json"
        ) from None


class NextModel:
    """The next model's side of a store while a re-embed is under way: what its writes are
    embedded with besides the current model (``embedder`` None: a reindex copies vectors)."""

    def __init__(self, info: ReembedInfo, embedder: Embedder | None, own: bool = True,
                 spec: ModelSpec | None = None) -> None:
        self.info = info
        self.embedder = embedder
        self.spec = spec
        self.own = own  # this store runs the re-embed (False: another instance does; this one follows)

    async def vectors(self, texts: list[str], current: list[bytes]) -> list[bytes] | None:
        """The next model's vectors of ``texts``; None once the re-embed ended (its model
        stopped): the write then has none, and the sweep or the switch sees to it."""
        if self.embedder is None:
            return list(current)
        try:
            return [v.tobytes() for v in await self.embedder.embed_many(texts)]
        except StoreClosed:
            return None


class Reembed:
    """One re-embed run on an open store (:meth:`gm.store.Store.reembed`)."""

    def __init__(self, store: Store, spec: ModelSpec | None, progress: ProgressSink | None, batch: int = BATCH) -> None:
        self.store = store
        self.spec = spec  # None: reindex with the current model
        self.progress = progress
        self.batch = batch

    async def run(self) -> ReembedReport:
        store = self.store
        started = time.perf_counter()
        async with store.backend.reembed_lock():
            embedder = None if self.spec is None else Embedder(self.spec, threads=store.settings.embed_threads)
            try:
                info, resumed = await self._begin(embedder)
                next_model, followed = NextModel(info, embedder), store.models.next
                store.models.next = next_model  # the store's writes are embedded with both from now on
                if followed is not None and followed.embedder is not None:  # (it followed another's run)
                    await followed.embedder.stop()
                if not store.backend.native_vectors:
                    await store.indexer.prepare(info.identity)
                embedded, total = await self._sweep(next_model)
                if not store.backend.native_vectors:  # (the switch committed: searches move in one step)
                    await store.indexer.promote(info.identity)
                store.models.switch(info.identity, self.spec, embedder)
                embedder = None  # (the store owns it now)
            except BaseException:
                store.models.next = None
                if not store.backend.native_vectors and not store.closing:
                    await store.indexer.discard()  # (a run that stopped: its next index is not kept up)
                raise
            finally:
                if embedder is not None:
                    await embedder.stop()
        seconds = time.perf_counter() - started
        log.info("re-embed done: %d memories embedded in %.1fs; vectors are %s now", embedded, seconds, info.identity)
        return ReembedReport(info.identity, embedded, total, seconds, resumed)

    async def _begin(self, embedder: Embedder | None) -> tuple[ReembedInfo, bool]:
        store = self.store
        generation = int(await store.backend.meta_value("vectors_generation") or 0) + 1
        if embedder is None:  # a reindex: the same model, vectors made afresh
            identity = vectors_identity(model_of(store.vectors_model), generation)
            label, model_dir = store.model.label, str(store.model.model_path.parent)
            dim = await store.embedder.dimensions()
        else:
            assert self.spec is not None
            if self.spec.identity == model_of(store.vectors_model):
                raise InvalidInput(
                    f"the database's vectors are already model {self.spec.label!r}'s; to rebuild them, run "
                    "`gmem reindex`"
                )
            identity = vectors_identity(self.spec.identity, generation)
            label, model_dir, dim = self.spec.label, str(self.spec.model_path.parent), await embedder.dimensions()
        begun = int(time.time() * 1000)
        info: ReembedInfo = await store.backend.write(BeginReembed(identity, label, model_dir, dim, embedder is None))
        return info, info.started_at < begun

    async def _sweep(self, next_model: NextModel) -> tuple[int, int]:
        """Embed every memory the next model has not, then switch; returns how many it
        embedded and the memories in all. A pass that embedded some is followed by another
        from the start: a text changed behind it, or written by an instance that does not
        embed with both models (yet), needs its next vector too."""
        backend = self.store.backend
        done, total = await backend.next_progress()
        meter = Meter("embedding", total, done)
        embedded = 0
        self._report(meter.at(done))
        for _ in range(MAX_PASSES):
            cursor, found = 0, False
            pending: asyncio.Task[int] | None = None  # the last batch's write, while the next one embeds
            try:
                while rows := await backend.missing_next(cursor, self.batch):
                    found = True
                    vectors = await next_model.vectors([r[1] for r in rows], [r[2] for r in rows])
                    if vectors is None or self.store.closing:
                        raise StoreClosed("the store closed during the re-embed; run it again to resume")
                    if pending is not None:
                        stored = await pending
                        embedded, done = embedded + stored, done + stored
                        self._report(meter.at(done))
                    write = StoreNextVectors([(r[0], r[1], v) for r, v in zip(rows, vectors, strict=True)],
                                             next_model.info.identity)
                    pending = asyncio.ensure_future(backend.write(write))
                    cursor = rows[-1][0]
                if pending is not None:
                    stored = await pending
                    pending = None
                    embedded, done = embedded + stored, done + stored
            finally:
                if pending is not None:  # (failed or cancelled: its outcome is not needed, but is heard)
                    await asyncio.gather(pending, return_exceptions=True)
            if not found and await self._switch(next_model.info.identity) is not None:
                finished = meter.at(total, total)
                self._report(Progress("switched", total, total, finished.rate, 0.0))
                return embedded, total
            done, total = await backend.next_progress()
            self._report(meter.at(done, total))
        raise ReembedInProgress(
            f"memories kept arriving without the next model's vector after {MAX_PASSES} passes; run it again"
        )

    async def _switch(self, identity: str) -> int | None:
        """The switch; one that could not take its lock in time (Postgres: a long query held
        the table) is tried again after a pause."""
        for attempt in range(SWITCH_ATTEMPTS):
            try:
                return await self.store.backend.write(SwitchVectors(identity))
            except StorageUnavailable as exc:
                if attempt == SWITCH_ATTEMPTS - 1:
                    raise
                log.warning("re-embed: the switch failed (%s); trying again", exc.message)
                await asyncio.sleep(SWITCH_PAUSE_SECONDS)
        return None

    def _report(self, progress: Progress) -> None:
        if self.progress is not None:
            self.progress(progress)


async def say_if_waiting(store: Store) -> None:
    """At open: a re-embed that stopped (killed, or its server restarted) waits to be resumed."""
    value = await store.backend.meta_value("reembed")
    if value is not None:
        info = ReembedInfo.from_json(value)
        again = "gmem reindex" if info.copy else f"gmem reembed --model-dir {info.model_dir}"
        log.warning("a re-embed to %s stopped before its switch: run `%s` to finish it, or `gmem reembed --cancel`; "
                    "meanwhile the current vectors serve", info.label, again)


async def end(store: Store, *, drop_old: bool) -> bool:
    """Drop the vectors the last switch left behind (``drop_old``), or cancel the re-embed
    under way; whether there was anything to do."""
    async with store.backend.reembed_lock():
        done: bool = await store.backend.write(EndReembed(drop_old))
        if not drop_old:
            await store.indexer.discard()
        return done



def recorded_model_here(folder: str) -> ModelSpec:
    """The model another instance's re-embed recorded (its folder), as found on this machine."""
    return ModelSpec.from_dir(folder)


class ModelFollower:
    """Follows what another instance of a shared (Postgres) database does with the vectors:
    while it re-embeds, this store embeds its writes with both models too and fills the next
    model's index beside its own (so that instance's switch needs no waiting for stragglers);
    once it switches, this store switches to the new model, loaded from the folder the
    re-embed recorded. If that folder is not here, the store is unavailable until restarted
    with it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.error: GMError | None = None
        self._task: asyncio.Task[None] | None = None
        self._preparing: asyncio.Task[None] | None = None
        self._unusable: str | None = None  # a re-embed whose model is not usable here (said once)

    def soon(self, identity: str) -> None:
        """The index saw a change of another model's vectors: look now."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._look(), name="gm-follow-model")

    async def _look(self) -> None:
        """:meth:`check` for :meth:`soon`, which nobody awaits: what it raises is logged here (a
        store closing meanwhile: nothing to follow), not left for the loop to report at exit.
        A write or search that meets the switch follows it again (:meth:`wait`)."""
        try:
            await self.check()
        except StoreClosed:
            pass
        except Exception:
            log.exception("following another instance's change of the vectors failed; the next write or search "
                          "that meets it tries again")

    async def wait(self) -> None:
        """A write or search found the vectors switched: follow before it runs again (this
        store's own re-embed switches it itself: wait for that)."""
        await self.store.models.settled(SETTLE_SECONDS)
        await self.check()
        if self.error is not None:
            raise self.error

    async def check(self) -> None:
        store = self.store
        following = store.models.next
        if following is not None and following.own:
            return  # this store runs the re-embed: it switches itself
        identity = await store.backend.meta_value(IDENTITY)
        if identity is not None and identity != store.vectors_model:
            await self._switch(identity)
        elif store.backend.shared:
            await self._follow_reembed()

    async def stop(self) -> None:
        await loops.stop(self._task, self._preparing)

    async def _switch(self, identity: str) -> None:
        store = self.store
        following, spec, embedder = store.models.next, None, None
        if following is not None and following.info.identity == identity:  # (it embedded our writes already)
            spec, embedder = following.spec, following.embedder
        elif model_of(identity) != model_of(store.vectors_model):
            folder = await store.backend.meta_value("vectors_model_dir") or ""
            spec = self._model(identity, folder)
            if spec is None:
                return
            embedder = Embedder(spec, threads=store.settings.embed_threads)
        log.info("another instance switched the vectors to model %s: following", identity)
        if not store.backend.native_vectors:
            await store.indexer.promote(identity)  # (its prepared index, else a load of the switched vectors)
        store.models.switch(identity, spec, embedder)
        self.error = None

    def _model(self, identity: str, folder: str) -> ModelSpec | None:
        try:
            spec = recorded_model_here(folder)
            if spec.identity != model_of(identity):
                raise ModelMismatch(f"the model in {folder} is not the one the vectors were made by")
            return spec
        except GMError as exc:
            self.error = ModelMismatch(
                f"another instance moved the vectors to model {identity!r} (gmem reembed), whose files are "
                f"not usable here ({exc.message}); restart this instance with GM_MODEL_DIR set to that model"
            )
            log.error("%s", self.error.message)
            return None

    async def _follow_reembed(self) -> None:
        """Embed with both models while another instance re-embeds (or stop, once it ended)."""
        store = self.store
        value = await store.backend.meta_value("reembed")
        info = ReembedInfo.from_json(value) if value is not None else None
        following = store.models.next
        if following is not None and (info is None or info.identity != following.info.identity):
            store.models.next = None  # cancelled (a switch is followed above)
            if following.embedder is not None:
                await following.embedder.stop()
            if not store.backend.native_vectors:
                await store.indexer.discard()
            following = None
        if info is None or following is not None or self._unusable == info.identity:
            return
        spec, embedder = None, None
        if not info.copy:
            try:
                spec = recorded_model_here(info.model_dir)
            except GMError as exc:  # its writes are embedded by the sweep instead
                log.warning("another instance re-embeds with the model in %s, not usable here (%s): this instance's "
                            "writes wait for that sweep", info.model_dir, exc.message)
                self._unusable = info.identity
                return
            embedder = Embedder(spec, threads=store.settings.embed_threads)
        store.models.next = NextModel(info, embedder, own=False, spec=spec)
        log.info("another instance re-embeds to %s: this one embeds its writes with both models", info.label)
        if not store.backend.native_vectors:
            self._preparing = asyncio.get_running_loop().create_task(self._prepare(info.identity))

    async def _prepare(self, identity: str) -> None:
        try:
            await self.store.indexer.prepare(identity)
        except GMError as exc:
            log.warning("the next model's index: %s; the switch will load it instead", exc.message)
