"""The code stays clean: ruff over the sources, tests and benchmarks, and mypy --strict
over src/gm (its settings live in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


def test_ruff() -> None:
    run("ruff", "check", *[d for d in ("src", "tests", "bench") if (ROOT / d).is_dir()])


def test_mypy() -> None:
    run("mypy")
