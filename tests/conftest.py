"""Shared fixtures: a fresh database path and an opened store on it, both in pytest's tmp_path.

Everything is real: a SQLite file, the default embedding model, no mocks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import gm


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mem.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[gm.Store]:
    async with gm.open(db_path) as mem:
        yield mem

