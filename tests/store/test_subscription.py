"""The one pub/sub subscription across a failover: a demoted primary that stays up still
delivers (Redis replicates PUBLISH), a Sentinel switch after a SIGKILL is followed, and on a
Cluster a record's channel moves to the replica promoted for its slot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import redis
from redis.crc import key_slot

from proxy.config import StoreConfig
from proxy.store import open_store
from proxy.store.base import Acquired, Outcome, Store, StoredResponse
from proxy.store.redis import RedisStore
from tests.conftest import key
from tests.redis_topologies import RedisNode
from tests.support.topologies import ClusterNodes, SentinelGroup
from tests.support.waiting import wait_until_sync

RESPONSE = Outcome("response", StoredResponse(201, (), b"{}"))
WAKE = 5.0


def subscribers(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=2) as c:
        return len(c.pubsub_channels("idp:*"))


async def until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def acquired(store: Store, record: str) -> str:
    """Own `record` (taking over a lease that ran out, if the record survived)."""
    decision = await store.begin(record, "fp", lease=0.2, ttl=30, takeover=True)
    while not isinstance(decision, Acquired):
        await asyncio.sleep(0.05)
        decision = await store.begin(record, "fp", lease=0.2, ttl=30, takeover=True)
    return decision.token


async def test_a_demoted_primary_still_delivers_to_its_subscribers(
    primary_and_replica: tuple[RedisNode, RedisNode],
) -> None:
    """REPLICAOF swaps the roles: the subscription stays on the old primary, now a replica,
    and a complete on the new primary still wakes the watch there."""
    primary, replica = primary_and_replica
    watching = RedisStore(primary.url, timeout=1.0)
    writing = RedisStore(replica.url, timeout=1.0)
    record = "idp:" + key("demoted")
    try:
        async with watching.watch(record) as watch:
            replica.command("REPLICAOF", "NO", "ONE")
            primary.command("REPLICAOF", "127.0.0.1", str(replica.port))
            wait_until_sync(
                lambda: b"master_link_status:up" in primary.command("INFO", "replication")
            )
            token = await acquired(writing, record)
            assert await writing.complete(record, token, RESPONSE, ttl=30)
            assert await watch.changed(WAKE)
    finally:
        await watching.close()
        await writing.close()
        primary.command("REPLICAOF", "NO", "ONE")


async def test_a_sentinel_switch_is_followed_by_the_subscription(
    new_sentinel_group: SentinelGroup,
) -> None:
    """SIGKILL the primary: the subscription re-opens on the promoted replica, wakes its
    waiters once (messages may have been lost), and hears the next change there."""
    group = new_sentinel_group
    store = open_store(StoreConfig(url=group.url, timeout=1.0))
    record = "idp:" + key("switch")
    try:
        await acquired(store, record)
        async with store.watch(record) as watch:
            old = group.master_port()
            assert subscribers(old) == 1
            group.master().kill()
            new = group.wait_switched(old)
            await until(lambda: subscribers(new) == 1)
            assert await watch.changed(WAKE)  # re-subscribed: re-check
            token = await acquired(store, record)
            assert await store.complete(record, token, RESPONSE, ttl=30)
            assert await watch.changed(WAKE)
    finally:
        await store.close()


def shard_subscribers(port: int) -> int:
    with redis.Redis(port=port, socket_timeout=2) as c:
        return len(c.execute_command("PUBSUB", "SHARDCHANNELS", "idp:*"))


async def test_a_cluster_failover_moves_the_subscription_to_the_promoted_replica(
    new_cluster: ClusterNodes,
) -> None:
    """SIGKILL the master of a waited record's slot: its channel is subscribed again on the
    promoted replica, its waiters re-check once, and the next change there wakes them."""
    cluster = new_cluster
    store = open_store(StoreConfig(url=cluster.url, timeout=1.0))
    record = "idp:" + key("failover")
    slot = key_slot(record.encode())
    try:
        await acquired(store, record)
        async with store.watch(record) as watch:
            old = cluster.owner(slot)
            assert shard_subscribers(old) == 1
            cluster.node(old).kill()

            def promoted() -> bool:
                with contextlib.suppress(redis.RedisError, RuntimeError):
                    return cluster.owner(slot) != old
                return False

            await until(promoted)
            new = cluster.owner(slot)
            await until(lambda: shard_subscribers(new) == 1)
            assert await watch.changed(WAKE)  # moved: re-check
            token = await acquired(store, record)
            assert await store.complete(record, token, RESPONSE, ttl=30)
            assert await watch.changed(WAKE)
    finally:
        await store.close()
