"""The proxy's resources and its request handler.

`create_app` builds the application that owns what lives as long as the proxy (the store
client, the upstream `ClientSession`, the `Proxy`), opened and closed in `cleanup_ctx` as
aiohttp recommends. It routes nothing: every request on the proxy listener goes to one
handler, so `proxy.server` runs `proxy_handler` on aiohttp's low-level server. Skipping the
URL dispatcher and the per-request middleware chain saved about a tenth of the proxy's CPU
per request in `bench/run`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from proxy import metrics, tasks
from proxy.config import Config
from proxy.exchange import MIDDLEWARES, Handler
from proxy.flow import Proxy
from proxy.store import MeasuredStore, Store, open_store
from proxy.upstream import UpstreamClient

_RETRY_DRAIN = 2.0
STORE = web.AppKey("store", Store)
PROXY = web.AppKey("proxy", Proxy)


def create_app(config: Config, store: Store | None = None) -> web.Application:
    """The application owning the proxy's resources. `store` overrides the configured one."""
    app = web.Application()
    metrics.declare_routes((route.id, route.methods) for route in config.routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        backend = MeasuredStore(store if store is not None else open_store(config.store))
        upstream = UpstreamClient(config.upstream_keepalive_timeout)
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

    app.cleanup_ctx.append(resources)
    return app


def proxy_handler(proxy: Proxy) -> Handler:
    """The proxy listener's handler: the flow inside the middlewares, composed once."""
    handler: Handler = proxy.handle
    for middleware in reversed(MIDDLEWARES):
        handler = partial(middleware, handler=handler)  # type: ignore[call-arg]
    return handler
