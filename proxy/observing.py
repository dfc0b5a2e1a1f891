"""Observe mode: what enforcing would have changed, counted and logged, never acted on.

A route with `mode: observe` forwards every request as a plain reverse proxy would, while
the store records each key exactly as in enforce (see `Proxy.observe` in `proxy.flow`). What
the store decides for a request that enforcing would have answered itself becomes one
`Would` kind: a metric sample (`idempotency_proxy_observe_would_total{route, kind}`) and one
log line with the key hash, both upstream statuses and the time between the attempts.
`idempotency-proxy report` reads the counters back.

Keyless duplicates (`observe_keyless`, in either mode) are spotted per process in a bounded
window of recent requests (`KeylessWindow`): a suspected duplicate that lands on another
worker or replica is not seen, so the count is a lower bound. A shared store would see them
all, at one more store round trip per keyless request; counting, unlike protecting, does not
need to be exact.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

from aiohttp import web

from proxy import logs, metrics
from proxy.config import RoutePolicy
from proxy.identity import fingerprint, scope
from proxy.keys import RecordKey
from proxy.store.base import Acquired, Decision, Expired, InProgress, Mismatch, Replay
from proxy.targets import origin_form

# Keyless requests remembered per process, least recently seen forgotten first: about
# 200 bytes each, so the window costs at most ~13 MB whatever the traffic.
MAX_KEYLESS = 65_536


class Would(StrEnum):
    """What enforcing would have done with a request that observe mode forwarded."""

    REPLAY = "would_replay"  # a retry of a finished key: the upstream executed it again
    CONFLICT = "would_conflict"  # a duplicate while the first attempt ran: executed again
    MISMATCH = "would_mismatch"  # the key reused for another request (enforce: 422)
    REJECT_MISSING_KEY = "would_reject_missing_key"  # require_key, none sent (enforce: 400)
    REJECT_INVALID_KEY = "would_reject_invalid_key"  # a malformed key (enforce: 400)
    # A body over max_request_body (enforce: 413): streamed on, neither fingerprinted nor
    # recorded, so a retry of it is not counted as a duplicate.
    REJECT_TOO_LARGE = "would_reject_too_large"


def would(decision: Decision) -> Would | None:
    """What enforcing would have done instead of forwarding, for a store decision."""
    if isinstance(decision, Replay | Expired):  # executed again: enforce replays (or 409s)
        return Would.REPLAY
    if isinstance(decision, InProgress):
        return Would.CONFLICT
    if isinstance(decision, Mismatch):
        return Would.MISMATCH
    assert isinstance(decision, Acquired)
    return None  # a first attempt (or a takeover): enforcing forwards it too


def sighted(kind: Would, route: str) -> None:
    """Count a request enforcing would have refused before any store access."""
    metrics.WOULD.labels(route, kind).inc()
    logs.event("observed: enforcing would have answered otherwise", route=route, would=kind)


def duplicate(decision: Decision, route: str, record: RecordKey, status: int | None) -> None:
    """Count and log a request the store did not let through, forwarded anyway.

    `first_status` is the status recorded for the key's first attempt (none while it runs, or
    when its outcome is unknown), `status` this attempt's; `seconds_between` the time since
    the first attempt began, as the store measured it.
    """
    kind = would(decision)
    assert kind is not None
    metrics.WOULD.labels(route, kind).inc()
    first = decision.outcome.response.status if isinstance(decision, Replay) else 0
    age = getattr(decision, "age", None)
    logs.event(
        "observed: enforcing would have answered otherwise", route=route, would=kind,
        key_hash=record.hash, first_status=first or None, status=status,
        seconds_between=None if age is None else round(age, 3),
    )  # fmt: skip


class KeylessWindow:
    """Recent keyless requests by route, scope and fingerprint; bounded, per process."""

    def __init__(self, limit: int = MAX_KEYLESS, clock: Callable[[], float] = time.monotonic):
        self._seen: OrderedDict[tuple[str, bytes, str], float] = OrderedDict()
        self._limit = limit
        self._clock = clock

    def sight(self, route: str, scope: bytes, fingerprint: str, window: float) -> float | None:
        """Note a keyless request; seconds since an identical one within `window`, or None."""
        now = self._clock()
        ident = (route, scope, fingerprint)
        last = self._seen.pop(ident, None)
        self._seen[ident] = now
        if len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        if last is None or now - last > window:
            return None
        return now - last

    def check(self, request: web.BaseRequest, route: RoutePolicy, body: bytes) -> None:
        """Count `request` as a suspected duplicate if an identical one came within the
        route's `observe_keyless` window."""
        assert route.observe_keyless is not None
        identity = fingerprint(request, route, origin_form(request), body)
        since = self.sight(route.id, scope(request, route), identity, route.observe_keyless)
        if since is not None:
            metrics.KEYLESS_DUPLICATES.labels(route.id).inc()
            logs.event("suspected duplicate without a key", route=route.id,
                       seconds_between=round(since, 3))  # fmt: skip
