"""Sentinel and Cluster deployments under the store's batcher, managed by redis-py.

The store sends every command through a batcher on a redis-py connection pool. What
differs between deployments is only where a connection goes, and redis-py knows that:

- Sentinel: redis-py's `SentinelConnectionPool` asks the sentinels for the current primary
  whenever it opens a connection, so after a switch (or a `READONLY` reply, which drops the
  connection) the next batch goes to the new primary. One batcher, as for one node. The
  connections opened side by side share one question (redis-py's is not safe to ask twice
  at once, see `_Sentinels`).
- Cluster: redis-py's `RedisCluster` keeps the slot map (it is used for nothing else), and
  `ClusterBatcher` keeps one batcher per master, sending each command to the master of its
  key's slot. Every store command touches exactly one key (each script declares its one
  record), so everything one script touches lives in one slot; a command naming more keys
  is refused before it is sent.

A `MOVED` or `ASK` reply means the command did not run: the slot map is updated through
redis-py and the command is sent where the reply says (after `ASKING` for `ASK`), at most
`MAX_REDIRECTS` times, each counted. Nothing else is ever re-sent: a connection error or a
timeout may hide a command that ran, so it fails the call (and makes the slot map be
refreshed, which is how a Cluster failover is followed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.cluster import get_node_name
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.maint_notifications import MaintNotificationsConfig

from proxy import logs, metrics
from proxy.errors import StoreUnavailable
from proxy.store.connection import (
    DEFAULT_HEALTH_CHECK_INTERVAL,
    RedisBatcher,
    ReplyError,
    disable_retries,
)
from proxy.store_url import Topology, parse_topology
from proxy.tasks import spawn, stop

# Redirects followed for one command before it fails (a slot moving twice under one command).
MAX_REDIRECTS = 2
# A failing node makes the slot map be re-read, at most this often.
_REFRESH_PAUSE = 0.1
# Commands whose key is their fourth argument (`EVALSHA sha 1 key ...`); for every other
# store command it is the second (`DEL key`, `HGET key field`, `SET key value`).
_SCRIPT_COMMANDS = frozenset({"EVAL", "EVALSHA", b"EVAL", b"EVALSHA"})


class Batcher(Protocol):
    """What the store sends commands through: a `RedisBatcher`, or one per Cluster master."""

    def call(self, *args: Any) -> Awaitable[Any]:
        """The reply to one command (a `ReplyError` for an error reply)."""
        ...

    def call_acknowledged(self, *args: Any) -> Awaitable[Any]:
        """The reply to a write that counts only once `min_replicas_ack` replicas have it."""
        ...

    async def close(self) -> None: ...


def open_batcher(url: str, timeout: float, *, min_replicas_ack: int = 0) -> Batcher:
    """The batcher for a `redis[s]+sentinel://` or `redis[s]+cluster://` URL."""
    topology = parse_topology(url)
    if topology.kind == "sentinel":
        pool = sentinel_pool(topology, timeout)
        return RedisBatcher(
            pool, timeout, min_replicas_ack=min_replicas_ack, is_current=pool.is_current
        )
    return ClusterBatcher(topology, timeout, min_replicas_ack=min_replicas_ack)


def _pool_options(timeout: float, topology: Topology) -> dict[str, Any]:
    """The options of a data node's pool: the proxy's defaults under the URL's own
    (the same defaults as for a `redis://` URL, see `connection_pool`)."""
    return {
        "socket_connect_timeout": timeout,
        "socket_timeout": None,
        "health_check_interval": DEFAULT_HEALTH_CHECK_INTERVAL,
        "socket_keepalive": True,
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        **topology.connection,
    }


class _Sentinels(Sentinel):
    """redis-py's sentinel client, asked one question at a time.

    Every connection the pool opens asks the sentinels where the primary is, and during a
    switch every batch opens one. redis-py's `discover_master` is not safe side by side: it
    moves the sentinel that answered to the front of `sentinels` by an index read before its
    await, so two discoveries that overlap (the first sentinel down or not yet agreeing)
    swap the wrong entries: one sentinel then stands in the list twice and another drops
    out, with its open connections, which nothing closes any more. So one discovery runs
    at a time, and the connections that want one meanwhile share its answer (which also
    spares the sentinels a burst of identical questions).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._discoveries: dict[str, asyncio.Task[tuple[str, int]]] = {}

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        task = self._discoveries.get(service_name)
        if task is None or task.done():
            task = spawn(self._discover(service_name), "store-sentinel-discovery")
            # Read here, so that a discovery whose askers all gave up is no unread error.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._discoveries[service_name] = task
        # Shielded: an asker that times out leaves the answer to the others.
        return await asyncio.shield(task)

    async def _discover(self, service_name: str) -> tuple[str, int]:
        address: tuple[str, int] = await super().discover_master(service_name)
        return address

    async def aclose(self) -> None:
        for task in self._discoveries.values():
            task.cancel()
        await super().aclose()


# How often a Sentinel pool asks where the primary is, besides when it opens a connection.
# A primary that the sentinels replaced while it kept running (they judged it down while it
# was only slow, or a partition healed) accepts writes until they demote it, which takes
# them up to 10 s, and every write it takes meanwhile is lost with the demotion. A
# connection that only ever asked when it connected would stay there all that time.
PRIMARY_CHECK_INTERVAL = 1.0


class _SentinelPool(SentinelConnectionPool):
    """A Sentinel pool that keeps asking where the primary is (`PRIMARY_CHECK_INTERVAL`),
    so that `is_current` can tell a connection to a replaced primary; it also closes its
    sentinel clients when closed, and opens nothing after that."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self._follow_task: asyncio.Task[None] | None = None
        self._closed = False
        self._reported: set[type[BaseException]] = set()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        if self._closed:
            raise RedisConnectionError("store closed")
        if self._follow_task is None or self._follow_task.done():
            self._follow_task = spawn(self._follow(), "store-sentinel-primary")
        connection: Connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        return connection

    def is_current(self, connection: Any) -> bool:
        """False for a connection open to a node the sentinels no longer name as primary."""
        return (
            not connection.is_connected
            or self.master_address is None
            or (connection.host, connection.port) == self.master_address
        )

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(PRIMARY_CHECK_INTERVAL)
            # redis-py's: asks the sentinels, and on a change drops the idle connections.
            # Unanswered: the next check asks again (a connection that fails finds out too).
            try:
                await self.get_master_address()  # type: ignore[no-untyped-call]
            except (RedisError, OSError, TimeoutError):
                pass
            except Exception as exc:  # an odd reply, or a bug: said once, and asked again
                if type(exc) not in self._reported:
                    self._reported.add(type(exc))
                    logs.event(
                        "asking the sentinels for the primary failed", logging.ERROR,
                        error=f"{type(exc).__module__}.{type(exc).__qualname__}",
                    )  # fmt: skip

    async def aclose(self) -> None:
        self._closed = True
        await stop(self._follow_task)
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


def sentinel_pool(topology: Topology, timeout: float) -> _SentinelPool:
    """The pool of connections to the current primary of `topology`'s service."""
    no_retry = Retry(NoBackoff(), 0)
    sentinels = _Sentinels(
        list(topology.nodes),
        sentinel_kwargs={
            "socket_connect_timeout": timeout, "socket_timeout": timeout, "retry": no_retry,
            **topology.sentinel_connection,
        },
    )  # fmt: skip
    pool = _SentinelPool(
        topology.service_name, sentinels, ssl=topology.tls, **_pool_options(timeout, topology)
    )
    disable_retries(pool)
    return pool


def command_key(args: tuple[Any, ...]) -> Any:
    """The one key a store command touches; a command naming another is a bug of ours."""
    if args[0] in _SCRIPT_COMMANDS:
        if int(args[2]) != 1:
            raise RuntimeError("a store script must declare exactly one key (its record)")
        return args[3]
    return args[1]


class ClusterBatcher:
    """The batcher interface over a Cluster: one batcher per master, routed by slot."""

    def __init__(self, topology: Topology, timeout: float, *, min_replicas_ack: int = 0) -> None:
        self.timeout = timeout
        self.min_replicas_ack = min_replicas_ack
        self._topology = topology
        self._cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in topology.nodes],
            ssl=topology.tls, retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=timeout, socket_timeout=timeout, **topology.connection,
        )  # fmt: skip
        self._nodes = self._cluster.nodes_manager
        self._batchers: dict[str, RedisBatcher] = {}
        self._started: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0
        self._moved = metrics.STORE_REDIRECTS.labels("moved")
        self._ask = metrics.STORE_REDIRECTS.labels("ask")

    async def call(self, *args: Any) -> Any:
        return await self._route(args, acknowledged=False)

    async def call_acknowledged(self, *args: Any) -> Any:
        return await self._route(args, acknowledged=True)

    async def _route(self, args: tuple[Any, ...], *, acknowledged: bool) -> Any:
        if not self._nodes.slots_cache:
            await self._start()
        slot = self._cluster.keyslot(command_key(args))
        try:
            name = self._nodes.get_node_from_slot(slot).name
        except RedisError as exc:  # a slot no master serves (a failover under way)
            self._refresh_soon()
            raise StoreUnavailable(f"redis: slot {slot} is not served", retry_after=1) from exc
        for _ in range(MAX_REDIRECTS + 1):
            batcher = self._batcher(name)
            call = batcher.call_acknowledged if acknowledged else batcher.call
            try:
                reply = await call(*args)
            except StoreUnavailable:
                self._refresh_soon()  # a failed master: its replica may be promoted by now
                raise
            if not isinstance(reply, ReplyError):
                return reply
            kind, _, where = str(reply).partition(" ")
            if kind == "MOVED":
                self._moved.inc()
                moved = MovedError(where)
                await self._nodes.move_slot(moved)
                self._refresh_soon()
                name = get_node_name(moved.host, moved.port)
            elif kind == "ASK":
                self._ask.inc()
                asked = AskError(where)
                return await self._asking(get_node_name(asked.host, asked.port), args,
                                          acknowledged)  # fmt: skip
            else:
                if kind in ("CLUSTERDOWN", "TRYAGAIN"):
                    self._refresh_soon()
                return reply
        raise StoreUnavailable("redis: the cluster kept redirecting the command", retry_after=1)

    async def _asking(self, name: str, args: tuple[Any, ...], acknowledged: bool) -> Any:
        """Send `ASKING` and the command back to back: one batch, one connection, in order.

        (A command over the batcher's large-command size travels alone; the node then
        answers `MOVED` back to the slot's owner, and the command fails without running.)
        """
        batcher = self._batcher(name)
        asking = batcher.call("ASKING")
        asking.add_done_callback(lambda f: f.cancelled() or f.exception())  # judged by `reply`
        # Acknowledged as the first try would have been: min_replicas_ack holds on a migrating
        # slot's new owner too.
        call = batcher.call_acknowledged if acknowledged else batcher.call
        return await call(*args)

    def _batcher(self, name: str) -> RedisBatcher:
        batcher = self._batchers.get(name)
        if batcher is None:
            node = self._nodes.get_node(node_name=name)
            host, port = (node.host, node.port) if node else name.rsplit(":", 1)
            pool = ConnectionPool(
                connection_class=SSLConnection if self._topology.tls else Connection,
                host=host, port=int(port), **_pool_options(self.timeout, self._topology),
            )  # fmt: skip
            disable_retries(pool)
            batcher = RedisBatcher(pool, self.timeout, min_replicas_ack=self.min_replicas_ack)
            self._batchers[name] = batcher
        return batcher

    async def _start(self) -> None:
        """Read the slot map once, shared by the callers that arrive meanwhile."""
        if self._started is None or (self._started.done() and not self._nodes.slots_cache):
            self._started = spawn(self._read_slots(), "store-cluster-slots")
        try:
            await asyncio.shield(self._started)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(
                "redis: cannot read the cluster's slot map", retry_after=1
            ) from exc

    async def _read_slots(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self._nodes.initialize()

    def _refresh_soon(self) -> None:
        """Re-read the slot map in the background (once at a time, not too often)."""
        if self._refreshing is not None and not self._refreshing.done():
            return
        if time.monotonic() - self._refreshed_at < _REFRESH_PAUSE:
            return
        self._refreshed_at = time.monotonic()
        self._refreshing = spawn(self._refresh(), "store-cluster-slots")

    async def _refresh(self) -> None:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await self._read_slots()  # on failure, the next failing call asks again

    async def master_name(self, key: str) -> str | None:
        """The name of the master serving `key`'s slot, or None when no master is known."""
        with contextlib.suppress(StoreUnavailable, RedisError):
            if not self._nodes.slots_cache:
                await self._start()
            return str(self._nodes.get_node_from_slot(self._cluster.keyslot(key)).name)
        return None

    def node_pool(self, name: str) -> ConnectionPool:
        """The connection pool of the node `name` (for its pub/sub connection)."""
        return self._batcher(name).pool

    async def refresh(self) -> None:
        """Re-read the slot map now (a node failed); failing quietly."""
        await self._refresh()

    async def masters(self) -> list[RedisBatcher]:
        """A batcher per master, for the commands that concern every node (SCAN)."""
        if not self._nodes.slots_cache:
            await self._start()
        return [self._batcher(node.name) for node in self._cluster.get_primaries()]

    async def keys_per_master(self, base: str) -> list[str]:
        """Keys `base{n}` such that every master serves one of them (the readiness probe
        writes each: a Cluster takes writes only when every master does)."""
        if not self._nodes.slots_cache:
            await self._start()
        wanted = {node.name for node in self._cluster.get_primaries()}
        keys: dict[str, str] = {}
        n = 0
        while len(keys) < len(wanted) and n < 100_000:
            nodes = self._nodes.slots_cache.get(key_slot(str(n).encode()))
            if nodes and nodes[0].name in wanted:
                keys.setdefault(nodes[0].name, f"{base}{{{n}}}")
            n += 1
        return list(keys.values())

    async def close(self) -> None:
        for task in (self._started, self._refreshing):
            if task is not None:
                task.cancel()
        for batcher in self._batchers.values():
            await batcher.close()
        # The client's own connections (slot map reads): its `aclose` closes them only once
        # its own `initialize` ran, which would also read the command table we do not use.
        await self._nodes.aclose()
        await self._nodes.aclose("startup_nodes")
