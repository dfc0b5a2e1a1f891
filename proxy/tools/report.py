"""`idempotency-proxy report`: what enforcing would change, read from running proxies.

A route in `mode: observe` forwards everything and counts what enforcing would have done
(`proxy.observing`). This command scrapes those counters from the admin listener's
`/metrics` of one proxy or several (`--admin URL`, repeated: the counters are summed, as
for replicas behind one load balancer) and prints a table per route and the sentence that
matters: how many requests the upstream executed twice. The window is the time since the
earliest of the proxies started (its counters start at zero then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ENV_ADMIN_TOKEN
from proxy.tools.options import Commands, positive

DEFAULT_ADMIN = "http://127.0.0.1:9090"
DEFAULT_TIMEOUT = 5.0
PREFIX = "idempotency_proxy_"
# Counter (without prefix and _total) -> field of `RouteCounts`; the `would` counter by kind.
_COUNTERS = {
    "observed_requests": "requests",
    "observed_keys": "keys",
    "keyless_duplicates": "keyless_suspects",
}
_WOULD_FIELDS = {
    "would_replay": "duplicates",
    "would_conflict": "concurrent",
    "would_mismatch": "mismatches",
    "would_reject_missing_key": "missing_keys",
    "would_reject_invalid_key": "invalid_keys",
    "would_reject_too_large": "too_large",
}


@dataclass
class RouteCounts:
    """One route's observe-mode counters, summed over the proxies scraped."""

    route: str
    requests: int = 0  # requests for a protected method while observing
    keys: int = 0  # keys first seen (records created)
    duplicates: int = 0  # retries of a finished key: executed again
    concurrent: int = 0  # duplicates while the first attempt ran: executed again
    mismatches: int = 0  # a key reused for another request
    missing_keys: int = 0  # require_key, none sent
    invalid_keys: int = 0
    too_large: int = 0  # bodies over max_request_body (not recorded)
    keyless_suspects: int = 0  # keyless requests identical to one just before

    @property
    def executed_twice(self) -> int:
        return self.duplicates + self.concurrent

    def minus(self, earlier: RouteCounts) -> RouteCounts:
        """What happened since `earlier` was read."""
        counts = {f.name: getattr(self, f.name) - getattr(earlier, f.name)
                  for f in fields(self) if f.name != "route"}  # fmt: skip
        return RouteCounts(self.route, **counts)


@dataclass(frozen=True, slots=True)
class Report:
    routes: list[RouteCounts]
    seconds: float  # the window the counters cover

    @property
    def executed_twice(self) -> int:
        return sum(route.executed_twice for route in self.routes)

    def as_json(self) -> dict[str, Any]:
        return {
            "window_seconds": round(self.seconds, 3),
            "executed_twice": self.executed_twice,
            "routes": [
                asdict(route) | {"executed_twice": route.executed_twice} for route in self.routes
            ],
            "summary": sentence(self),
        }


def summarise(scrapes: Iterable[str], now: float) -> Report:
    """Add up the observe-mode counters of several `/metrics` texts, by route."""
    routes: dict[str, RouteCounts] = {}
    started: list[float] = []
    for text in scrapes:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name.removeprefix(PREFIX)
                if name == "start_time_seconds":
                    started.append(sample.value)
                    continue
                name = name.removesuffix("_total")
                field = _COUNTERS.get(name)
                if name == "observe_would":
                    field = _WOULD_FIELDS.get(sample.labels.get("kind", ""))
                route = sample.labels.get("route")
                if field is None or route is None:
                    continue
                counts = routes.setdefault(route, RouteCounts(route))
                setattr(counts, field, getattr(counts, field) + int(sample.value))
    return Report(sorted(routes.values(), key=lambda r: r.route),
                  max(0.0, now - min(started, default=now)))  # fmt: skip


def since(before: Report, after: Report) -> Report:
    """The counts between two reports of the same proxies (`after` - `before`)."""
    earlier = defaultdict(lambda: RouteCounts(""), {r.route: r for r in before.routes})
    return Report([route.minus(earlier[route.route]) for route in after.routes],
                  after.seconds - before.seconds)  # fmt: skip


def window(seconds: float) -> str:
    """`45 seconds`, `12 minutes`, `3.5 hours`."""
    if seconds < 120:
        count, unit = f"{seconds:.0f}", "second"
    elif seconds < 2 * 3600:
        count, unit = f"{seconds / 60:.0f}", "minute"
    else:
        count, unit = f"{seconds / 3600:.1f}", "hour"
    return f"{count} {unit}{'' if count == '1' else 's'}"


def sentence(report: Report) -> str:
    """The one line to take to a meeting."""
    twice = report.executed_twice
    mismatches = sum(route.mismatches for route in report.routes)
    suspects = sum(route.keyless_suspects for route in report.routes)
    text = (
        f"{twice} requests executed twice in the last {window(report.seconds)}: the upstream "
        "ran a retry or a concurrent duplicate of a request it had already received; "
        "enforcing would have answered them from the first execution."
    )
    if mismatches:
        text += f" {mismatches} requests reused a key for another request (enforcing: 422)."
    if suspects:
        text += f" {suspects} requests without a key looked like duplicates (not blocked)."
    return text


COLUMNS = (
    ("route", "route"), ("requests", "requests"), ("keys", "keys"),
    ("duplicates", "duplicate executions"), ("concurrent", "concurrent duplicates"),
    ("mismatches", "mismatches"), ("missing_keys", "missing keys"),
    ("keyless_suspects", "keyless suspects"),
)  # fmt: skip


def format_report(report: Report) -> str:
    """The table, one row per route, and the sentence under it."""
    rows = [[label for _, label in COLUMNS]]
    rows += [[str(getattr(route, name)) for name, _ in COLUMNS] for route in report.routes]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]  # fmt: skip
    if not report.routes:
        lines.append("  (no route has observe-mode counters: is this an idempotency-proxy?)")
    summary = textwrap.fill(sentence(report), width=92, initial_indent="  ",
                            subsequent_indent="  ")  # fmt: skip
    return "\n".join(lines) + "\n\n" + summary + "\n"


async def scrape(urls: Sequence[str], token: str | None, timeout: float) -> list[str]:
    """The `/metrics` text of each admin listener; `OSError`-like failures name the URL."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout, headers=headers) as session:

        async def one(url: str) -> str:
            try:
                async with session.get(url.rstrip("/") + "/metrics") as response:
                    if response.status != 200:
                        raise ReportError(f"{url}: /metrics answered {response.status}")
                    return await response.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ReportError(f"{url}: cannot read /metrics ({type(exc).__name__})") from exc

        return list(await asyncio.gather(*(one(url) for url in urls)))


class ReportError(Exception):
    """An admin listener could not be read."""


async def read_report(urls: Sequence[str], token: str | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> Report:  # fmt: skip
    return summarise(await scrape(urls, token, timeout), time.time())


def add_parser(commands: Commands) -> None:
    """The `report` command and its options."""
    show = commands.add_parser(
        "report", help="what enforcing would change: the observe-mode counters of running proxies"
    )
    show.add_argument(
        "--admin", action="append", metavar="URL",
        help=f"a proxy's admin listener (repeatable: counters are summed; default {DEFAULT_ADMIN})",
    )  # fmt: skip
    show.add_argument(
        "--admin-token", help=f"the admin listener's bearer token (default: ${ENV_ADMIN_TOKEN})"
    )
    show.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT,
                      help="seconds to wait for each proxy (default %(default)s)")  # fmt: skip
    show.add_argument("--json", action="store_true", help="print the report as JSON")
    show.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """The `report` command."""
    token = args.admin_token or os.environ.get(ENV_ADMIN_TOKEN) or None
    try:
        report = asyncio.run(read_report(args.admin or [DEFAULT_ADMIN], token, args.timeout))
    except ReportError as exc:
        print(f"idempotency-proxy report: {exc}", file=sys.stderr)
        return 1
    out.write(json.dumps(report.as_json(), indent=2) + "\n" if args.json else format_report(report))
    return 0
