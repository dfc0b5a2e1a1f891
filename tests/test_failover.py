"""A failover under traffic: the proxy follows it by itself and executes no key twice.

Each test kills the store's primary with SIGKILL (a Sentinel group's primary, or a Cluster
master with replicas) while clients send distinct keys through an in-process proxy to the
counting upstream, retrying on 503 as a client would. Once the store accepts writes again,
every key is sent once more: a key whose first attempt got a definitive answer must be
replayed (or refused), never executed again. The proxy is never restarted.

`store.min_replicas_ack: 1` with two replicas is what makes the promise hold: a begin counts
only once a replica has it, and after one replica is promoted the other still acknowledges.
The figures (downtime, retries, duplicates) are printed for the README (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.conftest import ProxyFactory, Upstream, key
from tests.support.topologies import ClusterNodes, SentinelGroup

KEYS = 300
WORKERS = 8
DEADLINE = 15.0  # for the whole exchange, failover included
RETRY_PAUSE = 0.02  # a client's pause before retrying after a 503
CLIENT_TIMEOUT = 2.0  # a client's own timeout: it gives up and retries with the same key


@dataclass
class Traffic:
    """What the clients saw: each key's first answer, and when the store refused."""

    first: dict[str, int] = field(default_factory=dict)
    refused: list[float] = field(default_factory=list)  # times of 503 answers
    answered: list[float] = field(default_factory=list)  # times of definitive answers
    attempts: int = 0
    timed_out: int = 0  # attempts the client gave up on
    ready_codes: set[int] = field(default_factory=set)  # /readyz answers after the kill


async def _send(client: aiohttp.ClientSession, url: str, name: str, traffic: Traffic) -> int:
    """One key until it gets a definitive answer (anything but 503), retrying like a client:
    after a 503, and after its own timeout (an answer that does not come counts as none)."""
    while True:
        traffic.attempts += 1
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                async with client.post(f"{url}/orders", data=b"{}",
                                       headers={"Idempotency-Key": name}) as response:  # fmt: skip
                    await response.read()
                    status = response.status
        except TimeoutError:
            traffic.timed_out += 1
            continue
        traffic.first.setdefault(name, status)
        if status != 503:
            traffic.answered.append(time.monotonic())
            return status
        traffic.refused.append(time.monotonic())
        await asyncio.sleep(RETRY_PAUSE)


async def _watch_ready(client: aiohttp.ClientSession, admin: str, traffic: Traffic,
                       stop: asyncio.Event) -> None:  # fmt: skip
    while not stop.is_set():
        async with client.get(f"{admin}/readyz") as response:
            traffic.ready_codes.add(response.status)
        await asyncio.sleep(0.05)


async def run_failover(
    start_proxy: ProxyFactory, upstream: Upstream, url: str, kill: Callable[[], Any],
    recovered: Callable[[], Any],
) -> Traffic:  # fmt: skip
    """Drive traffic, kill a primary a third of the way through, then retry every key."""
    proxy = await start_proxy(
        store={"url": url, "timeout": "300ms", "min_replicas_ack": 1},
        defaults={"lease": "1s", "on_concurrent": "reject"},
    )
    traffic = Traffic()
    names = [key("failover") for _ in range(KEYS)]
    queue = list(reversed(names))
    killed = asyncio.Event()
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as client:

        async def worker() -> None:
            while queue:
                await _send(client, proxy.url, queue.pop(), traffic)
                if len(queue) < KEYS * 2 // 3 and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(kill)

        watcher: asyncio.Task[None] | None = None
        async with asyncio.timeout(DEADLINE):
            workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
            await killed.wait()
            watcher = asyncio.create_task(_watch_ready(client, proxy.admin_url, traffic, stop))
            await asyncio.gather(*workers)
            await asyncio.to_thread(recovered)
            # Every key once more: a definitive first answer must never execute again.
            for name in names:
                await _send(client, proxy.url, name, traffic)
            stop.set()
            await watcher
            async with client.get(f"{proxy.admin_url}/readyz") as response:
                assert response.status == 200
    return traffic


def check(traffic: Traffic, upstream: Upstream, label: str) -> None:
    definitive = [name for name, status in traffic.first.items() if status != 503]
    duplicates = [name for name in traffic.first if upstream.executions(name) > 1]
    downtime = (max(traffic.refused) - min(traffic.refused)) if traffic.refused else 0.0
    print(
        f"\n{label}: {KEYS} keys, {traffic.attempts} attempts ({traffic.timed_out} timed out), "
        f"{len(traffic.refused)} refused "
        f"(503) over {downtime:.2f} s, {len(duplicates)} executed twice, "
        f"{len(definitive)} definitive first answers, readyz {sorted(traffic.ready_codes)}"
    )
    assert not [name for name in definitive if upstream.executions(name) > 1]
    assert not duplicates
    assert all(upstream.executions(name) == 1 for name in traffic.first)
    assert 503 in traffic.ready_codes  # /readyz told the orchestrator while writes failed


async def test_sentinel_switch_is_followed_without_duplicates(
    start_proxy: ProxyFactory, upstream: Upstream, new_sentinel_group: SentinelGroup
) -> None:
    """SIGKILL the primary mid-traffic: the proxy follows the switch, no key runs twice."""
    group = new_sentinel_group
    old = group.master_port()
    traffic = await run_failover(
        start_proxy, upstream, group.url, kill=group.master().kill,
        recovered=lambda: group.wait_switched(old),
    )  # fmt: skip
    check(traffic, upstream, "sentinel")


async def test_cluster_failover_is_followed_without_duplicates(
    start_proxy: ProxyFactory, upstream: Upstream, new_cluster: ClusterNodes
) -> None:
    """SIGKILL a master with replicas mid-traffic: a replica takes over, no key runs twice."""
    cluster = new_cluster
    victim = cluster.node(cluster.masters()[0])
    traffic = await run_failover(
        start_proxy, upstream, cluster.url, kill=victim.kill, recovered=cluster.wait_ok
    )
    check(traffic, upstream, "cluster")
