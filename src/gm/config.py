"""Server configuration: command-line flags over ``GM_*`` environment variables over
defaults. Every variable is documented in docs/configuration.md.
"""

from __future__ import annotations

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
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 open files, with room for the database's
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 60.0
DEFAULT_KEEPALIVE_SECONDS = 75.0  # longer than common proxies' idle timeout (60 s), so they close first


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
class ConnectionLimits:
    """How many clients may be connected at once and how long each may take to send."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS
    keepalive_timeout: float = DEFAULT_KEEPALIVE_SECONDS

    @classmethod
    def load(cls, flags: Mapping[str, object], env: Mapping[str, str]) -> ConnectionLimits:
        def setting(flag: str | None, var: str, default: float, kind: type[int] | type[float]) -> float:
            raw = flags.get(flag) if flag else None
            name = f"--{flag.replace('_', '-')}" if raw is not None and flag else var
            if raw is None:
                raw = env.get(var)
            if raw is None:
                return default
            try:
                value = kind(str(raw).strip())
            except ValueError:
                value = 0
            if not 0 < value < float("inf"):
                noun = "whole number" if kind is int else "number of seconds"
                raise InvalidInput(f"{name} must be a positive {noun}, not {str(raw)!r}")
            return value

        return cls(
            max_connections=int(setting("max_connections", "GM_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, int)),
            header_timeout=setting(None, "GM_HEADER_TIMEOUT_SECONDS", DEFAULT_HEADER_TIMEOUT_SECONDS, float),
            body_timeout=setting(None, "GM_BODY_TIMEOUT_SECONDS", DEFAULT_BODY_TIMEOUT_SECONDS, float),
            keepalive_timeout=setting(None, "GM_KEEPALIVE_SECONDS", DEFAULT_KEEPALIVE_SECONDS, float),
        )


def parse_allowed_hosts(raw: str | None, name: str = "GM_ALLOWED_HOSTS") -> tuple[str, ...] | None:
    """``GM_ALLOWED_HOSTS``: comma-separated host names (no port) the server answers to; ``*``
    for any. None when unset: the default of :mod:`gm.http.guard` applies."""
    if raw is None or not raw.strip():
        return None
    hosts: list[str] = []
    for part in raw.split(","):
        host = part.strip().lower().rstrip(".")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or any(c in host for c in "/@ \t") or (":" in host and host.count(":") == 1):
            raise InvalidInput(f"{name} must list host names without ports or schemes, e.g. "
                               f"mem.example.com,localhost; {part.strip()!r} is not one")
        hosts.append(host)
    return tuple(hosts)


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
    allowed_hosts: tuple[str, ...] | None = None
    limits: ConnectionLimits = ConnectionLimits()

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
            allowed_hosts=parse_allowed_hosts(
                str(pick("allowed_hosts", "GM_ALLOWED_HOSTS", "")),
                "--allowed-hosts" if flags.get("allowed_hosts") is not None else "GM_ALLOWED_HOSTS",
            ),
            limits=ConnectionLimits.load(flags, env),
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _opt(value: object) -> str | None:
    return str(value) if value else None
