"""Real things for the tests: a counting upstream, a redis-server, a running proxy.

Nothing of ours is mocked. The upstream plays the legacy API on a free loopback port and
counts how often each idempotency key reached it; the behaviour of each request is chosen
by the request itself (`/delay/0.5`, `/status/503`, `/reset`, ...), so one upstream serves
every test. The redis-server is the test's own, on a free port, so a test may stop it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config, parse_config
from proxy.server import Running, serve

# Sentinel groups and Clusters, for the tests that need a Redis topology.
pytest_plugins = ["tests.sentinel_and_cluster"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the counting upstream ------------------------------------------------------------


@dataclass
class Upstream:
    """The legacy API: counts executions per key, behaves as each path asks."""

    url: str = ""
    calls: Counter[str] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    serial: int = 0

    def executions(self, key: str) -> int:
        return self.calls[key]


UPSTREAM_STATE = web.AppKey("upstream_state", Upstream)


async def _upstream_handler(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    body = await request.read()
    key = request.headers.get("Idempotency-Key", "")
    state.calls[key] += 1
    state.serial += 1
    state.bodies.append(body)
    state.headers.append(dict(request.headers))
    serial = state.serial
    parts = [p for p in request.path.split("/") if p]
    # /delay/<seconds>/... sleeps first, then handles the rest of the path.
    while len(parts) >= 2 and parts[0] == "delay":
        await asyncio.sleep(float(parts[1]))
        parts = parts[2:]
    action = parts[0] if parts else ""
    if action == "status":
        return web.json_response({"serial": serial, "status": int(parts[1])}, status=int(parts[1]))
    if action == "reset":  # drop the connection without an answer
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()
    if action == "truncate":  # promise 1000 bytes, send 10, hang up
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"0123456789")
        assert request.transport is not None
        request.transport.abort()
        return response
    if action == "big":
        size = int(parts[1])
        return web.Response(body=b"x" * size, headers={"X-Serial": str(serial)})
    if action == "stream":  # chunked, no Content-Length
        response = web.StreamResponse(headers={"X-Serial": str(serial)})
        await response.prepare(request)
        for index in range(int(parts[1]) if len(parts) > 1 else 3):
            await response.write(f"chunk{index};".encode())
        await response.write_eof()
        return response
    return web.json_response(
        {"serial": serial, "method": request.method, "path": request.path_qs,
         "body": body.decode("utf-8", "replace")},
        status=201 if request.method == "POST" else 200,
        headers={"X-Serial": str(serial), "Set-Cookie": "a=1"},
    )  # fmt: skip


@asynccontextmanager
async def serve_app(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], key: web.AppKey[Any],
    state: Any,
) -> AsyncIterator[str]:  # fmt: skip
    """Serve `handler` for every method and path on a free loopback port, with `state` under
    `key` in the app, for the block; yields its URL."""
    app = web.Application()
    app[key] = state
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    async with serve_app(_upstream_handler, UPSTREAM_STATE, state) as url:
        state.url = url
        yield state


# --- redis-server ---------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of the test session's own; it can be stopped, paused and restarted."""

    port: int
    directory: str
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)  # appended to the command line
    password: str = ""  # set: the server requires AUTH (requirepass), and `url` carries it

    @property
    def url(self) -> str:
        userinfo = f":{self.password}@" if self.password else ""
        return f"redis://{userinfo}127.0.0.1:{self.port}/0"

    def _auth(self) -> bytes:
        return f"AUTH {self.password}\r\n".encode() if self.password else b""

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (scripts/bootstrap installs it)"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--loglevel", "warning",
             *(["--requirepass", self.password] if self.password else []),
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(self._auth() + b"PING\r\n")
                    if sock.recv(32).removeprefix(b"+OK\r\n").startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def command(self, *args: str) -> bytes:
        """Send one inline command and return the raw reply (for flushing, pausing)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(self._auth() + (" ".join(args) + "\r\n").encode())
            if self.password:  # the AUTH reply first
                reply = sock.recv(65536)
                return reply.removeprefix(b"+OK\r\n") or sock.recv(65536)
            return sock.recv(65536)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(free_port(), directory)
        server.start()
        yield server
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, running and empty at the start of the test."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server
    if redis_server.process is None:
        redis_server.start()


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Run the test on the memory store and on the session's redis-server, emptied."""
    if request.param == "memory":
        return "memory://"
    server: RedisServer = request.getfixturevalue("redis")
    return server.url


# --- the proxy ------------------------------------------------------------------------


def raw_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A test config as YAML data: loopback, free ports, memory store, one catch-all route;
    `overrides` on top (a mapping is merged into its section, anything else replaces)."""
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream": upstream_url,
        "store": {"url": "memory://"},
        "shutdown_grace": "5s",
        "routes": [{"path": "/*", "id": "all"}],
    }
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


def make_config(upstream_url: str, **overrides: Any) -> Config:
    """`raw_config`, validated."""
    return parse_config(raw_config(upstream_url, **overrides), env={})


ProxyFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_proxy(upstream: Upstream) -> AsyncIterator[ProxyFactory]:
    """Start a proxy in this loop in front of `upstream`; keyword arguments override config."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> Running:
            config = make_config(upstream.url, **overrides)
            return await stack.enter_async_context(serve(config))

        yield start


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def key(name: str = "") -> str:
    """A fresh idempotency key."""
    return f"{name}-{os.urandom(6).hex()}"
