"""Offline study for issue 13: which fusion and which session-context windows the default
search should use, chosen by leave-one-conversation-out cross-validation on LoCoMo dev.

    .venv/bin/python bench/retrieval_study.py [--data /work/shared/data/locomo/dev] [--cache /tmp/gm-study]

Hand-run; prints figures, asserts nothing. It does not go through the store: it ranks each
conversation's turns for each query itself, with the product's parts.

- Keyword: BM25 exactly as FTS5's ``bm25()`` computes it (k1 1.2, b 0.75, IDF
  ln((N - n + 0.5) / (n + 0.5)) floored at 1e-6, N and avgdl over the whole table, i.e. all
  five conversations as bench/recall.py loads them), over tokens produced by FTS5 itself
  with the product's tokenizer (``porter unicode61 remove_diacritics 2``, read back through
  an ``fts5vocab`` instance table), for the terms of ``gm.search.keyword_terms``. A check
  against real FTS5 ``MATCH ... ORDER BY bm25()`` runs first and prints its agreement.
- Vector: ``gm.embedding.Encoder`` with the default model (the product's vectors, one
  thread). Every distinct text is embedded once and cached in ``<cache>-vectors.npy``.
- Session context: a turn is indexed with the previous p and next n turns of its session
  (metadata.session) and optionally its session date in words ("Monday 8 May 2023").
  Vector texts run chronologically (date, previous turns, turn, next turn); if that exceeds
  the model's 256 wordpieces the farthest context turns are dropped, so the turn itself is
  never truncated. A second vector form mixes the turn's own vector with its neighbours'.

Its parts live beside it: bench/study_rankings.py (corpus, BM25, vectors, fusion, scoring)
and bench/study_ideas.py (the extra ideas). The grid's sums are saved to
``<cache>-grid.npz``; ``--reuse-grid`` re-prints the report from them without re-scoring.
Findings: docs/retrieval-study.md. The data set (CC BY-NC 4.0) is read in place; nothing
is copied.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sqlite3
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gm.search import keyword_terms
from study_ideas import diverse_top10, entity_weights, expand, near, neighbours, prf_weights
from study_rankings import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    PRODUCT_DEPTH,
    RRF_K,
    TOKENIZE,
    Block,
    Corpus,
    Fusion,
    KeywordIndex,
    KeywordSide,
    Ranking,
    VectorCache,
    blocks,
    check_fts5,
    embed_all,
    fuse,
    mixed_vectors,
    normalised,
    read_jsonl,
    readme_bm25,
    top10,
    vector_rankings,
)

# ---------------------------------------------------------------- grid and cross-validation

RRF_KS = (1, 5, 10, 20, 60)
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEPTHS = (20, 50, 100)
MIX_ALPHAS = (0.25, 0.5)


@dataclass(frozen=True)
class Config:
    keyword: str  # the keyword side's index, e.g. "kw p2 n0 +date"; "" when unused
    vector: str  # the vector side's index, e.g. "vec text p1 n0"; "" when unused
    fusion: Fusion

    def __str__(self) -> str:
        sides = " + ".join(s for s in (self.keyword, self.vector) if s)
        return f"{sides}; {self.fusion}"


def fusions() -> list[Fusion]:
    out = [Fusion("rrf", d, w, k) for d in DEPTHS for k in RRF_KS for w in WEIGHTS]
    return out + [Fusion(m, d, w) for d in DEPTHS for m in ("minmax", "zscore") for w in WEIGHTS]


def evaluate(kw: list[Ranking], vec: list[Ranking], blocks: list[Block], f: Fusion) -> np.ndarray:
    """Sums per namespace x category x (R@5, R@10, Hit@5)."""
    return np.stack([b.sums(top10(fuse(k, v, f))) for b, k, v in zip(blocks, kw, vec, strict=True)])


def pair_sums(kw: list[Ranking], vec: list[Ranking], blocks: list[Block], grid_fusions: list[Fusion]) -> np.ndarray:
    """``evaluate`` for every fusion of one (keyword, vector) pair, sharing the per-depth work:
    sums of shape fusions x ns x 4 x 3."""
    out = np.zeros((len(grid_fusions), len(blocks), 4, 3))
    for bi, (b, k, v) in enumerate(zip(blocks, kw, vec, strict=True)):
        by_rank_k, by_rank_v = np.argsort(k.ranks, axis=1), np.argsort(v.ranks, axis=1)
        parts: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for fi, f in enumerate(grid_fusions):
            key = (f.method, f.depth, f.k if f.method == "rrf" else 0)
            if key not in parts:
                in_k, in_v = k.ranks <= f.depth, v.ranks <= f.depth
                if f.method == "rrf":
                    a, c = in_k / (f.k + k.ranks), in_v / (f.k + v.ranks)
                else:
                    a, c = normalised(k, in_k, f.method), normalised(v, in_v, f.method)
                # Only the two candidate lists can reach the top 10: work on their union, each
                # turn once (a keyword candidate's copy in the vector list is switched off).
                cand = np.concatenate([by_rank_k[:, : f.depth], by_rank_v[:, : f.depth]], axis=1)
                first = np.take_along_axis(in_k, by_rank_k[:, : f.depth], axis=1)
                dup = np.take_along_axis(in_k, by_rank_v[:, : f.depth], axis=1)
                off = np.where(np.concatenate([first, ~dup], axis=1), cand * 1e-12, 1e9)
                parts[key] = (np.take_along_axis(a, cand, axis=1), np.take_along_axis(c, cand, axis=1), off, cand)
            a, c, off, cand = parts[key]
            keyed = f.w_kw * a + (1 - f.w_kw) * c - off
            part = np.argpartition(-keyed, 10, axis=1)[:, :10]
            order = np.argsort(-np.take_along_axis(keyed, part, axis=1), axis=1, kind="stable")
            out[fi, bi] = b.sums(np.take_along_axis(cand, np.take_along_axis(part, order, axis=1), axis=1))
    return out


def grid_configs(kw_sides: dict[str, list[Ranking]], vec_sides: dict[str, list[Ranking]]) -> list[Config]:
    """The configurations ``grid`` evaluates, in its order."""
    return ([Config(k, "", Fusion("keyword")) for k in kw_sides] + [Config("", v, Fusion("vector")) for v in vec_sides]
            + [Config(k, v, f) for k, v in itertools.product(kw_sides, vec_sides) for f in fusions()])


def grid(kw_sides: dict[str, list[Ranking]], vec_sides: dict[str, list[Ranking]], blocks: list[Block],
         ) -> tuple[list[Config], np.ndarray]:
    """Every single-ranking configuration and every fused one; sums of shape configs x ns x 4 x 3."""
    configs: list[Config] = []
    sums: list[np.ndarray] = []
    any_vec, any_kw = next(iter(vec_sides.values())), next(iter(kw_sides.values()))
    for name, kw in kw_sides.items():
        configs.append(Config(name, "", Fusion("keyword")))
        sums.append(evaluate(kw, any_vec, blocks, Fusion("keyword")))
    for name, vec in vec_sides.items():
        configs.append(Config("", name, Fusion("vector")))
        sums.append(evaluate(any_kw, vec, blocks, Fusion("vector")))
    began, grid_fusions = time.perf_counter(), fusions()
    for n, (kname, vname) in enumerate(itertools.product(kw_sides, vec_sides)):
        configs += [Config(kname, vname, f) for f in grid_fusions]
        sums += list(pair_sums(kw_sides[kname], vec_sides[vname], blocks, grid_fusions))
        if n % 50 == 49:
            print(f"  grid: {n + 1}/{len(kw_sides) * len(vec_sides)} index pairs ({time.perf_counter() - began:.0f}s)")
    return configs, np.stack(sums)


@dataclass
class Figures:
    n: int
    r5: float
    r10: float
    hit5: float
    mh_r10: float
    cat_r10: dict[int, float]

    @classmethod
    def of(cls, sums: np.ndarray, counts: np.ndarray) -> Figures:
        """``sums`` ns x 4 x 3 (or 4 x 3) and ``counts`` ns x 4 (or 4) over the namespaces wanted."""
        s, c = sums.reshape(-1, 4, 3).sum(0), counts.reshape(-1, 4).sum(0)
        total = s.sum(0) / c.sum()
        return cls(int(c.sum()), total[0], total[1], total[2], s[0, 1] / max(c[0], 1),
                   {k + 1: s[k, 1] / max(c[k], 1) for k in range(4)})


def choose(sums: np.ndarray, counts: np.ndarray, train: list[int], allowed: np.ndarray | None = None) -> int:
    """The configuration best on the ``train`` namespaces by R@10, ties by multi-hop R@10,
    then the first listed (the simpler forms are listed first)."""
    s, c = sums[:, train].sum(1), counts[train].sum(0)
    r10 = s[:, :, 1].sum(1) / c.sum()
    if allowed is not None:
        r10 = np.where(allowed, r10, -np.inf)
    mh = np.where(r10 >= r10.max() - 1e-9, s[:, 0, 1] / c[0], -np.inf)
    return int(np.argmax(mh))


def fmt(value: float) -> str:
    return f"{value:.3f}".lstrip("0") if value < 1 else f"{value:.3f}"


# ---------------------------------------------------------------- report

# (p, n, date, weight of the context column): the context as a second FTS5 column whose
# weight 1 is the same as one column of context + turn.
KW_WINDOWS = [(p, n, d, w) for d in (False, True) for n in (0, 1) for p in range(4)
              for w in ((1.0, 0.5, 0.3) if p or n or d else (1.0,))]
MIX_WINDOWS = [(p, n) for n in (0, 1) for p in range(4) if p + n]


def kw_name(p: int, n: int, date: bool, w_ctx: float = 1.0) -> str:
    return f"kw p{p} n{n}" + (" +date" if date else "") + (f" ctx x{w_ctx}" if w_ctx != 1.0 else "")


def vec_name(p: int, n: int, date: bool) -> str:
    return f"vec text p{p} n{n}" + (" +date" if date else "")


PLAIN_KW, PLAIN_VEC = kw_name(0, 0, False), vec_name(0, 0, False)
TODAY = Config(PLAIN_KW, PLAIN_VEC, Fusion("rrf", PRODUCT_DEPTH, 0.5, RRF_K))


def row(label: str, f: Figures, extra: str = "") -> str:
    return (f"| {label} | {fmt(f.r10)} | {fmt(f.r5)} | {fmt(f.hit5)} | {fmt(f.mh_r10)} | "
            + " | ".join(fmt(f.cat_r10[c]) for c in (2, 3, 4)) + f" |{extra}")


HEADER = ("| | R@10 | R@5 | Hit@5 | multi-hop R@10 | temporal R@10 | open-domain R@10 | single-hop R@10 |\n"
          "|---|---|---|---|---|---|---|---|")


def loco(sums: np.ndarray, counts: np.ndarray, allowed: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Per fold the configuration chosen on the other four; the held-out sums stacked (ns x 4 x 3)."""
    chosen = [choose(sums, counts, [j for j in range(len(counts)) if j != i], allowed) for i in range(len(counts))]
    return chosen, np.stack([sums[c, i] for i, c in enumerate(chosen)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"LoCoMo split (default {DEFAULT_DATA})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"prefix of the vector and grid cache files (default {DEFAULT_CACHE})")
    parser.add_argument("--reuse-grid", action="store_true",
                        help="read the grid's sums from the cache when it holds the same configurations")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    began = time.perf_counter()
    corpus = Corpus(read_jsonl(args.data / "memories.jsonl"), read_jsonl(args.data / "queries.jsonl"))
    bl = blocks(corpus)
    counts = np.stack([[int((b.categories == c).sum()) for c in (1, 2, 3, 4)] for b in bl])
    print(f"{len(corpus.memories)} turns, {len(corpus.queries)} queries in {len(bl)} conversations "
          f"{corpus.namespaces}; queries per category {counts.sum(0).tolist()}")

    side = KeywordSide.of(corpus)
    indexes = {kw_name(*w): side.index(*w) for w in KW_WINDOWS}
    for window, w_ctx in (((0, 0, False), 1.0), ((2, 0, True), 1.0), ((2, 1, True), 0.5)):
        print("keyword scoring vs real FTS5 bm25():", check_fts5(side, bl, *window, w_ctx))
    kw_sides = {name: side.rankings(ix, bl) for name, ix in indexes.items()}

    cache = VectorCache(args.cache)
    qvec, texts = embed_all(corpus, cache)
    vec_sides = {vec_name(*w): vector_rankings(qvec, v, bl) for w, v in texts.items()}
    for p, n in MIX_WINDOWS:
        for alpha in MIX_ALPHAS:
            mixed = mixed_vectors(texts[(0, 0, False)], corpus, p, n, alpha)
            vec_sides[f"vec mix p{p} n{n} a{alpha}"] = vector_rankings(qvec, mixed, bl)

    print("\n## Sanity: the README's reference rows (all five conversations pooled)\n")
    print(HEADER)
    ref = readme_bm25(corpus, bl)
    full = Fusion("rrf", 10**6, 0.5, 60)
    for label, kw, vec, f in [("README BM25 (reproduced: .457/.537/.504)", ref, ref, Fusion("keyword")),
                              ("dense cosine, product vectors (README .406/.491/.455)", ref,
                               vec_sides[PLAIN_VEC], Fusion("vector")),
                              ("RRF k=60 of the two, full lists (README .508/.599/.562)", ref,
                               vec_sides[PLAIN_VEC], full),
                              ("product keyword (FTS5 porter, stopwords dropped, global IDF)", kw_sides[PLAIN_KW],
                               vec_sides[PLAIN_VEC], Fusion("keyword")),
                              ("product hybrid today: RRF k=60 depth 50", kw_sides[PLAIN_KW],
                               vec_sides[PLAIN_VEC], TODAY.fusion)]:
        print(row(label, Figures.of(evaluate(kw, vec, bl, f), counts)))

    grid_file = args.cache.with_name(args.cache.name + "-grid.npz")
    configs = grid_configs(kw_sides, vec_sides)
    if args.reuse_grid and grid_file.is_file() and list(np.load(grid_file)["configs"]) == [str(c) for c in configs]:
        sums = np.load(grid_file)["sums"]
        print(f"\n{len(configs):,} configurations: sums read from {grid_file}")
    else:
        configs, sums = grid(kw_sides, vec_sides, bl)
        np.savez_compressed(grid_file, sums=sums, configs=np.array([str(c) for c in configs]))
        print(f"\n{len(configs):,} configurations evaluated ({time.perf_counter() - began:.0f}s so far); "
              f"sums saved to {grid_file}")
    shipped = report(corpus, bl, counts, side, indexes, kw_sides, vec_sides, configs, sums)
    p, n, date, w_ctx = re.fullmatch(r"kw p(\d) n(\d)( \+date)?(?: ctx x([\d.]+))?",
                                     shipped.keyword).groups()  # type: ignore[union-attr]
    query_cost(corpus, side, (int(p), int(n), bool(date), float(w_ctx or 1.0)), shipped.fusion.depth)
    encoder = cache.load()
    times = []
    for q in corpus.queries[:200]:
        t0 = time.perf_counter()
        encoder.encode([q["question"]])
        times.append(time.perf_counter() - t0)
    print(f"- for scale: embedding one query, p50 {sorted(times)[100] * 1000:.2f} ms (the same before and after)")
    print(f"\ntotal run time {time.perf_counter() - began:.0f}s")


def report(corpus: Corpus, bl: list[Block], counts: np.ndarray, side: KeywordSide, indexes: dict[str, KeywordIndex],
           kw_sides: dict[str, list[Ranking]], vec_sides: dict[str, list[Ranking]], configs: list[Config],
           sums: np.ndarray) -> Config:
    """Prints the cross-validation, the ablations and the extra ideas; returns the choice on all five."""
    names = corpus.namespaces
    where = {c: i for i, c in enumerate(configs)}
    fused = np.array([bool(c.keyword and c.vector) for c in configs])
    kw_only = np.array([c.fusion.method == "keyword" for c in configs])
    vec_only = np.array([c.fusion.method == "vector" for c in configs])
    fixed = {"keyword today": where[Config(PLAIN_KW, "", Fusion("keyword"))],
             "vector today": where[Config("", PLAIN_VEC, Fusion("vector"))], "hybrid today": where[TODAY]}

    chosen, held = loco(sums, counts, fused)
    kw_chosen, kw_held = loco(sums, counts, kw_only)
    vec_chosen, vec_held = loco(sums, counts, vec_only)
    print("\n## Leave-one-conversation-out: the fused configuration chosen on the other four\n")
    print("| held out | chosen on the other four | R@10 | R@5 | Hit@5 | multi-hop R@10 | keyword today | "
          "vector today | hybrid today | keyword, same window | best keyword (LOCO) | best vector (LOCO) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(chosen):
        f = Figures.of(sums[c, i], counts[i])
        same_kw = where[Config(configs[c].keyword, "", Fusion("keyword"))]
        base = [Figures.of(sums[j, i], counts[i]).r10 for j in (*fixed.values(), same_kw)]
        base += [Figures.of(kw_held[i], counts[i]).r10, Figures.of(vec_held[i], counts[i]).r10]
        print(f"| {names[i]} | {configs[c]} | {fmt(f.r10)} | {fmt(f.r5)} | {fmt(f.hit5)} | {fmt(f.mh_r10)} | "
              + " | ".join(fmt(x) for x in base) + " |")
    print("\nPooled held-out figures (each fold scored on the conversation it was not tuned on):\n")
    print(HEADER)
    print(row("fused, chosen per fold", Figures.of(held, counts)))
    print(row("keyword only, window chosen per fold", Figures.of(kw_held, counts)))
    print(row("vector only, window chosen per fold", Figures.of(vec_held, counts)))
    for label, j in fixed.items():
        print(row(f"{label} (fixed)", Figures.of(sums[j], counts)))
    print("\nPer-fold choices of the single rankings: keyword " + "; ".join(str(configs[c].keyword) for c in kw_chosen)
          + " | vector " + "; ".join(str(configs[c].vector) for c in vec_chosen))

    everything = choose(sums, counts, list(range(len(names))), fused)
    shipped_table("Chosen on all five by R@10 (ties: multi-hop)", everything, configs, sums, counts, names, chosen,
                  where, fixed)

    # The rule as a constraint: a fused configuration is allowed on a set of
    # conversations only if it is >= its own keyword and vector halves on each of them.
    r10 = sums[:, :, :, 1].sum(2) / counts.sum(1)
    kw_half = np.array([where[Config(c.keyword, "", Fusion("keyword"))] if c.keyword else i
                        for i, c in enumerate(configs)])
    vec_half = np.array([where[Config("", c.vector, Fusion("vector"))] if c.vector else i
                         for i, c in enumerate(configs)])
    never_loses = (r10 >= r10[kw_half] - 1e-12) & (r10 >= r10[vec_half] - 1e-12)
    safe = [choose(sums, counts, [j for j in range(len(names)) if j != i],
                   fused & never_loses[:, [j for j in range(len(names)) if j != i]].all(1)) for i in range(len(names))]
    print("\n## LOCO with the rule as a constraint (chosen among configurations >= both halves on each of "
          "the four)\n")
    print("| held out | chosen on the other four | R@10 | R@5 | Hit@5 | multi-hop R@10 | keyword, same window | "
          "vector, same window |")
    print("|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(safe):
        f = Figures.of(sums[c, i], counts[i])
        print(f"| {names[i]} | {configs[c]} | {fmt(f.r10)} | {fmt(f.r5)} | {fmt(f.hit5)} | {fmt(f.mh_r10)} | "
              f"{fmt(r10[kw_half[c], i])} | {fmt(r10[vec_half[c], i])} |")
    print(HEADER)
    print(row("fused, constrained, chosen per fold (pooled held-out)",
              Figures.of(np.stack([sums[c, i] for i, c in enumerate(safe)]), counts)))
    recommended = choose(sums, counts, list(range(len(names))), fused & never_loses.all(1))
    shipped_table("Recommended: chosen on all five among configurations >= both halves on every conversation",
                  recommended, configs, sums, counts, names, safe, where, fixed)

    distinct = Counter(str(configs[c]) for c in chosen)
    print(f"\nStability: {len(distinct)} distinct choices over 5 folds: " + "; ".join(
        f"{k} x{v}" for k, v in distinct.most_common()))
    top = np.argsort(-(sums[:, :, :, 1].sum((1, 2)) / counts.sum()) + np.where(fused, 0, 9))[:10]
    print("Ten best fused configurations on all five (pooled R@10, multi-hop R@10):")
    for j in top:
        f = Figures.of(sums[j], counts)
        print(f"  {fmt(f.r10)} {fmt(f.mh_r10)}  {configs[j]}")

    print("\n## Every single ranking on all five (pooled, in-sample)\n")
    print(HEADER)
    for j in np.flatnonzero(kw_only | vec_only):
        print(row(configs[j].keyword or configs[j].vector, Figures.of(sums[j], counts)))

    ablations(configs, sums, counts, fused, kw_only, names)
    extras(corpus, bl, counts, side, indexes, kw_sides, vec_sides, configs, chosen, names)
    return configs[recommended]


def shipped_table(title: str, k: int, configs: list[Config], sums: np.ndarray, counts: np.ndarray,
                  names: list[str], chosen: list[int], where: dict[Config, int], fixed: dict[str, int]) -> None:
    """One configuration on each conversation (in-sample: it was chosen on all five)."""
    print(f"\n## {title}: {configs[k]}\n")
    print("| conversation | R@10 | R@5 | Hit@5 | multi-hop R@10 | keyword same window | vector same window | "
          "keyword today | vector today | train R@10: fold's own choice / this one |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    halves = (where[Config(configs[k].keyword, "", Fusion("keyword"))],
              where[Config("", configs[k].vector, Fusion("vector"))], fixed["keyword today"], fixed["vector today"])
    for i in range(len(names)):
        f = Figures.of(sums[k, i], counts[i])
        train = [j for j in range(len(names)) if j != i]
        own = Figures.of(sums[chosen[i], train], counts[train]).r10
        this = Figures.of(sums[k, train], counts[train]).r10
        others = [Figures.of(sums[j, i], counts[i]).r10 for j in halves]
        print(f"| {names[i]} (in-sample) | {f.r10:.4f} | {fmt(f.r5)} | {fmt(f.hit5)} | {fmt(f.mh_r10)} | "
              + " | ".join(f"{x:.4f}" + ("" if f.r10 >= x - 1e-12 else " (fused loses)") for x in others)
              + f" | {own:.4f} / {this:.4f} |")
    print(HEADER)
    print(row("pooled over the five (in-sample)", Figures.of(sums[k], counts)))


def ablations(configs: list[Config], sums: np.ndarray, counts: np.ndarray, fused: np.ndarray, kw_only: np.ndarray,
              names: list[str]) -> None:
    """LOCO over parts of the grid: what each dimension contributes."""
    kw_of = np.array([c.keyword for c in configs])
    vec_of = np.array([c.vector for c in configs])
    method = np.array([c.fusion.method for c in configs])
    depth = np.array([c.fusion.depth for c in configs])
    weight = np.array([c.fusion.w_kw for c in configs])
    k = np.array([c.fusion.k for c in configs])
    plain_kw, plain_vec = kw_of == PLAIN_KW, vec_of == PLAIN_VEC
    restricted = {
        "fusion only (no context on either side)": fused & plain_kw & plain_vec,
        "  ... RRF with equal weights, k chosen": fused & plain_kw & plain_vec & (method == "rrf") & (weight == 0.5),
        "keyword context only (plain vectors)": fused & plain_vec,
        "vector context only (plain keyword)": fused & plain_kw,
        "keyword context without the date": fused & (np.char.find(kw_of.astype(str), "+date") < 0),
        "keyword context: previous turns only (n=0)": fused & (np.char.find(kw_of.astype(str), "n0") >= 0),
        "keyword context as one column (no context weight)": fused & (np.char.find(kw_of.astype(str), "ctx") < 0),
        "vector side: text windows only": fused & np.char.startswith(vec_of.astype(str), "vec text"),
        "vector side: mixed vectors only": fused & (np.char.startswith(vec_of.astype(str), "vec mix") | plain_vec),
        "fusion: RRF only": fused & (method == "rrf"),
        "fusion: RRF k=60 only (weights, depth, windows chosen)": fused & (method == "rrf") & (k == 60),
        "fusion: min-max only": fused & (method == "minmax"),
        "fusion: z-score only": fused & (method == "zscore"),
        "depth 20 only": fused & (depth == 20),
        "depth 50 only": fused & (depth == 50),
        "depth 100 only": fused & (depth == 100),
        "full grid (the main result)": fused,
        "keyword only, window chosen": kw_only,
    }
    print("\n## What each part contributes: LOCO over restricted grids (pooled held-out)\n")
    print("| grid | R@10 | R@5 | Hit@5 | multi-hop R@10 | temporal | open-domain | single-hop | per-fold R@10 | "
          "folds >= keyword same window |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    where = {c: i for i, c in enumerate(configs)}
    for label, allowed in restricted.items():
        chosen, held = loco(sums, counts, allowed)
        folds = [Figures.of(held[i], counts[i]).r10 for i in range(len(names))]
        wins = sum(folds[i] >= Figures.of(sums[where[Config(configs[c].keyword, "", Fusion("keyword"))], i],
                                          counts[i]).r10 - 1e-12 for i, c in enumerate(chosen))
        print(row(label, Figures.of(held, counts), f" {' '.join(fmt(x) for x in folds)} | {wins}/5 |"))


def extras(corpus: Corpus, bl: list[Block], counts: np.ndarray, side: KeywordSide, indexes: dict[str, KeywordIndex],
           kw_sides: dict[str, list[Ranking]], vec_sides: dict[str, list[Ranking]], configs: list[Config],
           chosen: list[int], names: list[str]) -> None:
    """Each idea on top of each fold's chosen fusion; its setting ("off" included) chosen on
    the other four conversations too, so the held-out figure stays honest."""
    nbs = [neighbours(corpus, b) for b in bl]
    closeness = {r: [near(corpus, b, r) for b in bl] for r in (1, 2)}
    memo: dict[tuple[str, str, Any], list[Ranking]] = {}

    def keyword(name: str, idea: str, value: Any) -> list[Ranking]:
        if idea not in ("prf", "entity") or value in (0.0, (1.0, 1.0)):
            return kw_sides[name]
        if (name, idea, value) not in memo:
            weights = (prf_weights(side, indexes[name], kw_sides[name], bl, value) if idea == "prf"
                       else entity_weights(side, *value))
            memo[(name, idea, value)] = side.rankings(indexes[name], bl, weights)
        return memo[(name, idea, value)]

    def run(c: Config, idea: str, value: Any) -> np.ndarray:
        kw, vec = keyword(c.keyword, idea, value), vec_sides[c.vector]
        out = []
        for bi, (b, k, v, (prev, nxt)) in enumerate(zip(bl, kw, vec, nbs, strict=True)):
            scores = fuse(k, v, c.fusion)
            if idea == "expand" and value:
                scores = expand(scores, prev, nxt, value)
            if idea == "diverse" and value[0]:
                out.append(b.sums(diverse_top10(scores, closeness[value[1]][bi], value[0])))
            else:
                out.append(b.sums(top10(scores)))
        return np.stack(out)

    ideas: dict[str, tuple[str, list[Any]]] = {
        "neighbour expansion (beta x best adjacent fused score)": ("expand", [0.0, 0.1, 0.2, 0.3, 0.5]),
        "pseudo-relevance feedback, RM3-like (top 3 docs, 10 terms, mean weight lambda)":
            ("prf", [0.0, 0.1, 0.2, 0.3, 0.5]),
        "session diversity (score x (1 - delta) per chosen turn within r in its session)":
            ("diverse", [(0.0, 1)] + [(d, r) for r in (1, 2) for d in (0.25, 0.5, 0.75)]),
        "entity weighting (capitalised words x gamma, speaker names x sigma)":
            ("entity", [(1.0, 1.0)] + [(g, s) for g in (1.0, 1.5, 2.0, 3.0) for s in (0.5, 1.0, 2.0)
                                        if (g, s) != (1.0, 1.0)]),
    }
    print("\n## Ideas on top of each fold's chosen fusion (setting chosen on the other four)\n")
    print("| idea | settings | R@10 | R@5 | Hit@5 | multi-hop R@10 | temporal | open-domain | single-hop | "
          "per-fold R@10 | per-fold choice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (idea, values) in ideas.items():
        began = time.perf_counter()
        held, picks, best_all = [], [], []
        for i, c in enumerate(chosen):
            table = np.stack([run(configs[c], idea, v) for v in values])
            train = [j for j in range(len(names)) if j != i]
            pick = choose(table, counts, train)
            held.append(table[pick, i])
            picks.append(values[pick])
            best_all.append(table[:, i])
        held_sums = np.stack(held)
        folds = " ".join(fmt(Figures.of(held_sums[i], counts[i]).r10) for i in range(len(names)))
        print(row(label, Figures.of(held_sums, counts), f" {folds} | {' '.join(str(p) for p in picks)} |")
              .replace("| " + label + " |", f"| {label} | {len(values)} |", 1))
        # the pooled effect of each fixed setting, same per-fold base: is any setting a gain?
        for v, j in zip(values, range(len(values)), strict=True):
            pooled = Figures.of(np.stack([best_all[i][j] for i in range(len(names))]), counts)
            print(f"|   ... fixed {v} | | {fmt(pooled.r10)} | {fmt(pooled.r5)} | {fmt(pooled.hit5)} | "
                  f"{fmt(pooled.mh_r10)} | | | | | |")
        print(f"<!-- {label}: {time.perf_counter() - began:.0f}s -->")


def query_cost(corpus: Corpus, side: KeywordSide, window: tuple[int, int, bool, float], depth: int,
               rows: int = 10_000, samples: int = 300) -> None:
    """Rough p50 of the keyword query (FTS5 MATCH ... ORDER BY bm25 LIMIT depth) at ~10k
    memories, plain vs the chosen context window; the vector scan's cost does not depend on
    the window, and its depth only changes the partial sort."""
    def table(context: list[str]) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:")
        db.execute(f"CREATE VIRTUAL TABLE t USING fts5 (text, context, tokenize='{TOKENIZE}')")
        db.executemany("INSERT INTO t (text, context) VALUES (?, ?)",
                       [(plain[i % len(plain)], context[i % len(plain)]) for i in range(rows)])
        return db

    p, n, date, w_ctx = window
    plain = [m["text"] for m in corpus.memories]
    qs = [keyword_terms(q["question"]) for q in corpus.queries[:samples]]
    matches = [" OR ".join('"' + t.replace('"', '""') + '"' for t in ts) for ts in qs if ts]
    print("\n## Rough query cost (keyword query at 10k memories, one shared core)\n")
    for label, context, d, w in [
        ("plain turns, depth 50 (today)", ["" for _ in plain], PRODUCT_DEPTH, 1.0),
        (f"context column p{p} n{n}{' +date' if date else ''} weight {w_ctx}, depth {depth}",
         [side.context_text(i, p, n, date) for i in range(len(plain))], depth, w_ctx),
    ]:
        db = table(context)
        times = []
        for m in matches:
            t0 = time.perf_counter()
            db.execute("SELECT rowid, bm25(t, 1.0, ?) AS r FROM t WHERE t MATCH ? ORDER BY r LIMIT ?",
                       [w, m, d]).fetchall()
            times.append(time.perf_counter() - t0)
        times.sort()
        p50, p90 = times[len(times) // 2] * 1000, times[int(len(times) * 0.9)] * 1000
        print(f"- {label}: p50 {p50:.2f} ms, p90 {p90:.2f} ms")
        db.close()


if __name__ == "__main__":
    main()
