"""What the in-process vector index needs in memory, and the check at open that refuses a
database whose index would not fit, rather than being killed for memory mid-request.
"""

from __future__ import annotations

from gm.errors import IndexTooLarge
from gm.index import CONNECTIVITY, GRAPH_MIN_ROWS
from gm.memory import now_ms
from gm.storage.reads import Reads


def memory_needed(rows: int, dim: int) -> int:
    """About what an index of ``rows`` vectors of ``dim`` dimensions holds in memory: its int8
    row and the graph's copy of it, the graph's links, the row's scope, expiry and slot entries
    (measured: bench/vector_index.py)."""
    graph = 2 * dim + 2 * CONNECTIVITY * 4 + 64 if rows >= GRAPH_MIN_ROWS else dim
    return rows * (graph + 8 + 1 + 8 + 16 + 4 * 8 + 120)


def available_memory() -> int | None:
    """The memory the machine can give without swapping (Linux's MemAvailable); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def check_fits(reads: Reads) -> None:
    """Raise IndexTooLarge if the index of the database's vectors cannot fit in the memory
    available now (checked where the machine says: Linux)."""
    available = available_memory()
    size = await reads.vector_bytes()
    if available is None or size is None:
        return
    rows = await reads.live_total(now_ms())
    need = memory_needed(rows, size // 4)
    if need > available:  # (gm.open closes the store)
        raise IndexTooLarge(
            f"the vector index of {rows:,} memories needs about {need / 2**30:.1f} GiB of memory and this machine "
            f"has {available / 2**30:.1f} GiB available: free memory, use a larger machine, or put the memories on "
            "Postgres with pgvector (docs/postgres.md)"
        )
