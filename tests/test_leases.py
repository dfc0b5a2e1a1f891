"""Lease renewal: renewals are due every lease/3, and a slow store does not spin the loop."""

from __future__ import annotations

import asyncio
import time

from proxy.keys import RecordKey
from proxy.leases import Leases
from proxy.store.memory import MemoryStore


class SlowRenewals(MemoryStore):
    """The embedded store, with renewals that take longer than lease/3."""

    renewals = 0

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self.renewals += 1
        await asyncio.sleep(0.12)
        return await super().renew(key, token, lease=lease)


async def test_a_renewal_slower_than_lease_over_three_does_not_spin() -> None:
    """While a renewal runs, the next one waits for it: bounded calls, next to no CPU."""
    store = SlowRenewals()
    lock = await store.begin("idp:k", "fp", lease=0.15, ttl=60, takeover=False)
    leases = Leases(store)
    held = leases.hold(RecordKey("k"), lock.token, 0.15)  # type: ignore[union-attr]
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    used = time.process_time() - cpu
    leases.drop(held)
    leases.close()
    assert 2 <= store.renewals <= 6
    assert used < 0.2, f"the renewal timer used {used:.2f} s of CPU in 0.5 s"
