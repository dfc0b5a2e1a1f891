"""The benchmark behind the issue "Fast enough that nobody turns it off".

One invocation runs every case side by side with wrk, for a fixed duration each, against
servers it starts itself on loopback (nginx upstream, nginx proxy, the bare aiohttp
pass-through, the idempotency proxy, its own redis-server, and on demand a Sentinel group, a
Cluster or a primary with a replica: `bench/stores.py`), and prints req/s, p50, p99 and
the CPU the hop under test spent per request, each as a ratio to the bare pass-through
(bench/passthrough.py) with the same number of processes; then the one-connection
latency per hop, and one line per target with PASS or MISS. `bench/run --help` for options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import pyspy as profiling
from bench import services, stores, wrk
from bench.services import Server
from bench.stores import BenchStore
from tests.support.processes import process_tree
from tests.support.redis_server import RedisServer

BENCH_DIR = Path(__file__).resolve().parent
BODY = '{"amount":100,"currency":"EUR","customer":"cus_bench"}'
REPLAY_KEYS = 1000
QUIET_LOADAVG = 1.0  # below this 1-minute load average, `--pin auto` pins
TOOLS = {
    "wrk": "wrk",
    "nginx": "nginx-light",
    "redis-server": "redis-server",
    "taskset": "util-linux",
}


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    hop: str  # direct | nginx | passthrough | proxy
    path: str = "/pay/orders"
    script: str = "first.lua"
    store: str | None = None  # memory | redis | sentinel | cluster | replicated, for the proxy
    prefill: bool = False
    min_replicas_ack: int = 0
    # Off in the default run (which they would lengthen by minutes); `--only` names them.
    default: bool = True


# Every case sends the same request: POST, a small JSON body, a unique Idempotency-Key
# (except replays), so ratios compare the work of the hop and nothing else.
CASES = (
    Case("direct", "direct to the upstream (nginx)", "direct"),
    Case("nginx", "nginx as a plain reverse proxy", "nginx"),
    Case("passthrough", "bare aiohttp pass-through (the 1.0x reference)", "passthrough"),
    # Redis as the store so that 2 workers may run it; the unprotected route never calls it.
    Case("open", "this proxy, unprotected route", "proxy", path="/open/orders", store="redis"),
    Case("mem-first", "protected first attempts, memory://", "proxy", store="memory"),
    Case("redis-first", "protected first attempts, Redis", "proxy", store="redis"),
    Case(
        "redis-replay",
        "replays, Redis (every key done)",
        "proxy",
        script="replay.lua",
        store="redis",
        prefill=True,
    ),
    Case("redis-mix", "10 % retries, Redis", "proxy", script="mix.lua", store="redis"),
    # mode: observe, against redis-first and redis-mix: the same store work, and retries
    # forwarded to the upstream (streamed) instead of replayed.
    Case(
        "observe-first",
        "observe mode, first attempts, Redis",
        "proxy",
        path="/observe/orders",
        store="redis",
    ),
    Case(
        "observe-mix",
        "observe mode, 10 % retries forwarded, Redis",
        "proxy",
        path="/observe/orders",
        script="mix.lua",
        store="redis",
    ),
    # The production topologies, against redis-first: each starts its own servers.
    Case(
        "sentinel-first",
        "protected first attempts, Sentinel (primary + replica, 3 sentinels)",
        "proxy",
        store="sentinel",
        default=False,
    ),
    Case(
        "cluster-first",
        "protected first attempts, Cluster (3 masters)",
        "proxy",
        store="cluster",
        default=False,
    ),
    Case(
        "acks-first",
        "protected first attempts, Redis + replica, min_replicas_ack: 1",
        "proxy",
        store="replicated",
        min_replicas_ack=1,
        default=False,
    ),
)
CASE_NAMES = tuple(c.name for c in CASES)
DEFAULT_CASES = tuple(c.name for c in CASES if c.default)
LATENCY_HOPS = (
    "direct",
    "nginx",
    "passthrough",
    "open",
    "mem-first",
    "redis-first",
    "redis-replay",
    "observe-first",
    "sentinel-first",
    "cluster-first",
    "acks-first",
)
# The time it takes to start a topology and to stop it again, for the estimate.
TOPOLOGY_START_SECONDS = 5.0


@dataclass
class Measurement:
    case: str
    workers: int
    result: wrk.WrkResult | None = None
    hop_cpu: float | None = None  # CPU seconds of the hop under test
    redis_cpu: float | None = None  # of the store's data nodes (primaries and replicas)
    sentinel_cpu: float | None = None
    upstream_cpu: float | None = None
    skipped: str | None = None
    log_level: str | None = None  # the proxy's; None for the other hops
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.case if self.log_level is None else f"{self.case} @ {self.log_level}"

    def per_request(self, seconds: float | None) -> float | None:
        if seconds is None or self.result is None or self.result.requests == 0:
            return None
        return seconds / self.result.requests


# --- setup --------------------------------------------------------------------------------


def ensure_tools() -> None:
    """Install wrk, nginx, redis-server from the distribution when missing (needs root)."""
    missing = [
        pkg
        for binary, pkg in TOOLS.items()
        if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists()
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing tools; run: sudo apt-get install -y {' '.join(missing)}")
    print(f"installing {' '.join(missing)} (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    for pkg in missing:
        candidates = [pkg, "nginx"] if pkg == "nginx-light" else [pkg]
        for candidate in candidates:
            done = subprocess.run(["apt-get", "install", "-y", "-qq", candidate], env=env)
            if done.returncode == 0:
                break
        else:
            sys.exit(f"could not install {pkg}")


def parse_seconds(text: str) -> float:
    text = text.strip()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * scale
    return float(text)


@dataclass(frozen=True)
class Placement:
    """Which CPUs the hop under test and the load side (wrk, upstream, redis) may use."""

    hop: str | None
    load: str | None
    wrk_threads: int
    workers: int = 1
    cpus: int = 1  # the CPUs this run may use

    @property
    def oversubscribed(self) -> bool:
        """More hop processes than CPUs: they take turns on the cores (with wrk, the
        upstream and Redis) instead of running side by side."""
        return self.workers > self.cpus

    def describe(self) -> str:
        if self.hop is None:
            text = f"unpinned, wrk -t{self.wrk_threads}"
            if self.oversubscribed:
                text += (
                    f"; {self.workers} hop processes on {self.cpus} CPUs (oversubscribed: "
                    "they share the cores with each other and with the load side)"
                )
            return text
        return (
            f"hop on CPU {self.hop}; wrk -t{self.wrk_threads}, upstream, redis on CPU {self.load}"
        )


def machine_is_quiet() -> bool:
    return float(Path("/proc/loadavg").read_text().split()[0]) < QUIET_LOADAVG


def placement(workers: int, pin: str, threads: int | None, quiet: bool) -> Placement:
    cpus = sorted(os.sched_getaffinity(0))
    # One hop process: it gets a core of its own, everything else shares the rest, so the
    # figure is the hop's, not the scheduler's. More processes than that on a 2-core box
    # cannot be given cores of their own, so nothing is pinned. On a busy machine pinning
    # backfires (other work lands on the pinned cores and nothing can move away), so `auto`
    # pins only when the machine is quiet.
    wanted = pin == "on" or (pin == "auto" and quiet)
    if wanted and workers == 1 and len(cpus) >= 2:
        load = cpus[1:]
        return Placement(
            str(cpus[0]), ",".join(map(str, load)), threads or min(2, len(load)), 1, len(cpus)
        )
    return Placement(None, None, threads or 2, workers, len(cpus))


def set_affinity(root: int, cpus: str | None) -> None:
    """Move a running process tree (every thread) to `cpus`; None means every CPU."""
    mask = {int(c) for c in cpus.split(",")} if cpus else set(range(os.cpu_count() or 1))
    for pid in process_tree(root):
        tasks = Path(f"/proc/{pid}/task")
        for tid in os.listdir(tasks) if tasks.exists() else ():
            with contextlib.suppress(OSError):  # the thread may have ended
                os.sched_setaffinity(int(tid), mask)


# --- Redis round trip -----------------------------------------------------------------


def redis_round_trip(url: str, cpus: str | None, calls: int = 2000) -> dict[str, float]:
    """p50/p99 of one redis-py asyncio PING (hiredis, uvloop), sequential, in seconds."""

    async def measure() -> list[float]:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)
        try:
            for _ in range(200):
                await client.ping()
            samples = []
            for _ in range(calls):
                started = time.perf_counter()
                await client.ping()
                samples.append(time.perf_counter() - started)
            return samples
        finally:
            await client.aclose()

    saved = os.sched_getaffinity(0)
    if cpus:  # measured where the proxy runs, like the proxy would see it
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    try:
        samples = sorted(_run_async(measure()))
    finally:
        os.sched_setaffinity(0, saved)
    return {
        "p50": samples[len(samples) // 2],
        "p99": samples[int(len(samples) * 0.99)],
        "calls": float(calls),
    }


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def prefill(url: str, prefix: str, count: int) -> None:
    """Send each replay key once (a first attempt), then check that a retry is a replay."""

    async def send() -> None:
        import aiohttp

        headers = {"Content-Type": "application/json"}
        semaphore = asyncio.Semaphore(20)
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> tuple[int, str | None]:
                async with (
                    semaphore,
                    session.post(
                        url, data=BODY, headers={**headers, "Idempotency-Key": f"{prefix}-{i}"}
                    ) as response,
                ):
                    await response.read()
                    return response.status, response.headers.get("Idempotent-Replayed")

            async with asyncio.timeout(60):
                firsts = await asyncio.gather(*(one(i) for i in range(1, count + 1)))
            bad = [s for s, replayed in firsts if s != 200 or replayed]
            if bad:
                raise RuntimeError(
                    f"prefill: {len(bad)} of {count} first attempts failed: {bad[:5]}"
                )
            status, replayed = await one(1)
            if status != 200 or replayed != "true":
                raise RuntimeError(f"prefill: a retry was not replayed ({status}, {replayed})")

    _run_async(send())


# --- running one case -----------------------------------------------------------------


@dataclass
class Run:
    """The state of one invocation: options, shared servers, results."""

    args: argparse.Namespace
    tmp: Path
    upstream: Server
    redis: RedisServer | None
    proxy_workers_flag: bool
    # The Redis set-ups running now, by `Case.store`: the run's own redis-server for the
    # whole run, a topology only while its case runs (`topology`).
    stores: dict[str, BenchStore] = field(default_factory=dict)
    results: list[Measurement] = field(default_factory=list)
    latency: dict[str, wrk.WrkResult] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.redis is not None:
            self.stores["redis"] = stores.standalone(self.redis)

    @contextlib.contextmanager
    def topology(self, case: Case, place: Placement) -> Iterator[None]:
        """Run `case`'s topology (if it has one) for the time of the block: started on the
        load side's CPUs, and every one of its processes killed at the end."""
        start = stores.TOPOLOGIES.get(case.store or "")
        if start is None or not self.runs_at(case, place.workers):
            yield
            return
        print(f"  starting {case.store} for {case.name} ...", end="", flush=True)
        began = time.monotonic()
        with start() as store:
            for node in store.processes:
                set_affinity(node.pid, place.load)
            print(f" {store.describe()}, {time.monotonic() - began:.1f}s", flush=True)
            self.stores[store.kind] = store
            try:
                yield
            finally:
                del self.stores[store.kind]

    def runs_at(self, case: Case, workers: int) -> bool:
        return self.skip_reason(case, workers) is None

    def skip_reason(self, case: Case, workers: int) -> str | None:
        if case.hop == "proxy" and workers > 1 and not self.proxy_workers_flag:
            return "idempotency-proxy has no --workers option yet"
        if case.store == "memory" and workers > 1:
            return "memory:// belongs to one process; the proxy refuses --workers > 1 with it"
        return None

    def store_of(self, case: Case) -> BenchStore | None:
        if case.store in (None, "memory"):
            return None
        store = self.stores.get(case.store or "")
        assert store is not None, f"{case.name}: its store ({case.store}) is not running"
        return store

    def start_hop(
        self, case: Case, workers: int, cpus: str | None, level: str | None
    ) -> Server | None:
        if case.hop == "direct":
            return None
        if case.hop == "nginx":
            return services.start_nginx_proxy(self.tmp, self.upstream, workers, cpus)
        if case.hop == "passthrough":
            return services.start_passthrough(self.tmp, self.upstream, workers, cpus)
        store = self.store_of(case)
        if store is not None:
            store.flush()
        return services.start_proxy(
            self.tmp,
            f"proxy-{case.name}-{workers}w-{level or self.args.log_levels[0]}",
            self.upstream,
            store.url if store is not None else "memory://",
            workers,
            cpus,
            level or self.args.log_levels[0],
            self.proxy_workers_flag,
            min_replicas_ack=case.min_replicas_ack,
        )

    def measure(
        self, case: Case, workers: int, place: Placement, level: str | None = None
    ) -> Measurement:
        m = Measurement(case.name, workers, log_level=level)
        m.skipped = self.skip_reason(case, workers)
        if m.skipped is not None:
            return m
        store = self.store_of(case)
        hop = self.start_hop(case, workers, place.hop, level)
        # One-connection latency and profiles at the first log level only (the default).
        first_level = level in (None, self.args.log_levels[0])
        target = hop if hop is not None else self.upstream
        try:
            url = target.url + case.path
            prefix = f"r{os.getpid()}x{int(time.time() * 1000) % 10**8}{case.name}{workers}"
            if case.prefill:
                prefill(url, prefix, REPLAY_KEYS)

            def load(seconds: float, connections: int, threads: int, tag: str) -> wrk.WrkResult:
                if case.script == "replay.lua":
                    script_args = [prefix, str(REPLAY_KEYS), case.path]
                else:
                    script_args = [prefix + tag, case.path]
                return wrk.run(
                    url,
                    duration=seconds,
                    connections=connections,
                    threads=threads,
                    script=str(BENCH_DIR / case.script),
                    script_args=script_args,
                    cpus=place.load,
                )

            if self.args.warmup > 0:  # pools filled, code paths warm; not counted
                load(self.args.warmup, self.args.connections, place.wrk_threads, "w")
            cpu_roots = {"hop": [target.pid], "upstream": [self.upstream.pid]}
            primaries: list[int] = []
            calls_before: dict[str, int] = {}
            if store is not None:
                cpu_roots["redis"] = [node.pid for node in store.data]
                if store.others:
                    cpu_roots["sentinels"] = [node.pid for node in store.others]
                primaries = store.primaries()
                calls_before = store.calls()
            before = {k: services.cpu_ticks(*pids) for k, pids in cpu_roots.items()}
            machine_before = services.cpu_busy()
            wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            m.result = load(self.args.duration, self.args.connections, place.wrk_threads, "m")
            wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            machine_after = services.cpu_busy()
            used = {
                k: services.cpu_seconds_between(before[k], services.cpu_ticks(*pids))
                for k, pids in cpu_roots.items()
            }
            m.hop_cpu, m.upstream_cpu = used["hop"], used["upstream"]
            m.redis_cpu, m.sentinel_cpu = used.get("redis"), used.get("sentinels")
            m.extra["wrk_cpu_per_request"] = m.per_request(
                wrk_after.ru_utime + wrk_after.ru_stime - wrk_before.ru_utime - wrk_before.ru_stime
            )
            m.extra["hop_cpu_share"] = m.hop_cpu / m.result.seconds  # 1.0 = one core, all along
            all_cpus = set(machine_before)
            m.extra["machine_busy"] = services.busy_share(machine_before, machine_after, all_cpus)
            if place.load:
                load_cpus = {int(c) for c in place.load.split(",")}
                m.extra["load_cpus_busy"] = services.busy_share(
                    machine_before, machine_after, load_cpus
                )
            if store is not None:
                m.extra["store"] = store.describe()
                m.extra["redis_calls_per_request"] = {
                    command: round(count / m.result.requests, 3)
                    for command, count in calls_between(calls_before, store.calls()).items()
                }
                m.extra["redis_keys"] = store.keys()
                if store.primaries() != primaries:  # a failover: not the set-up measured
                    raise RuntimeError(
                        f"{case.name}: the {store.kind} primaries changed during the run "
                        f"({primaries} -> {store.primaries()})"
                    )
            if hop is not None and not hop.alive():
                raise RuntimeError(f"{hop.name} died during the run:\n{hop.log_tail()}")

            if (
                workers == 1
                and first_level
                and self.args.latency_duration > 0
                and case.name in LATENCY_HOPS
            ):
                self.latency[case.name] = load(self.args.latency_duration, 1, 1, "l")
            if (
                hop is not None
                and case.name in self.args.profile_cases
                and workers == 1
                and first_level
                and self.args.profile > 0
            ):
                self.profile(
                    case, hop, lambda s: load(s, self.args.connections, place.wrk_threads, "p")
                )
        finally:
            if hop is not None:
                hop.stop()
            if store is not None:
                store.flush()
        return m

    def profile(self, case: Case, hop: Server, load: Callable[[float], wrk.WrkResult]) -> None:
        seconds = self.args.profile
        output = self.tmp / f"profile-{case.name}.txt"
        sampler = profiling.record(hop.pid, seconds, output)
        time.sleep(0.3)  # let py-spy attach before the load starts
        load(seconds + 1)
        _, err = sampler.communicate(timeout=seconds + 30)
        if not output.exists():
            self.profiles[case.name] = f"py-spy failed: {err.decode(errors='replace')[-500:]}"
            return
        summary = profiling.summarise(output)
        self.profiles[case.name] = profiling.report(f"{case.name} ({case.title})", summary)


# --- reporting ------------------------------------------------------------------------


def us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:,.0f}"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f" ({value / reference:.2f}x)"


def throughput_table(run: Run) -> list[str]:
    lines = [
        "| case | workers | req/s | p50 | p99 | hop CPU us/req | hop CPU % | redis us/req "
        "| errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    titles = {c.name: c.title for c in CASES}
    reference = {m.workers: m for m in run.results if m.case == "passthrough" and m.result}
    for m in run.results:
        title = f"{m.name}: {titles[m.case]}"
        if m.skipped or m.result is None:
            lines.append(f"| {title} | {m.workers} | skipped: {m.skipped} | | | | | | |")
            continue
        ref = reference.get(m.workers)
        ref_result = ref.result if ref else None
        r = m.result
        cpu = m.per_request(m.hop_cpu)
        ref_cpu = ref.per_request(ref.hop_cpu) if ref else None
        lines.append(
            f"| {title} | {m.workers} "
            f"| {r.rps:,.0f}{ratio(r.rps, ref_result.rps if ref_result else None)} "
            f"| {ms(r.p50)}{ratio(r.p50, ref_result.p50 if ref_result else None)} "
            f"| {ms(r.p99)}{ratio(r.p99, ref_result.p99 if ref_result else None)} "
            f"| {us(cpu)}{ratio(cpu, ref_cpu)} "
            f"| {100 * m.extra.get('hop_cpu_share', 0):.0f} "
            f"| {us(m.per_request(m.redis_cpu))} | {r.errors or ''} |"
        )
    return lines


def latency_table(run: Run) -> list[str]:
    if not run.latency:
        return []
    direct = run.latency.get("direct")
    passthrough = run.latency.get("passthrough")
    lines = [
        "| hop (1 connection) | p50 | p99 | added p50 vs direct | added p99 vs direct "
        "| added p50 vs pass-through |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in LATENCY_HOPS:
        r = run.latency.get(name)
        if r is None:
            continue

        def added(base: wrk.WrkResult | None, pct: str, r: wrk.WrkResult = r) -> str:
            if base is None or r is base:
                return "-"
            return f"{(r.latency[pct] - base.latency[pct]) * 1e6:+,.0f} us"

        lines.append(
            f"| {name} | {ms(r.p50)} | {ms(r.p99)} | {added(direct, '50')} "
            f"| {added(direct, '99')} | {added(passthrough, '50')} |"
        )
    return lines


def targets(run: Run, rtt: dict[str, float] | None) -> list[tuple[str, bool | None, str]]:
    """(target, passed or None when it could not be measured, the figures), per log level."""
    out = []
    for level in run.args.log_levels:
        results = [m for m in run.results if m.log_level in (None, level)]
        latency = run.latency if level == run.args.log_levels[0] else {}
        suffix = f" [log_level {level}]" if len(run.args.log_levels) > 1 else ""
        out += [(f"{label}{suffix}", passed, figures)
                for label, passed, figures in level_targets(results, latency, rtt)]  # fmt: skip
    return out


def level_targets(
    results: list[Measurement], latency: dict[str, wrk.WrkResult], rtt: dict[str, float] | None
) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    by = {(m.case, m.workers): m for m in results if m.result is not None}
    workers = sorted({m.workers for m in results})
    for case, minimum in (
        ("redis-first", 0.85),
        ("mem-first", 0.9),
        ("open", 0.95),
        ("redis-replay", 1.5),
    ):
        for w in workers:
            m, ref = by.get((case, w)), by.get(("passthrough", w))
            label = f"{case} req/s >= {minimum}x pass-through, {w} worker(s)"
            if m is None or ref is None or m.result is None or ref.result is None:
                if (case, w) in {(x.case, x.workers) for x in results}:
                    out.append((label, None, "not measured"))
                continue
            value = m.result.rps / ref.result.rps
            note = f"{value:.2f}x ({m.result.rps:,.0f} / {ref.result.rps:,.0f})"
            if m.result.errors:
                note += f", {m.result.errors} errors"
            out.append((label, value >= minimum and not m.result.errors, note))
    if rtt is not None and "passthrough" in latency:
        # One store round trip is on a first attempt's critical path (the answer does not
        # wait for the complete), so that and 40 us is its budget.
        budget = rtt["p50"] + 40e-6
        base = latency["passthrough"].p50
        for case, allowed, words in (
            ("redis-first", budget, "1 Redis round trip + 40 us"),
            ("mem-first", 40e-6, "40 us (no round trip)"),
        ):
            if case in latency:
                added = latency[case].p50 - base
                out.append(
                    (
                        f"{case} added p50 at 1 connection <= {words} over pass-through",
                        added <= allowed,
                        f"+{added * 1e6:.0f} us vs budget {allowed * 1e6:.0f} us",
                    )
                )
    if 1 in workers and 2 in workers:
        for case in (
            "passthrough",
            "nginx",
            "open",
            "mem-first",
            "redis-first",
            "redis-replay",
            "redis-mix",
        ):
            one, two = by.get((case, 1)), by.get((case, 2))
            label = f"{case} 2 workers >= 1.7x of 1 worker"
            if one is None or two is None or one.result is None or two.result is None:
                if (case, 2) in {(x.case, x.workers) for x in results}:
                    out.append((label, None, "not measured (see skipped rows)"))
                continue
            value = two.result.rps / one.result.rps
            out.append((label, value >= 1.7, f"{value:.2f}x"))
    return out


def warnings(run: Run, meta: dict[str, Any]) -> list[str]:
    """Signs that a figure measures the machine rather than the hop."""
    out = []
    if float(meta["loadavg_before"][0]) > 0.5:
        out.append(
            f"load average {meta['loadavg_before'][0]} at the start: something else is "
            "using the CPUs, so req/s and latency are noisy (CPU us/req much less so)"
        )
    for m in run.results:
        share, load_busy = m.extra.get("hop_cpu_share"), m.extra.get("load_cpus_busy")
        if share is not None and load_busy is not None and load_busy > 0.9 and share < 0.85:
            out.append(
                f"{m.name}, {m.workers} worker(s): the load CPUs were {load_busy:.0%} busy "
                f"and the hop only {share:.0%}: the load side, not the hop, set the pace"
            )
    return out


def to_json(run: Run, rtt: dict[str, float] | None, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "redis_round_trip": rtt,
        "cases": [
            {
                "case": m.case,
                "workers": m.workers,
                "log_level": m.log_level,
                "skipped": m.skipped,
                "wrk": m.result.as_dict() if m.result else None,
                "hop_cpu_seconds": m.hop_cpu,
                "hop_cpu_per_request": m.per_request(m.hop_cpu),
                "redis_cpu_per_request": m.per_request(m.redis_cpu),
                "sentinel_cpu_per_request": m.per_request(m.sentinel_cpu),
                "upstream_cpu_per_request": m.per_request(m.upstream_cpu),
                **m.extra,
            }
            for m in run.results
        ],
        "one_connection": {name: r.as_dict() for name, r in run.latency.items()},
        "targets": [{"target": t, "pass": p, "figures": f} for t, p, f in targets(run, rtt)],
        "profiles": run.profiles,
    }


# --- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Throughput, latency and CPU of the proxy vs references."
    )
    parser.add_argument(
        "--duration", type=parse_seconds, default=8.0, help="measured seconds per case (default 8s)"
    )
    parser.add_argument(
        "--warmup",
        type=parse_seconds,
        default=1.0,
        help="unmeasured seconds of load before each case (default 1s)",
    )
    parser.add_argument(
        "--latency-duration",
        type=parse_seconds,
        default=3.0,
        help="seconds of 1-connection load per hop, 0 to skip (default 3s)",
    )
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="wrk -t (default: 1 when pinned on 2 cores, else 2)",
    )
    parser.add_argument(
        "--workers",
        default="1,2",
        help="process counts of every hop, comma-separated, e.g. 1,2,4 (default 1,2; more "
        "than the machine's CPUs share them: see the placement line)",
    )
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_CASES),
        help=f"cases to run, comma-separated (default {','.join(DEFAULT_CASES)}); also: "
        + ",".join(c for c in CASE_NAMES if c not in DEFAULT_CASES)
        + " (each starts a Redis topology of its own)",
    )
    parser.add_argument(
        "--pin",
        choices=("auto", "on", "none"),
        default="auto",
        help="on: with 1 worker, the hop gets CPU 0 and the load side (wrk, upstream, redis) "
        "the rest; auto (default): on when the 1-minute load average is below 1, else none; "
        "none: let the scheduler place everything",
    )
    parser.add_argument(
        "--log-level",
        default="info,warning",
        help="the proxy's log_level(s), comma-separated: each proxy case runs at each "
        "(default info,warning: info, the default, writes one JSON line per request; "
        "one-connection latency and profiles use the first)",
    )
    parser.add_argument(
        "--profile",
        type=parse_seconds,
        default=0.0,
        help="also sample the proxy with py-spy for this long (1 worker)",
    )
    parser.add_argument(
        "--profile-cases",
        default="open,mem-first,redis-first",
        help="cases to profile with --profile (default open,mem-first,redis-first)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers: expected counts like 1,2,4, got {args.workers!r}")
    if not args.workers or min(args.workers) < 1 or len(set(args.workers)) < len(args.workers):
        parser.error(f"--workers: expected distinct counts >= 1 like 1,2,4, got {args.workers}")
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CASE_NAMES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {','.join(CASE_NAMES)}")
    args.profile_cases = [c.strip() for c in args.profile_cases.split(",") if c.strip()]
    args.log_levels = [level.strip() for level in args.log_level.split(",") if level.strip()]
    if not args.log_levels or set(args.log_levels) - {"debug", "info", "warning", "error"}:
        parser.error(f"--log-level: expected levels like info,warning, got {args.log_level!r}")
    return args


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The store commands run between two `BenchStore.calls`, but the bench's own INFO."""
    return {
        command: count - before.get(command, 0)
        for command, count in sorted(after.items())
        if command != "info" and count > before.get(command, 0)
    }


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measure_and_show(
    run: Run, case: Case, workers: int, place: Placement, level: str | None
) -> None:
    name = case.name if level is None else f"{case.name} @ {level}"
    print(f"  {name}, {workers} worker(s) ...", end="", flush=True)
    m = run.measure(case, workers, place, level)
    run.results.append(m)
    if m.result is not None:
        print(
            f" {m.result.rps:,.0f} req/s, p50 {ms(m.result.p50)}"
            + (f", {m.result.errors} errors" if m.result.errors else ""),
            flush=True,
        )
    else:
        print(f" skipped: {m.skipped}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools()
    cases = [c for c in CASES if c.name in args.only]
    per_case = args.warmup + args.duration + 1.5
    runs = sum(len(args.log_levels) if c.hop == "proxy" else 1 for c in cases)
    topologies = len([c for c in cases if c.store in stores.TOPOLOGIES])
    estimate = (
        runs * len(args.workers) * per_case
        + topologies * len(args.workers) * TOPOLOGY_START_SECONDS
        + (
            len([c for c in cases if c.name in LATENCY_HOPS]) * args.latency_duration
            if 1 in args.workers
            else 0
        )
        + len(args.profile_cases) * (args.profile + 2) * (args.profile > 0)
        + 10
    )
    print(
        f"bench: {len(cases)} case(s) x workers {args.workers}, {args.duration:g}s each, "
        f"about {estimate / 60:.1f} min",
        flush=True,
    )

    # Every process of the run is stopped on the way out; a SIGTERM or SIGHUP (not only
    # Ctrl-C) must take that way too instead of ending the bench with its servers running.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    tmp = Path(tempfile.mkdtemp(prefix="idempotency-bench-"))
    upstream = redis = None
    started = time.monotonic()
    loadavg_before = Path("/proc/loadavg").read_text().split()[:3]
    quiet = machine_is_quiet()  # judged before the run adds its own load
    rtt = None
    try:
        upstream = services.start_upstream(tmp, None)
        need_redis = any(c.store == "redis" for c in cases)
        redis = services.start_redis(tmp, None) if need_redis else None
        run = Run(args, tmp, upstream, redis, services.proxy_supports_workers())
        if not run.proxy_workers_flag:
            print(
                "note: idempotency-proxy has no --workers yet: proxy cases run with 1 worker only",
                flush=True,
            )
        placements = {}
        for workers in args.workers:
            place = placement(workers, args.pin, args.threads, quiet)
            placements[workers] = place.describe()
            os.sched_setaffinity(
                0,
                {int(c) for c in place.load.split(",")}
                if place.load
                else set(range(os.cpu_count() or 1)),
            )
            set_affinity(upstream.pid, place.load)
            if redis is not None:
                set_affinity(redis.pid, place.load)
                if rtt is None:
                    rtt = redis_round_trip(redis.url, place.hop)
            for case in cases:
                with run.topology(case, place):
                    # Proxy cases once per log level, back to back, so that they compare.
                    for level in args.log_levels if case.hop == "proxy" else [None]:
                        measure_and_show(run, case, workers, place, level)
    finally:
        for server in (upstream, redis):
            if server is not None:
                server.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    meta = {
        "cpus": os.cpu_count(),
        "placement": placements,
        "connections": args.connections,
        "duration": args.duration,
        "log_levels": args.log_levels,
        "proxy_workers_flag": run.proxy_workers_flag,
        "loadavg_before": loadavg_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "wall_seconds": round(time.monotonic() - started, 1),
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[0]
        if shutil.which("wrk")
        else None,
    }
    print()
    print(
        f"wrk -c{args.connections}, {args.duration:g}s per case; proxy log_level "
        f"{' and '.join(args.log_levels)} (`case @ level`); (x) = ratio to the bare "
        "pass-through with the same workers;"
    )
    print(
        "hop CPU = the hop's processes (all workers), per request and as % of one core; "
        "redis = the store's data nodes (primaries and replicas, every Cluster master; "
        "sentinels apart, in --json)."
    )
    for workers, text in placements.items():
        print(f"placement, {workers} worker(s): {text}")
    print(
        f"load average before/after: {' '.join(meta['loadavg_before'])} / "
        f"{' '.join(meta['loadavg_after'])}; {meta['wall_seconds']}s in all"
    )
    print()
    print("\n".join(throughput_table(run)))
    for warning in warnings(run, meta):
        print(f"warning: {warning}")
    if run.latency:
        print()
        print("\n".join(latency_table(run)))
    if rtt is not None:
        print()
        print(
            f"one Redis round trip (redis-py asyncio PING, {rtt['calls']:.0f} sequential): "
            f"p50 {rtt['p50'] * 1e6:.0f} us, p99 {rtt['p99'] * 1e6:.0f} us; target for the "
            f"added p50: 1 round trip + 40 us = {(rtt['p50'] + 40e-6) * 1e6:.0f} us"
        )
    print()
    for label, passed, figures in targets(run, rtt):
        verdict = "n/a " if passed is None else ("PASS" if passed else "MISS")
        print(f"{verdict}  {label}: {figures}")
    for text in run.profiles.values():
        print()
        print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(run, rtt, meta), indent=2))
        print(f"\nraw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
