"""The application factories: the proxy listener and the admin listener.

Resources that live as long as the app (the store client, the upstream `ClientSession`)
are opened and closed in `cleanup_ctx`, as aiohttp recommends; on the way out the proxy
first lets in-flight upstream exchanges finish and record their results.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy import logs, tasks
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
        left = await tasks.drain("exchange", app[PROXY].config.shutdown_grace)
        if left:
            logs.event("shutdown grace ran out with upstream exchanges unfinished", left=left)
        await session.close()
        if store is None:
            await backend.close()

    app.cleanup_ctx.append(resources)

    async def handle(request: web.Request) -> web.StreamResponse:
        return await app[PROXY].handle(request)

    app.router.add_route("*", "/{tail:.*}", handle)
    return app
