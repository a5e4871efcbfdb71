"""Configuration: every ``GM_*`` variable as a :class:`Setting` (its flag, default and check),
and the two sets read at start-up: :class:`StoreSettings` (the library's) and
:class:`ServerConfig` (``gmem serve``'s, flags over variables over defaults). A bad value is
refused when read, naming the variable: :class:`gm.errors.InvalidSetting`. Every variable is
documented in docs/configuration.md.

A new setting is one ``Setting(...)`` line below, a field, and a ``.read`` in ``load``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from gm.errors import InvalidInput, InvalidSetting
from gm.validation import check_scope_value

T = TypeVar("T")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8420
DEFAULT_DB = "greatmemory.db"
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_DRAIN_SECONDS = 30.0
DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 open files, with room for the database's
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0
DEFAULT_BODY_TIMEOUT_SECONDS = 60.0
DEFAULT_KEEPALIVE_SECONDS = 75.0  # longer than common proxies' idle timeout (60 s), so they close first
# A write waits at most this long for its commit, then fails with 503 instead of hanging. Past
# SQLite's 10 s busy timeout and Postgres's 5 s lock timeout (and its one retry), so their
# precise errors come first; short of the 30 s many HTTP clients give up at.
DEFAULT_WRITE_TIMEOUT_SECONDS = 15.0
MAX_WRITE_TIMEOUT_SECONDS = 3600.0
# /metrics: open like the probes, behind an API key not bound to a namespace (when GM_API_KEYS is
# set), or off. A key by default: who set keys asked for a closed server, and the figures (traffic,
# memory counts, version) help an attacker; Prometheus sends a key with two lines of its config.
DEFAULT_METRICS = "key"


# -- how a raw value is checked: each returns the value or raises ValueError saying what it expects ------


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number of plain ASCII digits (``-`` allowed in front) from ``low`` to ``high``."""
    expected = f"a whole number from {low} to {high}" if high is not None else f"a whole number, at least {low}"

    def parse(raw: str) -> int:
        if not re.fullmatch(r"-?[0-9]+", raw.strip()):
            raise ValueError(f"expected {expected}")
        value = int(raw)
        if value < low or (high is not None and value > high):
            raise ValueError(f"expected {expected}")
        return value

    return parse


def seconds(*, zero: bool, most: float = math.inf) -> Callable[[str], float]:
    """A finite number of seconds in plain ASCII, above zero (or at least zero when ``zero``),
    at most ``most``."""
    expected = "a number of seconds, 0 or more" if zero else "a number of seconds above 0"
    if most < math.inf:
        expected += f" and at most {most:g}"

    def parse(raw: str) -> float:
        try:
            if not re.fullmatch(r"[0-9.eE+-]+", raw.strip()):
                raise ValueError(raw)
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected {expected}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > most:
            raise ValueError(f"expected {expected}")
        return value

    return parse


def choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw

    return parse


def text(raw: str) -> str:
    if "\x00" in raw:
        raise ValueError("a NUL character cannot be in a path or a name")
    return raw


def postgres_url(raw: str) -> str:
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected a postgresql://user:password@host/db URL")
    return raw


def server_url(raw: str) -> str:
    """A running server's address: ``http://`` or ``https://`` and a host."""
    if re.match(r"https?://[^/\s]", raw):
        return raw
    if "://" in raw:
        raise ValueError("expected an http:// or https:// URL of a greatmemory server")
    raise ValueError(f"a server's URL starts with http://; did you mean http://{raw}?")


def allowed_hosts(raw: str) -> tuple[str, ...]:
    """``GM_ALLOWED_HOSTS``: comma-separated host names (no port) the server answers to; ``*``
    for any. Unset, the default of :mod:`gm.http.guard` applies."""
    hosts: list[str] = []
    for part in raw.split(","):
        host = part.strip().lower().rstrip(".")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or any(c in host for c in "/@ \t") or (":" in host and host.count(":") == 1):
            raise ValueError(f"expected host names without ports or schemes, e.g. mem.example.com,localhost; "
                             f"{part.strip()!r} is not one")
        hosts.append(host)
    return tuple(hosts)


_ORIGIN = re.compile(r"([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _not_an_origin(part: str) -> str:
    """What is wrong with an entry of GM_CORS_ORIGINS, in the words of the likely mistake."""
    with_path = re.fullmatch(r"([a-z][a-z0-9+.-]*://[^/?#]+)[/?#].*", part.lower())
    if part.lower() == "null":
        return "null is the origin of every sandboxed frame and local file alike; it cannot be allowed"
    if not part:
        return "an entry is empty"
    if "://" not in part and "/" not in part:
        return f"an origin starts with a scheme: did you mean https://{part}?"
    if with_path:
        return f"an origin has no path: write {with_path.group(1)}"
    return f"{part!r} is not scheme://host[:port]"


def cors_origins(raw: str) -> tuple[str, ...]:
    """``GM_CORS_ORIGINS``: comma-separated origins, ``scheme://host[:port]`` as a browser sends
    them in ``Origin`` (lower case, no default port: ``https://a.example:443`` is kept as
    ``https://a.example``), or ``*`` alone for any. Unset, no origin is answered (gm.http.cors)."""
    parts = [part.strip() for part in raw.split(",")]
    if "*" in parts and len(parts) > 1:
        raise ValueError("* allows every origin: give it alone, not in a list")
    if parts == ["*"]:
        return ("*",)
    origins: list[str] = []
    for part in parts:
        match = _ORIGIN.fullmatch(part.lower())
        if match is None:
            raise ValueError(f"expected origins such as https://app.example.com,http://localhost:3000; "
                             f"{_not_an_origin(part)}")
        scheme, host, port = match.groups()
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"the port of {part!r} is not from 1 to 65535")
        keep = f":{int(port)}" if port is not None and _DEFAULT_PORTS.get(scheme) != str(int(port)) else ""
        origins.append(f"{scheme}://{host}{keep}")
    return tuple(dict.fromkeys(origins))


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
            raise InvalidSetting(
                "every key in GM_API_KEYS must be at least 16 characters (try `gmem keys new`)", variable="GM_API_KEYS"
            )
        if at and not namespace:  # e.g. "$KEY@$TEAM" with TEAM unset: never widen it to every namespace
            raise InvalidSetting(
                "a key in GM_API_KEYS ends in @ with no namespace after it; write KEY@NAMESPACE", variable="GM_API_KEYS"
            )
        if any(key.secret == secret for key in keys):
            raise InvalidSetting("a key appears twice in GM_API_KEYS; give each key once", variable="GM_API_KEYS")
        try:
            bound = check_scope_value(namespace, "GM_API_KEYS namespace") if at else None
        except InvalidInput as exc:
            raise InvalidSetting(exc.message, variable="GM_API_KEYS") from None
        keys.append(ApiKey(secret, bound))
    return tuple(keys)


# -- the settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``GM_*`` variable: the ``gmem serve`` flag standing for it (its argparse name),
    its default, and the check that turns a raw value into a good one. An empty variable
    counts as unset; a secret's value is never repeated in an error."""

    variable: str
    default: T
    parse: Callable[[str], T]
    flag: str | None = None
    secret: bool = False

    def read(self, env: Mapping[str, str] | None = None, flags: Mapping[str, object] | None = None) -> T:
        """The flag's value if given, else the variable's, else the default; checked. An
        empty flag counts as not given, as an empty variable does (``--host "$UNSET"`` must
        not mean every interface)."""
        given = (flags or {}).get(self.flag) if self.flag else None
        if given is not None and str(given) != "":
            raw, source = str(given), "--" + (self.flag or "").replace("_", "-")
        else:
            raw, source = (os.environ if env is None else env).get(self.variable, ""), self.variable
            if raw == "":
                return self.default
        try:
            return self.parse(raw)
        except InvalidSetting:
            raise
        except ValueError as exc:
            shown = source if self.secret else f"{source}={raw!r}" if source == self.variable else f"{source} {raw!r}"
            raise InvalidSetting(f"{shown} is not valid: {exc}", variable=self.variable) from None


HOST = Setting("GM_HOST", DEFAULT_HOST, text, "host")
PORT = Setting("GM_PORT", DEFAULT_PORT, whole(0, 65535), "port")
DB = Setting("GM_DB", DEFAULT_DB, text, "db")
DATABASE_URL: Setting[str | None] = Setting("GM_DATABASE_URL", None, postgres_url, "database_url", secret=True)
API_KEYS: Setting[tuple[ApiKey, ...]] = Setting("GM_API_KEYS", (), parse_api_keys, secret=True)
MODEL_DIR: Setting[str | None] = Setting("GM_MODEL_DIR", None, text, "model_dir")
EMBED_THREADS = Setting("GM_EMBED_THREADS", 0, whole(0, 1024))  # 0: one per core
BLAS_THREADS = Setting("GM_BLAS_THREADS", 1, whole(0, 1024))  # 0: leave the process's setting alone
PURGE_SECONDS = Setting("GM_PURGE_SECONDS", 60.0, seconds(zero=False))
TEST_SCHEMA_CAP: Setting[int | None] = Setting("GM_TEST_SCHEMA_CAP", None, whole(0))
MAX_BODY_BYTES = Setting("GM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, whole(1, 2**40), "max_body_bytes")
DRAIN_SECONDS = Setting("GM_DRAIN_SECONDS", DEFAULT_DRAIN_SECONDS, seconds(zero=True), "drain_seconds")
LOG_FORMAT = Setting("GM_LOG_FORMAT", "text", choice("text", "json"), "log_format")
URL: Setting[str | None] = Setting("GM_URL", None, server_url, "url")  # the CLI's client commands
API_KEY: Setting[str | None] = Setting("GM_API_KEY", None, text, "api_key", secret=True)
ALLOWED_HOSTS: Setting[tuple[str, ...] | None] = Setting("GM_ALLOWED_HOSTS", None, allowed_hosts, "allowed_hosts")
CORS_ORIGINS: Setting[tuple[str, ...]] = Setting("GM_CORS_ORIGINS", (), cors_origins)
MAX_CONNECTIONS = Setting("GM_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, whole(1, 1_000_000), "max_connections")
HEADER_TIMEOUT = Setting("GM_HEADER_TIMEOUT_SECONDS", DEFAULT_HEADER_TIMEOUT_SECONDS, seconds(zero=False))
BODY_TIMEOUT = Setting("GM_BODY_TIMEOUT_SECONDS", DEFAULT_BODY_TIMEOUT_SECONDS, seconds(zero=False))
KEEPALIVE = Setting("GM_KEEPALIVE_SECONDS", DEFAULT_KEEPALIVE_SECONDS, seconds(zero=False))
WRITE_TIMEOUT = Setting(
    "GM_WRITE_TIMEOUT_SECONDS", DEFAULT_WRITE_TIMEOUT_SECONDS, seconds(zero=False, most=MAX_WRITE_TIMEOUT_SECONDS)
)
METRICS = Setting("GM_METRICS", DEFAULT_METRICS, choice("open", "key", "off"))



@dataclass(frozen=True)
class StoreSettings:
    """The variables a store reads when :func:`gm.open` builds it (embedded or served)."""

    model_dir: str | None = None
    embed_threads: int = 0
    blas_threads: int = 1
    purge_seconds: float = 60.0
    schema_cap: int | None = None
    write_timeout: float = DEFAULT_WRITE_TIMEOUT_SECONDS

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> StoreSettings:
        return cls(
            model_dir=MODEL_DIR.read(env),
            embed_threads=EMBED_THREADS.read(env),
            blas_threads=BLAS_THREADS.read(env),
            purge_seconds=PURGE_SECONDS.read(env),
            schema_cap=TEST_SCHEMA_CAP.read(env),
            write_timeout=WRITE_TIMEOUT.read(env),
        )


@dataclass(frozen=True)
class ConnectionLimits:
    """How many clients may be connected at once and how long each may take to send."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    body_timeout: float = DEFAULT_BODY_TIMEOUT_SECONDS
    keepalive_timeout: float = DEFAULT_KEEPALIVE_SECONDS

    @classmethod
    def load(cls, flags: Mapping[str, object], env: Mapping[str, str]) -> ConnectionLimits:
        return cls(
            max_connections=MAX_CONNECTIONS.read(env, flags),
            header_timeout=HEADER_TIMEOUT.read(env, flags),
            body_timeout=BODY_TIMEOUT.read(env, flags),
            keepalive_timeout=KEEPALIVE.read(env, flags),
        )


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
    store: StoreSettings = StoreSettings()
    allowed_hosts: tuple[str, ...] | None = None
    limits: ConnectionLimits = ConnectionLimits()
    cors_origins: tuple[str, ...] = ()
    metrics: str = DEFAULT_METRICS

    @property
    def target(self) -> str:
        """What the server opens: the Postgres URL if one is set, else the SQLite file."""
        return self.database_url or self.db

    @property
    def shown_target(self) -> str:
        """:attr:`target` fit for logs (no password)."""
        from gm.storage.postgres_pool import redact

        return redact(self.target)

    @classmethod
    def load(cls, flags: Mapping[str, object], env: Mapping[str, str] = os.environ) -> ServerConfig:
        """Flags (None = not given) win over the environment, which wins over defaults.
        Every setting is read and checked here, the store's too, so a bad value stops the
        server before it listens."""
        api_keys = API_KEYS.read(env)
        host = HOST.read(env, flags)
        ignored_host = None
        if not api_keys and flags.get("host") in (None, "") and not is_loopback(host):
            ignored_host, host = host, DEFAULT_HOST  # no keys: only --host itself may open it beyond loopback
        store = StoreSettings.load(env)
        cors = CORS_ORIGINS.read(env)
        if cors == ("*",) and not api_keys:  # the JSON-only guard is all that keeps web pages out without keys
            raise InvalidSetting("GM_CORS_ORIGINS=* lets every web page a user visits call this server, which has no "
                                 "GM_API_KEYS to stop them reading and changing its memories; set GM_API_KEYS, or "
                                 "list the origins that may call it", variable="GM_CORS_ORIGINS")
        return cls(
            host=host,
            port=PORT.read(env, flags),
            db=DB.read(env, flags),
            database_url=DATABASE_URL.read(env, flags),
            model_dir=MODEL_DIR.read(env, flags),
            api_keys=api_keys,
            ignored_host=ignored_host,
            max_body_bytes=MAX_BODY_BYTES.read(env, flags),
            drain_seconds=DRAIN_SECONDS.read(env, flags),
            log_format=LOG_FORMAT.read(env, flags),
            store=store,
            allowed_hosts=ALLOWED_HOSTS.read(env, flags),
            limits=ConnectionLimits.load(flags, env),
            cors_origins=cors,
            metrics=METRICS.read(env, flags),
        )


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")
