"""Hostile or broken requests, written byte by byte on raw sockets.

aiohttp's client refuses to send most of these (bad framing, raw 0xff in a header, a body
that stops half way), so each test writes the request itself. After every one, the proxy
must still serve a normal protected request, and a key the hostile request carried must
not be left locked: its retry gets a definite answer, never 409 forever.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.server import Running
from tests.conftest import ProxyFactory, Upstream, key
from tests.support.proxies import start_process
from tests.support.raw_http import RawConnection, exchange, request
from tests.support.requests import assert_replayed_once


async def still_serves(client: aiohttp.ClientSession, proxy: Running, upstream: Upstream,
                       idem: str | None = None) -> None:  # fmt: skip
    """A normal protected request executes once and its retry replays.

    With `idem`, the key a hostile request carried: it must not have been left locked.
    """
    await assert_replayed_once(client, upstream, proxy, "/v1/pay", b'{"n": 1}', idem, status=201)


# --- bodies ---------------------------------------------------------------------------


async def test_declared_body_over_the_limit_is_refused_before_it_arrives(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Content-Length 100 MB with 1 KB sent: 413 problem at once, nothing forwarded."""
    proxy = await start_proxy()
    k = key("huge")
    started = time.monotonic()
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", "100000000"),
    ], b"x" * 1000))  # fmt: skip
    assert time.monotonic() - started < 0.5
    assert response.status == 413 and response.problem_type() == "body-too-large"
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


async def test_body_that_stalls_is_408_after_body_read_timeout(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Half a body, then silence: 408 problem after body_read_timeout; the key stays free."""
    proxy = await start_proxy(body_read_timeout="300ms")
    k = key("slow")
    started = time.monotonic()
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", "100"),
    ], b"x" * 50))  # fmt: skip
    assert 0.25 < time.monotonic() - started < 1.0
    assert response.status == 408 and response.problem_type() == "body-timeout"
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


async def test_chunked_and_plain_bodies_are_one_request(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The fingerprint is taken over the de-chunked body: a plain retry replays a chunked first."""
    proxy = await start_proxy()
    k = key("chunked")
    body = b'{"amount": 100, "currency": "EUR"}'
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part)
                       for part in (body[:7], body[7:20], body[20:])) + b"0\r\n\r\n"  # fmt: skip
    first = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Transfer-Encoding", "chunked"),
    ], chunked))  # fmt: skip
    assert first.status == 201 and upstream.bodies[-1] == body
    second = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", str(len(body))),
    ], body))  # fmt: skip
    assert second.status == 201 and second.headers["Idempotent-Replayed"] == "true"
    assert second.body == first.body
    assert upstream.executions(k) == 1


@pytest.mark.parametrize(
    ("headers", "body"),
    [([("Transfer-Encoding", "chunked")], b"zz\r\nhello\r\n0\r\n\r\n"),
     ([("Transfer-Encoding", "chunked")], b"5\r\nhello!!\r\n0\r\n\r\n"),
     ([("Transfer-Encoding", "chunked"), ("Content-Length", "2")], b"2\r\n{}\r\n0\r\n\r\n"),
     ([("Content-Length", "2"), ("Content-Length", "3")], b"{}x"),
     ([("Content-Length", "-1")], b"{}"),
     ([("Content-Length", "0x2")], b"{}")],
    ids=["bad-chunk-size", "chunk-overrun", "te-and-cl", "two-lengths", "negative", "hex-length"],
)  # fmt: skip
async def test_malformed_framing_is_400_from_the_parser(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    headers: list[tuple[str, str]], body: bytes,
) -> None:  # fmt: skip
    """Broken chunking or contradictory lengths: 400 before the flow runs, nothing forwarded."""
    proxy = await start_proxy()
    k = key("framing")
    response = await exchange(proxy, request("POST", "/v1/pay",
                                             [("Idempotency-Key", k), *headers], body))  # fmt: skip
    assert response.status == 400
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


async def test_malformed_chunk_after_the_first_is_cut_off_by_body_read_timeout(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A bad chunk mid-body never reaches the handler as an error; the body timeout ends it."""
    proxy = await start_proxy(body_read_timeout="300ms")
    k = key("midchunk")
    connection = await RawConnection.open(proxy)
    try:
        await connection.send(request("POST", "/v1/pay", [
            ("Idempotency-Key", k), ("Transfer-Encoding", "chunked"),
        ], b"5\r\nhello\r\n"))  # fmt: skip
        await asyncio.sleep(0.05)
        await connection.send(b"zz\r\nhello\r\n0\r\n\r\n")
        response = await connection.read_response()
    finally:
        await connection.close()
    assert response.status == 408 and response.problem_type() == "body-timeout"
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


async def test_streamed_body_that_stalls_is_cut_off(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An unprotected PUT whose body stops half way does not hold the upstream forever."""
    proxy = await start_proxy(body_read_timeout="300ms")
    connection = await RawConnection.open(proxy)
    try:
        await connection.send(request("PUT", "/v1/doc", [("Content-Length", "100")], b"x" * 50))
        response = await connection.read_response(timeout=1.5)
    finally:
        await connection.close()
    assert response.status == 408 and response.problem_type() == "body-timeout"
    await still_serves(client, proxy, upstream)


async def test_invalid_utf8_in_the_body_is_forwarded_and_replayed_byte_for_byte(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Bodies are bytes: invalid UTF-8 and NULs are fingerprinted and forwarded unchanged."""
    proxy = await start_proxy()
    k = key("bytes")
    body = b"\xff\xfe\x00{\xc3\x28"
    answers = [await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", str(len(body))),
    ], body)) for _ in range(2)]  # fmt: skip
    assert upstream.bodies == [body]
    assert answers[0].status == answers[1].status == 201
    assert answers[1].body == answers[0].body
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    other = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", str(len(body))),
    ], body[:-1] + b"\x29"))  # fmt: skip
    assert other.status == 422 and other.problem_type() == "key-mismatch"
    assert upstream.executions(k) == 1


# --- Expect: 100-continue -------------------------------------------------------------


async def test_expect_100_continue_gets_the_interim_then_the_final_response(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A protected request sent with Expect: 100-continue works, and so does its replay."""
    proxy = await start_proxy()
    k = key("expect")
    answers = []
    for _ in range(2):
        connection = await RawConnection.open(proxy)
        try:
            await connection.send(request("POST", "/v1/pay", [
                ("Idempotency-Key", k), ("Expect", "100-continue"), ("Content-Length", "2"),
            ]))  # fmt: skip
            async with asyncio.timeout(1):
                assert await connection.reader.readuntil(b"\r\n\r\n") == (
                    b"HTTP/1.1 100 Continue\r\n\r\n"
                )
            await connection.send(b"{}")
            answers.append(await connection.read_response())
        finally:
            await connection.close()
    assert answers[0].status == answers[1].status == 201
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert "Expect" not in upstream.headers[0]
    assert upstream.executions(k) == 1


async def test_expect_100_continue_with_an_oversized_body_gets_413_without_100(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A client that asks first is told 413 before it sends a body it would waste."""
    proxy = await start_proxy()
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", key("expect")), ("Expect", "100-continue"),
        ("Content-Length", "100000000"),
    ]))  # fmt: skip
    assert response.status == 413 and response.problem_type() == "body-too-large"
    assert response.interim == []


# --- keys and headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_key", "problem"),
    [(b"ab\xffcd", True), (b"\xc3\xa9t\xc3\xa9", True), (b"ab\x7fcd", False),
     (b"ab\x01cd", False), (b"ab\x00cd", False), (b"ab\rcd", False)],
    ids=["invalid-utf8", "utf8", "del", "control", "nul", "bare-cr"],
)  # fmt: skip
async def test_keys_with_control_or_non_ascii_bytes_are_400(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    raw_key: bytes, problem: bool,
) -> None:  # fmt: skip
    """Raw bytes in the key: 400 (the proxy's problem, or the parser's for control bytes)."""
    proxy = await start_proxy()
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", raw_key), ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert response.status == 400
    if problem:
        assert response.problem_type() == "invalid-key"
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream)


async def test_duplicated_key_header_is_400_even_with_equal_values(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Two key lines, even identical ones or differently cased names, are ambiguous: 400."""
    proxy = await start_proxy()
    k = key("twice")
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("idempotency-key", k), ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert response.status == 400 and response.problem_type() == "invalid-key"
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


async def test_raw_bytes_in_the_scope_header_still_separate_tenants(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Authorization values that are not UTF-8 still scope keys: two tenants, two executions."""
    proxy = await start_proxy()
    k = key("tenant")
    for token in (b"Bearer \xff", b"Bearer \xfe", b"Bearer \xff"):
        response = await exchange(proxy, request("POST", "/v1/pay", [
            ("Idempotency-Key", k), ("Authorization", token), ("Content-Length", "2"),
        ], b"{}"))  # fmt: skip
        assert response.status == 201
    assert response.headers["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 2


@pytest.mark.parametrize(
    "headers",
    [[(f"X-Filler-{i}", "v") for i in range(200)], [("X-Large", "v" * 16384)],
     [("Idempotency-Key", "k" * 16384)]],
    ids=["200-headers", "16KiB-header", "16KiB-key"],
)  # fmt: skip
async def test_too_many_or_too_large_headers_are_refused(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    headers: list[tuple[str, str]],
) -> None:  # fmt: skip
    """aiohttp's header limits (128 lines, 8190 bytes) answer 400; the proxy keeps serving."""
    proxy = await start_proxy()
    k = key("headers")
    response = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), *headers, ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert response.status in (400, 431)
    assert upstream.serial == 0
    await still_serves(client, proxy, upstream, idem=k)


# --- request targets ------------------------------------------------------------------


async def test_invalid_utf8_in_the_path(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A raw 0xff in the path is a parser 400; percent-encoded, it is forwarded as sent."""
    proxy = await start_proxy()
    k = key("path")
    raw = await exchange(proxy, request("POST", "/v1/pay/\xff", [
        ("Idempotency-Key", k), ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert raw.status == 400 and upstream.serial == 0

    answers = [await exchange(proxy, request("POST", "/v1/pay/%ff%fe?q=%c3%28", [
        ("Idempotency-Key", k), ("Content-Length", "2"),
    ], b"{}")) for _ in range(2)]  # fmt: skip
    assert answers[0].status == 201
    assert json.loads(answers[0].body)["path"] == "/v1/pay/%ff%fe?q=%c3%28"
    assert answers[1].headers["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1


async def test_absolute_form_target_goes_to_the_configured_upstream(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """`POST http://host/path` (RFC 9112 absolute-form) is forwarded as /path, never elsewhere."""
    proxy = await start_proxy()
    k = key("absolute")
    response = await exchange(proxy, request("POST", "http://elsewhere.invalid/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert response.status == 201
    assert json.loads(response.body)["path"] == "/v1/pay"
    origin_form = await exchange(proxy, request("POST", "/v1/pay", [
        ("Idempotency-Key", k), ("Content-Length", "2"),
    ], b"{}"))  # fmt: skip
    assert origin_form.headers["Idempotent-Replayed"] == "true"
    assert upstream.executions(k) == 1
    await still_serves(client, proxy, upstream)


async def test_pipelined_duplicates_on_one_connection_execute_once(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Three copies of one keyed request in one write: answered in order, executed once."""
    proxy = await start_proxy()
    k = key("pipelined")
    one = request("POST", "/v1/pay", [("Idempotency-Key", k), ("Content-Length", "2")], b"{}")
    connection = await RawConnection.open(proxy)
    try:
        await connection.send(one * 3)
        answers = [await connection.read_response() for _ in range(3)]
    finally:
        await connection.close()
    assert [a.status for a in answers] == [201, 201, 201]
    assert [a.headers.get("Idempotent-Replayed") for a in answers] == [None, "true", "true"]
    assert len({a.body for a in answers}) == 1
    assert upstream.executions(k) == 1


async def test_malformed_requests_leave_only_json_lines_in_the_log(
    upstream: Upstream, tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """A client's broken request is logged as one JSON line, never as a multi-line traceback."""
    running = await start_process(tmp_path, upstream.url)
    try:
        port = int(running.url.rsplit(":", 1)[1])
        for data in (
            request("POST", "/v1/pay", [("Idempotency-Key", b"a\x01")]),
            request("POST", "/v1/pay", [("Transfer-Encoding", "chunked")], b"zz\r\n"),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            assert b" 400 " in await reader.readline()
            writer.close()
            await writer.wait_closed()
        k = key("after")
        async with client.post(running.url + "/v1/pay", data=b"{}",
                               headers={"Idempotency-Key": k}) as response:  # fmt: skip
            assert response.status == 201
    finally:
        await running.close()
    lines = running.log_path.read_text().splitlines()
    not_json = [line for line in lines if not line.startswith("{")]
    assert not_json == [], "\n".join(not_json[:5])
