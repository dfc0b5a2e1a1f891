"""The application factories: the proxy listener and the admin listener.

Resources that live as long as the app (the store client, the upstream `ClientSession`)
are opened and closed in `cleanup_ctx`, as aiohttp recommends. They close only after the
server has let in-flight requests finish and record (see `proxy.server.serve`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy.config import Config
from proxy.exchange import MIDDLEWARES
from proxy.flow import Proxy
from proxy.store import MeasuredStore, Store, open_store
from proxy.upstream import create_session

STORE = web.AppKey("store", Store)
PROXY = web.AppKey("proxy", Proxy)


def create_app(config: Config, store: Store | None = None) -> web.Application:
    """The proxy listener's application. `store` overrides the configured one (tests)."""
    app = web.Application(middlewares=list(MIDDLEWARES))

    async def resources(app: web.Application) -> AsyncIterator[None]:
        backend = MeasuredStore(store if store is not None else open_store(config.store))
        session = create_session()
        app[STORE] = backend
        app[PROXY] = Proxy(config, backend, session)
        yield
        await session.close()
        if store is None:
            await backend.close()

    app.cleanup_ctx.append(resources)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await app[PROXY].handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app
