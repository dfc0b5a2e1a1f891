"""The counting upstream: the legacy API the proxy protects, played on a free loopback port.

It counts how often each idempotency key reached it (the one number every test asserts),
keeps the bodies and headers it received, and behaves as each request's path asks:
`/delay/0.5/...` answers late, `/status/503` answers 503, `/reset` drops the connection,
`/truncate` hangs up mid-body, `/big/N` sends N bytes, `/stream/N` sends N chunks, and
`/hold/NAME/...` waits until the test calls `release(NAME)`. One upstream therefore serves
every test. A test that must act while a request is at the upstream awaits `arrived(key)`
instead of sleeping: the count is taken on arrival, before any delay or hold, so "arrived"
means the proxy has forwarded the request; a held request stays in flight for as long as
the test needs, however slow the machine.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.ports import LOOPBACK, free_port


@dataclass
class Upstream:
    """The legacy API: counts executions per key, behaves as each path asks."""

    url: str = ""
    calls: Counter[str] = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    serial: int = 0
    _arrival: asyncio.Condition = field(default_factory=asyncio.Condition, repr=False)
    _gates: dict[str, asyncio.Event] = field(default_factory=dict, repr=False)

    def executions(self, key: str) -> int:
        return self.calls[key]

    async def arrived(self, key: str, times: int = 1, timeout: float = 5.0) -> None:
        """Wait until `key` has reached the upstream `times` times (AssertionError if not)."""
        try:
            async with asyncio.timeout(timeout), self._arrival:
                await self._arrival.wait_for(lambda: self.calls[key] >= times)
        except TimeoutError:
            raise AssertionError(
                f"{key!r} reached the upstream {self.calls[key]} times, not {times}, "
                f"within {timeout:g}s"
            ) from None

    def gate(self, name: str) -> asyncio.Event:
        """The gate `/hold/<name>/...` requests wait at."""
        return self._gates.setdefault(name, asyncio.Event())

    def release(self, name: str) -> None:
        """Let every request held at `name` (and every later one) go on."""
        self.gate(name).set()

    async def count(self, request: web.Request, body: bytes) -> int:
        """Record one arrival and wake whoever waits for it; return its serial number."""
        key = request.headers.get("Idempotency-Key", "")
        self.calls[key] += 1
        self.serial += 1
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        async with self._arrival:
            self._arrival.notify_all()
        return self.serial


UPSTREAM_STATE = web.AppKey("upstream_state", Upstream)


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[UPSTREAM_STATE]
    body = await request.read()
    serial = await state.count(request, body)
    parts = [p for p in request.path.split("/") if p]
    # /delay/<seconds>/... sleeps, /hold/<name>/... waits for its gate; then the rest.
    while len(parts) >= 2 and parts[0] in ("delay", "hold"):
        if parts[0] == "delay":
            await asyncio.sleep(float(parts[1]))
        else:
            await state.gate(parts[1]).wait()
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
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    key: web.AppKey[Any],
    state: Any,
) -> AsyncIterator[str]:
    """Serve `handler` for every method and path on a free loopback port, with `state` under
    `key` in the app, for the block; yields its URL."""
    app = web.Application()
    app[key] = state
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, LOOPBACK, port).start()
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def counting_upstream() -> AsyncIterator[Upstream]:
    """Serve a fresh counting upstream on a free loopback port while the block runs."""
    state = Upstream()
    async with serve_app(_handle, UPSTREAM_STATE, state) as url:
        state.url = url
        yield state
