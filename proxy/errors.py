"""The proxy's own errors, each one a problem+json answer (RFC 9457).

Every answer the proxy makes itself has a stable `type` URI, so a client can tell the
proxy's 409/422 from the upstream's own. Third-party exceptions are translated into this
tree at one boundary each (`proxy.upstream` for aiohttp, `proxy.store.redis` for redis-py),
with `raise ... from exc`; the rest of the code only ever catches these.

    ProxyError                      status  type (urn:idempotency-proxy:problem:...)
    ├── RequestError                        the client's request is at fault
    │   ├── InvalidTarget           400     invalid-target       (not origin- or absolute-form)
    │   ├── UnsupportedMethod       501     method-not-implemented (CONNECT: no tunnels)
    │   ├── UnsupportedTransferCoding 501   transfer-coding-not-implemented (only chunked)
    │   ├── UnsupportedVersion      505     (connection closed: not HTTP/1.x, no answer it reads)
    │   ├── MissingKey              400     missing-key
    │   ├── InvalidKey              400     invalid-key
    │   ├── BodyTimeout             408     body-timeout
    │   ├── BodyTooLarge            413     body-too-large
    │   ├── KeyInUse                409     key-in-use           (Retry-After)
    │   ├── KeyMismatch             422     key-mismatch
    │   ├── ResponseNotReplayable   409     response-not-replayable
    │   └── ResponseExpired         409     response-expired     (past ttl, inside tombstone_ttl)
    ├── StoreError                          the store failed; raised by store backends
    │   └── StoreUnavailable        503     store-unavailable    (Retry-After)
    ├── UpstreamError                       the upstream exchange failed
    │   ├── UpstreamUnreachable     502     upstream-unreachable (never delivered)
    │   ├── UpstreamTimeout         504     upstream-timeout     (outcome unknown)
    │   └── UpstreamDisconnected    502     upstream-disconnected (outcome unknown)
    └── OutcomeUnknown              502     outcome-unknown      (first owner died)

A problem body never names an internal host, port or library error: errors whose message
holds such details (the store's, the upstream's) show a fixed `public` text instead, and the
message goes to the log line that the body's `request_id` points to.

The admin API's own problems (unauthorized, unknown record, ...) are listed in `proxy.admin`.
"""

from __future__ import annotations

import json
import math
from typing import ClassVar

from aiohttp import web

from proxy.outcomes import RequestOutcome

PROBLEM_TYPE_PREFIX = "urn:idempotency-proxy:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"


class ProxyError(Exception):
    """An error the proxy answers itself, rendered as problem+json."""

    status: ClassVar[int] = 500
    # The request's outcome when this error answers it (an instance may say otherwise: an
    # upstream failure on a pass-through stores nothing, so it is no "unknown outcome").
    outcome: RequestOutcome = RequestOutcome.UPSTREAM_ERROR
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal proxy error"
    # When set, the client sees this instead of `detail`, which then goes to the log only.
    public: ClassVar[str | None] = None
    # The request's framing cannot be trusted: answer, then close the connection.
    close_connection: ClassVar[bool] = False
    # False when the client could not read an answer at all: the connection is just closed.
    answerable: ClassVar[bool] = True

    def __init__(self, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.slug

    def to_problem(self) -> dict[str, object]:
        return {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.public if self.public is not None else self.detail,
        }

    def parts(self, request_id: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body of the problem response."""
        headers = [("Content-Type", PROBLEM_CONTENT_TYPE), ("Cache-Control", "no-store")]
        if self.retry_after is not None:
            headers.append(("Retry-After", str(max(1, math.ceil(self.retry_after)))))
        problem = self.to_problem()
        if request_id is not None:
            problem["request_id"] = request_id
        return self.status, headers, json.dumps(problem).encode()

    def render(self, request_id: str | None = None) -> web.Response:
        status, headers, body = self.parts(request_id)
        response = web.Response(status=status, body=body, headers=headers)
        if self.close_connection:
            response.force_close()
        return response


class RequestError(ProxyError):
    """The client's request cannot be accepted as it is."""

    status = 400
    outcome = RequestOutcome.BAD_REQUEST


class InvalidTarget(RequestError):
    status = 400
    outcome = RequestOutcome.BAD_REQUEST
    slug = "invalid-target"
    title = "Request target not accepted"


class UnsupportedMethod(RequestError):
    status = 501
    outcome = RequestOutcome.BAD_REQUEST
    slug = "method-not-implemented"
    title = "Method not implemented by the proxy"


class UnsupportedTransferCoding(RequestError):
    status = 501
    outcome = RequestOutcome.BAD_REQUEST
    slug = "transfer-coding-not-implemented"
    title = "Transfer coding not implemented"
    close_connection = True


class UnsupportedVersion(RequestError):
    """HTTP/0.9 or a textual HTTP/2.0 request: the client could not read an HTTP/1.x answer,
    and aiohttp would write its status line in the client's version. The connection is
    closed without one; the 505 is what the access log records."""

    status = 505
    outcome = RequestOutcome.BAD_REQUEST
    slug = "http-version-not-supported"
    title = "HTTP version not supported"
    close_connection = True
    answerable = False


class MissingKey(RequestError):
    status = 400
    outcome = RequestOutcome.MISSING_KEY
    slug = "missing-key"
    title = "Idempotency key required"


class InvalidKey(RequestError):
    status = 400
    outcome = RequestOutcome.INVALID_KEY
    slug = "invalid-key"
    title = "Invalid idempotency key"


class BodyTimeout(RequestError):
    status = 408
    outcome = RequestOutcome.BAD_REQUEST
    slug = "body-timeout"
    title = "Request body not received in time"


class BodyTooLarge(RequestError):
    status = 413
    outcome = RequestOutcome.TOO_LARGE
    slug = "body-too-large"
    title = "Request body too large"


class KeyInUse(RequestError):
    status = 409
    outcome = RequestOutcome.CONFLICT
    slug = "key-in-use"
    title = "A request with this idempotency key is still being processed"


class KeyMismatch(RequestError):
    status = 422
    outcome = RequestOutcome.MISMATCH
    slug = "key-mismatch"
    title = "Idempotency key reused for a different request"


class ResponseNotReplayable(RequestError):
    status = 409
    outcome = RequestOutcome.REPLAYED
    slug = "response-not-replayable"
    title = "The first request completed, but its response was too large to store"


class ResponseExpired(RequestError):
    status = 409
    outcome = RequestOutcome.EXPIRED
    slug = "response-expired"
    title = "This request was executed; its response is no longer available"


class StoreError(ProxyError):
    """The idempotency store failed; backends raise this, never their client's errors."""

    status = 503
    outcome = RequestOutcome.STORE_UNAVAILABLE
    slug = "store-unavailable"
    title = "Idempotency store unavailable"
    public = (
        "the idempotency store did not answer in time; the request was not forwarded. "
        "Retry after the time in Retry-After"
    )


class StoreUnavailable(StoreError):
    pass


class UpstreamError(ProxyError):
    """The upstream exchange failed. `delivered` says whether the upstream may have acted."""

    status = 502
    outcome = RequestOutcome.UPSTREAM_ERROR
    delivered: ClassVar[bool] = True


class UpstreamUnreachable(UpstreamError):
    status = 502
    outcome = RequestOutcome.UPSTREAM_ERROR
    slug = "upstream-unreachable"
    title = "Upstream unreachable"
    public = "the upstream could not be reached; the request was not delivered and may be retried"
    delivered = False


class UpstreamTimeout(UpstreamError):
    status = 504
    outcome = RequestOutcome.UNKNOWN_OUTCOME
    slug = "upstream-timeout"
    title = "Upstream did not answer in time; outcome unknown"
    public = "the upstream did not answer within the proxy's timeout; it may have acted on it"


class UpstreamDisconnected(UpstreamError):
    status = 502
    outcome = RequestOutcome.UNKNOWN_OUTCOME
    slug = "upstream-disconnected"
    title = "Upstream dropped the connection; outcome unknown"
    public = "the upstream broke off the exchange after the request was sent; it may have acted"


class OutcomeUnknown(ProxyError):
    status = 502
    outcome = RequestOutcome.UNKNOWN_OUTCOME
    slug = "outcome-unknown"
    title = "Outcome of the first request unknown"
