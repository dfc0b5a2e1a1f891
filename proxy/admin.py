"""The admin listener: health, readiness, metrics, and the admin API.

`/healthz`, `/readyz`, `/metrics` and `/admin/openapi.yaml` are always open: probes and
Prometheus reach them without credentials. The rest of `/admin/*` inspects and purges
records and reloads the config, so it needs `Authorization: Bearer <admin_token>` when a
token is configured. Without one it is open only while the listener is bound to loopback;
bound beyond it, it answers 403 until a token is set (and start-up logs a warning).

Records are addressed by the hash the access log prints as `key_hash`, so an operator can go
from a log line to the record without ever handling a raw key or a credential. `lookup`
computes that hash from a key and the request's scope headers, exactly as the flow does.

Its own problems extend `ProxyError` (urn:idempotency-proxy:problem:...):

    AdminUnauthorized      401  admin-unauthorized      (WWW-Authenticate: Bearer)
    AdminTokenRequired     403  admin-token-required
    InvalidAdminRequest    400  invalid-admin-request
    RecordNotFound         404  record-not-found
    NoConfigFile           409  no-config-file
    ConfigRejected         422  config-rejected         (`problems`: every config problem)
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import multiprocessing
import os
import re
import signal
from dataclasses import asdict
from importlib import resources
from typing import Any, ClassVar

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from proxy import logs, metrics
from proxy.app import PROXY, STORE
from proxy.config import Config
from proxy.contract.describe import to_markdown, to_openapi
from proxy.contract.documents import dump_document
from proxy.errors import InvalidKey, ProxyError, StoreError
from proxy.exchange import render_problems
from proxy.keys import RecordKey, parse_key, scope_of, storage_key
from proxy.outcomes import RequestOutcome
from proxy.reload import reload_file

PROXY_APP = web.AppKey("proxy_app", web.Application)
CONFIG_PATH = web.AppKey("config_path", str)

ADMIN_PREFIX = "/admin/"
OPEN_PATHS = frozenset({"/admin/openapi.yaml"})
OPENAPI_CONTENT_TYPE = "application/yaml"
# What `GET /admin/contract` offers, in the order it prefers on a tie; the value says how.
CONTRACT_TYPES = {
    "text/markdown": "markdown",
    "application/json": "json",
    "application/vnd.oai.openapi+json": "json",
    "application/yaml": "yaml",
    "application/vnd.oai.openapi": "yaml",
}
_RECORD_HASH = re.compile(r"^[0-9a-f]{40}\Z")
_MAX_LOOKUP_BODY = 64 * 1024


# --- the admin API's own problems ------------------------------------------------------


class AdminError(ProxyError):
    """A problem answer of the admin API."""

    status: ClassVar[int] = 400
    outcome = RequestOutcome.BAD_REQUEST  # unused: the admin listener has no access metrics


class AdminUnauthorized(AdminError):
    status = 401
    slug = "admin-unauthorized"
    title = "Admin token missing or wrong"

    def parts(self, request_id: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
        status, headers, body = super().parts(request_id)
        headers.append(("WWW-Authenticate", 'Bearer realm="idempotency-proxy admin"'))
        return status, headers, body


class AdminTokenRequired(AdminError):
    status = 403
    slug = "admin-token-required"
    title = "The admin API needs a token on a non-loopback listener"


class InvalidAdminRequest(AdminError):
    status = 400
    slug = "invalid-admin-request"
    title = "Invalid admin request"


class RecordNotFound(AdminError):
    status = 404
    slug = "record-not-found"
    title = "No such record"


class NoConfigFile(AdminError):
    status = 409
    slug = "no-config-file"
    title = "No config file to reload"


class ConfigRejected(AdminError):
    status = 422
    slug = "config-rejected"
    title = "The new config is invalid; the running config is kept"

    def __init__(self, detail: str, problems: list[str]) -> None:
        super().__init__(detail)
        self.problems = problems

    def to_problem(self) -> dict[str, object]:
        return {**super().to_problem(), "problems": self.problems}


# --- the application -------------------------------------------------------------------


def create_admin_app(proxy_app: web.Application, config_path: str | None = None) -> web.Application:
    """The admin application; it reads the store and config of `proxy_app`.

    `config_path` is the file `POST /admin/reload` re-reads; without it, reload answers 409.
    """
    app = web.Application(middlewares=[render_problems, authorize])
    app[PROXY_APP] = proxy_app
    if config_path is not None:
        app[CONFIG_PATH] = config_path
    app.on_startup.append(_warn_if_exposed)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
    app.router.add_get("/metrics", scrape, allow_head=False)
    app.router.add_get("/admin/openapi.yaml", openapi, allow_head=False)
    app.router.add_get("/admin/contract", contract, allow_head=False)
    app.router.add_get("/admin/records", counts, allow_head=False)
    app.router.add_post("/admin/records/lookup", lookup)
    app.router.add_get("/admin/records/{record}", inspect, allow_head=False)
    app.router.add_delete("/admin/records/{record}", delete)
    app.router.add_post("/admin/reload", reload)
    return app


def _config(request: web.Request) -> Config:
    """The running config (it changes on reload)."""
    return request.app[PROXY_APP][PROXY].config


def is_loopback(host: str) -> bool:
    """Whether a listen host is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume it is reachable


async def _warn_if_exposed(app: web.Application) -> None:
    config = app[PROXY_APP][PROXY].config
    if config.admin_token is None and not is_loopback(config.admin_listen[0]):
        logs.event(
            "admin API disabled: the admin listener is not on loopback and no admin_token "
            "is set; /admin/* answers 403 (set IDEMPOTENCY_PROXY_ADMIN_TOKEN)",
            logging.WARNING, admin_listen="{}:{}".format(*config.admin_listen),
        )  # fmt: skip


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard `/admin/*` (except the OpenAPI document) with the bearer token."""
    if request.path.startswith(ADMIN_PREFIX) and request.path not in OPEN_PATHS:
        check_token(request.headers.get("Authorization"), _config(request))
    return await handler(request)


def check_token(authorization: str | None, config: Config) -> None:
    """Raise unless `authorization` carries the configured token (or none is needed)."""
    token = config.admin_token
    if token is None:
        if is_loopback(config.admin_listen[0]):
            return
        raise AdminTokenRequired(
            "the admin listener is bound beyond loopback and no admin_token is configured; "
            "set admin_token (or IDEMPOTENCY_PROXY_ADMIN_TOKEN) to use the admin API"
        )
    scheme, _, presented = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), token.encode()
    ):
        raise AdminUnauthorized("send Authorization: Bearer <admin_token>")


# --- open endpoints --------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process serves requests (the store is not consulted)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: the store takes writes (a probe write, not a PING), so requests can be decided."""
    try:
        await request.app[PROXY_APP][STORE].ping()
    except StoreError as exc:  # the details (host, port, error) go to the log, not the probe
        logs.event("not ready: the store does not take writes", logging.WARNING,
                   error=exc.detail)  # fmt: skip
        return web.json_response({"status": "unavailable", "store": "unavailable"}, status=503)
    return web.json_response({"status": "ok", "store": "ok"})


async def scrape(request: web.Request) -> web.Response:
    response = web.Response(body=await metrics.render())
    response.headers["Content-Type"] = metrics.CONTENT_TYPE
    return response


def openapi_document() -> bytes:
    """The OpenAPI 3.1 description of this listener, shipped in the package."""
    return resources.files("proxy").joinpath("openapi.yaml").read_bytes()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), headers={"Content-Type": OPENAPI_CONTENT_TYPE})


# --- the contract ----------------------------------------------------------------------


def negotiate(accept: str | None, offered: list[str]) -> str:
    """The offered media type an `Accept` header prefers (RFC 9110 12.5.1), else the first.

    Each type takes the weight of the most specific range that matches it; a tie goes to
    the earlier offer. A header that accepts none of them gets the first too: the contract
    is documentation, better shown in its default form than refused with 406.
    """
    ranges: list[tuple[str, float]] = []
    for part in (accept or "*/*").split(","):
        media, *params = (field.strip() for field in part.split(";"))
        weight = 1.0
        for param in params:
            name, _, number = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(number)
                except ValueError:
                    weight = 0.0
        ranges.append((media.lower(), weight))
    best, best_weight = offered[0], 0.0
    for media in offered:
        kinds = (media, media.split("/")[0] + "/*", "*/*")  # most specific first
        matches = [(kinds.index(r), w) for r, w in ranges if r in kinds]
        weight = min(matches)[1] if matches else 0.0
        if weight > best_weight:
            best, best_weight = media, weight
    return best


async def contract(request: web.Request) -> web.Response:
    """What each route asks of its clients: markdown, or OpenAPI as JSON or YAML by Accept."""
    config = _config(request)
    media = negotiate(request.headers.get("Accept"), list(CONTRACT_TYPES))
    form = CONTRACT_TYPES[media]
    if form == "markdown":
        text = to_markdown(config)
    else:
        text = dump_document(to_openapi(config), "json" if form == "json" else "yaml")
    return web.Response(text=text, content_type=media, charset="utf-8")


# --- records ---------------------------------------------------------------------------


def _record_info(record: str, info: Any) -> web.Response:
    return web.json_response({"record": record, **asdict(info)})


def _record_param(request: web.Request) -> str:
    record = request.match_info["record"]
    if not _RECORD_HASH.match(record):
        raise InvalidAdminRequest(
            "a record is the 40 lowercase hex characters the access log prints as key_hash, "
            "or that POST /admin/records/lookup returns"
        )
    return record


async def counts(request: web.Request) -> web.Response:
    """How many records the store holds, by state."""
    return web.json_response(await request.app[PROXY_APP][STORE].counts())


async def lookup(request: web.Request) -> web.Response:
    """The record for a key as a client sent it, with its scope headers."""
    config = _config(request)
    body = await _json_body(request)
    raw_key = body.get("key")
    if not isinstance(raw_key, str):
        raise InvalidAdminRequest('"key" must be the idempotency key, as a string')
    route_id = body.get("route")
    policy = config.defaults
    if route_id is not None:
        matching = [route for route in config.routes if route.id == route_id]
        if not matching:
            known = ", ".join(repr(route.id) for route in config.routes)
            raise InvalidAdminRequest(f"no route has the id {route_id!r}; routes: {known}")
        policy = matching[0]
    headers = _lookup_headers(body.get("headers", {}))
    try:
        key = parse_key([raw_key], policy.key_header)
    except InvalidKey as exc:
        raise InvalidAdminRequest(exc.detail) from exc
    scope = scope_of((name, headers.getall(name, [])) for name in policy.scope_headers)
    record = storage_key(config.store.namespace, scope, key).hash
    info = await request.app[PROXY_APP][STORE].inspect(RecordKey(record).store)
    if info is None:
        raise RecordNotFound(
            f"no record for this key in scope {list(policy.scope_headers)} of route "
            f"{policy.id!r} (record {record}); it was never used, was deleted, or expired"
        )
    return _record_info(record, info)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > _MAX_LOOKUP_BODY:
        raise InvalidAdminRequest(f"the request body is larger than {_MAX_LOOKUP_BODY} bytes")
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        raise InvalidAdminRequest(f"the request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidAdminRequest("the request body must be a JSON object")
    return body


def _lookup_headers(raw: object) -> CIMultiDict[str]:
    """`{"Authorization": "Bearer x"}`; a list value stands for a header sent several times."""
    if not isinstance(raw, dict):
        raise InvalidAdminRequest('"headers" must be an object of header names to values')
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(item, str) for item in values):
            raise InvalidAdminRequest(f"headers.{name}: expected a string or a list of strings")
        for item in values:
            headers.add(name, item)
    return headers


async def inspect(request: web.Request) -> web.Response:
    """A record by its hash: state, ttl, lease, outcome (never the body)."""
    record = _record_param(request)
    info = await request.app[PROXY_APP][STORE].inspect(RecordKey(record).store)
    if info is None:
        raise RecordNotFound(f"no record {record}; it was never used, was deleted, or expired")
    return _record_info(record, info)


async def delete(request: web.Request) -> web.Response:
    """Purge a record whatever its state: the next request with its key executes again."""
    record = _record_param(request)
    deleted = await request.app[PROXY_APP][STORE].delete(RecordKey(record).store)
    if not deleted:
        raise RecordNotFound(f"no record {record}; it was never used, was deleted, or expired")
    logs.event("record deleted by the admin API", logging.WARNING,
               key_hash=record, remote=request.remote)  # fmt: skip
    return web.json_response({"record": record, "deleted": True})


# --- reload ----------------------------------------------------------------------------


def _supervised() -> bool:
    """Whether this process is one of several workers (see `proxy.workers`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR")) and (
        multiprocessing.parent_process() is not None
    )


async def reload(request: web.Request) -> web.Response:
    """Re-read the config file, as SIGHUP does; with several workers, reload all of them."""
    path = request.app.get(CONFIG_PATH)
    if path is None:
        raise NoConfigFile("this proxy was started without a config file; nothing to reload")
    result = reload_file(request.app[PROXY_APP][PROXY], path, apply=not _supervised())
    if result.problems:
        raise ConfigRejected(f"{path} has {len(result.problems)} problem(s)", result.problems)
    answer = {"routes": result.routes, "restart_required": result.restart_required}
    if result.applied:
        return web.json_response({"status": "applied", **answer})
    # Validated here; the parent forwards SIGHUP to every worker (this one included),
    # and each re-reads the file.
    os.kill(os.getppid(), signal.SIGHUP)
    return web.json_response({"status": "signalled", "workers": "all", **answer}, status=202)
