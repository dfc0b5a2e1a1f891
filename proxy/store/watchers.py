"""The waiters of one process, by record: who to wake when a record changes.

A retry with `on_concurrent: wait` watches its key's record instead of polling the store.
Every backend keeps one `Watchers` registry: the memory store signals it from its own
transitions, the Redis store from the messages of its one pub/sub subscription. Several
waiters of one key share one entry, so the subscription holds one channel per waited key,
however many requests wait on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


class KeyWatch:
    """One waiter's view of one record: set when the record changed (`Watch` in `base.py`)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def signal(self) -> None:
        self._event.set()

    async def changed(self, timeout: float) -> bool:
        if not self._event.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                return False
        self._event.clear()
        return True


class Watchers:
    """The open watches of this process, by record key."""

    def __init__(self) -> None:
        self._watches: dict[str, set[KeyWatch]] = {}

    def add(self, key: str) -> tuple[KeyWatch, bool]:
        """A new watch of `key`, and whether it is the first one (subscribe to the key)."""
        watch = KeyWatch()
        watches = self._watches.get(key)
        if watches is None:
            self._watches[key] = {watch}
            return watch, True
        watches.add(watch)
        return watch, False

    def remove(self, key: str, watch: KeyWatch) -> bool:
        """Forget `watch`; True when it was the last one of `key` (unsubscribe from it)."""
        watches = self._watches.get(key)
        if watches is None:
            return False
        watches.discard(watch)
        if watches:
            return False
        del self._watches[key]
        return True

    def notify(self, key: str) -> None:
        """The record at `key` changed: wake its waiters (they re-check)."""
        for watch in self._watches.get(key, ()):
            watch.signal()

    def notify_all(self, keys: Iterable[str] | None = None) -> None:
        """Wake the waiters of `keys` (default: all of them), e.g. after messages may have been
        lost."""
        for key in list(self._watches) if keys is None else keys:
            self.notify(key)

    def keys(self) -> list[str]:
        """Every key somebody waits on."""
        return list(self._watches)

    def watched(self, key: str) -> bool:
        return key in self._watches
