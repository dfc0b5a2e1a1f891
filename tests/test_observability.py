"""Metrics and logs: what an operator sees of the proxy, and what never shows up there.

The metrics tests script a sequence of requests and read `/metrics` on the admin listener;
the log tests run `python -m proxy run` as a real process and read its stderr, where every
line is JSON and no raw key or credential ever appears.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from proxy.config import describe, parse_config
from proxy.server import Running
from tests.conftest import ProcessFactory, ProxyFactory, RedisServer, Upstream, free_port, key
from tests.support.metrics import scrape, value
from tests.support.proxies import ProxyProcess
from tests.support.requests import request
from tests.support.waiting import wait_until

ACCESS_FIELDS = {
    "time", "level", "event", "route", "method", "path", "outcome", "status", "key_hash",
    "upstream_status", "upstream_ms", "latency_ms", "request_id",
}  # fmt: skip


# --- metrics ---------------------------------------------------------------------------


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
        {"path": "/loose/*", "id": loose}, {"path": "/*", "id": strict, "require_key": True},
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


# --- the proxy as a process ------------------------------------------------------------


Launcher = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
def launch(proxy_process: ProcessFactory) -> Launcher:
    """Start proxy processes on fixed free ports, which --workers share (SO_REUSEPORT)."""

    async def start(*args: str, **overrides: Any) -> ProxyProcess:
        ports = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}
        return await proxy_process(*args, **ports, **overrides)

    return start


async def test_access_log_line_carries_the_fields_and_no_secret(
    launch: Launcher, client: aiohttp.ClientSession
) -> None:
    """One JSON line per request; its key_hash is the admin API's record; no key, no token."""
    proxy = await launch(admin_token="admin-secret-token")
    headers = {"Idempotency-Key": "secret-key-123", "Authorization": "Bearer topsecret",
               "X-Request-Id": "req-1"}  # fmt: skip
    for _ in range(2):
        async with client.post(proxy.url + "/v1/pay", data=b"{}", headers=headers) as response:
            assert response.status == 201
    lookup = {"key": "secret-key-123", "headers": {"Authorization": "Bearer topsecret"}}
    admin = {"Authorization": "Bearer admin-secret-token"}
    url = proxy.admin_url + "/admin/records/lookup"
    async with client.post(url, json=lookup, headers=admin) as response:
        assert response.status == 200
        record = (await response.json())["record"]
    assert await proxy.stop() == 0

    first, replay = proxy.named("request")
    assert first.keys() == ACCESS_FIELDS
    assert first["level"] == "info" and first["time"].endswith("Z")
    assert (first["route"], first["method"], first["path"]) == ("all", "POST", "/v1/pay")
    assert (first["outcome"], first["status"], first["upstream_status"]) == ("forwarded", 201, 201)
    assert first["upstream_ms"] > 0 and first["latency_ms"] >= first["upstream_ms"]
    assert first["request_id"] == "req-1"
    assert (replay["outcome"], replay["upstream_status"]) == ("replayed", None)
    assert first["key_hash"] == replay["key_hash"] == record
    (listening,) = proxy.named("listening")
    assert listening["config"]["admin_token"] == "***"
    text = proxy.text()
    for secret in ("secret-key-123", "topsecret", "admin-secret-token"):
        assert secret not in text


async def test_warning_level_from_the_environment_suppresses_access_lines(
    launch: Launcher, client: aiohttp.ClientSession
) -> None:
    """IDEMPOTENCY_PROXY_LOG_LEVEL=warning wins over the file: no access lines, warnings stay."""
    proxy = await launch(env={"IDEMPOTENCY_PROXY_LOG_LEVEL": "warning"}, listening=0,
                         log_level="info")  # fmt: skip
    async with client.post(proxy.url + "/v1/pay", data=b"{}",
                           headers={"Idempotency-Key": "quiet"}) as response:  # fmt: skip
        assert response.status == 201
    async with client.post(proxy.admin_url + "/admin/records/lookup",
                           json={"key": "quiet"}) as response:  # fmt: skip
        record = (await response.json())["record"]
    async with client.delete(f"{proxy.admin_url}/admin/records/{record}") as response:
        assert response.status == 200
    assert await proxy.stop() == 0
    assert [line["event"] for line in proxy.lines()] == ["record deleted by the admin API"]
    assert proxy.lines()[0]["key_hash"] == record


def test_described_config_masks_the_admin_token_and_store_password() -> None:
    """The start-up config dump never carries the admin token or a Redis password."""
    config = parse_config({
        "store": {"url": "redis://user:hunter2@redis.internal:6379/0"},
        "admin_token": "admin-secret-token",
    }, env={})  # fmt: skip
    described = json.dumps(describe(config))
    assert "hunter2" not in described and "admin-secret-token" not in described
    assert describe(config)["store"]["url"] == "redis://user:***@redis.internal:6379/0"


async def wait_for(proxy: ProxyProcess, event: str, count: int) -> list[dict[str, Any]]:
    try:
        await wait_until(lambda: len(proxy.named(event)) >= count, 10, interval=0.05)
    except AssertionError:
        raise AssertionError(f"no {count} x {event!r} in:\n{proxy.text()}") from None
    return proxy.named(event)


async def test_sighup_reloads_a_valid_config_and_refuses_an_invalid_one(
    launch: Launcher, client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    """SIGHUP re-reads the file: errors logged and the old config kept, or the new one applied."""
    proxy = await launch()
    raw = yaml.safe_load(proxy.config.read_text())
    proxy.config.write_text(yaml.safe_dump({**raw, "routes": [{"path": "/*", "ttl": "soon"}]}))
    proxy.signal(signal.SIGHUP)
    (refused,) = await wait_for(proxy, "config reload refused; keeping the running config", 1)
    assert refused["level"] == "error"
    assert refused["problems"] == ['routes[0].ttl: expected a duration like "24h", got "soon"']
    async with client.post(proxy.url + "/v1/pay", data=b"{}") as response:
        assert response.status == 201  # keys still optional

    routes = [{"path": "/*", "id": "strict", "require_key": True}]
    proxy.config.write_text(yaml.safe_dump({**raw, "routes": routes}))
    proxy.signal(signal.SIGHUP)
    (reloaded,) = await wait_for(proxy, "config reloaded", 1)
    assert [route["id"] for route in reloaded["config"]["routes"]] == ["strict"]
    async with client.post(proxy.url + "/v1/pay", data=b"{}") as response:
        assert response.status == 400
    assert await proxy.stop() == 0


def requests_in(counter_file: Path) -> float:
    """idempotency_proxy_requests_total as one worker's multiprocess file holds it."""
    # prometheus-client leaves merge untyped.
    merged = MultiProcessCollector.merge([str(counter_file)], accumulate=True)  # type: ignore[no-untyped-call]
    return float(sum(sample.value
               for metric in merged
               if metric.name == "idempotency_proxy_requests"
               for sample in metric.samples if sample.name.endswith("_total")))  # fmt: skip


async def test_workers_add_up_their_metrics_and_all_reload(
    launch: Launcher, redis: RedisServer, tmp_path: Path
) -> None:
    """--workers 2: every scrape counts every request; admin reload reaches both; SIGTERM: 0."""
    multiproc = tmp_path / "metrics"
    multiproc.mkdir()
    proxy = await launch("--workers", "2", store={"url": redis.url}, listening=2,
                         env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)})  # fmt: skip
    (started,) = proxy.named("workers started")
    proxy.workers = started["pids"]
    sent = 20
    # A new connection per request, so that SO_REUSEPORT spreads them over the workers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as client:
        for index in range(sent):
            headers = {"Idempotency-Key": f"w-{index}"}
            async with client.post(proxy.url + "/v1/pay", data=b"{}", headers=headers) as response:
                assert response.status == 201
        # Each worker hands its counts to the shared files at least once a second.
        deadline = asyncio.get_running_loop().time() + 3
        total = 0.0
        while total != sent and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            samples = await scrape(client, proxy.admin_url)
            total = sum(count for (name, labels), count in samples.items()
                        if name == "idempotency_proxy_requests_total")  # fmt: skip
        for _ in range(6):
            samples = await scrape(client, proxy.admin_url)
            total = sum(count for (name, labels), count in samples.items()
                        if name == "idempotency_proxy_requests_total")  # fmt: skip
            assert total == sent, proxy.text()
        # Both workers served some of them (each writes its own file in the directory).
        served = [requests_in(multiproc / f"counter_{pid}.db") for pid in proxy.workers]
        assert sum(served) == sent and all(served), (served, proxy.text())

        raw = yaml.safe_load(proxy.config.read_text())
        proxy.config.write_text(yaml.safe_dump({**raw, "defaults": {"require_key": True}}))
        async with client.post(proxy.admin_url + "/admin/reload") as response:
            assert response.status == 202, await response.text()
            assert (await response.json())["status"] == "signalled"
        await wait_for(proxy, "config reloaded", 2)
        for _ in range(6):
            async with client.post(proxy.url + "/v1/pay", data=b"{}") as response:
                assert response.status == 400, proxy.text()  # whichever worker answers
    assert await proxy.stop(timeout=15) == 0, proxy.text()
