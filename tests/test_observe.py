"""Observe mode, over real sockets: every attempt reaches the upstream, the client gets the
upstream's own answers, and what enforcing would have changed is counted and logged, one
duplicate at a time. A reload to enforce protects the keys observe mode recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.keys import scope_of, storage_key
from proxy.metrics import WOULD_KINDS
from proxy.observing import KeylessWindow
from proxy.server import Running, serve
from tests.conftest import ProxyFactory, Upstream, key, raw_config
from tests.support.requests import post
from tests.support.waiting import wait_until

OBSERVED_EVENT = "observed: enforcing would have answered otherwise"


@pytest.fixture
def events(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[dict[str, Any]]]:
    """The proxy's own log events with `message`, as their structured fields."""
    caplog.set_level(logging.INFO, logger="idempotency_proxy")

    def named(message: str) -> list[dict[str, Any]]:
        return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == message]

    return named


def route_id(name: str) -> str:
    """A route id of this test's own: the counters are the process's, shared by every test."""
    return f"{name}-{os.urandom(3).hex()}"


async def counters(client: aiohttp.ClientSession, proxy: Running, route: str) -> dict[str, float]:
    """The observe-mode counters of `route`, as one scrape of the admin listener shows them."""
    async with client.get(proxy.admin_url + "/metrics") as response:
        text = await response.text()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("route") != route or not sample.name.endswith("_total"):
                continue
            name = sample.name.removeprefix("idempotency_proxy_").removesuffix("_total")
            if name == "observe_would":
                found[sample.labels["kind"]] = sample.value
            elif name in ("observed_requests", "observed_keys", "keyless_duplicates"):
                found[name] = sample.value
    return found


def record_hash(idem: str, authorization: str | None = None) -> str:
    values = [] if authorization is None else [authorization]
    return storage_key("default", scope_of([("Authorization", values)]), idem).hash


async def test_observe_forwards_every_attempt_and_counts_each_duplicate(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    store_url: str, events: Callable[[str], list[dict[str, Any]]],
) -> None:  # fmt: skip
    """Retries, a concurrent duplicate and a reused key all reach the upstream; each is
    counted and logged once, with the key hash, both statuses and the time between."""
    route = route_id("obs")
    proxy = await start_proxy(store={"url": store_url},
                              routes=[{"path": "/*", "id": route, "mode": "observe"}])  # fmt: skip
    retried, raced = key("retried"), key("raced")

    first = await post(client, proxy, "/v1/pay", b'{"amount": 1}', retried)
    again = [await post(client, proxy, "/v1/pay", b'{"amount": 1}', retried) for _ in range(2)]
    other = await post(client, proxy, "/v1/pay", b'{"amount": 2}', retried)
    slow = asyncio.ensure_future(post(client, proxy, "/delay/0.5/pay", b"{}", raced))
    await wait_until(lambda: upstream.executions(raced) == 1)
    racing = await post(client, proxy, "/delay/0.5/pay", b"{}", raced)
    await slow

    # Every attempt executed; every answer is the upstream's own (its serial), not a replay.
    assert upstream.executions(retried) == 4 and upstream.executions(raced) == 2
    answers = [first, *again, other, racing, slow.result()]
    assert [status for status, _, _ in answers] == [201] * 6
    assert len({json.loads(body)["serial"] for _, _, body in answers}) == 6
    assert all("Idempotent-Replayed" not in headers for _, headers, _ in answers)

    seen = await counters(client, proxy, route)
    assert seen == {
        "observed_requests": 6, "observed_keys": 2, "keyless_duplicates": 0,
        **dict.fromkeys(WOULD_KINDS, 0.0),
        "would_replay": 2, "would_mismatch": 1, "would_conflict": 1,
    }  # fmt: skip
    lines = events(OBSERVED_EVENT)
    assert [line["would"] for line in lines] == [
        "would_replay", "would_replay", "would_mismatch", "would_conflict"
    ]  # fmt: skip
    for line in lines[:2]:  # retries of a finished key: both statuses, the time since
        assert line["key_hash"] == record_hash(retried) and line["route"] == route
        assert (line["first_status"], line["status"]) == (201, 201)
        assert 0 <= line["seconds_between"] < 5
    assert lines[2]["key_hash"] == record_hash(retried) and lines[2]["status"] == 201
    assert lines[3]["key_hash"] == record_hash(raced)
    assert (lines[3]["first_status"], lines[3]["status"]) == (None, 201)  # the first still ran
    assert lines[3]["seconds_between"] < 0.5


async def test_observe_forwards_what_enforcing_would_refuse_and_counts_it(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """Missing and malformed keys and an oversized body pass unchanged (body and key header
    included); each is counted; an oversized body records nothing for its key."""
    route = route_id("refuse")
    proxy = await start_proxy(routes=[{"path": "/*", "id": route, "mode": "observe",
                                       "require_key": True, "max_request_body": 64}])  # fmt: skip
    assert (await post(client, proxy, "/v1/pay", b"{}"))[0] == 201
    malformed = [("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    async with client.post(proxy.url + "/v1/pay", data=b"{}", headers=malformed) as response:
        assert response.status == 201
    large, big = key("large"), b'{"pad": "' + b"x" * 200 + b'"}'
    for _ in range(2):
        assert (await post(client, proxy, "/v1/pay", big, large))[0] == 201
        assert upstream.bodies[-1] == big and upstream.headers[-1]["Idempotency-Key"] == large
    assert upstream.serial == 4
    seen = await counters(client, proxy, route)
    assert (seen["would_reject_missing_key"], seen["would_reject_invalid_key"]) == (1, 1)
    assert (seen["would_reject_too_large"], seen["would_replay"]) == (2, 0)
    assert (seen["observed_requests"], seen["observed_keys"]) == (4, 0)


async def test_observe_forwards_when_the_store_cannot_record(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A store that refuses a record never fails an observed request: it is forwarded."""
    route = route_id("full")
    proxy = await start_proxy(store={"url": "memory://", "max_records": 1},
                              routes=[{"path": "/*", "id": route, "mode": "observe"}])  # fmt: skip
    assert (await post(client, proxy, "/v1/pay", b"{}", key("one")))[0] == 201
    full = key("full")
    statuses = [(await post(client, proxy, "/v1/pay", b"{}", full))[0] for _ in range(2)]
    assert statuses == [201, 201] and upstream.executions(full) == 2
    assert (await counters(client, proxy, route))["observed_keys"] == 1
    async with client.get(proxy.admin_url + "/metrics") as response:
        text = await response.text()
    unrecorded = [
        sample.value for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "idempotency_proxy_requests_total"
        and sample.labels == {"route": route, "method": "POST", "outcome": "store_unavailable"}
    ]  # fmt: skip
    assert unrecorded == [2]


async def test_keyless_duplicates_are_counted_never_blocked(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    events: Callable[[str], list[dict[str, Any]]],
) -> None:  # fmt: skip
    """Identical keyless requests of one tenant within the window are suspects; another body
    or another tenant is not; both modes count, neither blocks."""
    enforcing, observing = route_id("keyless-enf"), route_id("keyless-obs")
    proxy = await start_proxy(defaults={"observe_keyless": "10s"}, routes=[
        {"path": "/observe/*", "id": observing, "mode": "observe"},
        {"path": "/*", "id": enforcing},
    ])  # fmt: skip
    for prefix in ("/v1", "/observe"):
        for body, tenant in ((b"{}", "a"), (b"{}", "a"), (b"{}", "b"), (b"[]", "a"),
                             (b"{}", "a")):  # fmt: skip
            status, _, _ = await post(client, proxy, prefix + "/pay", body, Authorization=tenant)
            assert status == 201
    assert upstream.serial == 10
    assert (await counters(client, proxy, enforcing))["keyless_duplicates"] == 2
    assert (await counters(client, proxy, observing))["keyless_duplicates"] == 2
    suspects = events("suspected duplicate without a key")
    assert [s["route"] for s in suspects] == [enforcing] * 2 + [observing] * 2


def test_keyless_window_forgets_after_the_window_and_stays_bounded() -> None:
    """Outside the window an identical request is no suspect; the oldest entries go first."""
    now = [0.0]
    window = KeylessWindow(limit=2, clock=lambda: now[0])
    assert window.sight("r", b"s", "fp", 10) is None
    now[0] = 4.0
    assert window.sight("r", b"s", "fp", 10) == 4.0
    now[0] = 15.0
    assert window.sight("r", b"s", "fp", 10) is None  # 11 s after the last one
    window.sight("r", b"s", "other", 10)
    window.sight("r", b"s", "third", 10)  # over the limit: "fp" is forgotten
    assert window.sight("r", b"s", "fp", 10) is None


@pytest.fixture
async def start_from_file(
    upstream: Upstream, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[tuple[Running, Path]]]]:
    """A proxy started from a config file, so that it can be reloaded."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> tuple[Running, Path]:
            path = tmp_path / "proxy.yaml"
            path.write_text(yaml.safe_dump(raw_config(upstream.url, **overrides)))
            config = load_config(path)
            return await stack.enter_async_context(serve(config, config_path=str(path))), path

        yield start


async def test_reload_to_enforce_protects_keys_first_seen_in_observe(
    upstream: Upstream, start_from_file: Callable[..., Awaitable[tuple[Running, Path]]],
    client: aiohttp.ClientSession, store_url: str,
) -> None:  # fmt: skip
    """Keys recorded while observing replay from the first enforcing request on."""
    routes = [
        {"path": "/*", "id": route_id("switch"), "mode": "observe", "on_concurrent": "reject"}
    ]
    proxy, path = await start_from_file(store={"url": store_url}, routes=routes)
    done, running = key("done"), key("running")
    first = await post(client, proxy, "/v1/pay", b'{"amount": 1}', done)
    slow = asyncio.ensure_future(post(client, proxy, "/delay/0.5/pay", b"{}", running))
    await wait_until(lambda: upstream.executions(running) == 1)

    routes[0]["mode"] = "enforce"
    path.write_text(yaml.safe_dump(raw_config(upstream.url, store={"url": store_url},
                                              routes=routes)))  # fmt: skip
    async with client.post(proxy.admin_url + "/admin/reload") as response:
        assert response.status == 200
    replay = await post(client, proxy, "/v1/pay", b'{"amount": 1}', done)
    conflict = await post(client, proxy, "/delay/0.5/pay", b"{}", running)
    mismatch = await post(client, proxy, "/v1/pay", b'{"amount": 9}', done)
    assert replay[0] == 201 and replay[1]["Idempotent-Replayed"] == "true"
    assert replay[2] == first[2]
    assert (conflict[0], mismatch[0]) == (409, 422)
    assert (await slow)[0] == 201
    assert upstream.executions(done) == 1 and upstream.executions(running) == 1
