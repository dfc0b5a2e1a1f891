"""The bare pass-through: the least an aiohttp + uvloop reverse proxy can do.

It is the benchmark's reference ("1.0x"): the idempotency proxy is built on the same
stack, so its ratio to this one is the cost of what it adds (routing, keys, the store,
metrics, logs), not the cost of Python or aiohttp. One pooled `ClientSession`, hop-by-hop
headers dropped, request and response bodies streamed, no access log, nothing else.

    python bench/passthrough.py --listen 127.0.0.1:8081 --upstream http://127.0.0.1:9000
    python bench/passthrough.py ... --workers 2    # 2 processes on one SO_REUSEPORT port
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "expect",
    )
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=15)
        app[SESSION] = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content if request.body_exists else None
        url = URL(upstream + request.raw_path, encoded=True)
        async with app[SESSION].request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream_response:
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers.items() if k.lower() not in HOP_BY_HOP
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(
        create_app(upstream), access_log=None, handle_signals=False, shutdown_timeout=1
    )
    await runner.setup()
    await web.SockSite(runner, bind(host, port), backlog=1024).start()
    await stop.wait()
    await runner.cleanup()


def run_worker(host: str, port: int, upstream: str) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(host, port, upstream))
    else:
        uvloop.run(serve(host, port, upstream))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--workers", type=int, default=1, help="processes (SO_REUSEPORT)")
    args = parser.parse_args()
    host, _, port_text = args.listen.rpartition(":")
    port, upstream = int(port_text), args.upstream.rstrip("/")
    if args.workers <= 1:
        run_worker(host, port, upstream)
        return 0
    # Fork before any event loop exists; every child binds its own SO_REUSEPORT socket and
    # the kernel spreads connections across them. The parent only forwards signals.
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            run_worker(host, port, upstream)
            os._exit(0)
        children.append(pid)

    def forward_signal(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    for child in children:
        os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
