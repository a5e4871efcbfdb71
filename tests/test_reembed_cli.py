"""``gmem reembed`` and ``gmem reindex`` on a database file and through a running server:
progress on stderr, the summary or JSON, --cancel and --drop-old, a re-embed resumed, the
refusal of a file a server holds (naming --url), exit 10 while one runs, and ``gmem status``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from pathlib import Path

import pytest

import gm
from gm.cli.reembed import REPORT_SECONDS, ProgressLine
from gm.embedding import ModelSpec
from gm.reembed import Progress
from gm.storage.base import BeginReembed, StoreNextVectors
from tests.conftest import WriteGate
from tests.http_server import start_server, store_factory
from tests.test_cli import Run, gmem

pytestmark = pytest.mark.timeout(120)


def seed(db: Path | str, count: int) -> None:
    async def run() -> None:
        async with gm.open(db) as mem:
            await mem.add_many([{"text": f"note {i}: the {['cat', 'owl', 'fox'][i % 3]} sleeps", "user_id": "u1",
                                 "session_id": f"s{i % 4}"} for i in range(count)])

    asyncio.run(run())


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("GM_")]:
        monkeypatch.delenv(name)


def test_reembed_a_file_with_progress_then_drop_the_old_vectors(
    tmp_path: Path, wide_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    clean_env: None,
) -> None:
    db = tmp_path / "mem.db"
    seed(db, 50)
    result = gmem(capsys, "reembed", "--db", db, "--model-dir", wide_model_dir, "--batch", "8")
    assert result.code == 0, result.err
    progress = result.err.splitlines()
    assert progress[0] == "embedding: 0 / 50 memories (0%)", result.err
    assert progress[-1].startswith("switched: 50 / 50 memories (100%)"), result.err
    wide = ModelSpec.from_dir(wide_model_dir)
    assert result.out.startswith("re-embedded 50 of 50 memories in ")
    assert f"the vectors are model {wide.identity} now" in result.out
    assert f"GM_MODEL_DIR={wide_model_dir}" in result.out and "gmem reembed --drop-old" in result.out

    # The database is the new model's now: opened with the old one, the line names the way.
    refused = gmem(capsys, "reembed", "--db", db, "--drop-old")
    assert refused.code == 5 and "GM_MODEL_DIR" in refused.error_line
    monkeypatch.setenv("GM_MODEL_DIR", str(wide_model_dir))
    status = gmem(capsys, "status", "--db", db)
    assert "old vectors: " in status.out and "`gmem reembed --drop-old` drops them" in status.out
    assert gmem(capsys, "status", "--db", db, "--json").json["reembed"] is None
    same = gmem(capsys, "reembed", "--db", db, "--model-dir", wide_model_dir)
    assert same.code == 2 and "gmem reindex" in same.error_line
    dropped = gmem(capsys, "reembed", "--db", db, "--drop-old", "--json")
    assert dropped.code == 0 and dropped.json == {"database": str(db), "done": True}
    again = gmem(capsys, "reembed", "--db", db, "--drop-old")
    assert (again.code, again.out.strip()) == (0, "no old vectors to drop")
    assert gmem(capsys, "status", "--db", db, "--json").json["old_vectors"] is None

    # A reindex with the new model: --json is the report.
    reindexed = gmem(capsys, "reindex", "--db", db, "--json", "--batch", "16")
    assert reindexed.code == 0, reindexed.err
    report = reindexed.json
    assert set(report) == {"database", "model", "embedded", "total", "seconds", "rate", "resumed"}
    assert (report["model"], report["embedded"], report["total"], report["resumed"]) == (
        f"{wide.identity}~2", 50, 50, False)
    assert "switched: 50 / 50" in reindexed.err
    assert reindexed.err.splitlines()[-1].startswith("keyword index: 50 / 50 memories (100%)"), reindexed.err


def test_a_reembed_under_way_shows_in_status_can_be_resumed_or_cancelled(
    target: str, wide_model_dir: Path, capsys: pytest.CaptureFixture[str], clean_env: None,
) -> None:
    db = target  # a SQLite file, or a Postgres database (with pgvector, or not)
    seed(db, 20)
    wide = ModelSpec.from_dir(wide_model_dir)

    def begin() -> None:  # as a run killed after its first step leaves it
        async def run() -> None:
            async with gm.open(db) as mem:
                await mem.backend.write(BeginReembed(wide.identity + "~1", wide.label, str(wide_model_dir), 768))

        asyncio.run(run())

    begin()
    status = gmem(capsys, "status", "--db", db)
    assert f"re-embed under way: to model {wide.label}, 0 of 20 memories have its vector (0%)" in status.out
    assert f"`gmem reembed --model-dir {wide_model_dir}` resumes it" in status.out
    under_way = gmem(capsys, "status", "--db", db, "--json").json["reembed"]
    assert (under_way["model"], under_way["done"], under_way["total"]) == (wide.identity + "~1", 0, 20)
    cancelled = gmem(capsys, "reembed", "--db", db, "--cancel")
    assert cancelled.code == 0 and cancelled.out.startswith("cancelled the re-embed under way")
    assert gmem(capsys, "status", "--db", db, "--json").json["reembed"] is None
    nothing = gmem(capsys, "reembed", "--db", db, "--cancel", "--json")
    assert nothing.json == {"database": str(db), "done": False}

    begin()
    resumed = gmem(capsys, "reembed", "--db", db, "--model-dir", wide_model_dir, "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json["resumed"] is True and resumed.json["model_dir"] == str(wide_model_dir)


def test_bad_arguments_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: None) -> None:
    db = tmp_path / "mem.db"
    seed(db, 2)
    for argv, code, words in (
        (["reembed", "--db", db], 2, "one of the arguments --model-dir --cancel --drop-old is required"),
        (["reembed", "--db", db, "--cancel", "--drop-old"], 2, "not allowed with argument"),
        (["reembed", "--db", db, "--model-dir", tmp_path], 5, "is not a model's folder"),
        (["reindex", "--db", db, "--batch", "0"], 2, "batch must be an integer from 1 to 1000"),
        (["reindex", "--db", tmp_path / "none.db"], 9, "there is no database"),
    ):
        result = gmem(capsys, *argv)
        assert result.code == code, (argv, result)
        assert words in result.err.splitlines()[-1], (argv, result.err)


async def gmem_child(*argv: str | Path) -> Run:
    """``python -m gm ARGV`` as a child process, awaited (the test's loop serves meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GM_")}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gm", *map(str, argv), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**env, "GM_EMBED_THREADS": "1"},
    )
    async with asyncio.timeout(90):
        out, err = await child.communicate()
    assert child.returncode is not None
    return Run(child.returncode, out.decode(), err.decode())


async def test_through_a_server(tmp_path: Path, wide_model_dir: Path) -> None:
    db = tmp_path / "served.db"
    server = await start_server(store_factory(db))
    try:
        await server.state.store.add_many([{"text": f"served note {i}", "session_id": "s"} for i in range(40)])
        wide = ModelSpec.from_dir(wide_model_dir)

        # The file is the server's: the line says to go through it.
        locked = await gmem_child("reembed", "--db", db, "--model-dir", wide_model_dir)
        assert locked.code == 6, locked
        assert "--url" in locked.error_line and "in use by process" in locked.error_line

        done = await gmem_child("reembed", "--url", server.url, "--model-dir", wide_model_dir, "--batch", "8")
        assert done.code == 0, done.err
        assert done.err.splitlines()[-1].startswith("switched: 40 / 40 memories (100%)"), done.err
        assert done.out.startswith("re-embedded 40 of 40 memories") and "the server uses it now" in done.out
        assert (await server.state.store.stats()).model == wide.identity

        # A reindex held part-way: status shows it running, a second one exits 10.
        gate = WriteGate(server.state.store.backend, StoreNextVectors)
        reindexing = asyncio.ensure_future(gmem_child("reindex", "--url", server.url, "--json"))
        async with asyncio.timeout(60):
            await gate.reached.wait()
        status = await gmem_child("status", "--url", server.url)
        assert f"re-embed under way: to model {wide.label}, 0 of 40 memories have its vector" in status.out
        assert "running on this server: embedding" in status.out, status.out
        busy = await gmem_child("reindex", "--url", server.url)
        assert busy.code == 10 and "is running on this server" in busy.error_line
        gate.released.set()
        finished = await reindexing
        assert finished.code == 0, finished.err
        assert json.loads(finished.out)["model"] == wide.identity + "~2"

        dropped = await gmem_child("reembed", "--url", server.url, "--drop-old", "--json")
        assert json.loads(dropped.out) == {"server": server.url, "done": True}
        nothing = await gmem_child("reembed", "--url", server.url, "--cancel")
        assert (nothing.code, nothing.out.strip()) == (0, "no re-embed under way: nothing to cancel")
    finally:
        await server.stop()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_line_every_two_seconds_off_a_terminal_and_redrawn_on_one() -> None:
    now = [0.0]
    log = io.StringIO()
    line = ProgressLine(log, clock=lambda: now[0])
    for step in range(0, 101):
        now[0] = step * 0.1  # 10 seconds in all
        line(Progress("embedding", step * 10, 1000, 100.0, (1000 - step * 10) / 100))
    line(Progress("switched", 1000, 1000, 100.0, 0.0))
    line.finish()
    lines = log.getvalue().splitlines()
    assert lines[0] == "embedding: 0 / 1,000 memories (0%), 100/s, ETA 10s"
    assert len(lines) == 10 / REPORT_SECONDS + 2, lines  # the first, one every 2 s, and the switch
    assert lines[-1] == "switched: 1,000 / 1,000 memories (100%), 100/s"

    screen = Terminal()
    drawn = ProgressLine(screen, clock=lambda: now[0])
    for done in (0, 500, 1000):
        now[0] += 1
        drawn(Progress("embedding", done, 1000, 250.0, (1000 - done) / 250))
    drawn.finish()
    assert screen.getvalue() == ("\r\x1b[Kembedding: 0 / 1,000 memories (0%), 250/s, ETA 4s"
                                 "\r\x1b[Kembedding: 500 / 1,000 memories (50%), 250/s, ETA 2s"
                                 "\r\x1b[Kembedding: 1,000 / 1,000 memories (100%), 250/s\n")
