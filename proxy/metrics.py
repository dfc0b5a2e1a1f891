"""Every Prometheus metric the proxy exports, in one place, with one prefix.

Labels are bounded: `route` is a configured route id (or `unrouted`), `outcome` one of
`OUTCOMES`, `method` is folded to the known HTTP methods (anything else is `other`), and
`operation` one of the store operations. With several worker processes the metrics are
written through prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), so a
scrape of any worker's admin listener adds up every worker.
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from proxy import __version__

PREFIX: Final = "idempotency_proxy"

# Every value the `outcome` label can take.
OUTCOMES: Final = (
    "forwarded",  # first attempt, executed upstream and recorded
    "replayed",  # retry answered from the store
    "conflict",  # retry while the first attempt runs: 409
    "waited",  # retry that waited for the first attempt and replayed it
    "mismatch",  # same key, other request: 422
    "missing_key",  # key required, none sent: 400
    "invalid_key",  # key malformed: 400
    "passthrough",  # route or method not protected: streamed through
    "unprotected",  # protected method without a key, forwarded anyway
    "store_unavailable",  # store down, fail_mode closed: 503 (or open: forwarded)
    "upstream_error",  # upstream unreachable: 502, record released
    "unknown_outcome",  # upstream timed out / dropped, or owner died: terminal result
    "fenced",  # the record was taken over while we worked; our result was not stored
    "too_large",  # request body over the limit (413), or a response too large to store
    "released",  # upstream answered a release status (429/503): returned, not stored
    "bad_request",  # the request itself was unreadable (slow body, broken framing)
)
STORE_OPERATIONS: Final = ("begin", "renew", "complete", "release", "ping", "admin")
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
_SIZE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

REQUESTS = Counter(
    f"{PREFIX}_requests_total",
    "Requests handled, by route, method and outcome.",
    ["route", "method", "outcome"],
)
REQUEST_DURATION = Histogram(
    f"{PREFIX}_request_duration_seconds",
    "Time from receiving a request to its response being sent, by route and outcome.",
    ["route", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    f"{PREFIX}_upstream_duration_seconds",
    "Time the upstream took to answer a forwarded request, by route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
STORE_DURATION = Histogram(
    f"{PREFIX}_store_operation_duration_seconds",
    "Latency of store operations, by operation.",
    ["operation"],
    buckets=_STORE_BUCKETS,
)
STORE_ERRORS = Counter(
    f"{PREFIX}_store_errors_total",
    "Store operations that failed or timed out, by operation.",
    ["operation"],
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_in_flight_records",
    "Records this proxy currently holds in flight (upstream exchanges under way).",
    multiprocess_mode="livesum",
)
STORED_RESPONSE_BYTES = Histogram(
    f"{PREFIX}_stored_response_bytes",
    "Size of response bodies recorded for replay.",
    buckets=_SIZE_BUCKETS,
)
LEASE_RENEWALS = Counter(
    f"{PREFIX}_lease_renewals_total",
    "Lease renewals while an upstream exchange ran, by result (renewed, lost, error).",
    ["result"],
)
WAITERS = Gauge(
    f"{PREFIX}_waiters",
    "Retries currently waiting for a first attempt to finish (on_concurrent: wait).",
    multiprocess_mode="livesum",
)
UNRECORDED = Counter(
    f"{PREFIX}_unrecorded_responses_total",
    "Responses returned to the client whose result could not be recorded (store failure).",
    ["route"],
)
CONFIG_RELOADS = Counter(
    f"{PREFIX}_config_reloads_total",
    "Configuration reloads, by result (applied, rejected).",
    ["result"],
)
BUILD_INFO = Gauge(
    f"{PREFIX}_build_info",
    "Always 1; the labels name the running version.",
    ["version"],
    multiprocess_mode="max",
)
BUILD_INFO.labels(__version__).set(1)


_request_children: dict[tuple[str, str, str], tuple[object, object]] = {}
_upstream_children: dict[str, object] = {}


def observe_request(route: str, method: str, outcome: str, seconds: float) -> None:
    """Count one finished request and its duration (label children cached: hot path)."""
    key = (route, method, outcome)
    children = _request_children.get(key)
    if children is None:
        children = (
            REQUESTS.labels(route, method_label(method), outcome),
            REQUEST_DURATION.labels(route, outcome),
        )
        if len(_request_children) < 10_000:
            _request_children[key] = children
    counter, histogram = children
    counter.inc()  # type: ignore[attr-defined]
    histogram.observe(seconds)  # type: ignore[attr-defined]


def observe_upstream(route: str, seconds: float) -> None:
    child = _upstream_children.get(route)
    if child is None:
        child = _upstream_children[route] = UPSTREAM_DURATION.labels(route)
    child.observe(seconds)  # type: ignore[attr-defined]


def method_label(method: str) -> str:
    """Fold arbitrary request methods into a bounded label set."""
    return method if method in KNOWN_METHODS else "other"


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape; in multiprocess mode, summed over every worker."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
