"""The peer benchmark's data (bench/peers.py): realistic vectors made from real embeddings,
their JSON Lines file, the queries, and the exact top-10 that recall is measured against.

The LoCoMo memories' texts are embedded once by the store's model and cached. Memory ``i`` is
a perturbation of a random base text's embedding, ``c * base + sqrt(1 - c^2) * noise`` with the
noise a unit vector orthogonal to the base, so its cosine to the base is exactly ``c``, drawn
from 0.75-0.9; its text is the base text with a fifth of the words dropped and a few words of
another text put in, so keyword search finds realistic matches. User ``i % users``; id
``m0000123``. Queries are LoCoMo questions, each embedded alone, as a search embeds it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from gm.embedding import Encoder, ModelSpec

NAMESPACE = "bench"
CHUNK = 10_000  # rows made (and scored for the exact top-k) at a time: a multiple of any user count below it
COSINE = (0.75, 0.9)  # each vector's cosine to its base embedding, drawn uniformly
Matrix = npt.NDArray[np.float32]


def model_spec() -> ModelSpec:
    """The model a store opened here uses (GM_MODEL_DIR, else the default), as gm.open picks it."""
    directory = os.environ.get("GM_MODEL_DIR")
    return ModelSpec.from_dir(directory) if directory else ModelSpec.default()


@dataclass(frozen=True)
class Queries:
    """The questions (the measured ones after ``warmup`` others), their vectors and the user
    each one's filtered search is scoped to."""

    texts: list[str]
    vectors: Matrix
    users: list[str]
    warmup: int

    def save(self, path: Path) -> None:
        np.savez(path, vectors=self.vectors, texts=np.array(self.texts), users=np.array(self.users),
                 warmup=np.array(self.warmup))

    @classmethod
    def read(cls, path: Path) -> Queries:
        with np.load(path) as data:
            return cls([str(t) for t in data["texts"]], data["vectors"], [str(u) for u in data["users"]],
                       int(data["warmup"]))


@dataclass(frozen=True)
class Bases:
    """The real texts and their embeddings."""

    texts: list[str]
    vectors: Matrix


def user_of(row: int, users: int) -> str:
    return f"u{row % users:03d}"


def memory_id(row: int) -> str:
    return f"m{row:07d}"


def row_of(memory_id: str) -> int:
    return int(memory_id[1:])


def embedded(data: Path, spec: ModelSpec, cache_dir: Path, count: int, warmup: int, users: int,
             seed: int) -> tuple[Bases, Queries]:
    """The base texts of ``data``/memories.jsonl and ``count + warmup`` questions of its
    queries.jsonl, embedded (from the cache when the same files and model made it)."""
    texts = [orjson.loads(line)["text"] for line in (data / "memories.jsonl").read_bytes().splitlines() if line]
    questions = [orjson.loads(line)["question"] for line in (data / "queries.jsonl").read_bytes().splitlines()
                 if line]
    picked = random.Random(seed).sample(questions, min(len(questions), count + warmup))
    cache_dir.mkdir(parents=True, exist_ok=True)
    encoder: list[Encoder] = []  # loaded on the first miss only

    def cached(name: str, texts: list[str], one_by_one: bool) -> Matrix:
        key = hashlib.sha256(orjson.dumps([spec.identity, one_by_one, texts])).hexdigest()[:16]
        path = cache_dir / f"peers-{name}-{key}.npy"
        if path.exists():
            return np.load(path)
        if not encoder:
            encoder.append(Encoder(spec))
        # a query alone, as a search embeds it (a batch pads it, which moves the int8 model's output a little)
        vectors = np.vstack([encoder[0].encode([t]) for t in texts]) if one_by_one else encoder[0].encode(texts)
        np.save(path, vectors)
        return vectors

    base, asked = cached("base", texts, False), cached("queries", picked, True)
    query_users = [user_of(q, users) for q in range(len(picked))]
    return Bases(texts, base), Queries(picked, asked, query_users, min(warmup, len(picked)))


def _derived_text(rng: random.Random, texts: list[str], base: int) -> str:
    words = [w for w in texts[base].split() if rng.random() >= 0.2] or texts[base].split()
    other = texts[rng.randrange(len(texts))].split()
    start = rng.randrange(max(1, len(other) - 4))
    at = rng.randrange(len(words) + 1)
    return " ".join(words[:at] + other[start:start + rng.randint(3, 5)] + words[at:])


def chunks(bases: Bases, size: int, seed: int) -> Iterator[tuple[int, Matrix, list[str]]]:
    """(first row, vectors, texts) of the dataset of ``size`` rows, ``CHUNK`` at a time."""
    rng = np.random.default_rng(seed)
    words = random.Random(seed)
    dim = bases.vectors.shape[1]
    for start in range(0, size, CHUNK):
        n = min(CHUNK, size - start)
        picked = rng.integers(len(bases.texts), size=n)
        base = bases.vectors[picked]
        noise = rng.standard_normal((n, dim)).astype(np.float32)
        noise -= (noise * base).sum(axis=1, keepdims=True) * base
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        cosine = rng.uniform(*COSINE, size=(n, 1)).astype(np.float32)
        vectors = cosine * base + np.sqrt(1 - cosine**2) * noise
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield start, vectors.astype(np.float32), [_derived_text(words, bases.texts, int(b)) for b in picked]


class Exact:
    """The exact top-``k`` rows by cosine of each query: over every row (``whole``) and over
    the rows of the query's user (``one_user``), kept up to date chunk by chunk."""

    def __init__(self, queries: Queries, users: int, k: int = 10) -> None:
        self.queries, self.users, self.k = queries, users, k
        n = len(queries.texts)
        self._offsets = np.array([int(u[1:]) for u in queries.users])
        empty = (np.full((k, n), -1, np.int64), np.full((k, n), -np.inf, np.float32))
        self._whole, self._user = empty, empty

    def add(self, start: int, vectors: Matrix) -> None:
        scores = vectors @ self.queries.vectors.T  # (rows, queries)
        n, columns = scores.shape
        rows = np.broadcast_to(np.arange(start, start + n)[:, None], scores.shape)
        self._whole = self._keep(self._whole, rows, scores)
        # the rows of each query's user in this chunk: row % users == its user's number
        depth = -(-n // self.users)
        picked = (self._offsets - start) % self.users + self.users * np.arange(depth)[:, None]
        valid = picked < n
        picked = np.minimum(picked, n - 1)
        mine = np.where(valid, scores[picked, np.arange(columns)], -np.inf).astype(np.float32)
        self._user = self._keep(self._user, np.where(valid, start + picked, -1), mine)

    def _keep(self, best: tuple[npt.NDArray[np.int64], Matrix], rows: npt.NDArray[np.int64],
              scores: Matrix) -> tuple[npt.NDArray[np.int64], Matrix]:
        if len(scores) > self.k:  # each column's k best of the chunk first: a partition, not a sort
            part = np.argpartition(-scores, self.k - 1, axis=0)[: self.k]
            rows, scores = np.take_along_axis(rows, part, 0), np.take_along_axis(scores, part, 0)
        all_rows, all_scores = np.concatenate([best[0], rows]), np.concatenate([best[1], scores])
        top = np.argsort(-all_scores, axis=0, kind="stable")[: self.k]
        return np.take_along_axis(all_rows, top, 0), np.take_along_axis(all_scores, top, 0)

    def whole(self, q: int) -> set[int]:
        return {int(r) for r in self._whole[0][:, q] if r >= 0}

    def one_user(self, q: int) -> set[int]:
        return {int(r) for r in self._user[0][:, q] if r >= 0}


def write_dataset(bases: Bases, size: int, users: int, seed: int, path: Path, exact: Exact, model: str) -> int:
    """Write the JSON Lines file ``gmem import`` reads (an export's header naming ``model``,
    then one memory with its vector a line) and feed ``exact`` every chunk; returns its bytes.
    Only one chunk is in memory at a time."""
    header = {"greatmemory": {"format": 1, "model": model, "memories": size, "vectors": True}}
    with path.open("wb") as out:
        out.write(orjson.dumps(header) + b"\n")
        for start, vectors, texts in chunks(bases, size, seed):
            exact.add(start, vectors)
            for offset, (vector, text) in enumerate(zip(vectors, texts, strict=True)):
                row = start + offset
                out.write(orjson.dumps({
                    "id": memory_id(row), "namespace": NAMESPACE, "user_id": user_of(row, users), "text": text,
                    "vector": base64.b64encode(vector.tobytes()).decode(),
                }) + b"\n")
    return path.stat().st_size


def read_dataset(path: Path, batch: int) -> Iterator[tuple[list[str], Matrix, list[str], list[str]]]:
    """The file ``write_dataset`` wrote, as (ids, vectors, users, texts) batches of ``batch``."""
    ids: list[str] = []
    vectors: list[bytes] = []
    users: list[str] = []
    texts: list[str] = []

    def flush() -> tuple[list[str], Matrix, list[str], list[str]]:
        matrix = np.frombuffer(b"".join(vectors), dtype=np.float32).reshape(len(ids), -1)
        return ids, matrix, users, texts

    with path.open("rb") as lines:
        for raw in lines:
            line = orjson.loads(raw)
            if "greatmemory" in line:
                continue
            ids.append(line["id"])
            vectors.append(base64.b64decode(line["vector"]))
            users.append(line["user_id"])
            texts.append(line["text"])
            if len(ids) == batch:
                yield flush()
                ids, vectors, users, texts = [], [], [], []
    if ids:
        yield flush()
