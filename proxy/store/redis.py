"""The Redis store: shared by every replica, one atomic Lua script per transition.

Each record is a hash. Leases are measured with the Redis server's clock (`TIME`), so
proxies whose clocks disagree still agree on whether a lease has run out. Every script
that changes an in-flight record checks its fencing token (the model is redis-py's
`Lock.release` script).

Throughput: awaiting redis-py once per command costs a Python proxy about half its
throughput, and the round trips are not what costs. So commands are not sent one by one:
`CommandBatcher` gathers the store calls that concurrent requests make within one loop
iteration and sends them as one pipeline, one round trip for all of them.

redis-py errors are translated into `StoreUnavailable` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.errors import StoreUnavailable
from proxy.keys import STORAGE_PREFIX
from proxy.store.base import (
    UNKNOWN_OUTCOME,
    Acquired,
    Decision,
    InProgress,
    Mismatch,
    Outcome,
    OutcomeKind,
    RecordInfo,
    Replay,
    StoredResponse,
)
from proxy.tasks import spawn

# Record fields: st (f = in flight, d = done), fp, tok, exp (lease deadline, ms, server
# clock), and when done: kind, status, hdrs, body.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] record; ARGV fingerprint, token, lease ms, ttl ms, takeover (1/0)
# -> {1} acquired | {2} taken over | {3, kind, status, hdrs, body} replay
#    | {4, ms left} in progress | {5} mismatch
BEGIN = (
    _NOW
    + """
local rec = redis.call('HMGET', KEYS[1], 'st', 'fp', 'exp')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'st', 'f', 'fp', ARGV[1], 'tok', ARGV[2], 'exp', now + ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1}
end
if rec[2] ~= ARGV[1] then return {5} end
if rec[1] == 'd' then
  local r = redis.call('HMGET', KEYS[1], 'kind', 'status', 'hdrs', 'body')
  return {3, r[1], r[2], r[3], r[4]}
end
local left = tonumber(rec[3]) - now
if left > 0 then return {4, left} end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'exp', now + ARGV[3])
  return {2}
end
redis.call('HSET', KEYS[1], 'st', 'd', 'kind', 'unknown', 'status', '0', 'hdrs', '', 'body', '')
redis.call('HDEL', KEYS[1], 'tok', 'exp')
return {3, 'unknown', '0', '', ''}
"""
)

# KEYS[1] record; ARGV token, lease ms -> 1 renewed | 0 not the owner
RENEW = (
    _NOW
    + """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'exp', now + ARGV[2])
return 1
"""
)

# KEYS[1] record; ARGV token, ttl ms, kind, status, hdrs, body -> 1 stored | 0 fenced
COMPLETE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'd', 'kind', ARGV[3], 'status', ARGV[4],
           'hdrs', ARGV[5], 'body', ARGV[6])
redis.call('HDEL', KEYS[1], 'tok', 'exp')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] record; ARGV token -> 1 released | 0 not the owner
RELEASE = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] record -> {st, fp, exp-now or false, pttl, kind, status, body length} or {}
INSPECT = (
    _NOW
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'fp', 'exp', 'kind', 'status')
if not r[1] then return {} end
local left = false
if r[3] then left = tonumber(r[3]) - now end
return {r[1], r[2], left, redis.call('PTTL', KEYS[1]), r[4], r[5],
        redis.call('HSTRLEN', KEYS[1], 'body')}
"""
)


class _Script:
    """A Lua script called by SHA; its text is sent only if Redis does not know it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_BEGIN, _RENEW, _COMPLETE, _RELEASE, _INSPECT = (
    _Script(s) for s in (BEGIN, RENEW, COMPLETE, RELEASE, INSPECT)
)
_ALL_SCRIPTS = (_BEGIN, _RENEW, _COMPLETE, _RELEASE, _INSPECT)


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """Header pairs as `name: value\\r\\n` lines (values never contain CR or LF)."""
    return "".join(f"{name}: {value}\r\n" for name, value in headers).encode(
        "utf-8", "surrogateescape"
    )


def decode_headers(data: bytes) -> tuple[tuple[str, str], ...]:
    text = data.decode("utf-8", "surrogateescape")
    pairs = []
    for line in text.split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            pairs.append((name, value))
    return tuple(pairs)


def _outcome(kind: bytes, status: bytes, hdrs: bytes, body: bytes) -> Outcome:
    name = kind.decode()
    if name == "unknown":
        return UNKNOWN_OUTCOME
    assert name in ("response", "too_large"), name
    kind_name: OutcomeKind = "response" if name == "response" else "too_large"
    return Outcome(kind_name, StoredResponse(int(status), decode_headers(hdrs), body))


class CommandBatcher:
    """Sends the commands issued during one loop iteration as one pipeline.

    Callers get a future each. Batches go out on a small pool of connections, so a slow
    batch does not hold up the next; each batch is bounded by the store timeout.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((args, future))
        return future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        spawn(self._send(batch), name="store-batch")

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._execute([args for args, _ in batch])
                missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
                if missing:  # Redis restarted or was flushed: send those by source once
                    retried = await self._execute([_as_eval(batch[i][0]) for i in missing])
                    for index, result in zip(missing, retried, strict=True):
                        results[index] = result
        except (RedisError, OSError, TimeoutError) as exc:
            error = StoreUnavailable(f"redis: {_describe(exc)}", retry_after=1)
            error.__cause__ = exc
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                error = StoreUnavailable(f"redis: {_describe(result)}", retry_after=1)
                error.__cause__ = result
                future.set_exception(error)
            else:
                future.set_result(result)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        try:
            return await pipe.execute(raise_on_error=False)
        finally:
            await pipe.reset()  # type: ignore[no-untyped-call]


def _as_eval(args: tuple[Any, ...]) -> tuple[Any, ...]:
    sha = args[1]
    script = next(s for s in _ALL_SCRIPTS if s.sha == sha)
    return ("EVAL", script.source, *args[2:])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no answer within the store timeout"
    return str(exc) or type(exc).__name__


class RedisStore:
    """`Store` on Redis (`redis://`, `rediss://`, `unix://`)."""

    def __init__(self, url: str, *, timeout: float = 0.5, max_connections: int = 64) -> None:
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # A retried EVAL could run twice; a failure is reported, never retried here.
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
        )
        self._batch = CommandBatcher(self._client, timeout)
        self._timeout = timeout

    async def _call(self, script: _Script, key: str, *args: Any) -> Any:
        return await self._batch.call("EVALSHA", script.sha, 1, key, *args)

    async def begin(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, takeover: bool
    ) -> Decision:
        token = os.urandom(12).hex()
        reply = await self._call(
            _BEGIN, key, fingerprint, token, _ms(lease), _ms(ttl), 1 if takeover else 0
        )
        code = reply[0]
        if code == 1:
            return Acquired(token)
        if code == 2:
            return Acquired(token, takeover=True)
        if code == 3:
            return Replay(_outcome(*reply[1:5]))
        if code == 4:
            return InProgress(reply[1] / 1000)
        return Mismatch()

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        return bool(await self._call(_RENEW, key, token, _ms(lease)))

    async def complete(self, key: str, token: str, outcome: Outcome, *, ttl: float) -> bool:
        response = outcome.response
        return bool(
            await self._call(
                _COMPLETE, key, token, _ms(ttl), outcome.kind, response.status,
                encode_headers(response.headers), response.body,
            )
        )  # fmt: skip

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(_RELEASE, key, token))

    async def ping(self) -> None:
        await self._batch.call("PING")

    async def inspect(self, key: str) -> RecordInfo | None:
        reply = await self._call(_INSPECT, key)
        if not reply:
            return None
        state, fingerprint, lease_left, pttl, kind, status, body_len = reply
        ttl_remaining = pttl / 1000 if pttl >= 0 else None
        if state == b"f":
            return RecordInfo("in_flight", fingerprint.decode(), ttl_remaining,
                              lease_remaining=max(0.0, (lease_left or 0) / 1000))  # fmt: skip
        kind_name: OutcomeKind = "response"
        if kind == b"too_large":
            kind_name = "too_large"
        elif kind == b"unknown":
            kind_name = "unknown"
        return RecordInfo(
            "done", fingerprint.decode(), ttl_remaining, outcome=kind_name,
            status=int(status) or None, body_bytes=body_len,
        )  # fmt: skip

    async def delete(self, key: str) -> bool:
        return bool(await self._batch.call("DEL", key))

    async def counts(self) -> dict[str, int]:
        counts = {"in_flight": 0, "done": 0}
        try:
            async with asyncio.timeout(max(self._timeout, 5.0)):
                keys = [k async for k in self._client.scan_iter(match=STORAGE_PREFIX + "*",
                                                                count=1000)]  # fmt: skip
                pipe = self._client.pipeline(transaction=False)
                for key in keys:
                    pipe.hget(key, "st")
                states = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {_describe(exc)}", retry_after=1) from exc
        for state in states:
            if state == b"f":
                counts["in_flight"] += 1
            elif state == b"d":
                counts["done"] += 1
        return counts

    async def close(self) -> None:
        await self._client.aclose()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
