"""Keys remembered after their response expired (`tombstone_ttl`), over real sockets.

The ttl and tombstone are a few hundred milliseconds; the same tests run on the embedded
store and a real redis-server.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.config import ConfigError, parse_config
from proxy.errors import PROBLEM_TYPE_PREFIX
from proxy.outcomes import RequestOutcome
from proxy.server import Running
from proxy.store.base import Acquired, Expired, Outcome, StoredResponse
from proxy.store.redis import RedisStore
from tests.conftest import ProxyFactory, RedisServer, Upstream, key, raw_config
from tests.support.requests import post, problem

TTL = 0.3
TOMBSTONE = 0.8


async def expired_count(client: aiohttp.ClientSession, proxy: Running) -> float:
    """requests_total for the `expired` outcome, as /metrics shows it."""
    async with client.get(proxy.admin_url + "/metrics") as response:
        text = await response.text()
    series = (f'idempotency_proxy_requests_total{{method="POST",'
              f'outcome="{RequestOutcome.EXPIRED}",route="all"}}')  # fmt: skip
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(series)]
    return float(values[0]) if values else 0.0


async def test_a_retry_after_the_ttl_inside_the_tombstone_is_409_response_expired(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """Past ttl, inside tombstone_ttl: the same request gets 409 response-expired, another
    gets 422, neither reaches the upstream; the outcome is counted as `expired`."""
    proxy = await start_proxy(store={"url": store_url}, defaults={
        "ttl": "300ms", "lease": "200ms", "tombstone_ttl": "800ms",
    })  # fmt: skip
    k = key("late")
    loop = asyncio.get_running_loop()
    first = await post(client, proxy, "/v1/pay", b'{"amount":1}', k)
    response_ends = loop.time() + TTL
    assert first[0] == 201
    replay = await post(client, proxy, "/v1/pay", b'{"amount":1}', k)
    assert replay[0] == 201 and replay[1]["Idempotent-Replayed"] == "true"
    before = await expired_count(client, proxy)
    await asyncio.sleep(max(0.0, response_ends + 0.1 - loop.time()))
    status, headers, body = await post(client, proxy, "/v1/pay", b'{"amount":1}', k)
    assert status == 409 and "Idempotent-Replayed" not in headers
    assert headers["Content-Type"] == "application/problem+json"
    found = problem(body)
    assert found["type"] == PROBLEM_TYPE_PREFIX + "response-expired"
    assert "was executed (the upstream answered 201)" in found["detail"]
    other = await post(client, proxy, "/v1/pay", b'{"amount":2}', k)
    assert other[0] == 422
    assert problem(other[2])["type"] == PROBLEM_TYPE_PREFIX + "key-mismatch"
    assert upstream.executions(k) == 1
    assert await expired_count(client, proxy) == before + 1


async def test_after_the_tombstone_the_key_executes_again(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """Once tombstone_ttl has passed too, the key is forgotten and a retry executes."""
    proxy = await start_proxy(store={"url": store_url}, defaults={
        "ttl": "300ms", "lease": "200ms", "tombstone_ttl": "300ms",
    })  # fmt: skip
    k = key("forgot")
    loop = asyncio.get_running_loop()
    assert (await post(client, proxy, "/v1/pay", b"{}", k))[0] == 201
    forgotten = loop.time() + 0.6
    await asyncio.sleep(0.4)
    assert (await post(client, proxy, "/v1/pay", b"{}", k))[0] == 409
    await asyncio.sleep(max(0.0, forgotten + 0.1 - loop.time()))
    again = await post(client, proxy, "/v1/pay", b"{}", k)
    assert again[0] == 201 and "Idempotent-Replayed" not in again[1]
    assert upstream.executions(k) == 2


async def test_without_tombstone_ttl_a_retry_after_the_ttl_executes_again(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """tombstone_ttl is off by default: after the ttl a retry is a new request."""
    proxy = await start_proxy(defaults={"ttl": "300ms", "lease": "200ms"})
    k = key("off")
    assert (await post(client, proxy, "/v1/pay", b"{}", k))[0] == 201
    await asyncio.sleep(TTL + 0.1)
    assert (await post(client, proxy, "/v1/pay", b"{}", k))[0] == 201
    assert upstream.executions(k) == 2


def test_tombstone_ttl_is_inherited_and_can_be_turned_off_per_route() -> None:
    """A route takes the default tombstone_ttl; `0` or `false` turns it off; bad values are
    config errors naming the field."""
    raw = raw_config("http://up:9000", defaults={"tombstone_ttl": "7d"}, routes=[
        {"path": "/a", "tombstone_ttl": 0}, {"path": "/b", "tombstone_ttl": False},
        {"path": "/c", "tombstone_ttl": "1h"}, {"path": "/*"},
    ])  # fmt: skip
    a, b, c, rest = parse_config(raw, env={}).routes
    assert (a.tombstone_ttl, b.tombstone_ttl, c.tombstone_ttl) == (0, 0, 3600)
    assert rest.tombstone_ttl == 7 * 86400
    assert parse_config(raw_config("http://up:9000"), env={}).routes[0].tombstone_ttl == 0
    bad = raw_config("http://up:9000", routes=[{"path": "/*", "tombstone_ttl": "forever"}])
    with pytest.raises(ConfigError, match=r"routes\[0\]\.tombstone_ttl: expected a duration"):
        parse_config(bad, env={})


async def test_a_redis_tombstone_keeps_no_body_and_is_stored_compactly(redis: RedisServer) -> None:
    """On Redis, the retry that finds a tombstone rewrites the record without headers and body,
    in Redis's compact encoding, and keeps its expiry."""
    store = RedisStore(redis.url, timeout=2.0)
    record = "idp:" + key("compact")
    body = b"x" * 4096
    try:
        lock = await store.begin(record, "fp", lease=1, ttl=0.2, takeover=False)
        assert isinstance(lock, Acquired)
        outcome = Outcome("response", StoredResponse(201, (("A", "b"),), body))
        assert await store.complete(record, lock.token, outcome, ttl=0.2, tombstone=60)
        assert int(redis.command("MEMORY", "USAGE", record, "SAMPLES", "0")[1:]) > len(body)
        await asyncio.sleep(0.3)
        decision = await store.begin(record, "fp", lease=1, ttl=0.2, takeover=False, tombstone=60)
        assert decision == Expired("response", 201)
        assert redis.command("HEXISTS", record, "body") == b":0\r\n"
        assert b"listpack" in redis.command("OBJECT", "ENCODING", record)
        assert int(redis.command("MEMORY", "USAGE", record, "SAMPLES", "0")[1:]) < 300
        assert 58_000 < int(redis.command("PTTL", record)[1:]) <= 60_000
    finally:
        await store.close()
