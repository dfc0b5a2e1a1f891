"""Every Prometheus metric the proxy exports, in one place, with one prefix.

Labels are bounded: `route` is a configured route id (or `unrouted`), `outcome` one of
`OUTCOMES`, `method` is folded to the known HTTP methods (anything else is `other`), and
`operation` one of the store operations. With several worker processes the metrics are
written through prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), so a
scrape of any worker's admin listener adds up every worker.
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from proxy import __version__
from proxy.outcomes import RequestOutcome
from proxy.tasks import spawn

PREFIX: Final = "idempotency_proxy"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST  # of the exposition text

# No `_created` series: Prometheus reads none of them, and they were a third of every scrape
# (the multiprocess mode of the workers never wrote them either).
disable_created_metrics()  # type: ignore[no-untyped-call]

# Every value the `outcome` label can take.
OUTCOMES: Final = tuple(RequestOutcome)
STORE_OPERATIONS: Final = ("begin", "renew", "complete", "release", "ping", "admin")
LEASE_RESULTS: Final = ("renewed", "lost", "error")
RELOAD_RESULTS: Final = ("applied", "rejected")
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
STORE_REDIRECTS = Counter(
    f"{PREFIX}_store_redirects_total",
    "Cluster redirects followed (the command had not run), by kind (moved, ask).",
    ["kind"],
)
for _kind in ("moved", "ask"):
    STORE_REDIRECTS.labels(_kind)  # exported as 0 from the first scrape
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
WAIT_CHECKS = Counter(
    f"{PREFIX}_wait_checks_total",
    "Checks a waiting retry made after its watch opened, by cause: woken (the store signalled"
    " a change) or timer (no signal came: the 1 s fallback or the end of the lease).",
    ["cause"],
)
WAIT_WOKEN = WAIT_CHECKS.labels("woken")
WAIT_TIMER = WAIT_CHECKS.labels("timer")  # steadily rising: waiters are not being woken
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
START_TIME = Gauge(
    f"{PREFIX}_start_time_seconds",
    "When this proxy started, Unix time: the window its counters cover.",
    multiprocess_mode="min",
)
START_TIME.set(time.time())

# Observe mode (proxy.observing): what enforcing would have done instead of forwarding.
WOULD_KINDS: Final = (
    "would_replay", "would_conflict", "would_mismatch",
    "would_reject_missing_key", "would_reject_invalid_key", "would_reject_too_large",
)  # fmt: skip
OBSERVED_REQUESTS = Counter(
    f"{PREFIX}_observed_requests_total",
    "Requests for a protected method on a route in observe mode, by route.",
    ["route"],
)
OBSERVED_KEYS = Counter(
    f"{PREFIX}_observed_keys_total",
    "First attempts of a key on a route in observe mode (records created), by route.",
    ["route"],
)
WOULD = Counter(
    f"{PREFIX}_observe_would_total",
    "Requests observe mode forwarded that enforcing would have answered otherwise, by route "
    "and what enforcing would have done (kind).",
    ["route", "kind"],
)
KEYLESS_DUPLICATES = Counter(
    f"{PREFIX}_keyless_duplicates_total",
    "Requests without a key identical (scope and fingerprint) to one within the route's "
    "observe_keyless window: suspected duplicates, counted, never blocked. By route.",
    ["route"],
)


# Every series a dashboard or an alert reads exists from the first scrape, at 0 (the
# Prometheus instrumentation guide: a series that appears only with its first event shows
# "no data" and breaks `rate` and `increase` until then). Those labelled by route are created
# for the configured routes by `declare_routes`.
for _label in LEASE_RESULTS:
    LEASE_RENEWALS.labels(_label)
for _label in RELOAD_RESULTS:
    CONFIG_RELOADS.labels(_label)
for _label in STORE_OPERATIONS:
    STORE_ERRORS.labels(_label)


# --- batched updates --------------------------------------------------------------------
#
# Every prometheus-client update takes a lock (and, with several workers, writes an mmap
# file), and a protected request makes about a dozen: in the profile, a tenth of the proxy's
# CPU. The hot path therefore adds to plain numbers in this process, and `flush` hands the
# sums to prometheus-client: before every scrape this process answers, and once a second
# (`start_flushing`) so that other workers' scrapes see them too.


class LocalCounter:
    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._child.inc(self._pending)
            self._pending = 0.0


class LocalHistogram:
    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds = histogram_bounds(child)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # The bucket prometheus-client would choose: the first bound >= value.
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        if any(self._counts):
            add_to_histogram(self._child, self._counts, self._sum)
            self._counts = [0] * len(self._bounds)
            self._sum = 0.0


# prometheus-client has no public call that adds many observations at once (one `observe`
# per sample takes its lock each time, which is what batching avoids). These two functions
# are the only code that touches its histogram internals; `tests/test_metrics.py` checks
# that a flushed batch exposes exactly what the same `observe` calls would, so a change in
# the library fails there, loudly.


def histogram_bounds(child: Any) -> list[float]:
    """The upper bounds of a histogram child's buckets, `+Inf` last."""
    return list(child._upper_bounds)


def add_to_histogram(child: Any, counts: list[int], total: float) -> None:
    """Add `counts[i]` observations to bucket i and `total` to the sum of a histogram child."""
    for index, count in enumerate(counts):
        if count:
            child._buckets[index].inc(count)
    child._sum.inc(total)


class LocalGauge:
    __slots__ = ("_child", "_value")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._value = 0

    def inc(self) -> None:
        self._value += 1

    def dec(self) -> None:
        self._value -= 1

    def flush(self) -> None:
        self._child.set(self._value)


_LOCAL: list[LocalCounter | LocalHistogram | LocalGauge] = []
_MAX_LOCAL = 20_000  # bounded labels make far fewer; this only guards against a bug


def _local(metric: Any) -> Any:
    if len(_LOCAL) < _MAX_LOCAL:
        _LOCAL.append(metric)
    return metric


_requests: dict[tuple[str, str, str], tuple[LocalCounter, LocalHistogram]] = {}
_upstream: dict[str, LocalHistogram] = {}
_observed: dict[str, tuple[LocalCounter, LocalCounter]] = {}
STORE_TIMERS = {op: _local(LocalHistogram(STORE_DURATION.labels(op))) for op in STORE_OPERATIONS}
STORED_BYTES = _local(LocalHistogram(STORED_RESPONSE_BYTES))
IN_FLIGHT_RECORDS = _local(LocalGauge(IN_FLIGHT))
WAITING = _local(LocalGauge(WAITERS))


def _request_series(route: str, method: str, outcome: str) -> tuple[LocalCounter, LocalHistogram]:
    pair = _requests.get((route, method, outcome))
    if pair is None:
        pair = _requests[route, method, outcome] = (
            _local(LocalCounter(REQUESTS.labels(route, method, outcome))),
            _local(LocalHistogram(REQUEST_DURATION.labels(route, outcome))),
        )
    return pair


def _upstream_series(route: str) -> LocalHistogram:
    histogram = _upstream.get(route)
    if histogram is None:
        histogram = _upstream[route] = _local(LocalHistogram(UPSTREAM_DURATION.labels(route)))
    return histogram


def observe_request(route: str, method: str, outcome: str, seconds: float) -> None:
    """Count one finished request and its duration."""
    method = method if method in KNOWN_METHODS else "other"
    pair = _requests.get((route, method, outcome))
    if pair is None:
        pair = _request_series(route, method, outcome)
    pair[0].inc()
    pair[1].observe(seconds)


def observed(route: str) -> tuple[LocalCounter, LocalCounter]:
    """The per-request counters of an observing route: requests, and keys first seen."""
    pair = _observed.get(route)
    if pair is None:
        pair = _observed[route] = (
            _local(LocalCounter(OBSERVED_REQUESTS.labels(route))),
            _local(LocalCounter(OBSERVED_KEYS.labels(route))),
        )
    return pair


def observe_upstream(route: str, seconds: float) -> None:
    histogram = _upstream.get(route)
    if histogram is None:
        histogram = _upstream_series(route)
    histogram.observe(seconds)


def declare_routes(routes: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Create the series of each (route id, protected methods) at 0: every outcome's count
    and latency (the latency alert sums them all, and a series born with its first request
    loses that request to `rate()`), the upstream duration, the unrecorded responses and the
    observe-mode counts. At start, and for new routes on reload."""
    for route, methods in routes:
        for method in methods:
            for outcome in OUTCOMES:
                _request_series(route, method_label(method), outcome)
        _upstream_series(route)
        UNRECORDED.labels(route)
        OBSERVED_REQUESTS.labels(route)
        OBSERVED_KEYS.labels(route)
        KEYLESS_DUPLICATES.labels(route)
        for kind in WOULD_KINDS:
            WOULD.labels(route, kind)


def flush() -> None:
    """Hand this process's batched updates to prometheus-client."""
    for metric in _LOCAL:
        metric.flush()


class Flusher:
    """Flushes every `interval` seconds on the running loop, until `stop`."""

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        flush()
        self.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        flush()


def method_label(method: str) -> str:
    """Fold arbitrary request methods into a bounded label set."""
    return method if method in KNOWN_METHODS else "other"


def exposition() -> bytes:
    """The exposition text of this process's registry; in multiprocess mode, summed over
    every worker's files. Call `flush` first, on the loop that updates the metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


_rendering: asyncio.Task[bytes] | None = None


async def render() -> bytes:
    """The exposition text for a scrape. The batched updates are handed over on the loop;
    the text is written in a thread, so the requests the loop is serving go on between its
    slices of the GIL instead of waiting for the whole scrape (a few ms per route). Scrapes
    that come while one is being written share it (`/metrics` is open to anyone who reaches
    the admin listener: a crowd of scrapes must not become a crowd of threads)."""
    global _rendering
    if _rendering is None or _rendering.done():
        flush()
        _rendering = spawn(asyncio.to_thread(exposition), "metrics-render")
    return await asyncio.shield(_rendering)
