"""greatmemory: a self-hosted long-term memory store for AI agents.

    import gm

    async with gm.open("mem.db") as mem:
        await mem.add("Prefers window seats.", user_id="u1")
        hits = await mem.search("seating preference", user_id="u1", limit=5)
"""

from gm import errors
from gm.memory import HistoryEntry, Memory, Page, SearchHit, Stats
from gm.opening import open
from gm.store import Store

__version__ = "0.1.0"

__all__ = ["HistoryEntry", "Memory", "Page", "SearchHit", "Stats", "Store", "errors", "open", "__version__"]
