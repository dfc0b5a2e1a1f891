"""The soak: prove "at most once per key" under faults, and count what it cost.

`bench/soak` starts, all on 127.0.0.1 and all its own: a redis-server on a free port (with an
append-only file fsynced on every write, so a restart reloads the records; `--redis-persistence
none` shows what happens without), the counting upstream (`soak_upstream.py`), one or two
`idempotency-proxy run` processes sharing that Redis, and client drivers in separate processes.
The drivers send a bounded number of requests; every logical operation is one key, retried with
the same key on timeouts, 409, 503 and connection errors, some fired as concurrent duplicates,
some with a client timeout shorter than the answer, some retried again after success.

Meanwhile faults run on a schedule: the upstream refuses, resets, hangs and answers slowly
(per request, seeded), Redis is SIGKILLed and restarted, and with two proxies one of them is
SIGKILLed and restarted. At the end the upstream's execution count per key decides:
duplicate executions = sum over keys of max(0, executions - 1). The exit status is 1 when
there was any duplicate (or a consistency check failed), 2 when the run was cut short.

Requests are counted as HTTP attempts (every retry is one). The duplicate rate is duplicate
executions / keys; its one-sided 95 % upper bound is the rule of three (3 / keys) when there are
none, else the exact Clopper-Pearson bound (Wilson's score bound above 5,000 duplicates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PATH = "/v1/orders"
KEY_HEADER = "Idempotency-Key"
PROBLEM = b"urn:idempotency-proxy:problem:"
NAMESPACE = "soak"
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
# Settings a caller's environment must not slip into the soak's proxies.
SCRUBBED_ENV = ("PROMETHEUS_MULTIPROC_DIR",)
SCRUBBED_ENV_PREFIX = "IDEMPOTENCY_PROXY_"


def fail(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n may be millions)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    base = math.lgamma(n + 1)
    logs = [
        base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]  # fmt: skip
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def upper_bound_95(k: int, n: int) -> tuple[float, str]:
    """One-sided 95 % upper bound of a rate seen as k in n, and the method's name."""
    if n <= 0:
        return float("nan"), "no keys"
    if k <= 0:
        return 3.0 / n, "rule of three: 3 / keys"
    k = min(k, n)
    if k > 5000:
        z, p = 1.6448536, k / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return min(1.0, (centre + spread) / (1 + z * z / n)), "Wilson score, one-sided"
    low, high = k / n, 1.0
    for _ in range(80):
        mid = (low + high) / 2
        if binomial_cdf(k, n, mid) > 0.05:
            low = mid
        else:
            high = mid
    return high, "exact Clopper-Pearson, one-sided"


def percent(rate: float) -> str:
    if rate == 0:
        return "0 %"
    if math.isnan(rate):
        return "n/a"
    digits = max(2, 1 - math.floor(math.log10(rate * 100)))
    return f"{rate * 100:.{digits}f} %"


# --- the client driver (runs in its own process) ------------------------------------------


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


# --- the processes the soak runs ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(python_path: Path | None = None) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in SCRUBBED_ENV and not name.startswith(SCRUBBED_ENV_PREFIX)
    }
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    return env


async def wait_until(check: Any, seconds: float, what: str) -> float:
    """Poll `check()` until it is true; return how long it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > seconds:
            raise RuntimeError(f"{what} not ready after {seconds:g}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@dataclass
class RedisServer:
    """The soak's own redis-server; SIGKILLed and restarted on the schedule."""

    port: int
    directory: Path
    persistence: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    down_seconds: float = 0.0

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        persistence = ["--appendonly", "no"]
        if self.persistence == "aof":
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.directory), "--loglevel", "warning"],
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    async def ready(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    async def restart(self, down: float) -> None:
        started = time.monotonic()
        self.kill()
        await asyncio.sleep(down)
        self.start()
        await wait_until(self.ready, 120, "redis-server after a restart")
        self.restarts += 1
        self.down_seconds += time.monotonic() - started

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class ProxyProcess:
    """One `idempotency-proxy run` process; its metrics survive its SIGKILLs."""

    index: int
    port: int
    admin_port: int
    config: Path
    log_dir: Path
    command: list[str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    kills: int = 0
    metrics: Counter[str] = field(default_factory=Counter)
    last_scrape: Counter[str] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.incarnation += 1
        log = open(self.log_dir / f"proxy{self.index}-{self.incarnation}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*self.command, "run", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env=child_env(self.cwd if self.cwd != ROOT else None),
            cwd=self.cwd,
        )
        log.close()
        self.last_scrape = Counter()

    async def healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"proxy {self.index} exited with {self.process.returncode}; see {self.log_dir}"
            )
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{self.admin_port}/healthz", timeout=aiohttp.ClientTimeout(1)
                ) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def scrape(self) -> None:
        """Keep the latest counters of this incarnation (lost with it otherwise)."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(
                    f"http://127.0.0.1:{self.admin_port}/metrics", timeout=aiohttp.ClientTimeout(5)
                ) as response,
            ):
                self.last_scrape = parse_metrics(await response.text())
        except (aiohttp.ClientError, TimeoutError) as exc:
            fail(f"scraping proxy {self.index} failed: {exc!r}")

    async def sigkill_and_restart(self) -> None:
        await self.scrape()
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.kills += 1
        self.metrics.update(self.last_scrape)
        self.start()
        await wait_until(self.healthy, 60, f"proxy {self.index} after a restart")

    async def terminate(self) -> tuple[int | None, float]:
        """SIGTERM, wait for the drain; (exit status, seconds)."""
        await self.scrape()
        self.metrics.update(self.last_scrape)
        assert self.process is not None
        started = time.monotonic()
        self.process.terminate()
        try:
            code = await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = None
        return code, time.monotonic() - started


def parse_metrics(text: str) -> Counter[str]:
    """The counters the report uses, summed over labels other than the interesting one."""
    wanted = {
        "idempotency_proxy_requests_total": "outcome",
        "idempotency_proxy_store_errors_total": "operation",
        "idempotency_proxy_lease_renewals_total": "result",
        "idempotency_proxy_unrecorded_responses_total": None,
    }
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if name not in wanted:
            continue
        labels, _, value = rest.rpartition("} ")
        label = wanted[name]
        suffix = ""
        if label is not None:
            marker = f'{label}="'
            at = labels.find(marker) + len(marker)
            suffix = ":" + labels[at : labels.find('"', at)]
        out[name.removeprefix("idempotency_proxy_") + suffix] += int(float(value))
    return out


def proxy_command(source: Path | None) -> tuple[list[str], Path, str]:
    """How to run a proxy, where, and which code that is (for the report)."""
    if source is not None:
        return [sys.executable, "-m", "proxy"], source, f"{source}/proxy (--proxy-source)"
    binary = Path(sys.executable).parent / "idempotency-proxy"
    found = str(binary) if binary.exists() else shutil.which("idempotency-proxy")
    command = [found] if found else [sys.executable, "-m", "proxy"]
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "proxy")
    except (OSError, subprocess.CalledProcessError):
        return command, ROOT, "installed idempotency-proxy"
    state = " with uncommitted changes in proxy/" if dirty else ""
    return command, ROOT, f"installed idempotency-proxy, {ROOT} at {head}{state}"


def git(*args: str) -> str:
    command = ["git", "-C", str(ROOT), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def write_proxy_config(
    path: Path, port: int, admin_port: int, upstream: str, store: str, args: argparse.Namespace
) -> None:
    path.write_text(f"""\
# Written by bench/soak: short leases so a killed proxy's records lapse quickly.
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
upstream: {upstream}
log_level: {args.proxy_log_level}
shutdown_grace: 10s
store: {{url: "{store}", fail_mode: closed, timeout: {args.store_timeout}s, namespace: {NAMESPACE}}}
defaults:
  methods: [POST, PATCH]
  require_key: true
  ttl: {args.ttl}s
  lease: {args.lease}s
  on_concurrent: reject
  on_unknown_outcome: reject
  upstream_timeout: {args.upstream_timeout}s
routes:
  - {{path: /*, id: soak}}
""")


# --- the orchestrator ---------------------------------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    directory: Path
    prefix: str
    redis: RedisServer
    proxies: list[ProxyProcess]
    upstream_port: int
    upstream: subprocess.Popen[bytes] | None = None
    drivers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop_faults: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    code: str = ""
    findings: int = 0  # lines in the proxies' logs worth reading: keep the logs

    async def start(self) -> None:
        self.redis.start()
        await wait_until(self.redis.ready, 30, "redis-server")
        self.start_upstream()
        for proxy in self.proxies:
            proxy.start()

        async def upstream_up() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(upstream_up, 30, "the upstream")
        for proxy in self.proxies:
            await wait_until(proxy.healthy, 60, f"proxy {proxy.index}")

    def start_upstream(self) -> None:
        args = self.args
        faults = {
            "--refuse-share": args.refuse_share,
            "--reset-share": args.reset_share,
            "--hang-share": args.hang_share,
            "--hang-seconds": args.upstream_timeout + 1.0,
            "--slow-share": args.slow_share,
            "--slow-min": args.slow_min,
            "--slow-max": args.slow_max,
        }
        command = [
            sys.executable,
            str(HERE / "soak_upstream.py"),
            "--port",
            str(self.upstream_port),
        ]
        command += ["--keys", str(args.requests), "--prefix", self.prefix, "--seed", str(args.seed)]
        for option, value in faults.items():
            command += [option, str(value)]
        log = open(self.directory / "upstream.log", "wb")  # noqa: SIM115
        self.upstream = subprocess.Popen(command, stdout=log, stderr=log, env=child_env())
        log.close()

    def start_drivers(self) -> None:
        args = self.args
        count = args.drivers
        for number in range(count):
            spec = {
                "proxies": [proxy.url for proxy in self.proxies],
                "prefix": self.prefix,
                "start": number,
                "step": count,
                "keys": args.requests,
                "budget": args.requests // count + (1 if number < args.requests % count else 0),
                "concurrency": max(1, args.concurrency // count),
                "seed": args.seed * 1000 + number,
                "client_timeout": args.client_timeout,
                "short_timeout": [0.002, 0.05],
                "duplicate_share": args.duplicate_share,
                "duplicate_copies": args.duplicate_copies,
                "timeout_share": args.timeout_share,
                "retry_after_success_share": args.retry_share,
                "retry_after_success_delay": args.retry_delay,
                "max_attempts": args.max_attempts,
                "backoff_base": 0.05,
                "backoff_cap": BACKOFF_CAP,
                "max_seconds": args.max_seconds,
                "grace": 15.0,
                "out": str(self.directory / f"driver{number}.json"),
                "progress": str(self.directory / f"driver{number}.progress"),
            }
            path = self.directory / f"driver{number}.spec.json"
            path.write_text(json.dumps(spec))
            self.drivers.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--driver", str(path)],
                    env=child_env(),
                )
            )

    async def redis_restarts(self) -> None:
        every = self.args.redis_restart_every
        if every <= 0:
            return
        due = every / 2
        while not await self.sleep_until(due):
            await self.redis.restart(self.args.redis_down)
            due += every

    async def proxy_kills(self) -> None:
        every = self.args.proxy_kill_every
        if every <= 0 or len(self.proxies) < 2:
            return
        due = every / 2
        victim = 0
        while not await self.sleep_until(due):
            await self.proxies[victim % len(self.proxies)].sigkill_and_restart()
            victim += 1
            due += every

    async def sleep_until(self, due: float) -> bool:
        """Sleep until `due` seconds into the run; True when the faults should stop."""
        delay = self.started + due - time.monotonic()
        try:
            await asyncio.wait_for(self.stop_faults.wait(), max(0.0, delay))
        except TimeoutError:
            return False
        return True

    def progress(self) -> tuple[int, int]:
        sent = operations = 0
        for number in range(len(self.drivers)):
            try:
                data = json.loads((self.directory / f"driver{number}.progress").read_text())
            except (OSError, ValueError):
                continue
            sent += data["sent"]
            operations += data["operations"]
        return sent, operations

    async def run(self) -> dict[str, Any]:
        await self.start()
        self.started = time.monotonic()
        self.start_drivers()
        faults = [
            asyncio.create_task(self.redis_restarts()),
            asyncio.create_task(self.proxy_kills()),
        ]
        deadline = self.started + self.args.max_seconds
        next_progress = self.started + self.args.progress_every
        cut_short = False
        while any(driver.poll() is None for driver in self.drivers):
            for task in faults:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            if self.upstream is not None and self.upstream.poll() is not None:
                raise RuntimeError(f"the upstream exited; see {self.directory}/upstream.log")
            now = time.monotonic()
            if now > deadline and not cut_short:
                fail(f"--max-seconds {self.args.max_seconds:g} reached: stopping the drivers")
                cut_short = True
                for driver in self.drivers:
                    driver.send_signal(signal.SIGTERM)
            if now >= next_progress:
                sent, operations = self.progress()
                elapsed = now - self.started
                print(
                    f"soak: {elapsed:6.0f}s  {sent:>10,} requests  {operations:>9,} keys  "
                    f"{sent / elapsed:7,.0f} req/s  redis restarts {self.redis.restarts}  "
                    f"proxy kills {sum(p.kills for p in self.proxies)}",
                    file=sys.stderr,
                    flush=True,
                )
                next_progress += self.args.progress_every
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - self.started
        self.stop_faults.set()
        await asyncio.gather(*faults)  # a restart under way completes first
        return await self.collect(elapsed, cut_short)

    async def collect(self, elapsed: float, cut_short: bool) -> dict[str, Any]:
        drivers = []
        codes = bytearray(self.args.requests)
        for number, driver in enumerate(self.drivers):
            out = self.directory / f"driver{number}.json"
            if driver.returncode != 0 or not out.exists():
                raise RuntimeError(f"driver {number} failed (exit {driver.returncode})")
            drivers.append(json.loads(out.read_text()))
            mine = out.with_suffix(".codes").read_bytes()
            for index in range(number, len(codes), len(self.drivers)):
                codes[index] = mine[index]
        # Let the leases of records whose owner died lapse before looking for stuck ones.
        await asyncio.sleep(self.args.lease + 0.5)
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{self.upstream_port}"
            async with session.get(base + "/__counts") as response:
                counts = await response.read()
            async with session.get(base + "/__stats") as response:
                upstream_stats = await response.json()
        records = await asyncio.to_thread(scan_records, self.redis.port)
        exits = [await proxy.terminate() for proxy in self.proxies]
        return {
            "elapsed": elapsed,
            "cut_short": cut_short,
            "drivers": drivers,
            "codes": codes,
            "counts": counts,
            "upstream": upstream_stats,
            "records": records,
            "exits": exits,
        }

    def stop_all(self) -> None:
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
        for proxy in self.proxies:
            if proxy.process is not None and proxy.process.poll() is None:
                proxy.process.kill()
        if self.upstream is not None and self.upstream.poll() is None:
            self.upstream.terminate()
            try:
                self.upstream.wait(5)
            except subprocess.TimeoutExpired:
                self.upstream.kill()
        self.redis.kill()


def scan_records(port: int) -> dict[str, Any]:
    """What the soak's Redis holds at the end: records by state, in-flight storage keys."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    states: Counter[str] = Counter()
    in_flight: list[str] = []
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for name in batch:
            pipe.hget(name, "st")
        for name, state in zip(batch, pipe.execute(), strict=True):
            # None: the record expired (ttl) between SCAN and HGET
            states[{b"f": "in_flight", b"d": "done", None: "expired"}.get(state, "other")] += 1
            if state == b"f":
                in_flight.append(name.decode())
        batch.clear()

    for name in client.scan_iter(match="idp:*", count=5000):
        batch.append(name)
        if len(batch) >= 5000:
            flush()
    if batch:
        flush()
    memory = client.info("memory").get("used_memory_human")
    persistence = client.info("persistence")
    client.close()
    return {
        "states": dict(states),
        "in_flight": in_flight,
        "memory": memory,
        "aof_bytes": persistence.get("aof_current_size"),
    }


def scan_logs(directory: Path) -> Counter[str]:
    """What the proxies wrote at warning level or above, and every traceback, by kind."""
    found: Counter[str] = Counter()
    for path in sorted(directory.glob("proxy*.log")):
        where = ""
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    pass
                else:
                    found[f"{entry.get('level')}: {entry.get('event')}"] += 1
                    continue
            if line.startswith("  File "):
                where = line.strip().split(", in ")[0].removeprefix("File ")
            elif line and not line[0].isspace() and not line.startswith("Traceback"):
                if where or "Error" in line or "Exception" in line:
                    found[f"{line.strip()[:120]}{' at ' + where if where else ''}"] += 1
                where = ""
    return found


# --- the report ---------------------------------------------------------------------------


def report(args: argparse.Namespace, soak: Soak, result: dict[str, Any]) -> int:
    counts: bytes = result["counts"]
    codes: bytearray = result["codes"]
    drivers = result["drivers"]
    sent = sum(d["sent"] for d in drivers)
    statuses: Counter[str] = Counter()
    checks: Counter[str] = Counter()
    for driver in drivers:
        statuses.update(driver["statuses"])
        checks.update(driver["checks"])
    keys = sum(1 for code in codes if code != NOT_RUN)
    executed = duplicates = keys_with_duplicates = 0
    ended: Counter[str] = Counter()
    cross: Counter[str] = Counter()
    duplicated: list[int] = []
    for index, (code, count) in enumerate(zip(codes, counts, strict=True)):
        if code == NOT_RUN:
            if count:
                cross["executed, but the key was never sent (!)"] += 1
            continue
        ended[CODE_NAMES[code]] += 1
        executed += count
        if count > 1:
            duplicates += count - 1
            keys_with_duplicates += 1
            duplicated.append(index)
        if code == SUCCESS and count == 0:
            cross["2xx answer, never executed (!)"] += 1
        elif code in (DISCONNECTED, TIMED_OUT) and count == 0:
            cross["upstream-disconnected/timeout, never executed (!)"] += 1
        elif code == LAPSED and count == 0:
            cross["outcome-unknown (lease lapsed), never executed: orphaned record"] += 1
        elif code == LAPSED:
            cross["outcome-unknown (lease lapsed), executed once"] += 1
        elif code == GAVE_UP and count:
            cross["gave up, executed once"] += 1
        elif code == GAVE_UP:
            cross["gave up, never executed"] += 1
    rate = duplicates / keys if keys else float("nan")
    bound, method = upper_bound_95(duplicates, keys)
    upstream = result["upstream"]
    elapsed = result["elapsed"]
    persistence = (
        "append-only file, appendfsync always (restarts reload the records)"
        if args.redis_persistence == "aof"
        else "none (a restart loses every record)"
    )

    print()
    print(
        f"## Soak: {args.requests:,} requests, {len(soak.proxies)} proxies, "
        f"{args.drivers} client processes, Redis persistence: {args.redis_persistence}"
    )
    print()
    table = [
        ("requests (HTTP attempts, retries included)", f"{sent:,}"),
        ("keys (logical operations)", f"{keys:,}"),
        ("upstream executions", f"{executed:,}"),
        ("duplicate executions", f"{duplicates:,}"),
        ("keys executed more than once", f"{keys_with_duplicates:,}"),
        ("duplicate rate", percent(rate)),
        ("95 % upper bound", f"{percent(bound)} ({method})"),
    ]
    print_table(("measure", "value"), table)
    print()
    faults = [
        ("upstream resets (connection dropped after acting)", upstream.get("resets", 0)),
        (f"upstream slow answers ({args.slow_min:g}-{args.slow_max:g} s)", upstream.get("slow", 0)),
        ("upstream hangs (> upstream_timeout)", upstream.get("hangs", 0)),
        ("upstream 503 refusals (not executed)", upstream.get("refused_503", 0)),
        ("redis restarts (SIGKILL + start)", soak.redis.restarts),
        ("proxy SIGKILLs + restarts", sum(p.kills for p in soak.proxies)),
        ("client timeouts", statuses.get("client timeout", 0)),
        ("client connection errors", statuses.get("connection error", 0)),
    ]
    print_table(("fault", "count"), [(name, f"{value:,}") for name, value in faults])
    print()
    print_table(
        ("answers seen by clients", "count"),
        [(name, f"{value:,}") for name, value in statuses.most_common()],
    )
    print()
    print_table(
        ("keys ended as", "count"), [(name, f"{value:,}") for name, value in ended.most_common()]
    )
    print()
    proxy_metrics: Counter[str] = Counter()
    for proxy in soak.proxies:
        proxy_metrics.update(proxy.metrics)
    print_table(
        ("proxy counters (summed over incarnations)", "count"),
        [(name, f"{value:,}") for name, value in sorted(proxy_metrics.items())],
    )
    print()
    records = result["records"]
    in_flight = records["in_flight"]
    stuck = describe_in_flight(in_flight, codes, counts, soak.prefix)
    checks_rows: list[tuple[str, object]] = [*checks.items(), *cross.items(), *stuck.items()]
    checks_rows.append(("records in Redis at the end, by state", json.dumps(records["states"])))
    checks_rows.append(
        (
            "redis memory / AOF bytes",
            f"{records['memory']} / "
            f"{records['aof_bytes'] if records['aof_bytes'] is not None else '-'}",
        )
    )
    for proxy, (code, seconds) in zip(soak.proxies, result["exits"], strict=True):
        checks_rows.append(
            (f"proxy {proxy.index} SIGTERM at the end", f"exit {code} after {seconds:.1f}s")
        )
    logs = scan_logs(soak.directory)
    soak.findings += sum(logs.values())
    for message, count in logs.most_common(12):
        checks_rows.append((f"proxy log: {message}", f"{count:,}"))
    print_table(("checks", "value"), [(name, str(value)) for name, value in checks_rows])
    print()
    print(
        f"elapsed {elapsed:.1f} s, {sent / elapsed:,.0f} requests/s; redis persistence: "
        f"{persistence}; redis down {soak.redis.down_seconds:.1f} s in total; "
        f"lease {args.lease:g} s, upstream_timeout {args.upstream_timeout:g} s, "
        f"client timeout {args.client_timeout:g} s; ttl {args.ttl:g} s (a key lives at most "
        f"{key_lifetime(args):g} s); seed {args.seed}; proxy: {soak.code}"
    )
    if duplicated:
        sample = ", ".join(f"{soak.prefix}-{i} x{counts[i]}" for i in duplicated[:10])
        print(f"duplicated keys (first 10): {sample}")
    bad = [
        name
        for name, _ in [*checks.items(), *cross.items()]
        if "(!)" in name
        or name.startswith(
            (
                "2xx answer from",
                "2xx answer for",
                "retry after success answered without",
                "unexpected",
            )
        )
    ]
    bad_exit = any(code != 0 for code, _ in result["exits"])
    if result["cut_short"]:
        print("INCOMPLETE: --max-seconds reached; the numbers cover what ran")
        return 2
    if ended[CODE_NAMES[SUCCESS]] < keys / 2:
        print("NOT A SOAK: fewer than half of the keys got a 2xx answer; see the checks above")
        return 2
    return 1 if duplicates or bad or bad_exit else 0


def describe_in_flight(
    in_flight: list[str], codes: bytearray, counts: bytes, prefix: str
) -> Counter[str]:
    """Map in-flight records left at the end back to keys (their storage key is a hash)."""
    out: Counter[str] = Counter()
    if not in_flight:
        return out
    try:
        from proxy.keys import scope_of, storage_key
    except ImportError:
        out["records left in flight (keys unknown)"] = len(in_flight)
        return out
    scope = scope_of([("Authorization", ())])
    wanted = set(in_flight)
    for index, code in enumerate(codes):
        if code != NOT_RUN and storage_key(NAMESPACE, scope, f"{prefix}-{index}") in wanted:
            executed = "executed" if counts[index] else "never executed"
            out[f"left in flight (lease lapsed): key ended as {CODE_NAMES[code]}, {executed}"] += 1
    return out


def print_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    width = max([len(header[0]), *(len(name) for name, _ in rows)])
    right = max([len(header[1]), *(len(value) for _, value in rows)])
    print(f"| {header[0]:<{width}} | {header[1]:>{right}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (right + 1)}:|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>{right}} |")


# --- the command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/soak",
        description="Drive the proxy under faults and count duplicate executions per key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--requests", type=int, default=100_000, help="HTTP requests to send, retries included")
    add("--proxies", type=int, default=2, choices=(1, 2, 3, 4), help="proxy processes")
    add("--drivers", type=int, default=2, help="client processes")
    add("--concurrency", type=int, default=192, help="operations in flight, all drivers")
    add("--max-seconds", type=float, default=1800.0, help="safety limit for the whole run")
    add("--seed", type=int, default=1)
    group = parser.add_argument_group("clients")
    group.add_argument(
        "--duplicate-share",
        type=float,
        default=0.05,
        help="operations sent as concurrent duplicates",
    )
    group.add_argument("--duplicate-copies", type=int, default=3)
    group.add_argument(
        "--timeout-share",
        type=float,
        default=0.03,
        help="operations whose first attempt times out on the client (2-50 ms)",
    )
    group.add_argument(
        "--retry-share",
        type=float,
        default=0.10,
        help="operations retried once more after their success",
    )
    group.add_argument(
        "--retry-delay", type=float, default=1.0, help="that retry waits up to this many seconds"
    )
    group.add_argument("--client-timeout", type=float, default=1.0)
    group.add_argument("--max-attempts", type=int, default=20)
    group = parser.add_argument_group("faults")
    group.add_argument("--slow-share", type=float, default=0.02)
    group.add_argument("--slow-min", type=float, default=0.2)
    group.add_argument("--slow-max", type=float, default=2.5)
    group.add_argument("--reset-share", type=float, default=0.003)
    group.add_argument(
        "--hang-share",
        type=float,
        default=0.0005,
        help="answers slower than upstream_timeout (504)",
    )
    group.add_argument(
        "--refuse-share",
        type=float,
        default=0.003,
        help="upstream 503s before acting (released, executed on retry)",
    )
    group.add_argument(
        "--redis-restart-every",
        type=float,
        default=20.0,
        help="seconds between Redis SIGKILL+restarts (0: never)",
    )
    group.add_argument("--redis-down", type=float, default=0.5, help="seconds Redis stays down")
    group.add_argument("--redis-persistence", choices=("aof", "none"), default="aof")
    group.add_argument(
        "--proxy-kill-every",
        type=float,
        default=10.0,
        help="seconds between proxy SIGKILL+restarts, with 2+ proxies (0: never)",
    )
    group = parser.add_argument_group("proxy")
    group.add_argument("--lease", type=float, default=2.0)
    group.add_argument("--ttl", type=float, default=300.0, help="record ttl (see key_lifetime)")
    group.add_argument("--upstream-timeout", type=float, default=3.0)
    group.add_argument("--store-timeout", type=float, default=0.5)
    group.add_argument(
        "--proxy-log-level", default="warning", choices=("debug", "info", "warning", "error")
    )
    add("--progress-every", type=float, default=10.0)
    add("--proxy-source", type=Path, help="run `python -m proxy` from this checkout instead")
    add("--keep", action="store_true", help="keep the temp dir (logs, AOF) afterwards")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.drivers < 1 or args.concurrency < args.drivers:
        parser.error("--requests, --drivers and --concurrency must be positive")
    if not args.client_timeout < args.upstream_timeout:
        parser.error("--client-timeout must be below --upstream-timeout")
    if not args.slow_max < args.upstream_timeout:
        parser.error("--slow-max must be below --upstream-timeout")
    if args.ttl < 2 * key_lifetime(args):
        parser.error(f"--ttl must be at least twice the longest key life, {key_lifetime(args):g}s")
    return args


def key_lifetime(args: argparse.Namespace) -> float:
    """The longest a key can see requests: two rounds of attempts (the operation, then the
    retry after success), each attempt a client timeout plus a capped backoff. A record
    must outlive it, or a late retry would legitimately execute again."""
    return float(2 * args.max_attempts * (args.client_timeout + BACKOFF_CAP) + args.retry_delay)


async def soak_main(args: argparse.Namespace) -> int:
    directory = Path(tempfile.mkdtemp(prefix="idempotency-soak-"))
    redis = RedisServer(free_port(), directory, args.redis_persistence)
    upstream_port = free_port()
    command, cwd, code = proxy_command(args.proxy_source)
    proxies = []
    for index in range(args.proxies):
        port, admin = free_port(), free_port()
        config = directory / f"proxy{index}.yaml"
        write_proxy_config(
            config, port, admin, f"http://127.0.0.1:{upstream_port}", redis.url, args
        )
        proxies.append(ProxyProcess(index, port, admin, config, directory, command, cwd))
    soak = Soak(args, directory, f"soak{os.urandom(3).hex()}", redis, proxies, upstream_port)
    soak.code = code
    print(
        f"soak: {args.requests:,} requests, {args.proxies} proxies, {args.drivers} drivers, "
        f"redis persistence {args.redis_persistence}; work dir {directory}",
        file=sys.stderr,
        flush=True,
    )
    status = 3
    try:
        result = await soak.run()
        status = report(args, soak, result)
    finally:
        soak.stop_all()
        if args.keep or status != 0 or soak.findings:
            print(f"soak: logs and data kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--driver"]:
        return run_driver(argv[1])
    args = parse_args(argv)
    return asyncio.run(soak_main(args))


if __name__ == "__main__":
    sys.exit(main())
