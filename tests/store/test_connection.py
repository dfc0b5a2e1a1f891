"""The multiplexed Redis connection: handshake, reconnects, timeouts, script cache loss."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import StoreUnavailable
from proxy.store.base import Acquired, InProgress
from proxy.store.connection import RedisConnection
from proxy.store.redis import RedisStore
from tests.conftest import RedisServer


async def test_concurrent_calls_get_their_own_replies(redis: RedisServer) -> None:
    """Replies are matched to callers in order, across many commands in one write."""
    connection = RedisConnection(redis.url, timeout=2)
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
    good = RedisConnection(f"redis://:s3cret@127.0.0.1:{password_redis}/3", timeout=2)
    try:
        await good.call("SET", "k", "v")
        assert await good.call("GET", "k") == b"v"
        other_db = RedisConnection(f"redis://:s3cret@127.0.0.1:{password_redis}/0", timeout=2)
        assert await other_db.call("GET", "k") is None
        await other_db.close()
    finally:
        await good.close()
    bad = RedisConnection(f"redis://:wrong@127.0.0.1:{password_redis}/0", timeout=2)
    with pytest.raises(StoreUnavailable, match="AUTH refused"):
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
        connection = RedisConnection(f"redis://127.0.0.1:{port}/0", timeout=0.2)
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


async def test_a_replacement_connection_is_watched_too() -> None:
    """After a lost connection, a silent replacement still fails its callers in time."""
    answered = False

    async def first_answers_then_closes(reader: asyncio.StreamReader,
                                        writer: asyncio.StreamWriter) -> None:  # fmt: skip
        nonlocal answered
        if not answered:  # later connections: accepted, never answered
            answered = True
            await reader.readline()
            writer.write(b"+PONG\r\n")
            await writer.drain()
            writer.close()

    async with fake_redis(first_answers_then_closes) as (port, _):
        connection = RedisConnection(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        try:
            assert await connection.call("PING") == b"PONG"
            await asyncio.sleep(0.01)  # the server hung up; the first watchdog is pending
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                async with asyncio.timeout(3):
                    await connection.call("PING")
            assert time.monotonic() - started < 1.0
        finally:
            await connection.close()


class HangsUpAfterConnect(RedisConnection):
    """The connection is lost right after it opens, before the callers that waited for it
    had their turn (Redis at maxclients, or in protected mode, does this)."""

    async def _open(self) -> Any:
        protocol = await super()._open()
        asyncio.get_running_loop().call_soon(protocol.connection_lost, None)
        return protocol


async def test_callers_waiting_for_a_connection_that_drops_at_once_fail() -> None:
    """Every caller that waited for the dropped connection fails; none is left hanging."""
    async with fake_redis() as (port, _):
        connection = HangsUpAfterConnect(f"redis://127.0.0.1:{port}/0", timeout=0.3)
        try:
            async with asyncio.timeout(3):
                results = await asyncio.gather(
                    *(connection.call("PING") for _ in range(4)), return_exceptions=True
                )
            assert all(isinstance(r, StoreUnavailable) for r in results), results
        finally:
            await connection.close()
