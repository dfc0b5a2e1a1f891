"""OpenTelemetry traces: a server span per request, a client span per store and upstream call.

Tracing is optional (`pip install 'idempotency-proxy[otel]'` and a `tracing:` block), so this
is the one module that imports OpenTelemetry, and `proxy.app` imports it only when tracing is
on: with tracing off no request pays for it and `opentelemetry` is never loaded. `Tracing`
owns the tracer provider and its OTLP/HTTP exporter for the life of the app, and hands out
the three hooks, each placed at an existing seam so the request path itself does not change:

- `Tracing.trace`, the outermost middleware: the server span, a child of the W3C
  `traceparent` the client sent, named and labelled from the `Exchange` when the request
  ends (route, outcome, key hash; never the key);
- `TracedStore`, around the store: a client span per `begin`, `complete` and `release` made
  for a request (lease renewals belong to no request and get none);
- `TracedUpstream`, the upstream client: a client span per upstream request, whose context
  goes upstream in `traceparent` / `tracestate`, so the service's spans are its children.

Sampling is parent-based: a request with a `traceparent` follows its sampled flag, one
without is sampled at `sample_ratio`. A request that is not sampled gets no span and no
context at all (the client's own trace headers, if any, pass upstream untouched), and with
`sample_ratio: 0` that is decided before OpenTelemetry is called. Unsampled requests must
cost next to nothing (`bench/tracing.py`), so each hook is a plain function that, unless
`_SAMPLED` is set, hands back the wrapped call's own coroutine: no span, no extra frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Coroutine
from contextvars import ContextVar
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import context as otel_context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer
from opentelemetry.trace import set_span_in_context as in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from yarl import URL

from proxy import __version__
from proxy.config import TracingConfig
from proxy.errors import ProxyError, UpstreamError
from proxy.exchange import EXCHANGE, Handler
from proxy.store.base import (
    Acquired,
    Decision,
    Expired,
    InProgress,
    Outcome,
    RecordInfo,
    Replay,
    Store,
)
from proxy.upstream import Answer, Body, UpstreamClient

# Spans still queued at shutdown get this long to reach the collector (a collector that does
# not answer loses them; the export request itself gives up after _EXPORT_TIMEOUT).
FLUSH_TIMEOUT = 3.0
_EXPORT_TIMEOUT = 2.0
TRACEPARENT = "traceparent"
_PREFIX = "idempotency_proxy."
_DECISIONS = {
    Acquired: "acquired",
    Replay: "replay",
    InProgress: "in_progress",
    Expired: "expired",
}
# Set while a sampled request is handled (and in the tasks it starts): a cheaper question
# than OpenTelemetry's `get_current_span().is_recording()`, asked on every store call.
_SAMPLED: ContextVar[bool] = ContextVar("sampled", default=False)


class Tracing:
    """The tracer provider of one app, its exporter, and the hooks that make spans."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self._provider = TracerProvider(
            sampler=ParentBasedTraceIdRatio(config.sample_ratio),
            resource=Resource.create({"service.name": config.service_name,
                                      "service.version": __version__}),
            shutdown_on_exit=False,  # `close` does it, within the shutdown
        )  # fmt: skip
        # Spans are batched and exported off the event loop, on the processor's own thread.
        exporter = OTLPSpanExporter(
            endpoint=config.endpoint, headers=dict(config.headers), timeout=_EXPORT_TIMEOUT
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self._provider.get_tracer("idempotency-proxy", __version__)
        self.propagator = TraceContextTextMapPropagator()
        # Without a parent, `sample_ratio: 0` drops every request: decided without the SDK.
        self._roots_dropped = config.sample_ratio == 0

    def trace(self, request: web.BaseRequest, handler: Handler) -> Awaitable[web.StreamResponse]:
        """The outermost middleware: the request's server span, current while it is handled."""
        if self._roots_dropped and TRACEPARENT not in request.headers:
            return handler(request)  # would not be sampled: no span, no context
        return self._traced(request, handler)

    async def _traced(self, request: web.BaseRequest, handler: Handler) -> web.StreamResponse:
        parent = self.propagator.extract(request.headers)
        span = self.tracer.start_span(request.method, parent, SpanKind.SERVER, {
            "http.request.method": request.method, "url.path": request.path,
            "url.scheme": request.scheme,
        })  # fmt: skip
        if not span.is_recording():  # the sampler dropped it: as if tracing were off
            return await handler(request)
        token = otel_context.attach(in_context(span))
        sampled = _SAMPLED.set(True)
        status = 499  # the handler was cancelled (shutdown grace ran out)
        try:
            response = await handler(request)
            status = response.status
            return response
        except Exception as exc:
            status = 500  # aiohttp answers 500 for an unhandled error
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            _SAMPLED.reset(sampled)
            otel_context.detach(token)
            self._finish(span, request, status)

    @staticmethod
    def _finish(span: Span, request: web.BaseRequest, status: int) -> None:
        """Name and label the server span from what the request did, then end it."""
        exchange = request.get(EXCHANGE)
        if exchange is not None:
            span.update_name(f"{request.method} {exchange.route}")
            span.set_attribute(_PREFIX + "route", exchange.route)
            span.set_attribute(_PREFIX + "outcome", str(exchange.outcome))
            span.set_attribute(_PREFIX + "request_id", exchange.request_id)
            if exchange.record is not None:
                span.set_attribute(_PREFIX + "key_hash", exchange.record)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:  # a server span's error: the proxy's answer was a failure
            span.set_status(StatusCode.ERROR)
        span.end()

    def store(self, inner: Store, system: str) -> TracedStore:
        """`inner` with a client span per request-path call; `system` is the backend's name."""
        return TracedStore(inner, self.tracer, system)

    def upstream(self, keepalive_timeout: float) -> TracedUpstream:
        """The upstream client, with a client span per request and trace context sent on."""
        return TracedUpstream(keepalive_timeout, self.tracer, self.propagator)

    def flush(self) -> bool:
        """Export every ended span now (blocking: call it from a thread)."""
        return self._provider.force_flush()

    async def close(self) -> None:
        """Export what is queued, within `FLUSH_TIMEOUT`, and stop the exporter.

        The SDK's shutdown blocks, so it runs on a thread of its own; a daemon thread, so that a
        collector that does not answer delays the proxy's exit by no more than the timeout.
        """
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_resolve, done)

        threading.Thread(target=shut_down, name="tracing-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, FLUSH_TIMEOUT)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TracedStore:
    """A store whose request-path calls (`begin`, `complete`, `release`) are client spans.

    Only calls made for a sampled request get one: lease renewals, health checks and the
    admin API run outside any request and pass straight through.
    """

    def __init__(self, inner: Store, tracer: Tracer, system: str) -> None:
        self.inner = inner
        self._tracer = tracer
        self._system = system

    def _span(self, operation: str) -> Span:
        return self._tracer.start_span(f"store {operation}", kind=SpanKind.CLIENT, attributes={
            "db.system.name": self._system, "db.operation.name": operation,
        })  # fmt: skip

    def begin(
        self,
        key: str,
        fingerprint: str,
        *,
        lease: float,
        ttl: float,
        takeover: bool,
        tombstone: float = 0.0,
    ) -> Coroutine[Any, Any, Decision]:
        call = self.inner.begin(key, fingerprint, lease=lease, ttl=ttl, takeover=takeover,
                                tombstone=tombstone)  # fmt: skip
        return self._begin(call) if _SAMPLED.get() else call

    def complete(
        self, key: str, token: str, outcome: Outcome, *, ttl: float, tombstone: float = 0.0
    ) -> Coroutine[Any, Any, bool]:
        call = self.inner.complete(key, token, outcome, ttl=ttl, tombstone=tombstone)
        return self._settle("complete", call) if _SAMPLED.get() else call

    def release(self, key: str, token: str) -> Coroutine[Any, Any, bool]:
        call = self.inner.release(key, token)
        return self._settle("release", call) if _SAMPLED.get() else call

    async def _begin(self, call: Coroutine[Any, Any, Decision]) -> Decision:
        span = self._span("begin")
        try:
            decision = await call
            span.set_attribute(_PREFIX + "decision", _DECISIONS.get(type(decision), "mismatch"))
            return decision
        except ProxyError as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    async def _settle(self, operation: str, call: Coroutine[Any, Any, bool]) -> bool:
        span = self._span(operation)
        try:
            done = await call
            if not done:  # the token no longer owns the record: nothing was stored
                span.set_attribute(_PREFIX + "fenced", True)
            return done
        except ProxyError as exc:
            _failed(span, exc)
            raise
        finally:
            span.end()

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        return await self.inner.renew(key, token, lease=lease)

    async def ping(self) -> None:
        await self.inner.ping()

    async def inspect(self, key: str) -> RecordInfo | None:
        return await self.inner.inspect(key)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def counts(self) -> dict[str, int]:
        return await self.inner.counts()

    async def close(self) -> None:
        await self.inner.close()


def _failed(span: Span, exc: ProxyError) -> None:
    """Mark a client span failed with the proxy's own error (the log line's text)."""
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(StatusCode.ERROR, exc.detail)


class TracedUpstream(UpstreamClient):
    """The upstream client, sending each request inside a client span whose context it
    passes on in `traceparent` (replacing the client's: the proxy's span is the parent)."""

    def __init__(self, keepalive_timeout: float, tracer: Tracer,
                 propagator: TraceContextTextMapPropagator) -> None:  # fmt: skip
        super().__init__(keepalive_timeout)
        self._tracer = tracer
        self._propagator = propagator

    def fetch(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes, *,
              deadline: float, upstream_timeout: float,
              limit: int) -> Coroutine[Any, Any, Answer]:  # fmt: skip
        call = super().fetch(method, url, headers, body, deadline=deadline,
                             upstream_timeout=upstream_timeout, limit=limit)  # fmt: skip
        return self._traced(method, url, headers, call) if _SAMPLED.get() else call

    def open(self, method: str, url: URL, headers: CIMultiDict[str], data: Body, *,
             idle: float) -> Coroutine[Any, Any, Answer]:  # fmt: skip
        """As `UpstreamClient.open`; the span ends when the response head is in (the body
        is streamed on to the client after that)."""
        call = super().open(method, url, headers, data, idle=idle)
        return self._traced(method, url, headers, call) if _SAMPLED.get() else call

    async def _traced(self, method: str, url: URL, headers: CIMultiDict[str],
                      call: Coroutine[Any, Any, Answer]) -> Answer:  # fmt: skip
        """Run `call` in a client span. `call` has not started yet: it sends `headers` as
        they are when it runs, with the span's context injected here."""
        span = self._start(method, url, headers)
        try:
            answer = await call
        except ProxyError as exc:  # from `open`, the client's body may have failed instead
            _failed(span, exc)
            if isinstance(exc, UpstreamError):
                span.set_attribute(_PREFIX + "delivered", exc.delivered)
            raise
        else:
            _answered(span, answer)
            return answer
        finally:
            span.end()

    def _start(self, method: str, url: URL, headers: CIMultiDict[str]) -> Span:
        """The client span of one upstream request, its context injected into `headers`."""
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes={
            "http.request.method": method, "server.address": url.host or "",
            "server.port": url.port or 0, "url.full": str(url.with_query(None)),
        })  # fmt: skip
        headers.popall("tracestate", None)  # the client's, for a parent that is no longer ours
        self._propagator.inject(headers, in_context(span))
        return span


def _answered(span: Span, answer: Answer) -> None:
    span.set_attribute("http.response.status_code", answer.status)
    if answer.status >= 400:  # a client span's error, by the HTTP conventions
        span.set_status(StatusCode.ERROR)
