"""A reindex (``gmem reindex``, ``POST /v1/admin/reembed`` with no model): every piece of
derived index state rebuilt online, one part after another, each resumable and switched atomically.
"""

from __future__ import annotations

from gm.reembed import BATCH, ProgressSink, ReembedReport
from gm.store import Store

# What a reindex rebuilds, in order, as `gmem reindex --help` names it.
# TODO(keyword index): `Backend.rebuild_keyword(progress)` is being built; once it lands it is
# the second part here, awaited in `reindex` below after the vectors, and named in PARTS.
PARTS = ("the vectors and session-context search vectors (with the current model)",)


async def reindex(store: Store, *, progress: ProgressSink | None = None, batch: int = BATCH) -> ReembedReport:
    """Rebuild ``store``'s derived index state while it keeps serving (see PARTS); returns
    the vectors' report. ``progress`` hears each part's phases."""
    return await store.reembed(None, progress=progress, batch=batch)
