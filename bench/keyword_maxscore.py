"""A measured design step for keyword search at scale (issue 12), not the product's code yet:
FTS5's BM25 reproduced in numpy from the index's own postings, scored exhaustively and with
term-level MaxScore, timed against FTS5 itself on a store, with each query's top 10 compared.

FTS5 cannot stop early: ``bm25()`` first counts every row each query word matches (its idf)
and then scores every match, so a whole-namespace query over 1M memories costs hundreds of
ms. The postings here are FTS5's own tokens (``fts5vocab`` instance rows) and the document
lengths its ``docsize`` table, so the scores are FTS5's to the bit (same formula, summed in
phrase order). MaxScore scores only the rows holding a rare ("essential") word: a row holding
common words only cannot beat the tenth best once their summed bounds fall below it, and the
common words' parts of the candidates are looked up (binary search of their sorted postings).
Every figure is printed; it asserts nothing (a benchmark).

Example, on a store an earlier ``bench/peers.py --size 1000000 --keep`` left:
  .venv/bin/python bench/keyword_maxscore.py DIR/n1000000/greatmemory/memories.db DIR/queries.npz
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import time

import numpy as np

from gm.context import CONTEXT_WEIGHT
from gm.search import keyword_terms
from gm.storage.sqlite_keywords import RANK, TABLE

K1, B = 1.2, 0.75  # FTS5's bm25 constants
TOKENIZER = "porter unicode61 remove_diacritics 2"  # the index's (gm.storage.sqlite_migrations)


class Postings:
    """Each word's rows (as positions in the sorted FTS rowids) and weighted frequencies, read
    from the store's FTS5 index when first asked for."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(f"CREATE VIRTUAL TABLE temp.gm_instances USING fts5vocab(main, {TABLE}, instance)")
        rows = db.execute(f"SELECT id, sz FROM {TABLE}_docsize").fetchall()
        keys = np.array([r[0] for r in rows], dtype=np.int64)
        lengths = np.array([_varint_sum(r[1]) for r in rows], dtype=np.float64)
        order = np.argsort(keys)
        self.keys, self.lengths = keys[order], lengths[order]
        self.avgdl = float(self.lengths.sum()) / len(self.keys)
        self.words: dict[str, tuple[np.ndarray, np.ndarray, float, float]] = {}
        self.tokens = sqlite3.connect(":memory:")
        self.tokens.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{TOKENIZER}')")
        self.tokens.execute("CREATE VIRTUAL TABLE tv USING fts5vocab(t, instance)")

    def phrases(self, terms: list[str]) -> list[str] | None:
        """The index's token of each term (FTS5's tokenizer itself); None if one is not one token."""
        self.tokens.execute("DELETE FROM t")
        self.tokens.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)", list(enumerate(terms)))
        found: dict[int, list[str]] = {}
        for token, doc in self.tokens.execute("SELECT term, doc FROM tv"):
            found.setdefault(doc, []).append(token)
        tokens = [found.get(i, []) for i in range(len(terms))]
        return [t[0] for t in tokens] if all(len(t) == 1 for t in tokens) else None

    def of(self, word: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        """(rows, weighted frequencies, the largest frequency, the shortest row's length)."""
        if word not in self.words:
            rows = self.db.execute("SELECT doc, col FROM temp.gm_instances WHERE term = ?", [word]).fetchall()
            docs = np.array([r[0] for r in rows], dtype=np.int64)
            weights = np.array([1.0 if r[1] == "text" else CONTEXT_WEIGHT for r in rows])
            unique, inverse = np.unique(docs, return_inverse=True)
            freq = np.bincount(inverse, weights=weights) if len(docs) else np.empty(0)
            slots = np.searchsorted(self.keys, unique)
            self.words[word] = (slots, freq, float(freq.max()) if len(freq) else 0.0,
                                float(self.lengths[slots].min()) if len(slots) else 1.0)
        return self.words[word]

    def idf(self, word: str) -> float:
        n, hits = len(self.keys), len(self.of(word)[0])
        value = math.log((n - hits + 0.5) / (hits + 0.5))
        return value if value > 0 else 1e-6

    def part(self, word: str, slots: np.ndarray) -> np.ndarray:
        """``word``'s part of the score of each row of ``slots`` (0 where it is absent)."""
        rows, freq, _, _ = self.of(word)
        if not len(rows):
            return np.zeros(len(slots))
        at = np.minimum(np.searchsorted(rows, slots), len(rows) - 1)
        hit = rows[at] == slots
        f = np.where(hit, freq[at], 0.0)
        value = self.idf(word) * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * self.lengths[slots] / self.avgdl)))
        return np.where(hit, value, 0.0)

    def bound(self, word: str) -> float:
        """No row scores more than this for ``word`` (its largest frequency in its shortest row)."""
        _, _, f, shortest = self.of(word)
        return self.idf(word) * ((f * (K1 + 1.0)) / (f + K1 * (1 - B + B * shortest / self.avgdl))) * (1 + 1e-9)


def _varint_sum(blob: bytes) -> int:
    total = value = shift = 0
    for byte in blob:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            total, value, shift = total + value, 0, 0
    return total


def top(p: Postings, slots: np.ndarray, scores: np.ndarray, k: int) -> list[int]:
    """The FTS rowids of the ``k`` best, ties newest first (as the store ranks them)."""
    return [int(p.keys[i]) for i in slots[np.lexsort((-p.keys[slots], -scores))[:k]]]


def exhaustive(p: Postings, phrases: list[str], k: int) -> list[int]:
    every = np.unique(np.concatenate([p.of(w)[0] for w in phrases] + [np.empty(0, dtype=np.int64)]))
    scores = np.zeros(len(every))
    for word in phrases:  # phrase order, as FTS5 sums
        scores += p.part(word, every)
    return top(p, every, scores, k)


def maxscore(p: Postings, phrases: list[str], k: int, rare: int) -> tuple[list[int], int, int]:
    """The same top ``k``: (rowids, essential words, rows scored in full)."""
    by_hits = sorted(set(phrases), key=lambda w: len(p.of(w)[0]))
    essential = [w for w in by_hits if 0 < len(p.of(w)[0]) <= rare] or by_hits[:1]
    while True:
        others = [w for w in by_hits if w not in essential]
        rows = np.unique(np.concatenate([p.of(w)[0] for w in essential] + [np.empty(0, dtype=np.int64)]))
        partial = sum((p.part(w, rows) * phrases.count(w) for w in essential), np.zeros(len(rows)))
        tenth = float(np.partition(partial, len(partial) - k)[len(partial) - k]) if len(partial) >= k else 0.0
        rest = sum(p.bound(w) * phrases.count(w) for w in others)
        if rest < tenth or not others:
            break
        essential.append(max(others, key=p.bound))
    rows = rows[partial + rest >= tenth]
    scores = np.zeros(len(rows))
    for word in phrases:
        scores += p.part(word, rows)
    return top(p, rows, scores, k), len(essential), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database")
    parser.add_argument("queries", help="a queries.npz bench/peers.py wrote")
    parser.add_argument("--count", type=int, default=40, help="queries timed (default 40)")
    parser.add_argument("--rare", type=int, default=20_000,
                        help="words in at most this many rows are essential at first")
    args = parser.parse_args()
    with np.load(args.queries) as data:
        texts = [str(t) for t in data["texts"]][: args.count]
    db = sqlite3.connect(f"file:{args.database}?mode=ro", uri=True)
    started = time.perf_counter()
    p = Postings(db)
    print(f"{len(p.keys):,} rows, average length {p.avgdl:.2f} tokens: read in {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {"fts5": [], "exhaustive": [], "maxscore": []}
    same = {"exhaustive": 0, "maxscore": 0}
    for text in texts:
        terms = keyword_terms(text)
        phrases = p.phrases(terms)
        if phrases is None:
            print(f"skipped (a term is not one token): {text!r}")
            continue
        for word in phrases:
            p.of(word)  # (read once, outside the timings)
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        t0 = time.perf_counter()
        reference = [r[0] for r in db.execute(
            f"SELECT rowid, {RANK} AS rank FROM {TABLE} WHERE {TABLE} MATCH ? ORDER BY rank, rowid DESC LIMIT 10",
            [match]).fetchall()]
        t1 = time.perf_counter()
        every = exhaustive(p, phrases, 10)
        t2 = time.perf_counter()
        pruned, essential, scored = maxscore(p, phrases, 10, args.rare)
        t3 = time.perf_counter()
        for name, spent in (("fts5", t1 - t0), ("exhaustive", t2 - t1), ("maxscore", t3 - t2)):
            times[name].append(spent * 1e3)
        same["exhaustive"] += every == reference
        same["maxscore"] += pruned == reference
        print(f"fts5 {1e3 * (t1 - t0):7.1f}  exhaustive {1e3 * (t2 - t1):6.1f}  maxscore {1e3 * (t3 - t2):6.1f} ms "
              f"({essential} of {len(phrases)} words essential, {scored:,} rows scored; same top 10: "
              f"{every == reference}/{pruned == reference})  {text[:48]!r}")
    for name, values in times.items():
        if values:
            agree = f", top 10 as FTS5's: {same[name]}/{len(values)}" if name in same else ""
            print(f"{name}: p50 {np.median(values):.2f} ms, p99 {np.percentile(values, 99):.2f} ms{agree}")


if __name__ == "__main__":
    main()
