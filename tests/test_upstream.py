"""The upstream boundary: header rules (on requests built by aiohttp's own test helper), and
over real sockets, which request targets reach the upstream and what of its answer is sent."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream import request_headers, response_headers, sendable, translate
from tests.conftest import ProxyFactory, Upstream, free_port, key
from tests.support.raw_http import exchange, request


def test_headers_named_in_connection_are_not_forwarded() -> None:
    """Connection-listed, hop-by-hop and (when re-framed) length headers stay behind."""
    request = make_mocked_request("POST", "/pay", headers=CIMultiDict([
        ("Host", "api.example"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
        ("TE", "trailers"), ("Content-Length", "2"), ("X-Keep", "yes"),
        ("X-Forwarded-For", "10.0.0.1"),
    ]))  # fmt: skip
    sent = request_headers(request, keep_length=False)
    assert "X-Hop" not in sent and "TE" not in sent and "Connection" not in sent
    assert "Content-Length" not in sent
    assert sent["X-Keep"] == "yes"
    assert sent["X-Forwarded-Host"] == "api.example"
    assert sent["X-Forwarded-For"].startswith("10.0.0.1, ")
    assert request_headers(request, keep_length=True)["Content-Length"] == "2"


def test_response_keeps_repeated_headers_and_gains_a_date() -> None:
    """Set-Cookie twice stays twice; an answer without Date gets one to replay."""
    upstream = CIMultiDictProxy(CIMultiDict([
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Connection", "close, X-Drop"),
        ("X-Drop", "x"), ("Content-Length", "5"),
    ]))  # fmt: skip
    pairs = response_headers(upstream, keep_length=False)
    names = [name for name, _ in pairs]
    assert names.count("Set-Cookie") == 2
    assert "X-Drop" not in names and "Content-Length" not in names
    assert "Date" in names


def test_only_fields_the_server_can_write_are_sendable() -> None:
    """Token names and values without control characters; obs-text and tabs are fine."""
    assert sendable("X-Ok", "a b\tc\u00e9")
    for name, value in [("X-Bad", "a\x01b"), ("X-Del", "\x7f"), ("X-Nl", "a\nb"),
                        ("Bad Name", "v"), ("", "v"), ("X-Surrogate", "\udcff")]:  # fmt: skip
        assert not sendable(name, value), (name, value)


# --- over real sockets: what a client's request target and an upstream's answer can do ---


@dataclass
class Canary:
    """A listener that must never be reached: it counts the connections it accepts."""

    port: int = 0
    connections: int = 0


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    seen = Canary()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ncanary")
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    seen.port = server.sockets[0].getsockname()[1]
    yield seen
    server.close()
    await server.wait_closed()


async def test_connect_and_other_target_forms_are_refused_and_reach_nothing(
    start_proxy: ProxyFactory, upstream: Upstream, canary: Canary
) -> None:
    """CONNECT gets 501, `*` and authority-form 400: nothing is sent anywhere."""
    host, port = upstream.url.removeprefix("http://").split(":")
    proxy = await start_proxy(upstream=f"http://svc:secret@{host}:{port}")
    cases = [
        ("CONNECT", f"x:@127.0.0.1:{canary.port}", 501, "method-not-implemented"),
        ("CONNECT", "a.b:9090", 501, "method-not-implemented"),
        ("OPTIONS", "*", 400, "invalid-target"),
    ]
    for method, target, status, problem in cases:
        answer = await exchange(proxy, request(method, target, [("Content-Length", "0")]))
        assert answer.status == status, (method, target)
        assert answer.problem_type() == problem
        assert b"secret" not in answer.body and port.encode() not in answer.body
    assert canary.connections == 0
    assert upstream.serial == 0


async def test_absolute_form_is_forwarded_by_its_path_to_the_configured_upstream_only(
    start_proxy: ProxyFactory, upstream: Upstream, canary: Canary
) -> None:
    """The client's scheme, userinfo and authority never choose where the proxy connects."""
    proxy = await start_proxy()
    seen = []
    for target in (f"http://x:@127.0.0.1:{canary.port}/v1/pay?a=1",
                   f"http://127.0.0.1:{canary.port}//127.0.0.1:{canary.port}/x"):  # fmt: skip
        answer = await exchange(proxy, request("POST", target, [("Content-Length", "0")]))
        assert answer.status == 201
        seen.append(json.loads(answer.body)["path"])  # the counting upstream echoes its path
    assert canary.connections == 0
    assert seen[0] == "/v1/pay?a=1"
    assert upstream.serial == 2


async def test_transfer_codings_other_than_chunked_are_refused(
    start_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """`gzip, chunked` would reach the upstream as compressed bytes: 501, connection closed."""
    proxy = await start_proxy()
    for coding in ("gzip, chunked", "identity, chunked"):
        headers = [("Transfer-Encoding", coding), ("Idempotency-Key", key("te"))]
        data = request("POST", "/v1/pay", headers, b"0\r\n\r\n")
        answer = await exchange(proxy, data)
        assert answer.status == 501
        assert answer.problem_type() == "transfer-coding-not-implemented"
        assert answer.headers.get("Connection", "").lower() == "close"
    assert upstream.serial == 0


async def test_problem_bodies_name_no_internal_address_but_a_request_id(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The 502 for an unreachable upstream and the 503 for a dead store say what to do,
    with a request id, and never the host or port behind them."""
    closed, dead_store = free_port(), free_port()
    proxy = await start_proxy(
        upstream=f"http://127.0.0.1:{closed}",
        store={"url": f"redis://:hunter2@127.0.0.1:{dead_store}/0", "timeout": "200ms"},
        routes=[{"path": "/memory/*", "id": "m"}, {"path": "/*", "id": "all"}],
    )
    async with client.post(proxy.url + "/v1/pay", data=b"{}",
                           headers={"Idempotency-Key": key("s")}) as response:  # fmt: skip
        assert response.status == 503
        problem = await response.json()
    async with client.post(proxy.url + "/x", data=b"{}") as response:  # unprotected: no store
        assert response.status == 502
        unreachable = await response.json()
    for body in (problem, unreachable):
        text = json.dumps(body)
        assert str(closed) not in text and str(dead_store) not in text
        assert "127.0.0.1" not in text and "hunter2" not in text and "redis" not in text.lower()
        assert body["request_id"]


async def test_a_header_the_proxy_cannot_send_is_dropped_for_the_first_client_and_replays(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An upstream header with a control character is never stored: the first answer and
    its replay are the same, without that field, and the upstream executed once."""
    executions = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal executions
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        executions += 1
        writer.write(b"HTTP/1.1 201 Cre\x01ated\r\nContent-Length: 2\r\nX-Ok: yes\r\n"
                     b"X-Bad: a\x01b\r\nX-Del: \x7f\r\nConnection: close\r\n\r\nok")  # fmt: skip
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}")
        k = key("ctl")
        seen = []
        for _ in range(2):
            async with client.post(proxy.url + "/v1/pay", data=b"{}",
                                   headers={"Idempotency-Key": k}) as response:  # fmt: skip
                seen.append((response.status, await response.read(),
                             response.headers.get("X-Ok"), "X-Bad" in response.headers,
                             "X-Del" in response.headers,
                             response.headers.get("Idempotent-Replayed")))  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [(201, b"ok", "yes", False, False, None),
                    (201, b"ok", "yes", False, False, "true")]  # fmt: skip
    assert executions == 1


async def test_requests_spaced_around_the_upstream_idle_timeout_are_never_outcome_unknown(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """An upstream that closes idle connections after 2 s (gunicorn's default) never has a
    POST sent on a connection it is closing: the default keepalive_timeout is shorter."""
    executions = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal executions
        executions += 1
        return web.Response(status=201, text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=2.0)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}")
        statuses = []
        for gap in (0.0, 1.98, 2.0, 2.02):  # the scenario itself, not an ordering
            await asyncio.sleep(gap)
            async with client.post(proxy.url + "/v1/pay", data=b"{}",
                                   headers={"Idempotency-Key": key("ka")}) as response:  # fmt: skip
                statuses.append(response.status)
    finally:
        await runner.cleanup()
    assert statuses == [201, 201, 201, 201]
    assert executions == 4


async def test_upstream_credentials_and_a_clients_authorization_do_not_collide(
    start_proxy: ProxyFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """An upstream URL with credentials sends them as Basic auth, unless the client sent an
    Authorization of its own (the tenant's), which is forwarded as it is: never a 500."""
    host_port = upstream.url.removeprefix("http://")
    proxy = await start_proxy(upstream=f"http://svc:s3cret@{host_port}")
    tenant = {"Authorization": "Bearer tenant-a"}
    for headers in (tenant, {}):
        for idem in (key("auth"), None):  # protected, and passed through
            sent = dict(headers) | ({"Idempotency-Key": idem} if idem else {})
            async with client.post(proxy.url + "/v1/pay", data=b"{}", headers=sent) as response:
                assert response.status == 201
    seen = [h.get("Authorization") for h in upstream.headers]
    basic = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    assert seen == ["Bearer tenant-a", "Bearer tenant-a", basic, basic]


async def test_requests_that_are_not_http_1_are_closed_unanswered(
    start_proxy: ProxyFactory, upstream: Upstream
) -> None:
    """HTTP/0.9 and a textual HTTP/2.0 request could not read an HTTP/1.x answer: the
    connection is closed without one, and nothing is forwarded."""
    proxy = await start_proxy()
    for data in (b"GET /v1/x\r\n\r\n", b"GET /v1/x HTTP/2.0\r\nHost: a\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(data)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert upstream.serial == 0


def test_an_upstream_error_detail_quotes_no_credentials() -> None:
    """aiohttp's errors can quote the request URL and headers; the detail that reaches the
    log masks the URL's password and leaves the headers out."""
    url = URL("http://svc:s3cret@127.0.0.1:9/pay")
    info = aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict(
        {"Authorization": "Basic c3ZjOnMzY3JldA=="})), url)  # fmt: skip
    error = translate(aiohttp.ClientResponseError(info, (), status=400, message="bad"), url)
    assert "s3cret" not in error.detail and "c3ZjOnMzY3JldA" not in error.detail
    assert "ClientResponseError" in error.detail


async def test_an_encoded_request_body_reaches_the_upstream_as_the_client_sent_it(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A gzip body is forwarded byte for byte with its Content-Length: decoded, it no longer
    matched that length and the upstream read the next request as the rest of the body."""
    seen: list[tuple[bytes, bytes]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append((head.split(b" ")[1], await reader.readexactly(length)))
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = gzip.compress(os.urandom(40))  # compressed, longer than what it decodes to
    try:
        proxy = await start_proxy(upstream=f"http://127.0.0.1:{port}")
        for headers in ({"Idempotency-Key": key("gz")}, {}):  # protected, and passed through
            headers = headers | {"Content-Encoding": "gzip"}
            async with client.post(proxy.url + "/v1/pay", data=body, headers=headers) as reply:
                assert reply.status == 201
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [(b"/v1/pay", body), (b"/v1/pay", body)]


async def test_a_client_that_does_not_read_its_answer_does_not_hold_the_key(
    start_proxy: ProxyFactory, upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    """The result is recorded while the answer waits for a client that stopped reading: a
    retry on another connection gets the replay, not 409 for as long as the socket stays."""
    proxy = await start_proxy(defaults={"on_concurrent": "reject"})
    k = key("stall")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, never read
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.port))
    stalled = (f"POST /big/900000 HTTP/1.1\r\nHost: a\r\nIdempotency-Key: {k}\r\n"
               "Content-Length: 2\r\n\r\n{}").encode()  # fmt: skip
    await asyncio.get_running_loop().sock_sendall(sock, stalled)
    try:
        for _ in range(500):  # until the result is recorded (409 while it is not)
            async with client.post(proxy.url + "/big/900000", data=b"{}",
                                   headers={"Idempotency-Key": k}) as response:  # fmt: skip
                status, replayed = response.status, response.headers.get("Idempotent-Replayed")
                await response.read()
            if status != 409:
                break
            await asyncio.sleep(0.01)
        assert (status, replayed) == (200, "true")
        assert upstream.executions(k) == 1
    finally:
        sock.close()
