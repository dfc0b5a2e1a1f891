"""The demo and its toy payments API, over real loopback sockets and with small numbers.

The demo's printed counts must be the API's own books, so the tests hand the demo a `Ledger`
and compare the table with it.
"""

from __future__ import annotations

import asyncio
import io
import re
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.tasks import spawn
from proxy.tools.demo import DemoOptions, Progress, format_money, run_demo
from proxy.tools.legacy_api import Ledger, LegacyApi, create_legacy_app
from tests.conftest import free_port

SMALL = DemoOptions(requests=12, concurrency=6, timeout=0.2, seed=3, serve=False)


def table(text: str) -> dict[str, tuple[str, str]]:
    """The printed table: row label -> (straight to the API, through the proxy)."""
    rows = {}
    for line in text.splitlines():
        match = re.match(r"^  (\S.*?)\s{2,}(\S+)\s+(\S+)$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


@pytest.fixture
async def legacy_url() -> AsyncIterator[tuple[LegacyApi, str]]:
    """The toy payments API on a free loopback port, prompt."""
    api = LegacyApi()
    server = TestServer(create_legacy_app(api), host="127.0.0.1", port=free_port())
    await server.start_server()
    yield api, str(server.make_url("")).rstrip("/")
    await server.close()


async def test_demo_prints_the_api_books_for_both_storms() -> None:
    """The demo's counts are the API's: duplicates straight at it, none through the proxy."""
    ledger = Ledger()
    out = io.StringIO()
    result = await run_demo(SMALL, out, io.StringIO(), ledger=ledger)

    rows = table(out.getvalue())
    for column, name in enumerate(("direct", "proxy")):
        books = ledger.summary(f"demo-{name}-")
        assert rows["payments"][column] == "12"
        assert rows["charges created"][column] == str(books.charges)
        assert rows["duplicate charges"][column] == str(books.duplicate_charges)
        assert rows["money charged twice"][column] == format_money(books.amount_charged_twice)
    direct, proxied = result.direct, result.proxied
    # Every 4th payment is a burst of 3: straight at the API that alone charges twice.
    assert direct.books.duplicate_charges >= 2 * 3
    # Straight at the API, every request that was sent is a charge.
    assert direct.tally.requests == direct.books.charges
    assert proxied.books.charges == 12
    assert proxied.books.duplicate_charges == 0
    assert proxied.books.amount_charged_twice == 0
    assert proxied.tally.confirmed == 12
    assert rows["replayed answers"][1] == str(proxied.tally.replayed) != "0"
    assert len(ledger.charges) == direct.books.charges + proxied.books.charges


async def test_demo_observe_report_counts_exactly_the_books_duplicates() -> None:
    """Through an observing proxy the API charges twice, and the proxy's report counts each."""
    ledger = Ledger()
    out = io.StringIO()
    options = DemoOptions(requests=12, concurrency=6, timeout=0.2, seed=3, serve=False,
                          observe=True)  # fmt: skip
    result = await run_demo(options, out, io.StringIO(), ledger=ledger)

    books = ledger.summary("demo-observe-")
    assert result.report is not None
    (route,) = result.report.routes
    assert books.duplicate_charges > 0  # observing changes nothing: the storm duplicates
    assert route.executed_twice == books.duplicate_charges
    assert route.requests == books.charges
    assert route.keys == 12 and route.mismatches == 0
    printed = out.getvalue()
    assert table(printed)["duplicate charges"][1] == str(books.duplicate_charges)
    assert f"{books.duplicate_charges} requests executed twice in the last" in printed


async def test_demo_serves_both_servers_until_stopped() -> None:
    """Without --no-serve the demo prints curl commands and both servers answer them."""
    out = io.StringIO()
    stop = asyncio.Event()
    ledger = Ledger()
    task = spawn(run_demo(DemoOptions(requests=2, timeout=0.2, seed=1), out, io.StringIO(),
                          ledger=ledger, stop=stop), "test-demo")  # fmt: skip
    for _ in range(500):
        if "Ctrl-C stops them" in out.getvalue():
            break
        await asyncio.sleep(0.01)
    printed = out.getvalue()
    api_url = re.findall(r"legacy API +(http://\S+)", printed)[0]
    proxy_url = re.findall(r"proxy +(http://\S+)", printed)[0]
    assert "curl -i -X POST" in printed and "/v1/stats" in printed
    before = len(ledger.charges)
    headers = {"Idempotency-Key": "by-hand"}
    async with aiohttp.ClientSession() as session:
        answers = []
        for _ in range(2):
            async with session.post(proxy_url + "/v1/charges", json={"amount": 1999},
                                    headers=headers) as response:  # fmt: skip
                answers.append((response.status, await response.json(), dict(response.headers)))
        assert answers[0][1] == answers[1][1]
        assert answers[1][2].get("Idempotent-Replayed") == "true"
        for _ in range(2):
            async with session.post(api_url + "/v1/charges", json={"amount": 1999},
                                    headers=headers) as response:  # fmt: skip
                assert response.status == 201
        async with session.get(api_url + "/v1/stats") as response:
            stats = await response.json()
    assert len(ledger.charges) == before + 3
    assert stats["duplicated_requests"]["by-hand"] == 3
    stop.set()
    await asyncio.wait_for(task, timeout=10)


async def test_demo_command_runs_in_seconds() -> None:
    """`idempotency-proxy demo --no-serve` with small numbers prints the table and exits 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--requests", "6", "--concurrency", "3",
        "--timeout", "0.2", "--seed", "5", "--no-serve",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 0, err.decode()
    rows = table(out.decode())
    assert rows["payments"] == ("6", "6")
    assert rows["duplicate charges"][1] == "0"
    assert rows["money charged twice"][1] == "$0.00"
    assert err == b""  # no progress bar when stderr is not a terminal


async def test_progress_bar_only_on_a_terminal() -> None:
    """The progress bar draws on a terminal and stays silent on a pipe or file."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    piped, terminal = io.StringIO(), Terminal()
    for stream in (piped, terminal):
        progress = Progress(stream, total=4)
        progress.advance("direct")
        progress.advance("direct")
        progress.close()
    assert piped.getvalue() == ""
    assert "[###############...............] 2/4 payments (direct)" in terminal.getvalue()


async def test_money_is_printed_as_currency() -> None:
    """Amounts are kept in cents and printed as dollars with thousands separators."""
    assert format_money(0) == "$0.00"
    assert format_money(5) == "$0.05"
    assert format_money(123456789) == "$1,234,567.89"


async def test_legacy_api_charges_every_post(legacy_url: tuple[LegacyApi, str]) -> None:
    """The toy API is not idempotent: one key, two POSTs, two charges, and its books say so."""
    api, url = legacy_url
    headers = {"Idempotency-Key": "k-1"}
    async with aiohttp.ClientSession() as session:
        ids = []
        for amount in (1999, 1999):
            async with session.post(url + "/v1/charges", json={"amount": amount},
                                    headers=headers) as response:  # fmt: skip
                assert response.status == 201
                charge = await response.json()
                assert response.headers["Location"] == f"/v1/charges/{charge['id']}"
                ids.append(charge["id"])
        async with session.post(url + "/v1/charges", data=b'{"amount": -1}') as response:
            assert response.status == 400
        async with session.get(url + "/v1/charges") as response:
            listed = [c["id"] for c in (await response.json())["data"]]
        async with session.get(url + f"/v1/charges/{ids[0]}") as response:
            assert (await response.json())["amount"] == 1999
    assert ids[0] != ids[1] and listed == ids
    summary = api.ledger.summary()
    assert (summary.charges, summary.duplicate_charges) == (2, 1)
    assert summary.amount_charged_twice == 1999
    assert summary.duplicated_requests == {"k-1": 2}


async def test_legacy_api_commits_before_it_is_slow() -> None:
    """A slow charge exists before its answer: a client that times out was charged anyway."""
    # The client's timeout leaves a busy machine time to deliver the request; the answer
    # comes well after it.
    api = LegacyApi(slow_share=1.0, slow_seconds=1.5)
    server = TestServer(create_legacy_app(api), host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                await session.post(server.make_url("/v1/charges"), json={"amount": 100},
                                   timeout=aiohttp.ClientTimeout(total=0.5))  # fmt: skip
        assert len(api.ledger.charges) == 1
        assert await api.idle(timeout=5)
    finally:
        await server.close()
