"""The soak's load: client drivers, each in its own process, sending keyed operations.

A driver sends operations for keys start, start+step, ... until its request budget is spent.
Every logical operation is one key, retried with the same key on timeouts, 409, 503 and
connection errors; some are fired as concurrent duplicates, some with a client timeout
shorter than the answer, some retried again after their success. What each key ended as
is one byte per key (the codes below), written for the orchestrator with the statuses and
consistency checks the driver saw. Run as `python -m bench.soak_load SPEC.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

PATH = "/v1/orders"
KEY_HEADER = "Idempotency-Key"
PROBLEM = b"urn:idempotency-proxy:problem:"
BACKOFF_CAP = 1.0

# What a key ended as, one byte per key (drivers -> orchestrator).
NOT_RUN, SUCCESS, DISCONNECTED, TIMED_OUT, LAPSED, GAVE_UP, UNEXPECTED, UNFINISHED = range(8)
RETRY = -1
CODE_NAMES = {
    SUCCESS: "2xx answer",
    DISCONNECTED: "502 upstream-disconnected (stored)",
    TIMED_OUT: "504 upstream-timeout (stored)",
    LAPSED: "502 outcome-unknown (lease lapsed)",
    GAVE_UP: "gave up (attempts exhausted)",
    UNEXPECTED: "unexpected answer",
    UNFINISHED: "unfinished (run cut short)",
}
TERMINAL_SLUGS = {
    b"upstream-disconnected": DISCONNECTED,
    b"upstream-timeout": TIMED_OUT,
    b"outcome-unknown": LAPSED,
}
RETRYABLE_SLUGS = (b"key-in-use", b"store-unavailable", b"upstream-unreachable")


class Driver:
    """Sends operations for keys start, start+step, ... until its request budget is spent."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.urls = [url + PATH for url in spec["proxies"]]
        self.prefix = spec["prefix"]
        self.next_index = spec["start"]
        self.step = spec["step"]
        self.keys = spec["keys"]
        self.budget = spec["budget"]
        self.codes = bytearray(self.keys)
        self.rng = random.Random(spec["seed"])
        self.timeout = aiohttp.ClientTimeout(total=spec["client_timeout"])
        self.sent = 0
        self.operations = 0
        self.statuses: Counter[str] = Counter()
        self.checks: Counter[str] = Counter()
        self.stopping = False
        self.session: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        ) as self.session:
            started = time.monotonic()
            workers = [asyncio.create_task(self.worker()) for _ in range(self.spec["concurrency"])]
            reporter = asyncio.create_task(self.report_progress())
            done, pending = await asyncio.wait(workers, timeout=self.spec["max_seconds"])
            if pending:  # cut short (SIGTERM or the time limit): give operations a grace
                self.stopping = True
                done, pending = await asyncio.wait(pending, timeout=self.spec["grace"])
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            reporter.cancel()
            elapsed = time.monotonic() - started
        self.write_results(elapsed)

    def stop(self) -> None:
        self.stopping = True

    async def worker(self) -> None:
        while not self.stopping and self.sent < self.budget and self.next_index < self.keys:
            index = self.next_index
            self.next_index += self.step
            self.operations += 1
            self.codes[index] = UNFINISHED
            self.codes[index] = await self.operation(index)

    async def operation(self, index: int) -> int:
        spec = self.spec
        key = f"{self.prefix}-{index}"
        body = b'{"order":%d,"amount":100}' % index
        headers = {KEY_HEADER: key, "Content-Type": "application/json"}
        expected = b'{"key":"%s","execution":1}' % key.encode()
        target = index // self.step  # spreads each driver's keys over the proxies
        roll = self.rng.random()
        if roll < spec["duplicate_share"]:
            self.checks["operations with concurrent duplicates"] += 1
            copies = [
                self.attempts(target + copy, body, headers, expected, first_timeout=None)
                for copy in range(spec["duplicate_copies"])
            ]
            codes = await asyncio.gather(*copies)
        elif roll < spec["duplicate_share"] + spec["timeout_share"]:
            self.checks["operations with a client timeout first"] += 1
            low, high = spec["short_timeout"]
            codes = [
                await self.attempts(
                    target, body, headers, expected, first_timeout=self.rng.uniform(low, high)
                )
            ]
        else:
            codes = [await self.attempts(target, body, headers, expected, first_timeout=None)]
        code = merge_codes(codes)
        if len(set(codes) - {GAVE_UP}) > 1:
            self.checks["concurrent copies ended differently"] += 1
        if code == SUCCESS and self.rng.random() < spec["retry_after_success_share"]:
            await asyncio.sleep(self.rng.uniform(0, spec["retry_after_success_delay"]))
            self.checks["retries after success"] += 1
            again = await self.attempts(
                target + 1, body, headers, expected, first_timeout=None, expect_replay=True
            )
            if again != SUCCESS:
                self.checks[f"retry after success ended as: {CODE_NAMES[again]}"] += 1
        return code

    async def attempts(
        self,
        target: int,
        body: bytes,
        headers: dict[str, str],
        expected: bytes,
        first_timeout: float | None,
        expect_replay: bool = False,
    ) -> int:
        """One client's attempts with one key until a terminal answer; returns its code."""
        assert self.session is not None
        post = self.session.post
        for attempt in range(self.spec["max_attempts"]):
            if attempt == 0 and first_timeout is not None:
                timeout = aiohttp.ClientTimeout(total=first_timeout)
            else:
                timeout = self.timeout
            self.sent += 1
            try:
                async with post(
                    self.urls[target % len(self.urls)], data=body, headers=headers, timeout=timeout
                ) as response:
                    status = response.status
                    data = await response.read()
                    replayed = "Idempotent-Replayed" in response.headers
            except TimeoutError:
                self.statuses["client timeout"] += 1
            except aiohttp.ClientError:
                self.statuses["connection error"] += 1
                target += 1  # fail over to the next proxy
            else:
                code = self.classify(status, data, replayed, expected, expect_replay)
                if code != RETRY:
                    return code
            if self.stopping and attempt >= 1:
                return UNFINISHED
            delay = min(self.spec["backoff_cap"], self.spec["backoff_base"] * 2**attempt)
            await asyncio.sleep(delay * self.rng.uniform(0.5, 1.0))
        return GAVE_UP

    def classify(
        self, status: int, data: bytes, replayed: bool, expected: bytes, expect_replay: bool
    ) -> int:
        tag = " replayed" if replayed else ""
        if 200 <= status < 300:
            self.statuses[f"{status}{tag or ' first answer'}"] += 1
            if data != expected:
                if data.startswith(expected[: expected.rfind(b":") + 1]):
                    self.checks["2xx answer from a second execution"] += 1
                else:
                    self.checks["2xx answer for another key"] += 1
            if expect_replay and not replayed:
                self.checks["retry after success answered without Idempotent-Replayed"] += 1
            return SUCCESS
        start = data.find(PROBLEM)
        if start < 0:
            if status == 503:  # the upstream refused (a release status): not executed
                self.statuses[f"503 from upstream{tag}"] += 1
                return RETRY
            self.statuses[f"{status} (not a proxy problem){tag}"] += 1
            self.checks["unexpected answers"] += 1
            return UNEXPECTED
        start += len(PROBLEM)
        slug = data[start : data.find(b'"', start)]
        self.statuses[f"{status} {slug.decode(errors='replace')}{tag}"] += 1
        if slug in RETRYABLE_SLUGS:
            return RETRY
        code = TERMINAL_SLUGS.get(slug)
        if code is None:
            self.checks["unexpected answers"] += 1
            return UNEXPECTED
        return code

    async def report_progress(self) -> None:
        path = Path(self.spec["progress"])
        while True:
            await asyncio.sleep(1.0)
            path.with_suffix(".tmp").write_text(
                json.dumps({"sent": self.sent, "operations": self.operations})
            )
            path.with_suffix(".tmp").replace(path)

    def write_results(self, elapsed: float) -> None:
        out = Path(self.spec["out"])
        out.with_suffix(".codes").write_bytes(bytes(self.codes))
        out.write_text(json.dumps({
            "sent": self.sent, "operations": self.operations, "elapsed": elapsed,
            "statuses": self.statuses, "checks": self.checks, "stopped": self.stopping,
        }))  # fmt: skip


def merge_codes(codes: list[int]) -> int:
    """What a key ended as when several concurrent copies were sent."""
    for code in (SUCCESS, DISCONNECTED, TIMED_OUT, LAPSED, UNEXPECTED, UNFINISHED, GAVE_UP):
        if code in codes:
            return code
    return GAVE_UP


def run_driver(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    driver = Driver(spec)
    try:
        import uvloop
    except ImportError:
        asyncio.run(driver.run())
    else:
        uvloop.run(driver.run())
    return 0


def key_lifetime(args: argparse.Namespace) -> float:
    """The longest a key can see requests: two rounds of attempts (the operation, then the
    retry after success), each attempt a client timeout plus a capped backoff. A record
    must outlive it, or a late retry would legitimately execute again."""
    return float(2 * args.max_attempts * (args.client_timeout + BACKOFF_CAP) + args.retry_delay)


if __name__ == "__main__":
    sys.exit(run_driver(sys.argv[1]))
