"""No store command is ever sent twice: a lost reply is a failed call, never a retry."""

from __future__ import annotations

import hashlib

import aiohttp
import pytest

from proxy.store.redis import BEGIN
from tests.conftest import ProxyFactory, RedisServer, Upstream, key
from tests.redis_topologies import relay_to
from tests.support.waiting import wait_until


@pytest.mark.parametrize("how", ["drop", "close"])
async def test_a_begin_whose_reply_is_lost_reaches_redis_once_and_answers_503(
    how: str, upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """The begin reaches Redis exactly once, the client gets 503, and the record it created
    is withdrawn, so the retry the 503 invites executes the request once."""
    async with relay_to(redis.port) as relay:
        proxy = await start_proxy(store={"url": relay.url, "timeout": "300ms"})
        sha = hashlib.sha1(BEGIN.encode()).hexdigest().encode()  # what EVALSHA names
        relay.lose_reply_to = sha
        relay.how = how
        k = key("lost")
        async with client.post(proxy.url + "/pay", headers={"Idempotency-Key": k}) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
        assert relay.lost.is_set()
        assert relay.commands[sha] == 1
        assert upstream.executions(k) == 0
        # The begin ran in Redis; the proxy withdraws its record, then the retry executes.
        await wait_until(lambda: not redis.command("KEYS", "idp:*").startswith(b"*1"),
                         5, "the record withdrawn", 0.05)  # fmt: skip
        async with client.post(proxy.url + "/pay", headers={"Idempotency-Key": k}) as response:
            assert response.status == 201
        assert upstream.executions(k) == 1
        assert relay.commands[sha] == 2  # the retry's own begin, nothing re-sent
