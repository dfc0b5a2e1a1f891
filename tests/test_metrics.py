"""Metrics: what an operator's dashboards see of the proxy, read from the admin /metrics.

The first test scripts a sequence of requests, one of each outcome, and checks every count,
duration, store operation and size it leaves behind; the others check that the batched metric
updates expose exactly what prometheus-client's own calls would, and the outcome label.
"""

from __future__ import annotations

import asyncio
import os
import re

import aiohttp
import yaml
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proxy.metrics import OUTCOMES, LocalHistogram
from proxy.outcomes import RequestOutcome
from proxy.server import Running
from tests.conftest import Launcher, ProxyFactory, Upstream, key
from tests.support.metrics import Samples, scrape, value
from tests.support.requests import request
from tests.test_deploy import alert_rules, dashboard_exprs

SAMPLES = (0.0001, 0.0005, 0.003, 0.003, 0.2, 7.0, 99.0)
BUCKETS = (0.0005, 0.001, 0.005, 0.1, 1.0, 10.0)


async def send(client: aiohttp.ClientSession, proxy: Running, method: str, path: str,
               idem: str | None = None, body: bytes = b"{}") -> int:  # fmt: skip
    return (await request(client, method, proxy, path, body, idem)).status


async def test_metrics_count_every_outcome_of_a_scripted_sequence(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Counts by route, method, outcome; durations, store ops, sizes; in-flight back to 0."""
    tag = os.urandom(3).hex()  # the registry is process-wide: route ids keep this test's own
    strict, loose = f"strict-{tag}", f"loose-{tag}"
    proxy = await start_proxy(routes=[
        {"path": "/loose/*", "id": loose},
        {"path": "/*", "id": strict, "require_key": True, "on_concurrent": "reject"},
    ])  # fmt: skip
    before = await scrape(client, proxy.admin_url)

    first, slow = key("first"), key("slow")
    assert await send(client, proxy, "POST", "/pay", first) == 201  # forwarded
    assert await send(client, proxy, "POST", "/pay", first) == 201  # replayed
    running = asyncio.ensure_future(send(client, proxy, "POST", "/hold/slow/pay", slow))
    await upstream.arrived(slow)
    assert await send(client, proxy, "POST", "/hold/slow/pay", slow) == 409  # conflict
    upstream.release("slow")
    assert await running == 201  # forwarded
    assert await send(client, proxy, "POST", "/pay", first, b'{"x": 1}') == 422
    assert await send(client, proxy, "POST", "/pay") == 400  # missing key
    assert await send(client, proxy, "POST", "/pay", "k" * 256) == 400  # invalid key
    assert await send(client, proxy, "GET", "/loose/thing") == 200  # passthrough
    assert await send(client, proxy, "POST", "/loose/thing") == 201  # unprotected

    after = await scrape(client, proxy.admin_url)
    counted = {
        (labels["route"], labels["method"], labels["outcome"]): count
        for (name, label_set), count in after.items()
        if name == "idempotency_proxy_requests_total"
        and (labels := dict(label_set))["route"] in (strict, loose)
        and count  # the other outcomes are there too, at 0
    }
    assert counted == {
        (strict, "POST", "forwarded"): 2, (strict, "POST", "replayed"): 1,
        (strict, "POST", "conflict"): 1, (strict, "POST", "mismatch"): 1,
        (strict, "POST", "missing_key"): 1, (strict, "POST", "invalid_key"): 1,
        (loose, "GET", "passthrough"): 1, (loose, "POST", "unprotected"): 1,
    }  # fmt: skip
    duration = "idempotency_proxy_request_duration_seconds_count"
    assert value(after, duration, route=strict, outcome="forwarded") == 2
    assert value(after, duration, route=loose, outcome="passthrough") == 1
    upstream_count = "idempotency_proxy_upstream_duration_seconds_count"
    assert value(after, upstream_count, route=strict) == 2
    assert value(after, upstream_count, route=loose) == 2

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    store_ops = "idempotency_proxy_store_operation_duration_seconds_count"
    assert delta(store_ops, operation="begin") == 5  # first, replay, 2 x slow, mismatch
    assert delta(store_ops, operation="complete") == 2
    assert delta("idempotency_proxy_stored_response_bytes_count") == 2
    assert delta("idempotency_proxy_stored_response_bytes_sum") > 0
    assert value(after, "idempotency_proxy_in_flight_records") == 0


# --- the batched updates ------------------------------------------------------------------


def exposition(batched: bool) -> list[bytes]:
    registry = CollectorRegistry()
    histogram = Histogram("h", "help", ["route"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("r")
    if batched:
        local = LocalHistogram(child)
        for value in SAMPLES:
            local.observe(value)
        local.flush()
        local.flush()  # a second flush adds nothing
    else:
        for value in SAMPLES:
            child.observe(value)
    lines = generate_latest(registry).splitlines()
    return [line for line in lines if b"_created" not in line]  # a creation time differs


def test_a_flushed_batch_exposes_what_observe_would() -> None:
    """Buckets, count and sum match one `observe` per sample (and fail if the library's
    histogram internals change under the batching)."""
    assert exposition(batched=True) == exposition(batched=False)


def test_the_outcome_label_takes_exactly_the_enum_values() -> None:
    """One list of outcomes for metrics, logs and tests."""
    assert set(OUTCOMES) == {outcome.value for outcome in RequestOutcome}


# --- metrics from the first scrape -----------------------------------------------------

_SELECTOR = re.compile(r"\b(idempotency_proxy_\w+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')
# The series labelled by route: each configured route has its own.
_BY_ROUTE = {
    "idempotency_proxy_requests_total",
    "idempotency_proxy_request_duration_seconds_bucket",
    "idempotency_proxy_upstream_duration_seconds_bucket",
    "idempotency_proxy_unrecorded_responses_total",
}


def queried_series() -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """(metric, label values it must have) for each selector of the dashboard and alerts;
    `outcome=~"a|b"` asks for both, a matcher on a variable (`$route`) for none."""
    exprs = [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]
    wanted = set()
    for expr in exprs:
        for name, matchers in _SELECTOR.findall(expr):
            fixed = [(label, value.split("|"))
                     for label, op, value in _MATCHER.findall(matchers)
                     if op in ("=", "=~") and "$" not in value and ".*" not in value]  # fmt: skip
            combinations: list[list[tuple[str, str]]] = [[]]
            for label, values in fixed:
                combinations = [[*c, (label, v)] for c in combinations for v in values]
            wanted |= {(name, frozenset(c)) for c in combinations}
    return wanted


def selected(samples: Samples, name: str, labels: frozenset[tuple[str, str]]) -> list[float]:
    return [count for (sample, label_set), count in samples.items()
            if sample == name and labels <= label_set]  # fmt: skip


async def test_every_queried_series_is_zero_from_the_first_scrape(
    launch: Launcher, client: aiohttp.ClientSession
) -> None:
    """A fresh proxy's first scrape has every series a panel or alert reads, at 0, for every
    configured route; a route added by a reload gets its own at once."""
    proxy = await launch(routes=[{"path": "/v2/*", "id": "v2"}, {"path": "/*", "id": "all"}])
    samples = await scrape(client, proxy.admin_url)
    wanted = queried_series()
    assert len(wanted) >= 15
    for name, labels in sorted(wanted, key=str):
        for route in ("v2", "all"):
            route_labels = labels | {("route", route)} if name in _BY_ROUTE else labels
            values = selected(samples, name, route_labels)
            assert values, f"{name}{dict(route_labels)} is missing from the first scrape"
            assert set(values) == {0.0}, (name, dict(route_labels), values)

    raw = yaml.safe_load(proxy.config.read_text())
    routes = [{"path": "/v3/*", "id": "v3", "methods": ["POST", "PUT"]}, *raw["routes"]]
    proxy.config.write_text(yaml.safe_dump({**raw, "routes": routes}))
    async with client.post(proxy.admin_url + "/admin/reload") as response:
        assert (await response.json())["status"] == "applied"
    samples = await scrape(client, proxy.admin_url)
    for outcome in OUTCOMES:
        for method in ("POST", "PUT"):
            series = {"route": "v3", "method": method, "outcome": outcome}
            assert value(samples, "idempotency_proxy_requests_total", **series) == 0
            assert ("idempotency_proxy_requests_total", frozenset(series.items())) in samples
    for name in ("idempotency_proxy_unrecorded_responses_total",
                 "idempotency_proxy_upstream_duration_seconds_count"):  # fmt: skip
        assert selected(samples, name, frozenset({("route", "v3")})) == [0.0]
    assert await proxy.stop() == 0
