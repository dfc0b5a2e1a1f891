"""Idempotency stores: the `Store` protocol and its backends, chosen by URL."""

from __future__ import annotations

import time
from typing import Any

from proxy import metrics
from proxy.config import StoreConfig
from proxy.errors import StoreError
from proxy.store.base import Decision, Outcome, RecordInfo, Store
from proxy.store.topology import open_batcher
from proxy.store_url import is_topology_url

__all__ = ["MeasuredStore", "Store", "open_store"]


def open_store(config: StoreConfig) -> Store:
    """The backend for `config.url`: `memory://`, or Redis for anything else."""
    if config.url.startswith("memory:"):
        from proxy.store.memory import MemoryStore

        return MemoryStore(max_records=config.max_records, max_bytes=config.max_bytes)
    from proxy.store.redis import RedisStore

    if is_topology_url(config.url):  # Sentinel or Cluster: the same store on their batchers
        batcher = open_batcher(config.url, config.timeout, min_replicas_ack=config.min_replicas_ack)
        return RedisStore(timeout=config.timeout, batcher=batcher)
    return RedisStore(config.url, timeout=config.timeout, min_replicas_ack=config.min_replicas_ack)


class MeasuredStore:
    """Wraps a backend to time every operation and count its failures, by operation."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self._timers = metrics.STORE_TIMERS
        self._errors = {op: metrics.STORE_ERRORS.labels(op) for op in metrics.STORE_OPERATIONS}

    async def _measure(self, operation: str, call: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call
        except StoreError:
            self._errors[operation].inc()
            raise
        finally:
            self._timers[operation].observe(time.perf_counter() - started)

    # begin and complete are on every first attempt's path: timed inline, without
    # the extra coroutine that `_measure` costs.
    async def begin(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, takeover: bool,
        tombstone: float = 0.0,
    ) -> Decision:  # fmt: skip
        started = time.perf_counter()
        try:
            return await self.inner.begin(key, fingerprint, lease=lease, ttl=ttl,
                                          takeover=takeover, tombstone=tombstone)  # fmt: skip
        except StoreError:
            self._errors["begin"].inc()
            raise
        finally:
            self._timers["begin"].observe(time.perf_counter() - started)

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        return bool(await self._measure("renew", self.inner.renew(key, token, lease=lease)))

    async def complete(
        self, key: str, token: str, outcome: Outcome, *, ttl: float, tombstone: float = 0.0
    ) -> bool:
        started = time.perf_counter()
        try:
            return await self.inner.complete(key, token, outcome, ttl=ttl, tombstone=tombstone)
        except StoreError:
            self._errors["complete"].inc()
            raise
        finally:
            self._timers["complete"].observe(time.perf_counter() - started)

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._measure("release", self.inner.release(key, token)))

    async def ping(self) -> None:
        await self._measure("ping", self.inner.ping())

    async def inspect(self, key: str) -> RecordInfo | None:
        info: RecordInfo | None = await self._measure("admin", self.inner.inspect(key))
        return info

    async def delete(self, key: str) -> bool:
        return bool(await self._measure("admin", self.inner.delete(key)))

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = await self._measure("admin", self.inner.counts())
        return counts

    async def close(self) -> None:
        await self.inner.close()
