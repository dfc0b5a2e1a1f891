"""The admin API on the admin listener, over real sockets.

Bearer-token rules, record lookup / inspection / deletion by the hash the access log prints,
counts, config reload (keeping connections open), and the OpenAPI document that describes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.admin import is_loopback
from proxy.app import PROXY, STORE
from proxy.config import load_config
from proxy.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from proxy.keys import fingerprint_request, scope_of, storage_key
from proxy.server import Running, serve
from proxy.store.base import Acquired
from tests.conftest import ProxyFactory, RedisServer, Upstream, key
from tests.support.proxies import write_config
from tests.support.waiting import wait_until

TOKEN = "admin-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class Events(logging.Handler):
    """Collects the proxy's own log events (message and structured fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[dict[str, Any]]:
        return [getattr(r, "fields", {}) for r in self.records if r.getMessage() == message]

    def levels(self, prefix: str) -> list[int]:
        return [r.levelno for r in self.records if r.getMessage().startswith(prefix)]


@pytest.fixture
def events() -> Iterator[Events]:
    logger = logging.getLogger("idempotency_proxy")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


FileProxyFactory = Callable[..., Awaitable[tuple[Running, Path]]]


@pytest.fixture
async def start_from_file(upstream: Upstream, tmp_path: Path) -> AsyncIterator[FileProxyFactory]:
    """Start a proxy from a config file, so that the admin API can reload it."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> tuple[Running, Path]:
            path = write_config(tmp_path / "proxy.yaml", upstream.url, **overrides)
            running = await stack.enter_async_context(
                serve(load_config(path), config_path=str(path))
            )
            return running, path

        yield start


async def call(client: aiohttp.ClientSession, method: str, url: str,
               body: Any = None, **headers: str) -> tuple[int, Any, Any]:  # fmt: skip
    """One request; the body parsed as JSON when it is JSON."""
    data = None if body is None else json.dumps(body).encode()
    async with client.request(method, url, data=data, headers=headers) as response:
        raw = await response.read()
        is_json = "json" in response.headers.get("Content-Type", "")
        return response.status, response.headers, json.loads(raw) if is_json else raw


def assert_problem(status: int, headers: Any, body: Any, expected: int, slug: str) -> None:
    assert status == expected, body
    assert headers["Content-Type"] == PROBLEM_CONTENT_TYPE
    assert body["type"] == PROBLEM_TYPE_PREFIX + slug
    assert body["status"] == expected and body["title"] and body["detail"]


async def pay(client: aiohttp.ClientSession, proxy: Running, idem: str,
              path: str = "/v1/pay", **headers: str) -> tuple[int, Any, Any]:  # fmt: skip
    return await call(client, "POST", proxy.url + path, {"amount": 1},
                      **{"Idempotency-Key": idem, **headers})  # fmt: skip


# --- authorization ---------------------------------------------------------------------


async def test_admin_api_needs_the_configured_bearer_token(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """No, a wrong or a non-Bearer token: 401 problem with WWW-Authenticate; the token: 200."""
    proxy = await start_proxy(admin_token=TOKEN)
    url = proxy.admin_url + "/admin/records"
    for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"):
        headers = {} if authorization is None else {"Authorization": authorization}
        status, sent, body = await call(client, "GET", url, **headers)
        assert_problem(status, sent, body, 401, "admin-unauthorized")
        assert sent["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await call(client, "GET", url, **BEARER)
    assert status == 200 and body == {"in_flight": 0, "done": 0}
    status, _, _ = await call(client, "GET", url, Authorization=f"bearer {TOKEN}")
    assert status == 200
    # Unknown admin paths do not reveal themselves to a caller without the token.
    assert (await call(client, "GET", proxy.admin_url + "/admin/nothing"))[0] == 401
    assert (await call(client, "GET", proxy.admin_url + "/admin/nothing", **BEARER))[0] == 404


async def test_probes_metrics_and_the_openapi_document_stay_open(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """/healthz, /readyz, /metrics and /admin/openapi.yaml need no token."""
    proxy = await start_proxy(admin_token=TOKEN)
    for path in ("/healthz", "/readyz", "/metrics", "/admin/openapi.yaml"):
        assert (await call(client, "GET", proxy.admin_url + path))[0] == 200, path


async def test_admin_api_beyond_loopback_without_a_token_is_403_and_warned_about(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, events: Events
) -> None:
    """Bound to 0.0.0.0 with no token: /admin/* answers 403, probes stay open, start-up warns."""
    proxy = await start_proxy(admin_listen="0.0.0.0:0")
    status, headers, body = await call(client, "GET", proxy.admin_url + "/admin/records")
    assert_problem(status, headers, body, 403, "admin-token-required")
    assert "admin_token" in body["detail"]
    assert (await call(client, "GET", proxy.admin_url + "/healthz"))[0] == 200
    assert (await call(client, "GET", proxy.admin_url + "/metrics"))[0] == 200
    assert events.levels("admin API disabled") == [logging.WARNING]


async def test_admin_api_beyond_loopback_works_with_a_token(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, events: Events
) -> None:
    """Bound to 0.0.0.0 with a token: the token opens the admin API, and nothing is warned."""
    proxy = await start_proxy(admin_listen="0.0.0.0:0", admin_token=TOKEN)
    assert (await call(client, "GET", proxy.admin_url + "/admin/records", **BEARER))[0] == 200
    assert (await call(client, "GET", proxy.admin_url + "/admin/records"))[0] == 401
    assert events.levels("admin API disabled") == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
     ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
     ("proxy.internal", False)],
)  # fmt: skip
def test_loopback_means_127_0_0_0_8_ipv6_loopback_and_localhost(host: str, loopback: bool) -> None:
    """Only 127.0.0.0/8, ::1 and localhost count as loopback."""
    assert is_loopback(host) is loopback


# --- records ---------------------------------------------------------------------------


async def test_outcome_unknown_is_resolved_by_deleting_its_record(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    events: Events, store_url: str,
) -> None:  # fmt: skip
    """An owner died mid-flight: lookup shows outcome unknown; DELETE lets the retry execute."""
    proxy = await start_proxy(store={"url": store_url}, admin_token=TOKEN)
    k, tenant = key("unknown"), {"Authorization": "Bearer alice"}
    lookup = {"key": k, "headers": tenant}
    admin = proxy.admin_url + "/admin/records"
    status, headers, body = await call(client, "POST", admin + "/lookup", lookup, **BEARER)
    assert_problem(status, headers, body, 404, "record-not-found")

    # A proxy took the key for this very request, then died: its lease lapses unrenewed.
    record = storage_key("default", scope_of([("Authorization", ["Bearer alice"])]), k)
    fingerprint = fingerprint_request("POST", "/v1/pay", "", json.dumps({"amount": 1}).encode())
    store = proxy.app[STORE]
    lock = await store.begin(record.store, fingerprint, lease=0.05, ttl=60, takeover=False)
    assert isinstance(lock, Acquired)
    await asyncio.sleep(0.15)
    status, headers, body = await pay(client, proxy, k, **tenant)
    assert_problem(status, headers, body, 502, "outcome-unknown")
    assert upstream.executions(k) == 0

    status, _, found = await call(client, "POST", admin + "/lookup", lookup, **BEARER)
    assert status == 200
    assert found["record"] == record.hash
    assert found["state"] == "done" and found["outcome"] == "unknown"
    assert found["fingerprint"] == fingerprint and 0 < found["ttl_remaining"] <= 60
    inspected = (await call(client, "GET", f"{admin}/{found['record']}", **BEARER))[2]
    assert {**inspected, "ttl_remaining": None} == {**found, "ttl_remaining": None}

    status, _, body = await call(client, "DELETE", f"{admin}/{found['record']}", **BEARER)
    assert status == 200 and body == {"record": found["record"], "deleted": True}
    assert [e["key_hash"] for e in events.named("record deleted by the admin API")] == [
        found["record"]
    ]
    status, _, body = await pay(client, proxy, k, **tenant)
    assert status == 201 and upstream.executions(k) == 1

    async def recorded() -> bool:  # the answer does not wait for the record to land
        status, _, body = await call(client, "GET", f"{admin}/{found['record']}", **BEARER)
        return bool(status == 200 and body["state"] == "done" and body["status"] == 201)

    await wait_until(recorded, what="the new execution recorded")


async def test_lookup_scopes_the_key_with_the_routes_scope_headers(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """`route` picks whose scope_headers apply; another tenant's key is another record."""
    proxy = await start_proxy(routes=[
        {"path": "/tenants/*", "id": "tenants", "scope_headers": ["X-Tenant"]},
        {"path": "/*", "id": "all"},
    ])  # fmt: skip
    k = key("scoped")
    assert (await pay(client, proxy, k, "/tenants/pay", **{"X-Tenant": "acme"}))[0] == 201
    url = proxy.admin_url + "/admin/records/lookup"
    found = await call(client, "POST", url, {"key": k, "route": "tenants",
                                             "headers": {"x-tenant": "acme"}})  # fmt: skip
    assert found[0] == 200 and found[2]["state"] == "done" and found[2]["status"] == 201
    # The key as a Structured Field string, and the header as a one-item list: the same record.
    again = await call(client, "POST", url, {"key": f'"{k}"', "route": "tenants",
                                             "headers": {"X-Tenant": ["acme"]}})  # fmt: skip
    assert again[2]["record"] == found[2]["record"]
    for other in ({"key": k, "route": "tenants", "headers": {"X-Tenant": "globex"}},
                  {"key": k, "headers": {"X-Tenant": "acme"}}):  # fmt: skip
        assert (await call(client, "POST", url, other))[0] == 404


@pytest.mark.parametrize(
    ("body", "why"),
    [({"key": "k", "route": "nope"}, "unknown route"), ({"headers": {}}, "no key"),
     ({"key": ""}, "empty key"), ({"key": "k", "headers": ["Authorization"]}, "headers list"),
     ({"key": "k", "headers": {"Authorization": 1}}, "header value"), (["k"], "not an object")],
)  # fmt: skip
async def test_malformed_lookups_are_400(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, body: Any, why: str
) -> None:
    """A lookup without a valid key, with an unknown route or odd headers: 400 problem."""
    proxy = await start_proxy()
    status, headers, answer = await call(
        client, "POST", proxy.admin_url + "/admin/records/lookup", body
    )
    assert_problem(status, headers, answer, 400, "invalid-admin-request")


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_records_are_addressed_by_40_lowercase_hex_characters(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, method: str
) -> None:
    """Anything but a 40-character lowercase hex hash is 400; an unknown hash is 404."""
    proxy = await start_proxy()
    url = proxy.admin_url + "/admin/records/"
    for bad in ("abc", "A" * 40, "g" * 40, "0" * 41, "idp:" + "0" * 36):
        status, headers, body = await call(client, method, url + bad)
        assert_problem(status, headers, body, 400, "invalid-admin-request")
    status, headers, body = await call(client, method, url + "0" * 40)
    assert_problem(status, headers, body, 404, "record-not-found")


async def test_counts_report_records_by_state(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """GET /admin/records counts done and in-flight records."""
    proxy = await start_proxy()
    await pay(client, proxy, key("a"))
    await pay(client, proxy, key("b"))
    slow = key("c")
    held = asyncio.ensure_future(pay(client, proxy, slow, "/hold/c/pay"))
    await upstream.arrived(slow)
    status, _, body = await call(client, "GET", proxy.admin_url + "/admin/records")
    assert status == 200 and body == {"in_flight": 1, "done": 2}
    upstream.release("c")
    assert (await held)[0] == 201
    assert (await call(client, "GET", proxy.admin_url + "/admin/records"))[2]["done"] == 3


# --- reload ----------------------------------------------------------------------------


async def exchange_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                       *headers: str) -> tuple[int, bytes]:  # fmt: skip
    """One HTTP/1.1 request on an open connection; the response must have a Content-Length."""
    head = [f"POST {path} HTTP/1.1", "Host: proxy", "Content-Length: 2", *headers]
    writer.write(("\r\n".join(head) + "\r\n\r\n{}").encode())
    await writer.drain()
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    fields = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in lines if line)}
    assert fields.get("connection", "").lower() != "close"
    return int(status_line.split()[1]), await reader.readexactly(int(fields["content-length"]))


async def test_reload_applies_new_routes_without_dropping_a_kept_alive_connection(
    upstream: Upstream, start_from_file: FileProxyFactory, client: aiohttp.ClientSession,
    events: Events,
) -> None:  # fmt: skip
    """POST /admin/reload swaps the routes; a connection opened before serves the new ones."""
    proxy, path = await start_from_file()
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        status, _ = await exchange_raw(reader, writer, "/v1/pay", f"Idempotency-Key: {key()}")
        assert status == 201
        write_config(path, upstream.url, routes=[
            {"path": "/v1/*", "id": "v1", "require_key": True}, {"path": "/*", "id": "rest"},
        ])  # fmt: skip
        status, _, body = await call(client, "POST", proxy.admin_url + "/admin/reload")
        assert status == 200
        assert body == {"status": "applied", "routes": ["v1", "rest"], "restart_required": []}
        status, content = await exchange_raw(reader, writer, "/v1/pay")
        assert status == 400
        assert json.loads(content)["type"] == PROBLEM_TYPE_PREFIX + "missing-key"
    finally:
        writer.close()
        await writer.wait_closed()
    assert [e["config"]["routes"][0]["id"] for e in events.named("config reloaded")] == ["v1"]


async def test_invalid_config_is_refused_with_every_problem_and_the_old_one_kept(
    upstream: Upstream, start_from_file: FileProxyFactory, client: aiohttp.ClientSession,
    events: Events,
) -> None:  # fmt: skip
    """422 lists each problem with its path; the log says why; the running routes stay."""
    proxy, path = await start_from_file()
    broken = {"upstream": upstream.url, "routes": [{"path": "/*", "ttl": "tomorrow"}],
              "requier_key": True}  # fmt: skip
    path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    status, headers, body = await call(client, "POST", proxy.admin_url + "/admin/reload")
    assert_problem(status, headers, body, 422, "config-rejected")
    assert body["problems"] == [
        "requier_key: unknown key",
        'routes[0].ttl: expected a duration like "24h", got "tomorrow"',
    ]
    assert [e["problems"] for e in events.named(
        "config reload refused; keeping the running config")] == [body["problems"]]  # fmt: skip
    assert events.levels("config reload refused") == [logging.ERROR]
    assert proxy.app[PROXY].router.routes[0].id == "all"
    assert (await pay(client, proxy, key()))[0] == 201


SECRET = "Hunter2Pw"


@pytest.mark.parametrize(
    "text",
    [
        f"upstream: http://svc:{SECRET}@up:9000/v1\nstore: {{url: 'mongodb://:{SECRET}@db'}}\n",
        f"store:\n  url: redis://:{SECRET}@cache:6379: oops\n",  # a YAML syntax error
    ],
)
async def test_a_refused_reload_never_shows_a_secret(
    start_from_file: FileProxyFactory, client: aiohttp.ClientSession, events: Events, text: str
) -> None:
    """Neither the 422 answer nor the log line of a refused reload holds a password."""
    proxy, path = await start_from_file()
    path.write_text(text, encoding="utf-8")
    status, headers, body = await call(client, "POST", proxy.admin_url + "/admin/reload")
    assert_problem(status, headers, body, 422, "config-rejected")
    logged = events.named("config reload refused; keeping the running config")
    assert logged and logged[0]["problems"] == body["problems"]
    assert SECRET not in json.dumps(body) and SECRET not in json.dumps(logged)


async def test_an_applied_reload_logs_the_config_with_its_credentials_masked(
    upstream: Upstream, start_from_file: FileProxyFactory, client: aiohttp.ClientSession,
    events: Events,
) -> None:  # fmt: skip
    """The reloaded config is logged with every URL password and the admin token masked."""
    proxy, path = await start_from_file()
    origin = upstream.url.removeprefix("http://")
    write_config(path, f"http://svc:{SECRET}@{origin}", admin_token=SECRET,
                 store={"url": f"rediss://app:{SECRET}@127.0.0.1:1/0?ssl_password={SECRET}"},
                 routes=[{"path": "/token/*", "upstream": f"http://{SECRET}@{origin}"},
                         {"path": "/*"}])  # fmt: skip
    status, _, body = await call(client, "POST", proxy.admin_url + "/admin/reload",
                                 Authorization=f"Bearer {SECRET}")  # fmt: skip
    assert status == 200, body
    assert body["restart_required"] == ["store.url"]
    (logged,) = events.named("config reloaded")
    assert logged["config"]["upstream"] == f"http://svc:***@{origin}"
    assert logged["config"]["routes"][0]["upstream"] == f"http://***@{origin}"  # a token
    assert SECRET not in json.dumps(body) + json.dumps(events.named("config reloaded"))


async def test_reload_keeps_listeners_and_store_and_says_they_need_a_restart(
    upstream: Upstream, start_from_file: FileProxyFactory, client: aiohttp.ClientSession,
    events: Events, redis: RedisServer,
) -> None:  # fmt: skip
    """Changed listen addresses, store URL and namespace are reported, not applied; the rest
    is applied. (A namespace applied on the fly would give every key a new record: its
    retry would execute again.)"""
    proxy, path = await start_from_file()
    k = key("kept")
    assert (await pay(client, proxy, k))[0] == 201
    write_config(path, upstream.url, listen="127.0.0.1:1", admin_listen="127.0.0.1:2",
                 store={"url": redis.url, "fail_mode": "open", "namespace": "other"},
                 routes=[{"path": "/*", "id": "renamed"}])  # fmt: skip
    status, _, body = await call(client, "POST", proxy.admin_url + "/admin/reload")
    assert status == 200 and body["routes"] == ["renamed"]
    restart = ["listen", "admin_listen", "store.url", "store.namespace"]
    assert body["restart_required"] == restart
    config = proxy.app[PROXY].config
    assert config.listen == ("127.0.0.1", 0) and config.store.url == "memory://"
    assert config.store.fail_mode == "open"
    replayed = await pay(client, proxy, k)  # the same (memory) store still answers
    assert replayed[1]["Idempotent-Replayed"] == "true" and upstream.executions(k) == 1
    assert events.named("config reloaded, but these settings only change on a restart") == [
        {"restart_required": restart}
    ]


async def test_reload_rotates_the_admin_token(
    upstream: Upstream, start_from_file: FileProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A reloaded admin_token replaces the old one at once."""
    proxy, path = await start_from_file(admin_token=TOKEN)
    write_config(path, upstream.url, admin_token="the-next-token")
    assert (await call(client, "POST", proxy.admin_url + "/admin/reload", **BEARER))[0] == 200
    url = proxy.admin_url + "/admin/records"
    assert (await call(client, "GET", url, **BEARER))[0] == 401
    assert (await call(client, "GET", url, Authorization="Bearer the-next-token"))[0] == 200


async def test_reload_without_a_config_file_is_409(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """A proxy started from an in-memory config has nothing to re-read."""
    proxy = await start_proxy()
    status, headers, body = await call(client, "POST", proxy.admin_url + "/admin/reload")
    assert_problem(status, headers, body, 409, "no-config-file")


# --- the OpenAPI document --------------------------------------------------------------


async def test_openapi_document_describes_every_admin_route(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """/admin/openapi.yaml is OpenAPI 3.1 and lists exactly the routes the admin app serves."""
    proxy = await start_proxy()
    status, headers, body = await call(client, "GET", proxy.admin_url + "/admin/openapi.yaml")
    assert status == 200 and headers["Content-Type"] == "application/yaml"
    document = yaml.safe_load(body)
    assert document["openapi"].startswith("3.1.")
    described = {(path, method.upper()) for path, item in document["paths"].items()
                 for method in item if method != "parameters"}  # fmt: skip
    routes = proxy.admin_app.router.routes()
    served = {(r.resource.canonical, r.method) for r in routes if r.resource is not None}
    assert described == served
    scheme = document["components"]["securitySchemes"]["adminToken"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            guarded = path.startswith("/admin/") and path != "/admin/openapi.yaml"
            assert (operation.get("security") == [{"adminToken": []}]) is guarded, path
