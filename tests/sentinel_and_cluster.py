"""Real Redis topologies on loopback: a Sentinel group and a Cluster, owned by the test.

A store that claims to follow a Sentinel switch or a Cluster failover must be shown doing
it against real servers. These fixtures start redis-server processes on free loopback
ports, in temporary directories, and kill them at the end; nothing touches any Redis the
test did not start.

- `SentinelGroup`: a primary, one replica and three sentinels (quorum 2). The sentinels
  are configured with each other and with the replica up front, and with short timeouts,
  so a failover completes within a few seconds instead of waiting for discovery.
- `ClusterNodes`: a Cluster of three masters, optionally each with a replica, created with
  `redis-cli --cluster create` and waited on until every node says `cluster_state:ok`.

The session-scoped fixtures serve tests that only read and write; a test that kills a node
takes a group or cluster of its own (`new_sentinel_group`, `new_cluster`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
import redis

from tests.conftest import free_port

SERVICE = "mymaster"
_START_TIMEOUT = 15.0
# Sentinel: a primary is subjectively down after this long without a reply.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000
# Cluster: a master is failed over after this long unreachable.
CLUSTER_NODE_TIMEOUT_MS = 600


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (scripts/bootstrap installs it)"
    return path


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` (a cheap query of a server the test owns) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def client(port: int) -> redis.Redis:
    """A plain client of one loopback node, for the test's own checks (no retries)."""
    return redis.Redis(
        port=port, host="127.0.0.1", socket_timeout=2, socket_connect_timeout=2,
        retry=None,
    )  # fmt: skip


@dataclass
class Node:
    """One redis-server process (data node or sentinel) on a loopback port."""

    port: int
    directory: Path
    args: list[str]
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [_binary("redis-server"), *self.args], cwd=self.directory,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def wait_ready(self) -> None:
        with client(self.port) as c:
            wait_until(lambda: bool(c.ping()), _START_TIMEOUT, f"redis-server on {self.port}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words to replicas or sentinels."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _data_node_args(port: int, *extra: str) -> list[str]:
    return [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--loglevel", "warning", "--protected-mode", "no",
        # Full syncs start at once (the default waits 5 s for more replicas to join).
        "--repl-diskless-sync-delay", "0", *extra,
    ]  # fmt: skip


# --- Sentinel -------------------------------------------------------------------------


@dataclass
class SentinelGroup:
    """A primary, its replicas and three sentinels watching them as `SERVICE`."""

    directory: Path
    data: list[Node] = field(default_factory=list)  # [first primary, *first replicas]
    sentinels: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        """The primary as the sentinels report it now."""
        for sentinel in self.sentinels:
            if sentinel.alive:
                with client(sentinel.port) as c:
                    _, port = c.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
                    return int(port)
        raise RuntimeError("no sentinel is running")

    def master(self) -> Node:
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
                return c.info("replication")["role"] == "master"

        wait_until(switched, timeout, "the sentinels to promote a replica")
        return self.master_port()

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.kill()


def _sentinel_config(group: SentinelGroup, index: int, ids: list[str]) -> str:
    primary, *replicas = group.data
    lines = [
        f"port {group.sentinels[index].port}",
        "bind 127.0.0.1",
        "protected-mode no",
        f'dir "{group.sentinels[index].directory}"',
        f"sentinel myid {ids[index]}",
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 2",
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
        f"sentinel parallel-syncs {SERVICE} 1",
    ]
    # Known up front, so that a failover does not wait for discovery.
    lines += [f"sentinel known-replica {SERVICE} 127.0.0.1 {r.port}" for r in replicas]
    for other, sentinel in enumerate(group.sentinels):
        if other != index:
            lines.append(
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {sentinel.port} {ids[other]}"
            )
    return "\n".join(lines) + "\n"


def start_sentinel_group(directory: Path, replicas: int = 1) -> SentinelGroup:
    """Start the group and wait until the replicas are in sync and the sentinels see it all."""
    group = SentinelGroup(directory)
    primary_port = free_port()
    group.data = [Node(primary_port, directory / "primary", _data_node_args(primary_port))]
    for index in range(replicas):
        port = free_port()
        args = _data_node_args(port, "--replicaof", "127.0.0.1", str(primary_port))
        group.data.append(Node(port, directory / f"replica{index}", args))
    ids = [os.urandom(20).hex() for _ in range(3)]
    for index in range(3):
        port = free_port()
        group.sentinels.append(Node(port, directory / f"sentinel{index}", []))
    try:
        for node in group.data:
            node.start()
        for index, sentinel in enumerate(group.sentinels):
            sentinel.directory.mkdir(parents=True)
            conf = sentinel.directory / "sentinel.conf"
            conf.write_text(_sentinel_config(group, index, ids))
            sentinel.args = [str(conf), "--sentinel"]
            sentinel.start()
        for node in [*group.data, *group.sentinels]:
            node.wait_ready()
        for replica in group.data[1:]:
            with client(replica.port) as c:
                wait_until(
                    lambda c=c: c.info("replication")["master_link_status"] == "up",
                    _START_TIMEOUT, "the replicas to sync",
                )  # fmt: skip
        for sentinel in group.sentinels:
            with client(sentinel.port) as c:

                def sees_all(c: redis.Redis = c) -> bool:
                    state = c.sentinel_master(SERVICE)
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


@contextmanager
def _running(start: Callable[[Path], _T]) -> Iterator[_T]:
    """Start a topology in a temporary directory; kill its processes at the end."""
    with tempfile.TemporaryDirectory() as directory:
        topology = start(Path(directory))
        try:
            yield topology
        finally:
            topology.stop()


def sentinel_group(replicas: int = 1) -> AbstractContextManager[SentinelGroup]:
    return _running(lambda directory: start_sentinel_group(directory, replicas))


@pytest.fixture(scope="session")
def shared_sentinel_group() -> Iterator[SentinelGroup]:
    """One group for every test that does not kill a node; flush before use."""
    with sentinel_group() as group:
        yield group


@pytest.fixture
def new_sentinel_group() -> Iterator[SentinelGroup]:
    """A group of this test's own, to kill its primary: two replicas, so that one is
    left to acknowledge writes after the other is promoted."""
    with sentinel_group(replicas=2) as group:
        yield group


# --- Cluster --------------------------------------------------------------------------


@dataclass
class ClusterNodes:
    """A Cluster of three masters, each with `replicas` replicas."""

    directory: Path
    nodes: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])
        return f"redis+cluster://{hosts}"

    def node(self, port: int) -> Node:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> list[int]:
        """Ports of the masters that own slots, as a live node reports them."""
        for node in self.nodes:
            if node.alive:
                with client(node.port) as c:
                    return sorted(int(entry[2][1]) for entry in c.execute_command("CLUSTER SLOTS"))
        raise RuntimeError("no cluster node is running")

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`, as a live node reports it."""
        for node in self.nodes:
            if node.alive:
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
                if node.alive:
                    with client(node.port) as c:
                        if c.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                            return False
                        slots = c.execute_command("CLUSTER SLOTS")
                        views.add(tuple(sorted(int(entry[2][1]) for entry in slots)))
            return len(views) == 1 and all(self.node(p).alive for p in views.pop())

        wait_until(ok, timeout, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def start_cluster(directory: Path, replicas: int) -> ClusterNodes:
    """Start 3 masters (and `replicas` replicas each), create the Cluster, wait for ok."""
    cluster = ClusterNodes(directory)
    for index in range(3 * (1 + replicas)):
        port, bus = free_port(), free_port()
        args = _data_node_args(
            port, "--cluster-enabled", "yes", "--cluster-port", str(bus),
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
            # A replica takes over as soon as it may, however long its link was down.
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        cluster.nodes.append(Node(port, directory / f"node{index}", args))
    try:
        for node in cluster.nodes:
            node.start()
        for node in cluster.nodes:
            node.wait_ready()
        subprocess.run(
            [_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in cluster.nodes),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        cluster.wait_ok()
        if replicas:
            for node in cluster.nodes[3:]:
                with client(node.port) as c:
                    wait_until(
                        lambda c=c: c.info("replication").get("master_link_status") == "up",
                        _START_TIMEOUT, "the cluster replicas to sync",
                    )  # fmt: skip
    except BaseException:
        cluster.stop()
        raise
    return cluster


def cluster(replicas: int) -> AbstractContextManager[ClusterNodes]:
    return _running(lambda directory: start_cluster(directory, replicas))


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[ClusterNodes]:
    """Three masters without replicas for every test that does not kill a node."""
    with cluster(replicas=0) as nodes:
        yield nodes


@pytest.fixture
def new_cluster() -> Iterator[ClusterNodes]:
    """Three masters with two replicas each, of this test's own, to fail one over (one
    replica is promoted, one is left to acknowledge writes)."""
    with cluster(replicas=2) as nodes:
        yield nodes
