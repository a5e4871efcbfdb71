"""Ideas tried on top of the study's chosen fusion: neighbour expansion, session diversity,
pseudo-relevance feedback and entity weighting for the keyword side; and their evaluation,
each idea's setting chosen leave-one-conversation-out like the fusion.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from figures import three_places as fmt
from study_grid import Config, Figures, choose, row
from study_rankings import NOT_FOUND, Block, Corpus, KeywordIndex, KeywordSide, Ranking, fts5_tokens, fuse, top10


def neighbours(corpus: Corpus, b: Block) -> tuple[np.ndarray, np.ndarray]:
    """Local positions of each turn's previous and next turn in its session (-1: none)."""
    local = {int(r): j for j, r in enumerate(b.rows)}
    prev = np.array([local[corpus.prev[int(r)][0]] if corpus.prev[int(r)] else -1 for r in b.rows])
    nxt = np.array([local[corpus.next[int(r)][0]] if corpus.next[int(r)] else -1 for r in b.rows])
    return prev, nxt


def expand(fused: np.ndarray, prev: np.ndarray, nxt: np.ndarray, beta: float) -> np.ndarray:
    """Neighbour expansion: a turn gains beta times the better fused score of the turns
    beside it in its session, so the turn after a strong hit can enter the top 10."""
    finite = np.isfinite(fused)
    low = np.where(finite, fused, np.inf).min(axis=1, keepdims=True)
    pos = np.where(finite, fused - low, 0.0)
    zero = np.zeros((fused.shape[0], 1))
    padded = np.concatenate([pos, zero], axis=1)  # index -1 reads the zero column
    boost = np.maximum(padded[:, prev], padded[:, nxt])
    out = pos + beta * boost
    return np.where(finite | (boost > 0), out, -np.inf)


def near(corpus: Corpus, b: Block, r: int) -> np.ndarray:
    """turns x turns: True where two different turns are at most r apart in one session."""
    session = np.array([corpus.memories[int(i)]["metadata"]["session"] for i in b.rows])
    pos = np.arange(len(b.rows))  # file order is session order
    return (session[:, None] == session[None, :]) & (np.abs(pos[:, None] - pos[None, :]) <= r) & (pos[:, None] != pos)


def diverse_top10(fused: np.ndarray, close: np.ndarray, delta: float) -> np.ndarray:
    """Greedy top 10 where a turn's score shrinks by (1 - delta) for each already chosen turn
    close to it in its session: spreads the hits over the conversation (for multi-hop)."""
    finite = np.isfinite(fused)
    low = np.where(finite, fused, np.inf).min(axis=1, keepdims=True)
    pos = np.where(finite, fused - low + 1e-9, -np.inf)
    taken = np.zeros(fused.shape, dtype=np.float64)
    picks = np.empty((fused.shape[0], 10), dtype=np.int64)
    rows = np.arange(fused.shape[0])
    for step in range(10):
        adjusted = pos * (1 - delta) ** taken
        pick = np.argmax(adjusted, axis=1)
        picks[:, step] = pick
        pos[rows, pick] = -np.inf
        taken += close[pick]
    return picks


STOP_STEMS: set[str] = set()


def prf_weights(side: KeywordSide, index: KeywordIndex, kw: list[Ranking], blocks: list[Block],
                lam: float, docs: int = 3, terms: int = 10) -> list[dict[str, float]]:
    """RM3-like expansion: the 10 likeliest new terms of each query's top-3 keyword hits
    (P(t|R) = sum over hits of score share x tf / length), added with mean weight ``lam``."""
    if not STOP_STEMS:
        from gm.search import STOPWORDS

        STOP_STEMS.update(t for ts in fts5_tokens(sorted(STOPWORDS)) for t in ts)
    weights = side.plain_weights()
    for b, r in zip(blocks, kw, strict=True):
        for a, qi in enumerate(b.queries):
            top = [j for j in np.argsort(r.ranks[a], kind="stable")[:docs] if r.ranks[a, j] != NOT_FOUND]
            if not top:
                continue
            share = np.array([r.scores[a, j] for j in top], dtype=np.float64)
            share = share / share.sum()
            model: Counter[str] = Counter()
            for s, j in zip(share, top, strict=True):
                doc = index.docs[int(b.rows[j])]
                length = sum(doc.values())
                for t, c in doc.items():
                    if t not in STOP_STEMS and t not in weights[qi] and not t.isdigit():
                        model[t] += s * c / length
            best = model.most_common(terms)
            total = sum(v for _, v in best) or 1.0
            for t, v in best:
                weights[qi][t] = lam * len(best) * v / total
    return weights


def entity_weights(side: KeywordSide, gamma: float, sigma: float) -> list[dict[str, float]]:
    """Query terms from capitalised words (not the first word) weighted gamma; the
    conversation's two speaker names weighted sigma; other terms 1."""
    speakers: dict[str, set[str]] = defaultdict(set)
    for m in side.corpus.memories:
        speakers[m["namespace"]].add(m["metadata"]["speaker"].lower())
    capitals = [[w for w in re.findall(r"\w+", q["question"])[1:] if w[:1].isupper()] for q in side.corpus.queries]
    words = sorted({w for ws in speakers.values() for w in ws} | {w for ws in capitals for w in ws})
    stems = dict(zip(words, fts5_tokens(words), strict=True))
    weights = side.plain_weights()
    for q, w, caps in zip(side.corpus.queries, weights, capitals, strict=True):
        speaker_stems = {t for s in speakers[q["namespace"]] for t in stems[s]}
        capital = {t for word in caps for t in stems[word]}
        for t in w:
            if t in speaker_stems:
                w[t] *= sigma
            elif t in capital:
                w[t] *= gamma
    return weights


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
