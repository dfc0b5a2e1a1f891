"""Fuzzing the proxy listener: the world the cases run in, and what every case must satisfy.

The behaviour tests send the hostile requests someone thought of; hypothesis thinks of more
(tests/fuzz_cases.py). A case is raw bytes on a raw socket (request targets, methods, header
fields, idempotency keys and body framing that no well-behaved client would send), or an
upstream answer with a header field the case chooses. Each case goes to a real proxy
process (or to a second one whose store is down), and then, whatever the answer:

- the proxy answered with well-formed HTTP/1.x responses, or closed the connection without
  a byte; it never answered 500 (an error its handler did not expect);
- no connection reached anything but the configured upstream: canary listeners on other
  loopback ports, which the generated targets name, were never connected to, and the
  upstream only ever saw origin-form targets;
- no key was left locked (the admin API counts no in-flight record once the exchange ended);
- the process is alive and a normal protected request still works;
- no secret reached the client: neither the upstream's credentials nor the store's password
  nor an internal host:port, nor words that only internals would say ("redis", "aiohttp",
  "Traceback"), unless the request itself carried them.

Symbolic ports (`{canary}`, `{upstream}`, ...) are written into the generated cases and
replaced by the real ones when a case is sent, so a minimal example reads the same on every
run. tests/test_fuzz.py runs each property for a bounded number of cases; bench/fuzz runs
the same properties for many more.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.internal.conjecture import engine

from tests.support.ports import free_port
from tests.support.proxies import ProxyProcess, start_process
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until_sync

T = TypeVar("T")

# Hypothesis caches what it learns from our source; never in the repository (and with no
# example database at all: see FUZZ_SETTINGS).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "idempotency-proxy-hypothesis")
# Shrinking a case that hangs costs ANSWER_TIMEOUT per step; hypothesis would go on for five
# minutes. A shorter search still ends on a small example, and within the test's timeout.
engine.MAX_SHRINKING_SECONDS = 30

# Every answer must be complete within this: the proxy is configured with a 100 ms body
# read timeout and a 1 s upstream timeout (and neither the upstream nor a canary ever makes
# it wait), so a case that takes longer hangs. Each hanging case, and each step of shrinking
# one, waits this long: generous for a loaded machine, short enough to shrink a hang.
ANSWER_TIMEOUT = 2.0
# A key the case left locked is still locked after this (the lease is 10 s).
SETTLE_TIMEOUT = 5.0
UPSTREAM_USER = "svc-fuzz"
UPSTREAM_SECRET = "upstream-secret-" + os.urandom(6).hex()
STORE_SECRET = "store-secret-" + os.urandom(6).hex()
# Said only by internals; matched case-insensitively.
INTERNAL_WORDS = (b"redis", b"aiohttp", b"traceback", b"yarl", b"multidict", b"errno")

# Shared by the default suite and bench/fuzz: deterministic, no database in the repo.
FUZZ_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "derandomize": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def fuzz_settings(max_examples: int, **overrides: Any) -> settings:
    return settings(max_examples=max_examples, **{**FUZZ_SETTINGS, **overrides})


# --- parsing what the proxy answered --------------------------------------------------

# aiohttp answers a request it cannot parse with an HTTP/1.0 status line.
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\t \x21-\x7e\x80-\xff]*\r\n")
# RFC 9110 5.1 and 5.5: a token, a colon, a value of visible characters, spaces and tabs.
_FIELD_LINE = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?)[ \t]*\r\n"
)
_SERVER_FIELD = re.compile(rb"(?im)^Server:[^\r\n]*\r\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[^\r\n]*)?\r\n")


class Malformed(AssertionError):
    """The proxy's answer is not well-formed HTTP/1.1."""


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


@dataclass
class Received:
    """Everything the proxy sent back on one connection, and how the connection ended."""

    data: bytes
    reset: bool = False
    timed_out: bool = False


def parse_responses(data: bytes, head: bool = False) -> tuple[list[Response], bytes]:
    """The complete responses at the start of `data`, and what follows them (a partial
    response, or nothing). Raises `Malformed` for anything that is not HTTP/1.1."""
    responses: list[Response] = []
    position = 0
    while position < len(data):
        start = position
        if not data.startswith(b"HTTP/1."[: len(data) - position], position):
            raise Malformed(f"not a status line at byte {position}: {data[position:][:80]!r}")
        line = _STATUS_LINE.match(data, position)
        if line is None:
            if b"\r\n" in data[position:]:
                raise Malformed(f"malformed status line: {data[position:][:80]!r}")
            return responses, data[start:]
        status = int(line.group(1))
        position = line.end()
        headers: list[tuple[bytes, bytes]] = []
        while not data.startswith(b"\r\n", position):
            field_line = _FIELD_LINE.match(data, position)
            if field_line is None:
                if b"\r\n" in data[position:]:
                    raise Malformed(f"malformed header field: {data[position:][:80]!r}")
                return responses, data[start:]
            headers.append((field_line.group(1), field_line.group(2)))
            position = field_line.end()
        position += 2
        framed = _body(data, position, status, headers, head)
        if framed is None:
            return responses, data[start:]
        body, position = framed
        responses.append(Response(status, headers, body))
    return responses, b""


def _body(data: bytes, position: int, status: int, headers: list[tuple[bytes, bytes]],
          head: bool) -> tuple[bytes, int] | None:  # fmt: skip
    """The body at `position` and where it ends; None if it is incomplete."""
    names = [name.lower() for name, _ in headers]
    lengths = [value for name, value in headers if name.lower() == b"content-length"]
    if head:  # no body, unless the server did not take the request as HEAD (a parse error)
        rest = data[position:]
        if lengths and lengths[0].isdigit() and int(lengths[0]) == len(rest) > 0:
            return rest, len(data)
        return b"", position
    if status < 200 or status in (204, 304):
        return b"", position
    if b"transfer-encoding" in names:
        if lengths:
            raise Malformed("both Content-Length and Transfer-Encoding in a response")
        codings = b",".join(v for n, v in headers if n.lower() == b"transfer-encoding")
        if codings.split(b",")[-1].strip().lower() != b"chunked":
            return data[position:], len(data)  # close-delimited
        return _chunks(data, position)
    if lengths:
        if len(lengths) > 1 or not lengths[0].isdigit():
            raise Malformed(f"Content-Length {lengths!r}")
        end = position + int(lengths[0])
        return (data[position:end], end) if end <= len(data) else None
    return data[position:], len(data)  # close-delimited


def _chunks(data: bytes, position: int) -> tuple[bytes, int] | None:
    parts = []
    while True:
        size = _CHUNK_SIZE.match(data, position)
        if size is None:
            if b"\r\n" in data[position:]:
                raise Malformed(f"malformed chunk size: {data[position:][:40]!r}")
            return None
        position = size.end()
        length = int(size.group(1), 16)
        if length == 0:
            break
        if len(data) < position + length + 2:
            return None
        if data[position + length : position + length + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        parts.append(data[position : position + length])
        position += length + 2
    while not data.startswith(b"\r\n", position):  # trailer fields
        trailer = _FIELD_LINE.match(data, position)
        if trailer is None:
            return None
        position = trailer.end()
    return b"".join(parts), position + 2


# --- the world around the proxy: upstream and canaries --------------------------------


class Listener:
    """An asyncio server that owns its connections, so that it can close every one."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, 0, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the proxy hung up or sent something odd: nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()


class Canary(Listener):
    """A loopback listener nothing should ever reach; it answers, so a leak is visible."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.heads: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(b"")
        index = len(self.heads) - 1
        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError):
            async with asyncio.timeout(1):
                self.heads[index] = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nCANARY")
        await writer.drain()


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class RawUpstream(Listener):
    """The legacy API, written byte by byte so that it can send what aiohttp's server would
    refuse to: `/hdr/<hex name>/<hex value>` adds that header field to the answer.

    It answers a fixed JSON body (never echoing the request, so nothing the client sent can
    come back and be mistaken for a leak): 201 to POST, 200 to anything else.
    """

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.seen: list[Seen] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            request_line, *lines = head[:-4].split(b"\r\n")
            method, target, _ = request_line.split(b" ", 2)
            headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(b":") for x in lines)]
            fields = {name.lower(): value for name, value in headers}
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                body = await _read_chunked(reader)
            else:
                body = await reader.readexactly(int(fields.get(b"content-length", b"0")))
            self.seen.append(Seen(method, target, headers, body))
            if not target.startswith(b"/"):  # refused (a 2xx would open a CONNECT tunnel)
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")  # fmt: skip
                return
            writer.write(self.answer(method, target, len(self.seen)))
            await writer.drain()
            if fields.get(b"connection", b"").lower() == b"close":
                return

    @staticmethod
    def answer(method: bytes, target: bytes, serial: int) -> bytes:
        extra = b""
        parts = target.split(b"?")[0].split(b"/")
        if len(parts) >= 4 and parts[1] == b"hdr":
            with contextlib.suppress(ValueError):
                extra = bytes.fromhex(parts[2].decode()) + b": "
                extra += bytes.fromhex(parts[3].decode()) + b"\r\n"
        body = b'{"serial": %d}' % serial
        status = b"201 Created" if method == b"POST" else b"200 OK"
        head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n")  # fmt: skip
        return head if method == b"HEAD" else head + body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
        pass
    return b"".join(parts)


class World:
    """An event loop on a thread of its own for the upstream and the canaries, so that the
    properties can be plain functions writing to blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-world")
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


# --- the fuzzer: a proxy process in that world ----------------------------------------


class Fuzzer:
    """A proxy process in front of the raw upstream, with canaries beside it, a redis-server
    with a password as its store, and credentials in its upstream URL: every case runs
    against this, and every property's checks read it."""

    def __init__(self, world: World, directory: Path, redis: RedisServer) -> None:
        self.world = world
        self.directory = directory
        self.redis = redis
        self.upstream = RawUpstream("127.0.0.1")
        self.canaries = {"{canary}": Canary("127.0.0.1"), "{canary2}": Canary("127.0.0.1"),
                         "{canary6}": Canary("::1")}  # fmt: skip
        self.process: ProxyProcess | None = None
        # A second proxy whose store never answers (nothing listens on its port): what it
        # says about its store must not leak either.
        self.dead_store_port = free_port()
        self.storeless: ProxyProcess | None = None
        self.restarts = 0

    def start(self) -> None:
        for listener in (self.upstream, *self.canaries.values()):
            self.world.call(listener.start())
        self.process, self.storeless = self.world.call(self._start_both())

    async def _start_both(self) -> tuple[ProxyProcess, ProxyProcess]:
        return await asyncio.gather(self._start(self.redis.url), self._start(self.dead_store_url))

    @property
    def dead_store_url(self) -> str:
        return f"redis://:{STORE_SECRET}@127.0.0.1:{self.dead_store_port}/0"

    async def _start(self, store_url: str) -> ProxyProcess:
        upstream = f"http://{UPSTREAM_USER}:{UPSTREAM_SECRET}@127.0.0.1:{self.upstream.port}"
        return await start_process(
            self.directory, upstream, store={"url": store_url}, body_read_timeout="100ms",
            routes=[{"path": "/*", "id": "all", "upstream_timeout": "1s"}],
        )  # fmt: skip

    @property
    def port(self) -> int:
        assert self.process is not None
        return _port(self.process.url)

    @property
    def admin_port(self) -> int:
        assert self.process is not None
        return _port(self.process.admin_url)

    def storeless_port(self) -> int:
        """The port of the proxy whose store is down (restarted if a case killed it)."""
        assert self.storeless is not None
        if not self.storeless.alive():
            self.restarts += 1
            self.storeless = self.world.call(self._start(self.dead_store_url))
        return _port(self.storeless.url)

    def stop(self) -> None:
        for process in (self.process, self.storeless):
            if process is not None:
                self.world.call(process.close())
        for listener in (self.upstream, *self.canaries.values()):
            self.world.call(listener.stop())

    def places(self) -> dict[bytes, bytes]:
        """What each symbolic port in a case stands for."""
        ports = {name: canary.port for name, canary in self.canaries.items()}
        ports["{upstream}"] = self.upstream.port
        return {name.encode(): str(port).encode() for name, port in ports.items()}

    def render(self, data: bytes) -> bytes:
        for name, port in self.places().items():
            data = data.replace(name, port)
        return data

    def secrets(self) -> list[bytes]:
        """What no answer may contain (unless the request itself carried it)."""
        basic = base64.b64encode(f"{UPSTREAM_USER}:{UPSTREAM_SECRET}".encode())
        return [UPSTREAM_SECRET.encode(), STORE_SECRET.encode(), basic,
                *(b"127.0.0.1:%d" % port
                  for port in (self.upstream.port, self.redis.port, self.dead_store_port)),
                *INTERNAL_WORDS]  # fmt: skip

    # --- one case --------------------------------------------------------------------

    def begin_case(self) -> Snapshot:
        """A fresh store and a live proxy for the next case (a case that killed the proxy
        has failed already; the next starts from a new process)."""
        assert self.process is not None
        if not self.process.alive():
            self.restarts += 1
            self.process = self.world.call(self._start(self.redis.url))
        reply = self.redis.command("FLUSHALL")
        assert reply.startswith(b"+OK"), reply
        return Snapshot(len(self.upstream.seen),
                        {name: len(c.heads) for name, c in self.canaries.items()})  # fmt: skip

    def exchange(self, data: bytes, head: bool = False, port: int | None = None,
                 timeout: float = ANSWER_TIMEOUT) -> Received:  # fmt: skip
        """Write `data` on a new connection (to the proxy, unless `port`); read until the
        proxy closes it or has sent a final response (after which aiohttp may linger,
        reading what is left of the body)."""
        received = b""
        deadline = time.monotonic() + timeout
        address = ("127.0.0.1", port or self.port)
        with socket.create_connection(address, timeout=timeout) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)  # the proxy may refuse (and close) before reading it all
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                except ConnectionResetError:
                    return Received(received, reset=True)
                if not chunk:
                    return Received(received)
                received += chunk
                with contextlib.suppress(Malformed):  # `answers` reports it
                    responses, rest = parse_responses(received, head)
                    if not rest and responses and responses[-1].status >= 200:
                        return Received(received)
        return Received(received, timed_out=True)

    def answers(self, sent: bytes, received: Received, *, head: bool = False,
                must_answer: bool = False) -> list[Response]:  # fmt: skip
        """The responses in `received`, checked: well-formed, complete, never a 500, no
        secret. An empty reply is a clean close, allowed unless `must_answer`."""
        responses, rest = parse_responses(received.data, head)
        if rest:
            how = "timed out" if received.timed_out else "closed"
            raise Malformed(f"the connection {how} in the middle of a response: {rest[:200]!r}")
        if not responses:
            assert not received.timed_out, f"no answer within {ANSWER_TIMEOUT}s"
            assert not must_answer, "the proxy closed the connection without answering"
        for response in responses:
            assert response.status != 500, f"500 from the proxy: {response.body[:300]!r}"
        # aiohttp names itself in `Server` on every answer; that is not a leak of this case.
        said = _SERVER_FIELD.sub(b"", received.data).lower()
        asked = sent.lower()
        for secret in self.secrets():
            if secret.lower() not in asked:
                assert secret.lower() not in said, (
                    f"the answer contains {secret!r}: {received.data[:600]!r}"
                )
        return responses

    def settle(self, before: Snapshot) -> None:
        """The checks after every case: nothing reached a canary, the upstream saw only
        origin-form targets, no key is left locked, and the proxy still serves."""
        self.reached_only_the_upstream(before)
        wait_until_sync(lambda: self.records()["in_flight"] == 0, SETTLE_TIMEOUT,
                        lambda: f"a key is left locked: {self.records()}", 0.01)  # fmt: skip
        assert self.process is not None and self.process.alive(), "proxy died"
        assert self.normal_request() == 201, "a normal request failed after the case"

    def reached_only_the_upstream(self, before: Snapshot) -> None:
        for name, canary in self.canaries.items():
            reached = canary.heads[before.canaries[name] :]
            assert not reached, f"a connection reached the canary {name}: {reached[:3]!r}"
        for seen in self.upstream.seen[before.upstream :]:
            assert seen.target.startswith(b"/"), f"the upstream got target {seen.target!r}"

    def records(self) -> dict[str, int]:
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            connection.request("GET", "/admin/records")
            response = connection.getresponse()
            assert response.status == 200, response.status
            counts: dict[str, int] = json.loads(response.read())
            return counts
        finally:
            connection.close()

    def normal_request(self) -> int:
        request = (b"POST /v1/pay HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: normal-"
                   + os.urandom(8).hex().encode() + b"\r\nContent-Length: 2\r\n"
                   b"Connection: close\r\n\r\n{}")  # fmt: skip
        responses, _ = parse_responses(self.exchange(request).data)
        return responses[0].status if responses else 0


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class Snapshot:
    upstream: int
    canaries: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def running_fuzzer() -> Iterator[Fuzzer]:
    """A started `Fuzzer` with its own redis-server, world thread and temp directory."""
    world = World()
    directory = Path(tempfile.mkdtemp(prefix="fuzz-"))
    redis = RedisServer(directory / "redis", password=STORE_SECRET)
    fuzzer = Fuzzer(world, directory, redis)
    try:
        redis.start()
        fuzzer.start()
        yield fuzzer
    finally:
        try:
            fuzzer.stop()
        finally:
            redis.kill()
            world.close()
            shutil.rmtree(directory, ignore_errors=True)
