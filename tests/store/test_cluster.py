"""Cluster routing: one slot per script, MOVED and ASK followed through redis-py's slot map.

A slot is moved (or put in migration) behind the store's back on a real Cluster, so the
store's slot map is stale exactly as it is after a resharding.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from redis.crc import key_slot
from redis.exceptions import AskError

from proxy.config import StoreConfig
from proxy.keys import STORAGE_PREFIX
from proxy.store import open_store
from proxy.store import redis as redis_store
from proxy.store.base import Acquired, Store
from proxy.store.topology import command_key
from tests.conftest import key
from tests.support.topologies import ClusterNodes, client


@pytest.fixture
async def store(shared_cluster: ClusterNodes) -> AsyncIterator[Store]:
    shared_cluster.flush()
    backend = open_store(StoreConfig(url=shared_cluster.url, timeout=2.0))
    await backend.ping()  # reads the slot map, which the test then makes stale
    yield backend
    await backend.close()


def redirects(kind: str) -> float:
    value = REGISTRY.get_sample_value("idempotency_proxy_store_redirects_total", {"kind": kind})
    return value or 0.0


def node_id(port: int) -> str:
    with client(port) as c:
        return str(c.execute_command("CLUSTER MYID").decode())


def placed(cluster: ClusterNodes, name: str) -> tuple[str, int, int, int]:
    """A fresh record, its slot, the master serving it and another master."""
    record = STORAGE_PREFIX + key(name)
    slot = key_slot(record.encode())
    source = cluster.owner(slot)
    target = next(port for port in cluster.masters() if port != source)
    return record, slot, source, target


def move_slot(cluster: ClusterNodes, slot: int, source: int, target: int) -> None:
    """Hand an empty slot over as a resharding does: the importing node claims it first
    (raising its config epoch, so that gossip cannot hand it back), then everyone."""
    set_slot([target], slot, "IMPORTING", node_id(source))
    set_slot([source], slot, "MIGRATING", node_id(target))
    others = [port for port in cluster.masters() if port not in (source, target)]
    set_slot([target, source, *others], slot, "NODE", node_id(target))


def set_slot(ports: list[int], slot: int, *args: str) -> None:
    for port in ports:
        with client(port) as c:
            c.execute_command("CLUSTER SETSLOT", slot, *args)


def test_every_script_touches_only_its_one_declared_key() -> None:
    """Each script names KEYS[1] only, so all it touches lives in the record's slot."""
    for source in (redis_store.BEGIN, redis_store.RENEW, redis_store.COMPLETE,
                   redis_store.RELEASE, redis_store.INSPECT):  # fmt: skip
        assert set(re.findall(r"KEYS\[(\d+)\]", source)) == {"1"}
    assert command_key(("EVALSHA", "sha", 1, "rec", "arg")) == "rec"
    assert command_key(("DEL", "rec")) == "rec"
    with pytest.raises(RuntimeError, match="exactly one key"):
        command_key(("EVALSHA", "sha", 2, "rec", "other"))


async def test_moved_slot_is_followed_and_counted(
    store: Store, shared_cluster: ClusterNodes
) -> None:
    """After a slot moved, the command goes to the new owner once; nothing ran twice."""
    record, slot, source, target = placed(shared_cluster, "moved")
    before = redirects("moved")
    move_slot(shared_cluster, slot, source, target)
    try:
        decision = await store.begin(record, "fp", lease=5, ttl=30, takeover=False)
        assert isinstance(decision, Acquired)
        assert redirects("moved") == before + 1
        with client(target) as c:
            assert c.hget(record, "st") == b"f"
        # The slot map was updated: the next command goes straight to the new owner.
        assert await store.release(record, decision.token)
        assert redirects("moved") == before + 1
    finally:
        with client(target) as c:
            c.delete(record)
        move_slot(shared_cluster, slot, target, source)


async def test_ask_during_migration_is_followed_with_asking(
    store: Store, shared_cluster: ClusterNodes
) -> None:
    """A key of a migrating slot is created on the importing node, after ASKING."""
    record, slot, source, target = placed(shared_cluster, "ask")
    before = redirects("ask")
    set_slot([target], slot, "IMPORTING", node_id(source))
    set_slot([source], slot, "MIGRATING", node_id(target))
    try:
        decision = await store.begin(record, "fp", lease=5, ttl=30, takeover=False)
        assert isinstance(decision, Acquired)
        # One per command sent: EVALSHA, and EVAL when the node did not know the script yet.
        assert before + 1 <= redirects("ask") <= before + 2
        with client(target) as c:
            c.execute_command("ASKING")  # the importing node answers only after ASKING
            assert c.hget(record, "st") == b"f"
        with client(source) as c, pytest.raises(AskError):
            c.exists(record)  # the source has no such key: it sends readers on
    finally:
        with client(target) as c:
            c.execute_command("ASKING")
            c.delete(record)
        set_slot([source, target], slot, "STABLE")
