"""A reindex (``gmem reindex``, ``POST /v1/admin/reembed`` with no model): every piece of
derived index state rebuilt online, one part after another, each resumable and switched atomically.
"""

from __future__ import annotations

from gm.progress import OnProgress
from gm.reembed import BATCH, ReembedReport
from gm.store import Store

# What a reindex rebuilds, in order, as `gmem reindex --help` names it; `reindex` below runs them.
PARTS = (
    "the vectors and session-context search vectors, made afresh with the current model (with pgvector, "
    "its HNSW index too: the new vectors get one of their own)",
    "the keyword index",
)


async def reindex(store: Store, *, progress: OnProgress | None = None, batch: int = BATCH) -> ReembedReport:
    """Rebuild ``store``'s derived index state while it keeps serving (see PARTS); returns
    the vectors' report. ``progress`` hears each part's phases (see docs/reindex.md)."""
    report = await store.reembed(None, progress=progress, batch=batch)
    await store.backend.rebuild_keyword(progress)
    return report
