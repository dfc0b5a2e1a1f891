"""The processes the soak runs and the faults it inflicts on them.

The store (`SoakStore`) is by default the run's own redis-server with an append-only file
fsynced on every write (so a restart reloads the records; `--redis-persistence none` shows
what happens without), and it is SIGKILLed and restarted on a schedule; with `--store
sentinel` it is a Sentinel group whose primary is SIGKILLed instead (`soak_failover.py`).
With two proxies or more, one of them is SIGKILLed and restarted on another schedule; its
counters are scraped first, because they die with it. The upstream (`soak_upstream.py`)
misbehaves by itself, per request, seeded.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from tests.support.metrics import scrape, totals
from tests.support.ports import free_port
from tests.support.proxies import REPO, ProxyProcess
from tests.support.redis_server import RedisServer

NAMESPACE = "soak"
AOF = ("appendonly yes", "appendfsync always")
# The counters the report uses, each summed over every label but the one named.
COUNTERS = {
    "idempotency_proxy_requests_total": "outcome",
    "idempotency_proxy_store_errors_total": "operation",
    "idempotency_proxy_lease_renewals_total": "result",
    "idempotency_proxy_unrecorded_responses_total": None,
}


def fail(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


class SoakStore(Protocol):
    """The store the proxies share, and the fault the soak inflicts on it on a schedule."""

    @property
    def url(self) -> str:
        """The proxies' `store.url` (known once launched)."""
        ...

    @property
    def faults(self) -> int:
        """Faults inflicted so far (restarts, or failovers)."""
        ...

    @property
    def down_seconds(self) -> float:
        """Time the store refused writes over all faults, as far as it was measured."""
        ...

    async def launch(self) -> None:
        """Start it and wait until it takes writes."""

    async def fault(self) -> None:
        """Inflict one fault and wait until the store is whole again."""

    async def watch(self, stop: asyncio.Event) -> None:
        """Measure what the faults cost a writer, until `stop` (or return at once)."""

    def primary_port(self) -> int:
        """The port of the node that takes writes now (to read the records at the end)."""
        ...

    def kill(self) -> None:
        """SIGKILL every process of it."""


@dataclass
class SoakRedis(RedisServer):
    """The soak's redis-server, counting its restarts and how long it was down."""

    restarts: int = 0
    down_seconds: float = 0.0
    down: float = 0.5  # seconds it stays down at each restart

    @classmethod
    def create(cls, directory: Path, persistence: str, down: float) -> SoakRedis:
        config = AOF if persistence == "aof" else ()
        return cls(directory, config=config, log=directory / "redis.log", down=down)

    @property
    def faults(self) -> int:
        return self.restarts

    async def launch(self) -> None:
        await self.start_async(30)

    async def fault(self) -> None:
        await self.restart(self.down)

    async def watch(self, stop: asyncio.Event) -> None:
        return  # a restart's downtime is the time the process was gone

    def primary_port(self) -> int:
        return self.port

    async def restart(self, down: float) -> None:
        """SIGKILL, `down` seconds of absence, start again (reloading the AOF)."""
        started = time.monotonic()
        self.kill()
        await asyncio.sleep(down)
        await self.start_async(120)
        self.restarts += 1
        self.down_seconds += time.monotonic() - started


@dataclass
class SoakProxy(ProxyProcess):
    """One `idempotency-proxy run` process; its counters survive its SIGKILLs."""

    index: int = 0
    kills: int = 0
    metrics: Counter[str] = field(default_factory=Counter)
    last_scrape: Counter[str] = field(default_factory=Counter)

    def spawn(self) -> None:
        super().spawn()
        self.last_scrape = Counter()

    async def scrape(self) -> None:
        """Keep the latest counters of this incarnation (lost with it otherwise)."""
        try:
            async with aiohttp.ClientSession() as session:
                self.last_scrape = counters(await scrape(session, self.admin_url, timeout=5))
        except (aiohttp.ClientError, TimeoutError, AssertionError) as exc:
            fail(f"scraping proxy {self.index} failed: {exc!r}")

    async def sigkill_and_restart(self) -> None:
        await self.scrape()
        self.kill()
        self.kills += 1
        self.metrics.update(self.last_scrape)
        self.spawn()
        await self.wait_ready(listening=0, timeout=60)

    async def drain(self) -> tuple[int | None, float]:
        """SIGTERM, wait for the drain; (exit status, seconds)."""
        await self.scrape()
        self.metrics.update(self.last_scrape)
        started = time.monotonic()
        try:
            code: int | None = await self.stop(30)
        except TimeoutError:
            self.kill()
            code = None
        return code, time.monotonic() - started


def counters(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> Counter[str]:
    """The counters the report uses, named like `requests_total:forwarded`."""
    out: Counter[str] = Counter()
    for name, label in COUNTERS.items():
        short = name.removeprefix("idempotency_proxy_")
        for value, count in totals(samples, name, label).items():
            out[f"{short}:{value}" if label else short] += count
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
        return command, REPO, "installed idempotency-proxy"
    state = " with uncommitted changes in proxy/" if dirty else ""
    return command, REPO, f"installed idempotency-proxy, {REPO} at {head}{state}"


def git(*args: str) -> str:
    command = ["git", "-C", str(REPO), *args]
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
store: {{url: "{store}", fail_mode: closed, timeout: {args.store_timeout}s, namespace: {NAMESPACE},
         min_replicas_ack: {args.min_replicas_ack}}}
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


def make_proxies(
    args: argparse.Namespace, directory: Path, upstream_url: str, store_url: str
) -> tuple[list[SoakProxy], str]:
    """`args.proxies` proxies (not started yet) and which code they run, for the report."""
    command, cwd, code = proxy_command(args.proxy_source)
    env = {"PYTHONPATH": str(cwd)} if cwd != REPO else {}
    proxies = []
    for index in range(args.proxies):
        config = directory / f"proxy{index}.yaml"
        write_proxy_config(config, free_port(), free_port(), upstream_url, store_url, args)
        proxies.append(SoakProxy(config, directory / f"proxy{index}.log", env=env,
                                 command=command, cwd=cwd, index=index))  # fmt: skip
    return proxies, code
