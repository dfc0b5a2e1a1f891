"""The soak: prove "at most once per key" under faults, and count what it cost.

`bench/soak` runs this (`python -m bench.soak` from the repository root): a redis-server
(or, with `--store sentinel`, a Sentinel group: `soak_failover`), the counting upstream, one
or two proxies sharing that store, and client drivers in separate processes, all on
127.0.0.1 and all its own. The drivers send a bounded number of requests (`soak_load`) while
faults run on a schedule (`soak_faults`); the orchestrator (`soak_run`) collects, and the
report (`soak_report`) decides from the upstream's execution count per key. The exit status
is 1 when there was any duplicate (or a consistency check failed), 2 when the run was cut
short. `--compare-acks` runs the failover mode twice, `min_replicas_ack` 0 then 1, and sets
their figures side by side; its status is that of the second run, and of the first only
when something besides duplicates failed there.

Requests are counted as HTTP attempts (every retry is one). `bench/soak --help` for options.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.soak_failover import SoakSentinel
from bench.soak_faults import SoakRedis, SoakStore
from bench.soak_load import key_lifetime
from bench.soak_report import Summary, describe_store, print_comparison, report
from bench.soak_run import Soak
from tests.support.ports import free_port
from tests.support.topologies import DOWN_AFTER_MS


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
        help="with --store redis: seconds between Redis SIGKILL+restarts (0: never)",
    )
    group.add_argument("--redis-down", type=float, default=0.5, help="seconds Redis stays down")
    group.add_argument("--redis-persistence", choices=("aof", "none"), default="aof")
    group.add_argument(
        "--store",
        choices=("redis", "sentinel"),
        default="redis",
        help="one redis-server, restarted; or a Sentinel group (primary, 2 replicas, 3 "
        "sentinels) whose primary is SIGKILLed and failed over",
    )
    group.add_argument(
        "--failover-every",
        type=float,
        default=15.0,
        help="with --store sentinel: seconds between primary SIGKILLs (0: never)",
    )
    group.add_argument(
        "--down-after-ms",
        type=int,
        default=DOWN_AFTER_MS,
        help="with --store sentinel: the sentinels' down-after-milliseconds",
    )
    group.add_argument(
        "--min-replicas-ack",
        type=int,
        choices=(0, 1, 2),
        help="the proxies' store.min_replicas_ack (None: 1 with --store sentinel, else 0)",
    )
    group.add_argument(
        "--compare-acks",
        action="store_true",
        help="--store sentinel twice, min_replicas_ack 0 then 1, same seed and requests",
    )
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
    if args.compare_acks:
        args.store = "sentinel"
    if args.store == "redis" and args.min_replicas_ack:
        parser.error("--min-replicas-ack needs replicas: --store sentinel")
    if args.min_replicas_ack is None:
        args.min_replicas_ack = 1 if args.store == "sentinel" else 0
    args.store_fault_every = (
        args.failover_every if args.store == "sentinel" else args.redis_restart_every
    )
    if args.requests < 1 or args.drivers < 1 or args.concurrency < args.drivers:
        parser.error("--requests, --drivers and --concurrency must be positive")
    if not args.client_timeout < args.upstream_timeout:
        parser.error("--client-timeout must be below --upstream-timeout")
    if not args.slow_max < args.upstream_timeout:
        parser.error("--slow-max must be below --upstream-timeout")
    if args.ttl < 2 * key_lifetime(args):
        parser.error(f"--ttl must be at least twice the longest key life, {key_lifetime(args):g}s")
    return args


def make_store(args: argparse.Namespace, directory: Path) -> SoakStore:
    if args.store == "sentinel":
        return SoakSentinel(directory, args)
    return SoakRedis.create(directory, args.redis_persistence, args.redis_down)


async def soak_once(args: argparse.Namespace) -> Summary:
    directory = Path(tempfile.mkdtemp(prefix="idempotency-soak-"))
    store = make_store(args, directory)
    soak = Soak(args, directory, f"soak{os.urandom(3).hex()}", store, free_port())
    print(
        f"soak: {args.requests:,} requests, {args.proxies} proxies, {args.drivers} drivers, "
        f"{describe_store(args)}; work dir {directory}",
        file=sys.stderr,
        flush=True,
    )
    summary = Summary(3, False)
    try:
        result = await soak.run()
        summary = report(args, soak, result)
    finally:
        soak.stop_all()
        if args.keep or summary.status != 0 or soak.findings:
            print(f"soak: logs and data kept in {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return summary


async def soak_main(args: argparse.Namespace) -> int:
    if not args.compare_acks:
        return (await soak_once(args)).status
    runs = []
    for acks in (0, 1):
        run_args = argparse.Namespace(**{**vars(args), "min_replicas_ack": acks})
        runs.append((f"min_replicas_ack {acks}", await soak_once(run_args)))
    print()
    print(
        f"## Failover soak, side by side: {args.requests:,} requests each, seed {args.seed}, "
        f"a primary SIGKILLed every {args.failover_every:g} s, down-after-milliseconds "
        f"{args.down_after_ms}"
    )
    print()
    print_comparison(runs)
    (_, without), (_, with_ack) = runs
    if without.status == 2 or not without.clean:
        return max(without.status, with_ack.status, 1)
    return with_ack.status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return asyncio.run(soak_main(args))


if __name__ == "__main__":
    sys.exit(main())
