"""schemathesis over ``/v1/openapi.json`` against a real ``gmem serve``, with and without API
keys: generated requests, valid and not, never get a 5xx, and every answer conforms to the
document (status, content type, headers, body), so the document is as strict as the server.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import schemathesis
from hypothesis import strategies as st

from gm.http.openapi import openapi_document
from tests.http_server import spawn_server

KEY = "conformance-key-0123456789abcdef"
# Examples per operation and phase: 13 operations x 2 servers stay under a minute on 2 cores.
MAX_EXAMPLES = 10

# A valid expires_at is one JSON Schema cannot state: a time in the future (and before 10000).
# Valid requests are generated with such times; invalid ones still get arbitrary strings.
schemathesis.openapi.format(
    "date-time",
    st.builds(
        lambda days, offset: (datetime.now(UTC) + timedelta(days=days)).astimezone(offset).isoformat(),
        st.integers(1, 2_900_000),
        st.sampled_from([UTC, *(timezone(timedelta(hours=h)) for h in (-11, -5, 2, 14))]),
    ),
)


def served(directory: Path, keys: str | None) -> Iterator[str]:
    """`gmem serve` on a fresh SQLite file, as the documents' users run it."""
    env = {"GM_API_KEYS": keys} if keys else {}
    process, url = asyncio.run(spawn_server(directory / "serve.log", "--db", str(directory / "mem.db"), env=env))
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served(tmp_path_factory.mktemp("open"), None)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from served(tmp_path_factory.mktemp("keyed"), f"{KEY}, other-key-0123456789abcdef@team")


def loaded(document: dict) -> schemathesis.BaseSchema:
    """The document as each server serves it (test_http checks they are equal), loaded at
    collection so that each operation is a test of its own."""
    config = schemathesis.Config.from_dict(
        {
            "suppress-health-check": ["all"],
            "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
            # The coverage phase's cases for a recursive filter in the query string take minutes to
            # build; the list route's filter is fuzzed all the same, and search's body filter is covered.
            "operations": [{"include-name": "GET /v1/memories", "phases": {"coverage": {"enabled": False}}}],
        }
    )
    return schemathesis.openapi.from_dict(document, config=config)


open_schema = loaded(openapi_document(keys=False))
keyed_schema = loaded(openapi_document(keys=True))


@pytest.mark.timeout(120)
@open_schema.parametrize()
def test_without_keys(case: schemathesis.Case, open_server: str) -> None:
    case.call_and_validate(base_url=open_server, timeout=30)


@pytest.mark.timeout(120)
@keyed_schema.parametrize()
def test_with_keys(case: schemathesis.Case, keyed_server: str) -> None:
    case.call_and_validate(base_url=keyed_server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
