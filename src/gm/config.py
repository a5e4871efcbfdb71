"""Server configuration: command-line flags over ``GM_*`` environment variables over
defaults. Every variable is documented in docs/configuration.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from gm.errors import InvalidInput
from gm.memory import check_scope_value

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8420
DEFAULT_DB = "greatmemory.db"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_DRAIN_SECONDS = 30.0
# A write waits at most this long for its commit, then fails with 503 instead of hanging. Past
# SQLite's 10 s busy timeout and Postgres's 5 s lock timeout (and its one retry), so their
# precise errors come first; short of the 30 s many HTTP clients give up at.
DEFAULT_WRITE_TIMEOUT_SECONDS = 15.0
MAX_WRITE_TIMEOUT_SECONDS = 3600.0


def write_timeout_seconds(env: Mapping[str, str] = os.environ) -> float:
    """``GM_WRITE_TIMEOUT_SECONDS`` (default 15): how long a write may wait for its commit."""
    raw = env.get("GM_WRITE_TIMEOUT_SECONDS", "").strip()
    if not raw:
        return DEFAULT_WRITE_TIMEOUT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_WRITE_TIMEOUT_SECONDS:  # also refuses nan and inf
        raise InvalidInput(
            f"GM_WRITE_TIMEOUT_SECONDS must be a number of seconds above 0 and at most "
            f"{MAX_WRITE_TIMEOUT_SECONDS:g}, not {raw!r}"
        )
    return value


@dataclass(frozen=True)
class ApiKey:
    """One accepted key; ``namespace`` set means it may only touch that namespace."""

    secret: str = field(repr=False)
    namespace: str | None = None


def parse_api_keys(raw: str | None) -> tuple[ApiKey, ...]:
    """``GM_API_KEYS``: comma-separated keys; ``KEY@NAMESPACE`` binds a key to a namespace."""
    keys: list[ApiKey] = []
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        secret, at, namespace = part.partition("@")
        if len(secret) < 16:
            raise InvalidInput("every key in GM_API_KEYS must be at least 16 characters (try `gmem keys new`)")
        if at and not namespace:  # e.g. "$KEY@$TEAM" with TEAM unset: never widen it to every namespace
            raise InvalidInput("a key in GM_API_KEYS ends in @ with no namespace after it; write KEY@NAMESPACE")
        if any(key.secret == secret for key in keys):
            raise InvalidInput("a key appears twice in GM_API_KEYS; give each key once")
        keys.append(ApiKey(secret, check_scope_value(namespace, "GM_API_KEYS namespace") if at else None))
    return tuple(keys)


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    db: str = DEFAULT_DB
    database_url: str | None = None
    model_dir: str | None = None
    api_keys: tuple[ApiKey, ...] = ()
    ignored_host: str | None = None  # a GM_HOST set aside because no API keys were given
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    log_format: str = "text"
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_SECONDS  # the backends read it from the environment

    @property
    def target(self) -> str:
        """What the server opens: the Postgres URL if one is set, else the SQLite file."""
        return self.database_url or self.db

    @property
    def shown_target(self) -> str:
        """:attr:`target` fit for logs (no password)."""
        from gm.storage.postgres import redact

        return redact(self.target)

    @classmethod
    def load(cls, flags: Mapping[str, object], env: Mapping[str, str] = os.environ) -> ServerConfig:
        """Flags (None = not given) win over the environment, which wins over defaults."""

        def pick(flag: str, var: str, default: object) -> object:
            value = flags.get(flag)
            if value is not None:
                return value
            return env.get(var, default)

        try:
            port = int(str(pick("port", "GM_PORT", DEFAULT_PORT)))
            max_body = int(str(pick("max_body_bytes", "GM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)))
            drain = float(str(pick("drain_seconds", "GM_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS)))
        except ValueError as exc:
            raise InvalidInput(f"bad number in configuration: {exc}") from None
        if not 0 <= port <= 65535:
            raise InvalidInput(f"port {port} is not a TCP port (0-65535)")
        log_format = str(pick("log_format", "GM_LOG_FORMAT", "text"))
        if log_format not in ("text", "json"):
            raise InvalidInput("log format must be text or json")
        api_keys = parse_api_keys(env.get("GM_API_KEYS"))
        flag_host = flags.get("host")
        host = str(flag_host or env.get("GM_HOST") or DEFAULT_HOST)
        ignored_host = None
        if not api_keys and flag_host is None and not is_loopback(host):
            ignored_host, host = host, DEFAULT_HOST  # no keys: only --host itself may open it beyond loopback
        database_url = _opt(pick("database_url", "GM_DATABASE_URL", None))
        if database_url is not None and not database_url.startswith(("postgres://", "postgresql://")):
            raise InvalidInput("GM_DATABASE_URL / --database-url must be a postgresql:// URL")
        return cls(
            host=host,
            port=port,
            db=str(pick("db", "GM_DB", DEFAULT_DB)),
            database_url=database_url,
            model_dir=_opt(pick("model_dir", "GM_MODEL_DIR", None)),
            api_keys=api_keys,
            ignored_host=ignored_host,
            max_body_bytes=max_body,
            drain_seconds=drain,
            log_format=log_format,
            write_timeout=write_timeout_seconds(env),
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _opt(value: object) -> str | None:
    return str(value) if value else None
