"""Logs: one JSON line per request on stderr, and never a raw key or credential.

The tests run `python -m proxy run` as a real process and read its stderr, where every
line is JSON and no raw key, bearer token or admin token ever appears.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import yaml

from proxy.config import describe, parse_config
from tests.conftest import Launcher, Upstream
from tests.support.waiting import wait_until

ACCESS_FIELDS = {
    "time", "level", "event", "route", "method", "path", "outcome", "status", "key_hash",
    "upstream_status", "upstream_ms", "latency_ms", "request_id", "error",
}  # fmt: skip


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


# --- the access log under load, on SIGTERM and on reload -------------------------------


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
    await wait_until(lambda: all(upstream.calls[rid] for rid in slow), 10)
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
    await wait_until(lambda: len(proxy.named("request")) >= 2, 10)
    assert await proxy.stop() == 0
    assert [line["request_id"] for line in proxy.named("request")] == ["at-info", "back-at-info"]
