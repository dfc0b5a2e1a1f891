"""What one request did, and the middlewares that report it.

The flow fills in an `Exchange` as it goes (route, outcome, key hash, upstream status);
`observe` turns it into one metric sample and one JSON log line when the request ends,
however it ends. `render_problems` turns any `ProxyError` into problem+json.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from proxy import logs, metrics
from proxy.errors import ProxyError
from proxy.outcomes import RequestOutcome

UNROUTED = "unrouted"

# Request ids only need to be unique: a random prefix per process and a counter (no system
# call per request). A client's own X-Request-Id is kept when it is short and printable.
_ID_PREFIX = os.urandom(4).hex()
_id_serial = itertools.count()
_CLIENT_REQUEST_ID = re.compile(r"[!-~]{1,128}")


def request_id(request: web.BaseRequest) -> str:
    """The id that ties a problem answer to its log line."""
    given = request.headers.get("X-Request-Id")
    if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_id_serial):x}"


@dataclass(slots=True)
class Exchange:
    request_id: str
    route: str = UNROUTED
    outcome: RequestOutcome = RequestOutcome.PASSTHROUGH
    record: str | None = None
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    error: str | None = None  # what went wrong, for the log line only
    # Work that must follow the answer, not precede it: recording a first attempt's result
    # (one store round trip the client need not wait for; the lease guards the key meanwhile).
    settle: Callable[[], Awaitable[None]] | None = None
    started: float = field(default_factory=time.perf_counter)


EXCHANGE = web.RequestKey("exchange", Exchange)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
AnyRequest = TypeVar("AnyRequest", bound=web.BaseRequest)  # the admin app's are `web.Request`
Middleware = Callable[[web.BaseRequest, Handler], Awaitable[web.StreamResponse]]


async def observe(request: web.BaseRequest, handler: Handler) -> web.StreamResponse:
    """Count and log every request once, including those whose client went away.

    The response is written here rather than after the handler returns, so that the log
    line has the status actually sent, and a failure to write it; then the exchange's
    `settle` runs (the first attempt's result is recorded once its answer is on its way).
    """
    exchange = Exchange(request_id(request))
    request[EXCHANGE] = exchange
    status = 499  # nginx's "client closed request": the handler was cancelled
    try:
        response = await handler(request)
        status = response.status
        await send(request, response, exchange)
        return response
    except Exception:
        status = 500  # aiohttp answers 500 for an unhandled error
        raise
    finally:
        elapsed = time.perf_counter() - exchange.started
        if exchange.settle is not None:
            await exchange.settle()
        metrics.observe_request(exchange.route, request.method, exchange.outcome, elapsed)
        if exchange.upstream_seconds is not None:
            metrics.observe_upstream(exchange.route, exchange.upstream_seconds)
        if logs.ACCESS.isEnabledFor(logging.INFO):
            logs.access({
                "route": exchange.route,
                "method": request.method,
                "path": request.path,
                "outcome": exchange.outcome,
                "status": status,
                "key_hash": exchange.record,
                "upstream_status": exchange.upstream_status,
                "upstream_ms": None if exchange.upstream_seconds is None
                else round(exchange.upstream_seconds * 1000, 3),
                "latency_ms": round(elapsed * 1000, 3),
                "request_id": exchange.request_id,
                "error": exchange.error,
            })  # fmt: skip


async def send(request: web.BaseRequest, response: web.StreamResponse, ex: Exchange) -> None:
    """Write `response` unless the handler already did; record a failure to write it."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError as exc:  # the client went away: nothing more to send
        ex.error = f"response not delivered: {exc or type(exc).__name__}"


# Marked as a new-style middleware: the admin application uses it too.
@web.middleware
async def render_problems(
    request: AnyRequest, handler: Callable[[AnyRequest], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Answer any `ProxyError` that escapes the flow as problem+json."""
    try:
        return await handler(request)
    except ProxyError as exc:
        exchange = request.get(EXCHANGE)
        if exchange is None:
            return exc.render()
        exchange.outcome = exc.outcome
        if exc.public is not None:
            exchange.error = exc.detail
        if not exc.answerable and request.transport is not None:
            request.transport.close()
            exchange.error = exc.detail
        return exc.render(exchange.request_id)


# Outermost first.
MIDDLEWARES: tuple[Middleware, ...] = (observe, render_problems)
