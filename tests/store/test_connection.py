"""The batcher on redis-py's pool: handshake, reconnects, timeouts, script cache loss."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import ConnectionPool

from proxy.errors import StoreUnavailable
from proxy.store.base import Acquired, InProgress
from proxy.store.connection import RedisBatcher, connection_pool
from proxy.store.redis import RedisStore
from proxy.tasks import running
from tests.conftest import RedisServer
from tests.support.ports import free_port
from tests.support.waiting import wait_until


def batcher(url: str, timeout: float) -> RedisBatcher:
    return RedisBatcher(connection_pool(url, timeout), timeout)


async def test_concurrent_calls_get_their_own_replies(redis: RedisServer) -> None:
    """Replies are matched to callers in order, across many commands in one write."""
    connection = batcher(redis.url, timeout=2)
    try:
        replies = await asyncio.gather(*(connection.call("ECHO", f"m{i}") for i in range(500)))
        assert replies == [f"m{i}".encode() for i in range(500)]
    finally:
        await connection.close()


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own that wants a password."""
    server = RedisServer(tmp_path, config=["requirepass s3cret"])
    server.start()
    yield server.port
    server.kill()


@pytest.mark.redis
async def test_password_and_database_come_from_the_url(password_redis: int) -> None:
    """AUTH and SELECT run before the connection is shared; a wrong password is refused."""
    good = batcher(f"redis://:s3cret@127.0.0.1:{password_redis}/3", timeout=2)
    try:
        await good.call("SET", "k", "v")
        assert await good.call("GET", "k") == b"v"
        other_db = batcher(f"redis://:s3cret@127.0.0.1:{password_redis}/0", timeout=2)
        assert await other_db.call("GET", "k") is None
        await other_db.close()
    finally:
        await good.close()
    bad = batcher(f"redis://:wrong@127.0.0.1:{password_redis}/0", timeout=2)
    with pytest.raises(StoreUnavailable, match=r"(?i)invalid username-password|WRONGPASS"):
        await bad.call("PING")
    await bad.close()


FakeHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


@asynccontextmanager
async def fake_redis(
    handler: FakeHandler | None = None,
) -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A loopback server that plays a misbehaving Redis: by default it accepts and never
    answers. Yields its port and the connections it accepted; closes them all at the end."""
    accepted: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        if handler is not None:
            result = handler(reader, writer)
            if result is not None:
                await result

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_silent_server_fails_callers_within_the_timeout() -> None:
    """A store that accepts but never answers is unavailable after the timeout, not later."""
    async with fake_redis() as (port, _):
        connection = batcher(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable, match="no answer within the store timeout"):
                await connection.call("PING")
            assert time.monotonic() - started < 0.6
        finally:
            await connection.close()


async def test_reconnects_after_redis_restarts(redis: RedisServer) -> None:
    """A restarted Redis is used again without restarting the proxy; scripts are re-sent."""
    store = RedisStore(redis.url, timeout=0.5)
    try:
        assert isinstance(await store.begin("idp:a", "fp", lease=5, ttl=60, takeover=False),
                          Acquired)  # fmt: skip
        redis.kill()
        with pytest.raises(StoreUnavailable):
            await store.begin("idp:b", "fp", lease=5, ttl=60, takeover=False)
        redis.start()
        await asyncio.sleep(0.15)  # past the reconnect pause
        decision = await store.begin("idp:b", "fp", lease=5, ttl=60, takeover=False)
        assert isinstance(decision, Acquired)  # a fresh server: no scripts, no records
        redis.command("SCRIPT", "FLUSH")
        again = await store.begin("idp:b", "fp", lease=5, ttl=60, takeover=False)
        assert isinstance(again, InProgress)
    finally:
        await store.close()


async def test_a_connection_closed_while_idle_is_replaced(redis: RedisServer) -> None:
    """A pooled connection the server closed while idle is reopened before use, not failed."""
    connection = batcher(redis.url, timeout=1)
    try:
        assert await connection.call("PING") == b"PONG"
        assert b":1" in redis.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await asyncio.sleep(0.05)  # let the close reach the pooled connection
        assert await connection.call("PING") == b"PONG"
    finally:
        await connection.close()


async def test_callers_waiting_for_a_connection_that_drops_at_once_fail() -> None:
    """Every caller whose connection is dropped right after it opens fails; none hangs
    (Redis at maxclients, or in protected mode, does this)."""

    def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with fake_redis(hang_up) as (port, _):
        connection = batcher(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        try:
            async with asyncio.timeout(3):
                results = await asyncio.gather(
                    *(connection.call("PING") for _ in range(4)), return_exceptions=True
                )
            assert all(isinstance(r, StoreUnavailable) for r in results), results
        finally:
            await connection.close()


async def test_large_writes_do_not_starve_small_commands(redis: RedisServer) -> None:
    """Small commands queued with many 1 MiB writes travel on their own connection and are
    answered, however the large writes fare."""
    connection = batcher(redis.url, timeout=0.7)
    body = b"x" * (1024 * 1024)
    try:
        large = [connection.call("SET", f"idp:large:{i}", body) for i in range(40)]
        small = [connection.call("ECHO", f"s{i}") for i in range(20)]
        replies = await asyncio.gather(*small)
        assert replies == [f"s{i}".encode() for i in range(20)]
        await asyncio.gather(*large, return_exceptions=True)
    finally:
        await connection.close()


class _FaultyPool(ConnectionPool):
    """A pool whose checkout fails the way no store fault does: a bug in the library."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded (secret=hunter2)")


async def test_an_unexpected_exception_fails_the_call_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception that is no store fault fails each call like any other (a 503 for the
    request), and is logged once, with its type and where it came from, without its
    message."""
    caplog.set_level(logging.INFO, logger="idempotency_proxy")
    connection = RedisBatcher(_FaultyPool(host="127.0.0.1", port=free_port()), 0.5)
    try:
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="unexpected RecursionError"):
                await connection.call("PING")
    finally:
        await connection.close()
    logged = [r for r in caplog.records if "unexpected exception" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    fields = getattr(logged[0], "fields", {})
    assert fields["error"] == "builtins.RecursionError"
    assert "get_connection" in fields["raised_at"][-1]
    assert "hunter2" not in repr(fields)


class _StuckPool(ConnectionPool):
    """A pool whose checkout swallows cancellation and waits until released: a library
    that holds on to a task past its caller's timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entered = asyncio.Event()
        self.released = asyncio.Event()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        while not self.released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.released.wait()
        raise ConnectionError("released")


async def test_a_call_ends_within_the_timeout_even_if_the_batch_does_not() -> None:
    """A call fails at the store timeout even while its batch is stuck in a library call
    that ignores the cancellation; the batch fails nobody twice when it ends."""
    pool = _StuckPool(host="127.0.0.1", port=free_port())
    connection = RedisBatcher(pool, 0.3)
    try:
        started = time.monotonic()
        async with asyncio.timeout(5):  # the old code waited for the batch: forever here
            with pytest.raises(StoreUnavailable, match="no answer within the store timeout"):
                await connection.call("PING")
        assert pool.entered.is_set()
        assert time.monotonic() - started < 1.5
        assert running("store-batch")  # the batch itself is still stuck
        pool.released.set()
        await wait_until(lambda: not running("store-batch"), what="the batch to end")
    finally:
        pool.released.set()
        await connection.close()


class _LatePool(_StuckPool):
    """`_StuckPool`, but once released it hands out a real connection after all."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        while not self.released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.released.wait()
        return await super(_StuckPool, self).get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]


async def test_a_batch_whose_callers_timed_out_is_never_sent_later(redis: RedisServer) -> None:
    """Its callers were told "not sent" at the store timeout (a begin told so is not
    withdrawn): a connection that arrives after that must not carry the batch to Redis."""
    pool = _LatePool.from_url(redis.url)
    connection = RedisBatcher(pool, 0.3)
    try:
        with pytest.raises(StoreUnavailable, match="no answer within the store timeout"):
            await connection.call("SET", "sent-too-late", "1")
        pool.released.set()
        await wait_until(lambda: not running("store-batch"), what="the batch to end")
        assert redis.command("EXISTS", "sent-too-late").strip() == b":0"
    finally:
        pool.released.set()
        await connection.close()
