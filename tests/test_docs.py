"""The docs stay true: the CLI reference's examples run, every GM_* variable the code
reads is documented, the API reference names every route, README's install and test
commands are the ones CI runs, and the site builds."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gm.cli import main
from gm.http.app import ROUTES
from tests.http_server import spawn_server

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def cli_examples() -> list[str]:
    """Every ``$ gmem ...`` line of docs/cli.md's console blocks, in order."""
    text = (DOCS / "cli.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", text, flags=re.S)
    return [line[2:] for block in blocks for line in block.splitlines() if line.startswith("$ gmem ")]


def shell_argv(lines: list[str], env: dict[str, str]) -> list[list[str]]:
    """The argument lists bash gives ``gmem`` for each line (its quoting and ``$GM_URL``), read
    from one bash that runs every line with ``gmem`` defined to print its arguments."""
    script = "gmem() { printf '%s\\0' \"$@\"; printf '\\1\\0'; }\n" + "\n".join(lines)
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    argvs: list[list[str]] = [[]]
    for arg in done.stdout.split("\0")[:-1]:
        if arg == "\1":
            argvs.append([])
        else:
            argvs[-1].append(arg)
    assert argvs.pop() == [] and len(argvs) == len(lines), argvs
    return argvs


def test_cli_reference_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each example, parsed by bash, runs through ``gm.cli.main`` in this process (as test_cli's
    commands do; test_cli.test_version runs the installed ``gmem`` script): 34 child processes,
    each importing greatmemory and loading the model, took 19-35 s of the suite."""
    examples = cli_examples()
    assert len(examples) >= 15
    commands = {line.split()[1] for line in examples}
    assert commands >= {
        "serve",
        "add",
        "search",
        "get",
        "delete",
        "status",
        "backup",
        "restore",
        "export",
        "import",
        "keys",
        "version",
    }
    process, url = asyncio.run(spawn_server(tmp_path / "serve.log", "--db", str(tmp_path / "server.db")))
    try:
        monkeypatch.setenv("GM_URL", url)
        monkeypatch.chdir(tmp_path)
        for line, argv in zip(examples, shell_argv(examples, dict(os.environ)), strict=True):
            capsys.readouterr()
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's --help
                code = exc.code if isinstance(exc.code, int) else 1
            out, err = capsys.readouterr()
            assert code == 0, f"{line}\n{out}\n{err}"
            assert out.strip(), line
    finally:
        process.terminate()
        process.wait(30)


def test_every_environment_variable_is_documented() -> None:
    used = set()
    for path in (ROOT / "src").rglob("*.py"):
        used |= set(re.findall(r"GM_[A-Z_]+", path.read_text()))
    documented = set(re.findall(r"`(GM_[A-Z_]+)`", (DOCS / "configuration.md").read_text()))
    assert used <= documented, f"undocumented: {sorted(used - documented)}"


def test_api_reference_names_every_route() -> None:
    text = (DOCS / "api.md").read_text()
    for method, path, _ in ROUTES:
        assert f"`{method} {path}`" in text, f"{method} {path} missing from docs/api.md"


def sh_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_readme_serves_without_test_extras_and_ci_runs_its_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    serve, test = sh_blocks(readme.split("## Two commands", 1)[1].split("\n## ", 1)[0])
    assert ".venv/bin/pip install -e . " in serve and "[test]" not in serve, serve
    assert serve.endswith(".venv/bin/gmem serve"), serve
    assert test.startswith(".venv/bin/pip install -e '.[test]' && "), test
    assert test.endswith(".venv/bin/python -m pytest"), test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines(), ".ci/run must run README's test command"
    assert sh_blocks((DOCS / "index.md").read_text())[:2] == [serve, test], "docs/index.md's quickstart drifted"


def test_site_builds(tmp_path: Path) -> None:
    mkdocs = pytest.importorskip("mkdocs", reason="install the test extras: pip install -e '.[test]'")
    assert mkdocs
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "cli" / "index.html").exists()
