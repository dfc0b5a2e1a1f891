"""The Redis store: shared by every replica, one atomic Lua script per transition.

Each record is a hash. Leases are measured with the Redis server's clock (`TIME`), so
proxies whose clocks disagree still agree on whether a lease has run out. Every script
that changes an in-flight record checks its fencing token (the model is redis-py's
`Lock.release` script).

Every command goes through a `RedisBatcher` (see `connection.py`): the commands of
concurrent requests travel together on connections redis-py establishes and keeps, so the
hot path keeps its speed without connection code of our own. The store is built on a
batcher, so the same scripts run on a standalone node, behind Sentinel, or per Cluster node.

Error replies are translated into `StoreUnavailable` here, and redis-py's own errors in
`connection.py`, nowhere else.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from proxy.errors import StoreUnavailable
from proxy.keys import STORAGE_PREFIX
from proxy.store.base import (
    UNKNOWN_OUTCOME,
    Acquired,
    Decision,
    Expired,
    InProgress,
    Mismatch,
    Outcome,
    OutcomeKind,
    RecordInfo,
    Replay,
    StoredResponse,
    new_token,
)
from proxy.store.connection import (
    RedisBatcher,
    ReplyError,
    Unanswered,
    connection_pool,
)
from proxy.store.topology import Batcher, ClusterBatcher
from proxy.tasks import spawn

# Record fields: st (f = in flight, d = done), fp, tok, exp (lease deadline, ms, server
# clock), at (when the first attempt began, ms, server clock), and when done: kind, status,
# hdrs, body, and with a tombstone `until` (when the response expires, ms, server clock).
#
# Tombstones: Redis (before 7.4) cannot expire part of a hash, so a done record with a
# tombstone is kept (PEXPIRE) for ttl + tombstone, and `until` marks the end of its
# response. A begin past `until` treats the record as a tombstone and drops its headers and
# body on the way (`bury`); a record nobody asks for again keeps them until it expires.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Every transition that grants a lease (create, takeover, renew) keeps the record for at
# least that lease: a record that expired under its owner would let a concurrent retry
# acquire the key and execute a second time beside it, and the owner's result be lost.
_KEEP_FOR_LEASE = """
local function keep_for_lease(lease)
  if redis.call('PTTL', KEYS[1]) < tonumber(lease) then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
end
"""

# Keep a done record `tomb` ms past the end of its response, which `until` marks.
_KEEP_TOMBSTONE = """
local function keep_tombstone(ends, tomb)
  redis.call('HSET', KEYS[1], 'until', ends)
  redis.call('PEXPIRE', KEYS[1], ends - now + tomb)
end
"""

# Turn a done record whose response expired into its tombstone: the same hash without
# headers and body, written anew so that Redis stores it compactly again (a hash that once
# held a large body keeps its large encoding after HDEL: 528 bytes instead of about 150).
_BURY = """
local function bury(fp, kind, status, tok, ends)
  local left = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'st', 'd', 'fp', fp, 'kind', kind, 'status', status,
             'until', ends)
  if tok then redis.call('HSET', KEYS[1], 'tok', tok) end
  redis.call('PEXPIRE', KEYS[1], left)
end
"""

# KEYS[1] record; ARGV fingerprint, token, lease ms, ttl ms, takeover (1/0), tombstone ms
# -> {1} acquired | {2} taken over | {3, kind, status, hdrs, body, age ms} replay
#    | {4, ms left, age ms} in progress | {5, age ms} mismatch
#    | {6, kind, status} response expired
# (age: ms since the record was created, -1 for a record written without `at`)
BEGIN = (
    _NOW
    + _KEEP_FOR_LEASE
    + _KEEP_TOMBSTONE
    + _BURY
    + """
local rec = redis.call('HMGET', KEYS[1], 'st', 'fp', 'exp', 'until', 'at')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'st', 'f', 'fp', ARGV[1], 'tok', ARGV[2], 'exp', now + ARGV[3],
             'at', now)
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[4]), tonumber(ARGV[3])))
  return {1}
end
local age = -1
if rec[5] then age = now - tonumber(rec[5]) end
if rec[2] ~= ARGV[1] then return {5, age} end
if rec[1] == 'd' then
  if rec[4] and now >= tonumber(rec[4]) then
    local r = redis.call('HMGET', KEYS[1], 'kind', 'status', 'tok', 'body')
    if r[4] then bury(rec[2], r[1], r[2], r[3], rec[4]) end
    return {6, r[1], r[2]}
  end
  local r = redis.call('HMGET', KEYS[1], 'kind', 'status', 'hdrs', 'body')
  return {3, r[1], r[2], r[3], r[4], age}
end
local left = tonumber(rec[3]) - now
if left > 0 then return {4, left, age} end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'tok', ARGV[2], 'exp', now + ARGV[3])
  keep_for_lease(ARGV[3])
  return {2}
end
redis.call('HSET', KEYS[1], 'st', 'd', 'kind', 'unknown', 'status', '0', 'hdrs', '', 'body', '')
redis.call('HDEL', KEYS[1], 'tok', 'exp')
if tonumber(ARGV[6]) > 0 then keep_tombstone(now + redis.call('PTTL', KEYS[1]), ARGV[6]) end
return {3, 'unknown', '0', '', '', age}
"""
)

# KEYS[1] record; ARGV token, lease ms -> 1 renewed | 0 not the owner (or already done)
RENEW = (
    _NOW
    + _KEEP_FOR_LEASE
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'tok')
if r[1] ~= 'f' or r[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'exp', now + ARGV[2])
keep_for_lease(ARGV[2])
return 1
"""
)

# KEYS[1] record; ARGV token, ttl ms, kind, status, hdrs, body, tombstone ms
# -> 1 stored | 0 fenced. The owner's token stays on the done record, so a complete that is
# retried after its answer was lost is told "stored" again instead of "fenced".
COMPLETE = (
    _NOW
    + _KEEP_TOMBSTONE
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'tok')
if r[2] ~= ARGV[1] then return 0 end
if r[1] == 'd' then return 1 end
redis.call('HSET', KEYS[1], 'st', 'd', 'kind', ARGV[3], 'status', ARGV[4],
           'hdrs', ARGV[5], 'body', ARGV[6])
redis.call('HDEL', KEYS[1], 'exp')
if tonumber(ARGV[7]) > 0 then
  keep_tombstone(now + ARGV[2], ARGV[7])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""
)

# KEYS[1] record; ARGV token -> 1 released | 0 not the owner (or already done)
RELEASE = """
local r = redis.call('HMGET', KEYS[1], 'st', 'tok')
if r[1] ~= 'f' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] record
# -> {st, fp, exp-now or false, pttl, kind, status, body length, tombstone 1/0} or {}
INSPECT = (
    _NOW
    + """
local r = redis.call('HMGET', KEYS[1], 'st', 'fp', 'exp', 'kind', 'status', 'until')
if not r[1] then return {} end
local left = false
if r[3] then left = tonumber(r[3]) - now end
local tomb, body = 0, redis.call('HSTRLEN', KEYS[1], 'body')
if r[6] and now >= tonumber(r[6]) then tomb, body = 1, 0 end
return {r[1], r[2], left, redis.call('PTTL', KEYS[1]), r[4], r[5], body, tomb}
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


def _kind(kind: bytes) -> OutcomeKind:
    if kind == b"unknown":
        return "unknown"
    assert kind in (b"response", b"too_large"), kind
    return "response" if kind == b"response" else "too_large"


def _outcome(kind: bytes, status: bytes, hdrs: bytes, body: bytes) -> Outcome:
    name = _kind(kind)
    if name == "unknown":
        return UNKNOWN_OUTCOME
    return Outcome(name, StoredResponse(int(status), decode_headers(hdrs), body))


# Releasing the records of begins that went unanswered: first after this long, then backing off.
_WITHDRAW_FIRST = 0.05
_WITHDRAW_MAX = 1.0


# The readiness probe's key: a write, so a store that refuses writes is not ready.
READINESS_KEY = STORAGE_PREFIX + "readyz"


class RedisStore:
    """`Store` on Redis (`redis://`, `rediss://`, `unix://`), or on any `RedisBatcher`.

    With `min_replicas_ack`, begin, renew and complete (and the readiness probe) count as
    done only once that many replicas acknowledged them.
    """

    def __init__(
        self, url: str = "", *, timeout: float = 0.5, min_replicas_ack: int = 0,
        batcher: Batcher | None = None,
    ) -> None:  # fmt: skip
        self._timeout = timeout
        if batcher is None:
            batcher = RedisBatcher(
                connection_pool(url, timeout), timeout, min_replicas_ack=min_replicas_ack
            )
        self._batcher = batcher
        # (record, token) of begins that went unanswered -> releases Redis answered since.
        self._orphans: dict[tuple[str, str], int] = {}
        self._withdrawing: asyncio.Task[None] | None = None

    async def _call(self, script: _Script, key: str, *args: Any) -> Any:
        """Run a script by SHA; send its source only when Redis has not seen it."""
        reply = await self._batcher.call("EVALSHA", script.sha, 1, key, *args)
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            # Redis restarted or its script cache was flushed; EVALSHA did not run.
            reply = await self._batcher.call("EVAL", script.source, 1, key, *args)
        return _checked(reply)

    async def _write(self, script: _Script, key: str, *args: Any) -> Any:
        """`_call` for a write that must reach `min_replicas_ack` replicas to count."""
        reply = await self._batcher.call_acknowledged("EVALSHA", script.sha, 1, key, *args)
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await self._batcher.call_acknowledged("EVAL", script.source, 1, key, *args)
        return _checked(reply)

    async def begin(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, takeover: bool,
        tombstone: float = 0.0,
    ) -> Decision:  # fmt: skip
        token = new_token()
        try:
            reply = await self._write(
                _BEGIN, key, fingerprint, token, _ms(lease), _ms(ttl), 1 if takeover else 0,
                _ms_or_off(tombstone),
            )  # fmt: skip
        except Unanswered:
            # Redis may still run this begin when it reads it (a frozen or overloaded server
            # works through its socket buffers when it resumes), or ran it but too few
            # replicas acknowledged it (a failover would lose it). Its record would be in flight
            # under a token nobody holds: the retry our 503 invites would meet 409, then
            # "outcome unknown" for a request never forwarded. Withdraw it if it lands.
            self._orphans[(key, token)] = 0
            if self._withdrawing is None or self._withdrawing.done():
                self._withdrawing = spawn(self._withdraw(), "store-withdraw")
            raise
        code = reply[0]
        if code == 1:
            return Acquired(token)
        if code == 2:
            return Acquired(token, takeover=True)
        if code == 3:
            return Replay(_outcome(*reply[1:5]), _age(reply[5]))
        if code == 4:
            return InProgress(reply[1] / 1000, _age(reply[2]))
        if code == 6:
            return Expired(_kind(reply[1]), int(reply[2]))
        return Mismatch(_age(reply[1]))

    async def _withdraw(self) -> None:
        """Release, fenced by their tokens, the records of begins that went unanswered.

        Redis answers in the order it reads its sockets: once it has answered two releases
        sent after a begin went unanswered, it has run that begin, or never will.
        """
        delay = _WITHDRAW_FIRST
        while self._orphans:
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WITHDRAW_MAX)
            pending = list(self._orphans)
            results = await asyncio.gather(
                *(self._call(_RELEASE, key, token) for key, token in pending),
                return_exceptions=True,
            )
            for orphan, result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    continue
                if result or self._orphans[orphan] >= 1:
                    del self._orphans[orphan]
                else:
                    self._orphans[orphan] += 1

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        return bool(await self._write(_RENEW, key, token, _ms(lease)))

    async def complete(
        self, key: str, token: str, outcome: Outcome, *, ttl: float, tombstone: float = 0.0
    ) -> bool:
        response = outcome.response
        return bool(
            await self._write(
                _COMPLETE, key, token, _ms(ttl), outcome.kind, response.status,
                encode_headers(response.headers), response.body, _ms_or_off(tombstone),
            )
        )  # fmt: skip

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._call(_RELEASE, key, token))

    async def ping(self) -> None:
        """Prove the store takes writes: a `PING` would pass on a demoted primary."""
        keys = [READINESS_KEY]
        if isinstance(self._batcher, ClusterBatcher):  # every master must take writes
            keys = await self._batcher.keys_per_master(READINESS_KEY)
        for reply in await asyncio.gather(
            *(self._batcher.call_acknowledged("SET", key, "1", "PX", 1000) for key in keys)
        ):
            _checked(reply)

    async def inspect(self, key: str) -> RecordInfo | None:
        reply = await self._call(_INSPECT, key)
        if not reply:
            return None
        state, fingerprint, lease_left, pttl, kind, status, body_len, tombstone = reply
        ttl_remaining = pttl / 1000 if pttl >= 0 else None
        if state == b"f":
            return RecordInfo("in_flight", fingerprint.decode(), ttl_remaining,
                              lease_remaining=max(0.0, (lease_left or 0) / 1000))  # fmt: skip
        return RecordInfo(
            "done", fingerprint.decode(), ttl_remaining, outcome=_kind(kind),
            status=int(status) or None, body_bytes=body_len, tombstone=bool(tombstone),
        )  # fmt: skip

    async def delete(self, key: str) -> bool:
        return bool(_checked(await self._batcher.call("DEL", key)))

    async def counts(self) -> dict[str, int]:
        counts = {"in_flight": 0, "done": 0}
        nodes: list[Batcher] = [self._batcher]
        if isinstance(self._batcher, ClusterBatcher):  # each master holds its own slots
            nodes = list(await self._batcher.masters())
        for node in nodes:
            await _count(node, counts)
        return counts

    async def close(self) -> None:
        if self._withdrawing is not None:
            self._withdrawing.cancel()
        await self._batcher.close()


async def _count(node: Batcher, counts: dict[str, int]) -> None:
    """Add the records of one node, by state."""
    cursor: Any = 0
    while True:
        cursor, keys = _checked(
            await node.call("SCAN", cursor, "MATCH", STORAGE_PREFIX + "*", "COUNT", 1000)
        )
        states = await asyncio.gather(*(node.call("HGET", k, "st") for k in keys))
        for state in states:  # other keys (the readiness probe) answer WRONGTYPE
            if state == b"f":
                counts["in_flight"] += 1
            elif state == b"d":
                counts["done"] += 1
        if int(cursor) == 0:
            return


def _checked(reply: Any) -> Any:
    """The reply, or `StoreUnavailable` for an error reply."""
    if isinstance(reply, ReplyError):
        raise StoreUnavailable(f"redis: {reply}", retry_after=1)
    return reply


def _age(ms: int) -> float | None:
    """A record's age from a script's reply: -1 means the record does not say."""
    return None if ms < 0 else ms / 1000


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _ms_or_off(seconds: float) -> int:
    """A tombstone's length in ms; 0 keeps none."""
    return _ms(seconds) if seconds > 0 else 0
