"""What the benchmarks print and how: percentiles and quantiles of samples, rounding for JSON,
table cells and markdown tables, the load average, and progress lines (to stderr, so stdout
can stay JSON).
"""

from __future__ import annotations

import math
import os
import sys


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of unsorted ``values``, ``q`` in
    0-100; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def quantile(values: list[float], q: float) -> float:
    """The sorted ``values``' element at rank ``int(q * n)``, ``q`` in 0-1: no interpolation
    (what bench/recall.py's p90/p99 and the retrieval study's query costs have always used)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rounded(value: float, digits: int = 1) -> float | None:
    """``value`` rounded, or None for NaN (no samples): JSON has no NaN."""
    return None if value != value else round(value, digits)


def cell(value: float | None, spec: str) -> str:
    """A table cell: the number formatted by ``spec`` (width first), or '-' right-aligned."""
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(value, spec) if value is not None else "-".rjust(width)


def three_places(value: float | None) -> str:
    """A recall-like figure as the docs' tables print it: ``.457`` below 1, ``1.000``; '-' for none."""
    if value is None:
        return "-"
    return f"{value:.3f}".lstrip("0") if 0 <= value < 1 else f"{value:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, ready for the docs."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
