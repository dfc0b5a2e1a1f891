"""What only the embedded store does: stay within its bounds."""

from __future__ import annotations

import pytest

from proxy.errors import StoreUnavailable
from proxy.store.base import Acquired, Expired, Outcome, Replay, StoredResponse
from proxy.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


OUTCOME = Outcome("response", StoredResponse(200, (), b"x" * 1000))


async def fill(store: MemoryStore, count: int, prefix: str = "k") -> None:
    for index in range(count):
        lock = await store.begin(f"{prefix}{index}", "fp", lease=10, ttl=60, takeover=False)
        assert isinstance(lock, Acquired)
        await store.complete(f"{prefix}{index}", lock.token, OUTCOME, ttl=60)


async def test_expired_records_are_swept_before_anything_is_evicted() -> None:
    """At the record cap, expired records go first and live ones stay replayable."""
    clock = Clock()
    store = MemoryStore(max_records=10, clock=clock)
    await fill(store, 5, "old")
    clock.now += 120  # the old ones expire
    await fill(store, 5, "new")
    await fill(store, 1, "more")
    for index in range(5):
        decision = await store.begin(f"new{index}", "fp", lease=10, ttl=60, takeover=False)
        assert isinstance(decision, Replay)
    assert (await store.counts())["done"] == 6


async def test_records_inside_their_ttl_are_never_evicted() -> None:
    """At the byte cap, new keys are refused (503 upstream) and every live key still replays:
    forgetting a finished key would let its retry execute again."""
    clock = Clock()
    store = MemoryStore(max_bytes=20_000, clock=clock)
    stored = 0
    with pytest.raises(StoreUnavailable, match="full of records inside their ttl") as caught:
        for index in range(100):
            await fill(store, 1, f"k{index}-")
            stored += 1
    assert caught.value.retry_after == 1
    for index in range(stored):
        decision = await store.begin(f"k{index}-0", "fp", lease=10, ttl=60, takeover=False)
        assert isinstance(decision, Replay)
    clock.now += 120  # once they expire, room is made again
    await fill(store, 1, "later")


async def test_in_flight_records_are_never_evicted() -> None:
    """A store full of in-flight records refuses new keys instead of forgetting owners."""
    store = MemoryStore(max_records=3, clock=Clock())
    for index in range(3):
        await store.begin(f"f{index}", "fp", lease=10, ttl=60, takeover=False)
    with pytest.raises(StoreUnavailable, match="full of records inside their ttl"):
        await store.begin("f3", "fp", lease=10, ttl=60, takeover=False)
    assert (await store.counts())["in_flight"] == 3


async def test_a_tombstone_frees_its_response_and_the_key_stays_remembered() -> None:
    """Records past their response's ttl drop their bodies when swept: a store whose byte cap
    is full of tombstones makes room for new keys, and the tombstones still answer."""
    clock = Clock()
    store = MemoryStore(max_bytes=20_000, clock=clock)
    stored = 0
    for index in range(15):
        lock = await store.begin(f"t{index}", "fp", lease=10, ttl=60, takeover=False)
        assert isinstance(lock, Acquired)
        await store.complete(f"t{index}", lock.token, OUTCOME, ttl=60, tombstone=600)
        stored += 1
    with pytest.raises(StoreUnavailable):
        await fill(store, 10, "full")
    clock.now += 120  # responses expired, tombstones kept
    await fill(store, 10, "new")
    for index in range(stored):
        decision = await store.begin(f"t{index}", "fp", lease=10, ttl=60, takeover=False)
        assert decision == Expired("response", 200)
