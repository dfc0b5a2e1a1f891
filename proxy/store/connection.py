"""One multiplexed Redis connection for the hot path.

Every request makes one or two store calls, and awaiting redis-py once per command costs a
Python proxy about half its throughput: the client library's per-command machinery (pool
checkout, retry wrapper, observability hooks, reply parsing through coroutines), not the
network, is what costs. Here concurrent callers share one connection: a command is encoded
and queued, every command queued during one event-loop iteration goes out in one write, and
replies, which Redis sends in order, are parsed by hiredis as they arrive and handed to the
waiting futures first-in first-out. No task, lock or pool per command.

A multiplexed connection cannot abandon a single reply, so the store timeout applies to the
connection: when the oldest unanswered command is older than the timeout, the connection is
closed and every waiter fails with `StoreUnavailable`. The next call reconnects.

Connection settings (host, port, db, username, password, TLS) come from the same URL redis-py
parses, with redis-py's own parser.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from proxy.errors import StoreUnavailable

# After a failed connect, callers fail fast for this long instead of each opening a socket.
_RECONNECT_PAUSE = 0.1


class ReplyError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`), returned, not raised."""


class Unanswered(StoreUnavailable):
    """The command was written but not answered in time: Redis may still run it later."""


def encode(args: tuple[Any, ...]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RedisConnection) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ReplyError)
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.queue: list[bytes] = []  # encoded commands waiting for this iteration's write
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters = self.waiters
        while (reply := self.reader.gets()) is not False:
            if not waiters:  # a reply nobody asked for: the stream is out of step
                self.fail("redis sent an unexpected reply")
                return
            future, _ = waiters.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost: {exc}" if exc else "connection closed by redis")

    def fail(self, reason: str) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        error = Unanswered(f"redis: {reason}", retry_after=1)
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)
        self.owner.lost(self)


class RedisConnection:
    """Concurrent callers, one connection, one write per loop iteration."""

    def __init__(self, url: str, timeout: float) -> None:
        options = parse_url(url)
        self._timeout = timeout
        self._host = options.get("host", "localhost")
        self._port = int(options.get("port", 6379))
        self._path = options.get("path")
        self._db = int(options.get("db", 0) or 0)
        self._username = options.get("username")
        self._password = options.get("password")
        self._ssl: ssl.SSLContext | None = None
        if options.get("connection_class") is SSLConnection:
            cafile = options.get("ssl_ca_certs")
            self._ssl = ssl.create_default_context(cafile=str(cafile) if cafile else None)
            if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._down_until = 0.0
        self._watchdog: asyncio.TimerHandle | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command; return its reply (a `ReplyError` for error replies)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
            if protocol.closed:  # lost before this caller could queue on it: nothing sent
                raise StoreUnavailable("redis: connection lost", retry_after=1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not protocol.queue:
            loop.call_soon(self._flush, protocol)
        protocol.queue.append(encode(args))
        protocol.waiters.append((future, time.monotonic() + self._timeout))
        if self._watchdog is None:
            self._arm()
        return await future

    def _flush(self, protocol: _Protocol) -> None:
        data, protocol.queue = b"".join(protocol.queue), []
        if protocol.closed or protocol.transport is None:
            return  # its waiters were failed when it closed
        protocol.transport.write(data)

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self._timeout / 4, self._check)

    def _check(self) -> None:
        # The connection of now, not the one the timer was armed for: a connection that
        # replaced a lost one must be watched too.
        self._watchdog = None
        protocol = self._protocol
        if protocol is None or protocol.closed or not protocol.waiters:
            return
        if protocol.waiters[0][1] < time.monotonic():
            protocol.fail("no answer within the store timeout")
            return
        self._arm()

    def lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def _connect(self) -> _Protocol:
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("redis: unreachable (retrying shortly)", retry_after=1)
        loop = asyncio.get_running_loop()
        self._connecting = loop.create_future()
        try:
            protocol = await self._open()
        except BaseException as exc:
            self._down_until = time.monotonic() + _RECONNECT_PAUSE
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(
                f"redis: cannot connect to {self._where()}: {exc or type(exc).__name__}",
                retry_after=1,
            )  # fmt: skip
            self._connecting.set_exception(error)
            self._connecting.exception()  # retrieved: nobody else may be waiting
            self._connecting = None
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise error from exc
        self._protocol = protocol
        self._connecting.set_result(protocol)
        self._connecting = None
        return protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            if self._path:
                _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
            else:
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self), self._host, self._port, ssl=self._ssl
                )
            try:
                await self._handshake(protocol)
            except BaseException:
                protocol.fail("handshake failed")
                raise
        return protocol

    async def _handshake(self, protocol: _Protocol) -> None:
        """AUTH and SELECT, as the URL asks, before the connection is shared."""
        commands: list[tuple[Any, ...]] = []
        if self._password is not None:
            if self._username:
                commands.append(("AUTH", self._username, self._password))
            else:
                commands.append(("AUTH", self._password))
        if self._db:
            commands.append(("SELECT", self._db))
        loop = asyncio.get_running_loop()
        for command in commands:
            assert protocol.transport is not None
            future: asyncio.Future[Any] = loop.create_future()
            protocol.waiters.append((future, time.monotonic() + self._timeout))
            protocol.transport.write(encode(command))
            reply = await future
            if isinstance(reply, ReplyError):
                raise StoreUnavailable(f"redis: {command[0]} refused: {reply}", retry_after=1)

    def _where(self) -> str:
        return self._path or f"{self._host}:{self._port}"

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.closed = True
            self._protocol.transport.close()
        self._protocol = None
