"""The Faults section of DESIGN.md, provoked for real.

Proxies run as processes (`python -m proxy run`) so they can be SIGKILLed mid-flight, frozen
with SIGSTOP or drained with SIGTERM; the store is the test's own redis-server, which a test
stops, pauses or freezes. Every test asserts how often the upstream executed the key: the
one thing that must never happen is a second execution of one key inside its ttl, except
where `on_unknown_outcome: retry` asks for exactly that.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.server import Running
from tests.conftest import ProcessFactory, ProxyFactory, RedisServer, Upstream, key
from tests.support.metrics import scrape, value
from tests.support.proxies import ProxyProcess
from tests.support.requests import Answer, assert_replayed_once, post, problem_type
from tests.support.waiting import wait_until

LEASE = 0.5
# Leases of proxies SIGKILLed mid-flight: a replica must see the lease still running after
# the kill. The owner renewed it at most LEASE/3 before dying, so it runs at least 2/3 of a
# lease after the kill; 1 s of that is enough for one request on a loaded machine.
KILL_LEASE = 1.5
STORE_TIMEOUT = 0.2
# How long an answer may take when the store hangs: its timeout plus a margin for a loaded
# machine. A paused Redis stays paused for more than twice that (CLIENT UNPAUSE waits
# behind the pause itself), so an answer in time can only come from the timeout.
HUNG_BOUND = STORE_TIMEOUT + 0.5
PAUSE_MS = 1500


async def record_states(redis: RedisServer) -> list[str]:
    """The state field of every idempotency record in Redis (f = in flight, d = done)."""
    client = aioredis.Redis.from_url(redis.url)
    try:
        keys = [k async for k in client.scan_iter(match="idp:*")]
        states = []
        for k in keys:
            state = await client.hget(k, "st") or b"?"
            states.append(state.decode() if isinstance(state, bytes) else state)
        return states
    finally:
        await client.aclose()


async def ready(client: aiohttp.ClientSession, admin_url: str) -> bool:
    """Whether /readyz answers 200, as a readiness probe would poll it."""
    async with client.get(admin_url + "/readyz") as response:
        return response.status == 200


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return False
    except ConnectionRefusedError:
        return True


# --- a proxy killed mid-flight --------------------------------------------------------


def redis_config(redis: RedisServer, mode: str, lease: float = LEASE) -> dict[str, Any]:
    """Config overrides shared by the doomed proxy and its successors on one Redis."""
    return {
        "store": {"url": redis.url},
        "defaults": {
            "lease": f"{int(lease * 1000)}ms",
            "on_unknown_outcome": mode,
            "on_concurrent": "reject",  # these tests watch for the 409 while the lease runs
        },
    }


@dataclass
class AfterTheKill:
    """A key whose owner was SIGKILLed mid-flight: a replica saw it still leased (409);
    `restarted` is a fresh proxy on the same Redis, ready once the lease has lapsed."""

    replica: Running
    restarted: ProxyProcess


async def kill_mid_flight(
    upstream: Upstream,
    proxy_process: ProcessFactory,
    start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    redis: RedisServer,
    mode: str,
    path: str,
    k: str,
) -> AfterTheKill:
    """Send `k` through a doomed proxy, SIGKILL it while the upstream works, see a replica
    answer 409 while the lease runs, and wait until it has lapsed."""
    config = redis_config(redis, mode, lease=KILL_LEASE)
    doomed = await proxy_process(**config)
    replica = await start_proxy(**config)
    first = asyncio.ensure_future(post(client, doomed, path, idem=k))
    await upstream.arrived(k)
    assert not first.done()
    doomed.kill()
    killed_at = time.monotonic()
    with pytest.raises(aiohttp.ClientError):
        await first

    status, headers, body = await post(client, replica, path, idem=k)
    assert time.monotonic() - killed_at < KILL_LEASE * 2 / 3, "too slow to see the lease running"
    assert status == 409 and problem_type(headers, body) == "key-in-use"
    assert headers["Retry-After"] == "1"

    restarted = await proxy_process(**config)
    await asyncio.sleep(max(0.0, killed_at + KILL_LEASE + 0.05 - time.monotonic()))
    return AfterTheKill(replica, restarted)


async def test_killed_proxy_key_conflicts_until_its_lease_lapses_then_is_outcome_unknown(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGKILL mid-flight, reject: 409 while the lease runs, then a terminal 502; one execution."""
    k = key("kill")
    after = await kill_mid_flight(upstream, proxy_process, start_proxy, client, redis,
                                  "reject", "/delay/1/pay", k)  # fmt: skip
    status, headers, body = await post(client, after.restarted, "/delay/1/pay", idem=k)
    assert status == 502 and problem_type(headers, body) == "outcome-unknown"
    for proxy in (after.restarted, after.replica):
        again = await post(client, proxy, "/delay/1/pay", idem=k)
        assert again[0] == 502 and again[2] == body
        assert again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_killed_proxy_key_is_taken_over_and_forwarded_again_under_retry(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGKILL mid-flight, retry: 409 while the lease runs, then one more execution, replayed."""
    k = key("kill")
    after = await kill_mid_flight(upstream, proxy_process, start_proxy, client, redis,
                                  "retry", "/delay/0.5/pay", k)  # fmt: skip
    restarted, replica = after.restarted, after.replica
    status, headers, body = await post(client, restarted, "/delay/0.5/pay", idem=k)
    assert status == 201 and "Idempotent-Replayed" not in headers
    assert json.loads(body)["serial"] == 2
    assert upstream.executions(k) == 2
    # The restarted proxy answers before its result lands in Redis; until it does, the lease
    # guards the key and a retry on another proxy gets 409 (never a third execution).
    again = await post(client, replica, "/delay/0.5/pay", idem=k)
    for _ in range(200):
        if again[0] != 409:
            break
        await asyncio.sleep(0.01)
        again = await post(client, replica, "/delay/0.5/pay", idem=k)
    assert again[0] == 201 and again[2] == body and again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 2


@pytest.mark.parametrize("mode", ["reject", "retry"])
async def test_frozen_owner_that_wakes_after_a_takeover_is_fenced_out(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer, mode: str,
) -> None:  # fmt: skip
    """An owner frozen past its lease answers its client on waking but cannot overwrite the key."""
    config = redis_config(redis, mode)
    frozen = await proxy_process(**config)
    replica = await start_proxy(**config)
    k = key("frozen")
    first = asyncio.ensure_future(post(client, frozen, "/delay/0.3/pay", idem=k))
    await upstream.arrived(k)
    frozen.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(LEASE + 0.1)
        second = await post(client, replica, "/delay/0.3/pay", idem=k)
    finally:
        frozen.signal(signal.SIGCONT)
    woke = await first
    assert woke[0] == 201 and json.loads(woke[2])["serial"] == 1
    await wait_until(lambda: any("fenced out" in e.get("event", "") for e in frozen.events()),
                     what="the woken owner fenced out")  # fmt: skip

    if mode == "reject":
        assert second[0] == 502 and problem_type(second[1], second[2]) == "outcome-unknown"
        assert upstream.executions(k) == 1
    else:
        assert second[0] == 201 and json.loads(second[2])["serial"] == 2
        assert upstream.executions(k) == 2
    for proxy in (replica, frozen):
        again = await post(client, proxy, "/delay/0.3/pay", idem=k)
        assert again[0] == second[0] and again[2] == second[2]
        assert again[1]["Idempotent-Replayed"] == "true"


# --- the store fails ------------------------------------------------------------------


async def test_store_down_fails_closed_and_the_proxy_reconnects_when_it_returns(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """Redis stopped: 503 with Retry-After, upstream untouched, /readyz 503; back: served again."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"})
    warm = await asyncio.gather(
        *(post(client, proxy, "/v1/pay", idem=key("warm")) for _ in range(8))
    )
    assert {status for status, _, _ in warm} == {201}
    redis.kill()

    k = key("down")
    for _ in range(2):
        status, headers, body = await post(client, proxy, "/v1/pay", idem=k)
        assert status == 503 and problem_type(headers, body) == "store-unavailable"
        assert headers["Retry-After"] == "1"
    async with client.get(proxy.admin_url + "/readyz") as response:
        assert response.status == 503
    assert upstream.executions(k) == 0

    redis.start()
    await wait_until(lambda: ready(client, proxy.admin_url), 1.0, "/readyz recovered")
    results = await asyncio.gather(*(post(client, proxy, "/v1/pay", idem=key("back"))
                                     for _ in range(8)))  # fmt: skip
    assert {status for status, _, _ in results} == {201}
    await assert_replayed_once(client, upstream, proxy, idem=k, status=201)


async def test_store_down_fails_open_and_protection_returns_with_the_store(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """fail_mode open: forwarded unprotected while Redis is down, protected again once back."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms", "fail_mode": "open"})
    assert (await post(client, proxy, "/v1/pay", idem=key("warm")))[0] == 201
    redis.kill()
    k = key("open")
    for _ in range(2):
        status, headers, _ = await post(client, proxy, "/v1/pay", idem=k)
        assert status == 201 and "Idempotent-Replayed" not in headers
    assert upstream.executions(k) == 2

    redis.start()
    await wait_until(lambda: ready(client, proxy.admin_url), 1.0, "/readyz recovered")
    await assert_replayed_once(client, upstream, proxy, idem=key("closed-again"), status=201)


@pytest.mark.parametrize("how", ["client-pause", "sigstop"])
async def test_store_not_answering_fails_closed_within_the_store_timeout(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer, how: str,
) -> None:  # fmt: skip
    """A Redis that hangs: 503 and /readyz 503 within store.timeout (200ms), upstream untouched."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": f"{STORE_TIMEOUT:g}s"})
    assert (await post(client, proxy, "/v1/pay", idem=key("warm")))[0] == 201
    if how == "client-pause":
        assert redis.command("CLIENT", "PAUSE", str(PAUSE_MS), "ALL").startswith(b"+OK")
    else:
        redis.freeze()
    hung_at = time.monotonic()
    k = key("hung")
    try:
        status, headers, body = await post(client, proxy, "/v1/pay", idem=k)
        assert time.monotonic() - hung_at < HUNG_BOUND
        assert status == 503 and problem_type(headers, body) == "store-unavailable"
        assert headers["Retry-After"] == "1"
        started = time.monotonic()
        async with client.get(proxy.admin_url + "/readyz") as response:
            assert response.status == 503
        assert time.monotonic() - started < HUNG_BOUND
    finally:
        if how == "client-pause":
            await asyncio.sleep(max(0.0, hung_at + PAUSE_MS / 1000 - time.monotonic()))
        redis.thaw()
    assert upstream.executions(k) == 0
    await wait_until(lambda: ready(client, proxy.admin_url), what="/readyz recovered")
    await assert_replayed_once(client, upstream, proxy, idem=key("recovered"), status=201)


async def test_retry_after_a_store_timeout_executes_the_request(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """The retry a store-timeout 503 invites executes once; a late begin does not lock the key."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"},
                              defaults={"lease": f"{int(LEASE * 1000)}ms"})  # fmt: skip
    assert (await post(client, proxy, "/v1/pay", idem=key("warm")))[0] == 201
    redis.freeze()
    k = key("late")
    try:
        assert (await post(client, proxy, "/v1/pay", idem=k))[0] == 503
        await asyncio.sleep(0.3)  # frozen a while longer: the begin waits in its socket buffer
    finally:
        redis.thaw()
    # Frozen, Redis still held the begin in its socket buffer; it ran it on waking.
    answers = []
    deadline = time.monotonic() + 2 * LEASE + 1
    while time.monotonic() < deadline:
        status, _, body = await post(client, proxy, "/v1/pay", idem=k)
        answers.append(status)
        if status != 409:
            break
        await asyncio.sleep(0.05)
    assert status == 201, (answers, body)
    assert upstream.executions(k) == 1


async def test_store_lost_after_the_upstream_answered_still_returns_the_response(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """Redis dies between begin and complete: the client gets the upstream's answer, counted."""
    # A short lease: the proxy keeps trying to record for one lease, then counts the loss.
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"},
                              defaults={"lease": "500ms"})  # fmt: skip

    async def unrecorded() -> float:
        samples = await scrape(client, proxy.admin_url)
        return value(samples, "idempotency_proxy_unrecorded_responses_total", route="all")

    before = await unrecorded()
    k = key("lost")
    first = asyncio.ensure_future(post(client, proxy, "/hold/lost/pay", b'{"n": 1}', k))
    await upstream.arrived(k)
    redis.kill()
    upstream.release("lost")
    status, headers, body = await first
    assert status == 201 and "Idempotent-Replayed" not in headers
    assert json.loads(body) == {"serial": 1, "method": "POST", "path": "/hold/lost/pay",
                                "body": '{"n": 1}'}  # fmt: skip

    async def counted() -> bool:
        return await unrecorded() == before + 1

    await wait_until(counted, 3, "the lost result counted", interval=0.1)
    assert upstream.executions(k) == 1


async def test_a_result_the_store_missed_is_recorded_when_it_answers_again(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """Redis stalls as the upstream answers: the client is answered, and once Redis is back
    the result is recorded, so the retry is a replay, not "outcome unknown"."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"},
                              defaults={"lease": "3s"})  # fmt: skip
    k = key("late")
    first = asyncio.ensure_future(post(client, proxy, "/hold/late/pay", idem=k))
    await upstream.arrived(k)
    redis.command("CLIENT", "PAUSE", "800", "ALL")
    upstream.release("late")
    status, headers, body = await first
    assert status == 201 and "Idempotent-Replayed" not in headers

    async def recorded() -> bool:  # asked of the paused Redis, so only answered after it
        return await record_states(redis) == ["d"]

    await wait_until(recorded, 3, "the result recorded once Redis answers")
    again = await post(client, proxy, "/hold/late/pay", idem=k)
    assert again[0] == 201 and again[1]["Idempotent-Replayed"] == "true"
    assert again[2] == body
    assert upstream.executions(k) == 1


# --- graceful shutdown ----------------------------------------------------------------


async def sigterm_in_flight(
    client: aiohttp.ClientSession, upstream: Upstream, proxy: ProxyProcess, k: str
) -> tuple[asyncio.Future[Answer], float]:
    """Send `k` through `proxy`, held at the upstream (at the gate named `k`), and SIGTERM
    the proxy once it arrived there; the request in flight and when the signal went."""
    first = asyncio.ensure_future(post(client, proxy, f"/hold/{k}/pay", idem=k))
    await upstream.arrived(k)
    proxy.terminate()
    return first, time.monotonic()


async def test_sigterm_lets_the_request_in_flight_finish_and_record_then_exits_zero(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGTERM: no new connections, the in-flight answer is delivered and recorded, exit 0."""
    grace = 5.0
    proxy = await proxy_process(store={"url": redis.url}, shutdown_grace=f"{grace:g}s")
    k = key("term")
    first, signalled = await sigterm_in_flight(client, upstream, proxy, k)

    await wait_until(lambda: refuses_connections(proxy.url), 0.5, "the listener closed")
    assert not first.done(), "the listener should close while the request is still in flight"
    upstream.release(k)
    status, _, body = await first
    assert status == 201 and json.loads(body)["serial"] == 1
    assert await proxy.wait(grace) == 0
    assert time.monotonic() - signalled < grace

    assert await record_states(redis) == ["d"]
    successor = await start_proxy(store={"url": redis.url})
    again = await post(client, successor, f"/hold/{k}/pay", idem=k)
    assert again[0] == 201 and again[2] == body and again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_sigterm_with_an_exchange_outlasting_the_grace_never_executes_it_twice(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """Grace shorter than the upstream: the process exits 0; the retry gets a 502, no rerun."""
    config = {**redis_config(redis, "reject"), "shutdown_grace": "300ms"}
    proxy = await proxy_process(**config)
    k = key("grace")
    first, _ = await sigterm_in_flight(client, upstream, proxy, k)
    assert await proxy.wait(3.0) == 0
    with pytest.raises(aiohttp.ClientError):
        await first

    # Cut off by the proxy's own exit: recorded as a dropped exchange, or left in flight
    # until its lease lapses. Either way the outcome is unknown and terminal.
    await asyncio.sleep(LEASE + 0.05)
    successor = await start_proxy(**config)
    for _ in range(2):
        status, headers, body = await post(client, successor, f"/hold/{k}/pay", idem=k)
        assert status == 502
        assert problem_type(headers, body) in ("upstream-disconnected", "outcome-unknown")
    assert await record_states(redis) == ["d"]
    assert upstream.executions(k) == 1


async def test_sigterm_exits_within_the_shutdown_grace(
    upstream: Upstream, proxy_process: ProcessFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """shutdown_grace bounds the whole drain: a hung upstream does not hold the exit longer."""
    grace = 1.0
    proxy = await proxy_process(store={"url": redis.url}, shutdown_grace=f"{grace:g}s")
    k = key("bound")
    first, signalled = await sigterm_in_flight(client, upstream, proxy, k)
    assert await proxy.wait(5.0) == 0
    elapsed = time.monotonic() - signalled
    with pytest.raises(aiohttp.ClientError):
        await first
    assert elapsed < grace + 0.9, f"exited {elapsed:.2f}s after SIGTERM; grace is {grace}s"


# --- the upstream misbehaves (what tests/test_flow.py does not already cover) -----------


@pytest.fixture
async def breaking_upstream() -> AsyncIterator[str]:
    """A raw upstream that starts a chunked 200, sends two chunks, then resets the connection."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"6\r\nchunk0\r\n6\r\nchunk1\r\n")  # fmt: skip
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def test_upstream_reset_mid_stream_is_passed_on_as_a_broken_response(
    upstream: Upstream, breaking_upstream: str, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
) -> None:  # fmt: skip
    """A streamed GET whose upstream resets: the client sees a broken body, never a clean end."""
    proxy = await start_proxy(upstream=breaking_upstream, routes=[
        {"path": "/broken/*", "id": "broken"},
        {"path": "/*", "id": "all", "upstream": upstream.url},
    ])  # fmt: skip
    async with client.get(proxy.url + "/broken/feed") as response:
        assert response.status == 200
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in response.content.iter_any():
                received += chunk
    assert received == b"chunk0chunk1"
    k = key("after")
    assert (await post(client, proxy, "/v1/pay", idem=k))[0] == 201
    assert upstream.executions(k) == 1


async def test_huge_bodies_stream_through_without_being_buffered(
    upstream: Upstream, proxy_process: ProcessFactory, client: aiohttp.ClientSession
) -> None:
    """50 MB through an unprotected GET and a protected POST: the proxy's memory stays flat."""
    size = 50_000_000
    proxy = await proxy_process()
    assert (await post(client, proxy, "/big/100000", idem=key("warm")))[0] == 200
    baseline = proxy.peak_rss_kib()

    async def fetch(method: str, headers: dict[str, str]) -> tuple[int, int, Any]:
        received = 0
        async with client.request(method, f"{proxy.url}/big/{size}", headers=headers) as r:
            async for chunk in r.content.iter_chunked(1 << 20):
                received += len(chunk)
            return r.status, received, r.headers

    k = key("huge")
    assert (await fetch("GET", {"Idempotency-Key": k}))[:2] == (200, size)
    assert (await fetch("POST", {"Idempotency-Key": k}))[:2] == (200, size)
    status, _, headers = await fetch("POST", {"Idempotency-Key": k})
    assert status == 409 and headers["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 2  # the GET and the POST, each once
    growth_mib = (proxy.peak_rss_kib() - baseline) / 1024
    assert growth_mib < 16, f"the proxy's peak memory grew by {growth_mib:.0f} MiB"
