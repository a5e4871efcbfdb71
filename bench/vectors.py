"""Realistic vectors for the vector benchmarks: the bundled model's embeddings of the LoCoMo
dev memories and questions (cached beside the data's copy in the temp dir), mixed and perturbed
so that millions of rows keep the neighbourhood structure of real text, not uniform noise.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("GM_LOCOMO_DIR", "/work/shared/data/locomo/dev"))
CACHE = Path(tempfile.gettempdir()) / "gm-bench-embeddings.npz"


def embeddings() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The memories' and the questions' unit vectors, and the memories' texts."""
    texts = [json.loads(line)["text"] for line in (DATA / "memories.jsonl").open()]
    if not CACHE.exists():
        from gm.embedding import Encoder, ModelSpec

        questions = [json.loads(line)["question"] for line in (DATA / "queries.jsonl").open()]
        encoder = Encoder(ModelSpec.default(), threads=2)

        def encode(batch: list[str]) -> np.ndarray:
            return np.concatenate([np.asarray(encoder.encode(batch[i : i + 32]), dtype=np.float32)
                                   for i in range(0, len(batch), 32)])

        np.savez(CACHE, memories=encode(texts), questions=encode(questions))
    cached = np.load(CACHE)
    return cached["memories"], cached["questions"], texts


def perturbed(base: np.ndarray, n: int, rng: np.random.Generator, sigma: float, mix: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors, each a base row plus ``mix`` of another and gaussian noise (cosine
    ~0.8 to its base at sigma 0.038 in 384 dimensions); and the base row of each."""
    first, second = rng.integers(0, len(base), n), rng.integers(0, len(base), n)
    v = base[first] + mix * base[second] + rng.normal(0, sigma, (n, base.shape[1])).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32), first


def realistic(size: int, queries: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """``size`` memory vectors and ``queries`` query vectors."""
    memories, questions, _ = embeddings()
    rng = np.random.default_rng(seed)
    data = np.concatenate([perturbed(memories, min(100_000, size - s), rng, 0.038, 0.3)[0]
                           for s in range(0, size, 100_000)])
    asks, _ = perturbed(questions, queries, rng, 0.02, 0.0)
    return data, asks
