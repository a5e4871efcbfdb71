"""The test models of tests/models.py are what the re-embedding tests take them for: each
loads through gm's own Encoder with its dimension, gives the same vectors every time, and
serves a store opened with ``model_dir`` through an add and a search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import gm
from gm.embedding import Encoder, ModelSpec
from tests.models import WIDE_DIM, write_wide_model

MODELS = {"paraphrase_model_dir": 384, "wide_model_dir": WIDE_DIM, "default_model_copy_dir": 384}
TEXTS = [
    "He plays the guitar on stage every Friday night.",
    "She is allergic to peanuts and carries an epipen.",
    "The team moved the weekly meeting to Tuesday morning.",
]


def encoder(folder: Path) -> Encoder:
    return Encoder(ModelSpec.from_dir(folder), threads=1)


@pytest.mark.parametrize("fixture", MODELS)
def test_a_test_model_loads_through_the_encoder_and_is_deterministic(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(fixture)
    first = encoder(folder)
    assert first.dim == MODELS[fixture]
    vectors = first.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), MODELS[fixture]) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(first.encode(TEXTS), vectors)
    assert np.allclose(encoder(folder).encode(TEXTS[::-1])[::-1], vectors, atol=1e-6)  # a fresh session, any order


def test_the_paraphrase_model_is_a_real_second_model(paraphrase_model_dir: Path) -> None:
    pairs = [
        ("A man is playing a guitar.", "Someone is playing an instrument, a guitar."),
        ("I am allergic to peanuts.", "Peanuts give me an allergic reaction."),
        ("She moved to Berlin last year.", "Last year she relocated to Berlin."),
        ("The stock market fell sharply today.", "Shares dropped a lot on the exchange today."),
    ]
    model = encoder(paraphrase_model_dir)
    left = model.encode([a for a, _ in pairs])
    right = model.encode([b for _, b in pairs])
    cosines = left @ right.T  # [i, j]: pair i's first text against pair j's second
    for i in range(len(pairs)):  # measured: paraphrases 0.40-0.93, strangers -0.04-0.12
        assert cosines[i, i] > max(np.delete(cosines[i], i)) + 0.2, (pairs[i], cosines[i])
    default = Encoder(ModelSpec.default(), threads=1).encode(TEXTS)
    assert not np.allclose(model.encode(TEXTS), default, atol=0.05)  # not the default model in disguise


def test_the_wide_model_scores_shared_words(wide_model_dir: Path) -> None:
    model = encoder(wide_model_dir)
    [guitar, peanuts, query] = model.encode([TEXTS[0], TEXTS[1], "guitar on stage"])
    assert guitar @ query > 0.5 > peanuts @ query + 0.3


def test_the_wide_model_is_the_same_file_for_the_same_seed(wide_model_dir: Path, tmp_path: Path) -> None:
    again = write_wide_model(tmp_path / "again")
    assert (again / "model.onnx").read_bytes() == (wide_model_dir / "model.onnx").read_bytes()
    assert (again / "model.onnx").stat().st_size < 5 << 20
    other = write_wide_model(tmp_path / "other", seed=1)
    assert (other / "model.onnx").read_bytes() != (again / "model.onnx").read_bytes()


def test_the_default_model_copy_gives_the_default_vectors(default_model_copy_dir: Path) -> None:
    default = ModelSpec.default()
    assert (default_model_copy_dir / "model.onnx").read_bytes() == default.model_path.read_bytes()
    assert not (default_model_copy_dir / "model.onnx").is_symlink()  # the test's to change
    assert np.array_equal(encoder(default_model_copy_dir).encode(TEXTS), Encoder(default, threads=1).encode(TEXTS))


async def round_trip(target: str | Path, folder: Path, query: str) -> None:
    async with gm.open(target, model_dir=folder) as store:
        added = [await store.add(text, user_id="u1") for text in TEXTS]
        assert (await store.stats()).model == ModelSpec.from_dir(folder).identity
        [exact, *_] = await store.search(TEXTS[2], user_id="u1", mode="vector")
        assert exact.memory == added[2] and exact.vector_score == pytest.approx(1.0, abs=1e-4)
        [best, *_] = await store.search(query, user_id="u1", mode="vector")
        assert best.memory == added[0]


@pytest.mark.parametrize("fixture", MODELS)
async def test_a_store_adds_and_searches_with_a_test_model(
    fixture: str, request: pytest.FixtureRequest, db_path: Path
) -> None:
    await round_trip(db_path, request.getfixturevalue(fixture), "who plays guitar on stage")


async def test_the_wide_model_serves_every_backend(target: str, wide_model_dir: Path) -> None:
    await round_trip(target, wide_model_dir, "who plays guitar on stage")  # 768 dims on pgvector's HNSW too
