"""`idempotency-proxy demo`: what a retry storm does to a payments API, with and without the proxy.

The first thing a new user runs, so it needs nothing but this package: in one process, on
loopback, it starts the toy non-idempotent payments API (`proxy.tools.legacy_api`) and the
proxy in front of it on the memory store, then plays the same retry storm twice, once straight
at the API and once through the proxy. The storm is what real clients do: give up after a
short timeout and retry with the same Idempotency-Key, back off and retry on 409, and sometimes
send one payment from several clients at once (a double click, two workers on one job).
The counts of charges come from the API's own books, not from what the clients believe.

With `--observe` the second run goes through a proxy in `mode: observe`: it forwards every
retry and counts them, and the demo prints `idempotency-proxy report` beside the API's books,
which agree duplicate for duplicate.

The proxy runs with `on_concurrent: reject` (the default is `wait`), so the demo shows the
409s a client that retries must handle: a retry that races a first attempt still running
gets 409 and tries again shortly after, until it gets the first attempt's answer replayed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from proxy.config import Config, parse_config
from proxy.server import serve
from proxy.tools.legacy_api import Ledger, LedgerSummary, LegacyApi, serve_legacy_api
from proxy.tools.options import Commands, positive
from proxy.tools.report import Report, format_report, read_report, since

DEFAULT_REQUESTS = 40
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = 0.5
CHARGES_PATH = "/v1/charges"
ROUTE_ID = "charges"
KEY_HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
# The storm. A slow API call takes SLOW_FACTOR client timeouts, so its client always gives
# up on it; SLOW_SHARE of the calls are slow. Every BURST_EVERY-th payment is sent by
# BURST_SIZE clients at the same moment.
SLOW_SHARE = 0.25
SLOW_FACTOR = 2.0
BURST_EVERY = 4
BURST_SIZE = 3
AMOUNT_RANGE = (500, 25_000)  # cents
# Each client stops after MAX_ATTEMPTS; with the backoff below that is always long enough for
# a slow first attempt to finish, so no payment is left unconfirmed through the proxy.
# The backoff after a 409 is shorter than the proxy's Retry-After (1 s), to keep the demo
# short; a real client should honour Retry-After.
MAX_ATTEMPTS = 8
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 0.4
# Answers after which a client tries again, besides timeouts and connection errors.
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class DemoOptions:
    requests: int = DEFAULT_REQUESTS  # payments in the storm, each with its own key
    concurrency: int = DEFAULT_CONCURRENCY  # payments in flight at once
    timeout: float = DEFAULT_TIMEOUT  # the clients' timeout, seconds
    seed: int | None = None
    serve: bool = True  # keep both servers up for curl until Ctrl-C
    observe: bool = False  # the proxy only observes: forwards every retry, counts them


@dataclass(frozen=True, slots=True)
class Payment:
    number: int
    amount: int  # cents
    senders: int  # clients sending it at the same moment


@dataclass
class StormTally:
    """What the clients saw during one storm."""

    payments: int = 0
    requests: int = 0
    timeouts: int = 0
    conflicts: int = 0  # 409: still in progress
    replayed: int = 0
    errors: int = 0  # connection errors and 5xx
    confirmed: int = 0  # payments at least one of whose clients got a 2xx
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class StormResult:
    tally: StormTally
    books: LedgerSummary  # the API's own count of what this storm did


@dataclass(frozen=True, slots=True)
class DemoResult:
    direct: StormResult
    proxied: StormResult
    seed: int
    api_url: str
    proxy_url: str
    report: Report | None = None  # with --observe: what the proxy counted during its storm


def plan_payments(count: int, seed: int) -> list[Payment]:
    """The storm's payments: the same amounts and bursts for both runs."""
    rng = random.Random(seed)
    return [
        Payment(n, rng.randint(*AMOUNT_RANGE), BURST_SIZE if n % BURST_EVERY == 1 else 1)
        for n in range(count)
    ]


def proxy_config(upstream: str, observe: bool = False) -> Config:
    """The demo's proxy: loopback, free ports, memory store, the default policy (observing
    only, with `observe`)."""
    raw = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream": upstream,
        "store": {"url": "memory://"},
        "shutdown_grace": "2s",
        "routes": [
            {
                "path": CHARGES_PATH,
                "id": ROUTE_ID,
                "on_concurrent": "reject",
                "mode": "observe" if observe else "enforce",
            }
        ],
    }
    # env={}: the user's IDEMPOTENCY_PROXY_* variables (a Redis URL, a listen address) are
    # for their real proxy, not for the demo's.
    return parse_config(raw, source="<demo>", env={})


async def run_demo(
    options: DemoOptions,
    out: TextIO,
    err: TextIO,
    ledger: Ledger | None = None,
    stop: asyncio.Event | None = None,
) -> DemoResult:
    """Run the storm straight and through the proxy, print the comparison, maybe serve on.

    `ledger` lets a caller read the API's books afterwards; `stop` ends the serving phase
    (by default SIGINT or SIGTERM does).
    """
    seed = options.seed if options.seed is not None else random.randrange(1_000_000)
    slow_seconds = options.timeout * SLOW_FACTOR
    api = LegacyApi(ledger or Ledger(), slow_share=SLOW_SHARE, slow_seconds=slow_seconds, seed=seed)
    plan = plan_payments(options.requests, seed)
    async with (
        serve_legacy_api("127.0.0.1", 0, api) as api_url,
        serve(proxy_config(api_url, options.observe)) as proxy,
    ):
        out.write(_introduction(options, seed, api_url, proxy.url))
        out.flush()
        progress = Progress(err, total=2 * len(plan))
        direct = await run_storm(api, api_url, plan, "direct", options, seed, progress)
        before = await read_report([proxy.admin_url])
        name = "observe" if options.observe else "proxy"
        proxied = await run_storm(api, proxy.url, plan, name, options, seed, progress)
        progress.close()
        out.write(format_table(direct, proxied, options.observe))
        report = None
        if options.observe:
            report = await counted_by_proxy(proxy.admin_url, before, proxied.books.charges)
            out.write("\n  idempotency-proxy report, for the storm through the proxy:\n\n")
            out.write(format_report(report))
        out.flush()
        result = DemoResult(direct, proxied, seed, api_url, proxy.url, report)
        if options.serve:
            api.slow_share = 0.0  # by hand, every answer is prompt
            out.write(_try_it(api_url, proxy.url))
            out.flush()
            await (stop.wait() if stop is not None else _interrupted())
    return result


async def counted_by_proxy(admin_url: str, before: Report, charges: int) -> Report:
    """The proxy's report of one storm, once it has counted every request the API served.

    The API's books are read once it is idle; the proxy counts a request when it has sent
    the API's answer on, a moment later. (Every request the proxy forwarded is a charge.)
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while True:
        report = since(before, await read_report([admin_url]))
        # Only the demo's route: a process that ran other proxies has their counters too.
        report = Report([r for r in report.routes if r.route == ROUTE_ID], report.seconds)
        counted = sum(route.requests for route in report.routes)
        if counted >= charges or loop.time() > deadline:
            return report
        await asyncio.sleep(0.01)


async def run_storm(
    api: LegacyApi,
    base_url: str,
    plan: list[Payment],
    name: str,
    options: DemoOptions,
    seed: int,
    progress: Progress,
) -> StormResult:
    """Send every payment of `plan` to `base_url`, `options.concurrency` at a time."""
    tally = StormTally(payments=len(plan))
    rng = random.Random(f"{seed}-{name}")
    prefix = f"demo-{name}-"
    limit = asyncio.Semaphore(options.concurrency)
    timeout = aiohttp.ClientTimeout(total=options.timeout)
    connector = aiohttp.TCPConnector(limit=options.concurrency * BURST_SIZE)
    started = time.perf_counter()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def pay(payment: Payment) -> None:
            async with limit:
                key = f"{prefix}{payment.number:05d}"
                body = {
                    "amount": payment.amount,
                    "currency": "usd",
                    "description": f"order #{payment.number}",
                }
                sends = (
                    send(session, base_url + CHARGES_PATH, key, body, rng, tally)
                    for _ in range(payment.senders)
                )
                confirmations = await asyncio.gather(*sends)
            tally.confirmed += any(confirmations)
            progress.advance(name)

        await asyncio.gather(*(pay(p) for p in plan))
    tally.seconds = time.perf_counter() - started
    # Requests a client gave up on are still being served: count once the API is quiet.
    await api.idle(timeout=options.timeout * SLOW_FACTOR + 1.0)
    return StormResult(tally, api.ledger.summary(prefix))


async def send(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    body: dict[str, object],
    rng: random.Random,
    tally: StormTally,
) -> bool:
    """One client paying once: retry with the same key until an answer is final."""
    delay = BACKOFF_FIRST
    for _attempt in range(MAX_ATTEMPTS):
        tally.requests += 1
        try:
            async with session.post(url, json=body, headers={KEY_HEADER: key}) as response:
                await response.read()
                status = response.status
                replayed = response.headers.get(REPLAY_HEADER) == "true"
        except TimeoutError:  # the client's patience ran out; the API may have acted
            tally.timeouts += 1
        except aiohttp.ClientError:
            tally.errors += 1
        else:
            if 200 <= status < 300:
                tally.replayed += replayed
                return True
            if status == 409:
                tally.conflicts += 1
            elif status in RETRY_STATUSES:
                tally.errors += 1
            else:
                return False  # a final refusal: retrying would not change it
        await asyncio.sleep(delay * (0.5 + rng.random()))  # jittered, so bursts spread out
        delay = min(delay * 2, BACKOFF_MAX)
    return False


async def _interrupted() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


# --- what it prints ----------------------------------------------------------------------


def format_money(cents: int) -> str:
    return f"${cents // 100:,}.{cents % 100:02d}"


# The table's rows, in order; `table_values` fills them.
TABLE_ROWS = (
    "payments",
    "requests sent",
    "client timeouts",
    "409 still in progress",
    "replayed answers",
    "payments confirmed",
    "charges created",
    "duplicate charges",
    "money charged twice",
)


def table_values(result: StormResult) -> dict[str, str]:
    tally, books = result.tally, result.books
    values = (
        tally.payments,
        tally.requests,
        tally.timeouts,
        tally.conflicts,
        tally.replayed,
        tally.confirmed,
        books.charges,
        books.duplicate_charges,
        format_money(books.amount_charged_twice),
    )
    return {label: str(value) for label, value in zip(TABLE_ROWS, values, strict=True)}


def format_table(direct: StormResult, proxied: StormResult, observe: bool = False) -> str:
    """The side-by-side comparison, and what it means in one sentence."""
    left, right = table_values(direct), table_values(proxied)
    column = "observing proxy" if observe else "through the proxy"
    lines = [f"  {'':24}{'straight to the API':>22}{column:>22}"]
    lines += [f"  {label:24}{left[label]:>22}{right[label]:>22}" for label in TABLE_ROWS]
    lines.append("")
    lines.append("  (charges counted from the API's own books: charges per Idempotency-Key)")
    books = direct.books
    verdict = (
        f"Without the proxy, {books.duplicate_charges} of {books.charges} charges were "
        f"duplicates: {format_money(books.amount_charged_twice)} charged twice. Through the "
        f"proxy: {proxied.books.duplicate_charges} duplicate charges."
    )
    if observe:
        verdict = (
            f"Without the proxy, {books.duplicate_charges} of {books.charges} charges were "
            "duplicates. Through the observing proxy, which changes nothing, "
            f"{proxied.books.duplicate_charges} were: "
            f"{format_money(proxied.books.amount_charged_twice)} charged twice, each one "
            "counted by the proxy below."
        )
    return "\n".join(lines) + "\n" + _wrap(verdict) + "\n"


def _introduction(options: DemoOptions, seed: int, api_url: str, proxy_url: str) -> str:
    slow = options.timeout * SLOW_FACTOR
    storm = (
        f"{options.requests} payments, {options.concurrency} at a time, sent twice: straight to "
        f"the API, then through the proxy. Clients give up after {options.timeout:g} s and retry "
        f"with the same {KEY_HEADER}; {SLOW_SHARE:.0%} of API calls take {slow:g} s; every "
        f"{BURST_EVERY}th payment is sent by {BURST_SIZE} clients at once. Seed {seed} (--seed "
        "to replay)."
    )
    return (
        "idempotency-proxy demo: a retry storm against a payments API that is not idempotent\n"
        "\n"
        f"  legacy API  {api_url}  every POST {CHARGES_PATH} creates a charge\n"
        f"  proxy       {proxy_url}  in front of it: memory store, on_concurrent: reject"
        + (", mode: observe\n" if options.observe else "\n")
        + "\n"
        + _wrap(storm)
        + "\n"
    )


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=92, initial_indent="  ", subsequent_indent="  ") + "\n"


def _try_it(api_url: str, proxy_url: str) -> str:
    body = '\'{"amount": 1999, "currency": "usd"}\''
    other = '\'{"amount": 2500, "currency": "usd"}\''
    post = f"curl -i -X POST -H 'Content-Type: application/json' -H '{KEY_HEADER}: try-1'"
    return (
        "Both servers stay up; try it by hand (the API is no longer slow). Ctrl-C stops them.\n"
        "\n"
        "  # Straight at the API: run it twice, get two charges\n"
        f"  {post} {api_url}{CHARGES_PATH} -d {body}\n"
        "\n"
        "  # Through the proxy: run it twice; the second answer is the first, replayed\n"
        f"  {post} {proxy_url}{CHARGES_PATH} -d {body}\n"
        "\n"
        "  # The same key with a different amount: 422, nothing charged\n"
        f"  {post} {proxy_url}{CHARGES_PATH} -d {other}\n"
        "\n"
        "  # The API's books: charges, duplicates, money charged twice\n"
        f"  curl {api_url}/v1/stats\n"
        "\n"
        "  # Audit both\n"
        f"  idempotency-proxy audit {api_url}{CHARGES_PATH} --yes\n"
        f"  idempotency-proxy audit {proxy_url}{CHARGES_PATH} --yes\n"
    )


@dataclass
class Progress:
    """A one-line text bar on `stream`, drawn only when it is a terminal."""

    stream: TextIO
    total: int
    done: int = 0
    width: int = 30
    enabled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.enabled = self.stream.isatty()

    def advance(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r  [{bar}] {self.done}/{self.total} payments ({label})  ")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.stream.flush()


def add_parser(commands: Commands) -> None:
    """The `demo` command and its options."""
    show = commands.add_parser(
        "demo", help="show what a retry storm does to a payments API, with and without the proxy"
    )
    show.add_argument(
        "--requests",
        type=positive(int),
        default=DEFAULT_REQUESTS,
        help="payments in the storm, each with its own key (default %(default)s)",
    )
    show.add_argument(
        "--concurrency",
        type=positive(int),
        default=DEFAULT_CONCURRENCY,
        help="payments in flight at once (default %(default)s)",
    )
    show.add_argument(
        "--timeout",
        type=positive(float),
        default=DEFAULT_TIMEOUT,
        help="the clients' timeout in seconds (default %(default)s)",
    )
    show.add_argument("--seed", type=int, help="replay a run: the seed it printed")
    show.add_argument(
        "--observe",
        action="store_true",
        help="run the second storm through a proxy in mode: observe, and print its report",
    )
    show.add_argument(
        "--no-serve",
        action="store_true",
        help="exit after the table instead of serving until Ctrl-C",
    )
    show.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The `demo` command."""
    options = DemoOptions(
        requests=args.requests,
        concurrency=args.concurrency,
        timeout=args.timeout,
        seed=args.seed,
        serve=not args.no_serve,
        observe=args.observe,
    )
    try:
        asyncio.run(run_demo(options, sys.stdout, sys.stderr))
    except KeyboardInterrupt:  # Ctrl-C during the storm: nothing to clean up by hand
        print(file=sys.stderr)
        return 130
    return 0
