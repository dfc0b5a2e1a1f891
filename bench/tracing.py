"""What tracing costs when it samples nothing: `tracing:` off against on at `sample_ratio: 0`.

The target (issue 14): tracing on with sampling 0 costs at most 3 % of throughput. Two
proxies, identical but for the tracing block, run in front of one nginx upstream, and the
median of several rounds is compared: req/s, and the proxy's CPU per request (utime + stime
from /proc). The traced proxy exports to a loopback port where nothing listens: at sampling
0 nothing is sent. Two ways to run a round:

- `paired` (the default): both proxies share one CPU and are loaded at the same time, each
  by its own wrk. The scheduler gives them equal CPU time, so their req/s ratio is the
  inverse ratio of their CPU per request, and whatever else the machine does hits both at
  once: the figure holds on a busy machine, where back-to-back runs drift by more than 3 %.
- `alternate`: one proxy at a time, off and on in turn (the first of a pair alternating).

Then, in this process, the hooks themselves are timed on their unsampled path against the
calls they wrap (the middleware, a store call, an upstream call): CPU that does not depend on
what else the machine runs, added up per protected first attempt.

    .venv/bin/python -m bench.tracing         # 7 paired rounds of 5 s per case (~2 minutes)
    .venv/bin/python -m bench.tracing --method alternate --rounds 5 --cases first --json out.json

It needs wrk and nginx (bench/run installs them) and the otel extra in the Python running it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from yarl import URL

from bench import services, wrk
from bench.services import BENCH_DIR, Server
from proxy.config import TracingConfig
from proxy.store.base import Acquired, Decision, Outcome, StoredResponse
from proxy.tracing import TracedUpstream, Tracing
from proxy.upstream import Answer, UpstreamClient
from tests.support.ports import free_port

TARGET = 0.03  # at most 3 % lower throughput with tracing on at sampling 0
CASES = {
    "first": "/pay/orders",  # protected first attempts, memory://: every tracing hook runs
    "open": "/open/orders",  # the unprotected route: the middleware and the upstream hook
}
MODES = ("off", "on-0")


def start(tmp: Path, mode: str, upstream: Server, cpus: str | None, log_level: str,
          traced: bool) -> Server:  # fmt: skip
    """One proxy process; `traced` adds a tracing block that samples nothing."""
    block = ""
    if traced:
        sink = free_port()  # nothing listens there: at sampling 0 nothing is sent
        block = f"tracing: {{endpoint: 'http://127.0.0.1:{sink}', sample_ratio: 0}}\n"
    return services.start_proxy(tmp, f"proxy-{mode}", upstream, "memory://", 1, cpus,
                                log_level, pass_workers=False, extra_config=block)  # fmt: skip


@dataclass
class Sample:
    rps: float
    cpu_us: float  # the proxy's CPU per request
    errors: int


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)

    def add(self, case: str, mode: str, sample: Sample) -> None:
        self.samples.setdefault((case, mode), []).append(sample)

    def median(self, case: str, mode: str, what: str) -> float:
        return float(statistics.median(getattr(s, what) for s in self.samples[(case, mode)]))

    def ratio(self, case: str, what: str) -> float:
        """The median over rounds of on / off within a round: drift between rounds cancels."""
        off, on = (self.samples[(case, mode)] for mode in MODES)
        pairs = zip(off, on, strict=True)
        return float(statistics.median(getattr(b, what) / getattr(a, what) for a, b in pairs))


def measure(proxies: dict[str, Server], path: str, args: argparse.Namespace, tag: str,
            load_cpus: str | None) -> dict[str, Sample]:  # fmt: skip
    """One wrk run on each of `proxies`, all at once (after a warm-up), with each proxy's CPU
    over the measured part."""

    def load(mode: str, seconds: float, suffix: str) -> wrk.WrkResult:
        return wrk.run(
            proxies[mode].url + path, duration=seconds, connections=args.connections,
            threads=args.threads, script=str(BENCH_DIR / "first.lua"),
            script_args=[f"{tag}{mode}{suffix}", path], cpus=load_cpus,
        )  # fmt: skip

    with ThreadPoolExecutor(len(proxies)) as pool:
        list(pool.map(lambda mode: load(mode, args.warmup, "w"), proxies))
        before = {mode: services.cpu_ticks(proxy.pid) for mode, proxy in proxies.items()}
        runs = pool.map(lambda mode: load(mode, args.duration, "m"), proxies)
        results = dict(zip(proxies, runs, strict=True))
    samples = {}
    for mode, result in results.items():
        after = services.cpu_ticks(proxies[mode].pid)
        cpu = services.cpu_seconds_between(before[mode], after)
        samples[mode] = Sample(result.rps, cpu / max(result.requests, 1) * 1e6, result.errors)
    return samples


def report(results: Results, cases: list[str], rounds: int) -> list[str]:
    lines = [
        "| case | tracing | req/s (median) | proxy CPU us/req (median) | req/s of each round |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        for mode in MODES:
            runs = ", ".join(f"{s.rps:,.0f}" for s in results.samples[(case, mode)])
            lines.append(
                f"| {case} | {mode} | {results.median(case, mode, 'rps'):,.0f} "
                f"| {results.median(case, mode, 'cpu_us'):.1f} | {runs} |"
            )
    lines.append("")
    for case in cases:
        cost = 1 - results.ratio(case, "rps")
        verdict = "PASS" if cost <= TARGET else "MISS"
        lines.append(
            f"{verdict}  {case}: tracing on at sampling 0 has {cost:+.1%} lower throughput "
            f"and {results.ratio(case, 'cpu_us') - 1:+.1%} CPU per request (median over "
            f"{rounds} rounds of on / off in the same round)"
        )
    return lines


def run_round(proxies: dict[str, Server], case: str, index: int, args: argparse.Namespace,
              load_cpus: str | None, results: Results) -> None:  # fmt: skip
    tag = f"t{os.getpid()}{int(time.time() * 1000) % 10**8}{case}{index}"
    if args.method == "paired":  # which load starts first alternates too
        groups = [list(MODES if index % 2 == 0 else MODES[::-1])]
    else:  # alternate which goes first, so neither always runs on a warmer machine
        groups = [[mode] for mode in (MODES if index % 2 == 0 else MODES[::-1])]
    for group in groups:
        samples = measure({m: proxies[m] for m in group}, CASES[case], args, tag, load_cpus)
        for mode, sample in samples.items():
            results.add(case, mode, sample)
            print(f"{case} {mode} round {index + 1}: {sample.rps:,.0f} req/s, "
                  f"{sample.cpu_us:.1f} us CPU/req, {sample.errors} errors",
                  file=sys.stderr, flush=True)  # fmt: skip


# --- the hooks alone, in this process ----------------------------------------------------


class _NoStore:
    """A store that answers at once: what is left to time is the wrapper around it."""

    async def begin(self, key: str, fingerprint: str, *, lease: float, ttl: float,
                    takeover: bool, tombstone: float = 0.0) -> Decision:  # fmt: skip
        return Acquired("token")

    async def complete(self, key: str, token: str, outcome: Outcome, *, ttl: float,
                       tombstone: float = 0.0) -> bool:  # fmt: skip
        return True


class _NoUpstream(UpstreamClient):
    """An upstream client whose `fetch` answers at once (under `TracedUpstream`, by MRO)."""

    async def fetch(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes, *,
                    deadline: float, upstream_timeout: float, limit: int) -> Answer:  # fmt: skip
        return None  # type: ignore[return-value]  # nobody reads it


class _TracedNoUpstream(TracedUpstream, _NoUpstream):
    pass


async def _added(bare: Any, wrapped: Any, calls: int, passes: int = 7) -> float:
    """CPU microseconds `await wrapped()` takes more than `await bare()`: the fastest of
    `passes` alternating passes of each, so that a pass the scheduler slowed does not count."""
    best = {bare: float("inf"), wrapped: float("inf")}
    for _ in range(passes):
        for make in best:
            started = time.process_time()
            for _ in range(calls):
                await make()
            best[make] = min(best[make], (time.process_time() - started) / calls * 1e6)
    return best[wrapped] - best[bare]


async def hook_costs(calls: int = 50_000) -> dict[str, float]:
    """What each hook adds on an unsampled request, in CPU us: wrapped minus bare."""
    config = TracingConfig(f"http://127.0.0.1:{free_port()}/v1/traces", sample_ratio=0)
    tracing = Tracing(config)
    request = make_mocked_request("POST", "/pay/orders", headers={"Idempotency-Key": "k"})

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    traced_handler = partial(tracing.trace, handler=handler)
    bare_store, store = _NoStore(), tracing.store(_NoStore(), "memory")  # type: ignore[arg-type]
    bare_upstream, upstream = _NoUpstream(1.0), _TracedNoUpstream(1.0, tracing.tracer,
                                                                 tracing.propagator)  # fmt: skip
    outcome = Outcome("response", StoredResponse(201, (), b""))
    url, headers = URL("http://127.0.0.1:9/pay/orders"), CIMultiDict[str]()
    pairs = {
        # As `proxy.app.proxy_handler` composes it: one more partial in the chain.
        "middleware": (lambda: handler(request), lambda: traced_handler(request)),
        "store begin": (lambda: bare_store.begin("k", "f", lease=1, ttl=2, takeover=False),
                        lambda: store.begin("k", "f", lease=1, ttl=2, takeover=False)),
        "store complete": (lambda: bare_store.complete("k", "t", outcome, ttl=2),
                           lambda: store.complete("k", "t", outcome, ttl=2)),
        "upstream": tuple(
            lambda client=client: client.fetch("POST", url, headers, b"", deadline=0,
                                               upstream_timeout=1, limit=1)
            for client in (bare_upstream, upstream)
        ),
    }  # fmt: skip
    costs = {}
    for name, (bare, wrapped) in pairs.items():
        costs[name] = await _added(bare, wrapped, calls)
    await bare_upstream.close()
    await upstream.close()
    await tracing.close()
    return costs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tracing", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--method",
        choices=("paired", "alternate"),
        default="paired",
        help="paired: both at once on one CPU (default); alternate: in turn",
    )
    parser.add_argument("--rounds", type=int, default=7, help="off/on pairs per case (7)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds (1)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument("--cases", default="first,open", help="first,open (both)")
    parser.add_argument("--log-level", default="warning", choices=("info", "warning"))
    parser.add_argument("--pin", choices=("on", "none"), default="on",
                        help="on: the proxies on CPU 0, wrk and nginx on the rest")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write every sample here")
    parser.add_argument(
        "--aa",
        action="store_true",
        help="A/A check: 'on-0' runs without tracing too (the rig's bias)",
    )
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in args.cases if c not in CASES]:
        parser.error(f"unknown case(s) {unknown}; choose from {','.join(CASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    pin = args.pin == "on" and len(cpus) >= 2
    hop_cpus = str(cpus[0]) if pin else None
    load_cpus = ",".join(map(str, cpus[1:])) if pin else None
    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as directory:
        tmp = Path(directory)
        upstream = services.start_upstream(tmp, load_cpus, workers=1)
        proxies = {
            mode: start(
                tmp, mode, upstream, hop_cpus, args.log_level, mode == "on-0" and not args.aa
            )
            for mode in MODES
        }
        try:
            for case in args.cases:
                for index in range(args.rounds):
                    run_round(proxies, case, index, args, load_cpus, results)
        finally:
            for proxy in proxies.values():
                proxy.stop()
            upstream.stop()
    load = os.getloadavg()[0]
    where = f"proxies on CPU {hop_cpus}" if hop_cpus else "unpinned"
    print(f"\n{args.method}; {where}; log_level {args.log_level}; "
          f"1-minute load average at the end {load:.2f}\n")  # fmt: skip
    print("\n".join(report(results, args.cases, args.rounds)))
    costs = asyncio.run(hook_costs())
    total = sum(costs.values())
    print("\nWhat the hooks add to an unsampled request (CPU, in this process, best of 7):")
    print("; ".join(f"{name} {us:+.2f} us" for name, us in costs.items()))
    print(f"a protected first attempt (all four): {total:+.2f} us", end="")
    if "first" in args.cases:
        cpu_off = results.median("first", "off", "cpu_us")
        print(f", {total / cpu_off:.1%} of the {cpu_off:.0f} us it costs untraced here", end="")
    print()
    if args.json is not None:
        raw = {f"{c}/{m}": [s.__dict__ for s in v] for (c, m), v in results.samples.items()}
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
