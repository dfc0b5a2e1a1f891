"""What identifies a protected request: the record its key names and its fingerprint.

Enforcing and observing must compute both the same way, to the byte: a key first seen in
observe mode is protected from the first enforcing request on only if the record and the
fingerprint are those that enforcing computes. So both come from here; the pure rules
behind them are in `proxy.keys` and `proxy.fingerprints`.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config import RoutePolicy
from proxy.keys import RecordKey, fingerprint_request, scope_of, storage_key


def scope(request: web.BaseRequest, route: RoutePolicy) -> bytes:
    """The tenant a request belongs to: the values of the route's scope headers."""
    return scope_of((name, request.headers.getall(name, ())) for name in route.scope_headers)


def fingerprint(request: web.BaseRequest, route: RoutePolicy, target: str, body: bytes) -> str:
    """Method, path, query and body (raw or canonical, as the route says) of a request whose
    origin-form target is `target`."""
    path, _, query = target.partition("?")
    content_type = request.headers.get("Content-Type", "")
    return fingerprint_request(request.method, path, query, body, content_type, route.fingerprint)


def identify(request: web.BaseRequest, route: RoutePolicy, namespace: str, key: str,
             target: str, body: bytes) -> tuple[RecordKey, str]:  # fmt: skip
    """The record of `key` and the request's fingerprint."""
    record = storage_key(namespace, scope(request, route), key)
    return record, fingerprint(request, route, target, body)
