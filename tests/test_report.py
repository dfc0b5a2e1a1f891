"""`idempotency-proxy report`: the observe-mode counters of running proxies, summed, as a
table and as JSON, over a real admin listener."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp

from proxy.tools.report import summarise, window
from tests.conftest import ProxyFactory, Upstream, key


async def duplicate(client: aiohttp.ClientSession, url: str, idem: str, times: int) -> None:
    for _ in range(times):
        async with client.post(url + "/v1/pay", data=b"{}",
                               headers={"Idempotency-Key": idem}) as response:  # fmt: skip
            assert response.status == 201


async def test_report_command_prints_each_route_and_the_sentence(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """The command reads the admin listener; --json has the same numbers as the table."""
    route = f"report-{os.urandom(3).hex()}"
    proxy = await start_proxy(routes=[{"path": "/*", "id": route, "mode": "observe"}])
    await duplicate(client, proxy.url, key("a"), 3)
    await duplicate(client, proxy.url, key("b"), 1)

    async def report(*options: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "report", "--admin", proxy.admin_url, *options,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), timeout=20)
        assert process.returncode == 0, err.decode()
        return out.decode()

    data = json.loads(await report("--json"))
    (row,) = [r for r in data["routes"] if r["route"] == route]
    assert (row["requests"], row["keys"], row["duplicates"], row["executed_twice"]) == (4, 2, 2, 2)
    assert data["window_seconds"] > 0 and data["executed_twice"] >= 2
    text = await report()
    (line,) = [line.split() for line in text.splitlines() if line.strip().startswith(route)]
    assert line == [route, "4", "2", "2", "0", "0", "0", "0"]
    assert "requests executed twice in the last" in text


async def test_report_adds_up_several_proxies_and_fails_on_an_unreachable_one(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Counters of several scrapes are summed by route; the window is from the earliest start."""
    route = f"sum-{os.urandom(3).hex()}"
    proxy = await start_proxy(routes=[{"path": "/*", "id": route, "mode": "observe"}])
    scrapes = []
    for times in (2, 3):
        await duplicate(client, proxy.url, key("s"), times)
        async with client.get(proxy.admin_url + "/metrics") as response:
            scrapes.append(await response.text())
    report = summarise(scrapes, now=10**10)
    (row,) = [r for r in report.routes if r.route == route]
    # The second scrape holds both rounds (2 + 3 requests, 2 keys, 1 + 2 duplicates).
    assert (row.requests, row.keys, row.duplicates) == (2 + 5, 1 + 2, 1 + 3)
    assert window(59) == "59 seconds" and window(3600) == "60 minutes"
    assert window(5 * 3600) == "5.0 hours" and window(1) == "1 second"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "report", "--admin", proxy.admin_url,
        "--admin", "http://127.0.0.1:1", "--timeout", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 1 and out == b""
    assert b"http://127.0.0.1:1: cannot read /metrics" in err
