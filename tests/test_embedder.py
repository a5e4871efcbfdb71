"""The Embedder actor with the real model: concurrent callers share ONNX calls, a search's
query goes ahead of queued add texts, and the vectors are the model's own."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from gm.embedding import DEFAULT_TOKENIZER, Embedder, Encoder, ModelSpec, Vector
from gm.errors import ModelError


class RecordingEmbedder(Embedder):
    """Records the texts of each model call; can hold the first call until released."""

    def __init__(self) -> None:
        super().__init__(ModelSpec.default())
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def _encode(self, texts: list[str]) -> Vector:
        self.release.wait(10)
        self.calls.append(list(texts))
        return super()._encode(texts)


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
        embedder.release.clear()  # the next model call blocks, so the texts below queue up behind it
        first = asyncio.create_task(embedder.embed("an add already running"))
        await asyncio.sleep(0.05)
        adds = [asyncio.create_task(embedder.embed(f"queued add {i}")) for i in range(10)]
        query = asyncio.create_task(embedder.embed("the search query", urgent=True))
        await asyncio.sleep(0.05)
        embedder.release.set()
        await asyncio.gather(first, query, *adds)
    finally:
        await embedder.stop()
    assert embedder.calls[1:] == [
        ["an add already running"],
        ["the search query"],
        [f"queued add {i}" for i in range(10)],
    ]


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
