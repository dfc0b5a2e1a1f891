"""Running the proxy: listeners, signals, graceful shutdown.

`serve` starts both listeners on sockets it binds itself (port 0 picks a free port, which
tests and the demo use) and stops them in the right order: stop accepting, let in-flight
requests finish and record within the grace period, then close the store. `run` adds the
process's signal handling around it: SIGTERM/SIGINT drain and exit, SIGHUP reloads
(as `POST /admin/reload` does, through `proxy.reload`). `serve_config` is what a process
runs, alone or as one of several workers: load the file, then `run` it until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

from proxy import logs
from proxy.admin import create_admin_app
from proxy.app import PROXY, create_app, proxy_handler
from proxy.config import Config, ConfigError, describe, load_config
from proxy.exchange import Handler
from proxy.reload import reload_file
from proxy.store import Store

# After the grace, how long aiohttp lets the handlers cancelled at its end unwind. aiohttp
# waits its shutdown_timeout twice (for handlers, then for their cancellation), so the grace
# itself is spent in `InFlight.drain`, not there.
_UNWIND = 0.1


class ListenError(Exception):
    """A listener could not be opened (the port is taken, the address is not this host's)."""


def bind(address: tuple[str, int], reuse_port: bool = False) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


@dataclass
class Running:
    """A started proxy: where it listens, and its apps."""

    app: web.Application
    admin_app: web.Application
    port: int
    admin_port: int
    host: str
    admin_host: str = ""

    @property
    def url(self) -> str:
        return f"http://{_connectable(self.host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{_connectable(self.admin_host or self.host)}:{self.admin_port}"


def _connectable(host: str) -> str:
    """A URL host that reaches a listener bound to `host` from this machine."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class InFlight:
    """Counts the requests being handled, so that a shutdown can wait for them.

    A count, not a set of tasks: the requests left when the grace runs out are cancelled by
    the server's own cleanup, and asking for the current task costs a system call per
    request on Python 3.11.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def track(self, handler: Handler) -> Handler:
        async def tracked(request: web.BaseRequest) -> web.StreamResponse:
            self.count += 1
            try:
                return await handler(request)
            finally:
                self.count -= 1
                if not self.count and self._idle is not None:
                    self._idle.set()

        return tracked

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for every request to finish; say how many are left."""
        if self.count:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
        return self.count


@asynccontextmanager
async def serve(
    config: Config, store: Store | None = None, reuse_port: bool = False,
    config_path: str | None = None,
) -> AsyncIterator[Running]:  # fmt: skip
    """Serve `config` until the block exits, then shut down gracefully.

    `config_path` is the file `POST /admin/reload` re-reads (none: reload answers 409).
    """
    app = create_app(config, store)
    admin_app = create_admin_app(app, config_path)
    resources = web.AppRunner(app, handle_signals=False)  # runs the app's startup and cleanup
    admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await resources.setup()
    # handler_cancellation off: a client that disconnects must not cancel the upstream
    # exchange of a first attempt; it completes and is recorded for the retry.
    in_flight = InFlight()
    # auto_decompress off: a body passes as the client encoded it. Decoded, it no longer
    # matched the client's Content-Length, which is forwarded with it: the upstream read the
    # next client's request as the rest of this body (a desync across clients).
    server = web.Server(in_flight.track(proxy_handler(app)), handler_cancellation=False,
                        access_log=None, auto_decompress=False)  # fmt: skip
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=_UNWIND)
    try:
        await runner.setup()
        await admin_runner.setup()
        sock = bind(config.listen, reuse_port)
        admin_sock = bind(config.admin_listen, reuse_port)
        await web.SockSite(runner, sock, backlog=1024).start()
        await web.SockSite(admin_runner, admin_sock).start()
        yield Running(app, admin_app, sock.getsockname()[1], admin_sock.getsockname()[1],
                      config.listen[0], config.admin_listen[0])  # fmt: skip
    finally:
        # Stop accepting and let in-flight requests finish and record within the grace
        # period (terminationGracePeriodSeconds is sized for it), cancel what is left, then
        # close the admin listener, and only then the store and client.
        for site in list(runner.sites):
            await site.stop()  # new connections are refused from here on
        server.pre_shutdown()  # keep-alive connections close after their request
        left = await in_flight.drain(app[PROXY].config.shutdown_grace)
        if left:
            logs.event("shutdown grace ran out; cancelling requests in flight", left=left)
        await runner.cleanup()
        await admin_runner.cleanup()
        await resources.cleanup()


async def run(config: Config, config_path: str | None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT; reload the config file on SIGHUP."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(config, reuse_port=reuse_port, config_path=config_path) as running:
        if config_path is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_file, running.app[PROXY], config_path)
        tune_gc()
        logs.event("listening", proxy=running.url, admin=running.admin_url, config=describe(config))
        await stop.wait()
        logs.event("shutting down", grace_seconds=config.shutdown_grace)
    logs.event("stopped")


# Objects between collections of the youngest generation (CPython's default is 700).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Collect cycles less often, and never re-scan what start-up allocated.

    Every request allocates container objects and the memory store keeps its records, so
    with CPython's default thresholds the cyclic collector re-scanned a growing heap very
    often: protected first attempts on memory:// took 268 us of proxy CPU each (median of
    five alternating runs), 224 us with these thresholds, for a few MB more of memory.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def serve_config(path: str, reuse_port: bool = False) -> int:
    """Serve the config file at `path` in this process until SIGTERM/SIGINT; the exit status."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return refuse(path, exc.problems)
    logs.configure(config.log_level)
    _install_uvloop()
    try:
        asyncio.run(run(config, path, reuse_port=reuse_port))
    except ListenError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    return 0


def refuse(path: str, problems: list[str]) -> int:
    """Say on stderr why the config at `path` cannot be served; the exit status for it."""
    print(f"{path}: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    return 2


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
