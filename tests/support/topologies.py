"""Real Redis topologies on loopback: a Sentinel group, a Cluster and a primary with
replicas, owned by the caller.

A store that claims to follow a Sentinel switch or a Cluster failover must be shown doing
it against real servers. These launchers start redis-server processes on free loopback
ports, in temporary directories, and kill them at the end; nothing touches any Redis the
caller did not start. The tests' fixtures (`tests/sentinel_and_cluster.py`) and the
benchmark and soak in `bench/` use the same ones.

- `SentinelGroup`: a primary, replicas and three sentinels (quorum 2). The sentinels
  are configured with each other and with the replicas up front, and with short timeouts,
  so a failover completes within a few seconds instead of waiting for discovery.
- `ClusterNodes`: a Cluster of three masters, optionally each with replicas, created with
  `redis-cli --cluster create` and waited on until every node says `cluster_state:ok`.
- `ReplicatedPrimary`: a standalone primary and its replicas, no sentinels: what
  `store.min_replicas_ack` (`WAIT`) needs, started only once the replicas acknowledge writes.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, redis_binary
from tests.support.waiting import wait_until_sync

SERVICE = "mymaster"
_START_TIMEOUT = 15.0
# Sentinel: a primary is subjectively down after this long without a reply. Not less than
# a second and a bit: after a switch a sentinel starts its clock on the promoted primary at
# once but opens its link to it up to a second later (it reconnects to an instance at most
# once a second, and it was retrying the dead one), so with 500 ms the new primary was often
# judged down before it could answer, and failed over again, and again; meanwhile the
# replica left behind did not acknowledge writes (min_replicas_ack) for many seconds.
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 3000
# Cluster: a master is failed over after this long unreachable.
CLUSTER_NODE_TIMEOUT_MS = 600


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` (a cheap query of a server the test owns) until it holds; a node that
    is still starting or failing over may refuse the query meanwhile."""
    wait_until_sync(check, timeout, what, interval=0.05, ignore=(redis.RedisError, OSError))


def client(port: int) -> redis.Redis:
    """A plain client of one loopback node, for the test's own checks (no retries)."""
    return redis.Redis(
        port=port, host="127.0.0.1", socket_timeout=2, socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip


def info(c: redis.Redis, section: str) -> dict[str, Any]:
    """One INFO section of a node, parsed."""
    reply = c.info(section)
    assert isinstance(reply, dict)
    return reply


def replica_linked(c: redis.Redis) -> bool:
    """Whether the replica `c` talks to has its link to its primary up."""
    return bool(info(c, "replication").get("master_link_status") == "up")


# A data node: no persistence (RedisServer's defaults), reachable by replicas and sentinels
# without a password, and full syncs that start at once (the default waits 5 s for more
# replicas to join).
DATA_NODE = ("protected-mode no", "repl-diskless-sync-delay 0")


def data_node(directory: Path, *config: str, port: int = 0) -> RedisServer:
    return RedisServer(
        directory, port=port or free_port(), config=[*DATA_NODE, *config],
        log=directory / "server.log",
    )  # fmt: skip


@dataclass
class Sentinel(RedisServer):
    """A redis-server in sentinel mode: its config is sentinel.conf lines (`config`), which
    the sentinel rewrites as it learns the group."""

    def config_lines(self) -> list[str]:
        return [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode no",
            f'dir "{self.directory}"',
            *self.config,
        ]

    def argv(self) -> list[str]:
        return [*super().argv(), "--sentinel"]


class NodeExited(RuntimeError):
    """A node exited while starting: most often its port (or its cluster bus port) was taken
    between choosing it and binding it. The topology starts again on other ports."""


def _started(node: RedisServer) -> bool:
    if not node.alive():
        log = node.log.read_text(errors="replace")[-2000:] if node.log and node.log.exists() else ""
        raise NodeExited(f"redis-server on {node.port} exited while starting:\n{log}")
    return node.ping()


def start_all(nodes: Sequence[RedisServer]) -> None:
    """Spawn every node at once, then wait until each answers (a cluster or group starts
    in the time of its slowest node, not of all of them in turn). A node that exits instead
    raises `NodeExited` at once."""
    for node in nodes:
        node.spawn()
    for node in nodes:
        wait_until(partial(_started, node), _START_TIMEOUT, f"redis-server on {node.port}")


# --- Sentinel -------------------------------------------------------------------------


@dataclass
class SentinelGroup:
    """A primary, its replicas and three sentinels watching them as `SERVICE`."""

    directory: Path
    data: list[RedisServer] = field(default_factory=list)  # [first primary, *first replicas]
    sentinels: list[Sentinel] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        """The primary as the sentinels report it now."""
        for sentinel in self.sentinels:
            if sentinel.alive():
                with client(sentinel.port) as c:
                    _, port = c.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
                    return int(port)
        raise RuntimeError("no sentinel is running")

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(node for node in self.data if node.port == port)

    def flush(self) -> None:
        with client(self.master_port()) as c:
            c.flushall()

    def wait_switched(self, old_port: int, timeout: float = 10.0) -> int:
        """Wait until every sentinel names a new primary that accepts writes; its port."""

        def switched() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                with client(sentinel.port) as c:
                    _, port = c.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
                    ports.add(int(port))
            if len(ports) != 1 or old_port in ports:
                return False
            with client(ports.pop()) as c:
                return bool(info(c, "replication")["role"] == "master")

        wait_until(switched, timeout, "the sentinels to promote a replica")
        return self.master_port()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.kill()


def _sentinel_config(
    group: SentinelGroup, ports: list[int], index: int, ids: list[str], down_after_ms: int
) -> list[str]:
    primary, *replicas = group.data
    lines = [
        f"sentinel myid {ids[index]}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
        f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {SERVICE} 1",
    ]
    # Known up front, so that a failover does not wait for discovery.
    lines += [f"sentinel known-replica {SERVICE} 127.0.0.1 {r.port}" for r in replicas]
    for other, port in enumerate(ports):
        if other != index:
            lines.append(f"sentinel known-sentinel {SERVICE} 127.0.0.1 {port} {ids[other]}")
    return lines


def primary_and_replicas(directory: Path, replicas: int) -> list[RedisServer]:
    """A primary and `replicas` replicas of it (not started yet): [primary, *replicas]."""
    primary = data_node(directory / "primary")
    replicaof = f"replicaof 127.0.0.1 {primary.port}"
    return [primary, *(data_node(directory / f"replica{i}", replicaof) for i in range(replicas))]


def wait_replicas_linked(data: Sequence[RedisServer]) -> None:
    """Wait until every replica of `data` ([primary, *replicas]) has its link up."""
    for replica in data[1:]:
        with client(replica.port) as c:
            wait_until(partial(replica_linked, c), _START_TIMEOUT, "the replicas to sync")


def start_sentinel_group(
    directory: Path, replicas: int = 1, down_after_ms: int = DOWN_AFTER_MS
) -> SentinelGroup:
    """Start the group and wait until the replicas are in sync and the sentinels see it all."""
    group = SentinelGroup(directory)
    group.data = primary_and_replicas(directory, replicas)
    ids = [os.urandom(20).hex() for _ in range(3)]
    ports = [free_port() for _ in range(3)]
    for index, port in enumerate(ports):
        config = _sentinel_config(group, ports, index, ids, down_after_ms)
        home = directory / f"sentinel{index}"
        group.sentinels.append(Sentinel(home, port, config, log=home / "server.log"))
    try:
        start_all([*group.data, *group.sentinels])
        wait_replicas_linked(group.data)
        for sentinel in group.sentinels:
            with client(sentinel.port) as c:

                def sees_all(c: redis.Redis = c) -> bool:
                    state = c.sentinel_master(SERVICE)
                    assert isinstance(state, dict)
                    return bool(
                        state["num-other-sentinels"] == 2
                        and state["num-slaves"] == replicas
                        and state["is_master"]
                    )

                wait_until(sees_all, _START_TIMEOUT, "the sentinels to see the group")
    except BaseException:
        group.stop()
        raise
    return group


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_T = TypeVar("_T", bound=_Stoppable)


_START_ATTEMPTS = 3


@contextmanager
def _running(start: Callable[[Path], _T], keep_in: Path | None = None) -> Iterator[_T]:
    """Start a topology in a temporary directory, or in `keep_in` whose files (the nodes'
    logs) outlive it (again, on fresh ports, if a node exited while starting); kill its
    processes at the end."""
    with ExitStack() as stack:
        if keep_in is None:
            keep_in = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                topology = start(keep_in / f"attempt{attempt}")
                break
            except NodeExited:
                if attempt == _START_ATTEMPTS:
                    raise
        try:
            yield topology
        finally:
            topology.stop()


def sentinel_group(
    replicas: int = 1, keep_in: Path | None = None, down_after_ms: int = DOWN_AFTER_MS
) -> AbstractContextManager[SentinelGroup]:
    return _running(
        lambda directory: start_sentinel_group(directory, replicas, down_after_ms), keep_in
    )


@dataclass
class ClusterNodes:
    """A Cluster of three masters, each with `replicas` replicas."""

    directory: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])
        return f"redis+cluster://{hosts}"

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> list[int]:
        """Ports of the masters that own slots, as a live node reports them."""
        for node in self.nodes:
            if node.alive():
                with client(node.port) as c:
                    return sorted(int(entry[2][1]) for entry in c.execute_command("CLUSTER SLOTS"))
        raise RuntimeError("no cluster node is running")

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`, as a live node reports it."""
        for node in self.nodes:
            if node.alive():
                with client(node.port) as c:
                    for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                        if start <= slot <= end:
                            return int(master[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def flush(self) -> None:
        for port in self.masters():
            with client(port) as c:
                c.flushall()

    def wait_ok(self, timeout: float = _START_TIMEOUT) -> None:
        """Every live node says `cluster_state:ok` and agrees on the masters."""

        def ok() -> bool:
            views = set()
            for node in self.nodes:
                if node.alive():
                    with client(node.port) as c:
                        if c.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                            return False
                        slots = c.execute_command("CLUSTER SLOTS")
                        views.add(tuple(sorted(int(entry[2][1]) for entry in slots)))
            return len(views) == 1 and all(self.node(p).alive() for p in views.pop())

        wait_until(ok, timeout, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(directory: Path, replicas: int) -> ClusterNodes:
    """Start 3 masters (and `replicas` replicas each), create the Cluster, wait for ok."""
    cluster = ClusterNodes(directory)
    for index in range(3 * (1 + replicas)):
        cluster.nodes.append(data_node(
            directory / f"node{index}",
            "cluster-enabled yes", f"cluster-port {free_port()}",
            "cluster-config-file nodes.conf",
            f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}",
            # A replica takes over as soon as it may, however long its link was down.
            "cluster-replica-validity-factor 0",
        ))  # fmt: skip
    try:
        start_all(cluster.nodes)
        subprocess.run(
            [redis_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        cluster.wait_ok()
        if replicas:
            for node in cluster.nodes[3:]:
                with client(node.port) as c:
                    wait_until(
                        partial(replica_linked, c), _START_TIMEOUT, "the cluster replicas to sync"
                    )
    except BaseException:
        cluster.stop()
        raise
    return cluster


def cluster(replicas: int) -> AbstractContextManager[ClusterNodes]:
    return _running(lambda directory: start_cluster(directory, replicas))


@dataclass
class ReplicatedPrimary:
    """A standalone primary and its replicas (no sentinels): the proxy is given the
    primary's `redis://` URL, and `min_replicas_ack` makes its writes wait for replicas."""

    directory: Path
    data: list[RedisServer] = field(default_factory=list)  # [primary, *replicas]

    @property
    def url(self) -> str:
        return self.data[0].url

    def flush(self) -> None:
        with client(self.data[0].port) as c:
            c.flushall()

    def stop(self) -> None:
        for node in self.data:
            node.kill()


def acknowledged(c: redis.Redis, replicas: int) -> bool:
    """Whether `replicas` replicas acknowledge a write to the primary `c` talks to."""
    c.set("topology:ack-probe", "1", px=1000)
    return bool(c.wait(replicas, 100) >= replicas)


def start_replicated(directory: Path, replicas: int) -> ReplicatedPrimary:
    """Start a primary and its replicas; wait until the replicas acknowledge writes (a
    fresh replica may take up to a second to send its first acknowledgement, which `WAIT`
    needs)."""
    topology = ReplicatedPrimary(directory, primary_and_replicas(directory, replicas))
    try:
        start_all(topology.data)
        wait_replicas_linked(topology.data)
        with client(topology.data[0].port) as c:
            wait_until(
                partial(acknowledged, c, replicas), _START_TIMEOUT, "the replicas to acknowledge"
            )
            c.delete("topology:ack-probe")
    except BaseException:
        topology.stop()
        raise
    return topology


def replicated_primary(replicas: int = 1) -> AbstractContextManager[ReplicatedPrimary]:
    return _running(lambda directory: start_replicated(directory, replicas))
