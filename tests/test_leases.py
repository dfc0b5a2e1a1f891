"""Lease renewal: renewals are due every lease/3, and a slow store does not spin the loop."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from contextvars import Context
from typing import TypeVarTuple

from proxy.keys import RecordKey
from proxy.leases import Leases
from proxy.store.memory import MemoryStore

Ts = TypeVarTuple("Ts")
LEASE = 0.15
RENEWAL_TIME = 0.12  # longer than LEASE / 3: the next renewal falls due while one runs
HOLD = 0.5


class SlowRenewals(MemoryStore):
    """The embedded store, with renewals that take longer than lease/3."""

    renewals = 0

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        self.renewals += 1
        await asyncio.sleep(RENEWAL_TIME)
        return await super().renew(key, token, lease=lease)


class CountingLoop(asyncio.SelectorEventLoop):
    """An event loop that counts the timers armed on it: a loop that spins re-arms its
    timer for "now" over and over, thousands of times in half a second."""

    timers = 0

    def call_at(self, when: float, callback: Callable[[*Ts], object], *args: *Ts,
                context: Context | None = None) -> asyncio.TimerHandle:  # fmt: skip
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)


async def hold_a_lease(store: SlowRenewals) -> None:
    lock = await store.begin("idp:k", "fp", lease=LEASE, ttl=60, takeover=False)
    leases = Leases(store)
    held = leases.hold(RecordKey("k"), lock.token, LEASE)  # type: ignore[union-attr]
    await asyncio.sleep(HOLD)
    leases.drop(held)
    leases.close()


def test_a_renewal_slower_than_lease_over_three_does_not_spin() -> None:
    """While a renewal runs, the next one waits for it: bounded calls, a timer per due time."""
    store = SlowRenewals()
    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(hold_a_lease(store))
        loop = runner.get_loop()
        assert isinstance(loop, CountingLoop)
        timers = loop.timers
    # A renewal starts at most once per RENEWAL_TIME, and at least twice in HOLD.
    assert 2 <= store.renewals <= math.ceil(HOLD / RENEWAL_TIME) + 1
    # One timer per lease/3 due time, one per renewal's own wait, the hold itself: no more
    # than twice that, however slow or fast the machine (a slow one arms fewer).
    bound = 2 * (HOLD / (LEASE / 3) + store.renewals + 1)
    assert timers <= bound, f"{timers} timers armed in {HOLD}s (at most {bound:.0f} expected)"
