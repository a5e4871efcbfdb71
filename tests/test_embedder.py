"""The Embedder actor with the real model: concurrent callers share ONNX calls, a search's
query goes ahead of queued add texts, and the vectors are the model's own."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from gm.embedding import DEFAULT_TOKENIZER, Embedder, Encoder, ModelSpec, Pending, Vector, run_around, runs
from gm.errors import ModelError


class RecordingEmbedder(Embedder):
    """Records the texts of each model call; once ``hold`` is called, each call waits for
    a permit from ``admit``."""

    def __init__(self, threads: int = 1) -> None:
        super().__init__(ModelSpec.default(), threads=threads)
        self.calls: list[list[str]] = []  # in the order they began
        self.gate: threading.Semaphore | None = None
        self.started = threading.Event()  # set when a call begins

    def _encode(self, run: list[Pending]) -> Vector:
        self.calls.append([p.text for p in run])
        self.started.set()
        if self.gate is not None:
            assert self.gate.acquire(timeout=10)
        return super()._encode(run)

    def hold(self) -> None:
        self.started.clear()
        self.gate = threading.Semaphore(0)

    async def held(self) -> None:
        """Until a call has begun since ``hold``."""
        assert await asyncio.to_thread(self.started.wait, 10)

    def admit(self, calls: int = 100) -> None:
        if self.gate is not None:
            self.gate.release(calls)


LONG = "word " * 300  # past MAX_TOKENS: 256 tokens, two to a model call of TOKEN_BUDGET 512


def test_model_calls_group_texts_of_similar_length_within_the_token_budget() -> None:
    # token lengths in the order the texts came; each call holds the first text left
    assert runs([10, 40, 11, 38, 12, 300]) == [[0, 2, 4], [3, 1], [5]]  # none padded past 1/0.8 of itself
    assert runs([256, 256, 256]) == [[0, 1], [2]]  # 512 padded tokens a call
    assert runs([600]) == [[0]]  # one text longer than the budget is a call of its own
    assert run_around([30, 5, 29, 31, 6], 1) == [1, 4]  # the call holding text 1


async def test_concurrent_callers_share_model_calls_and_get_the_models_vectors() -> None:
    embedder = RecordingEmbedder()
    texts = [f"memory number {i} about travel and food" for i in range(40)]
    try:
        vectors = await asyncio.gather(*(embedder.embed(t) for t in texts))
    finally:
        await embedder.stop()
    assert len(embedder.calls) < 5  # 40 callers, a handful of batches
    assert sorted(t for call in embedder.calls for t in call) == sorted(texts)
    direct = Encoder(ModelSpec.default()).encode(texts)
    assert np.allclose(np.stack(vectors), direct, atol=1e-5)  # each caller got its own text's vector


async def test_a_search_query_goes_ahead_of_queued_add_texts() -> None:
    embedder = RecordingEmbedder()
    try:
        await embedder.embed("warm the model up")
        embedder.hold()  # the next model call blocks, so the texts below queue up behind it
        first = asyncio.create_task(embedder.embed("an add already running"))
        await asyncio.sleep(0.05)
        adds = [asyncio.create_task(embedder.embed(f"queued add {i}")) for i in range(10)]
        query = asyncio.create_task(embedder.embed("the search query", urgent=True))
        await asyncio.sleep(0.05)
        embedder.admit()
        await asyncio.gather(first, query, *adds)
    finally:
        await embedder.stop()
    assert embedder.calls[1:] == [
        ["an add already running"],
        ["the search query"],
        [f"queued add {i}" for i in range(10)],
    ]


async def test_callers_hear_back_as_their_run_is_embedded_while_the_next_one_runs() -> None:
    embedder = RecordingEmbedder()
    try:
        await embedder.embed("warm the model up")
        embedder.hold()
        short = [asyncio.create_task(embedder.embed(f"short text {i}")) for i in range(20)]
        long = [asyncio.create_task(embedder.embed(f"{i} {LONG}")) for i in range(4)]
        await embedder.held()  # the shorts' call (the oldest text's), waiting
        embedder.admit(1)  # the shorts' call runs, the next one waits
        await asyncio.wait_for(asyncio.gather(*short), 10)
        assert not any(task.done() for task in long)  # the shorts did not wait for the long texts
        embedder.admit()
        vectors = await asyncio.wait_for(asyncio.gather(*long), 10)
    finally:
        embedder.admit()
        await embedder.stop()
    assert embedder.calls[1:] == [[f"short text {i}" for i in range(20)], [f"0 {LONG}", f"1 {LONG}"],
                                  [f"2 {LONG}", f"3 {LONG}"]]
    direct = Encoder(ModelSpec.default()).encode([f"{i} {LONG}" for i in range(4)])
    assert np.allclose(np.stack(vectors), direct, atol=1e-5)


async def test_texts_queued_during_a_call_join_the_next_ones_grouped_by_length() -> None:
    embedder = RecordingEmbedder()
    try:
        await embedder.embed("warm the model up")
        embedder.hold()
        first = asyncio.create_task(embedder.embed("the text being embedded"))
        await embedder.held()
        sent = ["short one", f"a {LONG}", "short two", f"b {LONG}", "short three"]  # interleaved
        tasks = [asyncio.create_task(embedder.embed(text)) for text in sent]
        await asyncio.sleep(0.05)
        embedder.admit()
        await asyncio.wait_for(asyncio.gather(first, *tasks), 10)
    finally:
        embedder.admit()
        await embedder.stop()
    assert embedder.calls[1:] == [["the text being embedded"], ["short one", "short two", "short three"],
                                  [f"a {LONG}", f"b {LONG}"]]


async def test_two_model_calls_run_at_once_with_two_threads() -> None:
    embedder = RecordingEmbedder(threads=2)
    try:
        await embedder.embed("warm the model up")
        embedder.hold()
        first = asyncio.create_task(embedder.embed(f"a {LONG}"))
        await embedder.held()
        embedder.started.clear()
        rest = [asyncio.create_task(embedder.embed(text)) for text in ("short one", f"b {LONG}", "short two")]
        await embedder.held()  # the second core took what came meanwhile, while the first call runs
        assert embedder.calls[1:] == [[f"a {LONG}"], ["short one", "short two"]]
        embedder.admit()
        vectors = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
    finally:
        embedder.admit()
        await embedder.stop()
    assert embedder.calls[1:] == [[f"a {LONG}"], ["short one", "short two"], [f"b {LONG}"]]
    direct = Encoder(ModelSpec.default()).encode([f"a {LONG}", "short one", f"b {LONG}", "short two"])
    assert np.allclose(np.stack(vectors), direct, atol=1e-5)


def test_the_token_embeddings_output_is_found_by_name_or_shape(tmp_path: Path) -> None:
    # paraphrase-MiniLM-L3-v2 as its package ships it has four outputs, the token embeddings
    # third and unnamed; a model with two candidate outputs is refused, naming them.
    from tests.models import _onnx, write_paraphrase_model

    encoder = Encoder(ModelSpec.from_dir(write_paraphrase_model(tmp_path / "paraphrase")), threads=1)
    assert encoder.dim == 384 and encoder.encode(["two words"]).shape == (1, 384)
    onnx = _onnx()
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("Cast", ["input_ids"], ["f"], to=onnx.TensorProto.FLOAT),
         h.make_node("Unsqueeze", ["f", "axes"], ["a"]), h.make_node("Identity", ["a"], ["b"])],
        "two", [h.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["B", "T"]),
                h.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["B", "T"])],
        [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["B", "T", 1]) for name in ("a", "b")],
        [onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")],
    )
    folder = tmp_path / "ambiguous"
    folder.mkdir()
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(folder / "model.onnx"))
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    with pytest.raises(ModelError, match=r"cannot tell which output .* \(found: a tensor\(float\)"):
        Encoder(ModelSpec.from_dir(folder), threads=1)
