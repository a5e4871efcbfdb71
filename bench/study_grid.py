"""The retrieval study's grid and cross-validation (see bench/retrieval_study.py): every
configuration of a keyword side, a vector side and a fusion, its sums per conversation and
category, and choosing one on some conversations to score it on the one held out.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np

from figures import three_places as fmt
from study_rankings import Block, Fusion, Ranking, fuse, normalised, top10

RRF_KS = (1, 5, 10, 20, 60)
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEPTHS = (20, 50, 100)


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


def row(label: str, f: Figures, extra: str = "") -> str:
    return (f"| {label} | {fmt(f.r10)} | {fmt(f.r5)} | {fmt(f.hit5)} | {fmt(f.mh_r10)} | "
            + " | ".join(fmt(f.cat_r10[c]) for c in (2, 3, 4)) + f" |{extra}")


HEADER = ("| | R@10 | R@5 | Hit@5 | multi-hop R@10 | temporal R@10 | open-domain R@10 | single-hop R@10 |\n"
          "|---|---|---|---|---|---|---|---|")


def loco(sums: np.ndarray, counts: np.ndarray, allowed: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Per fold the configuration chosen on the other four; the held-out sums stacked (ns x 4 x 3)."""
    chosen = [choose(sums, counts, [j for j in range(len(counts)) if j != i], allowed) for i in range(len(counts))]
    return chosen, np.stack([sums[c, i] for i, c in enumerate(chosen)])
