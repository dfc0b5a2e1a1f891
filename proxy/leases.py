"""Lease renewal for the records this process holds in flight.

An owner renews its record's lease every lease/3 while the upstream works, so a slow
upstream never loses its lock and an expired lease really means a dead owner. Almost every
exchange ends long before its first renewal is due, so renewal must cost next to nothing
when it does not happen: holding a lease is a set insertion, and one timer per process,
armed for the earliest due renewal, starts the few renewals that are needed.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from proxy import logs, metrics
from proxy.errors import StoreError
from proxy.keys import RecordKey
from proxy.store.base import Store
from proxy.tasks import spawn


@dataclass(eq=False, slots=True)
class Held:
    """One in-flight record this process owns."""

    record: RecordKey
    token: str
    lease: float
    due: float
    renewing: asyncio.Task[None] | None = None


class Leases:
    """Renews every held lease every lease/3 until it is dropped."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: set[Held] = set()
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def hold(self, record: RecordKey, token: str, lease: float) -> Held:
        """Start renewing the lease of `record`, owned with `token`."""
        held = Held(record, token, lease, self._loop.time() + lease / 3)
        self._held.add(held)
        if held.due < self._timer_at:
            self._arm(held.due)
        return held

    def drop(self, held: Held) -> None:
        """Stop renewing: the record is settled (or its renewal is no longer ours)."""
        self._held.discard(held)
        if held.renewing is not None:
            held.renewing.cancel()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)
        self._timer_at = when

    def _fire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        for held in self._held:
            if held.due <= now:
                held.due = now + held.lease / 3  # even if the last renewal still runs
                if held.renewing is None:
                    held.renewing = spawn(self._renew(held), "lease-renewal")
        if self._held:
            self._arm(min(held.due for held in self._held))

    async def _renew(self, held: Held) -> None:
        try:
            renewed = await self._store.renew(held.record.store, held.token, lease=held.lease)
        except StoreError as exc:
            metrics.LEASE_RENEWALS.labels("error").inc()
            logs.event("lease renewal failed", key_hash=held.record.hash, error=exc.detail)
            renewed = True  # keep trying: the store may come back before the lease lapses
        else:
            metrics.LEASE_RENEWALS.labels("renewed" if renewed else "lost").inc()
        held.renewing = None
        if not renewed:  # taken over: our result will be fenced out; stop renewing
            held.due = math.inf

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for held in self._held:
            if held.renewing is not None:
                held.renewing.cancel()
        self._held.clear()
