"""Talking to the legacy upstream: header rules, the pooled client, and error translation.

aiohttp client errors become `UpstreamError`s here and nowhere else. The translation
decides the most important question of a failed exchange: could the upstream have acted?
Only a connection that was never established proves the request was not delivered;
everything after that (a timeout, a reset, a truncated answer) means "outcome unknown".
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from email.utils import formatdate

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    InvalidTarget,
    UnsupportedMethod,
    UnsupportedTransferCoding,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

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


def create_session(keepalive_timeout: float) -> aiohttp.ClientSession:
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


def check_framing(request: web.BaseRequest) -> None:
    """Refuse what the proxy cannot forward faithfully, before anything is read or sent.

    `CONNECT` asks for a tunnel, which the proxy never opens. A transfer coding other than
    `chunked` would reach the upstream decoded by one layer only (aiohttp's parser drops
    `gzip` from `gzip, chunked`), so the upstream would take compressed bytes for the body;
    RFC 9112 6.1 asks a server to answer 501 and close the connection.
    """
    if request.method == "CONNECT":
        raise UnsupportedMethod("the proxy forwards requests; it does not open tunnels")
    codings = request.headers.getall("Transfer-Encoding", ())
    if codings and (len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked"):
        raise UnsupportedTransferCoding("only the chunked transfer coding is accepted")


def origin_form(request: web.BaseRequest) -> str:
    """The request target as `/path?query`, exactly as the client encoded it.

    Only two target forms are forwarded: origin-form (`/path?query`) and absolute-form
    (`http://host/path`, RFC 9112 3.2.2), by its path and query alone: the client's scheme
    and authority never choose where the proxy forwards. Any other form (`*`, `host:port`,
    anything without a leading `/`) is refused.
    """
    raw = request.raw_path
    if raw.startswith("/"):
        return raw
    scheme, sep, _ = raw.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        url = URL(raw, encoded=True)
        if url.absolute and url.raw_path_qs.startswith("/"):
            return url.raw_path_qs
    raise InvalidTarget(
        "the request target must be a path (/...) or an absolute http(s) URL; "
        "asterisk-form and authority-form targets are not forwarded"
    )


@functools.lru_cache(maxsize=64)
def _upstream_url(upstream: str) -> URL:
    return URL(upstream)


def target_url(upstream: str, request: web.BaseRequest) -> URL:
    """The upstream URL for this request, built from parts, never by joining strings: the
    configured scheme, credentials, host and port, and the client's path and query."""
    base = _upstream_url(upstream)
    path, _, query = origin_form(request).partition("?")
    return URL.build(
        scheme=base.scheme, user=base.raw_user, password=base.raw_password,
        host=base.raw_host or "", port=base.explicit_port, path=path, query_string=query,
        encoded=True,
    )  # fmt: skip


# What an upstream exchange can raise; `translate` turns each into an `UpstreamError`.
UPSTREAM_ERRORS = (aiohttp.ClientError, TimeoutError)


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
    return UpstreamDisconnected(
        f"the upstream broke off the exchange after the request was sent ({exc!r}); "
        "it may have acted on it"
    )


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
