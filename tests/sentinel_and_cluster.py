"""Fixtures with real Redis topologies on loopback (launchers in `tests.support.topologies`).

The session-scoped fixtures serve tests that only read and write; a test that kills a node
takes a group or cluster of its own (`new_sentinel_group`, `new_cluster`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.topologies import ClusterNodes, SentinelGroup, cluster, sentinel_group


@pytest.fixture(scope="session")
def shared_sentinel_group() -> Iterator[SentinelGroup]:
    """One group for every test that does not kill a node; flush before use."""
    with sentinel_group() as group:
        yield group


@pytest.fixture
def new_sentinel_group() -> Iterator[SentinelGroup]:
    """A group of this test's own, to kill its primary: two replicas, so that one is
    left to acknowledge writes after the other is promoted."""
    with sentinel_group(replicas=2) as group:
        yield group


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[ClusterNodes]:
    """Three masters without replicas for every test that does not kill a node."""
    with cluster(replicas=0) as nodes:
        yield nodes


@pytest.fixture
def new_cluster() -> Iterator[ClusterNodes]:
    """Three masters with two replicas each, of this test's own, to fail one over (one
    replica is promoted, one is left to acknowledge writes)."""
    with cluster(replicas=2) as nodes:
        yield nodes
