"""The embedded store: one process, bounded, for development and single replicas.

Records live in a dict. Expired records are dropped when touched and swept when the store
reaches its caps (`max_records`, `max_bytes`). A record inside its ttl is never evicted:
forgetting a finished key would let its retry execute again. A store that is still full
after the sweep answers `begin` with `StoreUnavailable`, and the route's `fail_mode`
decides, exactly as for a Redis outage. Size the caps for the ttl and the key rate.
A record whose response has expired but that keeps a tombstone drops its headers and body
when touched or swept, and counts as a record without a response from then on.
The clock is injectable so leases and TTLs are tested without sleeping.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import StoreUnavailable
from proxy.store.base import (
    UNKNOWN_OUTCOME,
    Acquired,
    Decision,
    Expired,
    InProgress,
    Mismatch,
    Outcome,
    OutcomeKind,
    RecordInfo,
    Replay,
    StoredResponse,
    new_token,
)

_RECORD_OVERHEAD = 200  # bytes a record costs besides its response, roughly


@dataclass(slots=True)
class _Record:
    fingerprint: str
    expires_at: float
    token: str | None = None
    lease_until: float = 0.0
    outcome: Outcome | None = None
    size: int = _RECORD_OVERHEAD
    response_until: float = math.inf  # past it, only a tombstone is left (until expires_at)
    born: float = 0.0  # when the first attempt began: the `age` decisions carry


@functools.cache
def _tombstone(kind: OutcomeKind, status: int) -> Outcome:
    """The outcome a tombstone keeps; one shared object per kind and status."""
    return Outcome(kind, StoredResponse(status, (), b""))


def _freeable_at(record: _Record) -> float:
    """When a sweep can free something of `record`: its response, or all of it."""
    if record.size > _RECORD_OVERHEAD:
        return min(record.response_until, record.expires_at)
    return record.expires_at


class MemoryStore:
    """`Store` in this process's memory."""

    def __init__(
        self,
        *,
        max_records: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: dict[str, _Record] = {}
        self._bytes = 0
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._clock = clock
        self._sweep_after = 0.0  # when the next sweep of expired records can free anything

    def _get(self, key: str, now: float) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires_at <= now:
            self._drop(key)
            return None
        return record

    def _drop(self, key: str) -> None:
        record = self._records.pop(key, None)
        if record is not None:
            self._bytes -= record.size

    def _bury(self, record: _Record) -> None:
        """Drop the headers and body of a record whose response expired; keep its outcome's
        kind and status (the tombstone)."""
        if record.outcome is not None and record.size > _RECORD_OVERHEAD:
            record.outcome = _tombstone(record.outcome.kind, record.outcome.response.status)
            self._bytes += _RECORD_OVERHEAD - record.size
            record.size = _RECORD_OVERHEAD

    async def begin(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, takeover: bool,
        tombstone: float = 0.0,
    ) -> Decision:  # fmt: skip
        now = self._clock()
        record = self._get(key, now)
        if record is None:
            self._make_room(now)
            token = new_token()
            # Kept for at least the lease, like every lease granted below: a record that
            # expired under its owner would let a retry execute a second time beside it.
            self._records[key] = _Record(
                fingerprint, now + max(ttl, lease), token, now + lease, born=now
            )
            self._bytes += _RECORD_OVERHEAD
            return Acquired(token)
        age = now - record.born
        if record.fingerprint != fingerprint:
            return Mismatch(age)
        if record.outcome is not None:
            if now < record.response_until:
                return Replay(record.outcome, age)
            self._bury(record)
            return Expired(record.outcome.kind, record.outcome.response.status)
        if record.lease_until > now:
            return InProgress(record.lease_until - now, age)
        if takeover:
            record.token = new_token()
            record.lease_until = now + lease
            record.expires_at = max(record.expires_at, now + lease)
            return Acquired(record.token, takeover=True)
        record.token = None
        record.outcome = UNKNOWN_OUTCOME
        if tombstone > 0:
            record.response_until = record.expires_at
            record.expires_at += tombstone
        return Replay(UNKNOWN_OUTCOME, age)

    def _owned(self, key: str, token: str) -> _Record | None:
        record = self._get(key, self._clock())
        if record is None or record.outcome is not None or record.token != token:
            return None
        return record

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        record = self._owned(key, token)
        if record is None:
            return False
        now = self._clock()
        record.lease_until = now + lease
        record.expires_at = max(record.expires_at, now + lease)
        return True

    async def complete(
        self, key: str, token: str, outcome: Outcome, *, ttl: float, tombstone: float = 0.0
    ) -> bool:
        record = self._get(key, self._clock())
        if record is None or record.token != token:
            return False
        if record.outcome is not None:  # a retried complete: already stored by this owner
            return True
        size = _RECORD_OVERHEAD + outcome.size()
        self._bytes += size - record.size
        record.size = size
        record.outcome = outcome
        record.expires_at = self._clock() + ttl
        if tombstone > 0:
            record.response_until = record.expires_at
            record.expires_at += tombstone
        return True

    async def release(self, key: str, token: str) -> bool:
        if self._owned(key, token) is None:
            return False
        self._drop(key)
        return True

    def _make_room(self, now: float) -> None:
        if len(self._records) < self._max_records and self._bytes < self._max_bytes:
            return
        if now >= self._sweep_after:  # a sweep can free something: a record has expired
            for key in [k for k, r in self._records.items() if r.expires_at <= now]:
                self._drop(key)
            for record in self._records.values():
                if record.response_until <= now:
                    self._bury(record)
            self._sweep_after = min((_freeable_at(r) for r in self._records.values()),
                                    default=now)  # fmt: skip
        if len(self._records) >= self._max_records or self._bytes >= self._max_bytes:
            raise StoreUnavailable(
                "the memory store is full of records inside their ttl; raise "
                "store.max_records or store.max_bytes, shorten ttl, or use Redis",
                retry_after=1,
            )

    async def ping(self) -> None:
        return None

    async def inspect(self, key: str) -> RecordInfo | None:
        now = self._clock()
        record = self._get(key, now)
        if record is None:
            return None
        if record.outcome is None:
            return RecordInfo("in_flight", record.fingerprint, record.expires_at - now,
                              lease_remaining=max(0.0, record.lease_until - now))  # fmt: skip
        if record.response_until <= now:
            self._bury(record)
        response = record.outcome.response
        return RecordInfo(
            "done", record.fingerprint, record.expires_at - now, outcome=record.outcome.kind,
            status=response.status or None, body_bytes=len(response.body),
            tombstone=record.response_until <= now,
        )  # fmt: skip

    async def delete(self, key: str) -> bool:
        existed = key in self._records
        self._drop(key)
        return existed

    async def counts(self) -> dict[str, int]:
        now = self._clock()
        live = [r for r in self._records.values() if r.expires_at > now]
        done = sum(1 for r in live if r.outcome is not None)
        return {"in_flight": len(live) - done, "done": done}

    async def close(self) -> None:
        self._records.clear()
        self._bytes = 0
