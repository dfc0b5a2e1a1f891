"""Running processes: SIGHUP reloads, and --workers processes that count and reload as one.

Each test runs `python -m proxy run` as a real process (on fixed free ports, which the
workers share) and reads its JSON log lines.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from tests.conftest import Launcher, RedisServer, Upstream
from tests.support.metrics import scrape
from tests.support.proxies import ProxyProcess
from tests.support.waiting import wait_until


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
