"""The soak's failover mode: the store is a Sentinel group whose primary is SIGKILLed.

`bench/soak --store sentinel` runs the proxies against a primary, two replicas and three
sentinels (`tests/support/topologies.py`) instead of one redis-server, and the store fault is
a failover instead of a restart: SIGKILL the current primary, wait until every sentinel names
a promoted replica that takes writes, then start the killed node again as a replica of the new
primary (it comes back empty and full-syncs from it; it never serves as an empty primary), and
wait until the group has settled: every sentinel names the same primary, none is still
failing over, and each sees two replicas with their link up. A primary killed before that
(while a sentinel still reconfigures the replicas) can leave the sentinels disagreeing for
longer than the soak waits. So every switch meets a primary with two replicas. No node
persists anything: the replicas carry the records.

A probe measures what each switch costs a writer like the proxies. It writes a sequence
number to the primary every few milliseconds, acknowledged the way the proxies' begins and
completes are (`WAIT min_replicas_ack`, with half the store timeout), and finds the primary
as they do, by asking the sentinels when it connects and again every
`PRIMARY_CHECK_INTERVAL` (so that a primary the sentinels replaced while it kept running is
left as the proxies leave it). Per switch: the downtime (from the last write the old
primary acknowledged to the first one the new primary acknowledged) and the loss: the
acknowledged writes the new primary does not have, and how long before the SIGKILL the oldest
of them was acknowledged (the loss window). The replication stream is one ordered stream, so
every begin and complete the proxies had acknowledged inside that window was lost with it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.store.topology import PRIMARY_CHECK_INTERVAL
from tests.support.ports import LOOPBACK
from tests.support.topologies import (
    SERVICE,
    SentinelGroup,
    client,
    info,
    replica_linked,
    sentinel_group,
)
from tests.support.waiting import wait_until_sync

REPLICAS = 2
PROBE_KEY = "soak:probe"  # outside the proxies' namespace (idp:*)
PROBE_EVERY = 0.002  # seconds between probe writes
SWITCH_TIMEOUT = 30.0  # for the sentinels to promote a replica
REJOIN_TIMEOUT = 60.0  # for the killed node to start and sync, and the sentinels to settle


@dataclass
class Switch:
    """One failover: what the fault did and, once the probe saw it, what it cost."""

    old_port: int
    new_port: int
    killed_at: float  # wall clock (time.time()) of the SIGKILL
    switched_after: float  # seconds until every sentinel named a writable new primary
    rejoined_after: float  # seconds until the killed node was a linked replica again
    settled_after: float  # seconds until the sentinels agreed on a primary with 2 replicas


@dataclass
class Gap:
    """What the probe saw across one change of primary."""

    old_port: int
    new_port: int
    last_ack: float  # wall clock of the last write the old primary acknowledged
    first_ack: float  # wall clock of the first write the new primary acknowledged
    lost: int  # acknowledged writes the new primary did not have
    oldest_lost: float | None  # wall clock of the oldest of them


@dataclass
class WriteProbe:
    """Acknowledged writes of a sequence number to whichever node the sentinels name."""

    group: SentinelGroup
    min_replicas_ack: int
    timeout: float
    gaps: list[Gap] = field(default_factory=list)
    writes: int = 0
    acknowledged: int = 0
    _acked: dict[int, float] = field(default_factory=dict)  # seq -> wall clock of its ack
    _port: int = 0
    _last_ack: float = 0.0
    _client: redis.asyncio.Redis | None = None

    async def run(self, stop: asyncio.Event) -> None:
        checked = time.monotonic()
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() - checked >= PRIMARY_CHECK_INTERVAL:
                        checked = time.monotonic()
                        if await asyncio.to_thread(self.group.master_port) != self._port:
                            await self.disconnect()  # the next write finds the new primary
                    await self.write()
                except (redis.RedisError, OSError, TimeoutError):
                    await self.disconnect()
                    await asyncio.sleep(0.01)
                    continue
                await asyncio.sleep(PROBE_EVERY)
        finally:
            await self.disconnect()

    async def write(self) -> None:
        if self._client is None:
            port = await asyncio.to_thread(self.group.master_port)
            self._client = redis.asyncio.Redis(
                host=LOOPBACK, port=port, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0),
            )  # fmt: skip
            if port != self._port:
                await self.arrive(port)
        self.writes += 1
        seq = self.writes
        pipe = self._client.pipeline(transaction=False)
        pipe.set(PROBE_KEY, seq)
        if self.min_replicas_ack:
            pipe.execute_command("WAIT", self.min_replicas_ack, max(1, round(self.timeout * 500)))
        replies = await pipe.execute()
        if self.min_replicas_ack and replies[-1] < self.min_replicas_ack:
            return  # written, not acknowledged: refused, as a proxy would count it
        now = time.time()
        self.acknowledged += 1
        self._acked[seq] = now
        if self.gaps and self.gaps[-1].first_ack == 0.0:
            self.gaps[-1].first_ack = now
        self._last_ack = now

    async def arrive(self, port: int) -> None:
        """A new primary: before writing to it, see which acknowledged writes it lacks."""
        assert self._client is not None
        survived = int(await self._client.get(PROBE_KEY) or 0)
        if self._port:
            lost = sorted(seq for seq in self._acked if seq > survived)
            oldest = self._acked[lost[0]] if lost else None
            self.gaps.append(Gap(self._port, port, self._last_ack, 0.0, len(lost), oldest))
        self._acked.clear()  # what the next switch can lose was acknowledged after this one
        self._port = port

    async def disconnect(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@dataclass
class SoakSentinel:
    """The soak's store in failover mode: a Sentinel group and its faults."""

    directory: Path
    args: argparse.Namespace
    group: SentinelGroup | None = None
    switches: list[Switch] = field(default_factory=list)
    probe: WriteProbe | None = None
    _stack: ExitStack = field(default_factory=ExitStack)

    @property
    def url(self) -> str:
        assert self.group is not None
        return self.group.url

    @property
    def faults(self) -> int:
        return len(self.switches)

    @property
    def down_seconds(self) -> float:
        return sum(gap.first_ack - gap.last_ack for gap in self.gaps if gap.first_ack)

    @property
    def gaps(self) -> list[Gap]:
        return self.probe.gaps if self.probe is not None else []

    async def launch(self) -> None:
        group = sentinel_group(REPLICAS, self.directory / "sentinel", self.args.down_after_ms)
        self.group = await asyncio.to_thread(self._stack.enter_context, group)
        self.probe = WriteProbe(self.group, self.args.min_replicas_ack, self.args.store_timeout)

    def primary_port(self) -> int:
        assert self.group is not None
        return self.group.master_port()

    async def watch(self, stop: asyncio.Event) -> None:
        assert self.probe is not None
        await self.probe.run(stop)

    async def fault(self) -> None:
        """SIGKILL the primary, wait for the switch, bring the node back as a replica."""
        group = self.group
        assert group is not None
        old = await asyncio.to_thread(group.master_port)
        node = next(node for node in group.data if node.port == old)
        killed_at, started = time.time(), time.monotonic()
        node.kill()
        new = await asyncio.to_thread(group.wait_switched, old, SWITCH_TIMEOUT)
        switched = time.monotonic() - started
        # Empty (nothing persists), so it must come back as a replica, never as a primary.
        node.extra_args = ("--replicaof", LOOPBACK, str(new))
        await node.start_async(REJOIN_TIMEOUT)
        await asyncio.to_thread(self._wait_linked, node.port)
        rejoined = time.monotonic() - started
        await asyncio.to_thread(
            wait_until_sync, self._settled, REJOIN_TIMEOUT, "the sentinels to settle",
            interval=0.1, ignore=(redis.RedisError, OSError),
        )  # fmt: skip
        settled = time.monotonic() - started
        self.switches.append(Switch(old, new, killed_at, switched, rejoined, settled))

    @staticmethod
    def _wait_linked(port: int) -> None:
        with client(port) as c:
            wait_until_sync(
                partial(replica_linked, c), REJOIN_TIMEOUT, f"node {port} to sync as a replica",
                interval=0.05, ignore=(redis.RedisError, OSError),
            )  # fmt: skip

    def _settled(self) -> bool:
        """Every sentinel names one primary, is not failing it over, and sees two replicas
        of it up; the primary itself has both online. (A sentinel's view of a replica's link
        comes from an INFO it sends every 10 s: the primary's is the current one.)"""
        assert self.group is not None
        primaries = set()
        for sentinel in self.group.sentinels:
            with client(sentinel.port) as c:
                state = c.sentinel_master(SERVICE)
                replicas = c.sentinel_slaves(SERVICE)
            assert isinstance(state, dict) and isinstance(replicas, list)
            if state["flags"] != "master":
                return False
            primaries.add(state["port"])
            up = [r for r in replicas if r["flags"] == "slave"]
            if len(up) < REPLICAS:
                return False
        if len(primaries) != 1:
            return False
        with client(primaries.pop()) as c:
            replication = info(c, "replication")
        online = [
            value for name, value in replication.items()
            if name.startswith("slave") and isinstance(value, dict)
            and value.get("state") == "online"
        ]  # fmt: skip
        return len(online) >= REPLICAS

    def kill(self) -> None:
        self._stack.close()


# --- what the switches cost ---------------------------------------------------------------

# How far outside a switch's loss window a duplicate's first execution may fall and still be
# put down to it: the probe writes every few ms, and a begin precedes its execution upstream.
ATTRIBUTION_SLACK = 0.5


@dataclass
class SwitchCost:
    """One change of primary: the soak's SIGKILL (`switch`), or None when the sentinels
    failed over a primary that was alive; and the probe's view of it (`gap`), or None when
    the probe did not see it (the run ended first)."""

    switch: Switch | None
    gap: Gap | None

    @property
    def ports(self) -> tuple[int, int]:
        if self.switch is not None:
            return self.switch.old_port, self.switch.new_port
        assert self.gap is not None
        return self.gap.old_port, self.gap.new_port

    @property
    def moment(self) -> float:
        """When the old primary stopped: its SIGKILL, or its last acknowledgement."""
        if self.switch is not None:
            return self.switch.killed_at
        assert self.gap is not None
        return self.gap.last_ack

    @property
    def downtime(self) -> float | None:
        if self.gap is None or not self.gap.first_ack:
            return None
        return self.gap.first_ack - self.gap.last_ack

    @property
    def lost(self) -> int | None:
        return None if self.gap is None else self.gap.lost

    @property
    def loss_window(self) -> float:
        """From the oldest lost acknowledged write to the old primary's last acknowledgement:
        how much acknowledged history the switch threw away (0 when nothing was lost)."""
        if self.gap is None or self.gap.oldest_lost is None:
            return 0.0
        return max(0.0, self.gap.last_ack - self.gap.oldest_lost)

    def explains(self, first_execution: float) -> bool:
        """Whether a key first executed then may have lost its record in this switch."""
        start = self.moment - self.loss_window - ATTRIBUTION_SLACK
        return start <= first_execution <= self.moment + ATTRIBUTION_SLACK


def _same(switch: Switch, gap: Gap) -> bool:
    """Whether the probe's `gap` is the soak's `switch`: the same ports, and the old primary's
    last acknowledgement shortly before the SIGKILL (a sentinel can move the primary between
    the same two nodes by itself, too)."""
    ports = (gap.old_port, gap.new_port) == (switch.old_port, switch.new_port)
    return ports and switch.killed_at - 10.0 <= gap.last_ack <= switch.killed_at + 0.5


def switch_costs(store: SoakSentinel) -> list[SwitchCost]:
    """Every change of primary, in order: the soak's switches with the probe's gap for the
    same ports, and the gaps no SIGKILL of the soak's explains."""
    gaps = list(store.gaps)
    costs = []
    for switch in store.switches:
        index = next((i for i, gap in enumerate(gaps) if _same(switch, gap)), None)
        if index is None:
            costs.append(SwitchCost(switch, None))
            continue
        costs += [SwitchCost(None, gap) for gap in gaps[:index]]
        costs.append(SwitchCost(switch, gaps[index]))
        gaps = gaps[index + 1 :]
    costs += [SwitchCost(None, gap) for gap in gaps]
    return sorted(costs, key=lambda cost: cost.moment)
