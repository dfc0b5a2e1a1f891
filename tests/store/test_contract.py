"""The store contract: every backend passes this module unchanged.

Leases and TTLs are short real durations (tens of milliseconds), so the same tests run
against the embedded store and a real redis-server, whose clock is its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.config import StoreConfig
from proxy.keys import STORAGE_PREFIX
from proxy.store import open_store
from proxy.store.base import (
    UNKNOWN_OUTCOME,
    Acquired,
    Decision,
    Expired,
    InProgress,
    Mismatch,
    Outcome,
    RecordInfo,
    Replay,
    Store,
    StoredResponse,
)
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import RedisServer, key
from tests.support.topologies import ClusterNodes, SentinelGroup

TTL = 30.0
LEASE = 5.0
RESPONSE = Outcome(
    "response",
    StoredResponse(201, (("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
                         ("Set-Cookie", "b=2")), b'{"id": "ch_1"}\x00\xff'),
)  # fmt: skip


def record_key(name: str) -> str:
    """A storage key as the proxy makes them (hashed, prefixed)."""
    return STORAGE_PREFIX + key(name)


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        backend = RedisStore(server.url, timeout=2.0)
    else:  # the same store class behind a Sentinel group or over a Cluster
        topology: SentinelGroup | ClusterNodes = request.getfixturevalue(
            "shared_sentinel_group" if request.param == "sentinel" else "shared_cluster"
        )
        topology.flush()
        backend = open_store(StoreConfig(url=topology.url, timeout=2.0))
    yield backend
    await backend.close()


async def begin(store: Store, record: str, fp: str = "fp", *, lease: float = LEASE,
                ttl: float = TTL, takeover: bool = False) -> Decision:  # fmt: skip
    return await store.begin(record, fp, lease=lease, ttl=ttl, takeover=takeover)


async def test_first_begin_acquires_with_a_token(store: Store) -> None:
    """A new key is created in flight and owned by a fresh token."""
    decision = await begin(store, record_key("r"))
    assert isinstance(decision, Acquired)
    assert decision.token and not decision.takeover


async def test_begin_while_in_flight_reports_in_progress(store: Store) -> None:
    """A second begin on an in-flight key is told to wait, with the lease time left."""
    record = record_key("r")
    await begin(store, record)
    decision = await begin(store, record)
    assert isinstance(decision, InProgress)
    assert 0 < decision.retry_after <= LEASE


async def test_complete_then_begin_replays_exactly(store: Store) -> None:
    """A completed key replays status, repeated headers and binary body unchanged."""
    record = record_key("r")
    lock = await begin(store, record)
    assert isinstance(lock, Acquired)
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)
    decision = await begin(store, record)
    assert decision == Replay(RESPONSE)


async def test_other_fingerprint_is_a_mismatch_in_any_state(store: Store) -> None:
    """Reusing a key for a different request is reported, in flight and when done."""
    record = record_key("r")
    lock = await begin(store, record, "fp-a")
    assert isinstance(await begin(store, record, "fp-b"), Mismatch)
    assert isinstance(lock, Acquired)
    await store.complete(record, lock.token, RESPONSE, ttl=TTL)
    assert isinstance(await begin(store, record, "fp-b"), Mismatch)


async def test_decisions_on_an_existing_record_carry_its_age(store: Store) -> None:
    """In progress, replay and mismatch say how long ago the key's first attempt began."""
    record = record_key("r")
    lock = await begin(store, record)
    assert isinstance(lock, Acquired)
    started = asyncio.get_running_loop().time()
    await asyncio.sleep(0.05)
    in_progress = await begin(store, record)
    assert isinstance(in_progress, InProgress) and in_progress.age is not None
    assert 0.04 <= in_progress.age <= asyncio.get_running_loop().time() - started + 0.01
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)
    await asyncio.sleep(0.05)
    replay = await begin(store, record)
    assert isinstance(replay, Replay) and replay.age is not None
    assert (
        in_progress.age + 0.04 <= replay.age <= asyncio.get_running_loop().time() - started + 0.01
    )
    mismatch = await begin(store, record, "fp-other")
    assert isinstance(mismatch, Mismatch) and mismatch.age is not None
    assert mismatch.age >= replay.age


async def test_complete_with_a_stale_token_is_fenced(store: Store) -> None:
    """Only the current owner's token can record a result."""
    record = record_key("r")
    await begin(store, record)
    assert not await store.complete(record, "not-the-token", RESPONSE, ttl=TTL)
    assert isinstance(await begin(store, record), InProgress)


async def test_a_repeated_complete_by_the_owner_is_accepted_and_changes_nothing(
    store: Store,
) -> None:
    """Retrying a complete whose answer was lost is safe: True again, first result kept."""
    record = record_key("r")
    lock = await begin(store, record)
    assert isinstance(lock, Acquired)
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)
    other = Outcome("response", StoredResponse(500, (), b"no"))
    assert await store.complete(record, lock.token, other, ttl=TTL)
    assert await begin(store, record) == Replay(RESPONSE)
    assert not await store.release(record, lock.token)  # done records are not released
    assert not await store.renew(record, lock.token, lease=LEASE)
    assert await begin(store, record) == Replay(RESPONSE)


async def test_release_deletes_only_for_the_owner(store: Store) -> None:
    """Release by a stranger does nothing; by the owner it frees the key."""
    record = record_key("r")
    lock = await begin(store, record)
    assert isinstance(lock, Acquired)
    assert not await store.release(record, "stranger")
    assert await store.release(record, lock.token)
    assert isinstance(await begin(store, record), Acquired)


async def test_renewal_keeps_a_slow_owner_locked(store: Store) -> None:
    """An owner that renews every lease/3 keeps the key past several lease periods."""
    record = record_key("r")
    lease = 0.15
    lock = await begin(store, record, lease=lease)
    assert isinstance(lock, Acquired)
    for _ in range(8):  # 8 x 0.05 s: well past two leases
        await asyncio.sleep(lease / 3)
        assert await store.renew(record, lock.token, lease=lease)
    assert isinstance(await begin(store, record, lease=lease), InProgress)
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)


async def test_renewal_keeps_the_record_past_its_ttl(store: Store) -> None:
    """An exchange slower than the ttl keeps its record: it cannot expire under its owner."""
    record = record_key("r")
    lease, ttl = 0.15, 0.2
    lock = await begin(store, record, lease=lease, ttl=ttl)
    assert isinstance(lock, Acquired)
    for _ in range(8):  # 0.4 s: twice the ttl
        await asyncio.sleep(lease / 3)
        assert await store.renew(record, lock.token, lease=lease)
    assert isinstance(await begin(store, record, lease=lease, ttl=ttl), InProgress)
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)
    assert await begin(store, record) == Replay(RESPONSE)


async def wait_for_record(
    store: Store, record: str, condition: Callable[[RecordInfo], bool]
) -> None:
    """Return once the record exists and meets `condition` (polled, bounded)."""
    async with asyncio.timeout(5):
        while True:
            info = await store.inspect(record)
            assert info is not None, "the record expired before the test could act on it"
            if condition(info):
                return
            await asyncio.sleep(0.005)


def late(info: RecordInfo) -> bool:
    """Less of the record's 0.5 s ttl is left than the 1.5 s lease the tests grant next."""
    return info.ttl_remaining is not None and info.ttl_remaining < 0.35


async def assert_owned_past(store: Store, record: str, token: str, deadline: float) -> None:
    """Once the clock passes `deadline` (loop time), the owner still holds the record: a retry
    is told to wait, not to execute beside it, and the owner's result is stored and replayed."""
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
    assert isinstance(await begin(store, record, lease=0.1, ttl=0.1, takeover=True), InProgress)
    assert await store.complete(record, token, RESPONSE, ttl=TTL)
    assert await begin(store, record) == Replay(RESPONSE)


async def acquire_new(store: Store, *, lease: float, ttl: float) -> tuple[str, str, float]:
    """A new record's key, its owner's token, and when its ttl ends (loop time)."""
    record = record_key("r")
    ttl_ends = asyncio.get_running_loop().time() + ttl
    lock = await begin(store, record, lease=lease, ttl=ttl)
    assert isinstance(lock, Acquired)
    return record, lock.token, ttl_ends


async def test_a_takeover_late_in_the_ttl_keeps_the_record_for_its_lease(store: Store) -> None:
    """A takeover near the end of the ttl keeps the record for the whole new lease."""
    record, _, ttl_ends = await acquire_new(store, lease=0.05, ttl=0.5)
    # The old owner is dead and less of the ttl is left than the new lease will last.
    await wait_for_record(store, record, lambda info: info.lease_remaining == 0 and late(info))
    new = await begin(store, record, lease=1.5, ttl=0.5, takeover=True)
    assert isinstance(new, Acquired) and new.takeover
    await assert_owned_past(store, record, new.token, ttl_ends + 0.1)


async def test_a_lease_longer_than_the_ttl_keeps_a_new_record_for_the_lease(store: Store) -> None:
    """A begin whose lease outlasts its ttl keeps the record for the whole lease."""
    record, token, ttl_ends = await acquire_new(store, lease=1.5, ttl=0.1)
    await assert_owned_past(store, record, token, ttl_ends + 0.1)


async def test_a_renewal_late_in_the_ttl_keeps_the_record_for_its_lease(store: Store) -> None:
    """A renewal near the end of the ttl keeps the record for the whole renewed lease."""
    record, token, ttl_ends = await acquire_new(store, lease=0.5, ttl=0.5)
    await wait_for_record(store, record, late)
    assert await store.renew(record, token, lease=1.5)
    await assert_owned_past(store, record, token, ttl_ends + 0.1)


async def test_renew_with_a_stale_token_fails(store: Store) -> None:
    """A token that no longer owns the record cannot extend its lease."""
    record = record_key("r")
    await begin(store, record)
    assert not await store.renew(record, "stale", lease=LEASE)


async def test_expired_lease_becomes_unknown_outcome_without_takeover(store: Store) -> None:
    """A dead owner's record turns into the terminal "outcome unknown" result."""
    record = record_key("r")
    lock = await begin(store, record, lease=0.05)
    assert isinstance(lock, Acquired)
    await asyncio.sleep(0.1)
    assert await begin(store, record) == Replay(UNKNOWN_OUTCOME)
    assert await begin(store, record) == Replay(UNKNOWN_OUTCOME)
    assert not await store.complete(record, lock.token, RESPONSE, ttl=TTL)


async def test_expired_lease_is_taken_over_and_the_old_owner_fenced(store: Store) -> None:
    """With takeover, a new token owns the record and the old owner's result is refused."""
    record = record_key("r")
    old = await begin(store, record, lease=0.05)
    assert isinstance(old, Acquired)
    await asyncio.sleep(0.1)
    new = await begin(store, record, takeover=True)
    assert isinstance(new, Acquired) and new.takeover and new.token != old.token
    assert not await store.complete(record, old.token, RESPONSE, ttl=TTL)
    assert not await store.renew(record, old.token, lease=LEASE)
    assert await store.complete(record, new.token, RESPONSE, ttl=TTL)
    assert await begin(store, record) == Replay(RESPONSE)


async def test_done_records_expire_after_their_ttl(store: Store) -> None:
    """After its ttl a key is free again."""
    record = record_key("r")
    lock = await begin(store, record, ttl=0.1)
    assert isinstance(lock, Acquired)
    await store.complete(record, lock.token, RESPONSE, ttl=0.1)
    await asyncio.sleep(0.2)
    assert isinstance(await begin(store, record), Acquired)


async def test_too_large_and_unknown_outcomes_round_trip(store: Store) -> None:
    """Non-replayable outcomes keep their kind and status."""
    record = record_key("r")
    lock = await begin(store, record)
    assert isinstance(lock, Acquired)
    too_large = Outcome("too_large", StoredResponse(200, (), b""))
    await store.complete(record, lock.token, too_large, ttl=TTL)
    assert await begin(store, record) == Replay(too_large)


async def test_concurrent_begins_acquire_exactly_once(store: Store) -> None:
    """Of many simultaneous begins on one key, exactly one owns it."""
    record = record_key("r")
    decisions = await asyncio.gather(*(begin(store, record) for _ in range(50)))
    assert sum(isinstance(d, Acquired) for d in decisions) == 1
    assert sum(isinstance(d, InProgress) for d in decisions) == 49


async def test_inspect_delete_and_counts(store: Store) -> None:
    """Operators can see a record's state, count records by state, and delete one."""
    flying, done = record_key("f"), record_key("d")
    await begin(store, flying)
    lock = await begin(store, done)
    assert isinstance(lock, Acquired)
    await store.complete(done, lock.token, RESPONSE, ttl=TTL)
    info = await store.inspect(flying)
    assert info is not None and info.state == "in_flight" and info.lease_remaining
    info = await store.inspect(done)
    assert info is not None and info.state == "done" and info.status == 201
    assert info.outcome == "response" and info.body_bytes == len(RESPONSE.response.body)
    counts = await store.counts()
    assert counts["in_flight"] >= 1 and counts["done"] >= 1
    assert await store.delete(flying)
    assert await store.inspect(flying) is None
    assert not await store.delete(flying)
    await store.ping()


# --- tombstones: a key remembered after its response expired -----------------------------


async def complete_new(store: Store, record: str, *, ttl: float, tombstone: float) -> float:
    """Execute a new key with `ttl` and `tombstone`; when its response expires (loop time)."""
    lock = await begin(store, record, ttl=ttl)
    assert isinstance(lock, Acquired)
    assert await store.complete(record, lock.token, RESPONSE, ttl=ttl, tombstone=tombstone)
    return asyncio.get_running_loop().time() + ttl


async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))


async def test_a_tombstone_outlives_the_response_then_the_key_is_free(store: Store) -> None:
    """Inside its ttl a key replays; then, for tombstone more, the same request is told it
    was executed (kind and status, no body), another is a mismatch; then the key is free."""
    record = record_key("t")
    response_ends = await complete_new(store, record, ttl=0.2, tombstone=0.6)
    assert await begin(store, record) == Replay(RESPONSE)
    await sleep_until(response_ends + 0.1)
    assert await begin(store, record) == Expired("response", 201)
    assert await begin(store, record) == Expired("response", 201)
    assert isinstance(await begin(store, record, "fp-other"), Mismatch)
    info = await store.inspect(record)
    assert info is not None and info.state == "done" and info.tombstone
    assert info.status == 201 and info.body_bytes == 0
    assert (await store.counts())["done"] == 1
    await sleep_until(response_ends + 0.6 + 0.1)
    assert isinstance(await begin(store, record), Acquired)


async def test_a_tombstone_keeps_a_non_replayable_outcome_s_kind(store: Store) -> None:
    """A too-large outcome's tombstone says so, with the status the upstream answered."""
    record = record_key("t")
    lock = await begin(store, record, ttl=0.2)
    assert isinstance(lock, Acquired)
    too_large = Outcome("too_large", StoredResponse(200, (), b""))
    assert await store.complete(record, lock.token, too_large, ttl=0.2, tombstone=5)
    await asyncio.sleep(0.3)
    assert await begin(store, record) == Expired("too_large", 200)
    assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)  # a retried complete
    assert await begin(store, record) == Expired("too_large", 200)  # ... changes nothing


async def test_an_unknown_outcome_keeps_a_tombstone_after_its_ttl(store: Store) -> None:
    """A dead owner's record, turned into "outcome unknown", is remembered past its ttl."""
    record = record_key("t")
    lock = await begin(store, record, lease=0.05, ttl=0.6)
    assert isinstance(lock, Acquired)
    await asyncio.sleep(0.1)
    decision = await store.begin(record, "fp", lease=LEASE, ttl=0.6, takeover=False,
                                 tombstone=5)  # fmt: skip
    # The unknown outcome was recorded before that call returned, and lives 0.6 s from then.
    ttl_ends = asyncio.get_running_loop().time() + 0.6
    assert decision == Replay(UNKNOWN_OUTCOME)
    await sleep_until(ttl_ends + 0.1)
    assert await begin(store, record) == Expired("unknown", 0)


async def test_without_a_tombstone_nothing_outlives_the_ttl(store: Store) -> None:
    """tombstone 0 (the default) keeps nothing once the response expired."""
    record = record_key("t")
    response_ends = await complete_new(store, record, ttl=0.1, tombstone=0)
    await sleep_until(response_ends + 0.1)
    assert isinstance(await begin(store, record), Acquired)


# --- watching a record (on_concurrent: wait) -------------------------------------------

# Long enough for a message to cross a loaded machine; a woken watch returns far sooner.
WAKE = 5.0


async def test_a_watch_is_woken_when_its_record_completes_or_is_released(store: Store) -> None:
    """A complete and a release of the watched record each wake its watch; nothing else does."""
    record, other = record_key("w"), record_key("o")
    lock = await begin(store, record)
    unrelated = await begin(store, other)
    assert isinstance(lock, Acquired) and isinstance(unrelated, Acquired)
    async with store.watch(record) as watch:
        assert not await watch.changed(0.02)
        assert await store.complete(other, unrelated.token, RESPONSE, ttl=TTL)
        assert await store.renew(record, lock.token, lease=LEASE)
        assert not await watch.changed(0.05)  # another record, a renewal: no change
        assert await store.complete(record, lock.token, RESPONSE, ttl=TTL)
        assert await watch.changed(WAKE)
    released = record_key("r")
    lock = await begin(store, released)
    assert isinstance(lock, Acquired)
    async with store.watch(released) as first, store.watch(released) as second:
        assert await store.release(released, lock.token)
        assert await first.changed(WAKE) and await second.changed(WAKE)  # every waiter


async def test_a_watch_is_woken_by_a_takeover_an_unknown_outcome_and_a_delete(
    store: Store,
) -> None:
    """A takeover, a record turned "outcome unknown" and an operator's delete are changes."""
    taken, unknown = record_key("t"), record_key("u")
    await begin(store, taken, lease=0.05)
    await begin(store, unknown, lease=0.05)
    async with store.watch(taken) as on_taken, store.watch(unknown) as on_unknown:
        await asyncio.sleep(0.1)  # both owners "die": their leases run out
        assert not await on_taken.changed(0)  # a lease running out is no message
        assert isinstance(await begin(store, taken, takeover=True), Acquired)
        assert await on_taken.changed(WAKE)
        assert await begin(store, unknown) == Replay(UNKNOWN_OUTCOME)
        assert await on_unknown.changed(WAKE)
        assert await store.delete(taken)
        assert await on_taken.changed(WAKE)
