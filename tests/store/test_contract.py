"""The store contract: every backend passes this module unchanged.

Leases and TTLs are short real durations (tens of milliseconds), so the same tests run
against the embedded store and a real redis-server, whose clock is its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.keys import STORAGE_PREFIX
from proxy.store.base import (
    UNKNOWN_OUTCOME,
    Acquired,
    Decision,
    InProgress,
    Mismatch,
    Outcome,
    Replay,
    Store,
    StoredResponse,
)
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.conftest import RedisServer, key

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


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    backend: Store
    if request.param == "memory":
        backend = MemoryStore()
    else:
        server: RedisServer = request.getfixturevalue("redis")
        backend = RedisStore(server.url, timeout=2.0)
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
