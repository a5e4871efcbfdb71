"""greatmemory: a self-hosted long-term memory store for AI agents.

    import gm

    async with gm.open("mem.db") as mem:
        await mem.add("Prefers window seats.", user_id="u1")
        hits = await mem.search("seating preference", user_id="u1", limit=5)

A running server (``gmem serve``) is used the same way: ``async with gm.connect(url) as mem:``,
or blocking, ``with gm.connect_sync(url) as mem:``.
"""

from gm import errors
from gm.memory import HistoryEntry, Memory, Page, SearchHit, Stats
from gm.opening import open
from gm.progress import Progress
from gm.reembed import ReembedReport
from gm.remote import RemoteStore, connect
from gm.store import Store
from gm.sync import SyncRemoteStore, connect_sync

__version__ = "0.1.0"

__all__ = [
    "HistoryEntry", "Memory", "Page", "Progress", "ReembedReport", "RemoteStore", "SearchHit", "Stats", "Store",
    "SyncRemoteStore", "connect", "connect_sync", "errors", "open", "__version__",
]
