"""Metrics and logs: what an operator sees of the proxy, and what never shows up there.

The metrics tests script a sequence of requests and read `/metrics` on the admin listener;
the log tests run `python -m proxy run` as a real process and read its stderr, where every
line is JSON and no raw key or credential ever appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from proxy.config import describe, parse_config
from proxy.server import Running
from tests.conftest import ProxyFactory, RedisServer, Upstream, free_port, key
from tests.test_deploy import _alert_rules, _dashboard_exprs

_REPO = Path(__file__).resolve().parent.parent
# Variables the test environment must not leak into a proxy process.
_OWN_ENV = ("IDEMPOTENCY_PROXY_", "PROMETHEUS_MULTIPROC_DIR")
ACCESS_FIELDS = {
    "time", "level", "event", "route", "method", "path", "outcome", "status", "key_hash",
    "upstream_status", "upstream_ms", "latency_ms", "request_id", "error",
}  # fmt: skip


# --- metrics ---------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> Samples:
    """Every sample of one /metrics scrape, by name and labels."""
    async with client.get(admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def send(client: aiohttp.ClientSession, proxy: Running, method: str, path: str,
               idem: str | None = None, body: bytes = b"{}") -> int:  # fmt: skip
    headers = {} if idem is None else {"Idempotency-Key": idem}
    async with client.request(method, proxy.url + path, data=body, headers=headers) as response:
        await response.read()
        return response.status


async def test_metrics_count_every_outcome_of_a_scripted_sequence(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
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
    running = asyncio.ensure_future(send(client, proxy, "POST", "/delay/0.3/pay", slow))
    await asyncio.sleep(0.1)
    assert await send(client, proxy, "POST", "/delay/0.3/pay", slow) == 409  # conflict
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


# --- the proxy as a process ------------------------------------------------------------


@dataclass
class ProxyProcess:
    """`python -m proxy run` on fixed loopback ports, its stderr in a file."""

    process: subprocess.Popen[bytes]
    config: Path
    log: Path
    url: str
    admin_url: str
    workers: list[int] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def lines(self) -> list[dict[str, Any]]:
        """Every complete log line, each of which must be one JSON object."""
        *complete, _partial = self.text().split("\n")  # a line being written is not done yet
        return [json.loads(line) for line in complete]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == event]

    async def stop(self, timeout: float = 10) -> int:
        """SIGTERM, and the exit status once the process (and its workers) ended."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the proxy (pid {self.process.pid}) did not stop") from None

    def kill(self) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


Launcher = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def launch(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Launcher]:
    """Start proxy processes (killed at the end of the test if still running)."""
    started: list[ProxyProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None, listening: int = 1,
                    **overrides: Any) -> ProxyProcess:  # fmt: skip
        port, admin_port = free_port(), free_port()
        raw: dict[str, Any] = {
            "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin_port}",
            "upstream": upstream.url, "store": {"url": "memory://"}, "shutdown_grace": "5s",
            "routes": [{"path": "/*", "id": "all"}], **overrides,
        }  # fmt: skip
        config = tmp_path / f"proxy-{len(started)}.yaml"
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        log = config.with_suffix(".log")
        environment = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_ENV)}
        with log.open("ab") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", "run", "--config", str(config), *args],
                cwd=_REPO, env={**environment, **(env or {})},
                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            )  # fmt: skip
        running = ProxyProcess(process, config, log, f"http://127.0.0.1:{port}",
                               f"http://127.0.0.1:{admin_port}")  # fmt: skip
        started.append(running)
        await wait_until_ready(running, listening)
        return running

    yield start
    for running in started:
        running.kill()


async def wait_until_ready(running: ProxyProcess, listening: int) -> None:
    """Until /healthz answers and `listening` processes logged that they listen."""
    deadline = time.monotonic() + 15
    async with aiohttp.ClientSession() as session:
        while True:
            assert running.process.poll() is None, f"the proxy exited:\n{running.text()}"
            assert time.monotonic() < deadline, f"the proxy did not start:\n{running.text()}"
            try:
                async with session.get(running.admin_url + "/healthz") as response:
                    healthy = response.status == 200
            except aiohttp.ClientError:
                healthy = False
            ready = listening == 0 or running.text().count('"event":"listening"') >= listening
            if healthy and ready:
                return
            await asyncio.sleep(0.05)


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
    deadline = time.monotonic() + 10
    while len(found := proxy.named(event)) < count:
        assert time.monotonic() < deadline, f"no {count} x {event!r} in:\n{proxy.text()}"
        await asyncio.sleep(0.05)
    return found


async def test_sighup_reloads_a_valid_config_and_refuses_an_invalid_one(
    launch: Launcher, client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    """SIGHUP re-reads the file: errors logged and the old config kept, or the new one applied."""
    proxy = await launch()
    raw = yaml.safe_load(proxy.config.read_text())
    proxy.config.write_text(yaml.safe_dump({**raw, "routes": [{"path": "/*", "ttl": "soon"}]}))
    proxy.process.send_signal(signal.SIGHUP)
    (refused,) = await wait_for(proxy, "config reload refused; keeping the running config", 1)
    assert refused["level"] == "error"
    assert refused["problems"] == ['routes[0].ttl: expected a duration like "24h", got "soon"']
    async with client.post(proxy.url + "/v1/pay", data=b"{}") as response:
        assert response.status == 201  # keys still optional

    routes = [{"path": "/*", "id": "strict", "require_key": True}]
    proxy.config.write_text(yaml.safe_dump({**raw, "routes": routes}))
    proxy.process.send_signal(signal.SIGHUP)
    (reloaded,) = await wait_for(proxy, "config reloaded", 1)
    assert [route["id"] for route in reloaded["config"]["routes"]] == ["strict"]
    async with client.post(proxy.url + "/v1/pay", data=b"{}") as response:
        assert response.status == 400
    assert await proxy.stop() == 0


def requests_in(counter_file: Path) -> float:
    """idempotency_proxy_requests_total as one worker's multiprocess file holds it."""
    return sum(sample.value
               for metric in MultiProcessCollector.merge([str(counter_file)], accumulate=True)
               if metric.name == "idempotency_proxy_requests"
               for sample in metric.samples if sample.name.endswith("_total"))  # fmt: skip


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


# --- the access log under load, on SIGTERM and on reload -------------------------------


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        await asyncio.sleep(0.01)


async def test_access_lines_stay_whole_under_concurrency_and_none_is_lost_on_sigterm(
    launch: Launcher, client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    """200 concurrent requests, odd paths too: one whole JSON line each; SIGTERM with requests
    in flight still writes every line before the process exits."""
    proxy = await launch()
    paths = ["/v1/pay", '/v1/"quoted"\\back', "/v1/caf%C3%A9", "/v1/%00nul", "/v1/%ED%A0%80"]

    async def post(request_id: str, path: str) -> int:
        headers = {"X-Request-Id": request_id, "Idempotency-Key": request_id}
        async with client.post(proxy.url + path, data=b"{}", headers=headers) as response:
            await response.read()
            return response.status

    burst = [f"burst-{index}" for index in range(200)]
    await asyncio.gather(*(post(rid, paths[i % len(paths)]) for i, rid in enumerate(burst)))
    slow = [f"slow-{index}" for index in range(5)]
    running = [asyncio.ensure_future(post(rid, "/delay/0.3/v1/pay")) for rid in slow]
    await until(lambda: all(upstream.calls[rid] for rid in slow), "the slow requests arrived")
    assert await proxy.stop() == 0
    assert await asyncio.gather(*running) == [201] * len(slow)  # drained, not cut off

    text = proxy.text()
    assert text.endswith("\n")
    lines = proxy.lines()  # each one parses as JSON
    logged = [line for line in lines if line["event"] == "request"]
    assert sorted(line["request_id"] for line in logged) == sorted(burst + slow)
    assert all(line.keys() == ACCESS_FIELDS for line in logged)
    assert {"/v1/café", "/v1/\x00nul", '/v1/"quoted"\\back'} <= {line["path"] for line in logged}
    assert lines[-1]["event"] == "stopped"


async def test_a_reload_switches_the_access_log_level(
    launch: Launcher, client: aiohttp.ClientSession
) -> None:
    """log_level: warning on reload stops the access lines at once; back to info, they return."""
    proxy = await launch()
    raw = yaml.safe_load(proxy.config.read_text())

    async def post(request_id: str) -> None:
        async with client.post(proxy.url + "/v1/pay", data=b"{}",
                               headers={"X-Request-Id": request_id}) as response:  # fmt: skip
            assert response.status == 201

    async def reload(level: str) -> None:
        proxy.config.write_text(yaml.safe_dump({**raw, "log_level": level}))
        async with client.post(proxy.admin_url + "/admin/reload") as response:
            assert (await response.json())["status"] == "applied"

    await post("at-info")
    await reload("warning")
    await post("at-warning")
    await reload("info")
    await post("back-at-info")
    await wait_for(proxy, "request", 2)
    assert await proxy.stop() == 0
    assert [line["request_id"] for line in proxy.named("request")] == ["at-info", "back-at-info"]


# --- metrics from the first scrape -----------------------------------------------------

_SELECTOR = re.compile(r"\b(idempotency_proxy_\w+)(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def queried_series() -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """(metric, label values it must have) for each selector of the dashboard and alerts;
    `outcome=~"a|b"` asks for both, a matcher on a variable (`$route`) for none."""
    exprs = [*_dashboard_exprs(), *(rule["expr"] for rule in _alert_rules())]
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
    for outcome in metrics.OUTCOMES:
        for method in ("POST", "PUT"):
            labels = {"route": "v3", "method": method, "outcome": outcome}
            assert value(samples, "idempotency_proxy_requests_total", **labels) == 0
            assert ("idempotency_proxy_requests_total", frozenset(labels.items())) in samples
    for name in ("idempotency_proxy_unrecorded_responses_total",
                 "idempotency_proxy_upstream_duration_seconds_count"):  # fmt: skip
        assert selected(samples, name, frozenset({("route", "v3")})) == [0.0]
    assert await proxy.stop() == 0


# The series labelled by route: each configured route has its own.
_BY_ROUTE = {
    "idempotency_proxy_requests_total",
    "idempotency_proxy_request_duration_seconds_bucket",
    "idempotency_proxy_upstream_duration_seconds_bucket",
    "idempotency_proxy_unrecorded_responses_total",
}
