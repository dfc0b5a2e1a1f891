"""Finding the primary through a Sentinel group, with real redis-servers: connections opened
side by side share one question to the sentinels, and every sentinel of the URL stays in use
(redis-py's own discovery, run side by side, lost one and asked another twice); and a primary
the sentinels replaced while it kept running is left within about a check."""

from __future__ import annotations

import asyncio

from proxy.store.connection import LARGE_COMMAND, RedisBatcher
from proxy.store.topology import PRIMARY_CHECK_INTERVAL, open_batcher
from tests.support.ports import free_port
from tests.support.topologies import SERVICE, SentinelGroup, client
from tests.support.waiting import wait_until


def _sentinel_ports(batcher: RedisBatcher) -> list[int]:
    """The ports of the sentinels the pool asks, in the order it asks them."""
    manager = batcher.pool.sentinel_manager  # type: ignore[attr-defined]
    return [int(c.connection_pool.connection_kwargs["port"]) for c in manager.sentinels]


async def test_connections_opened_side_by_side_keep_every_sentinel(
    shared_sentinel_group: SentinelGroup,
) -> None:
    """With the first sentinel of the URL down, eight connections opened at once all reach
    the primary, and afterwards the pool still asks each sentinel, each once."""
    group = shared_sentinel_group
    group.flush()
    down = free_port()  # nothing listens there: a sentinel that is down
    ports = [down, *(s.port for s in group.sentinels)]
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    batcher = open_batcher(f"redis+sentinel://{hosts}/{SERVICE}", 2.0)
    assert isinstance(batcher, RedisBatcher)
    try:
        # A command this large travels in a batch of its own, on a connection of its own:
        # eight connections are opened side by side, each asking where the primary is.
        value = b"x" * (LARGE_COMMAND + 1)
        calls = [batcher.call("SET", f"sentinel-test:{n}", value) for n in range(8)]
        assert await asyncio.gather(*calls) == [b"OK"] * 8
        assert sorted(_sentinel_ports(batcher)) == sorted(ports)
    finally:
        await batcher.close()
        group.flush()


async def test_a_primary_replaced_while_it_runs_is_left_within_a_check(
    new_sentinel_group: SentinelGroup,
) -> None:
    """The sentinels name another primary while the old one keeps running and taking
    writes (how a failover of a primary that was only slow looks until they demote it,
    which takes them up to 10 s): the store's writes move to the new primary within about
    one check, instead of landing on the old one, whose demotion would lose them."""
    group = new_sentinel_group
    new = group.data[1]  # a replica, promoted below by hand
    batcher = open_batcher(group.url, 2.0)
    assert isinstance(batcher, RedisBatcher)
    try:
        assert await batcher.call("SET", "before-the-switch", "1") == b"OK"
        # A connection busy across the switch: not among the idle ones a change drops.
        busy = await batcher.pool.get_connection()  # type: ignore[no-untyped-call]
        assert busy.is_connected
        with client(new.port) as c:
            c.execute_command("REPLICAOF", "NO", "ONE")
        for sentinel in group.sentinels:  # nobody tells the old primary
            with client(sentinel.port) as c:
                c.execute_command("SENTINEL", "REMOVE", SERVICE)
                c.execute_command("SENTINEL", "MONITOR", SERVICE, "127.0.0.1", new.port, 2)
        written = 0

        async def lands_on_the_new_primary() -> bool:
            nonlocal written
            written += 1
            assert await batcher.call("SET", f"after-the-switch:{written}", "1") == b"OK"
            with client(new.port) as c:
                return bool(c.exists(f"after-the-switch:{written}"))

        await wait_until(
            lands_on_the_new_primary, 3 * PRIMARY_CHECK_INTERVAL + 2,
            "a write on the primary the sentinels name", interval=0.05,
        )  # fmt: skip
        # Handed back still open to the old primary, it is the next one the pool hands out:
        # it must be reopened to the new primary (redis-py's own reconnect went to the old).
        await batcher.pool.release(busy)
        assert await batcher.call("SET", "after-the-busy-one", "1") == b"OK"
        with client(new.port) as c:
            assert c.exists("after-the-busy-one")
    finally:
        await batcher.close()
