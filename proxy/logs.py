"""Structured JSON logs: one line per request, plus the proxy's own events.

Lines go to stderr through the standard `logging` module, so operators can raise or lower
the level (`log_level`, or IDEMPOTENCY_PROXY_LOG_LEVEL) without new machinery. Nothing
logged here ever contains a raw idempotency key or a credential: requests are identified
by the record's hash.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

ACCESS = logging.getLogger("idempotency_proxy.access")
EVENTS = logging.getLogger("idempotency_proxy")


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": ..., "event": ..., **fields}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class ClientFaults(logging.Filter):
    """aiohttp logs every request it cannot parse as an ERROR with a traceback. The fault is
    the client's and anyone can send one: keep it as one warning line saying what was wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "unparseable request", ()
            record.fields = {"status": exc.code, "error": exc.message.strip().splitlines()[0]}
            record.exc_info, record.exc_text = None, None
        return True


def configure(level: str) -> None:
    """Send every log line to stderr as JSON: the proxy's at `level`, aiohttp's warnings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("idempotency_proxy")
    root.handlers[:] = [handler]
    root.propagate = False
    set_level(level)
    aiohttp_logs = logging.getLogger("aiohttp")
    aiohttp_logs.handlers[:] = [handler]
    aiohttp_logs.propagate = False
    aiohttp_logs.setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(ClientFaults())


def set_level(level: str) -> None:
    """Change the level of every proxy log line (at start-up, and on a config reload)."""
    logging.getLogger("idempotency_proxy").setLevel(level.upper())


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one of the proxy's own events with structured fields."""
    if EVENTS.isEnabledFor(level):
        EVENTS.log(level, message, extra={"fields": fields})


def access(fields: dict[str, Any]) -> None:
    """Log the one line that describes a finished request."""
    if ACCESS.isEnabledFor(logging.INFO):
        ACCESS.info("request", extra={"fields": fields})
