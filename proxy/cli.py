"""The `idempotency-proxy` command line: parse, then dispatch.

`run` and `check-config` are the proxy's own commands; the tools beside it (`describe`,
`demo`, `audit`, `legacy-api`, `report`) each declare their subcommand and do their work in
`proxy.tools`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from proxy import __version__, logs
from proxy.config import ConfigError, load_config
from proxy.server import refuse, serve_config
from proxy.tools import audit, demo, describe, legacy_api, report
from proxy.workers import supervise, worker_count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempotency-proxy",
        description="A reverse proxy that makes retries safe for APIs never built for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve the proxy")
    run.add_argument("--config", required=True, help="the YAML config file")
    run.add_argument(
        "--workers", default="1",
        help="worker processes sharing the port (SO_REUSEPORT); 'auto' = one per CPU",
    )  # fmt: skip

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="the YAML config file")
    for tool in (describe, demo, audit, legacy_api, report):
        tool.add_parser(commands)  # each sets `run` to its own
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "run":
        return run(args.config, args.workers)
    status: int = args.run(args)
    return status


def check_config(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.routes)} routes, store {config.store.url.split(':')[0]})")
    return 0


def run(path: str, workers: str = "1") -> int:
    try:
        config = load_config(path)
        count = worker_count(workers)
    except ConfigError as exc:
        return refuse(path, exc.problems)
    except ValueError as exc:
        return refuse(path, [f"--workers: expected a number or 'auto', got {workers!r} ({exc})"])
    if count > 1 and config.store.url.startswith("memory:"):
        return refuse(path, [
            f"--workers {count}: store.url is memory://, which one process owns; several "
            "workers would each keep their own records. Use Redis, or one worker"
        ])  # fmt: skip
    if count == 1:
        return serve_config(path)
    logs.configure(config.log_level)
    return supervise(path, count, config.shutdown_grace)
