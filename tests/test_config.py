"""Every ``GM_*`` variable: a bad value is refused when the server or a store starts,
naming the variable (one ``gmem:`` line and exit 2 on the command line), never later as a
500 or a server that refuses every request."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import gm
from gm import config
from gm.config import ServerConfig, StoreSettings
from gm.errors import InvalidSetting

# (variable, a bad value): every GM_* variable greatmemory reads, each with a value it must refuse.
BAD_SERVER_VALUES = [
    ("GM_PORT", "http"),
    ("GM_PORT", "70000"),
    ("GM_PORT", "١٢"),  # not ASCII digits
    ("GM_MAX_BODY_BYTES", "-5"),
    ("GM_MAX_BODY_BYTES", "0"),
    ("GM_MAX_BODY_BYTES", "4MB"),
    ("GM_DRAIN_SECONDS", "soon"),
    ("GM_DRAIN_SECONDS", "-1"),
    ("GM_DRAIN_SECONDS", "nan"),
    ("GM_LOG_FORMAT", "xml"),
    ("GM_DATABASE_URL", "mysql://db/memories"),
    ("GM_API_KEYS", "short"),
    ("GM_DB", "mem\x01.db".replace("\x01", "\x00")),
    ("GM_HOST", "bad\x00host"),
    ("GM_MODEL_DIR", "models\x00"),
    ("GM_ALLOWED_HOSTS", "mem.example.com:8420"),
    ("GM_MAX_CONNECTIONS", "lots"),
    ("GM_MAX_CONNECTIONS", "0"),
    ("GM_HEADER_TIMEOUT_SECONDS", "-1"),
    ("GM_BODY_TIMEOUT_SECONDS", "nan"),
    ("GM_KEEPALIVE_SECONDS", "inf"),
    ("GM_METRICS", "public"),
]
BAD_STORE_VALUES = [
    ("GM_EMBED_THREADS", "many"),
    ("GM_EMBED_THREADS", "-2"),
    ("GM_BLAS_THREADS", "1.5"),
    ("GM_BLAS_THREADS", "-1"),
    ("GM_PURGE_SECONDS", "0"),
    ("GM_PURGE_SECONDS", "inf"),
    ("GM_PURGE_SECONDS", "hourly"),
    ("GM_TEST_SCHEMA_CAP", "v1"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_SERVER_VALUES + BAD_STORE_VALUES)
def test_the_server_refuses_a_bad_value_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(InvalidSetting) as refused:
        ServerConfig.load({}, {variable: value})
    assert refused.value.variable == variable
    assert variable in refused.value.message
    assert refused.value.code == "invalid_setting" and refused.value.details == {"path": variable}
    if variable in ("GM_API_KEYS", "GM_DATABASE_URL"):
        assert value not in refused.value.message  # a secret is never repeated


@pytest.mark.parametrize(("variable", "value"), BAD_STORE_VALUES)
def test_the_library_refuses_a_bad_value_when_it_opens(
    variable: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidSetting, match=variable):
        StoreSettings.load()

    async def open_store() -> None:
        async with gm.open(tmp_path / "mem.db"):
            pass

    with pytest.raises(InvalidSetting, match=variable):
        asyncio.run(open_store())
    assert not (tmp_path / "mem.db").exists()  # refused before anything was opened


def test_flags_are_checked_like_the_variables_they_stand_for() -> None:
    with pytest.raises(InvalidSetting, match=r"^--max-body-bytes '-5' is not valid") as refused:
        ServerConfig.load({"max_body_bytes": -5}, {})
    assert refused.value.variable == "GM_MAX_BODY_BYTES"
    with pytest.raises(InvalidSetting, match="^--port '70000'"):
        ServerConfig.load({"port": 70000}, {})
    # A flag wins over a bad variable, and an empty variable counts as unset.
    config = ServerConfig.load({"drain_seconds": 2.5}, {"GM_DRAIN_SECONDS": "soon", "GM_PORT": ""})
    assert (config.drain_seconds, config.port) == (2.5, 8420)


def test_good_values_are_read() -> None:
    config = ServerConfig.load({}, {
        "GM_PORT": "0", "GM_MAX_BODY_BYTES": "1024", "GM_DRAIN_SECONDS": "0", "GM_LOG_FORMAT": "json",
        "GM_EMBED_THREADS": "2", "GM_BLAS_THREADS": "0", "GM_PURGE_SECONDS": "0.5", "GM_TEST_SCHEMA_CAP": "1",
        "GM_DATABASE_URL": "postgresql://u@h/db", "GM_METRICS": "off",
    })
    assert (config.port, config.max_body_bytes, config.drain_seconds, config.log_format) == (0, 1024, 0.0, "json")
    assert config.store == StoreSettings(None, 2, 0, 0.5, 1)
    assert config.target == "postgresql://u@h/db"
    assert config.metrics == "off" and ServerConfig.load({}, {}).metrics == "key"


@pytest.mark.parametrize(("variable", "value"), [("GM_EMBED_THREADS", "many"), ("GM_MAX_BODY_BYTES", "-5"),
                                                 ("GM_PURGE_SECONDS", "0")])
def test_gmem_serve_exits_2_with_one_line_naming_the_variable(variable: str, value: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gm", "serve", "--db", str(tmp_path / "mem.db"), "--port", "0"],
        env={"PATH": "/usr/bin:/bin", variable: value}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"gmem: {variable}={value!r} is not valid: " + done.stderr.split(": ", 2)[2]
                                        .strip()]
    assert not (tmp_path / "mem.db").exists()


def test_a_bad_variable_does_not_break_import(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import gm; print(gm.__version__)"],
        env={"PATH": "/usr/bin:/bin", "GM_PURGE_SECONDS": "hourly"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("variable", "value"), [("GM_URL", "localhost:8420"), ("GM_URL", "ftp://host"),
                                                 ("GM_API_KEY", "key\x00")])
def test_the_client_side_variables_are_checked_too(variable: str, value: str) -> None:
    setting = {"GM_URL": config.URL, "GM_API_KEY": config.API_KEY}[variable]
    with pytest.raises(InvalidSetting, match=f"^{variable}") as refused:
        setting.read({variable: value})
    assert refused.value.variable == variable
    assert (value in refused.value.message) == (variable == "GM_URL")  # a key is a secret: never repeated


def test_gmem_refuses_a_bad_gm_url_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gm", "get", "some-id"],
        env={"PATH": "/usr/bin:/bin", "GM_URL": "localhost:8420"}, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "gmem: GM_URL='localhost:8420' is not valid: a server's URL starts with http://; "
        "did you mean http://localhost:8420?\n"
    )


def test_an_empty_flag_counts_as_not_given() -> None:
    """``gmem serve --host "$HOST"`` with HOST unset must not listen on every interface."""
    loaded = ServerConfig.load({"host": "", "model_dir": "", "db": ""}, {})
    assert loaded.host == "127.0.0.1" and loaded.model_dir is None and loaded.db == config.DEFAULT_DB
    loaded = ServerConfig.load({"host": ""}, {"GM_HOST": "0.0.0.0"})  # no keys: GM_HOST off loopback is ignored
    assert loaded.host == "127.0.0.1" and loaded.ignored_host == "0.0.0.0"
