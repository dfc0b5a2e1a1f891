"""Structured JSON logs: one line per request, plus the proxy's own events.

Every line is one JSON object on stderr. The level is the standard `logging` module's
(`log_level`, or IDEMPOTENCY_PROXY_LOG_LEVEL, changed on a reload), and the proxy's own
events go through `logging` as usual. The access line does not: it is written once per
request, and the `logging` machinery (a record, a handler lock, a formatter, `json.dumps`,
a write and a flush per line) cost about 30 us of CPU per request, more than the whole store
client. `access` checks the same level, encodes the line with orjson and appends it to a
buffer that the event loop writes out at most `FLUSH_AFTER` later (or sooner, when it holds
`FLUSH_BYTES`, when an event is logged, and at exit): about 1 us per line.

Nothing logged here ever contains a raw idempotency key or a credential: requests are
identified by the record's hash.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import select
import sys
import time
from typing import Any, Final, TextIO

import orjson
from aiohttp.http_exceptions import HttpProcessingError

ACCESS = logging.getLogger("idempotency_proxy.access")
EVENTS = logging.getLogger("idempotency_proxy")

# How long an access line may wait in the buffer: what `tail -f` lags behind at most, and
# about the most a SIGKILL can lose (SIGTERM, an event line and exit write everything).
FLUSH_AFTER: Final = 0.01
FLUSH_BYTES: Final = 64 * 1024  # a bound on the buffer, whatever the request rate
# One write(2) of at most this many bytes to a pipe is never interleaved with another
# process's (workers share stderr), so lines are written in batches no larger.
_ATOMIC_WRITE: Final = select.PIPE_BUF

_ACCESS_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE
_EVENT_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def encode(line: dict[str, Any], options: int = _EVENT_OPTIONS) -> bytes:
    """`line` as one line of JSON, newline included; values JSON lacks become strings."""
    try:
        return orjson.dumps(line, default=str, option=options)
    except TypeError:  # what orjson refuses (a lone surrogate, an int over 64 bits), json takes
        return (json.dumps(line, default=str) + "\n").encode()


class Timestamps:
    """`2024-05-01T12:00:00.123Z` for a time: formatted once a millisecond, the date and
    time of day once a second; a busy proxy logs several lines in each."""

    __slots__ = ("_milli", "_prefix", "_second", "_text")

    def __init__(self) -> None:
        self._milli = self._second = -1
        self._prefix = self._text = ""

    def format(self, now: float) -> str:
        milli = int(now * 1000)
        if milli != self._milli:
            self._milli = milli
            second = milli // 1000
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._text = f"{self._prefix}.{milli % 1000:03d}Z"
        return self._text


class LineWriter:
    """Whole lines to one stream, buffered on the event loop and written in few system calls.

    The buffer is one `bytearray`: keeping each line's own `bytes` until the flush cost
    several microseconds a line in allocator work (bench/access_log.py). Outside a running
    loop (start-up, the worker supervisor) a line is written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream with no descriptor (a test's)
            self._fd = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes) -> None:
        """Write `line` soon: at most `FLUSH_AFTER` from now."""
        buffer = self._buffer
        buffer += line
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_AFTER, self.flush)
        elif len(buffer) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        data, self._buffer = self._buffer, bytearray()
        if data:
            self._write(data)

    def _write(self, data: bytearray) -> None:
        # A failing stderr (a closed pipe, a full disk) must not fail the request that logs:
        # the lines are dropped, as they are when a log shipper stops reading.
        try:
            if self._fd is None:
                self._stream.write(data.decode())
                self._stream.flush()
                return
            self._stream.flush()  # what was printed to the stream before these lines
            with memoryview(data) as view:
                start = 0
                while start < len(data):
                    end = start + _ATOMIC_WRITE
                    if end < len(data):  # cut after the last whole line that fits
                        cut = data.rfind(b"\n", start, end)
                        end = data.index(b"\n", end) + 1 if cut < 0 else cut + 1
                    start += os.write(self._fd, view[start:end])
        except (OSError, ValueError):
            pass


_writer = LineWriter(sys.stderr)
_timestamps = Timestamps()


class JsonLines(logging.Handler):
    """The proxy's events (and aiohttp's warnings) as JSON lines, through the same writer
    as the access lines, so that every line keeps its order. Events are rare: each one
    writes out what the buffer holds."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line: dict[str, Any] = {
                "time": _timestamps.format(record.created),
                "level": record.levelname.lower(),
                "event": record.getMessage(),
            }
            fields = getattr(record, "fields", None)
            if fields:
                line.update(fields)
            if record.exc_info:
                line["exception"] = logging.Formatter().formatException(record.exc_info)
            _writer.add(encode(line))
            _writer.flush()
        except Exception:
            self.handleError(record)


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


def configure(level: str, stream: TextIO | None = None) -> None:
    """Send every log line to `stream` (stderr) as JSON: the proxy's at `level`, aiohttp's
    warnings."""
    global _writer
    _writer.flush()
    _writer = LineWriter(sys.stderr if stream is None else stream)
    handler = JsonLines()
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


def flush() -> None:
    """Write out the buffered access lines (at shutdown; exit does it too)."""
    _writer.flush()


atexit.register(flush)


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one of the proxy's own events with structured fields."""
    if EVENTS.isEnabledFor(level):
        EVENTS.log(level, message, extra={"fields": fields})


def access_enabled() -> bool:
    """Whether access lines are written at the current level (`info` and below)."""
    return ACCESS.isEnabledFor(logging.INFO)


def access(
    route: str, method: str, path: str, outcome: str, status: int, key_hash: str | None,
    upstream_status: int | None, upstream_ms: float | None, latency_ms: float,
    request_id: str, error: str | None,
) -> None:  # fmt: skip
    """Log the one line that describes a finished request (callers check `access_enabled`)."""
    line = {
        "time": _timestamps.format(time.time()), "level": "info", "event": "request",
        "route": route, "method": method, "path": path, "outcome": outcome, "status": status,
        "key_hash": key_hash, "upstream_status": upstream_status, "upstream_ms": upstream_ms,
        "latency_ms": latency_ms, "request_id": request_id, "error": error,
    }  # fmt: skip
    try:
        encoded = orjson.dumps(line, option=_ACCESS_OPTIONS)
    except TypeError:  # a path orjson refuses (a lone surrogate): rare, json takes it
        encoded = encode(line)
    _writer.add(encoded)
