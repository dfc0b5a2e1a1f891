"""The `idempotency-proxy` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from proxy import __version__, logs
from proxy.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idempotency-proxy",
        description="A reverse proxy that makes retries safe for APIs never built for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve the proxy")
    run.add_argument("--config", required=True, help="the YAML config file")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", help="the YAML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "run":
        return run(args.config)
    raise AssertionError(args.command)


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


def run(path: str) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    logs.configure(config.log_level)
    from proxy import server

    _install_uvloop()
    asyncio.run(server.run(config, path))
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the standard loop works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
