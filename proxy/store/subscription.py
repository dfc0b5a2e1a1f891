"""One pub/sub subscription per process: waiters woken by Redis, not by polling.

The scripts that settle a record (complete, release, takeover, "outcome unknown") publish a
message on a channel named after the record's own key, so a waiter on any proxy sharing the
store hears of it. A channel per record (not one channel for everything) means a process
receives only the messages of the keys it waits on, and a `PUBLISH` nobody listens to costs
Redis one dictionary lookup. On a Cluster the scripts use `SPUBLISH` (sharded pub/sub): the
channel has the record's name, so it hashes to the record's slot, and the message stays on
the record's shard instead of crossing the whole cluster bus.

`Subscription` holds one connection, taken from a redis-py pool (so AUTH, TLS, keepalive and,
for a Sentinel pool, finding the primary are redis-py's). The waiters of one process share it:
the first waiter of a key subscribes to the key's channel, the last one unsubscribes. It is
opened on the first wait and kept. Nothing here may strand a waiter:

- `subscribe` returns once Redis confirmed the subscription, or after the store timeout
  (refused by an ACL, no connection): the waiter then relies on its bounded re-check.
- A lost connection is re-opened (backing off) and every wanted channel subscribed again;
  each confirmation wakes the channel's waiters, since messages may have been lost meanwhile.
- An idle connection is pinged every health-check interval; one that does not answer is
  dropped and re-opened (a NAT that forgot it).

A Sentinel switch is followed because a lost connection is re-opened through the pool (the
new primary), and a demoted primary that stays up still delivers: Redis replicates `PUBLISH`
to replicas. On a Cluster, `ClusterBatcher` keeps one `Subscription` per master (see
`topology.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError, ResponseError

from proxy.store.connection import DEFAULT_HEALTH_CHECK_INTERVAL
from proxy.store.topology import ClusterBatcher
from proxy.store.watchers import Watchers
from proxy.tasks import spawn, stop

# Re-opening a lost subscription: first after this long, then backing off.
_RECONNECT_FIRST = 0.05
_RECONNECT_MAX = 2.0


class Subscription:
    """The process's pub/sub connection to one Redis node; messages wake `watchers`.

    `sharded` uses `SSUBSCRIBE` (Cluster). `on_lost(channels)` is told when the connection
    failed, with the channels it held (a Cluster re-routes them).
    """

    def __init__(
        self, pool: ConnectionPool, watchers: Watchers, timeout: float, *, sharded: bool = False,
        on_lost: Callable[[list[str]], None] | None = None,
    ) -> None:  # fmt: skip
        self._pool = pool
        self._watchers = watchers
        self._timeout = timeout
        prefix = "s" if sharded else ""
        self._commands = (f"{prefix}SUBSCRIBE".upper(), f"{prefix}UNSUBSCRIBE".upper())
        self._kinds = (f"{prefix}subscribe".encode(), f"{prefix}unsubscribe".encode(),
                       f"{prefix}message".encode())  # fmt: skip
        self._sharded = sharded
        self._on_lost = on_lost
        self.channels: set[str] = set()  # wanted, whether confirmed yet or not
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self._outbox: list[bytes] = []
        self._connection: AbstractConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    async def subscribe(self, channel: str) -> None:
        """Subscribe to `channel`; return once Redis confirmed it or the timeout passed."""
        if self._closed:
            return
        future = self._confirming.get(channel)
        if channel in self.channels and future is None:
            return  # subscribed already (for another waiter of the key)
        if future is None:  # else another waiter's subscription is on its way: await it too
            self.channels.add(channel)
            future = self._confirming[channel] = asyncio.get_running_loop().create_future()
            self._send(self._commands[0], channel)
        if self._runner is None or self._runner.done():
            self._runner = spawn(self._run(), "store-subscription")
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(future)
        except TimeoutError:
            # Unconfirmed: its waiters go on without it, and a confirmation coming later
            # wakes them to re-check (what changed meanwhile may have been missed).
            if self._confirming.get(channel) is future:
                del self._confirming[channel]
            if not future.done():
                future.set_result(None)

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        future = self._confirming.pop(channel, None)
        if future is not None and not future.done():
            future.set_result(None)
        self._send(self._commands[1], channel)

    def _send(self, command: str, channel: str) -> None:
        """Queue a command for the open connection; the commands of one loop iteration go in
        one write. Without a connection there is nothing to do: the connection that opens
        next subscribes to every wanted channel."""
        if self._connection is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(_packed(command, channel))

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if data and self._connection is not None:
            spawn(self._write(self._connection, data), "store-subscription")

    async def _write(self, connection: AbstractConnection, data: bytes) -> None:
        # redis-py would re-open a closed connection to write: not one that was dropped (it
        # would hold no subscription). A failed write shows up as a failed read in `_serve`.
        if connection is not self._connection or not connection.is_connected:
            return
        with contextlib.suppress(RedisError, OSError):
            await connection.send_packed_command(data, check_health=False)

    async def _run(self) -> None:
        """Keep the connection open while the store is; re-open it when it is lost."""
        delay = _RECONNECT_FIRST
        while not self._closed:
            try:
                await self._serve()
            except (RedisError, OSError, TimeoutError):
                pass
            finally:
                await self._drop()
            if self._closed or not self.channels:
                return  # the next `subscribe` opens it again
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _serve(self) -> None:
        """Open a connection, subscribe to every wanted channel, hand out what Redis sends."""
        async with asyncio.timeout(self._timeout):
            connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        self._connection = connection
        wanted = sorted(self.channels)
        if wanted:
            # One command per channel: on a Cluster each channel may lie in another slot.
            data = b"".join(_packed(self._commands[0], c) for c in wanted)
            await connection.send_packed_command(data, check_health=False)
        interval = connection.health_check_interval or DEFAULT_HEALTH_CHECK_INTERVAL
        pinged = False
        while True:
            try:
                reply = await connection.read_response(
                    timeout=interval, disconnect_on_error=False, push_request=True
                )
            except ResponseError:
                # A subscription refused (an ACL without the channel, a moved slot): its
                # waiters stop waiting for the confirmation and rely on the re-check.
                self._release_confirming()
                continue
            if reply is None:
                if pinged:
                    raise TimeoutError("the subscription did not answer a PING")
                await connection.send_packed_command(_packed("PING"), check_health=False)
                pinged = True
                continue
            pinged = False
            self._dispatch(reply)

    def _dispatch(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 2:
            return
        kind = reply[0]
        channel = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
        if kind == self._kinds[2]:
            self._watchers.notify(channel)
        elif kind == self._kinds[0]:
            future = self._confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            else:  # subscribed again after a lost connection: messages may have been missed
                self._watchers.notify(channel)
        elif kind == self._kinds[1] and self._sharded and channel in self.channels:
            # The server dropped a wanted channel (its slot moved): re-route it.
            self.channels.discard(channel)
            self._watchers.notify(channel)
            if self._on_lost is not None:
                self._on_lost([channel])

    def _release_confirming(self) -> None:
        for future in self._confirming.values():
            if not future.done():
                future.set_result(None)
        self._confirming.clear()

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._outbox = []
        self._release_confirming()
        if connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect(nowait=True)
            await self._pool.release(connection)
        if self._on_lost is not None and self.channels and not self._closed:
            self._on_lost(list(self.channels))

    async def close(self) -> None:
        self._closed = True
        await stop(self._runner)
        await self._drop()


def _packed(*args: Any) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


class ClusterSubscriptions:
    """One `Subscription` per Cluster master; a channel goes to the master of its slot.

    When a master's connection is lost (a failover), the slot map is read again and its
    channels move to their slots' masters now; their waiters are woken once they are
    subscribed there, to re-check what they may have missed.
    """

    def __init__(self, cluster: ClusterBatcher, watchers: Watchers, timeout: float) -> None:
        self._cluster = cluster
        self._watchers = watchers
        self._timeout = timeout
        self._nodes: dict[str, Subscription] = {}
        self._where: dict[str, str] = {}  # channel -> name of the master it is subscribed on
        self._rerouting: set[asyncio.Task[None]] = set()
        self._closed = False

    async def subscribe(self, channel: str) -> None:
        name = await self._cluster.master_name(channel)
        if name is None or self._closed:  # no slot map (unreachable): the re-check will do
            return
        self._where[channel] = name
        await self._node(name).subscribe(channel)

    def unsubscribe(self, channel: str) -> None:
        name = self._where.pop(channel, None)
        if name is not None:
            self._nodes[name].unsubscribe(channel)

    def _node(self, name: str) -> Subscription:
        subscription = self._nodes.get(name)
        if subscription is None:
            subscription = Subscription(
                self._cluster.node_pool(name), self._watchers, self._timeout, sharded=True,
                on_lost=lambda channels: self._lost(name, channels),
            )  # fmt: skip
            self._nodes[name] = subscription
        return subscription

    def _lost(self, name: str, channels: list[str]) -> None:
        task = spawn(self._reroute(name, channels), "store-subscription")
        self._rerouting.add(task)
        task.add_done_callback(self._rerouting.discard)

    async def _reroute(self, name: str, channels: list[str]) -> None:
        await self._cluster.refresh()
        for channel in channels:
            if self._closed or self._where.get(channel) != name:
                continue  # no longer wanted, or already moved
            now = await self._cluster.master_name(channel)
            if now is None or now == name:
                continue  # still there: its own subscription re-opens and re-subscribes
            self._nodes[name].channels.discard(channel)
            self._where[channel] = now
            await self._node(now).subscribe(channel)
            self._watchers.notify(channel)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._rerouting):
            task.cancel()
        for subscription in list(self._nodes.values()):
            await subscription.close()
