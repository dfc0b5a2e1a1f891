"""Official SDKs, with their own retry logic, through the proxy: one execution, and what they say.

Each test drives a real SDK (installed from PyPI by the `sdk` extra) at the proxy through its
base-URL option, in front of a fake API on loopback that acts on the first attempt (counts the
execution) and then holds its answer, so the SDK's own timeout fires and it retries with the
same key. The fake API lets the first attempt answer once the proxy has turned a retry away
(`on_concurrent: reject`, seen as a `conflict` in /metrics) or holds one waiting
(`on_concurrent: wait`, the waiters gauge). The test records what the SDK surfaced to its
caller, and that the API executed the operation exactly once. README "Clients and SDKs" is
this file's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import gocardless_pro
import modern_treasury
import paypalserversdk.configuration as paypal_configuration
import pytest
import stripe
from aiohttp import web
from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials
from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

from proxy.config import parse_config
from proxy.server import Running, serve
from proxy.store.base import Decision, InProgress
from proxy.store.memory import MemoryStore
from tests.conftest import raw_config
from tests.support.metrics import scrape, value
from tests.support.upstream import serve_app
from tests.support.waiting import wait_until

# The SDK's own timeout: the held first attempt always outlasts it. A waiting retry must get
# its answer within it, so `wait` gets a longer one than `reject`, where the 409 is at once.
SDK_TIMEOUT = {"reject": 0.5, "wait": 1.0}
HOLD_LIMIT = 10.0  # the fake API lets a held attempt go after this, whatever happens


# --- the fake API ------------------------------------------------------------------------


@dataclass
class FakeApi:
    """Acts on every request it gets (counts it per key); the first of each key is held."""

    url: str = ""
    executions: Counter[str] = field(default_factory=Counter)
    keys_seen: list[tuple[str, str]] = field(default_factory=list)  # (key header, key)
    release: asyncio.Event = field(default_factory=asyncio.Event)


FAKE = web.AppKey("fake", FakeApi)
KEY_HEADERS = ("Idempotency-Key", "PayPal-Request-Id")
# Each SDK's operation, answered as its API would (only the fields the SDK needs).
ANSWERS: dict[str, dict[str, Any]] = {
    "/v1/customers": {"id": "cus_1", "object": "customer", "email": "a@example.com"},
    "/api/counterparties": {"id": "cp_1", "object": "counterparty", "name": "Acme"},
    "/customers": {"customers": {"id": "CU1", "email": "a@example.com"}},
    "/v2/checkout/orders": {"id": "ORDER1", "status": "CREATED", "intent": "CAPTURE"},
    "/v1/oauth2/token": {"access_token": "token", "token_type": "Bearer", "expires_in": 3600},
}


async def _fake_handler(request: web.Request) -> web.Response:
    fake = request.app[FAKE]
    await request.read()
    header = next((name for name in KEY_HEADERS if name in request.headers), None)
    if header is not None:
        key = request.headers[header]
        fake.keys_seen.append((header, key))
        fake.executions[key] += 1
        if fake.executions[key] == 1:
            # Acted; the answer is slow. The SDK gives up on it and retries with the key.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fake.release.wait(), HOLD_LIMIT)
    return web.json_response(ANSWERS[request.path], status=201)


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    async with serve_app(_fake_handler, FAKE, fake) as url:
        fake.url = url
        yield fake
        fake.release.set()  # a held attempt must not outlive the test


# --- the SDKs ----------------------------------------------------------------------------

Surfaced = str  # "ok <id>" or "raised <ExceptionClass>"


def _stripe(base: str, timeout: float) -> Surfaced:
    client = stripe.StripeClient(
        "sk_test_proxy", base_addresses={"api": base}, max_network_retries=5,
        http_client=stripe.RequestsClient(timeout=timeout),
    )  # fmt: skip
    customer = client.v1.customers.create(params={"email": "a@example.com"})
    return f"ok {customer.id}"


def _modern_treasury(base: str, timeout: float) -> Surfaced:
    with modern_treasury.ModernTreasury(
        api_key="key", organization_id="org", base_url=base, timeout=timeout, max_retries=5
    ) as client:
        counterparty = client.counterparties.create(name="Acme")
    return f"ok {counterparty.id}"


def _gocardless(base: str, timeout: float) -> Surfaced:
    client = gocardless_pro.Client(access_token="token", base_url=base, timeout=timeout)
    customer = client.customers.create(params={"email": "a@example.com"})
    return f"ok {customer.id}"


def _paypal(base: str, timeout: float) -> Surfaced:
    class Local(paypal_configuration.Configuration):  # type: ignore[misc]  # untyped SDK
        """PayPal's SDK takes its base URL from its environment table: point it here."""

        environments = {
            env: {paypal_configuration.Server.DEFAULT: base}
            for env in paypal_configuration.Environment
        }

    config = Local(
        timeout=timeout, max_retries=3, backoff_factor=0.1, retry_methods=["GET", "PUT", "POST"],
        client_credentials_auth_credentials=ClientCredentialsAuthCredentials("id", "secret"),
    )  # fmt: skip
    client = PaypalServersdkClient(config=config)
    body = {"intent": "CAPTURE", "purchase_units": [{"amount": {"currency_code": "USD",
                                                                 "value": "10.00"}}]}  # fmt: skip
    # The only one of the four that sends no key unless its caller passes one.
    options = {"body": body, "paypal_request_id": f"order-{uuid.uuid4()}"}
    return f"ok {client.orders.create_order(options).body.id}"


@dataclass(frozen=True)
class Sdk:
    name: str
    call: Callable[[str, float], Surfaced]
    route: dict[str, Any]  # the route settings it needs


SDKS = {
    "stripe": Sdk("stripe", _stripe, {"path": "/v1/customers"}),
    "modern-treasury": Sdk("modern-treasury", _modern_treasury, {"path": "/api/*"}),
    "gocardless-pro": Sdk("gocardless-pro", _gocardless, {"path": "/customers"}),
    "paypal-server-sdk": Sdk(
        "paypal-server-sdk", _paypal,
        {"path": "/v2/checkout/orders", "key_header": "PayPal-Request-Id"},
    ),
}  # fmt: skip

# What each SDK surfaced to its caller, by on_concurrent. The README table says the same.
SURFACED = {
    ("stripe", "reject"): "ok cus_1",
    ("stripe", "wait"): "ok cus_1",
    ("modern-treasury", "reject"): "ok cp_1",
    ("modern-treasury", "wait"): "ok cp_1",
    ("gocardless-pro", "reject"): "raised gocardless_pro.errors.GoCardlessProError",
    ("gocardless-pro", "wait"): "ok CU1",
    ("paypal-server-sdk", "reject"):
        "raised paypalserversdk.exceptions.error_exception.ErrorException",
    ("paypal-server-sdk", "wait"): "ok ORDER1",
}  # fmt: skip
# The proxy's outcome for the retry that met the running first attempt.
MET = {"reject": "conflict", "wait": "waited"}


def surfaced(sdk: Sdk, base: str, timeout: float) -> Surfaced:
    try:
        return sdk.call(base, timeout)
    except Exception as exc:  # what the caller of the SDK would catch
        return f"raised {type(exc).__module__}.{type(exc).__name__}: {exc}"


async def _met(client: aiohttp.ClientSession, proxy: Running, route: str) -> dict[str, float]:
    """How many retries of `route` the proxy turned away with 409, and how many waited."""
    samples = await scrape(client, proxy.admin_url)
    return {
        outcome: value(samples, "idempotency_proxy_requests_total",
                       route=route, method="POST", outcome=outcome)
        for outcome in MET.values()
    }  # fmt: skip


class SeesRetries(MemoryStore):
    """The proxy's store, telling the test when a retry met the running first attempt.

    The test used to poll /metrics every 10 ms for it: each scrape (generated and parsed in
    the loop that also runs the proxy) kept the proxy from answering the SDK's retry within
    the SDK's own 0.5 s timeout on a busy machine."""

    def __init__(self) -> None:
        super().__init__()
        self.met = asyncio.Event()

    async def begin(self, key: str, fingerprint: str, **kwargs: Any) -> Decision:
        decision = await super().begin(key, fingerprint, **kwargs)
        if isinstance(decision, InProgress):
            self.met.set()
        return decision


async def _turned_away_or_waiting(client: aiohttp.ClientSession, proxy: Running, route: str,
                                  mode: str, store: SeesRetries) -> None:  # fmt: skip
    """Until the proxy has answered a retry 409 (reject) or holds one waiting (wait)."""
    await store.met.wait()

    async def seen() -> bool:
        samples = await scrape(client, proxy.admin_url)
        if mode == "reject":
            return value(samples, "idempotency_proxy_requests_total",
                         route=route, method="POST", outcome="conflict") >= 1  # fmt: skip
        return value(samples, "idempotency_proxy_waiters") >= 1

    await wait_until(seen, 25, f"a retry turned away or waiting ({mode})", 0.05)


@pytest.mark.parametrize("mode", ["reject", "wait"])
@pytest.mark.parametrize("name", list(SDKS))
async def test_sdk_retry_through_the_proxy_executes_once(
    fake_api: FakeApi, client: aiohttp.ClientSession, name: str, mode: str
) -> None:
    """The SDK retries a timed-out create with the same key: one execution; it says SURFACED."""
    sdk = SDKS[name]
    route_id = f"{name}-{mode}-{os.urandom(3).hex()}"  # metrics are process-wide
    route = {**sdk.route, "id": route_id, "on_concurrent": mode, "wait_timeout": "5s"}
    config = parse_config(raw_config(fake_api.url, routes=[route, {"path": "/*"}]), env={})
    store = SeesRetries()
    async with serve(config, store) as proxy:
        call = asyncio.ensure_future(asyncio.to_thread(surfaced, sdk, proxy.url, SDK_TIMEOUT[mode]))
        watch = asyncio.ensure_future(_turned_away_or_waiting(client, proxy, route_id, mode, store))
        await asyncio.wait({call, watch}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        fake_api.release.set()  # the first attempt answers now
        result = await asyncio.wait_for(call, 15)
        watch.cancel()
        met = await _met(client, proxy, route_id)
    assert result.startswith(SURFACED[(name, mode)]), result
    assert met[MET[mode]] >= 1, met  # the retry did meet the running first attempt
    header = sdk.route.get("key_header", "Idempotency-Key")
    assert [sent for sent, _ in fake_api.keys_seen] == [header]  # one key, one execution
    assert list(fake_api.executions.values()) == [1]
