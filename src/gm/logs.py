"""Logging: one line per event, as text or as JSON (``--log-format json``), and the
one-line access log of the HTTP server (never with headers, so never with API keys).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_EXTRA = ("method", "path", "status", "ms", "remote")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _EXTRA:
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.replace("\n", " | ")  # one line per event, tracebacks included


def setup(log_format: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLogger(AbstractAccessLogger):
    """``GET /v1/memories 200 1.8ms`` per request, with the fields as JSON keys too."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        ms = round(time * 1000, 2)
        self.logger.info(
            "%s %s %d %.2fms",
            request.method,
            request.path,
            response.status,
            ms,
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "ms": ms,
                "remote": request.remote,
            },
        )
