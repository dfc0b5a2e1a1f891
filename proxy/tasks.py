"""The one way to start a background task.

The event loop only keeps weak references to tasks, so a task nobody holds can be
garbage-collected mid-flight: an upstream exchange that must finish and be recorded after
its client disconnected would silently vanish. `spawn` keeps a strong reference until the
task ends, names it for debugging, and lets shutdown wait for whatever is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_RUNNING: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
    """Start `coro` as a named task that stays referenced until it finishes."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


def running(prefix: str = "") -> list[asyncio.Task[Any]]:
    """Tasks started by `spawn` that have not finished, optionally by name prefix."""
    return [t for t in _RUNNING if not t.done() and t.get_name().startswith(prefix)]


async def drain(prefix: str, timeout: float) -> int:
    """Wait up to `timeout` seconds for tasks named `prefix*`; return how many are left."""
    pending = running(prefix)
    if pending:
        _done, still = await asyncio.wait(pending, timeout=timeout)
        return len(still)
    return 0


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if there is one) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
