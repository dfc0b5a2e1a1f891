"""The request path, top to bottom.

    route -> (not protected? stream through) -> key -> body (bounded) -> fingerprint
          -> store.begin -> acquired: forward (shielded, lease renewed) -> record -> respond
                            replay:   respond with the stored outcome
                            in progress: 409, or wait for the result (on_concurrent: wait)
                            mismatch: 422

One store round trip decides a request; a first attempt costs one more to record it.
A client that gives up does not cancel the upstream exchange of a first attempt (the server
runs handlers with `handler_cancellation` off): the result is still recorded and the retry
replays it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import HttpVersion11, web

from proxy import logs, metrics
from proxy.config import Config, RoutePolicy
from proxy.errors import (
    BodyTimeout,
    BodyTooLarge,
    KeyInUse,
    KeyMismatch,
    MissingKey,
    OutcomeUnknown,
    ProxyError,
    ResponseNotReplayable,
    StoreError,
)
from proxy.exchange import EXCHANGE, Exchange
from proxy.keys import STORAGE_PREFIX, fingerprint_request, parse_key, scope_of, storage_key
from proxy.leases import Held, Leases
from proxy.routing import Router
from proxy.store.base import (
    Acquired,
    Decision,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Store,
    StoredResponse,
)
from proxy.tasks import spawn
from proxy.upstream import (
    UPSTREAM_ERRORS,
    check_framing,
    connect_timeout,
    idle_timeout,
    make_response,
    origin_form,
    read_bounded,
    reason_phrase,
    request_headers,
    response_headers,
    target_url,
    translate,
)

REPLAYED = (("Idempotent-Replayed", "true"),)
_WAIT_FIRST_POLL = 0.005
_WAIT_MAX_POLL = 0.1
_CONFLICT_RETRY_AFTER = 1.0
_STORE_RETRY_FIRST = 0.05
_STORE_RETRY_MAX = 1.0


@dataclass(slots=True)
class _Streamed:
    """A first attempt whose response is too large to store: stream the rest through."""

    upstream: aiohttp.ClientResponse
    headers: list[tuple[str, str]]
    prefix: bytes


class Proxy:
    """Serves the proxy listener. One instance per config; `reload` swaps routes."""

    def __init__(self, config: Config, store: Store, session: aiohttp.ClientSession) -> None:
        self.store = store
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.leases = Leases(store)
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        self.router = Router(config.routes)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = request[EXCHANGE]
        check_framing(request)
        route = self.router.match(request.path)
        if route is None or request.method not in route.methods:
            if route is not None:
                ex.route = route.id
            return await self.stream(request, route or self.config.defaults, ex)
        ex.route = route.id
        values = request.headers.getall(route.key_header, ())
        if not values:
            if route.require_key:
                raise MissingKey(
                    f"{request.method} {route.path} requires a {route.key_header} header"
                )
            ex.outcome = "unprotected"
            return await self.stream(request, route, ex)
        key = parse_key(values, route.key_header)
        body = await read_body(request, route.max_request_body, self.config.body_read_timeout)
        scope = scope_of((name, request.headers.getall(name, ())) for name in route.scope_headers)
        record = storage_key(self.config.store.namespace, scope, key)
        ex.record = record[len(STORAGE_PREFIX) :]
        raw_path, _, query = origin_form(request).partition("?")
        fingerprint = fingerprint_request(request.method, raw_path, query, body)

        try:
            decision = await self.begin(record, fingerprint, route)
            if isinstance(decision, InProgress) and route.on_concurrent == "wait":
                decision = await self.wait(record, fingerprint, route, ex)
        except StoreError as exc:
            if self.config.store.fail_mode == "closed":
                raise
            logs.event("store unavailable; forwarding unprotected (fail_mode: open)",
                       route=route.id, key_hash=ex.record, error=exc.detail)  # fmt: skip
            ex.outcome = "store_unavailable"
            return await self.stream(request, route, ex, body=body)

        if isinstance(decision, Acquired):
            return await self.execute(request, route, record, decision, body, ex)
        if isinstance(decision, Replay):
            if ex.outcome != "waited":
                ex.outcome = "replayed"
            return replay(decision.outcome, route)
        if isinstance(decision, InProgress):
            raise KeyInUse(
                f"a request with this {route.key_header} is still being processed; "
                "retry later to get its result",
                retry_after=_CONFLICT_RETRY_AFTER,
            )
        assert isinstance(decision, Mismatch)
        raise KeyMismatch(
            f"this {route.key_header} was first used with a different request "
            "(method, path, query or body); use a new key for a new request"
        )

    def begin(self, record: str, fingerprint: str, route: RoutePolicy) -> Awaitable[Decision]:
        """The one store round trip that decides a request, with the route's settings."""
        return self.store.begin(record, fingerprint, lease=route.lease, ttl=route.ttl,
                                takeover=route.on_unknown_outcome == "retry")  # fmt: skip

    async def wait(
        self, record: str, fingerprint: str, route: RoutePolicy, ex: Exchange
    ) -> Decision:
        """Poll until the first attempt settles or `wait_timeout` passes."""
        deadline = time.monotonic() + route.wait_timeout
        delay = _WAIT_FIRST_POLL
        metrics.WAITING.inc()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return InProgress(_CONFLICT_RETRY_AFTER)
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, _WAIT_MAX_POLL)
                decision = await self.begin(record, fingerprint, route)
                if isinstance(decision, Replay):
                    ex.outcome = "waited"
                if not isinstance(decision, InProgress):
                    return decision
        finally:
            metrics.WAITING.dec()

    async def execute(self, request: web.BaseRequest, route: RoutePolicy, record: str,
                      lock: Acquired, body: bytes, ex: Exchange) -> web.StreamResponse:  # fmt: skip
        """Forward a first attempt, record its outcome, answer the client.

        A client that disconnects does not stop this: the server runs handlers with
        `handler_cancellation` off (see `proxy.server`), so the exchange still completes and
        is recorded, and the retry replays it.
        """
        deadline = self.loop.time() + route.upstream_timeout
        result = await self.forward_and_record(request, route, record, lock, body, ex, deadline)
        if isinstance(result, StoredResponse):
            return make_response(result.status, result.headers, result.body)
        return await stream_rest(request, result, deadline)

    async def forward_and_record(self, request: web.BaseRequest, route: RoutePolicy, record: str,
                                 lock: Acquired, body: bytes, ex: Exchange,
                                 deadline: float) -> StoredResponse | _Streamed:  # fmt: skip
        """The owner's exchange: forward, then complete (store) or release the record.

        The lease is renewed until the record is settled, in the background if the store
        failed, so that it cannot lapse while the result is still on its way to the store.
        """
        ex.outcome = "forwarded"
        lease = self.leases.hold(record, lock.token, route.lease)
        handed_off = False  # a background retry owns the lease from then on
        try:
            url = target_url(route.upstream, request)
            started = time.perf_counter()
            upstream: aiohttp.ClientResponse | None = None
            metrics.IN_FLIGHT_RECORDS.inc()
            try:
                async with asyncio.timeout_at(deadline):  # the whole exchange, body included
                    upstream = await self.session.request(
                        request.method, url, headers=request_headers(request, keep_length=False),
                        data=body, allow_redirects=False,
                        timeout=connect_timeout(route.upstream_timeout),
                    )  # fmt: skip
                    content, whole = await read_bounded(upstream, route.max_stored_response)
            except UPSTREAM_ERRORS as exc:
                if upstream is not None:
                    upstream.close()
                ex.upstream_seconds = time.perf_counter() - started
                error = translate(exc, url)
                if not error.delivered or route.on_unknown_outcome == "retry":
                    handed_off = await self.release(record, lock.token, lease)
                    raise error from exc
                # Delivered, outcome unknown: this answer is the key's terminal result.
                status, headers, content = error.parts(ex.request_id)
                ex.error = error.detail
                response = StoredResponse(status, tuple(headers), content)
                ex.outcome = error.outcome
                outcome = Outcome("response", response)
                handed_off = await self.record(record, lock.token, outcome, route, ex, lease)
                return response
            finally:
                metrics.IN_FLIGHT_RECORDS.dec()

            ex.upstream_status = upstream.status
            ex.upstream_seconds = time.perf_counter() - started
            headers = response_headers(upstream.headers, keep_length=not whole)
            if upstream.status in route.release_statuses:
                ex.outcome = "released"
                handed_off = await self.release(record, lock.token, lease)
            elif whole:
                stored = StoredResponse(upstream.status, tuple(headers), content)
                outcome = Outcome("response", stored)
                handed_off = await self.record(record, lock.token, outcome, route, ex, lease)
                metrics.STORED_BYTES.observe(len(content))
            else:
                ex.outcome = "too_large"
                outcome = Outcome("too_large", StoredResponse(upstream.status, (), b""))
                handed_off = await self.record(record, lock.token, outcome, route, ex, lease)
            if whole:
                upstream.release()
                return StoredResponse(upstream.status, tuple(headers), content)
            return _Streamed(upstream, headers, content)
        finally:
            if not handed_off:
                self.leases.release(lease)

    async def record(self, record: str, token: str, outcome: Outcome,
                     route: RoutePolicy, ex: Exchange, lease: Held) -> bool:  # fmt: skip
        """Complete the record. If the store fails, the client still gets its answer now,
        and the result is recorded in the background once the store answers again; then
        return True: the background task owns the lease."""
        try:
            stored = await self.store.complete(record, token, outcome, ttl=route.ttl)
        except StoreError as exc:
            logs.event("store failed after the upstream answered; recording in the background",
                       route=route.id, key_hash=ex.record, error=exc.detail)  # fmt: skip
            spawn(self.record_later(record, token, outcome, route, lease), "store-retry")
            return True
        if not stored:
            ex.outcome = "fenced"
            logs.event("result not recorded: the record was taken over (fenced out)",
                       route=route.id, key_hash=ex.record)  # fmt: skip
        return False

    async def record_later(self, record: str, token: str, outcome: Outcome,
                           route: RoutePolicy, lease: Held) -> None:  # fmt: skip
        """Retry a failed complete for up to one lease, renewing it meanwhile: a store that
        restarts quickly (with its data) then replays the result, not "outcome unknown"."""
        key_hash = record.removeprefix(STORAGE_PREFIX)
        stored: bool | None = None
        try:
            stored = await self.keep_trying(
                lambda: self.store.complete(record, token, outcome, ttl=route.ttl), route.lease
            )
        finally:  # also when shutdown cancels the retry
            self.leases.release(lease)
            if stored is None:
                metrics.UNRECORDED.labels(route.id).inc()
                logs.event("result not recorded: the store did not answer in time",
                           route=route.id, key_hash=key_hash)  # fmt: skip
            else:
                logs.event("result recorded after the store came back" if stored
                           else "result not recorded: the record was taken over (fenced out)",
                           route=route.id, key_hash=key_hash)  # fmt: skip

    async def release(self, record: str, token: str, lease: Held) -> bool:
        """Free a key whose request was never delivered (or was refused with a release
        status). If the store fails, keep trying in the background for up to one lease
        (then return True: the background task owns the lease); if it never answers, the
        record waits for its lease to lapse."""
        try:
            await self.store.release(record, token)
        except StoreError as exc:
            key_hash = record.removeprefix(STORAGE_PREFIX)
            logs.event("record not released: store failed; retrying in the background",
                       key_hash=key_hash, error=exc.detail)  # fmt: skip
            spawn(self.release_later(record, token, lease), "store-retry")
            return True
        return False

    async def release_later(self, record: str, token: str, lease: Held) -> None:
        try:
            await self.keep_trying(lambda: self.store.release(record, token), lease.lease)
        finally:
            self.leases.release(lease)

    async def keep_trying(self, call: Callable[[], Awaitable[bool]], within: float) -> bool | None:
        """Retry a store call with back-off for up to `within` seconds; None if it never
        answered."""
        deadline = self.loop.time() + within
        delay = _STORE_RETRY_FIRST
        while self.loop.time() + delay < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _STORE_RETRY_MAX)
            try:
                return await call()
            except StoreError:
                continue
        return None

    async def stream(self, request: web.BaseRequest, route: RoutePolicy, ex: Exchange,
                     body: bytes | None = None) -> web.StreamResponse:  # fmt: skip
        """Pass a request through without buffering either direction (unless `body`)."""
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            await send_continue(request)
            if request.content.is_eof():  # it all came with the headers: no need to stream
                data = request.content.read_nowait()
            else:
                data = stream_body(request, self.config.body_read_timeout)
        url = target_url(route.upstream, request)
        started = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method, url, headers=request_headers(request, keep_length=body is None),
                data=data, allow_redirects=False, timeout=idle_timeout(route.upstream_timeout),
            )  # fmt: skip
        except UPSTREAM_ERRORS as exc:
            ex.upstream_seconds = time.perf_counter() - started
            if isinstance(exc.__cause__, BodyTimeout):  # the client stalled, not the upstream
                raise exc.__cause__ from None
            raise translate(exc, url) from exc
        ex.upstream_status = upstream.status
        response = web.StreamResponse(status=upstream.status, reason=reason_phrase(upstream.reason))
        response.headers.extend(response_headers(upstream.headers, keep_length=True))
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except UPSTREAM_ERRORS:
            _abort(request)  # the status line is sent: all we can say is "truncated"
        finally:
            upstream.release()
            ex.upstream_seconds = time.perf_counter() - started
        return response


async def read_body(request: web.BaseRequest, limit: int, timeout: float) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"the request body is {request.content_length} bytes; the limit is {limit}"
        )
    await send_continue(request)
    content = request.content
    if content.is_eof():  # the usual case: the whole body came in with the headers
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g}s") from exc
    return b"".join(chunks)


async def send_continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` once the proxy has decided to read the body.

    Called only after the key and the declared length have passed, so a request the proxy
    refuses is refused before the client sends its body.
    """
    if (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
        and not request.content.is_eof()
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the 100 is not part of the response's size


async def stream_body(request: web.BaseRequest, idle: float) -> AsyncIterator[bytes]:
    """The request body as it arrives. A client silent for `idle` seconds is cut off, so a
    body that stalls (or whose chunked framing broke mid-way, which aiohttp never reports to
    the handler) cannot hold an upstream connection forever."""
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            raise BodyTimeout(f"the request body stalled for {idle:g}s") from exc
        if not chunk:
            return
        yield chunk


def replay(outcome: Outcome, route: RoutePolicy) -> web.Response:
    """The stored answer for a key that is done."""
    if outcome.kind == "response":
        stored = outcome.response
        return make_response(stored.status, stored.headers, stored.body, REPLAYED)
    error: ProxyError
    if outcome.kind == "too_large":
        error = ResponseNotReplayable(
            f"the first request with this {route.key_header} completed with status "
            f"{outcome.response.status}, but its response was too large to store; "
            "it was not executed again"
        )
    else:
        error = OutcomeUnknown(
            f"the proxy handling the first request with this {route.key_header} stopped before "
            "the upstream answered; it may or may not have acted. It was not executed again; "
            "reconcile with the upstream, or use a new key"
        )
    status, headers, body = error.parts()
    return make_response(status, headers, body, REPLAYED)


async def stream_rest(
    request: web.BaseRequest, streamed: _Streamed, deadline: float
) -> web.StreamResponse:
    """Send a response too large to store: what was read, then the rest as it comes."""
    upstream = streamed.upstream
    response = web.StreamResponse(status=upstream.status, reason=reason_phrase(upstream.reason))
    response.headers.extend(streamed.headers)
    try:
        async with asyncio.timeout_at(deadline):  # upstream_timeout covers the body too
            await response.prepare(request)
            await response.write(streamed.prefix)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
    except (*UPSTREAM_ERRORS, ConnectionError):
        _abort(request)
    finally:
        upstream.release()
    return response


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()
