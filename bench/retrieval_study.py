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

Its parts live beside it: bench/study_rankings.py (corpus, BM25, vectors, fusion, scoring),
bench/study_grid.py (the grid and the cross-validation) and bench/study_ideas.py (the extra
ideas). The grid's sums are saved to
``<cache>-grid.npz``; ``--reuse-grid`` re-prints the report from them without re-scoring.
Findings: docs/retrieval-study.md. The data set (CC BY-NC 4.0) is read in place; nothing
is copied.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from figures import quantile
from figures import three_places as fmt
from gm.search import keyword_terms
from locomo import DEFAULT_DATA, read_jsonl
from study_grid import HEADER, Config, Figures, choose, evaluate, grid, grid_configs, loco, row
from study_ideas import extras
from study_rankings import (
    DEFAULT_CACHE,
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
    mixed_vectors,
    readme_bm25,
    vector_rankings,
)

# ---------------------------------------------------------------- report

# (p, n, date, weight of the context column): the context as a second FTS5 column whose
# weight 1 is the same as one column of context + turn.
KW_WINDOWS = [(p, n, d, w) for d in (False, True) for n in (0, 1) for p in range(4)
              for w in ((1.0, 0.5, 0.3) if p or n or d else (1.0,))]
MIX_WINDOWS = [(p, n) for n in (0, 1) for p in range(4) if p + n]
MIX_ALPHAS = (0.25, 0.5)


def kw_name(p: int, n: int, date: bool, w_ctx: float = 1.0) -> str:
    return f"kw p{p} n{n}" + (" +date" if date else "") + (f" ctx x{w_ctx}" if w_ctx != 1.0 else "")


def vec_name(p: int, n: int, date: bool) -> str:
    return f"vec text p{p} n{n}" + (" +date" if date else "")


PLAIN_KW, PLAIN_VEC = kw_name(0, 0, False), vec_name(0, 0, False)
TODAY = Config(PLAIN_KW, PLAIN_VEC, Fusion("rrf", PRODUCT_DEPTH, 0.5, RRF_K))


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
    print(f"- for scale: embedding one query, p50 {quantile(times, 0.5) * 1000:.2f} ms (the same before and after)")
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
        p50, p90 = quantile(times, 0.5) * 1000, quantile(times, 0.9) * 1000
        print(f"- {label}: p50 {p50:.2f} ms, p90 {p90:.2f} ms")
        db.close()


if __name__ == "__main__":
    main()
