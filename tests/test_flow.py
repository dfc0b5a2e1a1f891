"""The behaviour table of DESIGN.md, row by row, over real sockets.

A real client talks to a running proxy in front of the counting upstream; every test
asserts what the client saw and how often the upstream executed the key.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.errors import PROBLEM_TYPE_PREFIX
from proxy.keys import scope_of, storage_key
from proxy.outcomes import RequestOutcome
from proxy.server import Running, serve
from proxy.store.base import Outcome
from proxy.store.memory import MemoryStore
from tests.conftest import ProxyFactory, Upstream, free_port, key, make_config
from tests.support.metrics import scrape, value
from tests.support.requests import assert_replayed_once, post, problem
from tests.support.waiting import wait_until


async def waiting(client: aiohttp.ClientSession, proxy: Running) -> bool:
    """Whether a retry waits at the proxy for a first attempt (on_concurrent: wait)."""
    return value(await scrape(client, proxy.admin_url), "idempotency_proxy_waiters") >= 1


async def recorded(client: aiohttp.ClientSession, proxy: Running) -> bool:
    """Whether the proxy's store holds a finished record and none in flight."""
    async with client.get(proxy.admin_url + "/admin/records") as response:
        return bool(await response.json() == {"in_flight": 0, "done": 1})


async def test_retry_replays_status_headers_and_body_byte_for_byte(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """A retry gets the first response unchanged plus Idempotent-Replayed; one execution."""
    proxy = await start_proxy(store={"url": store_url})
    first, second = await assert_replayed_once(
        client, upstream, proxy, "/v1/payments", b'{"amount": 100}', status=201
    )
    assert "Idempotent-Replayed" not in first[1]
    assert second[1]["Idempotent-Replayed"] == "true"
    replayed = [(n, v) for n, v in second[1].items() if n != "Idempotent-Replayed"]
    assert list(first[1].items()) == replayed
    assert second[1].getall("Set-Cookie") == ["a=1"]


async def test_key_header_and_forwarding_headers_reach_the_upstream(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The key is forwarded unchanged; hop-by-hop headers are dropped; X-Forwarded-* added."""
    proxy = await start_proxy()
    k = key("fw")
    await post(client, proxy, "/v1/x", b"{}", k, **{"X-Custom": "yes", "Keep-Alive": "5"})
    sent = upstream.headers[-1]
    assert sent["Idempotency-Key"] == k
    assert sent["X-Custom"] == "yes"
    assert "Keep-Alive" not in sent
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Forwarded-Proto"] == "http"
    assert sent["X-Forwarded-Host"].startswith("127.0.0.1:")


async def test_concurrent_duplicates_execute_once_and_the_rest_conflict(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """20 simultaneous duplicates against a slow upstream: one execution, 19 x 409 (reject)."""
    proxy = await start_proxy(store={"url": store_url}, defaults={"on_concurrent": "reject"})
    k = key("dup")
    # The first attempt is held at the upstream until the 19 others have had their answer.
    sent = [asyncio.ensure_future(post(client, proxy, "/hold/dup/pay", b"{}", k))
            for _ in range(20)]  # fmt: skip
    await wait_until(lambda: sum(task.done() for task in sent) == 19, what="19 answers")
    upstream.release("dup")
    results = await asyncio.gather(*sent)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] + [409] * 19
    for status, headers, body in results:
        if status == 409:
            assert headers["Retry-After"] == "1"
            assert headers["Content-Type"] == "application/problem+json"
            assert problem(body)["type"] == PROBLEM_TYPE_PREFIX + "key-in-use"
    assert upstream.executions(k) == 1


async def test_concurrent_duplicates_wait_and_get_the_same_response(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """With on_concurrent: wait (the default: not set here), all 20 duplicates get the first
    response; one execution."""
    proxy = await start_proxy(store={"url": store_url})
    k = key("wait")
    results = await asyncio.gather(
        *(post(client, proxy, "/delay/0.3/pay", b"{}", k) for _ in range(20))
    )
    assert {status for status, _, _ in results} == {201}
    assert len({body for _, _, body in results}) == 1
    assert sum(h.get("Idempotent-Replayed") == "true" for _, h, _ in results) == 19
    assert upstream.executions(k) == 1


async def test_waiting_gives_up_with_409_after_wait_timeout(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A waiter whose first attempt outlasts wait_timeout gets 409, not a second execution."""
    proxy = await start_proxy(defaults={"on_concurrent": "wait", "wait_timeout": "200ms"})
    k = key("slow")
    first = asyncio.ensure_future(post(client, proxy, "/hold/slow/pay", b"{}", k))
    await upstream.arrived(k)
    status, _, _ = await post(client, proxy, "/hold/slow/pay", b"{}", k)
    assert status == 409
    upstream.release("slow")
    assert (await first)[0] == 201
    assert upstream.executions(k) == 1


async def test_waiter_takes_over_a_released_key(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """When the first attempt is released (503), a waiter executes the request itself."""
    proxy = await start_proxy(defaults={"on_concurrent": "wait"})
    k = key("rel")
    first = asyncio.ensure_future(post(client, proxy, "/hold/first/status/503", b"{}", k))
    await upstream.arrived(k)
    waiter = asyncio.ensure_future(post(client, proxy, "/hold/first/status/503", b"{}", k))
    await wait_until(lambda: waiting(client, proxy), what="the retry waiting at the proxy")
    upstream.release("first")  # the gate stays open: the waiter's own attempt goes through
    second = await waiter
    assert (await first)[0] == 503
    assert second[0] == 503 and "Idempotent-Replayed" not in second[1]
    assert upstream.executions(k) == 2


@pytest.mark.parametrize(
    ("path", "body", "method"),
    [("/v1/pay", b'{"amount": 2}', "POST"), ("/v1/other", b'{"amount": 1}', "POST"),
     ("/v1/pay?x=1", b'{"amount": 1}', "POST"), ("/v1/pay", b'{"amount": 1}', "PATCH")],
)  # fmt: skip
async def test_same_key_for_another_request_is_422(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    path: str, body: bytes, method: str,
) -> None:  # fmt: skip
    """Another body, path, query or method under a used key: 422, upstream not called."""
    proxy = await start_proxy()
    k = key("mm")
    assert (await post(client, proxy, "/v1/pay", b'{"amount": 1}', k))[0] == 201
    async with client.request(method, proxy.url + path, data=body,
                              headers={"Idempotency-Key": k}) as response:  # fmt: skip
        assert response.status == 422
        assert problem(await response.read())["type"] == PROBLEM_TYPE_PREFIX + "key-mismatch"
    assert upstream.executions(k) == 1


@pytest.mark.parametrize(
    ("values", "why"),
    [([""], "empty"), (["x" * 256], "too long"), (["caf\u00e9"], "non-ASCII"),
     (["a\tb"], "control character"), (["a", "b"], "sent twice"), (['"abc'], "open quote")],
)  # fmt: skip
async def test_malformed_keys_are_400_even_where_keys_are_optional(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    values: list[str], why: str,
) -> None:  # fmt: skip
    """Empty, over-long, non-printable or repeated keys: 400 problem, upstream not called."""
    proxy = await start_proxy()
    headers = [("Idempotency-Key", value) for value in values]
    async with client.post(proxy.url + "/v1/pay", data=b"{}", headers=headers) as response:
        assert response.status == 400, why
        assert problem(await response.read())["type"] == PROBLEM_TYPE_PREFIX + "invalid-key"
    assert upstream.serial == 0


async def test_key_of_255_characters_is_accepted(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The length limit is inclusive: 255 characters pass, quotes not counted."""
    proxy = await start_proxy()
    assert (await post(client, proxy, "/v1/pay", b"{}", "k" * 255))[0] == 201
    assert (await post(client, proxy, "/v1/pay", b"{}", '"' + "q" * 255 + '"'))[0] == 201


async def test_quoted_and_bare_forms_are_the_same_key(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """`"abc"` (a Structured Field string) and `abc` name one key."""
    proxy = await start_proxy()
    k = key("q")
    first = await post(client, proxy, "/v1/pay", b"{}", f'"{k}"')
    second = await post(client, proxy, "/v1/pay", b"{}", k)
    assert second[1]["Idempotent-Replayed"] == "true" and first[2] == second[2]
    assert upstream.serial == 1


async def test_missing_key_is_400_when_required_and_forwarded_when_optional(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """require_key decides whether a keyless POST is refused or forwarded unprotected."""
    proxy = await start_proxy(routes=[
        {"path": "/strict/*", "require_key": True}, {"path": "/*"},
    ])  # fmt: skip
    status, _, body = await post(client, proxy, "/strict/pay")
    assert status == 400 and problem(body)["type"] == PROBLEM_TYPE_PREFIX + "missing-key"
    assert upstream.serial == 0
    assert (await post(client, proxy, "/loose/pay"))[0] == 201
    assert (await post(client, proxy, "/loose/pay"))[0] == 201
    assert upstream.serial == 2


async def test_same_key_under_two_tenants_executes_twice(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """Keys are scoped by Authorization: no replay across tenants."""
    proxy = await start_proxy(store={"url": store_url})
    k = key("tenant")
    alice = await post(client, proxy, "/v1/pay", b"{}", k, Authorization="Bearer alice")
    bob = await post(client, proxy, "/v1/pay", b"{}", k, Authorization="Bearer bob")
    assert alice[0] == bob[0] == 201 and alice[2] != bob[2]
    assert "Idempotent-Replayed" not in bob[1]
    again = await post(client, proxy, "/v1/pay", b"{}", k, Authorization="Bearer alice")
    assert again[2] == alice[2] and again[1]["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 2


@pytest.mark.parametrize("status", [429, 503])
async def test_release_statuses_are_returned_not_stored(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, status: int
) -> None:
    """429 and 503 reach the client and the retry executes again."""
    proxy = await start_proxy()
    k = key("rel")
    assert (await post(client, proxy, f"/status/{status}", b"{}", k))[0] == status
    second = await post(client, proxy, f"/status/{status}", b"{}", k)
    assert second[0] == status and "Idempotent-Replayed" not in second[1]
    assert upstream.executions(k) == 2


@pytest.mark.parametrize("status", [400, 404, 409, 422, 500, 502])
async def test_other_error_statuses_are_stored_and_replayed(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, status: int
) -> None:
    """4xx and 5xx other than the release statuses are terminal, as with Stripe."""
    proxy = await start_proxy()
    await assert_replayed_once(client, upstream, proxy, f"/status/{status}", status=status)


async def test_unreachable_upstream_is_502_and_released(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Connection refused: never delivered, so 502 and the retry tries again."""
    proxy = await start_proxy(upstream=f"http://127.0.0.1:{free_port()}")
    k = key("down")
    for _ in range(2):
        status, headers, body = await post(client, proxy, "/v1/pay", b"{}", k)
        assert status == 502 and "Idempotent-Replayed" not in headers
        assert problem(body)["type"] == PROBLEM_TYPE_PREFIX + "upstream-unreachable"


async def test_upstream_timeout_is_stored_as_unknown_outcome_under_reject(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A 504 after the request was sent is terminal: the retry replays it, no re-execution."""
    proxy = await start_proxy(defaults={"upstream_timeout": "200ms"})
    first, _ = await assert_replayed_once(client, upstream, proxy, "/delay/0.6/pay", status=504)
    assert problem(first[2])["type"] == PROBLEM_TYPE_PREFIX + "upstream-timeout"


async def test_upstream_timeout_is_released_under_retry(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """With on_unknown_outcome: retry, the timed-out key executes again on retry."""
    proxy = await start_proxy(defaults={"upstream_timeout": "200ms", "on_unknown_outcome": "retry"})
    k = key("to")
    assert (await post(client, proxy, "/delay/0.6/pay", b"{}", k))[0] == 504
    second = await post(client, proxy, "/delay/0.6/pay", b"{}", k)
    assert second[0] == 504 and "Idempotent-Replayed" not in second[1]
    assert upstream.executions(k) == 2


@pytest.mark.parametrize("path", ["/reset", "/truncate"])
async def test_dropped_connection_after_delivery_is_unknown_outcome(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, path: str
) -> None:
    """A reset or truncated answer may have acted: 502 stored, the retry replays it."""
    proxy = await start_proxy()
    first, _ = await assert_replayed_once(client, upstream, proxy, path, status=502)
    assert problem(first[2])["type"] == PROBLEM_TYPE_PREFIX + "upstream-disconnected"


async def test_client_that_gives_up_still_gets_its_result_recorded(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """The upstream exchange outlives a client timeout; the retry replays it."""
    proxy = await start_proxy(store={"url": store_url})
    k = key("gone")
    attempt = asyncio.ensure_future(post(client, proxy, "/hold/gone/pay", b"{}", k))
    await upstream.arrived(k)
    attempt.cancel()  # the client gives up while the upstream works
    with pytest.raises(asyncio.CancelledError):
        await attempt
    upstream.release("gone")
    await wait_until(lambda: recorded(client, proxy), what="the result recorded")
    status, headers, body = await post(client, proxy, "/hold/gone/pay", b"{}", k)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert json.loads(body)["serial"] == 1
    assert upstream.executions(k) == 1


async def test_slow_upstream_keeps_its_lock_across_lease_periods(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """Lease renewal: a retry during a 4-lease-long exchange conflicts, never re-executes."""
    proxy = await start_proxy(
        store={"url": store_url}, defaults={"lease": "150ms", "on_concurrent": "reject"}
    )
    k = key("renew")
    first = asyncio.ensure_future(post(client, proxy, "/hold/renew/pay", b"{}", k))
    await upstream.arrived(k)
    await asyncio.sleep(0.45)  # three lease periods pass while the upstream works
    assert (await post(client, proxy, "/hold/renew/pay", b"{}", k))[0] == 409
    upstream.release("renew")
    assert (await first)[0] == 201
    assert upstream.executions(k) == 1


async def test_request_body_over_the_limit_is_413(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An oversized protected request is refused without forwarding anything."""
    proxy = await start_proxy(defaults={"max_request_body": "1KiB"})
    status, _, body = await post(client, proxy, "/v1/pay", b"x" * 2048, key("big"))
    assert status == 413 and problem(body)["type"] == PROBLEM_TYPE_PREFIX + "body-too-large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * 512

    async with client.post(proxy.url + "/v1/pay", data=chunks(),
                           headers={"Idempotency-Key": key("chunked")}) as response:  # fmt: skip
        assert response.status == 413
    assert upstream.serial == 0


async def test_response_over_the_storage_limit_is_returned_once_then_not_replayable(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """The first client gets the whole large body; retries get a problem, not a re-execution."""
    proxy = await start_proxy(store={"url": store_url}, defaults={"max_stored_response": "1KiB"})
    k = key("large")
    first = await post(client, proxy, "/big/5000", b"{}", k)
    assert first[0] == 200 and first[2] == b"x" * 5000
    second = await post(client, proxy, "/big/5000", b"{}", k)
    assert second[0] == 409 and second[1]["Idempotent-Replayed"] == "true"
    assert problem(second[2])["type"] == PROBLEM_TYPE_PREFIX + "response-not-replayable"
    assert upstream.executions(k) == 1


async def test_unprotected_methods_stream_through_untouched(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """GET with a key is passed through: no store, every call executes, chunked preserved."""
    proxy = await start_proxy()
    k = key("get")
    for _ in range(2):
        async with client.get(proxy.url + "/stream/3", headers={"Idempotency-Key": k}) as r:
            assert r.status == 200 and await r.read() == b"chunk0;chunk1;chunk2;"
            assert "Idempotent-Replayed" not in r.headers
    assert upstream.executions(k) == 2


async def test_unrouted_paths_are_proxied_untouched(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A path no route matches is forwarded even with a malformed key."""
    proxy = await start_proxy(routes=[{"path": "/v1/*"}])
    status, _, _ = await post(client, proxy, "/other", b"{}", "")
    assert status == 201


async def test_store_unavailable_fails_closed_with_503(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """No store, fail_mode closed: 503 problem with Retry-After, upstream not called."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    proxy = await start_proxy(store={"url": url, "timeout": "200ms"})
    status, headers, body = await post(client, proxy, "/v1/pay", b"{}", key("s"))
    assert status == 503 and headers["Retry-After"] == "1"
    assert problem(body)["type"] == PROBLEM_TYPE_PREFIX + "store-unavailable"
    assert upstream.serial == 0
    async with client.get(proxy.admin_url + "/readyz") as response:
        assert response.status == 503


async def test_store_unavailable_fails_open_when_configured(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """fail_mode open forwards unprotected while the store is down."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    proxy = await start_proxy(store={"url": url, "fail_mode": "open", "timeout": "200ms"})
    k = key("open")
    assert (await post(client, proxy, "/v1/pay", b'{"a": 1}', k))[0] == 201
    assert (await post(client, proxy, "/v1/pay", b'{"a": 1}', k))[0] == 201
    assert upstream.executions(k) == 2
    assert upstream.bodies[-1] == b'{"a": 1}'


async def test_admin_listener_serves_health_readiness_and_metrics(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """/healthz, /readyz and /metrics answer; requests are counted by route and outcome."""
    proxy = await start_proxy()
    k = key("m")
    await post(client, proxy, "/v1/pay", b"{}", k)
    await post(client, proxy, "/v1/pay", b"{}", k)
    async with client.get(proxy.admin_url + "/healthz") as response:
        assert response.status == 200
    async with client.get(proxy.admin_url + "/readyz") as response:
        assert response.status == 200
    async with client.get(proxy.admin_url + "/metrics") as response:
        text = await response.text()
    assert 'idempotency_proxy_requests_total{method="POST",outcome="forwarded",route="all"}' in text
    assert 'idempotency_proxy_requests_total{method="POST",outcome="replayed",route="all"}' in text


async def test_an_upstream_that_cannot_be_connected_to_in_time_is_released(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Connecting stalls (accept queue full): 502 unreachable and released, not a stored 504."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue; later SYNs are dropped, connects stall
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}",
                                  defaults={"upstream_timeout": "600ms"})  # fmt: skip
        k = key("stall")
        for _ in range(2):
            status, headers, body = await post(client, proxy, "/v1/pay", b"{}", k)
            assert status == 502 and "Idempotent-Replayed" not in headers
            assert problem(body)["type"] == PROBLEM_TYPE_PREFIX + "upstream-unreachable"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_an_unprotected_request_whose_upstream_hangs_up_is_an_upstream_error(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Nothing is stored for a request without a key, so a dropped connection is counted as
    `upstream_error`, never as `unknown_outcome`."""
    proxy = await start_proxy()

    async def count(outcome: RequestOutcome) -> float:
        async with client.get(proxy.admin_url + "/metrics") as response:
            text = await response.text()
        series = (
            f'idempotency_proxy_requests_total{{method="POST",outcome="{outcome}",route="all"}}'
        )
        values = [line.split()[-1] for line in text.splitlines() if line.startswith(series)]
        return float(values[0]) if values else 0.0

    before = {o: await count(o) for o in (RequestOutcome.UPSTREAM_ERROR,
                                          RequestOutcome.UNKNOWN_OUTCOME)}  # fmt: skip
    async with client.post(proxy.url + "/reset", data=b"{}") as response:
        assert response.status == 502
        assert (
            problem(await response.read())["type"] == PROBLEM_TYPE_PREFIX + "upstream-disconnected"
        )
    assert await count(RequestOutcome.UPSTREAM_ERROR) == before[RequestOutcome.UPSTREAM_ERROR] + 1
    assert await count(RequestOutcome.UNKNOWN_OUTCOME) == before[RequestOutcome.UNKNOWN_OUTCOME]


class GatedCompletes(MemoryStore):
    """The embedded store, holding every `complete` until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def complete(self, key: str, token: str, outcome: Outcome, *, ttl: float,
                       tombstone: float = 0.0) -> bool:  # fmt: skip
        self.waiting.set()
        await self.gate.wait()
        return await super().complete(key, token, outcome, ttl=ttl, tombstone=tombstone)


async def test_the_answer_does_not_wait_for_the_result_to_be_recorded(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """One store round trip on the critical path: the first client has its answer while the
    complete is still pending; a retry meanwhile gets 409 (the lease guards the key), and
    once the result is recorded the retry replays it. The upstream executed once."""
    store = GatedCompletes()
    config = make_config(upstream.url, defaults={"on_concurrent": "reject"})
    async with serve(config, store) as proxy:
        k = key("early")
        first = await post(client, proxy, "/v1/pay", b"{}", k)
        assert first[0] == 201 and store.waiting.is_set() and not store.gate.is_set()
        # A retry comes on a connection of its own (the first one carries the first answer,
        # and aiohttp serves a connection's next request once the record is settled).
        async with aiohttp.ClientSession() as other:
            meanwhile = await post(other, proxy, "/v1/pay", b"{}", k)
        assert meanwhile[0] == 409
        assert problem(meanwhile[2])["type"] == PROBLEM_TYPE_PREFIX + "key-in-use"
        store.gate.set()
        record = storage_key("default", scope_of([("Authorization", ())]), k).store

        async def completed() -> bool:  # the complete that the gate held has run
            info = await store.inspect(record)
            return info is not None and info.state == "done"

        await wait_until(completed, what="the held complete", interval=0.001)
        replayed = await post(client, proxy, "/v1/pay", b"{}", k)
    assert replayed[0] == 201 and replayed[1].get("Idempotent-Replayed") == "true"
    assert replayed[2] == first[2]
    assert upstream.executions(k) == 1


@pytest.mark.parametrize("path", ["/x/../v1/pay", "//v1/pay", "/./v1/pay", "/v1/./pay"])
async def test_dot_segments_and_double_slashes_cannot_slip_past_a_route(
    path: str, start_proxy: ProxyFactory, client: aiohttp.ClientSession, upstream: Upstream
) -> None:
    """Routes match the path as an upstream that normalises it would read it: a request
    that names `/v1/pay` another way still meets the route that requires a key."""
    proxy = await start_proxy(routes=[{"path": "/v1/*", "id": "pay", "require_key": True},
                                      {"path": "/*", "id": "rest"}])  # fmt: skip
    async with client.post(proxy.url + path, data=b"{}") as response:
        assert response.status == 400
        assert problem(await response.read())["type"] == PROBLEM_TYPE_PREFIX + "missing-key"
    assert upstream.serial == 0
