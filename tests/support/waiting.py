"""Waiting for a condition instead of sleeping for a guessed time.

A sleep long enough on an idle machine is too short on a loaded one; polling a condition
with a generous deadline is as fast as the machine allows and fails with a message.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Condition = Callable[[], bool | Awaitable[bool]]


async def wait_until(
    condition: Condition, timeout: float = 5.0, what: str = "condition", interval: float = 0.005
) -> float:
    """Poll `condition` (plain or async) until it is true; return the seconds it took.

    Raises AssertionError naming `what` when it is still false after `timeout` seconds.
    """
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not met after {timeout:g}s")
        await asyncio.sleep(interval)


def wait_until_sync(
    condition: Callable[[], bool],
    timeout: float = 5.0,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.02,
    ignore: tuple[type[Exception], ...] = (),
) -> float:
    """`wait_until` for code outside an event loop (fixtures that start Redis topologies, the
    fuzzer's thread); exceptions of the `ignore` types count as "not yet". `what` may be a
    callable, for a message that shows the state at the time of failure."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except ignore:
            pass
        if time.monotonic() - started > timeout:
            message = what() if callable(what) else what
            raise AssertionError(f"{message} not met after {timeout:g}s")
        time.sleep(interval)
