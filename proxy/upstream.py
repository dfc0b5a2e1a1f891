"""Talking to the legacy upstream: the pooled client, header rules, and error translation.

This is the one module that speaks aiohttp's client. `UpstreamClient` sends a request and
hands back an `Answer` (status, sendable headers, body read or to stream); aiohttp client
errors become `UpstreamError`s here and nowhere else. The translation decides the most
important question of a failed exchange: could the upstream have acted? Only a connection
that was never established proves the request was not delivered; everything after that (a
timeout, a reset, a truncated answer) means "outcome unknown".
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Iterable
from email.utils import formatdate

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    ProxyError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.masking import redact_urls_in

# RFC 9110 section 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
              "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Connection", "Expect")
)  # fmt: skip
# Recomputed by whoever writes the body next.
_HOP_BY_HOP_AND_FRAMING = HOP_BY_HOP | {"content-length"}
_CONNECT_TIMEOUT = 5.0
# RFC 9110 5.1 and 5.5: a field name is a token; a value is visible characters, spaces and
# tabs (and obs-text). aiohttp's client accepts more than its server will write.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def _create_session(keepalive_timeout: float) -> aiohttp.ClientSession:
    """The one pooled client for every upstream; bodies pass through undecoded.

    Idle connections are closed after `keepalive_timeout`, which must stay below the
    upstream server's own idle timeout: a POST sent on a connection the upstream is closing
    at that moment fails after sending, which counts as "outcome unknown" although nothing
    was delivered.

    Only connecting has a timeout of its own (a connect timeout proves the request was not
    delivered; see `connect_timeout`); the protected path bounds the whole exchange with one
    `asyncio.timeout`, cheaper than aiohttp's per-request timers.
    """
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive_timeout, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT),
    )


def _dropped(headers: CIMultiDictProxy[str], keep_length: bool) -> frozenset[str]:
    """Header names not to pass on: hop-by-hop ones, those named in `Connection`, and
    `Content-Length` when the body is re-framed."""
    drop = HOP_BY_HOP if keep_length else _HOP_BY_HOP_AND_FRAMING
    connection = headers.get("Connection")  # usually absent or a bare keep-alive/close
    if connection is None:
        return drop
    named = {
        token.strip().lower()
        for value in headers.getall("Connection")
        for token in value.split(",")
        if token.strip()
    }
    return drop | named


def request_headers(request: web.BaseRequest, keep_length: bool) -> CIMultiDict[str]:
    """Headers to send upstream: the client's, less hop-by-hop, plus X-Forwarded-*."""
    headers = request.headers
    drop = _dropped(headers, keep_length)
    out: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in headers.items() if name.lower() not in drop]
    )
    peer = request.remote or ""
    prior = headers.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    host = headers.get("Host")
    if host is not None:
        out["X-Forwarded-Host"] = host
    return out


def response_headers(headers: CIMultiDictProxy[str], *, keep_length: bool) -> list[tuple[str, str]]:
    """Upstream response headers to send on, less hop-by-hop (and framing, when rebuffered),
    and less any field the proxy could not send as received (see `sendable`).

    A response without `Date` gets one now, so a replay carries the first answer's date.
    """
    drop = _dropped(headers, keep_length)
    pairs = [
        (name, value)
        for name, value in headers.items()
        if name.lower() not in drop and sendable(name, value)
    ]
    if "Date" not in headers:
        pairs.append(("Date", formatdate(usegmt=True)))
    return pairs


def sendable(name: str, value: str) -> bool:
    """Whether a header field can be written as received: a token name and a value without
    control characters. An upstream's malformed field is dropped, never stored: stored, it
    would fail every replay for the whole ttl."""
    return _FIELD_NAME.fullmatch(name) is not None and _FORBIDDEN_IN_VALUE.search(value) is None


def reason_phrase(reason: str | None) -> str | None:
    """The upstream's reason phrase if it can be sent, else None (aiohttp's default)."""
    if reason is None or _FORBIDDEN_IN_VALUE.search(reason) is not None:
        return None
    return reason


# A request body to send: buffered, streamed as it arrives, or none.
Body = bytes | AsyncIterator[bytes] | None
# What an upstream exchange can raise; `translate` turns each into an `UpstreamError`.
_UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)


class Answer:
    """The upstream's response: status, the headers to send on, and its body.

    `body` is what was read; when `complete` is false the rest is still to come from
    `chunks()`. `close()` gives the connection back (or drops it, mid-body).
    """

    __slots__ = ("_response", "body", "complete", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse, body: bytes, complete: bool) -> None:
        self._response = response
        self.status = response.status
        self.reason = reason_phrase(response.reason)
        self.headers = response_headers(response.headers, keep_length=not complete)
        self.body = body
        self.complete = complete

    async def chunks(self) -> AsyncIterator[bytes]:
        """The rest of the body as it arrives; a broken body raises `UpstreamError`."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except _UPSTREAM_ERRORS as exc:
            raise translate(exc, self._response.url) from exc

    def close(self) -> None:
        """Done with the answer: aiohttp reuses the connection if the body was read whole."""
        self._response.release()


class UpstreamClient:
    """The one pooled client for every upstream route."""

    def __init__(self, keepalive_timeout: float) -> None:
        self._session = _create_session(keepalive_timeout)

    async def fetch(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes, *,
                    deadline: float, upstream_timeout: float, limit: int) -> Answer:  # fmt: skip
        """Send a buffered request and read up to `limit` bytes of the answer by `deadline`
        (a loop time): the whole exchange, body included, is bounded."""
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._session.request(
                    method, with_credentials(url, headers), headers=headers, data=body,
                    allow_redirects=False,
                    timeout=connect_timeout(upstream_timeout),
                )  # fmt: skip
                content, complete = await read_bounded(response, limit)
        except _UPSTREAM_ERRORS as exc:
            if response is not None:
                response.close()
            raise translate(exc, url) from exc
        answer = Answer(response, content, complete)
        if complete:
            answer.close()  # the connection goes back to the pool now
        return answer

    async def open(self, method: str, url: URL, headers: CIMultiDict[str], data: Body, *,
                   idle: float) -> Answer:  # fmt: skip
        """Send a request (its body may be streamed) and return once the response head is
        in: the body is then streamed with `Answer.chunks`, each read bounded by `idle`."""
        try:
            response = await self._session.request(
                method, with_credentials(url, headers), headers=headers, data=data,
                allow_redirects=False, timeout=idle_timeout(idle),
            )  # fmt: skip
        except _UPSTREAM_ERRORS as exc:
            if isinstance(exc.__cause__, ProxyError):  # the client's body failed, not the upstream
                raise exc.__cause__ from None
            raise translate(exc, url) from exc
        return Answer(response, b"", complete=False)

    async def close(self) -> None:
        await self._session.close()


def translate(exc: BaseException, url: URL) -> UpstreamError:
    """The `UpstreamError` for an aiohttp failure: was the request possibly delivered?"""
    if isinstance(exc, aiohttp.ClientConnectorError):  # never connected
        return UpstreamUnreachable(f"cannot connect to {url.origin()}: {exc.os_error}")
    # (The details above and below reach the log line only; see `proxy.errors`.)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamUnreachable(f"connecting to {url.origin()} timed out")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(
            "the upstream did not answer within upstream_timeout; it may have acted on it"
        )
    # aiohttp's messages can quote the request URL (with the upstream's credentials) and its
    # headers: the log line gets the kind of failure and a masked message, never the repr.
    message = redact_urls_in(str(exc))[:200]
    return UpstreamDisconnected(
        f"the upstream broke off the exchange after the request was sent "
        f"({type(exc).__name__}: {message}); it may have acted on it"
    )


def with_credentials(url: URL, headers: CIMultiDict[str]) -> URL:
    """Move an upstream URL's userinfo into `Authorization: Basic`, unless the client sent an
    `Authorization` of its own, which is then forwarded as it is (the upstream authenticates
    the tenant). aiohttp refuses a request that has both, with an error of its own."""
    if url.raw_user is None:
        return url
    if "Authorization" not in headers:
        headers["Authorization"] = aiohttp.encode_basic_auth(url.user or "", url.password or "")
    return url.with_user(None)


@functools.lru_cache(maxsize=256)
def connect_timeout(upstream_timeout: float) -> aiohttp.ClientTimeout:
    """A limit on connecting alone, well inside `upstream_timeout`: a connection that cannot
    be made is then reported as never delivered (502, released) before the exchange's own
    deadline turns it into an "outcome unknown" 504."""
    return aiohttp.ClientTimeout(
        total=None, sock_connect=min(_CONNECT_TIMEOUT, upstream_timeout / 2)
    )


def idle_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """No more than `seconds` of silence (streamed traffic, which may run long)."""
    return aiohttp.ClientTimeout(
        total=None, sock_connect=min(seconds, _CONNECT_TIMEOUT), sock_read=seconds
    )


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Read up to `limit` bytes of the body; (bytes read, whether the body is complete)."""
    if response.content_length is not None and response.content_length > limit:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(65536)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks), False


def make_response(status: int, headers: Iterable[tuple[str, str]], body: bytes,
                  extra: Iterable[tuple[str, str]] = ()) -> web.Response:  # fmt: skip
    """A buffered response with exactly these headers (aiohttp adds the framing)."""
    merged: CIMultiDict[str] = CIMultiDict(headers)  # already `sendable`
    merged.extend(extra)
    return web.Response(status=status, headers=merged, body=body)
