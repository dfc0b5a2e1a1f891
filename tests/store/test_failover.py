"""A demoted primary and missing replicas, with real redis-servers: protected requests get
503, `/readyz` says the store refuses writes, and both recover without a restart."""

from __future__ import annotations

import time

import aiohttp

from tests.conftest import ProxyFactory, Upstream, key
from tests.redis_topologies import RedisNode, replicating
from tests.support.waiting import wait_until


async def post(client: aiohttp.ClientSession, url: str, k: str) -> int:
    async with client.post(url + "/pay", headers={"Idempotency-Key": k}) as response:
        return response.status


async def ready(client: aiohttp.ClientSession, admin_url: str) -> int:
    async with client.get(admin_url + "/readyz") as response:
        return response.status


def stat(node: RedisNode, name: str) -> int:
    info = node.command("INFO", "stats").decode()
    return int(info.split(f"{name}:")[1].split()[0])


def in_flight(node: RedisNode) -> list[bytes]:
    """The keys of in-flight records on `node`."""
    return [k for k in node.records() if node.command("HGET", k.decode(), "st").endswith(b"f\r\n")]


async def test_a_demoted_primary_is_not_ready_and_recovers_by_itself(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    primary_and_replica: tuple[RedisNode, RedisNode],
) -> None:  # fmt: skip
    """REPLICAOF on the proxy's node: 503 for protected requests and /readyz (a PING would
    pass), the READONLY connection is dropped, and REPLICAOF NO ONE brings it back."""
    primary, replica = primary_and_replica
    proxy = await start_proxy(store={"url": primary.url, "timeout": "500ms"})
    assert await post(client, proxy.url, key("before")) == 201
    assert await ready(client, proxy.admin_url) == 200

    replica.command("REPLICAOF", "NO", "ONE")
    primary.command("REPLICAOF", "127.0.0.1", str(replica.port))
    await wait_until(lambda: b"master_link_status:up" in primary.command("INFO", "replication"))
    k = key("demoted")
    assert await post(client, proxy.url, k) == 503
    assert upstream.executions(k) == 0
    assert await ready(client, proxy.admin_url) == 503
    opened = stat(primary, "total_connections_received")
    assert await ready(client, proxy.admin_url) == 503
    assert stat(primary, "total_connections_received") > opened  # READONLY dropped it

    primary.command("REPLICAOF", "NO", "ONE")
    assert await ready(client, proxy.admin_url) == 200
    assert await post(client, proxy.url, k) == 201
    assert upstream.executions(k) == 1


async def test_min_replicas_ack_waits_for_a_replica_and_withdraws_without_one(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    primary_and_replica: tuple[RedisNode, RedisNode],
) -> None:  # fmt: skip
    """With min_replicas_ack 1 a record is on the replica before its request is forwarded (the
    begin is acknowledged), and its result once recorded (after the answer, acknowledged too);
    with the replica gone, the begin fails (503, upstream not called), its record is
    withdrawn, and /readyz answers 503 until the replica is back."""
    primary, replica = primary_and_replica
    # WAIT gets half the store timeout: 1 s for a replica on a busy machine to answer.
    proxy = await start_proxy(store={"url": primary.url, "timeout": "2s",
                                     "min_replicas_ack": 1})  # fmt: skip
    k = key("acked")
    assert await post(client, proxy.url, k) == 201
    records = [r for r in primary.records() if r != b"idp:readyz"]
    assert len(records) == 1
    state = replica.command("HGET", records[0].decode(), "st")
    assert state.endswith((b"f\r\n", b"d\r\n"))  # the acknowledged begin, at least
    await wait_until(lambda: replica.command("HGET", records[0].decode(), "st").endswith(b"d\r\n"))
    assert await ready(client, proxy.admin_url) == 200

    replica.kill()
    await wait_until(lambda: b"connected_slaves:0" in primary.command("INFO", "replication"))
    lost = key("unacknowledged")
    started = time.monotonic()
    assert await post(client, proxy.url, lost) == 503
    assert time.monotonic() - started < 2.0  # one store timeout, and the 503
    assert upstream.executions(lost) == 0
    assert await ready(client, proxy.admin_url) == 503
    await wait_until(lambda: not in_flight(primary))  # the begin ran on the primary: withdrawn

    replica.start()
    replicating(primary)
    assert await ready(client, proxy.admin_url) == 200
    assert await post(client, proxy.url, lost) == 201
    assert upstream.executions(lost) == 1
