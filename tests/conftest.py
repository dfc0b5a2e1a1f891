"""Real things for the tests: a counting upstream, a redis-server, a running proxy.

Nothing of ours is mocked. The things themselves live in `tests.support` (bench/ starts them
too); this module makes fixtures of them. The upstream plays the legacy API on a free
loopback port and counts how often each idempotency key reached it; the redis-server is the
session's own, on a free port, so a test may stop it. Every test that uses it is marked
`redis` here, so `-m "not redis"` runs the suite on a machine without redis-server.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.server import Running
from tests.support.ports import free_port
from tests.support.proxies import (
    ProxyProcess,
    ProxyStarter,
    make_config,
    raw_config,
    start_process,
)
from tests.support.redis_server import RedisServer
from tests.support.requests import key
from tests.support.upstream import Upstream, counting_upstream

# Re-exported: tests import these names from here.
__all__ = [
    "Launcher",
    "ProcessFactory",
    "ProxyFactory",
    "RedisServer",
    "Upstream",
    "free_port",
    "key",
    "make_config",
    "raw_config",
]

ProxyFactory = Callable[..., Awaitable[Running]]
ProcessFactory = Callable[..., Awaitable[ProxyProcess]]
Launcher = ProcessFactory
REDIS_FIXTURES = frozenset({"redis", "redis_server"})

# Sentinel groups and Clusters, for the tests that need a Redis topology.
pytest_plugins = ["tests.sentinel_and_cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts redis-server: it asks for a Redis fixture, or for the
    "redis" variant of a store-parametrised fixture (which asks for `redis` itself)."""
    for item in items:
        params = getattr(item, "callspec", None)
        variants = list(params.params.values()) if params is not None else []
        if REDIS_FIXTURES & set(getattr(item, "fixturenames", ())) or "redis" in variants:
            item.add_marker(pytest.mark.redis)


# --- the counting upstream ------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with counting_upstream() as state:
        yield state


# --- redis-server ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        server.start()
        yield server
        server.kill()


@pytest.fixture
def redis(redis_server: RedisServer, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """The session's redis-server, running and empty at the start of the test."""
    assert request.node.get_closest_marker("redis"), "a Redis test must carry the redis marker"
    if not redis_server.alive():
        redis_server.kill()
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server
    redis_server.thaw()
    if not redis_server.alive():
        redis_server.kill()
        redis_server.start()


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store backend in turn: the embedded one, then the session's redis-server."""
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis")
    return server.url


# --- the proxy ------------------------------------------------------------------------


@pytest.fixture
async def start_proxy(upstream: Upstream) -> AsyncIterator[ProxyFactory]:
    """Start a proxy in this loop in front of `upstream`; keyword arguments override config."""
    async with AsyncExitStack() as stack:
        yield ProxyStarter(stack, upstream.url)


@pytest.fixture
async def proxy_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[ProcessFactory]:
    """Start proxy processes in front of `upstream`; keyword arguments override config.
    Positional arguments go to `run` (e.g. "--workers", "2"); each is gone after the test."""
    started: list[ProxyProcess] = []

    async def start(*args: str, **overrides: Any) -> ProxyProcess:
        running = await start_process(tmp_path, upstream.url, *args, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.close()


@pytest.fixture
def launch(proxy_process: ProcessFactory) -> Launcher:
    """Start proxy processes on fixed free ports, which --workers share (SO_REUSEPORT)."""

    async def start(*args: str, **overrides: Any) -> ProxyProcess:
        ports = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}
        return await proxy_process(*args, **ports, **overrides)

    return start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
