"""The Docker image's own commands, run here as the image runs them (no Docker daemon is
needed): docker/Dockerfile's CMD serves where GM_HOST and GM_PORT say and its HEALTHCHECK
asks there, healthy only while that server is ready.

The image itself is not built: what this cannot see is the base image, the COPY of the
source and ``pip install .`` inside it (tests/test_install.py installs the same wheel).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.http_server import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Dockerfile:
    workdir: PurePosixPath = PurePosixPath("/")
    env: dict[str, str] = field(default_factory=dict)
    copied: dict[PurePosixPath, Path] = field(default_factory=dict)  # image path -> file in the checkout
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def read_dockerfile(path: Path) -> Dockerfile:
    """The instructions these tests run; CMD and HEALTHCHECK must be in exec (JSON) form."""
    image = Dockerfile()
    for line in path.read_text().replace("\\\n", " ").splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "WORKDIR":
            image.workdir = image.workdir / rest
        elif instruction == "ENV":
            image.env |= dict(pair.split("=", 1) for pair in shlex.split(rest))
        elif instruction == "COPY":
            *sources, dest = rest.split()
            for source in sources:
                target = image.workdir / dest
                if dest.endswith("/") or dest in (".", "./") or len(sources) > 1:
                    target = target / PurePosixPath(source).name
                image.copied[target] = ROOT / source
        elif instruction == "CMD":
            image.cmd = json.loads(rest)
        elif instruction == "HEALTHCHECK":
            assert rest.startswith("CMD "), f"HEALTHCHECK options are not read here: {line}"
            image.healthcheck = json.loads(rest.removeprefix("CMD "))
    return image


IMAGE = read_dockerfile(ROOT / "docker" / "Dockerfile")


def image_env(**settings: str) -> dict[str, str]:
    """The image's ENV with ``settings`` over it, this venv's gmem and python first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GM_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env | IMAGE.env | settings


def start(log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """The image's CMD, as the container's first process."""
    with log.open("w") as out:
        return subprocess.Popen(IMAGE.cmd, stdout=out, stderr=subprocess.STDOUT, env=image_env(**settings))


def healthcheck(**settings: str) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK once: its python is this one, its files this checkout's."""
    args = [sys.executable if a == "python" else str(IMAGE.copied.get(PurePosixPath(a), a)) for a in IMAGE.healthcheck]
    return subprocess.run(args, env=image_env(**settings), capture_output=True, text=True, timeout=30)


def first_answer(process: subprocess.Popen[bytes], log: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """The first healthcheck that reaches the server (it prints the status line), as Docker retries."""
    deadline = time.monotonic() + 30
    while True:
        result = healthcheck(**settings)
        if result.stdout.startswith("HTTP/"):
            return result
        assert process.poll() is None and time.monotonic() < deadline, f"{result.stderr}\n{log.read_text()}"
        time.sleep(0.2)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_image_defaults() -> None:
    assert IMAGE.env["GM_HOST"] == "0.0.0.0"  # a container is reached from outside itself
    assert IMAGE.env["GM_PORT"] == "8420"
    assert IMAGE.healthcheck[0] == "python" and IMAGE.healthcheck[1] in map(str, IMAGE.copied)


def test_healthcheck_asks_where_gm_host_and_gm_port_say(tmp_path: Path) -> None:
    db = str(tmp_path / "mem.db")
    port, other_port = str(free_port()), str(free_port())
    # Loopback rather than the image's 0.0.0.0: no need to listen on a shared machine's network.
    # GM_ALLOWED_HOSTS naming only a name: a Host of 127.0.0.1 would get 421 from the server.
    settings = {"GM_DB": db, "GM_HOST": "127.0.0.1", "GM_PORT": port, "GM_ALLOWED_HOSTS": "mem.internal"}
    first = start(tmp_path / "first.log", **settings)
    second = None
    try:
        while (result := first_answer(first, tmp_path / "first.log", **settings)).returncode != 0:
            assert result.stdout.startswith("HTTP/1.0 503"), result.stdout  # opening: not ready yet
            time.sleep(0.2)
        assert result.stdout.startswith("HTTP/1.0 200"), result.stdout
        assert healthcheck(**{**settings, "GM_HOST": "0.0.0.0"}).returncode == 0  # the wildcard: asks loopback

        nothing_there = healthcheck(**{**settings, "GM_PORT": other_port})
        assert nothing_there.returncode == 1, nothing_there
        assert f"nothing answers on 127.0.0.1:{other_port}" in nothing_there.stderr

        # Listening but not ready: a second server on the same file waits for the first one's lock.
        waiting = {**settings, "GM_PORT": other_port}
        second = start(tmp_path / "second.log", **waiting)
        result = first_answer(second, tmp_path / "second.log", **waiting)
        assert (result.returncode, result.stdout.split()[1]) == (1, "503"), result

        # exec in CMD: gmem itself gets the SIGTERM, drains and exits 0 (under sh it would die of it).
        assert stop(first) == 0, (tmp_path / "first.log").read_text()
        assert "stopped" in (tmp_path / "first.log").read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                stop(process)
