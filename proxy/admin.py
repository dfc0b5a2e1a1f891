"""The admin listener: health, readiness, metrics.

It listens on loopback by default; probes and Prometheus reach it there in a sidecar.
"""

from __future__ import annotations

from aiohttp import web

from proxy import metrics
from proxy.errors import StoreError

PROXY_APP = web.AppKey("proxy_app", web.Application)


def create_admin_app(proxy_app: web.Application) -> web.Application:
    """The admin application; it reads the store and config of `proxy_app`."""
    app = web.Application()
    app[PROXY_APP] = proxy_app
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", scrape)
    return app


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process serves requests (the store is not consulted)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store answers, so protected requests can be decided."""
    from proxy.app import STORE

    try:
        await request.app[PROXY_APP][STORE].ping()
    except StoreError as exc:
        return web.json_response({"status": "unavailable", "store": exc.detail}, status=503)
    return web.json_response({"status": "ok", "store": "ok"})


async def scrape(request: web.Request) -> web.Response:
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
