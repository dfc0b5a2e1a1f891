"""The request path, top to bottom.

    framing -> route -> (not protected? stream through) -> key -> body (bounded)
            -> fingerprint -> store.begin -> acquired: forward, settle the record, respond
                                             replay:   respond with the stored outcome
                                             in progress: 409, or wait (on_concurrent: wait)
                                             mismatch: 422
                                             expired (a tombstone): 409

A route in `mode: observe` takes `Proxy.observe` instead: every request is forwarded, the
records are kept as above, and what enforcing would have changed is counted
(`proxy.observing`).

One store round trip decides a request; a first attempt costs one more to record it. The
owner of a key (`proxy.owner.Owner`) settles its record; the upstream client
(`proxy.upstream`) is the only code that speaks aiohttp's client. A client that gives up
does not cancel the upstream exchange of a first attempt (the server runs handlers with
`handler_cancellation` off): the result is still recorded and the retry replays it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from functools import partial

from aiohttp import web

from proxy import logs, metrics, observing
from proxy.bodies import read_body, read_bounded, send_continue, stream_body
from proxy.config import Config, RoutePolicy
from proxy.errors import (
    InvalidKey,
    KeyInUse,
    KeyMismatch,
    MissingKey,
    OutcomeUnknown,
    ProxyError,
    ResponseExpired,
    ResponseNotReplayable,
    StoreError,
    UpstreamError,
)
from proxy.exchange import EXCHANGE, Exchange
from proxy.identity import identify
from proxy.keys import RecordKey, parse_key
from proxy.leases import Leases
from proxy.observing import KeylessWindow, Would
from proxy.outcomes import RequestOutcome
from proxy.owner import Owner, Settled
from proxy.routing import Router
from proxy.store.base import (
    Acquired,
    Decision,
    Expired,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Store,
    StoredResponse,
)
from proxy.targets import check_framing, origin_form, target_url
from proxy.upstream import Answer, UpstreamClient, make_response, request_headers

REPLAYED = (("Idempotent-Replayed", "true"),)
_WAIT_FIRST_POLL = 0.005
_WAIT_MAX_POLL = 0.1
_CONFLICT_RETRY_AFTER = 1.0


class Proxy:
    """Serves the proxy listener. One instance per config; `reload` swaps routes."""

    def __init__(self, config: Config, store: Store, upstream: UpstreamClient) -> None:
        self.store = store
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.leases = Leases(store)
        self.keyless_seen = KeylessWindow()
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        self.router = Router(config.routes)
        metrics.declare_routes(route.id for route in config.routes)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = request[EXCHANGE]
        check_framing(request)
        route = self.router.match(request.path)
        if route is None or request.method not in route.methods:
            if route is not None:
                ex.route = route.id
            return await self.stream(request, route or self.config.defaults, ex)
        ex.route = route.id
        if route.mode == "observe":
            return await self.observe(request, route, ex)
        values = request.headers.getall(route.key_header, ())
        if not values:
            if route.require_key:
                raise MissingKey(
                    f"{request.method} {route.path} requires a {route.key_header} header"
                )
            ex.outcome = RequestOutcome.UNPROTECTED
            return await self.keyless(request, route, ex)
        key = parse_key(values, route.key_header)
        target = origin_form(request)
        body = await read_body(request, route.max_request_body, self.config.body_read_timeout)
        record, fingerprint = identify(request, route, self.config.store.namespace, key,
                                       target, body)  # fmt: skip
        ex.record = record.hash
        try:
            decision = await self.decide(record, fingerprint, route, ex)
        except StoreError as exc:
            if self.config.store.fail_mode == "closed":
                raise
            logs.event("store unavailable; forwarding unprotected (fail_mode: open)",
                       route=route.id, key_hash=ex.record, error=exc.detail)  # fmt: skip
            ex.outcome = RequestOutcome.STORE_UNAVAILABLE
            return await self.stream(request, route, ex, body=body)
        if isinstance(decision, Acquired):
            owner = self.own(record, decision, route)
            return await self.execute(request, route, owner, target, body, ex)
        return answer(decision, route, ex)

    def own(self, record: RecordKey, acquired: Acquired, route: RoutePolicy) -> Owner:
        """The owner of a key this request acquired, with the route's lease, ttl, tombstone."""
        return Owner(self.store, self.leases, record, acquired.token, lease=route.lease,
                     ttl=route.ttl, route=route.id, tombstone=route.tombstone_ttl)  # fmt: skip

    async def decide(
        self, record: RecordKey, fingerprint: str, route: RoutePolicy, ex: Exchange
    ) -> Decision:
        """The one store round trip that decides a request (and, with `on_concurrent: wait`,
        the checks while a first attempt runs)."""
        decision = await self.begin(record, fingerprint, route)
        if isinstance(decision, InProgress) and route.on_concurrent == "wait":
            decision = await self.wait(record, fingerprint, route, ex)
        return decision

    def begin(self, record: RecordKey, fingerprint: str, route: RoutePolicy) -> Awaitable[Decision]:
        """The deciding store call, with the route's settings."""
        return self.store.begin(record.store, fingerprint, lease=route.lease, ttl=route.ttl,
                                takeover=route.on_unknown_outcome == "retry",
                                tombstone=route.tombstone_ttl)  # fmt: skip

    async def wait(
        self, record: RecordKey, fingerprint: str, route: RoutePolicy, ex: Exchange
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
                    ex.outcome = RequestOutcome.WAITED
                if not isinstance(decision, InProgress):
                    return decision
        finally:
            metrics.WAITING.dec()

    async def observe(
        self, request: web.BaseRequest, route: RoutePolicy, ex: Exchange
    ) -> web.StreamResponse:
        """`mode: observe`: forward every request as a plain reverse proxy would, keep the
        records enforcing keeps, and count what enforcing would have changed.

        A first attempt is executed and recorded exactly as in enforce (so a reload to
        enforce protects its key at once); every other request is streamed through as it is,
        and counted. The store never fails a request here: when it does not answer, the
        request goes through unrecorded (as with `fail_mode: open`).
        """
        requests, keys = metrics.observed(route.id)
        requests.inc()
        ex.outcome = RequestOutcome.OBSERVED
        values = request.headers.getall(route.key_header, ())
        try:
            key = parse_key(values, route.key_header) if values else None
        except InvalidKey:
            observing.sighted(Would.REJECT_INVALID_KEY, route.id)
            return await self.stream(request, route, ex)
        if key is None:
            if route.require_key:
                observing.sighted(Would.REJECT_MISSING_KEY, route.id)
            else:
                ex.outcome = RequestOutcome.UNPROTECTED
            return await self.keyless(request, route, ex)
        body = await read_bounded(request, route.max_request_body, self.config.body_read_timeout)
        if not isinstance(body, bytes):
            observing.sighted(Would.REJECT_TOO_LARGE, route.id)
            return await self.stream(request, route, ex, body=body)
        target = origin_form(request)
        record, fingerprint = identify(request, route, self.config.store.namespace, key,
                                       target, body)  # fmt: skip
        ex.record = record.hash
        try:
            decision = await self.begin(record, fingerprint, route)
        except StoreError as exc:
            logs.event("store unavailable; observed request forwarded unrecorded",
                       route=route.id, key_hash=ex.record, error=exc.detail)  # fmt: skip
            ex.outcome = RequestOutcome.STORE_UNAVAILABLE
            return await self.stream(request, route, ex, body=body)
        if isinstance(decision, Acquired):
            keys.inc()
            owner = self.own(record, decision, route)
            return await self.execute(request, route, owner, target, body, ex)
        try:
            return await self.stream(request, route, ex, body=body)
        finally:  # a duplicate counts even when the upstream failed to answer it
            observing.duplicate(decision, route.id, record, ex.upstream_status)

    async def keyless(
        self, request: web.BaseRequest, route: RoutePolicy, ex: Exchange
    ) -> web.StreamResponse:
        """Forward a protected method sent without a key; with `observe_keyless`, count it
        when an identical one came within that window. Counted only, never blocked."""
        if route.observe_keyless is None:
            return await self.stream(request, route, ex)
        body = await read_bounded(request, route.max_request_body, self.config.body_read_timeout)
        if isinstance(body, bytes):
            self.keyless_seen.check(request, route, body)
        return await self.stream(request, route, ex, body=body)

    async def execute(self, request: web.BaseRequest, route: RoutePolicy, owner: Owner,
                      target: str, body: bytes, ex: Exchange) -> web.StreamResponse:  # fmt: skip
        """Forward a first attempt, answer the client, settle its record.

        The answer does not wait for the result to be recorded: `ex.settle` records it once
        the answer is on its way (see `proxy.exchange.observe`), and until then the lease
        guards the key, so a retry meanwhile gets 409, never a second execution. A release
        is awaited first: a retry after a 429/503 must find the key free.

        A client that disconnects does not stop this: the server runs handlers with
        `handler_cancellation` off (see `proxy.server`), so the exchange still completes and
        is recorded, and the retry replays it.
        """
        ex.outcome = RequestOutcome.FORWARDED
        deadline = self.loop.time() + route.upstream_timeout
        started = time.perf_counter()
        try:
            reply = await self.upstream.fetch(
                request.method, target_url(route.upstream, target),
                request_headers(request, keep_length=False), body, deadline=deadline,
                upstream_timeout=route.upstream_timeout, limit=route.max_stored_response,
            )  # fmt: skip
        except UpstreamError as error:
            ex.upstream_seconds = time.perf_counter() - started
            if not error.delivered or route.on_unknown_outcome == "retry":
                await owner.release()
                raise
            # Delivered, outcome unknown: this answer is the key's terminal result.
            ex.outcome, ex.error = error.outcome, error.detail
            status, headers, content = error.parts(ex.request_id)
            stored = StoredResponse(status, tuple(headers), content)
            ex.settle = partial(self.record, owner, Outcome("response", stored), ex)
            return make_response(stored.status, stored.headers, stored.body)
        except BaseException:
            owner.abandon()  # not accounted for (a bug, or shutdown): the lease lapses
            raise
        ex.upstream_status = reply.status
        ex.upstream_seconds = time.perf_counter() - started
        if reply.status in route.release_statuses:
            ex.outcome = RequestOutcome.RELEASED
            await owner.release()
        elif reply.complete:
            stored = StoredResponse(reply.status, tuple(reply.headers), reply.body)
            ex.settle = partial(self.record, owner, Outcome("response", stored), ex)
            metrics.STORED_BYTES.observe(len(reply.body))
        else:
            ex.outcome = RequestOutcome.TOO_LARGE
            await self.record(
                owner, Outcome("too_large", StoredResponse(reply.status, (), b"")), ex
            )
            return await stream_rest(request, reply, deadline)
        return make_response(reply.status, reply.headers, reply.body)

    async def record(self, owner: Owner, outcome: Outcome, ex: Exchange) -> None:
        if await owner.complete(outcome) is Settled.FENCED:
            ex.outcome = RequestOutcome.FENCED

    async def stream(self, request: web.BaseRequest, route: RoutePolicy, ex: Exchange,
                     body: bytes | AsyncIterator[bytes] | None = None,
                     ) -> web.StreamResponse:  # fmt: skip
        """Pass a request through without buffering either direction (unless `body`: the
        body read already, whole or as the stream of what was read and what follows)."""
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            await send_continue(request)
            if request.content.is_eof():  # it all came with the headers: no need to stream
                data = request.content.read_nowait()
            else:
                data = stream_body(request, self.config.body_read_timeout)
        url = target_url(route.upstream, origin_form(request))
        headers = request_headers(request, keep_length=not isinstance(body, bytes))
        started = time.perf_counter()
        try:
            reply = await self.upstream.open(
                request.method, url, headers, data, idle=route.upstream_timeout
            )
        except UpstreamError as exc:
            ex.upstream_seconds = time.perf_counter() - started
            exc.outcome = RequestOutcome.UPSTREAM_ERROR  # nothing was stored for a key
            raise
        ex.upstream_status = reply.status
        response = web.StreamResponse(status=reply.status, reason=reply.reason)
        response.headers.extend(reply.headers)
        try:
            await response.prepare(request)
            async for chunk in reply.chunks():
                await response.write(chunk)
            await response.write_eof()
        except (UpstreamError, ConnectionError):
            _abort(request)  # the status line is sent: all we can say is "truncated"
        finally:
            reply.close()
            ex.upstream_seconds = time.perf_counter() - started
        return response


def answer(decision: Decision, route: RoutePolicy, ex: Exchange) -> web.StreamResponse:
    """The answer to a request whose key another request already holds or settled."""
    if isinstance(decision, Replay):
        if ex.outcome != RequestOutcome.WAITED:
            ex.outcome = RequestOutcome.REPLAYED
        return replay(decision.outcome, route)
    if isinstance(decision, InProgress):
        raise KeyInUse(
            f"a request with this {route.key_header} is still being processed; "
            "retry later to get its result",
            retry_after=_CONFLICT_RETRY_AFTER,
        )
    if isinstance(decision, Expired):
        answered = f"the upstream answered {decision.status}" if decision.status else (
            "its outcome is unknown")  # fmt: skip
        raise ResponseExpired(
            f"the first request with this {route.key_header} was executed ({answered}); its "
            "response is past its ttl and no longer available. It was not executed again; "
            "use a new key for a new request"
        )
    assert isinstance(decision, Mismatch)
    raise KeyMismatch(
        f"this {route.key_header} was first used with a different request "
        "(method, path, query or body); use a new key for a new request"
    )


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
    request: web.BaseRequest, reply: Answer, deadline: float
) -> web.StreamResponse:
    """Send a response too large to store: what was read, then the rest as it comes."""
    response = web.StreamResponse(status=reply.status, reason=reply.reason)
    response.headers.extend(reply.headers)
    try:
        async with asyncio.timeout_at(deadline):  # upstream_timeout covers the body too
            await response.prepare(request)
            await response.write(reply.body)
            async for chunk in reply.chunks():
                await response.write(chunk)
            await response.write_eof()
    except (UpstreamError, TimeoutError, ConnectionError):
        _abort(request)
    finally:
        reply.close()
    return response


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.close()
