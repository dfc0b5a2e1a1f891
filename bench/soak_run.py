"""The soak's orchestrator: start everything, run the load and the faults, collect.

It starts, all on 127.0.0.1 and all its own: the store (a redis-server, or a Sentinel
group), the counting upstream (`soak_upstream.py`), the proxies sharing that store, then the
client drivers; while the drivers run, the fault schedules SIGKILL the store (restarting
Redis, or failing the primary over) and the proxies. At the end it collects what the drivers
saw, the upstream's execution count per key and the records left in the store, and drains
the proxies with SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.soak_faults import SoakProxy, SoakStore, fail, make_proxies
from bench.soak_load import BACKOFF_CAP
from tests.support.proxies import REPO, child_env
from tests.support.waiting import wait_until

HERE = Path(__file__).resolve().parent


@dataclass
class Soak:
    args: argparse.Namespace
    directory: Path
    prefix: str
    store: SoakStore
    upstream_port: int
    proxies: list[SoakProxy] = field(default_factory=list)
    upstream: subprocess.Popen[bytes] | None = None
    drivers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stop_faults: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    code: str = ""
    findings: int = 0  # lines in the proxies' logs worth reading: keep the logs

    async def start(self) -> None:
        await self.store.launch()
        upstream_url = f"http://127.0.0.1:{self.upstream_port}"
        self.proxies, self.code = make_proxies(self.args, self.directory, upstream_url,
                                               self.store.url)  # fmt: skip
        self.start_upstream()
        for proxy in self.proxies:
            proxy.spawn()

        async def upstream_up() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(upstream_up, 30, "the upstream")
        for proxy in self.proxies:
            await proxy.wait_ready(listening=0, timeout=60)

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
                    [sys.executable, "-m", "bench.soak_load", str(path)], cwd=REPO, env=child_env()
                )
            )

    async def store_faults(self) -> None:
        every = self.args.store_fault_every
        if every <= 0:
            return
        due = every / 2
        while not await self.sleep_until(due):
            await self.store.fault()
            # A fault that took longer than the interval (a slow failover) is followed by
            # half an interval of calm, not at once by the next.
            due = max(due + every, time.monotonic() - self.started + every / 2)

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
            asyncio.create_task(self.store_faults()),
            asyncio.create_task(self.proxy_kills()),
            asyncio.create_task(self.store.watch(self.stop_faults)),
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
                    f"{sent / elapsed:7,.0f} req/s  store faults {self.store.faults}  "
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
            async with session.get(base + "/__repeats") as response:
                repeats = await response.json()
            async with session.get(base + "/__first") as response:
                first = array("d")
                first.frombytes(await response.read())
        scanned_at = time.time()
        records = await asyncio.to_thread(scan_records, self.store.primary_port())
        exits = [await proxy.drain() for proxy in self.proxies]
        return {
            "elapsed": elapsed,
            "cut_short": cut_short,
            "drivers": drivers,
            "codes": codes,
            "counts": counts,
            "upstream": upstream_stats,
            "repeats": repeats,
            "first": first,
            "scanned_at": scanned_at,
            "records": records,
            "exits": exits,
        }

    def stop_all(self) -> None:
        for driver in self.drivers:
            if driver.poll() is None:
                driver.kill()
        for proxy in self.proxies:
            proxy.kill()
        if self.upstream is not None and self.upstream.poll() is None:
            self.upstream.terminate()
            try:
                self.upstream.wait(5)
            except subprocess.TimeoutExpired:
                self.upstream.kill()
        self.store.kill()


def scan_records(port: int) -> dict[str, Any]:
    """What the soak's Redis holds at the end: records by state, in-flight storage keys,
    every storage key."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=30)
    states: Counter[str] = Counter()
    in_flight: list[str] = []
    names: set[str] = set()
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
        names.add(name.decode())
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
        "names": names,
        "memory": memory,
        "aof_bytes": persistence.get("aof_current_size"),
    }
