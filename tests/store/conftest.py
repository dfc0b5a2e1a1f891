"""Fixtures of the store tests: Redis set-ups from `tests.redis_topologies`."""

from __future__ import annotations

from tests.redis_topologies import certificates, primary_and_replica, redis_nodes

__all__ = ["certificates", "primary_and_replica", "redis_nodes"]
