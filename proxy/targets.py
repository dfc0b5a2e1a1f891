"""Which requests the proxy forwards, and where: the request target and its framing.

A client must never choose where the proxy connects. Only two target forms are forwarded,
origin-form and absolute-form (by its path alone), and the upstream URL is built from parts
(the configured scheme, credentials, host and port; the client's path and query), never by
joining strings: joined, `CONNECT x:@127.0.0.1:PORT` turned the configured host into userinfo
and sent the upstream's credentials to a port of the client's choosing.
"""

from __future__ import annotations

import functools

from aiohttp import web
from yarl import URL

from proxy.errors import (
    InvalidTarget,
    UnsupportedMethod,
    UnsupportedTransferCoding,
    UnsupportedVersion,
)


def check_framing(request: web.BaseRequest) -> None:
    """Refuse what the proxy cannot forward faithfully, before anything is read or sent.

    `CONNECT` asks for a tunnel, which the proxy never opens. A transfer coding other than
    `chunked` would reach the upstream decoded by one layer only (aiohttp's parser drops
    `gzip` from `gzip, chunked`), so the upstream would take compressed bytes for the body;
    RFC 9112 6.1 asks a server to answer 501 and close the connection. A request that is not
    HTTP/1.x (aiohttp parses HTTP/0.9 and a textual HTTP/2.0) is never forwarded.
    """
    if request.version.major != 1:
        raise UnsupportedVersion(f"HTTP/{request.version.major}.{request.version.minor} request")
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


def target_url(upstream: str, target: str) -> URL:
    """The upstream URL for an origin-form `target`, built from parts, never by joining
    strings: the configured scheme, credentials, host and port, the client's path and query."""
    base = _upstream_url(upstream)
    path, _, query = target.partition("?")
    return URL.build(
        scheme=base.scheme, user=base.raw_user, password=base.raw_password,
        host=base.raw_host or "", port=base.explicit_port, path=path, query_string=query,
        encoded=True,
    )  # fmt: skip
