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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.errors import PROBLEM_TYPE_PREFIX
from tests.conftest import ProxyFactory, RedisServer, Upstream, key
from tests.proxy_process import ProxyProcess, start_process, stop_process

LEASE = 0.5
ProcessFactory = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def proxy_process(tmp_path: Path, upstream: Upstream) -> AsyncIterator[ProcessFactory]:
    """Start proxy processes in front of `upstream`; keyword arguments override config."""
    started: list[ProxyProcess] = []

    async def start(**overrides: Any) -> ProxyProcess:
        running = await start_process(tmp_path, upstream.url, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        await stop_process(running)


async def post(client: aiohttp.ClientSession, base: str, path: str, idem: str | None,
               body: bytes = b"{}") -> tuple[int, Any, bytes]:  # fmt: skip
    headers = {} if idem is None else {"Idempotency-Key": idem}
    async with client.post(base + path, data=body, headers=headers) as response:
        return response.status, response.headers, await response.read()


def problem_type(headers: Any, body: bytes) -> str:
    assert headers["Content-Type"] == "application/problem+json"
    data = json.loads(body)
    assert {"type", "title", "status", "detail"} <= data.keys()
    return str(data["type"]).removeprefix(PROBLEM_TYPE_PREFIX)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def metric(client: aiohttp.ClientSession, admin_url: str, sample: str) -> float:
    """One sample's value from the admin /metrics (0 when not exported yet)."""
    async with client.get(admin_url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


async def record_states(redis: RedisServer) -> list[str]:
    """The state field of every idempotency record in Redis (f = in flight, d = done)."""
    client = aioredis.Redis.from_url(redis.url)
    try:
        keys = [k async for k in client.scan_iter(match="idp:*")]
        return [(await client.hget(k, "st") or b"?").decode() for k in keys]
    finally:
        await client.aclose()


async def until_ready(client: aiohttp.ClientSession, admin_url: str, timeout: float = 1.0) -> None:
    """Poll /readyz as a readiness probe would, until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        async with client.get(admin_url + "/readyz") as response:
            if response.status == 200:
                return
        assert time.monotonic() < deadline, "/readyz did not recover"
        await asyncio.sleep(0.02)


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return False
    except ConnectionRefusedError:
        return True


# --- a proxy killed mid-flight --------------------------------------------------------


def redis_config(redis: RedisServer, mode: str) -> dict[str, Any]:
    """Config overrides shared by the doomed proxy and its successors on one Redis."""
    return {
        "store": {"url": redis.url},
        "defaults": {
            "lease": f"{int(LEASE * 1000)}ms",
            "on_unknown_outcome": mode,
            "on_concurrent": "reject",  # these tests watch for the 409 while the lease runs
        },
    }


async def kill_mid_flight(client: aiohttp.ClientSession, upstream: Upstream,
                          doomed: ProxyProcess, path: str, k: str) -> float:  # fmt: skip
    """Send `k` through `doomed` and SIGKILL it while the upstream works; when it died."""
    first = asyncio.ensure_future(post(client, doomed.url, path, k))
    await until(lambda: upstream.executions(k) == 1)
    assert not first.done()
    doomed.kill()
    killed_at = time.monotonic()
    with pytest.raises(aiohttp.ClientError):
        await first
    return killed_at


async def test_killed_proxy_key_conflicts_until_its_lease_lapses_then_is_outcome_unknown(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGKILL mid-flight, reject: 409 while the lease runs, then a terminal 502; one execution."""
    config = redis_config(redis, "reject")
    doomed = await proxy_process(**config)
    replica = await start_proxy(**config)
    k = key("kill")
    killed_at = await kill_mid_flight(client, upstream, doomed, "/delay/1/pay", k)

    status, headers, body = await post(client, replica.url, "/delay/1/pay", k)
    assert time.monotonic() - killed_at < LEASE, "too slow to see the lease still running"
    assert status == 409 and problem_type(headers, body) == "key-in-use"
    assert headers["Retry-After"] == "1"

    restarted = await proxy_process(**config)
    await asyncio.sleep(max(0.0, killed_at + LEASE + 0.05 - time.monotonic()))
    status, headers, body = await post(client, restarted.url, "/delay/1/pay", k)
    assert status == 502 and problem_type(headers, body) == "outcome-unknown"
    for proxy_url in (restarted.url, replica.url):
        again = await post(client, proxy_url, "/delay/1/pay", k)
        assert again[0] == 502 and again[2] == body
        assert again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_killed_proxy_key_is_taken_over_and_forwarded_again_under_retry(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGKILL mid-flight, retry: 409 while the lease runs, then one more execution, replayed."""
    config = redis_config(redis, "retry")
    doomed = await proxy_process(**config)
    replica = await start_proxy(**config)
    k = key("kill")
    killed_at = await kill_mid_flight(client, upstream, doomed, "/delay/0.5/pay", k)

    status, headers, body = await post(client, replica.url, "/delay/0.5/pay", k)
    assert time.monotonic() - killed_at < LEASE, "too slow to see the lease still running"
    assert status == 409 and problem_type(headers, body) == "key-in-use"

    restarted = await proxy_process(**config)
    await asyncio.sleep(max(0.0, killed_at + LEASE + 0.05 - time.monotonic()))
    status, headers, body = await post(client, restarted.url, "/delay/0.5/pay", k)
    assert status == 201 and "Idempotent-Replayed" not in headers
    assert json.loads(body)["serial"] == 2
    assert upstream.executions(k) == 2
    # The restarted proxy answers before its result lands in Redis; until it does, the lease
    # guards the key and a retry on another proxy gets 409 (never a third execution).
    again = await post(client, replica.url, "/delay/0.5/pay", k)
    for _ in range(200):
        if again[0] != 409:
            break
        await asyncio.sleep(0.01)
        again = await post(client, replica.url, "/delay/0.5/pay", k)
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
    first = asyncio.ensure_future(post(client, frozen.url, "/delay/0.3/pay", k))
    await until(lambda: upstream.executions(k) == 1)
    frozen.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(LEASE + 0.1)
        second = await post(client, replica.url, "/delay/0.3/pay", k)
    finally:
        frozen.signal(signal.SIGCONT)
    woke = await first
    assert woke[0] == 201 and json.loads(woke[2])["serial"] == 1
    await until(lambda: any("fenced out" in e.get("event", "") for e in frozen.events()))

    if mode == "reject":
        assert second[0] == 502 and problem_type(second[1], second[2]) == "outcome-unknown"
        assert upstream.executions(k) == 1
    else:
        assert second[0] == 201 and json.loads(second[2])["serial"] == 2
        assert upstream.executions(k) == 2
    for proxy_url in (replica.url, frozen.url):
        again = await post(client, proxy_url, "/delay/0.3/pay", k)
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
        *(post(client, proxy.url, "/v1/pay", key("warm")) for _ in range(8))
    )
    assert {status for status, _, _ in warm} == {201}
    redis.stop()

    k = key("down")
    for _ in range(2):
        status, headers, body = await post(client, proxy.url, "/v1/pay", k)
        assert status == 503 and problem_type(headers, body) == "store-unavailable"
        assert headers["Retry-After"] == "1"
    async with client.get(proxy.admin_url + "/readyz") as response:
        assert response.status == 503
    assert upstream.executions(k) == 0

    redis.start()
    await until_ready(client, proxy.admin_url)
    results = await asyncio.gather(*(post(client, proxy.url, "/v1/pay", key("back"))
                                     for _ in range(8)))  # fmt: skip
    assert {status for status, _, _ in results} == {201}
    first = await post(client, proxy.url, "/v1/pay", k)
    again = await post(client, proxy.url, "/v1/pay", k)
    assert first[0] == 201 and again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_store_down_fails_open_and_protection_returns_with_the_store(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """fail_mode open: forwarded unprotected while Redis is down, protected again once back."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms", "fail_mode": "open"})
    assert (await post(client, proxy.url, "/v1/pay", key("warm")))[0] == 201
    redis.stop()
    k = key("open")
    for _ in range(2):
        status, headers, _ = await post(client, proxy.url, "/v1/pay", k)
        assert status == 201 and "Idempotent-Replayed" not in headers
    assert upstream.executions(k) == 2

    redis.start()
    await until_ready(client, proxy.admin_url)
    k = key("closed-again")
    assert (await post(client, proxy.url, "/v1/pay", k))[0] == 201
    assert (await post(client, proxy.url, "/v1/pay", k))[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


@pytest.mark.parametrize("how", ["client-pause", "sigstop"])
async def test_store_not_answering_fails_closed_within_the_store_timeout(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer, how: str,
) -> None:  # fmt: skip
    """A Redis that hangs: 503 and /readyz 503 within store.timeout (200ms), upstream untouched."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"})
    assert (await post(client, proxy.url, "/v1/pay", key("warm")))[0] == 201
    assert redis.process is not None
    if how == "client-pause":
        assert redis.command("CLIENT", "PAUSE", "600", "ALL").startswith(b"+OK")
    else:
        redis.process.send_signal(signal.SIGSTOP)
    hung_at = time.monotonic()
    k = key("hung")
    try:
        status, headers, body = await post(client, proxy.url, "/v1/pay", k)
        assert time.monotonic() - hung_at < 0.7
        assert status == 503 and problem_type(headers, body) == "store-unavailable"
        assert headers["Retry-After"] == "1"
        started = time.monotonic()
        async with client.get(proxy.admin_url + "/readyz") as response:
            assert response.status == 503
        assert time.monotonic() - started < 0.7
    finally:
        await asyncio.sleep(max(0.0, hung_at + 0.6 - time.monotonic()))
        if how == "sigstop":
            redis.process.send_signal(signal.SIGCONT)
    assert upstream.executions(k) == 0
    await asyncio.sleep(0.05)
    k = key("recovered")
    assert (await post(client, proxy.url, "/v1/pay", k))[0] == 201
    assert (await post(client, proxy.url, "/v1/pay", k))[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_retry_after_a_store_timeout_executes_the_request(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    redis: RedisServer,
) -> None:  # fmt: skip
    """The retry a store-timeout 503 invites executes once; a late begin does not lock the key."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"},
                              defaults={"lease": f"{int(LEASE * 1000)}ms"})  # fmt: skip
    assert (await post(client, proxy.url, "/v1/pay", key("warm")))[0] == 201
    assert redis.process is not None
    redis.process.send_signal(signal.SIGSTOP)
    k = key("late")
    try:
        assert (await post(client, proxy.url, "/v1/pay", k))[0] == 503
        await asyncio.sleep(0.3)
    finally:
        redis.process.send_signal(signal.SIGCONT)
    # Frozen, Redis still held the begin in its socket buffer; it ran it on waking.
    answers = []
    deadline = time.monotonic() + 2 * LEASE + 1
    while time.monotonic() < deadline:
        status, _, body = await post(client, proxy.url, "/v1/pay", k)
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
    sample = 'idempotency_proxy_unrecorded_responses_total{route="all"}'
    before = await metric(client, proxy.admin_url, sample)
    k = key("lost")
    first = asyncio.ensure_future(post(client, proxy.url, "/delay/0.3/pay", k, b'{"n": 1}'))
    await until(lambda: upstream.executions(k) == 1)
    redis.stop()
    status, headers, body = await first
    assert status == 201 and "Idempotent-Replayed" not in headers
    assert json.loads(body) == {"serial": 1, "method": "POST", "path": "/delay/0.3/pay",
                                "body": '{"n": 1}'}  # fmt: skip
    deadline = time.monotonic() + 3
    while await metric(client, proxy.admin_url, sample) != before + 1:
        assert time.monotonic() < deadline, "the lost result was never counted"
        await asyncio.sleep(0.1)
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
    first = asyncio.ensure_future(post(client, proxy.url, "/delay/0.3/pay", k))
    await until(lambda: upstream.executions(k) == 1)
    redis.command("CLIENT", "PAUSE", "800", "ALL")
    status, headers, body = await first
    assert status == 201 and "Idempotent-Replayed" not in headers
    await asyncio.sleep(1.5)
    again = await post(client, proxy.url, "/delay/0.3/pay", k)
    assert again[0] == 201 and again[1]["Idempotent-Replayed"] == "true"
    assert again[2] == body
    assert upstream.executions(k) == 1


# --- graceful shutdown ----------------------------------------------------------------


async def test_sigterm_lets_the_request_in_flight_finish_and_record_then_exits_zero(
    upstream: Upstream, proxy_process: ProcessFactory, start_proxy: ProxyFactory,
    client: aiohttp.ClientSession, redis: RedisServer,
) -> None:  # fmt: skip
    """SIGTERM: no new connections, the in-flight answer is delivered and recorded, exit 0."""
    grace = 5.0
    proxy = await proxy_process(store={"url": redis.url}, shutdown_grace=f"{grace:g}s")
    k = key("term")
    first = asyncio.ensure_future(post(client, proxy.url, "/delay/1/pay", k))
    await until(lambda: upstream.executions(k) == 1)
    proxy.terminate()
    signalled = time.monotonic()

    await until(lambda: refuses_connections(proxy.url), timeout=0.5)
    assert not first.done(), "the listener should close while the request is still in flight"
    status, _, body = await first
    assert status == 201 and json.loads(body)["serial"] == 1
    assert await proxy.wait(grace) == 0
    assert time.monotonic() - signalled < grace

    assert await record_states(redis) == ["d"]
    successor = await start_proxy(store={"url": redis.url})
    again = await post(client, successor.url, "/delay/1/pay", k)
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
    first = asyncio.ensure_future(post(client, proxy.url, "/delay/3/pay", k))
    await until(lambda: upstream.executions(k) == 1)
    proxy.terminate()
    assert await proxy.wait(3.0) == 0
    with pytest.raises(aiohttp.ClientError):
        await first

    # Cut off by the proxy's own exit: recorded as a dropped exchange, or left in flight
    # until its lease lapses. Either way the outcome is unknown and terminal.
    await asyncio.sleep(LEASE + 0.05)
    successor = await start_proxy(**config)
    for _ in range(2):
        status, headers, body = await post(client, successor.url, "/delay/3/pay", k)
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
    first = asyncio.ensure_future(post(client, proxy.url, "/delay/5/pay", k))
    await until(lambda: upstream.executions(k) == 1)
    proxy.terminate()
    signalled = time.monotonic()
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
    assert (await post(client, proxy.url, "/v1/pay", k))[0] == 201
    assert upstream.executions(k) == 1


async def test_huge_bodies_stream_through_without_being_buffered(
    upstream: Upstream, proxy_process: ProcessFactory, client: aiohttp.ClientSession
) -> None:
    """50 MB through an unprotected GET and a protected POST: the proxy's memory stays flat."""
    size = 50_000_000
    proxy = await proxy_process()
    assert (await post(client, proxy.url, "/big/100000", key("warm")))[0] == 200
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
