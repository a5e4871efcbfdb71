"""``gmem list``, ``update``, ``history`` and ``forget`` as a user drives them, on a SQLite file
and against a running ``gmem serve``: paging with cursors, filters and event times, changes
and their history, and a forget that counts, asks, and never deletes unasked or unscoped.

Real parts only: temp SQLite files, the default model, ``gmem serve`` child processes on
127.0.0.1, and a pseudo-terminal for the confirmation.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_server import free_port, spawn_server
from tests.test_cli import Run, gmem, memories

KEY = "admin-key-0123456789abcdef"
TEAM_KEY = "team-key-0123456789abcdef"


def serve(folder: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    process, url = asyncio.run(spawn_server(folder / "serve.log", "--db", str(folder / "served.db"), env=env))
    try:
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (folder / "serve.log").read_text()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve(tmp_path_factory.mktemp("served"))


@pytest.fixture(params=["db", "url"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """Where the commands act: a fresh SQLite file, or the module's server (each test
    uses users of its own there)."""
    if request.param == "db":
        return ["--db", str(tmp_path / "mem.db")]
    return ["--url", request.getfixturevalue("server")]


def gmem_child(*argv: str, stdin: int | None = subprocess.DEVNULL) -> Run:
    """``gmem ARGV`` as a child process whose standard input is not a terminal."""
    done = subprocess.run([sys.executable, "-m", "gm", *argv], stdin=stdin, capture_output=True, text=True,
                          timeout=120)
    return Run(done.returncode, done.stdout, done.stderr)


def add(capsys: pytest.CaptureFixture[str], target: list[str], text: str, *options: str) -> str:
    added = gmem(capsys, "add", *target, "--json", *options, text)
    assert added.code == 0, added.err
    return str(added.json["id"])


# -- list ---------------------------------------------------------------------------------------


def test_list_pages_through_a_scope(target: list[str], capsys: pytest.CaptureFixture[str],
                                    request: pytest.FixtureRequest) -> None:
    user = f"lister-{request.node.callspec.id}"
    ids = [add(capsys, target, f"Fact number {n}.", "--user-id", user, "--metadata", f'{{"n": {n}}}',
               "--occurred-at", f"202{n}-01-01T00:00:00Z") for n in range(5)]
    add(capsys, target, "Someone else's fact.", "--user-id", f"{user}-other")

    page = gmem(capsys, "list", *target, "--user-id", user, "--json")
    assert page.code == 0, page.err
    assert set(page.json) == {"memories", "next_cursor"} and page.json["next_cursor"] is None
    assert [m["id"] for m in page.json["memories"]] == ids[::-1]  # newest added first

    text = gmem(capsys, "list", *target, "--user-id", user).out.splitlines()
    assert text[0].split() == ["ID", "CREATED", "USER", "TEXT"]
    assert text[1].startswith(ids[4]) and text[1].endswith(f"  {user}  Fact number 4.")
    assert len(text) == 6

    # Pages of two follow each other by cursor without a repeat or a gap, in both orders.
    for order, expected in (("created_at", ids[::-1]), ("occurred_at", ids[::-1])):
        seen: list[str] = []
        cursor: list[str] = []
        while True:
            result = gmem(capsys, "list", *target, "--user-id", user, "--limit", "2", "--order-by", order, *cursor)
            assert result.code == 0, result.err
            lines = result.out.splitlines()
            seen += [line.split()[0] for line in lines[1:] if not line.startswith("next page:")]
            if not lines[-1].startswith("next page: --cursor "):
                break
            cursor = ["--cursor", lines[-1].split()[-1]]
        assert seen == expected, order
    occurred = gmem(capsys, "list", *target, "--user-id", user, "--order-by", "occurred_at").out.splitlines()
    assert occurred[0].split()[1] == "OCCURRED" and "2024-01-01 00:00:00" in occurred[1]

    def listed(*options: str) -> list[str]:
        result = gmem(capsys, "list", *target, "--user-id", user, "--json", *options)
        assert result.code == 0, result.err
        return [m["text"] for m in result.json["memories"]]

    assert listed("--filter", '{"n": {"$gte": 3}}') == ["Fact number 4.", "Fact number 3."]
    assert listed("--occurred-after", "2021-01-01T00:00:00Z", "--occurred-before", "2023-01-01T00:00:00Z") == [
        "Fact number 2.", "Fact number 1."]
    assert gmem(capsys, "list", *target, "--user-id", "nobody-here").out == "no memories\n"

    for options, named in ((["--limit", "0"], "limit"), (["--filter", "{oops"], "--filter"),
                           (["--filter", '{"n": {"$near": 1}}'], "$near"),
                           (["--occurred-after", "yesterday"], "occurred_after")):
        bad = gmem(capsys, "list", *target, "--user-id", user, *options)
        assert bad.code == 2 and named in bad.error_line, (options, bad.err)
    two = gmem(capsys, "list", *target, "--user-id", user, "--limit", "2", "--json").json
    crossed = gmem(capsys, "list", *target, "--user-id", user, "--order-by", "occurred_at",
                   "--cursor", two["next_cursor"])
    assert crossed.code == 2 and "cursor" in crossed.error_line


# -- update and history ---------------------------------------------------------------------------


def test_update_then_history(target: list[str], capsys: pytest.CaptureFixture[str],
                             request: pytest.FixtureRequest) -> None:
    user = f"updater-{request.node.callspec.id}"
    memory_id = add(capsys, target, "Prefers window seats.", "--user-id", user, "--metadata", '{"topic": "travel"}')

    changed = gmem(capsys, "update", *target, memory_id, "--metadata", '{"topic": "travel", "confirmed": true}')
    assert (changed.code, changed.out) == (0, f"updated {memory_id}\n"), changed.err
    changed = gmem(capsys, "update", *target, "--json", memory_id, "--text", "Prefers aisle seats now.",
                   "--expires-at", "2999-01-01T00:00:00Z", "--occurred-at", "2024-03-15T09:30:00+01:00")
    assert changed.code == 0, changed.err
    memory = changed.json
    assert (memory["text"], memory["metadata"]) == ("Prefers aisle seats now.", {"topic": "travel", "confirmed": True})
    assert (memory["expires_at"], memory["occurred_at"]) == ("2999-01-01T00:00:00.000Z", "2024-03-15T08:30:00.000Z")
    assert gmem(capsys, "update", *target, "--json", memory_id, "--no-expiry").json["expires_at"] is None
    found = gmem(capsys, "search", *target, "--json", "--user-id", user, "--mode", "keyword", "aisle").json
    assert [h["memory"]["id"] for h in found["hits"]] == [memory_id]  # the new text is what is searched

    nothing = gmem(capsys, "update", *target, memory_id)
    assert nothing.code == 2 and "give at least one of --text, --metadata" in nothing.error_line
    both = gmem(capsys, "update", *target, memory_id, "--no-expiry", "--expires-at", "2999-01-01T00:00:00Z")
    assert both.code == 2 and "not allowed with" in both.err
    for options, named in ((["--metadata", "[1]"], "metadata"), (["--text", " "], "text"),
                           (["--expires-at", "2001-01-01T00:00:00Z"], "expires_at"),
                           (["--occurred-at", "last june"], "occurred_at")):
        bad = gmem(capsys, "update", *target, memory_id, *options)
        assert bad.code == 2 and named in bad.error_line, (options, bad.err)
    assert gmem(capsys, "update", *target, "no-such-memory", "--text", "x").code == 8
    assert gmem(capsys, "update", *target, "not/an/id", "--text", "x").code == 2

    assert gmem(capsys, "delete", *target, memory_id).code == 0
    history = gmem(capsys, "history", *target, "--json", memory_id)
    assert history.code == 0, history.err
    entries = history.json["history"]
    assert [e["op"] for e in entries] == ["add", "update", "update", "update", "delete"]
    assert entries[0]["text"] == "Prefers window seats." and entries[1]["metadata"]["confirmed"] is True
    assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    lines = gmem(capsys, "history", *target, memory_id).out.splitlines()
    assert lines[0].endswith('  add     Prefers window seats.  {"topic":"travel"}')
    assert lines[2].endswith('  update  Prefers aisle seats now.  {"topic":"travel","confirmed":true}')
    assert lines[-1] == f"{entries[-1]['at']}  delete"
    missing = gmem(capsys, "history", *target, "never-was")
    assert missing.code == 8 and "no memory with id 'never-was'" in missing.error_line


# -- forget ---------------------------------------------------------------------------------------


def seed_three(capsys: pytest.CaptureFixture[str], target: list[str], user: str) -> dict[str, str]:
    return {
        "travel": add(capsys, target, "Prefers window seats.", "--user-id", user, "--metadata", '{"topic": "travel"}'),
        "health": add(capsys, target, "Allergic to peanuts.", "--user-id", user, "--metadata", '{"topic": "health"}'),
        "other": add(capsys, target, "Likes trains.", "--user-id", f"{user}-other", "--metadata",
                     '{"topic": "travel"}'),
    }


def listed_ids(capsys: pytest.CaptureFixture[str], target: list[str], *scope: str) -> set[str]:
    result = gmem(capsys, "list", *target, "--json", *scope)
    assert result.code == 0, result.err
    return {m["id"] for m in result.json["memories"]}


def test_forget_counts_then_deletes_only_its_scope(target: list[str], capsys: pytest.CaptureFixture[str],
                                                  request: pytest.FixtureRequest) -> None:
    user = f"forgetter-{request.node.callspec.id}"
    ids = seed_three(capsys, target, user)
    travel = ["--user-id", user, "--filter", '{"topic": "travel"}']

    dry = gmem(capsys, "forget", *target, *travel, "--dry-run")
    assert dry.code == 0, dry.err
    assert dry.out == (f'1 memory matches namespace=default, user_id={user}, filter {{"topic":"travel"}}; '
                       "nothing deleted (--dry-run)\n")
    # No terminal to ask on and no --yes: refused with the count, nothing deleted.
    unasked = gmem_child("forget", *target, *travel)
    assert unasked.code == 2, unasked.err
    assert "1 memory matches" in unasked.error_line and "add --yes" in unasked.error_line
    assert listed_ids(capsys, target, "--user-id", user) == {ids["travel"], ids["health"]}

    done = gmem(capsys, "forget", *target, *travel, "--yes", "--json")
    assert done.code == 0 and done.json == {"matched": 1, "deleted": 1}, done.err
    assert listed_ids(capsys, target, "--user-id", user) == {ids["health"]}
    assert listed_ids(capsys, target, "--user-id", f"{user}-other") == {ids["other"]}  # same topic, other user
    again = gmem(capsys, "forget", *target, *travel)  # nothing matches: nothing to confirm
    assert (again.code, again.out) == (0, f'0 memories match user_id={user}, filter {{"topic":"travel"}}\n')

    text = gmem(capsys, "forget", *target, "--user-id", user, "--yes")
    assert (text.code, text.out) == (0, "forgot 1 memory\n"), text.err
    assert listed_ids(capsys, target, "--user-id", user) == set()


def test_forget_refuses_without_a_scope(target: list[str], capsys: pytest.CaptureFixture[str],
                                        request: pytest.FixtureRequest) -> None:
    """A forget with no user, agent or session would empty a whole namespace: only with that
    namespace named. Another namespace is untouched by it."""
    namespace = f"wipe-{request.node.callspec.id}"
    kept = add(capsys, target, "Stays in the default namespace.", "--user-id", f"keeper-{namespace}")
    for n in range(3):
        add(capsys, target, f"Scratch note {n}.", "--namespace", namespace)
    for argv in (["--yes"], ["--filter", '{"topic": "travel"}', "--yes"], ["--dry-run"]):
        refused = gmem(capsys, "forget", *target, *argv)
        assert refused.code == 2, (argv, refused.err)
        assert "forget needs a scope" in refused.error_line and "--namespace NAME" in refused.error_line
    assert len(listed_ids(capsys, target, "--namespace", namespace)) == 3
    wiped = gmem(capsys, "forget", *target, "--namespace", namespace, "--yes", "--json")
    assert wiped.json == {"matched": 3, "deleted": 3}, wiped.err
    assert listed_ids(capsys, target, "--namespace", namespace) == set()
    assert kept in listed_ids(capsys, target, "--user-id", f"keeper-{namespace}")


def answer_on_a_terminal(argv: list[str], answer: bytes) -> tuple[int, str]:
    """``gmem ARGV`` with a pseudo-terminal as standard input and error; types ``answer`` once
    it asks. Returns the exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "gm", *argv], stdin=follower, stderr=follower,
                               stdout=subprocess.PIPE)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    while b"[y/N]" not in shown and process.poll() is None and time.monotonic() < deadline:
        shown += os.read(leader, 1024)
    os.write(leader, answer)
    code = process.wait(60)
    try:
        while chunk := os.read(leader, 1024):
            shown += chunk
    except OSError:  # the other side closed: everything was read
        pass
    os.close(leader)
    assert process.stdout is not None
    process.stdout.close()
    return code, shown.decode()


def test_forget_asks_on_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "mem.db"
    ids = seed_three(capsys, ["--db", str(db)], "asked")
    argv = ["forget", "--db", str(db), "--user-id", "asked"]
    code, shown = answer_on_a_terminal(argv, b"n\n")
    assert code == 1, shown
    assert "2 memories match namespace=default, user_id=asked. Forget them? [y/N]" in shown
    assert "gmem: not confirmed; nothing was forgotten" in shown
    assert len(memories(db)) == 3
    code, shown = answer_on_a_terminal(argv, b"yes\n")
    assert code == 0, shown
    assert [row[0] for row in memories(db)] == [ids["other"]]


def test_forget_with_keys_stays_in_the_keys_namespace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A namespace-bound key forgets in its namespace without naming it; an unbound key with
    no --namespace forgets in the default one, as the library does."""
    for url in serve(tmp_path, {"GM_API_KEYS": f"{KEY},{TEAM_KEY}@team"}):
        admin, team = ["--url", url, "--api-key", KEY], ["--url", url, "--api-key", TEAM_KEY]
        in_team = add(capsys, team, "Team memory.", "--user-id", "u1")
        in_default = add(capsys, admin, "Default memory.", "--user-id", "u1")
        done = gmem(capsys, "forget", *team, "--user-id", "u1", "--yes")
        assert (done.code, done.out) == (0, "forgot 1 memory\n"), done.err
        assert listed_ids(capsys, admin, "--user-id", "u1") == {in_default}
        assert gmem(capsys, "get", *admin, in_team).code == 8
        other = gmem(capsys, "forget", *team, "--namespace", "default", "--user-id", "u1", "--yes")
        assert other.code == 1 and "may only be used on namespace 'team'" in other.error_line
        done = gmem(capsys, "forget", *admin, "--user-id", "u1", "--yes", "--json")
        assert done.json == {"matched": 1, "deleted": 1}
        nokey = gmem(capsys, "forget", "--url", url, "--user-id", "u1", "--yes")
        assert nokey.code == 1 and "a valid API key is required" in nokey.error_line


def test_each_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("list", "update", "history", "forget"):
        result = gmem(capsys, command, "--help")
        assert result.code == 0 and f"Example:\n  gmem {command} " in result.out, command


def test_unreachable_server_and_missing_database_exit_9(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    commands = (["list"], ["update", "some-id", "--text", "x"], ["history", "some-id"],
                ["forget", "--user-id", "u1", "--yes"])
    for argv in commands:
        result = gmem(capsys, *argv[:1], "--url", url, *argv[1:])
        assert result.code == 9 and f"no greatmemory server answered at {url}" in result.error_line, argv
        result = gmem(capsys, *argv[:1], "--db", str(tmp_path / "typo.db"), *argv[1:])
        assert result.code == 9 and "there is no database" in result.error_line, argv
    assert not (tmp_path / "typo.db").exists()  # a typo does not create a database


def test_a_json_flag_of_null_is_refused_not_taken_for_none(target: list[str], capsys: pytest.CaptureFixture[str],
                                                          request: pytest.FixtureRequest) -> None:
    # `--filter null` must not widen a forget to the whole scope, nor `--metadata null` be dropped.
    user = f"nuller-{request.node.callspec.id}"
    memory_id = add(capsys, target, "Prefers tea.", "--user-id", user)
    for args in (("forget", *target, "--user-id", user, "--filter", "null", "--yes"),
                 ("update", memory_id, *target, "--text", "Prefers green tea.", "--metadata", "null")):
        done = gmem(capsys, *args)
        assert done.code == 2 and "must be a JSON object, not null" in done.err, done
    listed = gmem(capsys, "list", *target, "--user-id", user, "--json")
    assert [m["text"] for m in listed.json["memories"]] == ["Prefers tea."]
