"""The retrieval study's parts (see bench/retrieval_study.py): the LoCoMo corpus with its
sessions, BM25 exactly as the product's FTS5 computes it, the product's vectors, fusion and scoring.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gm.embedding import MAX_TOKENS, Encoder, ModelSpec
from gm.search import candidates, keyword_terms
from locomo import date_words

DEFAULT_CACHE = Path("/tmp/gm-study")
K1, B = 1.2, 0.75
TOKENIZE = "porter unicode61 remove_diacritics 2"  # sqlite_migrations.V2_KEYWORDS
PRODUCT_DEPTH = candidates(10)  # 50: what hybrid search fetches per ranking today
RRF_K = 60  # the rank constant of the hybrid search the study compares against (RRF, equal weights)


@dataclass
class Corpus:
    """The turns in file order, their sessions, and the queries with evidence as indexes."""

    memories: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    namespaces: list[str] = field(default_factory=list)
    ns_rows: dict[str, np.ndarray] = field(default_factory=dict)  # turn indexes of a namespace
    ns_queries: dict[str, np.ndarray] = field(default_factory=dict)  # query indexes of a namespace
    prev: list[list[int]] = field(default_factory=list)  # earlier turns of the same session, nearest first
    next: list[list[int]] = field(default_factory=list)  # later turns of the same session, nearest first
    dates: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.namespaces = sorted({m["namespace"] for m in self.memories})
        index = {m["id"]: i for i, m in enumerate(self.memories)}
        sessions: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, m in enumerate(self.memories):
            sessions[(m["namespace"], m["metadata"]["session"])].append(i)
        self.prev = [[] for _ in self.memories]
        self.next = [[] for _ in self.memories]
        for rows in sessions.values():
            for pos, i in enumerate(rows):
                self.prev[i] = rows[:pos][::-1]
                self.next[i] = rows[pos + 1 :]
        self.dates = [date_words(m["metadata"]["date_time"]) for m in self.memories]
        for ns in self.namespaces:
            self.ns_rows[ns] = np.array([i for i, m in enumerate(self.memories) if m["namespace"] == ns])
            self.ns_queries[ns] = np.array([i for i, q in enumerate(self.queries) if q["namespace"] == ns])
        for q in self.queries:
            q["evidence_rows"] = sorted({index[e] for e in q["evidence"] if e in index})

    def window(self, i: int, p: int, n: int) -> list[int]:
        """Turn indexes of the context window of turn i, chronological, the turn included."""
        return self.prev[i][:p][::-1] + [i] + self.next[i][:n]


# ---------------------------------------------------------------- keyword side


def fts5_tokens(texts: list[str]) -> list[list[str]]:
    """Each text's tokens as the product's FTS5 table sees them (stemmed, in order)."""
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE t USING fts5 (text, tokenize='{TOKENIZE}')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab (t, 'instance')")
    db.executemany("INSERT INTO t (rowid, text) VALUES (?, ?)", [(i + 1, s) for i, s in enumerate(texts)])
    out: list[list[str]] = [[] for _ in texts]
    for term, doc, _offset in db.execute("SELECT term, doc, offset FROM v ORDER BY doc, offset"):
        out[doc - 1].append(term)
    db.close()
    return out


@dataclass
class KeywordIndex:
    """BM25 statistics of one way of indexing the turns (one token list per turn)."""

    docs: list[Counter[str]]
    lengths: np.ndarray
    df: Counter[str]

    @classmethod
    def build(cls, own: list[list[str]], context: list[list[str]], w_ctx: float = 1.0) -> KeywordIndex:
        """Each row a turn's own tokens and its context's. As FTS5's bm25() with column weights
        (1, w_ctx) does, a term's frequency is the weighted sum over the columns while the
        row's length is its unweighted token count; w_ctx 1 equals one concatenated column."""
        docs = []
        for mine, ctx in zip(own, context, strict=True):
            d: Counter[str] = Counter(mine)
            for t in ctx:
                d[t] += w_ctx  # type: ignore[assignment]
            docs.append(d)
        df: Counter[str] = Counter()
        for d in docs:
            df.update(d.keys())
        lengths = np.array([len(a) + len(b) for a, b in zip(own, context, strict=True)], dtype=np.float64)
        return cls(docs, lengths, df)

    def idf(self, term: str) -> float:
        n, hits = len(self.docs), self.df.get(term, 0)
        value = math.log((n - hits + 0.5) / (hits + 0.5))
        return value if value > 0 else 1e-6  # fts5_aux.c floors it so a common term never subtracts

    def scores(self, rows: np.ndarray, weighted_terms: list[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 of turns ``rows`` for each query (term -> weight; weight 1 per query term is
        FTS5's sum over phrases). Returns (scores, matched), both queries x rows."""
        vocab = sorted({t for q in weighted_terms for t in q})
        col = {t: j for j, t in enumerate(vocab)}
        tf = np.zeros((len(rows), len(vocab)))
        for r, i in enumerate(rows):
            doc = self.docs[i]
            for t, j in col.items():
                c = doc.get(t)
                if c:
                    tf[r, j] = c
        avgdl = self.lengths.mean()
        norm = K1 * (1 - B + B * self.lengths[rows] / avgdl)
        saturated = tf * (K1 + 1) / (tf + norm[:, None])
        weights = np.zeros((len(weighted_terms), len(vocab)))
        for qi, q in enumerate(weighted_terms):
            for t, w in q.items():
                weights[qi, col[t]] += w * self.idf(t)
        return weights @ saturated.T, (weights > 0).astype(np.float64) @ (tf > 0).T > 0


def query_token_terms(queries: list[dict[str, Any]]) -> list[list[str]]:
    """Each query's FTS5 phrases: keyword_terms stemmed by the FTS5 tokenizer. A term that
    stems to a token already present still counts again, as in FTS5's sum over phrases."""
    terms = [keyword_terms(q["question"]) for q in queries]
    flat = sorted({t for ts in terms for t in ts})
    stemmed = dict(zip(flat, fts5_tokens(flat), strict=True))
    out = []
    for ts in terms:
        phrases = []
        for t in ts:
            toks = stemmed[t]
            if len(toks) == 1:
                phrases.append(toks[0])
            # a multi-token phrase (never in this data) or an empty one is left out
        out.append(phrases)
    return out


# ---------------------------------------------------------------- vector side


class VectorCache:
    """Vectors by text, embedded once with the product's Encoder and kept in a .npy file."""

    def __init__(self, path: Path) -> None:
        self.npy, self.keys_path = path.with_name(path.name + "-vectors.npy"), path.with_name(path.name + "-keys.json")
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((0, 384), dtype=np.float32)
        if self.npy.is_file() and self.keys_path.is_file():
            self.matrix = np.load(self.npy)
            self.rows = {k: i for i, k in enumerate(json.loads(self.keys_path.read_text()))}
        self.encoder: Encoder | None = None

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def tokenizer_lengths(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.load().tokenizer.encode_batch(texts, add_special_tokens=True)]

    def load(self) -> Encoder:
        if self.encoder is None:
            self.encoder = Encoder(ModelSpec.default(), threads=1)  # the machine is shared: one core
        return self.encoder

    def get(self, texts: list[str], label: str = "") -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self.rows))
        if missing:
            began = time.perf_counter()
            for start in range(0, len(missing), 1000):
                chunk = missing[start : start + 1000]
                vectors = self.load().encode(chunk)
                for t in chunk:
                    self.rows[self.key(t)] = len(self.rows)
                self.matrix = np.concatenate([self.matrix, vectors])
                np.save(self.npy, self.matrix)
                self.keys_path.write_text(json.dumps(sorted(self.rows, key=self.rows.__getitem__)))
                print(f"  embedded {min(start + 1000, len(missing))}/{len(missing)} {label} texts "
                      f"({time.perf_counter() - began:.0f}s)")
        return self.matrix[[self.rows[self.key(t)] for t in texts]]


def vector_texts(corpus: Corpus, cache: VectorCache, p: int, n: int, date: bool) -> list[str]:
    """'date / previous turns / turn / next turns', farthest context dropped to fit 256 wordpieces."""
    texts = []
    lengths = cache.tokenizer_lengths([m["text"] for m in corpus.memories])
    for i in range(len(corpus.memories)):
        before, after = corpus.prev[i][:p], corpus.next[i][:n]
        while True:
            rows = before[::-1] + [i] + after
            budget = sum(lengths[r] - 2 for r in rows) + 2 + (8 if date else 0)
            if budget <= MAX_TOKENS or not (before or after):
                break
            if len(before) >= len(after):
                before = before[:-1]
            else:
                after = after[:-1]
        parts = ([corpus.dates[i]] if date else []) + [corpus.memories[r]["text"] for r in rows]
        texts.append("\n".join(parts))
    return texts


# Vector context windows embedded as text: every (p, n) without the date, the date on a few.
# (Embedding is the slow part, ~50 texts/s on one shared core, so the date is tried on three.)
TEXT_WINDOWS = [(p, n, False) for n in (0, 1) for p in range(4)] + [(0, 0, True), (1, 0, True), (2, 1, True)]


def embed_all(corpus: Corpus, cache: VectorCache) -> tuple[np.ndarray, dict[tuple[int, int, bool], np.ndarray]]:
    queries = cache.get([q["question"] for q in corpus.queries], "query")
    windows = {}
    for p, n, date in sorted(TEXT_WINDOWS, key=lambda w: (w[0] + w[1], w[2])):
        windows[(p, n, date)] = cache.get(vector_texts(corpus, cache, p, n, date), f"p{p} n{n} date {date}")
    return queries, windows


def mixed_vectors(base: np.ndarray, corpus: Corpus, p: int, n: int, alpha: float) -> np.ndarray:
    """Each turn's vector plus alpha times each neighbour's in its window, renormalised."""
    out = base.copy()
    for i in range(len(corpus.memories)):
        for j in corpus.prev[i][:p] + corpus.next[i][:n]:
            out[i] += alpha * base[j]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# ---------------------------------------------------------------- rankings and scoring

NOT_FOUND = 10**9  # the rank of a turn a ranking did not return


@dataclass
class Ranking:
    """One ranking of one namespace's turns for each of its queries: scores and 1-based ranks
    (NOT_FOUND where a keyword query matched nothing)."""

    scores: np.ndarray
    ranks: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, matched: np.ndarray | None = None) -> Ranking:
        masked = scores if matched is None else np.where(matched, scores, -np.inf)
        order = np.argsort(-masked, axis=1, kind="stable")  # ties: earlier turn first, as rowid order
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(1, order.shape[1] + 1)[None, :], axis=1)
        if matched is not None:
            ranks = np.where(matched, ranks, NOT_FOUND)
        return cls(masked, ranks)


@dataclass(frozen=True)
class Fusion:
    method: str  # "rrf", "minmax", "zscore", or "keyword" / "vector" for one ranking alone
    depth: int = PRODUCT_DEPTH
    w_kw: float = 0.5
    k: int = RRF_K

    def __str__(self) -> str:
        if self.method in ("keyword", "vector"):
            return self.method
        extra = f" k={self.k}" if self.method == "rrf" else ""
        return f"{self.method}{extra} w_kw={self.w_kw:.1f} depth={self.depth}"


def normalised(r: Ranking, inside: np.ndarray, how: str) -> np.ndarray:
    """Scores of a ranking's candidates mapped per query; a turn outside its candidates gets
    the lowest candidate's value (it is at best as good as the last one returned)."""
    s = np.where(inside, r.scores, np.nan)
    if how == "minmax":
        lo, hi = np.nanmin(s, axis=1, keepdims=True), np.nanmax(s, axis=1, keepdims=True)
        z = (s - lo) / np.maximum(hi - lo, 1e-12)
    else:
        z = (s - np.nanmean(s, axis=1, keepdims=True)) / np.maximum(np.nanstd(s, axis=1, keepdims=True), 1e-12)
    floor = np.nanmin(z, axis=1, keepdims=True)
    return np.where(inside, z, floor)


def fuse(kw: Ranking, vec: Ranking, f: Fusion) -> np.ndarray:
    """Fused scores, queries x turns; -inf for turns neither ranking returned."""
    if f.method == "keyword":
        return kw.scores
    if f.method == "vector":
        return vec.scores
    in_k, in_v = kw.ranks <= f.depth, vec.ranks <= f.depth
    if f.method == "rrf":
        fused = f.w_kw * in_k / (f.k + kw.ranks) + (1 - f.w_kw) * in_v / (f.k + vec.ranks)
    else:
        fused = f.w_kw * normalised(kw, in_k, f.method) + (1 - f.w_kw) * normalised(vec, in_v, f.method)
    return np.where(in_k | in_v, fused, -np.inf)


def top10(fused: np.ndarray) -> np.ndarray:
    """The 10 best turns per query, ties to the earlier turn."""
    tie = np.arange(fused.shape[1])[None, :] * 1e-12
    keyed = np.where(np.isfinite(fused), fused - tie, -np.inf)
    part = np.argpartition(-keyed, 10, axis=1)[:, :10]
    order = np.argsort(-np.take_along_axis(keyed, part, axis=1), axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    return np.where(np.isfinite(np.take_along_axis(keyed, best, axis=1)), best, -1)


@dataclass
class Block:
    """One namespace: its evidence as a queries x turns mask, and query categories."""

    rows: np.ndarray
    queries: np.ndarray
    evidence: np.ndarray
    counts: np.ndarray
    categories: np.ndarray

    def per_query(self, best: np.ndarray) -> np.ndarray:
        """(R@5, R@10, Hit@5) per query for the top-10 turn positions ``best`` (-1 = empty)."""
        got = np.take_along_axis(self.evidence, np.maximum(best, 0), axis=1) & (best >= 0)
        r5, r10 = got[:, :5].sum(1) / self.counts, got.sum(1) / self.counts
        return np.stack([r5, r10, got[:, :5].any(1).astype(np.float64)], axis=1)

    def sums(self, best: np.ndarray) -> np.ndarray:
        """Per category (1..4 -> 0..3) the sums of R@5, R@10, Hit@5: shape 4 x 3."""
        m = self.per_query(best)
        return np.stack([m[self.categories == c].sum(0) for c in (1, 2, 3, 4)])


def blocks(corpus: Corpus) -> list[Block]:
    out = []
    for ns in corpus.namespaces:
        rows, qs = corpus.ns_rows[ns], corpus.ns_queries[ns]
        local = {int(r): j for j, r in enumerate(rows)}
        ev = np.zeros((len(qs), len(rows)), dtype=bool)
        for a, qi in enumerate(qs):
            for r in corpus.queries[qi]["evidence_rows"]:
                ev[a, local[r]] = True
        cats = np.array([corpus.queries[qi]["category"] for qi in qs])
        out.append(Block(rows, qs, ev, np.maximum(ev.sum(1), 1), cats))
    return out


# ---------------------------------------------------------------- the variants


@dataclass
class KeywordSide:
    """Turn and date tokens (from FTS5) and query phrases; builds each context window's index."""

    corpus: Corpus
    turn_tokens: list[list[str]]
    date_tokens: dict[str, list[str]]
    query_terms: list[list[str]]

    @classmethod
    def of(cls, corpus: Corpus) -> KeywordSide:
        dates = sorted(set(corpus.dates))
        return cls(corpus, fts5_tokens([m["text"] for m in corpus.memories]),
                   dict(zip(dates, fts5_tokens(dates), strict=True)), query_token_terms(corpus.queries))

    def context_text(self, i: int, p: int, n: int, date: bool) -> str:
        """What the index keeps beside turn i: its date in words and its neighbours' text."""
        around = [self.corpus.memories[r]["text"] for r in self.corpus.window(i, p, n) if r != i]
        return "\n".join(([self.corpus.dates[i]] if date else []) + around)

    def index(self, p: int, n: int, date: bool, w_ctx: float = 1.0) -> KeywordIndex:
        context = []
        for i in range(len(self.corpus.memories)):
            tokens = list(self.date_tokens[self.corpus.dates[i]]) if date else []
            for r in self.corpus.window(i, p, n):
                if r != i:
                    tokens += self.turn_tokens[r]
            context.append(tokens)
        return KeywordIndex.build(self.turn_tokens, context, w_ctx)

    def plain_weights(self) -> list[dict[str, float]]:
        out = []
        for terms in self.query_terms:
            w: dict[str, float] = defaultdict(float)
            for t in terms:
                w[t] += 1.0
            out.append(dict(w))
        return out

    def rankings(self, index: KeywordIndex, blocks: list[Block],
                 weights: list[dict[str, float]] | None = None) -> list[Ranking]:
        weights = weights or self.plain_weights()
        out = []
        for b in blocks:
            s, m = index.scores(b.rows, [weights[q] for q in b.queries])
            out.append(Ranking.of(s.astype(np.float32), m))
        return out


def vector_rankings(queries: np.ndarray, turns: np.ndarray, blocks: list[Block]) -> list[Ranking]:
    return [Ranking.of(queries[b.queries] @ turns[b.rows].T) for b in blocks]


def check_fts5(side: KeywordSide, blocks: list[Block], p: int, n: int, date: bool, w_ctx: float) -> str:
    """Agreement of this BM25 with real FTS5: a (text, context) table, the product's MATCH
    string, ``bm25(t, 1.0, w_ctx)``."""
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE t USING fts5 (text, context, tokenize='{TOKENIZE}')")
    db.executemany("INSERT INTO t (rowid, text, context) VALUES (?, ?, ?)",
                   [(i, m["text"], side.context_text(i, p, n, date)) for i, m in enumerate(side.corpus.memories)])
    mine = side.rankings(side.index(p, n, date, w_ctx), blocks)
    same_top, max_diff, checked = 0, 0.0, 0
    for b, r in zip(blocks, mine, strict=True):
        allowed = {int(x): j for j, x in enumerate(b.rows)}
        for a, qi in enumerate(b.queries):
            terms = keyword_terms(side.corpus.queries[qi]["question"])
            match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
            found = db.execute("SELECT rowid, bm25(t, 1.0, ?) AS r FROM t WHERE t MATCH ? ORDER BY r, rowid",
                               [w_ctx, match])
            rows = [(allowed[rid], -s) for rid, s in found if rid in allowed]
            theirs = [j for j, _ in rows[:10]]
            ours = [j for j in np.argsort(r.ranks[a], kind="stable")[:10] if r.ranks[a, j] != NOT_FOUND]
            same_top += theirs == list(ours)
            for j, s in rows:
                max_diff = max(max_diff, abs(s - float(r.scores[a, j])))
            checked += 1
    db.close()
    return (f"window p{p} n{n}{' +date' if date else ''} w_ctx {w_ctx}: {same_top}/{checked} queries with the "
            f"same top 10 in the same order, largest score difference {max_diff:.2e}")


def readme_bm25(corpus: Corpus, blocks: list[Block]) -> list[Ranking]:
    """The README's reference BM25 as it reproduces: lowercase \\w+ tokens, every query word
    (stopwords kept), statistics per conversation, Lucene's IDF ln(1 + (N - n + 0.5) / (n + 0.5))."""
    word = re.compile(r"\w+")
    out = []
    for b in blocks:
        docs = [Counter(word.findall(corpus.memories[i]["text"].lower())) for i in b.rows]
        lengths = np.array([sum(d.values()) for d in docs], dtype=np.float64)
        df: Counter[str] = Counter()
        for d in docs:
            df.update(d.keys())
        norm = K1 * (1 - B + B * lengths / lengths.mean())
        scores = np.zeros((len(b.queries), len(docs)))
        for a, qi in enumerate(b.queries):
            for t in dict.fromkeys(word.findall(corpus.queries[qi]["question"].lower())):
                if df[t]:
                    idf = math.log(1 + (len(docs) - df[t] + 0.5) / (df[t] + 0.5))
                    tf = np.array([d.get(t, 0) for d in docs], dtype=np.float64)
                    scores[a] += idf * tf * (K1 + 1) / (tf + norm)
        out.append(Ranking.of(scores, scores > 0))
    return out
