"""The peer benchmark's report (bench/peers.py): one markdown table per size with greatmemory,
Chroma, their ratio and the issue's targets (met or not) beside them, and the JSON figures.

The targets are issue 12's; each applies at the size it names (some at every size) and the
benchmark asserts none of them.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any

from figures import percentile, rounded, table, three_places

MiB = 1024 * 1024
RSS_LIMIT = 1.5e9  # "1.5 GB" at 1M, read strictly: 1,431 MiB
SCOPES = {"whole": "whole namespace", "user": "one user (1%)"}


def latency(result: dict[str, Any], key: str) -> tuple[float, float] | None:
    """(p50, p99) in ms of a figure, None if the system has no such figure."""
    entry = result.get(key)
    if entry is None:
        return None
    return percentile(entry["ms"], 50), percentile(entry["ms"], 99)


def spawn_median(result: dict[str, Any], key: str) -> float | None:
    values = [trial[key] for trial in result.get("spawns", []) if key in trial]
    return statistics.median(values) if values else None


@dataclass
class Row:
    figure: str
    gm: str
    chroma: str = "–"
    ratio: str = "–"
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("met" if self.met else "**not met**")
        return [self.figure, self.gm, self.chroma, self.ratio, self.target or "–", met or "–"]


def _ms(pair: tuple[float, float] | None) -> str:
    return "–" if pair is None else f"{pair[0]:,.2f} / {pair[1]:,.2f} ms"


def _memory(values: dict[str, int]) -> str:
    if "rss" not in values:
        return "–"
    return (f"{values['rss'] / MiB:,.0f} MiB ({values['rss_anon'] / MiB:,.0f} + {values['rss_file'] / MiB:,.0f})")


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _latency_rows(size: int, gm: dict[str, Any], chroma: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for figure, name in (("index", "vector top-10, index time"), ("vector", "vector top-10, end to end"),
                         ("hybrid", "hybrid top-10"), ("keyword", "keyword top-10")):
        for scope, shown in SCOPES.items():
            key = f"{figure}.{scope}"
            mine, theirs = latency(gm, key), latency(chroma, key)
            if mine is None and theirs is None:
                continue
            row = Row(f"{name}, {shown}, p50 / p99", _ms(mine), _ms(theirs))
            if mine and theirs:
                row.ratio = f"{mine[0] / theirs[0]:.2f} / {mine[1] / theirs[1]:.2f}"
            _latency_target(row, size, key, mine, theirs, gm)
            rows.append(row)
            if key in gm and "recall" in gm[key] or key in chroma and "recall" in chroma[key]:
                mine_r, theirs_r = gm.get(key, {}).get("recall"), chroma.get(key, {}).get("recall")
                rows.append(Row("   recall@10 vs exact", three_places(mine_r), three_places(theirs_r).replace("-", "–"),
                                _ratio(mine_r, theirs_r), "≥ .97",
                                None if mine_r is None else mine_r >= 0.97))
    return rows


# At 1M, end to end, (p50 limit in ms or None); every p99 < 3x its p50.
TARGETS_1M = {"vector.whole": 10.0, "vector.user": None, "keyword.whole": 10.0, "keyword.user": 10.0,
              "hybrid.whole": 20.0, "hybrid.user": 10.0}


def _latency_target(row: Row, size: int, key: str, mine: tuple[float, float] | None,
                    theirs: tuple[float, float] | None, gm: dict[str, Any]) -> None:
    if mine is None:
        return
    if size == 100_000 and key == "index.whole" and theirs:
        row.target = "p50 ≤ Chroma's, recall ≥ .97"
        row.met = mine[0] <= theirs[0] and gm[key]["recall"] >= 0.97
    elif size == 100_000 and key == "index.user" and theirs:
        row.target = "p50 ≥ 20× faster than Chroma's"
        row.met = theirs[0] >= 20 * mine[0]
    elif size == 1_000_000 and key in TARGETS_1M:
        limit = TARGETS_1M[key]
        row.target = (f"p50 < {limit:g} ms, " if limit else "") + "p99 < 3× p50"
        row.met = (limit is None or mine[0] < limit) and mine[1] < 3 * mine[0]


def size_table(size: int, result: dict[str, Any]) -> str:
    gm, chroma = result["greatmemory"], result.get("chroma", {})
    rows: list[Row] = []
    if "load_s" in gm:  # (not with --reuse: the stores were loaded by an earlier run)
        rows.append(Row("load: `gmem import` with vectors / Chroma add in batches of "
                        f"{chroma.get('report', {}).get('batch', '-')}",
                        f"{gm['load_s']:,.1f} s ({gm['rate']:,.0f}/s)",
                        f"{chroma['load_s']:,.1f} s ({chroma['rate']:,.0f}/s)" if chroma else "–",
                        _ratio(gm["load_s"], chroma.get("load_s")), "≥ 10,000/s", gm["rate"] >= 10_000))
        rows.append(Row("   peak RSS of the loading process", f"{gm['load_peak'] / MiB:,.0f} MiB",
                        f"{chroma['load_peak'] / MiB:,.0f} MiB" if chroma else "–",
                        _ratio(gm["load_peak"], chroma.get("load_peak"))))
    if "graph_s" in gm:
        rows.append(Row("   then open until its graph is complete, and close (saving the index)",
                        f"{gm['graph_s']:.1f} s, {gm['settle_s']:.1f} s", "–", "–"))
    mine, theirs = spawn_median(gm, "spawn_s"), spawn_median(chroma, "spawn_s")
    spawn = Row("spawn → first answered vector query (median)", f"{mine:.2f} s",
                f"{theirs:.2f} s" if theirs is not None else "–", _ratio(mine, theirs))
    if size in (100_000, 1_000_000) and mine is not None:
        limit = 1.0 if size == 100_000 else 3.0
        spawn.target, spawn.met = f"< {limit:g} s", mine < limit
    rows.append(spawn)
    embedded = spawn_median(gm, "embedded_search_s")
    rows.append(Row("   then the first search embedding its query (model load)",
                    f"{embedded:.2f} s" if embedded is not None else "–"))
    rows += _latency_rows(size, gm, chroma)
    for when, values in (("after the warm-up", lambda r: r.get("warm", {})), ("after the queries", lambda r: r)):
        mine_m, theirs_m = values(gm), values(chroma)
        rows.append(Row(f"RSS {when} (anonymous + file-backed)", _memory(mine_m), _memory(theirs_m),
                        _ratio(mine_m.get("rss"), theirs_m.get("rss"))))
    rss = Row("peak RSS of the querying process", f"{gm['peak'] / MiB:,.0f} MiB",
              f"{chroma['peak'] / MiB:,.0f} MiB" if chroma else "–", _ratio(gm["peak"], chroma.get("peak")))
    if size == 1_000_000:
        rss.target, rss.met = "≤ 1.5 GB (so every RSS too)", gm["peak"] <= RSS_LIMIT
    rows.append(rss)
    def disk(result: dict[str, Any]) -> str:
        after = f"{result['disk_after_load'] / MiB:,.0f}" if "disk_after_load" in result else "–"
        return f"{after} / {result['disk'] / MiB:,.0f} MiB"

    rows.append(Row("disk after the load / at the end", disk(gm), disk(chroma) if chroma else "–",
                    _ratio(gm["disk"], chroma.get("disk"))))
    cpu = result["cpu"]
    title = (f"### {size:,} memories\n\nQuery phase: {cpu['wall_s']:.0f} s; other processes kept "
             f"{cpu['other_cores']:.2f} cores busy meanwhile (the machine's noise).\n")
    return title + "\n" + table(["figure", "greatmemory", "Chroma", "greatmemory / Chroma", "target", "met"],
                                [row.cells() for row in rows]) + "\n"


def header(info: dict[str, Any], measured: int, args: argparse.Namespace) -> str:
    return (f"## greatmemory vs Chroma {info['chromadb']} embedded\n\n"
            f"greatmemory {info['gm']['version']} at {info['gm']['commit']}; model {info['model']}, "
            f"GM_EMBED_THREADS={info['embed_threads']}; {info['machine']}, load average {info['load_average']} "
            f"at the start.\n{args.users} users in one namespace; {measured} queries per figure over "
            f"{args.rounds} interleaved rounds (after {args.warmup} warm-up); {args.spawns} spawn trials a system. "
            "Ratios are greatmemory / Chroma (below 1: greatmemory is smaller or faster).\n")


def for_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every figure with its p50/p99 beside the samples (ms rounded to 3 places)."""
    out: dict[str, Any] = {}
    for size, result in results.items():
        out[size] = {}
        for name, value in result.items():
            if not isinstance(value, dict) or name == "cpu":
                out[size][name] = value
                continue
            system: dict[str, Any] = {}
            for key, figure in value.items():
                if isinstance(figure, dict) and "ms" in figure:
                    p50, p99 = latency(value, key) or (float("nan"),) * 2
                    system[key] = {"p50_ms": rounded(p50, 3), "p99_ms": rounded(p99, 3),
                                   "recall": figure.get("recall"),
                                   "round_p50_ms": [rounded(percentile(r, 50), 3) for r in figure["rounds"]],
                                   "ms": [rounded(m, 3) for m in figure["ms"]]}
                else:
                    system[key] = figure
            out[size][name] = system
    return out
