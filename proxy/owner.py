"""The owner of a key: from the begin that acquired its record until the record is settled.

A first attempt that acquires a key owns its in-flight record (storage key, fencing token,
lease) until the store holds the result (`complete`) or the record is gone (`release`: the
request was never delivered, or the upstream answered a release status). Until then the
lease is renewed every lease/3, so a slow upstream never loses the key and an expired lease
really means a dead owner.

The caller says what happened; the owner knows how to settle it. When the store fails, the
owner keeps trying in the background for up to one lease, still renewing, so that a store
that comes back quickly records the result instead of leaving "outcome unknown"; the client's
answer never waits for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import Enum

from proxy import logs, metrics
from proxy.errors import StoreError
from proxy.keys import RecordKey
from proxy.leases import Leases
from proxy.store.base import Outcome, Store
from proxy.tasks import spawn

_RETRY_FIRST = 0.05
_RETRY_MAX = 1.0


class Settled(Enum):
    """How a settling store call ended, as far as the caller's answer is concerned."""

    DONE = "done"  # the store did it
    FENCED = "fenced"  # the record was taken over: our result was not stored
    LATER = "later"  # the store failed; retried in the background for up to one lease


class Owner:
    """The in-flight record of one key, owned with `token`; settle it exactly once."""

    __slots__ = ("_held", "_leases", "_settled", "_store", "lease", "record", "route", "token",
                 "tombstone", "ttl")  # fmt: skip

    def __init__(self, store: Store, leases: Leases, record: RecordKey, token: str, *,
                 lease: float, ttl: float, route: str, tombstone: float = 0.0) -> None:  # fmt: skip
        self._store = store
        self._leases = leases
        self.record = record
        self.token = token
        self.lease = lease
        self.ttl = ttl
        self.tombstone = tombstone
        self.route = route
        self._held = leases.hold(record, token, lease)
        self._settled = False
        metrics.IN_FLIGHT_RECORDS.inc()

    async def complete(self, outcome: Outcome) -> Settled:
        """Store the key's terminal result, fenced by our token."""
        store, key, token, ttl = self._store, self.record.store, self.token, self.ttl
        tombstone = self.tombstone
        settled = await self._settle(
            lambda: store.complete(key, token, outcome, ttl=ttl, tombstone=tombstone),
            "complete",
            "store failed after the upstream answered; recording in the background",
        )  # fmt: skip
        if settled is Settled.FENCED:
            logs.event("result not recorded: the record was taken over (fenced out)",
                       route=self.route, key_hash=self.record.hash)  # fmt: skip
        return settled

    async def release(self) -> Settled:
        """Free the key: the request was never delivered, or must be executed again."""
        store, key, token = self._store, self.record.store, self.token
        return await self._settle(
            lambda: store.release(key, token), "release",
            "record not released: store failed; retrying in the background",
        )  # fmt: skip

    async def _settle(self, call: Callable[[], Awaitable[bool]], what: str,
                      failed: str) -> Settled:  # fmt: skip
        try:
            done = await call()
        except StoreError as exc:
            logs.event(failed, route=self.route, key_hash=self.record.hash, error=exc.detail)
            spawn(self._keep_trying(call, what), "store-retry")
            return Settled.LATER
        except BaseException:
            self.abandon()  # cancelled (shutdown): the lease lapses, nobody renews it
            raise
        self._finish()
        return Settled.DONE if done or what == "release" else Settled.FENCED

    async def _keep_trying(self, call: Callable[[], Awaitable[bool]], what: str) -> None:
        """Retry with back-off for up to one lease, renewing it meanwhile. If the store never
        answers, the record is left to its lease: the retry then meets "outcome unknown"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease
        delay = _RETRY_FIRST
        done: bool | None = None
        try:
            while done is None and loop.time() + delay < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                try:
                    done = await call()
                except StoreError:
                    continue
        finally:  # also when shutdown cancels the retry
            self._finish()
            if what == "complete":
                self._report(done)

    def _report(self, stored: bool | None) -> None:
        if stored is None:
            metrics.UNRECORDED.labels(self.route).inc()
            message = "result not recorded: the store did not answer in time"
        elif stored:
            message = "result recorded after the store came back"
        else:
            message = "result not recorded: the record was taken over (fenced out)"
        logs.event(message, route=self.route, key_hash=self.record.hash)

    def abandon(self) -> None:
        """Stop renewing without settling: the lease lapses as if this proxy had died, and the
        next retry meets "outcome unknown" (or takes the key over). For what the proxy cannot
        account for, such as an error it did not expect mid-exchange."""
        self._finish()

    def _finish(self) -> None:
        if not self._settled:
            self._settled = True
            self._leases.drop(self._held)
            metrics.IN_FLIGHT_RECORDS.dec()
