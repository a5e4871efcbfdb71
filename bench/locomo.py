"""The LoCoMo data set as the benchmarks read it: where it lives, its JSONL files and dates,
its README's ingest protocol and reference figures, and its scores (R@5, R@10, Hit@5) and
their tables.

The data (CC BY-NC 4.0, Maharana et al., ACL 2024) is read in place; nothing is copied.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from figures import table, three_places

DEFAULT_DATA = Path("/work/shared/data/locomo/dev")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}
# The README's reference rows (other implementations, not the product's modes), by the nearest mode.
README_ROWS = {"keyword": "BM25", "vector": "dense cosine", "hybrid": "reciprocal rank fusion"}

Figures = dict[str, float]  # n, r5, r10, hit5


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moment(date_time: str) -> datetime:
    """LoCoMo's "1:56 pm on 8 May, 2023" as a datetime (the data gives no zone: UTC)."""
    return datetime.strptime(date_time.strip(), "%I:%M %p on %d %B, %Y").replace(tzinfo=UTC)


def rfc3339(date_time: str) -> str:
    """LoCoMo's "1:56 pm on 8 May, 2023" as "2023-05-08T13:56:00.000Z"."""
    return moment(date_time).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def date_words(date_time: str) -> str:
    """'1:56 pm on 8 May, 2023' -> 'Monday 8 May 2023'."""
    at = moment(date_time)
    return f"{at:%A} {at.day} {at:%B %Y}"


def memory_input(m: dict[str, Any], namespace: str, memory_id: str) -> dict[str, Any]:
    """One line of memories.jsonl as an add input, per the README protocol."""
    metadata = m.get("metadata") or {}
    item: dict[str, Any] = {"id": memory_id, "namespace": namespace, "text": m["text"], "metadata": metadata}
    if metadata.get("session") is not None:
        item["session_id"] = f"{namespace}:s{metadata['session']}"
    if metadata.get("date_time"):
        try:
            item["occurred_at"] = rfc3339(metadata["date_time"])
        except ValueError:
            raise SystemExit(f"memory {m['id']}: date_time {metadata['date_time']!r} is not like "
                             "'1:56 pm on 8 May, 2023'") from None
    return item


def reference_figures(data: Path) -> dict[str, tuple[float, float, float]]:
    """R@5, R@10, Hit@5 of the README's reference table (next to or above ``data``)."""
    for readme in (data / "README.md", data.parent / "README.md"):
        if readme.is_file():
            break
    else:
        return {}
    found: dict[str, tuple[float, float, float]] = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4:
            for mode, method in README_ROWS.items():
                if cells[0].startswith(method):
                    with contextlib.suppress(ValueError):
                        found[mode] = (float(cells[1]), float(cells[2]), float(cells[3]))
    return found


def category_name(key: str) -> str:
    return CATEGORIES.get(int(key), f"category {key}") if key.isdigit() else key


# -- scores -------------------------------------------------------------------------------------


def per_query(query: dict[str, Any], ids: list[str]) -> Figures:
    """R@5 and R@10 = |evidence ∩ top k| / |evidence|, and Hit@5 = any evidence in the top 5."""
    evidence = set(query["evidence"])
    found5, found10 = evidence & set(ids[:5]), evidence & set(ids[:10])
    return {"r5": len(found5) / len(evidence), "r10": len(found10) / len(evidence), "hit5": float(bool(found5))}


def mean(rows: list[Figures]) -> Figures:
    n = len(rows)
    return {"n": n, **{k: sum(r[k] for r in rows) / n for k in ("r5", "r10", "hit5")}} if n else {"n": 0}


def summarise(queries: list[dict[str, Any]], scores: list[Figures]) -> dict[str, Any]:
    """Pooled, per category and per conversation (each again per category)."""
    def split(pairs: list[tuple[dict[str, Any], Figures]]) -> dict[str, Any]:
        by_category: dict[str, list[Figures]] = defaultdict(list)
        for q, s in pairs:
            by_category[str(q["category"])].append(s)
        return {"all": mean([s for _, s in pairs]),
                "categories": {c: mean(by_category[c]) for c in sorted(by_category)}}

    pairs = list(zip(queries, scores, strict=True))
    by_conversation: dict[str, list[tuple[dict[str, Any], Figures]]] = defaultdict(list)
    for q, s in pairs:
        by_conversation[q["namespace"]].append((q, s))
    return {**split(pairs), "conversations": {c: split(by_conversation[c]) for c in sorted(by_conversation)}}


# -- their tables -------------------------------------------------------------------------------


def print_recall(figures: dict[str, Any], limit: int) -> None:
    modes = list(figures)
    categories = sorted({c for f in figures.values() for c in f["categories"]}, key=int)
    print(f"\n### Recall, pooled over all queries (limit {limit}; default = search without a mode)\n")
    header = ["mode", "R@5", "R@10", "Hit@5", *(f"{category_name(c)} R@10" for c in categories)]
    rows = []
    for mode in modes:
        f = figures[mode]
        rows.append([mode, three_places(f["all"]["r5"]), three_places(f["all"]["r10"]), three_places(f["all"]["hit5"]),
                     *(three_places(f["categories"].get(c, {}).get("r10")) for c in categories)])
    print(table(header, rows))
    first = figures[modes[0]]
    print("\nqueries: " + ", ".join(f"{category_name(c)} {first['categories'][c]['n']}" for c in categories)
          + f", all {first['all']['n']}")

    print("\n### Per category\n")
    rows = []
    for c in categories:
        for mode in modes:
            f = figures[mode]["categories"].get(c)
            if f:
                rows.append([category_name(c), mode, str(f["n"]),
                             *(three_places(f[k]) for k in ("r5", "r10", "hit5"))])
    print(table(["category", "mode", "n", "R@5", "R@10", "Hit@5"], rows))

    conversations = list(first["conversations"])
    print("\n### Per conversation (each a fold: nothing is tuned, so a fold's held-out figures are its own)\n")
    header = ["conversation", "n", *(f"{m} R@10" for m in modes)]
    lead = modes[0]
    header += [f"{lead} R@5", f"{lead} Hit@5"]
    if "multi-hop" in [category_name(c) for c in categories]:
        header.append(f"{lead} multi-hop R@10")
    rivals = [m for m in ("vector", "keyword") if m in modes and m != lead]
    if rivals:
        header.append(f"{lead} ≥ " + " and ".join(rivals))
    rows = []
    for conv in [*conversations, None]:
        per = {m: (figures[m]["conversations"][conv] if conv else figures[m]) for m in modes}
        row = [conv or "pooled", str(per[lead]["all"]["n"]), *(three_places(per[m]["all"]["r10"]) for m in modes),
               three_places(per[lead]["all"]["r5"]), three_places(per[lead]["all"]["hit5"])]
        if "multi-hop" in [category_name(c) for c in categories]:
            row.append(three_places(per[lead]["categories"].get("1", {}).get("r10")))
        if rivals:
            row.append("yes" if all(per[lead]["all"]["r10"] >= per[m]["all"]["r10"] for m in rivals) else "no")
        rows.append(row)
    print(table(header, rows))
    macro = {m: statistics.fmean(figures[m]["conversations"][c]["all"]["r10"] for c in conversations) for m in modes}
    print("\nmean of the conversations' R@10 (each counts once): "
          + ", ".join(f"{m} {three_places(v)}" for m, v in macro.items()))
