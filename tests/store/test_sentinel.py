"""Finding the primary through a Sentinel group while one sentinel is down, with real
redis-servers: connections opened side by side share one question to the sentinels, and
every sentinel of the URL stays in use (redis-py's own discovery, run side by side, lost
one and asked another twice)."""

from __future__ import annotations

import asyncio

from proxy.store.connection import LARGE_COMMAND, RedisBatcher
from proxy.store.topology import open_batcher
from tests.support.ports import free_port
from tests.support.topologies import SERVICE, SentinelGroup


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
