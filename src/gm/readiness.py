"""Readiness: whether a store serves, as ``/v1/readyz`` reports it: the typed Readiness a
store gives, and the probe that asks the database and the Writer when it says ready.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from gm.errors import StorageUnavailable
from gm.memory import now_ms
from gm.storage.base import Backend, CheckWrites

PROBE_SECONDS = 2.0  # readyz's probe write: a load balancer's health check should not wait longer


@dataclass(frozen=True, slots=True)
class Readiness:
    """``phase`` is starting, migrating, ready or unavailable (``reason`` says why; a server
    adds draining); ``index`` the vector index's state (ready, loading or failed: see
    :attr:`gm.indexer.Indexer.state`); ``writes`` the Writer's health, once probed."""

    phase: str
    reason: str | None
    index: str
    backend: str
    schema_version: int
    writes: dict[str, Any] | None = None


async def confirm(readiness: Readiness, backend: Backend) -> Readiness:
    """``readiness``, and when it is ready, whether the database answers and writes commit:
    an instance whose writes all fail or stick leaves the load balancer's rotation, as one
    whose database is unreachable does, and the probe write brings it back once one commits."""
    if readiness.phase != "ready":
        return readiness
    try:
        await backend.check()
    except StorageUnavailable as exc:  # a shared database that stopped answering
        return replace(readiness, phase="unavailable", reason=exc.message)
    writes = await current_write_health(backend, probe=True)
    if writes["status"] != "ok":
        return replace(readiness, phase="unavailable", reason=_writes_reason(writes), writes=writes)
    return replace(readiness, writes=writes)


async def current_write_health(backend: Backend, *, probe: bool = False) -> dict[str, Any]:
    """How writes are going (see :meth:`Backend.write_health`). With ``probe``, while the
    last batch failed, the Writer is first asked to commit a one-row write (waiting at most
    PROBE_SECONDS): health follows the database back once it heals, with no traffic needed
    (an instance that left a load balancer's rotation gets none)."""
    health = backend.write_health()
    if probe and health["status"] == "failing":
        try:
            async with asyncio.timeout(PROBE_SECONDS):  # (wait_for could swallow a cancellation on 3.11)
                await backend.write(CheckWrites(now_ms()))
        except (StorageUnavailable, TimeoutError):
            pass  # counted by the Writer; the answer below says so
        health = backend.write_health()
    return health


def _writes_reason(writes: dict[str, Any]) -> str:
    if writes["status"] == "blocked":
        return (f"a write has waited {writes['oldest_pending_seconds']:.0f}s for the database, over the "
                f"{writes['timeout_seconds']:g}s of GM_WRITE_TIMEOUT_SECONDS")
    return f"writes are failing ({writes['consecutive_failures']} in a row): {writes['last_error']}"
