"""The proxy's resources and its request handler.

`create_app` builds the application that owns what lives as long as the proxy (the store
client, the upstream `ClientSession`, the `Proxy`), opened and closed in `cleanup_ctx` as
aiohttp recommends. It routes nothing: every request on the proxy listener goes to one
handler, so `proxy.server` runs `proxy_handler` on aiohttp's low-level server. Skipping the
URL dispatcher and the per-request middleware chain saved about a tenth of the proxy's CPU
per request in `bench/run`.

With a `tracing:` block, `proxy.tracing` (and so OpenTelemetry) is loaded here and wraps the
store, the upstream client and the handler; without one it is never imported.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from proxy import metrics, tasks
from proxy.config import Config, TracingConfig
from proxy.exchange import MIDDLEWARES, Handler
from proxy.flow import Proxy
from proxy.store import MeasuredStore, Store, open_store
from proxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from proxy.tracing import Tracing

_RETRY_DRAIN = 2.0
STORE = web.AppKey("store", Store)
PROXY = web.AppKey("proxy", Proxy)
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # only when tracing is on


def create_app(config: Config, store: Store | None = None) -> web.Application:
    """The application owning the proxy's resources. `store` overrides the configured one."""
    app = web.Application()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        backend: Store = MeasuredStore(store if store is not None else open_store(config.store))
        tracing: Tracing | None = None
        if config.tracing is None:
            upstream = UpstreamClient(config.upstream_keepalive_timeout)
        else:
            tracing = app[TRACING] = start_tracing(config.tracing)
            backend = tracing.store(backend, store_system(config.store.url))
            upstream = tracing.upstream(config.upstream_keepalive_timeout)
        app[STORE] = backend
        app[PROXY] = Proxy(config, backend, upstream)
        flusher = metrics.Flusher()
        flusher.start()
        yield
        # Give results that a brief store outage left unrecorded a last chance.
        await tasks.drain("store-retry", _RETRY_DRAIN)
        for task in tasks.running("store-retry"):
            task.cancel()
        app[PROXY].leases.close()
        flusher.stop()
        await upstream.close()
        if store is None:
            await backend.close()
        if tracing is not None:  # last: the spans of the final requests and retries go too
            await tracing.close()

    app.cleanup_ctx.append(resources)
    return app


def start_tracing(config: TracingConfig) -> Tracing:
    """The app's tracing. OpenTelemetry is an optional extra: imported only from here, only
    when the config turns tracing on (the config check made sure it is installed)."""
    from proxy.tracing import Tracing

    return Tracing(config)


def store_system(url: str) -> str:
    """The store's name on its spans (`db.system.name`)."""
    return "memory" if url.startswith("memory:") else "redis"


def proxy_handler(app: web.Application) -> Handler:
    """The proxy listener's handler: the flow inside the middlewares, composed once; with
    tracing on, its middleware is the outermost, so the server span covers the whole request."""
    handler: Handler = app[PROXY].handle
    tracing = app.get(TRACING)
    middlewares = MIDDLEWARES if tracing is None else (tracing.trace, *MIDDLEWARES)
    for middleware in reversed(middlewares):
        handler = partial(middleware, handler=handler)  # type: ignore[call-arg]
    return handler
