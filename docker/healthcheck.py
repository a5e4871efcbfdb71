"""The image's HEALTHCHECK: healthy while the server in this container says it is ready
(GET /v1/readyz answers 200), asked where gmem serve listens: GM_HOST and GM_PORT."""

import os
import socket
import sys

# Unset or empty means the server's defaults (docs/configuration.md).
host = os.environ.get("GM_HOST") or "127.0.0.1"
port = int(os.environ.get("GM_PORT") or "8420")
# A wildcard address listens on every interface: ask the loopback one of its family.
host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
try:
    # HTTP/1.0 with no Host header: answered whatever GM_ALLOWED_HOSTS lists, where a Host
    # of 127.0.0.1 gets 421 once it lists only names (an HTTP/1.1 request needs a Host).
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(b"GET /v1/readyz HTTP/1.0\r\n\r\n")
        status = conn.makefile("rb").readline().decode("latin-1").strip()
except OSError as exc:
    sys.exit(f"unhealthy: nothing answers on {host}:{port}: {exc}")
print(status)
sys.exit(0 if status.split()[1:2] == ["200"] else 1)
