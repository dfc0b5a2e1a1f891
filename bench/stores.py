"""The Redis set-ups a benchmark case runs the proxy against, and whose CPU counts as Redis.

`bench/run` measures protected requests on a standalone redis-server of its own, and on the
topologies a production store runs as: a Sentinel group, a Cluster, and a primary whose
writes wait for a replica (`store.min_replicas_ack`). Each is started with the launchers of
`tests.support.topologies` on free loopback ports, and is the same to the harness: a store
URL, the processes whose CPU is the store's ("data nodes": primaries and replicas, every
master of a Cluster), the others it runs (sentinels), and how to empty it between cases.

The bench is no failover test: a loaded 2-core machine can starve a node long enough for the
launchers' test timeouts (a primary down after 500 ms without a reply), so the bench raises
them and checks that the primary it measured is the one it started with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from tests.support import topologies
from tests.support.redis_server import RedisServer

# Sentinel and Cluster timeouts while the bench runs: no failover because the machine is busy.
QUIET_TIMEOUT_MS = 10_000


@dataclass
class BenchStore:
    """One Redis set-up as a case sees it."""

    kind: str  # redis | sentinel | cluster | replicated
    url: str
    data: list[RedisServer]  # their CPU is the "redis" figure
    # Ports of the nodes that take writes now (to flush them and count their keys).
    primaries: Callable[[], list[int]]
    others: list[RedisServer] = field(default_factory=list)  # sentinels: counted apart

    @property
    def processes(self) -> list[RedisServer]:
        return [*self.data, *self.others]

    def flush(self) -> None:
        for port in self.primaries():
            self.node(port).command("FLUSHALL", timeout=5)

    def keys(self) -> int:
        """The records in the store now, summed over its primaries."""
        return sum(
            int(self.node(port).command("DBSIZE", timeout=5).strip().lstrip(b":"))
            for port in self.primaries()
        )

    def calls(self) -> dict[str, int]:
        """Commands the primaries have run so far, by name (`INFO commandstats`): how many
        store commands a request costs (batched scripts, `WAIT`), which load does not move."""
        totals: dict[str, int] = {}
        for port in self.primaries():
            reply = self.node(port).command("INFO", "commandstats", timeout=5)
            for line in reply.decode(errors="replace").splitlines():
                name, _, stats = line.partition(":")
                if name.startswith("cmdstat_") and stats.startswith("calls="):
                    command = name.removeprefix("cmdstat_")
                    calls = int(stats.split(",", 1)[0].removeprefix("calls="))
                    totals[command] = totals.get(command, 0) + calls
        return totals

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.data if node.port == port)

    def describe(self) -> str:
        sentinels = f" + {len(self.others)} sentinels" if self.others else ""
        return f"{self.kind}: {len(self.data)} data node(s){sentinels}"


def configure(node: RedisServer, *command: str) -> None:
    reply = node.command(*command, timeout=5)
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"{' '.join(command)} on {node.port}: {reply!r}")


def standalone(server: RedisServer) -> BenchStore:
    """The run's own redis-server (started and stopped by the caller)."""
    return BenchStore("redis", server.url, [server], lambda: [server.port])


@contextmanager
def sentinel() -> Iterator[BenchStore]:
    """A primary, one replica and three sentinels; the proxy connects through the sentinels."""
    with topologies.sentinel_group(replicas=1) as group:
        for node in group.sentinels:
            configure(node, "SENTINEL", "SET", topologies.SERVICE,
                      "down-after-milliseconds", str(QUIET_TIMEOUT_MS))  # fmt: skip
        yield BenchStore(
            "sentinel", group.url, list(group.data), lambda: [group.master_port()],
            others=list(group.sentinels),
        )  # fmt: skip


@contextmanager
def cluster() -> Iterator[BenchStore]:
    """Three masters, no replicas; the proxy is given all three as seed nodes."""
    with topologies.cluster(replicas=0) as nodes:
        for node in nodes.nodes:
            configure(node, "CONFIG", "SET", "cluster-node-timeout", str(QUIET_TIMEOUT_MS))
        yield BenchStore("cluster", nodes.url, list(nodes.nodes), nodes.masters)


@contextmanager
def replicated() -> Iterator[BenchStore]:
    """A standalone primary and one replica that acknowledges its writes (`WAIT`)."""
    with topologies.replicated_primary(replicas=1) as topology:
        primary = topology.data[0]
        yield BenchStore("replicated", topology.url, list(topology.data), lambda: [primary.port])


TOPOLOGIES: dict[str, Callable[[], AbstractContextManager[BenchStore]]] = {
    "sentinel": sentinel,
    "cluster": cluster,
    "replicated": replicated,
}
