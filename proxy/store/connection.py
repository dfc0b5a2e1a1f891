"""Batching store commands on connections that redis-py manages.

Every request makes one or two store calls, and awaiting redis-py's client once per command
costs a Python proxy about half its throughput: its per-command machinery (pool checkout,
retry wrapper, observability hooks), not the network, is what costs. So the hot path batches:
the commands queued during one event-loop iteration are packed by hiredis, sent with one
`send_packed_command` on a connection checked out of a redis-py `ConnectionPool`, their
replies read in order with `read_response`, and the connection goes back to the pool.

Everything about the connection itself is redis-py's: connecting, AUTH/ACL and credential
providers, every TLS option, keepalive, health checks, and (for a Sentinel pool) finding the
primary. `RedisBatcher` only needs a pool, so a Sentinel pool or the per-node pools of a
Cluster plug in unchanged.

Rules the store's correctness rests on:

- Nothing is re-sent. Every redis-py retry is off; a batch is bounded by the store timeout
  as a whole (connect, write, every reply). On a timeout or a connection error the connection
  is disconnected, never returned to the pool with replies still owed, and every command not
  answered fails with `Unanswered`: Redis may still run it.
- No caller waits past the store timeout, whatever happens inside the batch: a timer fails
  whoever still waits then, even if redis-py were to hold on to the cancellation, and a batch
  that ends in any way fails whoever it did not answer. An exception that is no store fault
  (a bug, ours or redis-py's) fails the calls like any other, and is logged with its type
  and the frames that raised it, once per type: it is never hidden in a 503 again.
- Batches run side by side on separate connections: a large command (a 1 MiB complete) is a
  batch of its own, so small decisions never wait behind its I/O.
- A `READONLY` reply (a demoted primary) drops the connection, so the next one is opened
  afresh (and a Sentinel pool asks the sentinels where the primary is now).
- `call_acknowledged` commands count as done only once `min_replicas_ack` replicas have
  acknowledged them: their batch ends with one `WAIT`, and without enough acknowledgements
  they fail with `Unacknowledged`.

redis-py's errors are translated into `StoreUnavailable` here; replies that are errors
(`-NOSCRIPT`, `-MOVED`, ...) are returned as `ReplyError` values for the caller to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection, Connection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from proxy import logs
from proxy.errors import StoreUnavailable
from proxy.tasks import spawn

# A command larger than this travels in a batch of its own.
LARGE_COMMAND = 64 * 1024
# redis-py pings a connection idle this long before using it (unless the URL says otherwise).
DEFAULT_HEALTH_CHECK_INTERVAL = 15
# After a refused connect, batches fail at once for this long instead of each opening a socket.
_RECONNECT_PAUSE = 0.1
_NO_ANSWER = "no answer within the store timeout"


class ReplyError(Exception):
    """An error reply from Redis (`NOSCRIPT ...`, `READONLY ...`), returned, not raised."""


class Unanswered(StoreUnavailable):
    """The command was written but not answered in time: Redis may still run it."""


class Unacknowledged(Unanswered):
    """Redis ran the command, but too few replicas acknowledged it within the timeout."""


def connection_pool(url: str, timeout: float) -> ConnectionPool:
    """redis-py's pool for `url`, with the proxy's defaults under the URL's own options.

    Defaults (each overridden by the same option in the URL): `socket_connect_timeout` is the
    store timeout, `socket_timeout` none (the batch deadline bounds every read),
    `socket_keepalive` on for TCP, `health_check_interval` 15 s. Retries are always off.
    """
    defaults: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": None,
        "health_check_interval": DEFAULT_HEALTH_CHECK_INTERVAL,
    }
    # Maintenance notifications need RESP3 and, left on "auto", make the pool skip its check
    # that a pooled connection is clean (not closed by the server while idle).
    pool = ConnectionPool.from_url(
        url, maint_notifications_config=MaintNotificationsConfig(enabled=False), **defaults
    )
    if issubclass(pool.connection_class, Connection):
        pool.connection_kwargs.setdefault("socket_keepalive", True)
    disable_retries(pool)
    return pool


def disable_retries(pool: ConnectionPool) -> None:
    """No connection of `pool` ever retries: a store command must never run twice."""
    pool.connection_kwargs.update(
        retry=Retry(NoBackoff(), 0), retry_on_error=[], retry_on_timeout=False
    )


def reply_error(exc: ResponseError) -> ReplyError:
    """An error reply as Redis sent it (`NOSCRIPT No matching script...`)."""
    code = exc.status_code
    return ReplyError(f"{code} {exc}" if code else str(exc))


class _Batch:
    """Commands that travel together on one connection, and who waits for each reply."""

    __slots__ = ("acknowledged", "chunks", "expired", "sent", "waiters")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        # (future, acknowledged?) per command, in the order the replies will come
        self.waiters: list[tuple[asyncio.Future[Any], bool]] = []
        self.acknowledged = False
        self.sent = False  # written, or about to be: Redis may run it
        self.expired = False  # its callers were failed at the store timeout: never send it


def _fail(batch: _Batch, start: int, error: StoreUnavailable) -> None:
    """Fail every waiter of `batch` from `start` on that has no answer yet."""
    for future, _ in batch.waiters[start:]:
        if not future.done():
            future.set_exception(error)


def _unanswered(reason: str, sent: bool) -> StoreUnavailable:
    """A failed store call: `Unanswered` once the command may have reached Redis."""
    if sent:
        return Unanswered(f"redis: {reason}", retry_after=1)
    return StoreUnavailable(f"redis: {reason}", retry_after=1)


def _raised_at(exc: BaseException, depth: int = 8) -> list[str]:
    """`file:line in function` of the innermost `depth` frames that raised `exc`."""
    frames = traceback.extract_tb(exc.__traceback__)[-depth:]
    return [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]


class RedisBatcher:
    """Concurrent callers, pooled connections, one write per batch.

    `call(*args)` returns a future for the reply (a `ReplyError` for an error reply), or
    fails with `StoreUnavailable` (`Unanswered` once the command may have been sent).
    Small commands queued back to back in one synchronous stretch travel in one batch, in
    order, on one connection; a large one travels alone.
    """

    def __init__(
        self, pool: ConnectionPool, timeout: float, *, min_replicas_ack: int = 0,
        is_current: Callable[[AbstractConnection], bool] | None = None,
    ) -> None:  # fmt: skip
        self.pool = pool
        # Whether a pooled connection still goes where commands belong (a Sentinel pool's
        # primary may have been replaced while the old one kept running): one that does
        # not is reopened before anything is written to it.
        self._is_current = is_current
        self.timeout = timeout
        self.min_replicas_ack = min_replicas_ack
        # WAIT gets half the store timeout; the rest is for the commands and the network.
        self._wait: tuple[Any, ...] = ("WAIT", min_replicas_ack, max(1, round(timeout * 500)))
        self._pending: _Batch | None = None
        self._down_until = 0.0
        self._closed = False
        self._reported: set[type[BaseException]] = set()  # unexpected exceptions, logged

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future holds its reply."""
        return self._queue(args, False)

    def call_acknowledged(self, *args: Any) -> asyncio.Future[Any]:
        """Queue a write that counts as done only once `min_replicas_ack` replicas have it."""
        return self._queue(args, self.min_replicas_ack > 0)

    def _queue(self, args: tuple[Any, ...], acknowledged: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(StoreUnavailable("redis: store closed", retry_after=1))
            return future
        packed = hiredis.pack_command(args)
        if len(packed) > LARGE_COMMAND:
            alone = _Batch()
            self._add(alone, packed, future, acknowledged)
            spawn(self._run(alone), "store-batch")
            return future
        batch = self._pending
        if batch is None:
            batch = self._pending = _Batch()
            loop.call_soon(self._flush)
        self._add(batch, packed, future, acknowledged)
        return future

    @staticmethod
    def _add(batch: _Batch, packed: bytes, future: asyncio.Future[Any], ack: bool) -> None:
        batch.chunks.append(packed)
        batch.waiters.append((future, ack))
        if ack:
            batch.acknowledged = True

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            spawn(self._run(pending), "store-batch")

    async def _run(self, batch: _Batch) -> None:
        """Send one batch and hand out its replies; never leaves a waiter hanging."""
        if batch.acknowledged:
            batch.chunks.append(hiredis.pack_command(self._wait))
        connection: AbstractConnection | None = None
        answered = 0
        keep = False
        # The callers' bound does not rest on redis-py letting a cancellation through: at the
        # store timeout, whoever still waits gets a failed call, wherever this task is.
        deadline = asyncio.get_running_loop().call_later(self.timeout, self._expire, batch)
        try:
            if time.monotonic() < self._down_until:
                raise StoreUnavailable("redis: unreachable (retrying shortly)", retry_after=1)
            async with asyncio.timeout(self.timeout):
                connection = await self._checkout()
                if batch.expired:  # its callers were told it was not sent: it must not be
                    raise StoreUnavailable(f"redis: {_NO_ANSWER}", retry_after=1)
                batch.sent = True  # from here on, Redis may run what was written
                # One bytes object: a list would be written chunk by chunk, a syscall each.
                data = b"".join(batch.chunks)
                await connection.send_packed_command(data, check_health=False)
                answered, keep = await self._read_replies(connection, batch)
        except BaseException as exc:
            _fail(batch, answered, self._failure(exc, batch.sent))
            if not isinstance(exc, Exception):  # cancelled (the store closes), or exiting
                raise
        finally:
            deadline.cancel()
            # Nothing above may leave a caller waiting, not even a bug of ours.
            _fail(batch, 0, _unanswered("the batch ended without an answer", batch.sent))
            if connection is not None:
                await self._checkin(connection, keep)

    def _expire(self, batch: _Batch) -> None:
        batch.expired = True
        _fail(batch, 0, _unanswered(_NO_ANSWER, batch.sent))

    async def _checkout(self) -> AbstractConnection:
        """A connected connection from the pool, health-checked as redis-py would."""
        try:
            connection: AbstractConnection = await self.pool.get_connection()  # type: ignore[no-untyped-call]
        except (RedisError, OSError) as exc:
            if not isinstance(exc, TimeoutError | RedisTimeoutError):
                # Refused or reset: the next batches would fail the same way at once.
                self._down_until = time.monotonic() + _RECONNECT_PAUSE
            raise
        if self._is_current is not None and not self._is_current(connection):
            # Reopened here, before anything is sent, and by `connect`: redis-py's implicit
            # reconnect (in `send_packed_command`) would go back to the address it had.
            try:
                await connection.disconnect(nowait=True)
                await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await self._checkin(connection, keep=False)
                raise
        interval = connection.health_check_interval
        if interval and asyncio.get_running_loop().time() > connection.next_health_check:
            # Nothing of ours is written yet, so a connection that fails its PING (dropped
            # by a NAT while idle) costs only a reconnect, within half the store timeout.
            try:
                try:
                    async with asyncio.timeout(self.timeout / 2):
                        await connection.check_health()  # type: ignore[no-untyped-call]
                except (RedisError, OSError, TimeoutError):
                    await connection.disconnect(nowait=True)
                    await connection.connect()  # type: ignore[no-untyped-call]
            except BaseException:
                await self._checkin(connection, keep=False)
                raise
        return connection

    async def _read_replies(
        self, connection: AbstractConnection, batch: _Batch
    ) -> tuple[int, bool]:
        """Read every reply in order; return how many waiters were answered, and whether the
        connection may go back to the pool."""
        keep = True
        held: list[tuple[asyncio.Future[Any], Any]] = []
        answered = 0
        for future, acknowledged in batch.waiters:
            try:
                reply = await connection.read_response()
            except ResponseError as exc:
                if isinstance(exc, ReadOnlyError):
                    keep = False  # a demoted primary: find the writable node afresh
                reply = reply_error(exc)
            if acknowledged:
                held.append((future, reply))
            elif not future.done():
                future.set_result(reply)
            answered += 1
        if batch.acknowledged:
            try:
                acks = await connection.read_response()
            except ResponseError as exc:
                acks = reply_error(exc)
            error = None
            if not isinstance(acks, int) or acks < self.min_replicas_ack:
                error = Unacknowledged(
                    f"redis: {acks} of {self.min_replicas_ack} replicas acknowledged in time",
                    retry_after=1,
                )
            for future, reply in held:
                if future.done():
                    continue
                if error is None:
                    future.set_result(reply)
                else:
                    future.set_exception(error)
        return answered, keep

    async def _checkin(self, connection: AbstractConnection, keep: bool) -> None:
        if not keep:
            with contextlib.suppress(RedisError, OSError, TimeoutError):  # closed either way
                await connection.disconnect(nowait=True)
        await self.pool.release(connection)

    def _failure(self, exc: BaseException, sent: bool) -> StoreUnavailable:
        if isinstance(exc, StoreUnavailable):
            return exc
        if isinstance(exc, TimeoutError) and not str(exc):
            reason = _NO_ANSWER
        elif isinstance(exc, asyncio.CancelledError):
            reason = "store closed"
        elif isinstance(exc, Exception) and not isinstance(exc, RedisError | OSError):
            # Not the store failing but a bug (ours or redis-py's): the callers get a failed
            # store call as for any other fault, and the log says what it was.
            self._report(exc)
            reason = f"unexpected {type(exc).__name__}"
        else:
            reason = str(exc) or type(exc).__name__
        return _unanswered(reason, sent)

    def _report(self, exc: BaseException) -> None:
        """Log an unexpected exception, once per type: its type and the frames that raised
        it, never its message (which may name a host or hold a secret), and never to a
        client. Later ones count as failed store calls like any other."""
        kind = type(exc)
        if kind in self._reported:
            return
        self._reported.add(kind)
        logs.event(
            "store batch failed with an unexpected exception", logging.ERROR,
            error=f"{kind.__module__}.{kind.__qualname__}",
            raised_at=_raised_at(exc),
        )  # fmt: skip

    async def close(self) -> None:
        self._closed = True
        await self.pool.aclose()
