"""A toy "legacy payments" API that is not idempotent, for the demo, the audit tests and curl.

Every `POST /v1/charges` creates a new charge, whatever `Idempotency-Key` it carries: this is
the kind of service the proxy exists for. It can be made sometimes slow, so that clients with
a short timeout give up and retry while the charge is already committed, which is how real
duplicate charges happen. The API keeps its own books (`Ledger`): how many charges each key
produced, so the demo counts duplicates from the API's records rather than from what its
clients believe.

    POST /v1/charges        {"amount": 1999, "currency": "usd"} -> 201 {"id": "ch_...", ...}
    GET  /v1/charges        every charge, newest last
    GET  /v1/charges/{id}   one charge
    GET  /v1/stats          charges, duplicate charges and money charged twice, per the books
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field

from aiohttp import web

from proxy.server import bind
from proxy.tools.options import Commands, address, positive

# The headers a charge is attributed to, in order: the key a client meant to deduplicate by,
# or, for clients that send none, their own request id.
REQUEST_ID_HEADERS = ("Idempotency-Key", "X-Request-Id")
DEFAULT_CURRENCY = "usd"


@dataclass(frozen=True, slots=True)
class Charge:
    """One charge as the API stored it."""

    id: str
    amount: int  # cents
    currency: str
    description: str
    created: float
    request_id: str | None  # Idempotency-Key (or X-Request-Id) of the request that made it

    def public(self) -> dict[str, object]:
        return {"object": "charge", "status": "succeeded", **asdict(self)}


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    """What the books say about a set of charges."""

    charges: int
    duplicate_charges: int  # charges beyond the first for the same request id
    amount_charged_twice: int  # cents: the amounts of those extra charges
    duplicated_requests: dict[str, int]  # request id -> charges it produced, when more than one


@dataclass
class Ledger:
    """Every charge the API created, and which request ids produced more than one."""

    charges: list[Charge] = field(default_factory=list)

    def add(self, amount: int, currency: str, description: str, request_id: str | None) -> Charge:
        charge = Charge(
            id="ch_" + os.urandom(8).hex(),
            amount=amount,
            currency=currency,
            description=description,
            created=time.time(),
            request_id=request_id,
        )
        self.charges.append(charge)
        return charge

    def summary(self, request_prefix: str = "") -> LedgerSummary:
        """The books for charges whose request id starts with `request_prefix` ("" = all)."""
        selected = [
            c
            for c in self.charges
            if not request_prefix or (c.request_id or "").startswith(request_prefix)
        ]
        by_request: defaultdict[str, list[Charge]] = defaultdict(list)
        for charge in selected:
            if charge.request_id is not None:
                by_request[charge.request_id].append(charge)
        extra = [c for group in by_request.values() for c in group[1:]]
        return LedgerSummary(
            charges=len(selected),
            duplicate_charges=len(extra),
            amount_charged_twice=sum(c.amount for c in extra),
            duplicated_requests={k: len(g) for k, g in by_request.items() if len(g) > 1},
        )


@dataclass
class LegacyApi:
    """The API's state: its books, and how slow it is right now.

    `slow_share` of the charge requests answer only after `slow_seconds`; the charge is
    committed before the wait, as when a database commit is followed by a slow call to a card
    network, so a client that times out has already been charged.
    """

    ledger: Ledger = field(default_factory=Ledger)
    slow_share: float = 0.0
    slow_seconds: float = 0.0
    seed: int | None = None
    in_flight: int = 0
    _rng: random.Random = field(init=False, repr=False)
    _idle: asyncio.Event = field(init=False, repr=False, default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._idle.set()

    def started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    def draw_delay(self) -> float:
        if self.slow_share > 0 and self._rng.random() < self.slow_share:
            return self.slow_seconds
        return 0.0

    async def idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until no request is being handled; True if idle."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


LEGACY_API = web.AppKey("legacy_api", LegacyApi)


def create_legacy_app(api: LegacyApi | None = None) -> web.Application:
    """The toy payments API as an aiohttp app; `api` holds its state (a fresh one if None)."""
    app = web.Application()
    app[LEGACY_API] = api if api is not None else LegacyApi()
    app.router.add_post("/v1/charges", create_charge)
    app.router.add_get("/v1/charges", list_charges)
    app.router.add_get("/v1/charges/{id}", get_charge)
    app.router.add_get("/v1/stats", stats)
    return app


async def create_charge(request: web.Request) -> web.Response:
    api = request.app[LEGACY_API]
    api.started()
    try:
        # Lenient on purpose: `curl -d '{"amount": 100}'` sends a form content type.
        try:
            payload = json.loads(await request.read() or b"{}")
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(payload, dict):
            return _error(400, "the body must be a JSON object")
        amount = payload.get("amount", 1000)
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            return _error(400, "amount must be a positive whole number of cents")
        currency = str(payload.get("currency", DEFAULT_CURRENCY))
        description = str(payload.get("description", ""))
        request_id = next(
            (request.headers[h] for h in REQUEST_ID_HEADERS if h in request.headers), None
        )
        charge = api.ledger.add(amount, currency, description, request_id)
        delay = api.draw_delay()
        if delay:
            await asyncio.sleep(delay)
        return web.json_response(
            charge.public(), status=201, headers={"Location": f"/v1/charges/{charge.id}"}
        )
    finally:
        api.finished()


async def list_charges(request: web.Request) -> web.Response:
    charges = request.app[LEGACY_API].ledger.charges
    return web.json_response({"object": "list", "data": [c.public() for c in charges]})


async def get_charge(request: web.Request) -> web.Response:
    wanted = request.match_info["id"]
    for charge in request.app[LEGACY_API].ledger.charges:
        if charge.id == wanted:
            return web.json_response(charge.public())
    return _error(404, f"no charge {wanted}")


async def stats(request: web.Request) -> web.Response:
    summary = request.app[LEGACY_API].ledger.summary()
    return web.json_response(asdict(summary))


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


@asynccontextmanager
async def serve_legacy_api(host: str, port: int, api: LegacyApi) -> AsyncIterator[str]:
    """Serve the toy API on `host:port` (0 picks a free port) and yield its base URL."""
    runner = web.AppRunner(
        create_legacy_app(api), access_log=None, handle_signals=False, shutdown_timeout=0.5
    )
    await runner.setup()
    try:
        # Bound here rather than by TCPSite, so that port 0 tells us which port it got.
        sock = bind((host, port))
        await web.SockSite(runner, sock).start()
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


async def run_legacy_api(host: str, port: int, api: LegacyApi) -> None:
    """Serve the toy API until SIGTERM or SIGINT (the `legacy-api` command)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve_legacy_api(host, port, api) as url:
        print(f"legacy payments API (not idempotent) listening on {url}", flush=True)
        print(f"  curl -i -X POST {url}/v1/charges -d '{{\"amount\": 1999}}'", flush=True)
        await stop.wait()


def add_parser(commands: Commands) -> None:
    """The `legacy-api` command and its options."""
    legacy = commands.add_parser("legacy-api", help="serve the toy non-idempotent payments API")
    legacy.add_argument(
        "--listen", default="127.0.0.1:9000", type=address, help="HOST:PORT (default %(default)s)"
    )
    legacy.add_argument(
        "--slow-share",
        type=float,
        default=0.0,
        help="share of charge requests that answer late (default 0)",
    )
    legacy.add_argument(
        "--slow-seconds", type=positive(float), default=2.0, help="how late (default %(default)s)"
    )
    legacy.add_argument("--seed", type=int, help="seed for choosing the slow requests")
    legacy.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The `legacy-api` command: serve the toy API until SIGTERM or SIGINT."""
    host, port = args.listen
    api = LegacyApi(slow_share=args.slow_share, slow_seconds=args.slow_seconds, seed=args.seed)
    asyncio.run(run_legacy_api(host, port, api))
    return 0
